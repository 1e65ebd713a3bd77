"""optimum-quanto checkpoints, read into our quantized formats one layer at a time (never a float copy of the model).

What optimum-quanto (0.2.x; read from its source and from files it wrote) stores for a frozen `QLinear` named
`<layer>`, in a single file of `model.state_dict()` or in a diffusers folder written by `save_pretrained` after
`quantization_config=QuantoConfig(weights_dtype=...)` (its config.json then has a quantization_config with
quant_method "quanto"):

  qint8, qfloat8 (e4m3fn), qfloat8_e5m2, qfloat8_e4m3fnuz
    <layer>.weight._data        (out, in) int8 or float8 values
    <layer>.weight._scale       (out, 1), the model's dtype:                 w = _data * _scale
  qint4, qint2
    <layer>.weight._data._data  uint8: `rows` rows of values in [0, 15] (or [0, 3]) packed along the first dimension,
                                byte row i holding rows i, i + P, i + 2P, ... (P packed rows), lowest bits first
    <layer>.weight._scale       (rows, 1) and <layer>.weight._shift (rows, 1): w = q * _scale - _shift for a float
                                shift, w = (q - _shift) * _scale for an integer zero point
    rows: one per group of `group_size` consecutive inputs of each output row (row-major), group_size 128 or else the
    first of 96, 64 that divides in_features; one per output channel when in_features <= 128 or none divides.
  every QLinear: <layer>.input_scale and <layer>.output_scale (activation scales, 1 unless activations were quantized)
  (`quantization_map(model)`, {layer: {"weights": qtype name, "activations": ...}}, is read from the metadata entry
  "quantization_map" when a file carries it.)

Into framepack_engine.runtime.quant's layouts:
  qint8           -> int8: the values as stored (memory-mapped), the scale in float32. Exact.
  qfloat8, _e5m2  -> fp8: the values as stored (our fp8 layout and kernels take e4m3 and e5m2), scale in float32. Exact.
  qint4, qint2    -> int4: the values as stored (2-bit values are 4-bit values in [0, 3]); each quanto group is cut
                     into groups of our size (the largest of 128, 64, 32 that divides it, so 96 -> 32; a layer with
                     one group per output channel is padded to whole groups), each with its group's scale (bf16)
                     and zero point shift / scale (fp16). The only changes are roundings: the fp16 zero point moves a
                     weight by at most 2^-11 of its group's largest magnitude, and a float32 scale (a model saved in
                     float32) rounded to bf16 moves it by at most 15 * 2^-8 of the scale.
  qfloat8_e4m3fnuz, or a group our layout cannot hold (a zero point out of fp16's range, a zero scale with a nonzero
                  shift) -> the layer is dequantized to the model's dtype and loads as a float layer.
  Activation scales are dropped: activations stay in the model's dtype (weights-only quantization).

Why we read the layout ourselves rather than import optimum-quanto: the engine keeps quantized weights as plain
tensors (framepack_engine.runtime.quant says why), a reader is a hundred lines, and the runtime gains no dependency;
optimum-quanto is a test dependency that writes the files the tests read.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

import torch

from framepack_engine.errors import ModelSourceError
from framepack_kernels.reference import pack_int4

DATA = ".weight._data"
PACKED = ".weight._data._data"
SCALE = ".weight._scale"
SHIFT = ".weight._shift"
ACTIVATION_SCALES = (".input_scale", ".output_scale")
MAP_METADATA_KEY = "quantization_map"
# Our int4 group sizes a converted layer takes, largest first (quanto's are 128, 96, 64 or a whole row).
_GROUP_SIZES = (128, 64, 32)
# The 8-bit values our int8 and fp8 layouts hold as they are.
_BYTE_DTYPES = (torch.int8, torch.float8_e4m3fn, torch.float8_e5m2)
_FP16_MAX = 65504.0  # torch.finfo(torch.float16).max
# diffusers' QuantoConfig weights_dtype values, all read here.
DIFFUSERS_WEIGHTS_DTYPES = ("int8", "float8", "int4", "int2")


@dataclass(frozen=True)
class QuantoLayer:
    """One quanto-quantized linear, as its file's headers describe it."""

    name: str  # the layer's key in the file (prefix included)
    file: str  # the file holding its values, for messages
    bits: int  # 8 (int8 / float8 values), 4 or 2 (packed)
    rows: int  # rows of quanto's values: out_features, or the number of groups
    out_features: int
    in_features: int
    group_size: int  # quanto's group: in_features when there is one group per output channel

    @property
    def packed(self) -> bool:
        return self.bits < 8

    @property
    def keys(self) -> tuple[str, ...]:
        values = (self.name + PACKED,) if self.packed else (self.name + DATA,)
        shift = (self.name + SHIFT,) if self.packed else ()
        return values + (self.name + SCALE,) + shift + tuple(self.name + s for s in ACTIVATION_SCALES)


