"""Free horizon (§3.4): the integration time ``T = t1`` as a trained architecture parameter.

:class:`FreeHorizon` owns ``[t0, T]`` for every ``NeuralODE`` it is attached to. Each forward
integrates over the current horizon through a fresh leaf tensor, so the backward pass leaves
``∂L/∂T`` on it (any sensitivity that differentiates ``t_span``: "snopt", torchdyn's
"adjoint", "autograd"). After each optimizer step the horizon reads that derivative and moves
``T`` every ``update_every`` iterations:

- ``policy="feedback"`` (eq. 16): ``T ← T − lr · (Q̄_T + Σ_k Q_Tu,k δθ_k) / Q̄_TT``;
- ``policy="baseline"`` (first order, Massaroli et al. 2020): ``T ← T − lr · Q̄_T``;

with the penalty ``c/2·T²`` of eq. 15 (``c = penalty``), ``s = ∂L/∂T`` of the data loss,
``Q_T = s + c·T``, the Gauss-Newton ``Q_TT = c + s²`` and ``Q_Tu = s · ∂L/∂θ`` (the same
terminal curvature ``Q_xx ≈ Φ_x Φ_xᵀ`` SNOpt uses), ``Q̄`` bias-corrected exponential averages,
and ``δθ_k`` the parameter change of each optimizer step since the last update of ``T``.
``T`` is clamped to ``[min_t1, max_t1]``.

An autonomous field whose output is linear in its last layer ``(W, b)`` (the usual MLP or conv
field) has the same flow for ``(kW, kb)`` over ``[t0, t0 + (T − t0)/k]``, so
``(T − t0)·∂L/∂T = ⟨∂L/∂W, W⟩ + ⟨∂L/∂b, b⟩``: zero at stationary weights. Train such a field with
weight decay ``γ`` (any optimizer's): only then has ``Q_T`` an interior zero,
``(T* − t0)² = γ‖(W, b)‖²/c``; without it ``T`` sinks to ``min_t1`` while the last layer grows.
"""

from __future__ import annotations

import enum
import math
import warnings
from collections.abc import Iterable
from typing import Any

import torch
import torch.nn as nn
from torch import Tensor
from torch.utils.hooks import RemovableHandle


class Policy(str, enum.Enum):
    """How :class:`FreeHorizon` moves ``T`` (a string works too)."""

    FEEDBACK = "feedback"  # second-order feedback policy, eq. 16
    BASELINE = "baseline"  # first order, Massaroli et al. 2020


#: The accepted ``policy`` strings.
POLICIES: tuple[str, ...] = tuple(p.value for p in Policy)


def _node_types() -> tuple[type, ...]:
    from torchdyn.core import NeuralODE

    return (NeuralODE,)


