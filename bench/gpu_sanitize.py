"""Every op's CUDA kernel once per patch size, dtype and tile situation, for compute-sanitizer.

    compute-sanitizer --tool memcheck --error-exitcode 3 python bench/gpu_sanitize.py
    compute-sanitizer --tool racecheck --error-exitcode 3 python bench/gpu_sanitize.py

Small shapes (the sanitizer slows kernels by orders of magnitude) that still cover the tile
geometry: an image smaller than one tile, H = W = s, and images spanning several tiles with
partial tiles at the right and bottom edges, so halos wrap around both edges. Each result is also
compared with the reference (float64), so a race that changes values fails even where the
sanitizer is not run. Exits 1 on a mismatch; needs a GPU and the compiled CUDA backend.
"""
from __future__ import annotations

import argparse
import sys

import torch

import relayops

SIZES = {1: [(1, 1, 8, 8), (2, 2, 40, 72)], 2: [(1, 1, 2, 2), (2, 3, 36, 70)], 3: [(1, 2, 9, 6), (2, 1, 39, 69)],
         4: [(1, 1, 4, 4), (2, 3, 36, 72)], 5: [(1, 1, 10, 15), (1, 2, 40, 75)], 8: [(1, 1, 8, 8), (2, 2, 40, 72)],
         16: [(1, 1, 16, 16), (1, 2, 48, 80)]}
DTYPES = (torch.float32, torch.bfloat16, torch.float64)


def calls(shape, s, dtype, gen, device):
    """``{name: fn(backend)}`` for one shape: every op mode the CUDA kernel has."""
    b = shape[0]
    x, x0, xp, x0p, g = (torch.randn(shape, generator=gen, dtype=torch.float64).to(device) for _ in range(5))
    sigma = torch.linspace(0.5, 2.0, b, dtype=torch.float64, device=device)
    tau = torch.linspace(0.1, 1.5, b, dtype=torch.float64, device=device)
    seeds = [7 + i for i in range(b)]
    cast = lambda t: t.to(dtype)  # noqa: E731
    return {
        "patch_dct": lambda be: relayops.patch_dct(cast(x), s, backend=be),
        "patch_idct": lambda be: relayops.patch_idct(cast(x), s, backend=be),
        "patch_blur": lambda be: relayops.patch_blur(cast(x), tau, s, backend=be),
        "block_noise": lambda be: relayops.block_noise(cast(g), s, backend=be),
        "relay_noise": lambda be: relayops.relay_noise(cast(x), s, seed=seeds, offset=3, backend=be),
        "relay_corrupt": lambda be: relayops.relay_corrupt(cast(x), sigma, tau, s, seed=5, offset=1, backend=be),
        "relay_step_heun": lambda be: relayops.relay_step(
            cast(x), cast(x0), sigma, sigma * 0.7, tau, tau * 0.7, eta=0.3, s=s, seed=seeds, x_prop=cast(xp),
            x0_hat_prop=cast(x0p), backend=be),
        "block_noise_adjoint": lambda be: _adjoint(cast(g), s, be),
    }


def _adjoint(g, s, backend):
    """The transposed box sum: block_noise's gradient, which runs the kernel with the other halo side."""
    v = g.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(relayops.block_noise(v, s, backend=backend), v, g)
    return grad


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backend", default="cuda", help="backend under test; 'cpu' runs the same calls on CPU "
                                                          "tensors (a check of this script without a GPU)")
    backend = parser.parse_args(argv).backend
    device = "cpu" if backend == "cpu" else "cuda"
    if device == "cuda" and (not torch.cuda.is_available() or backend not in relayops.available_backends()):
        print(f"needs a CUDA GPU and the {backend} backend", file=sys.stderr)
        return 2
    gen = torch.Generator().manual_seed(0)
    failures, runs = [], 0
    for s, shapes in SIZES.items():
        for shape in shapes:
            for dtype in DTYPES:
                for name, fn in calls(shape, s, dtype, gen, device).items():
                    got = fn(backend).double()
                    want = fn("reference").double()
                    runs += 1
                    tol = 1e-9 if dtype == torch.float64 else 2e-2 if dtype == torch.bfloat16 else 2e-5
                    err = ((got - want).abs().max() / want.abs().max().clamp_min(1.0)).item()
                    if not err <= tol:
                        failures.append(f"{name} s={s} {tuple(shape)} {dtype}: relative error {err:.3g}")
    print(f"{runs} kernel calls, {len(failures)} mismatches")
    for f in failures:
        print("  " + f)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
