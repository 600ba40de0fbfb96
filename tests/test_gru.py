"""tds.nn.GRUCell: a drop-in for torch.nn.GRUCell, and its K-FAC factors under full_precond."""

import copy
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import torchdyn_snopt as tds
from tests.helpers.numerics import DTYPE
from torchdyn_snopt.curvature import GatePreactivationAdapter, adapter_for
from torchdyn_snopt.nn import GatePreactivation, GRUCell


def _pair(bias: bool = True, dtype=DTYPE):
    torch.manual_seed(0)
    ref = nn.GRUCell(5, 7, bias=bias).to(dtype)
    ours = GRUCell(5, 7, bias=bias, dtype=dtype)
    ours.load_state_dict(ref.state_dict())
    return ref, ours


@pytest.mark.parametrize("bias", [True, False])
def test_same_parameters_and_state_dict(bias):
    ref, ours = _pair(bias)
    assert [(n, p.shape) for n, p in ref.named_parameters()] == [
        (n, p.shape) for n, p in ours.named_parameters()
    ]
    assert list(ref.state_dict()) == list(ours.state_dict())
    back = nn.GRUCell(5, 7, bias=bias).to(DTYPE)
    back.load_state_dict(ours.state_dict())  # and the other way round
    torch.manual_seed(1)
    a = nn.GRUCell(5, 7, bias=bias)
    torch.manual_seed(1)
    b = GRUCell(5, 7, bias=bias)  # same initialisation as torch's
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-6)])
def test_same_outputs_and_gradients(dtype, tol):
    ref, ours = _pair(dtype=dtype)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(6, 5, generator=g).to(dtype)
    h = torch.randn(6, 7, generator=g).to(dtype)
    for args in ((x, h), (x,), (x[0], h[0]), (x[0],)):
        assert (ref(*args) - ours(*args)).abs().max() < tol
    loss_ref = (ref(x, h) ** 2).sum()
    loss_ours = (ours(x, h) ** 2).sum()
    g_ref = torch.autograd.grad(loss_ref, list(ref.parameters()))
    g_ours = torch.autograd.grad(loss_ours, list(ours.parameters()))
    for a, b in zip(g_ref, g_ours):
        assert (a - b).abs().max() < 10 * tol


def test_copies_keep_their_own_parameters():
    _, ours = _pair()
    twin = copy.deepcopy(ours)
    assert twin.input_gates.cell is twin and twin.hidden_gates.weight is twin.weight_hh
    assert list(dict(ours.named_modules())) == ["", "input_gates", "hidden_gates"]


def test_bad_sizes_name_the_argument():
    with pytest.raises(ValueError, match="hidden_size=0"):
        GRUCell(3, 0)
    with pytest.raises(ValueError, match="x has shape"):
        GRUCell(3, 4)(torch.zeros(2, 3, 3))


class _Recurrent(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.cell = GRUCell(3, 4, dtype=DTYPE)
        self.head = nn.Linear(4, 2).to(DTYPE)

    def forward(self, xs):
        h = xs.new_zeros(xs.shape[1], 4)
        for x in xs:
            h = self.cell(x, h)
        return self.head(h)


def test_adapter_factors_match_a_hand_computation():
    """A = mean over steps × batch of [z, 1][z, 1]ᵀ, B = mean of (batch·∂L/∂g)(batch·∂L/∂g)ᵀ."""
    model = _Recurrent()
    g = torch.Generator().manual_seed(4)
    xs, y = torch.randn(3, 5, 3, generator=g, dtype=DTYPE), torch.tensor([0, 1, 1, 0, 1])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every parameter must be covered
        pre = tds.SNOptPreconditioner(model, full_precond=True, update_freq=1)
    F.cross_entropy(model(xs), y).backward()
    pre.step()
    fac = pre.last_factors
    assert {"cell.input_gates", "cell.hidden_gates", "head"} <= set(fac)

    # by hand: the cell unrolled with torch.nn.functional, gradients at the pre-activations
    cell = model.cell
    h, leaves_i, leaves_h, hs = xs.new_zeros(5, 4), [], [], []
    for x in xs:
        hs.append(h.detach())
        gi = F.linear(x, cell.weight_ih, cell.bias_ih)
        gh = F.linear(h, cell.weight_hh, cell.bias_hh)
        gi.retain_grad()
        gh.retain_grad()
        leaves_i.append(gi)
        leaves_h.append(gh)
        i_r, i_z, i_n = gi.chunk(3, 1)
        h_r, h_z, h_n = gh.chunk(3, 1)
        r, z = torch.sigmoid(i_r + h_r), torch.sigmoid(i_z + h_z)
        h = (1 - z) * torch.tanh(i_n + r * h_n) + z * h
    F.cross_entropy(model.head(h), y).backward()
    batch, ones = 5, torch.ones(15, 1, dtype=DTYPE)
    z_i = torch.cat([xs.reshape(15, 3), ones], 1)
    z_h = torch.cat([torch.cat(hs), ones], 1)
    g_i = torch.cat([t.grad for t in leaves_i]) * batch
    g_h = torch.cat([t.grad for t in leaves_h]) * batch
    for name, z, gg in (("cell.input_gates", z_i, g_i), ("cell.hidden_gates", z_h, g_h)):
        assert torch.allclose(fac[name].A, z.t() @ z / 15, rtol=1e-10, atol=1e-12), name
        assert torch.allclose(fac[name].B, gg.t() @ gg / 15, rtol=1e-10, atol=1e-12), name
        assert fac[name].locations == 3, name  # the weight is shared over the 3 steps
    assert fac["head"].locations == 1


def test_registry_maps_gate_modules_to_their_adapter():
    cell = GRUCell(3, 4)
    adapter = adapter_for(cell.input_gates, "g")
    assert isinstance(cell.input_gates, GatePreactivation)
    assert isinstance(adapter, GatePreactivationAdapter)
    assert adapter.params() == [cell.weight_ih, cell.bias_ih]
