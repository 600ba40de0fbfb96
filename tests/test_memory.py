"""O(1) memory in the number of solver steps for the "snopt" sensitivity.

Each sensitivity is measured in a fresh interpreter (both run concurrently) after a few small
warm-up solves (allocator, kernels, lazily created solver tensors). The growth of one
forward+backward is its peak *anonymous* resident memory minus that before it, sampled from
``/proc/self/statm`` (resident - shared) at every vector-field evaluation (forward and backward
solves) and around ``backward()``.

Why not ``ru_maxrss``: it is a process-wide high-water mark of the *total* RSS, which also counts
file-backed pages (libtorch: ~340 MB) and import-time memory that may be released later; if
either shrinks after the warm-up, the mark set during the warm-up hides the measured solve. This
happened once in a full-suite run (autograd read 0 MB at 10 steps and 64 MB at 100 steps instead
of ~12 and ~160 MB); this machine runs a DAMON ``pageout`` scheme that drops cold file pages.
Anonymous memory relative to the start of each solve is what tensors use and is not paged out
(no swap); ``gc.collect()`` before each solve keeps import garbage from being freed inside it.

Fixed-step rk4 over ``t_span = linspace(0, 1, n + 1)``; ``save_at = t_span[[0, -1]]`` keeps the
returned trajectory at two states for every ``n`` (torchdyn's ``_fixed_odeint`` honours
``save_at`` for both sensitivities). A last snopt solve returns the whole trajectory, whose size
(times two: the trajectory and its incoming gradient) is subtracted before the same check.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

BATCH, DIM, HIDDEN = 256, 128, 256
STATE_BYTES = BATCH * DIM * 4  # float32
MB = 2**20
SLACK = 20 * MB
SMALL, LARGE = 10, 100

CHILD = r"""
import gc, json, os, sys, warnings
warnings.filterwarnings("ignore")
import torch
torch.set_num_threads(1)
import torch.nn as nn
import torchdyn_snopt  # noqa: F401  (registers "snopt")
from torchdyn.core import NeuralODE

sensitivity = sys.argv[1]
runs = [(int(n), mode) for n, mode in (r.split(":") for r in sys.argv[2].split(","))]
B, D, H = (int(v) for v in sys.argv[3:6])
PAGE = os.sysconf("SC_PAGE_SIZE")
statm = open("/proc/self/statm", "rb", buffering=0)


def anon():
    # resident - shared (= RssFile + RssShmem): anonymous resident memory in bytes
    statm.seek(0)
    _, resident, shared = (int(v) for v in statm.read().split()[:3])
    return (resident - shared) * PAGE


peak = [0]


def sample(*_):
    peak[0] = max(peak[0], anon())


torch.manual_seed(0)
field = nn.Sequential(nn.Linear(D, H), nn.Tanh(), nn.Linear(H, D))
field.register_forward_hook(sample)  # every evaluation, forward and backward solves
node = NeuralODE(field, sensitivity=sensitivity, solver="rk4")
x0 = torch.randn(B, D)


def run(n, mode):
    t_span = torch.linspace(0.0, 1.0, n + 1)
    save_at = t_span[[0, -1]] if mode == "ends" else ()
    x = x0.clone().requires_grad_(True)
    gc.collect()
    before = anon()
    peak[0] = before
    _, sol = node(x, t_span, save_at=save_at)
    assert sol.shape[0] == (2 if mode == "ends" else n + 1), sol.shape
    loss = (sol[-1] ** 2).sum()
    sample()
    loss.backward()
    sample()
    assert x.grad is not None and bool(torch.isfinite(x.grad).all())
    assert all(p.grad is not None for p in field.parameters())
    field.zero_grad(set_to_none=False)
    return peak[0] - before


for n, mode in [(1, "ends"), (2, "ends"), (2, "full"), (1, "ends")]:
    run(n, mode)  # warm-up: allocator, kernels, lazily created solver tensors
growth = {f"{n}:{mode}": run(n, mode) for n, mode in runs}
print("GROWTH=" + json.dumps(growth))
"""

PLAN = {
    "snopt": f"{SMALL}:ends,{LARGE}:ends,{LARGE}:full",
    "autograd": f"{SMALL}:ends,{LARGE}:ends",
}


@pytest.fixture(scope="module")
def growth() -> dict[str, dict[str, int]]:
    if not Path("/proc/self/statm").exists():
        pytest.skip("needs Linux's /proc/self/statm")
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072")  # freed blocks go back to the OS
    root = Path(__file__).resolve().parents[1]
    procs = {
        sens: subprocess.Popen(
            [sys.executable, "-c", CHILD, sens, plan, str(BATCH), str(DIM), str(HIDDEN)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
            cwd=root,
        )
        for sens, plan in PLAN.items()
    }
    out = {}
    for sens, proc in procs.items():
        try:
            stdout, stderr = proc.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            for p in procs.values():
                p.kill()
            raise
        assert proc.returncode == 0, stderr[-3000:]
        line = next(ln for ln in stdout.splitlines() if ln.startswith("GROWTH="))
        out[sens] = json.loads(line.removeprefix("GROWTH="))
    return out


def _fmt(g: dict[str, int]) -> str:
    return ", ".join(f"{k}: {v / MB:.1f} MB" for k, v in g.items())


def test_snopt_memory_is_constant_in_steps(growth):
    g = growth["snopt"]
    small, large = g[f"{SMALL}:ends"], g[f"{LARGE}:ends"]
    assert large < 1.5 * small + SLACK, _fmt(g)


def test_snopt_memory_constant_with_full_trajectory(growth):
    g = growth["snopt"]
    small = g[f"{SMALL}:ends"]
    # the returned trajectory and its gradient are legitimate output memory
    outputs = 2 * (LARGE + 1) * STATE_BYTES
    assert g[f"{LARGE}:full"] - outputs < 1.5 * small + SLACK, _fmt(g)


def test_autograd_memory_grows_so_the_check_can_fail(growth):
    g = growth["autograd"]
    small, large = g[f"{SMALL}:ends"], g[f"{LARGE}:ends"]
    # autograd stores every rk4 stage (≥ 4 stages x 3 state-sized activations per step);
    # it must fail the snopt criterion by a wide margin
    assert large > 1.5 * small + SLACK + 50 * MB, _fmt(g)
    assert large - small > 0.5 * (LARGE - SMALL) * 4 * 3 * STATE_BYTES, _fmt(g)
    # and snopt at 100 steps stays far below autograd at 100 steps
    assert growth["snopt"][f"{LARGE}:ends"] < 0.25 * large, (_fmt(growth["snopt"]), _fmt(g))
