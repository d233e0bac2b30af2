"""Every solver against network calls: error to a high-call reference and KID (docs/solvers.md).

    nice python bench/solver_compare.py --models DIR [--num 24] [--json OUT.json] [--parts oracle,relay,base]

DIR holds a demo's checkpoints (``DIR/base``, ``DIR/relay``: ``relayops demo --out DIR ...``).
For each solver at 5, 10, 20, 40, 80 and 200 network calls (a two-call-per-step solver at the
largest odd count not above: 5, 9, 19, 39, 79, 199), from one start shared by all, eta = 0:

- ``oracle``: the Gaussian oracle of tests/test_sampling_gaussian.py; error = rms distance of the
  output to the exact solution of the probability-flow ODE from the same start, relative to the
  rms of that solution (tests/test_third_order.py: scipy DOP853 on the relay path, closed form on
  EDM's path).
- ``relay``: the trained relay model super-resolving ``--num`` test crops (``relayops demo``'s
  evaluation set "test") from sigma 0.9; error = the same relative rms distance to a reference
  solution (relay-3m, ``--ref-levels`` levels; a second one, relay-2m on the same grid, says how
  exact the reference is); KID of the outputs against the crops themselves.
- ``base``: the trained base model from pure noise (sigma 80, Karras to 0.002); error to a
  reference (edm-3m, ``--ref-levels``; check: edm-heun at half as many); KID against the test crops
  area-downsampled to 16x16. Also k-diffusion's samplers (``bench/requirements-solvers.txt``;
  skipped with a note when it is not installed) and an iPNDM-style sampler written here
  (k-diffusion has no iPNDM and no UniPC).

Prints markdown tables and writes the numbers (and the commands, seeds, machine) as JSON.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]  # this checkout's relayops, and the tests' oracle

import torch  # noqa: E402

from relayops import evaluate, relay_noise, schedules, solvers  # noqa: E402
from relayops._machine import machine_info  # noqa: E402
from relayops.sampling import edm_sample, nearest_upsample, relay_sample  # noqa: E402

CALLS = (5, 10, 20, 40, 80, 200)
RELAY_SOLVERS = ("rdm-euler", "rdm-heun", "relay-2s", "relay-2m", "relay-3m")
LOGSNR_SOLVERS = ("relay-2m", "relay-3m")  # also run on other grids (Karras rho 3, log-SNR)
BASE_SOLVERS = ("edm-heun", "edm-2m", "edm-3m")
RELAY_START, RELAY_MIN = 0.9, 0.008
EDM_MIN, EDM_MAX = 0.002, 80.0


def levels_for(solver: str, calls: int) -> int:
    """Grid levels (steps, the last one to 0 included) of a solver within ``calls`` network calls."""
    return (calls + 1) // 2 if solvers.CALLS_PER_STEP.get(solver, 1) == 2 else calls


def calls_of(solver: str, levels: int) -> int:
    return 2 * levels - 1 if solvers.CALLS_PER_STEP.get(solver, 1) == 2 else levels


def relay_grid(kind: str, n: int, start: float, path: dict) -> list:
    """n levels from ``start`` to RELAY_MIN, then 0: "karras" (rho 7), "karrasR" (rho R) or "logsnr"."""
    if kind.startswith("karras"):
        return schedules.karras_sigmas(n, RELAY_MIN, start, float(kind[6:] or 7)).tolist() + [0.0]
    return solvers.logsnr_sigmas(n, start, RELAY_MIN, L=path["L"], sigma_b_max=path["sigma_b_max"]).tolist()


def rel_rms(x: torch.Tensor, ref: torch.Tensor) -> float:
    return float((x.double() - ref.double()).norm() / ref.double().norm())


# --- k-diffusion (a benchmark dependency only) ----------------------------------------------------

def k_diffusion_samplers() -> tuple[dict, str]:
    """``({name: sampler(model, x, sigmas)}, note)``: k-diffusion's sampling module, loaded alone.

    Its package ``__init__`` imports training dependencies that sampling does not need, so only
    ``sampling.py`` is loaded, with ``utils.append_dims`` (all it uses of the package) supplied
    here, and stand-ins for ``torchsde`` and ``torchdiffeq`` when absent (only its Brownian-tree
    noise and its adaptive ODE sampler use them, neither run here)."""
    spec = importlib.util.find_spec("k_diffusion")
    if spec is None or spec.submodule_search_locations is None:
        return {}, "k-diffusion is not installed (pip install --no-deps -r bench/requirements-solvers.txt)"
    folder = Path(list(spec.submodule_search_locations)[0])
    package = types.ModuleType("k_diffusion")
    package.__path__ = [str(folder)]
    utils = types.ModuleType("k_diffusion.utils")
    utils.append_dims = lambda x, n: x[(...,) + (None,) * (n - x.ndim)]
    package.utils = utils
    sys.modules.setdefault("k_diffusion", package)
    sys.modules.setdefault("k_diffusion.utils", utils)
    for name in ("torchsde", "torchdiffeq"):
        if importlib.util.find_spec(name) is None:
            stand_in = types.ModuleType(name)
            stand_in.odeint = None  # sampling.py imports it by name; only its log_likelihood() calls it
            sys.modules.setdefault(name, stand_in)
    loader = importlib.util.spec_from_file_location("k_diffusion.sampling", folder / "sampling.py")
    ks = importlib.util.module_from_spec(loader)
    loader.loader.exec_module(ks)
    from importlib.metadata import version

    def no_noise(sigma, sigma_next):
        raise AssertionError("eta = 0: no noise is drawn")

    out = {"k-dpmpp-2m": lambda m, x, s: ks.sample_dpmpp_2m(m, x, s, disable=True),
           "k-dpmpp-3m": lambda m, x, s: ks.sample_dpmpp_3m_sde(m, x, s, eta=0.0, noise_sampler=no_noise,
                                                                disable=True),
           "k-lms": lambda m, x, s: ks.sample_lms(m, x, s, disable=True)}
    missing = []
    for name, fn in (("k-ipndm", "sample_ipndm"), ("k-unipc", "sample_unipc")):
        if hasattr(ks, fn):
            out[name] = (lambda f: lambda m, x, s: f(m, x, s, disable=True))(getattr(ks, fn))
        else:
            missing.append(fn)
    note = f"k-diffusion {version('k-diffusion')}" + (f" (has no {', '.join(missing)})" if missing else "")
    return out, note


# Adams-Bashforth coefficients for equal steps, orders 1 to 4 (the latest slope first).
AB_COEFFICIENTS = ((1.0,), (3 / 2, -1 / 2), (23 / 12, -16 / 12, 5 / 12), (55 / 24, -59 / 24, 37 / 24, -9 / 24))


@torch.no_grad()
def ipndm(model, x, sigmas):
    """iPNDM-style sampler (written here; k-diffusion has none): EDM's ODE ``dx/dsigma = (x - D(x))/sigma``
    by Adams-Bashforth with the fixed equal-step coefficients, order 1, 2, 3, then 4 as slopes
    accumulate; one call per step, every step (the last, to 0, included) of that form."""
    slopes = []
    for i in range(len(sigmas) - 1):
        sigma = sigmas[i]
        slopes.insert(0, (x - model(x, sigma * x.new_ones([x.shape[0]]))) / sigma)
        slopes = slopes[:4]
        x = x + (sigmas[i + 1] - sigma) * sum(c * d for c, d in zip(AB_COEFFICIENTS[len(slopes) - 1], slopes))
    return x


class Counting:
    """A denoiser that counts its calls."""

    def __init__(self, den):
        self.den, self.calls = den, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.den(*args, **kwargs)


# --- the Gaussian oracle -------------------------------------------------------------------------

def oracle_part(k_samplers: dict) -> dict:
    import numpy as np

    import test_sampling_gaussian as oracle
    import test_third_order as third

    t_ref, c0 = third.relay_reference(third.START, RELAY_MIN)
    path = dict(L=oracle.L_PATH, sigma_b_max=oracle.SIGMA_B_MAX)
    rows = []
    for solver in RELAY_SOLVERS:
        for kind in ("karras", "karras3", "logsnr") if solver in LOGSNR_SOLVERS else ("karras",):
            for calls in CALLS:
                n = levels_for(solver, calls)
                t = third.relay_transfer(relay_grid(kind, n, third.START, path), solver)
                rows.append(dict(stage="relay", solver=solver, grid=kind, calls=calls_of(solver, n),
                                 error=third.path_error(t, t_ref, c0)))
    ref, c0 = third.edm_reference(), EDM_MAX**2 * np.eye(third.N_PIX)
    den = oracle.edm_denoiser()
    basis = third.EYE.reshape(third.N_PIX, 1, oracle.H, oracle.H)
    for solver in (*BASE_SOLVERS, *k_samplers):
        for calls in CALLS:
            n = levels_for(solver, calls)
            if solver in BASE_SOLVERS:
                t = third.edm_transfer(n, solver)
            else:  # linear in the start: run on the scaled basis images
                grid = schedules.karras_sigmas(n, EDM_MIN, EDM_MAX, 7.0).tolist() + [0.0]
                out = k_samplers[solver](den, EDM_MAX * basis, torch.tensor(grid, dtype=torch.float64))
                t = out.reshape(third.N_PIX, third.N_PIX).T.numpy() / EDM_MAX
            rows.append(dict(stage="base", solver=solver, grid="karras", calls=calls_of(solver, n),
                             error=third.path_error(t, ref, c0)))
    return {"rows": rows}


# --- trained models ------------------------------------------------------------------------------

def test_crops(num: int, seed: int) -> torch.Tensor:
    """The demo's evaluation set "test": ``num`` unseen 64x64 crops of the training photographs."""
    from relayops.training.demo import DemoConfig, eval_sets

    return eval_sets(DemoConfig(num_eval=num, seed=seed))["test"][0]


