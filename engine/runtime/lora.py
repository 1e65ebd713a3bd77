"""LoRA adapters for the FramePack DiT: the layouts users have, fused into the weights or live beside them.

Layouts, detected from the keys (never from the file name):
  kohya / musubi-tuner  `lora_unet_<module path, "." written "_">.lora_down.weight`, `.lora_up.weight`, `.alpha`
                        (musubi-tuner's split projections as `lora_down.0.weight`, `lora_up.0.weight`, ...)
  diffusers / PEFT      `transformer.<module>.lora_A.weight`, `.lora_B.weight` as diffusers and diffusion-pipe write
                        them (`base_model.model.` or no prefix from PEFT itself); alpha from the file's
                        `lora_adapter_metadata` or, for a PEFT folder, its adapter_config.json
  ComfyUI               `diffusion_model.<module>.lora_A.weight` / `.lora_B.weight` (or lora_down / lora_up), `.alpha`
  musubi-tuner's        `convert_lora.py --target other`: `diffusion_model.` (or no prefix) and the kohya name with
  convert_lora          its underscores turned into dots (`single.transformer.blocks.0.attn.to.k`, some put back:
                        `attn_to.k`), alpha folded into both matrices
each with FramePack's module names (the checkpoint's: `transformer_blocks.0.attn.to_q`) or the original HunyuanVideo
names (`double_blocks.0.img_attn_qkv`, `single_blocks.0.linear1`, ...), whose fused projections are split into ours.
A module name that matches no layer as written is compared with dots and underscores alike, and taken when that
names exactly one layer. Keys of text-encoder adapters (`text_encoder.*`, `lora_te_*`, `lora_te1_*`, `lora_te2_*`)
are skipped with one warning: only the DiT takes LoRAs here.

An adapter of a linear layer W (out x in) is `down` (rank x in), `up` (out x rank) and a scale (alpha / rank, or
alpha / sqrt(rank) for rank-stabilized LoRAs; 1 without an alpha); with strength s the layer computes
    W x + s * scale * up (down x)        (+ s * scale * up_bias where lora_B has a bias)
Fused: s * scale * up @ down is added to W, always from W's untouched original, which is kept on the host so that
unloading restores W bit for bit. Live: the layer is wrapped (`LoraLinear`) and the low-rank branch runs beside it,
so LoRAs and strengths change between generations without touching W; the wrapper works over any linear-like layer
(a quantized one too), and its adapters are parameters of the block, so they move wherever the block's weights go.
"""

from __future__ import annotations

import json
import math
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from framepack_engine.errors import FramePackError, FramePackWarning, Option
from framepack_engine.runtime.identity import weights_sha256
from framepack_engine.runtime.sources import PICKLE_SUFFIXES

LORA_MODES = ("fused", "live")
_FLOAT_WEIGHT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)

# `<module>.<lora_down|lora_up|lora_A|lora_B>[.<part>][.<adapter name>].<weight|bias>`
_WEIGHT_KEY = re.compile(r"^(?P<module>.+?)\.(?P<kind>lora_down|lora_up|lora_A|lora_B)(?:\.(?P<part>\d+))?"
                         r"(?:\.[A-Za-z_][\w-]*)?\.(?P<param>weight|bias)$")
_DOWN_KINDS = ("lora_down", "lora_A")
# musubi-tuner's network-level flags (scalar tensors next to the adapters).
_RSLORA_FLAG, _DORA_FLAG = "use_rslora_flag", "use_dora_flag"
# Adapter kinds we recognise but do not apply: (text in the key, what it is).
_UNSUPPORTED_KINDS = ((".dora_scale", "DoRA"), (".dora_layer", "DoRA"), (".lora_magnitude_vector", "DoRA"),
                      (".hada_", "LoHa"), (".lokr_", "LoKr"), (".lora_mid", "LoCon"), (".oft_", "OFT"))
_UNSUPPORTED_SUFFIXES = ((".diff", "full weight difference"), (".diff_b", "full bias difference"))

# Keys of text-encoder adapters (kohya's lora_te*, diffusers' text_encoder*): skipped, only the DiT takes LoRAs.
_TEXT_ENCODER_PREFIXES = ("text_encoder.", "text_encoder_2.", "lora_te_", "lora_te1_", "lora_te2_")
# Key prefixes before the module name, longest first, with the family of layouts that writes them.
_PREFIXES = (("lora_unet_", "kohya/musubi-tuner"), ("lora_transformer_", "kohya/musubi-tuner"),
             ("model.diffusion_model.", "ComfyUI"), ("diffusion_model.", "ComfyUI"),
             ("base_model.model.", "diffusers/PEFT"), ("transformer.", "diffusers/PEFT"))

