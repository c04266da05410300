"""Error measures and failure diagnostics shared by the kernel tests.

The tolerance rule (Cut Cross-Entropy's): against an fp64 ground truth, a fused result may be no
worse than native torch in the same dtype, plus a small slack. Errors are relative to the size
of the true tensor, so one rule covers losses, gradients of any scale and every dtype.
"""
import torch


def rel_err(got, truth, floor=1e-12):
    """max |got - truth| / max |truth| (the denominator at least `floor`); inf on any NaN/inf."""
    got, truth = got.detach().double(), truth.detach().double()
    if not torch.isfinite(got).all():
        return float("inf")
    return ((got - truth).abs().max() / truth.abs().max().clamp(min=floor)).item()


def diff_report(name, got, want, k=5):
    """Max and mean difference, NaN/inf counts and the first k largest mismatches, one per line."""
    got, want = got.detach().double().reshape(-1), want.detach().double().reshape(-1)
    d = (got - want).abs()
    lines = [f"{name}: shape {tuple(got.shape)}, max |diff| {d.max().item():.3e}, mean |diff| "
             f"{d.mean().item():.3e}, max |want| {want.abs().max().item():.3e}, "
             f"non-finite got {(~torch.isfinite(got)).sum().item()} want "
             f"{(~torch.isfinite(want)).sum().item()}"]
    for i in d.nan_to_num(float("inf")).argsort(descending=True)[:k].tolist():
        lines.append(f"  [{i}] got {got[i].item():.8e} want {want[i].item():.8e}")
    return "\n".join(lines)


def assert_no_worse(name, fused, native, truth, slack, factor=1.25, floor=1e-12):
    """Assert err(fused) <= factor * err(native) + slack, both measured against `truth`."""
    e_fused = rel_err(fused, truth, floor)
    e_native = rel_err(native, truth, floor)
    bound = factor * e_native + slack
    assert e_fused <= bound, (
        f"{name}: error {e_fused:.3e} vs fp64 exceeds {factor} x torch's {e_native:.3e} + "
        f"{slack:.1e}\n" + diff_report(name, fused, truth))
    return e_fused, e_native
