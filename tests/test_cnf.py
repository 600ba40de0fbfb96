"""CNFs (torchdyn's ``CNF``, :class:`FFJORD`) under the snopt sensitivity (issue 5)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
from torchdyn.models import CNF, autograd_trace, hutch_trace
from torchdyn.nn import DepthCat

import torchdyn_snopt as tds
from tests.helpers.models import quiet_ffjord, quiet_node
from tests.helpers.numerics import default_dtype, make_solver, single_thread
from torchdyn_snopt.curvature.capture import Recorder
from torchdyn_snopt.curvature.sampler import NFE, SolveSampling, _State
from torchdyn_snopt.curvature.source import CurvatureRequest, Node
from torchdyn_snopt.models.ffjord import standard_normal_logprob

DT = torch.float64
TOL = 1e-9


def _tanh_field() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(DepthCat(1), nn.Linear(3, 12), nn.Tanh(), nn.Linear(12, 2)).to(DT)


def _grads(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.grad.flatten() for p in model.parameters()])


def test_linear_flow_log_density_matches_change_of_variables():
    """dx/dt = Wx + b on [0, T]: z = e^{WT}x + W⁻¹(e^{WT} - I)b, log p(x) = log N(z) + T·tr W."""
    torch.manual_seed(1)
    lin = nn.Linear(2, 2).to(DT)
    T = 0.7
    node = quiet_node(
        CNF(lin, trace_estimator=autograd_trace),
        sensitivity="snopt",
        solver=make_solver("dopri5"),
        atol=1e-11,
        rtol=1e-11,
    )
    x = torch.randn(16, 2, dtype=DT)
    _, sol = node(torch.cat([torch.zeros(16, 1, dtype=DT), x], 1), torch.tensor([0.0, T], dtype=DT))
    logp = standard_normal_logprob(sol[-1][:, 1:]) - sol[-1][:, 0]
    W, b = lin.weight.detach(), lin.bias.detach()
    E = torch.linalg.matrix_exp(W * T)
    z = x @ E.T + torch.linalg.solve(W, (E - torch.eye(2, dtype=DT)) @ b)
    expected = standard_normal_logprob(z) + T * torch.trace(W)
    torch.testing.assert_close(logp, expected, rtol=1e-8, atol=1e-8)


@pytest.mark.parametrize("estimator", [hutch_trace, autograd_trace], ids=["hutch", "exact"])
def test_cnf_gradients_snopt_match_autograd(estimator):
    """Same noise (seeded), float64: ∂NLL/∂θ of the snopt adjoint equals autograd's."""
    x = torch.randn(8, 2, dtype=DT, generator=torch.Generator().manual_seed(3))
    noise = torch.distributions.Normal(torch.zeros(2, dtype=DT), torch.ones(2, dtype=DT))
    grads = {}
    for sens in ("autograd", "snopt"):
        cnf = CNF(_tanh_field(), trace_estimator=estimator, noise_dist=noise)
        node = quiet_node(
            cnf,
            sensitivity=sens,
            solver=make_solver("dopri5"),
            atol=TOL,
            rtol=TOL,
            atol_adjoint=TOL,
            rtol_adjoint=TOL,
        )
        torch.manual_seed(5)
        _, sol = node(torch.cat([torch.zeros(8, 1, dtype=DT), x], 1), torch.tensor([0.0, 1.0]))
        loss = -(standard_normal_logprob(sol[-1][:, 1:]) - sol[-1][:, 0]).mean()
        loss.backward()
        grads[sens] = _grads(node)
    torch.testing.assert_close(grads["snopt"], grads["autograd"], rtol=1e-6, atol=1e-8)


def test_ffjord_noise_is_held_between_forward_and_backward():
    """A second forward (new Hutchinson noise) before backward() leaves the gradient unchanged:
    the backward solve uses the noise of its own forward solve, as FFJORD does."""
    x = torch.randn(8, 2, dtype=DT, generator=torch.Generator().manual_seed(3))
    grads = []
    for interleave in (False, True):
        torch.manual_seed(0)
        model = quiet_ffjord(
            dim=2,
            hidden=(8,),
            n_blocks=2,
            t1=(0.5, 0.8),
            solver=make_solver("dopri5"),
            identity_init=False,
            atol=TOL,
            rtol=TOL,
            atol_adjoint=TOL,
            rtol_adjoint=TOL,
        ).to(DT)
        torch.manual_seed(5)
        loss = model.nll(x)
        if interleave:
            with torch.no_grad():
                model.nll(x)  # draws fresh noise in every block
        loss.backward()
        grads.append(_grads(model))
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-8, atol=1e-10)


