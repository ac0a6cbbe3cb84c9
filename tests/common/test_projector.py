"""The flat projector against independent references: scipy, brute force, KKT conditions."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from scipy.optimize import nnls

from common.projector import FEASIBLE_SETS, project, solve_coefficients, subset_size


def _problem(seed: int, n: int, d: int, conflicting: bool) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    general = torch.randn(n, d, generator=gen, dtype=torch.float64)
    if conflicting:  # target points away from most general gradients
        target = -general.mean(0) * 2 + 0.3 * torch.randn(d, generator=gen, dtype=torch.float64)
    else:
        target = torch.randn(d, generator=gen, dtype=torch.float64)
    return target, general


PROBLEMS = [
    (seed, n, d, conflicting)
    for seed, (n, d) in enumerate([(1, 5), (3, 8), (5, 4), (6, 20), (4, 3)])
    for conflicting in (False, True)
]


def _brute_force_hull(t: np.ndarray, G: np.ndarray) -> np.ndarray:
    """Closest point of conv(rows of G) to t: best over every support set (small n)."""
    best, best_dist = None, np.inf
    n = G.shape[0]
    for size in range(1, n + 1):
        for support in itertools.combinations(range(n), size):
            S = G[list(support)]
            # minimise ||S'w - t|| s.t. sum w = 1, via the affine parametrisation w = e0 + N z
            base = S[0]
            diffs = S[1:] - base
            if size > 1:
                z = np.linalg.lstsq(diffs.T, t - base, rcond=None)[0]
                w = np.concatenate([[1 - z.sum()], z])
            else:
                w = np.ones(1)
            if (w < -1e-12).any():
                continue
            point = w @ S
            dist = np.linalg.norm(point - t)
            if dist < best_dist - 1e-14:
                best, best_dist = point, dist
    return best


def _reference(t: torch.Tensor, G: torch.Tensor, feasible: str, fraction: float) -> np.ndarray:
    tn, Gn = t.numpy(), G.numpy()
    if feasible == "none":
        return tn
    if feasible == "mean":
        return Gn.mean(0)
    if feasible == "subset":
        k = subset_size(len(Gn), fraction)
        scores = Gn @ tn
        top = sorted(range(len(Gn)), key=lambda i: (-scores[i], i))[:k]
        return Gn[top].mean(0)
    if feasible == "hull":
        return _brute_force_hull(tn, Gn)
    if feasible == "cone":
        return nnls(Gn.T, tn)[0] @ Gn
    if feasible == "span":
        coef = np.linalg.lstsq(Gn.T, tn, rcond=None)[0]
        return coef @ Gn
    if feasible == "halfspace":  # dual: d = t + G' lam, lam = argmin_{lam>=0} ||G' lam + t||
        lam = nnls(Gn.T, -tn)[0]
        return tn + lam @ Gn
    if feasible == "filter":  # written per sample, not from the Gram matrix
        agree = [g for g in Gn if float(np.dot(g, tn)) > 0]
        return np.mean(agree, axis=0) if agree else np.zeros_like(tn)
    raise AssertionError(feasible)


@pytest.mark.parametrize("feasible", FEASIBLE_SETS)
@pytest.mark.parametrize(("seed", "n", "d", "conflicting"), PROBLEMS)
def test_matches_independent_reference(feasible, seed, n, d, conflicting):
    t, G = _problem(seed, n, d, conflicting)
    got = project(t, G, feasible, fraction=0.4).numpy()
    want = _reference(t, G, feasible, 0.4)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-8 * (1 + np.abs(want).max()))


def _kkt_hull(t, G, d):
    a = _coeffs(t, G, "hull")
    assert (a >= -1e-12).all() and abs(a.sum() - 1) < 1e-10
    np.testing.assert_allclose(a @ G, d, atol=1e-9)
    # gradient of 1/2||d - t||^2 in a is G(d - t); optimal: equal (= -nu) on the support,
    # not smaller elsewhere
    grad = G @ (d - t)
    nu = -grad[a > 1e-9].mean()
    assert np.all(grad + nu >= -1e-8)
    np.testing.assert_allclose(grad[a > 1e-9] + nu, 0, atol=1e-8)


def _kkt_cone(t, G, d):
    a = _coeffs(t, G, "cone")
    grad = G @ (d - t)
    assert (a >= -1e-12).all()
    assert np.all(grad >= -1e-8)  # dual feasibility
    assert abs(a @ grad) < 1e-8  # complementary slackness


def _kkt_halfspace(t, G, d):
    lam = _coeffs(t, G, "halfspace")
    np.testing.assert_allclose(t + lam @ G, d, atol=1e-9)  # stationarity: d - t = G' lam
    assert np.all(G @ d >= -1e-8)  # primal feasibility
    assert (lam >= -1e-12).all()  # dual feasibility
    assert abs(lam @ (G @ d)) < 1e-8  # complementary slackness


def _coeffs(t, G, feasible):
    rows = np.concatenate([t[None], G])
    return solve_coefficients(rows @ rows.T, feasible)[1]


@pytest.mark.parametrize("feasible", ["hull", "cone", "halfspace"])
@pytest.mark.parametrize("seed", range(12))
def test_kkt_conditions(feasible, seed):
    rng = np.random.default_rng(seed)
    n, d = int(rng.integers(1, 12)), int(rng.integers(2, 30))
    t, G = _problem(seed, n, d, conflicting=bool(seed % 2))
    t, G = t.numpy(), G.numpy()
    out = project(torch.from_numpy(t), torch.from_numpy(G), feasible).numpy()
    {"hull": _kkt_hull, "cone": _kkt_cone, "halfspace": _kkt_halfspace}[feasible](t, G, out)


def test_agem_closed_form_for_one_general_gradient():
    signs = set()
    for seed in range(8):
        t, G = _problem(seed, 1, 7, conflicting=bool(seed % 2))
        g = G[0]
        dot = torch.dot(t, g)
        want = t if dot >= 0 else t - dot / torch.dot(g, g) * g
        torch.testing.assert_close(project(t, G, "halfspace"), want, rtol=0, atol=1e-12)
        signs.add(bool(dot < 0))
    assert signs == {True, False}  # both branches of A-GEM are exercised


def test_large_n_and_duplicates_and_rank_deficient():
    gen = torch.Generator().manual_seed(3)
    base = torch.randn(4, 6, generator=gen, dtype=torch.float64)
    G = torch.cat([base, base, base[:2] * 2.0, base[:1] + base[1:2]])  # n = 11 > rank 4
    t = -base.sum(0) + torch.randn(6, generator=gen, dtype=torch.float64)
    for feasible in ("hull", "cone", "span", "halfspace"):
        got = project(t, G, feasible).numpy()
        want = _reference(t, G, feasible, 0.5)
        np.testing.assert_allclose(got, want, atol=1e-8)


def test_degenerate_inputs_have_defined_answers():
    t = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    empty = torch.zeros(0, 3, dtype=torch.float64)
    assert torch.equal(project(t, empty, "none"), t)
    assert torch.equal(project(t, empty, "halfspace"), t)
    assert torch.equal(project(t, empty, "cone"), torch.zeros(3, dtype=torch.float64))
    assert torch.equal(project(t, empty, "span"), torch.zeros(3, dtype=torch.float64))
    for feasible in ("mean", "subset", "hull"):
        with pytest.raises(ValueError, match="at least one general"):
            project(t, empty, feasible)
    zeros = torch.zeros(4, 3, dtype=torch.float64)
    for feasible in ("mean", "subset", "hull", "cone", "span"):
        assert torch.equal(project(t, zeros, feasible), torch.zeros(3, dtype=torch.float64))
    assert torch.equal(project(t, zeros, "halfspace"), t)
    # zero target: hull gives the min-norm point of the hull; cone/span give 0
    G = torch.tensor([[1.0, 1.0, 0.0], [1.0, -1.0, 0.0]], dtype=torch.float64)
    zt = torch.zeros(3, dtype=torch.float64)
    torch.testing.assert_close(project(zt, G, "hull"), torch.tensor([1.0, 0, 0]).double())
    assert torch.equal(project(zt, G, "cone"), zt)
    # subset ties keep the lower index
    torch.testing.assert_close(project(zt, G, "subset", fraction=0.5), G[0])


def test_filter_keeps_exactly_the_agreeing_samples_on_random_gram_problems():
    rng = np.random.default_rng(11)
    kept_sizes = set()
    for trial in range(60):
        n, d = int(rng.integers(1, 10)), int(rng.integers(2, 25))
        G = rng.standard_normal((n, d))
        t = rng.standard_normal(d) - (trial % 3) * G.mean(0)
        got = project(torch.from_numpy(t), torch.from_numpy(G), "filter").numpy()
        np.testing.assert_allclose(got, _reference(torch.from_numpy(t), torch.from_numpy(G),
                                                   "filter", 0.5), atol=1e-12)
        kept_sizes.add(int((G @ t > 0).sum() == n) - int((G @ t > 0).sum() == 0))
    assert kept_sizes == {-1, 0, 1}  # none kept, some kept and all kept all occurred
    # no general sample agrees: the step is skipped (d = 0), not pushed against them
    G = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    t = torch.tensor([-1.0, -2.0], dtype=torch.float64)
    assert torch.equal(project(t, G, "filter"), torch.zeros(2, dtype=torch.float64))
    assert torch.equal(project(t, torch.zeros(0, 2, dtype=torch.float64), "filter"),
                       torch.zeros(2, dtype=torch.float64))


def test_bad_input_raises_clear_errors():
    t = torch.ones(3)
    with pytest.raises(ValueError, match="NaN"):
        project(t, torch.tensor([[1.0, float("nan"), 0.0]]), "cone")
    with pytest.raises(ValueError, match="general must be"):
        project(t, torch.ones(2, 4), "cone")
    with pytest.raises(ValueError, match="unknown feasible"):
        project(t, torch.ones(2, 3), "ball")
    with pytest.raises(ValueError, match="fraction"):
        project(t, torch.ones(2, 3), "subset", fraction=0.0)


def test_float32_input_comes_back_float32():
    t, G = _problem(0, 3, 5, conflicting=True)
    out = project(t.float(), G.float(), "hull")
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), project(t, G, "hull"), atol=1e-6, rtol=1e-6)


def test_many_random_problems_converge_and_satisfy_kkt():
    # a wide sweep of sizes, scales and near-duplicate rows; a Gram from a real training
    # run once made an earlier version of the active-set loop stall on a 1e-13 step
    rng = np.random.default_rng(7)
    checks = {"hull": _kkt_hull, "cone": _kkt_cone, "halfspace": _kkt_halfspace}
    for trial in range(150):
        n, d = int(rng.integers(1, 17)), int(rng.integers(2, 40))
        scale = 10.0 ** rng.uniform(-2, 2)
        G = rng.standard_normal((n, d)) * scale
        if trial % 3 == 0 and n > 1:
            G[-1] = G[0] * (1 + 1e-9)  # near duplicate
        t = (rng.standard_normal(d) - (trial % 2) * G.mean(0) / scale) * scale
        for feasible, check in checks.items():
            out = project(torch.from_numpy(t), torch.from_numpy(G), feasible).numpy()
            check(t / scale, G / scale, out / scale)
