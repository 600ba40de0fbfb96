"""SNOpt under DDP: 2 gloo processes on localhost vs one process on the concatenated batch.

One spawn (module fixture) runs every 2-process scenario and saves what each rank ends with;
the tests below compare those files with single-process references computed here.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

import torchdyn_snopt as tds
from tests.helpers.data import classification_data
from tests.helpers.distributed import free_port, init_gloo, spawn
from tests.helpers.models import OdeClassifier
from torchdyn_snopt.curvature.eigenbasis import EXACT_UP_TO
from torchdyn_snopt.distributed import RankSync, assign

WORLD = 2
STEPS = 7  # refreshes (update_freq 3) at steps 0, 3, 6
PER_RANK = 8
REL = 1e-6
#: SNOpt's defaults (relative damping, Adam graft) with a short refresh interval, a momentum on
#: the direction and weight decay, so every piece of per-step state crosses ranks.
OPTS = {"lr": 0.05, "update_freq": 3, "momentum": 0.5, "weight_decay": 1e-3}
NAN_STEPS = (1, 4)  # rank 1 sees a NaN gradient at a plain step (1) and at a refresh (4)


#: A field width above ``EXACT_UP_TO``: under ``refresh="power"`` its factors have thin bases.
WIDE = EXACT_UP_TO + 32
#: Samples per step of the thin runs: enough rows for the wide factors to have full rank.
THIN_SAMPLES = 1024


def _model(hidden: int = 8) -> OdeClassifier:
    torch.manual_seed(0)
    return OdeClassifier(hidden=hidden).to(torch.float64)


def _batch(i: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The i-th global batch (``WORLD * PER_RANK`` samples)."""
    x, y = classification_data(64)
    idx = (torch.arange(WORLD * PER_RANK) + i * WORLD * PER_RANK) % len(x)
    return x[idx], y[idx]


def _shard(t: torch.Tensor, rank: int) -> torch.Tensor:
    return t[rank * PER_RANK : (rank + 1) * PER_RANK]


def _state(model: nn.Module, opt: tds.SNOpt) -> dict:
    return {
        "params": [p.detach().clone() for p in model.parameters()],
        "precond": opt.preconditioner.state_dict(),
        # every per-parameter tensor: the graft's Adam moments (the default) or momentum
        "momentum": [
            v.clone()
            for p in model.parameters()
            for _, v in sorted(opt.state[p].items())
            if isinstance(v, torch.Tensor)
        ],
    }


# --------------------------------------------------------------------------- the 2-process run


def _worker(rank: int, port: int, out: str) -> None:
    init_gloo(rank, WORLD, port)
    try:
        for refresh, distribute in ((r, d) for r in ("exact", "power") for d in (False, True)):
            model = _model()
            ddp = DistributedDataParallel(model)
            opt = tds.SNOpt(ddp, distribute_eigh=distribute, refresh=refresh, **OPTS)
            opt.preconditioner.sync.stats.reset()
            for i in range(STEPS):
                x, y = _batch(i)
                opt.zero_grad()
                F.cross_entropy(ddp(_shard(x, rank)), _shard(y, rank)).backward()
                opt.step()
            state = _state(model, opt)
            state["stats"] = opt.preconditioner.sync.stats
            stem = "eigh" if refresh == "exact" else "power"
            torch.save(state, Path(out) / f"{stem}{int(distribute)}_rank{rank}.pt")

        for distribute in (False, True):  # thin bases: eigenpairs of another shape
            model = _model(WIDE)
            ddp = DistributedDataParallel(model)
            opt = tds.SNOpt(ddp, distribute_eigh=distribute, refresh="power", **OPTS)
            x, y = classification_data(THIN_SAMPLES)  # every step: full-rank wide factors
            for _ in range(STEPS):
                opt.zero_grad()
                F.cross_entropy(ddp(x[rank::WORLD]), y[rank::WORLD]).backward()
                opt.step()
            torch.save(_state(model, opt), Path(out) / f"thin{int(distribute)}_rank{rank}.pt")

        # A NaN gradient on rank 1 only (after DDP's averaging, so DDP cannot spread it).
        model = _model()
        ddp = DistributedDataParallel(model)
        opt = tds.SNOpt(ddp, **OPTS)
        log = []
        for i in range(STEPS):
            x, y = _batch(i)
            opt.zero_grad()
            F.cross_entropy(ddp(_shard(x, rank)), _shard(y, rank)).backward()
            if i in NAN_STEPS and rank == 1:
                next(model.parameters()).grad[0, 0] = float("nan")
            before = [p.detach().clone() for p in model.parameters()]
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                opt.step()
            moved = any(not torch.equal(b, p) for b, p in zip(before, model.parameters()))
            log.append((i, moved, [str(w.message) for w in caught]))
        state = _state(model, opt)
        state["log"] = log
        torch.save(state, Path(out) / f"nan_rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ddp")
    spawn(_worker, WORLD, free_port(), str(out), timeout_s=120)
    return out


