"""Small float64 models, data and a gradient helper shared by the tests.

Every builder reseeds the global RNG, so two calls give bit-identical parameters: the same
field can be rebuilt for each sensitivity that is being compared.

Solvers given by name to :func:`grads` are instantiated with a float64 Butcher tableau. torchdyn
builds name-given solvers with ``dtype=torch.float32``, so their coefficients are float32-rounded
even on a float64 state; with tolerances near 1e-10 the adaptive error estimate is then dominated
by that rounding and the step count explodes (tsit5 by name needs several seconds per solve).
The by-name path itself is exercised in ``test_registration.py``.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
from torch import Tensor
from torchdyn.core import NeuralODE
from torchdyn.nn import DataControl, DepthCat, Fourier, GalLinear
from torchdyn.numerics.odeint import odeint
from torchdyn.numerics.solvers.ode import SOLVER_DICT

from torchdyn_snopt.distributed import free_port, spawn  # noqa: F401  (re-exported)

DTYPE = torch.float64
SEED = 0
#: Forward and adjoint tolerance used for adaptive solvers.
TOL = 1e-10
#: Maximum relative error tolerated between two gradient computations, per block (each
#: parameter tensor, x0, t_span against its own norm). Measured worst case over every
#: comparison that uses this default (adaptive solves at TOL against each other and against
#: autograd, rk4 on 41 points against torchdyn's adjoint or autograd): 2.0e-8 (a 2.bias block,
#: conv field, tsit5 vs autograd; rk4 save_at 0.weight 2.0e-8). Comparisons with a genuine
#: discretisation gap (rk4 on few points vs autograd, low-order adjoint solvers, NCDE paths with
#: kinks) pass their own, measured bound.
REL = 2e-7
#: Norm below which a block's error is measured absolutely (near-zero blocks).
ABS_FLOOR = 1e-12

ADAPTIVE = ("dopri5", "tsit5")
FIXED = ("euler", "midpoint", "rk4", "ieuler")

FieldFn = Callable[[], nn.Module]
LossFn = Callable[[Tensor], Tensor]


@contextlib.contextmanager
def single_thread() -> Iterator[None]:
    """One intra-op thread: the tensors here are tiny, and with a second process busy on the
    machine's other core, torch's thread pool makes small convolutions ~10x slower."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def seeded(seed: int = SEED) -> None:
    torch.manual_seed(seed)


def make_solver(name: str) -> nn.Module:
    """A fresh solver instance whose tableau is float64."""
    return SOLVER_DICT[name](dtype=DTYPE)


def is_fixed(solver: str | nn.Module) -> bool:
    if isinstance(solver, str):
        return solver in FIXED
    return solver.stepping_class == "fixed"


# --------------------------------------------------------------------------- fields


def mlp_field(dim: int = 3, hidden: int = 16) -> nn.Module:
    seeded()
    return nn.Sequential(nn.Linear(dim, hidden), nn.Tanh(), nn.Linear(hidden, dim)).to(DTYPE)


def conv_field(channels: int = 3) -> nn.Module:
    seeded()
    return nn.Sequential(
        nn.Conv2d(channels, channels, 3, padding=1),
        nn.Tanh(),
        nn.Conv2d(channels, channels, 3, padding=1),
    ).to(DTYPE)


def depthcat_field(dim: int = 3, hidden: int = 16) -> nn.Module:
    seeded()
    return nn.Sequential(
        DepthCat(1), nn.Linear(dim + 1, hidden), nn.Tanh(), nn.Linear(hidden, dim)
    ).to(DTYPE)


def datacontrol_field(dim: int = 3, hidden: int = 16) -> nn.Module:
    seeded()
    return nn.Sequential(
        DataControl(), nn.Linear(2 * dim, hidden), nn.Tanh(), nn.Linear(hidden, dim)
    ).to(DTYPE)


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype) -> Iterator[None]:
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


class Float64Default(nn.Module):
    """Runs ``inner`` with float64 as torch's default dtype.

    torchdyn's ``GalLayer.calculate_weights`` builds its basis matrix with ``torch.eye`` in the
    default dtype and index-assigns the (float64) basis into it, which raises for a float64
    ``GalLinear`` under the float32 default.
    """

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: Tensor) -> Tensor:
        with default_dtype(DTYPE):
            return self.inner(x)


def galerkin_field(dim: int = 3, deg: int = 3) -> nn.Module:
    seeded()
    layer = GalLinear(dim, dim, expfunc=Fourier(deg))
    net = nn.Sequential(DepthCat(1), layer, nn.Tanh()).to(DTYPE)
    with torch.no_grad():  # torchdyn zero-initialises the Galerkin coefficients
        layer.coeffs.normal_(0.0, 0.5)
        layer.dilation.fill_(1.3)
        layer.shift.fill_(0.2)
    return Float64Default(net)


