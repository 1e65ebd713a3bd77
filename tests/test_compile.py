"""Regional torch.compile (`compile=True`, `--compile`): each kind of block compiles once, every block, section and
step reuses the graph, and the output equals eager within float tolerance. Counted with dynamo's own counters."""

import numpy as np
import pytest
import torch
from torch._dynamo.utils import counters

from framepack_engine import Engine
from framepack_engine.settings import ModelSettings

pytestmark = pytest.mark.slow  # compiling the two block graphs takes about a minute on a CPU

FAST = dict(steps=3, seconds=2, fps=8, latent_window_size=2, seed=1)


def test_compiled_blocks_match_eager_and_never_recompile():
    eager = Engine.from_preset("tiny")
    reference = eager.generate("a cat walks", **FAST)
    compiled = Engine.from_settings(ModelSettings.from_options(compile=True, device="cpu"), "tiny",
                                    given={"compile", "device"})
    assert compiled.transformer.compiled_blocks
    torch._dynamo.reset()
    counters.clear()
    graphs_after_each_section = []
    sections = []
    for section in compiled.stream("a cat walks", **FAST):
        graphs_after_each_section.append(counters["stats"]["unique_graphs"])
        sections.append(section)
    assert len(sections) == 2
    # One graph per kind of block (double- and single-stream), made during the first section; none after.
    assert graphs_after_each_section == [2, 2]
    latents = sections[-1].latents
    assert torch.allclose(latents, reference.latents, rtol=1e-4, atol=1e-5)
    with_cache = compiled.generate("a cat walks", cache="teacache", **FAST)  # a step cache around the same graphs
    assert counters["stats"]["unique_graphs"] == 2
    assert np.isfinite(with_cache.latents.numpy()).all()
    compiled.transformer.set_compiled_blocks(False)
    assert not compiled.transformer.compiled_blocks
    plain = compiled.generate("a cat walks", **FAST)
    assert torch.equal(plain.latents, reference.latents)  # back to the eager path, bit for bit
