"""Step caching: TeaCache decides as the official app does, MagCache's mechanics and calibration, what a skipped step
costs (no block runs), separate state per section, branch and generation, and the quality measurement.

Most tests run the engine's section loop (framepack_engine.generation.runner.run_sections) on a small random DiT without the VAE; a few
go through Engine and the command on the tiny preset. Random weights make the numbers meaningless as quality; the
tests check the mechanics and that the measurements work.
"""

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from framepack_engine import Engine, FramePackError
from framepack_engine.commands.bench import BenchSettings, run_benchmark
from framepack_engine.generation import calibration as calibration_module
from framepack_engine.generation.calibration import (CalibrationRecorder, MagCacheCalibration, PublishedRatios,
                                                     nearest_interpolation, published_ratios)
from framepack_engine.commands.calibrate_cache import calibrate
from framepack_engine.commands.main import main
from framepack_engine.models.conditioning import PromptEmbedding
from framepack_engine.models.presets import TINY_DIT_CONFIG, tiny_dit
from framepack_engine.generation.runner import SamplingOptions, SectionInputs, run_sections
from framepack_engine.generation.sections import initial_history, plan_sections
from framepack_engine.settings import GenerationSettings
from framepack_engine.generation.step_cache import MagCache, StepCaches, TeaCache, rescaled_distance
from framepack_engine.resolve import resolve_request

pytestmark = pytest.mark.usefixtures("one_thread")

# Written out again from the official app (diffusers_helper/models/hunyuan_video_packed.py), highest power first.
OFFICIAL_COEFFICIENTS = [7.33226126e+02, -4.01131952e+02, 6.75869174e+01, -3.14987800e+00, 9.61237896e-02]
ENGINE_FAST = dict(steps=6, latent_window_size=2, fps=8, seconds=1)  # one section


# The rules, written again independently -------------------------------------------------------------------------------


def official_teacache_skips(signals, threshold):
    """The official FramePack app's TeaCache over one section's modulated inputs: the steps it skips."""
    count, skipped, accumulated, previous = len(signals), [], 0.0, None
    for step, signal in enumerate(signals):
        signal = np.asarray(signal, dtype=np.float64)
        if step == 0 or step == count - 1:
            calculate, accumulated = True, 0.0
        else:
            distance = np.abs(signal - previous).mean() / np.abs(previous).mean()
            accumulated += np.polyval(OFFICIAL_COEFFICIENTS, distance)
            calculate = accumulated >= threshold
            if calculate:
                accumulated = 0.0
        previous = signal
        if not calculate:
            skipped.append(step)
    return skipped


# Written out again from the MagCache authors' FramePack demos (MagCache4FramePack/magcache_demo_gradio.py and
# magcache_demo_gradio_f1.py in Zehong-Ma/MagCache, `initialize_magcache`), step 0 first.
AUTHORS_RATIOS = {
    "bidirectional": [1.0, 1.26562, 1.23438, 1.03125, 1.02344, 1.03906, 1.01562, 1.03906, 1.05469, 1.02344, 1.03906,
                      0.99609, 1.03125, 1.02344, 1.01562, 1.02344, 1.00781, 1.04688, 0.98828, 1.0, 1.00781, 0.98828,
                      0.94141, 0.94141, 0.78906],
    "f1": [1.0, 1.25781, 1.08594, 1.02344, 1.00781, 1.02344, 1.00781, 1.02344, 1.05469, 0.99609, 1.03906, 1.00781,
           1.01562, 1.00781, 1.02344, 1.01562, 0.98047, 1.05469, 0.98047, 0.96875, 1.03125, 0.97266, 0.9375, 0.96484,
           0.78516],
}


def authors_magcache_skips(ratios, threshold, k, retention):
    """The authors' rule over one section: from step max(1, int(retention * steps)) on, the ratio is multiplied in
    and |1 - product| summed; the step is skipped while that sum is <= threshold, the run is <= K long and the
    step's own ratio is within 0.06 of 1, else computed (and the sums start again). Nothing forces the last step."""
    ratios = np.asarray(ratios, dtype=np.float64)
    product, error, run, skipped = 1.0, 0.0, 0, []
    for step in range(len(ratios)):
        if step < 1 or step < int(retention * len(ratios)):
            continue
        product *= ratios[step]
        error += np.abs(1 - product)
        run += 1
        if error <= threshold and run <= k and np.abs(1 - ratios[step]) <= 0.06:
            skipped.append(step)
        else:
            product, error, run = 1.0, 0.0, 0
    return skipped


def authors_nearest_interp(ratios, steps):
    """The authors' nearest interpolation to another step count (numpy's round: halves to even)."""
    ratios = np.asarray(ratios, dtype=np.float64)
    if steps == 1:
        return ratios[-1:]
    return ratios[np.round(np.arange(steps) * ((len(ratios) - 1) / (steps - 1))).astype(int)]