# Original HunyuanVideo module names -> ours, per kind of block; a list of several is one fused projection whose
# output rows are ours, in order (so its lora_up is split by rows and its lora_down shared).
_DOUBLE_BLOCK = {
    "img_mod.linear": ["norm1.linear"], "img_attn_qkv": ["attn.to_q", "attn.to_k", "attn.to_v"],
    "img_attn_proj": ["attn.to_out.0"], "img_mlp.fc1": ["ff.net.0.proj"], "img_mlp.fc2": ["ff.net.2"],
    "txt_mod.linear": ["norm1_context.linear"],
    "txt_attn_qkv": ["attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"],
    "txt_attn_proj": ["attn.to_add_out"], "txt_mlp.fc1": ["ff_context.net.0.proj"], "txt_mlp.fc2": ["ff_context.net.2"],
}
_SINGLE_BLOCK = {"linear1": ["attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"], "linear2": ["proj_out"],
                 "modulation.linear": ["norm.linear"]}
_REFINER_BLOCK = {"self_attn_qkv": ["attn.to_q", "attn.to_k", "attn.to_v"], "self_attn_proj": ["attn.to_out.0"],
                  "mlp.fc1": ["ff.net.0.proj"], "mlp.fc2": ["ff.net.2"], "adaLN_modulation.1": ["norm_out.linear"]}
_BLOCKS = (("double_blocks.", "transformer_blocks.", _DOUBLE_BLOCK),
           ("single_blocks.", "single_transformer_blocks.", _SINGLE_BLOCK),
           ("txt_in.individual_token_refiner.blocks.", "context_embedder.token_refiner.refiner_blocks.",
            _REFINER_BLOCK))
# The layers outside the blocks: the model's own and its text refiner's (txt_in), each by its prefix.
_TOP_LEVEL = {
    "time_in.mlp.0": "time_text_embed.timestep_embedder.linear_1",
    "time_in.mlp.2": "time_text_embed.timestep_embedder.linear_2",
    "guidance_in.mlp.0": "time_text_embed.guidance_embedder.linear_1",
    "guidance_in.mlp.2": "time_text_embed.guidance_embedder.linear_2",
    "vector_in.in_layer": "time_text_embed.text_embedder.linear_1",
    "vector_in.out_layer": "time_text_embed.text_embedder.linear_2",
    "final_layer.linear": "proj_out",
    "final_layer.adaLN_modulation.1": "norm_out.linear",
}
_TEXT_REFINER = {
    "input_embedder": "proj_in",
    "t_embedder.mlp.0": "time_text_embed.timestep_embedder.linear_1",
    "t_embedder.mlp.2": "time_text_embed.timestep_embedder.linear_2",
    "c_embedder.linear_1": "time_text_embed.text_embedder.linear_1",
    "c_embedder.linear_2": "time_text_embed.text_embedder.linear_2",
}
_UNINDEXED = (("", "", _TOP_LEVEL), ("txt_in.", "context_embedder.", _TEXT_REFINER))
# HunyuanVideo's final modulation gives (shift, scale); ours (the checkpoint's norm_out) gives (scale, shift).
_SWAPPED_HALVES = {"final_layer.adaLN_modulation.1"}


# ----------------------------------------------------------------------------------------------------------------------
# Adapters as read


@dataclass
class LowRank:
    """One layer's adapter in float32: the layer gains strength * scale * (up @ down) (and up_bias, scaled alike)."""

    down: torch.Tensor  # (rank, in_features)
    up: torch.Tensor  # (out_features, rank)
    scale: float
    up_bias: torch.Tensor | None = None  # (out_features,)

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    def delta_weight(self, device=None) -> torch.Tensor:
        return (self.up.to(device) @ self.down.to(device)) * self.scale

    def delta_bias(self, device=None) -> torch.Tensor | None:
        return None if self.up_bias is None else self.up_bias.to(device) * self.scale


@dataclass
class LoraWeights:
    """A LoRA file mapped onto the DiT: one adapter per linear layer it touches, by the layer's checkpoint name."""

    layout: str  # e.g. "kohya/musubi-tuner, HunyuanVideo names"
    adapters: dict[str, LowRank]


