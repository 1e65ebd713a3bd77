"""Sigma schedules, the flow-matching UniPC and Euler samplers, and the denoiser wrapper around the DiT.

Everything here follows the maths of the official FramePack app (lllyasviel/FramePack):

* Flow matching: a latent at noise level sigma is ``x = (1 - sigma) * x0 + sigma * noise``; the DiT predicts the
  velocity ``v = noise - x0``, so ``x0 = x - sigma * v`` and the probability-flow ODE is ``dx/dsigma = (x - x0) / sigma``.
* Schedule: ``steps + 1`` sigmas spaced evenly from 1 to 0, then bent towards high noise by the Flux time shift with
  ``mu`` interpolated from the sequence length (capped at ``log 7``), or ``mu = log(shift)``.
* UniPC: the ODE above in data (x0) prediction is exactly the variance-exploding one with ``alpha = 1``, so the
  log-SNR is ``lambda = -log(sigma)``. Each step predicts with UniP, calls the model once at the predicted point and
  corrects with UniC, reusing that call for the next step. The order climbs 1, 2, 3 during warm-up, the last sigma
  (zero) is never stepped to, and the result is the model's last x0 prediction: ``steps`` model calls in all.
* Denoiser: ``timestep = sigma * 1000`` in the model dtype, distilled guidance passed as ``scale * 1000``, real CFG
  with a negative prompt when ``cfg != 1`` followed by the guidance rescale, and x0 formed in float32.

The samplers take any ``denoise(x, sigma) -> x0`` callable; ``sigma`` arrives as a 1-D tensor of batch size.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

import torch

from framepack_engine.errors import FramePackError, Option

# Flux's line from sequence length to mu: mu = 0.5 at 256 tokens, 1.15 at 4096 tokens, never above log(7).
FLUX_BASE_SEQUENCE_LENGTH = 256
FLUX_BASE_MU = 0.5
FLUX_MAX_SEQUENCE_LENGTH = 4096
FLUX_MAX_MU = 1.15
FLUX_MAX_EXP_MU = 7.0

TIMESTEP_SCALE = 1000.0  # the DiT was trained with timesteps in [0, 1000]
UNIPC_VARIANTS = ("bh1", "bh2")
UNIPC_MAX_ORDER = 3

Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
StepCallback = Callable[[dict], None]


# ----------------------------------------------------------------------------------------------------------------
# Sigma schedule
# ----------------------------------------------------------------------------------------------------------------


def flux_mu(seq_len: float) -> float:
    """The Flux shift exponent for a sequence of ``seq_len`` noisy tokens: linear in the length, capped at log 7."""
    slope = (FLUX_MAX_MU - FLUX_BASE_MU) / (FLUX_MAX_SEQUENCE_LENGTH - FLUX_BASE_SEQUENCE_LENGTH)
    mu = FLUX_BASE_MU + slope * (seq_len - FLUX_BASE_SEQUENCE_LENGTH)
    return min(mu, math.log(FLUX_MAX_EXP_MU))


def flux_sequence_length(latent_frames: int, latent_height: int, latent_width: int) -> int:
    """The length the official sampler feeds to ``flux_mu``: noisy latent voxels over the 2x2 spatial patch."""
    return latent_frames * latent_height * latent_width // 4


def flux_sigmas(steps: int, seq_len: float, shift: float | None = None) -> torch.Tensor:
    """``steps + 1`` float32 sigmas from 1 down to 0, Flux-shifted by ``mu = log(shift)`` or ``flux_mu(seq_len)``."""
    if not isinstance(steps, int) or steps < 1:
        raise FramePackError(f"steps must be a positive integer, got {steps!r}: pass ", Option("steps", 25),
                             " or any count >= 1.")
    if shift is not None and not shift > 0:
        raise FramePackError(f"shift must be positive, got {shift!r}; pass shift=None to derive it from the size.")
    mu = math.log(shift) if shift is not None else flux_mu(seq_len)
    exp_mu = math.exp(mu)
    # Kept in float32 with the official operation order, so the schedule matches the official one to the bit
    # (the first sigma can land one rounding below 1); at t = 0 the division gives inf and the sigma is exactly 0.
    t = torch.linspace(1, 0, steps + 1)
    return exp_mu / (exp_mu + (1 / t - 1))


def draw_noise(
    generator: torch.Generator,
    batch_size: int,
    channels: int,
    latent_frames: int,
    latent_height: int,
    latent_width: int,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Float32 starting noise for one section, drawn on the generator's device then moved, as the official draws it
    (so a CPU generator seeded the same gives the same noise on any accelerator)."""
    shape = (batch_size, channels, latent_frames, latent_height, latent_width)
    noise = torch.randn(shape, generator=generator, device=generator.device)
    return noise.to(device=device, dtype=torch.float32)