def kid_of(images: torch.Tensor, reference) -> tuple[float, float]:
    r = evaluate.evaluate(images.float().clamp(-1, 1), reference, metrics=("kid",))
    return r["kid"], r["kid_stderr"]


def relay_part(models: Path, num: int, seed: int, ref_levels: int, budgets: tuple, grids: tuple) -> dict:
    from relayops.training import load_denoiser
    from relayops.training.data import area_downsample
    from relayops.training.trainer import TrainConfig

    den, rec = load_denoiser(models / "relay", "relay")
    tc = TrainConfig.from_dict(rec["train"])
    path = dict(L=tc.L, sigma_b_max=tc.sigma_b_max)
    opts = dict(s=tc.patch, eta=0.0, alpha=tc.alpha, normalize=tc.normalize, **path)
    truth = test_crops(num, seed)
    up = nearest_upsample(area_downsample(truth, tc.patch), tc.patch)
    x_start = up + RELAY_START * relay_noise(up, tc.patch, tc.alpha, tc.normalize, seed=seed + 1000)
    ref_stats = evaluate.statistics_of(truth, need_features=True)

    def run(solver, grid):
        counted = Counting(den)
        with torch.no_grad():
            out = relay_sample(counted, x_start=x_start, sigmas=grid, solver=solver, **opts)
        return out, counted.calls

    t0 = time.time()
    reference, ref_calls = run("relay-3m", relay_grid("karras", ref_levels, RELAY_START, path))
    check, check_calls = run("relay-2m", relay_grid("karras", ref_levels, RELAY_START, path))
    info = dict(reference=f"relay-3m, Karras rho 7, {ref_levels} levels ({ref_calls} calls)",
                check=f"relay-2m, Karras rho 7, {ref_levels} levels ({check_calls} calls)",
                reference_error=rel_rms(check, reference), reference_kid=kid_of(reference, ref_stats),
                reference_seconds=round(time.time() - t0, 1), train_steps=rec["step"], num_images=num)
    rows = []
    for solver in RELAY_SOLVERS:
        for kind in [g for g in grids if g == "karras" or solver in LOGSNR_SOLVERS]:
            # rdm-heun's 199 calls always: the targets are stated against that error
            for calls in sorted(set(budgets) | ({200} if solver == "rdm-heun" else set())):
                out, used = run(solver, relay_grid(kind, levels_for(solver, calls), RELAY_START, path))
                assert used == calls_of(solver, levels_for(solver, calls)), (solver, used)
                kid, kid_se = kid_of(out, ref_stats)
                rows.append(dict(stage="relay", solver=solver, grid=kind, calls=used, error=rel_rms(out, reference),
                                 kid=kid, kid_stderr=kid_se))
                print(f"  relay {solver:10s} {kind:7s} {used:4d} calls: error {rows[-1]['error']:.5f}, "
                      f"KID {kid:.4f}", file=sys.stderr, flush=True)
    return {"info": info, "rows": rows}


