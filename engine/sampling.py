"""The samplers' public surface: `framepack_engine.sampling.flux_sigmas`, `sample_unipc`, `sample_euler`.

They live in `framepack_engine.generation.sampling` beside the denoiser wrapper; this module names the contract.
"""

from framepack_engine.generation.sampling import SAMPLERS, flux_sigmas, sample, sample_euler, sample_unipc

__all__ = ["SAMPLERS", "flux_sigmas", "sample", "sample_euler", "sample_unipc"]
