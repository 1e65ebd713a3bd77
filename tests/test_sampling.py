"""Samplers and schedules against independent oracles.

* flux_sigmas: the Flux formulas written out here in float64 from the official constants, and diffusers' own
  ``calculate_shift`` / ``FlowMatchEulerDiscreteScheduler.time_shift``.
* sample_euler: diffusers' FlowMatchEulerDiscreteScheduler stepping the same sigmas.
* sample_unipc: diffusers' UniPCMultistepScheduler (flow sigmas, flow_prediction, bh1/bh2, order 3). Its flow
  parametrisation has alpha = 1 - s, ours (the official's) alpha = 1 with sigma t. The two are the same UniPC under
  the change of variables s = t / (1 + t), x_diffusers = x / (1 + t) (equal log-SNR steps, same x0 predictions), so
  with that mapping every model call and the final prediction must coincide. Plus exactness on a constant-x0 flow
  and order-of-convergence on an ODE with a closed-form solution.
* make_denoiser: a recording fake model, the wrapper maths written out here, diffusers' ``rescale_noise_cfg``.
"""

import math

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler
from diffusers.pipelines.flux.pipeline_flux import calculate_shift
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg

from framepack_engine.errors import FramePackError
from framepack_engine.generation.sampling import (
    apply_cfg,
    distilled_guidance_input,
    draw_noise,
    flux_mu,
    flux_sequence_length,
    flux_sigmas,
    make_denoiser,
    model_timestep,
    rescale_guidance,
    sample,
    sample_euler,
    sample_unipc,
    velocity_to_x0,
)
from tests.utils import TOLERANCE, assert_relative_error, relative_error

F32 = TOLERANCE[torch.float32]


def official_mu(seq_len):
    # calculate_flux_mu of the official app: the line through (256, 0.5) and (4096, 1.15), capped at log(7).
    k = (1.15 - 0.5) / (4096 - 256)
    return min(k * seq_len + (0.5 - k * 256), math.log(7.0))


def float64_sigmas(steps, mu):
    t = np.linspace(1.0, 0.0, steps + 1)
    with np.errstate(divide="ignore"):
        return np.exp(mu) / (np.exp(mu) + (1.0 / t - 1.0))


class SmoothDenoiser:
    """A random nonlinear x0 predictor that depends on sigma, counting its calls."""

    def __init__(self, channels=4, dtype=torch.float32):
        self.mix = (torch.randn(channels, channels, dtype=torch.float64) * 0.6).to(dtype)
        self.bias = (torch.randn(channels, dtype=torch.float64) * 0.3).to(dtype)
        self.calls = []

    def copy(self, dtype=None):
        """A fresh denoiser with the same weights (and no calls)."""
        twin = SmoothDenoiser(self.mix.shape[0])
        twin.mix, twin.bias = self.mix.to(dtype or self.mix.dtype), self.bias.to(dtype or self.bias.dtype)
        return twin

    def __call__(self, x, sigma):
        self.calls.append((x.clone(), sigma.clone()))
        mixed = torch.einsum("bcthw,cd->bdthw", x, self.mix.to(x.dtype))
        sigma = sigma.to(x.dtype).view(-1, 1, 1, 1, 1)
        return torch.tanh(mixed) * (0.6 + 0.5 * sigma) + 0.2 * x + self.bias.to(x.dtype).view(1, -1, 1, 1, 1)


# ------------------------------------------------------------------------------------------------ schedule


@pytest.mark.parametrize("seq_len", [16, 256, 1000, 4096, 6000, 14400, 10**6])
def test_flux_mu_matches_official_formula_and_diffusers(seq_len):
    assert flux_mu(seq_len) == pytest.approx(official_mu(seq_len), abs=1e-12)
    assert flux_mu(seq_len) == pytest.approx(min(calculate_shift(seq_len), math.log(7.0)), abs=1e-12)