def _layout_error(layer: QuantoLayer | str, file: str, problem: str) -> ModelSourceError:
    name = layer.name if isinstance(layer, QuantoLayer) else layer
    return ModelSourceError(
        f"{file!r}: the optimum-quanto layer {name!r} {problem}: expected quanto's layout (<layer>.weight._data with "
        "._scale, or a packed <layer>.weight._data._data with ._scale and ._shift, and the layer's bias), as "
        "optimum-quanto 0.2 writes it; save the model again with it.")


def layer_names(keys) -> list[str]:
    """The layers of a checkpoint that quanto stored quantized (none for any other checkpoint)."""
    names = []
    for key in keys:
        if key.endswith(PACKED):
            names.append(key[: -len(PACKED)])
        elif key.endswith(DATA):
            names.append(key[: -len(DATA)])
    return names


def is_quanto(keys) -> bool:
    return any(key.endswith((DATA, PACKED)) for key in keys)


def _quantization_map(metadata: dict) -> dict:
    text = (metadata or {}).get(MAP_METADATA_KEY)
    if text is None:
        return {}
    try:
        values = json.loads(text)
    except ValueError:
        values = None
    if not isinstance(values, dict):
        raise ModelSourceError(f"The checkpoint's {MAP_METADATA_KEY} metadata is not a JSON object of layers: save "
                               "it again with optimum-quanto's quantization_map(model).")
    return values


def describe_layers(checkpoint) -> dict[str, QuantoLayer]:
    """Every quanto layer of `checkpoint` (framepack_engine.runtime.sources.Checkpoint), from the headers only."""
    keys = set(checkpoint.keys())
    mapped = _quantization_map(checkpoint.metadata)
    layers = {}
    for name in layer_names(checkpoint.keys()):
        layers[name] = _describe(checkpoint, keys, name, mapped.get(name, {}))
    return layers


def _shape(checkpoint, keys, key: str, layer: str, file: str) -> tuple[int, ...]:
    if key not in keys:
        raise _layout_error(layer, file, f"has no {key[len(layer):]!r}")
    return tuple(int(s) for s in checkpoint.shape(key))


