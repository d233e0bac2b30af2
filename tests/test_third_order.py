"""Third-order multistep solvers (docs/spec.md 8.2 and 9.1), the log-SNR relay grid, and the order
each solver reaches on the Gaussian oracle of tests/test_sampling_gaussian.py.

Independent references: the correction factors against scipy's adaptive quadrature of the
unintegrated formula and a DOP853 solve of the path ODE; the order against the exact solution of
the oracle's probability-flow ODE (scipy DOP853 on the transfer matrix for the relay path, whose
output covariance is checked against the closed form; closed form for EDM's path).
"""
from __future__ import annotations

import functools
import math

import numpy as np
import pytest
import scipy.integrate
import torch

import test_sampling as paths
import test_sampling_gaussian as oracle
import test_solvers as ts
from relayops import schedules, solvers
from relayops.sampling import edm_sample, relay_sample

DT = torch.float64
EYE, N_PIX, S = oracle.EYE, oracle.N_PIX, oracle.S


def lagrange(t, t0, tb, tc):
    """The quadratic Lagrange basis of node tb on the nodes (t0, tb, tc), and its t-derivative."""
    den = (tb - t0) * (tb - tc)
    return (t - t0) * (t - tc) / den, (2 * t - t0 - tc) / den


THREE_POINT = [  # (sigma, sigma', sigma_b, sigma_c): relay-3m steps on Karras grids, and large steps
    (0.7, 0.55, 0.85, 0.95), (0.1, 0.07, 0.14, 0.2), (0.02, 0.008, 0.035, 0.06), (0.9, 0.3, 2.0, 5.0),
]


@pytest.mark.parametrize("eta", [0.0, 0.2])
@pytest.mark.parametrize("step", THREE_POINT)
def test_three_point_factors_against_quad(step, eta):
    """E_b and E_c against ``D(sigma') phi(sigma') - g sigma' int D(r) phi'(r)/r dr`` with phi the
    quadratic Lagrange basis in ln r (phi'(r) = dphi/dt / r), integrated adaptively by scipy."""
    sig, sig_n, sig_b, sig_c = step
    g = math.sqrt(1 - eta**2)
    t0, t1, tb, tc = (math.log(v) for v in (sig, sig_n, sig_b, sig_c))
    got = solvers.multistep_factors(sig, sig_n, (sig_b, sig_c), eta=eta, L=0.93, sigma_b_max=3.0, s=S)
    edm = solvers.edm_corrections(sig, sig_n, (sig_b, sig_c), eta=eta)
    for k, (a, b) in enumerate(((tb, tc), (tc, tb))):
        def integrand(r, d=True):
            response = ts.response_and_slope(r, 0.93, 3.0)[0] if d else 1.0
            return response * lagrange(math.log(r), t0, a, b)[1] / (r * r)

        integral, _ = scipy.integrate.quad_vec(integrand, sig, sig_n, epsabs=1e-14, epsrel=1e-13)
        expected = ts.response_and_slope(sig_n, 0.93, 3.0)[0] * lagrange(t1, t0, a, b)[0] - g * sig_n * integral
        np.testing.assert_allclose(got[k].numpy(), expected, rtol=1e-10, atol=1e-12)
        integral, _ = scipy.integrate.quad(lambda r: integrand(r, d=False), sig, sig_n, epsabs=1e-14, epsrel=1e-13)
        assert abs(edm[k] - (lagrange(t1, t0, a, b)[0] - g * sig_n * integral)) < 1e-10


