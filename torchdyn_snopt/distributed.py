"""SNOpt across the ranks of a ``torch.distributed`` job (DDP, Lightning's ``strategy="ddp"``).

DDP averages the gradients, so after ``backward()`` every rank holds the gradient of the
concatenated batch; the curvature, however, is sampled by each rank on its own shard. To keep
the preconditioner identical on every rank (and hence the parameters, which DDP never
re-broadcasts), :class:`RankSync` communicates at two points of ``SNOptPreconditioner.step``:

- **refresh steps**: ONE all-reduce of a flat buffer holding the non-finite-gradient flag and
  every layer's ``Ā``, ``B̄`` (plus how many ranks sampled it and its spatial locations). The
  factors are per-sample means (see :mod:`torchdyn_snopt.curvature.sampler`), so with equal
  per-rank batches their average over ranks is the factor of the concatenated batch. The
  eigendecompositions then start from identical matrices, and so does the eigenbasis second
  moment ``m = L·λ_B λ_Aᵀ``; afterwards ``m`` is updated from the (DDP-averaged) gradient with
  the global batch ``world_size × local batch``, identically on every rank, so it needs no
  communication of its own.
- **other steps**: a one-element all-reduce of the non-finite-gradient flag, so that a rank that
  sees a non-finite gradient makes every rank skip the step.

With ``distribute_eigh=True`` each rank decomposes a share of the factors (greedy on ``n³``)
and one more all-reduce over disjoint slots (each slot is non-zero on its owner only, so the
sum is exact) hands every rank all eigenpairs: bit-identical eigenbases on every rank, and
``1/world_size`` of the eigendecomposition work.

The code is device-agnostic: buffers live on the parameters' device, so gloo (CPU) and NCCL
(CUDA) both work.
"""

from __future__ import annotations

import enum
import functools
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from itertools import accumulate
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn
from torch import Tensor
from torch.nn.parallel import DistributedDataParallel

from torchdyn_snopt.curvature.base import LayerAdapter
from torchdyn_snopt.curvature.source import Factors


class Group(str, enum.Enum):
    """Named choices of ``process_group`` (a string works too)."""

    #: torch.distributed's default group when it is initialized with more than one process,
    #: otherwise no communication.
    AUTO = "auto"