def test_ffjord_snopt_gradients_match_autograd():
    """Two ConcatSquash blocks with their own horizons, Rademacher noise, float64."""
    x = torch.randn(8, 2, dtype=DT, generator=torch.Generator().manual_seed(3))
    grads = {}
    for sens in ("autograd", "snopt"):
        torch.manual_seed(0)
        model = quiet_ffjord(
            dim=2,
            hidden=(8,),
            n_blocks=2,
            t1=(0.5, 0.8),
            sensitivity=sens,
            solver=make_solver("dopri5"),
            identity_init=False,
            atol=TOL,
            rtol=TOL,
            atol_adjoint=TOL,
            rtol_adjoint=TOL,
        ).to(DT)
        torch.manual_seed(5)
        model.nll(x).backward()
        grads[sens] = _grads(model)
    torch.testing.assert_close(grads["snopt"], grads["autograd"], rtol=1e-6, atol=1e-8)


def _node_factors(vf: nn.Module, x: torch.Tensor, a: torch.Tensor) -> dict:
    """A_n, B_n of one curvature evaluation of ``vf`` at ``(t=0.3, x)`` with adjoint ``a``."""
    from torchdyn_snopt.curvature import adapter_for

    adapters = [adapter_for(m, n) for n, m in vf.named_modules() if isinstance(m, nn.Linear)]
    recorder = Recorder(adapters)
    try:
        request = CurvatureRequest(adapters, recorder)
        sampling = SolveSampling(request, vf, 0.0, 1.0, len(x), None, NFE())
        out = sampling._evaluate(Node(0.3, _State(x, a)))
    finally:
        recorder.remove()
    return {ad.name.split(".")[-1]: (A, B) for ad, (A, B, _) in out.items()}


def test_factors_come_from_the_field_not_the_trace_estimator():
    """At one node with a nonzero log-density adjoint, a CNF with Hutchinson or exact trace
    gives the factors of its field f(t, x) alone: the trace's passes and its Δ path add nothing."""
    from torchdyn.core.defunc import DEFunc, DEFuncBase

    torch.manual_seed(2)
    x = torch.randn(6, 3, dtype=DT)
    a = torch.randn(6, 3, dtype=DT)  # a[:, 0]: adjoint of Δ, nonzero as for an NLL loss
    noise = torch.distributions.Normal(torch.zeros(2, dtype=DT), torch.ones(2, dtype=DT))
    field = _tanh_field()
    results = {}
    for name, est in (("hutch", hutch_trace), ("exact", autograd_trace)):
        cnf = CNF(field, trace_estimator=est, noise_dist=noise)
        cnf.noise = noise.sample((6,))
        results[name] = _node_factors(DEFunc(DEFuncBase(cnf, has_time_arg=False)), x, a)
    results["field"] = _node_factors(
        DEFunc(DEFuncBase(_FieldOnly(field), has_time_arg=False)), x[:, 1:], a[:, 1:]
    )
    assert set(results["field"]) == {"1", "3"}
    for name in ("hutch", "exact"):
        for layer, (A, B) in results["field"].items():
            torch.testing.assert_close(results[name][layer][0], A, rtol=1e-12, atol=1e-12)
            torch.testing.assert_close(results[name][layer][1], B, rtol=1e-12, atol=1e-12)


