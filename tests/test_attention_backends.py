"""framepack_engine.runtime.attention_backends: the Triton backend against SDPA, and the library wrappers' packing on CPU.

flash-attn, sageattention and xformers need a GPU and are not installed here; their wrappers are exercised against
small stand-in modules that implement each library's documented varlen signature with plain PyTorch and check
what the real library would reject (dtype, cu_seqlens dtype, layout).
"""

import importlib.util
import math
import sys
import types

import pytest
import torch
import torch.nn.functional as F

from framepack_engine.runtime import attention_backends
from framepack_engine.runtime.attention import resolve_backend, sdpa_attention
from framepack_engine.runtime.attention_backends import pack_valid_tokens, unpack_valid_tokens, varlen_layout
from framepack_engine.errors import BackendUnavailableError
from tests.utils import TOLERANCE, assert_relative_error


def make_inputs(dtype=torch.float32, batch=2, tokens=45, heads=2, head_dim=64, rotary_length=33, valid=(45, 38)):
    q, k, v = (torch.randn(batch, tokens, heads, head_dim).to(dtype) for _ in range(3))
    angles = torch.rand(1, rotary_length, head_dim // 2) * 2 * math.pi
    cos, sin = angles.cos().repeat_interleave(2, -1), angles.sin().repeat_interleave(2, -1)
    return q, k, v, cos, sin, rotary_length, torch.tensor(valid)


def valid_rows(x, valid_lengths):
    return torch.cat([x[b, : int(n)] for b, n in enumerate(valid_lengths)])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_triton_backend_matches_sdpa(dtype):
    inputs = make_inputs(dtype)
    backend = resolve_backend("triton")
    out = backend.function(*inputs)
    expected = sdpa_attention(*inputs)
    assert_relative_error(valid_rows(out, inputs[-1]), valid_rows(expected, inputs[-1]), TOLERANCE[dtype])


def test_varlen_layout_and_packing_round_trip():
    x = torch.randn(3, 7, 2, 4)
    valid_lengths = torch.tensor([7, 3, 5])
    layout = varlen_layout(valid_lengths, 3, 7, x.device)
    assert layout.cu_seqlens.dtype == torch.int32
    assert layout.cu_seqlens.tolist() == [0, 7, 10, 15]
    assert layout.lengths == [7, 3, 5] and layout.max_seqlen == 7
    packed = pack_valid_tokens(x, layout)
    assert torch.equal(packed, torch.cat([x[0, :7], x[1, :3], x[2, :5]]))
    unpacked = unpack_valid_tokens(packed, layout)
    for b, n in enumerate([7, 3, 5]):
        assert torch.equal(unpacked[b, :n], x[b, :n])
        assert not unpacked[b, n:].any()


def test_varlen_layout_without_padding_is_a_reshape():
    x = torch.randn(2, 5, 3, 4)
    for valid_lengths in (None, torch.tensor([5, 5])):
        layout = varlen_layout(valid_lengths, 2, 5, x.device)
        assert layout.valid_mask is None and layout.cu_seqlens.tolist() == [0, 5, 10]
        packed = pack_valid_tokens(x, layout)
        assert packed.data_ptr() == x.data_ptr()
        assert torch.equal(unpack_valid_tokens(packed, layout), x)


# --- stand-ins for the libraries --------------------------------------------------------------------------------

def varlen_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, scale=None):
    """Per-segment SDPA over packed (total, heads, head_dim) tensors: what every varlen API computes."""
    assert q.dtype in (torch.float16, torch.bfloat16), "the libraries take half precision only"
    assert cu_seqlens_q.dtype == torch.int32 and cu_seqlens_k.dtype == torch.int32
    assert q.dim() == 3 and q.is_contiguous() and k.is_contiguous() and v.is_contiguous()
    out = torch.empty_like(q)
    for start, end, key_start, key_end in zip(cu_seqlens_q[:-1].tolist(), cu_seqlens_q[1:].tolist(),
                                              cu_seqlens_k[:-1].tolist(), cu_seqlens_k[1:].tolist()):
        segment = F.scaled_dot_product_attention(
            q[start:end].transpose(0, 1).float(), k[key_start:key_end].transpose(0, 1).float(),
            v[key_start:key_end].transpose(0, 1).float(), scale=scale)
        out[start:end] = segment.transpose(0, 1).to(q.dtype)
    return out


def fake_flash_attn():
    module = types.ModuleType("flash_attn")

    def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                               softmax_scale=None, causal=False, **kwargs):
        assert isinstance(max_seqlen_q, int) and isinstance(max_seqlen_k, int) and not causal and dropout_p == 0.0
        assert max_seqlen_q == int((cu_seqlens_q[1:] - cu_seqlens_q[:-1]).max())
        return varlen_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, softmax_scale)

    module.flash_attn_varlen_func = flash_attn_varlen_func
    return module