class FreeHorizon(nn.Module):
    """Learnable integration horizon ``T`` shared by one or more torchdyn NeuralODEs.

    Args:
        t0: start of integration (time units of ``t_span``); fixed. Default 0.0.
        t1: initial horizon ``T`` (> t0). Default 1.0.
        penalty: ``c`` of the ``c/2·T²`` penalty (eq. 15), ``>= 0``. Default 1e-3.
        lr: step size ``η`` of eq. 16 (or of the first-order rule), ``> 0``. Default 0.1.
        policy: a :class:`Policy` or its string: ``"feedback"`` (eq. 16) or ``"baseline"``
            (first-order). Default "feedback".
        update_every: optimizer steps between updates of ``T``. Default 50.
        min_t1: lower clamp of ``T`` (> t0). Default ``t0 + 0.1``.
        max_t1: upper clamp of ``T`` or None (no upper clamp). Default None.
        momentum: decay of the running averages of ``∂L/∂T`` and its square, in [0, 1).
            Default 0.99.
        process_group: under ``torch.distributed``, the ranks whose ``∂L/∂T`` are averaged
            (as DDP averages the weight gradients) so that every rank keeps the same ``T``:
            ``"auto"`` (the default group when initialized), None (never communicate) or a
            ``ProcessGroup``.

    Use::

        horizon = tds.FreeHorizon(t1=1.0, penalty=1e-3, lr=0.1).attach(model, optimizer)
        # train as usual; optimizer.step() also moves T every update_every steps

    Without an optimizer, call :meth:`step` after each optimizer step yourself (the feedback
    policy then needs ``delta_theta`` and ``grads``). ``history`` lists ``(step, T)`` after
    every update (Fig. 10).
    """

    T: Tensor
    avg_s: Tensor
    avg_s2: Tensor
    feedback_sum: Tensor
    steps: Tensor
    updates: Tensor

    def __init__(
        self,
        t0: float = 0.0,
        t1: float = 1.0,
        penalty: float = 1e-3,
        lr: float = 0.1,
        policy: Policy | str = Policy.FEEDBACK,
        update_every: int = 50,
        min_t1: float | None = None,
        max_t1: float | None = None,
        momentum: float = 0.99,
        process_group: Any = "auto",
    ) -> None:
        super().__init__()
        from torchdyn_snopt.distributed import RankSync

        self._sync = RankSync(process_group)  # raises TypeError on a bad process_group
        min_t1 = float(t0) + 0.1 if min_t1 is None else min_t1
        _check_args(t0, t1, penalty, lr, policy, update_every, min_t1, max_t1, momentum)
        self.t0 = float(t0)
        self.penalty = float(penalty)
        self.lr = float(lr)
        self.policy = Policy(policy)
        self.update_every = int(update_every)
        self.min_t1 = float(min_t1)
        self.max_t1 = None if max_t1 is None else float(max_t1)
        self.momentum = float(momentum)
        f64 = torch.float64
        self.register_buffer("T", torch.tensor(self._clamp(float(t1)), dtype=f64))
        self.register_buffer("avg_s", torch.zeros((), dtype=f64))
        self.register_buffer("avg_s2", torch.zeros((), dtype=f64))
        self.register_buffer("feedback_sum", torch.zeros((), dtype=f64))
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))
        self.register_buffer("updates", torch.zeros((), dtype=torch.long))
        self.history: list[tuple[int, float]] = [(0, float(self.T))]
        self._leaf: Tensor | None = None
        self._handles: list[RemovableHandle] = []
        self._snapshot: list[tuple[Tensor, Tensor | None, Tensor]] | None = None
        #: The last :meth:`step`'s ``dL_dT``, ``Q_T``, ``Q_TT`` and ``Q_Tu_dtheta`` (unaveraged).
        self.last: dict[str, float] = {}

    # ---------------------------------------------------------------- horizon supply
    @property
    def t1(self) -> float:
        """The current horizon ``T`` as a float."""
        return float(self.T)

    def _horizon_leaf(self) -> Tensor:
        """``T`` as a leaf that collects ``∂L/∂T`` over this iteration's forwards."""
        if self._leaf is None or self._leaf.device != self.T.device:
            self._leaf = self.T.detach().clone().requires_grad_(True)
        return self._leaf

    def t_span(self, base: Tensor | None = None) -> Tensor:
        """``[t0, T]``, or ``base`` rescaled affinely onto ``[t0, T]`` (keeps its dtype/device).

        ``base``: a 1-D increasing or decreasing time grid of >= 2 points (only its shape
        relative to its end points matters). The result carries the gradient to ``T``.
        """
        T = self._horizon_leaf() if torch.is_grad_enabled() else self.T
        if base is None:
            return torch.stack([T.new_tensor(self.t0), T]).to(torch.get_default_dtype())
        base = torch.as_tensor(base)
        if base.ndim != 1 or base.numel() < 2:
            raise ValueError(
                f"t_span of shape {tuple(base.shape)} is invalid; accepted: a 1-D grid of >= 2 "
                "time points"
            )
        b = base.detach().to(T)
        frac = (b - b[0]) / (b[-1] - b[0])  # 0 at the start, 1 at the end
        dtype = base.dtype if base.is_floating_point() else torch.get_default_dtype()
        return (self.t0 + frac * (T - self.t0)).to(device=base.device, dtype=dtype)

    def attach(
        self, module: nn.Module, optimizer: torch.optim.Optimizer | None = None
    ) -> FreeHorizon:
        """Integrate every NeuralODE in ``module`` over ``[t0, T]``; follow ``optimizer``.

        A NeuralODE's own ``t_span`` (argument or attribute) is rescaled onto ``[t0, T]``, so
        multi-point grids keep their relative spacing. With ``optimizer``, each
        ``optimizer.step()`` also calls :meth:`step` with the parameter change it made.
        Returns ``self``. :meth:`detach` removes every hook. The feedback term reads ``.grad``
        as the optimizer sees it: behind an ``SNOptPreconditioner`` that is the preconditioned
        gradient, not ``∂L/∂θ`` (``tds.SNOpt`` keeps ``.grad`` raw until its step).
        """
        nodes = [m for m in module.modules() if isinstance(m, _node_types())]
        if not nodes:
            raise ValueError(
                f"module={type(module).__name__} holds no torchdyn NeuralODE; accepted: a "
                "NeuralODE or a module containing one"
            )
        if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(
                f"optimizer={type(optimizer).__name__} is invalid; accepted: a "
                "torch.optim.Optimizer or None"
            )
        for node in nodes:
            self._handles.append(
                node.register_forward_pre_hook(self._rewrite_t_span, with_kwargs=True)
            )
        if optimizer is not None:
            self._handles.append(optimizer.register_step_pre_hook(self._before_step))
            self._handles.append(optimizer.register_step_post_hook(self._after_step))
        return self

    def detach(self) -> None:
        """Remove the hooks :meth:`attach` installed."""
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def _rewrite_t_span(
        self, node: nn.Module, args: tuple, kwargs: dict[str, Any]
    ) -> tuple[tuple, dict[str, Any]]:
        if len(args) >= 2:
            base = args[1]
        else:
            base = kwargs.get("t_span", getattr(node, "t_span", None))
        if base is None:  # torchdyn's default grid [0, 1], in the state's dtype/device
            x = args[0] if args else kwargs.get("x")
            like = x if isinstance(x, Tensor) and x.is_floating_point() else self.T
            base = torch.tensor([0.0, 1.0], dtype=like.dtype, device=like.device)
        new = self.t_span(base)
        if len(args) >= 2:
            args = (args[0], new, *args[2:])
        else:
            kwargs = {**kwargs, "t_span": new}
        return args, kwargs

    # ---------------------------------------------------------------- optimizer hooks
    def _before_step(self, optimizer: torch.optim.Optimizer, *_: Any) -> None:
        self._snapshot = [
            (p, None if p.grad is None else p.grad.detach().clone(), p.detach().clone())
            for group in optimizer.param_groups
            for p in group["params"]
        ]

    def _after_step(self, optimizer: torch.optim.Optimizer, *_: Any) -> None:
        snap, self._snapshot = self._snapshot, None
        if snap is None:
            return
        grads = [g for _, g, _ in snap if g is not None]
        deltas = [p.detach() - old for p, g, old in snap if g is not None]
        self.step(delta_theta=deltas, grads=grads)

    # ---------------------------------------------------------------- the update
    def step(
        self,
        delta_theta: Iterable[Tensor] | None = None,
        grads: Iterable[Tensor] | None = None,
    ) -> bool:
        """Read this iteration's ``∂L/∂T``; every ``update_every`` calls, move ``T``.

        ``delta_theta``: the parameter changes of the optimizer step just taken and
        ``grads`` the gradients it used (same order); needed by the feedback policy
        (``attach(model, optimizer)`` passes them). Returns True when ``T`` moved. An
        iteration without ``∂L/∂T`` (no forward under grad) is skipped with a warning; a
        non-finite one is skipped with a warning and changes nothing.
        """
        leaf, self._leaf = self._leaf, None
        grad = leaf.grad if leaf is not None else None
        has_grad = grad is not None
        s = float(grad) if grad is not None else 0.0  # ∂L/∂T of the data loss
        world = self._sync.world_size()
        if world > 1:  # DDP averages ∂L/∂θ over ranks; T is not a DDP parameter: same here
            buf = torch.tensor([s, float(not has_grad)], dtype=torch.float64, device=self.T.device)
            self._sync.all_reduce(buf)
            s, has_grad = float(buf[0]) / world, bool(buf[1] == 0)
        if not has_grad:
            warnings.warn(
                "FreeHorizon.step: no gradient with respect to T this iteration (no attached "
                "NeuralODE ran under autograd, or its sensitivity ignores t_span); skipped",
                stacklevel=2,
            )
            return False
        feedback = 0.0
        if self.policy is Policy.FEEDBACK:
            if delta_theta is None or grads is None:
                raise ValueError(
                    "policy='feedback' needs delta_theta and grads (the step's parameter change "
                    "and gradients); pass them, or use attach(model, optimizer)"
                )
            dots = [
                torch.sum(g.detach().double() * d.detach().double())
                for g, d in zip(grads, delta_theta, strict=True)
            ]
            feedback = s * (float(torch.stack(dots).sum()) if dots else 0.0)  # Q_Tu δθ
        if not all(map(math.isfinite, (s, feedback))):
            warnings.warn(
                f"FreeHorizon.step: non-finite dL/dT={s} or feedback={feedback}; skipped",
                stacklevel=2,
            )
            return False
        T = float(self.T)
        self.last = {  # this iteration's terms of eq. 16 (before averaging)
            "dL_dT": s,
            "Q_T": s + self.penalty * T,
            "Q_TT": self.penalty + s * s,
            "Q_Tu_dtheta": feedback,
        }
        m = self.momentum
        self.avg_s.mul_(m).add_((1 - m) * s)
        self.avg_s2.mul_(m).add_((1 - m) * s * s)
        self.feedback_sum.add_(feedback)
        self.steps.add_(1)
        if int(self.steps) % self.update_every:
            return False
        debias = 1 - m ** int(self.steps)
        q_t = float(self.avg_s) / debias + self.penalty * T  # eq. 15: ∂/∂T of Φ + c/2·T²
        if self.policy is Policy.FEEDBACK:  # eq. 16, Gauss-Newton Q_TT = Fᵀ a aᵀ F + c
            q_tt = float(self.avg_s2) / debias + self.penalty
            delta = (q_t + float(self.feedback_sum)) / max(q_tt, 1e-12)
        else:  # first order
            delta = q_t
        self.feedback_sum.zero_()
        self.T.fill_(self._clamp(T - self.lr * delta))
        self.updates.add_(1)
        self.history.append((int(self.steps), float(self.T)))
        return True

    def _clamp(self, value: float) -> float:
        value = max(value, self.min_t1)
        return value if self.max_t1 is None else min(value, self.max_t1)

    # ---------------------------------------------------------------- persistence
    def get_extra_state(self) -> dict[str, Any]:
        return {"history": list(self.history)}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        self.history = [(int(i), float(t)) for i, t in state["history"]]
        self._leaf = None

    def extra_repr(self) -> str:
        return (
            f"t0={self.t0}, T={float(self.T):.4g}, penalty={self.penalty}, lr={self.lr}, "
            f"policy={self.policy.value!r}, update_every={self.update_every}, "
            f"min_t1={self.min_t1}, max_t1={self.max_t1}"
        )