def longest_run(steps):
    longest = run = 0
    for index, step in enumerate(steps):
        run = run + 1 if index and steps[index - 1] == step - 1 else 1
        longest = max(longest, run)
    return longest


# Fixtures and helpers -------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def dit():
    config = {**TINY_DIT_CONFIG, "num_layers": 2, "num_single_layers": 2}
    return tiny_dit(torch.Generator().manual_seed(0), config)


@pytest.fixture
def block_calls(dit):
    """Every call of a transformer block, in order (forward hooks)."""
    calls = []
    handles = [block.register_forward_hook(lambda module, args, output: calls.append(module)) for block in dit.blocks]
    yield calls
    for handle in handles:
        handle.remove()


def section_inputs(dit, sections, seed=0):
    config = dit.config
    generator = torch.Generator().manual_seed(seed)

    def prompt(tokens):
        return PromptEmbedding(torch.randn(1, tokens, config.text_embed_dim, generator=generator),
                               torch.randn(1, config.pooled_projection_dim, generator=generator))

    return SectionInputs([prompt(7)] * sections, prompt(5),
                         torch.randn(1, 6, config.image_proj_dim, generator=generator),
                         torch.randn(1, config.in_channels, 1, 8, 8, generator=generator))


def sample(dit, make_step_cache=None, steps=8, sections=2, cfg=1.0, variant="bidirectional"):
    """The engine's section loop without the VAE; returns the latents of the whole video."""
    inputs = section_inputs(dit, sections)
    plan = plan_sections(variant, sections, 2)
    options = SamplingOptions(steps=steps, latent_window_size=2, cfg=cfg)
    outputs = list(run_sections(dit, plan, inputs, options, torch.Generator().manual_seed(1),
                                initial_history(variant, inputs.start_latent), device="cpu", dtype=torch.float32,
                                make_step_cache=make_step_cache))
    return outputs[-1].latents


class Kept(StepCaches):
    """StepCaches that also keeps every policy it made, with its section and branch."""

    def __init__(self, make_policy):
        super().__init__(make_policy)
        self.made = []

    def __call__(self, section, branch):
        policy = super().__call__(section, branch)
        self.made.append((section.index, branch, policy))
        return policy


class WatchedTeaCache(TeaCache):
    """TeaCache that also records, per call, the modulated input (copied) and how many blocks ran."""

    def __init__(self, steps, threshold, block_calls):
        super().__init__(steps, threshold)
        self.block_calls, self.signals, self.blocks_run = block_calls, [], []

    def run_blocks(self, dit, tokens):
        self.signals.append(dit.first_block_modulated_input(tokens).clone())
        before = len(self.block_calls)
        image = super().run_blocks(dit, tokens)
        self.blocks_run.append(len(self.block_calls) - before)
        return image


def replay_teacache(signals, threshold):
    """A TeaCache fed recorded modulated inputs through a stand-in model; returns the steps it skipped."""
    stand_in = SimpleNamespace(first_block_modulated_input=lambda tokens: tokens.signal,
                               run_blocks=lambda tokens: tokens.image + 1)
    policy = TeaCache(len(signals), threshold)
    for signal in signals:
        policy.run_blocks(stand_in, SimpleNamespace(image=torch.zeros(2), signal=signal))
    return policy.skipped_steps


def run_magcache(ratios, threshold, k, retention):
    stand_in = SimpleNamespace(run_blocks=lambda tokens: tokens.image + 1)
    policy = MagCache(len(ratios), ratios, threshold, k, retention)
    for _ in ratios:
        policy.run_blocks(stand_in, SimpleNamespace(image=torch.zeros(2)))
    return policy.skipped_steps


# TeaCache -------------------------------------------------------------------------------------------------------------


def test_teacache_rescales_with_hunyuan_videos_polynomial():
    distances = np.array([0.0, 0.01, 0.0314, 0.08, 0.15, 0.25, 0.4, 1.0, 3.0])
    expected = np.polyval(OFFICIAL_COEFFICIENTS, distances)
    np.testing.assert_allclose([rescaled_distance(d) for d in distances], expected, rtol=1e-12)
    assert min(expected) > 0  # so a threshold of 0 never skips