# ----------------------------------------------------------------------------------------------------------------
# Samplers
# ----------------------------------------------------------------------------------------------------------------


def _check_sigmas(sigmas: torch.Tensor) -> list[float]:
    if not isinstance(sigmas, torch.Tensor) or sigmas.ndim != 1 or sigmas.numel() < 2:
        raise FramePackError("sigmas must be a 1-D tensor of at least 2 noise levels; build them with flux_sigmas().")
    values = sigmas.detach().double().cpu().tolist()
    if any(not later < earlier for earlier, later in zip(values, values[1:])) or values[-2] <= 0 or values[-1] < 0:
        raise FramePackError("sigmas must fall strictly and stay positive until the last (which may be 0); "
                             "build them with flux_sigmas().")
    return values


def _report(callback: StepCallback | None, i: int, total: int, x, denoised, sigma) -> None:
    if callback is not None:
        # "i" is the official key (its callbacks read d['i']); "step" says the same for new code.
        callback({"i": i, "step": i, "total_steps": total, "x": x, "denoised": denoised, "sigma": sigma})


def sample_euler(denoise: Denoiser, noise: torch.Tensor, sigmas: torch.Tensor,
                 callback: StepCallback | None = None) -> torch.Tensor:
    """First-order flow-matching Euler over every interval of ``sigmas``; one model call per interval.

    Returns the latent at the last sigma (the final x0 prediction when that sigma is 0).
    """
    _check_sigmas(sigmas)
    sigmas = sigmas.to(noise.device)
    total = sigmas.numel() - 1
    x = noise
    for i in range(total):
        sigma = sigmas[i].expand(x.shape[0])
        denoised = denoise(x, sigma)
        velocity = (x - denoised) / sigmas[i]
        x = x + (sigmas[i + 1] - sigmas[i]) * velocity
        _report(callback, i, total, x, denoised, sigmas[i])
    return x


class _UniPCStep:
    """The scalar coefficients of one UniPC step, which depend on the sigmas only.

    In data prediction the step is affine in the current latent and the stored x0 predictions m_0 (newest) .. m_{p-1}:
        predictor  x_pred = ratio * x + sum_j predictor_weights[j] * m_j
        corrector  x_new  = ratio * x + sum_j corrector_weights[j] * m_j + corrector_new_weight * m_t
    where m_t is the model's x0 at x_pred. Coefficients are worked out on the CPU in float64 (no device syncs).
    """

    def __init__(self, previous_sigmas: list[float], sigma: float, order: int, variant: str):
        # previous_sigmas: the sigmas of the stored predictions, oldest first; the newest is the step's start.
        lambda_start = -math.log(previous_sigmas[-1])
        h = -math.log(sigma) - lambda_start
        # Distances of the older predictions from the newest, in units of the step (negative: behind us).
        ratios = [(-math.log(previous_sigmas[-1 - k]) - lambda_start) / h for k in range(1, order)]

        minus_h = -h
        h_phi_1 = math.expm1(minus_h)
        b_h = minus_h if variant == "bh1" else math.expm1(minus_h)

        # Right-hand side of the order conditions, from the phi-function recurrence of the UniPC paper, over B(h).
        rhs = []
        h_phi_k = h_phi_1 / minus_h - 1.0
        factorial = 1.0
        for k in range(1, order + 1):
            rhs.append(h_phi_k * factorial / b_h)
            factorial *= k + 1
            h_phi_k = h_phi_k / minus_h - 1.0 / factorial
        nodes = ratios + [1.0]
        vandermonde = torch.tensor([[node ** power for node in nodes] for power in range(order)], dtype=torch.float64)
        rhs = torch.tensor(rhs, dtype=torch.float64)

        # UniP uses the older predictions only: 0.5 with one of them, the order conditions with two.
        if order == 1:
            predictor_rhos = []
        elif order == 2:
            predictor_rhos = [0.5]
        else:
            predictor_rhos = torch.linalg.solve(vandermonde[:-1, :-1], rhs[:-1]).tolist()
        # UniC adds the new prediction at node 1: 0.5 alone at first order, the order conditions above it.
        corrector_rhos = [0.5] if order == 1 else torch.linalg.solve(vandermonde, rhs).tolist()

        self.ratio = sigma / previous_sigmas[-1]
        self.predictor_weights = self._weights(predictor_rhos, ratios, h_phi_1, b_h, order)
        self.corrector_weights = self._weights(corrector_rhos[:-1], ratios, h_phi_1, b_h, order)
        # The new prediction enters as rho * B(h) * (m_t - m_0).
        self.corrector_new_weight = -b_h * corrector_rhos[-1]
        self.corrector_weights[0] += b_h * corrector_rhos[-1]

    @staticmethod
    def _weights(rhos: list[float], ratios: list[float], h_phi_1: float, b_h: float, order: int) -> list[float]:
        # Each older prediction enters as the divided difference (m_k - m_0) / r_k, weighted by rho_k * B(h).
        weights = [-h_phi_1] + [0.0] * (order - 1)
        for k, (rho, ratio) in enumerate(zip(rhos, ratios), start=1):
            weights[k] -= b_h * rho / ratio
            weights[0] += b_h * rho / ratio
        return weights