def _check_args(
    t0: float,
    t1: float,
    penalty: float,
    lr: float,
    policy: Policy | str,
    update_every: int,
    min_t1: float,
    max_t1: float | None,
    momentum: float,
) -> None:
    def finite(name: str, v: Any) -> None:
        if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
            raise ValueError(f"{name}={v!r} is invalid; accepted: a finite float")

    for name, v in (("t0", t0), ("t1", t1), ("penalty", penalty), ("lr", lr)):
        finite(name, v)
    finite("min_t1", min_t1)
    if max_t1 is not None:
        finite("max_t1", max_t1)
    if penalty < 0:
        raise ValueError(f"penalty={penalty!r} is invalid; accepted: a float >= 0")
    if lr <= 0:
        raise ValueError(f"lr={lr!r} is invalid; accepted: a float > 0")
    if not isinstance(policy, str) or policy not in POLICIES:
        raise ValueError(f"policy={policy!r} is invalid; accepted: {', '.join(POLICIES)}")
    if isinstance(update_every, bool) or not isinstance(update_every, int) or update_every < 1:
        raise ValueError(f"update_every={update_every!r} is invalid; accepted: an int >= 1")
    if min_t1 <= t0:
        raise ValueError(f"min_t1={min_t1!r} is invalid; accepted: a float > t0={t0!r}")
    if max_t1 is not None and max_t1 < min_t1:
        raise ValueError(f"max_t1={max_t1!r} is invalid; accepted: None or a float >= min_t1")
    if t1 <= t0:
        raise ValueError(f"t1={t1!r} is invalid; accepted: a float > t0={t0!r}")
    finite("momentum", momentum)
    if not 0 <= momentum < 1:
        raise ValueError(f"momentum={momentum!r} is invalid; accepted: a float in [0, 1)")