@dataclass
class _Entry:
    """The tensors of one module of the file, as found."""

    down: dict[int, torch.Tensor] = field(default_factory=dict)  # part -> (rank, in); part 0 when not split
    up: dict[int, torch.Tensor] = field(default_factory=dict)  # part -> (out, rank)
    up_bias: dict[int, torch.Tensor] = field(default_factory=dict)
    alpha: float | None = None


def check_lora_source(path: str | Path) -> Path:
    """The LoRA file (a .safetensors file, or a PEFT folder holding adapter_model.safetensors), or a FramePackError;
    cheap, so it runs before any model loads."""
    path = Path(path).expanduser()
    if path.suffix in PICKLE_SUFFIXES:
        raise FramePackError(f"LoRA {path.name!r} is a pickle file, which we refuse to load (it can run code): "
                             "convert it to .safetensors or use the safetensors release of the LoRA.")
    if not path.exists():
        raise FramePackError(f"LoRA {path.name!r} does not exist: check the path.")
    if path.is_dir():
        if not (path / "adapter_model.safetensors").is_file():
            raise FramePackError(f"The folder {path.name!r} holds no adapter_model.safetensors: point at the LoRA's "
                                 ".safetensors file.")
        return path / "adapter_model.safetensors"
    if path.suffix not in (".safetensors", ".sft"):
        raise FramePackError(f"LoRA {path.name!r} is not a .safetensors file: give the LoRA's .safetensors file.")
    return path