#: The default ``process_group`` (equal to the string ``"auto"``).
AUTO = Group.AUTO


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside (possibly nested) ``DistributedDataParallel`` wrappers."""
    while isinstance(model, DistributedDataParallel):
        model = model.module
    return model


def check_process_group(process_group: Any) -> Any:
    """``process_group`` normalised (``"auto"`` -> :attr:`Group.AUTO`); ``TypeError`` unless it
    is ``"auto"``, ``None`` or a ``torch.distributed.ProcessGroup``."""
    if process_group is None:
        return None
    if isinstance(process_group, str) and process_group == AUTO:
        return AUTO
    if dist.is_available() and isinstance(process_group, dist.ProcessGroup):
        return process_group
    raise TypeError(
        f"process_group={process_group!r} is invalid; accepted: 'auto' (the default group when "
        "torch.distributed is initialized), None (no communication) or a "
        "torch.distributed.ProcessGroup"
    )


@dataclass
class CommStats:
    """What :class:`RankSync` sent: collectives, wall seconds in them (waiting for the other
    ranks included), and bytes reduced per rank."""

    calls: int = 0
    seconds: float = 0.0
    bytes: int = 0

    def reset(self) -> None:
        self.calls, self.seconds, self.bytes = 0, 0.0, 0


class RankSync:
    """The collectives one ``SNOptPreconditioner`` needs; local no-ops with one process.

    Args:
        process_group: ``"auto"`` (default), ``None`` or a ``torch.distributed.ProcessGroup``;
            ``"auto"`` is resolved at every step, so the preconditioner may be built before
            ``init_process_group``.
        distribute_eigh: split the eigendecompositions of a refresh across ranks.
    """

    def __init__(self, process_group: Any = AUTO, distribute_eigh: bool = False) -> None:
        process_group = check_process_group(process_group)
        if not isinstance(distribute_eigh, bool):
            raise TypeError(f"distribute_eigh={distribute_eigh!r} must be a bool")
        self.process_group = process_group
        self.distribute_eigh = distribute_eigh
        self.stats = CommStats()

    # --- the group ------------------------------------------------------------------------
    def _group(self) -> Any:
        if self.process_group is None or not (dist.is_available() and dist.is_initialized()):
            return None
        return None if self.process_group == AUTO else self.process_group

    def world_size(self) -> int:
        """Processes that share this preconditioner's state (1 when not distributed)."""
        if self.process_group is None or not (dist.is_available() and dist.is_initialized()):
            return 1
        return dist.get_world_size(self._group())

    def all_reduce(self, buf: Tensor) -> Tensor:
        """Sum ``buf`` in place over the group's ranks (counted in :attr:`stats`); returns it."""
        start = time.perf_counter()
        dist.all_reduce(buf, op=dist.ReduceOp.SUM, group=self._group())
        if buf.is_cuda:  # NCCL only enqueues: count the time until the sum is there
            torch.cuda.synchronize(buf.device)
        self.stats.calls += 1
        self.stats.seconds += time.perf_counter() - start
        self.stats.bytes += buf.numel() * buf.element_size()
        return buf

    # --- refresh and flag -----------------------------------------------------------------
    def agree(
        self,
        grads_ok: bool,
        factors: dict[LayerAdapter, Factors],
        adapters: Sequence[LayerAdapter],
        refresh: bool,
        device: torch.device,
    ) -> tuple[int, dict[LayerAdapter, Factors]]:
        """Ranks with a non-finite gradient, and (``refresh``) the factors averaged over ranks.

        One all-reduce: ``[bad] + [count, locations, Ā, B̄ per adapter]`` at a refresh, ``[bad]``
        otherwise. A layer's factors are averaged over the ranks that sampled it; layers no
        rank sampled are left out. With one process: ``(0 or 1, factors)`` unchanged.
        """
        bad = 0 if grads_ok else 1
        if self.world_size() == 1:
            return bad, factors
        if not refresh:
            flag = self.all_reduce(torch.tensor([float(bad)], device=device))
            return int(flag.item()), {}
        dtype = _common_dtype([a.params()[0] for a in adapters])  # the same on every rank
        dims = [_dims(a) for a in adapters]
        sizes = [2 + d_in * d_in + d_out * d_out for d_in, d_out in dims]
        buf = torch.zeros(1 + sum(sizes), dtype=dtype, device=device)
        buf[0] = bad
        o = 1
        for a, (d_in, _), size in zip(adapters, dims, sizes):
            f = factors.get(a)
            if f is not None:
                buf[o], buf[o + 1] = 1.0, float(f.locations)
                buf[o + 2 : o + 2 + d_in * d_in] = f.A.reshape(-1)
                buf[o + 2 + d_in * d_in : o + size] = f.B.reshape(-1)
            o += size
        self.all_reduce(buf)
        starts = list(accumulate([1, *sizes[:-1]]))
        heads = buf[[0] + [s + k for s in starts for k in (0, 1)]].tolist()  # one host sync
        out: dict[LayerAdapter, Factors] = {}
        for i, (a, (d_in, d_out), o) in enumerate(zip(adapters, dims, starts)):
            count, locations = heads[1 + 2 * i], heads[2 + 2 * i]
            if count > 0:
                local = factors.get(a)
                out[a] = Factors(
                    buf[o + 2 : o + 2 + d_in * d_in].view(d_in, d_in) / count,
                    buf[o + 2 + d_in * d_in : o + sizes[i]].view(d_out, d_out) / count,
                    round(locations / count),
                    local.batch_size if local is not None else 1,
                )
        return int(heads[0]), out

    # --- eigendecompositions --------------------------------------------------------------
    def eigh(
        self,
        matrices: list[Tensor],
        fn: Callable[..., tuple[Tensor, Tensor]],
        priors: Sequence[Any] | None = None,
        shapes: Sequence[tuple[int, int]] | None = None,
    ) -> list[tuple[Tensor, Tensor]]:
        """``fn(m)`` (eigenvalues, eigenvectors) for every matrix, split across ranks when
        ``distribute_eigh`` is set and the job has more than one process. With ``priors``
        (one per matrix, e.g. its previous eigenbasis, identical on every rank) the call is
        ``fn(m, prior)``. ``shapes``: ``(len(eigenvalues), columns of the eigenvectors)`` of
        each result (default ``(n, n)``; a thin refresh returns fewer, see
        :func:`~torchdyn_snopt.curvature.eigenbasis.pair_shape`)."""
        world = self.world_size()
        if priors is not None and len(priors) != len(matrices):
            raise ValueError(f"priors has {len(priors)} entries for {len(matrices)} matrices")
        calls: list[Callable[[], tuple[Tensor, Tensor]]] = [
            functools.partial(fn, m) if priors is None else functools.partial(fn, m, priors[i])
            for i, m in enumerate(matrices)
        ]
        if not (self.distribute_eigh and world > 1 and matrices):
            return [call() for call in calls]
        rank = dist.get_rank(self._group())
        sizes = [m.shape[0] for m in matrices]
        kept = list(shapes) if shapes is not None else [(n, n) for n in sizes]
        owners = assign([n**3 for n in sizes], world)  # same matrices, same owners everywhere
        lengths = [e + n * c for n, (e, c) in zip(sizes, kept)]
        buf = torch.zeros(sum(lengths), dtype=_common_dtype(matrices), device=matrices[0].device)
        o = 0
        for call, (e, _), length, owner in zip(calls, kept, lengths, owners):
            if owner == rank:
                evals, evecs = call()
                buf[o : o + e] = evals
                buf[o + e : o + length] = evecs.reshape(-1)
            o += length
        self.all_reduce(buf)
        out, o = [], 0
        for m, n, (e, c), length in zip(matrices, sizes, kept, lengths):
            out.append((buf[o : o + e].to(m.dtype), buf[o + e : o + length].view(n, c).to(m.dtype)))
            o += length
        return out