def test_flux_mu_known_points():
    assert flux_mu(256) == pytest.approx(0.5, abs=1e-12)
    assert flux_mu(4096) == pytest.approx(1.15, abs=1e-12)
    # A 640x640 section (80x80 latents, 9 frames) is far above the cap: FramePack effectively runs at shift 7.
    assert flux_mu(flux_sequence_length(9, 80, 80)) == pytest.approx(math.log(7.0), abs=1e-12)
    assert flux_sequence_length(9, 80, 80) == 9 * 80 * 80 // 4


@pytest.mark.parametrize("steps", [1, 2, 5, 25, 50])
@pytest.mark.parametrize("seq_len", [300, 4096, 14400])
def test_flux_sigmas_against_float64_formula_and_diffusers(steps, seq_len):
    sigmas = flux_sigmas(steps, seq_len)
    assert sigmas.dtype == torch.float32 and sigmas.shape == (steps + 1,)
    # The official's float32 arithmetic lands the first sigma within one rounding of 1 (0.99999994 for some mu).
    assert abs(sigmas[0].item() - 1.0) <= 2 ** -23 and sigmas[-1].item() == 0.0
    assert bool((sigmas[1:] < sigmas[:-1]).all()), "sigmas must fall strictly"
    expected = float64_sigmas(steps, official_mu(seq_len))
    np.testing.assert_allclose(sigmas.double().numpy(), expected, rtol=1e-6, atol=1e-7)
    # diffusers' exponential time shift on the same grid (minus the t = 0 end, which it cannot divide by).
    scheduler = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, time_shift_type="exponential")
    grid = np.linspace(1.0, 0.0, steps + 1)[:-1]
    np.testing.assert_allclose(sigmas[:-1].double().numpy(), scheduler.time_shift(official_mu(seq_len), 1.0, grid),
                               rtol=1e-6)


def test_flux_sigmas_shift_override():
    # mu = log(shift): at t = 1/2 the shifted sigma is shift / (shift + 1), whatever the sequence length.
    for seq_len in (10, 14400):
        np.testing.assert_allclose(flux_sigmas(2, seq_len, shift=3.0).numpy(), [1.0, 0.75, 0.0], rtol=1e-7)
    np.testing.assert_allclose(flux_sigmas(25, 0, shift=7.0).numpy(), flux_sigmas(25, 14400).numpy(), rtol=1e-6)
    np.testing.assert_allclose(flux_sigmas(10, 0, shift=1.0).numpy(), np.linspace(1, 0, 11), atol=1e-7)
    # The override must matter: shift 3 and the length-derived mu give clearly different schedules.
    assert (flux_sigmas(10, 300, shift=3.0) - flux_sigmas(10, 300)).abs().max() > 0.05


@pytest.mark.parametrize("bad", [dict(steps=0, seq_len=10), dict(steps=2.5, seq_len=10),
                                 dict(steps=4, seq_len=10, shift=0.0), dict(steps=4, seq_len=10, shift=-2.0)])
def test_flux_sigmas_bad_input(bad):
    with pytest.raises(FramePackError):
        flux_sigmas(**bad)


def test_draw_noise():
    drawn = draw_noise(torch.Generator("cpu").manual_seed(31337), 1, 16, 9, 6, 8)
    expected = torch.randn((1, 16, 9, 6, 8), generator=torch.Generator("cpu").manual_seed(31337))
    assert drawn.dtype == torch.float32 and torch.equal(drawn, expected)


# ------------------------------------------------------------------------------------------------ Euler