def _load(out: Path, name: str) -> list[dict]:
    return [torch.load(out / f"{name}_rank{r}.pt", weights_only=False) for r in range(WORLD)]


def _reference(steps: int = STEPS, skip: tuple[int, ...] = (), refresh: str = "exact") -> dict:
    """One process, the concatenated batch; steps in ``skip`` are skipped (as by a NaN)."""
    model = _model()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = tds.SNOpt(model, refresh=refresh, **OPTS)
    for i in range(steps):
        x, y = _batch(i)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        if i in skip:
            next(model.parameters()).grad[0, 0] = float("nan")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            opt.step()
    return _state(model, opt)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach(), b.detach()
    return float((a - b).norm() / b.norm())


def _assert_same_ranks(states: list[dict]) -> None:
    """Every rank ends with bit-identical parameters, momentum and preconditioner."""
    r0, r1 = states
    for a, b in zip(r0["params"] + r0["momentum"], r1["params"] + r1["momentum"]):
        assert torch.equal(a, b)
    l0, l1 = r0["precond"]["layers"], r1["precond"]["layers"]
    assert l0.keys() == l1.keys()
    for name in l0:
        for k in ("UA", "UB", "m"):
            assert torch.equal(l0[name][k], l1[name][k]), (name, k)


# --------------------------------------------------------------------------- tests


@pytest.mark.slow
@pytest.mark.parametrize("distribute", [False, True], ids=["eigh-everywhere", "eigh-split"])
def test_two_ranks_equal_one_process_on_concatenated_batch(ranks, distribute):
    states = _load(ranks, f"eigh{int(distribute)}")
    _assert_same_ranks(states)
    ref = _reference()
    moved = [_rel(p, q) for p, q in zip(ref["params"], _model().parameters())]
    assert min(moved) > 1e-3  # the run did train every tensor
    for p, q in zip(states[0]["params"], ref["params"]):
        assert _rel(p, q) <= REL
    # Same curvature state, found through the DDP wrapper under the unwrapped names.
    mine, theirs = states[0]["precond"], ref["precond"]
    assert mine["steps"] == theirs["steps"] == STEPS and mine["armed"] == theirs["armed"]
    assert mine["layers"].keys() == theirs["layers"].keys()
    for name, e in theirs["layers"].items():
        assert _rel(mine["layers"][name]["m"], e["m"]) <= REL


@pytest.mark.slow
@pytest.mark.parametrize("distribute", [False, True], ids=["power-everywhere", "power-split"])
def test_power_refresh_on_two_ranks_equals_one_process(ranks, distribute):
    """Refreshes at steps 3 and 6 under ``"power"``: ranks stay bit-identical, match one
    process on the concatenated batch and, every factor being narrow, the ``eigh`` run."""
    states = _load(ranks, f"power{int(distribute)}")
    _assert_same_ranks(states)
    ref = _reference(refresh="power")
    for p, q in zip(states[0]["params"], ref["params"]):
        assert _rel(p, q) <= REL
    for name, e in ref["precond"]["layers"].items():
        assert _rel(states[0]["precond"]["layers"][name]["m"], e["m"]) <= REL
    exact = _load(ranks, f"eigh{int(distribute)}")[0]  # narrow factors: power is eigh
    for name, e in states[0]["precond"]["layers"].items():
        for k in ("UA", "UB", "m"):
            assert torch.equal(exact["precond"]["layers"][name][k], e[k]), (name, k)


