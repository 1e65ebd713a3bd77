"""Triton kernels, each beside the plain PyTorch reference that is its test oracle. Never imports `engine`."""
