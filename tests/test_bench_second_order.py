"""``torchdyn-snopt bench second-order``: Newton-CG arithmetic, the exact and recursive
products on the bench model, a CLI smoke run with its output files."""

from __future__ import annotations

import json

import pytest
import torch

from torchdyn_snopt.__main__ import main
from torchdyn_snopt.bench.image import build_model
from torchdyn_snopt.bench.second_order import (
    NewtonCG,
    bench_second_order,
    exact_hvp,
    recursive_hvp,
)
from torchdyn_snopt.data import load_digits

pytestmark = pytest.mark.usefixtures("one_thread")


def test_newton_cg_solves_a_quadratic_in_one_step():
    """On ``½θᵀAθ - bᵀθ`` with n = cg_iters and no damping, one step lands on ``A⁻¹b``."""
    g = torch.Generator().manual_seed(0)
    m = torch.randn(3, 3, generator=g)
    a, b = m @ m.T + 3 * torch.eye(3), torch.randn(3, generator=g)
    theta = torch.nn.Parameter(torch.zeros(3))
    opt = NewtonCG([theta], lambda x, y, v: a @ v, lr=1.0, damping=0.0, cg_iters=3)
    theta.grad = a @ theta.detach() - b
    opt.set_batch(torch.zeros(1), torch.zeros(1))
    opt.step()
    assert torch.allclose(theta.detach(), torch.linalg.solve(a, b), atol=1e-5)


def test_newton_cg_bad_arguments_and_missing_batch():
    theta = torch.nn.Parameter(torch.zeros(2))
    with pytest.raises(ValueError, match="damping="):
        NewtonCG([theta], lambda x, y, v: v, damping=-1.0)
    with pytest.raises(ValueError, match="cg_iters="):
        NewtonCG([theta], lambda x, y, v: v, cg_iters=0)
    with pytest.raises(RuntimeError, match="set_batch"):
        NewtonCG([theta], lambda x, y, v: v).step()
    with pytest.raises(ValueError, match="optimizers="):
        bench_second_order(optimizers=("lbfgs",))


def test_exact_and_recursive_products_agree_on_the_bench_model():
    x, y, _, _ = load_digits()
    torch.manual_seed(0)
    model = build_model("digits", tuple(x.shape), "snopt")
    v = torch.randn(sum(p.numel() for p in model.parameters()))
    exact = exact_hvp(model)(x[:16], y[:16], v)
    rec = recursive_hvp(model)(x[:16], y[:16], v)
    assert float((exact - rec).norm() / rec.norm()) < 1e-2  # float32, both at tol 1e-3


def test_cli_bench_second_order_smoke(tmp_path, capsys):
    code = main(
        ["bench", "second-order", "--budget-s", "0.5", "--out", str(tmp_path), "--batch-size", "32"]
    )
    assert code == 0
    out = capsys.readouterr().out
    assert "newton-cg-recursive" in out
    data = json.loads((tmp_path / "second_order_digits.json").read_text())
    names = [r["optimizer"] for r in data["summary"]]
    assert names == ["snopt", "newton-cg", "newton-cg-recursive"]
    assert all(r["iterations"] >= 1 for r in data["runs"])
    assert (tmp_path / "second_order_digits.png").stat().st_size > 0
