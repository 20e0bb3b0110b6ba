"""``torchrun`` + DDP plumbing shared by the training stages (DESIGN.md §2: gloo on CPU, nccl on GPU).

A process started by ``torchrun`` finds ``WORLD_SIZE``/``RANK``/``LOCAL_RANK`` in its environment; a plain
``python -m trainers.<stage>`` (or a test calling ``main``) has none and runs as the single rank 0 without any
process group. Rank 0 alone writes files and logs; every collective below is a no-op in a single process.
"""
from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from typing import Callable

import torch
import torch.distributed as dist


@dataclass
class Dist:
    """This process's place in the job.

    Attributes:
        rank, world_size, local_rank: from torchrun's environment (0, 1, 0 without it).
        device: the device this rank trains on (``cuda:<local_rank>`` for a CUDA job).
    """

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def world_size() -> int:
    """The job's process count from torchrun's ``WORLD_SIZE`` (1 outside torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def setup(device: torch.device) -> Dist:
    """Join the torchrun process group when ``WORLD_SIZE > 1`` (gloo for CPU, nccl for CUDA).

    Args:
        device: the requested device; for CUDA the index is replaced by ``LOCAL_RANK``.
    Returns:
        :class:`Dist`.
    """
    world = world_size()
    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    if world > 1 and device.type == "cuda":
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return Dist(rank=rank if world > 1 else 0, world_size=world, local_rank=local, device=device)


def cleanup(d: Dist) -> None:
    """Leave the process group (no-op in a single process)."""
    if d.enabled and dist.is_initialized():
        dist.destroy_process_group()


def run(device: torch.device, fn: Callable[[Dist], int]) -> int:
    """:func:`setup`, then ``fn(dist)``, then :func:`cleanup` even when ``fn`` raises; returns ``fn``'s exit code.

    In a torchrun job (``WORLD_SIZE > 1``) a rank whose ``fn`` returned does not come back: it flushes stdout and
    stderr and leaves with ``os._exit(code)``. Gloo's worker threads may still hold the last collectives' tensors
    after the process group is destroyed; if the interpreter were finalizing when a worker releases one, the worker
    could not take the GIL and the rank would abort ("terminate called without an active exception", exit -6)
    after a run that succeeded (here: a few percent of 2-process CPU runs on 2 busy cores; the crash is described in
    pytorch/pytorch PR 179291). Files are closed by ``fn`` itself, so skipping finalization loses nothing. An
    exception from ``fn`` propagates as usual (after :func:`cleanup`); the run has failed then anyway.
    """
    d = setup(device)
    try:
        code = fn(d)
    finally:
        cleanup(d)
    if d.enabled:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


def barrier(d: Dist) -> None:
    if d.enabled:
        dist.barrier()


def any_rank(d: Dist, flag: bool) -> bool:
    """True when ``flag`` is True on any rank (e.g. a SIGTERM seen by one rank stops all at the same step)."""
    if not d.enabled:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=d.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def gather_bytes(d: Dist, data: bytes) -> list[bytes]:
    """Every rank's ``data`` in rank order (as uint8 tensors, no pickle); ``[data]`` in a single process."""
    if not d.enabled:
        return [data]
    n = torch.tensor([len(data)], device=d.device, dtype=torch.int64)
    sizes = [torch.zeros_like(n) for _ in range(d.world_size)]
    dist.all_gather(sizes, n)
    width = int(max(s.item() for s in sizes))
    buf = torch.zeros(width, dtype=torch.uint8)
    if data:
        buf[: len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    bufs = [torch.zeros(width, dtype=torch.uint8, device=d.device) for _ in range(d.world_size)]
    dist.all_gather(bufs, buf.to(d.device))
    return [b[: int(s.item())].cpu().numpy().tobytes() for b, s in zip(bufs, sizes)]


def gather_json(d: Dist, obj) -> list:
    """Every rank's JSON-able ``obj`` in rank order."""
    return [json.loads(b.decode()) for b in gather_bytes(d, json.dumps(obj).encode())]


def gather_tensor(d: Dist, t: torch.Tensor) -> list[torch.Tensor]:
    """Every rank's tensor (same shape and dtype on every rank), on CPU, in rank order."""
    if not d.enabled:
        return [t.cpu()]
    x = t.to(d.device)
    out = [torch.zeros_like(x) for _ in range(d.world_size)]
    dist.all_gather(out, x)
    return [o.cpu() for o in out]


@torch.no_grad()
def replicas_equal(d: Dist, module: torch.nn.Module) -> bool:
    """True when every parameter is bit-identical on all ranks (elementwise MAX == MIN across ranks)."""
    if not d.enabled:
        return True
    same = True
    for p in module.parameters():
        hi, lo = p.detach().clone(), p.detach().clone()
        dist.all_reduce(hi, op=dist.ReduceOp.MAX)
        dist.all_reduce(lo, op=dist.ReduceOp.MIN)
        same &= bool(torch.equal(hi, lo))
    return same
