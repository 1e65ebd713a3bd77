"""framepack_kernels.attention.packed_attention against its PyTorch reference, under the Triton interpreter on CPU."""

import pytest
import torch
import torch.nn.functional as F

from framepack_kernels import attention
from framepack_kernels.attention import packed_attention, packed_attention_reference
from framepack_kernels.reference import random_rope_tables
from tests.utils import TOLERANCE, assert_relative_error, relative_error

# (batch, tokens, heads, head_dim, rotary_length, valid_lengths, rope_batch). The interpreter runs 32x16 tiles,
# so these cover: full and partial key tiles, a rotary boundary inside a tile and on a tile edge, padding that
# starts inside the image tokens, a whole padded query block, no rotation, head_dim 16 and 128, per-sample RoPE
# tables.
SHAPES = [
    (1, 40, 2, 64, 32, None, 1),
    (2, 53, 2, 64, 37, [53, 44], 2),
    (2, 67, 2, 64, 48, [60, 29], 1),
    (2, 45, 3, 64, 0, [45, 20], 1),
    (2, 48, 2, 64, 40, [30, 48], 2),
    (1, 70, 1, 128, 64, [70], 1),
    (2, 41, 2, 16, 24, [41, 33], 1),  # the tiny DiT test config's head_dim
]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]



def make_inputs(batch, tokens, heads, head_dim, rotary_length, valid, rope_batch, dtype):
    # Scale so the softmax is neither uniform nor one-hot: every key's weight matters.
    q, k, v = (torch.randn(batch, tokens, heads, head_dim).mul(1.5).to(dtype) for _ in range(3))
    cos, sin = random_rope_tables(rope_batch, rotary_length, head_dim) if rotary_length else (None, None)
    valid_lengths = torch.tensor(valid) if valid is not None else None
    return q, k, v, cos, sin, rotary_length, valid_lengths


def valid_rows(x, valid_lengths):
    """Outputs at padded query positions are unspecified: compare each sample's valid rows only."""
    if valid_lengths is None:
        return x
    return torch.cat([x[b, : int(n)] for b, n in enumerate(valid_lengths)])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s[:5])))
def test_matches_reference(shape, dtype):
    inputs = make_inputs(*shape, dtype)
    out = packed_attention(*inputs)
    expected = packed_attention_reference(*inputs)
    assert out.dtype == dtype and out.shape == inputs[0].shape
    valid_lengths = inputs[-1]
    assert_relative_error(valid_rows(out, valid_lengths), valid_rows(expected, valid_lengths), TOLERANCE[dtype])


def test_reference_matches_sdpa_of_rotated_inputs():
    # The oracle itself: rotation by explicit complex multiplication, then PyTorch's SDPA with a key mask.
    q, k, v, cos, sin, rotary_length, valid_lengths = make_inputs(2, 23, 2, 16, 15, [23, 11], 2, torch.float32)

    def rotate(x):
        pairs = torch.view_as_complex(x[:, :rotary_length].double().unflatten(-1, (-1, 2)).contiguous())
        turn = torch.polar(torch.ones_like(cos[..., ::2]).double(), torch.atan2(sin[..., ::2], cos[..., ::2]).double())
        rotated = torch.view_as_real(pairs * turn[:, :, None]).flatten(-2)
        return torch.cat([rotated, x[:, rotary_length:].double()], dim=1)

    mask = (torch.arange(23)[None, :] < valid_lengths[:, None])[:, None, None, :]
    expected = F.scaled_dot_product_attention(
        rotate(q).transpose(1, 2), rotate(k).transpose(1, 2), v.double().transpose(1, 2), attn_mask=mask
    ).transpose(1, 2)
    assert_relative_error(packed_attention_reference(q, k, v, cos, sin, rotary_length, valid_lengths), expected, 1e-5)


def test_strided_views_of_a_fused_projection():
    # q, k, v as views of one (batch, tokens, 3, heads, head_dim) projection, as the DiT produces them.
    qkv = torch.randn(2, 41, 3, 2, 64)
    q, k, v = qkv.unbind(2)
    cos, sin = random_rope_tables(1, 33, 64)
    valid_lengths = torch.tensor([41, 35])
    out = packed_attention(q, k, v, cos, sin, 33, valid_lengths)
    expected = packed_attention_reference(q, k, v, cos, sin, 33, valid_lengths)
    assert_relative_error(valid_rows(out, valid_lengths), valid_rows(expected, valid_lengths), 1e-5)


