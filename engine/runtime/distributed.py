"""Several processes, one video: the process group and the few collectives the engine sends over it.

Every rank runs the whole generation (same seed, same sampler, same section loop) and holds the whole model; what
they share is each model call's work (framepack_engine.runtime.ulysses). This module owns:

- `init_parallel`: the process group from torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT),
  NCCL on CUDA, gloo on the CPU, always with a `timeout`: a rank that dies makes its peers' next collective fail at
  once, a rank that hangs makes it fail after the timeout, and either ends every rank with one line
  (`ParallelError`) instead of a silent hang;
- `ParallelLayout`: how the ranks are arranged (world size, the Ulysses group of this rank, the CFG pair) and what
  the output's metadata records;
- `RankGroup`: a group's collectives (all-to-all, all-gather, broadcast of a number), each counting the bytes this
  rank sends to the others (`CommCounter`): what `framepack bench --nproc` reports per step.
"""

from __future__ import annotations

import datetime
import os
import re
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from framepack_engine.errors import FramePackError

# How long a collective waits for a rank before every rank gives up (seconds): long enough for a slow first
# section on a loaded machine, short enough that a hung rank is not mistaken for a slow one for long.
DEFAULT_TIMEOUT = 600.0


class ParallelError(FramePackError):
    """The process group broke: a rank failed, was killed or hung past the timeout."""

    exit_status = 1  # a failure, not a mistake in what was asked (2)


def launched_ranks() -> int:
    """WORLD_SIZE as torchrun sets it (1 when this process was not started by a launcher)."""
    try:
        return max(int(os.environ.get("WORLD_SIZE", "1")), 1)
    except ValueError:
        return 1


@dataclass
class CommCounter:
    """Bytes this rank sent to other ranks, by collective; `reset()` between measured steps."""

    sent: dict[str, int] = field(default_factory=dict)
    calls: dict[str, int] = field(default_factory=dict)

    def add(self, kind: str, nbytes: int) -> None:
        self.sent[kind] = self.sent.get(kind, 0) + int(nbytes)
        self.calls[kind] = self.calls.get(kind, 0) + 1

    @property
    def total(self) -> int:
        return sum(self.sent.values())

    def reset(self) -> None:
        self.sent.clear()
        self.calls.clear()


