"""Second-order relay solvers (docs/spec.md section 8.1): names, coefficients, invariant, order.

The coefficients are checked against scipy (adaptive quadrature of the unintegrated formula,
and a high-precision ODE solve of the path ODE); the solvers on the Gaussian oracle of
tests/test_sampling_gaussian.py, whose discrete samplers are linear: run on the 64 basis images
with eta = 0, a sampler gives its exact transfer matrix T, so ``Cov(output) = T C_0 T^T`` exactly.
"""
from __future__ import annotations

import functools
import math
import os

import numpy as np
import pytest
import scipy.integrate
import scipy.special
import torch

import scipy_reference as sr
import test_sampling as paths
import test_sampling_gaussian as oracle
import relayops
from relayops import schedules, solvers
from relayops.sampling import edm_sample, linear_relay_sample, relay_sample

DT = torch.float64
EYE, N_PIX, S = oracle.EYE, oracle.N_PIX, oracle.S
D_MIN = 0.001


# --- independent D(sigma) and dD/dsigma, from SPEC 2 and 5 with scipy ----------------------------

def response_and_slope(r: float, L: float, sbm: float):
    """``D(tau(u(r)))`` and its derivative in r, ``[s, s]`` arrays."""
    z = (math.log(r) + 1.2) / 1.2
    u = scipy.special.ndtr(z) / L
    sn, cs = math.sin(math.pi * u / 2), math.cos(math.pi * u / 2)
    tau = sbm**2 * sn**4 / 2
    dtau = math.pi * sbm**2 * sn**3 * cs * math.exp(-z * z / 2) / math.sqrt(2 * math.pi) / (L * 1.2 * r)
    i = np.arange(S)
    lam = np.pi**2 * (i[:, None] ** 2 + i[None, :] ** 2) / S**2
    decay = (1 - D_MIN) * np.exp(-lam * tau)
    return decay + D_MIN, -lam * decay * dtau


def phi(r, sigma, sigma_b):
    return math.log(r / sigma) / math.log(sigma_b / sigma)


STEPS = [  # (sigma, sigma', sigma_b): relay-2s (sigma_b = sigma'), relay-2m (sigma_b > sigma), big steps
    (0.85, 0.7, 0.7), (0.3, 0.2, 0.2), (0.02, 0.008, 0.008),
    (0.7, 0.55, 0.85), (0.1, 0.05, 0.2), (0.9, 0.1, 0.1), (0.9, 0.1, 2.0),
]


@pytest.mark.parametrize("eta", [0.0, 0.2])
@pytest.mark.parametrize("L,sbm", [(0.93, 3.0), (1.05, 2.0)])
@pytest.mark.parametrize("step", STEPS)
def test_correction_factor_against_quad(step, L, sbm, eta):
    """E against the noise-component form ``E = D(sigma') phi(sigma') - g sigma' int D(r) phi'(r)/r dr``
    (x0 varying linearly in log sigma), integrated adaptively by scipy."""
    sig, sig_n, sig_b = step
    g = math.sqrt(1 - eta**2)
    integral, _ = scipy.integrate.quad_vec(
        lambda r: response_and_slope(r, L, sbm)[0] / (r * r * math.log(sig_b / sig)), sig, sig_n,
        epsabs=1e-14, epsrel=1e-13)
    expected = response_and_slope(sig_n, L, sbm)[0] * phi(sig_n, sig, sig_b) - g * sig_n * integral
    got = solvers.correction_factor(sig, sig_n, sig_b, eta=eta, L=L, sigma_b_max=sbm, s=S)
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("step", [STEPS[0], STEPS[3], STEPS[5]])
def test_second_order_step_solves_the_path_ode(step):
    """eta = 0: with x0_hat(r) = a + b phi(r), the step ``(sigma'/sigma) x + A a + E b`` is the exact
    solution of ``dx/dr = D'(r) x0_hat(r) + (x - D(r) x0_hat(r))/r`` (per frequency; scipy DOP853)."""
    sig, sig_n, sig_b = step
    rng = np.random.default_rng(0)
    a, b, x = (rng.standard_normal((S, S)) for _ in range(3))

    def rhs(r, y):
        d, slope = response_and_slope(r, 0.93, 3.0)
        x0 = a + b * phi(r, sig, sig_b)
        return (slope * x0 + (y.reshape(S, S) - d * x0) / r).ravel()

    sol = scipy.integrate.solve_ivp(rhs, (sig, sig_n), x.ravel(), method="DOP853", rtol=1e-12, atol=1e-13)
    d0, d1 = response_and_slope(sig, 0.93, 3.0)[0], response_and_slope(sig_n, 0.93, 3.0)[0]
    e = solvers.correction_factor(sig, sig_n, sig_b, L=0.93, sigma_b_max=3.0, s=S).numpy()
    step_result = sig_n / sig * x + (d1 - sig_n / sig * d0) * a + e * b
    np.testing.assert_allclose(step_result, sol.y[:, -1].reshape(S, S), rtol=0, atol=1e-9)