def fake_sageattention():
    module = types.ModuleType("sageattention")

    def sageattn_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, is_causal=False,
                        sm_scale=None, smooth_k=True, **kwargs):
        assert isinstance(max_seqlen_q, int) and not is_causal
        return varlen_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, sm_scale)

    module.sageattn_varlen = sageattn_varlen
    return module


def fake_xformers():
    package = types.ModuleType("xformers")
    ops = types.ModuleType("xformers.ops")

    class BlockDiagonalMask:
        def __init__(self, q_seqlen, kv_seqlen):
            self.q_seqlen, self.kv_seqlen = list(q_seqlen), list(kv_seqlen or q_seqlen)

        @classmethod
        def from_seqlens(cls, q_seqlen, kv_seqlen=None):
            assert all(isinstance(n, int) for n in q_seqlen)
            return cls(q_seqlen, kv_seqlen)

    def memory_efficient_attention(query, key, value, attn_bias=None, p=0.0, scale=None):
        assert query.dim() == 4 and query.dtype in (torch.float16, torch.bfloat16)  # (batch, tokens, heads, head_dim)
        if attn_bias is None:
            out = F.scaled_dot_product_attention(query.transpose(1, 2).float(), key.transpose(1, 2).float(),
                                                 value.transpose(1, 2).float(), scale=scale)
            return out.transpose(1, 2).to(query.dtype)
        assert query.shape[0] == 1, "a BlockDiagonalMask needs all samples packed into batch 1"

        def cumulative(lengths):
            return torch.tensor([0] + lengths, dtype=torch.int32).cumsum(0, dtype=torch.int32)

        out = varlen_attention(query[0].contiguous(), key[0].contiguous(), value[0].contiguous(),
                               cumulative(attn_bias.q_seqlen), cumulative(attn_bias.kv_seqlen), scale)
        return out.unsqueeze(0)

    ops.memory_efficient_attention = memory_efficient_attention
    ops.fmha = types.SimpleNamespace(attn_bias=types.SimpleNamespace(BlockDiagonalMask=BlockDiagonalMask))
    package.ops = ops
    return {"xformers": package, "xformers.ops": ops}


LIBRARIES = {
    "flash": (attention_backends.flash_attention, lambda: {"flash_attn": fake_flash_attn()}),
    "sage": (attention_backends.sage_attention, lambda: {"sageattention": fake_sageattention()}),
    "xformers": (attention_backends.xformers_attention, fake_xformers),
}


@pytest.mark.parametrize("valid", [(45, 38), (45, 45), None], ids=["padded", "full", "no-mask"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("name", sorted(LIBRARIES))
def test_library_wrappers_match_sdpa(monkeypatch, name, dtype, valid):
    wrapper, modules = LIBRARIES[name]
    for module_name, module in modules().items():
        monkeypatch.setitem(sys.modules, module_name, module)
    q, k, v, cos, sin, rotary_length, valid_lengths = make_inputs(dtype, valid=valid or (45, 45))
    if valid is None:
        valid_lengths = None
    out = wrapper(q, k, v, cos, sin, rotary_length, valid_lengths)
    expected = sdpa_attention(q, k, v, cos, sin, rotary_length, valid_lengths)
    assert out.dtype == dtype and out.shape == q.shape
    lengths = valid_lengths if valid_lengths is not None else torch.tensor([45, 45])
    # float32 inputs run through the libraries in bfloat16.
    assert_relative_error(valid_rows(out, lengths), valid_rows(expected, lengths), TOLERANCE[torch.bfloat16])
    if valid_lengths is not None and valid_lengths.min() < q.shape[1]:
        assert not out[1, int(valid_lengths[1]):].any()


def test_wrapper_parity_check_can_fail(monkeypatch):
    monkeypatch.setitem(sys.modules, "flash_attn", fake_flash_attn())
    q, k, v, cos, sin, rotary_length, valid_lengths = make_inputs(torch.bfloat16)
    expected = valid_rows(sdpa_attention(q, k, v, cos, sin, rotary_length, valid_lengths), valid_lengths)
    unrotated = attention_backends.flash_attention(q, k, v, None, None, 0, valid_lengths)
    with pytest.raises(AssertionError):
        assert_relative_error(valid_rows(unrotated, valid_lengths), expected, TOLERANCE[torch.bfloat16])


@pytest.mark.parametrize("name,module", [("flash", "flash_attn"), ("sage", "sageattention"), ("xformers", "xformers")])
def test_missing_library_raises_backend_unavailable(name, module):
    if importlib.util.find_spec(module) is not None:
        pytest.skip(f"{module} is installed here")
    with pytest.raises(BackendUnavailableError, match="pip install"):
        resolve_backend(name)
    wrapper = LIBRARIES[name][0]
    q, k, v, *_ = make_inputs(torch.bfloat16)
    with pytest.raises(BackendUnavailableError, match=f"'{name}'.*pip install"):
        wrapper(q, k, v)
