"""RIFE 4.x frame interpolation: our implementation of IFNet, the flow network of Practical-RIFE (hzwer, MIT).

IFNet estimates, coarse to fine, the flows from a middle moment t back to both frames and a blending mask: each
IFBlock works at 1/16, 1/8, ... 1/1 of the frame (two stride-2 convolutions below that), sees both frames warped by
the flow so far, their learned features (the `encode` head) warped alike, the moment t and the previous block's mask
and features, and adds its correction to the flow. The frame at t is both frames warped by the final flow, blended
by the sigmoid of the mask. Our modules carry the parameter names of Practical-RIFE's `flownet.pkl` (its
`module.` prefix stripped), so its weights load as they are: the block count, widths and depth are read from them
(the 4.25 / 4.26 models have five blocks and 16-channel features).

The engine reads safetensors only: `convert_rife` (the command `framepack convert-rife`) turns the pickle into one,
reading it once with `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from framepack_engine.errors import FramePackError

WEIGHTS_HELP = ("get Practical-RIFE's weights (train_log/flownet.pkl of a release at "
                "https://github.com/hzwer/Practical-RIFE, e.g. 4.25) and convert them once: "
                "framepack convert-rife flownet.pkl rife.safetensors")
# IFNet's coarsest block works at 1/16 of the frame and downsamples by 4 more: sides are padded to this multiple.
PAD_MULTIPLE = 64


def _conv(in_channels: int, out_channels: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(in_channels, out_channels, 3, stride, 1), nn.LeakyReLU(0.2))


class ResConv(nn.Module):
    """A 3x3 convolution scaled per channel by a learned `beta`, added to its input."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, 1, 1)
        self.beta = nn.Parameter(torch.ones(1, channels, 1, 1))

    def forward(self, x):
        return F.leaky_relu(self.conv(x) * self.beta + x, 0.2)


