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
bases, ``refresh="power"``) lives in :mod:`torchdyn_snopt.curvature.eigenbasis`; the per-layer
state and math in :mod:`torchdyn_snopt.layer_state`; where the factors come from in
:mod:`torchdyn_snopt.curvature.source`. :class:`SNOptPreconditioner` only orchestrates one
step: collect -> agree (across ranks) -> refresh -> precondition -> commit.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any, cast

import torch
import torch.nn as nn
from torch import Tensor
from torchdyn.core.problems import ODEProblem

from torchdyn_snopt import adjoint
from torchdyn_snopt._warn import warn
from torchdyn_snopt.cde import CurvatureTap
from torchdyn_snopt.config import Damping, Graft, PrecondConfig, StepConfig
from torchdyn_snopt.curvature.base import LayerAdapter
from torchdyn_snopt.curvature.capture import Recorder
from torchdyn_snopt.curvature.eigenbasis import (
    Eigenpairs,
    Refresh,
    pair_shape,
    refresh_eigh,
    settle,
    sketchable,
)
from torchdyn_snopt.curvature.eigenbasis import eigh_exact as _eigh  # noqa: F401 (old name)
from torchdyn_snopt.curvature.outer import OuterFactors
from torchdyn_snopt.curvature.registry import adapter_for
from torchdyn_snopt.curvature.sampler import CurvatureSampler
from torchdyn_snopt.curvature.source import (
    CurvatureRequest,
    CurvatureSource,
    Factors,
    IntegralSource,
    Probes,
    collect,
)
from torchdyn_snopt.distributed import AUTO, RankSync, unwrap
from torchdyn_snopt.layer_state import (
    Eigenbasis,
    LayerState,
    Step,
    eigen_from_factors,
    factor_pairs,
    priors,
    project,
    solve_in_eigenbasis,
)
from torchdyn_snopt.registration import SENSITIVITIES, is_snopt_problem

__all__ = [
    "SNOpt",
    "SNOptPreconditioner",
    "eigen_from_factors",
    "project",
    "read_nfe",
    "solve_in_eigenbasis",
]

_log = logging.getLogger(__name__)


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


#: The published configuration that :meth:`SNOpt.paper` applies (Alg. 1, eq. 14; the
#: released experiments' settings): fixed Tikhonov damping 0.05, no graft, heavy-ball momentum
#: 0.9, no warmup (and no cap on a graft's length), a fixed rate (no back-off, no spike
#: rejection), a refresh every 100 steps, the ODEs' layers only.
PAPER_RULE: Mapping[str, Any] = MappingProxyType(
    {
        "momentum": 0.9,
        "graft": Graft.NONE,
        "damping": Damping.FIXED,
        "eps": 0.05,
        "warmup": 0,
        "length_cap": None,
        "backoff": 0.0,
        "spike_ratio": None,
        "update_freq": 100,
        "full_precond": False,
    }
)


#: Lowest value of the back-off factor of the rate (``backoff``): the rate never falls below
#: ``lr / 100``.
BACKOFF_FLOOR = 1e-2
#: ``spike_ratio``'s rule: a rejected step multiplies the rate by ``SPIKE_CUT``, every
#: accepted one by ``SPIKE_RECOVERY`` (up to 1, so 14 accepted steps undo one cut); the
#: factor never falls below :data:`BACKOFF_FLOOR`.
SPIKE_CUT = 0.5
SPIKE_RECOVERY = 1.05
#: Per-parameter optimizer state that ``load_state_dict`` checks by shape, and which of it is
#: one number (0-d) rather than a tensor of the parameter's shape.
SHAPED_STATE = (
    "momentum_buffer",
    "exp_avg",
    "exp_avg_sq",
    "last_step",
    "shortest",
    "rate_factor",
    "spike_factor",
)
SCALAR_STATE = ("shortest", "rate_factor", "spike_factor")


def _probe(pair: Eigenpairs | None) -> Tensor | None:
    """A side's basis when its next refresh may come from a sketch (see ``sketchable``)."""
    return pair[1] if pair is not None and sketchable(pair) else None


def _all_finite(tensors: list[Tensor]) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in tensors)


class _Layers:
    """The adapted layers of a model, found once: per ODE (snopt problem or tap) its layers,
    and (``full_precond``) the layers outside the ODEs."""

    def __init__(self, model: nn.Module, full_precond: bool) -> None:
        self.problems = [m for m in model.modules() if is_snopt_problem(m)]
        self.taps = [m for m in model.modules() if isinstance(m, CurvatureTap)]  # cdeint
        # torchdyn is untyped: an ODEProblem's vf is its vector field module
        odes = [p for p in model.modules() if isinstance(p, ODEProblem)]
        fields = [cast(nn.Module, p.vf) for p in odes]
        #: names of the ODEs whose sensitivity samples no curvature (torchdyn's own)
        self.other = [n for n, p in model.named_modules() if p in odes and p not in self.problems]
        in_ode = {id(m) for f in fields + [t.func for t in self.taps] for m in f.modules()}
        names = {id(m): n for n, m in model.named_modules()}
        ode: dict[int, LayerAdapter] = {}
        self.per_ode: list[list[LayerAdapter]] = []
        for vf in [cast(nn.Module, p.vf) for p in self.problems] + [t.func for t in self.taps]:
            mine = []
            for module in vf.modules():
                if id(module) not in ode:
                    adapter = adapter_for(module, names.get(id(module), type(module).__name__))
                    if adapter is None:
                        continue
                    ode[id(module)] = adapter
                mine.append(ode[id(module)])
            self.per_ode.append(mine)
        self.ode = list(ode.values())
        self.outer: list[LayerAdapter] = []
        if full_precond:
            for name, module in model.named_modules():
                if id(module) not in in_ode:
                    adapter = adapter_for(module, name)
                    if adapter is not None:
                        self.outer.append(adapter)