# --- names and the heun keyword ---------------------------------------------------------------

def test_solver_names_and_the_heun_keyword():
    x_lr = torch.randn(2, 1, 2, 2, generator=torch.Generator().manual_seed(0), dtype=DT)
    run = lambda **kw: relay_sample(lambda x, s: 0.9 * x, x_lr, 4, num_steps=30, dtype=DT, seed=1, **kw)  # noqa: E731
    default = run()
    assert torch.equal(run(solver="rdm-heun"), default) and torch.equal(run(heun=True), default)
    assert torch.equal(run(solver="rdm-heun", heun=True), default)
    assert torch.equal(run(solver="rdm-euler"), run(heun=False))
    assert not torch.equal(run(solver="rdm-euler"), default)
    with pytest.raises(ValueError, match="valid solvers: rdm-heun, rdm-euler, relay-2s, relay-2m"):
        run(solver="dpm")
    with pytest.raises(ValueError, match="heun=True selects solver 'rdm-heun' but solver='rdm-euler'"):
        run(solver="rdm-euler", heun=True)
    with pytest.raises(ValueError, match="heun=False selects"):
        run(solver="relay-2m", heun=False)
    with pytest.raises(TypeError, match="heun must be"):
        run(heun="yes")


# --- SPEC 8's invariant holds for the new solvers ---------------------------------------------

@pytest.mark.parametrize("solver,calls", [("relay-2s", lambda n: 2 * n - 1), ("relay-2m", lambda n: n)])
def test_invariant_and_call_count(solver, calls):
    """eta = 0, a denoiser always returning x*: every state the denoiser sees (the relay-2s proposals
    included) is the path point at its sigma with the start's z, and the output is x*."""
    x_star, z = paths._star_and_z()
    den = paths.Recorder(x_star)
    out = relay_sample(den, x_start=paths.on_path(x_star, z, paths.GRID[0]), sigmas=paths.GRID, eta=0.0,
                       solver=solver, L=paths.L_PATH, sigma_b_max=paths.SIGMA_B_MAX, dtype=DT)
    assert len(den.calls) == calls(len(paths.GRID) - 1)
    for x, sig, _ in den.calls:
        torch.testing.assert_close(x, paths.on_path(x_star, z, sig), rtol=0, atol=1e-12)
    torch.testing.assert_close(out, x_star, rtol=0, atol=0)


# --- the Gaussian oracle ------------------------------------------------------------------------

def _patch_dct_matrix() -> torch.Tensor:
    """Q with ``vec(patch_dct(x)) = Q vec(x)`` (scipy, orthonormal)."""
    basis = np.eye(N_PIX).reshape(N_PIX, 1, oracle.H, oracle.H)
    return torch.from_numpy(sr.patch_dct(basis, S).reshape(N_PIX, N_PIX).T.copy())


