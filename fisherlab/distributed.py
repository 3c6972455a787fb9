"""Data-parallel sums over ``torch.distributed``: the collective helpers every engine and structure uses.

fisherlab runs data-parallel on the process group its users already have (``torchrun`` + ``init_process_group``,
gloo on CPU, NCCL on GPU). Each rank holds **its own shard** of the samples; the global sample order is rank 0's
samples, then rank 1's, and so on. :func:`shard` gives the contiguous index range a rank takes of a full dataset so
that this concatenation is the dataset in its own order — then every result equals the single-process one on the
full data to round-off (docs/distributed.md).

Every average over samples is a sum, all-reduced, divided by the global count N = Σ_ranks N_r (also all-reduced),
so unequal shards are right. With no process group, or a group of size 1, :func:`active_group` is None and no
collective is called: the code path is the single-process one.

Launching (:func:`launched`): under ``torchrun`` (``WORLD_SIZE`` > 1 in the environment) the command line
initialises the default process group from the environment, with a timeout, and keeps a **status board** in the
launcher's key-value store (``fisherlab/<attempt>/state/<rank>``: running, failed with a message, stopped, done).
A collective that fails because a peer is gone (killed, crashed, or silent past the timeout) raises
:class:`RankFailedError` on every surviving rank, naming the failed rank(s) from the board.

Imported by the engine and the command line when they run (``import fisherlab`` stays torch-free).
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import Tensor

from fisherlab.errors import FisherlabError, InputError, RankFailedError  # RankFailedError: re-exported
from fisherlab.vocabulary import Backend

T = TypeVar("T")

#: Seconds a surviving rank waits for the other survivors to say so on the board before it names the failed ranks.
PEER_GRACE_S = 1.0


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
        with collective("all_reduce"):
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
    with collective("all_reduce"):
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


def broadcast_object(obj: T, group: Any, src: int = 0) -> T:
    """``obj`` of rank ``src`` (any picklable object) on every rank of ``group`` (``obj`` itself without one)."""
    if group is None:
        return obj
    box = [obj]
    with collective("broadcast"):
        dist.broadcast_object_list(box, src=dist.get_global_rank(group, src), group=group)
    return box[0]


def on_lead(fn: Callable[[], T], group: Any) -> T:
    """``fn()`` run on rank 0 only; its result (picklable), or its fisherlab error, on every rank of ``group``.

    For what one process must do for all (claim the output folder, read finished results): a fisherlab error of
    rank 0 is raised on every rank, as the same class with the same message, so that every rank stops.
    """
    if group is None:
        return fn()
    outcome: tuple[bool, Any] = (True, None)
    if dist.get_rank(group) == 0:
        try:
            outcome = (True, fn())
        except FisherlabError as exc:
            outcome = (False, exc)
    ok, value = broadcast_object(outcome, group)
    if not ok:
        raise value
    return value


# ------------------------------------------------------------------------------------ launching and failures
@dataclass(frozen=True)
class LaunchEnv:
    """What ``torchrun`` (or any launcher following its conventions) tells a process in its environment."""

    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int
    attempt: int


def launch_environment(environ: Mapping[str, str] | None = None) -> LaunchEnv | None:
    """The launcher's ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT`` (None: not launched).

    ``WORLD_SIZE`` unset or 1 is a single-process run. ``--nnodes`` and ``--node-rank`` of torchrun need nothing
    more: they set ``RANK`` and ``WORLD_SIZE`` over all nodes (and ``LOCAL_RANK`` within this one).

    Raises:
        InputError: A variable that is missing or not an integer (named).
    """
    env = os.environ if environ is None else environ
    if env.get("WORLD_SIZE", "1") in ("", "1"):
        return None
    values: dict[str, int] = {}
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT"):
        text = env.get(name, "0" if name == "LOCAL_RANK" else "")
        try:
            values[name] = int(text)
        except ValueError:
            raise InputError(f"launched with WORLD_SIZE={env['WORLD_SIZE']}, but the environment variable {name} is "
                             f"{text!r}, not an integer (run under torchrun, which sets it)") from None
    if not 0 <= values["RANK"] < values["WORLD_SIZE"]:
        raise InputError(f"RANK={values['RANK']} is outside 0..WORLD_SIZE-1 = {values['WORLD_SIZE'] - 1}")
    return LaunchEnv(values["RANK"], values["WORLD_SIZE"], values["LOCAL_RANK"], env.get("MASTER_ADDR", "127.0.0.1"),
                     values["MASTER_PORT"], int(env.get("TORCHELASTIC_RESTART_COUNT", "0") or 0))


class _Board:
    """The ranks' states in the launcher's store: ``running``, ``failed: <why>``, ``stopped: <why>``, ``done``."""

    def __init__(self, env: LaunchEnv, timeout: timedelta):
        self.env = env
        self.store = dist.TCPStore(env.master_addr, env.master_port, is_master=False, timeout=timeout)
        self.prefix = f"fisherlab/{env.attempt}/state/"

    def mark(self, state: str) -> None:
        """Set this rank's state (never raises: the store may be gone with its host)."""
        try:
            self.store.set(f"{self.prefix}{self.env.rank}", state)
        except Exception:  # noqa: BLE001 - a dead store host must not hide the error being reported
            pass

    def states(self) -> dict[int, str]:
        """Every rank's state (``UNREADABLE`` for a rank whose state cannot be read)."""
        out = {}
        for r in range(self.env.world_size):
            key = f"{self.prefix}{r}"
            try:
                out[r] = self.store.get(key).decode() if self.store.check([key]) else "not started"
            except Exception:  # noqa: BLE001 - the store's host (rank 0 outside torchrun) may be the failed rank
                out[r] = UNREADABLE
        return out


