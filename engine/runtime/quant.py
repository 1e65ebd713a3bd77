"""Weight-only quantized linears (fp8, int8, int4) and pre-quantized checkpoints.

Formats (the storage layouts are written down once, in kernels/reference.py):
  fp8   float8 e4m3 values, a float32 scale per output channel (amax / 448). 1 byte per weight.
  int8  symmetric int8 in [-127, 127], a float32 scale per output channel (amax / 127). 1 byte per weight.
  int4  asymmetric 4-bit values in [0, 15] packed two to a byte along the input dimension, in groups of 64 or 128
        inputs (the input width padded to whole groups) with a bfloat16 scale and a float16 zero point per group:
        w = (q - zero) * scale. The range of each group is widened to include 0, so the zero point lies in [0, 15].
        0.5 byte per weight plus 4 bytes per group (0.53 at group 128).
A format acts on the linear layers of the DiT's blocks (attention projections, MLPs and the adaptive-modulation
projections, which hold 27% of the blocks' weights: quantizing them adds 0-20% to the output error of quantizing the
rest on random weights, tests/test_quant.py, and the community fp8 files quantize them too) and of the Llama text
encoder; embeddings, norms, the token refiner and the final projection stay in the model's dtype. Activations are not quantized: a quantized linear computes in its input's
dtype, with the weight dequantized tile by tile (Triton, kernels/quant_matmul.py) or whole (the plain path). The
optional fp8 compute path (`set_fp8_compute`) instead quantizes activations per token and multiplies on the fp8
tensor cores.

Why our own storage rather than optimum-quanto: quanto keeps quantized weights as tensor subclasses, whose stored
bytes a generic block streamer (engine/offload.py moves a block's parameters and buffers and counts their bytes)
cannot see as plain tensors, and whose checkpoints need a float model built first to be re-quantized into. Here
every quantized tensor is a plain parameter (`weight`, `weight_scale`, `weight_zero`) of a `QuantizedLinear`, so it
is saved and memory-mapped by safetensors as it is, assigned from a checkpoint without a float copy, moved by
`.to(device)` and counted by `numel() * element_size()` like any weight, and read by our kernels directly. quanto's
int4 layouts also follow its own CUDA kernels, which we do not ship.

A pre-quantized checkpoint (`framepack quantize`) holds those tensors under the layer's own keys and names its format
in the safetensors metadata (`framepack_quantization`); loading it builds QuantizedLinear modules on the meta device
and assigns the memory-mapped tensors, so no full-precision copy ever exists.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from framepack_engine.errors import FramePackError, Option
from framepack_engine.runtime.host_memory import release_freed_host_memory
from framepack_kernels.reference import (FP8_DTYPES, FP8_E4M3_MAX, INT4_GROUP_SIZES, INT4_MAX, INT8_MAX, dequantize_reference,
                               int4_group_size, pack_int4, quantized_matmul_reference)

FORMATS = ("fp8", "int8", "int4")
DEFAULT_INT4_GROUP_SIZE = 64
METADATA_KEY = "framepack_quantization"
# The input widths of int4 layers whose width is not a whole number of groups (their storage is padded).
INT4_WIDTHS_KEY = "framepack_int4_in_features"
# The tensors a quantized layer stores besides its bias, by the suffix of their state-dict key.
STORAGE_SUFFIXES = (".weight", ".weight_scale", ".weight_zero")
INT4_SCALE_DTYPE = torch.bfloat16
INT4_ZERO_DTYPE = torch.float16


@dataclass(frozen=True)
class QuantScheme:
    """What a quantization is: its format, the int4 group size, and whether the modulation projections are in."""

    format: str
    group_size: int | None = None
    modulation: bool = True

    def __post_init__(self):
        if self.format not in FORMATS:
            raise FramePackError(f"Unknown quantization format {self.format!r}: choose one of {', '.join(FORMATS)}.")
        if self.format == "int4":
            group_size = DEFAULT_INT4_GROUP_SIZE if self.group_size is None else self.group_size
            if group_size not in INT4_GROUP_SIZES:
                raise FramePackError(f"int4 group size must be one of {', '.join(map(str, INT4_GROUP_SIZES))}, got "
                                     f"{group_size!r}: 64 or 128 are the usual choices.")
            object.__setattr__(self, "group_size", group_size)
        elif self.group_size is not None:
            raise FramePackError(f"A group size applies to int4 only, not {self.format}: leave it unset.")

    @property
    def storage(self) -> tuple[str, int | None]:
        """What a layer's stored bytes follow: the format and group size (`modulation` only says which layers)."""
        return self.format, self.group_size

    def as_dict(self) -> dict:
        return {"format": self.format, "group_size": self.group_size, "modulation": self.modulation}

    def metadata(self) -> dict[str, str]:
        """The safetensors metadata entry that names this scheme in a pre-quantized checkpoint."""
        return {METADATA_KEY: json.dumps({"version": 1, **self.as_dict()})}

    @classmethod
    def from_dict(cls, values: dict) -> QuantScheme:
        return cls(values["format"], values.get("group_size"), bool(values.get("modulation", True)))

    @classmethod
    def from_metadata(cls, metadata: dict[str, str]) -> QuantScheme | None:
        """The scheme a checkpoint's metadata names, or None for a checkpoint we did not quantize."""
        text = (metadata or {}).get(METADATA_KEY)
        if text is None:
            return None
        try:
            values = json.loads(text)
            return cls.from_dict(values)
        except (ValueError, KeyError, TypeError) as error:
            raise FramePackError(f"The checkpoint's {METADATA_KEY} metadata is unreadable ({error}): write it again "
                                 "with `framepack quantize`.") from None


