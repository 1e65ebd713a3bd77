"""HunyuanVideo's causal 3D VAE (8x spatial, 4x temporal, 16 latent channels), with memory-bounded encode/decode.

The model is causal in time: every 3D convolution pads its input by replicating the first frame into the past and
never looks at future frames, the first frame is up/down-sampled on its own, and the mid-block attention lets a
frame see only itself and earlier frames. Pixel frames `T = 4 * (latent_frames - 1) + 1`.

Parameter names equal those of the diffusers `AutoencoderKLHunyuanVideo` checkpoint, so its state dict loads as is.

Memory. One 256-channel full-resolution activation of a 640x640, 37-frame section is 7.8 GB in bfloat16, and the
decoder needs one and a half of them at once, so the runtime bounds what it holds in two kinds of ways:
  * exact ones, which never change the result: every convolution runs over chunks of output frames (the group
    norm + SiLU before it and the nearest upsampling of the upsamplers are fused into the chunk, so the normalized
    or upsampled tensor never exists whole), residual adds are written in place, attention runs frame by frame
    over the causal prefix of keys, and a batch can be decoded one sample at a time;
  * approximate ones, chosen only when the exact ones do not fit: spatial tiles (and, if still needed, temporal
    tiles) decoded separately and blended linearly over their overlap, with the same tile placement and blending
    rule as diffusers, so `Tiling.like_diffusers()` reproduces diffusers' tiled output.
`plan_decode` / `plan_encode` pick the cheapest plan whose estimated working set (`working_set_bytes`, computed
from the config by walking the tiles and layers the call runs) fits the memory budget: exact plans first, then
the largest tiles that fit.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from framepack_engine.official import (VAE_LATENT_CHANNELS, VAE_SCALING_FACTOR, VAE_SPATIAL_COMPRESSION,
                                       VAE_TEMPORAL_COMPRESSION)
from framepack_engine.errors import FramePackError, ModelSourceError
from framepack_engine.runtime.sources import load_state_dict, read_config

logger = logging.getLogger(__name__)

GiB = 1 << 30
# Without CUDA there is no free-memory figure to follow; 8 GiB stays well inside the RAM of any machine that can
# hold the 13B DiT, and decodes a 640x640 section in four tiles.
DEFAULT_CPU_BUDGET_BYTES = 8 * GiB
# Share of free CUDA memory the planner may fill: the rest absorbs cuDNN workspaces and allocator fragmentation,
# which the estimate (tensors only) does not see.
CUDA_BUDGET_FRACTION = 0.85
# Smallest spatial tile (latent pixels) the planner will go down to: smaller tiles cost more than they save.
MIN_TILE_LATENT = 8

_BLOCK_TYPES = {"down": "HunyuanVideoDownBlock3D", "up": "HunyuanVideoUpBlock3D"}


# ----------------------------------------------------------------------------------------------------------------
# Configuration


@dataclass
class VAEConfig:
    """The keys of diffusers' `AutoencoderKLHunyuanVideo` config.json, with the per-level resampling derived."""

    in_channels: int = 3
    out_channels: int = 3
    latent_channels: int = VAE_LATENT_CHANNELS
    down_block_types: tuple[str, ...] = (_BLOCK_TYPES["down"],) * 4
    up_block_types: tuple[str, ...] = (_BLOCK_TYPES["up"],) * 4
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    layers_per_block: int = 2
    act_fn: str = "silu"
    norm_num_groups: int = 32
    scaling_factor: float = VAE_SCALING_FACTOR
    spatial_compression_ratio: int = VAE_SPATIAL_COMPRESSION
    temporal_compression_ratio: int = VAE_TEMPORAL_COMPRESSION
    mid_block_add_attention: bool = True
    # Derived: per level, the (time, height, width) factor of the encoder's downsampler / decoder's upsampler,
    # or None where the level does not resample.
    encoder_strides: list = field(init=False, repr=False)
    decoder_factors: list = field(init=False, repr=False)

    @classmethod
    def from_dict(cls, config: dict) -> "VAEConfig":
        known = {f.name for f in fields(cls) if f.init}
        return cls(**{key: value for key, value in config.items() if key in known})

    def __post_init__(self):
        self.down_block_types = tuple(self.down_block_types)
        self.up_block_types = tuple(self.up_block_types)
        self.block_out_channels = tuple(self.block_out_channels)
        levels = len(self.block_out_channels)
        for kind, types in (("down", self.down_block_types), ("up", self.up_block_types)):
            if len(types) != levels or any(t != _BLOCK_TYPES[kind] for t in types):
                raise FramePackError(
                    f"VAE config has {kind}_block_types {list(types)}: this VAE needs {levels} "
                    f"'{_BLOCK_TYPES[kind]}' entries, one per block_out_channels entry.")
        if self.act_fn not in ("silu", "swish"):
            raise FramePackError(f"VAE config act_fn {self.act_fn!r} is not supported: use 'silu'.")
        if self.temporal_compression_ratio != 4:
            raise FramePackError(
                f"VAE config temporal_compression_ratio {self.temporal_compression_ratio} is not supported: "
                "HunyuanVideo's VAE uses 4.")
        if any(c % self.norm_num_groups for c in self.block_out_channels):
            raise FramePackError(
                f"VAE config block_out_channels {list(self.block_out_channels)} must all be multiples of "
                f"norm_num_groups ({self.norm_num_groups}): fix the config.")
        spatial_levels = round(math.log2(self.spatial_compression_ratio))
        time_levels = round(math.log2(self.temporal_compression_ratio))
        # The checkpoint's rule: the first `spatial_levels` levels halve height and width; the `time_levels` levels
        # just before the last one halve time. The decoder mirrors it.
        self.encoder_strides, self.decoder_factors = [], []
        for level in range(levels):
            spatial = 2 if level < spatial_levels else 1
            time = 2 if (level >= levels - 1 - time_levels and level != levels - 1) else 1
            factor = (time, spatial, spatial) if (time, spatial) != (1, 1) else None
            self.encoder_strides.append(factor)
            self.decoder_factors.append(factor)
        achieved_spatial = math.prod(f[1] for f in self.encoder_strides if f)
        achieved_time = math.prod(f[0] for f in self.encoder_strides if f)
        if (achieved_spatial, achieved_time) != (self.spatial_compression_ratio, self.temporal_compression_ratio):
            raise FramePackError(
                f"VAE config with {levels} levels cannot compress {self.spatial_compression_ratio}x spatially and "
                f"{self.temporal_compression_ratio}x in time: use at least 3 levels and a power-of-two spatial "
                "ratio no larger than 2**levels.")


# ----------------------------------------------------------------------------------------------------------------
# Memory-lean primitives: chunked causal convolution with fused group norm + SiLU and nearest upsampling


def _numel(shape) -> int:
    return math.prod(shape)