def test_teacache_replays_recorded_inputs_exactly_as_the_official_rule(dit, block_calls):
    """Modulated inputs recorded from real sections, replayed at many thresholds: the same skipped steps."""
    caches = Kept(lambda branch: WatchedTeaCache(12, 0.0, block_calls))
    sample(dit, caches, steps=12, sections=3)
    recorded = [policy.signals for _, _, policy in caches.made]
    assert len(recorded) == 3 and all(len(signals) == 12 for signals in recorded)
    patterns = set()
    for signals in recorded:
        for threshold in [*np.linspace(0.0, 2.0, 41), 1e9]:
            expected = official_teacache_skips([signal.numpy() for signal in signals], threshold)
            assert replay_teacache(signals, threshold) == expected, threshold
            patterns.add(tuple(expected))
    assert len(patterns) >= 4  # the thresholds cover skipping nothing, some steps and everything allowed


def test_teacache_in_the_loop_decides_as_the_official_rule(dit, block_calls):
    """Live: each section's decisions equal the official rule over the inputs that section actually saw (which
    depend on the earlier skips), and a skipped step runs no block while a computed one runs them all."""
    for threshold in (0.15, 0.4):
        caches = Kept(lambda branch: WatchedTeaCache(10, threshold, block_calls))
        sample(dit, caches, steps=10, sections=2)
        skipped_any = False
        for _, _, policy in caches.made:
            assert policy.skipped_steps == official_teacache_skips([s.numpy() for s in policy.signals], threshold)
            assert policy.blocks_run == [0 if step in policy.skipped_steps else len(dit.blocks) for step in range(10)]
            skipped_any |= bool(policy.skipped_steps)
        assert skipped_any, f"threshold {threshold} skipped nothing: the test would not test skipping"


def test_threshold_zero_is_bit_identical_to_no_cache(dit):
    reference = sample(dit, None)
    caches = Kept(lambda branch: TeaCache(8, 0.0))
    assert torch.equal(sample(dit, caches), reference)
    assert all(policy.skipped == 0 and policy.computed == 8 for _, _, policy in caches.made)


def test_huge_threshold_computes_only_the_first_and_last_step(dit, block_calls):
    caches = Kept(lambda branch: TeaCache(9, 1e9))
    sample(dit, caches, steps=9, sections=3)
    assert len(caches.made) == 3
    for _, _, policy in caches.made:
        assert policy.computed == 2 and policy.skipped_steps == list(range(1, 8))
    # 3 sections x 2 computed steps x every block, nothing more.
    assert len(block_calls) == 3 * 2 * len(dit.blocks)


def test_cfg_keeps_the_two_branches_apart(dit, block_calls):
    caches = Kept(lambda branch: WatchedTeaCache(8, 0.3, block_calls))
    sample(dit, caches, steps=8, sections=2, cfg=3.0)
    made = [(section, branch) for section, branch, _ in caches.made]
    assert made == [(0, "positive"), (0, "negative"), (1, "positive"), (1, "negative")]
    policies = [policy for _, _, policy in caches.made]
    assert len({id(policy) for policy in policies}) == 4
    for policy in policies:
        # Each branch saw exactly its own 8 calls and decided on its own inputs only.
        assert policy.step == 8
        assert policy.skipped_steps == official_teacache_skips([s.numpy() for s in policy.signals], 0.3)
    positive, negative = policies[:2]
    assert not torch.equal(positive.signals[3], negative.signals[3])  # different prompts, different inputs
    assert any(policy.skipped for policy in policies)


class HostReads(TorchDispatchMode):
    """Counts the tensor -> host scalar reads (each one waits for the device) made while active."""

    def __init__(self, reads):
        super().__init__()
        self.reads = reads

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            self.reads.append(func)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("cache", ["teacache", "magcache"])
def test_a_decision_costs_at_most_one_host_read(dit, cache):
    reads = []

    def counted(policy):
        decide = policy.should_skip

        def should_skip(dit, tokens):
            with HostReads(reads):
                return decide(dit, tokens)

        policy.should_skip = should_skip
        return policy

    make = (lambda branch: counted(TeaCache(8, 0.3))) if cache == "teacache" else (
        lambda branch: counted(MagCache(8, [1.0] * 8, 1.0, 2, 0.2)))
    sample(dit, Kept(make), steps=8, sections=2)
    # TeaCache reads its distance once on each step between the first and the last; MagCache never reads.
    assert len(reads) == (2 * 6 if cache == "teacache" else 0)


# MagCache -------------------------------------------------------------------------------------------------------------


def test_magcache_skips_at_most_k_in_a_row_after_the_retained_steps():
    # Ratios of exactly 1: no drift, so only K and the retention limit skipping; the last step is not forced (the
    # authors compute it only when the rule says so).
    skipped = run_magcache([1.0] * 12, threshold=0.1, k=2, retention=0.25)  # 3 retained steps
    assert skipped == [3, 4, 6, 7, 9, 10]
    assert longest_run(skipped) == 2 and 11 not in skipped  # 11 would be the third in a row
    assert run_magcache([1.0] * 10, threshold=0.1, k=2, retention=0.3) == [3, 4, 6, 7, 9]  # 9 is the last step
    assert run_magcache([1.0] * 12, 0.1, k=0, retention=0.25) == []
    assert run_magcache([1.0] * 12, 0.1, k=100, retention=0.0) == list(range(1, 12))  # step 0 is always computed
    assert run_magcache([1.0] * 12, 0.1, k=100, retention=0.5) == list(range(6, 12))


