"""Analytic FLOPs of one FramePackDiT call (one sampling step), from the config and the packed token counts.

A multiply-add counts as 2 FLOPs. Counted: every matrix product of the model, split into
- linear: the dense projections (nn.Linear) and the patch-embedding convolutions (a strided Conv3d whose kernel
  equals its stride is a linear map of each patch);
- attention: the two products of every attention, q k^T and (softmax) v, over the tokens actually attended.
Not counted: norms, activations, softmax, rotary, residual adds and biases. Each is O(tokens * hidden), well under
1% of the total at the real sizes, and none runs on the matrix units that MFU is measured against.

The packed sequence of a section (see framepack_engine.models.dit): latent tokens (noisy window, clean 1x, 2x and 4x
history, each patchified with its own kernel and replicate-padded up to a kernel multiple) followed by the condition tokens
(SigLIP image tokens, then the prompt's valid tokens: the DiT crops the padding of a batch-one prompt).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from framepack_engine.models.dit import DiTConfig
from framepack_engine.models.history import SCALES_BY_NAME, HistoryContext
from framepack_engine.official import HISTORY_SCALES, START_LATENT_FRAMES

# The refiner's MLP ratio is fixed in the official model, whatever the config's mlp_ratio.
REFINER_MLP_RATIO = 4
TIMESTEP_CHANNELS = 256  # sinusoidal features fed to the timestep and guidance embedders


def kernel_tokens(frames: int, height: int, width: int, kernel: tuple[int, int, int]) -> int:
    """Tokens a patch embedding makes of a (frames, height, width) latent: each axis padded up to the kernel."""
    return math.prod(math.ceil(size / k) for size, k in zip((frames, height, width), kernel))


@dataclass(frozen=True)
class PackedSequence:
    """Token counts of one section's packed DiT input (per sample)."""

    noisy_tokens: int
    clean_1x_tokens: int
    clean_2x_tokens: int
    clean_4x_tokens: int
    image_tokens: int  # SigLIP tokens after the image projection
    text_tokens: int  # valid prompt tokens

    @property
    def latent_tokens(self) -> int:
        return self.noisy_tokens + self.clean_1x_tokens + self.clean_2x_tokens + self.clean_4x_tokens

    @property
    def condition_tokens(self) -> int:
        return self.image_tokens + self.text_tokens

    @property
    def total_tokens(self) -> int:
        return self.latent_tokens + self.condition_tokens

    def as_dict(self) -> dict:
        return {**asdict(self), "latent_tokens": self.latent_tokens, "condition_tokens": self.condition_tokens,
                "total_tokens": self.total_tokens}


def packed_sequence(config: DiTConfig | dict, noisy_frames: int, clean_1x_frames: int, clean_2x_frames: int,
                    clean_4x_frames: int, latent_height: int, latent_width: int, text_tokens: int,
                    image_tokens: int) -> PackedSequence:
    """The packed sequence of latents of the given frame counts at (latent_height, latent_width)."""
    config = _as_config(config)
    noisy_kernel = (config.patch_size_t, config.patch_size, config.patch_size)

    def tokens(frames, kernel):
        return kernel_tokens(frames, latent_height, latent_width, kernel) if frames else 0

    return PackedSequence(
        noisy_tokens=tokens(noisy_frames, noisy_kernel),
        clean_1x_tokens=tokens(clean_1x_frames, SCALES_BY_NAME["clean"].kernel),
        clean_2x_tokens=tokens(clean_2x_frames, SCALES_BY_NAME["clean_2x"].kernel),
        clean_4x_tokens=tokens(clean_4x_frames, SCALES_BY_NAME["clean_4x"].kernel),
        image_tokens=image_tokens if config.has_image_proj else 0,
        text_tokens=text_tokens)


def section_packed_sequence(config: DiTConfig | dict, latent_window_size: int, latent_height: int, latent_width: int,
                            text_tokens: int, image_tokens: int) -> PackedSequence:
    """The packed sequence of one section, the same for every section of either loop: the noisy window and the
    whole history context of HISTORY_SCALES (the 1x group with the start latent). The one place the packed-token
    count of a section is computed (the planner, the benchmark and the section stats read it)."""
    frames = {scale.name: scale.history_frames for scale in HISTORY_SCALES}
    return packed_sequence(config, latent_window_size, START_LATENT_FRAMES + frames["clean"], frames["clean_2x"],
                           frames["clean_4x"], latent_height, latent_width, text_tokens, image_tokens)


def packed_sequence_of_inputs(config: DiTConfig | dict, latents_shape, history: HistoryContext, text_tokens: int,
                              image_tokens: int) -> PackedSequence:
    """The packed sequence of actual DiT inputs: the noisy latents' shape and the section's history context
    (absent scales count zero)."""
    _, _, frames, height, width = latents_shape
    return packed_sequence(config, frames, history.frames("clean"), history.frames("clean_2x"),
                           history.frames("clean_4x"), height, width, text_tokens, image_tokens)


