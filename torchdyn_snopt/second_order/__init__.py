"""Exact second-order derivatives of Neural ODEs (Theorem 1, Proposition 2) and the
recursive-adjoint baseline (§2, Table 1).

- :func:`hessian`: dense ``L_θθ`` (and ``Q_xx``, ``Q_xu`` at ``t0``) in one backward solve of
  the augmented system eq. 10; small models.
- :func:`hvp`: exact ``L_θθ v`` at ``O(M + n)`` memory, flat in the number of solver steps;
  any model size, any parameters upstream/downstream of the ODE.
- :func:`rank_r`, :func:`loss_factors`: Proposition 2's ``R`` vector ODEs (eq. 11, 12).
- :func:`recursive_adjoint_hessian`, :func:`recursive_adjoint_odeint`: ``grad(grad(L))``
  through repeated adjoint solves.
"""

from torchdyn_snopt.second_order.hvp import hvp
from torchdyn_snopt.second_order.rank_r import LowRank, loss_factors, rank_r
from torchdyn_snopt.second_order.recursive import (
    recursive_adjoint_hessian,
    recursive_adjoint_odeint,
)
from torchdyn_snopt.second_order.theorem1 import SecondOrder, dense_bytes, hessian

__all__ = [
    "LowRank",
    "SecondOrder",
    "dense_bytes",
    "hessian",
    "hvp",
    "loss_factors",
    "rank_r",
    "recursive_adjoint_hessian",
    "recursive_adjoint_odeint",
]
