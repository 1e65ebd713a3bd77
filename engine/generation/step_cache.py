"""Step caching: skip the DiT's whole block stack on the steps where its output would barely change.

A policy stands in for `dit.run_blocks(tokens)` in one model call (`FramePackDiT.velocity(step_cache=...)`): it
either runs the blocks and keeps their residual (output minus input image tokens), or adds the residual it kept to
this step's input image tokens and runs no block at all (so a weight streamer moves nothing on that step). A policy
lives for one section and one guidance branch: the runner asks `make_step_cache(section, branch)` for a fresh one,
so no state crosses sections, branches or generations, and nothing is stored on the model.

- TeaCache, as the official FramePack app computes it: the first double block's norm1-modulated image tokens are
  compared with the previous step's (relative L1: mean |a - b| / mean |b|), the distance rescaled by HunyuanVideo's
  polynomial and accumulated; a step is skipped while the sum stays under the threshold, and a computed step resets
  it. The first and the last step of a section are always computed. Cost: one small reduction and one host read per
  step.
- MagCache, as its authors run it on FramePack (MagCache4FramePack's `magcache_framepack_forward`): each step's
  residual magnitude relative to the previous step's is known beforehand (`ratios[t]`: the authors' published
  ratios, shipped in magcache_ratios.json beside this module, or a calibration; see
  framepack_engine.generation.calibration); their product since the last computed step estimates how far the kept
  residual has drifted. After the retained first steps (`int(retention * steps)`, and step 0 always), a step is
  skipped when the summed drift stays under the threshold, at most K steps in a row, and its own ratio is within
  0.06 of 1; a step that fails any of the three is computed and starts a new run. The last step is not forced: it is
  skipped like any other when the rule allows (the authors do the same). Decisions need no host read at all.
"""

from __future__ import annotations

from typing import Callable

import torch

from framepack_engine.errors import FramePackError

# The official app's default (about 2.1x fewer block passes on its own measurements; 0.1 gives about 1.6x).
TEACACHE_THRESHOLD = 0.15
# TeaCache's fit of HunyuanVideo's output change against its modulated-input change, highest power first.
HUNYUAN_VIDEO_RESCALE = (733.226126, -401.131952, 67.5869174, -3.14987800, 0.0961237896)
# The MagCache authors' FramePack demo defaults.
MAGCACHE_THRESHOLD = 0.1
MAGCACHE_K = 3
MAGCACHE_RETENTION = 0.2
# The authors' per-step condition: a step whose own ratio is further than this from 1 is always computed.
MAGCACHE_STEP_TOLERANCE = 0.06

DEFAULT_THRESHOLDS = {"teacache": TEACACHE_THRESHOLD, "magcache": MAGCACHE_THRESHOLD}
BRANCHES = ("positive", "negative")


def rescaled_distance(distance: float, coefficients=HUNYUAN_VIDEO_RESCALE) -> float:
    """The polynomial (highest power first) at `distance`, in double precision on the host."""
    value = 0.0
    for coefficient in coefficients:
        value = value * distance + coefficient
    return value


def relative_l1(current: torch.Tensor, previous: torch.Tensor) -> float:
    """mean |current - previous| / mean |previous|, computed in the tensors' dtype as the official app does; the one
    host read of a TeaCache step."""
    return ((current - previous).abs().mean() / previous.abs().mean()).item()


class StepCache:
    """Runs the block stack or stands in for it with the kept residual, one model call at a time.

    Subclasses decide in `should_skip`; a step with no residual kept yet is always computed. `skipped_steps` lists
    the steps (model calls of this section and branch, from 0) that ran no block.
    """

    def __init__(self, steps: int):
        self.steps = steps
        self.step = 0
        self.computed = 0
        self.skipped_steps: list[int] = []
        self.residual: torch.Tensor | None = None

    @property
    def skipped(self) -> int:
        return len(self.skipped_steps)

    def run_blocks(self, dit, tokens) -> torch.Tensor:
        """What `dit.run_blocks(tokens)` returns, or its cached stand-in."""
        if self.should_skip(dit, tokens) and self.residual is not None:
            image = tokens.image + self.residual
            self.skipped_steps.append(self.step)
        else:
            image = dit.run_blocks(tokens)
            self.residual = image - tokens.image
            self.computed += 1
            self.after_computed_step(self.residual)
        self.step += 1
        return image

    def should_skip(self, dit, tokens) -> bool:
        return False

    def after_computed_step(self, residual: torch.Tensor) -> None:
        """Called with each computed step's residual (the calibration recorder reads it)."""

    def release(self) -> None:
        """Drops the tensors this policy keeps (its section is finished)."""
        self.residual = None


