"""SNOpt's preconditioned update (eq. 14) with eigen-based amortization and Tikhonov damping.

Every ``update_freq`` steps the preconditioner arms the curvature sampling of the next backward
solve; from the fresh factors it takes ``Ā = U_A diag(λ_A) U_Aᵀ`` and ``B̄ = U_B diag(λ_B) U_Bᵀ``
and starts the second-moment estimate in the Kronecker eigenbasis at ``m = L·λ_B λ_Aᵀ``
(``L`` spatial locations for convolutions). Every step, with the layer gradient ``G``
(``d_out × d_in``, bias as the last column)::

    G' = U_Bᵀ G U_A,   m ← α m + (1 - α)·batch·G'²,   G ← U_B [G' / (m + eps + γ)] U_Aᵀ

which is eq. 14, ``B̄⁻¹ G Ā⁻ᵀ``, with the inverse taken in the eigenbasis (George et al. 2018).
Weight decay ``γ`` enters as ``γθ`` in the gradient and ``γI`` in the damping (Remark, §3.2).
How a refresh gets ``U_A``, ``U_B`` (``torch.linalg.eigh``, or a warm start from the previous
bases, ``refresh="power"``) lives in :mod:`torchdyn_snopt.curvature.eigenbasis`.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any, cast

import torch
import torch.nn as nn
from torch import Tensor
from torchdyn.core.problems import ODEProblem

from torchdyn_snopt.adjoint import sampler_of
from torchdyn_snopt.cde import CurvatureTap, TapSampler
from torchdyn_snopt.curvature.base import LayerAdapter
from torchdyn_snopt.curvature.capture import attach
from torchdyn_snopt.curvature.eigenbasis import (
    Eigenpairs,
    Refresh,
    parse_refresh,
    refresh_eigh,
)
from torchdyn_snopt.curvature.eigenbasis import eigh_exact as _eigh  # noqa: F401 (old name)
from torchdyn_snopt.curvature.eigenbasis import eigh_from_rows as _eigh_from_rows
from torchdyn_snopt.curvature.outer import OuterFactors
from torchdyn_snopt.curvature.registry import adapter_for
from torchdyn_snopt.curvature.sampler import CurvatureSampler, Factors
from torchdyn_snopt.distributed import AUTO, RankSync, unwrap
from torchdyn_snopt.registration import SENSITIVITIES, is_snopt_problem


def _check_lr(lr: float) -> None:
    if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
        raise ValueError(f"lr={lr!r} is invalid; accepted: a finite float > 0")


def _check_hyper(
    eps: float,
    update_freq: int,
    alpha: float,
    grid_size: int,
    weight_decay: float,
    kl_clip: float | None,
) -> None:
    """Raise before anything changes when a curvature hyperparameter is out of range."""
    if kl_clip is not None and not (
        isinstance(kl_clip, (int, float)) and kl_clip > 0 and math.isfinite(kl_clip)
    ):
        raise ValueError(f"kl_clip={kl_clip!r} is invalid; accepted: None or a float > 0")
    if not (isinstance(eps, (int, float)) and math.isfinite(eps) and eps > 0):
        raise ValueError(f"eps={eps!r} is invalid; accepted: a finite float > 0")
    if isinstance(update_freq, bool) or not isinstance(update_freq, int):
        raise TypeError(f"update_freq={update_freq!r} must be an int >= 1")
    if update_freq < 1:
        raise ValueError(f"update_freq={update_freq!r} is invalid; accepted: an int >= 1")
    if not (isinstance(alpha, (int, float)) and 0.0 <= alpha < 1.0):
        raise ValueError(f"alpha={alpha!r} is invalid; accepted: a float in [0, 1)")
    if isinstance(grid_size, bool) or not isinstance(grid_size, int):
        raise TypeError(f"grid_size={grid_size!r} must be an int >= 2")
    if grid_size < 2:
        raise ValueError(f"grid_size={grid_size!r} is invalid; accepted: an int >= 2")
    if not (
        isinstance(weight_decay, (int, float)) and math.isfinite(weight_decay) and weight_decay >= 0
    ):
        raise ValueError(f"weight_decay={weight_decay!r} is invalid; accepted: a float >= 0")


@dataclass
class _Eigen:
    """Kronecker eigenbasis of one layer and the running second moment ``m`` in it.

    ``lamA``, ``lamB``: the eigenvalues the bases came with (the warm start of the next
    :attr:`Refresh.POWER` refresh; None from a checkpoint that predates them).
    """

    UA: Tensor
    UB: Tensor
    m: Tensor
    lamA: Tensor | None = None
    lamB: Tensor | None = None

    def pairs(self) -> tuple[Eigenpairs | None, Eigenpairs | None]:
        """``(λ_A, U_A)`` and ``(λ_B, U_B)``, each None when its eigenvalues are unknown."""
        return (
            None if self.lamA is None else (self.lamA, self.UA),
            None if self.lamB is None else (self.lamB, self.UB),
        )


def _factor_pairs(
    f: Factors, refresh: Refresh = Refresh.EXACT, prior: _Eigen | None = None
) -> tuple[Eigenpairs, Eigenpairs]:
    """(eigenvalues, eigenvectors) of ``Ā`` (from its rows when it has them) and of ``B̄``;
    ``refresh`` and the layer's previous eigenbasis ``prior``: see :func:`refresh_eigh`."""
    prior_a, prior_b = _priors(prior)
    if f.rows is not None:
        pair_a = _eigh_from_rows(f.rows)
    else:
        pair_a = refresh_eigh(f.A, prior_a, refresh)
    return pair_a, refresh_eigh(f.B, prior_b, refresh)