def assign(costs: Sequence[float], world: int) -> list[int]:
    """Owner rank of each job: greedy, largest cost first, to the least-loaded rank
    (deterministic: ties go to the lower index / lower rank)."""
    load = [0.0] * world
    owners = [0] * len(costs)
    for i in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        r = min(range(world), key=lambda r: (load[r], r))
        owners[i] = r
        load[r] += costs[i]
    return owners


def _dims(adapter: LayerAdapter) -> tuple[int, int]:
    """``(d_in, d_out)`` of ``Ā`` (``d_in × d_in``) and ``B̄`` (``d_out × d_out``)."""
    d_out, d_in = adapter.param_matrix().shape
    return d_in, d_out


def _common_dtype(tensors: Sequence[Tensor]) -> torch.dtype:
    dtype = tensors[0].dtype if tensors else torch.get_default_dtype()
    for t in tensors[1:]:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype


# --------------------------------------------------------------------------- local launching


def free_port() -> int:
    """A TCP port on localhost that was free a moment ago (for ``init_process_group``)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn(fn: Callable[..., None], nprocs: int, *args: object, timeout_s: float = 120.0) -> None:
    """Run ``fn(rank, *args)`` in ``nprocs`` fresh processes (torch.multiprocessing "spawn").

    Re-raises a child's exception; kills every child and raises ``TimeoutError`` after
    ``timeout_s`` seconds (s). Children inherit ``sys.path``.
    """
    import torch.multiprocessing as mp

    ctx = mp.spawn(fn, args=args, nprocs=nprocs, join=False)
    deadline = time.monotonic() + timeout_s
    while not ctx.join(timeout=max(0.1, deadline - time.monotonic())):
        if time.monotonic() >= deadline:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
            raise TimeoutError(
                f"{nprocs} processes of {fn.__name__} did not finish in {timeout_s} s"
            )