@pytest.mark.parametrize("steps", [1, 4, 13])
def test_euler_matches_diffusers_flow_match_euler(steps):
    denoise = SmoothDenoiser()
    noise = torch.randn(2, 4, 3, 5, 6)
    sigmas = flux_sigmas(steps, 2000)
    ours = sample_euler(denoise, noise, sigmas)

    scheduler = FlowMatchEulerDiscreteScheduler(shift=1.0)
    scheduler.set_timesteps(sigmas=sigmas[:-1].tolist())  # it appends the terminal zero itself
    assert torch.equal(scheduler.sigmas, sigmas)
    oracle = denoise.copy()
    x = noise.clone()
    for i, timestep in enumerate(scheduler.timesteps):
        sigma = scheduler.sigmas[i]
        velocity = (x - oracle(x, sigma.expand(x.shape[0]))) / sigma
        x = scheduler.step(velocity, timestep, x).prev_sample
    assert len(denoise.calls) == steps
    assert_relative_error(ours, x, F32, "euler vs diffusers")
    # Negative control: one input element moved changes the result far beyond the tolerance.
    moved = noise.clone()
    moved[0, 0, 0, 0, 0] += 0.5
    assert relative_error(sample_euler(denoise.copy(), moved, sigmas), x) > 100 * F32


# ------------------------------------------------------------------------------------------------ UniPC


def diffusers_unipc_reference(denoise, noise, sigmas, variant):
    """Run diffusers' UniPC on the mapped problem; return the (x, sigma) of every model call, the corrected latent
    after every step (mapped back) and the final x0."""
    t = sigmas.double()
    steps = t.numel() - 1
    s = t[:-1] / (1 + t[:-1])
    scheduler = UniPCMultistepScheduler(use_flow_sigmas=True, prediction_type="flow_prediction", solver_type=variant,
                                        solver_order=3, lower_order_final=False, final_sigmas_type="zero")
    scheduler.set_timesteps(sigmas=np.array(s.tolist()))
    scheduler.sigmas = torch.cat([s, torch.zeros(1, dtype=torch.float64)])  # keep the mapping in float64
    scheduler.set_begin_index(0)
    x = noise.double() / (1 + t[0])
    calls, corrected = [], []
    for k in range(steps):
        s_k = scheduler.sigmas[k]
        t_k = s_k / (1 - s_k)
        calls.append((x / (1 - s_k), t_k))
        x0 = denoise(x / (1 - s_k), t_k.expand(x.shape[0]))
        velocity = (x - x0) / s_k
        if k < steps - 1:
            x_next = scheduler.step(velocity, scheduler.timesteps[k], x).prev_sample
            corrected.append(scheduler.last_sample / (1 - s_k))  # step() corrects x at s_k, then predicts
            x = x_next
        else:
            # The official stops here (it never steps to sigma 0): apply only the last UniC correction.
            if k > 0:
                x = scheduler.multistep_uni_c_bh_update(
                    this_model_output=scheduler.convert_model_output(velocity, sample=x),
                    last_sample=scheduler.last_sample, this_sample=x, order=scheduler.this_order)
            corrected.append(x / (1 - s_k))
    return calls, corrected, x0


@pytest.mark.parametrize("variant", ["bh1", "bh2"])
@pytest.mark.parametrize("steps", [1, 2, 3, 4, 7, 12])
def test_unipc_matches_diffusers_unipc(variant, steps):
    torch.manual_seed(steps)
    denoise = SmoothDenoiser(dtype=torch.float64)
    noise = torch.randn(2, 4, 3, 4, 5, dtype=torch.float64)
    sigmas = flux_sigmas(steps, 3000).double()
    seen = []
    ours = sample_unipc(denoise, noise, sigmas, variant=variant, callback=lambda d: seen.append(d["x"].clone()))
    our_calls = list(denoise.calls)
    calls, corrected, final = diffusers_unipc_reference(denoise.copy(), noise, sigmas, variant)

    assert len(our_calls) == len(calls) == steps
    for (x, sigma), (x_ref, sigma_ref) in zip(our_calls, calls):
        assert sigma[0].item() == pytest.approx(sigma_ref.item(), rel=1e-12)
        assert_relative_error(x, x_ref, 1e-10, "model input")
    for x, x_ref in zip(seen, corrected):
        assert_relative_error(x, x_ref, 1e-10, "corrected latent")
    assert_relative_error(ours, final, 1e-10, "final x0")
    if steps >= 3:
        # Negative control: the other B(h) is a different solver (with two steps only the corrected latent,
        # which the result never sees, differs).
        other = "bh2" if variant == "bh1" else "bh1"
        assert relative_error(sample_unipc(denoise.copy(), noise, sigmas, variant=other), final) > 1e-8