# --------------------------------------------------------------------------------------------------------------------
# Quantizing one weight
# --------------------------------------------------------------------------------------------------------------------


def quantize_weight(weight: torch.Tensor, scheme: QuantScheme) -> dict[str, torch.Tensor]:
    """A float weight (out_features, in_features) -> its stored tensors {"weight", "weight_scale"[, "weight_zero"]},
    computed in float32 on the weight's device."""
    w = weight.detach().float()
    if scheme.format == "fp8":
        scale = w.abs().amax(dim=1).clamp_min(1e-12) / FP8_E4M3_MAX
        values = (w / scale[:, None]).clamp(-FP8_E4M3_MAX, FP8_E4M3_MAX).to(torch.float8_e4m3fn)
        return {"weight": values, "weight_scale": scale}
    if scheme.format == "int8":
        scale = w.abs().amax(dim=1).clamp_min(1e-12) / INT8_MAX
        values = torch.round(w / scale[:, None]).clamp(-INT8_MAX, INT8_MAX).to(torch.int8)
        return {"weight": values, "weight_scale": scale}
    group = scheme.group_size
    out_features, in_features = w.shape
    padded = math.ceil(in_features / group) * group
    groups = F.pad(w, (0, padded - in_features)).reshape(out_features, padded // group, group)
    low = groups.amin(dim=2).clamp_max(0)
    high = groups.amax(dim=2).clamp_min(0)
    # The stored (rounded) scale and zero point are the ones the values are computed with.
    scale = ((high - low) / INT4_MAX).clamp_min(1e-12).to(INT4_SCALE_DTYPE)
    zero = (-low / scale.float()).clamp(0, INT4_MAX).to(INT4_ZERO_DTYPE)
    values = torch.round(groups / scale.float()[:, :, None] + zero.float()[:, :, None]).clamp(0, INT4_MAX)
    return {"weight": pack_int4(values.reshape(out_features, padded)), "weight_scale": scale, "weight_zero": zero}


def storage_shapes(out_features: int, in_features: int, scheme: QuantScheme) -> dict[str, tuple[tuple, torch.dtype]]:
    """Shape and dtype of each stored tensor of a quantized (out_features, in_features) weight."""
    if scheme.format in ("fp8", "int8"):
        dtype = torch.float8_e4m3fn if scheme.format == "fp8" else torch.int8
        return {"weight": ((out_features, in_features), dtype), "weight_scale": ((out_features,), torch.float32)}
    groups = math.ceil(in_features / scheme.group_size)
    return {"weight": ((out_features, groups * scheme.group_size // 2), torch.uint8),
            "weight_scale": ((out_features, groups), INT4_SCALE_DTYPE),
            "weight_zero": ((out_features, groups), INT4_ZERO_DTYPE)}


def quantized_weight_bytes(out_features: int, in_features: int, scheme: QuantScheme) -> int:
    """Bytes of a quantized weight, bias excluded: fp8/int8 out*in + 4*out; int4 out*padded_in/2 + 4*out*groups."""
    if scheme.format in ("fp8", "int8"):
        return out_features * in_features + 4 * out_features
    groups = math.ceil(in_features / scheme.group_size)
    return out_features * groups * scheme.group_size // 2 + (2 + 2) * out_features * groups


# --------------------------------------------------------------------------------------------------------------------
# The module
# --------------------------------------------------------------------------------------------------------------------


class QuantizedLinear(nn.Module):
    """A drop-in nn.Linear whose weight is stored quantized: `in_features`, `out_features`, `bias`, `forward(x)`.

    `weight` holds the stored values (float8, int8, or uint8 packed int4), `weight_scale` and (int4) `weight_zero`
    their scales; all are parameters without gradients, so state dicts, `.to(device)` and streaming treat them as
    weights. A dtype conversion of the module (`.to(torch.bfloat16)`, `.half()`) converts the bias only: the stored
    weight keeps its format.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool, scheme: QuantScheme, device=None,
                 bias_dtype=None):
        super().__init__()
        self.in_features, self.out_features, self.scheme = in_features, out_features, scheme
        for name, (shape, dtype) in storage_shapes(out_features, in_features, scheme).items():
            self.register_parameter(name, nn.Parameter(torch.empty(shape, dtype=dtype, device=device),
                                                       requires_grad=False))
        if scheme.format != "int4":
            self.weight_zero = None
        self.bias = (nn.Parameter(torch.empty(out_features, dtype=bias_dtype, device=device), requires_grad=False)
                     if bias else None)
        self.use_kernel = False  # the Triton dequantizing matmul (CUDA, or the interpreter in tests)
        self.fp8_compute = False  # activations to fp8 per token, torch._scaled_mm (fp8 weights only)

    @classmethod
    def from_linear(cls, linear: nn.Module, scheme: QuantScheme) -> QuantizedLinear:
        """Quantizes a linear layer's weight (nn.Linear, or another QuantizedLinear: dequantized, then quantized)."""
        weight = linear.dequantize(torch.float32) if isinstance(linear, QuantizedLinear) else linear.weight
        stored = quantize_weight(weight, scheme)
        bias = linear.bias
        module = cls(linear.in_features, linear.out_features, bias is not None, scheme, device="meta")
        for name, tensor in stored.items():
            setattr(module, name, nn.Parameter(tensor, requires_grad=False))
        if bias is not None:
            module.bias = nn.Parameter(bias.detach(), requires_grad=False)
        return module

    @property
    def format(self) -> str:
        return self.scheme.format

    def stored_tensors(self) -> list[torch.Tensor]:
        return [t for t in (self.weight, self.weight_scale, self.weight_zero) if t is not None]

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The float weight (out_features, in_features) this layer stands for."""
        return dequantize_reference(self.weight, self.weight_scale, self.weight_zero, self.in_features, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fp8_compute:
            from framepack_kernels.quant_matmul import fp8_scaled_matmul

            return fp8_scaled_matmul(x, self.weight, self.weight_scale, self.bias)
        if self.use_kernel:
            from framepack_kernels.quant_matmul import quantized_matmul

            return quantized_matmul(x, self.weight, self.weight_scale, self.weight_zero, self.bias)
        return quantized_matmul_reference(x, self.weight, self.weight_scale, self.weight_zero, self.bias)

    def _apply(self, fn, recurse=True):
        stored = {id(t) for t in self.stored_tensors()}

        def keep_storage_dtype(tensor):
            if id(tensor) in stored:
                target = fn(tensor[:0])  # where (and in which dtype) fn would put it, on an empty slice
                if target.dtype != tensor.dtype:
                    return tensor.to(target.device)
            return fn(tensor)

        return super()._apply(keep_storage_dtype, recurse)

    def extra_repr(self) -> str:
        group = f", group_size={self.scheme.group_size}" if self.scheme.group_size else ""
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"format={self.format}{group}")


def parameter_count(model: nn.Module) -> int:
    """The model's parameters as weights, not stored values: a quantized layer counts in_features * out_features
    (+ bias) whatever its storage holds."""
    count = 0
    for module in model.modules():
        if isinstance(module, QuantizedLinear):
            count += module.in_features * module.out_features + (module.out_features if module.bias is not None else 0)
        else:
            count += sum(p.numel() for p in module.parameters(recurse=False))
    return count


def quantized_layers(model: nn.Module) -> list[QuantizedLinear]:
    return [module for module in model.modules() if isinstance(module, QuantizedLinear)]


def set_quantized_kernels(model: nn.Module, enabled: bool) -> nn.Module:
    """Quantized linears use the Triton dequantizing matmul (needs CUDA, or TRITON_INTERPRET=1) or the plain path."""
    for layer in quantized_layers(model):
        layer.use_kernel = bool(enabled)
    return model


def set_fp8_compute(model: nn.Module, enabled: bool) -> nn.Module:
    """fp8 linears multiply fp8 activations (quantized per token) on the fp8 tensor cores (torch._scaled_mm)."""
    layers = quantized_layers(model)
    if enabled:
        fp8 = [layer for layer in layers if layer.weight.dtype == torch.float8_e4m3fn]
        if not fp8:
            raise FramePackError("fp8 compute needs fp8 e4m3 weights: pass ", Option("quantize", "fp8"),
                                 " (or an fp8 checkpoint), or leave ", Option("fp8_compute"), " off.")
        layers = fp8
    for layer in layers:
        layer.fp8_compute = bool(enabled)
    return model


def check_fp8_compute_device(device: torch.device) -> None:
    """fp8 tensor cores: CUDA compute capability 8.9 (Ada) or newer."""
    if device.type != "cuda" or torch.cuda.get_device_capability(device) < (8, 9):
        where = device.type if device.type != "cuda" else f"compute capability {torch.cuda.get_device_capability(device)}"
        raise FramePackError(f"fp8 compute needs a GPU with fp8 tensor cores (Ada or Hopper, compute capability 8.9+), "
                             f"and this device is {where}: leave fp8_compute off (fp8 weights still halve memory).")


# --------------------------------------------------------------------------------------------------------------------
# Whole models
# --------------------------------------------------------------------------------------------------------------------


def quantize_modules(model: nn.Module, names: list[str], scheme: QuantScheme) -> nn.Module:
    """Replaces each named linear submodule of `model` by its QuantizedLinear, one at a time (the float weight of a
    layer is released as soon as it is quantized, so the peak is one layer's float32 copy)."""
    for name in names:
        model.set_submodule(name, QuantizedLinear.from_linear(model.get_submodule(name), scheme))
    release_freed_host_memory()  # else the C allocator keeps the float weights' memory in the process
    return model


def layers_to_quantize(dit, scheme: QuantScheme) -> list[str]:
    """The block linears quantize_dit(dit, scheme) replaces: those not already stored in the scheme's format and
    group size (however the checkpoint that stored them chose its modulation layers)."""
    return [name for name, layer in dit.block_linears(modulation=scheme.modulation)
            if not isinstance(layer, QuantizedLinear) or layer.scheme.storage != scheme.storage]


def quantize_dit(dit, scheme: QuantScheme):
    """The linears of the DiT's blocks, quantized in place (modulation projections when scheme.modulation); layers
    already stored in another format are dequantized and quantized again, those stored in this one are left alone."""
    return quantize_modules(dit, layers_to_quantize(dit, scheme), scheme)


def quantize_llama(model: nn.Module, scheme: QuantScheme) -> nn.Module:
    """Every linear of a transformers Llama model's decoder layers (attention and MLP projections); the token
    embedding and the norms stay as they are."""
    names = [name for name, module in model.named_modules() if isinstance(module, (nn.Linear, QuantizedLinear))]
    return quantize_modules(model, names, scheme)


def quantized_layer_names(state_dict: dict[str, torch.Tensor]) -> list[str]:
    """The layers of a state dict that are stored quantized: those with a `weight_scale`."""
    return [key[: -len(".weight_scale")] for key in state_dict if key.endswith(".weight_scale")]


def dequantize_stored_layers(model: nn.Module, state_dict: dict[str, torch.Tensor], names: list[str],
                             dtype: torch.dtype) -> None:
    """Folds the named layers of a quantized state dict back into float `dtype` weights, in place (their scales and
    zero points dropped), so they load as the model's own float linears."""
    for name in names:
        scale = state_dict.pop(name + ".weight_scale")
        zero = state_dict.pop(name + ".weight_zero", None)
        if _stored_weight(state_dict, name).dtype == torch.uint8 and zero is None:
            raise FramePackError(f"The checkpoint has {name}.weight_scale but no {name}.weight_zero (its int4 zero "
                                 "points): point at a complete checkpoint of this model.")
        in_features = model.get_submodule(name).in_features
        state_dict[name + ".weight"] = dequantize_reference(state_dict[name + ".weight"], scale, zero, in_features,
                                                            dtype)
    if names:
        release_freed_host_memory()  # the float32 temporaries, which glibc would keep


def _stored_weight(state_dict: dict[str, torch.Tensor], name: str) -> torch.Tensor:
    """The stored values of a layer the checkpoint gives a scale for; a checkpoint missing them is refused."""
    stored = state_dict.get(name + ".weight")
    if stored is None:
        raise FramePackError(f"The checkpoint has {name}.weight_scale but no {name}.weight: point at a complete "
                             "checkpoint of this model.")
    return stored


def _stored_scheme(stored: torch.Tensor, scale: torch.Tensor, scheme: QuantScheme) -> QuantScheme:
    """The scheme one stored layer follows, read off its storage: a checkpoint may mix formats (a community fp8 file
    beside our own layers, an optimum-quanto file quantized with several qtypes)."""
    if stored.dtype in FP8_DTYPES:
        return QuantScheme("fp8", modulation=scheme.modulation)
    if stored.dtype == torch.int8:
        return QuantScheme("int8", modulation=scheme.modulation)
    if stored.dtype == torch.uint8 and scale.ndim == 2 and scale.shape[1]:
        group_size = int4_group_size(stored, scale)
        if group_size in INT4_GROUP_SIZES:
            return QuantScheme("int4", group_size, modulation=scheme.modulation)
    return scheme


def build_quantized_layers(model: nn.Module, state_dict: dict[str, torch.Tensor], scheme: QuantScheme) -> nn.Module:
    """Before `load_state_dict(assign=True)` of a pre-quantized state dict: every layer stored quantized becomes an
    empty QuantizedLinear on the meta device, so the stored tensors are assigned as they are (no float copy)."""
    for name in quantized_layer_names(state_dict):
        try:
            linear = model.get_submodule(name)
        except AttributeError:
            raise FramePackError(f"The checkpoint quantizes {name!r}, which this model does not have: "
                                 "point at a checkpoint of this model.") from None
        stored, scale = _stored_weight(state_dict, name), state_dict[name + ".weight_scale"]
        layer_scheme = _stored_scheme(stored, scale, scheme)
        module = QuantizedLinear(linear.in_features, linear.out_features, linear.bias is not None, layer_scheme,
                                 device="meta")
        expected = storage_shapes(linear.out_features, linear.in_features, layer_scheme)
        for key, (shape, _) in expected.items():
            if name + "." + key not in state_dict:
                raise FramePackError(f"The checkpoint stores {name} as {layer_scheme.format} but has no {name}.{key}: "
                                     "write it again with `framepack quantize`.")
            if tuple(state_dict[name + "." + key].shape) != shape:
                raise FramePackError(
                    f"The checkpoint's {name}.{key} has shape {tuple(state_dict[name + '.' + key].shape)}, not "
                    f"{shape} as its {layer_scheme.format} format gives: write it again with `framepack quantize`.")
        if stored.dtype in FP8_DTYPES:
            module.weight = nn.Parameter(torch.empty(stored.shape, dtype=stored.dtype, device="meta"),
                                         requires_grad=False)
        model.set_submodule(name, module)
    return model
