"""FreeHorizon (§3.4): ∂L/∂T, the feedback and first-order policies, clamping, persistence."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torchdyn.core import NeuralODE

import torchdyn_snopt as tds
from tests.helpers.data import mlp_data
from tests.helpers.distributed import free_port, init_gloo, spawn
from tests.helpers.models import ConstantField, make_node, mlp_field
from tests.helpers.numerics import DTYPE, default_dtype

# The toy of the convergence tests: x' = b, x(0) = 0, loss softplus(-x(T)) + λ/2·b² + c/2·T²
# (a logistic "classification" loss; λ from SGD's weight decay, c from the horizon's penalty).
# Its stationary point: b = k·T with k = sqrt(c/λ) and σ(-k·T²) = sqrt(cλ), so
# T*² = log(1/sqrt(cλ) - 1) / k.
LAM, PENALTY = 0.1, 0.01


def optimal_horizon(lam: float = LAM, c: float = PENALTY) -> float:
    k = math.sqrt(c / lam)
    return math.sqrt(math.log(1 / math.sqrt(c * lam) - 1) / k)


def train_toy(policy: str, lr: float, iters: int = 400, **kw) -> tuple[tds.FreeHorizon, int]:
    """Train the toy; returns the horizon and the first iteration after which T stays within
    1% of T* (a huge number if it never does)."""
    target = optimal_horizon()
    field = ConstantField(0.5)
    node = NeuralODE(field, sensitivity="snopt", solver="rk4", return_t_eval=False)
    opt = torch.optim.SGD(field.parameters(), lr=0.3, weight_decay=LAM)
    opts = {"penalty": PENALTY, "update_every": 10, "momentum": 0.9, "min_t1": 0.05, **kw}
    horizon = tds.FreeHorizon(t1=1.0, lr=lr, policy=policy, **opts).attach(node, opt)
    x0 = torch.zeros(1, 1, dtype=DTYPE)
    settled = None
    for k in range(iters):
        opt.zero_grad()
        F.softplus(-node(x0)[-1]).sum().backward()
        opt.step()
        close = abs(horizon.t1 - target) < 0.01 * target
        settled = (settled if settled is not None else k) if close else None
    return horizon, settled if settled is not None else 10**9


@pytest.mark.parametrize("sensitivity", ["snopt", "adjoint", "autograd"])
def test_dl_dt_matches_finite_difference(sensitivity):
    """Q_T = ∂L/∂T + c·T, with ∂L/∂T read off the backward pass (float64)."""
    with default_dtype(DTYPE):
        node = make_node(mlp_field(), sensitivity)
        node.return_t_eval = False
        x = mlp_data()
        horizon = tds.FreeHorizon(t1=0.8, penalty=0.3, policy="baseline").attach(node)

        def loss() -> torch.Tensor:
            return (node(x)[-1] ** 2).sum()

        loss().backward()
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            horizon.step()
        h = 1e-5
        values = []
        for T in (0.8 + h, 0.8 - h):
            horizon.T.fill_(T)
            with torch.no_grad():
                values.append(float(loss()) + 0.3 / 2 * T**2)
        fd = (values[0] - values[1]) / (2 * h)
        assert horizon.last["Q_T"] == pytest.approx(fd, rel=1e-6)
        assert horizon.last["Q_T"] - horizon.last["dL_dT"] == pytest.approx(0.3 * 0.8)
        assert horizon.last["Q_TT"] == pytest.approx(0.3 + horizon.last["dL_dT"] ** 2)


def test_autonomous_field_dl_dt_is_its_output_layers_scale_derivative():
    """For F = W·h(x) + b, the flow of (W, b) over [0, T] is that of (kW, kb) over [0, T/k],
    so T·∂L/∂T = ⟨∂L/∂W, W⟩ + ⟨∂L/∂b, b⟩ exactly: ∂L/∂T vanishes wherever the weights are
    stationary, and only a weight decay on the field gives the horizon an interior optimum."""
    with default_dtype(DTYPE):
        field = mlp_field()
        node = make_node(field, "snopt")
        node.return_t_eval = False
        horizon = tds.FreeHorizon(t1=0.7, policy="baseline").attach(node)
        F.softplus(node(mlp_data())[-1]).sum().backward()
        horizon.step()
        out = field[-1]
        with torch.no_grad():
            scale = (out.weight.grad * out.weight).sum() + (out.bias.grad * out.bias).sum()
        assert 0.7 * horizon.last["dL_dT"] == pytest.approx(float(scale), rel=1e-6)
        assert abs(float(scale)) > 1e-3  # not a vacuous 0 = 0


def test_shared_horizon_sums_over_nodes_and_keeps_grid_shape():
    """Two NeuralODEs on one horizon: ∂L/∂T adds up; a 3-point grid is rescaled onto [t0, T]."""
    with default_dtype(DTYPE):
        a, b = make_node(mlp_field(), "snopt"), make_node(mlp_field(), "snopt")
        for n in (a, b):
            n.return_t_eval = False
        model = torch.nn.ModuleList([a, b])
        horizon = tds.FreeHorizon(t0=0.2, t1=1.4, policy="baseline").attach(model)
        x, grid = mlp_data(), torch.tensor([0.0, 0.25, 1.0])
        assert torch.allclose(horizon.t_span(grid), torch.tensor([0.2, 0.5, 1.4]))
        loss = (a(x, grid)[-1] ** 2).sum() + (b(x)[-1] ** 3).sum()
        loss.backward()
        horizon.step()
        h, values = 1e-5, []
        for T in (1.4 + h, 1.4 - h):
            horizon.T.fill_(T)
            with torch.no_grad():
                values.append(float((a(x, grid)[-1] ** 2).sum() + (b(x)[-1] ** 3).sum()))
        assert horizon.last["dL_dT"] == pytest.approx((values[0] - values[1]) / (2 * h), rel=1e-6)


def test_feedback_policy_converges_to_closed_form_horizon_faster_than_baseline():
    """Both policies reach T* of the toy; each at its best lr of a grid, feedback sooner."""
    target = optimal_horizon()
    feedback = {lr: train_toy("feedback", lr) for lr in (0.1, 0.2, 0.3, 0.5)}
    baseline = {lr: train_toy("baseline", lr) for lr in (1.0, 3.0, 10.0, 20.0, 30.0, 100.0)}
    best_fb = min(feedback.values(), key=lambda r: r[1])
    best_bl = min(baseline.values(), key=lambda r: r[1])
    for horizon, settled in (best_fb, best_bl):
        assert settled < 400
        assert horizon.t1 == pytest.approx(target, rel=0.01)
    assert best_fb[1] < best_bl[1]
    assert best_fb[0].history[-1][1] == pytest.approx(target, rel=0.01)


def test_feedback_term_uses_the_steps_parameter_change():
    """Q_Tu δθ = s·⟨∂L/∂θ, δθ⟩ of the step the optimizer just took (plain SGD: -lr·|g|²)."""
    field = ConstantField(0.5)
    node = NeuralODE(field, sensitivity="snopt", solver="rk4", return_t_eval=False)
    opt = torch.optim.SGD(field.parameters(), lr=0.3)
    horizon = tds.FreeHorizon(t1=1.0, update_every=5).attach(node, opt)
    opt.zero_grad()
    F.softplus(-node(torch.zeros(1, 1, dtype=DTYPE))[-1]).sum().backward()
    g = float(field.b.grad)
    opt.step()
    expected = horizon.last["dL_dT"] * g * (-0.3 * g)
    assert horizon.last["Q_Tu_dtheta"] == pytest.approx(expected, rel=1e-12)
    assert float(horizon.feedback_sum) == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("policy", ["feedback", "baseline"])
def test_clamping(policy):
    """Huge steps stop at min_t1 and max_t1."""
    horizon, _ = train_toy(policy, 1e4, iters=30, min_t1=0.7, max_t1=1.2, penalty=10.0)
    assert horizon.t1 == pytest.approx(0.7)
    horizon, _ = train_toy(policy, 1e4, iters=30, min_t1=0.7, max_t1=1.2, penalty=0.0)
    assert horizon.t1 == pytest.approx(1.2)
    assert all(0.7 <= t <= 1.2 for _, t in horizon.history[1:])


def test_state_dict_round_trip_continues_identically():
    first, _ = train_toy("feedback", 0.3, iters=35)
    state = first.state_dict()
    again = tds.FreeHorizon(t1=1.0, policy="feedback", update_every=10)
    again.load_state_dict(state)
    assert again.t1 == first.t1
    assert again.history == first.history
    for name in ("avg_s", "avg_s2", "feedback_sum", "steps", "updates"):
        assert torch.equal(getattr(again, name), getattr(first, name))


def test_no_gradient_warns_and_changes_nothing():
    horizon = tds.FreeHorizon(update_every=1, policy="baseline")
    before = {k: v.clone() for k, v in horizon.state_dict().items() if torch.is_tensor(v)}
    with pytest.warns(UserWarning, match="no gradient with respect to T"):
        assert horizon.step() is False
    for k, v in horizon.state_dict().items():
        if torch.is_tensor(v):
            assert torch.equal(v, before[k])


def test_feedback_step_without_delta_theta_says_what_to_do():
    node = make_node(mlp_field(), "snopt")
    node.return_t_eval = False
    horizon = tds.FreeHorizon().attach(node)
    with default_dtype(DTYPE):
        (node(mlp_data())[-1] ** 2).sum().backward()
    with pytest.raises(ValueError, match="delta_theta"):
        horizon.step()


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"t1": 0.0}, "t1"),
        ({"t1": float("nan")}, "t1"),
        ({"penalty": -1.0}, "penalty"),
        ({"lr": 0.0}, "lr"),
        ({"policy": "newton"}, "policy"),
        ({"update_every": 0}, "update_every"),
        ({"update_every": 2.5}, "update_every"),
        ({"min_t1": 0.0}, "min_t1"),
        ({"min_t1": 0.5, "max_t1": 0.2}, "max_t1"),
        ({"momentum": 1.0}, "momentum"),
    ],
)
def test_bad_arguments(kwargs, name):
    with pytest.raises(ValueError, match=name):
        tds.FreeHorizon(**kwargs)


def test_attach_needs_a_neural_ode_and_an_optimizer():
    with pytest.raises(ValueError, match="NeuralODE"):
        tds.FreeHorizon().attach(torch.nn.Linear(2, 2))
    with pytest.raises(TypeError, match="optimizer"):
        tds.FreeHorizon().attach(make_node(mlp_field(), "snopt"), optimizer="sgd")


def test_detach_restores_the_nodes_own_horizon():
    with default_dtype(DTYPE):
        node = make_node(mlp_field(), "snopt")
        x = mlp_data()
        t_eval, _ = node(x, torch.tensor([0.0, 1.0]))
        horizon = tds.FreeHorizon(t1=0.5).attach(node)
        with torch.no_grad():
            assert float(node(x, torch.tensor([0.0, 1.0]))[0][-1]) == pytest.approx(0.5)
        horizon.detach()
        with torch.no_grad():
            assert float(node(x, torch.tensor([0.0, 1.0]))[0][-1]) == pytest.approx(1.0)


def _distributed_worker(rank: int, port: int, out: str) -> None:
    """Each rank trains the toy on its own x0; T must stay identical across ranks."""
    import torch.distributed as dist

    init_gloo(rank, 2, port)
    try:
        field = ConstantField(0.5)
        node = NeuralODE(field, sensitivity="snopt", solver="rk4", return_t_eval=False)
        ddp = torch.nn.parallel.DistributedDataParallel(node)
        opt = torch.optim.SGD(field.parameters(), lr=0.3, weight_decay=LAM)
        horizon = tds.FreeHorizon(penalty=PENALTY, lr=0.5, update_every=2, momentum=0.5)
        horizon.attach(node, opt)
        x0 = torch.full((1, 1), 0.3 * rank, dtype=DTYPE)  # different data per rank
        for _ in range(6):
            opt.zero_grad()
            F.softplus(-ddp(x0)[-1]).sum().backward()
            opt.step()
        torch.save(
            {"T": horizon.t1, "history": horizon.history, "b": float(field.b)}, out + f"{rank}"
        )
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_ranks_average_dl_dt_and_keep_one_horizon(tmp_path):
    """Under DDP every rank ends with the same T, equal to one process on both ranks' data."""
    out = str(tmp_path / "rank")
    spawn(_distributed_worker, 2, free_port(), out, timeout_s=120)
    r0, r1 = torch.load(out + "0"), torch.load(out + "1")
    assert r0 == r1
    # one process, loss = mean over the two ranks' samples (DDP's average)
    field = ConstantField(0.5)
    node = NeuralODE(field, sensitivity="snopt", solver="rk4", return_t_eval=False)
    opt = torch.optim.SGD(field.parameters(), lr=0.3, weight_decay=LAM)
    horizon = tds.FreeHorizon(penalty=PENALTY, lr=0.5, update_every=2, momentum=0.5)
    horizon.attach(
        node,
        opt,
    )
    x0 = torch.tensor([[0.0], [0.3]], dtype=DTYPE)
    for _ in range(6):
        opt.zero_grad()
        F.softplus(-node(x0)[-1]).mean().backward()
        opt.step()
    assert r0["T"] == pytest.approx(horizon.t1, rel=1e-12)
    assert r0["b"] == pytest.approx(float(field.b.detach()), rel=1e-12)
    assert len(r0["history"]) == 4 and r0["T"] != 1.0
