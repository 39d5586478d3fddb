"""The Communicator over gloo with 2 real processes (torch.multiprocessing spawn), and
its per-backend validation.  Each rank checks its own results against values it can
compute alone; failures travel back through the spawn's exception."""
from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from portaserve.platforms.communicator import CommConfig, Communicator, init_distributed
from portaserve.platforms.cpu import CpuPlatform
from portaserve.platforms.cuda import CudaPlatform
from portaserve.platforms.rocm import RocmPlatform
from portaserve.platforms.tpu import TpuPlatform
from portaserve.platforms.xpu import XpuPlatform


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int) -> None:
    torch.set_num_threads(1)
    comm = init_distributed(CpuPlatform(configure_threads=False), rank, world,
                            f"tcp://127.0.0.1:{port}", timeout_s=60)
    try:
        assert comm.backend == "gloo" and comm.world_size == world and comm.rank == rank
        ranks = torch.arange(world, dtype=torch.float32)

        def mine(*shape):  # a tensor that differs per rank
            return torch.arange(int(torch.tensor(shape).prod()), dtype=torch.float32).view(*shape) + 100 * rank

        def every(*shape):
            return [torch.arange(int(torch.tensor(shape).prod()), dtype=torch.float32).view(*shape) + 100 * r
                    for r in range(world)]

        t = mine(3, 4)
        out = comm.all_reduce(t)
        assert out is t and torch.equal(t, sum(every(3, 4)))
        t = mine(2, 3)
        comm.all_reduce(t, op="max")
        assert torch.equal(t, every(2, 3)[-1])

        assert torch.equal(comm.all_gather(mine(2, 3)), torch.cat(every(2, 3), 0))
        assert torch.equal(comm.all_gather(mine(2, 3), dim=-1), torch.cat(every(2, 3), -1))

        full = sum(every(4, 6))
        assert torch.equal(comm.reduce_scatter(mine(4, 6)), full.chunk(world, 0)[rank])
        assert torch.equal(comm.reduce_scatter(mine(4, 6), dim=1), full.chunk(world, 1)[rank])
        with pytest.raises(ValueError, match="not divisible"):
            comm.reduce_scatter(mine(3, 2))

        b = mine(5)
        comm.broadcast(b, src=1)
        assert torch.equal(b, every(5)[1])
        assert float(ranks.sum()) == world * (world - 1) / 2
        comm.barrier()
    finally:
        dist.destroy_process_group()


def test_gloo_collectives_two_processes():
    mp.spawn(_worker, args=(2, _free_port()), nprocs=2, join=True)


def test_world_size_one_is_identity():
    comm = Communicator("gloo")
    t = torch.randn(4, 2)
    assert comm.world_size == 1 and comm.rank == 0
    assert comm.all_reduce(t) is t and comm.all_gather(t) is t
    assert comm.reduce_scatter(t) is t and comm.broadcast(t) is t


@pytest.mark.parametrize("cls,backend", [(CpuPlatform, "gloo"), (CudaPlatform, "nccl"),
                                         (RocmPlatform, "nccl"), (XpuPlatform, "xccl"),
                                         (TpuPlatform, "xla")])
def test_backend_follows_platform(cls, backend):
    assert cls.dist_backend == backend
    assert Communicator.for_platform(cls.__new__(cls)).backend == backend


def test_validate():
    assert Communicator.validate(CommConfig(1, "nccl")) == []  # nothing to communicate
    assert Communicator.validate(CommConfig(2, "gloo")) == []
    assert "world size must be >= 1" in Communicator.validate(CommConfig(0, "gloo"))[0]
    if not dist.is_nccl_available():
        assert "nccl is not available" in " ".join(Communicator.validate(CommConfig(2, "nccl")))
    import importlib.util

    if importlib.util.find_spec("torch_xla") is None:
        assert Communicator.validate(CommConfig(2, "xla")) == ["backend xla needs torch_xla"]