Q = _patch_dct_matrix()


def freq_matrix(factor: torch.Tensor) -> torch.Tensor:
    """The pixel matrix of ``patch_idct(factor * patch_dct(.))`` for an ``[s, s]`` factor."""
    tiled = factor.reshape(1, S, 1, S).expand(oracle.H // S, S, oracle.H // S, S).reshape(-1)
    return Q.T @ torch.diag(tiled) @ Q


def start_cov(grid, k, tau) -> torch.Tensor:
    """Cov of the start ``B_0 x* + sigma_0 n`` (relay noise n ~ N(0, k))."""
    b0 = oracle.blur_matrix(tau(grid[0]))
    return b0 @ oracle.SIGMA @ b0.T + grid[0] ** 2 * k


def solver_exact_cov(grid, solver, eta, k, den, tau, L, sbm) -> torch.Tensor:
    """Covariance of relay-2s / relay-2m's output (docs/spec.md 8.1 in matrix form) on the state
    ``[x_i; x0_hat_{i-1}]``: ``x' = g (sigma'/sigma) x + (B' - gamma B) W x + E (x0_b - W x) + eta sigma' n``,
    E the pixel matrix of the correction factor. relay-2s: ``x0_b = W' x_prop`` with the eta = 0
    DDIM-blur proposal ``x_prop = (sigma'/sigma) x + (B' - (sigma'/sigma) B) W x``."""
    blur = lambda sig: oracle.blur_matrix(tau(sig))  # noqa: E731
    g = math.sqrt(1 - eta**2)
    zero = torch.zeros(N_PIX, N_PIX, dtype=DT)
    cov = torch.block_diag(start_cov(grid, k, tau), zero)
    for i, (sig, sig_n) in enumerate(zip(grid, grid[1:])):
        w = den.matrix(sig)
        if sig_n == 0:
            return w @ cov[:N_PIX, :N_PIX] @ w.T
        gam, r = g * sig_n / sig, sig_n / sig
        m_x = gam * EYE + (blur(sig_n) - gam * blur(sig)) @ w
        m_p = zero
        if solver == "relay-2s":
            x0_b = den.matrix(sig_n) @ (r * EYE + (blur(sig_n) - r * blur(sig)) @ w)
            e = freq_matrix(solvers.correction_factor(sig, sig_n, sig_n, eta=eta, L=L, sigma_b_max=sbm, s=S))
            m_x = m_x + e @ (x0_b - w)
        elif i > 0:  # relay-2m: x0_b is the previous x0_hat, the second block of the state
            e = freq_matrix(solvers.correction_factor(sig, sig_n, grid[i - 1], eta=eta, L=L, sigma_b_max=sbm, s=S))
            m_x, m_p = m_x - e @ w, e
        m = torch.cat([torch.cat([m_x, m_p], 1), torch.cat([w, zero], 1)])
        cov = m @ cov @ m.T + torch.block_diag((eta * sig_n) ** 2 * k, zero)
    raise AssertionError("grid must end in 0")


@functools.lru_cache(maxsize=None)
def implementation_error(grid: tuple, solver: str) -> float:
    """The exact transport error of relay_sample itself (eta = 0) on the oracle's path, through
    its transfer matrix (the sampler run on the basis images). Cached: tests share the runs."""
    k, den = oracle.relay_noise_cov(oracle.ALPHA, True), oracle.relay_denoiser(True)
    out = relay_sample(den, x_start=EYE.reshape(N_PIX, 1, oracle.H, oracle.H), s=S, sigmas=grid, eta=0.0,
                       solver=solver, alpha=oracle.ALPHA, L=oracle.L_PATH, sigma_b_max=oracle.SIGMA_B_MAX, dtype=DT)
    t = out.reshape(N_PIX, N_PIX).T
    return oracle.rel_err(t @ start_cov(grid, k, oracle.relay_tau) @ t.T, oracle.SIGMA)


def karras_from_start(n: int) -> tuple:
    """n levels, Karras rho 7, from the imagenet256 grid's first level (its start) to 0.008, then 0."""
    return tuple(schedules.karras_sigmas(n, 0.008, oracle.RELAY_GRID[0], 7.0).tolist() + [0.0])


def test_matrix_form_is_the_implementation():
    """The matrix form above (used for eta > 0 and the tables of docs/solvers.md) gives relay_sample's exact error."""
    k, den = oracle.relay_noise_cov(oracle.ALPHA, True), oracle.relay_denoiser(True)
    grid = karras_from_start(6)
    for solver in solvers.SECOND_ORDER:
        exact = oracle.rel_err(solver_exact_cov(grid, solver, 0.0, k, den, oracle.relay_tau, oracle.L_PATH,
                                                oracle.SIGMA_B_MAX), oracle.SIGMA)
        assert abs(implementation_error(grid, solver) - exact) < 1e-12, solver


def test_second_order_convergence():
    """eta = 0, Karras rho 7 from the imagenet256 start: doubling 16 -> 32 steps divides the error of
    relay-2s / relay-2m by about 4 (at least 3) and that of rdm-euler / rdm-heun by about 2."""
    errors = {sv: [implementation_error(karras_from_start(n), sv) for n in (16, 32)] for sv in solvers.SOLVERS}
    ratios = {sv: e[0] / e[1] for sv, e in errors.items()}
    for sv in solvers.SECOND_ORDER:
        assert 3.0 < ratios[sv] < 4.5, (ratios, errors)
    for sv in ("rdm-euler", "rdm-heun"):
        assert 1.6 < ratios[sv] < 2.4, (ratios, errors)


def test_relay_2m_beats_rdm_heun_with_a_fifth_of_the_calls():
    """The target: relay-2m with 32 network calls is more accurate than rdm-heun's 100 steps (199 calls)."""
    k, den = oracle.relay_noise_cov(oracle.ALPHA, True), oracle.relay_denoiser(True)
    heun_100 = oracle.rel_err(oracle.relay_exact_cov(oracle.RELAY_GRID, 0.0, True, k, den), oracle.SIGMA)
    assert 0.012 < heun_100 < 0.014
    assert implementation_error(karras_from_start(32), "relay-2m") < heun_100


@pytest.mark.parametrize("solver,bias_bound", [
    # exact discretisation errors at 16 steps, eta 0.2, k = 1: 0.037 and 0.049 (relay-2m's
    # correction mixes x0_hat from before and after the step's noise: first order when eta > 0)
    ("relay-2s", 0.04),
    ("relay-2m", 0.055),
])
def test_eta_transports_gaussian(solver, bias_bound):
    """eta = 0.2 (noise drawn per step, k = 1): 4000 chains against the matrix form and Sigma."""
    k = oracle.relay_noise_cov(oracle.ALPHA, False)
    den = oracle.posterior_denoiser(k)
    grid = karras_from_start(16)
    n = oracle.N_CHAINS
    x_true = oracle.true_samples(n, seed=11)
    gen = torch.Generator().manual_seed(12)
    n0 = torch.randn(n, N_PIX, generator=gen, dtype=DT) @ torch.linalg.cholesky(k).T
    b0 = oracle.blur_matrix(oracle.relay_tau(grid[0]))
    x0 = ((x_true.reshape(n, -1) @ b0.T + grid[0] * n0)).reshape(x_true.shape)
    out = relay_sample(den, x_start=x0, s=S, sigmas=grid, eta=0.2, solver=solver, alpha=oracle.ALPHA,
                       normalize=False, L=oracle.L_PATH, sigma_b_max=oracle.SIGMA_B_MAX,
                       seed=torch.Generator().manual_seed(13), dtype=DT)
    exact = solver_exact_cov(grid, solver, 0.2, k, den, oracle.relay_tau, oracle.L_PATH, oracle.SIGMA_B_MAX)
    oracle.check_transport(out, exact, x_true, bias_bound)


@pytest.mark.parametrize("solver", solvers.SECOND_ORDER)
def test_per_sample_seeds_regenerate_one_image(solver):
    """eta = 0.2, float32, per-sample seeds: the same seeds give the same images, and image 1
    regenerated alone (seed=[seeds[1]]) equals its batch version."""
    x_lr = torch.randn(3, 2, 2, 3, generator=torch.Generator().manual_seed(4))
    run = lambda x, seed: relay_sample(lambda x, s: 0.8 * x, x, 4, num_steps=40, eta=0.2, solver=solver,  # noqa: E731
                                       seed=seed)
    batch = run(x_lr, [7, 8, 9])
    assert batch.dtype == torch.float32 and bool(torch.isfinite(batch).all())
    assert torch.equal(run(x_lr, [7, 8, 9]), batch)
    torch.testing.assert_close(run(x_lr[1:2], [8]), batch[1:2], rtol=0, atol=1e-6)
    assert not torch.allclose(batch[0], batch[1])


# --- the same correction on EDM's base stage (section 9.1) and the linear relay (section 10.1) -----

@pytest.mark.parametrize("step", STEPS)
@pytest.mark.parametrize("eta", [0.0, 0.05])
def test_edm_correction_closed_form(step, eta):
    """No blur (D = 1): ``E = (h + g (1 - sigma'/sigma)) / ln(sigma_b/sigma)``, h = ln(sigma'/sigma)
    (docs/spec.md 9.1, the integral done by hand), against the quadrature."""
    sig, sig_n, sig_b = step
    h, g = math.log(sig_n / sig), math.sqrt(1 - eta**2)
    expected = (h + g * (1 - sig_n / sig)) / math.log(sig_b / sig)
    assert abs(solvers.edm_correction(sig, sig_n, sig_b, eta=eta) - expected) < 1e-12


@pytest.mark.parametrize("step", STEPS)
def test_linear_correction_against_quad(step):
    """The linear relay's E (D(r) = 1 - t(r)/T_r, t linear in log r over the step) against
    ``D(sigma') phi(sigma') - sigma' int D(r) phi'(r)/r dr``, integrated adaptively by scipy."""
    sig, sig_n, sig_b = step
    t0, t1, t_relay = 37.0, 21.0, 50.0

    def response(r):
        return 1 - (t0 + (t1 - t0) * math.log(r / sig) / math.log(sig_n / sig)) / t_relay

    integral, _ = scipy.integrate.quad(lambda r: response(r) / (r * r * math.log(sig_b / sig)), sig, sig_n,
                                       epsabs=1e-14, epsrel=1e-13)
    expected = response(sig_n) * phi(sig_n, sig, sig_b) - sig_n * integral
    assert abs(solvers.linear_correction(sig, sig_n, sig_b, t0, t1, t_relay) - expected) < 1e-10


def transfer_from_noise(run, sigma0: float) -> torch.Tensor:
    """T with ``output = T (sigma0 n)`` for a sampler that starts from white noise n (Philox at seed
    5, offset 0, stream 0: SPEC 4's start noise) and is deterministic after it: the sampler run on a
    batch of 64 draws, solved against those draws (the same noise, drawn by the public op)."""
    like = torch.zeros(N_PIX, 1, oracle.H, oracle.H, dtype=DT)
    n = relayops.relay_noise(like, 1, alpha=0.0, seed=5).reshape(N_PIX, N_PIX)
    return torch.linalg.solve(sigma0 * n, run(like).reshape(N_PIX, N_PIX)).T


@functools.lru_cache(maxsize=None)
def edm_error(steps: int, solver: str) -> float:
    """The exact transport error of edm_sample (Karras grid 0.002 .. 80, rho 7) on the oracle."""
    den = oracle.edm_denoiser()
    t = transfer_from_noise(lambda like: edm_sample(den, like.shape, num_steps=steps, seed=5, dtype=DT,
                                                    solver=solver), 80.0)
    return oracle.rel_err(80.0**2 * t @ t.T, oracle.SIGMA)


def test_edm_2m_is_second_order_with_one_call_per_step():
    """edm-heun's number is that of the matrix form (docs/spec.md 13.5: 0.024 at 32 steps); edm-2m's
    error falls about 4x per doubling and is less than half edm-heun's for the same number of calls."""
    heun_32 = edm_error(32, "edm-heun")
    assert abs(heun_32 - 0.0235) < 5e-4, heun_32
    two_m = [edm_error(n, "edm-2m") for n in (16, 32, 64)]
    assert all(3.0 < a / b < 6.5 for a, b in zip(two_m, two_m[1:])), two_m
    assert two_m[2] < heun_32 / 2  # 64 network calls (edm-heun: 32 steps, 63 calls)


T_R, LIN_MIN, LIN_MAX = 50.0, 0.002, 2.0


def linear_t(sigma: float) -> float:
    """A fixed relay-time schedule: t linear in sigma^(1/7) from T_r at LIN_MAX to 0 at LIN_MIN (so
    Karras grids of any size sample one path)."""
    root = lambda v: v ** (1 / 7)  # noqa: E731
    return T_R * (root(sigma) - root(LIN_MIN)) / (root(LIN_MAX) - root(LIN_MIN))


@functools.lru_cache(maxsize=None)
def linear_error(steps: int, solver: str) -> float:
    """The exact transport error of linear_relay_sample on the oracle with an uninformative z_L = 0:
    ``z = (1 - t/T_r) z0 + sigma eps``, optimal denoiser ``d Sigma (d^2 Sigma + sigma^2 I)^-1``, d = 1 - t/T_r."""
    def make_w(sigma):
        d = 1 - linear_t(sigma) / T_R
        return d * oracle.SIGMA @ torch.linalg.inv(d * d * oracle.SIGMA + sigma**2 * EYE)

    den = oracle.LinearDenoiser(make_w)
    grid = schedules.karras_sigmas(steps, LIN_MIN, LIN_MAX, 7.0).tolist()
    ts = [T_R] + [linear_t(v) for v in grid[1:]] + [0.0]
    t = transfer_from_noise(lambda like: linear_relay_sample(den, like, t_relay=T_R, sigmas=grid, ts=ts, seed=5,
                                                             dtype=DT, solver=solver), LIN_MAX)
    return oracle.rel_err(LIN_MAX**2 * t @ t.T, oracle.SIGMA)


def test_linear_2m_is_second_order():
    """linear-2m's error falls about 4x when the steps double (16 -> 32 -> 64), linear-euler's 2x."""
    two_m = [linear_error(n, "linear-2m") for n in (16, 32, 64)]
    euler = [linear_error(n, "linear-euler") for n in (16, 32)]
    assert all(3.0 < a / b < 6.5 for a, b in zip(two_m, two_m[1:])), two_m
    assert 1.6 < euler[0] / euler[1] < 2.4, euler
    assert two_m[1] < euler[1] / 5


@pytest.mark.parametrize("solver", ["edm-2m", "linear-2m"])
def test_multistep_invariant(solver):
    """A denoiser that always returns x* keeps the multistep states on the path (x* + sigma z for EDM,
    A_t(x*) + sigma z for the linear relay, z the start's) and ends at x*: x0_b - x0_a = 0."""
    gen = torch.Generator().manual_seed(3)
    x_star, z_lr = (torch.randn(2, 1, 4, 4, generator=gen, dtype=DT) for _ in range(2))
    den = paths.Recorder(x_star)
    grid = schedules.karras_sigmas(12, 0.01, 2.0, 7.0).tolist()
    if solver == "edm-2m":
        out = edm_sample(den, x_star.shape, sigmas=grid, seed=9, dtype=DT, solver=solver)
        on_path = lambda sig, z: x_star + sig * z  # noqa: E731
    else:
        ts = torch.linspace(T_R, 0.0, len(grid) + 1, dtype=DT).tolist()
        t_of = dict(zip(grid, ts))
        out = linear_relay_sample(den, z_lr, t_relay=T_R, sigmas=grid, ts=ts, seed=9, dtype=DT, solver=solver)
        on_path = lambda sig, z: relayops.linear_relay_blur(x_star, z_lr, t_of[sig], T_R) + sig * z  # noqa: E731
    z = (den.calls[0][0] - on_path(grid[0], 0.0)) / grid[0]
    assert len(den.calls) == len(grid)  # one network call per step
    for x, sig, _ in den.calls:
        torch.testing.assert_close(x, on_path(sig, z), rtol=0, atol=1e-12)
    torch.testing.assert_close(out, x_star, rtol=0, atol=0)


def test_solver_names_of_edm_and_linear_relay():
    den = lambda x, s: 0.5 * x  # noqa: E731
    with pytest.raises(ValueError, match="unknown solver 'relay-2m'; valid solvers: edm-heun, edm-2m"):
        edm_sample(den, (1, 1, 4, 4), num_steps=4, solver="relay-2m")
    with pytest.raises(ValueError, match="unknown solver 'edm-2m'; valid solvers: linear-euler, linear-2m"):
        linear_relay_sample(den, torch.zeros(1, 1, 4, 4), t_relay=4.0, sigmas=[1.0, 0.5], solver="edm-2m")
    with pytest.raises(ValueError, match="correction_factors is for the second-order solvers"):
        solvers.correction_factors([1.0, 0.5, 0.0], "rdm-heun", eta=0.0, L=0.93, sigma_b_max=3.0, s=4)


# --- the fused second-order step in the sampler, on every backend --------------------------------

def _sampler_targets():
    out = [("cpu", False), ("cpu", True)] if "cpu" in relayops.available_backends() else []
    if "triton" in relayops.available_backends() and os.environ.get("TRITON_INTERPRET") == "1":
        out.append(("triton", False))
    return out


@pytest.mark.parametrize("solver", solvers.HIGH_ORDER)
@pytest.mark.parametrize("backend,tiles", _sampler_targets(), ids=lambda v: str(v))
def test_second_order_sampler_on_every_backend(backend, tiles, solver, monkeypatch):
    """relay-2s / relay-2m / relay-3m with eta 0.2 and per-sample seeds: each kernel backend (the CPU loops, the
    CUDA tile code emulated on the CPU, Triton's interpreter) in float32 against the float64 reference
    backend, from the same start; float64 on the compiled backend within 1e-10."""
    import relayops.ops._compiled as compiled
    monkeypatch.setattr(compiled, "CPU_EMULATE_CUDA_TILES", tiles)
    gen = torch.Generator().manual_seed(8)
    x_start = torch.randn(2, 3, 8, 12, generator=gen, dtype=DT)
    den = lambda x, s: (0.8 * x + 0.1 * x.flip(-1)) / (1 + s.view(-1, 1, 1, 1) ** 2)  # noqa: E731
    run = lambda x, be: relay_sample(den, x_start=x, num_steps=12, eta=0.2, solver=solver, seed=[4, 2**64 - 3],  # noqa: E731
                                     dtype=x.dtype, backend=be)
    expected = run(x_start, "reference")
    got = run(x_start.float(), backend)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), expected, rtol=0, atol=2e-5 * expected.abs().max().item())
    if backend == "cpu":
        torch.testing.assert_close(run(x_start, backend), expected, rtol=0, atol=1e-10)