# --------------------------------------------------------------------------- data


def mlp_data(batch: int = 8, dim: int = 3) -> Tensor:
    seeded(SEED + 1)
    return torch.randn(batch, dim, dtype=DTYPE)


def conv_data(batch: int = 2, channels: int = 3, size: int = 6) -> Tensor:
    seeded(SEED + 1)
    return torch.randn(batch, channels, size, size, dtype=DTYPE)


def default_t_span(solver: str | nn.Module) -> Tensor:
    """Few points for adaptive solvers; many for fixed-step ones (one step per interval)."""
    n = 41 if is_fixed(solver) else 5
    return torch.linspace(0.0, 1.0, n, dtype=DTYPE)


def trajectory_loss(sol: Tensor) -> Tensor:
    """Weighted loss on every output (the initial one included), linear and quadratic terms."""
    w = torch.arange(1, len(sol) + 1, dtype=sol.dtype, device=sol.device)
    w = w.reshape(-1, *([1] * (sol.dim() - 1)))
    return (w * (sol**2 + 0.5 * sol)).sum() / sol[0].numel()


def last_loss(sol: Tensor) -> Tensor:
    return (sol[-1] ** 2).sum()


# --------------------------------------------------------------------------- models & grads


def make_node(
    field: nn.Module,
    sensitivity: str,
    solver: str | nn.Module = "dopri5",
    *,
    tol: float = TOL,
    solver_adjoint: str | nn.Module | None = None,
    integral_loss: Callable | None = None,
    seminorm: bool = False,
) -> NeuralODE:
    """A NeuralODE with tight tolerances (adaptive) or torchdyn's defaults (fixed step).

    Fixed-step solvers ignore tolerances; passing torchdyn's defaults avoids its warning.
    """
    solver = make_solver(solver) if isinstance(solver, str) else solver
    if isinstance(solver_adjoint, str) and sensitivity.startswith("snopt"):
        solver_adjoint = make_solver(solver_adjoint)
    kw = {} if is_fixed(solver) else {"atol": tol, "rtol": tol}
    return NeuralODE(
        field,
        sensitivity=sensitivity,
        solver=solver,
        solver_adjoint=solver_adjoint,
        atol_adjoint=tol,
        rtol_adjoint=tol,
        integral_loss=integral_loss,
        seminorm=seminorm,
        **kw,
    )


Blocks = dict[str, Tensor]


def grads(
    model_fn: FieldFn,
    sensitivity: str,
    solver: str | nn.Module = "dopri5",
    *,
    x0: Tensor | None = None,
    t_span: Tensor | None = None,
    loss_fn: LossFn = trajectory_loss,
    save_at: Sequence | Tensor = (),
    tol: float = TOL,
    solver_adjoint: str | nn.Module | None = None,
    integral_loss: Callable | None = None,
    seminorm: bool = False,
    t_grad: bool = False,
) -> Blocks:
    """Gradient of ``loss_fn(trajectory)`` as blocks: one per field parameter (by name), then
    ``"x0"`` and, with ``t_grad``, ``"t_span"``."""
    field = model_fn()
    node = make_node(
        field,
        sensitivity,
        solver,
        tol=tol,
        solver_adjoint=solver_adjoint,
        integral_loss=integral_loss,
        seminorm=seminorm,
    )
    x0 = mlp_data() if x0 is None else x0
    t_span = default_t_span(node.solver) if t_span is None else t_span
    x = x0.clone().requires_grad_(True)
    t = t_span.detach().clone().requires_grad_(t_grad)
    _, sol = node(x, t, save_at=save_at)
    named = [(n, p) for n, p in field.named_parameters() if p.requires_grad]
    named += [("x0", x)] + ([("t_span", t)] if t_grad else [])
    g = torch.autograd.grad(loss_fn(sol), [p for _, p in named], allow_unused=True)
    return {n: torch.zeros_like(p) if q is None else q for (n, p), q in zip(named, g, strict=True)}


def flat(blocks: Blocks | Tensor) -> Tensor:
    """All blocks as one vector (in order)."""
    if isinstance(blocks, Tensor):
        return blocks.reshape(-1)
    return torch.cat([b.reshape(-1) for b in blocks.values()])


def _as_blocks(x: Blocks | Tensor) -> Blocks:
    return {"": x} if isinstance(x, Tensor) else x


