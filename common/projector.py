"""Project a target gradient onto a feasible set spanned by general-data gradients.

This is the math of the data-regularization projector (docs/design.md section 5): given the
target gradient g_T and general per-sample gradients g_1..g_n, every feasible set is
solved from the Gram matrix K of [g_T, g_1..g_n] alone, and the answer is a combination
d = b * g_T + sum_i a_i * g_i. `solve_coefficients(gram, feasible)` returns (b, a) and is
what `common.regularizer` calls per parameter group; `project(target, general, feasible)`
does the same on flat tensors and is the reference the efficient paths are tested against.

| feasible    | update d                                               | solver            |
|-------------|--------------------------------------------------------|-------------------|
| `none`      | g_T                                                    | -                 |
| `mean`      | mean of g_i                                            | -                 |
| `subset`    | mean of the top ceil(fraction * n) g_i by <g_i, g_T>   | sort (stable)     |
| `hull`      | closest point of conv{g_i} to g_T                      | active set, sum=1 |
| `cone`      | closest point of {sum a_i g_i, a >= 0} to g_T          | active set (NNLS) |
| `span`      | orthogonal projection of g_T onto span{g_i}            | least squares     |
| `halfspace` | closest d to g_T with <d, g_i> >= 0 for all i (GEM)    | dual NNLS         |
| `filter`    | mean of the g_i with <g_i, g_T> > 0 (Dr. Post-Training) | sign test         |

All solvers work in float64 on the (n+1)x(n+1) Gram matrix and reach KKT residuals of
about 1e-10 relative to the scale of K; singular K (duplicates, n > d, zero gradients) is
handled with least-squares steps, because the closest point is unique even where the
coefficients are not.

Degenerate input, defined answers: n = 0 gives g_T for `none` and `halfspace`, 0 for
`cone` and `span`, and a ValueError for `mean`, `subset` and `hull` (an empty set has no
mean or closest point). `filter` with no g_i agreeing with g_T gives d = 0: no general
sample supports the target's direction, so the step is skipped rather than pushed against
the general data. Zero gradients are allowed (K = 0 gives d = 0 or g_T as the
table says; `subset` ties keep the lower index). Non-finite input raises ValueError.
"""

from __future__ import annotations

import math
from typing import Literal, get_args

import numpy as np
import torch

Feasible = Literal["none", "mean", "subset", "hull", "cone", "span", "halfspace", "filter"]
FEASIBLE_SETS: tuple[str, ...] = get_args(Feasible)


def subset_size(n: int, fraction: float) -> int:
    """How many general samples `subset` keeps: ceil(fraction * n), at least 1."""
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"subset fraction must be in (0, 1], got {fraction}")
    return max(1, min(n, math.ceil(fraction * n - 1e-9)))


def solve_coefficients(
    gram: torch.Tensor | np.ndarray, feasible: str, fraction: float = 0.5
) -> tuple[float, np.ndarray]:
    """(b, a) with d = b * g_T + sum_i a_i g_i, from the Gram matrix of [g_T, g_1..g_n].

    `gram` is (n+1)x(n+1), symmetric positive semi-definite, row/column 0 the target.
    """
    K = torch.as_tensor(gram).detach().to("cpu", torch.float64).numpy() if isinstance(
        gram, torch.Tensor
    ) else np.asarray(gram, dtype=np.float64)
    if K.ndim != 2 or K.shape[0] != K.shape[1] or K.shape[0] < 1:
        raise ValueError(f"gram must be a square (n+1)x(n+1) matrix, got shape {K.shape}")
    if not np.all(np.isfinite(K)):
        raise ValueError("gram matrix holds NaN or inf: a gradient is not finite")
    if feasible not in FEASIBLE_SETS:
        raise ValueError(f"unknown feasible set {feasible!r}; expected one of {FEASIBLE_SETS}")
    K = 0.5 * (K + K.T)
    n = K.shape[0] - 1
    Kg, kt = K[1:, 1:], K[1:, 0]
    zeros = np.zeros(n)
    if feasible == "none":
        return 1.0, zeros
    if n == 0:
        if feasible in ("cone", "span"):
            return 0.0, zeros
        if feasible == "halfspace":
            return 1.0, zeros
        if feasible == "filter":
            return 0.0, zeros
        raise ValueError(f"feasible set {feasible!r} needs at least one general gradient (n = 0)")
    if feasible == "mean":
        return 0.0, np.full(n, 1.0 / n)
    if feasible == "subset":
        k = subset_size(n, fraction)
        order = np.argsort(-kt, kind="stable")[:k]
        a = zeros.copy()
        a[order] = 1.0 / k
        return 0.0, a
    if feasible == "filter":
        keep = kt > 0
        a = zeros.copy()
        if keep.any():
            a[keep] = 1.0 / keep.sum()
        return 0.0, a
    if feasible == "span":
        return 0.0, _lstsq(Kg, kt)
    if feasible == "cone":
        return 0.0, _active_set_qp(Kg, kt, simplex=False)
    if feasible == "hull":
        return 0.0, _active_set_qp(Kg, kt, simplex=True)
    # halfspace: d = g_T + G^T lam with lam = argmin_{lam >= 0} 1/2 lam'K lam + lam'(G g_T)
    return 1.0, _active_set_qp(Kg, -kt, simplex=False)


