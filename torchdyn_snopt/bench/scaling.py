"""``torchdyn-snopt bench scaling``: SNOpt's time per iteration and communication on N processes.

Weak scaling of the paper's digits classifier (conv features → conv Neural ODE, dopri5 at 1e-3
→ linear head) trained with SNOpt (``full_precond``, curvature refreshed every
``update_freq`` steps) under DistributedDataParallel: every process trains on its own batch
of ``batch_size`` images (global batch = processes × batch_size). Per process count it reports
seconds per iteration (the slowest rank), throughput, the speedup of the throughput over one
process, and the communication: DDP's gradient all-reduce (timed by a DDP communication hook
from launch to completion; it overlaps the backward pass, so its share is an upper bound of
what it costs) and SNOpt's own collectives (the factor bucket at a refresh, the skip flag on
other steps; synchronous, waiting for the slower rank included).

Launched plainly, ``max(world_sizes)`` processes are spawned on this machine (gloo on CPU,
NCCL with one GPU each); launched by ``torchrun``, its processes are used (any number of GPUs
or nodes). Either way rank 0 first times one process alone, then the first ``w`` ranks time
each size ``w`` together while the others wait, so every row runs on the same processes.
"""

from __future__ import annotations

import os
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

from torchdyn_snopt.bench.outputs import write_json
from torchdyn_snopt.bench.records import format_table
from torchdyn_snopt.bench.reporter import Reporter
from torchdyn_snopt.distributed import free_port, spawn
from torchdyn_snopt.optim import SNOpt, read_nfe


@dataclass
class ScalingConfig:
    """What every process runs: ``warmup`` untimed then ``iters`` timed iterations at
    ``batch_size`` images, ``threads`` intra-op CPU threads per process."""

    batch_size: int = 64
    iters: int = 30
    warmup: int = 3
    update_freq: int = 10
    lr: float = 1e-3
    threads: int = 1
    distribute_eigh: bool = False
    seed: int = 0


class _GradCommTimer:
    """State of :func:`_timed_allreduce`: seconds of DDP's gradient all-reduces so far."""

    def __init__(self, group: Any) -> None:
        self.group, self.seconds = group, 0.0
        self._events: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []

    def collect(self) -> float:
        """Seconds so far (waits for pending CUDA events)."""
        for start, end in self._events:
            end.synchronize()
            self.seconds += start.elapsed_time(end) / 1000.0
        self._events.clear()
        return self.seconds


# No annotations: DDP checks them against its own types, and here they would be strings.
def _timed_allreduce(timer, bucket):
    """DDP communication hook: DDP's default averaging all-reduce, timed from launch to
    completion (CUDA: events on the stream that consumes the result)."""
    buf = bucket.buffer().div_(dist.get_world_size(timer.group))
    cuda = buf.is_cuda
    if cuda:
        start = torch.cuda.Event(enable_timing=True)
        start.record()
    else:
        t0 = time.perf_counter()
    fut = dist.all_reduce(buf, group=timer.group, async_op=True).get_future()

    def done(f: torch.futures.Future) -> torch.Tensor:
        if cuda:
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            timer._events.append((start, end))
        else:
            timer.seconds += time.perf_counter() - t0
        return f.value()[0]

    return fut.then(done)