def test_three_point_step_solves_the_path_ode():
    """eta = 0: with x0_hat(r) quadratic in ln r through (sigma, a), (sigma_b, b), (sigma_c, c), the
    step ``(sigma'/sigma) x + (D' - (sigma'/sigma) D) a + E_b (b - a) + E_c (c - a)`` is the exact
    solution of the path ODE (per frequency; scipy DOP853)."""
    sig, sig_n, sig_b, sig_c = THREE_POINT[0]
    t0, tb, tc = (math.log(v) for v in (sig, sig_b, sig_c))
    rng = np.random.default_rng(1)
    a, b, c, x = (rng.standard_normal((S, S)) for _ in range(4))

    def x0(r):
        t = math.log(r)
        return a + lagrange(t, t0, tb, tc)[0] * (b - a) + lagrange(t, t0, tc, tb)[0] * (c - a)

    def rhs(r, y):
        d, slope = ts.response_and_slope(r, 0.93, 3.0)
        return (slope * x0(r) + (y.reshape(S, S) - d * x0(r)) / r).ravel()

    sol = scipy.integrate.solve_ivp(rhs, (sig, sig_n), x.ravel(), method="DOP853", rtol=1e-12, atol=1e-13)
    d0, d1 = ts.response_and_slope(sig, 0.93, 3.0)[0], ts.response_and_slope(sig_n, 0.93, 3.0)[0]
    e_b, e_c = (e.numpy() for e in solvers.multistep_factors(sig, sig_n, (sig_b, sig_c), L=0.93, sigma_b_max=3.0,
                                                            s=S))
    step = sig_n / sig * x + (d1 - sig_n / sig * d0) * a + e_b * (b - a) + e_c * (c - a)
    np.testing.assert_allclose(step, sol.y[:, -1].reshape(S, S), rtol=0, atol=1e-9)


def test_factor_arguments_are_checked():
    with pytest.raises(ValueError, match="anchors distinct"):
        solvers.multistep_factors(0.5, 0.4, (0.6, 0.6))
    with pytest.raises(ValueError, match="anchors distinct"):
        solvers.edm_corrections(0.5, 0.4, (0.5,))
    with pytest.raises(ValueError, match="eta must be in"):
        solvers.edm_corrections(0.5, 0.4, (0.6, 0.7), eta=1.0)


# --- invariants --------------------------------------------------------------------------------

def test_relay_3m_invariant_and_call_count():
    """eta = 0, a denoiser always returning x*: every state is the path point at its sigma with
    the start's z, one call per step, and the output is x* (SPEC 8's invariant)."""
    x_star, z = paths._star_and_z()
    den = paths.Recorder(x_star)
    out = relay_sample(den, x_start=paths.on_path(x_star, z, paths.GRID[0]), sigmas=paths.GRID, eta=0.0,
                       solver="relay-3m", L=paths.L_PATH, sigma_b_max=paths.SIGMA_B_MAX, dtype=DT)
    assert [sig for _, sig, _ in den.calls] == paths.GRID[:-1]
    for x, sig, _ in den.calls:
        torch.testing.assert_close(x, paths.on_path(x_star, z, sig), rtol=0, atol=1e-12)
    torch.testing.assert_close(out, x_star, rtol=0, atol=0)


def test_edm_3m_invariant_and_call_count():
    """A denoiser that always returns x* keeps edm-3m's states on ``x* + sigma z``; it ends at x*."""
    gen = torch.Generator().manual_seed(3)
    x_star = torch.randn(2, 1, 4, 4, generator=gen, dtype=DT)
    den = paths.Recorder(x_star)
    grid = schedules.karras_sigmas(12, 0.01, 2.0, 7.0).tolist()
    out = edm_sample(den, x_star.shape, sigmas=grid, seed=9, dtype=DT, solver="edm-3m")
    z = (den.calls[0][0] - x_star) / grid[0]
    assert [sig for _, sig, _ in den.calls] == grid
    for x, sig, _ in den.calls:
        torch.testing.assert_close(x, x_star + sig * z, rtol=0, atol=1e-12)
    torch.testing.assert_close(out, x_star, rtol=0, atol=0)


def test_relay_3m_seeds_and_eta():
    """eta = 0.2, float32, per-sample seeds: the same seeds give the same images, image 1
    regenerated alone equals its batch version; the first two steps are relay-2m's."""
    x_lr = torch.randn(3, 2, 2, 3, generator=torch.Generator().manual_seed(4))
    den = lambda x, s: 0.8 * x  # noqa: E731
    run = lambda x, seed, solver="relay-3m", n=40: relay_sample(den, x, 4, num_steps=n, eta=0.2,  # noqa: E731
                                                               solver=solver, seed=seed)
    batch = run(x_lr, [7, 8, 9])
    assert batch.dtype == torch.float32 and bool(torch.isfinite(batch).all())
    assert torch.equal(run(x_lr, [7, 8, 9]), batch)
    torch.testing.assert_close(run(x_lr[1:2], [8]), batch[1:2], rtol=0, atol=1e-6)
    # a grid of 2 steps above 0 (Karras 8 levels, 3 below 0.9): relay-3m never has two previous values
    torch.testing.assert_close(run(x_lr, [7, 8, 9], n=8), run(x_lr, [7, 8, 9], "relay-2m", n=8), rtol=0, atol=0)