def project(
    target: torch.Tensor, general: torch.Tensor, feasible: str, fraction: float = 0.5
) -> torch.Tensor:
    """The projected update for flat `target` (d,) and `general` (n, d); float64 inside."""
    if target.ndim != 1:
        raise ValueError(f"target must be a flat (d,) tensor, got shape {tuple(target.shape)}")
    if general.ndim != 2 or general.shape[1] != target.shape[0]:
        raise ValueError(
            f"general must be (n, d) with d = {target.shape[0]}, got shape {tuple(general.shape)}"
        )
    rows = torch.cat([target[None], general]).to(torch.float64)
    if not torch.isfinite(rows).all():
        raise ValueError("target or general gradients hold NaN or inf")
    b, a = solve_coefficients(rows @ rows.T, feasible, fraction)
    coef = torch.as_tensor(np.concatenate([[b], a]), dtype=torch.float64)
    return (coef @ rows).to(target.dtype)


def _tolerance(K: np.ndarray, c: np.ndarray) -> float:
    scale = max(float(np.abs(K).max(initial=0.0)), float(np.abs(c).max(initial=0.0)))
    return 1e-12 * scale if scale > 0 else 0.0


def _lstsq(K: np.ndarray, c: np.ndarray) -> np.ndarray:
    """Minimum-norm solution of K x = c (consistent when c is in range(K), as here)."""
    if K.size == 0:
        return np.zeros(0)
    scale = np.abs(K).max(initial=0.0)
    if scale == 0:
        return np.zeros_like(c)
    return np.linalg.lstsq(K, c, rcond=1e-13)[0]


def _active_set_qp(K: np.ndarray, c: np.ndarray, simplex: bool) -> np.ndarray:
    """argmin_a 1/2 a'Ka - c'a subject to a >= 0 (and sum(a) = 1 when `simplex`).

    Primal active-set method (Nocedal & Wright, 16.3) started at a feasible vertex; each
    subproblem is an equality-constrained least-squares solve on the free set, so a
    singular K is fine when c lies in range(K) (true for Gram systems).
    """
    n = len(c)
    tol = _tolerance(K, c)
    if simplex:
        start = int(np.argmin(0.5 * np.diag(K) - c))
        a = np.zeros(n)
        a[start] = 1.0
        free = np.zeros(n, dtype=bool)
        free[start] = True
    else:
        a = np.zeros(n)
        free = np.zeros(n, dtype=bool)
    for _ in range(50 * (n + 1)):
        step = _free_step(K, K @ a - c, free, simplex)
        if np.abs(step).max(initial=0.0) > 1e-10 * max(1.0, np.abs(a).max(initial=0.0)):
            shrinking = (step < 0) & free
            alpha, blocking = 1.0, -1
            if shrinking.any():
                ratios = -a[shrinking] / step[shrinking]
                j = int(np.argmin(ratios))
                if ratios[j] < 1.0:
                    alpha, blocking = float(ratios[j]), int(np.flatnonzero(shrinking)[j])
            a = np.maximum(a + alpha * step, 0.0)
            if blocking >= 0:  # a bound became active: solve again on the smaller free set
                a[blocking] = 0.0
                free[blocking] = False
                if simplex:
                    a = a / a.sum()
                continue
            if simplex:
                a = a / a.sum()
        # minimiser on the free set: check the multipliers of the bounds a_i >= 0
        grad = K @ a - c
        nu = -grad[free].mean() if (simplex and free.any()) else 0.0
        lam = grad + nu
        lam[free] = np.inf
        worst = int(np.argmin(lam))
        if lam[worst] >= -tol:
            return _polish(K, c, a, free, simplex)
        free[worst] = True
    raise RuntimeError(f"active-set QP did not converge in {50 * (n + 1)} iterations (n = {n})")


def _free_step(K: np.ndarray, grad: np.ndarray, free: np.ndarray, simplex: bool) -> np.ndarray:
    """Newton step p on the free set: min 1/2 p'Kp + grad'p, p = 0 off it, (sum p = 0)."""
    step = np.zeros_like(grad)
    idx = np.flatnonzero(free)
    if idx.size == 0:
        return step
    Kff = K[np.ix_(idx, idx)]
    if simplex:
        m = idx.size
        kkt = np.zeros((m + 1, m + 1))
        kkt[:m, :m] = Kff
        kkt[:m, m] = kkt[m, :m] = 1.0
        rhs = np.concatenate([-grad[idx], [0.0]])
        sol = np.linalg.lstsq(kkt, rhs, rcond=1e-13)[0]
        step[idx] = sol[:m]
    else:
        step[idx] = _lstsq(Kff, -grad[idx])
    return step


def _polish(
    K: np.ndarray, c: np.ndarray, a: np.ndarray, free: np.ndarray, simplex: bool
) -> np.ndarray:
    """Solve the optimality system on the final free set once more, for full precision."""
    refined = a + _free_step(K, K @ a - c, free, simplex)
    if (refined[free] >= 0).all():
        a = refined
    a = np.maximum(a, 0.0)
    a[~free] = 0.0
    if simplex:
        a = a / a.sum()
    return a
