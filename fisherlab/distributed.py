"""Data-parallel sums over ``torch.distributed``: the collective helpers every engine and structure uses.

fisherlab runs data-parallel on the process group its users already have (``torchrun`` + ``init_process_group``,
gloo on CPU, NCCL on GPU). Each rank holds **its own shard** of the samples; the global sample order is rank 0's
samples, then rank 1's, and so on. :func:`shard` gives the contiguous index range a rank takes of a full dataset so
that this concatenation is the dataset in its own order — then every result equals the single-process one on the
full data to round-off (docs/distributed.md).

Every average over samples is a sum, all-reduced, divided by the global count N = Σ_ranks N_r (also all-reduced),
so unequal shards are right. With no process group, or a group of size 1, :func:`active_group` is None and no
collective is called: the code path is the single-process one.

Imported by the engine only (``import fisherlab`` stays torch-free).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from fisherlab.errors import InputError


def active_group(group: Any = None) -> Any:
    """The process group to reduce over, or None for single-process work.

    ``group``: an explicit process group (``torch.distributed.new_group``), or None for the default (world) group
    when ``torch.distributed`` is initialized. A group (explicit or default) of size 1 gives None.

    Raises:
        InputError: An explicit group while ``torch.distributed`` is not initialized, or one this process is not a
            member of.
    """
    if not dist.is_available() or not dist.is_initialized():
        if group is not None:
            raise InputError("process_group was given but torch.distributed is not initialized "
                             "(call torch.distributed.init_process_group first)")
        return None
    group = dist.group.WORLD if group is None else group
    if group is dist.GroupMember.NON_GROUP_MEMBER:
        raise InputError(f"this process (rank {dist.get_rank()}) is not a member of process_group; build the "
                         "engine on the group's members only")
    return group if dist.get_world_size(group) > 1 else None


def world_size(group: Any = None) -> int:
    """Processes in the active group (1 without one)."""
    group = active_group(group)
    return 1 if group is None else dist.get_world_size(group)


def rank(group: Any = None) -> int:
    """The rank of this process in the active group (0 without one)."""
    group = active_group(group)
    return 0 if group is None else dist.get_rank(group)


def all_reduce_sum(tensors: Sequence[Tensor], group: Any) -> None:
    """Sum each tensor over the ranks of ``group``, in place, by one collective (None: nothing to do).

    The tensors (same dtype and device on every rank, same shapes and order) are packed into one flat buffer,
    all-reduced and unpacked, so a structure with many blocks costs one round trip.
    """
    tensors = [t for t in tensors if t.numel()]
    if group is None or not tensors:
        return
    by_kind: dict[tuple[torch.dtype, torch.device], list[Tensor]] = {}
    for t in tensors:
        by_kind.setdefault((t.dtype, t.device), []).append(t)
    for group_tensors in by_kind.values():
        flat = torch.cat([t.reshape(-1) for t in group_tensors])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
        offset = 0
        for t in group_tensors:
            t.copy_(flat[offset: offset + t.numel()].view_as(t))
            offset += t.numel()


def sample_offset(count: int, group: Any, device: torch.device | str = "cpu") -> tuple[int, int]:
    """(global index of this rank's first sample, global N) for ``count`` samples on this rank.

    Every rank contributes its count at its own position of a world-size vector, summed over the group.
    """
    if group is None:
        return 0, count
    counts = torch.zeros(dist.get_world_size(group), dtype=torch.int64, device=device)
    counts[dist.get_rank(group)] = count
    all_reduce_sum([counts], group)
    return int(counts[: dist.get_rank(group)].sum()), int(counts.sum())


def min_over_ranks(value: int, group: Any, device: torch.device | str = "cpu") -> int:
    """The smallest of the ranks' ``value`` (``value`` itself without a group)."""
    if group is None:
        return value
    t = torch.tensor([value], dtype=torch.int64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN, group=group)
    return int(t)


def shard(n: int, rank: int, world: int) -> range:
    """The contiguous range of sample indices rank ``rank`` of ``world`` takes of n samples.

    The first ``n % world`` ranks take one sample more; the ranges, in rank order, are 0..n-1 in order (so the
    engines' global sample order is the dataset's own).

    Raises:
        InputError: world < 1, rank outside 0..world-1, or fewer samples than ranks (every rank needs one).
    """
    if world < 1 or not 0 <= rank < world:
        raise InputError(f"rank must be in 0..world-1 for world ≥ 1; got rank {rank} of {world}")
    if n < world:
        raise InputError(f"{n} samples cannot be shared among {world} ranks (every rank needs at least one)")
    base, extra = divmod(n, world)
    start = rank * base + min(rank, extra)
    return range(start, start + base + (rank < extra))


__all__ = ["active_group", "all_reduce_sum", "min_over_ranks", "rank", "sample_offset", "shard", "world_size"]