def test_padded_keys_are_never_read():
    q, k, v, cos, sin, rotary_length, valid_lengths = make_inputs(2, 53, 2, 64, 37, [53, 44], 1, torch.float32)
    clean = packed_attention(q, k, v, cos, sin, rotary_length, valid_lengths)
    # NaN in the padding would poison any softmax or matmul that touched it.
    k[1, 44:], v[1, 44:] = float("nan"), float("nan")
    poisoned = packed_attention(q, k, v, cos, sin, rotary_length, valid_lengths)
    assert torch.equal(valid_rows(poisoned, valid_lengths), valid_rows(clean, valid_lengths))


def test_parity_check_can_fail():
    q, k, v, cos, sin, rotary_length, valid_lengths = make_inputs(2, 53, 2, 64, 37, [53, 44], 1, torch.float32)
    expected = valid_rows(packed_attention_reference(q, k, v, cos, sin, rotary_length, valid_lengths), valid_lengths)
    tolerance = TOLERANCE[torch.float32]
    # One image token too few rotated, the wrong rotation direction, one valid key dropped: each must show.
    short = packed_attention(q, k, v, cos[:, :-1], sin[:, :-1], rotary_length - 1, valid_lengths)
    assert relative_error(valid_rows(short, valid_lengths), expected) > 100 * tolerance
    reversed_turn = packed_attention(q, k, v, cos, -sin, rotary_length, valid_lengths)
    assert relative_error(valid_rows(reversed_turn, valid_lengths), expected) > 100 * tolerance
    dropped = packed_attention(q, k, v, cos, sin, rotary_length, valid_lengths - 1)
    assert relative_error(valid_rows(dropped, valid_lengths), expected) > 100 * tolerance


def test_bad_inputs_raise_clear_errors(monkeypatch):
    q = torch.randn(1, 8, 2, 64)
    with pytest.raises(ValueError, match="head_dim 48"):
        packed_attention(*(torch.randn(1, 8, 2, 48),) * 3)
    with pytest.raises(ValueError, match="share one"):
        packed_attention(q, q, torch.randn(1, 9, 2, 64))
    with pytest.raises(ValueError, match="rope_cos must have shape"):
        packed_attention(q, q, q, torch.ones(1, 5, 64), torch.zeros(1, 5, 64), 6)
    with pytest.raises(ValueError, match="valid_lengths"):
        packed_attention(q, q, q, valid_lengths=torch.tensor([8, 8]))
    with pytest.raises(ValueError, match="share a dtype"):
        packed_attention(q, q.half(), q)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="needs CUDA tensors"):
        packed_attention(q, q, q)


@pytest.mark.parametrize("arch", [(9, 0, 232448), (8, 9, 101376), (8, 6, 101376), (8, 0, 166912)],
                         ids=["hopper", "ada", "ampere-consumer", "a100"])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_autotune_pruning_fits_each_architecture(monkeypatch, arch, head_dim, dtype):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(attention, "_device_limits", lambda device: arch)
    candidates = attention._candidate_configs()
    q = torch.empty(1, 1, 1, head_dim, dtype=dtype)
    kept = attention._prune_configs(candidates, {"Q": q}, HEAD_DIM=head_dim)
    assert 1 <= len(kept) <= 16 < len(candidates)
    for config in kept:
        assert attention._shared_memory_estimate(config, head_dim, q.element_size()) <= arch[2]
    if arch[0] == 9:
        assert all(c.kwargs["BLOCK_M"] == 128 for c in kept)


def test_interpreter_uses_one_config():
    assert len(attention._candidate_configs()) == 1


@pytest.mark.parametrize("op", ["attention", "attention_padded"])
def test_benchmark_case_runs_at_tiny_shapes(op):
    # bench/ is outside the CI test path: make sure its attention cases build, run and agree with the oracle.
    from bench.bench_kernels import CASES, TINY, run_case

    records = run_case(CASES[op](TINY, torch.device("cpu"), torch.bfloat16), torch.device("cpu"), repeats=1)
    timed = {r["implementation"]: r for r in records if "skipped" not in r}
    assert {"sdpa", "triton", "eager"} <= set(timed)
    for record in timed.values():
        assert record["ms"] > 0 and record["relative_error_vs_sdpa"] <= TOLERANCE[torch.bfloat16]