def _priors(eig: _Eigen | None) -> tuple[Eigenpairs | None, Eigenpairs | None]:
    return (None, None) if eig is None else eig.pairs()


def eigen_from_factors(f: Factors) -> _Eigen:
    """Fresh eigenbasis and ``m = L·λ_B λ_Aᵀ`` from sampled factors."""
    return _eigen_from_pairs(f, *_factor_pairs(f))


def _eigen_from_pairs(
    f: Factors, pair_a: tuple[Tensor, Tensor], pair_b: tuple[Tensor, Tensor]
) -> _Eigen:
    (lam_a, UA), (lam_b, UB) = pair_a, pair_b
    return _Eigen(UA, UB, torch.outer(lam_b, lam_a) * f.locations, lam_a, lam_b)


def project(G: Tensor, eig: _Eigen) -> Tensor:
    """``U_Bᵀ G U_A``: a layer matrix in the Kronecker eigenbasis."""
    return eig.UB.t() @ G @ eig.UA


def solve_in_eigenbasis(G1: Tensor, eig: _Eigen, denom: Tensor) -> Tensor:
    """``U_B (G' / denom) U_Aᵀ``: eq. 14's ``B̄⁻¹ G Ā⁻ᵀ`` with the damped eigenvalues ``denom``."""
    return eig.UB @ (G1 / denom) @ eig.UA.t()


class _PassCounter:
    """Counts the backward passes that reached ``param`` (one per ``loss.backward()``).

    A leaf's gradient is accumulated once per backward pass however often the graph uses it
    (an ODE-RNN's many solves included), so this counts passes, not solves.
    """

    def __init__(self, param: Tensor) -> None:
        self.count = 0
        self.handle = param.register_post_accumulate_grad_hook(self._hit)

    def _hit(self, _: Tensor) -> None:
        self.count += 1

    def take(self) -> int:
        """Passes since the last call."""
        count, self.count = self.count, 0
        return count


def _all_finite(tensors: list[Tensor]) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in tensors)


