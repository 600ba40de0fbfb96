"""Kronecker factors from the backward solve against hand computations (eq. 13, Alg. 1)."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn as nn
from torch import Tensor
from torchdyn.core import NeuralODE
from torchdyn.nn import DepthCat, Fourier, GalConv2d, GalLinear

import torchdyn_snopt as tds
from tests.helpers.models import LinearField
from tests.helpers.numerics import make_solver
from tests.helpers.reference import rk4_interval, timed
from torchdyn_snopt.curvature import Conv2dAdapter, GalConv2dAdapter, GalLinearAdapter
from torchdyn_snopt.curvature.sampler import Factors
from torchdyn_snopt.optim import eigen_from_factors, project, solve_in_eigenbasis

DT = torch.float64


def _closed_form_factors(W, b, x0, t1, grid):
    """``Σ_j A(t_j)Δt`` and ``Σ_j B(t_j)Δt`` for ``L = mean_b ½‖x_b(t1)‖²``."""
    n, d = x0.shape
    T = t1
    dt = T / (len(grid) - 1)
    eye = torch.eye(d, dtype=DT)

    def flow(t):
        E = torch.linalg.matrix_exp(W * t)
        return x0 @ E.t() + (torch.linalg.solve(W, (E - eye) @ b))[None]

    xT = flow(T)
    A = torch.zeros(d + 1, d + 1, dtype=DT)
    B = torch.zeros(d, d, dtype=DT)
    for t in grid:
        x = flow(t)
        a = (xT / n) @ torch.linalg.matrix_exp(W * (T - t))  # a(t) = e^{Wᵀ(T-t)} a(T)
        z = torch.cat([x, torch.ones(n, 1, dtype=DT)], 1)
        g = a * n / math.sqrt(T)  # per-sample Gauss-Newton q, ∂F/∂h = I
        A += z.t() @ z / n * dt
        B += g.t() @ g / n * dt
    return A, B


def _sample_factors(model, node, x0, t_span, **kw):
    precond = tds.SNOptPreconditioner(model, **kw)
    _, sol = node(x0, t_span)
    (0.5 * sol[-1].pow(2).sum(-1).mean()).backward()
    precond.step()
    return precond.last_factors


def test_factors_match_closed_form_on_linear_field():
    torch.manual_seed(0)
    d, n, t1, G = 3, 5, 0.7, 21
    field = LinearField(d).double()
    with torch.no_grad():
        field.lin.weight.mul_(0.5)
    node = NeuralODE(field, sensitivity="snopt", solver="rk4", return_t_eval=True)
    x0 = torch.randn(n, d, dtype=DT)
    t_span = torch.linspace(0, t1, G, dtype=DT)  # rk4 steps land on the grid points
    factors = _sample_factors(node, node, x0, t_span, grid_size=G)
    (f,) = factors.values()
    A_ref, B_ref = _closed_form_factors(
        field.lin.weight.detach(), field.lin.bias.detach(), x0, t1, t_span.tolist()
    )
    torch.testing.assert_close(f.A, A_ref, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(f.B, B_ref, rtol=1e-6, atol=1e-9)
    assert f.batch_size == n and f.locations == 1


def test_adaptive_solver_interpolates_grid_close_to_closed_form():
    """Nodes are the solver's accepted steps; A(t), B(t) are linear between them. At 1e-10
    the interpolation error measured 6.5e-5 (A) and 4.6e-5 (B) relative (9.1e-3 and 6.5e-3 at
    1e-6, where the former 5 % bound sat); bound 7e-4.

    Kills: dropping the top grid point (1 % of the weight at G = 100); the batch factor."""
    torch.manual_seed(1)
    d, n, t1, G = 3, 4, 1.0, 100
    field = LinearField(d).double()
    node = NeuralODE(
        field,
        sensitivity="snopt",
        solver=make_solver("dopri5"),
        atol=1e-10,
        rtol=1e-10,
        atol_adjoint=1e-10,
        rtol_adjoint=1e-10,
    )
    x0 = torch.randn(n, d, dtype=DT)
    t_span = torch.tensor([0.0, t1], dtype=DT)
    factors = _sample_factors(node, node, x0, t_span, grid_size=G)
    (f,) = factors.values()
    grid = torch.linspace(0, t1, G, dtype=DT).tolist()
    A_ref, B_ref = _closed_form_factors(
        field.lin.weight.detach(), field.lin.bias.detach(), x0, t1, grid
    )
    assert _rel(f.A, A_ref) < 7e-4 and _rel(f.B, B_ref) < 7e-4, (_rel(f.A, A_ref), _rel(f.B, B_ref))
    nfe = tds.read_nfe(node)
    assert 0 < nfe["curvature"] < nfe["backward"]


def test_curvature_only_when_armed_and_sampling_keeps_gradients():
    torch.manual_seed(2)
    field = LinearField(3).double()
    node = NeuralODE(
        field,
        sensitivity="snopt",
        solver="dopri5",
        atol=1e-8,
        rtol=1e-8,
        atol_adjoint=1e-8,
        rtol_adjoint=1e-8,
    )
    x0 = torch.randn(4, 3, dtype=DT)
    t_span = torch.linspace(0, 1, 3, dtype=DT)

    def grads():
        field.zero_grad()
        _, sol = node(x0, t_span)
        (sol[-1].pow(2).sum() + sol[1].sum()).backward()
        return torch.cat([p.grad.flatten() for p in field.parameters()])

    g_plain = grads()
    assert tds.read_nfe(node)["curvature"] == 0
    precond = tds.SNOptPreconditioner(node)
    assert precond.armed
    g_armed = grads()
    assert tds.read_nfe(node)["curvature"] > 0
    torch.testing.assert_close(g_armed, g_plain)
    precond.step()
    assert not precond.armed  # update_freq=100: next refresh at step 100


def _manual_forward(field: nn.Module, t: float, x: Tensor):
    """``F(t, x)`` and every ``nn.Linear``'s ``(input, output)``, computed by hand (no hooks,
    no torchdyn): the layers of a ``Sequential`` of DepthCat/Linear/Tanh, or a LinearField."""
    mods = list(field) if isinstance(field, nn.Sequential) else [field.lin]
    pairs = []
    for m in mods:
        if isinstance(m, DepthCat):
            x = torch.cat([x, torch.full_like(x[:, :1], t)], 1)
        elif isinstance(m, nn.Linear):
            h = x @ m.weight.detach().t() + m.bias.detach()
            pairs.append((x, h))
            x = h
        else:
            assert isinstance(m, nn.Tanh), m
            x = torch.tanh(x)
    return x, pairs


def _grid_states(fields, x0, t_span, loss_fn, G, h=5e-3):
    """``x(t_j)`` and ``a(t_j) = ∂L/∂x(t_j)`` on the uniform grid of each ODE of a chain.

    ``fields`` are solved one after another over the same ``t_span`` (each starts from the
    previous one's last output); ``loss_fn`` gets the list of their trajectories. The solve is
    a float64 rk4 with steps of at most ``h`` landing on every grid and ``t_span`` point, and
    ``a(t_j)`` is the gradient w.r.t. a zero perturbation added to the state at ``t_j``.
    Convention (read from ``adjoint._backsolve`` and ``sampler.segment_weights``): a grid
    point that is also an output time sees the adjoint *before* that output's jump (the node
    closing the later interval carries its weight), except the last output time, whose
    gradient starts the backward solve.
    """
    lo, hi = float(t_span.min()), float(t_span.max())
    grid = [lo + (hi - lo) * j / (G - 1) for j in range(G)]
    sign = 1.0 if float(t_span[-1]) > float(t_span[0]) else -1.0
    outs = [float(t) for t in t_span]
    assert {outs[0], outs[-1]} <= {grid[0], grid[-1]}
    times = sorted(set(grid) | set(outs), key=lambda t: sign * t)
    x, sols, deltas, states = x0, [], [], []
    for field in fields:
        f, sol, mine = timed(field), [], []
        for i, t in enumerate(times):
            if i > 0:
                n = max(1, math.ceil(abs(t - times[i - 1]) / h))
                ta, tb = torch.tensor(times[i - 1], dtype=DT), torch.tensor(t, dtype=DT)
                x = rk4_interval(f, x, ta, tb, n)
            last = i == len(times) - 1
            if t in outs and not last:
                sol.append(x)
            if t in grid:
                d = torch.zeros_like(x, requires_grad=True)
                deltas.append(d)
                mine.append((t, x.detach()))
                x = x + d
            if last:
                sol.append(x)
        sols.append(torch.stack(sol))
        states.append(mine)
    adj = iter(torch.autograd.grad(loss_fn(sols), deltas))
    return [[(t, xj, next(adj)) for t, xj in mine] for mine in states], (hi - lo) / (G - 1), hi - lo


def _reference_factors(fields, x0, t_span, loss_fn, G):
    """Eq. 13 by hand: per layer ``Σ_j Δt·mean_b z̃z̃ᵀ`` and ``Σ_j Δt·mean_b g gᵀ``, ``z̃`` the
    layer input with a 1 appended (bias), ``g = batch·∂(Fᵀq)/∂h`` at the layer output ``h``,
    ``q = a/sqrt(t1 - t0)``, over all ``G`` grid points ``t_j`` with equal weight ``Δt``."""
    states, dt, span = _grid_states(fields, x0, t_span, loss_fn, G)
    n = x0.shape[0]
    out = []
    for field, mine in zip(fields, states):
        acc = None
        for t, xj, a in mine:
            x = xj.clone().requires_grad_(True)
            F, pairs = _manual_forward(field, t, x)
            q = a / math.sqrt(span)
            gs = torch.autograd.grad((F * q).sum(), [h for _, h in pairs])
            terms = []
            for (z, _), g in zip(pairs, gs):
                zt = torch.cat([z.detach(), torch.ones(n, 1, dtype=DT)], 1)
                g = n * g
                terms.append((dt * zt.t() @ zt / n, dt * g.t() @ g / n))
            acc = (
                terms if acc is None else [(A + a_, B + b_) for (A, B), (a_, b_) in zip(acc, terms)]
            )
        out.extend(acc)
    return out


def _hidden_field(time_dependent: bool = False, dim: int = 3, hidden: int = 6) -> nn.Module:
    torch.manual_seed(11)
    layers = [nn.Linear(dim + time_dependent, hidden), nn.Tanh(), nn.Linear(hidden, dim)]
    return nn.Sequential(*([DepthCat(1)] if time_dependent else []), *layers).to(DT)


def _x0(n: int = 6, dim: int = 3) -> Tensor:
    return torch.randn(n, dim, generator=torch.Generator().manual_seed(12), dtype=DT)


def _rel(got: Tensor, ref: Tensor) -> float:
    return float((got - ref).norm() / ref.norm())


def _terminal(sols):
    return 0.5 * sols[-1][-1].pow(2).sum(-1).mean()


def _multi(sols):
    """Losses on interior outputs too (adjoint jumps), cross terms between outputs."""
    (s,) = sols
    return (
        (s[-1] ** 2).sum(-1).mean()
        + 0.3 * (s[1] * s[-1]).sum(-1).mean()
        + torch.sin(s[1]).sum(-1).mean()
        + (s**2).sum(-1).mean()
    )


def _snopt_factors(model, node_list, x0, t_span, loss_fn, G):
    pre = tds.SNOptPreconditioner(model, grid_size=G)
    x, sols = x0, []
    for node in node_list:
        sols.append(node(x, t_span)[1])
        x = sols[-1][-1]
    loss_fn(sols).backward()
    assert pre.step()
    return [(f.A, f.B) for f in pre.last_factors.values()]


#: Adaptive case: (time-dependent field, t_span, loss, grid size, bound). Interior t_span
#: points lie between grid points. dopri5 at 1e-10: the factors' error is that of the linear
#: interpolation of A(t), B(t) between the accepted backward steps (it falls with the
#: tolerance: 4.2e-3, 2.0e-3, 4.0e-4 at 1e-6, 1e-8, 1e-10 for "terminal"). Bounds ~10x the
#: measured worst relative error over the case's four factors: terminal 4.0e-4, multi-point
#: 2.0e-4, DepthCat on a decreasing span 6.8e-4.
ADAPTIVE_CASES = {
    "terminal": (False, [0.0, 1.0], _terminal, 21, 4e-3),
    "multi-point": (False, [0.0, 0.37, 0.81, 1.0], _multi, 21, 2e-3),
    "depthcat-decreasing": (True, [1.0, 0.43, -0.2], _multi, 25, 7e-3),
}


@pytest.mark.parametrize("case", list(ADAPTIVE_CASES))
def test_hidden_layer_factors_match_rk4_reference(case):
    """Linear-Tanh-Linear field (the hidden layer's B goes through W2ᵀ and tanh'): both
    layers' A and B from an adaptive snopt backward solve against eq. 13 computed from a fine
    rk4 trajectory and autograd adjoints, interior adjoint jumps and true time included.

    Kills: dropping the ``batch`` factor of ``g``; forgetting the bias column of ``A``;
    ``q = a/(t1 - t0)`` instead of ``a/sqrt(t1 - t0)`` (the decreasing case, span 1.2);
    skipping the adjoint jump at interior outputs (multi-point, decreasing); evaluating a
    DepthCat field at ``-t`` in the curvature node (decreasing); dropping the top grid point."""
    time_dependent, points, loss_fn, G, bound = ADAPTIVE_CASES[case]
    field = _hidden_field(time_dependent)
    tol = 1e-10
    node = NeuralODE(
        field,
        sensitivity="snopt",
        solver=make_solver("dopri5"),
        atol=tol,
        rtol=tol,
        atol_adjoint=tol,
        rtol_adjoint=tol,
    )
    t_span = torch.tensor(points, dtype=DT)
    got = _snopt_factors(node, [node], _x0(), t_span, loss_fn, G)
    ref = _reference_factors([_hidden_field(time_dependent)], _x0(), t_span, loss_fn, G)
    for (A, B), (A_ref, B_ref) in zip(got, ref, strict=True):
        assert A.shape == A_ref.shape and B.shape == B_ref.shape
        assert _rel(A, A_ref) < bound and _rel(B, B_ref) < bound, (_rel(A, A_ref), _rel(B, B_ref))


def _grid_loss(sols):
    (s,) = sols
    return (
        (s[-1] ** 2).sum(-1).mean() + 0.3 * (s[7] * s[-1]).sum(-1).mean() + torch.sin(s[13]).sum()
    )


def test_factors_on_grid_aligned_rk4_steps_are_exact():
    """rk4 with ``t_span`` = the grid: every node is a grid point (no interpolation) and the
    outputs 7, 13 and 20 sit on grid points, so the adjoint-jump convention is checked exactly.
    Measured worst relative error over the four factors 2.2e-11 (the coarse rk4's own error
    on this weak field); bound 2e-10.

    Kills: the jump convention (segments ``(lo, hi]``, so a grid point on an interior output
    sees the jumped adjoint); closed segments ``[lo, hi]`` (interior grid points counted
    twice); dropping the top grid point; the batch factor; the bias column."""
    G = 21
    t_span = torch.linspace(0.0, 1.0, G, dtype=DT)
    field = _hidden_field()
    node = NeuralODE(field, sensitivity="snopt", solver=make_solver("rk4"))
    got = _snopt_factors(node, [node], _x0(), t_span, _grid_loss, G)
    ref = _reference_factors([_hidden_field()], _x0(), t_span, _grid_loss, G)
    for (A, B), (A_ref, B_ref) in zip(got, ref, strict=True):
        assert _rel(A, A_ref) < 2e-10 and _rel(B, B_ref) < 2e-10, (_rel(A, A_ref), _rel(B, B_ref))


def test_multiple_intervals_and_multiple_odes_accumulate():
    """Two chained snopt ODEs (both sensitivity names), 5-point rk4 spans, losses on an
    interior output of the second: each ODE's factors by value against the reference (the
    first ODE's adjoint comes through the second). rk4 at h = 0.25: measured worst relative
    error 1.0e-4 (the coarse backward solve's adjoint error); bound 1e-3.

    Kills: skipping the adjoint jump at the interior output; the batch factor; closed or
    ``(lo, hi]`` segments at the interior knots."""
    torch.manual_seed(3)
    f1, f2 = LinearField(2).double(), LinearField(2).double()
    n1 = NeuralODE(f1, sensitivity="snopt", solver="rk4", return_t_eval=False)
    n2 = NeuralODE(f2, sensitivity="snopt_adjoint", solver="rk4", return_t_eval=False)
    model = nn.ModuleList([n1, n2])
    x0 = torch.randn(3, 2, dtype=DT)
    t = torch.linspace(0, 1, 5, dtype=DT)

    def loss(sols):
        return sols[1][2].sum() + sols[1][-1].pow(2).sum()

    def call(node, x, t_span):
        return node(x, t_span)  # return_t_eval=False: the trajectory itself

    pre = tds.SNOptPreconditioner(model, grid_size=5)
    y1 = call(n1, x0, t)
    y2 = call(n2, y1[-1], t)
    loss([y1, y2]).backward()
    assert pre.step()
    assert list(pre.last_factors) == ["0.vf.vf.lin", "1.vf.vf.lin"]
    ref = _reference_factors([f1, f2], x0, t, loss, 5)
    for f, (A_ref, B_ref) in zip(pre.last_factors.values(), ref, strict=True):
        assert _rel(f.A, A_ref) < 1e-3 and _rel(f.B, B_ref) < 1e-3, (
            _rel(f.A, A_ref),
            _rel(f.B, B_ref),
        )


def test_eq14_direction_equals_explicit_kronecker_inverse():
    torch.manual_seed(4)
    d_in, d_out, eps = 4, 3, 1e-3
    Ma, Mb = torch.randn(d_in, d_in, dtype=DT), torch.randn(d_out, d_out, dtype=DT)
    A = Ma @ Ma.t() + 0.1 * torch.eye(d_in, dtype=DT)
    B = Mb @ Mb.t() + 0.1 * torch.eye(d_out, dtype=DT)
    G = torch.randn(d_out, d_in, dtype=DT)
    eig = eigen_from_factors(Factors(A, B))
    P = solve_in_eigenbasis(project(G, eig), eig, eig.m + eps)
    # (A ⊗ B + eps I) vec(P) = vec(G) with column-major vec.
    K = torch.kron(A, B) + eps * torch.eye(d_in * d_out, dtype=DT)
    vecP = torch.linalg.solve(K, G.t().reshape(-1))
    torch.testing.assert_close(P, vecP.reshape(d_in, d_out).t())
    # Without damping it is eq. 14 exactly: B̄⁻¹ G Ā⁻ᵀ.
    P0 = solve_in_eigenbasis(project(G, eig), eig, eig.m)
    torch.testing.assert_close(P0, torch.linalg.solve(B, G) @ torch.linalg.inv(A).t())


def _grad_matrix_roundtrip(adapter, params):
    for p in params:
        p.grad = torch.randn_like(p)
    before = [p.grad.clone() for p in params]
    G = adapter.grad_matrix().clone()
    adapter.set_grad_matrix(G * 2)
    for p, b in zip(params, before):
        torch.testing.assert_close(p.grad, 2 * b)
    return G


def test_conv_adapter_matches_weight_gradient_as_patch_outer_products():
    torch.manual_seed(5)
    conv = nn.Conv2d(2, 3, 3, padding=1, stride=1).double()
    x = torch.randn(4, 2, 5, 5, dtype=DT)
    h = conv(x)
    g = torch.randn_like(h)
    (h * g).sum().backward()
    ad = Conv2dAdapter(conv, "conv")
    z, gr = ad.input_rows((x,)), ad.output_rows(g)
    assert z.shape == (4 * 25, 2 * 9 + 1) and gr.shape == (4 * 25, 3)
    torch.testing.assert_close(gr.t() @ z, ad.grad_matrix())  # Σ_l g_l z_lᵀ = ∂L/∂W
    assert ad.locations(h) == 25
    _grad_matrix_roundtrip(ad, [conv.weight, conv.bias])


@pytest.mark.parametrize("layer", ["linear", "conv"])
def test_galerkin_adapters_reproduce_coefficient_gradient(layer):
    torch.manual_seed(6)
    if layer == "linear":
        mod = GalLinear(3, 2, expfunc=Fourier(3))
        x = torch.randn(5, 3, dtype=torch.float32)
        ad_cls = GalLinearAdapter
    else:
        mod = GalConv2d(2, 2, kernel_size=3, padding=1, expfunc=Fourier(3))
        x = torch.randn(2, 2, 4, 4, dtype=torch.float32)
        ad_cls = GalConv2dAdapter
    nn.init.normal_(mod.coeffs)
    inp = DepthCat(1)
    inp.t = torch.tensor(0.3)
    xin = inp(x)
    h = mod(xin)
    g = torch.randn_like(h)
    (h * g).sum().backward()
    ad = ad_cls(mod, "gal")
    z, gr = ad.input_rows((xin,)), ad.output_rows(g)
    # torchdyn's Galerkin layers only run in float32.
    torch.testing.assert_close(gr.t() @ z, ad.grad_matrix(), rtol=1e-4, atol=1e-4)
    h_rows = h.detach().movedim(1, -1).reshape(-1, h.shape[1])
    torch.testing.assert_close(z @ ad.param_matrix().t(), h_rows, rtol=1e-4, atol=1e-4)
    _grad_matrix_roundtrip(ad, [mod.coeffs])


def test_register_adapter_open_registry_and_bad_types():
    class Scale(nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.ones(2, 2))

        def forward(self, x):
            return x @ self.weight.t()

    class ScaleAdapter(tds.LayerAdapter):
        def params(self):
            return [self.module.weight]

        def input_rows(self, inputs):
            return inputs[0].reshape(-1, 2)

        def output_rows(self, g):
            return g.reshape(-1, 2)

        def grad_matrix(self):
            return self.module.weight.grad

        def set_grad_matrix(self, m):
            self.module.weight.grad.copy_(m)

        def param_matrix(self):
            return self.module.weight.detach()

    class Field(nn.Module):
        def __init__(self):
            super().__init__()
            self.s = Scale()

        def forward(self, t, x, args=None):
            return torch.tanh(self.s(x))

    tds.register_adapter(Scale, ScaleAdapter)
    node = NeuralODE(Field(), sensitivity="snopt", solver="rk4")
    precond = tds.SNOptPreconditioner(node, grid_size=3)
    _, sol = node(torch.randn(3, 2), torch.linspace(0, 1, 3))
    sol[-1].sum().backward()
    assert precond.step()
    assert list(precond.last_factors) == ["vf.vf.s"]
    with pytest.raises(TypeError, match="module_type"):
        tds.register_adapter(int, ScaleAdapter)
    with pytest.raises(TypeError, match="adapter"):
        tds.register_adapter(Scale, object)


def _field_models():
    """Vector fields built from torchdyn's layers, each inside a snopt NeuralODE."""
    from torchdyn.nn import DataControl

    dim = 3
    depthcat = nn.Sequential(DepthCat(1), nn.Linear(dim + 1, 8), nn.Tanh(), nn.Linear(8, dim))
    control = nn.Sequential(DataControl(), nn.Linear(2 * dim, dim))
    galerkin = nn.Sequential(DepthCat(1), GalLinear(dim, dim, expfunc=Fourier(3)))
    gal_conv = nn.Sequential(DepthCat(1), GalConv2d(2, 2, 3, padding=1, expfunc=Fourier(3)))
    conv = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.Tanh(), nn.Conv2d(4, 2, 3, padding=1))
    for m in (galerkin[1], gal_conv[1]):
        nn.init.normal_(m.coeffs, std=0.1)
    return {
        "depthcat": (depthcat, (5, dim), ["1", "3"]),
        "datacontrol": (control, (5, dim), ["1"]),
        "gallinear": (galerkin, (5, dim), ["1"]),
        "galconv2d": (gal_conv, (2, 2, 4, 4), ["1"]),
        "conv": (conv, (2, 2, 4, 4), ["0", "2"]),
    }