class IFBlock(nn.Module):
    """One refinement level: its inputs at 1/scale, a flow correction (4 channels), a mask and 8 feature channels
    back at full size."""

    def __init__(self, in_channels: int, width: int, depth: int = 8):
        super().__init__()
        self.conv0 = nn.Sequential(_conv(in_channels, width // 2, 2), _conv(width // 2, width, 2))
        self.convblock = nn.Sequential(*(ResConv(width) for _ in range(depth)))
        self.lastconv = nn.Sequential(nn.ConvTranspose2d(width, 4 * 13, 4, 2, 1), nn.PixelShuffle(2))

    def forward(self, x, flow, scale: float):
        x = F.interpolate(x, scale_factor=1.0 / scale, mode="bilinear", align_corners=False)
        if flow is not None:
            flow = F.interpolate(flow, scale_factor=1.0 / scale, mode="bilinear", align_corners=False) / scale
            x = torch.cat((x, flow), 1)
        out = self.lastconv(self.convblock(self.conv0(x)))
        out = F.interpolate(out, scale_factor=scale, mode="bilinear", align_corners=False)
        return out[:, :4] * scale, out[:, 4:5], out[:, 5:]


class Head(nn.Module):
    """The learned features of a frame, at its full size."""

    def __init__(self, channels: int = 16):
        super().__init__()
        self.cnn0 = nn.Conv2d(3, channels, 3, 2, 1)
        self.cnn1 = nn.Conv2d(channels, channels, 3, 1, 1)
        self.cnn2 = nn.Conv2d(channels, channels, 3, 1, 1)
        self.cnn3 = nn.ConvTranspose2d(channels, channels, 4, 2, 1)

    def forward(self, x):
        x = F.leaky_relu(self.cnn0(x), 0.2)
        x = F.leaky_relu(self.cnn1(x), 0.2)
        x = F.leaky_relu(self.cnn2(x), 0.2)
        return self.cnn3(x)


def warp(image: torch.Tensor, flow: torch.Tensor) -> torch.Tensor:
    """`image` sampled at each pixel's position plus `flow` (pixels; x then y), bilinear, edges repeated."""
    _, _, height, width = flow.shape
    xs = torch.linspace(-1.0, 1.0, width, device=flow.device, dtype=flow.dtype).view(1, width).expand(height, width)
    ys = torch.linspace(-1.0, 1.0, height, device=flow.device, dtype=flow.dtype).view(height, 1).expand(height, width)
    # flow in pixels -> the grid's [-1, 1] units (corners aligned)
    grid = torch.stack((xs + flow[:, 0] / ((image.shape[3] - 1.0) / 2.0),
                        ys + flow[:, 1] / ((image.shape[2] - 1.0) / 2.0)), dim=-1)
    return F.grid_sample(image, grid.to(image.dtype), mode="bilinear", padding_mode="border", align_corners=True)


class IFNet(nn.Module):
    """RIFE 4.x's flow network. `widths`: each block's width, coarse to fine (4.25/4.26: 192, 128, 96, 64, 32)."""

    def __init__(self, widths=(192, 128, 96, 64, 32), features: int = 16, depth: int = 8):
        super().__init__()
        self.encode = Head(features)
        first = 3 + 3 + 2 * features + 1  # both frames, their features, the moment
        later = first + 1 + 8 + 4  # ... and the previous mask, features and flow
        for index, width in enumerate(widths):
            self.add_module(f"block{index}", IFBlock(first if index == 0 else later, width, depth))
        self.block_count = len(widths)

    def scales(self, scale: float = 1.0) -> list[float]:
        """Each block's downscale: 16, 8, 4, 2, 1 for five blocks (a `scale` below 1 works coarser, for big frames)."""
        return [2 ** (self.block_count - 1 - index) / scale for index in range(self.block_count)]

    def forward(self, img0: torch.Tensor, img1: torch.Tensor, timestep: torch.Tensor | float = 0.5,
                scales: list[float] | None = None) -> torch.Tensor:
        """The frame at `timestep` (0: img0, 1: img1; a number or a (B, 1, H, W) map) between two batches of frames
        (B, 3, H, W) in [0, 1], sides multiples of 64."""
        if not torch.is_tensor(timestep):
            timestep = torch.full_like(img0[:, :1], float(timestep))
        scales = scales or self.scales()
        feat0, feat1 = self.encode(img0), self.encode(img1)
        warped0, warped1 = img0, img1
        flow = mask = features = None
        for index, scale in enumerate(scales):
            block = getattr(self, f"block{index}")
            if flow is None:
                flow, mask, features = block(torch.cat((img0, img1, feat0, feat1, timestep), 1), None, scale)
            else:
                inputs = torch.cat((warped0, warped1, warp(feat0, flow[:, :2]), warp(feat1, flow[:, 2:4]), timestep,
                                    mask, features), 1)
                correction, mask, features = block(inputs, flow, scale)
                flow = flow + correction
            warped0, warped1 = warp(img0, flow[:, :2]), warp(img1, flow[:, 2:4])
        mask = torch.sigmoid(mask)
        return warped0 * mask + warped1 * (1 - mask)


def ifnet_config(state: dict[str, torch.Tensor]) -> dict:
    """IFNet's constructor arguments, read from a state dict's shapes (any RIFE 4.x of this layout)."""
    blocks = sorted({int(match.group(1)) for key in state if (match := re.match(r"block(\d+)\.", key))})
    try:
        widths = tuple(state[f"block{index}.conv0.1.0.weight"].shape[0] for index in blocks)
        features = state["encode.cnn0.weight"].shape[0]
    except KeyError as missing:
        raise FramePackError(f"These weights are not a RIFE 4.x IFNet of the layout we run (no {missing.args[0]}): "
                             f"use Practical-RIFE 4.25 or 4.26; {WEIGHTS_HELP}.") from None
    depth = len({key.split(".")[2] for key in state if key.startswith("block0.convblock.")})
    if blocks != list(range(len(blocks))) or not blocks:
        raise FramePackError(f"These RIFE weights have the blocks {blocks}: expected block0, block1, ...; "
                             f"{WEIGHTS_HELP}.")
    return {"widths": widths, "features": features, "depth": depth}


def strip_prefix(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The keys as our modules name them: Practical-RIFE saves them under `module.` (a DataParallel)."""
    return {key.removeprefix("module."): value for key, value in state.items()}


class RIFE(nn.Module):
    """A loaded IFNet ready to make in-between frames: `frames_between(first, second, timesteps)`."""

    def __init__(self, net: IFNet, path: Path | None = None):
        super().__init__()
        self.net = net.eval().requires_grad_(False)
        self.path = path  # the weights file (its name goes into the output's metadata)
        self.name = path.name if path is not None else "rife"

    @property
    def device(self) -> torch.device:
        return next(self.net.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.net.parameters()).dtype

    @torch.inference_mode()
    def frames_between(self, first: torch.Tensor, second: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """Frames (B, 3, H, W) in [0, 1] at `timesteps` (B,) between `first` and `second` (each (B, 3, H, W) in
        [0, 1], any size: padded to multiples of 64 with zeros as Practical-RIFE pads, cropped back)."""
        height, width = first.shape[-2:]
        pad = (0, -width % PAD_MULTIPLE, 0, -height % PAD_MULTIPLE)
        first = F.pad(first.to(self.device, self.dtype), pad)
        second = F.pad(second.to(self.device, self.dtype), pad)
        moment = timesteps.to(self.device, self.dtype).view(-1, 1, 1, 1).expand(-1, 1, *first.shape[-2:])
        return self.net(first, second, moment)[..., :height, :width].float().clamp_(0, 1)

    def bytes_per_pair(self, height: int, width: int) -> int:
        """A generous estimate of the activation bytes one frame pair needs at this size (for batching): the
        finest block's inputs and features at full size, both frames' warps and features, a few temporaries."""
        padded = math.ceil(height / PAD_MULTIPLE) * PAD_MULTIPLE * math.ceil(width / PAD_MULTIPLE) * PAD_MULTIPLE
        channels = 4 * (3 + 3 + 2 * self.net.encode.cnn0.out_channels + 1 + 1 + 8 + 4)
        return padded * channels * torch.empty((), dtype=self.dtype).element_size()


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except Exception as error:  # a truncated or foreign file: one line naming it
        raise FramePackError(f"Cannot read {path.name!r} as safetensors ({type(error).__name__}): "
                             f"{WEIGHTS_HELP}.") from None


def check_rife_path(path) -> Path:
    """A RIFE weights file the engine can read: an existing .safetensors (a pickle is named with the conversion)."""
    path = Path(path)
    if path.suffix.lower() in (".pkl", ".pth", ".pt", ".ckpt", ".bin"):
        raise FramePackError(f"The RIFE weights {path.name!r} are a pickle, which the engine does not load: convert "
                             f"them once with framepack convert-rife {path.name} {path.stem}.safetensors.")
    if not path.is_file():
        raise FramePackError(f"The RIFE weights {path.name!r} do not exist: {WEIGHTS_HELP}.")
    if path.suffix.lower() != ".safetensors":
        raise FramePackError(f"The RIFE weights {path.name!r} are not a .safetensors file: {WEIGHTS_HELP}.")
    return path


def build_ifnet(state: dict[str, torch.Tensor], name: str) -> IFNet:
    """IFNet holding `state` (keys without `module.`), or a one-line error naming what does not fit."""
    net = IFNet(**ifnet_config(state))
    expected = net.state_dict()
    wrong = [key for key in expected if key not in state or state[key].shape != expected[key].shape]
    wrong += [key for key in state if key not in expected]
    if wrong:
        raise FramePackError(f"The RIFE weights {name!r} do not fit IFNet 4.x ({', '.join(wrong[:3])}): "
                             f"{WEIGHTS_HELP}.")
    net.load_state_dict(state)
    return net


def load_rife(path, device="cpu", dtype: torch.dtype | None = None) -> RIFE:
    """RIFE from a .safetensors file (Practical-RIFE's keys, with or without `module.`), on `device` in `dtype`
    (default: float16 on CUDA, float32 elsewhere)."""
    path = check_rife_path(path)
    state = strip_prefix(read_safetensors(path))
    for name, tensor in state.items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise FramePackError(f"The RIFE weights {path.name!r} hold NaN or infinite values in {name}: download "
                                 "them again.")
    net = build_ifnet(state, path.name)
    device = torch.device(device)
    dtype = dtype or (torch.float16 if device.type == "cuda" else torch.float32)
    return RIFE(net.to(device, dtype), path)


def convert_rife(source, destination) -> Path:
    """Practical-RIFE's `flownet.pkl` (a pickle, read once with weights_only=True) -> a .safetensors file with the
    same tensors under the names our IFNet uses (the `module.` prefix stripped). Checked by building IFNet."""
    from safetensors.torch import save_file

    source, destination = Path(source), Path(destination)
    if not source.is_file():
        raise FramePackError(f"{source.name!r} does not exist: {WEIGHTS_HELP}.")
    if destination.suffix.lower() != ".safetensors":
        raise FramePackError(f"The converted file must end in .safetensors, got {destination.name!r}.")
    try:
        state = torch.load(source, map_location="cpu", weights_only=True)
    except Exception as error:
        raise FramePackError(f"Cannot read {source.name!r} as a PyTorch pickle of tensors ({type(error).__name__}); "
                             f"{WEIGHTS_HELP}.") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(torch.is_tensor(value) for value in state.values()):
        raise FramePackError(f"{source.name!r} holds no state dict of tensors: {WEIGHTS_HELP}.")
    state = {key: value.contiguous() for key, value in strip_prefix(state).items()}
    build_ifnet(state, source.name)  # the check the engine makes when it loads
    destination.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(destination), metadata={"format": "pt", "model": "RIFE IFNet (Practical-RIFE)",
                                                 "source": source.name})
    return destination
