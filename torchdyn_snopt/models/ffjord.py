"""FFJORD (Grathwohl et al. 2018): stacked torchdyn ``CNF`` blocks on a standard-normal base.

Data ``x`` at ``t = 0`` flows through blocks ``1..K`` (block ``k`` integrates ``[0, T_k]``) to
``z``; the augmented first column accumulates ``Δ = -Σ_k ∫ tr(∂f_k/∂x) dt`` so that

    log p(x) = log N(z; 0, I) - Δ        (instantaneous change of variables; paper §4)

Sampling runs the blocks backwards from ``z ~ N(0, I)`` without the trace.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn as nn
from torch import Tensor
from torchdyn.core import NeuralODE
from torchdyn.models import CNF, autograd_trace, hutch_trace
from torchdyn.nn import DepthCat
from torchdyn.numerics.odeint import odeint

CONDITIONINGS: tuple[str, ...] = ("concatsquash", "depthcat")
TRACES: tuple[str, ...] = ("hutchinson", "exact")
NOISES: tuple[str, ...] = ("rademacher", "gaussian")
ACTIVATIONS: dict[str, type[nn.Module]] = {"tanh": nn.Tanh, "softplus": nn.Softplus}


class ConcatSquashLinear(nn.Module):
    """``h = (W x + b) ⊙ σ(a t + c) + d t``: a linear layer gated and shifted by time.

    Args: ``d_in``, ``d_out`` feature sizes. Input ``(B, d_in)``, output ``(B, d_out)``.
    ``t`` is written by torchdyn's ``DEFunc`` before every evaluation (any module with a ``t``
    attribute gets the solver's time).
    """

    def __init__(self, d_in: int, d_out: int) -> None:
        super().__init__()
        self.linear = nn.Linear(d_in, d_out)
        self.gate = nn.Linear(1, d_out)
        self.shift = nn.Linear(1, d_out, bias=False)
        self.t: Tensor | float | None = None

    def forward(self, x: Tensor) -> Tensor:
        if self.t is None:
            raise RuntimeError("ConcatSquashLinear.t is unset: call it inside a torchdyn DEFunc")
        t = torch.as_tensor(self.t, dtype=x.dtype, device=x.device).reshape(1, 1)
        return self.linear(x) * torch.sigmoid(self.gate(t)) + self.shift(t)


class Rademacher:
    """Noise for the Hutchinson estimator: entries ±1, shape ``(*sample_shape, dim)``.

    dtype/device follow :attr:`like` (set by :class:`FFJORD` to its input before each solve).
    """

    def __init__(self, dim: int) -> None:
        self.dim, self.like = dim, torch.zeros(())

    def sample(self, sample_shape: Sequence[int] = ()) -> Tensor:
        r = torch.randint(0, 2, (*sample_shape, self.dim), device=self.like.device)
        return (2 * r - 1).to(self.like.dtype)


class StandardNormal(Rademacher):
    """Gaussian Hutchinson noise ``N(0, I)``, same interface as :class:`Rademacher`."""

    def sample(self, sample_shape: Sequence[int] = ()) -> Tensor:
        shape = (*sample_shape, self.dim)
        return torch.randn(shape, dtype=self.like.dtype, device=self.like.device)


def make_field(
    dim: int, hidden: Sequence[int], conditioning: str, activation: str
) -> nn.Sequential:
    """The MLP ``f(t, x)``: ``dim → hidden… → dim`` with time in every layer."""
    sizes = [dim, *hidden, dim]
    layers: list[nn.Module] = []
    for i, (d_in, d_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        if conditioning == "concatsquash":
            layers.append(ConcatSquashLinear(d_in, d_out))
        else:
            layers += [DepthCat(1), nn.Linear(d_in + 1, d_out)]
        if i < len(sizes) - 2:
            layers.append(ACTIVATIONS[activation]())
    return nn.Sequential(*layers)


def standard_normal_logprob(z: Tensor) -> Tensor:
    """``log N(z; 0, I)`` per row, nats, shape ``(B,)``."""
    return -0.5 * (z.pow(2).sum(1) + z.shape[1] * math.log(2 * math.pi))


class FFJORD(nn.Module):
    """A stack of ``n_blocks`` CNFs, each a ``NeuralODE(CNF(net), sensitivity=...)``.

    Args:
        dim: data dimension ``d``.
        hidden: hidden widths of each block's field (default ``(64, 64)``).
        n_blocks: 1-5 stacked blocks (the paper's range).
        t1: integration time per block: one float for all, or one per block (default 1.0).
        conditioning: ``"concatsquash"`` (gated, FFJORD's default) or ``"depthcat"``.
        activation: ``"tanh"`` or ``"softplus"``.
        trace: ``"hutchinson"`` (one VJP per evaluation) or ``"exact"`` (``d`` VJPs).
        noise: Hutchinson noise, ``"rademacher"`` or ``"gaussian"``.
        identity_init: zero the last layer of every field, so training starts from the
            identity flow (``log p`` = the base density); long horizons such as circles'
            ``t1 = 10`` otherwise start from a wildly expanding random flow (default True).
        sensitivity: of every block's ``NeuralODE`` (default ``"snopt"``); ``solver`` (a name
            or a solver module), ``atol``, ``rtol``, ``atol_adjoint`` and ``rtol_adjoint`` go
            to it too (defaults ``"dopri5"``, 1e-5 everywhere).
    """

    def __init__(
        self,
        dim: int,
        hidden: Sequence[int] = (64, 64),
        n_blocks: int = 1,
        t1: float | Sequence[float] = 1.0,
        conditioning: str = "concatsquash",
        activation: str = "tanh",
        trace: str = "hutchinson",
        noise: str = "rademacher",
        identity_init: bool = True,
        sensitivity: str = "snopt",
        solver: str | nn.Module = "dopri5",
        atol: float = 1e-5,
        rtol: float = 1e-5,
        atol_adjoint: float = 1e-5,
        rtol_adjoint: float = 1e-5,
    ) -> None:
        super().__init__()
        if not (isinstance(dim, int) and dim >= 1):
            raise ValueError(f"dim={dim!r} is invalid; accepted: an int >= 1")
        if not (isinstance(n_blocks, int) and 1 <= n_blocks <= 5):
            raise ValueError(f"n_blocks={n_blocks!r} is invalid; accepted: an int in 1..5")
        times = [float(t1)] * n_blocks if isinstance(t1, (int, float)) else [float(t) for t in t1]
        if len(times) != n_blocks or not all(math.isfinite(t) and t > 0 for t in times):
            raise ValueError(
                f"t1={t1!r} is invalid; accepted: a float > 0 or {n_blocks} such floats"
            )
        for arg, value, accepted in (
            ("conditioning", conditioning, CONDITIONINGS),
            ("activation", activation, tuple(ACTIVATIONS)),
            ("trace", trace, TRACES),
            ("noise", noise, NOISES),
        ):
            if value not in accepted:
                raise ValueError(f"{arg}={value!r} is invalid; accepted: {', '.join(accepted)}")
        self.dim, self.times, self.solver, self.atol, self.rtol = dim, times, solver, atol, rtol
        self.noise = (Rademacher if noise == "rademacher" else StandardNormal)(dim)
        fields = [make_field(dim, tuple(hidden), conditioning, activation) for _ in range(n_blocks)]
        self.nets = nn.ModuleList(fields)
        if identity_init:
            for net in fields:
                last = net[-1]  # ConcatSquashLinear, or nn.Linear after DepthCat
                if isinstance(last, ConcatSquashLinear):
                    nn.init.zeros_(last.shift.weight)
                    last = last.linear
                assert isinstance(last, nn.Linear)
                nn.init.zeros_(last.weight)
                nn.init.zeros_(last.bias)
        estimator = hutch_trace if trace == "hutchinson" else autograd_trace
        self.blocks = nn.ModuleList(
            NeuralODE(
                CNF(net, trace_estimator=estimator, noise_dist=self.noise),
                sensitivity=sensitivity,
                solver=solver,
                atol=atol,
                rtol=rtol,
                atol_adjoint=atol_adjoint,
                rtol_adjoint=rtol_adjoint,
            )
            for net in self.nets
        )

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``x (B, d)`` → ``(z (B, d), Δ (B,))`` with ``log p(x) = log N(z) - Δ``."""
        if x.dim() != 2 or x.shape[1] != self.dim:
            raise ValueError(f"x has shape {tuple(x.shape)}; accepted: (batch, {self.dim})")
        self.noise.like = x
        state = torch.cat([x.new_zeros(x.shape[0], 1), x], 1)
        for block, t1 in zip(self.blocks, self.times):
            _, sol = block(state, t_span=torch.tensor([0.0, t1], dtype=x.dtype, device=x.device))
            state = sol[-1]
        return state[:, 1:], state[:, 0]

    def log_prob(self, x: Tensor) -> Tensor:
        """``log p(x)`` in nats, shape ``(B,)``."""
        z, delta = self(x)
        return standard_normal_logprob(z) - delta

    def nll(self, x: Tensor) -> Tensor:
        """Mean negative log-likelihood (nats per sample): the training loss."""
        return -self.log_prob(x).mean()

    def bits_per_dim(self, x: Tensor, n_levels: int = 256) -> Tensor:
        """Mean bits/dim of dequantized images ``x = (pixel + u) / n_levels`` in ``[0, 1]^d``.

        ``log p`` on the ``[0, n_levels)`` scale is ``log p(x) - d·log(n_levels)``.
        """
        nll = -(self.log_prob(x) - self.dim * math.log(n_levels)).mean()
        return nll / (self.dim * math.log(2.0))

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """``n`` samples ``(n, d)``: ``z ~ N(0, I)`` flowed from ``t = T_k`` back to 0, last
        block first."""
        p = next(self.parameters())
        x = torch.randn(n, self.dim, generator=generator, dtype=p.dtype, device=p.device)
        for net, t1 in zip(reversed(self.nets), reversed(self.times)):
            t_span = torch.tensor([t1, 0.0], dtype=p.dtype, device=p.device)
            _, sol = odeint(_Drift(net), x, t_span, self.solver, self.atol, self.rtol)
            x = sol[-1]
        return x


class _Drift(nn.Module):
    """``f(t, x)`` of one block without the trace (sets ``t`` on time-conditioned layers)."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net
        self.timed = [m for m in net.modules() if hasattr(m, "t")]

    def forward(self, t: Tensor, x: Tensor, args: dict | None = None) -> Tensor:
        for m in self.timed:
            m.t = t
        return self.net(x)
