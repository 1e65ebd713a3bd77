"""The default device, decided in one place: the first CUDA device when there is one, else the CPU."""

from __future__ import annotations

import torch


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"