class RankGroup:
    """A process group's collectives as the engine uses them; every failure becomes one ParallelError line."""

    def __init__(self, group, ranks: list[int], counter: CommCounter, timeout: float):
        self.group = group
        self.ranks = ranks  # global ranks, in group order
        self.size = len(ranks)
        self.rank = ranks.index(dist.get_rank())  # this process's place in the group
        self.counter = counter
        self.timeout = timeout

    def _failed(self, what: str, error: Exception) -> ParallelError:
        detail = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        detail = re.sub(r"^\[[^\]]*\]\s*", "", detail)[:160]  # without the library's source location
        return ParallelError(
            f"rank {dist.get_rank()}: {what} with ranks {self.ranks} failed: another rank died, was killed or did "
            f"not answer within {self.timeout:g} s ({detail}); every rank stops, see the first failing rank's "
            "output.")

    def all_to_all(self, x: torch.Tensor) -> torch.Tensor:
        """x's first dim has one slice per rank of the group: slice j goes to rank j, and the result's slice j came
        from rank j."""
        x = x.contiguous()
        out = torch.empty_like(x)
        try:
            dist.all_to_all_single(out, x, group=self.group)
        except (RuntimeError, dist.DistError) as error:
            raise self._failed("an all-to-all", error) from None
        # The slice a rank keeps for itself does not travel.
        self.counter.add("all_to_all", x.numel() * x.element_size() * (self.size - 1) // self.size)
        return out

    def all_gather(self, x: torch.Tensor, dim: int = 1, kind: str = "all_gather") -> torch.Tensor:
        """Every rank's x (all the same shape) joined along `dim` in rank order; counted as `kind`."""
        x = x.contiguous()
        pieces = [torch.empty_like(x) for _ in range(self.size)]
        try:
            dist.all_gather(pieces, x, group=self.group)
        except (RuntimeError, dist.DistError) as error:
            raise self._failed("an all-gather", error) from None
        self.counter.add(kind, x.numel() * x.element_size() * (self.size - 1))
        return torch.cat(pieces, dim=dim)

    def agree(self, value: float) -> float:
        """The group's first rank's value on every rank: a decision taken from a float (a step cache's distance)
        must not differ between ranks by a rounding, or they would run different code."""
        device = "cuda" if dist.get_backend(self.group) == "nccl" else "cpu"
        tensor = torch.tensor([value], dtype=torch.float64, device=device)
        try:
            dist.broadcast(tensor, src=self.ranks[0], group=self.group)
        except (RuntimeError, dist.DistError) as error:
            raise self._failed("a broadcast", error) from None
        if self.rank == 0:
            self.counter.add("broadcast", tensor.element_size() * (self.size - 1))
        return float(tensor.item())

    def share(self, tensor: torch.Tensor | None, owner: int, kind: str) -> torch.Tensor:
        """The group's rank `owner`'s tensor on every rank (the others pass None): its shape (at most 6 dims) and
        dtype go first, so only the owner needs to know them."""
        device = "cuda" if dist.get_backend(self.group) == "nccl" else "cpu"
        dtypes = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
        header = torch.zeros(8, dtype=torch.int64, device=device)
        if self.rank == owner:
            header[0], header[1] = dtypes.index(tensor.dtype), tensor.ndim
            header[2:2 + tensor.ndim] = torch.tensor(tensor.shape)
        try:
            dist.broadcast(header, src=self.ranks[owner], group=self.group)
            shape = header[2:2 + int(header[1])].tolist()
            data = (tensor.contiguous() if self.rank == owner
                    else torch.empty(shape, dtype=dtypes[int(header[0])], device=device))
            dist.broadcast(data, src=self.ranks[owner], group=self.group)
        except (RuntimeError, dist.DistError) as error:
            raise self._failed("a broadcast", error) from None
        if self.rank == owner:
            self.counter.add(kind, (data.numel() * data.element_size() + header.nbytes) * (self.size - 1))
        return data

    def sum(self, values: list[int]) -> list[int]:
        """Each value summed over the group's ranks (counts, not tensors of the model)."""
        device = "cuda" if dist.get_backend(self.group) == "nccl" else "cpu"
        tensor = torch.tensor(values, dtype=torch.int64, device=device)
        try:
            dist.all_reduce(tensor, group=self.group)
        except (RuntimeError, dist.DistError) as error:
            raise self._failed("an all-reduce", error) from None
        return [int(value) for value in tensor.tolist()]

    def barrier(self) -> None:
        try:
            if dist.get_backend(self.group) == "gloo":  # names the rank that did not arrive
                dist.monitored_barrier(group=self.group, timeout=datetime.timedelta(seconds=self.timeout))
            else:
                dist.barrier(group=self.group)
        except (RuntimeError, dist.DistError) as error:
            raise self._failed("a barrier", error) from None


@dataclass
class ParallelLayout:
    """How the ranks share a generation. `ulysses`: the ranks that split one model call's sequence (all of them,
    or half of them with CFG parallel); `cfg`: 2 when the two guidance branches run at once on the two halves."""

    world: RankGroup
    ulysses_groups: dict[int, RankGroup]  # cfg (1 or 2) -> this rank's sequence group for that arrangement
    cfg_pair: RankGroup | None  # this rank and its twin in the other half (even world sizes only)
    counter: CommCounter
    device: torch.device
    cfg: int = 1

    @property
    def world_size(self) -> int:
        return self.world.size

    @property
    def rank(self) -> int:
        return self.world.rank

    @property
    def is_writer(self) -> bool:
        """Rank 0 alone writes the output (and runs an exact decode; the official decode's tiles are shared)."""
        return self.world.rank == 0

    @property
    def ulysses(self) -> RankGroup:
        return self.ulysses_groups[self.cfg]

    @property
    def cfg_branch(self) -> str:
        """The guidance branch this rank's half runs with CFG parallel."""
        return "positive" if self.world.rank < self.world.size // 2 else "negative"

    def arrange(self, cfg_scale: float) -> "ParallelLayout":
        """CFG parallel when the generation uses real guidance and the ranks pair up; else every rank on the one
        sequence, the two branches one after the other."""
        self.cfg = 2 if cfg_scale != 1 and self.cfg_pair is not None else 1
        return self

    def describe(self) -> dict:
        """What the output's metadata records as "parallel"."""
        return {"world_size": self.world_size, "ulysses": self.ulysses.size, "ring": 1, "cfg": self.cfg,
                "backend": dist.get_backend(self.world.group)}

    def close(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()


def spread_tiles(group: RankGroup):
    """A VAE's map_tiles (framepack_engine.models.vae.HunyuanVideoVAE.decode): tile k is decoded by rank
    k mod ranks and shared with every rank, so each rank decodes about 1/N of a section and all blend the same pixels.
    The tiles' count is the same on every rank (the official tiling depends on the frame count only)."""

    def map_tiles(run, tiles):
        count = int(group.agree(float(len(tiles))))
        if count != len(tiles):
            raise ParallelError(f"rank {dist.get_rank()}: {len(tiles)} VAE tiles here but {count} on rank "
                                f"{group.ranks[0]}: the ranks must decode alike (same GPUs and memory).")
        # Every rank decodes its own tiles first (at the same time as the others), then each tile is shared.
        mine = {index: run(tile) for index, tile in enumerate(tiles) if index % group.size == group.rank}
        return [group.share(mine.pop(index, None), index % group.size, "vae_tiles") for index in range(count)]

    return map_tiles


def rank_device(device: str | torch.device | None) -> torch.device:
    """The device of this rank: cuda:LOCAL_RANK for a CUDA device given without an index, else the device given."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and device.index is not None:
        raise FramePackError(f"--device {device} would put every rank on one GPU: give --device cuda (rank r takes "
                            "GPU LOCAL_RANK) and choose the GPUs with CUDA_VISIBLE_DEVICES.")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return device


def init_parallel(device: str | torch.device | None = None, timeout: float = DEFAULT_TIMEOUT) -> ParallelLayout:
    """Joins the process group torchrun described in the environment and builds the layout's groups. Every rank
    calls it, in the same order as every other collective."""
    missing = [name for name in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if name not in os.environ]
    if missing:
        raise ParallelError(f"Several processes need the launcher's environment ({', '.join(missing)} not set): "
                            "start them with torchrun --nproc-per-node N --no-python framepack ... or with --nproc N.")
    device = rank_device(device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    wait = datetime.timedelta(seconds=timeout)
    try:
        if not dist.is_initialized():
            dist.init_process_group(backend, timeout=wait,
                                    device_id=device if backend == "nccl" else None)
    except (RuntimeError, ValueError, dist.DistError) as error:
        raise ParallelError(f"rank {os.environ['RANK']}: could not join the process group at "
                            f"{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']} within {timeout:g} s "
                            f"({str(error).strip().splitlines()[0][:200]}).") from None
    world_size, counter = dist.get_world_size(), CommCounter()
    everyone = list(range(world_size))
    world = RankGroup(dist.group.WORLD, everyone, counter, timeout)
    groups, cfg_pair = {1: world}, None
    if world_size % 2 == 0:
        # Every rank creates every group, in one order (new_group is collective), and keeps those it is in.
        half = world_size // 2
        halves = [list(range(0, half)), list(range(half, world_size))]
        pairs = [[rank, rank + half] for rank in range(half)]
        for kind, ranks in [("half", ranks) for ranks in halves] + [("pair", ranks) for ranks in pairs]:
            group = dist.new_group(ranks, timeout=wait)
            if dist.get_rank() in ranks:
                made = RankGroup(group, ranks, counter, timeout)
                if kind == "half":
                    groups[2] = made
                else:
                    cfg_pair = made
    return ParallelLayout(world, groups, cfg_pair, counter, device)


__all__ = ["CommCounter", "DEFAULT_TIMEOUT", "ParallelError", "ParallelLayout", "RankGroup", "init_parallel",
           "launched_ranks", "rank_device", "spread_tiles"]