def _read_file(file: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import SafetensorError, safe_open

    from framepack_engine.runtime.sources import check_finite

    try:
        with safe_open(str(file), framework="pt") as handle:
            return ({key: check_finite(handle.get_tensor(key), key, f"LoRA {file.name!r}") for key in handle.keys()},
                    dict(handle.metadata() or {}))
    except (SafetensorError, OSError, ValueError, RuntimeError) as error:
        raise FramePackError(f"LoRA {file.name!r} is not a readable safetensors file ({error}): "
                             "download it again.") from None


def _peft_config(file: Path, metadata: dict[str, str]) -> dict:
    """PEFT's LoraConfig entries (r, lora_alpha, alpha_pattern, use_rslora) where the file says them: diffusers'
    `lora_adapter_metadata` (keys prefixed `transformer.`) or the adapter_config.json of a PEFT folder."""
    if "lora_adapter_metadata" in metadata:
        entries = json.loads(metadata["lora_adapter_metadata"])
        return {key.split(".", 1)[1] if key.startswith("transformer.") else key: value
                for key, value in entries.items()}
    config_file = file.parent / "adapter_config.json"
    if file.name == "adapter_model.safetensors" and config_file.is_file():
        return json.loads(config_file.read_text())
    return {}


def _hunyuan_video_names(layer_names) -> dict[str, list[str]]:
    """Original HunyuanVideo module names -> our layers, for the blocks this model has."""
    names = {}
    present = set(layer_names)
    for original_prefix, our_prefix, table in _BLOCKS:
        indices = {name[len(our_prefix):].split(".", 1)[0] for name in present if name.startswith(our_prefix)}
        for index in indices:
            for original, ours in table.items():
                targets = [f"{our_prefix}{index}.{name}" for name in ours]
                if all(target in present for target in targets):
                    names[f"{original_prefix}{index}.{original}"] = targets
    for original_prefix, our_prefix, table in _UNINDEXED:
        for original, ours in table.items():
            if our_prefix + ours in present:
                names[original_prefix + original] = [our_prefix + ours]
    return names


def _prefix_of(modules: list[str]) -> tuple[str, str]:
    """The key prefix most modules share, and the layout family that writes it."""
    best = ("", "")
    best_count = 0
    for prefix, family in _PREFIXES:
        count = sum(module.startswith(prefix) for module in modules)
        if count > best_count:
            best, best_count = (prefix, family), count
    return best


def _refuse_unsupported(name: str, keys: list[str], tensors: dict[str, torch.Tensor]) -> None:
    for key in keys:
        kind = next((kind for text, kind in _UNSUPPORTED_KINDS if text in key), None)
        kind = kind or next((kind for suffix, kind in _UNSUPPORTED_SUFFIXES if key.endswith(suffix)), None)
        if kind:
            raise FramePackError(f"LoRA {name!r} is a {kind} adapter ({key!r}), which this engine does not apply: "
                                 "use a plain LoRA (lora_down/lora_up or lora_A/lora_B weights).")
    if _DORA_FLAG in tensors and bool(tensors[_DORA_FLAG]):
        raise FramePackError(f"LoRA {name!r} was trained as DoRA (use_dora_flag), which this engine does not apply: "
                             "use a plain LoRA.")


def _scale(rank: int, alpha: float | None, module: str, peft: dict, rslora: bool) -> float:
    """alpha / rank (alpha / sqrt(rank) when rank-stabilized); an alpha of 0 or none at all means no scaling."""
    if alpha is None and peft:
        alpha = peft.get("lora_alpha")
        # PEFT's rule: the first pattern that matches the end of the module's name, in the config's order.
        for pattern, value in (peft.get("alpha_pattern") or {}).items():
            if re.fullmatch(rf"(.*\.)?({pattern})", module):
                alpha = value
                break
        rslora = rslora or bool(peft.get("use_rslora"))
    if alpha is None or alpha == 0:
        return 1.0
    return float(alpha) / (math.sqrt(rank) if rslora else rank)


def _joined(entry: _Entry, module: str, name: str, peft: dict, rslora: bool) -> LowRank:
    """One adapter from the module's tensors; musubi-tuner's split parts become one block-diagonal adapter."""
    if not entry.down or sorted(entry.down) != sorted(entry.up):
        missing = "lora_up" if not entry.up or len(entry.up) < len(entry.down) else "lora_down"
        raise FramePackError(f"LoRA {name!r} has no {missing} weight for {module!r}: the file is incomplete; "
                             "download it again.")
    parts = []
    for part in sorted(entry.down):
        down, up = entry.down[part].float(), entry.up[part].float()
        if down.ndim != 2 or up.ndim != 2 or down.shape[0] != up.shape[1]:
            raise FramePackError(
                f"LoRA {name!r}: {module!r} has lora_down {tuple(down.shape)} and lora_up {tuple(up.shape)}, which "
                "are not a matching pair of low-rank matrices (convolution LoRAs are not supported).")
        bias = entry.up_bias.get(part)
        parts.append(LowRank(down, up, _scale(down.shape[0], entry.alpha, module, peft, rslora),
                             None if bias is None else bias.float()))
    if len(parts) == 1:
        return parts[0]
    if len({part.up_bias is None for part in parts}) > 1:
        raise FramePackError(f"LoRA {name!r}: only some parts of {module!r} have a bias: the file is inconsistent.")
    # Each part's scale folded into its lora_up; the parts' output rows stacked in order.
    return LowRank(torch.cat([part.down for part in parts]), torch.block_diag(*(part.up * part.scale for part in parts)),
                   1.0, None if parts[0].up_bias is None else torch.cat([part.delta_bias() for part in parts]))


def _split(adapter: LowRank, original: str, targets: list[str], shapes: dict[str, tuple[int, int]],
           name: str) -> dict[str, LowRank]:
    """A fused projection's adapter split by output rows into our layers' (lora_down shared)."""
    up, bias = adapter.up, adapter.up_bias
    if original in _SWAPPED_HALVES:
        up = torch.cat(up.chunk(2, dim=0)[::-1])
        bias = None if bias is None else torch.cat(bias.chunk(2)[::-1])
    sizes = [shapes[target][0] for target in targets]
    if up.shape[0] != sum(sizes):
        raise FramePackError(
            f"LoRA {name!r}: {original!r} has {up.shape[0]} output rows, but this DiT's "
            f"{', '.join(targets)} have {sum(sizes)}: the LoRA is for a model of another size.")
    ups = up.split(sizes)
    biases = bias.split(sizes) if bias is not None else [None] * len(targets)
    return {target: LowRank(adapter.down, part, adapter.scale, part_bias)
            for target, part, part_bias in zip(targets, ups, biases)}


def read_lora(path: str | Path, shapes: dict[str, tuple[int, int]]) -> LoraWeights:
    """The adapters of a LoRA file, mapped onto the layers `shapes` names ({checkpoint name: (out, in)}).

    Every LoRA module must map onto a layer of matching shape: a file for another model is refused as a whole,
    with the first modules that match nothing and the layout detected.
    """
    file = check_lora_source(path)
    name = Path(path).name
    tensors, metadata = _read_file(file)
    keys = [key for key in tensors if key not in (_RSLORA_FLAG, _DORA_FLAG)]
    text_encoder_keys = [key for key in keys if key.startswith(_TEXT_ENCODER_PREFIXES)]
    if text_encoder_keys:
        keys = [key for key in keys if not key.startswith(_TEXT_ENCODER_PREFIXES)]
        if not keys:
            raise FramePackError(
                f"LoRA {name!r} holds nothing for the DiT: all its {len(text_encoder_keys)} keys are text-encoder "
                "adapters (text_encoder.*, lora_te_*), and this engine applies LoRAs to the DiT only: use a LoRA "
                "trained for the FramePack or HunyuanVideo transformer.")
    _refuse_unsupported(name, keys, tensors)
    rslora = bool(tensors[_RSLORA_FLAG]) if _RSLORA_FLAG in tensors else False

    entries: dict[str, _Entry] = {}
    stray = []
    kinds = set()
    for key in keys:
        match = _WEIGHT_KEY.match(key)
        if match:
            entry = entries.setdefault(match["module"], _Entry())
            part = int(match["part"] or 0)
            is_down = match["kind"] in _DOWN_KINDS
            kinds.add(match["kind"])
            if match["param"] == "bias":
                if is_down:
                    raise FramePackError(f"LoRA {name!r} has a lora_down bias ({key!r}), which no LoRA trainer "
                                         "writes: the file is not a LoRA this engine knows.")
                entry.up_bias[part] = tensors[key]
            else:
                (entry.down if is_down else entry.up)[part] = tensors[key]
        elif key.endswith(".alpha"):
            entries.setdefault(key[: -len(".alpha")], _Entry()).alpha = float(tensors[key].float().reshape(-1)[0])
        else:
            stray.append(key)
    if not any(entry.down or entry.up for entry in entries.values()):
        raise FramePackError(f"LoRA {name!r} holds no LoRA weights (no lora_down/lora_up or lora_A/lora_B tensors): "
                             "check that it is a LoRA file.")

    modules = list(entries)
    prefix, family = _prefix_of(modules)
    if not family:
        family = "diffusers/PEFT" if kinds & {"lora_A", "lora_B"} else "kohya/musubi-tuner"
    hunyuan = _hunyuan_video_names(shapes)
    ours = set(shapes)
    # Every layer name with dots and underscores alike (kohya writes "_" for ".", musubi-tuner's convert_lora "." for
    # "_"); None where two layers fold to the same name, so that a folded name is taken only when unambiguous.
    folded: dict[str, str | None] = {}
    for layer in [*ours, *hunyuan]:
        key = _folded(layer)
        folded[key] = layer if folded.get(key, layer) == layer else None
    peft = _peft_config(file, metadata)

    # Names first: a file for another model is refused whole, before any shape is looked at.
    resolved: dict[str, str] = {}
    unmatched = [*stray]
    ambiguous = []
    dotted = False
    for module in entries:
        local = module[len(prefix):] if module.startswith(prefix) else None
        # As written (without its prefix), then with dots and underscores alike; then the whole name the same way
        # (convert_lora without a prefix writes `transformer.blocks.0...`, which looks like the diffusers prefix).
        candidates = [local] if local is not None else []
        if prefix and module != local:
            candidates.append(module)
        match = None
        for candidate in candidates:
            if candidate in ours or candidate in hunyuan:
                match = candidate
            elif _folded(candidate) in folded:
                match = folded[_folded(candidate)]
                if match is None:
                    ambiguous.append(module)
                    break
                dotted = dotted or "." in candidate
            if match is not None:
                break
        if match is None:
            unmatched.append(module)
        else:
            resolved[module] = match
    naming = {"FramePack names" if local in ours else "HunyuanVideo names" for local in resolved.values()}
    layout = f"{family}, {' and '.join(sorted(naming)) or 'unknown names'}"
    if dotted:
        layout += " (dots for underscores, as musubi-tuner's convert_lora writes)"
    if unmatched:
        shown = ", ".join(repr(module) for module in unmatched[:4])
        unclear = (f"; {', '.join(repr(module) for module in ambiguous[:2])} could name more than one layer with dots "
                   "and underscores alike") if ambiguous else ""
        raise FramePackError(
            f"LoRA {name!r} does not fit this model: {len(unmatched)} of its {len(modules) + len(stray)} modules "
            f"match no linear layer of the FramePack DiT, e.g. {shown} (layout detected: {layout}{unclear}); it is "
            "probably a LoRA for another model: use one trained for FramePack or HunyuanVideo.")

    adapters: dict[str, LowRank] = {}
    for module, local in resolved.items():
        entry = entries[module]
        if not entry.down and not entry.up:  # an alpha without weights: nothing to apply
            continue
        adapter = _joined(entry, module, name, peft, rslora)
        split = {local: adapter} if local in ours else _split(adapter, local, hunyuan[local], shapes, name)
        for target, part in split.items():
            out_features, in_features = shapes[target]
            if part.down.shape[1] != in_features or part.up.shape[0] != out_features:
                raise FramePackError(
                    f"LoRA {name!r} does not fit layer {target!r}: its adapter is {part.up.shape[0]} x "
                    f"{part.down.shape[1]} (from {module!r}), the layer {out_features} x {in_features}: "
                    "the LoRA is for a model of another size.")
            if target in adapters:
                raise FramePackError(f"LoRA {name!r} has two adapters for layer {target!r} (one from {module!r}): "
                                     "the file mixes naming schemes; use a clean export.")
            adapters[target] = part
    if text_encoder_keys:
        warnings.warn(FramePackWarning(
            f"LoRA {name!r}: skipped its {len(text_encoder_keys)} text-encoder keys (text_encoder.*, lora_te_*): this "
            f"engine applies LoRAs to the DiT only; its {len(adapters)} DiT layers are applied."), stacklevel=2)
    return LoraWeights(layout, adapters)


def _folded(module: str) -> str:
    """A module name with dots and underscores alike."""
    return module.replace(".", "_")


# ----------------------------------------------------------------------------------------------------------------------
# Live adapters


class LowRankBranch(nn.Module):
    """strength * scale * up(down(x)) (+ the bias of lora_B), beside a linear layer. Its tensors are parameters
    (frozen), so they move with the block that holds them."""

    def __init__(self, adapter: LowRank, strength: float, dtype: torch.dtype, device: torch.device):
        super().__init__()
        self.down = nn.Parameter(adapter.down.to(device, dtype), requires_grad=False)
        self.up = nn.Parameter(adapter.up.to(device, dtype), requires_grad=False)
        bias = adapter.up_bias
        self.bias = None if bias is None else nn.Parameter(bias.to(device, dtype), requires_grad=False)
        self.scale = adapter.scale
        self.strength = float(strength)

    def forward(self, x):
        return F.linear(F.linear(x.to(self.down.dtype), self.down), self.up, self.bias) * (self.scale * self.strength)

    def add_to(self, y, x):
        """y + forward(x), accumulated into y by one GEMM where it can be (y is the base layer's fresh output): the
        scale is applied to the rank-wide activations, so no output-sized temporary is made."""
        if y.dtype != self.up.dtype or not y.is_contiguous() or (torch.is_grad_enabled() and y.requires_grad):
            return y + self(x).to(y.dtype)
        factor = self.scale * self.strength
        hidden = F.linear(x.to(self.down.dtype), self.down) * factor
        y.view(-1, y.shape[-1]).addmm_(hidden.reshape(-1, hidden.shape[-1]), self.up.t())
        if self.bias is not None:
            y.add_(self.bias, alpha=factor)
        return y


class LoraLinear(nn.Module):
    """A linear layer (nn.Linear, or any module with in_features and out_features, a quantized one too) with
    low-rank branches added to its output. Its state dict is the base layer's, under the layer's own name, so the
    DiT's keys stay the checkpoint's while adapters are attached."""

    def __init__(self, base: nn.Module):
        super().__init__()
        self.base = base
        self.in_features, self.out_features = base.in_features, base.out_features
        self.branches = nn.ModuleDict()
        self.register_state_dict_post_hook(_base_state_only)
        self.register_load_state_dict_pre_hook(_into_base)
        self.register_load_state_dict_post_hook(_branches_not_missing)

    @property
    def weight(self):
        return self.base.weight

    @property
    def bias(self):
        return self.base.bias

    def forward(self, x):
        y = self.base(x)
        for branch in self.branches.values():
            if branch.strength != 0:
                y = branch.add_to(y, x)
        return y


def _base_state_only(module, state_dict, prefix, local_metadata):
    for key in [key for key in state_dict if key.startswith(prefix)]:
        local = key[len(prefix):]
        if local.startswith("branches."):
            del state_dict[key]
        elif local.startswith("base."):
            state_dict[prefix + local[len("base."):]] = state_dict.pop(key)


def _into_base(module, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
    for key in [key for key in state_dict if key.startswith(prefix)]:
        local = key[len(prefix):]
        if not local.startswith(("base.", "branches.")):
            state_dict[prefix + "base." + local] = state_dict.pop(key)


def _branches_not_missing(module, incompatible_keys):
    incompatible_keys.missing_keys[:] = [key for key in incompatible_keys.missing_keys if ".branches." not in key]


# ----------------------------------------------------------------------------------------------------------------------
# Several LoRAs on one DiT


@dataclass
class LoadedLora:
    name: str
    file: str  # the file's name only: it goes into output metadata, which must not carry the machine's folders
    layout: str
    strength: float
    mode: str
    adapters: dict[str, LowRank]
    key: str  # its branches' name inside LoraLinear (module names cannot hold dots)
    sha256: str = ""  # of the file (runtime.identity.weights_sha256): output metadata tells LoRAs apart by it
    permanent: bool = False  # fused, and its layers' originals released (see LoraSet.release_originals)


class LoraSet:
    """The LoRAs attached to one DiT, each with a strength, fused or live; they add up linearly."""

    def __init__(self, dit, default_mode: str = "fused"):
        self.dit = dit
        self.default_mode = _checked_mode(default_mode)
        self.loaded: dict[str, LoadedLora] = {}
        # Fused layers' untouched weight and bias, on the host: every change recomputes from them, and the last
        # unload puts them back as they were.
        self._originals: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {}
        self._count = 0

    def __len__(self):
        return len(self.loaded)

    def __contains__(self, name):
        return name in self.loaded

    def load(self, path, strength: float = 1.0, name: str | None = None, mode: str | None = None) -> str:
        """Reads the LoRA at `path` and attaches it; returns its name (default: the file's stem)."""
        mode = _checked_mode(mode or self.default_mode)
        strength = _checked_strength(strength)
        source = Path(path)
        name = name if name is not None else source.stem if source.suffix else source.name
        if name in self.loaded:
            raise FramePackError(f"A LoRA named {name!r} is already loaded: unload it first or pass another name.")
        layers = self.dit.linear_layers()
        weights = read_lora(path, {key: (layer.out_features, layer.in_features) for key, layer in layers.items()})
        self._count += 1
        lora = LoadedLora(name, source.name, weights.layout, strength, mode, weights.adapters, f"lora{self._count}",
                          weights_sha256(source))
        if mode == "fused":
            for target, adapter in lora.adapters.items():  # checked before any weight changes: nothing half-done
                base = _float_layer(layers[target], target)
                if adapter.up_bias is not None and base.bias is None:
                    raise FramePackError(f"Layer {target!r} has no bias for the lora_B bias of LoRA {name!r}: "
                                         "load it with ", Option("mode", "live", flag="lora_mode"), ".")
            self.loaded[name] = lora
            self._refresh_fused(lora.adapters, layers)
        else:
            self.loaded[name] = lora
            for target, adapter in lora.adapters.items():
                self._attach_live(target, layers[target], lora, adapter)
        return name

    def unload(self, name: str) -> None:
        lora = self._changeable(name)
        layers = self.dit.linear_layers()
        del self.loaded[name]
        if lora.mode == "fused":
            self._refresh_fused(lora.adapters, layers)
            return
        for target in lora.adapters:
            wrapper = layers[target]
            del wrapper.branches[lora.key]
            if not len(wrapper.branches):
                self.dit.replace_layer(target, wrapper.base)

    def set_strength(self, name: str, strength: float) -> None:
        strength = _checked_strength(strength)
        lora = self._changeable(name)
        lora.strength = strength
        layers = self.dit.linear_layers()
        if lora.mode == "fused":
            self._refresh_fused(lora.adapters, layers)
            return
        for target in lora.adapters:
            layers[target].branches[lora.key].strength = lora.strength

    def release_originals(self) -> None:
        """Drops the host copies of the fused layers' original weights (when those layers are about to be quantized,
        the copies could never be put back): the fused LoRAs so far stay merged for good, and unloading them or
        changing their strengths is refused from then on."""
        self._originals.clear()
        for lora in self.loaded.values():
            lora.permanent = lora.permanent or lora.mode == "fused"

    def describe(self) -> list[dict]:
        """What output metadata records of each LoRA."""
        return [{"name": lora.name, "file": lora.file, "sha256": lora.sha256, "strength": lora.strength,
                 "mode": lora.mode, "layout": lora.layout, "layers": len(lora.adapters)}
                for lora in self.loaded.values()]

    # ---- inside -----------------------------------------------------------------------------------------------------

    def _changeable(self, name: str) -> LoadedLora:
        """The LoRA, once it is sure that its weights can be changed (checked before anything changes)."""
        if name not in self.loaded:
            loaded = ", ".join(repr(key) for key in self.loaded) or "none"
            raise FramePackError(f"No LoRA named {name!r} is loaded (loaded: {loaded}).")
        lora = self.loaded[name]
        if lora.permanent:
            raise FramePackError(f"LoRA {name!r} was merged into the weights before they were quantized, for good: "
                                 "reload the model to change it, or load LoRAs with ", Option("lora_mode", "live"),
                                 ".")
        if lora.mode == "fused":
            layers = self.dit.linear_layers()
            for target in lora.adapters:
                _float_layer(layers[target], target)
        return lora

    def _attach_live(self, target: str, layer: nn.Module, lora: LoadedLora, adapter: LowRank) -> None:
        if not isinstance(layer, LoraLinear):
            layer = LoraLinear(layer)
            self.dit.replace_layer(target, layer)
        dtype, device = _branch_dtype_and_device(layer.base, self.dit)
        layer.branches[lora.key] = LowRankBranch(adapter, lora.strength, dtype, device)

    def _refresh_fused(self, targets, layers) -> None:
        """Each target's weight = its original + the sum of every fused LoRA's strength * delta, computed in float32
        from the original; with no LoRA left, the original itself."""
        for target in targets:
            layer = _float_layer(layers[target], target)
            contributions = [(lora.strength, lora.adapters[target]) for lora in self.loaded.values()
                             if lora.mode == "fused" and not lora.permanent and target in lora.adapters]
            if target not in self._originals:
                if not contributions:
                    continue
                self._originals[target] = (_host_copy(layer.weight), _host_copy(layer.bias))
            weight, bias = self._originals[target]
            if not contributions:
                _put(layer.weight, weight)
                if bias is not None:
                    _put(layer.bias, bias)
                del self._originals[target]
                continue
            device = layer.weight.device
            new_weight = weight.to(device, torch.float32, copy=True)  # never a view of the kept original
            new_bias = None if bias is None else bias.to(device, torch.float32, copy=True)
            for strength, adapter in contributions:
                new_weight += strength * adapter.delta_weight(device)
                if adapter.up_bias is not None:
                    new_bias += strength * adapter.delta_bias(device)
            _put(layer.weight, new_weight)
            if new_bias is not None:
                _put(layer.bias, new_bias)


def _checked_mode(mode: str) -> str:
    if mode not in LORA_MODES:
        raise FramePackError(f"Unknown LoRA mode {mode!r}: choose 'fused' (merged into the weights) or 'live' "
                             "(a branch beside them).")
    return mode


def _checked_strength(strength) -> float:
    if isinstance(strength, bool) or not isinstance(strength, (int, float)) or not math.isfinite(strength):
        raise FramePackError(f"A LoRA strength must be a finite number, got {strength!r}: e.g. 1.0 or 0.5.")
    return float(strength)


def _float_layer(layer: nn.Module, target: str) -> nn.Module:
    """The layer whose float weight a fused LoRA goes into (the base of a live-wrapped one)."""
    base = layer.base if isinstance(layer, LoraLinear) else layer
    weight = getattr(base, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dtype not in _FLOAT_WEIGHT_DTYPES:
        raise FramePackError(
            f"Fusing a LoRA needs the float weights of {target!r}, but it is a {type(base).__name__} "
            f"({getattr(weight, 'dtype', 'no weight')}): load the LoRA with ", Option("mode", "live", flag="lora_mode"),
            ", or pass it when loading the model (", Option("lora"), "), so it is merged before the weights are "
            "quantized.")
    return base


def _host_copy(tensor: torch.Tensor | None) -> torch.Tensor | None:
    if tensor is None:
        return None
    # A weight on the host is kept as it is (the layer gets a new tensor); one on a device is copied to the host.
    return tensor.data if tensor.device.type == "cpu" else tensor.data.to("cpu")


def _put(parameter: torch.Tensor, value: torch.Tensor) -> None:
    """Sets a weight's values in its dtype by swapping in a new tensor where it is (on the host no copy of the kept
    original). Never in place: whoever placed the weight on a device (ModuleHome) sees a new tensor and keeps it when
    moving the weight back to the host."""
    parameter.data = value.to(parameter.device, parameter.dtype)


def _branch_dtype_and_device(base: nn.Module, dit) -> tuple[torch.dtype, torch.device]:
    """The branch computes in the layer's float dtype (float32 for the float32 output projection), over a quantized
    layer in the DiT's compute dtype; it lives on the device the DiT computes on, so a branch added while blocks
    stream (their weights on the host between visits) stays resident there."""
    weight = getattr(base, "weight", None)
    if isinstance(weight, torch.Tensor) and weight.dtype in _FLOAT_WEIGHT_DTYPES:
        return weight.dtype, dit.compute_device
    return dit.compute_dtype, dit.compute_device