# --- the log-SNR grid ----------------------------------------------------------------------------

def test_logsnr_grid_is_uniform_in_the_paths_log_snr():
    """Levels evenly spaced in ``mean_k ln(D_k^2 / sigma^2)``, D from SPEC 2 and 5 via scipy; without
    blur the grid is geometric; ends exact, then 0."""
    grid = solvers.logsnr_sigmas(9, 0.9, 0.008, L=0.93, sigma_b_max=3.0).tolist()
    assert grid[0] == 0.9 and abs(grid[-2] - 0.008) < 1e-15 and grid[-1] == 0.0
    lam = [2 * np.log(ts.response_and_slope(v, 0.93, 3.0)[0]).mean() - 2 * math.log(v) for v in grid[:-1]]
    np.testing.assert_allclose(np.diff(lam), (lam[-1] - lam[0]) / 8, rtol=1e-8)
    geometric = solvers.logsnr_sigmas(5, 1.0, 0.01, sigma_b_max=0.0)[:-1]
    torch.testing.assert_close(geometric, torch.tensor([1.0, 10**-0.5, 0.1, 10**-1.5, 0.01], dtype=DT),
                               rtol=1e-7, atol=0)
    with pytest.raises(ValueError, match="sigma_min < sigma_start"):
        solvers.logsnr_sigmas(5, 0.01, 0.1)


# --- order against the exact ODE solution ---------------------------------------------------------

Q_NP = ts.Q.numpy()


def _relay_matrices(sigma: float):
    """B(sigma) and dB/dsigma of the oracle's path, as pixel matrices, from scipy's D and slope
    (``Q^T diag(factor tiled over the patches) Q``, Q the scipy patch DCT)."""
    tiles = oracle.H // S
    return tuple(Q_NP.T @ (np.tile(f[:, None, :], (tiles, 1, tiles)).reshape(-1, 1) * Q_NP)
                 for f in ts.response_and_slope(sigma, oracle.L_PATH, oracle.SIGMA_B_MAX))


K_NORM = oracle.relay_noise_cov(oracle.ALPHA, True).numpy()
SIGMA_NP = oracle.SIGMA.numpy()


def _posterior(b: np.ndarray, sigma: float) -> np.ndarray:
    return np.linalg.solve((b @ SIGMA_NP @ b.T + sigma**2 * K_NORM).T, b @ SIGMA_NP.T).T


@functools.lru_cache(maxsize=None)
def relay_reference(sigma0: float, sigma_min: float):
    """(T, C0): the exact map from the start state at sigma0 to the sampler's output (the
    probability-flow ODE ``dx/dsigma = B' W x + (x - B W x)/sigma`` solved to sigma_min by scipy
    DOP853 in ln sigma, then the posterior mean W(sigma_min)), and the start covariance."""
    def rhs(t, y):
        r = math.exp(t)
        b, slope = _relay_matrices(r)
        w = _posterior(b, r)
        return ((r * slope @ w + np.eye(N_PIX) - b @ w) @ y.reshape(N_PIX, N_PIX)).ravel()

    sol = scipy.integrate.solve_ivp(rhs, (math.log(sigma0), math.log(sigma_min)), np.eye(N_PIX).ravel(),
                                    method="DOP853", rtol=1e-11, atol=1e-12)
    b0, b_min = _relay_matrices(sigma0)[0], _relay_matrices(sigma_min)[0]
    t = _posterior(b_min, sigma_min) @ sol.y[:, -1].reshape(N_PIX, N_PIX)
    return t, b0 @ SIGMA_NP @ b0.T + sigma0**2 * K_NORM


def path_error(t_solver: np.ndarray, t_ref: np.ndarray, c0: np.ndarray) -> float:
    """rms ||x_solver - x_ref|| / rms ||x_ref|| over start states x ~ N(0, c0), from the same start."""
    diff = t_solver - t_ref
    return math.sqrt(np.trace(diff @ c0 @ diff.T) / np.trace(t_ref @ c0 @ t_ref.T))