def _thin_reference() -> dict:
    """One process, the whole 64-sample set every step, complete factors sampled (ranks
    average complete factors, they do not sketch)."""
    model = _model(WIDE)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = tds.SNOpt(model, refresh="power", **OPTS)
    opt.preconditioner._probes = dict  # type: ignore[method-assign]
    x, y = classification_data(THIN_SAMPLES)
    for _ in range(STEPS):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    return _state(model, opt)


@pytest.mark.slow
@pytest.mark.parametrize("distribute", [False, True], ids=["thin-everywhere", "thin-split"])
def test_thin_bases_on_two_ranks_equal_one_process(ranks, distribute):
    """A field wider than ``EXACT_UP_TO`` under refresh="power" (factors of full rank, so
    their top-128 subspaces are well determined): thin bases (128 columns, a tail row/column
    in ``m``) cross ranks whole (split: packed by the results' own shapes) and match one
    process, to 1e-4: the eigenvalue gap at the 128th direction amplifies the all-reduce's rounding
    (measured 6e-6 at width 160 with 64 samples; at width 544 64 samples left the factors
    short of full rank and the runs 4e-4 apart, hence :data:`THIN_SAMPLES`; a wrong packing
    or tail gives O(1))."""
    states = _load(ranks, f"thin{int(distribute)}")
    _assert_same_ranks(states)
    ref = _thin_reference()
    for p, q in zip(states[0]["params"], ref["params"]):
        assert _rel(p, q) <= 1e-4
    thin = 0
    for name, e in ref["precond"]["layers"].items():
        mine = states[0]["precond"]["layers"][name]
        for k in ("UA", "UB", "m", "lamA", "lamB"):
            assert mine[k].shape == e[k].shape, (name, k)
        thin += sum(e[k].shape[1] < e[k].shape[0] for k in ("UA", "UB"))
        assert _rel(mine["m"], e["m"]) <= 1e-4
    assert thin == 2


@pytest.mark.slow
def test_one_collective_per_step_and_split_eigh_adds_one_per_refresh(ranks):
    refreshes = len(range(0, STEPS, OPTS["update_freq"]))
    plain, split = (_load(ranks, f"eigh{d}")[0]["stats"] for d in (0, 1))
    assert plain.calls == STEPS
    assert split.calls == STEPS + refreshes
    assert split.bytes > plain.bytes > 0 and plain.seconds > 0


@pytest.mark.slow
def test_nan_on_one_rank_skips_the_step_on_every_rank(ranks):
    states = _load(ranks, "nan")
    _assert_same_ranks(states)
    for state in states:
        for i, moved, messages in state["log"]:
            if i in NAN_STEPS:
                assert not moved
                assert any("non-finite gradient on 1 of 2 ranks" in m for m in messages)
            else:
                assert moved and not messages
        assert state["precond"]["steps"] == STEPS - len(NAN_STEPS)
    ref = _reference(skip=NAN_STEPS)
    for p, q in zip(states[0]["params"], ref["params"]):
        assert _rel(p, q) <= REL


# --------------------------------------------------------------------------- one process


def test_assign_balances_cost_deterministically():
    assert assign([8, 1, 1, 27, 1], 2) == [1, 1, 1, 0, 1]
    assert assign([5, 5, 5], 3) == [0, 1, 2]
    assert assign([], 4) == []


def test_single_process_never_communicates():
    sync = RankSync(distribute_eigh=True)
    assert sync.world_size() == 1
    m = torch.eye(3)
    pairs = sync.eigh([m], lambda a: torch.linalg.eigh(a))
    assert torch.equal(pairs[0][1], torch.eye(3)) and sync.stats.calls == 0
    assert RankSync(None).world_size() == 1


@pytest.mark.parametrize(
    "kw, error",
    [
        ({"process_group": "default"}, TypeError),
        ({"process_group": 0}, TypeError),
        ({"distribute_eigh": 1}, TypeError),
    ],
)
def test_bad_distributed_arguments_raise_and_leave_model_untouched(kw, error):
    model = _model()
    with pytest.raises(error, match=next(iter(kw))):
        tds.SNOpt(model, lr=0.1, **kw)
    assert not model.ode.vf.vf.l1._forward_hooks  # no hook was attached
    from torchdyn_snopt.adjoint import existing_record

    record = existing_record(model.ode)
    assert record is None or record.request is None  # no curvature request was bound