def _data(cfg: ScalingConfig, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    from torchdyn_snopt.data import load_digits

    x, y, _, _ = load_digits(seed=cfg.seed)
    return x.to(device), y.to(device)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(
    cfg: ScalingConfig,
    device: torch.device,
    rank: int = 0,
    world: int = 1,
    backend: str = "-",
    group: Any = None,
) -> dict[str, Any]:
    """Time ``cfg.iters`` iterations on this rank. With ``world > 1`` every rank of ``group``
    (None: the default group) calls it; the returned row is the same on all of them."""
    from torchdyn_snopt.models import ImageClassifier

    x, y = _data(cfg, device)
    torch.manual_seed(cfg.seed)
    model: nn.Module = ImageClassifier().to(device)
    timer = None
    if world > 1:
        model = DistributedDataParallel(
            model, device_ids=[device] if device.type == "cuda" else None, process_group=group
        )
        timer = _GradCommTimer(group)
        model.register_comm_hook(timer, _timed_allreduce)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = SNOpt(
            model,
            lr=cfg.lr,
            update_freq=cfg.update_freq,
            full_precond=True,
            process_group=(group or "auto") if world > 1 else None,
            distribute_eigh=cfg.distribute_eigh,
        )
    g = torch.Generator().manual_seed(cfg.seed + 1)
    perm = torch.randperm(len(x), generator=g).to(device)

    def iteration(i: int) -> None:
        start = ((i * world + rank) * cfg.batch_size) % (len(x) - cfg.batch_size)
        idx = perm[start : start + cfg.batch_size]
        opt.zero_grad()
        F.cross_entropy(model(x[idx]), y[idx]).backward()
        opt.step()

    for i in range(cfg.warmup):
        iteration(i)
    _sync(device)
    if timer is not None:
        timer.collect()
        timer.seconds = 0.0
    opt.preconditioner.sync.stats.reset()
    read_nfe(model)
    t0 = time.perf_counter()
    for i in range(cfg.warmup, cfg.warmup + cfg.iters):
        iteration(i)
    _sync(device)
    elapsed = time.perf_counter() - t0
    nfe = read_nfe(model)
    grad_comm = timer.collect() if timer is not None else 0.0
    local = torch.tensor(
        [
            elapsed,
            grad_comm,
            opt.preconditioner.sync.stats.seconds,
            nfe["forward"] + nfe["backward"],
        ],
        dtype=torch.float64,
        device=device,
    )
    if world > 1:
        slowest = local.clone()
        dist.all_reduce(slowest, op=dist.ReduceOp.MAX, group=group)
        dist.all_reduce(local, group=group)
        local /= world
        local[0] = slowest[0]
    elapsed, grad_comm, snopt_comm, nfe_total = local.tolist()
    per_iter = elapsed / cfg.iters
    return {
        "processes": world,
        "backend": backend,
        "device": device.type,
        "batch_per_process": cfg.batch_size,
        "s_per_iter": per_iter,
        "samples_per_s": world * cfg.batch_size / per_iter,
        "grad_comm_ms": 1e3 * grad_comm / cfg.iters,
        "snopt_comm_ms": 1e3 * snopt_comm / cfg.iters,
        "comm_share": (grad_comm + snopt_comm) / elapsed,
        "nfe_per_iter": nfe_total / cfg.iters,
    }


# --------------------------------------------------------------------------- launching


def _device_for(device: str, world: int, local_rank: int = 0) -> torch.device:
    """The device of one process: ``cuda:<local rank>`` or cpu."""
    if device not in ("auto", "cpu", "cuda"):
        raise ValueError(f"device={device!r} is invalid; accepted: auto, cpu, cuda")
    cuda = torch.cuda.is_available() and torch.cuda.device_count() >= world
    if device == "cuda" and not cuda:
        raise ValueError(
            f"device='cuda' needs {world} GPUs; {torch.cuda.device_count()} visible; "
            "accepted instead: cpu or auto"
        )
    if device == "cuda" or (device == "auto" and cuda):
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def launched_by_torchrun() -> bool:
    """Whether this process is one rank of a torchrun job (or of our own spawn, which sets
    the same environment)."""
    return "LOCAL_RANK" in os.environ and "WORLD_SIZE" in os.environ


def _rank_main(
    world_sizes: tuple[int, ...], device: str, cfg: ScalingConfig
) -> list[dict[str, Any]] | None:
    """One rank of a job launched with torchrun's environment: times 1 process (rank 0 alone),
    every requested size below the job's (the first ranks, in a subgroup) and the whole job,
    the other ranks waiting at a barrier. Rows on rank 0, None elsewhere."""
    local_rank, world = int(os.environ["LOCAL_RANK"]), int(os.environ["WORLD_SIZE"])
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    torch.set_num_threads(cfg.threads)
    dev = _device_for(device, local_world, local_rank)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    backend = "nccl" if dev.type == "cuda" else "gloo"
    dist.init_process_group(backend)
    try:
        rank = dist.get_rank()
        sizes = sorted({1, *(w for w in world_sizes if w <= world), world})
        # new_group is collective: every rank creates every subgroup, in the same order.
        groups = {w: dist.new_group(list(range(w))) for w in sizes if 1 < w < world}
        rows = []
        for w in sizes:
            if rank < w:
                rows.append(measure(cfg, dev, rank, w, backend if w > 1 else "-", groups.get(w)))
            dist.barrier()
        return rows if rank == 0 else None
    finally:
        dist.destroy_process_group()


def _spawned(rank: int, world: int, port: int, args: tuple, queue: Any) -> None:
    """A locally spawned rank: torchrun's environment, then :func:`_rank_main`."""
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_WORLD_SIZE=str(world),
    )
    rows = _rank_main(*args)
    if rank == 0:
        queue.put(rows)


def _run_local(
    world_sizes: tuple[int, ...], device: str, cfg: ScalingConfig, timeout_s: float
) -> list[dict[str, Any]]:
    """Spawn ``max(world_sizes)`` processes on this machine (one process: time it here)."""
    world = max(world_sizes)
    if world == 1:
        old = torch.get_num_threads()
        torch.set_num_threads(cfg.threads)
        try:
            return [measure(cfg, _device_for(device, 1))]
        finally:
            torch.set_num_threads(old)
    import torch.multiprocessing as mp

    queue = mp.get_context("spawn").SimpleQueue()
    args = ((world_sizes, device, cfg), queue)
    spawn(_spawned, world, world, free_port(), *args, timeout_s=timeout_s)
    return queue.get()


def bench_scaling(
    world_sizes: tuple[int, ...] = (1, 2),
    cfg: ScalingConfig | None = None,
    device: str = "auto",
    out: str | Path | None = "runs/scaling",
    quiet: bool = False,
    timeout_s: float = 600.0,
) -> list[dict[str, Any]]:
    """Time 1 process and every size in ``world_sizes`` (under torchrun: those up to its job,
    and the whole job), print them side by side and write ``scaling.json`` under ``out``
    (rank 0 only). Returns the rows ([] on ranks other than 0)."""
    cfg = cfg or ScalingConfig()
    if not world_sizes or any(not isinstance(w, int) or w < 1 for w in world_sizes):
        raise ValueError(f"world_sizes={world_sizes!r} is invalid; accepted: ints >= 1")
    if cfg.iters < 1 or cfg.batch_size < 1 or cfg.warmup < 0 or cfg.threads < 1:
        raise ValueError(f"cfg={cfg!r} is invalid: iters, batch_size, threads >= 1, warmup >= 0")
    if launched_by_torchrun():
        rows = _rank_main(world_sizes, device, cfg)
        if rows is None:
            return []
    else:
        _device_for(device, max(world_sizes))  # fail before spawning anything
        rows = _run_local(world_sizes, device, cfg, timeout_s)
    base = rows[0]["samples_per_s"]  # 1 process comes first
    for row in rows:
        row["speedup"] = row["samples_per_s"] / base
    Reporter(quiet)(format_table(rows))
    if out is not None:
        write_json(Path(out) / "scaling.json", {"config": asdict(cfg), "rows": rows})
    return rows