def block_errors(a: Blocks | Tensor, b: Blocks | Tensor, floor: float = ABS_FLOOR) -> Blocks:
    """``‖a_k − b_k‖ / max(‖b_k‖, floor)`` for every block ``k`` (a tensor is one block)."""
    a, b = _as_blocks(a), _as_blocks(b)
    assert list(a) == list(b), (list(a), list(b))
    out = {}
    for k in b:
        ak, bk = a[k].detach(), b[k].detach()
        assert ak.shape == bk.shape, (k, ak.shape, bk.shape)
        assert torch.isfinite(ak).all() and torch.isfinite(bk).all(), k
        out[k] = float((ak - bk).norm()) / max(float(bk.norm()), floor)
    return out


def rel_err(a: Blocks | Tensor, b: Blocks | Tensor, floor: float = ABS_FLOOR) -> float:
    """Worst per-block relative error (see :func:`block_errors`)."""
    return max(block_errors(a, b, floor).values())


def assert_close(a: Blocks | Tensor, b: Blocks | Tensor, rel: float = REL) -> None:
    """Every block of ``a`` within ``rel`` of ``b``'s block, relative to that block's own norm
    (floored at :data:`ABS_FLOOR`): an error confined to ``x0`` or one small layer is caught."""
    errs = block_errors(a, b)
    _record(errs, rel)
    bad = {k: f"{e:.2e}" for k, e in errs.items() if not e <= rel}
    assert not bad, f"per-block relative error above {rel:.1e}: {bad}"


def _record(errs: Blocks, rel: float) -> None:
    """With ``SNOPT_MEASURE=path``, append the worst block error of each comparison (used to
    measure the tolerances' headroom; off by default)."""
    path = os.environ.get("SNOPT_MEASURE")
    if path:
        worst = max(errs, key=errs.get)
        test = os.environ.get("PYTEST_CURRENT_TEST", "?").split(" ")[0]
        with open(path, "a") as f:
            f.write(f"{errs[worst]:.3e}\t{rel:.1e}\t{worst}\t{test}\n")


def timed(field: nn.Module) -> Callable[[Tensor, Tensor], Tensor]:
    """``(t, x) -> field(x)`` with every ``DepthCat`` of ``field`` set to ``t`` first (a
    ``Sequential``), or ``field(t, x)`` for a field that takes the time itself."""

    def f(t: Tensor, x: Tensor) -> Tensor:
        if not isinstance(field, nn.Sequential):
            return field(t, x)
        for m in field.modules():
            if isinstance(m, DepthCat):
                m.t = t
        return field(x)

    return f


def rk4_interval(f: Callable, x: Tensor, t_a: Tensor, t_b: Tensor, steps: int) -> Tensor:
    """Classical RK4 from ``t_a`` to ``t_b`` (either direction) in ``steps`` equal steps, stage
    times ``t, t+h/2, t+h/2, t+h`` (torchdyn 1.0.6's rk4 puts them at ``t, t+h/2, t+h/2``).
    Differentiable w.r.t. ``x``, the end times and ``f``'s parameters."""
    h = (t_b - t_a) / steps
    for k in range(steps):
        t = t_a + k * h
        k1 = f(t, x)
        k2 = f(t + h / 2, x + h / 2 * k1)
        k3 = f(t + h / 2, x + h / 2 * k2)
        k4 = f(t + h, x + h * k3)
        x = x + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
    return x


def rk4_reference(
    model_fn: FieldFn,
    x0: Tensor,
    t_span: Tensor,
    loss_fn: LossFn = trajectory_loss,
    steps: int = 400,
) -> Blocks:
    """Ground truth (IMPLEMENTATION-NOTES, Table 1): gradient blocks of ``loss_fn`` (parameters,
    ``"x0"``, ``"t_span"``) by autograd through :func:`rk4_interval` in float64, ``steps`` steps
    per ``t_span`` interval, ``model_fn()``'s field seeing the true time (:func:`timed`)."""
    field = model_fn()
    f = timed(field)
    x = x0.detach().clone().requires_grad_(True)
    t = t_span.detach().clone().requires_grad_(True)
    sol = [x]
    for k in range(len(t) - 1):
        sol.append(rk4_interval(f, sol[-1], t[k], t[k + 1], steps))
    named = [(n, p) for n, p in field.named_parameters() if p.requires_grad]
    named += [("x0", x), ("t_span", t)]
    g = torch.autograd.grad(loss_fn(torch.stack(sol)), [p for _, p in named])
    return {n: q for (n, _), q in zip(named, g)}


# --------------------------------------------------------------------------- optimizer models


