"""`framepack quantize SRC OUT --format ...`: a pre-quantized copy of a DiT checkpoint, written shard by shard.

The formats are framepack_engine.runtime.quant's; the DiT is read through framepack_engine.models.checkpoints and
every file is published whole (framepack_engine.media.video.atomic_path) or not at all.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import torch

from framepack_engine.commands.common import interruption_status
from framepack_engine.errors import FramePackError
from framepack_engine.media.video import atomic_path
from framepack_engine.models.checkpoints import dit_source_shards, read_dit_config
from framepack_engine.models.dit import FramePackDiT
from framepack_engine.runtime.quant import (DEFAULT_INT4_GROUP_SIZE, FORMATS, INT4_GROUP_SIZES, INT4_WIDTHS_KEY,
                                            QuantScheme, quantize_weight)


def write_quantized_checkpoint(source, out: str | Path, scheme: QuantScheme, allow_download: bool | None = None,
                               log=None) -> Path:
    """Reads the DiT at `source` (repo id, folder or single file; a community fp8 file is dequantized first) shard by
    shard and writes it quantized to `out`: a folder with the source's config.json and one shard per source shard
    (plus the index when there are several), or, when `out` ends in .safetensors, one file with the config in its
    metadata. Every file's metadata names the scheme. A run that fails or is interrupted removes what it wrote, so
    the same command can run again. Returns `out`."""
    from safetensors import SafetensorError

    log = log or (lambda message: None)
    out = Path(out)
    single_file = out.suffix == ".safetensors"
    if out.exists() and (single_file or not out.is_dir() or any(out.iterdir())):
        raise FramePackError(f"{out.name!r} already exists: choose a new output path (nothing is overwritten).")
    config = read_dit_config(source, allow_download=allow_download)
    config.pop("quantization", None)
    made_folder = not single_file and not out.exists()
    written: list[Path] = []
    try:
        _write_quantized_files(source, out, scheme, config, allow_download, log, written)
    except BaseException as error:
        for path in written:
            path.unlink(missing_ok=True)
        if made_folder and out.is_dir() and not any(out.iterdir()):
            out.rmdir()
        if isinstance(error, (OSError, SafetensorError)):
            raise FramePackError(f"Writing {out.name!r} failed ({getattr(error, 'strerror', None) or error}): free "
                                 "disk space or choose a writable output path, then run the command again.") from None
        raise
    return out


def _write_quantized_files(source, out: Path, scheme: QuantScheme, config: dict, allow_download, log,
                           written: list[Path]) -> None:
    """write_quantized_checkpoint's files, each published whole or not at all; `written` lists those published."""
    from safetensors.torch import save_file

    layout = FramePackDiT.from_config(config, device="meta")  # names and shapes only: no memory
    layers = layout.block_linears(modulation=scheme.modulation)
    quantized = {name + ".weight" for name, _ in layers}
    metadata = {"format": "pt", **scheme.metadata()}
    if scheme.format == "int4":
        padded = {name: layer.in_features for name, layer in layers if layer.in_features % scheme.group_size}
        if padded:
            metadata[INT4_WIDTHS_KEY] = json.dumps(padded)
    weight_map = {}
    with dit_source_shards(source, allow_download=allow_download) as shards:
        if out.suffix == ".safetensors":
            metadata["config"] = json.dumps(config)
            tensors = {}
            for _, read in shards:
                tensors.update(_quantize_shard(read(), quantized, scheme))
            with _publish(out, written) as temporary:
                save_file(tensors, str(temporary), metadata=metadata)
            log(f"wrote {out.name}")
            return
        out.mkdir(parents=True, exist_ok=True)
        for shard_name, read in shards:
            tensors = _quantize_shard(read(), quantized, scheme)
            with _publish(out / shard_name, written) as temporary:
                save_file(tensors, str(temporary), metadata=metadata)
            weight_map.update({key: shard_name for key in tensors})
            log(f"wrote {shard_name} ({len(tensors)} tensors)")
            del tensors
    if len(written) > 1:
        total = sum(path.stat().st_size for path in written)
        index = {"metadata": {"total_size": total, **scheme.metadata()}, "weight_map": weight_map}
        with _publish(out / "diffusion_pytorch_model.safetensors.index.json", written) as temporary:
            temporary.write_text(json.dumps(index, indent=2))
    # Last: a folder with a config.json is a loadable model, so an interrupted run never looks like one.
    with _publish(out / "config.json", written) as temporary:
        temporary.write_text(json.dumps(config, indent=2, sort_keys=True))


@contextlib.contextmanager
def _publish(path: Path, written: list[Path]):
    """A temporary path to write `path`'s content to; published whole (an atomic rename) and listed in `written`
    when the block succeeds, removed when it fails."""
    with atomic_path(path) as temporary:
        yield temporary
    written.append(path)


def _quantize_shard(items, quantized: set[str], scheme: QuantScheme) -> dict[str, torch.Tensor]:
    tensors = {}
    for key, tensor in items:
        if key in quantized:
            layer = key[: -len(".weight")]
            for name, stored in quantize_weight(tensor, scheme).items():
                tensors[f"{layer}.{name}"] = stored.contiguous()
        else:
            tensors[key] = tensor.contiguous()
    return tensors


def add_quantize_command(subparsers):
    """Adds `quantize` to the `framepack` sub-commands."""
    parser = subparsers.add_parser(
        "quantize", help="write a pre-quantized copy of a DiT checkpoint (fp8, int8, int4)",
        description="Quantize the DiT's block linears once and write a safetensors checkpoint that loads quantized "
                    "(no full-precision copy in memory). Sharded like the source; the format is in its metadata.")
    parser.add_argument("source", help="the DiT: repo id, folder or single .safetensors file (bf16, or community fp8)")
    parser.add_argument("out", help="a new folder, or a file ending in .safetensors for one file")
    parser.add_argument("--format", required=True, choices=FORMATS, help="fp8 (e4m3), int8 or int4")
    parser.add_argument("--group-size", type=int, help=f"int4 inputs per scale and zero point (default "
                                                       f"{DEFAULT_INT4_GROUP_SIZE}; {', '.join(map(str, INT4_GROUP_SIZES))})")
    parser.add_argument("--keep-modulation", action="store_true",
                        help="leave the blocks' adaptive-modulation projections in full precision")
    parser.add_argument("--offline", action="store_true", help="never download: use the local Hugging Face cache")
    parser.set_defaults(run=command_quantize)
    return parser


def command_quantize(args) -> int:
    import sys

    scheme = QuantScheme(args.format, args.group_size, modulation=not args.keep_modulation)
    try:
        out = write_quantized_checkpoint(args.source, args.out, scheme, allow_download=False if args.offline else None,
                                         log=lambda message: print(f"[quantize] {message}", file=sys.stderr))
    except KeyboardInterrupt as interruption:
        print("\nInterrupted: no checkpoint was written.", file=sys.stderr)
        return interruption_status(interruption)
    print(f"Wrote {out} ({scheme.format}{f', group size {scheme.group_size}' if scheme.group_size else ''})")
    return 0