@pytest.mark.parametrize("variant", ["bh1", "bh2"])
def test_unipc_float32_matches_diffusers_and_variants_differ(variant):
    denoise = SmoothDenoiser()
    noise = torch.randn(1, 4, 3, 6, 6)
    sigmas = flux_sigmas(25, 14400)
    ours = sample_unipc(denoise, noise, sigmas, variant=variant)
    _, _, final = diffusers_unipc_reference(denoise.copy(torch.float64), noise, sigmas, variant)
    assert_relative_error(ours, final, F32, "float32 UniPC vs float64 diffusers")
    # Negative control: one noise element moved changes the result far beyond the tolerance.
    moved = noise.clone()
    moved[0, 1, 1, 2, 2] += 0.5
    assert relative_error(sample_unipc(denoise.copy(), moved, sigmas, variant=variant), final) > 100 * F32


def test_unipc_exact_when_x0_is_constant():
    # Every order is exact when the model always predicts the same x0: x(sigma) = x0 + sigma * (noise - x0).
    x0 = torch.randn(1, 4, 2, 3, 3, dtype=torch.float64)
    noise = torch.randn_like(x0)
    sigmas = flux_sigmas(9, 3000).double()
    for variant in ("bh1", "bh2"):
        seen = []
        out = sample_unipc(lambda x, sigma: x0, noise, sigmas, variant=variant, callback=seen.append)
        assert_relative_error(out, x0, 1e-12)
        for d in seen:
            assert_relative_error(d["x"], x0 + d["sigma"] * (noise - x0), 1e-12, f"x at step {d['i']}")
    euler = sample_euler(lambda x, sigma: x0, noise, sigmas)
    assert_relative_error(euler, x0, 1e-12)


def convergence_errors(sampler, counts):
    # dx/dsigma = (x - c x) / sigma  =>  x(sigma) = x(1) * sigma^(1 - c): a closed form to measure error against.
    c = torch.rand(1, 3, 1, 2, 2, dtype=torch.float64) - 0.5
    noise = torch.randn(1, 3, 1, 2, 2, dtype=torch.float64)
    end = 0.05
    errors = []
    for n in counts:
        sigmas = torch.cat([torch.from_numpy(np.geomspace(1.0, end, n)), torch.zeros(1, dtype=torch.float64)])
        if sampler == "euler":
            out = sample_euler(lambda x, s: c * x, noise, sigmas[:-1])
            exact = noise * end ** (1 - c)
        else:
            out = sample_unipc(lambda x, s: c * x, noise, sigmas, variant=sampler)
            exact = c * noise * end ** (1 - c)
        errors.append(relative_error(out, exact))
    return errors


@pytest.mark.parametrize("sampler,expected_order", [("euler", 1), ("bh1", 3), ("bh2", 3)])
def test_order_of_convergence(sampler, expected_order):
    counts = [9, 17, 33, 65]  # steps double (n - 1 intervals in lambda)
    errors = convergence_errors(sampler, counts)
    observed = [math.log2(a / b) for a, b in zip(errors, errors[1:])]
    assert all(o > expected_order - 0.4 for o in observed[1:]), (errors, observed)
    assert errors[-1] < errors[0]


