"""`framepack convert-rife flownet.pkl rife.safetensors`: Practical-RIFE's pickled weights made safetensors, once.

The pickle is read with torch.load(weights_only=True) (tensors only, no code runs); the engine itself reads only
the safetensors file this writes (`--interpolate N --rife-model rife.safetensors`)."""

from __future__ import annotations

from pathlib import Path

from framepack_engine.errors import FramePackError


def add_convert_rife_command(commands) -> None:
    convert = commands.add_parser("convert-rife", help="Practical-RIFE's flownet.pkl -> .safetensors for --rife-model",
                                  description="Convert Practical-RIFE's train_log/flownet.pkl (RIFE 4.x) into a "
                                              ".safetensors file the engine loads (--rife-model).")
    convert.add_argument("source", metavar="flownet.pkl", help="Practical-RIFE's weights (a PyTorch pickle)")
    convert.add_argument("destination", metavar="OUT.safetensors", help="the file to write")
    convert.add_argument("--overwrite", action="store_true", help="replace an existing OUT.safetensors")
    convert.set_defaults(run=command_convert_rife)


def command_convert_rife(args) -> int:
    from framepack_engine.models.rife import convert_rife

    destination = Path(args.destination)
    if destination.exists() and not args.overwrite:
        raise FramePackError(f"{destination.name!r} already exists: pass --overwrite to replace it, or choose another "
                             "name.")
    print(f"Wrote {convert_rife(args.source, destination)}")
    return 0