_BOARD: _Board | None = None

#: The board's word for a rank whose state cannot be read: the store is gone with its host (rank 0 when the
#: launcher does not host it, e.g. variables set by hand), so rank 0 is the likely failed rank.
UNREADABLE = ("is unreachable (its state cannot be read: the key-value store is gone with its host, rank 0 unless "
              "torchrun hosts it)")


def _failure(cause: str) -> RankFailedError:
    """The :class:`RankFailedError` of this rank, stopped by ``cause``, naming the failed ranks from the board."""
    if _BOARD is None:
        return RankFailedError(f"rank {dist.get_rank()} of {dist.get_world_size()} stopped: {cause} (a peer rank "
                               "stopped or is unreachable)")
    _BOARD.mark(f"stopped: {cause}")
    time.sleep(PEER_GRACE_S)  # the other survivors say so too
    states = _BOARD.states()
    me = _BOARD.env.rank
    failed = {r: s for r, s in states.items() if r != me and not s.startswith(("stopped", "done"))}
    silent = "stopped without a word (killed, or silent past the timeout)"
    named = "; ".join(f"rank {r} {silent if s == 'running' else s}" for r, s in failed.items()) or "no rank says why"
    return RankFailedError(f"rank {me} of {_BOARD.env.world_size} stopped: {named} ({cause})", failed)


@contextmanager
def collective(what: str) -> Iterator[None]:
    """Turn the error of a collective whose peer is gone into :class:`RankFailedError` (naming the failed ranks)."""
    try:
        yield
    except RuntimeError as exc:  # gloo: connection closed by peer, timed out (DistBackendError is a RuntimeError)
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise _failure(f"the collective {what} failed: {first}") from exc


def resolve_backend(backend: str, device: torch.device | str) -> str:
    """``backend`` (:class:`~fisherlab.vocabulary.Backend`) for ``device``: ``auto`` is NCCL on CUDA, else gloo.

    Raises:
        InputError: An unknown backend, or NCCL with a device that is not CUDA.
    """
    from fisherlab.checks import parse_enum

    chosen = parse_enum(Backend, backend, "backend")
    cuda = torch.device(device).type == "cuda"
    if chosen is Backend.AUTO:
        return Backend.NCCL.value if cuda else Backend.GLOO.value
    if chosen is Backend.NCCL and not cuda:
        raise InputError(f"backend nccl runs on CUDA devices; the device is {str(device)!r} (use gloo)")
    return chosen.value


@contextmanager
def launched(backend: str = "auto", device: torch.device | str = "cpu", timeout: float = 600.0
             ) -> Iterator[LaunchEnv | None]:
    """The default process group of a run under ``torchrun``, for the block (None, and nothing done, otherwise).

    Initialises ``torch.distributed`` from the environment (:func:`launch_environment`) with ``backend``
    (:func:`resolve_backend`; on CUDA each rank takes device ``LOCAL_RANK``) and ``timeout`` seconds for every
    collective, marks this rank on the status board, and destroys the group at the end. An exception leaving the
    block marks this rank failed (with the message) first, so that the peers' :class:`RankFailedError` names it;
    SIGTERM (the launcher stopping the other ranks after one failed) raises :class:`RankFailedError` here.

    Raises:
        InputError: Bad launcher variables, backend, timeout or a CUDA device with an index; torch.distributed
            already initialised.
    """
    global _BOARD
    env = launch_environment()
    if env is None:
        yield None
        return
    if not timeout > 0:
        raise InputError(f"timeout must be > 0 seconds; got {timeout!r}")
    if dist.is_initialized():
        raise InputError("torch.distributed is already initialised in this process")
    name = resolve_backend(backend, device)
    if torch.device(device).type == "cuda":
        if torch.device(device).index is not None:
            raise InputError(f"device {str(device)!r}: under torchrun give the device type only (cuda); each rank "
                             "takes cuda:LOCAL_RANK")
        torch.cuda.set_device(env.local_rank)
    limit = timedelta(seconds=float(timeout))
    dist.init_process_group(name, init_method="env://", rank=env.rank, world_size=env.world_size, timeout=limit)
    _BOARD = _Board(env, limit)
    _BOARD.mark("running")

    def on_sigterm(signum: int, frame: Any) -> None:
        raise _failure("SIGTERM from the launcher, which stops every rank when one fails")

    main = threading.current_thread() is threading.main_thread()  # signal handlers live in the main thread
    previous = signal.signal(signal.SIGTERM, on_sigterm) if main else None
    try:
        yield env
        _BOARD.mark("done")
    except BaseException as exc:
        if not isinstance(exc, RankFailedError):
            _BOARD.mark(f"failed: {type(exc).__name__}: {exc}")
        raise
    finally:
        if main:
            signal.signal(signal.SIGTERM, previous)
        _BOARD = None
        dist.destroy_process_group()


__all__ = ["PEER_GRACE_S", "LaunchEnv", "RankFailedError", "active_group", "all_reduce_sum", "broadcast_object",
           "collective", "launch_environment", "launched", "min_over_ranks", "on_lead", "rank", "resolve_backend",
           "sample_offset", "shard", "world_size"]