def test_magcache_threshold_bounds_the_accumulated_drift():
    # Ratio 1.05 each step: drift |1 - 1.05| = 0.05, then |1 - 1.1025| (sum 0.1525), then |1 - 1.157625| (0.310125).
    assert run_magcache([1.05] * 10, threshold=0.16, k=5, retention=0.0) == [1, 2, 4, 5, 7, 8]
    assert run_magcache([1.05] * 10, threshold=0.1, k=5, retention=0.0) == [1, 3, 5, 7, 9]
    assert run_magcache([1.05] * 10, threshold=0.04, k=5, retention=0.0) == []
    # Shrinking residuals drift as much as growing ones.
    assert run_magcache([0.95] * 10, threshold=0.16, k=5, retention=0.0) == [1, 2, 4, 5, 7, 8]


def test_magcache_computes_a_step_whose_own_ratio_is_past_0_06():
    """However large the threshold, a step whose ratio is more than 0.06 from 1 is computed, and starts a new run."""
    assert run_magcache([1.1] * 10, threshold=1e9, k=100, retention=0.0) == []
    ratios = [1.0, 1.0, 1.059, 1.0, 1.061, 1.0, 0.941, 1.0, 0.939, 1.0]
    assert run_magcache(ratios, threshold=1e9, k=100, retention=0.0) == [1, 2, 3, 5, 6, 7, 9]
    # With a threshold the drift bounds the runs too (0.059 twice is 0.118); each computed step starts a new sum.
    assert run_magcache(ratios, threshold=0.06, k=100, retention=0.0) == [1, 2, 5, 6, 9]
    assert run_magcache(ratios, threshold=0.05, k=100, retention=0.0) == [1, 3, 5, 7, 9]


THRESHOLDS_AND_K = [(threshold, k) for threshold in (0.1, 0.15, 0.2, 0.25) for k in (1, 2, 3)]


