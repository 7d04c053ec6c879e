"""Two processes (gloo on loopback) against one: DistributedDataParallel around a Flow.

``Flow.forward`` is ``log_prob``, so ``DistributedDataParallel(flow)(x)`` all-reduces the
gradients; ActNorm initialises from the statistics of the global batch. After a few steps
on halves of a global batch, both ranks hold the parameters a single process reaches on
the whole batch, in ordinary and in memory-saving mode.
"""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel

from flows.models import Glow

STEPS, BATCH = 3, 16


def _model(memory_saving: bool) -> torch.nn.Module:
    torch.manual_seed(0)
    model = Glow((1, 4, 4), levels=2, steps=2, hidden_channels=8, split_prior=True).double()
    model.memory_saving = memory_saving
    return model


def _batches() -> torch.Tensor:
    return torch.rand(STEPS, BATCH, 1, 4, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)


def _train(model: torch.nn.Module, batches: torch.Tensor) -> None:
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    for x in batches:
        opt.zero_grad()
        (-model(x).mean()).backward()
        opt.step()


def _worker(rank: int, port: int, memory_saving: bool, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        model = _model(memory_saving)
        half = _batches()[:, rank * BATCH // 2 : (rank + 1) * BATCH // 2]
        _train(DistributedDataParallel(model), half)
        torch.save({k: v.detach().clone() for k, v in model.state_dict().items()}, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("memory_saving", [False, True], ids=["ordinary", "memory-saving"])
def test_two_processes_train_as_one_on_the_global_batch(memory_saving: bool, tmp_path) -> None:
    out = str(tmp_path / "state")
    mp.start_processes(_worker, args=(_free_port(), memory_saving, out), nprocs=2, start_method="spawn")
    ranks = [torch.load(f"{out}.{r}", weights_only=True) for r in range(2)]
    single = _model(memory_saving)
    _train(single, _batches())
    for name, expected in single.state_dict().items():
        torch.testing.assert_close(ranks[0][name], ranks[1][name], rtol=0, atol=0, msg=name)
        torch.testing.assert_close(ranks[0][name], expected, rtol=1e-9, atol=1e-11, msg=name)
