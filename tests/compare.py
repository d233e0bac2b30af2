"""The tests' one comparison helper: where and how much two tensors differ."""
from __future__ import annotations

import torch


def assert_close(actual: torch.Tensor, expected: torch.Tensor, *, atol: float, rtol: float = 0.0,
                 what: str = "result") -> None:
    """Every element of ``actual`` within ``atol + rtol |expected|`` of ``expected`` (both compared
    in float64; a NaN anywhere fails). The error names the worst element, its index and values,
    and how many elements are out of bounds."""
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    diff = (a - e).abs()
    bound = atol + rtol * e.abs()
    bad = ~(diff <= bound)  # NaN compares false, so it counts as bad
    if not bad.any():
        return
    excess = torch.where(torch.isnan(diff), torch.full_like(diff, float("inf")), diff / bound.clamp_min(1e-300))
    worst = tuple(int(i) for i in torch.unravel_index(torch.argmax(excess), a.shape))
    raise AssertionError(
        f"{what}: {int(bad.sum())} of {a.numel()} elements differ beyond atol={atol:.3g}, rtol={rtol:.3g}; "
        f"worst at index {worst}: actual {a[worst].item():.9g}, expected {e[worst].item():.9g}, "
        f"|diff| {diff[worst].item():.3g} (largest |diff| {torch.nan_to_num(diff, nan=float('inf')).max().item():.3g})")


def scale_of(t: torch.Tensor) -> float:
    """max(1, max |t|): the scale float32 tolerances are relative to."""
    return max(1.0, t.detach().abs().max().item()) if t.numel() else 1.0