@pytest.mark.parametrize("variant", ["bidirectional", "f1"])
@pytest.mark.parametrize("steps", [25, 10, 30, 50])
def test_magcache_decides_as_the_authors_on_their_published_ratios(variant, steps):
    """The shipped ratios, fitted to the step count as the authors do, give their rule's skips over a grid of
    thresholds, K and retentions; so do the same lists with one ratio just inside or just past 0.06."""
    ratios = published_ratios(variant).ratios_for("positive", steps)
    np.testing.assert_array_equal(ratios, authors_nearest_interp(AUTHORS_RATIOS[variant], steps))
    edited = []
    for value in (1.059, 1.061, 0.941, 0.939):
        for step in range(steps // 3, steps, 4):
            edited.append([*ratios[:step], value, *ratios[step + 1:]])
    patterns = set()
    for series in [ratios, *edited]:
        for threshold, k in THRESHOLDS_AND_K:
            for retention in (0.2, 0.0, 0.5):
                expected = authors_magcache_skips(series, threshold, k, retention)
                assert run_magcache(series, threshold, k, retention) == expected, (threshold, k, retention)
                patterns.add(tuple(expected))
    assert len(patterns) > 20  # the grid covers many different decisions


def test_shipped_ratios_are_the_authors_with_their_source():
    data = json.loads((Path(calibration_module.__file__).parent / "magcache_ratios.json").read_text())
    assert data["source"]["repository"] == "https://github.com/Zehong-Ma/MagCache"
    assert len(data["source"]["commit"]) == 40 and data["steps"] == 25
    for variant, ratios in AUTHORS_RATIOS.items():
        assert data["variants"][variant]["ratios"] == ratios
        assert data["variants"][variant]["file"].startswith("MagCache4FramePack/magcache_demo_gradio")
        published = published_ratios(variant)
        assert isinstance(published, PublishedRatios) and published.ratios_for("negative", 25) == ratios
        assert published.describe(25).startswith(f"published:{variant} (Zehong-Ma/MagCache@")
        assert "nearest-interpolated from 25 to 8 steps" in published.describe(8)
    with pytest.raises(FramePackError, match="No published MagCache ratios"):
        published_ratios("hunyuan")


def test_nearest_interpolation_as_the_authors():
    values = [float(value) for value in range(25)]
    for steps in (1, 2, 3, 4, 7, 13, 24, 25, 26, 49, 50, 100):
        assert nearest_interpolation(values, steps) == authors_nearest_interp(values, steps).tolist(), steps
    # Halves round to even as numpy's do: 5 values to 9 steps maps 0.5 -> 0, 1.5 -> 2, 2.5 -> 2, 3.5 -> 4.
    assert nearest_interpolation([0, 1, 2, 3, 4], 9) == [0, 0, 1, 2, 2, 2, 3, 4, 4]


@pytest.mark.parametrize("variant", ["bidirectional", "f1"])
def test_magcache_defaults_on_the_published_ratios_skip_13_of_25_steps(variant):
    """The authors' defaults (threshold 0.1, K 3, retention 0.2) at 25 steps: 13 skipped, 12 computed (about 2.1x
    fewer block passes; their README reports 9 min -> 4 min 20 s for both models)."""
    skipped = run_magcache(published_ratios(variant).ratios_for("positive", 25), 0.1, 3, 0.2)
    assert skipped == authors_magcache_skips(AUTHORS_RATIOS[variant], 0.1, 3, 0.2)
    assert len(skipped) == 13 and skipped[0] == 5 and 24 not in skipped


def test_magcache_skipped_steps_run_no_block(dit, block_calls):
    caches = Kept(lambda branch: MagCache(10, [1.0] * 10, threshold=1.0, k=3, retention=0.2))
    sample(dit, caches, steps=10, sections=2)
    for _, _, policy in caches.made:
        assert policy.skipped_steps == [2, 3, 4, 6, 7, 8]
    assert len(block_calls) == 2 * 4 * len(dit.blocks)


def test_magcache_needs_one_ratio_per_step():
    with pytest.raises(FramePackError, match="calibrate for 10 steps"):
        MagCache(10, [1.0] * 8)


# Calibration ----------------------------------------------------------------------------------------------------------


def test_calibration_records_the_residual_magnitude_ratios(dit, monkeypatch):
    residuals = []
    run_blocks = dit.run_blocks

    def recording(tokens):
        image = run_blocks(tokens)
        residuals.append(image - tokens.image)
        return image

    monkeypatch.setattr(dit, "run_blocks", recording)
    recorder = CalibrationRecorder(6)
    sample(dit, recorder, steps=6, sections=3, cfg=2.0)
    for index in list(recorder.live):
        recorder.finish_section(index)
    calibration = recorder.calibration(model="test")
    assert calibration.sections == 3 and set(calibration.ratios) == {"positive", "negative"}
    # Independently: calls alternate positive, negative; per section and branch, the mean over tokens of the ratio
    # of per-token residual norms between consecutive steps, then the mean over sections.
    for offset, branch in enumerate(("positive", "negative")):
        per_section = []
        for section in range(3):
            calls = residuals[section * 12 + offset:(section + 1) * 12:2]
            norms = [residual.double().norm(dim=-1) for residual in calls]
            per_section.append([1.0] + [(b / a).mean().item() for a, b in zip(norms, norms[1:])])
        expected = np.mean(per_section, axis=0)
        np.testing.assert_allclose(calibration.ratios[branch], expected, rtol=1e-5, atol=2e-6)
    assert not np.allclose(calibration.ratios["positive"], 1.0)


def test_calibration_round_trip_gives_the_same_decisions(dit, tmp_path):
    recorder = CalibrationRecorder(10)
    sample(dit, recorder, steps=10, sections=2)
    for index in list(recorder.live):
        recorder.finish_section(index)
    calibration = recorder.calibration(model="test-model", variant="bidirectional", bucket=[64, 64],
                                       random_weights=True, note="random weights")
    path = calibration.save(tmp_path / "magcache.json")
    data = json.loads(path.read_text())
    assert data["format"] == "framepack-magcache-calibration" and data["version"] == 1
    assert data["random_weights"] is True and data["steps"] == 10 and len(data["ratios"]["positive"]) == 10
    loaded = MagCacheCalibration.load(path)
    assert loaded == calibration

    def decisions(calibration):
        caches = Kept(StepCaches.magcache(10, calibration, threshold=0.3, k=2, retention=0.2).make_policy)
        latents = sample(dit, caches, steps=10, sections=2)
        return [policy.skipped_steps for _, _, policy in caches.made], latents

    (made, latents), (made_again, latents_again) = decisions(calibration), decisions(loaded)
    assert made == made_again and any(made) and torch.equal(latents, latents_again)


def test_a_failed_calibration_save_leaves_the_previous_file_and_no_temporary(tmp_path, monkeypatch):
    from pathlib import Path

    path = MagCacheCalibration(steps=2, ratios={"positive": [1.0, 0.9]}).save(tmp_path / "magcache.json")
    before = path.read_text()
    write_text = Path.write_text

    def disk_full(self, text, *args, **kwargs):
        write_text(self, text[:10], *args, **kwargs)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Path, "write_text", disk_full)
    with pytest.raises(OSError):
        MagCacheCalibration(steps=3, ratios={"positive": [1.0, 0.9, 0.8]}).save(path)
    monkeypatch.undo()
    assert [p.name for p in tmp_path.iterdir()] == ["magcache.json"] and path.read_text() == before


