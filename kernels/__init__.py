"""Triton kernels, each beside the plain PyTorch reference that is its test oracle. Never imports `engine`.

attention.py  packed_attention: RoPE pass over q/k, then a flash-attention forward over packed [image | text] sequences
norm.py       layer_norm_modulate, gated_residual, gated_residual_layer_norm_modulate, rms_norm_rotary
patchify.py   packed_patchify: the four FramePack patch embeddings as gather-fused GEMMs into one packed sequence
cuda_ops.py   loader of the optional CUDA C++ glue ops (csrc/), with the Triton/PyTorch twins as fallback
reference.py  the eager PyTorch reference of every kernel (no Triton import): the DiT's plain path and the oracle
rotary.py     the interleaved-pair rotation in PyTorch (shared by the references)
launch.py, triton_helpers.py  launch settings and small jit helpers (interpreter-faithful bfloat16 rounding)
verification.py  which kernels are compile-checked / run on which GPU architectures (framepack info, auto attention)
"""