class TeaCache(StepCache):
    """TeaCache exactly as the official FramePack app decides, with one state per section and guidance branch."""

    def __init__(self, steps: int, threshold: float = TEACACHE_THRESHOLD, coefficients=HUNYUAN_VIDEO_RESCALE):
        super().__init__(steps)
        self.threshold = threshold
        self.coefficients = coefficients
        self.accumulated = 0.0
        self.previous: torch.Tensor | None = None

    def should_skip(self, dit, tokens) -> bool:
        step = self.step
        if step >= self.steps - 1:
            # The last step is always computed, and no later step compares with its signal.
            self.accumulated, self.previous = 0.0, None
            return False
        signal = dit.first_block_modulated_input(tokens)
        previous, self.previous = self.previous, signal
        if step == 0 or previous is None:
            self.accumulated = 0.0
            return False
        # Several ranks take rank 0's distance, so a rounding never splits their decisions.
        distance = relative_l1(signal, previous)
        agree = getattr(dit, "agree", None)
        self.accumulated += rescaled_distance(agree(distance) if agree else distance, self.coefficients)
        if self.accumulated < self.threshold:
            return True
        self.accumulated = 0.0
        return False

    def release(self) -> None:
        super().release()
        self.previous = None


class MagCache(StepCache):
    """MagCache from per-step magnitude ratios (`ratios[t]` = |residual t| / |residual t-1|; `ratios[0]` unused),
    deciding as the authors' FramePack demo does."""

    def __init__(self, steps: int, ratios, threshold: float = MAGCACHE_THRESHOLD, k: int = MAGCACHE_K,
                 retention: float = MAGCACHE_RETENTION, step_tolerance: float = MAGCACHE_STEP_TOLERANCE):
        super().__init__(steps)
        if len(ratios) != steps:
            raise FramePackError(f"MagCache has {len(ratios)} magnitude ratios for {steps} steps: calibrate for "
                                 f"{steps} steps (framepack calibrate-cache --steps {steps}).")
        self.ratios = [float(ratio) for ratio in ratios]
        self.threshold, self.k, self.step_tolerance = threshold, k, step_tolerance
        self.retained = int(retention * steps)  # the first steps, always computed
        self._reset()

    def _reset(self):
        self.accumulated_ratio, self.accumulated_error, self.accumulated_steps = 1.0, 0.0, 0

    def should_skip(self, dit, tokens) -> bool:
        step = self.step
        if step == 0 or step < self.retained:
            self._reset()
            return False
        ratio = self.ratios[step]
        self.accumulated_ratio *= ratio
        self.accumulated_error += abs(1.0 - self.accumulated_ratio)
        self.accumulated_steps += 1
        if (self.accumulated_error <= self.threshold and self.accumulated_steps <= self.k
                and abs(1.0 - ratio) <= self.step_tolerance):
            return True
        self._reset()
        return False


class StepCaches:
    """`run_sections`' make_step_cache: a fresh policy per section and guidance branch, and per section the count of
    model calls that ran the blocks and that were skipped (both branches together when cfg > 1). `ratios_source`
    (MagCache: where its ratios came from) goes into each finished section's stats as `magcache_ratios`."""

    def __init__(self, make_policy: Callable[[str], StepCache], magcache_calibration=None,
                 ratios_source: str | None = None):
        self.make_policy = make_policy
        self.live: dict[int, list[StepCache]] = {}
        self.magcache_calibration = magcache_calibration  # the generation checks its bucket once it is known
        self.ratios_source = ratios_source

    def __call__(self, section, branch: str) -> StepCache:
        policy = self.make_policy(branch)
        self.live.setdefault(section.index, []).append(policy)
        return policy

    def counts(self, section_index: int) -> dict:
        policies = self.live.get(section_index, [])
        return {"cache_steps_computed": sum(policy.computed for policy in policies),
                "cache_steps_skipped": sum(policy.skipped for policy in policies)}

    def finish_section(self, section_index: int, parallel=None) -> dict:
        """The section's counts (and where MagCache's ratios came from); its policies let go of their tensors.
        parallel: the ParallelLayout of several ranks; with CFG parallel each half ran one branch's policy, so the
        counts are summed over the pair."""
        counts = self.counts(section_index)
        if parallel is not None and parallel.cfg == 2:
            counts = dict(zip(counts, parallel.cfg_pair.sum(list(counts.values()))))
        if self.ratios_source is not None:
            counts["magcache_ratios"] = self.ratios_source
        for policy in self.live.pop(section_index, []):
            policy.release()
        return counts

    @classmethod
    def teacache(cls, steps: int, threshold: float = TEACACHE_THRESHOLD) -> "StepCaches":
        return cls(lambda branch: TeaCache(steps, threshold))

    @classmethod
    def magcache(cls, steps: int, calibration, threshold: float = MAGCACHE_THRESHOLD, k: int = MAGCACHE_K,
                 retention: float = MAGCACHE_RETENTION, branches=("positive",),
                 ratios_source: str | None = None) -> "StepCaches":
        """calibration: a MagCacheCalibration or the published ratios (framepack_engine.generation.calibration);
        branches: those the generation will run; ratios_source: what the stats name as the ratios' origin."""
        ratios = {branch: calibration.ratios_for(branch, steps) for branch in branches}
        return cls(lambda branch: MagCache(steps, ratios[branch], threshold, k, retention), calibration,
                   ratios_source)



__all__ = ["DEFAULT_THRESHOLDS", "HUNYUAN_VIDEO_RESCALE", "MAGCACHE_K", "MAGCACHE_RETENTION",
           "MAGCACHE_STEP_TOLERANCE", "MAGCACHE_THRESHOLD", "MagCache", "StepCache", "StepCaches",
           "TEACACHE_THRESHOLD", "TeaCache", "relative_l1", "rescaled_distance"]