@pytest.mark.parametrize("content,message", [
    ("not json", "not readable JSON"),
    ('{"steps": 2}', "is not a MagCache calibration"),
    ('{"format": "framepack-magcache-calibration", "version": 99}', "version 99"),
    ('{"format": "framepack-magcache-calibration", "version": 1, "steps": 3, "ratios": {"positive": [1, 1]}}',
     "one positive ratio per step"),
    ('{"format": "framepack-magcache-calibration", "version": 1, "steps": 2, "ratios": {"positive": [1, -1]}}',
     "one positive ratio per step"),
])
def test_bad_calibration_files_are_clear_errors(tmp_path, content, message):
    path = tmp_path / "magcache.json"
    path.write_text(content)
    with pytest.raises(FramePackError, match=message):
        MagCacheCalibration.load(path)


def test_calibration_must_fit_the_generation():
    calibration = MagCacheCalibration(steps=4, ratios={"positive": [1.0] * 4})
    with pytest.raises(FramePackError, match="recorded for 4 steps"):
        StepCaches.magcache(6, calibration)
    with pytest.raises(FramePackError, match="negative guidance branch"):
        StepCaches.magcache(4, calibration, branches=("positive", "negative"))


def test_a_calibration_recorded_with_other_settings_is_named_in_a_warning(tmp_path):
    """Window, sampler and shift change the residual magnitudes: a mismatch warns in one line naming both sides and
    the command that records a fitting calibration; matching settings are silent."""
    import warnings

    from framepack_engine.errors import FramePackWarning

    path = MagCacheCalibration(steps=4, ratios={"positive": [1.0] * 4}, bucket=[64, 64], latent_window_size=5,
                               sampler="euler", shift=None).save(tmp_path / "magcache.json")

    def caches(**options):  # the resolve step reads the calibration and warns, before any model loads
        settings = GenerationSettings.from_options(prompt="x", steps=4, cache="magcache", magcache_calibration=path,
                                                   **options)
        return resolve_request(settings, "bidirectional", default_resolution=64).step_caches()

    with pytest.warns(FramePackWarning) as caught:
        caches(latent_window_size=9, sampler="unipc", shift=3.0)
    message = str(caught[0].message)
    assert len(caught) == 1 and "\n" not in message
    assert "recorded with latent-window-size 5, sampler euler, shift from the token count" in message
    assert "this generation uses latent-window-size 9, sampler unipc, shift 3.0" in message
    assert "framepack calibrate-cache --latent-window-size 9 --sampler unipc --shift 3.0" in message
    with pytest.warns(FramePackWarning, match="recorded with shift 3.0, this generation uses shift from the token"):
        MagCacheCalibration(steps=4, ratios={"positive": [1.0] * 4}, latent_window_size=5, sampler="euler",
                            shift=3.0).warn_if_recorded_otherwise(5, "euler", None)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fitting = caches(latent_window_size=5, sampler="euler")
        fitting.magcache_calibration.warn_if_other_bucket([64, 64])
    with pytest.warns(FramePackWarning, match="recorded at 64x64, this generation runs at 448x320"):
        fitting.magcache_calibration.warn_if_other_bucket([448, 320])


# Settings -------------------------------------------------------------------------------------------------------------


def test_settings_write_the_cache_defaults_in(tmp_path):
    assert GenerationSettings.from_options(cache="teacache").cache_threshold == 0.15
    path = tmp_path / "magcache.json"
    MagCacheCalibration(steps=25, ratios={"positive": [1.0] * 25}).save(path)
    settings = GenerationSettings.from_options(cache="magcache", magcache_calibration=path)
    assert (settings.cache_threshold, settings.magcache_k, settings.magcache_retention) == (0.1, 3, 0.2)
    assert settings.magcache_calibration == str(path)
    # Without a calibration MagCache takes the authors' published ratios (the resolve step picks them).
    published = GenerationSettings.from_options(cache="magcache")
    assert (published.cache_threshold, published.magcache_k, published.magcache_retention) == (0.1, 3, 0.2)
    assert published.magcache_calibration is None
    plain = GenerationSettings.from_options()
    assert plain.cache is plain.cache_threshold is plain.magcache_k is None