def _describe(checkpoint, keys, name: str, mapped: dict) -> QuantoLayer:
    packed = name + PACKED in keys
    values_key = name + (PACKED if packed else DATA)
    file = checkpoint.handles[values_key][0].name
    values = _shape(checkpoint, keys, values_key, name, file)
    scale = _shape(checkpoint, keys, name + SCALE, name, file)
    if len(values) != 2 or len(scale) not in (1, 2) or (len(scale) == 2 and scale[1] != 1):
        raise _layout_error(name, file, f"holds values of shape {values} and a scale of shape {scale}, not a 2-D "
                                        "weight with one scale per row")
    bias = tuple(int(s) for s in checkpoint.shape(name + ".bias")) if name + ".bias" in keys else None
    if not packed:
        if scale[0] != values[0] or (bias is not None and bias != (values[0],)):
            raise _layout_error(name, file, f"has {scale[0]} scales (bias {bias}) for {values[0]} output channels")
        return QuantoLayer(name, file, 8, values[0], values[0], values[1], values[1])
    if _shape(checkpoint, keys, name + SHIFT, name, file) != scale:
        raise _layout_error(name, file, "has a shift whose shape differs from its scale's")
    rows, packed_rows, columns = scale[0], values[0], values[1]
    bits = {"qint4": 4, "qint2": 2}.get(mapped.get("weights"))
    if bits is None:  # from the packing: 2 values a byte (4-bit) or 4 (2-bit)
        bits = 4 if packed_rows == math.ceil(rows / 2) else 2 if packed_rows == math.ceil(rows / 4) else None
    if bits is None or packed_rows != math.ceil(rows / (8 // bits)):
        raise _layout_error(name, file, f"packs {rows} rows of values into {packed_rows}, which is neither 4-bit nor "
                                        "2-bit packing")
    if bias is None or len(bias) != 1:
        raise _layout_error(name, file, "has no bias, so its 4-bit weight's shape cannot be told")
    out_features = bias[0]
    if rows == out_features:  # one group per output channel
        return QuantoLayer(name, file, bits, rows, out_features, columns, columns)
    if (rows * columns) % out_features:
        raise _layout_error(name, file, f"holds {rows} groups of {columns} values for {out_features} output channels")
    return QuantoLayer(name, file, bits, rows, out_features, rows * columns // out_features, columns)


def weight_shapes(layers: dict[str, QuantoLayer]) -> dict[str, tuple[int, int]]:
    """The float weight each layer stands for, by its `<layer>.weight` key: what a config is inferred from."""
    return {name + ".weight": (layer.out_features, layer.in_features) for name, layer in layers.items()}


def int4_group_size(layer: QuantoLayer) -> int | None:
    """Our int4 group size for a packed layer: the largest that divides quanto's group (each of its groups becomes
    whole groups of ours), or for one group per output channel the smallest that holds the row (else 128, padded);
    None where none divides."""
    if layer.group_size == layer.in_features:
        return next((size for size in reversed(_GROUP_SIZES) if size >= layer.in_features), _GROUP_SIZES[0])
    return next((size for size in _GROUP_SIZES if layer.group_size % size == 0), None)


def _unpack(packed: torch.Tensor, bits: int, rows: int) -> torch.Tensor:
    """quanto's packing undone: (packed rows, columns) uint8 -> (rows, columns) uint8 values."""
    mask = (1 << bits) - 1
    return torch.cat([(packed >> (bits * i)) & mask for i in range(8 // bits)], dim=0)[:rows]


def _affine(checkpoint, layer: QuantoLayer) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, bool]:
    """(values (out, in) uint8, scale (out, groups), shift (out, groups), whether the shift is a float) of a
    packed layer."""
    values = _unpack(checkpoint.get(layer.name + PACKED), layer.bits, layer.rows)
    groups = layer.in_features // layer.group_size
    scale = checkpoint.get(layer.name + SCALE).reshape(layer.out_features, groups)
    shift = checkpoint.get(layer.name + SHIFT)
    return (values.reshape(layer.out_features, layer.in_features), scale, shift.reshape(layer.out_features, groups),
            shift.is_floating_point())


def dequantized_weight(checkpoint, layer: QuantoLayer, dtype: torch.dtype) -> torch.Tensor:
    """The float weight (out, in) a quanto layer stands for, as quanto computes it (in float32), in `dtype`."""
    if not layer.packed:
        values = checkpoint.get(layer.name + DATA)
        return (values.float() * checkpoint.get(layer.name + SCALE).float().reshape(-1, 1)).to(dtype)
    values, scale, shift, float_shift = _affine(checkpoint, layer)
    grouped = values.float().reshape(layer.out_features, -1, layer.group_size)
    scale, shift = scale.float()[:, :, None], shift.float()[:, :, None]
    weight = grouped * scale - shift if float_shift else (grouped - shift) * scale
    return weight.reshape(layer.out_features, layer.in_features).to(dtype)


def stored_tensors(checkpoint, layer: QuantoLayer) -> dict[str, torch.Tensor] | None:
    """The layer in our layout ({"weight", "weight_scale"[, "weight_zero"]}, framepack_engine.runtime.quant), or None
    where ours cannot hold it (the caller loads it dequantized)."""
    if not layer.packed:
        values = checkpoint.get(layer.name + DATA)
        if values.dtype not in _BYTE_DTYPES:
            if values.dtype == torch.float8_e4m3fnuz:
                return None
            raise _layout_error(layer, layer.file, f"stores {values.dtype} values, not int8 or float8")
        return {"weight": values, "weight_scale": checkpoint.get(layer.name + SCALE).float().reshape(-1)}
    group_size = int4_group_size(layer)
    if group_size is None:
        return None
    values, scale, shift, float_shift = _affine(checkpoint, layer)
    ours = scale.to(torch.bfloat16)
    # w = q * s - shift = (q - shift / s) * s: the zero point against the stored (bf16) scale keeps q's offset exact.
    zero = shift.float() / ours.float() if float_shift else shift.float()
    if not bool(torch.isfinite(zero).all()) or float(zero.abs().max()) > _FP16_MAX:
        return None
    padded = math.ceil(layer.in_features / group_size) * group_size
    repeats = layer.group_size // group_size if layer.group_size != layer.in_features else padded // group_size
    values = torch.nn.functional.pad(values, (0, padded - layer.in_features))
    return {"weight": pack_int4(values),
            "weight_scale": ours.repeat_interleave(repeats, dim=1).contiguous(),
            "weight_zero": zero.to(torch.float16).repeat_interleave(repeats, dim=1).contiguous()}


def check_quantization_config(config: dict, name: str) -> None:
    """A diffusers folder's config.json may name how its weights were quantized: quanto's is read (this module),
    any other method (bitsandbytes, gguf, torchao, ...) is refused with one line."""
    quantization = config.get("quantization_config")
    if quantization is None:
        return
    method = quantization.get("quant_method") if isinstance(quantization, dict) else None
    if method != "quanto":
        raise ModelSourceError(
            f"{name!r} was quantized with {method or 'an unnamed method'} (its config.json's quantization_config), "
            "which we do not read: use the bf16 checkpoint (and --quantize fp8|int8|int4), one saved with "
            "optimum-quanto, a `framepack quantize` output or a community fp8 file.")
    weights = quantization.get("weights_dtype", "int8")
    if weights not in DIFFUSERS_WEIGHTS_DTYPES:
        raise ModelSourceError(
            f"{name!r} names optimum-quanto weights {weights!r} in its quantization_config, not one of "
            f"{', '.join(DIFFUSERS_WEIGHTS_DTYPES)}: save it again with diffusers' QuantoConfig.")