@dataclass
class NormAffine:
    """A group norm folded to per-(sample, channel) float32 terms: normalized = (x - mean) * scale + bias."""

    mean: torch.Tensor  # (B, C)
    scale: torch.Tensor  # (B, C)
    bias: torch.Tensor  # (C,)

    def normalize_(self, x: torch.Tensor, channel_dim: int, silu: bool = True) -> torch.Tensor:
        """Normalize float32 `x` (batch first, channels at `channel_dim`) in place, then SiLU unless told not to."""
        per_sample = [1] * x.dim()
        per_sample[0], per_sample[channel_dim] = x.shape[0], x.shape[channel_dim]
        per_channel = [1] * x.dim()
        per_channel[channel_dim] = x.shape[channel_dim]
        x.sub_(self.mean.view(per_sample)).mul_(self.scale.view(per_sample)).add_(self.bias.view(per_channel))
        return F.silu(x, inplace=True) if silu else x


def _frames_fitting(bytes_per_frame: int, budget: int, total: int) -> int:
    return max(1, min(total, budget // max(bytes_per_frame, 1)))


def _stats_frames(shape, chunk_bytes: int) -> int:
    return _frames_fitting(shape[0] * shape[1] * _numel(shape[3:]) * 4, chunk_bytes, shape[2])


def _stats_bytes(shape, element_size: int, chunk_bytes: int) -> int:
    """Temporaries of `group_norm_affine`: the float32 copy of the frames it reads at once (none for float32)."""
    if element_size == 4:
        return 0
    return _stats_frames(shape, chunk_bytes) * shape[0] * shape[1] * _numel(shape[3:]) * 4


def group_norm_affine(x: torch.Tensor, norm: nn.GroupNorm, chunk_bytes: int) -> NormAffine:
    """Statistics of `norm` over x (B, C, T, H, W), read a few frames at a time and merged with Chan's formula."""
    batch, channels, frames = x.shape[:3]
    groups, per_group = norm.num_groups, channels // norm.num_groups
    step = _stats_frames(x.shape, chunk_bytes)
    seen, mean, m2 = 0, None, None
    for start in range(0, frames, step):
        chunk = x[:, :, start:start + step].float().unflatten(1, (groups, per_group))
        count = chunk[0, 0].numel()
        var_k, mean_k = (s.double() for s in torch.var_mean(chunk, dim=(2, 3, 4, 5), correction=0))
        del chunk
        if mean is None:
            seen, mean, m2 = count, mean_k, var_k * count
            continue
        delta, merged = mean_k - mean, seen + count
        mean = mean + delta * (count / merged)
        m2 = m2 + var_k * count + delta.square() * (seen * count / merged)
        seen = merged
    rstd = torch.rsqrt(m2 / seen + norm.eps).float().repeat_interleave(per_group, dim=1)
    return NormAffine(mean.float().repeat_interleave(per_group, dim=1), rstd * norm.weight.float(), norm.bias.float())


class CausalConv3d(nn.Module):
    """Conv3d on an input replicate-padded by k//2 on both sides in space and by k-1 frames on the past side only.

    `forward` runs over chunks of output frames under a byte budget; `chunk_plan` says how many frames a chunk
    holds and what its temporaries weigh, and is what both the forward pass and the memory estimate use.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, stride=1):
        super().__init__()
        self.conv = nn.Conv3d(in_channels, out_channels, kernel_size, stride)

    def output_shape(self, shape, upsample=(1, 1, 1)):
        batch, _, frames, height, width = shape
        (_, kh, kw), (st, sh, sw) = self.conv.kernel_size, self.conv.stride
        frames = 1 + upsample[0] * (frames - 1)
        height, width = height * upsample[1], width * upsample[2]
        return (batch, self.conv.out_channels, (frames - 1) // st + 1,
                (height + 2 * (kh // 2) - kh) // sh + 1, (width + 2 * (kw // 2) - kw) // sw + 1)

    def chunk_plan(self, shape, element_size: int, chunk_bytes: int, *, normalized=False, upsample=(1, 1, 1),
                   shortcut_channels=0):
        """(output frames per chunk, peak bytes of one chunk's temporaries) for an input of `shape`.

        Follows `forward` step by step: gather frames -> [float32 copy -> normalize -> cast back] -> [upsample]
        -> pad -> conv -> [+ shortcut of the block input]; at each step the old and the new tensor coexist.
        """
        out_shape = self.output_shape(shape, upsample)
        (kt, kh, kw), stride_t = self.conv.kernel_size, self.conv.stride[0]
        batch, channels = shape[:2]
        source_area = _numel(shape[3:])
        upsampled_area = source_area * upsample[1] * upsample[2]
        padded_area = (shape[3] * upsample[1] + 2 * (kh // 2)) * (shape[4] * upsample[2] + 2 * (kw // 2))
        out_frame_bytes = batch * out_shape[1] * _numel(out_shape[3:]) * element_size

        def peak(frames_out: int) -> int:
            frames_in = 1 if out_shape[2] == 1 else (frames_out - 1) * stride_t + kt
            per_frame = batch * channels * frames_in * element_size
            current = per_frame * source_area
            steps = [current]
            if normalized and element_size != 4:
                as_float = current * 4 // element_size
                steps += [current + as_float, as_float + current]
            if upsampled_area != source_area:
                steps.append(current + per_frame * upsampled_area)
                current = per_frame * upsampled_area
            padded = per_frame * padded_area
            if padded_area != upsampled_area:
                steps.append(current + padded)
            output = out_frame_bytes * frames_out
            steps.append(padded + output)
            if shortcut_channels:
                # the block input's frames (a contiguous copy) and their 1x1x1 projection, beside the output
                steps.append(2 * output + output * shortcut_channels // out_shape[1])
            return max(steps)

        per_chunk = out_shape[2]
        while per_chunk > 1 and peak(per_chunk) > chunk_bytes:
            per_chunk = max(1, min(per_chunk - 1, per_chunk * chunk_bytes // peak(per_chunk)))
        return per_chunk, peak(per_chunk)

    def call_bytes(self, shape, element_size: int, chunk_bytes: int, *, in_place=False, **options) -> int:
        """Peak bytes one `forward` call adds to what is already alive (its input): the output and temporaries.

        A single chunk's conv result is the output itself; several chunks write into an output allocated first
        (or, in place, into the input).
        """
        per_chunk, temps = self.chunk_plan(shape, element_size, chunk_bytes, **options)
        if in_place or per_chunk >= self.output_shape(shape, options.get("upsample", (1, 1, 1)))[2]:
            return temps
        return _numel(self.output_shape(shape, options.get("upsample", (1, 1, 1)))) * element_size + temps

    def forward(self, x: torch.Tensor, chunk_bytes: int, *, norm: NormAffine | None = None, upsample=(1, 1, 1),
                residual=None, shortcut_channels: int = 0, out: torch.Tensor | None = None) -> torch.Tensor:
        """Causal conv of x, optionally through norm + SiLU and nearest upsampling first, in frame chunks.

        residual: a tensor shaped like the output, or a function (start, stop) -> the residual of those output
        frames (a 1x1x1 projection of a `shortcut_channels`-wide input); it is added to the result. out: where to
        write the result; it may be `x` itself (then chunks run last-to-first, so a chunk only overwrites frames
        that no chunk still to run reads: each chunk reads its own frames and earlier ones).
        """
        out_shape = self.output_shape(x.shape, upsample)
        kt, stride_t = self.conv.kernel_size[0], self.conv.stride[0]
        kh, kw = self.conv.kernel_size[1:]
        per_chunk, _ = self.chunk_plan(x.shape, x.element_size(), chunk_bytes, normalized=norm is not None,
                                       upsample=upsample, shortcut_channels=shortcut_channels)
        total = out_shape[2]
        starts = list(range(0, total, per_chunk))
        if out is x:
            assert out_shape == tuple(x.shape) and stride_t == 1
            starts.reverse()
        elif out is None and len(starts) > 1:
            out = x.new_empty(out_shape)
        # A single output frame reads only input frame 0, replicated kt times into the past: convolve it once with
        # the kernel summed over time instead of materializing the copies (images: a third of the memory and work).
        weight = self.conv.weight
        if total == 1 and kt > 1:
            weight = weight.float().sum(dim=2, keepdim=True).to(weight.dtype)
        for start in starts:
            stop = min(start + per_chunk, total)
            # frames of the (upsampled) input these outputs read; indices below 0 replicate the first frame
            frames = torch.arange(start * stride_t - (kt - 1), (stop - 1) * stride_t + 1, device=x.device)
            frames = frames.clamp_min(0) if total > 1 else frames[-1:].clamp_min(0)
            if upsample[0] != 1:
                # nearest upsampling in time keeps frame 0 alone and repeats each later frame: 0 | 1 1 | 2 2 | ...
                frames = (frames + upsample[0] - 1) // upsample[0]
            chunk = x.index_select(2, frames)
            if norm is not None:
                chunk = chunk.float()
                chunk = norm.normalize_(chunk, channel_dim=1).to(x.dtype)
            if upsample[1:] != (1, 1):
                chunk = F.interpolate(chunk, scale_factor=(1, *upsample[1:]), mode="nearest")
            if kh > 1 or kw > 1:
                chunk = F.pad(chunk, (kw // 2, kw // 2, kh // 2, kh // 2, 0, 0), mode="replicate")
            result = F.conv3d(chunk, weight, self.conv.bias, self.conv.stride)
            del chunk
            if callable(residual):
                result += residual(start, stop)
            elif residual is not None:
                result += residual[:, :, start:stop]
            if out is None:
                return result
            out[:, :, start:stop] = result
            del result
        return out


class ResnetBlock(nn.Module):
    """GroupNorm -> SiLU -> conv -> GroupNorm -> SiLU -> conv, plus the input (1x1x1-projected if widths differ).

    The result is written over the first conv's output; the caller drops the input.
    """

    def __init__(self, in_channels: int, out_channels: int, groups: int, eps: float = 1e-6):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, in_channels, eps=eps)
        self.conv1 = CausalConv3d(in_channels, out_channels, 3)
        self.norm2 = nn.GroupNorm(groups, out_channels, eps=eps)
        self.conv2 = CausalConv3d(out_channels, out_channels, 3)
        self.conv_shortcut = CausalConv3d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x: torch.Tensor, chunk_bytes: int) -> torch.Tensor:
        hidden = self.conv1(x, chunk_bytes, norm=group_norm_affine(x, self.norm1, chunk_bytes))
        residual = x
        if self.conv_shortcut is not None:
            def residual(start, stop):
                return self.conv_shortcut.conv(x[:, :, start:stop].contiguous())
        norm2 = group_norm_affine(hidden, self.norm2, chunk_bytes)
        shortcut_channels = x.shape[1] if self.conv_shortcut is not None else 0
        return self.conv2(hidden, chunk_bytes, norm=norm2, residual=residual, shortcut_channels=shortcut_channels,
                          out=hidden)

    def memory(self, shape, element_size: int, chunk_bytes: int):
        """(output shape, peak bytes while the block runs, its input and output included)."""
        out_shape = self.conv1.output_shape(shape)
        input_bytes, output_bytes = _numel(shape) * element_size, _numel(out_shape) * element_size
        shortcut_channels = shape[1] if self.conv_shortcut is not None else 0
        first = max(_stats_bytes(shape, element_size, chunk_bytes),
                    self.conv1.call_bytes(shape, element_size, chunk_bytes, normalized=True))
        second = output_bytes + max(
            _stats_bytes(out_shape, element_size, chunk_bytes),
            self.conv2.call_bytes(out_shape, element_size, chunk_bytes, in_place=True, normalized=True,
                                  shortcut_channels=shortcut_channels))
        return out_shape, input_bytes + max(first, second)


class MidBlockAttention(nn.Module):
    """Single-head self-attention over all latent positions, each frame seeing itself and earlier frames.

    Parameter names follow diffusers' `Attention` (group_norm, to_q, to_k, to_v, to_out.0). The causal mask is
    never built: the queries of frame f attend to the keys of frames 0..f, a prefix of the sequence.
    """

    def __init__(self, channels: int, groups: int, eps: float = 1e-6):
        super().__init__()
        self.group_norm = nn.GroupNorm(groups, channels, eps=eps)
        self.to_q = nn.Linear(channels, channels)
        self.to_k = nn.Linear(channels, channels)
        self.to_v = nn.Linear(channels, channels)
        self.to_out = nn.ModuleList([nn.Linear(channels, channels)])

    @staticmethod
    def _projection_frames(shape, chunk_bytes: int) -> int:
        return _frames_fitting(shape[0] * shape[1] * _numel(shape[3:]) * 8, chunk_bytes, shape[2])

    @staticmethod
    def _query_rows(shape, keys: int, chunk_bytes: int) -> int:
        # Bound float32 scores and their softmax, as a fallback kernel would hold them, even if a fused one runs.
        return max(1, min(_numel(shape[3:]), chunk_bytes // (shape[0] * keys * 8)))

    def forward(self, x: torch.Tensor, chunk_bytes: int) -> torch.Tensor:
        """Adds the attention output to x (B, C, T, H, W) in place and returns x."""
        batch, channels, frames = x.shape[:3]
        area = _numel(x.shape[3:])
        norm = group_norm_affine(x, self.group_norm, chunk_bytes)
        tokens = x.view(batch, channels, frames * area)  # channels-first view of the (B, L, C) token sequence
        projections = [x.new_empty(batch, frames * area, channels) for _ in range(3)]
        step = self._projection_frames(x.shape, chunk_bytes)
        for start in range(0, frames, step):
            rows = slice(start * area, min(start + step, frames) * area)
            normalized = tokens[:, :, rows].transpose(1, 2).to(torch.float32, copy=True,
                                                                memory_format=torch.contiguous_format)
            normalized = norm.normalize_(normalized, channel_dim=2, silu=False).to(x.dtype)
            for projection, layer in zip(projections, (self.to_q, self.to_k, self.to_v)):
                projection[:, rows] = layer(normalized)
            del normalized
        query, key, value = (p.unsqueeze(1) for p in projections)  # one head as wide as the channels
        del projections
        for frame in range(frames):
            visible = (frame + 1) * area
            step = self._query_rows(x.shape, visible, chunk_bytes)
            for row in range(frame * area, visible, step):
                stop = min(row + step, visible)
                attended = F.scaled_dot_product_attention(
                    query[:, :, row:stop], key[:, :, :visible], value[:, :, :visible]).squeeze(1)
                tokens[:, :, row:stop] += self.to_out[0](attended).transpose(1, 2)
                del attended
        return x

    def memory(self, shape, element_size: int, chunk_bytes: int):
        batch, channels, frames = shape[:3]
        area = _numel(shape[3:])
        held = 4 * _numel(shape) * element_size  # x, q, k, v
        token_bytes = batch * area * channels
        projection = self._projection_frames(shape, chunk_bytes) * token_bytes * (4 + element_size)
        keys = frames * area
        rows = self._query_rows(shape, keys, chunk_bytes)
        attention = batch * rows * (keys * 8 + channels * element_size * 3)
        return shape, held + max(projection, attention, _stats_bytes(shape, element_size, chunk_bytes))


class MidBlock(nn.Module):
    def __init__(self, channels: int, groups: int, add_attention: bool, num_layers: int = 1):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock(channels, channels, groups) for _ in range(num_layers + 1)])
        self.attentions = nn.ModuleList(
            [MidBlockAttention(channels, groups) if add_attention else None for _ in range(num_layers)])

    def layers(self) -> list[nn.Module]:
        ordered = [self.resnets[0]]
        for attention, resnet in zip(self.attentions, self.resnets[1:]):
            ordered += [attention, resnet] if attention is not None else [resnet]
        return ordered


class Downsample(nn.Module):
    def __init__(self, channels: int, stride):
        super().__init__()
        self.conv = CausalConv3d(channels, channels, 3, stride)

    def forward(self, x, chunk_bytes):
        return self.conv(x, chunk_bytes)

    def memory(self, shape, element_size, chunk_bytes):
        return self.conv.output_shape(shape), (_numel(shape) * element_size
                                               + self.conv.call_bytes(shape, element_size, chunk_bytes))


class Upsample(nn.Module):
    """Nearest upsampling (time x2 keeps the first frame single) fused into the chunks of a causal conv."""

    def __init__(self, channels: int, factor):
        super().__init__()
        self.factor = tuple(factor)
        self.conv = CausalConv3d(channels, channels, 3)

    def forward(self, x, chunk_bytes):
        return self.conv(x, chunk_bytes, upsample=self.factor)

    def memory(self, shape, element_size, chunk_bytes):
        return self.conv.output_shape(shape, self.factor), (
            _numel(shape) * element_size + self.conv.call_bytes(shape, element_size, chunk_bytes, upsample=self.factor))


class ResolutionBlock(nn.Module):
    """One level of the encoder or decoder: resnets, then the level's resampler if it has one."""

    def __init__(self, in_channels, out_channels, num_layers, groups):
        super().__init__()
        self.resnets = nn.ModuleList(
            [ResnetBlock(in_channels if i == 0 else out_channels, out_channels, groups) for i in range(num_layers)])

    def resamplers(self) -> nn.ModuleList | None:
        raise NotImplementedError

    def layers(self) -> list[nn.Module]:
        return [*self.resnets, *(self.resamplers() or [])]


class DownBlock(ResolutionBlock):
    def __init__(self, in_channels, out_channels, num_layers, groups, stride):
        super().__init__(in_channels, out_channels, num_layers, groups)
        self.downsamplers = nn.ModuleList([Downsample(out_channels, stride)]) if stride else None

    def resamplers(self):
        return self.downsamplers


class UpBlock(ResolutionBlock):
    def __init__(self, in_channels, out_channels, num_layers, groups, factor):
        super().__init__(in_channels, out_channels, num_layers, groups)
        self.upsamplers = nn.ModuleList([Upsample(out_channels, factor)]) if factor else None

    def resamplers(self):
        return self.upsamplers


def _small_tensor_bytes(shape) -> int:
    """Allowance for what the estimates leave out: group-norm statistics, folded norms, frame indices."""
    return 32 * shape[0] * shape[1] + 4096


def _run_layers(conv_in: CausalConv3d, blocks, norm_out: nn.GroupNorm, conv_out: CausalConv3d, x, chunk_bytes):
    """conv_in -> every layer of every block -> norm + SiLU + conv_out, in one loop: a layer's input is
    released as soon as the next layer has its output (a per-block loop would keep each block's input alive)."""
    x = conv_in(x, chunk_bytes)
    for layer in [layer for block in blocks for layer in block.layers()]:
        x = layer(x, chunk_bytes)
    return conv_out(x, chunk_bytes, norm=group_norm_affine(x, norm_out, chunk_bytes))


def _layers_memory(conv_in: CausalConv3d, blocks, conv_out: CausalConv3d, shape, element_size, chunk_bytes):
    """(output shape, peak bytes) of `_run_layers`: each layer holds its input, its output and its temporaries."""
    peak = _numel(shape) * element_size + conv_in.call_bytes(shape, element_size, chunk_bytes)
    shape = conv_in.output_shape(shape)
    for layer in [layer for block in blocks for layer in block.layers()]:
        out_shape, layer_peak = layer.memory(shape, element_size, chunk_bytes)
        peak = max(peak, layer_peak + _small_tensor_bytes(max(shape, out_shape, key=lambda s: s[1])))
        shape = out_shape
    temps = max(_stats_bytes(shape, element_size, chunk_bytes),
                conv_out.call_bytes(shape, element_size, chunk_bytes, normalized=True))
    return conv_out.output_shape(shape), max(peak, _numel(shape) * element_size + temps + _small_tensor_bytes(shape))


class Encoder(nn.Module):
    def __init__(self, config: VAEConfig):
        super().__init__()
        widths, groups = config.block_out_channels, config.norm_num_groups
        self.conv_in = CausalConv3d(config.in_channels, widths[0], 3)
        self.down_blocks = nn.ModuleList()
        for level, width in enumerate(widths):
            self.down_blocks.append(DownBlock(widths[max(level - 1, 0)], width, config.layers_per_block, groups,
                                              config.encoder_strides[level]))
        self.mid_block = MidBlock(widths[-1], groups, config.mid_block_add_attention)
        self.conv_norm_out = nn.GroupNorm(groups, widths[-1], eps=1e-6)
        self.conv_out = CausalConv3d(widths[-1], 2 * config.latent_channels, 3)

    def blocks(self):
        return [*self.down_blocks, self.mid_block]

    def forward(self, x, chunk_bytes):
        return _run_layers(self.conv_in, self.blocks(), self.conv_norm_out, self.conv_out, x, chunk_bytes)

    def memory(self, shape, element_size, chunk_bytes):
        return _layers_memory(self.conv_in, self.blocks(), self.conv_out, shape, element_size, chunk_bytes)


class Decoder(nn.Module):
    def __init__(self, config: VAEConfig):
        super().__init__()
        widths, groups = tuple(reversed(config.block_out_channels)), config.norm_num_groups
        self.conv_in = CausalConv3d(config.latent_channels, widths[0], 3)
        self.mid_block = MidBlock(widths[0], groups, config.mid_block_add_attention)
        self.up_blocks = nn.ModuleList()
        for level, width in enumerate(widths):
            self.up_blocks.append(UpBlock(widths[max(level - 1, 0)], width, config.layers_per_block + 1, groups,
                                          config.decoder_factors[level]))
        self.conv_norm_out = nn.GroupNorm(groups, widths[-1], eps=1e-6)
        self.conv_out = CausalConv3d(widths[-1], config.out_channels, 3)

    def blocks(self):
        return [self.mid_block, *self.up_blocks]

    def forward(self, x, chunk_bytes):
        return _run_layers(self.conv_in, self.blocks(), self.conv_norm_out, self.conv_out, x, chunk_bytes)

    def memory(self, shape, element_size, chunk_bytes):
        return _layers_memory(self.conv_in, self.blocks(), self.conv_out, shape, element_size, chunk_bytes)


# ----------------------------------------------------------------------------------------------------------------
# Tiling (approximate: a tile sees only itself) and memory plans


@dataclass(frozen=True)
class Tiling:
    """Overlapping tiles, in latent units, run separately and cross-faded linearly over their overlap.

    Spatial tiles start every `stride_height` x `stride_width` latent pixels and span `tile_height` x
    `tile_width` (cut at the border). Temporal tiles start every `stride_frames` latent frames and span one frame
    of causal context plus `tile_frames` frames; the context frame's own output is dropped. A None pair turns
    that kind of tiling off. Tile placement and cross-fade follow diffusers' AutoencoderKLHunyuanVideo, so equal
    sizes reproduce its tiled output (see `like_diffusers`).
    """

    tile_height: int | None = None
    tile_width: int | None = None
    stride_height: int | None = None
    stride_width: int | None = None
    tile_frames: int | None = None
    stride_frames: int | None = None

    def __post_init__(self):
        for name, size, stride in (("height", self.tile_height, self.stride_height),
                                   ("width", self.tile_width, self.stride_width),
                                   ("frames", self.tile_frames, self.stride_frames)):
            if (size is None) != (stride is None) or (size is not None and not 0 < stride <= size):
                raise FramePackError(
                    f"Tiling tile_{name}={size}, stride_{name}={stride} is invalid: give both, "
                    "with 0 < stride <= tile (or neither, to turn that tiling off).")
        if (self.tile_height is None) != (self.tile_width is None):
            raise FramePackError("Tiling needs tile_height and tile_width together: give both or neither.")

    @classmethod
    def like_diffusers(cls, spatial: bool = True, temporal: bool = True) -> "Tiling":
        """diffusers' settings: 256-pixel tiles every 192 pixels (`enable_tiling()`), and 16-frame tiles every 12
        frames (its framewise encoding/decoding, on by default)."""
        sizes = (32, 32, 24, 24) if spatial else (None,) * 4
        return cls(*sizes, *((4, 3) if temporal else (None, None)))

    @property
    def spatial(self) -> bool:
        return self.tile_height is not None

    @property
    def temporal(self) -> bool:
        return self.tile_frames is not None


@dataclass(frozen=True)
class TilingPlan:
    """How one encode or decode call runs.

    tiling: None runs whole frames (exact). batch_size: samples per pass (exact). chunk_bytes: budget for the
    temporaries of one convolution chunk (exact). working_set_bytes: the estimated peak of tensors alive during
    the call (input, output, activations, temporaries; not the weights, nor library workspaces).
    """

    tiling: Tiling | None
    batch_size: int
    chunk_bytes: int
    working_set_bytes: int


def _cross_fade(previous: torch.Tensor, current: torch.Tensor, dim: int, extent: int) -> None:
    """Fade the first `extent` positions of `current` in from the last ones of `previous`, in place."""
    extent = min(previous.shape[dim], current.shape[dim], extent)
    if extent <= 0:
        return
    shape = [1] * current.dim()
    shape[dim] = extent
    weight = (torch.arange(extent, device=current.device, dtype=torch.float32) / extent).view(shape)
    head = current.narrow(dim, 0, extent)
    tail = previous.narrow(dim, previous.shape[dim] - extent, extent)
    head.copy_(tail.float() * (1 - weight) + head.float() * weight)


def _split_axis(size: int, max_tile: int, overlap: int) -> tuple[int, int]:
    """(tile, stride) covering `size` with the fewest tiles of at most `max_tile` overlapping by `overlap`."""
    if size <= max_tile:
        return max_tile, max_tile
    count = math.ceil(size / (max_tile - overlap))
    stride = math.ceil(size / count)  # count * stride >= size: no sliver tile at the end
    return stride + overlap, stride


def _spatial_tiling(height: int, width: int, side: int, frames: int | None) -> Tiling:
    overlap = max(2, min(8, side // 4))  # diffusers overlaps its 32-latent tiles by 8
    tile_height, stride_height = _split_axis(height, side, overlap)
    tile_width, stride_width = _split_axis(width, side, overlap)
    temporal = (frames, frames - 1) if frames else (None, None)
    return Tiling(tile_height, tile_width, stride_height, stride_width, *temporal)


@dataclass(frozen=True)
class _Geometry:
    """Units of one direction: decode maps 1 latent frame / pixel to 4 frames / 8 pixels, encode the reverse."""

    in_time: int
    out_time: int
    in_space: int
    out_space: int

    def output_frames(self, frames: int) -> int:
        return (frames - 1) // self.in_time * self.out_time + 1


def _resolve_tiling(tiling):
    if tiling is None or tiling is False or tiling == "untiled":
        return "untiled"
    if tiling is True or tiling == "tiled":
        return "tiled"
    if tiling in ("auto", "official") or isinstance(tiling, Tiling):
        return tiling
    raise FramePackError(
        f"tiling={tiling!r} is not understood: use 'auto', 'official', 'tiled', 'untiled' or an framepack_engine.models.vae.Tiling(...).")


# The `vae_decode` setting: "exact" decodes whole sections when memory allows (tiles only when it does not);
# "official" decodes as the official app does through diffusers 0.33 (see `Tiling.like_diffusers`).
VAE_DECODE_MODES = {"exact": "auto", "official": "official"}


def decode_tiling(vae_decode: str) -> str:
    """The `tiling` argument of `HunyuanVideoVAE.decode` for a `vae_decode` setting ("exact" or "official")."""
    if vae_decode not in VAE_DECODE_MODES:
        raise FramePackError(
            f"vae_decode={vae_decode!r} is not understood: use 'exact' (whole sections when memory allows) or "
            "'official' (temporal tiles as the official app's diffusers VAE).")
    return VAE_DECODE_MODES[vae_decode]


# ----------------------------------------------------------------------------------------------------------------
# The model


class HunyuanVideoVAE(nn.Module):
    """HunyuanVideo's causal video VAE; parameter names equal diffusers' AutoencoderKLHunyuanVideo checkpoint.

    encode: pixels (B, 3, T, H, W) in [-1, 1] -> unscaled latents (B, 16, (T-1)//4+1, H/8, W/8).
    decode: unscaled latents -> pixels, not clamped. Multiply by `scaling_factor` for the DiT, divide before
    decoding. Both run under `memory_budget_bytes` (None: follow free CUDA memory, or 8 GiB elsewhere).
    """

    def __init__(self, config: VAEConfig):
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        self.quant_conv = nn.Conv3d(2 * config.latent_channels, 2 * config.latent_channels, 1)
        self.post_quant_conv = nn.Conv3d(config.latent_channels, config.latent_channels, 1)
        self.memory_budget_bytes: int | None = None
        self._tile_peaks: dict = {}  # one planning call walks the same tile shapes for many candidate plans

    # -- construction ------------------------------------------------------------------------------------------

    @classmethod
    def from_config(cls, config: dict | VAEConfig, device: torch.device | str = "meta",
                    dtype: torch.dtype | None = None) -> "HunyuanVideoVAE":
        """Build from diffusers config keys (unknown keys ignored). On the meta device by default: fill it with
        `load_state_dict(weights)`, which then adopts the given tensors as they are."""
        config = config if isinstance(config, VAEConfig) else VAEConfig.from_dict(config)
        with torch.device(device):
            model = cls(config)
        if dtype is not None:
            model.to(dtype)
        return model.eval().requires_grad_(False)

    @classmethod
    def from_pretrained(cls, folder: str | Path, dtype: torch.dtype | None = None,
                        device: torch.device | str = "cpu") -> "HunyuanVideoVAE":
        """Load a folder holding config.json and safetensors weights (the checkpoint's `vae` subfolder)."""
        model = cls.from_config(read_config(folder))
        state_dict = load_state_dict(folder, dtype=dtype)
        expected = set(model.state_dict())
        missing, unexpected = sorted(expected - set(state_dict)), sorted(set(state_dict) - expected)
        if missing or unexpected:
            example = f"missing {missing[0]!r}" if missing else f"unexpected {unexpected[0]!r}"
            raise ModelSourceError(
                f"{Path(folder).name!r} does not hold HunyuanVideo VAE weights matching its config ({example}): "
                "point at the checkpoint's 'vae' folder.")
        try:
            model.load_state_dict(state_dict)
        except RuntimeError as error:  # a tensor whose shape the config does not expect
            raise ModelSourceError(
                f"{Path(folder).name!r} holds VAE weights of other sizes than its config.json says "
                f"({str(error).splitlines()[-1].strip()}): download the 'vae' folder again.") from None
        return model.to(device)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool | None = None):
        # A model built on the meta device has no storage to copy into: adopt the given tensors instead.
        if assign is None:
            assign = any(p.is_meta for p in self.parameters())
        result = super().load_state_dict(state_dict, strict=strict, assign=assign)
        self.requires_grad_(False)
        return result

    @property
    def scaling_factor(self) -> float:
        return self.config.scaling_factor

    @property
    def dtype(self) -> torch.dtype:
        return self.post_quant_conv.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.post_quant_conv.weight.device

    # -- memory ------------------------------------------------------------------------------------------------

    def memory_budget(self, memory_budget_bytes: int | None = None) -> int:
        """Bytes the working set of one call may take: the argument, else `self.memory_budget_bytes`, else
        85% of the free (plus cached) CUDA memory, else 8 GiB off CUDA."""
        for budget in (memory_budget_bytes, self.memory_budget_bytes):
            if budget is not None:
                return int(budget)
        device = self.device
        if device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(device)
            cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
            return int((free + cached) * CUDA_BUDGET_FRACTION)
        return DEFAULT_CPU_BUDGET_BYTES

    def weight_bytes(self, part: str | None = None) -> int:
        module = getattr(self, part) if part else self
        return sum(p.numel() * p.element_size() for p in module.parameters())

    def _geometry(self, decode: bool) -> _Geometry:
        ratio_t, ratio_s = self.config.temporal_compression_ratio, self.config.spatial_compression_ratio
        return _Geometry(1, ratio_t, 1, ratio_s) if decode else _Geometry(ratio_t, 1, ratio_s, 1)

    def working_set_bytes(self, shape, tiling: Tiling | None = None, batch_size: int | None = None,
                          chunk_bytes: int | None = None, *, decode: bool = True,
                          dtype: torch.dtype | None = None) -> int:
        """Estimated peak bytes of the tensors one `decode` (or `encode`) call holds for an input of `shape`.

        Computed from the config: it walks the same batch slices, temporal pieces and spatial tiles as the call,
        and through each tile the layers with the chunk sizes their convolutions will pick. Weights and library
        workspaces (cuDNN) are not included.
        """
        element_size = (dtype or self.dtype).itemsize
        geometry = self._geometry(decode)
        tiling = tiling or Tiling()
        batch, channels, frames, height, width = shape
        slice_batch = min(batch_size or batch, batch)
        chunk_bytes = chunk_bytes or self.memory_budget() // 4
        out_channels = self.config.out_channels if decode else 2 * self.config.latent_channels
        unit_in, unit_out = geometry.in_space, geometry.out_space
        latent_height, latent_width = height // unit_in, width // unit_in
        model = self.decoder if decode else self.encoder
        spatial_peaks = {}

        def output_bytes(samples, frames_in, rows, columns):  # rows, columns in latent pixels
            return (samples * out_channels * geometry.output_frames(frames_in)
                    * rows * unit_out * columns * unit_out * element_size)

        def tile_peak(samples, frames_in, rows, columns):
            """Peak while one tile runs through the model, its output included."""
            key = (decode, samples, channels, frames_in, rows, columns, element_size, chunk_bytes)
            tile_peaks = self._tile_peaks
            if key not in tile_peaks:
                tile_shape = (samples, channels, frames_in, rows * unit_in, columns * unit_in)
                out_shape, peak = model.memory(tile_shape, element_size, chunk_bytes)
                if decode:  # post_quant_conv's output is the decoder's input until the decoder returns
                    peak += _numel(tile_shape) * element_size
                else:  # quant_conv's output beside the encoder's
                    peak = max(peak, 2 * _numel(out_shape) * element_size)
                tile_peaks[key] = peak
            return tile_peaks[key]

        def spatial_peak(samples, frames_in):
            """Peak of `_spatial_tiles`: the assembled output, the previous and current rows of blended tiles."""
            if (samples, frames_in) not in spatial_peaks:
                spatial_peaks[samples, frames_in] = walk_tiles(samples, frames_in)
            return spatial_peaks[samples, frames_in]

        def walk_tiles(samples, frames_in):
            if not tiling.spatial or (latent_height <= tiling.tile_height and latent_width <= tiling.tile_width):
                return tile_peak(samples, frames_in, latent_height, latent_width)
            assembled = output_bytes(samples, frames_in, latent_height, latent_width)
            peak, previous_row = 0, 0
            for top in range(0, latent_height, tiling.stride_height):
                row = 0
                for left in range(0, latent_width, tiling.stride_width):
                    rows = min(tiling.tile_height, latent_height - top)
                    columns = min(tiling.tile_width, latent_width - left)
                    peak = max(peak, assembled + previous_row + row + tile_peak(samples, frames_in, rows, columns))
                    row += output_bytes(samples, frames_in, rows, columns)
                peak = max(peak, assembled + previous_row + row)
                previous_row = row
            return peak

        def slice_peak(samples):
            """Peak of one batch slice through `_temporal_tiles`, its output included."""
            latent_frames = (frames - 1) // geometry.in_time + 1
            if not tiling.temporal or latent_frames <= tiling.tile_frames:
                return spatial_peak(samples, frames)
            assembled = output_bytes(samples, frames, latent_height, latent_width)
            fade = (tiling.tile_frames - tiling.stride_frames) * geometry.out_time
            peak, tail = 0, 0
            for start in range(0, frames, tiling.stride_frames * geometry.in_time):
                frames_in = min(frames - start, tiling.tile_frames * geometry.in_time + 1)
                peak = max(peak, assembled + tail + spatial_peak(samples, frames_in))
                piece_frames = geometry.output_frames(frames_in) - (1 if start else 0)
                tail = output_bytes(samples, 1, latent_height, latent_width) * min(fade, piece_frames)
            return peak

        input_bytes = _numel(shape) * element_size
        if slice_batch >= batch:
            return input_bytes + slice_peak(batch)
        # slices run one after the other, each copied into the output allocated up front
        last = batch - (math.ceil(batch / slice_batch) - 1) * slice_batch
        return (input_bytes + output_bytes(batch, frames, latent_height, latent_width)
                + max(slice_peak(slice_batch), slice_peak(last)))

    def _candidates(self, shape, mode, decode: bool):
        """(tiling, batch_size) pairs, cheapest first."""
        batch, _, frames, height, width = shape
        geometry = self._geometry(decode)
        latent_frames = (frames - 1) // geometry.in_time + 1
        latent_height, latent_width = height // geometry.in_space, width // geometry.in_space
        if isinstance(mode, Tiling):
            return [(mode, batch), (mode, 1)]
        if mode == "official":
            # diffusers' frame-wise tiles always; its spatial tiles (enable_tiling, which the official app turns on
            # below 60 GB of free VRAM) only when memory asks; smaller spatial tiles only past what diffusers does
            temporal, both = Tiling.like_diffusers(spatial=False), Tiling.like_diffusers()
            smaller = [(replace(_spatial_tiling(latent_height, latent_width, side, None), tile_frames=4,
                                stride_frames=3), 1) for side in range(min(31, max(latent_height, latent_width) - 1),
                                                                        MIN_TILE_LATENT - 1, -4)]
            return [(temporal, batch), (temporal, 1), (both, 1)] + smaller
        whole = [(None, batch), (None, 1)]
        if mode == "untiled":
            return whole
        largest = max(latent_height, latent_width)
        sides, side = [], largest - 1 if mode == "auto" else min(largest - 1, 32)
        while side >= MIN_TILE_LATENT:
            sides.append(side)
            side -= max(1, side // 8)
        frame_options = [None] + [f for f in (8, 4, 2) if f < latent_frames]
        # tiles of at least 16 latents, shrinking in time before going smaller in space
        tiled = list(dict.fromkeys(
            (_spatial_tiling(latent_height, latent_width, side, frames_per_tile), 1)
            for small in (False, True) for frames_per_tile in frame_options
            for side in sides if (side < 16) == small))
        if mode == "tiled":
            return tiled or whole
        return whole + tiled

    def _plan(self, shape, tiling, memory_budget_bytes, decode: bool) -> TilingPlan:
        mode = _resolve_tiling(tiling)
        budget = self.memory_budget(memory_budget_bytes)
        chunk_options = sorted({max(budget // divisor, 1) for divisor in (4, 8, 16, 64)}, reverse=True)
        plan = None
        self._tile_peaks.clear()
        try:
            for candidate, batch_size in self._candidates(shape, mode, decode):
                for chunk_bytes in chunk_options:
                    estimate = self.working_set_bytes(shape, candidate, batch_size, chunk_bytes, decode=decode)
                    plan = TilingPlan(candidate, batch_size, chunk_bytes, estimate)
                    if estimate <= budget:
                        return plan
        finally:
            self._tile_peaks.clear()
        logger.warning("VAE %s of %s needs about %.2f GiB with the smallest plan tiling=%r allows, over the "
                       "%.2f GiB budget; trying anyway.", "decode" if decode else "encode", tuple(shape),
                       plan.working_set_bytes / GiB, tiling, budget / GiB)
        return plan

    def plan_decode(self, latent_shape, tiling="auto", memory_budget_bytes: int | None = None) -> TilingPlan:
        """The plan `decode` follows for latents of `latent_shape` (B, C, T, H, W)."""
        return self._plan(tuple(latent_shape), tiling, memory_budget_bytes, decode=True)

    def plan_encode(self, pixel_shape, tiling="auto", memory_budget_bytes: int | None = None) -> TilingPlan:
        """The plan `encode` follows for pixels of `pixel_shape` (B, 3, T, H, W)."""
        return self._plan(tuple(pixel_shape), tiling, memory_budget_bytes, decode=False)

    # -- encode / decode ---------------------------------------------------------------------------------------

    def _check(self, tensor: torch.Tensor, channels: int, what: str, spatial_multiple: int) -> torch.Tensor:
        if not torch.is_tensor(tensor) or tensor.dim() != 5 or tensor.shape[1] != channels:
            shape = tuple(tensor.shape) if torch.is_tensor(tensor) else type(tensor).__name__
            raise FramePackError(
                f"VAE {what} must be a tensor (batch, {channels}, frames, height, width), got {shape}: "
                "add the missing batch or frame dimension (e.g. x[:, :, None] for single images).")
        if tensor.shape[3] % spatial_multiple or tensor.shape[4] % spatial_multiple:
            raise FramePackError(
                f"VAE {what} height and width must be multiples of {spatial_multiple}, got "
                f"{tensor.shape[3]}x{tensor.shape[4]}: resize or crop to a multiple of {spatial_multiple}.")
        return tensor.to(device=self.device, dtype=self.dtype)

    @torch.no_grad()
    def encode(self, pixels: torch.Tensor, sample: bool = False, generator: torch.Generator | None = None,
               tiling="auto", memory_budget_bytes: int | None = None) -> torch.Tensor:
        """Pixels (B, 3, T, H, W) in [-1, 1] -> unscaled latents: the posterior mean, or a draw if `sample`."""
        pixels = self._check(pixels, self.config.in_channels, "pixels", self.config.spatial_compression_ratio)
        plan = self.plan_encode(pixels.shape, tiling, memory_budget_bytes)
        moments = self._run(pixels, plan, self._encode_tile, self._geometry(decode=False))
        mean, log_variance = moments.chunk(2, dim=1)
        if not sample:
            return mean.clone()
        std = torch.exp(0.5 * log_variance.clamp(-30.0, 20.0))
        noise_device = generator.device if generator is not None else mean.device
        noise = torch.randn(mean.shape, generator=generator, device=noise_device, dtype=mean.dtype)
        return mean + std * noise.to(mean.device)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor, tiling="auto", memory_budget_bytes: int | None = None,
               map_tiles=None) -> torch.Tensor:
        """Unscaled latents (B, 16, t, h, w) -> pixels (B, 3, 4t-3, 8h, 8w), roughly in [-1, 1], not clamped.

        tiling: "auto" (exact whenever memory allows, the engine's default), "official" (the official app's
        decode: diffusers 0.33's frame-wise tiles for more than 4 latent frames, its 256-pixel spatial tiles when
        memory asks), "tiled", "untiled" or a `Tiling`. `decode_tiling(vae_decode)` maps the setting to it.
        map_tiles(run, tiles) -> outputs: who decodes the temporal tiles (several ranks share them,
        framepack_engine.runtime.ulysses.spread_tiles); default: each in turn, here."""
        latents = self._check(latents, self.config.latent_channels, "latents", 1)
        plan = self.plan_decode(latents.shape, tiling, memory_budget_bytes)
        return self._run(latents, plan, self._decode_tile, self._geometry(decode=True), map_tiles)

    def _encode_tile(self, pixels, chunk_bytes):
        return self.quant_conv(self.encoder(pixels, chunk_bytes))

    def _decode_tile(self, latents, chunk_bytes):
        return self.decoder(self.post_quant_conv(latents), chunk_bytes)

    def _run(self, x, plan: TilingPlan, run_tile, geometry: _Geometry, map_tiles=None) -> torch.Tensor:
        tiling = plan.tiling or Tiling()

        def run_spatial(part):
            return self._spatial_tiles(part, tiling, lambda tile: run_tile(tile, plan.chunk_bytes), geometry)

        def run_sample_slice(part):
            return self._temporal_tiles(part, tiling, run_spatial, geometry, map_tiles)

        if plan.batch_size >= x.shape[0]:
            return run_sample_slice(x)
        out = None
        for start in range(0, x.shape[0], plan.batch_size):
            part = run_sample_slice(x[start:start + plan.batch_size])
            if out is None:
                out = part.new_empty(x.shape[0], *part.shape[1:])
            out[start:start + plan.batch_size] = part
            del part
        return out

    @staticmethod
    def _spatial_tiles(x, tiling: Tiling, run, geometry: _Geometry) -> torch.Tensor:
        unit_in, unit_out = geometry.in_space, geometry.out_space
        height, width = x.shape[3] // unit_in, x.shape[4] // unit_in  # latent pixels
        if not tiling.spatial or (height <= tiling.tile_height and width <= tiling.tile_width):
            return run(x)
        fade_height = (tiling.tile_height - tiling.stride_height) * unit_out
        fade_width = (tiling.tile_width - tiling.stride_width) * unit_out
        out, previous_row = None, []
        for i, top in enumerate(range(0, height, tiling.stride_height)):
            row = []
            for j, left in enumerate(range(0, width, tiling.stride_width)):
                tile = run(x[:, :, :, top * unit_in:(top + tiling.tile_height) * unit_in,
                             left * unit_in:(left + tiling.tile_width) * unit_in])
                # blend with the tile above, then with the one to the left (both already blended themselves)
                if i > 0:
                    _cross_fade(previous_row[j], tile, 3, fade_height)
                if j > 0:
                    _cross_fade(row[j - 1], tile, 4, fade_width)
                row.append(tile)
                if out is None:
                    out = tile.new_empty(*tile.shape[:3], height * unit_out, width * unit_out)
                y, x_ = top * unit_out, left * unit_out
                kept = tile[:, :, :, :min(tiling.stride_height * unit_out, out.shape[3] - y),
                            :min(tiling.stride_width * unit_out, out.shape[4] - x_)]
                out[:, :, :, y:y + kept.shape[3], x_:x_ + kept.shape[4]] = kept
            previous_row = row
        return out

    @staticmethod
    def _temporal_tiles(x, tiling: Tiling, run, geometry: _Geometry, map_tiles=None) -> torch.Tensor:
        latent_frames = (x.shape[2] - 1) // geometry.in_time + 1
        if not tiling.temporal or latent_frames <= tiling.tile_frames:
            return run(x)
        total = geometry.output_frames(x.shape[2])
        fade = (tiling.tile_frames - tiling.stride_frames) * geometry.out_time
        tiles = [x[:, :, start:start + tiling.tile_frames * geometry.in_time + 1]
                 for start in range(0, x.shape[2], tiling.stride_frames * geometry.in_time)]
        # Each in turn as it is blended (one tile's output alive at a time), or all at once as map_tiles runs them.
        pieces = (run(tile) for tile in tiles) if map_tiles is None else iter(map_tiles(run, tiles))
        out, written, tail = None, 0, None
        for k in range(len(tiles)):
            piece = next(pieces)
            if k > 0:
                piece = piece[:, :, 1:]  # the context frame, decoded (or encoded) as if it were the first
                _cross_fade(tail, piece, 2, fade)
            if out is None:
                out = piece.new_empty(*piece.shape[:2], total, *piece.shape[3:])
            keep = min(tiling.stride_frames * geometry.out_time + (1 if k == 0 else 0), piece.shape[2],
                       total - written)
            out[:, :, written:written + keep] = piece[:, :, :keep]
            written += keep
            tail = piece[:, :, piece.shape[2] - min(fade, piece.shape[2]):].clone()
            del piece
        return out