def _combine(ratio: float, x: torch.Tensor, weights: list[float], predictions: list[torch.Tensor]) -> torch.Tensor:
    out = x * ratio
    for weight, prediction in zip(weights, predictions):
        if weight != 0.0:
            out = out + weight * prediction
    return out


def sample_unipc(denoise: Denoiser, noise: torch.Tensor, sigmas: torch.Tensor, variant: str = "bh1",
                 callback: StepCallback | None = None) -> torch.Tensor:
    """The official flow-matching UniPC (predictor-corrector, order up to 3); returns the final x0 prediction.

    Makes ``len(sigmas) - 1`` model calls at ``sigmas[0] .. sigmas[-2]``: the last sigma is never stepped to, the
    model's prediction at the last nonzero sigma is the result. ``variant`` picks B(h): "bh1" (h) or "bh2" (e^h - 1).
    """
    if variant not in UNIPC_VARIANTS:
        raise FramePackError(f"unknown UniPC variant {variant!r}; use 'bh1' (default) or 'bh2'.")
    values = _check_sigmas(sigmas)
    sigmas = sigmas.to(noise.device)
    total = len(values) - 1
    max_order = min(UNIPC_MAX_ORDER, total - 1)

    x = noise
    denoised = denoise(x, sigmas[0].expand(x.shape[0]))
    predictions = [denoised]  # newest first
    _report(callback, 0, total, x, denoised, sigmas[0])
    for i in range(1, total):
        order = min(i, max_order)  # warm-up: first order, then second, then the full order
        step = _UniPCStep(values[i - order:i], values[i], order, variant)
        x_predicted = _combine(step.ratio, x, step.predictor_weights, predictions)
        denoised = denoise(x_predicted, sigmas[i].expand(x.shape[0]))
        x = _combine(step.ratio, x, step.corrector_weights, predictions) + step.corrector_new_weight * denoised
        predictions = [denoised] + predictions[: max_order - 1]
        _report(callback, i, total, x, denoised, sigmas[i])
    return denoised


SAMPLERS = ("unipc", "unipc_bh2", "euler")


def sample(sampler: str, denoise: Denoiser, noise: torch.Tensor, sigmas: torch.Tensor,
           callback: StepCallback | None = None) -> torch.Tensor:
    """Run a sampler by name: "unipc" (the official default, bh1), "unipc_bh2" or "euler"."""
    if sampler == "unipc":
        return sample_unipc(denoise, noise, sigmas, "bh1", callback)
    if sampler == "unipc_bh2":
        return sample_unipc(denoise, noise, sigmas, "bh2", callback)
    if sampler == "euler":
        return sample_euler(denoise, noise, sigmas, callback)
    raise FramePackError(f"unknown sampler {sampler!r}; use one of {', '.join(SAMPLERS)}.")


# ----------------------------------------------------------------------------------------------------------------
# Denoiser around the DiT
# ----------------------------------------------------------------------------------------------------------------