def test_callbacks_and_cancellation():
    sigmas = flux_sigmas(6, 500)
    noise = torch.randn(1, 4, 2, 3, 3)
    for sampler in (sample_unipc, sample_euler):
        denoise = SmoothDenoiser()
        seen = []
        sampler(denoise, noise, sigmas, callback=seen.append)
        assert [d["i"] for d in seen] == [d["step"] for d in seen] == list(range(6))
        assert all(d["total_steps"] == 6 for d in seen)
        assert [d["sigma"].item() for d in seen] == sigmas[:-1].tolist()
        assert len(denoise.calls) == 6
        for d, (_, sigma) in zip(seen, denoise.calls):
            assert d["denoised"].shape == noise.shape and sigma.shape == (1,)

        class Cancelled(Exception):
            pass

        def cancel_at_two(d):
            if d["i"] == 2:
                raise Cancelled

        denoise = SmoothDenoiser()
        with pytest.raises(Cancelled):
            sampler(denoise, noise, sigmas, callback=cancel_at_two)
        assert len(denoise.calls) == 3, "no model call may follow a cancelling callback"


def test_sampler_bad_input():
    noise = torch.randn(1, 4, 1, 2, 2)
    with pytest.raises(FramePackError):
        sample_unipc(SmoothDenoiser(), noise, flux_sigmas(4, 100), variant="bh3")
    for bad in (torch.tensor([1.0]), torch.tensor([1.0, 0.5, 0.7, 0.0]), torch.tensor([1.0, 0.0, 0.0]),
                torch.tensor([[1.0, 0.0]])):
        with pytest.raises(FramePackError):
            sample_unipc(SmoothDenoiser(), noise, bad)
        with pytest.raises(FramePackError):
            sample_euler(SmoothDenoiser(), noise, bad)


# ------------------------------------------------------------------------------------------------ denoiser


class RecordingModel:
    """A fake DiT: velocity depends on the latent, the timestep and the text embedding; records every call."""

    def __init__(self, wrap=None):
        self.calls = []
        self.wrap = wrap

    def __call__(self, hidden_states, timestep, encoder_hidden_states, guidance=None, **kwargs):
        self.calls.append(dict(hidden_states=hidden_states, timestep=timestep, guidance=guidance,
                               encoder_hidden_states=encoder_hidden_states, **kwargs))
        text = encoder_hidden_states.float().mean(dim=(1, 2)).view(-1, 1, 1, 1, 1)
        velocity = (torch.sin(hidden_states.float() * 1.3) + text * hidden_states.float()
                    + timestep.float().view(-1, 1, 1, 1, 1) / 1000.0).to(hidden_states.dtype)
        if self.wrap == "tuple":
            return (velocity,)
        if self.wrap == "object":
            return type("Output", (), {"sample": velocity})()
        return velocity