@pytest.mark.parametrize("options,message", [
    (dict(cache_threshold=0.1), "cache_threshold is set but cache is not"),
    (dict(cache="teacache", magcache_k=2), "magcache_k is a MagCache option"),
    (dict(cache="magcache", magcache_k=-1), "magcache_k must be an integer from 0"),
    (dict(cache="magcache", magcache_calibration="missing.json"), "'missing.json' does not exist"),
    (dict(cache="teacache", cache_threshold=-1), "cache_threshold must be"),
    (dict(cache="tea"), "Unknown cache"),
])
def test_settings_refuse_cache_mistakes(options, message):
    with pytest.raises(FramePackError, match=message):
        GenerationSettings.from_options(**options)


# Through the engine and the command -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def engine():
    return Engine.from_preset("tiny")


def test_engine_stats_metadata_progress_and_a_clean_second_generation(engine):
    plain = engine.generate("a cat", **ENGINE_FAST)
    assert "cache_steps_skipped" not in plain.stats["sections"][0]
    exact = engine.generate("a cat", cache="teacache", cache_threshold=0.0, **ENGINE_FAST)
    assert torch.equal(exact.latents, plain.latents) and np.array_equal(exact.frames, plain.frames)
    assert exact.stats["sections"][0]["cache_steps_computed"] == 6 and exact.stats["cache_steps_skipped"] == 0

    seen = []
    videos = [engine.generate("a cat", cache="teacache", cache_threshold=1e9, callback=seen.append, **ENGINE_FAST)
              for _ in range(2)]
    for video in videos:
        section = video.stats["sections"][0]
        assert (section["cache_steps_computed"], section["cache_steps_skipped"]) == (2, 4)
        assert video.metadata["cache"] == "teacache" and video.metadata["cache_threshold"] == 1e9
    # The second generation starts from a clean state: the same result, the same decisions.
    assert torch.equal(videos[0].latents, videos[1].latents)
    assert not torch.equal(videos[0].latents, plain.latents)
    assert [info["cache_steps_skipped"] for info in seen] == [0, 1, 2, 3, 4, 4] * 2
    # Nothing of a step cache is left on the model.
    assert not any(isinstance(value, (StepCaches, TeaCache)) for value in vars(engine.transformer).values())


@pytest.mark.parametrize("variant", ["bidirectional", "f1"])
def test_the_resolve_step_picks_the_published_ratios_of_the_variant(variant):
    settings = GenerationSettings.from_options(prompt="x", steps=30, cache="magcache", cfg=2.0)
    request = resolve_request(settings, variant, default_resolution=64)
    assert isinstance(request.magcache_calibration, PublishedRatios)
    assert request.magcache_ratios_source.startswith(f"published:{variant} (Zehong-Ma/MagCache@")
    caches = request.step_caches()
    policies = [caches.make_policy(branch) for branch in ("positive", "negative")]
    expected = authors_nearest_interp(AUTHORS_RATIOS[variant], 30).tolist()
    assert [policy.ratios for policy in policies] == [expected, expected]  # one series for both branches


def test_magcache_without_a_calibration_runs_on_the_published_ratios(engine):
    """`cache="magcache"` alone: the authors' ratios for the engine's variant, fitted to 4 steps; each section's
    stats say where they came from; a window other than theirs (9) is named in one warning."""
    from framepack_engine.errors import FramePackWarning

    with pytest.warns(FramePackWarning) as caught:
        video = engine.generate("a cat", cache="magcache", steps=4, seconds=1, fps=8, latent_window_size=2)
    assert len(caught) == 1 and "published ratios were recorded with latent-window-size 9" in str(caught[0].message)
    expected = authors_magcache_skips(authors_nearest_interp(AUTHORS_RATIOS["bidirectional"], 4), 0.1, 3, 0.2)
    assert expected == [1]
    for section in video.stats["sections"]:
        assert (section["cache_steps_computed"], section["cache_steps_skipped"]) == (3, 1)
        assert section["magcache_ratios"] == (
            "published:bidirectional (Zehong-Ma/MagCache@4ae8813 MagCache4FramePack/magcache_demo_gradio.py; "
            "nearest-interpolated from 25 to 4 steps)")
    assert video.metadata["cache"] == "magcache" and "magcache_calibration" not in video.metadata


def test_a_user_calibration_wins_over_the_published_ratios(engine, tmp_path):
    path = MagCacheCalibration(steps=4, ratios={"positive": [1.0] * 4}).save(tmp_path / "mine.json")
    video = engine.generate("a cat", cache="magcache", magcache_calibration=path, steps=4, seconds=1, fps=8,
                            latent_window_size=2)
    for section in video.stats["sections"]:
        # Ratios of 1 never drift: K (3) alone bounds the run, unlike the published ratios' single skip.
        assert (section["cache_steps_computed"], section["cache_steps_skipped"]) == (1, 3)
        assert section["magcache_ratios"] == "calibration:mine.json"
    assert str(tmp_path) not in json.dumps(video.stats)  # the file's name only