def model_timestep(sigma: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The DiT's timestep for a noise level: ``sigma * 1000``, formed in float32 then cast to the model dtype."""
    return (sigma.float() * TIMESTEP_SCALE).to(dtype)


def distilled_guidance_input(scale: float, batch_size: int, device, dtype: torch.dtype) -> torch.Tensor:
    """The DiT's ``guidance`` input for a distilled guidance scale: ``scale * 1000`` per sample."""
    return torch.full((batch_size,), scale * TIMESTEP_SCALE, dtype=torch.float32).to(device=device, dtype=dtype)


def velocity_to_x0(x: torch.Tensor, velocity: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """``x0 = x - sigma * v`` in float32, sigma given per sample (shape ``(batch,)``) or as a scalar."""
    sigma = sigma.float()
    if sigma.ndim == 1:
        sigma = sigma.reshape(-1, *([1] * (x.ndim - 1)))
    return x.float() - velocity.float() * sigma


def rescale_guidance(guided: torch.Tensor, positive: torch.Tensor, guidance_rescale: float) -> torch.Tensor:
    """Guidance rescale: pull the CFG result's per-sample std back to the positive prediction's, blended by
    ``guidance_rescale`` (0 leaves it as it is). Counters the over-exposure large CFG scales cause."""
    if guidance_rescale == 0:
        return guided
    dims = list(range(1, positive.ndim))
    rescaled = guided * (positive.std(dim=dims, keepdim=True) / guided.std(dim=dims, keepdim=True))
    return guidance_rescale * rescaled + (1.0 - guidance_rescale) * guided


def apply_cfg(positive: torch.Tensor, negative: torch.Tensor | None, cfg_scale: float,
              guidance_rescale: float = 0.0) -> torch.Tensor:
    """Real classifier-free guidance on velocities, then the guidance rescale; ``negative=None`` means cfg 1."""
    if negative is None:
        # The official treats a skipped negative pass as a zero prediction: positive + 0 * ... is the positive.
        negative = torch.zeros_like(positive)
    guided = negative + cfg_scale * (positive - negative)
    return rescale_guidance(guided, positive, guidance_rescale)


def _model_output(result) -> torch.Tensor:
    # Accept a tensor, the ``(sample,)`` tuple of return_dict=False, or an output object with ``.sample``.
    if isinstance(result, torch.Tensor):
        return result
    if isinstance(result, (tuple, list)):
        return result[0]
    return result.sample


def make_denoiser(
    model_fn: Callable[..., object],
    positive: Mapping[str, object],
    negative: Mapping[str, object] | None = None,
    *,
    common: Mapping[str, object] | None = None,
    cfg_scale: float = 1.0,
    guidance_rescale: float = 0.0,
    distilled_guidance: float | None = None,
    dtype: torch.dtype = torch.bfloat16,
) -> Denoiser:
    """Wrap a velocity model as ``denoise(x, sigma) -> x0`` the way the official ``fm_wrapper`` does.

    ``model_fn(hidden_states=..., timestep=..., **kwargs)`` returns the velocity (a tensor, a ``(sample,)`` tuple or
    an object with ``.sample``). ``positive`` / ``negative`` hold the per-prompt keyword arguments (text embeddings,
    masks, pooled projections); ``common`` holds those both passes share (image embeddings, section indices and clean
    latents). ``distilled_guidance`` adds the ``guidance`` input (scale * 1000) to both passes. The negative pass only
    runs when ``cfg_scale != 1``. The model sees x and the timestep in ``dtype``; x0 is formed in float32 from that
    cast x (as the official does) and returned in x's own dtype.
    """
    if cfg_scale != 1.0 and negative is None:
        raise FramePackError(f"cfg={cfg_scale} needs a negative conditioning; pass negative=... or use cfg=1.")
    common = dict(common or {})

    def denoise(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        original_dtype = x.dtype
        sigma = sigma.float().reshape(-1).expand(x.shape[0])
        hidden_states = x.to(dtype)
        timestep = model_timestep(sigma, dtype)
        shared = dict(common)
        if distilled_guidance is not None:
            shared["guidance"] = distilled_guidance_input(distilled_guidance, x.shape[0], x.device, dtype)

        def velocity(conditioning):
            # Per-prompt arguments win over shared ones, as the official lets negative_kwargs override.
            out = model_fn(hidden_states=hidden_states, timestep=timestep, **{**shared, **conditioning})
            return _model_output(out).float()

        positive_velocity = velocity(positive)
        negative_velocity = None if cfg_scale == 1.0 else velocity(negative)
        guided = apply_cfg(positive_velocity, negative_velocity, cfg_scale, guidance_rescale)
        return velocity_to_x0(hidden_states, guided, sigma).to(original_dtype)

    return denoise
