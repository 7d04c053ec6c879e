"""What a module needs to know of a multi-process run: the world size and a summing all-reduce.

Both work without a process group (a single process): the world is one rank and the sum
is the tensor itself. Data-dependent initialisation (``ActNorm``) uses them so that every
rank of a ``DistributedDataParallel`` run initialises from the statistics of the global
batch and the replicas stay identical.
"""

from __future__ import annotations

import torch.distributed as dist
from torch import Tensor


def world_size() -> int:
    """The number of processes of the default process group (1 without one)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


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