@dataclass(frozen=True)
class StepFlops:
    """FLOPs of one DiT call, split by kind (linear / attention) and by part of the model."""

    by_part: dict  # part -> {"linear": int, "attention": int}

    @property
    def linear(self) -> int:
        return sum(part["linear"] for part in self.by_part.values())

    @property
    def attention(self) -> int:
        return sum(part["attention"] for part in self.by_part.values())

    @property
    def total(self) -> int:
        return self.linear + self.attention

    def as_dict(self) -> dict:
        return {"linear": self.linear, "attention": self.attention, "total": self.total,
                "by_part": {name: dict(part) for name, part in self.by_part.items()}}


def _dense(rows: int, in_features: int, out_features: int) -> int:
    return 2 * rows * in_features * out_features


def _attention(query_tokens: int, key_tokens: int, hidden_size: int) -> int:
    # q k^T and p v, each 2 * q * k * head_dim per head; heads * head_dim = hidden_size.
    return 2 * (2 * query_tokens * key_tokens * hidden_size)


def step_flops(config: DiTConfig | dict, sequence: PackedSequence, batch: int = 1) -> StepFlops:
    """FLOPs of one FramePackDiT forward over `batch` samples of the given packed sequence."""
    config = _as_config(config)
    hidden, inner = config.hidden_size, config.mlp_hidden_size
    image, condition, text = sequence.latent_tokens, sequence.condition_tokens, sequence.text_tokens
    joint = image + condition

    # Conditioning vector (one row per sample): timestep, guidance and pooled-text MLPs.
    vector = _dense(1, TIMESTEP_CHANNELS, hidden) + _dense(1, hidden, hidden)
    vector += _dense(1, config.pooled_projection_dim, hidden) + _dense(1, hidden, hidden)
    if config.guidance_embeds:
        vector += _dense(1, TIMESTEP_CHANNELS, hidden) + _dense(1, hidden, hidden)
    patch_in = config.in_channels * config.patch_size_t * config.patch_size ** 2
    patches = _dense(sequence.noisy_tokens, patch_in, hidden)
    for tokens, scale in ((sequence.clean_1x_tokens, "clean"), (sequence.clean_2x_tokens, "clean_2x"),
                          (sequence.clean_4x_tokens, "clean_4x")):
        patches += _dense(tokens, config.in_channels * math.prod(SCALES_BY_NAME[scale].kernel), hidden)
    image_projection = 0
    if config.has_image_proj:
        image_projection = (_dense(sequence.image_tokens, config.image_proj_dim, 3 * hidden)
                            + _dense(sequence.image_tokens, 3 * hidden, hidden))
    embeddings = vector + patches + image_projection

    # Text refiner: its own timestep + mean-text vector, the input projection, then self-attention blocks.
    refiner_vector = (_dense(1, TIMESTEP_CHANNELS, hidden) + _dense(1, hidden, hidden)
                      + _dense(1, config.text_embed_dim, hidden) + _dense(1, hidden, hidden))
    refiner_inner = hidden * REFINER_MLP_RATIO
    refiner_block = (_dense(1, hidden, 2 * hidden) + 4 * _dense(text, hidden, hidden)
                     + 2 * _dense(text, hidden, refiner_inner))
    refiner_linear = (refiner_vector + _dense(text, config.text_embed_dim, hidden)
                      + config.num_refiner_layers * refiner_block)
    refiner_attention = config.num_refiner_layers * _attention(text, text, hidden)

    # Double-stream blocks: separate weights per stream, one joint attention.
    double_block = (2 * _dense(1, hidden, 6 * hidden)
                    + 4 * _dense(image, hidden, hidden) + 4 * _dense(condition, hidden, hidden)
                    + 2 * _dense(image, hidden, inner) + 2 * _dense(condition, hidden, inner))
    # Single-stream blocks: q, k, v and the MLP's first layer from the same input; one fused output projection.
    single_block = (_dense(1, hidden, 3 * hidden) + 3 * _dense(joint, hidden, hidden)
                    + _dense(joint, hidden, inner) + _dense(joint, hidden + inner, hidden))
    # Only the noisy tokens reach the output projection.
    output = _dense(1, hidden, 2 * hidden) + _dense(
        sequence.noisy_tokens, hidden, config.patch_size_t * config.patch_size ** 2 * config.out_channels)

    parts = {
        "embeddings": {"linear": embeddings, "attention": 0},
        "text_refiner": {"linear": refiner_linear, "attention": refiner_attention},
        "double_blocks": {"linear": config.num_layers * double_block,
                          "attention": config.num_layers * _attention(joint, joint, hidden)},
        "single_blocks": {"linear": config.num_single_layers * single_block,
                          "attention": config.num_single_layers * _attention(joint, joint, hidden)},
        "output": {"linear": output, "attention": 0},
    }
    return StepFlops({name: {kind: batch * count for kind, count in part.items()} for name, part in parts.items()})


def _as_config(config: DiTConfig | dict) -> DiTConfig:
    return config if isinstance(config, DiTConfig) else DiTConfig.from_dict(config)