def test_calibrate_then_generate_with_magcache_from_the_command(tmp_path, capsys):
    calibration = tmp_path / "magcache.json"
    fast = ["--preset", "tiny", "--steps", "8", "--latent-window-size", "2", "--fps", "8", "--seconds", "1"]
    assert main(["calibrate-cache", "a cat", *fast, "--quiet", "--out", str(calibration)]) == 0
    assert "random weights" in capsys.readouterr().out
    data = json.loads(calibration.read_text())
    assert data["steps"] == 8 and data["random_weights"] and data["model"] == "preset:tiny"
    assert data["bucket"] == [64, 64] and data["sections"] == 1 and "mechanics" in data["note"]

    out = tmp_path / "frames"
    assert main(["generate", "a cat", *fast, "--quiet", "--cache", "magcache", "--magcache-calibration",
                 str(calibration), "--cache-threshold", "10", "--out", str(out)]) == 0
    settings = json.loads((out / "settings.json").read_text())
    assert settings["cache"] == "magcache" and settings["cache_threshold"] == 10.0
    assert settings["magcache_k"] == 3 and settings["magcache_retention"] == 0.2
    assert "warning" not in capsys.readouterr().err  # the settings and bucket it was recorded with
    assert data["shift"] is None and data["latent_window_size"] == 2 and data["sampler"] == "unipc"

    # Another bucket: generated, with a one-line warning naming both sizes.
    assert main(["generate", "a cat", *fast, "--resolution", "96", "--quiet", "--cache", "magcache",
                 "--magcache-calibration", str(calibration), "--out", str(tmp_path / "other")]) == 0
    warned = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
    assert len(warned) == 1 and "recorded at 64x64, this generation runs at" in warned[0]

    # Steps that do not match the calibration: one line, exit 2.
    capsys.readouterr()
    code = main(["generate", "a cat", *fast, "--steps", "6", "--quiet", "--cache", "magcache",
                 "--magcache-calibration", str(calibration), "--out", str(tmp_path / "v.mp4")])
    error = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(error) == 1 and "recorded for 8 steps" in error[0]


def test_calibrate_python_api_refuses_a_cache(engine):
    with pytest.raises(FramePackError, match="without a step cache"):
        calibrate(engine, "x", cache="teacache", **ENGINE_FAST)


# Quality and speed measurement ----------------------------------------------------------------------------------------


def test_bench_measures_steps_skipped_and_the_error_against_no_cache():
    settings = BenchSettings(preset="tiny", device="cpu", resolution=64, latent_window_size=2, steps=8, warmup=0,
                             matmul_size=64, threads=1, cache="teacache")
    results = run_benchmark(settings, ("cache_threshold", [0.0, 0.15, 1e9]))
    runs = {run["label"]: run for run in results["runs"]}
    assert runs["cache_threshold=0.0"]["cache_steps_skipped"] == 0
    assert runs["cache_threshold=1000000000.0"]["cache_steps_skipped"] == 6
    for run in runs.values():
        assert run["cache_steps_computed"] + run["cache_steps_skipped"] == 8
        assert [section["cache_steps_skipped"] for section in run["sections"]] == [run["cache_steps_skipped"]]
    errors = {item["label"]: item["output_relative_error_vs_reference"] for item in results["comparisons"]}
    # The reference (threshold 0) is exactly the uncached model; skipping moves the result, more skipping more.
    assert errors["cache_threshold=0.0"] == 0.0
    assert 0 < errors["cache_threshold=1000000000.0"] < 10
    if runs["cache_threshold=0.15"]["cache_steps_skipped"]:
        assert 0 < errors["cache_threshold=0.15"] <= errors["cache_threshold=1000000000.0"]
    print("\nrelative error of the final latents vs no cache (tiny, random weights):",
          {label: f"{error:.3g} ({runs[label]['cache_steps_skipped']}/8 skipped)" for label, error in errors.items()})


def test_bench_compares_none_teacache_and_magcache():
    settings = BenchSettings(preset="tiny", device="cpu", resolution=64, latent_window_size=2, steps=8, warmup=0,
                             matmul_size=64, threads=1)
    results = run_benchmark(settings, ("cache", ["none", "teacache", "magcache"]))
    runs = {run["label"]: run for run in results["runs"]}
    assert runs["cache=none"]["cache_steps_skipped"] == 0 and runs["cache=none"]["cache_steps_computed"] == 8
    assert runs["cache=magcache"]["settings"]["cache"] == "magcache"
    assert all(run["cache_steps_computed"] >= 2 for run in runs.values())  # first and last step at least
    assert results["comparisons"][0]["output_relative_error_vs_reference"] == 0.0