def base_part(models: Path, num: int, seed: int, ref_levels: int, budgets: tuple, k_samplers: dict) -> dict:
    from relayops.training import load_denoiser
    from relayops.training.data import area_downsample

    den, rec = load_denoiser(models / "base", "base")
    res = int(rec["train"]["resolution"])
    shape = (num, 3, res, res)
    # edm_sample's start: sigma_0 times white noise at Philox offset 0 of ``seed``; the same for k-diffusion
    x_start = EDM_MAX * relay_noise(torch.zeros(shape), 1, alpha=0.0, seed=seed)
    truth = test_crops(num, seed)
    ref_stats = evaluate.statistics_of(area_downsample(truth, truth.shape[-1] // res), need_features=True)

    def run(solver, n):
        grid = schedules.karras_sigmas(n, EDM_MIN, EDM_MAX, 7.0).tolist()
        counted = Counting(den)
        with torch.no_grad():
            if solver in BASE_SOLVERS:
                out = edm_sample(counted, shape, sigmas=grid, seed=seed, solver=solver)
            else:
                out = k_samplers[solver](counted, x_start.clone(), torch.tensor(grid + [0.0]))
        return out, counted.calls

    with torch.no_grad():  # the shared start: one Euler step to 0 returns the denoiser at the start
        first = edm_sample(den, shape, sigmas=[EDM_MAX], seed=seed)
        torch.testing.assert_close(first, den(x_start, torch.full((num,), EDM_MAX)), rtol=0, atol=1e-4)
    t0 = time.time()
    reference, ref_calls = run("edm-3m", ref_levels)
    check, check_calls = run("edm-heun", ref_levels // 2)
    info = dict(reference=f"edm-3m, Karras rho 7, {ref_levels} levels ({ref_calls} calls)",
                check=f"edm-heun, Karras rho 7, {ref_levels // 2} levels ({check_calls} calls)",
                reference_error=rel_rms(check, reference), reference_kid=kid_of(reference, ref_stats),
                reference_seconds=round(time.time() - t0, 1), train_steps=rec["step"], num_images=num)
    rows = []
    for solver in (*BASE_SOLVERS, *k_samplers):
        for calls in budgets:
            out, used = run(solver, levels_for(solver, calls))
            assert used == calls_of(solver, levels_for(solver, calls)), (solver, used)
            kid, kid_se = kid_of(out, ref_stats)
            rows.append(dict(stage="base", solver=solver, grid="karras", calls=used, error=rel_rms(out, reference),
                             kid=kid, kid_stderr=kid_se))
            print(f"  base {solver:10s} {used:4d} calls: error {rows[-1]['error']:.5f}, KID {kid:.4f}",
                  file=sys.stderr, flush=True)
    return {"info": info, "rows": rows}


# --- tables --------------------------------------------------------------------------------------

def table(rows: list, with_kid: bool) -> str:
    """One row per (solver, grid), one column per call budget: error (and KID)."""
    budget = {r["calls"]: min(c for c in CALLS if c >= r["calls"]) for r in rows}  # 9 calls -> the 10 column
    columns = sorted(set(budget.values()))
    keys = list(dict.fromkeys((r["solver"], r["grid"]) for r in rows))
    lines = ["| solver | grid | " + " | ".join(f"{c} calls" for c in columns) + " |",
             "|---|---|" + "---|" * len(columns)]
    for solver, grid in keys:
        cells = {}
        for r in (r for r in rows if (r["solver"], r["grid"]) == (solver, grid)):
            cell = f"{r['error']:.2e}" if r["error"] < 0.01 else f"{r['error']:.4f}"
            if r["calls"] != budget[r["calls"]]:
                cell += f" ({r['calls']})"
            if with_kid:
                cell += f" / {r['kid']:.3f}"
            cells[budget[r["calls"]]] = cell
        lines.append(f"| {solver} | {grid} | " + " | ".join(cells.get(c, "") for c in columns) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", type=Path, help="a demo's output folder (with base/ and relay/)")
    ap.add_argument("--num", type=int, default=24, help="images per run (default 24)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--parts", default="oracle,relay,base")
    ap.add_argument("--ref-levels", type=int, default=1000, help="levels of the reference solutions (default 1000)")
    ap.add_argument("--calls", default=",".join(map(str, CALLS)),
                    help="network-call budgets of the trained models' runs (default: all of the oracle's)")
    ap.add_argument("--relay-grids", default="karras,karras3,logsnr",
                    help="grids of the trained relay model's multistep rows: karras (rho 7), karrasR (rho R), "
                         "logsnr (default karras,karras3,logsnr)")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    parts = args.parts.split(",")
    k_samplers, k_note = k_diffusion_samplers()
    k_samplers["ipndm"] = ipndm
    result = {"command": "python bench/solver_compare.py " + " ".join(sys.argv[1:] if argv is None else argv),
              "machine": machine_info(), "k_diffusion": k_note, "seed": args.seed}
    print(f"<!-- {k_note} -->")
    t0 = time.time()
    if "oracle" in parts:
        result["oracle"] = oracle_part(k_samplers)
        print("Gaussian oracle, relative rms error to the exact ODE solution:\n")
        for stage in ("relay", "base"):
            print(table([r for r in result["oracle"]["rows"] if r["stage"] == stage], False), end="\n\n", flush=True)
    for name, part in (("relay", relay_part), ("base", base_part)):
        if name not in parts:
            continue
        extra = (k_samplers,) if name == "base" else (tuple(args.relay_grids.split(",")),)
        budgets = tuple(int(c) for c in args.calls.split(","))
        result[name] = part(args.models, args.num, args.seed, args.ref_levels, budgets, *extra)
        info = result[name]["info"]
        print(f"Trained {name} model ({info['train_steps']} training steps, {info['num_images']} images): relative "
              f"rms error to the reference ({info['reference']}; {info['check']} differs from it by "
              f"{info['reference_error']:.1e}) / KID against the test crops (reference: "
              f"{info['reference_kid'][0]:.3f}):\n")
        print(table(result[name]["rows"], True), end="\n\n", flush=True)
    result["seconds"] = round(time.time() - t0, 1)
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
