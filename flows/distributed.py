"""What a module needs to know of a multi-process run: ranks, reductions, launch and shards.

Everything here works without a process group (a single process): the world is one rank,
rank 0 is the main one, a sum is the tensor itself and a barrier returns at once. So the
trainer runs one code path at every world size.

* Launch: ``torchrun`` sets ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK``
  (:func:`launched`); :func:`process_group` initialises the default group from them
  (``env://``; gloo on CPU, nccl on CUDA with ``cuda:LOCAL_RANK``) and tears it down.
* Sharding: every rank draws the same global batch of indices from one seeded generator
  and keeps its contiguous slice, :func:`shard`. Rank ``r`` of ``W`` keeps positions
  ``[r n / W, (r + 1) n / W)`` (integer division) of ``n``, so the shards tile the batch
  in order at every world size.
* Data-dependent initialisation (``ActNorm``) sums its moments with :func:`all_reduce_sum`,
  so every rank of a ``DistributedDataParallel`` run initialises from the statistics of the
  global batch and the replicas stay identical.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager, redirect_stdout
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

# What torchrun (and any env:// launcher) sets in every process it starts.
_LAUNCH_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK")


def initialized() -> bool:
    """Whether a default process group exists."""
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    """The number of processes of the default process group (1 without one)."""
    return dist.get_world_size() if initialized() else 1


def rank() -> int:
    """This process's rank in the default process group (0 without one)."""
    return dist.get_rank() if initialized() else 0


def is_main() -> bool:
    """Whether this process is rank 0, the one that logs and writes files."""
    return rank() == 0


def barrier() -> None:
    """Wait until every rank gets here (nothing in a single process)."""
    if world_size() > 1:
        dist.barrier()


def all_reduce_sum(t: Tensor) -> Tensor:
    """``t`` summed over every rank, in place (``t`` itself in a single process).

    Example:
        >>> import torch
        >>> all_reduce_sum(torch.ones(2))
        tensor([1., 1.])
    """
    if world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def any_rank(flag: bool) -> bool:
    """Whether ``flag`` is true on at least one rank (every rank gets the same answer).

    A decision that changes the control flow (stop after this step) must be taken by all
    ranks together, or the others wait forever in their next collective.
    """
    if world_size() == 1:
        return flag
    return bool(all_reduce_sum(torch.tensor([float(flag)], device=_collective_device())).item() > 0)


def broadcast_object(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank (``obj`` itself in a single process); it must pickle."""
    if world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0, device=_collective_device())
    return box[0]


def shard(n: int, of_rank: int | None = None, world: int | None = None) -> slice:
    """The contiguous part of ``n`` positions that a rank takes.

    Args:
        n: the number of positions (the global batch, a split to evaluate).
        of_rank: the rank (default: this process's).
        world: the world size (default: the default group's).

    Returns:
        ``slice(r * n // W, (r + 1) * n // W)``: the shards of ranks ``0..W-1`` tile
        ``range(n)`` in order and differ in size by at most one.

    Example:
        >>> [shard(10, r, 3) for r in range(3)]
        [slice(0, 3, None), slice(3, 6, None), slice(6, 10, None)]
    """
    r = rank() if of_rank is None else of_rank
    w = world_size() if world is None else world
    return slice(r * n // w, (r + 1) * n // w)


def launch_rank() -> int:
    """This process's rank: the process group's, else the one a launcher gave it (``RANK``,
    before the group is set up), else 0."""
    return rank() if initialized() else int(os.environ.get("RANK", "0"))


def launch_world_size() -> int:
    """The number of ranks: the process group's, else the launcher's ``WORLD_SIZE``, else 1."""
    return world_size() if initialized() else int(os.environ.get("WORLD_SIZE", "1"))


def launched() -> bool:
    """Whether a launcher (``torchrun``) started this process as one rank of a group."""
    return all(name in os.environ for name in _LAUNCH_VARIABLES)


def local_device(device: torch.device) -> torch.device:
    """The device a launched rank trains on: ``cuda:LOCAL_RANK`` for ``cuda``, else ``device``.

    A device with an explicit index, or any device outside a launch, is kept as given.
    """
    if device.type == "cuda" and device.index is None and launched():
        return torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    return device


@contextmanager
def process_group(device: torch.device) -> Iterator[torch.device]:
    """Join the launcher's process group for the duration of the block.

    Under ``torchrun`` (:func:`launched`) without a default group, initialises one from the
    environment (``env://``: ``MASTER_ADDR``, ``MASTER_PORT``, ``RANK``, ``WORLD_SIZE``),
    with nccl for a CUDA ``device`` and gloo otherwise, and destroys it on exit. Outside a
    launch, or when the caller already initialised a group, it does nothing.

    Args:
        device: the device the caller asked for (``cuda`` becomes ``cuda:LOCAL_RANK``).

    Yields:
        The device this rank uses.
    """
    device = local_device(device)
    if not launched() or initialized():
        yield device
        return
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", init_method="env://")
    try:
        yield device
    finally:
        dist.destroy_process_group()


@contextmanager
def quiet_unless_main() -> Iterator[None]:
    """Silence standard output on every rank but 0, so a launched run prints each line once."""
    if is_main():
        yield
        return
    with open(os.devnull, "w") as devnull, redirect_stdout(devnull):
        yield


def check_launch(what: str) -> None:
    """Refuse to run a launched rank on its own: it would train alone and write rank 0's files.

    Raises:
        RuntimeError: ``torchrun`` started this process (``WORLD_SIZE`` > 1) but no process
            group is initialised.
    """
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if launched() and size > 1 and not initialized():
        raise RuntimeError(
            f"{what}: this process is rank {os.environ['RANK']} of {size} started by torchrun, but no process group "
            "is initialised; call torch.distributed.init_process_group() (or enter "
            "flows.distributed.process_group(device)) before training"
        )


def wrap(module: nn.Module, device: torch.device) -> nn.Module:
    """``module`` inside ``DistributedDataParallel`` in a multi-process run, else itself.

    Constructing the wrapper broadcasts rank 0's parameters and buffers, so the replicas
    start equal even if the ranks built them differently. Buffers are not synchronised
    again at every forward: the only data-dependent ones (``ActNorm``'s) are initialised
    from all-reduced moments and so agree already.
    """
    if world_size() == 1:
        return module
    from torch.nn.parallel import DistributedDataParallel

    ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(module, device_ids=ids, forward_sync_buffers=False)


def _collective_device() -> torch.device:
    """Where small tensors for collectives live: nccl reduces CUDA tensors only."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


__all__ = [
    "all_reduce_sum",
    "any_rank",
    "barrier",
    "broadcast_object",
    "check_launch",
    "initialized",
    "is_main",
    "launched",
    "local_device",
    "process_group",
    "quiet_unless_main",
    "rank",
    "shard",
    "world_size",
    "wrap",
]
