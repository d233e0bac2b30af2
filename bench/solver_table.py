"""Exact transport error against network calls for every solver (the tables of docs/solvers.md).

    .venv/bin/python bench/solver_table.py            # markdown tables on stdout (about 2 min of CPU time)

The Gaussian oracle of tests/test_sampling_gaussian.py (x* ~ N(0, Sigma) on 8x8 images, s = 4,
closed-form optimal denoiser) on each preset's relay path (L for sampling, sigma_B_max, alpha,
noise normalisation k = 1). Error: ``||Cov(output) - Sigma||_F / ||Sigma||_F`` with the output
covariance propagated exactly through the linear steps (tests/test_solvers.py checks that these
matrix forms are the sampler's exact transfer). Grids: the preset's own grid, and Karras grids
(rho 7) with n levels from the preset grid's first level down to 0.008, then 0. Then edm_sample's
and linear_relay_sample's solvers, deterministic, through their exact transfer matrices.
"""
from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]  # this checkout's relayops, and the tests' oracle

import test_sampling_gaussian as oracle  # noqa: E402
import test_solvers  # noqa: E402

from relayops import schedules, solvers  # noqa: E402

STEPS = (10, 20, 40, 80)
ORDER = ("rdm-euler", "rdm-heun", "relay-2s", "relay-2m")
ETAS = (0.0, 0.2)


def calls(solver: str, n: int) -> int:
    """Network calls of n steps (the last step is one call that returns x0_hat)."""
    return 2 * n - 1 if solver in ("rdm-heun", "relay-2s") else n


def error(grid, solver, eta, k, den, tau, preset) -> float:
    if solver in solvers.SECOND_ORDER:
        cov = test_solvers.solver_exact_cov(grid, solver, eta, k, den, tau, preset.L_sample, preset.sigma_b_max)
    else:
        cov = oracle.relay_exact_cov(grid, eta, solver == "rdm-heun", k, den, tau=tau)
    return oracle.rel_err(cov, oracle.SIGMA)


def table(preset) -> str:
    k = oracle.relay_noise_cov(preset.alpha, preset.normalize)

    def tau(sig):
        return schedules.tau_from_sigma(sig, preset.L_sample, preset.sigma_b_max) if sig > 0 else 0.0

    den = oracle.posterior_denoiser(k, tau)
    own = preset.sigmas().tolist()
    start = own[0]
    rows = []
    for solver in ("rdm-euler", "rdm-heun"):
        rows.append((solver, f"{len(own) - 1} (preset grid, rho {preset.rho:g})", calls(solver, len(own) - 1),
                     [error(own, solver, eta, k, den, tau, preset) for eta in ETAS]))
    for solver in ORDER:
        for n in STEPS:
            grid = schedules.karras_sigmas(n, 0.008, start, 7.0).tolist() + [0.0]
            rows.append((solver, str(n), calls(solver, n), [error(grid, solver, eta, k, den, tau, preset)
                                                            for eta in ETAS]))
    lines = [f"{preset.name} (L {preset.L_sample}, sigma_B_max {preset.sigma_b_max:g}, start sigma {start:.4f}, "
             f"k = {'1/sqrt(1 + alpha^2)' if preset.normalize else '1'}):", "",
             "| solver | steps | network calls | error, eta 0 | error, eta 0.2 |", "|---|---|---|---|---|"]
    lines += [f"| {sv} | {steps} | {nc} | {e[0]:.4f} | {e[1]:.4f} |" for sv, steps, nc, e in rows]
    return "\n".join(lines)


def base_and_linear_table() -> str:
    """edm_sample's and linear_relay_sample's solvers, deterministic, on the same oracle: the
    samplers' exact transfer matrices (tests/test_solvers.py: edm_error, linear_error)."""
    lines = ["EDM base stage (Karras 0.002 .. 80, rho 7, from pure noise) and latent linear relay "
             "(z_L = 0, T_r = 50, Karras 0.002 .. 2, rho 7), deterministic:", "",
             "| sampler | solver | steps | network calls | error |", "|---|---|---|---|---|"]
    for sampler, names, err in (("edm_sample", solvers.EDM_SOLVERS, test_solvers.edm_error),
                                ("linear_relay_sample", solvers.LINEAR_SOLVERS, test_solvers.linear_error)):
        for solver in names:
            for n in (8, 16, 32, 64):
                nc = 2 * n - 1 if solver == "edm-heun" else n
                lines.append(f"| {sampler} | {solver} | {n} | {nc} | {err(n, solver):.4f} |")
    return "\n".join(lines)


def main() -> None:
    for preset in (schedules.imagenet256, schedules.celebahq256):
        print(table(preset), end="\n\n", flush=True)
    print(base_and_linear_table(), flush=True)


if __name__ == "__main__":
    main()