class SNOptPreconditioner:
    """SNOpt's curvature, applied to the gradients before any torch optimizer.

    Args:
        model: module holding one or more ``NeuralODE``s with ``sensitivity`` in
            :data:`~torchdyn_snopt.SENSITIVITIES` and/or :class:`~torchdyn_snopt.CurvatureTap`
            wrappers of ``torchcde.cdeint`` functions (and, with ``full_precond``, other layers).
        eps: Tikhonov damping added to the curvature eigenvalues (default 0.05; per-sample
            squared-gradient scale, see :mod:`torchdyn_snopt.curvature.sampler`).
        update_freq: steps between curvature refreshes (eigenbases recomputed), ``>= 1``.
        alpha: running-average weight of the eigenbasis second moment, in ``[0, 1)``.
        full_precond: also precondition adaptable layers outside the ODEs with K-FAC factors.
        grid_size: points of the uniform time grid of eq. 13 (``>= 2``).
        weight_decay: ``γ``; adds ``γθ`` to the gradient and ``γ`` to the damping.
        kl_clip: trust region on the preconditioned step (None = off): the preconditioned
            gradients ``P`` are scaled by ``min(1, sqrt(kl_clip / (lr² Σ⟨P, G⟩)))``, so the
            step's predicted change of the Gauss-Newton model stays below ``kl_clip``.
        lr: learning rate of the optimizer that follows (only used by ``kl_clip``).
        process_group: ranks that share this curvature (:mod:`torchdyn_snopt.distributed`):
            ``"auto"`` (default) = torch.distributed's default group whenever it is initialized
            with more than one process, ``None`` = never communicate, or a ``ProcessGroup``.
        distribute_eigh: with several processes, each rank eigendecomposes a share of the
            factors and the results are exchanged (default False: every rank decomposes all).
        refresh: how a refresh gets the eigenbases (keyword only; a
            :class:`~torchdyn_snopt.curvature.eigenbasis.Refresh` or its string):
            ``"exact"`` (default) = ``torch.linalg.eigh`` of every factor; ``"power"`` = a
            warm start from the layer's previous eigenbasis (one subspace-iteration step;
            the top 128 eigenpairs plus an isotropic tail for wider factors), exact at a
            layer's first refresh. Factors with low-rank rows always use their exact QR path;
            with several processes the warm start works the same way (every rank holds the
            same previous bases), with or without ``distribute_eigh``.

    ``model`` may be wrapped in ``DistributedDataParallel``; the layers are found (and named)
    inside the wrapper. Under DDP the factors are averaged over ranks at every refresh and a
    non-finite gradient on any rank makes every rank skip the step.

    Call :meth:`step` after ``loss.backward()``: it rewrites ``.grad`` in place and returns
    ``False`` (changing nothing) when a gradient or a factor is not finite. After a refresh,
    :attr:`last_factors` maps each layer name to the ``Factors`` (``Ā``, ``B̄``) it used.
    """

    def __init__(
        self,
        model: nn.Module,
        eps: float = 0.05,
        update_freq: int = 100,
        alpha: float = 0.75,
        full_precond: bool = False,
        grid_size: int = 100,
        weight_decay: float = 0.0,
        kl_clip: float | None = None,
        lr: float = 1.0,
        process_group: Any = AUTO,
        distribute_eigh: bool = False,
        *,
        refresh: Refresh | str = Refresh.EXACT,
        _stacklevel: int = 2,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model={type(model).__name__} must be a torch.nn.Module")
        _check_hyper(eps, update_freq, alpha, grid_size, weight_decay, kl_clip)
        _check_lr(lr)
        refresh = parse_refresh(refresh)
        sync = RankSync(process_group, distribute_eigh)  # validates both
        model = unwrap(model)
        problems = [m for m in model.modules() if is_snopt_problem(m)]
        taps = [m for m in model.modules() if isinstance(m, CurvatureTap)]  # torchcde.cdeint
        # torchdyn is untyped: an ODEProblem's vf is its vector field module
        fields = [cast(nn.Module, p.vf) for p in model.modules() if isinstance(p, ODEProblem)]
        in_ode = {id(m) for f in fields + [t.func for t in taps] for m in f.modules()}
        names = {id(m): n for n, m in model.named_modules()}

        ode_adapters: dict[int, LayerAdapter] = {}
        per_problem: list[list[LayerAdapter]] = []
        for vf in [cast(nn.Module, p.vf) for p in problems] + [t.func for t in taps]:
            mine = []
            for module in vf.modules():
                if id(module) not in ode_adapters:
                    adapter = adapter_for(module, names.get(id(module), type(module).__name__))
                    if adapter is None:
                        continue
                    ode_adapters[id(module)] = adapter
                mine.append(ode_adapters[id(module)])
            per_problem.append(mine)

        outer: list[LayerAdapter] = []
        if full_precond:
            for name, module in model.named_modules():
                if id(module) not in in_ode:
                    adapter = adapter_for(module, name)
                    if adapter is not None:
                        outer.append(adapter)
        if not ode_adapters and not outer:
            raise ValueError(
                f"model={type(model).__name__} holds no NeuralODE with sensitivity in "
                f"{SENSITIVITIES} (nor a CurvatureTap) that has an adaptable layer"
                + ("" if full_precond else ", and full_precond=False")
                + "; build the NeuralODE with sensitivity='snopt' or pass full_precond=True"
            )

        # Validated: from here on the model is changed (samplers configured, hooks attached).
        self._samplers: list[CurvatureSampler | TapSampler] = []
        owners = [sampler_of(p) for p in problems] + [t.sampler for t in taps]
        for sampler, mine in zip(owners, per_problem):
            sampler.adapters, sampler.grid_size = mine, grid_size
            self._samplers.append(sampler)
        self.last_factors: dict[str, Factors] = {}
        self.eps, self.update_freq, self.alpha = float(eps), update_freq, float(alpha)
        self.kl_clip, self.lr = kl_clip, float(lr)
        self.weight_decay, self.full_precond, self.grid_size = (
            float(weight_decay),
            full_precond,
            grid_size,
        )
        self.adapters: list[LayerAdapter] = list(ode_adapters.values()) + outer
        self._ode_adapters = list(ode_adapters.values())
        self._handles = [attach(a) for a in self._ode_adapters]
        self._passes = _PassCounter(self.adapters[0].params()[0])
        self._handles.append(self._passes.handle)
        self._outer = OuterFactors(outer)
        self._eigen: dict[LayerAdapter, _Eigen] = {}
        self.sync = sync
        self.refresh = refresh
        self._device = self.adapters[0].params()[0].device  # where collectives' buffers live
        self.steps = 0
        covered = {id(p) for a in self.adapters for p in a.params()}
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.covered = covered
        uncovered = [
            n for n, p in model.named_parameters() if p.requires_grad and id(p) not in covered
        ]
        if uncovered:
            warnings.warn(
                "SNOpt has no Kronecker factors for these parameters; they get the plain "
                f"gradient: {', '.join(uncovered)}",
                stacklevel=_stacklevel,
            )
        self._set_armed(True)

    # --- arming ---------------------------------------------------------------------------
    @property
    def armed(self) -> bool:
        """Whether the next backward pass samples curvature."""
        return self._armed

    def _set_armed(self, armed: bool) -> None:
        self._armed = armed
        for s in self._samplers:
            s.armed = armed
            if not armed:
                s.factors.clear()
        self._outer.armed = armed

    def _collect(self) -> dict[LayerAdapter, Factors]:
        """Factors sampled since arming: summed over ODEs (and calls) within a backward pass,
        averaged over the backward passes since the last step (gradient accumulation: ``k``
        passes, each loss a mean over its own samples, give the factors of one pass over the
        concatenated batch)."""
        passes = max(self._passes.take(), 1)
        total: dict[LayerAdapter, Factors] = {}
        for s in self._samplers:
            for adapter, f in s.factors.items():
                if adapter in total:
                    total[adapter].A = total[adapter].A + f.A
                    total[adapter].B = total[adapter].B + f.B
                else:
                    total[adapter] = Factors(f.A.clone(), f.B.clone(), f.locations, f.batch_size)
            s.factors.clear()
        if passes > 1:
            for f in total.values():
                f.A, f.B = f.A / passes, f.B / passes
        total.update(self._outer.take(passes))
        return total

    def _batch_size(self, adapter: LayerAdapter) -> int:
        if adapter in self._outer.batch_size:
            return self._outer.batch_size[adapter]
        return max((s.batch_size for s in self._samplers if adapter in s.adapters), default=1)

    # --- the update -----------------------------------------------------------------------
    @torch.no_grad()
    def step(self) -> bool:
        """Precondition every covered gradient in place (eq. 14); ``False`` = step skipped."""
        grads = [p.grad for p in self.params if p.grad is not None]
        factors = self._collect() if self._armed else {}  # a skipped step drops its samples
        self._passes.take()
        world = self.sync.world_size()
        # One collective with several processes: the flag, plus the factors at a refresh.
        bad, factors = self.sync.agree(
            _all_finite(grads), factors, self.adapters, self._armed, self._device
        )
        if bad:
            where = f" on {bad} of {world} ranks" if world > 1 else ""
            warnings.warn(f"non-finite gradient{where}: SNOpt skipped this step", stacklevel=3)
            return False
        fresh: dict[LayerAdapter, _Eigen] = {}
        if self._armed:
            if not _all_finite([t for f in factors.values() for t in (f.A, f.B)]):
                warnings.warn("non-finite curvature factor: SNOpt skipped this step", stacklevel=3)
                return False
            refresh, old = self.refresh, self._eigen
            if world == 1:  # one process: a low-rank Ā's rows are this process's own
                pairs = [
                    p for a, f in factors.items() for p in _factor_pairs(f, refresh, old.get(a))
                ]
            else:  # factors averaged over ranks (no rows), decompositions maybe shared out
                priors = [p for a in factors for p in _priors(old.get(a))]
                pairs = self.sync.eigh(
                    [m for f in factors.values() for m in (f.A, f.B)],
                    lambda m, prior: refresh_eigh(m, prior, refresh),
                    priors=priors,
                )
            fresh = {
                a: _eigen_from_pairs(f, pairs[2 * i], pairs[2 * i + 1])
                for i, (a, f) in enumerate(factors.items())
            }
        eigen = {**self._eigen, **fresh}
        updates: dict[LayerAdapter, tuple[Tensor, Tensor]] = {}
        vg: Tensor | None = None  # Σ ⟨P, G⟩ over the updated layers
        for adapter, eig in eigen.items():
            if not adapter.has_grad():
                continue
            G = adapter.grad_matrix()
            G1 = project(G, eig)
            batch = self._batch_size(adapter) * world  # DDP's gradient: the global batch's
            m = eig.m * self.alpha + (1.0 - self.alpha) * batch * G1.square()
            if self.weight_decay:
                G1 = G1 + self.weight_decay * project(adapter.param_matrix(), eig)
            P = solve_in_eigenbasis(G1, eig, m + self.eps + self.weight_decay)
            updates[adapter] = (P, m)
            vg = (P * G).sum() if vg is None else vg + (P * G).sum()
        if self.kl_clip is not None and vg is not None:  # vg is None iff updates is empty
            nu = torch.clamp(torch.sqrt(self.kl_clip / (self.lr**2 * vg.abs() + 1e-30)), max=1.0)
            updates = {a: (P * nu, m) for a, (P, m) in updates.items()}
        if not _all_finite([u for pair in updates.values() for u in pair]):
            warnings.warn(
                "non-finite preconditioned gradient: SNOpt skipped this step", stacklevel=3
            )
            return False
        # Everything is finite: commit.
        self._eigen = eigen
        for adapter, (P, m) in updates.items():
            adapter.set_grad_matrix(P)
            eigen[adapter].m = m
        if self.weight_decay:
            for p in self.params:
                if p.grad is not None and id(p) not in self.covered:
                    p.grad.add_(p, alpha=self.weight_decay)
        if fresh:
            self.last_factors = {a.name: f for a, f in factors.items()}
            self._set_armed(False)
        self.steps += 1
        if self.steps % self.update_freq == 0:
            self._set_armed(True)
        return True

    # --- persistence ----------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Step count, arming and each layer's eigenbasis (with its eigenvalues, the warm
        start of ``refresh="power"``) and second moment, by layer name."""
        return {
            "steps": self.steps,
            "armed": self._armed,
            "layers": {
                a.name: {
                    k: getattr(e, k).clone()
                    for k in ("UA", "UB", "m", "lamA", "lamB")
                    if getattr(e, k) is not None
                }
                for a, e in self._eigen.items()
            },
        }

    def check_state_dict(self, state: Any) -> None:
        """Raise ``ValueError`` naming what in ``state`` does not fit this model (changes nothing).

        Checks the keys of :meth:`state_dict`'s output, that every layer exists here, and that
        its eigenbases ``UA`` (``d_in × d_in``), ``UB`` (``d_out × d_out``) and second moment
        ``m`` (``d_out × d_in``) have this layer's shapes.
        """
        if not isinstance(state, dict):
            raise ValueError(f"state={type(state).__name__} is not a preconditioner state_dict")
        missing = [k for k in ("steps", "armed", "layers") if k not in state]
        if missing:
            raise ValueError(
                f"state_dict lacks {missing}; accepted: the output of SNOptPreconditioner."
                "state_dict() (keys 'steps', 'armed', 'layers')"
            )
        by_name = {a.name: a for a in self.adapters}
        unknown = set(state["layers"]) - set(by_name)
        if unknown:
            raise ValueError(
                f"state_dict has layers {sorted(unknown)} that this model lacks; this model's "
                f"layers are {sorted(by_name)}"
            )
        for name, e in state["layers"].items():
            d_out, d_in = by_name[name].param_matrix().shape
            want = {"UA": (d_in, d_in), "UB": (d_out, d_out), "m": (d_out, d_in)}
            for key, shape in want.items():
                got = tuple(e[key].shape) if key in e else None
                if got != shape:
                    raise ValueError(
                        f"state_dict layer {name!r}: {key} has shape {got}, this model's layer "
                        f"needs {shape}; was the state saved from a model with other widths?"
                    )

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` output; layer names and shapes must match this model's
        (checked first by :meth:`check_state_dict`: a mismatch changes nothing)."""
        self.check_state_dict(state)
        by_name = {a.name: a for a in self.adapters}
        eigen = {}
        for name, e in state["layers"].items():
            ref = by_name[name].params()[0]
            put = {k: v.to(device=ref.device, dtype=ref.dtype) for k, v in e.items()}
            eigen[by_name[name]] = _Eigen(
                put["UA"], put["UB"], put["m"], put.get("lamA"), put.get("lamB")
            )
        self._eigen, self.steps = eigen, int(state["steps"])
        self._set_armed(bool(state["armed"]))

    def remove_hooks(self) -> None:
        """Detach every hook this preconditioner put on the model."""
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._outer.remove()
        self._set_armed(False)


