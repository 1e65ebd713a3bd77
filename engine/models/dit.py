"""FramePackDiT: the packed HunyuanVideo transformer of FramePack.

One forward call predicts the flow-matching velocity of a section of noisy latents. Its context is packed into a
single token sequence of constant length, whatever the video length:

    [4x clean latents | 2x clean latents | 1x clean latents | noisy latents | image embedding | prompt]
     (4, 8, 8) kernel   (2, 4, 4) kernel   (1, 2, 2) kernel   (1, 2, 2) kernel   SigLIP tokens    refined text

Each latent token carries a 3D rotary position (frame index, row, column); the coarse 2x/4x tokens carry the
average of the positions they cover. 20 double-stream blocks (image and text with separate weights, joint attention)
and 40 single-stream blocks (one set of weights, attention in parallel with the MLP) follow, then an adaptive norm
and a projection back to latent patches, of which only the noisy section's are kept.

Module and parameter names follow the official checkpoints (lllyasviel/FramePackI2V_HY and
lllyasviel/FramePack_F1_I2V_HY_20250503), so `load_state_dict` takes their weights as they are.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from framepack_engine.runtime.attention import resolve_backend, sdpa_attention
from framepack_engine.models.history import HISTORY_SCALES, HistoryContext
from framepack_kernels import reference
from framepack_engine.errors import BackendUnavailableError, FramePackError, ModelSourceError


# --------------------------------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------------------------------


@dataclass
class DiTConfig:
    """The checkpoint's config.json; defaults are those of lllyasviel/FramePackI2V_HY."""

    in_channels: int = 16
    out_channels: int = 16
    num_attention_heads: int = 24
    attention_head_dim: int = 128
    num_layers: int = 20
    num_single_layers: int = 40
    num_refiner_layers: int = 2
    mlp_ratio: float = 4.0
    patch_size: int = 2
    patch_size_t: int = 1
    qk_norm: str = "rms_norm"
    guidance_embeds: bool = True
    text_embed_dim: int = 4096
    pooled_projection_dim: int = 768
    rope_theta: float = 256.0
    rope_axes_dim: tuple[int, int, int] = (16, 56, 56)
    has_image_proj: bool = True
    image_proj_dim: int = 1152
    has_clean_x_embedder: bool = True
    # Derived sizes.
    hidden_size: int = field(init=False)
    mlp_hidden_size: int = field(init=False)

    def __post_init__(self):
        for name in ("in_channels", "num_attention_heads", "attention_head_dim", "num_layers", "num_single_layers",
                     "num_refiner_layers", "patch_size", "patch_size_t", "text_embed_dim", "pooled_projection_dim",
                     "image_proj_dim"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < (0 if "layers" in name else 1):
                raise FramePackError(f"The checkpoint's config.json has {name}={value!r}, which is not a valid size: "
                                     "download its config.json again.")
        self.rope_axes_dim = tuple(self.rope_axes_dim)
        self.hidden_size = self.num_attention_heads * self.attention_head_dim
        self.mlp_hidden_size = int(self.hidden_size * self.mlp_ratio)
        self.out_channels = self.out_channels or self.in_channels
        if self.qk_norm != "rms_norm":
            raise FramePackError(f"qk_norm {self.qk_norm!r} is not supported: FramePack checkpoints use 'rms_norm'.")
        if sum(self.rope_axes_dim) != self.attention_head_dim:
            raise FramePackError(
                f"rope_axes_dim {self.rope_axes_dim} must sum to attention_head_dim {self.attention_head_dim}: "
                "check the checkpoint's config.json.")

    @classmethod
    def from_dict(cls, config: dict) -> "DiTConfig":
        """Takes config.json as a dict; keys we do not use (`_class_name`, `_diffusers_version`, ...) are ignored."""
        known = {f.name for f in fields(cls) if f.init}
        return cls(**{key: value for key, value in config.items() if key in known})


# --------------------------------------------------------------------------------------------------------------------
# Small building blocks
# --------------------------------------------------------------------------------------------------------------------


def timestep_sinusoid(timesteps: torch.Tensor, channels: int = 256, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of (possibly fractional) timesteps, cosines first, in float32."""
    half = channels // 2
    frequencies = torch.exp(
        -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timesteps.device) / half)
    angles = timesteps.reshape(-1).float()[:, None] * frequencies[None, :]
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)


class MLPEmbedder(nn.Module):
    """Linear -> SiLU -> Linear; the checkpoint names its layers linear_1 and linear_2."""

    def __init__(self, in_features: int, hidden_size: int):
        super().__init__()
        self.linear_1 = nn.Linear(in_features, hidden_size)
        self.linear_2 = nn.Linear(hidden_size, hidden_size)

    def forward(self, x):
        return self.linear_2(F.silu(self.linear_1(x)))


class TimestepTextEmbedding(nn.Module):
    """Conditioning vector: timestep + (optionally) distilled guidance + pooled text embedding."""

    def __init__(self, hidden_size: int, pooled_projection_dim: int, guidance_embeds: bool):
        super().__init__()
        self.timestep_embedder = MLPEmbedder(256, hidden_size)
        self.text_embedder = MLPEmbedder(pooled_projection_dim, hidden_size)
        self.guidance_embedder = MLPEmbedder(256, hidden_size) if guidance_embeds else None

    def forward(self, timestep, pooled_projection, guidance=None):
        dtype = pooled_projection.dtype
        embedding = self.timestep_embedder(timestep_sinusoid(timestep).to(dtype))
        if self.guidance_embedder is not None:
            if guidance is None:
                raise FramePackError("This checkpoint is guidance-distilled: pass `guidance` (the official app uses 10.0 * 1000).")
            embedding = embedding + self.guidance_embedder(timestep_sinusoid(guidance).to(dtype))
        return embedding + self.text_embedder(pooled_projection)


class AdaptiveModulation(nn.Module):
    """SiLU -> Linear of the conditioning vector, split into `chunks` per-channel vectors (shifts, scales, gates)."""

    def __init__(self, hidden_size: int, chunks: int):
        super().__init__()
        self.chunks = chunks
        self.linear = nn.Linear(hidden_size, chunks * hidden_size)

    def forward(self, conditioning):
        return self.linear(F.silu(conditioning)).chunk(self.chunks, dim=1)


class RMSNorm(nn.Module):
    """RMSNorm over head_dim, computed in float32; with a half-precision weight the normalized value is rounded to
    it before the multiply, as the checkpoint's model does."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    @property
    def rounds_before_weight(self) -> bool:
        return self.weight.dtype in (torch.float16, torch.bfloat16)

    def forward(self, x):
        return reference.rms_norm_rotary_reference(x, self.weight, self.eps,
                                                   round_before_weight=self.rounds_before_weight)


class PatchInputs(NamedTuple):
    """One latent group of the packed sequence: its latents, its Conv3d patch embedder and its RoPE tables on the
    base patch grid (batch or 1, frames, rows, columns, head_dim)."""

    latents: torch.Tensor
    embedder: nn.Conv3d
    rope_cos: torch.Tensor
    rope_sin: torch.Tensor


class PlainOps:
    """The memory-bound glue between the GEMMs as the eager references of kernels/reference.py (no Triton)."""

    layer_norm_modulate = staticmethod(reference.layer_norm_modulate_reference)
    gated_residual = staticmethod(reference.gated_residual_reference)
    gated_residual_layer_norm_modulate = staticmethod(reference.gated_residual_layer_norm_modulate_reference)

    @staticmethod
    def packed_patchify(groups: dict[str, PatchInputs]):
        """Each group through its Conv3d module (so the module can be swapped), packed in the dict's order."""
        tokens, cos, sin = [], [], []
        for group in groups.values():
            tokens.append(reference.patch_tokens(group.latents, group.embedder.kernel_size, group.embedder))
            cos.append(reference.pooled_rope_table(group.rope_cos, group.embedder.kernel_size))
            sin.append(reference.pooled_rope_table(group.rope_sin, group.embedder.kernel_size))
        return torch.cat(tokens, dim=1), torch.cat(cos, dim=1), torch.cat(sin, dim=1)

    @staticmethod
    def rms_norm(norm: RMSNorm, x):
        return norm(x)


class FusedOps:
    """The same glue as Triton kernels (kernels/norm.py, kernels/patchify.py): one pass over each row."""

    @staticmethod
    def layer_norm_modulate(x, shift, scale):
        from framepack_kernels.norm import layer_norm_modulate

        return layer_norm_modulate(x, shift, scale)

    @staticmethod
    def gated_residual(x, gate, y):
        from framepack_kernels.norm import gated_residual

        return gated_residual(x, gate, y)

    @staticmethod
    def gated_residual_layer_norm_modulate(x, gate, y, shift, scale):
        from framepack_kernels.norm import gated_residual_layer_norm_modulate

        return gated_residual_layer_norm_modulate(x, gate, y, shift, scale)

    @staticmethod
    def packed_patchify(groups: dict[str, PatchInputs]):
        """One gather-fused GEMM per group writing straight into the packed sequence, rotary tables pooled alongside."""
        from framepack_kernels.patchify import PatchGroup, packed_patchify

        packed = packed_patchify(**{name: PatchGroup(group.latents, group.embedder.weight, group.embedder.bias,
                                                     group.rope_cos, group.rope_sin)
                                    for name, group in groups.items()})
        return packed.tokens, packed.rope_cos, packed.rope_sin

    @staticmethod
    def rms_norm(norm: RMSNorm, x):
        from framepack_kernels.norm import rms_norm_rotary

        return rms_norm_rotary(x, norm.weight, norm.eps, round_before_weight=norm.rounds_before_weight)


class GeluProjection(nn.Module):
    def __init__(self, in_features, out_features):
        super().__init__()
        self.proj = nn.Linear(in_features, out_features)

    def forward(self, x):
        return F.gelu(self.proj(x), approximate="tanh")


class SiluProjection(nn.Module):
    def __init__(self, in_features, out_features):
        super().__init__()
        self.proj = nn.Linear(in_features, out_features)

    def forward(self, x):
        return F.silu(self.proj(x))


class FeedForward(nn.Module):
    """Projection + activation, then a Linear back; index 1 is the checkpoint's parameter-free dropout slot."""

    def __init__(self, hidden_size: int, inner_size: int, activation: str = "gelu_tanh"):
        super().__init__()
        first = GeluProjection if activation == "gelu_tanh" else SiluProjection
        self.net = nn.ModuleList([first(hidden_size, inner_size), nn.Identity(), nn.Linear(inner_size, hidden_size)])

    def forward(self, x):
        return self.net[2](self.net[0](x))


# --------------------------------------------------------------------------------------------------------------------
# Rotary positions
# --------------------------------------------------------------------------------------------------------------------


def rope_tables(frame_indices: torch.Tensor, height: int, width: int, axes_dim, theta: float):
    """cos and sin, each (batch, frames * height * width, head_dim), for a grid of patches at the given frames.

    frame_indices: (batch, frames). The head dim is split into (time, row, column) parts of sizes `axes_dim`;
    each part rotates interleaved pairs by position * theta^(-2i/dim), and holds each angle twice (once per pair).
    """
    batch, frames = frame_indices.shape
    device = frame_indices.device
    rows = torch.arange(height, device=device, dtype=torch.float32)
    columns = torch.arange(width, device=device, dtype=torch.float32)
    positions = (
        frame_indices.float()[:, :, None, None].expand(batch, frames, height, width),
        rows[None, None, :, None].expand(batch, frames, height, width),
        columns[None, None, None, :].expand(batch, frames, height, width),
    )
    angles = []
    for position, dim in zip(positions, axes_dim):
        inverse_frequency = 1.0 / (theta ** (torch.arange(0, dim, 2, device=device, dtype=torch.float32)[: dim // 2] / dim))
        angles.append((position.reshape(batch, -1, 1) * inverse_frequency).repeat_interleave(2, dim=-1))
    angles = torch.cat(angles, dim=-1)
    return angles.cos(), angles.sin()


# --------------------------------------------------------------------------------------------------------------------
# Patch embeddings
# --------------------------------------------------------------------------------------------------------------------


class PatchEmbed(nn.Module):
    def __init__(self, kernel, in_channels, hidden_size):
        super().__init__()
        self.proj = nn.Conv3d(in_channels, hidden_size, kernel_size=kernel, stride=kernel)


class CleanLatentEmbed(nn.Module):
    """The history embedders, one per scale of framepack_engine.models.history.HISTORY_SCALES, so older frames cost fewer tokens."""

    # The checkpoint's names of the history scales' embedders.
    MODULE_NAMES = {"clean": "proj", "clean_2x": "proj_2x", "clean_4x": "proj_4x"}

    def __init__(self, in_channels, hidden_size):
        super().__init__()
        # Registered 1x, 2x, 4x as the checkpoint lists them (parameter order decides seeded random weights).
        for scale in reversed(HISTORY_SCALES):
            self.add_module(self.MODULE_NAMES[scale.name],
                            nn.Conv3d(in_channels, hidden_size, kernel_size=scale.kernel, stride=scale.kernel))

    def embedder(self, scale_name: str) -> nn.Conv3d:
        return getattr(self, self.MODULE_NAMES[scale_name])


class ImageProjection(nn.Module):
    """SigLIP image tokens -> hidden size (up, SiLU, down)."""

    def __init__(self, in_channels, hidden_size):
        super().__init__()
        self.up = nn.Linear(in_channels, hidden_size * 3)
        self.down = nn.Linear(hidden_size * 3, hidden_size)

    def forward(self, x):
        return self.down(F.silu(self.up(x)))


# --------------------------------------------------------------------------------------------------------------------
# Text token refiner
# --------------------------------------------------------------------------------------------------------------------


class SelfAttention(nn.Module):
    def __init__(self, hidden_size, heads):
        super().__init__()
        self.heads = heads
        self.to_q = nn.Linear(hidden_size, hidden_size)
        self.to_k = nn.Linear(hidden_size, hidden_size)
        self.to_v = nn.Linear(hidden_size, hidden_size)
        self.to_out = nn.ModuleList([nn.Linear(hidden_size, hidden_size), nn.Identity()])

    def forward(self, x, valid_lengths):
        q, k, v = (proj(x).unflatten(2, (self.heads, -1)) for proj in (self.to_q, self.to_k, self.to_v))
        out = sdpa_attention(q, k, v, valid_lengths=valid_lengths).flatten(2)
        return self.to_out[0](out.to(x.dtype))


class RefinerBlock(nn.Module):
    def __init__(self, hidden_size, heads, mlp_ratio):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, eps=1e-6)
        self.attn = SelfAttention(hidden_size, heads)
        self.norm2 = nn.LayerNorm(hidden_size, eps=1e-6)
        self.ff = FeedForward(hidden_size, int(hidden_size * mlp_ratio), activation="silu")
        self.norm_out = AdaptiveModulation(hidden_size, 2)

    def forward(self, x, conditioning, valid_lengths):
        gate_attention, gate_mlp = self.norm_out(conditioning)
        x = x + self.attn(self.norm1(x), valid_lengths) * gate_attention[:, None]
        return x + self.ff(self.norm2(x)) * gate_mlp[:, None]


class TokenRefinerStack(nn.Module):
    def __init__(self, hidden_size, heads, layers, mlp_ratio):
        super().__init__()
        self.refiner_blocks = nn.ModuleList([RefinerBlock(hidden_size, heads, mlp_ratio) for _ in range(layers)])


class TokenRefiner(nn.Module):
    """Projects the Llama hidden states to the hidden size and refines them with self-attention among valid tokens,
    conditioned on the timestep and the masked mean of the prompt tokens."""

    def __init__(self, text_embed_dim, hidden_size, heads, layers, mlp_ratio=4.0):
        super().__init__()
        self.time_text_embed = TimestepTextEmbedding(hidden_size, text_embed_dim, guidance_embeds=False)
        self.proj_in = nn.Linear(text_embed_dim, hidden_size)
        self.token_refiner = TokenRefinerStack(hidden_size, heads, layers, mlp_ratio)

    def forward(self, text, timestep, text_mask, valid_lengths):
        if text_mask is None:
            mean_text = text.float().mean(dim=1).to(text.dtype)
        else:
            mask = text_mask.float().unsqueeze(-1)
            mean_text = ((text * mask).sum(dim=1) / mask.sum(dim=1)).to(text.dtype)
        conditioning = self.time_text_embed(timestep, mean_text)
        x = self.proj_in(text)
        for block in self.token_refiner.refiner_blocks:
            x = block(x, conditioning, valid_lengths)
        return x


# --------------------------------------------------------------------------------------------------------------------
# Transformer blocks
# --------------------------------------------------------------------------------------------------------------------


@dataclass
class PackedContext:
    """What every block needs to attend over the packed sequence."""

    rope_cos: torch.Tensor  # (batch or 1, image tokens, head_dim), float32
    rope_sin: torch.Tensor
    image_length: int  # latent tokens; they come first and are the rotated ones
    valid_lengths: torch.Tensor | None  # (batch,) latent + valid condition tokens; None when nothing is padded
    attention: callable  # the chosen attention backend
    ops: type = PlainOps  # the glue: PlainOps or FusedOps


def heads_of(x, heads):
    return x.unflatten(2, (heads, -1))


class JointAttention(nn.Module):
    """Double-stream attention: separate projections for image and text tokens, one attention over both."""

    def __init__(self, hidden_size, heads, head_dim):
        super().__init__()
        self.heads = heads
        self.to_q = nn.Linear(hidden_size, hidden_size)
        self.to_k = nn.Linear(hidden_size, hidden_size)
        self.to_v = nn.Linear(hidden_size, hidden_size)
        self.add_q_proj = nn.Linear(hidden_size, hidden_size)
        self.add_k_proj = nn.Linear(hidden_size, hidden_size)
        self.add_v_proj = nn.Linear(hidden_size, hidden_size)
        self.norm_q = RMSNorm(head_dim)
        self.norm_k = RMSNorm(head_dim)
        self.norm_added_q = RMSNorm(head_dim)
        self.norm_added_k = RMSNorm(head_dim)
        self.to_out = nn.ModuleList([nn.Linear(hidden_size, hidden_size), nn.Identity()])
        self.to_add_out = nn.Linear(hidden_size, hidden_size)

    def forward(self, image, text, context: PackedContext):
        h, rms_norm = self.heads, context.ops.rms_norm
        q = torch.cat([rms_norm(self.norm_q, heads_of(self.to_q(image), h)),
                       rms_norm(self.norm_added_q, heads_of(self.add_q_proj(text), h))], 1)
        k = torch.cat([rms_norm(self.norm_k, heads_of(self.to_k(image), h)),
                       rms_norm(self.norm_added_k, heads_of(self.add_k_proj(text), h))], 1)
        v = torch.cat([heads_of(self.to_v(image), h), heads_of(self.add_v_proj(text), h)], 1)
        out = context.attention(q, k, v, context.rope_cos, context.rope_sin, context.image_length, context.valid_lengths)
        out = out.flatten(2).to(q.dtype)
        image_out, text_out = out.split([image.shape[1], text.shape[1]], dim=1)
        return self.to_out[0](image_out), self.to_add_out(text_out)


class DoubleStreamBlock(nn.Module):
    def __init__(self, config: DiTConfig):
        super().__init__()
        hidden, inner = config.hidden_size, config.mlp_hidden_size
        self.norm1 = AdaptiveModulation(hidden, 6)
        self.norm1_context = AdaptiveModulation(hidden, 6)
        self.attn = JointAttention(hidden, config.num_attention_heads, config.attention_head_dim)
        self.ff = FeedForward(hidden, inner)
        self.ff_context = FeedForward(hidden, inner)

    def forward(self, image, text, conditioning, context: PackedContext):
        shift_attn, scale_attn, gate_attn, shift_mlp, scale_mlp, gate_mlp = self.norm1(conditioning)
        t_shift_attn, t_scale_attn, t_gate_attn, t_shift_mlp, t_scale_mlp, t_gate_mlp = self.norm1_context(conditioning)

        ops = context.ops
        image_attn, text_attn = self.attn(
            ops.layer_norm_modulate(image, shift_attn, scale_attn),
            ops.layer_norm_modulate(text, t_shift_attn, t_scale_attn),
            context)
        image, image_normed = ops.gated_residual_layer_norm_modulate(image, gate_attn, image_attn, shift_mlp, scale_mlp)
        text, text_normed = ops.gated_residual_layer_norm_modulate(text, t_gate_attn, text_attn, t_shift_mlp, t_scale_mlp)
        image = ops.gated_residual(image, gate_mlp, self.ff(image_normed))
        text = ops.gated_residual(text, t_gate_mlp, self.ff_context(text_normed))
        return image, text


class SingleStreamAttention(nn.Module):
    """q, k, v projections and QK norms only: the output projection is fused with the MLP's in the block."""

    def __init__(self, hidden_size, heads, head_dim):
        super().__init__()
        self.heads = heads
        self.to_q = nn.Linear(hidden_size, hidden_size)
        self.to_k = nn.Linear(hidden_size, hidden_size)
        self.to_v = nn.Linear(hidden_size, hidden_size)
        self.norm_q = RMSNorm(head_dim)
        self.norm_k = RMSNorm(head_dim)

    def forward(self, x, context: PackedContext):
        q = context.ops.rms_norm(self.norm_q, heads_of(self.to_q(x), self.heads))
        k = context.ops.rms_norm(self.norm_k, heads_of(self.to_k(x), self.heads))
        v = heads_of(self.to_v(x), self.heads)
        out = context.attention(q, k, v, context.rope_cos, context.rope_sin, context.image_length, context.valid_lengths)
        return out.flatten(2).to(q.dtype)


class SingleStreamBlock(nn.Module):
    def __init__(self, config: DiTConfig):
        super().__init__()
        hidden, inner = config.hidden_size, config.mlp_hidden_size
        self.attn = SingleStreamAttention(hidden, config.num_attention_heads, config.attention_head_dim)
        self.norm = AdaptiveModulation(hidden, 3)
        self.proj_mlp = nn.Linear(hidden, inner)
        self.proj_out = nn.Linear(hidden + inner, hidden)

    def forward(self, x, conditioning, context: PackedContext):
        """x: the whole packed sequence, image tokens then condition tokens."""
        shift, scale, gate = self.norm(conditioning)
        normed = context.ops.layer_norm_modulate(x, shift, scale)
        mlp = F.gelu(self.proj_mlp(normed), approximate="tanh")
        attention = self.attn(normed, context)
        return context.ops.gated_residual(x, gate, self.proj_out(torch.cat([attention, mlp], dim=2)))


class OutputNorm(nn.Module):
    """Final adaptive LayerNorm; the checkpoint stores scale before shift here."""

    def __init__(self, hidden_size):
        super().__init__()
        self.linear = nn.Linear(hidden_size, 2 * hidden_size)

    def forward(self, x, conditioning, ops=PlainOps):
        scale, shift = self.linear(F.silu(conditioning)).chunk(2, dim=1)
        return ops.layer_norm_modulate(x, shift, scale)


# --------------------------------------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------------------------------------


@dataclass
class DiTOutput:
    sample: torch.Tensor


@dataclass
class StepTokens:
    """What `embed` hands to `run_blocks` and `head` for one model call."""

    image: torch.Tensor  # (batch, latent tokens, hidden): packed [4x | 2x | 1x | noisy]
    text: torch.Tensor  # (batch, condition tokens, hidden): [image embedding | refined prompt]
    conditioning: torch.Tensor  # (batch, hidden): timestep + guidance + pooled prompt
    context: PackedContext  # rotary tables, lengths, attention backend, glue ops
    latent_shape: tuple[int, int, int, int]  # (batch, frames, height, width) of the noisy latents
    noisy_tokens: int  # the last `noisy_tokens` image tokens are the noisy latents'


def _batched_indices(indices, batch_size, frames, device):
    """Frame indices as (batch, frames): accepts None (0..frames-1), (frames,) or (batch, frames)."""
    if indices is None:
        indices = torch.arange(frames, device=device)
    indices = torch.as_tensor(indices, device=device)
    if indices.ndim == 1:
        indices = indices[None]
    if indices.shape[-1] != frames:
        raise FramePackError(
            f"Got {indices.shape[-1]} frame indices for {frames} latent frames: pass one index per latent frame.")
    if indices.shape[0] not in (1, batch_size):
        raise FramePackError(f"Frame indices have batch {indices.shape[0]}, latents {batch_size}: pass one row per sample.")
    # One row serves the whole batch; identical rows collapse to one so the rotary tables are computed once.
    if indices.shape[0] > 1 and bool((indices == indices[:1]).all()):
        indices = indices[:1]
    return indices


class FramePackDiT(nn.Module):
    def __init__(self, config: DiTConfig):
        super().__init__()
        self.config = config
        hidden = config.hidden_size
        patch = (config.patch_size_t, config.patch_size, config.patch_size)

        self.x_embedder = PatchEmbed(patch, config.in_channels, hidden)
        self.clean_x_embedder = CleanLatentEmbed(config.in_channels, hidden) if config.has_clean_x_embedder else None
        # The refiner's MLP ratio is fixed at 4 in the official model, whatever the config's mlp_ratio.
        self.context_embedder = TokenRefiner(
            config.text_embed_dim, hidden, config.num_attention_heads, config.num_refiner_layers, mlp_ratio=4.0)
        self.image_projection = ImageProjection(config.image_proj_dim, hidden) if config.has_image_proj else None
        self.time_text_embed = TimestepTextEmbedding(hidden, config.pooled_projection_dim, config.guidance_embeds)
        self.transformer_blocks = nn.ModuleList([DoubleStreamBlock(config) for _ in range(config.num_layers)])
        self.single_transformer_blocks = nn.ModuleList([SingleStreamBlock(config) for _ in range(config.num_single_layers)])
        self.norm_out = OutputNorm(hidden)
        self.proj_out = nn.Linear(hidden, config.patch_size_t * config.patch_size**2 * config.out_channels)

        self.attention_backend = "sdpa"
        self._attention = sdpa_attention
        self.fused_kernels = False
        self.compiled_blocks = False
        self._block_stream = iter  # how run_blocks receives each block: as it is, or from a weight streamer
        # framepack_engine.runtime.ulysses.SequenceParallel: run_blocks works on this rank's shard; None: one process.
        self.sequence_parallel = None

    # ---- construction --------------------------------------------------------------------------------------------

    @classmethod
    def from_config(cls, config: dict | DiTConfig, device=None, dtype=None) -> "FramePackDiT":
        config = config if isinstance(config, DiTConfig) else DiTConfig.from_dict(config)
        default_dtype = torch.get_default_dtype()
        # Built directly in the target dtype, so a 13B model never exists in float32 first.
        torch.set_default_dtype(dtype or default_dtype)
        try:
            with torch.device(device or "cpu"):
                model = cls(config)
        finally:
            torch.set_default_dtype(default_dtype)
        return model

    @classmethod
    def from_pretrained(cls, source, dtype: torch.dtype = torch.bfloat16, device="cpu", config: dict | None = None,
                        allow_download: bool | None = None, cache_dir=None) -> "FramePackDiT":
        """Loads a repo id, a model folder (config.json + safetensors, sharded or not) or a single .safetensors file
        (ComfyUI-style too, fp8 with scales included; its config read off its tensors unless `config` is given).

        The model is built on the meta device and its parameters take the memory-mapped tensors as they are; block
        linears a checkpoint stores quantized (`framepack quantize`, community fp8 files) become
        framepack_engine.runtime.quant.QuantizedLinear modules holding the stored bytes, and any other layer it stores quantized
        (a community file's proj_out or token refiner) is dequantized to `dtype`.
        """
        from framepack_engine.models.checkpoints import load_dit_checkpoint

        config, state_dict = load_dit_checkpoint(source, dtype=dtype, config=config, allow_download=allow_download,
                                                 cache_dir=cache_dir, keep_quantized=True)
        name = Path(str(source)).name
        try:
            with torch.device("meta"):
                model = cls(DiTConfig.from_dict(config))
        except (TypeError, ValueError, ZeroDivisionError) as error:
            raise ModelSourceError(
                f"The config of {name!r} does not describe a FramePack transformer ({type(error).__name__}: {error}): "
                "download its config.json again.") from None
        if "quantization" in config:  # quantized layers are built as such and take the stored bytes as they are
            from framepack_engine.runtime.quant import (QuantScheme, build_quantized_layers, dequantize_stored_layers, quantized_layer_names)

            # Only the blocks' linears run quantized (what quantize_dit owns); a community file that also stores,
            # say, proj_out in fp8 has those folded to `dtype`, so the head keeps its float (float32) precision.
            owned = {layer_name for layer_name, _ in model.block_linears(modulation=True)}
            linears = model.linear_layers()
            folded = [layer_name for layer_name in quantized_layer_names(state_dict)
                      if layer_name in linears and layer_name not in owned]
            dequantize_stored_layers(model, state_dict, folded, dtype)
            build_quantized_layers(model, state_dict, QuantScheme.from_dict(config["quantization"]))
        expected = model.state_dict()
        for key, tensor in state_dict.items():
            if key in expected and tuple(tensor.shape) != tuple(expected[key].shape):
                raise ModelSourceError(
                    f"{name!r} holds {key!r} of shape {tuple(tensor.shape)} but its config says "
                    f"{tuple(expected[key].shape)}: the weights and config.json are from different models.")
        missing, unexpected = model.load_state_dict(state_dict, strict=False, assign=True)
        if missing or unexpected:
            problem = f"missing keys such as {missing[0]!r}" if missing else f"unexpected keys such as {unexpected[0]!r}"
            raise ModelSourceError(
                f"{name!r} does not hold a FramePack transformer matching its config ({problem}): "
                "point at the FramePack checkpoint.")
        return model.to(device)

    def set_attention_backend(self, name: str) -> "FramePackDiT":
        """"sdpa", "triton", "flash", "xformers", "sage" or "auto" (the fastest usable on this model's device)."""
        device = next(self.parameters()).device
        backend = resolve_backend(name, device)
        self.attention_backend, self._attention = backend.name, backend.function
        return self

    def set_fused_kernels(self, enabled: bool = True) -> "FramePackDiT":
        """Run the glue (norms, modulation, gated residuals, QK RMSNorm, patchify) as the Triton kernels of kernels/.

        They need a CUDA device (or, for tests, the Triton interpreter: TRITON_INTERPRET=1).
        """
        if enabled:
            import importlib.util
            import os

            if importlib.util.find_spec("triton") is None:
                raise BackendUnavailableError("Fused kernels need Triton: pip install triton, or leave them off.")
            device = next(self.parameters()).device
            if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
                raise BackendUnavailableError(
                    f"Fused kernels run on CUDA devices, and this model is on {device.type}: move it to a GPU "
                    "or leave them off.")
        self.fused_kernels = bool(enabled)
        return self

    def set_compiled_blocks(self, enabled: bool = True) -> "FramePackDiT":
        """Regional torch.compile: each block's forward compiled, not the whole model. Blocks of one kind share one
        compiled graph (their weights are graph inputs, not constants), so the model compiles twice (a double- and
        a single-stream block) whatever its depth, and every section and step reuses those graphs: the packed token
        count is the same for every section. Streamed blocks (their weights swapped into slots), quantized or
        LoRA-wrapped linears and the step caches (which skip run_blocks around the blocks) work unchanged."""
        for block in self.blocks:
            if enabled:
                block.compile(dynamic=False)
            else:  # back to the plain forward
                block._compiled_call_impl = None
        self.compiled_blocks = bool(enabled)
        return self

    def set_output_precision(self, float32: bool = True) -> "FramePackDiT":
        """float32=True: the final projection runs in float32 (its weights converted once, losslessly), as the
        official app's `high_quality_fp32_output_for_inference`; the final norm stays in the model's dtype."""
        self.proj_out.to(torch.float32 if float32 else self.compute_dtype)
        return self

    @property
    def fp32_output(self) -> bool:
        return self.proj_out.weight.dtype == torch.float32

    # Drop-in name used by code written for the official class.
    @property
    def high_quality_fp32_output_for_inference(self) -> bool:
        return self.fp32_output

    @high_quality_fp32_output_for_inference.setter
    def high_quality_fp32_output_for_inference(self, value: bool):
        self.set_output_precision(bool(value))

    @property
    def blocks(self) -> list[nn.Module]:
        """Every transformer block in the order run_blocks runs them: double-stream, then single-stream."""
        return [*self.transformer_blocks, *self.single_transformer_blocks]

    def modules_used_outside_blocks(self) -> list[nn.Module]:
        """Parts of the blocks that also run outside run_blocks: the first double block's norm1, whose modulation is
        TeaCache's signal (`first_block_modulated_input`). A weight streamer keeps them on the device."""
        return [self.transformer_blocks[0].norm1] if len(self.transformer_blocks) else []

    def linear_layers(self) -> dict[str, nn.Module]:
        """Every linear layer by its checkpoint name ("transformer_blocks.0.attn.to_q"): what LoRA adapters and
        quantized weights address. A layer is any module with `in_features` and `out_features` (nn.Linear, or what
        `replace_layer` put in its place); the modules inside a listed layer are not listed."""
        layers, inside = {}, None
        for name, module in self.named_modules():
            if inside is not None and name.startswith(inside):
                continue
            if hasattr(module, "in_features") and hasattr(module, "out_features"):
                layers[name], inside = module, name + "."
        return layers

    def replace_layer(self, name: str, layer: nn.Module) -> None:
        """Put `layer` where the linear layer `name` (a key of `linear_layers()`) is; the blocks use it from then on."""
        if name not in self.linear_layers():
            raise KeyError(f"the DiT has no linear layer {name!r}")
        self.set_submodule(name, layer)

    def block_linears(self, modulation: bool = True) -> list[tuple[str, nn.Module]]:
        """(state-dict name, module) of every linear layer inside the transformer blocks, in run order: what weight
        quantization (and LoRA) replaces. The adaptive-modulation projections are included only with `modulation`.
        Any module with in_features / out_features counts, so an already replaced layer is found again."""
        found = []
        for prefix, blocks in (("transformer_blocks", self.transformer_blocks),
                               ("single_transformer_blocks", self.single_transformer_blocks)):
            for index, block in enumerate(blocks):
                modulation_layers = {id(m.linear) for m in block.modules() if isinstance(m, AdaptiveModulation)}
                taken = []
                for name, module in block.named_modules():
                    if not (hasattr(module, "in_features") and hasattr(module, "out_features")):
                        continue
                    if any(name.startswith(outer + ".") for outer in taken):
                        continue  # a layer inside a wrapper that was found already
                    taken.append(name)
                    if id(module) in modulation_layers and not modulation:
                        continue
                    found.append((f"{prefix}.{index}.{name}", module))
        return found

    def set_sequence_parallel(self, parallel=None) -> "FramePackDiT":
        """A framepack_engine.runtime.ulysses.SequenceParallel (its group of ranks splits every model call's
        sequence), or None to run whole. Only run_blocks changes: embed and head see the whole sequence."""
        self.sequence_parallel = parallel if parallel is not None and parallel.ranks > 1 else None
        return self

    def agree(self, value: float) -> float:
        """The first rank's value on every rank of the sequence group (a step cache's decision input), or the
        value itself in one process."""
        return value if self.sequence_parallel is None else self.sequence_parallel.group.agree(value)

    def set_block_stream(self, stream=None) -> "FramePackDiT":
        """stream(blocks) -> an iterator handing run_blocks each block once its weights are where it computes
        (framepack_engine.runtime.offload's streamer); None: the blocks as they are."""
        self._block_stream = stream or iter
        return self

    # ---- the three seams of a model call: embed -> run_blocks -> head ------------------------------------------

    @property
    def compute_dtype(self) -> torch.dtype:
        """The dtype the blocks compute in: the patch embedder's weights'."""
        return self.x_embedder.proj.weight.dtype

    @property
    def compute_device(self) -> torch.device:
        """The device the blocks compute on: the patch embedder's (streamed blocks visit it; their weights may not
        be there between visits)."""
        return self.x_embedder.proj.weight.device

    @property
    def latent_channels(self) -> int:
        return self.config.in_channels

    @property
    def takes_image_embeddings(self) -> bool:
        """Whether this checkpoint is conditioned on SigLIP image tokens (FramePack's are)."""
        return self.image_projection is not None

    @property
    def takes_guidance(self) -> bool:
        """Whether this checkpoint is guidance-distilled (it then needs the `guidance` input)."""
        return self.config.guidance_embeds

    def embed(self, latents, timestep, text, text_mask=None, pooled_text=None, guidance=None, latent_indices=None,
              history: HistoryContext | None = None, image_embeddings=None) -> StepTokens:
        """Everything before the blocks: the noisy and clean latents patch-embedded and packed with their rotary
        tables, the conditioning vector, and the refined prompt tokens behind the projected image tokens.

        latents (batch, channels, frames, height, width); timestep (batch,) or a scalar, in [0, 1000]; text
        (batch, tokens, text_embed_dim) with text_mask (batch, tokens) or None when no sample is padded;
        pooled_text (batch, pooled_projection_dim); guidance as timestep, for guidance-distilled checkpoints.
        """
        config = self.config
        batch, _, frames, height, width = latents.shape
        p, p_t = config.patch_size, config.patch_size_t
        if height % p or width % p or frames % p_t:
            raise FramePackError(
                f"Latent size {(frames, height, width)} is not a multiple of the patch size {(p_t, p, p)}: "
                "choose a resolution whose latents divide evenly (pixel sizes multiple of 16).")
        latents = latents.to(self.compute_dtype)
        timestep = torch.as_tensor(timestep, device=latents.device).reshape(-1).expand(batch)
        if guidance is not None:
            guidance = torch.as_tensor(guidance, device=latents.device).reshape(-1).expand(batch)

        image, rope_cos, rope_sin = self._pack_latents(latents, latent_indices, history or HistoryContext())
        conditioning = self.time_text_embed(timestep, pooled_text.to(image.dtype), guidance)
        text, condition_lengths = self._condition_tokens(text.to(image.dtype), text_mask, timestep, image_embeddings)

        image_length = image.shape[1]
        context = PackedContext(rope_cos, rope_sin, image_length,
                                None if condition_lengths is None else image_length + condition_lengths,
                                self._attention, self._ops)
        noisy_tokens = (frames // p_t) * (height // p) * (width // p)
        return StepTokens(image, text, conditioning, context, (batch, frames, height, width), noisy_tokens)

    def run_blocks(self, tokens: StepTokens) -> torch.Tensor:
        """The 20 double-stream and 40 single-stream blocks; returns the image tokens after the last block.

        The place a step cache skips (it calls this or adds a cached residual instead) and a weight streamer feeds
        (`set_block_stream`: each block is handed over when its weights are on the device).
        """
        image, text, conditioning, context = tokens.image, tokens.text, tokens.conditioning, tokens.context
        parallel = self.sequence_parallel
        if parallel is not None:  # this rank's shard of the sequence, and attention across the shards
            image, text, attention = parallel.split(image, text, context.valid_lengths, context.attention)
            context = replace(context, attention=attention)
        packed = None
        for block in self._block_stream(self.blocks):
            if isinstance(block, DoubleStreamBlock):
                image, text = block(image, text, conditioning, context)
            else:
                if packed is None:
                    packed = torch.cat([image, text], dim=1)
                packed = block(packed, conditioning, context)
        if parallel is not None:
            return parallel.gather(torch.cat([image, text], dim=1) if packed is None else packed, context.image_length)
        return image if packed is None else packed[:, :context.image_length]

    def head(self, image: torch.Tensor, tokens: StepTokens) -> torch.Tensor:
        """The final adaptive norm and projection of the noisy tokens, unpatchified to the velocity
        (batch, channels, frames, height, width). The norm runs in the model's dtype; with float32 output
        (`set_output_precision`) the projection runs in float32, as the official app's high-quality output does."""
        config = self.config
        batch, frames, height, width = tokens.latent_shape
        p, p_t = config.patch_size, config.patch_size_t
        x = self.norm_out(image[:, image.shape[1] - tokens.noisy_tokens:], tokens.conditioning, self._ops)
        x = self.proj_out(x.to(self.proj_out.weight.dtype))
        # Unpatchify: (batch, t * h * w, channels * p_t * p * p) -> (batch, channels, frames, height, width).
        x = x.reshape(batch, frames // p_t, height // p, width // p, -1, p_t, p, p)
        return x.permute(0, 4, 1, 5, 2, 6, 3, 7).reshape(batch, -1, frames, height, width)

    def first_block_modulated_input(self, tokens: StepTokens) -> torch.Tensor:
        """The image tokens as the first double block's attention sees them (after its norm1 modulation): the
        signal TeaCache compares between steps."""
        shift, scale = self.transformer_blocks[0].norm1(tokens.conditioning)[:2]
        return self._ops.layer_norm_modulate(tokens.image, shift, scale)

    def velocity(self, latents, timestep, text, text_mask=None, pooled_text=None, guidance=None, latent_indices=None,
                 history: HistoryContext | None = None, image_embeddings=None, step_cache=None) -> torch.Tensor:
        """One model call: embed -> run_blocks (or what `step_cache` decides instead) -> head."""
        tokens = self.embed(latents, timestep, text, text_mask, pooled_text, guidance, latent_indices, history,
                            image_embeddings)
        image = self.run_blocks(tokens) if step_cache is None else step_cache.run_blocks(self, tokens)
        return self.head(image, tokens)

    def forward(self, hidden_states, timestep, encoder_hidden_states, encoder_attention_mask, pooled_projections,
                guidance=None, latent_indices=None, clean_latents=None, clean_latent_indices=None,
                clean_latents_2x=None, clean_latent_2x_indices=None, clean_latents_4x=None,
                clean_latent_4x_indices=None, image_embeddings=None, attention_kwargs=None, return_dict=True):
        """The official class's signature and results, for code written against it."""
        history = HistoryContext.from_official_kwargs(
            clean_latents=clean_latents, clean_latent_indices=clean_latent_indices, clean_latents_2x=clean_latents_2x,
            clean_latent_2x_indices=clean_latent_2x_indices, clean_latents_4x=clean_latents_4x,
            clean_latent_4x_indices=clean_latent_4x_indices)
        sample = self.velocity(hidden_states, timestep, encoder_hidden_states, encoder_attention_mask,
                               pooled_projections, guidance, latent_indices, history, image_embeddings)
        return DiTOutput(sample=sample) if return_dict else (sample,)

    # ---- inside embed --------------------------------------------------------------------------------------------

    @property
    def _ops(self):
        return FusedOps if self.fused_kernels else PlainOps

    def _pack_latents(self, latents, latent_indices, history: HistoryContext):
        """Embeds the clean and noisy latents into one token sequence (4x, 2x, 1x, noisy) with its rotary tables."""
        config = self.config
        batch, _, _, height, width = latents.shape
        grid_height, grid_width = height // config.patch_size, width // config.patch_size
        if history.scales and self.clean_x_embedder is None:
            raise FramePackError("This checkpoint has no clean-latent embedder: it cannot take clean latents.")
        # In packing order: (group name, latents, frame indices, embedder).
        groups = []
        for item in history.scales:
            if item.latents.shape[-2:] != latents.shape[-2:]:
                raise FramePackError(
                    f"Clean latents are {tuple(item.latents.shape[-2:])} but the noisy latents {(height, width)}: "
                    "all latents of a section must share height and width.")
            groups.append((item.scale.name, item.latents.to(latents.dtype), item.indices,
                           self.clean_x_embedder.embedder(item.scale.name)))
        groups.append(("noisy", latents, latent_indices, self.x_embedder.proj))

        tables = []
        for _, group_latents, indices, _ in groups:
            indices = _batched_indices(indices, batch, group_latents.shape[2], latents.device)
            tables.append(rope_tables(indices, grid_height, grid_width, config.rope_axes_dim, config.rope_theta))
        # Rows of a rotary table are per sample only where some sample's indices differ; broadcast the rest.
        rows = max(cos.shape[0] for cos, _ in tables)
        patch_inputs = {}
        for (name, group_latents, _, conv), (cos, sin) in zip(groups, tables):
            grid = (group_latents.shape[2], grid_height, grid_width)
            patch_inputs[name] = PatchInputs(group_latents, conv, cos.expand(rows, -1, -1).unflatten(1, grid),
                                             sin.expand(rows, -1, -1).unflatten(1, grid))
        return self._ops.packed_patchify(patch_inputs)

    def _condition_tokens(self, encoder_hidden_states, encoder_attention_mask, timestep, image_embeddings):
        """Refined prompt tokens behind the projected image tokens, cropped to the longest valid prompt.

        Returns the tokens and each sample's count of valid condition tokens (None when no sample has padding).
        """
        batch, tokens = encoder_hidden_states.shape[:2]
        # The crop needs the lengths on the host: one small copy per call, none when there is no mask.
        if encoder_attention_mask is None:
            lengths = [tokens] * batch
        else:
            lengths = encoder_attention_mask.sum(dim=1).clamp_min(1).tolist()
        longest = int(max(lengths))
        padded = any(length < longest for length in lengths)
        # Dropping the padding beyond the longest prompt changes nothing: padded tokens are never attended.
        text = encoder_hidden_states[:, :longest]
        text_mask = encoder_attention_mask[:, :longest] if encoder_attention_mask is not None else None
        text_lengths = torch.tensor(lengths, device=text.device, dtype=torch.long) if padded else None
        text = self.context_embedder(text, timestep, text_mask, text_lengths)

        if self.image_projection is not None:
            if image_embeddings is None:
                raise FramePackError("This checkpoint is image-conditioned: pass `image_embeddings` (SigLIP features).")
            image_tokens = self.image_projection(image_embeddings.to(text.dtype))
            text = torch.cat([image_tokens, text], dim=1)
            if text_lengths is not None:
                text_lengths = text_lengths + image_tokens.shape[1]
        return text, text_lengths