class LinearField(nn.Module):
    """``F(t, x) = W x + b``: trajectory and adjoint in closed form via matrix exponentials."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.lin = nn.Linear(dim, dim)

    def forward(self, t, x, args=None):
        return self.lin(x)


class TwoLayerField(nn.Module):
    """``F(t, x) = l2(tanh(l1(x)))``."""

    def __init__(self, dim: int = 4, hidden: int = 8) -> None:
        super().__init__()
        self.l1, self.l2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)

    def forward(self, t, x, args=None):
        return self.l2(torch.tanh(self.l1(x)))


class OdeClassifier(nn.Module):
    """Linear encoder → NeuralODE → linear head.

    ``solver="rk4"`` uses ``t = linspace(0, 1, 5)``; adaptive solvers ``[0, 1]`` at ``tol``.
    """

    def __init__(
        self,
        d_in: int = 6,
        dim: int = 4,
        hidden: int = 8,
        classes: int = 3,
        sensitivity: str = "snopt",
        solver: str = "rk4",
        tol: float = 1e-3,
    ) -> None:
        super().__init__()
        self.enc = nn.Linear(d_in, dim)
        self.ode = NeuralODE(
            TwoLayerField(dim, hidden),
            sensitivity=sensitivity,
            solver=solver,
            atol=tol,
            rtol=tol,
            atol_adjoint=tol,
            rtol_adjoint=tol,
            return_t_eval=False,
        )
        t = torch.linspace(0, 1, 5) if solver == "rk4" else torch.tensor([0.0, 1.0])
        self.register_buffer("t", t)
        self.head = nn.Linear(dim, classes)

    def forward(self, x):
        return self.head(self.ode(torch.tanh(self.enc(x)), self.t)[-1])


def classification_data(n: int = 64, seed: int = 0, dtype=DTYPE) -> tuple[Tensor, Tensor]:
    """6-d Gaussian inputs with 3 classes from two half-space rules."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 6, generator=g, dtype=dtype)
    y = (x[:, :3].sum(1) > 0).long() + (x[:, 3] > 1).long()
    return x, y


class ConstantField(nn.Module):
    """``F(t, x) = b`` with one trained scalar ``b``: ``x(T) = x0 + b·T`` in closed form."""

    def __init__(self, b: float = 0.5) -> None:
        super().__init__()
        self.b = nn.Parameter(torch.tensor([b], dtype=DTYPE))

    def forward(self, t, x, args=None):
        return self.b.expand_as(x)


# --------------------------------------------------------------------------- multi-process


def init_gloo(rank: int, world: int, port: int) -> None:
    """Join a gloo group on localhost (one intra-op thread: the machine's cores are shared)."""
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
    )


def repo_env() -> dict[str, str]:
    """``os.environ`` with this checkout first on ``PYTHONPATH`` and one thread per process,
    for child interpreters (torchrun, scripts) that must import this tree's package."""
    root = str(Path(__file__).resolve().parent.parent)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([root, *filter(None, [env.get("PYTHONPATH")])])
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    return env


# --------------------------------------------------------------------------- second order


def autograd_loss(node: NeuralODE, x0: Tensor, loss_fn: LossFn, t_span: Tensor):
    """``(x0, *θ) -> loss_fn(trajectory)`` by autograd through torchdyn's ``odeint`` with the
    node's forward solver and tolerances (the reference for the second-order tests)."""
    from torch.func import functional_call

    names = [n for n, p in node.vf.named_parameters() if p.requires_grad]

    def loss(x: Tensor, *theta: Tensor) -> Tensor:
        def f(t, z):
            return functional_call(node.vf, dict(zip(names, theta)), (t, z))

        _, sol = odeint(f, x, t_span, node.solver, node.atol, node.rtol)
        return loss_fn(sol)

    return loss


def dense_blocks(blocks, sizes: Sequence[int]) -> Tensor:
    """Nested tuple of blocks (``torch.autograd.functional.hessian``) → one dense matrix."""
    return torch.cat(
        [
            torch.cat([blocks[i][j].reshape(si, sj) for j, sj in enumerate(sizes)], 1)
            for i, si in enumerate(sizes)
        ],
        0,
    )


def autograd_hessian(node: NeuralODE, x0: Tensor, loss_fn: LossFn, t_span: Tensor) -> Tensor:
    """Dense Hessian over ``(x0, θ)`` (x0 first), by autograd through the solve."""
    theta = tuple(p.detach() for p in node.vf.parameters() if p.requires_grad)
    fn = autograd_loss(node, x0, loss_fn, t_span)
    blocks = torch.autograd.functional.hessian(fn, (x0.detach(), *theta))
    return dense_blocks(blocks, [x0.numel(), *(p.numel() for p in theta)])