class SNOpt(torch.optim.Optimizer):
    """SNOpt (Alg. 1): the preconditioned gradient of eq. 14, then SGD with momentum.

    Args:
        model: module holding one or more snopt ``NeuralODE``s (see
            :class:`SNOptPreconditioner`); all its trainable parameters are optimized.
        lr: learning rate ``η > 0``.
        momentum: heavy-ball momentum in ``[0, 1)`` (default 0.9, as in the paper's runs).
        eps: as in :class:`SNOptPreconditioner`, and so are ``update_freq``, ``alpha``,
            ``full_precond``, ``grid_size``, ``weight_decay``, ``kl_clip`` (with this
            optimizer's ``lr``), ``process_group``, ``distribute_eigh`` and ``refresh``
            (keyword only). ``model`` may be wrapped in DDP.

    Per iteration: ``zero_grad()``, ``loss.backward()``, ``step()``; the curvature sampling
    of the backward passes is armed by the optimizer itself.
    """

    def __init__(
        self,
        model: nn.Module,
        lr: float,
        momentum: float = 0.9,
        eps: float = 0.05,
        update_freq: int = 100,
        alpha: float = 0.75,
        weight_decay: float = 0.0,
        full_precond: bool = False,
        grid_size: int = 100,
        kl_clip: float | None = None,
        process_group: Any = AUTO,
        distribute_eigh: bool = False,
        *,
        refresh: Refresh | str = Refresh.EXACT,
    ) -> None:
        _check_lr(lr)
        if not (isinstance(momentum, (int, float)) and 0.0 <= momentum < 1.0):
            raise ValueError(f"momentum={momentum!r} is invalid; accepted: a float in [0, 1)")
        if not isinstance(model, nn.Module):
            raise TypeError(f"model={type(model).__name__} must be a torch.nn.Module")
        _check_hyper(eps, update_freq, alpha, grid_size, weight_decay, kl_clip)
        parse_refresh(refresh)
        precond = SNOptPreconditioner(
            model,
            eps,
            update_freq,
            alpha,
            full_precond,
            grid_size,
            weight_decay,
            kl_clip,
            lr,
            process_group,
            distribute_eigh,
            refresh=refresh,
            _stacklevel=3,
        )
        super().__init__(precond.params, {"lr": lr, "momentum": momentum})
        self.preconditioner = precond

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.preconditioner.lr = self.param_groups[0]["lr"]
        if not self.preconditioner.step():
            return loss
        for group in self.param_groups:
            lr, mom = group["lr"], group["momentum"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                d = p.grad
                if mom:
                    buf = self.state[p].get("momentum_buffer")
                    if buf is None:
                        buf = self.state[p]["momentum_buffer"] = d.clone()
                    else:
                        buf.mul_(mom).add_(d)
                    d = buf
                p.add_(d, alpha=-lr)
        return loss

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["preconditioner"] = self.preconditioner.state_dict()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` output; every check runs before any state changes."""
        state_dict = dict(state_dict)
        if "preconditioner" not in state_dict:
            raise ValueError(
                "state_dict has no 'preconditioner' entry; accepted: the output of "
                "SNOpt.state_dict() (a plain torch optimizer's state lacks the curvature)"
            )
        precond = state_dict.pop("preconditioner")
        self.preconditioner.check_state_dict(precond)
        params = [p for group in self.param_groups for p in group["params"]]
        for index, entry in state_dict.get("state", {}).items():
            buf = entry.get("momentum_buffer") if isinstance(entry, dict) else None
            if not isinstance(index, int) or not 0 <= index < len(params):
                raise ValueError(
                    f"state_dict has state for parameter {index!r}; this optimizer has "
                    f"{len(params)} parameters"
                )
            if buf is not None and buf.shape != params[index].shape:
                raise ValueError(
                    f"state_dict's momentum buffer of parameter {index} has shape "
                    f"{tuple(buf.shape)}, the parameter {tuple(params[index].shape)}"
                )
        super().load_state_dict(state_dict)
        self.preconditioner.load_state_dict(precond)


def read_nfe(model: nn.Module, reset: bool = True) -> dict[str, int]:
    """Vector-field evaluations of the snopt ODEs in ``model`` since the last reset.

    Returns ``{"forward", "backward", "curvature"}``: forward-solve, backward-solve and
    curvature-node evaluations, summed over the model's snopt ODEs.
    """
    total = {"forward": 0, "backward": 0, "curvature": 0}
    for m in model.modules():
        if is_snopt_problem(m):
            nfe = sampler_of(m).nfe
            total["forward"] += nfe.forward
            total["backward"] += nfe.backward
            total["curvature"] += nfe.curvature
            if reset:
                nfe.reset()
    return total