@pytest.mark.parametrize("name", list(_field_models()))
def test_sampling_with_torchdyn_layers_gives_finite_psd_factors(name):
    torch.manual_seed(7)
    field, shape, layers = _field_models()[name]
    node = NeuralODE(field, sensitivity="snopt", solver="dopri5", return_t_eval=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Galerkin dilation/shift get the plain gradient
        opt = tds.SNOpt(node, lr=1e-3, grid_size=10)
    before = [p.detach().clone() for p in node.parameters()]
    node(torch.randn(*shape), torch.linspace(0, 1, 3))[-1].pow(2).mean().backward()
    assert opt.step() is None
    assert sorted(opt.preconditioner.last_factors) == [f"vf.vf.vf.{n}" for n in layers]
    for f in opt.preconditioner.last_factors.values():
        assert torch.isfinite(f.A).all() and torch.isfinite(f.B).all()
        assert torch.linalg.eigvalsh(f.A.double()).min() > -1e-5 * f.A.abs().max()
        assert f.B.abs().sum() > 0
    assert any(not torch.equal(p, b) for p, b in zip(node.parameters(), before))


def test_outer_conv_factors_use_a_capped_sample_of_patches():
    """Outside the ODEs, ``A`` of a conv uses the first ``ceil(A_ROWS / L)`` images' patches,
    ``B`` every image's output gradients (× batch), and ``locations`` is ``L``."""
    from torch.nn.functional import cross_entropy, unfold

    from torchdyn_snopt.curvature.sampler import A_ROWS

    torch.manual_seed(0)
    n, hw = 20, 16
    conv = nn.Conv2d(2, 3, 3, padding=1)
    model = nn.Sequential(conv, nn.Tanh(), nn.Flatten(), nn.Linear(3 * hw * hw, 4)).double()
    x, y = torch.randn(n, 2, hw, hw, dtype=DT), torch.randint(0, 4, (n,))
    h = conv(x)  # by hand, before the hooks exist
    h.retain_grad()
    cross_entropy(model[3](model[2](model[1](h))), y).backward()
    g = h.grad.permute(0, 2, 3, 1).reshape(-1, 3) * n
    model.zero_grad()
    pre = tds.SNOptPreconditioner(model, full_precond=True)
    cross_entropy(model(x), y).backward()
    pre.step()
    f = pre.last_factors["0"]
    keep = math.ceil(A_ROWS / hw**2)
    assert keep < n  # the cap is what this test is about
    z = unfold(x[:keep], 3, padding=1).transpose(1, 2).reshape(-1, 18)
    z = torch.cat([z, torch.ones(len(z), 1, dtype=DT)], 1)
    torch.testing.assert_close(f.A, z.t() @ z / len(z), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(f.B, g.t() @ g / len(g), rtol=1e-10, atol=1e-12)
    assert f.locations == hw * hw and pre.last_factors["3"].locations == 1