class SNOptPreconditioner:
    """SNOpt's curvature, applied to the gradients before any torch optimizer.

    Every argument after ``model`` is keyword only; all are validated once, by
    :class:`~torchdyn_snopt.config.PrecondConfig`, before the model is touched.

    Args:
        model: module holding one or more ``NeuralODE``s with ``sensitivity`` in
            :data:`~torchdyn_snopt.SENSITIVITIES` and/or :class:`~torchdyn_snopt.CurvatureTap`
            wrappers of ``torchcde.cdeint`` functions (and, with ``full_precond``, other layers).
        eps: damping added to the curvature eigenvalues (default 0.1), read as ``damping``
            says. Raise it (0.3, 1) when training is unstable; lower it (0.03) for a more
            Newton-like direction.
        damping: ``"relative"`` (default, :attr:`~torchdyn_snopt.config.Damping.RELATIVE`):
            ``eps`` times the layer's mean curvature eigenvalue, so one value fits every
            layer and loss scale; ``"fixed"``: ``eps`` itself, the paper's Tikhonov damping in
            per-sample squared-gradient units (:mod:`torchdyn_snopt.curvature.sampler`).
        update_freq: steps between curvature refreshes (eigenbases recomputed), ``>= 1``
            (default 10; the paper's runs used 100, which refreshes too rarely for short runs).
        alpha: running-average weight of the eigenbasis second moment, in ``[0, 1)``.
        full_precond: also precondition adaptable layers outside the ODEs (encoders, heads)
            with K-FAC factors (default True).
        grid_size: points of the uniform time grid of eq. 13 (``>= 2``).
        weight_decay: ``γ``; adds ``γθ`` to the gradient and ``γ`` to the damping.
        kl_clip: trust region on the preconditioned step (None = off): the preconditioned
            gradients ``P`` are scaled by ``min(1, sqrt(kl_clip / (lr² Σ⟨P, G⟩)))``, so the
            step's predicted change of the Gauss-Newton model stays below ``kl_clip``.
        lr: learning rate of the optimizer that follows (only used by ``kl_clip``).
        process_group: ranks that share this curvature (:mod:`torchdyn_snopt.distributed`):
            ``"auto"`` (default, :attr:`~torchdyn_snopt.distributed.Group.AUTO`) =
            torch.distributed's default group whenever it is initialized
            with more than one process, ``None`` = never communicate, or a ``ProcessGroup``.
        distribute_eigh: with several processes, each rank eigendecomposes a share of the
            factors and the results are exchanged (default False: every rank decomposes all).
        refresh: how a refresh gets the eigenbases (a
            :class:`~torchdyn_snopt.curvature.eigenbasis.Refresh` or its string):
            ``"exact"`` (default) = ``torch.linalg.eigh`` of every factor; ``"power"`` = the
            same ``eigh`` for factors up to 512 wide (cheap there, and exact bases train
            best), while wider factors of dense layers that are numerically low-rank (at
            most 5 % of the trace outside the top 128 eigenvalues, as in MLP fields) keep a
            *thin* basis warm-started from the layer's previous one (one subspace-iteration
            step; ``eigh`` at a layer's first refresh, for heavier tails, and for every
            convolution, where thin bases train badly): the top 128 eigenpairs plus a tail
            value for the complement, applied as a Householder operator
            (:mod:`~torchdyn_snopt.layer_state`: O(n·128) per step, no ``n × n`` basis), and
            with one process their next refresh needs only a sketch ``[F Ω, diag F]`` sampled
            in the backward solve (a Nyström refresh, O(rows·n·128) per node instead of
            O(rows·n²)). Factors with low-rank rows always use their exact QR path; with
            several processes the warm start works the same way (every rank holds the same
            previous bases, complete factors are averaged), with or without
            ``distribute_eigh``.

    ``model`` may be wrapped in ``DistributedDataParallel``; the layers are found (and named)
    inside the wrapper. Under DDP the factors are averaged over ranks at every refresh and a
    non-finite gradient on any rank makes every rank skip the step.

    Call :meth:`step` after ``loss.backward()``: it rewrites ``.grad`` in place and returns
    ``False`` (changing nothing) when a gradient or a factor is not finite. After a refresh,
    :attr:`last_factors` maps each layer name to the ``Factors`` (``Ā``, ``B̄``) it used;
    :attr:`layers` maps each refreshed layer's adapter to its
    :class:`~torchdyn_snopt.layer_state.LayerState` (eigenbasis, second moment).
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        eps: float = 0.1,
        damping: Damping | str = Damping.RELATIVE,
        update_freq: int = 10,
        alpha: float = 0.75,
        full_precond: bool = True,
        grid_size: int = 100,
        weight_decay: float = 0.0,
        kl_clip: float | None = None,
        lr: float = 1.0,
        process_group: Any = AUTO,
        distribute_eigh: bool = False,
        refresh: Refresh | str = Refresh.EXACT,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model={type(model).__name__} must be a torch.nn.Module")
        config = PrecondConfig(
            eps=eps,
            damping=damping,
            update_freq=update_freq,
            alpha=alpha,
            full_precond=full_precond,
            grid_size=grid_size,
            weight_decay=weight_decay,
            kl_clip=kl_clip,
            lr=lr,
            process_group=process_group,
            distribute_eigh=distribute_eigh,
            refresh=refresh,
        )
        self._setup(model, config)

    @classmethod
    def _from_config(cls, model: nn.Module, config: PrecondConfig) -> SNOptPreconditioner:
        """A preconditioner for an already validated ``config`` (used by :class:`SNOpt`)."""
        self = cls.__new__(cls)
        self._setup(model, config)
        return self

    def _setup(self, model: nn.Module, config: PrecondConfig) -> None:
        """Find the layers, then (only if there are any) hook the model and bind the sources."""
        self.config = config
        self.sync = RankSync(config.process_group, config.distribute_eigh)
        model = unwrap(model)
        layers = _Layers(model, config.full_precond)
        if not layers.ode and layers.other:
            raise ValueError(
                f"model={type(model).__name__}'s NeuralODEs ({', '.join(layers.other)}) use a "
                f"sensitivity outside {SENSITIVITIES}, so SNOpt gets no curvature of their "
                "layers; build them with sensitivity='snopt'"
            )
        if not layers.ode and not layers.outer:
            raise ValueError(
                f"model={type(model).__name__} holds no NeuralODE with sensitivity in "
                f"{SENSITIVITIES} (nor a CurvatureTap) that has an adaptable layer"
                + ("" if config.full_precond else ", and full_precond=False")
                + "; build the NeuralODE with sensitivity='snopt' or pass full_precond=True"
            )
        # Validated: from here on the model is changed (hooks attached, requests bound).
        self.lr = config.lr
        self.adapters: list[LayerAdapter] = layers.ode + layers.outer
        self._recorder = Recorder(layers.ode)
        self._sources: list[CurvatureSource] = []
        owners: list[Any] = [*layers.problems, *layers.taps]
        for owner, mine in zip(owners, layers.per_ode):
            request = CurvatureRequest(mine, self._recorder, config.grid_size)
            if isinstance(owner, CurvatureTap):
                owner.sampler.bind(request)
                self._sources.append(owner.sampler)
            else:
                adjoint.bind_request(owner, request)
                self._sources.append(CurvatureSampler(request))
        self._sources.append(OuterFactors(layers.outer))
        self._passes = _PassCounter(self.adapters[0].params()[0])
        self.layers: dict[LayerAdapter, LayerState] = {}
        self.last_factors: dict[str, Factors] = {}
        self._device = self.adapters[0].params()[0].device  # where collectives' buffers live
        self.steps = 0
        self.covered = {id(p) for a in self.adapters for p in a.params()}
        self.params = [p for p in model.parameters() if p.requires_grad]
        uncovered = [
            n for n, p in model.named_parameters() if p.requires_grad and id(p) not in self.covered
        ]
        if uncovered:
            warn(
                "SNOpt has no Kronecker factors for these parameters; their gradient is left "
                "as it is (SNOpt with graft='adam' gives them Adam's step): "
                f"{', '.join(uncovered)}"
            )
        self._arm(True)

    # --- configuration (read only; see PrecondConfig) ---------------------------------------
    @property
    def eps(self) -> float:
        return self.config.eps

    @property
    def damping(self) -> Damping:
        return Damping(self.config.damping)

    @property
    def update_freq(self) -> int:
        return self.config.update_freq

    @property
    def alpha(self) -> float:
        return self.config.alpha

    @property
    def weight_decay(self) -> float:
        return self.config.weight_decay

    @property
    def kl_clip(self) -> float | None:
        return self.config.kl_clip

    @property
    def full_precond(self) -> bool:
        return self.config.full_precond

    @property
    def grid_size(self) -> int:
        return self.config.grid_size

    @property
    def refresh(self) -> Refresh:
        return Refresh(self.config.refresh)

    @property
    def _eigen(self) -> dict[LayerAdapter, Eigenbasis]:
        """Each layer's eigenbasis (read by ``bench/refresh_cost.py``)."""
        return {a: s.eigen for a, s in self.layers.items()}

    # --- arming ---------------------------------------------------------------------------
    @property
    def armed(self) -> bool:
        """Whether the next backward pass samples curvature."""
        return self._armed

    def _arm(self, armed: bool) -> None:
        self._armed = armed
        probes = self._probes() if armed else {}
        for source in self._sources:
            if isinstance(source, IntegralSource):
                source.request.probes = {
                    a: probes[a] for a in source.request.adapters if a in probes
                }
            source.arm(armed)

    def _probes(self) -> dict[LayerAdapter, Probes]:
        """The thin bases whose factors the ODE sources sketch until the next refresh
        (``refresh="power"``, one process: the ranks' all-reduce averages complete factors)."""
        if self.refresh is not Refresh.POWER or self.sync.world_size() > 1:
            return {}
        out = {}
        for a, state in self.layers.items():
            pair_a, pair_b = state.eigen.pairs()
            probes = (_probe(pair_a), _probe(pair_b))
            if probes != (None, None):
                out[a] = probes
        return out

    def _batch_size(self, adapter: LayerAdapter) -> int:
        sizes = [b for s in self._sources if (b := s.batch_size(adapter)) is not None]
        return max(sizes, default=1)

    # --- the update -----------------------------------------------------------------------
    @torch.no_grad()
    def step(self) -> bool:
        """Precondition every covered gradient in place (eq. 14); ``False`` = step skipped
        (a non-finite gradient, factor or result: nothing changed, with a warning)."""
        grads_ok = _all_finite([p.grad for p in self.params if p.grad is not None])
        factors = self._collect()
        bad, factors = self.sync.agree(grads_ok, factors, self.adapters, self._armed, self._device)
        if bad:
            world = self.sync.world_size()
            where = f" on {bad} of {world} ranks" if world > 1 else ""
            return self._skip(f"non-finite gradient{where}")
        fresh = self._refresh(factors)
        if fresh is None:
            return self._skip("non-finite curvature factor")
        layers = {**self.layers, **fresh}
        updates = self._precondition(layers)
        if not _all_finite([t for u in updates.values() for t in (u.P, u.m)]):
            return self._skip("non-finite preconditioned gradient")
        self._commit(layers, updates, factors if fresh else None)
        return True

    def _skip(self, why: str) -> bool:
        warn(f"{why}: SNOpt skipped this step")
        return False

    def _collect(self) -> dict[LayerAdapter, Factors]:
        """Factors sampled since arming (none when not armed), as one backward pass's; a
        skipped step drops them."""
        passes = max(self._passes.take(), 1)
        return collect(self._sources, passes) if self._armed else {}

    def _refresh(
        self, factors: dict[LayerAdapter, Factors]
    ) -> dict[LayerAdapter, LayerState] | None:
        """New eigenbases of the layers with fresh factors (None: a factor is not finite)."""
        if not self._armed:
            return {}
        if not _all_finite([t for f in factors.values() for t in (f.A, f.B)]):
            return None
        old = self.layers
        # refresh="power" leaves convolutions (LayerAdapter.thin_bases) to eigh
        refresh = {a: self.refresh if a.thin_bases else Refresh.EXACT for a in factors}
        if self.sync.world_size() == 1:  # one process: a low-rank Ā's rows are its own
            pairs = [
                p
                for a, f in factors.items()
                for p in factor_pairs(f, refresh[a], old[a].eigen if a in old else None)
            ]
        else:  # factors averaged over ranks (no rows), decompositions maybe shared out
            matrices = [m for f in factors.values() for m in (f.A, f.B)]
            modes = [refresh[a] for a in factors for _ in range(2)]
            prior = [p for a in factors for p in priors(old[a].eigen if a in old else None)]
            pairs = self.sync.eigh(
                matrices,
                lambda m, job: refresh_eigh(m, job[0], job[1], settled=False),
                priors=list(zip(prior, modes)),
                shapes=[pair_shape(m.shape[0], r, p) for m, p, r in zip(matrices, prior, modes)],
            )
            # the same pairs on every rank: the same cut
            pairs = [settle(p, r) for p, r in zip(pairs, modes)]
        fresh = {}
        for i, (a, f) in enumerate(factors.items()):
            eigen = Eigenbasis.from_pairs(f, pairs[2 * i], pairs[2 * i + 1])
            fresh[a] = old[a].refreshed(eigen) if a in old else LayerState(a, eigen)
        _log.debug("refresh at step %d: %d layers", self.steps, len(fresh))
        return fresh

    def _precondition(self, layers: dict[LayerAdapter, LayerState]) -> dict[LayerAdapter, Step]:
        """Each layer's preconditioned gradient (eq. 14), scaled by ``kl_clip`` when set."""
        config, world = self.config, self.sync.world_size()
        steps: dict[LayerAdapter, Step] = {}
        vg: Tensor | None = None  # Σ ⟨P, G⟩ over the updated layers
        for adapter, state in layers.items():
            if not adapter.has_grad():
                continue
            batch = self._batch_size(adapter) * world  # DDP's gradient: the global batch's
            step = state.propose(batch, config.alpha, config.eps, config.weight_decay, self.damping)
            steps[adapter] = step
            vg = (step.P * step.G).sum() if vg is None else vg + (step.P * step.G).sum()
        if config.kl_clip is not None and vg is not None:  # vg is None iff steps is empty
            nu = torch.clamp(torch.sqrt(config.kl_clip / (self.lr**2 * vg.abs() + 1e-30)), max=1.0)
            for step in steps.values():
                step.P = step.P * nu
        return steps

    def _commit(
        self,
        layers: dict[LayerAdapter, LayerState],
        steps: dict[LayerAdapter, Step],
        refreshed: dict[LayerAdapter, Factors] | None,
    ) -> None:
        """Everything is finite: keep the new state, write the gradients, re-arm when due."""
        self.layers = layers
        for adapter, step in steps.items():
            layers[adapter].commit(step)
        if self.config.weight_decay:
            for p in self.params:
                if p.grad is not None and id(p) not in self.covered:
                    p.grad.add_(p, alpha=self.config.weight_decay)
        if refreshed is not None:
            self.last_factors = {a.name: f for a, f in refreshed.items()}
            self._arm(False)
        self.steps += 1
        if self.steps % self.config.update_freq == 0:
            self._arm(True)

    # --- persistence ----------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Step count, arming and each layer's eigenbasis (with its eigenvalues, the warm
        start of ``refresh="power"``) and second moment, by layer name."""
        return {
            "steps": self.steps,
            "armed": self._armed,
            "layers": {
                a.name: {
                    k: getattr(s.eigen, k).clone()
                    for k in ("UA", "UB", "m", "lamA", "lamB")
                    if getattr(s.eigen, k) is not None
                }
                for a, s in self.layers.items()
            },
        }

    def check_state_dict(self, state: Any) -> None:
        """Raise ``ValueError`` naming what in ``state`` does not fit this model (changes nothing).

        Checks the keys of :meth:`state_dict`'s output, that every layer exists here, and that
        its eigenbases ``UA`` (``d_in × d_in``), ``UB`` (``d_out × d_out``) and second moment
        ``m`` (``d_out × d_in``) have this layer's shapes (a basis may be thin, ``d × k``: see
        :mod:`torchdyn_snopt.layer_state`).
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
            for key, d in (("UA", d_in), ("UB", d_out)):
                got = tuple(e[key].shape) if key in e else None
                if got is None or len(got) != 2 or got[0] != d or not 1 <= got[1] <= d:
                    raise ValueError(
                        f"state_dict layer {name!r}: {key} has shape {got}, this model's layer "
                        f"needs ({d}, {d}) (or ({d}, k), k < {d}, from a thin refresh); was the "
                        "state saved from a model with other widths?"
                    )
            got = tuple(e["m"].shape) if "m" in e else None
            if got != (d_out, d_in):
                raise ValueError(
                    f"state_dict layer {name!r}: m has shape {got}, this model's layer needs "
                    f"{(d_out, d_in)}; was the state saved from a model with other widths?"
                )

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` output; layer names and shapes must match this model's
        (checked first by :meth:`check_state_dict`: a mismatch changes nothing)."""
        self.check_state_dict(state)
        by_name = {a.name: a for a in self.adapters}
        layers = {}
        for name, e in state["layers"].items():
            adapter = by_name[name]
            ref = adapter.params()[0]
            put = {k: v.to(device=ref.device, dtype=ref.dtype) for k, v in e.items()}
            eigen = Eigenbasis(put["UA"], put["UB"], put["m"], put.get("lamA"), put.get("lamB"))
            layers[adapter] = LayerState(adapter, eigen)
        self.layers, self.steps = layers, int(state["steps"])
        self._arm(bool(state["armed"]))

    def remove_hooks(self) -> None:
        """Detach every hook this preconditioner put on the model."""
        self._recorder.remove()
        self._passes.handle.remove()
        for source in self._sources:
            source.remove()
        self._arm(False)


class SNOpt(torch.optim.Optimizer):
    """SNOpt (Alg. 1): SNOpt's preconditioned direction (eq. 14), each layer stepped by the
    length of Adam's step (the default) or by ``lr`` (the paper's rule).

    ``tds.SNOpt(model)`` needs nothing else. Each step: the preconditioner turns every covered
    layer's gradient ``G`` into ``P`` (eq. 14, relative damping); with ``graft="adam"`` the
    layer (weight and bias together) then moves by ``−lr·‖u‖/‖d‖·d``, where ``d`` is ``P`` (or
    its heavy-ball average with ``momentum``) and ``u = m̂/(√v̂ + graft_eps)`` is Adam's step
    on the raw gradient (bias-corrected moments with ``betas``), ``‖u‖`` capped at
    ``length_cap`` times the layer's shortest since the warmup. SNOpt picks the direction,
    Adam's statistics the length, so ``lr`` means what it means for Adam. Parameters without
    Kronecker factors take Adam's step (length capped alike). With ``graft="none"``:
    ``p ← p − lr·d`` (Alg. 1).

    Args:
        model: module holding one or more snopt ``NeuralODE``s (see
            :class:`SNOptPreconditioner`); all its trainable parameters are optimized.
        lr: learning rate ``η > 0`` (default 0.05). With the graft, as for Adam; lower it
            (0.02, 0.01) if the loss spikes or the adaptive solver needs many more steps.
        momentum: heavy-ball momentum on ``P`` in ``[0, 1)`` (default 0: with the graft,
            Adam's moments already average; the paper's runs used 0.9 without it).
        graft: ``"adam"`` (default) or ``"none"`` (:class:`~torchdyn_snopt.config.Graft`).
        betas: Adam's ``(β1, β2)`` of the graft (default ``(0.9, 0.95)``: ``v̂`` follows the
            last ~20 gradients, so the length does not shrink with the first ones). With
            ``(0.9, 0.999)`` the length shrinks as the run goes on: steadier late in long
            minibatch runs, slower to converge.
        graft_eps: Adam's ``ε`` of the graft (default 1e-8; rarely changed).
        warmup: steps over which the rate ramps up linearly, ``lr·min(1, k/warmup)`` at the
            ``k``-th committed step, ``k = 1, 2, …`` (default 5; 0: none, as in :meth:`paper`).
            The first steps are the longest relative to the weights (Adam's normalised step
            is about ``lr`` per entry), and a field they make stiff stays stiff: raise it
            (10) if the adaptive solver's steps climb in the first iterations.
        length_cap: with the graft, each layer's Adam length ``‖u‖`` (its step length
            before ``lr``, so a rate schedule does not move the cap) may not exceed
            ``length_cap`` times the shortest it has been since the warmup (default 2.0;
            None: off). Adam's ``‖u‖`` shrinks while a run converges and grows again when
            the gradients outgrow their history (heavy-tailed noise, a sharpening loss),
            which is where late loss spikes come from; the cap keeps the step from growing
            back. Turn it off (None) or raise it (5) if a run should speed up again after a
            plateau, e.g. when the loss's scale changes during training.
        backoff: ``β >= 0`` of the rate's back-off (default 0.1; 0: off). After the warmup the rate
            is ``lr·f``, updated before each step as ``f ← min(1, max(0.01, f·exp(−β·c)))``,
            ``c = cos(g, Δ)`` between the new raw gradient ``g`` and the last step ``Δ`` (a
            hypergradient rule on the rate, Baydin et al. 2018, kept at or below ``lr``): when
            the new gradient opposes the last step (``c > 0``: it overshot) the rate shrinks,
            when it agrees the rate recovers towards ``lr``: late in a run, where the loss
            stops falling and jumps between evaluations, the steps shrink. Raise it to 0.2
            (0.5) if the loss still jumps late; 0 gives a fixed rate. Costs one stored step
            per parameter.
        spike_ratio: with the graft, a raw gradient ``g`` longer than ``spike_ratio`` times
            the length Adam's second moment expects (``‖g‖² > spike_ratio²·Σv̂``, over all
            parameters) says the last step overshot into a steeper region: that step is
            undone, none is taken, and the rate is halved; each accepted step then raises it
            by 5% until it is back at ``lr`` (default 8.0; None: off). A rate several times too
            high then costs a few rejected steps instead of a field made stiff for the rest of
            the run. Lower it (4) if the loss still jumps; turn it off if the gradients are
            heavy-tailed by design (each rejection costs an iteration). Costs one stored step
            per parameter and one sum per parameter.
        eps: damping (default 0.1), with ``damping`` (default ``"relative"``): see
            :class:`SNOptPreconditioner`, as for ``update_freq`` (default 10), ``alpha``,
            ``full_precond`` (default True), ``grid_size``, ``weight_decay``, ``kl_clip``
            (only with ``graft="none"``; with this optimizer's ``lr``), ``process_group``,
            ``distribute_eigh`` and ``refresh``.

    Everything after ``lr`` is keyword only. ``model`` may be wrapped in DDP. The paper's
    configuration (fixed damping 0.05, no graft, momentum 0.9, no warmup or back-off, a
    refresh every 100 steps, ODE layers only) is :meth:`paper`. Per iteration:
    ``zero_grad()``, ``loss.backward()``, ``step()`` (a closure, as Lightning passes, works
    too); the curvature sampling of the backward passes is armed by the optimizer itself.
    """

    def __init__(
        self,
        model: nn.Module,
        lr: float = 0.05,
        *,
        momentum: float = 0.0,
        graft: Graft | str = Graft.ADAM,
        betas: tuple[float, float] = (0.9, 0.95),
        graft_eps: float = 1e-8,
        warmup: int = 5,
        length_cap: float | None = 2.0,
        backoff: float = 0.1,
        spike_ratio: float | None = 8.0,
        eps: float = 0.1,
        damping: Damping | str = Damping.RELATIVE,
        update_freq: int = 10,
        alpha: float = 0.75,
        weight_decay: float = 0.0,
        full_precond: bool = True,
        grid_size: int = 100,
        kl_clip: float | None = None,
        process_group: Any = AUTO,
        distribute_eigh: bool = False,
        refresh: Refresh | str = Refresh.EXACT,
    ) -> None:
        settings = StepConfig(
            lr=lr,
            momentum=momentum,
            graft=graft,
            betas=betas,
            graft_eps=graft_eps,
            warmup=warmup,
            length_cap=length_cap,
            backoff=backoff,
            spike_ratio=spike_ratio,
        )
        config = PrecondConfig(
            eps=eps,
            damping=damping,
            update_freq=update_freq,
            alpha=alpha,
            full_precond=full_precond,
            grid_size=grid_size,
            weight_decay=weight_decay,
            kl_clip=kl_clip,
            lr=lr,
            process_group=process_group,
            distribute_eigh=distribute_eigh,
            refresh=refresh,
        )
        if kl_clip is not None and settings.graft is Graft.ADAM:
            raise ValueError(
                f"kl_clip={kl_clip!r} only acts with graft='none' (the graft sets each "
                "layer's step length); pass graft='none' or leave kl_clip=None"
            )
        if not isinstance(model, nn.Module):
            raise TypeError(f"model={type(model).__name__} must be a torch.nn.Module")
        precond = SNOptPreconditioner._from_config(model, config)
        super().__init__(precond.params, {"lr": lr, "momentum": momentum})
        self.preconditioner = precond
        self.settings = settings
        trained = {id(p) for p in precond.params}
        #: the graft's layers: each adapter's parameters together (covered), then every
        #: other trained parameter alone (uncovered: Adam's step)
        self._layers: list[list[Tensor]] = [
            [p for p in a.params() if id(p) in trained] for a in precond.adapters
        ]
        self._uncovered = [p for p in precond.params if id(p) not in precond.covered]

    @classmethod
    def paper(cls, model: nn.Module, lr: float, **overrides: Any) -> SNOpt:
        """SNOpt as published (Alg. 1, eq. 14; the released experiments' settings): fixed
        Tikhonov damping ``eps=0.05``, no graft (``p ← p − lr·d``), heavy-ball momentum 0.9,
        no warmup or back-off, a curvature refresh every 100 steps, the ODEs' layers only.
        ``overrides``: any other keyword of :class:`SNOpt`, replacing these."""
        return cls(model, lr, **{**PAPER_RULE, **overrides})

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.preconditioner.lr = self.param_groups[0]["lr"]
        grafted = self.settings.graft is Graft.ADAM
        wd = self.preconditioner.weight_decay
        raw = {}  # the raw gradients (with coupled weight decay), before eq. 14 rewrites them
        if grafted or self.settings.backoff:
            for p in self._with_grad():
                g = cast(Tensor, p.grad)
                raw[p] = g + wd * p if wd else g.clone()
        factor = self._next_factor(raw)
        spiked = self._spiked(raw)
        if not self.preconditioner.step():
            return loss
        spike = self._next_spike_factor(spiked)
        owner = self.state[self._owner]
        if spike is not None:
            owner["spike_factor"] = spike
        if spiked and self._undo():
            _log.debug("gradient spike: the last step was undone and none taken")
            return loss
        if factor is not None:
            owner["rate_factor"] = factor
        if spike is not None:
            factor = spike if factor is None else factor * spike
        if factor is not None:
            for p in self.preconditioner.params:  # no gradient: it does not move this step
                if p not in raw:
                    self.state[p].pop("last_step", None)
        if grafted:
            self._grafted(raw, factor)
        else:
            self._heavy_ball(factor)
        return loss

    @property
    def _owner(self) -> Tensor:
        """The parameter whose state holds the optimizer-wide ``rate_factor``."""
        return cast(Tensor, self.param_groups[0]["params"][0])

    def _next_factor(self, raw: dict[Tensor, Tensor]) -> Tensor | None:
        """The back-off factor ``f`` of the step about to be taken (see ``backoff``): the
        stored one (1 at first) times ``exp(−β·cos(g, Δ))`` over all parameters with a stored
        last step ``Δ``, clamped to ``[BACKOFF_FLOOR, 1]``; unchanged inside the warmup or
        without a last step. None when ``backoff`` is 0."""
        beta = self.settings.backoff
        if not beta:
            return None
        owner = self._owner
        factor = self.state[owner].get("rate_factor")
        if factor is None:
            factor = torch.ones((), dtype=owner.dtype, device=owner.device)
        if self.preconditioner.steps < self.settings.warmup:  # this step is inside the warmup
            return factor
        pairs = [(g, self.state[p]["last_step"]) for p, g in raw.items()
                 if "last_step" in self.state[p]]  # fmt: skip
        if not pairs:
            return factor
        dot = torch.stack([(g * d).sum() for g, d in pairs]).sum()
        g_norm = torch.stack([g.square().sum() for g, _ in pairs]).sum().sqrt()
        d_norm = torch.stack([d.square().sum() for _, d in pairs]).sum().sqrt()
        if not bool(g_norm > 0 and d_norm > 0):
            return factor
        cos = (dot / (g_norm * d_norm)).to(factor)
        return (factor * torch.exp(-beta * cos)).clamp(BACKOFF_FLOOR, 1.0)

    @property
    def _spike_rule(self) -> bool:
        """Whether ``spike_ratio``'s rule acts: set, and with the graft (Adam's ``v̂``)."""
        return self.settings.spike_ratio is not None and self.settings.graft is Graft.ADAM

    def _spiked(self, raw: dict[Tensor, Tensor]) -> bool:
        """Whether the raw gradients are a spike (see ``spike_ratio``): ``Σ‖g‖² >
        spike_ratio²·Σv̂`` over the parameters with Adam moments, ``v̂`` the bias-corrected
        second moment before this step. False when the rule is off, without the graft, or
        before any moment exists."""
        ratio = self.settings.spike_ratio
        if ratio is None or not self._spike_rule:
            return False
        beta2 = self.settings.betas[1]
        sums, expected = [], []
        for p, g in raw.items():
            state = self.state[p]
            if "exp_avg_sq" in state:
                sums.append(g.square().sum())
                expected.append(state["exp_avg_sq"].sum() / (1 - beta2 ** state["step"]))
        if not sums:
            return False
        total, baseline = torch.stack(sums).sum(), torch.stack(expected).sum()
        return bool(baseline > 0 and total > ratio**2 * baseline)

    def _next_spike_factor(self, spiked: bool) -> Tensor | None:
        """The spike factor of this step: the stored one (1 at first) times
        :data:`SPIKE_CUT` after a spike, else times :data:`SPIKE_RECOVERY`, within
        ``[BACKOFF_FLOOR, 1]``. None when the rule is off or without the graft."""
        if not self._spike_rule:
            return None
        owner = self._owner
        factor = self.state[owner].get("spike_factor")
        if factor is None:
            factor = torch.ones((), dtype=owner.dtype, device=owner.device)
        if spiked:
            return (factor * SPIKE_CUT).clamp(BACKOFF_FLOOR, 1.0)
        return (factor * SPIKE_RECOVERY).clamp(BACKOFF_FLOOR, 1.0)

    def _undo(self) -> bool:
        """Take back the last step of every parameter that keeps one (``p ← p − Δ``) and
        forget it; False (nothing changed) when none does, e.g. right after an undo."""
        moved = [p for p in self.preconditioner.params if "last_step" in self.state[p]]
        for p in moved:
            p.sub_(self.state[p].pop("last_step"))
        return bool(moved)

    def _move(self, p: Tensor, delta: Tensor, factor: Tensor | None) -> None:
        """``p ← p − factor·delta`` (``delta`` already holds the rate); with the back-off on,
        the step taken is kept as ``state[p]["last_step"]``."""
        if factor is None:
            p.sub_(delta)
            return
        step = delta * factor
        p.sub_(step)
        self.state[p]["last_step"] = step.neg_()

    def _with_grad(self) -> list[Tensor]:
        return [p for group in self.param_groups for p in group["params"] if p.grad is not None]

    def _ramp(self) -> float:
        """The warmup's factor of the rate, ``min(1, k / warmup)``, called once the
        preconditioner has committed the ``k``-th step."""
        warmup = self.settings.warmup
        return min(1.0, self.preconditioner.steps / warmup) if warmup else 1.0

    def _heavy_ball(self, factor: Tensor | None) -> None:
        """Alg. 1: ``buf ← μ·buf + d`` (``buf = d`` at first), ``p ← p − lr·buf`` (times the
        back-off ``factor`` when on)."""
        ramp = self._ramp()
        for group in self.param_groups:
            lr, mom = group["lr"] * ramp, group["momentum"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                if factor is None:
                    p.add_(self._direction(p, mom), alpha=-lr)
                else:
                    self._move(p, lr * self._direction(p, mom), factor)

    def _direction(self, p: Tensor, mom: float) -> Tensor:
        """``p``'s preconditioned gradient, or its heavy-ball average with ``mom``."""
        d = cast(Tensor, p.grad)
        if not mom:
            return d
        buf = self.state[p].get("momentum_buffer")
        if buf is None:
            buf = self.state[p]["momentum_buffer"] = d.clone()
        else:
            buf.mul_(mom).add_(d)
        return buf

    def _adam(self, p: Tensor, g: Tensor) -> Tensor:
        """Update ``p``'s Adam moments with the raw gradient ``g``; Adam's step direction
        ``m̂/(√v̂ + ε)`` (bias corrected)."""
        (b1, b2), state = self.settings.betas, self.state[p]
        if "exp_avg" not in state:
            state["step"] = 0
            state["exp_avg"] = torch.zeros_like(p)
            state["exp_avg_sq"] = torch.zeros_like(p)
        state["step"] += 1
        t = state["step"]
        state["exp_avg"].mul_(b1).add_(g, alpha=1 - b1)
        state["exp_avg_sq"].mul_(b2).addcmul_(g, g, value=1 - b2)
        denom = (state["exp_avg_sq"] / (1 - b2**t)).sqrt_().add_(self.settings.graft_eps)
        return state["exp_avg"] / (1 - b1**t) / denom

    def _capped(self, owner: Tensor, norm: Tensor) -> Tensor:
        """Adam's step length ``norm`` (0-d) of the layer whose first parameter is ``owner``,
        at most ``length_cap`` times the shortest nonzero length of that layer since the
        warmup; the shortest is kept in ``state[owner]["shortest"]`` (inf before any)."""
        cap = self.settings.length_cap
        if cap is None or self.preconditioner.steps <= self.settings.warmup:
            return norm
        state = self.state[owner]
        shortest = state.get("shortest")
        if shortest is None:
            shortest = torch.full_like(norm, torch.inf)
        shortest = torch.where(norm > 0, torch.minimum(shortest, norm), shortest)
        state["shortest"] = shortest
        return torch.minimum(norm, cap * shortest)

    def _grafted(self, raw: dict[Tensor, Tensor], factor: Tensor | None) -> None:
        """Each covered layer along its (momentum-averaged) ``P`` with the length of Adam's
        step; uncovered parameters by Adam's step itself; lengths capped by ``length_cap``;
        the rate times the back-off ``factor`` when on."""
        lr, mom = self.param_groups[0]["lr"] * self._ramp(), self.param_groups[0]["momentum"]
        for layer in self._layers:
            params = [p for p in layer if p in raw]
            if not params:
                continue
            u = [self._adam(p, raw[p]) for p in params]
            d = [self._direction(p, mom) for p in params]
            u_norm = torch.stack([x.square().sum() for x in u]).sum().sqrt()
            u_norm = self._capped(layer[0], u_norm)
            d_norm = torch.stack([x.square().sum() for x in d]).sum().sqrt()
            scale = torch.where(d_norm > 0, u_norm / d_norm, torch.zeros_like(d_norm))
            for p, x in zip(params, d):
                self._move(p, lr * scale * x, factor)
        for p in self._uncovered:
            if p in raw:
                adam = self._adam(p, raw[p])
                if self.settings.length_cap is not None:
                    norm = adam.norm()
                    capped = self._capped(p, norm)
                    adam = adam * torch.where(norm > 0, capped / norm, torch.ones_like(norm))
                self._move(p, lr * adam, factor)

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
            if not isinstance(index, int) or not 0 <= index < len(params):
                raise ValueError(
                    f"state_dict has state for parameter {index!r}; this optimizer has "
                    f"{len(params)} parameters"
                )
            for key in SHAPED_STATE:
                buf = entry.get(key) if isinstance(entry, dict) else None
                want = torch.Size() if key in SCALAR_STATE else params[index].shape
                if buf is not None and buf.shape != want:
                    raise ValueError(
                        f"state_dict's {key} of parameter {index} has shape "
                        f"{tuple(buf.shape)}; accepted: {tuple(want)}"
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
            nfe = adjoint.record_of(m).nfe
            total["forward"] += nfe.forward
            total["backward"] += nfe.backward
            total["curvature"] += nfe.curvature
            if reset:
                nfe.reset()
    return total