class _FieldOnly(nn.Module):
    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def test_factors_of_a_training_step_equal_with_hutchinson_and_exact_trace():
    """Linear 2-D field (its trace does not depend on x, so both estimators give the same
    adjoint): the factors SNOpt samples in a whole backward solve are the same for both."""
    x = torch.randn(32, 2, dtype=DT, generator=torch.Generator().manual_seed(4))
    noise = torch.distributions.Normal(torch.zeros(2, dtype=DT), torch.ones(2, dtype=DT))
    factors = {}
    for name, est in (("hutch", hutch_trace), ("exact", autograd_trace)):
        torch.manual_seed(1)
        lin = nn.Sequential(DepthCat(1), nn.Linear(3, 2)).to(DT)
        node = quiet_node(
            CNF(lin, trace_estimator=est, noise_dist=noise),
            sensitivity="snopt",
            solver=make_solver("rk4"),
            solver_adjoint=make_solver("rk4"),
        )
        precond = tds.SNOptPreconditioner(node, grid_size=20)
        t_span = torch.linspace(0, 1, 11, dtype=DT)
        _, sol = node(torch.cat([torch.zeros(32, 1, dtype=DT), x], 1), t_span)
        (-(standard_normal_logprob(sol[-1][:, 1:]) - sol[-1][:, 0]).mean()).backward()
        precond.step()
        (f,) = precond.last_factors.values()
        factors[name] = f
    torch.testing.assert_close(factors["hutch"].A, factors["exact"].A, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(factors["hutch"].B, factors["exact"].B, rtol=1e-10, atol=1e-12)


def test_sample_inverts_the_flow_and_log_prob_is_a_normalised_density():
    """forward(sample(z)) = z; ∫p = 1 and ∫p log p (grid quadrature) equals the Monte-Carlo
    mean of log_prob over the model's own samples."""
    with default_dtype(DT), single_thread():
        torch.manual_seed(0)
        model = quiet_ffjord(
            dim=2, hidden=(16,), n_blocks=2, t1=1.0, trace="exact", identity_init=False
        )
        for p in model.parameters():  # a visibly non-Gaussian flow: |Δ| ≈ 0.24 on average
            p.data.mul_(3.0)
        z = torch.randn(4000, 2, generator=torch.Generator().manual_seed(0))
        x = model.sample(4000, generator=torch.Generator().manual_seed(0))
        grid = torch.linspace(-7.0, 7.0, 121)
        cell = float(grid[1] - grid[0]) ** 2
        with torch.no_grad():
            z_back, _ = model(x[:64])
            mc = model.log_prob(x)
            logp = model.log_prob(torch.cartesian_prod(grid, grid))
    torch.testing.assert_close(z_back, z[:64], rtol=1e-3, atol=1e-3)
    assert abs(logp.exp().sum().item() * cell - 1.0) < 2e-3
    entropy = (logp.exp() * logp).sum().item() * cell
    assert abs(mc.mean().item() - entropy) < 3 * mc.std().item() / math.sqrt(len(mc))


def test_snopt_nll_falls_below_adam_on_circles():
    """Fixed seed, same init and minibatches, 40 iterations on circles (t1 = 10): SNOpt at its
    defaults reaches a lower test NLL than Adam at its best lr of {3e-3, 1e-2, 3e-2} (3e-3;
    measured 1.67 vs 1.99 nats on an Intel Xeon; seeds 1 and 2: 1.69 vs 2.10, 1.70 vs 2.12).
    The paper's rule at lr 1e-2 is not checked here: its 40-iteration NLL moved from 1.88 to
    1.94 between two CPUs and reached 3.8 on seed 1 (its fixed damping; see the defaults)."""
    from torchdyn_snopt.data import load_toy

    x, x_test = load_toy("circles", n_train=2048, n_test=512)
    nll = {}
    with single_thread():
        for name in ("adam", "snopt"):
            torch.manual_seed(0)
            model = quiet_ffjord(dim=2, hidden=(16, 16), t1=10.0)
            if name == "adam":
                opt = torch.optim.Adam(model.parameters(), lr=3e-3)
            else:
                opt = tds.SNOpt(model)
            g = torch.Generator().manual_seed(1)
            for _ in range(40):
                idx = torch.randint(0, len(x), (128,), generator=g)
                opt.zero_grad()
                model.nll(x[idx]).backward()
                opt.step()
            with torch.no_grad(), torch.random.fork_rng():
                torch.manual_seed(0)
                nll[name] = model.nll(x_test).item()
    assert nll["snopt"] < nll["adam"] - 0.15, nll