def tiny_conv_field(channels: int = 2) -> nn.Module:
    return conv_field(channels)


def cross_loss(sol: Tensor) -> Tensor:
    """Loss over several outputs with cross terms between them (non-separable in time)."""
    return (sol[-1] ** 2).sum() + 0.3 * (sol[1] * sol[-1]).sum() + torch.sin(sol[1]).sum()


#: Second-order tests: tolerance, time grids and (field, data, loss, t_span) cases.
SECOND_ORDER_REL = 1e-6
T_SPAN_2 = torch.tensor([0.0, 1.0], dtype=DTYPE)
T_SPAN_4 = torch.linspace(0.0, 1.0, 4, dtype=DTYPE)
SECOND_ORDER_CASES = {
    "mlp-terminal": (lambda: mlp_field(3, 6), lambda: mlp_data(2, 3), last_loss, T_SPAN_2),
    "mlp-cross-points": (lambda: mlp_field(3, 6), lambda: mlp_data(2, 3), cross_loss, T_SPAN_4),
    "mlp-every-point": (
        lambda: mlp_field(3, 6),
        lambda: mlp_data(2, 3),
        trajectory_loss,
        T_SPAN_4,
    ),
    "t-dependent": (lambda: depthcat_field(3, 6), lambda: mlp_data(2, 3), cross_loss, T_SPAN_4),
    "conv": (tiny_conv_field, lambda: conv_data(1, 2, 4), last_loss, T_SPAN_2),
}


# --------------------------------------------------------------------------- CNF / FFJORD


def quiet_ffjord(**kw) -> nn.Module:
    """A :class:`torchdyn_snopt.models.FFJORD` built without torchdyn's wrapping notice on
    stdout (it prints one line per ``NeuralODE`` whose field lacks a ``t`` argument)."""
    import io

    from torchdyn_snopt.models import FFJORD

    with contextlib.redirect_stdout(io.StringIO()):
        return FFJORD(**kw)


def quiet_node(field: nn.Module, **kw) -> NeuralODE:
    """``NeuralODE(field, **kw)`` without torchdyn's wrapping notice on stdout."""
    import io

    with contextlib.redirect_stdout(io.StringIO()):
        return NeuralODE(field, **kw)


# --------------------------------------------------------------------------- time series


def irregular_series(batch: int = 4, length: int = 7, channels: int = 2, seed: int = 3) -> Tensor:
    """``(batch, length, 1 + channels)`` float64 series, time first (torchcde's layout).

    Every series has its own increasing, irregular times in ``[0, 1]``; a few values are
    missing (NaN in one channel); series 1 is two observations shorter (NaN padding, time
    included) and series 2 shares times with series 0 except one.
    """
    g = torch.Generator().manual_seed(seed)
    t = torch.sort(torch.rand(batch, length, generator=g, dtype=DTYPE), dim=1)[0]
    t[:, 0] = 0.0
    t[2] = t[0]
    t[2, 3] = (t[0, 3] + t[0, 4]) / 2
    x = torch.randn(batch, length, channels, generator=g, dtype=DTYPE)
    x[0, 2, 0] = x[3, 4, 1] = x[2, 5, channels - 1] = float("nan")
    out = torch.cat([t[..., None], x], dim=-1)
    out[1, length - 2 :] = float("nan")
    return out


def cde_path_series(batch: int = 4, length: int = 8, channels: int = 2, seed: int = 5):
    """Series sharing one irregular time grid (returned too), with missing values: what
    ``torchcde`` coefficients with an explicit ``t`` need."""
    g = torch.Generator().manual_seed(seed)
    t = torch.sort(torch.rand(length, generator=g, dtype=DTYPE))[0] * 2.0
    x = torch.randn(batch, length, channels, generator=g, dtype=DTYPE)
    x[0, 3, 1] = x[2, 5, 0] = x[1, length - 2, 1] = float("nan")
    return torch.cat([t.expand(batch, length)[..., None], x], dim=-1), t


def train_steps(
    model: nn.Module, opt: torch.optim.Optimizer, steps: int, x: Tensor, y: Tensor, start: int = 0
) -> None:
    """``steps`` cross-entropy iterations on minibatches of 16 taken in order (wrapping) from
    ``(x, y)``, starting at minibatch ``start`` (so a resumed run sees the same stream)."""
    for i in range(start, start + steps):
        idx = torch.arange(i * 16, i * 16 + 16) % len(x)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
        opt.step()