def relay_transfer(grid, solver) -> np.ndarray:
    """relay_sample's exact transfer matrix (eta = 0): the sampler run on the 64 basis images."""
    out = relay_sample(oracle.relay_denoiser(True), x_start=EYE.reshape(N_PIX, 1, oracle.H, oracle.H), s=S,
                       sigmas=list(grid), eta=0.0, solver=solver, alpha=oracle.ALPHA, L=oracle.L_PATH,
                       sigma_b_max=oracle.SIGMA_B_MAX, dtype=DT)
    return out.reshape(N_PIX, N_PIX).T.numpy()


def fitted_order(steps, errors) -> float:
    """Minus the least-squares slope of ln(error) against ln(steps)."""
    return -float(np.polyfit(np.log(steps), np.log(errors), 1)[0])


START, RELAY_MIN = oracle.RELAY_GRID[0], 0.008


def test_relay_reference_is_exact():
    """The ODE reference's output covariance equals the closed form: the flow keeps the path's
    marginal, so the output is ``W(s_min) x`` with ``Cov x = B Sigma B^T + s_min^2 K``."""
    t, c0 = relay_reference(START, RELAY_MIN)
    b = _relay_matrices(RELAY_MIN)[0]
    w = _posterior(b, RELAY_MIN)
    exact = w @ (b @ SIGMA_NP @ b.T + RELAY_MIN**2 * K_NORM) @ w.T
    assert np.linalg.norm(t @ c0 @ t.T - exact) < 1e-8 * np.linalg.norm(exact)


RELAY_STEPS = (24, 32, 48, 64)


@pytest.mark.parametrize("solver,low,high", [("relay-3m", 2.6, 3.4), ("relay-2m", 1.7, 2.3)])
def test_relay_multistep_order(solver, low, high):
    """eta = 0, Karras rho 7 from the imagenet256 start to 0.008: the error to the exact ODE
    solution falls as steps^-p with p about 3 for relay-3m (2 for relay-2m), on a log-log fit."""
    t_ref, c0 = relay_reference(START, RELAY_MIN)
    errors = [path_error(relay_transfer(ts.karras_from_start(n), solver), t_ref, c0) for n in RELAY_STEPS]
    assert low < fitted_order(RELAY_STEPS, errors) < high, errors


EDM_MIN, EDM_MAX = 0.002, 80.0


def edm_transfer(n: int, solver: str) -> np.ndarray:
    """edm_sample's exact map from its start noise (scaled by EDM_MAX) to the output."""
    den = oracle.edm_denoiser()
    return ts.transfer_from_noise(lambda like: edm_sample(den, like.shape, num_steps=n, seed=5, dtype=DT,
                                                          solver=solver), EDM_MAX).numpy()


def edm_reference() -> np.ndarray:
    """The exact map of EDM's path: the ODE scales eigencomponent k of Sigma by
    ``sqrt((l_k + s_min^2) / (l_k + s_max^2))``; then the posterior mean ``Sigma (Sigma + s_min^2)^-1``."""
    lam, u = np.linalg.eigh(SIGMA_NP)
    flow = u @ np.diag(np.sqrt((lam + EDM_MIN**2) / (lam + EDM_MAX**2))) @ u.T
    return SIGMA_NP @ np.linalg.inv(SIGMA_NP + EDM_MIN**2 * np.eye(N_PIX)) @ flow


EDM_STEPS = (24, 32, 48, 64)


@pytest.mark.parametrize("solver,low,high", [("edm-3m", 2.6, 3.6), ("edm-2m", 1.7, 2.5)])
def test_edm_multistep_order(solver, low, high):
    """Karras 0.002 .. 80, rho 7, from pure noise: the error to the exact ODE solution falls as
    steps^-p with p about 3 for edm-3m (2 for edm-2m)."""
    ref, c0 = edm_reference(), EDM_MAX**2 * np.eye(N_PIX)
    errors = [path_error(edm_transfer(n, solver), ref, c0) for n in EDM_STEPS]
    assert low < fitted_order(EDM_STEPS, errors) < high, errors
