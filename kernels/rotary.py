"""The interleaved-pair rotary embedding in plain PyTorch: the oracle the fused kernels rotate against.

The DiT rotates pairs (x[2i], x[2i+1]) of each head by an angle per pair; cos/sin tables hold that angle's cos and
sin repeated for both members of the pair, so a table row has head_dim entries. The rotation is computed in float32
and rounded back to the input's dtype, as the official model does.
"""

from __future__ import annotations

import torch


def rotate_interleaved_pairs(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (batch, tokens, heads, head_dim), cos/sin (batch or 1, tokens, head_dim) -> rotated x in x's dtype."""
    pairs = x.float().unflatten(-1, (-1, 2))
    # (x0, x1) -> (-x1, x0): the partner of each element, signed, so that out = x * cos + partner * sin.
    partner = torch.stack([-pairs[..., 1], pairs[..., 0]], dim=-1).flatten(-2)
    return (x.float() * cos.unsqueeze(2) + partner * sin.unsqueeze(2)).to(x.dtype)


def rotate_leading_tokens(
    x: torch.Tensor, cos: torch.Tensor | None, sin: torch.Tensor | None, rotary_length: int
) -> torch.Tensor:
    """Rotate the first `rotary_length` tokens of x (the image tokens); the rest (the text tokens) stay as they are."""
    if cos is None or rotary_length == 0:
        return x
    rotated = rotate_interleaved_pairs(x[:, :rotary_length], cos, sin)
    return torch.cat([rotated, x[:, rotary_length:]], dim=1)
