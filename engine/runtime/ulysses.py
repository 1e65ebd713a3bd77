"""Ulysses sequence parallelism: one model call's packed token sequence split over the ranks of a group.

Each rank keeps a contiguous shard of the packed sequence `[image tokens | condition tokens]` (equal shards of
ceil(S / ranks) tokens; the few tokens that pad the last shards to that length sit after every real token and are
masked as keys, so padding never attends into a real token's output and its own outputs are dropped). Everything
that works token by token (modulation, norms, the QK norms, the MLPs, the projections) runs on the local shard.
Around attention, which needs the whole sequence, one all-to-all swaps the sequence split for a head split
(q, k and v in one message: each rank then holds every token for heads/ranks of the heads), the usual attention
backend runs on that, rotary positions included (it rotates q and k itself, over the whole sequence it now holds),
and a second all-to-all swaps back. After the last block the shards are gathered.

Heads that do not divide by the rank count are padded with zero heads up to the next multiple: exact (a zero head's
output is zero and is dropped) and simple, at the cost of the padded heads' attention; ring attention would avoid
that waste but needs a second communication pattern and its own tested kernel loop.

Per block and rank, the all-to-alls send 4 · (ranks − 1)/ranks · (S_pad/ranks) · heads_pad · head_dim elements
(q, k, v out, the output back); the final gather sends (ranks − 1) · (S_pad/ranks) · hidden. `volume_per_call`
is that formula; the README's "Several GPUs" section derives it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from framepack_engine.runtime.distributed import RankGroup


@dataclass(frozen=True)
class ShardPlan:
    """How S packed tokens are split over `ranks`: rank r holds padded positions [r · shard, (r + 1) · shard)."""

    tokens: int
    ranks: int

    @property
    def shard(self) -> int:
        return math.ceil(self.tokens / self.ranks)

    @property
    def padded(self) -> int:
        return self.shard * self.ranks

    @property
    def padding(self) -> int:
        return self.padded - self.tokens

    def bounds(self, rank: int) -> tuple[int, int]:
        return rank * self.shard, (rank + 1) * self.shard

    def real_tokens(self, rank: int) -> int:
        start, end = self.bounds(rank)
        return max(min(end, self.tokens) - start, 0)


def padded_heads(heads: int, ranks: int) -> int:
    return math.ceil(heads / ranks) * ranks


def volume_per_call(tokens: int, heads: int, head_dim: int, blocks: int, ranks: int, element_size: int,
                    batch: int = 1) -> dict[str, int]:
    """Bytes one rank sends in one model call with the blocks run: the formula the counted bytes are checked
    against."""
    if ranks == 1:
        return {"all_to_all": 0, "all_gather": 0}
    plan = ShardPlan(tokens, ranks)
    per_message = batch * plan.shard * padded_heads(heads, ranks) * head_dim * element_size
    return {"all_to_all": blocks * 4 * per_message * (ranks - 1) // ranks,
            "all_gather": (ranks - 1) * batch * plan.shard * heads * head_dim * element_size}


class UlyssesAttention:
    """An attention backend (framepack_engine.runtime.attention's signature) over a sequence-sharded q, k, v."""

    def __init__(self, group: RankGroup, backend, plan: ShardPlan, valid_lengths: torch.Tensor | None):
        self.group, self.backend, self.plan = group, backend, plan
        self.valid_lengths = valid_lengths

    def __call__(self, q, k, v, rope_cos=None, rope_sin=None, rotary_length=0, valid_lengths=None):
        ranks = self.group.size
        batch, shard, heads, head_dim = q.shape
        heads_pad = padded_heads(heads, ranks)
        local_heads = heads_pad // ranks
        qkv = torch.stack([q, k, v.to(q.dtype)])  # (3, batch, shard, heads, head_dim)
        if heads_pad != heads:
            qkv = torch.nn.functional.pad(qkv, (0, 0, 0, heads_pad - heads))
        # (ranks, 3, batch, shard, local heads, head_dim): slice j holds rank j's heads of this rank's tokens.
        qkv = qkv.unflatten(3, (ranks, local_heads)).permute(3, 0, 1, 2, 4, 5)
        qkv = self.group.all_to_all(qkv)  # slice j: this rank's heads of rank j's tokens
        qkv = qkv.permute(1, 2, 0, 3, 4, 5).reshape(3, batch, ranks * shard, local_heads, head_dim)
        out = self.backend(qkv[0], qkv[1], qkv[2], rope_cos, rope_sin, rotary_length, self.valid_lengths)
        # Back: (ranks, batch, shard, local heads, head_dim), slice j: rank j's tokens of this rank's heads.
        out = out.reshape(batch, ranks, shard, local_heads, head_dim).transpose(0, 1)
        out = self.group.all_to_all(out)  # slice j: rank j's heads of this rank's tokens
        out = out.permute(1, 2, 0, 3, 4).reshape(batch, shard, heads_pad, head_dim)
        return out[:, :, :heads]


class SequenceParallel:
    """What `FramePackDiT.run_blocks` asks of the sequence split: the local shard, the attention over it, and the
    whole sequence back."""

    def __init__(self, group: RankGroup):
        self.group = group

    @property
    def ranks(self) -> int:
        return self.group.size

    def split(self, image: torch.Tensor, text: torch.Tensor, valid_lengths: torch.Tensor | None, backend):
        """This rank's image and condition tokens (the shard holds image tokens first, then condition tokens, then
        padding, which joins the condition tokens so the block's text weights see it) and the attention to run."""
        image_length, text_length = image.shape[1], text.shape[1]
        plan = ShardPlan(image_length + text_length, self.ranks)
        start, end = plan.bounds(self.group.rank)
        if plan.padding:
            text = torch.nn.functional.pad(text, (0, 0, 0, plan.padding))
            if valid_lengths is None:  # mask the padding: every real token is valid
                valid_lengths = torch.full((image.shape[0],), plan.tokens, device=image.device, dtype=torch.long)
        local_image = image[:, min(start, image_length):min(end, image_length)]
        local_text = text[:, max(start - image_length, 0):max(end - image_length, 0)]
        return local_image, local_text, UlyssesAttention(self.group, backend, plan, valid_lengths)

    def gather(self, local: torch.Tensor, image_length: int) -> torch.Tensor:
        """The image tokens of the whole sequence from every rank's shard (batch, shard, hidden)."""
        return self.group.all_gather(local, dim=1)[:, :image_length]


__all__ = ["SequenceParallel", "ShardPlan", "UlyssesAttention", "padded_heads", "volume_per_call"]