def reference_x0(x, sigma, positive_text, negative_text, cfg, rescale, dtype):
    """The official fm_wrapper maths written out: model inputs cast to dtype, CFG, rescale, x0 in float32."""
    hidden = x.to(dtype)
    timestep = (sigma.float() * 1000.0).to(dtype)

    def velocity(text):
        t = text.float().mean(dim=(1, 2)).view(-1, 1, 1, 1, 1)
        return (torch.sin(hidden.float() * 1.3) + t * hidden.float()
                + timestep.float().view(-1, 1, 1, 1, 1) / 1000.0).to(dtype).float()

    positive = velocity(positive_text)
    negative = velocity(negative_text) if cfg != 1.0 else torch.zeros_like(positive)
    guided = negative + cfg * (positive - negative)
    if rescale != 0:
        guided = rescale_noise_cfg(guided, positive, guidance_rescale=rescale)
    return (hidden.float() - guided * sigma.float().view(-1, 1, 1, 1, 1)).to(x.dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("cfg,rescale", [(1.0, 0.0), (1.0, 0.7), (4.0, 0.0), (4.0, 0.7)])
@pytest.mark.parametrize("wrap", [None, "tuple", "object"])
def test_make_denoiser_matches_official_wrapper(dtype, cfg, rescale, wrap):
    x = torch.randn(2, 4, 3, 4, 4)
    sigma = torch.tensor([0.8, 0.8])
    positive_text, negative_text = torch.randn(2, 5, 8), torch.randn(2, 5, 8)
    image = torch.randn(2, 3, 8)
    model = RecordingModel(wrap)
    denoise = make_denoiser(model, {"encoder_hidden_states": positive_text}, {"encoder_hidden_states": negative_text},
                            common={"image_embeddings": image}, cfg_scale=cfg, guidance_rescale=rescale,
                            distilled_guidance=10.0, dtype=dtype)
    out = denoise(x, sigma)
    assert out.dtype == torch.float32
    assert len(model.calls) == (1 if cfg == 1.0 else 2), "the negative pass runs only when cfg != 1"
    for call in model.calls:
        assert call["hidden_states"].dtype == dtype and call["timestep"].dtype == dtype
        assert torch.equal(call["timestep"], (sigma * 1000.0).to(dtype))
        assert torch.equal(call["guidance"], torch.full((2,), 10000.0).to(dtype))
        assert call["image_embeddings"] is image
    expected = reference_x0(x, sigma, positive_text, negative_text, cfg, rescale, dtype)
    assert_relative_error(out, expected, F32)
    # Negative control: a different negative prompt must change a cfg > 1 result beyond the tolerance.
    if cfg != 1.0:
        other = reference_x0(x, sigma, positive_text, negative_text + 0.5, cfg, rescale, dtype)
        assert relative_error(out, other) > 100 * F32


def test_denoiser_helpers():
    x, v = torch.randn(2, 4, 1, 2, 2), torch.randn(2, 4, 1, 2, 2)
    sigma = torch.tensor([0.3, 0.9])
    assert_relative_error(velocity_to_x0(x, v, sigma), x - v * sigma.view(2, 1, 1, 1, 1), F32)
    assert_relative_error(velocity_to_x0(x, v, torch.tensor(0.5)), x - 0.5 * v, F32)
    assert torch.equal(model_timestep(sigma, torch.bfloat16), (sigma * 1000).to(torch.bfloat16))
    assert torch.equal(distilled_guidance_input(6.0, 3, "cpu", torch.float32), torch.full((3,), 6000.0))
    positive, negative = torch.randn(2, 4, 3, 2, 2), torch.randn(2, 4, 3, 2, 2)
    guided = negative + 5.0 * (positive - negative)
    assert_relative_error(rescale_guidance(guided, positive, 0.7), rescale_noise_cfg(guided, positive, 0.7), F32)
    assert rescale_guidance(guided, positive, 0.0) is guided
    assert_relative_error(apply_cfg(positive, negative, 5.0, 0.7), rescale_noise_cfg(guided, positive, 0.7), F32)
    assert torch.equal(apply_cfg(positive, None, 1.0), positive)
    with pytest.raises(FramePackError):
        make_denoiser(RecordingModel(), {"encoder_hidden_states": positive}, None, cfg_scale=3.0)


def test_denoiser_drives_sampler_end_to_end():
    model = RecordingModel()
    denoise = make_denoiser(model, {"encoder_hidden_states": torch.randn(1, 5, 8)}, distilled_guidance=10.0,
                            dtype=torch.bfloat16)
    noise = torch.randn(1, 4, 3, 4, 4)
    out = sample_unipc(denoise, noise, flux_sigmas(5, flux_sequence_length(3, 4, 4)))
    assert out.shape == noise.shape and out.dtype == torch.float32 and torch.isfinite(out).all()
    assert [c["timestep"].shape for c in model.calls] == [(1,)] * 5


def test_sample_by_name():
    noise = torch.randn(1, 4, 2, 3, 3)
    sigmas = flux_sigmas(5, 500)
    base = SmoothDenoiser()
    for name, expected in (("unipc", sample_unipc(base.copy(), noise, sigmas, "bh1")),
                           ("unipc_bh2", sample_unipc(base.copy(), noise, sigmas, "bh2")),
                           ("euler", sample_euler(base.copy(), noise, sigmas))):
        assert torch.equal(sample(name, base.copy(), noise, sigmas), expected)
    with pytest.raises(FramePackError):
        sample("dpm++", base.copy(), noise, sigmas)
