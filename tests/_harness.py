"""The kernel tests' shared harness: tolerances, inputs, one run of a loss, and the check
against an fp64 ground truth with failure diagnostics.

The tolerance rule (Cut Cross-Entropy's): against an fp64 ground truth, a fused result may be no
worse than native torch in the same dtype, plus a small slack. Errors are relative to the size
of the true tensor, so one rule covers losses, gradients of any scale and every dtype.
"""
import importlib

import pytest
import torch
import torch.nn.functional as F

clip_mod = importlib.import_module("kernels.clip_loss")  # `kernels.clip_loss` is the function

# Slack over torch's own error (errors relative to the size of the true tensor). The fused
# paths accumulate and reduce in fp32 and round the gradient once; torch rounds the logits to
# the input dtype as well, so in fp16/bf16 it is usually the less accurate one. The slack is
# half an ulp of the gradient's final rounding (fp16 2^-11, bf16 2^-9), 1e-6 in fp32 (about
# 10x the regular cases' errors: confident rows, at 1e-4, are held by the factor 1.25).
SLACK = {torch.float32: 1e-6, torch.float16: 2e-4, torch.bfloat16: 1e-3}
UPSTREAM = 0.7  # a non-unit upstream gradient, so a dropped factor shows
# With a GPU the compiled kernels run, on CUDA tensors, and CUDA torch is the yardstick; without
# one, the interpreter on CPU tensors (conftest sets TRITON_INTERPRET=1).
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# Errors are relative to max(|truth|, floor). The loss (nats) is measured absolutely below 1;
# the scale's gradient is a sum of terms of size ~UPSTREAM that cancel on confident rows, so it
# is measured against at least 1% of that size (a missing term is still off by ~UPSTREAM).
FLOOR = {"loss": 1.0, "dscale": 0.01 * UPSTREAM}


@pytest.fixture(autouse=True)
def small_chunks(monkeypatch):
    """Several chunks even at N <= 257, so the chunked path's loop and merges are exercised.
    Autouse in every test file that imports it."""
    monkeypatch.setattr(clip_mod, "CHUNK_LOGITS", 1000)


# ----------------------------------------------------------------------------- inputs
def embeddings(n, d, dtype=torch.float64, near=None, noise=0.5):
    """(n, d) unit rows rounded to dtype; near: rows to perturb instead (confident pairs)."""
    x = torch.randn(n, d, dtype=torch.float64)
    if near is not None:
        x = near.double() + noise * x / d ** 0.5
    return F.normalize(x, dim=1).to(dtype)


class LaunchCounter:
    """Stands in for an autotuned kernel (`kernel[grid](...)`), counting its launches."""

    def __init__(self, kernel):
        self.kernel, self.launches = kernel, 0

    def __getitem__(self, grid):
        self.launches += 1
        return self.kernel[grid]


def count_launches(monkeypatch, module, name):
    """Replace module.name (an autotuned kernel) with a LaunchCounter for this test."""
    counter = LaunchCounter(getattr(module, name))
    monkeypatch.setattr(module, name, counter)
    return counter


# ----------------------------------------------------------------------------- error measures
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


# ----------------------------------------------------------------------------- runs
def run(loss_fn, impl, x, y, scale, grad_y=True, **kw):
    """Loss and gradients {loss, dx, dy, dscale} of loss_fn(x, y, scale, impl=impl, **kw) for
    fresh copies of x, y (trainable if grad_y) and scale on DEVICE. Asserts that no input,
    tensor keywords (targets) included, was modified."""
    x = x.detach().to(DEVICE, copy=True).requires_grad_()
    y = y.detach().to(DEVICE, copy=True).requires_grad_(grad_y)
    s = scale.detach().to(DEVICE, copy=True).requires_grad_()
    kw = {k: v.to(DEVICE) if isinstance(v, torch.Tensor) else v for k, v in kw.items()}
    inputs = [x, y, s] + [v for v in kw.values() if isinstance(v, torch.Tensor)]
    before = [t.detach().clone() for t in inputs]
    loss = loss_fn(x, y, s, impl=impl, **kw)
    loss.backward(torch.tensor(UPSTREAM, dtype=loss.dtype))
    for t, b in zip(inputs, before):
        assert torch.equal(t, b), f"{impl} modified an input"
    return {"loss": loss.detach(), "dx": x.grad, "dy": y.grad, "dscale": s.grad}


def check_against_truth(loss_fn, x, y, scale, impls=("triton", "chunked"), grad_y=True, **kw):
    """Each impl's loss and gradients against the fp64 reference, no worse than the reference
    run in x's dtype (assert_no_worse with SLACK[x.dtype] and FLOOR). scale: a float."""
    dtype, scale = x.dtype, torch.tensor(scale)
    truth = run(loss_fn, "torch", x.double(), y.double(), scale.double(), grad_y, **kw)
    native = run(loss_fn, "torch", x, y, scale, grad_y, **kw)
    what = " ".join(f"{k}={v}" for k, v in kw.items() if not isinstance(v, torch.Tensor))
    for impl in impls:
        got = run(loss_fn, impl, x, y, scale, grad_y, **kw)
        assert got["loss"].dtype == torch.float32 and got["loss"].shape == ()
        for name, want in truth.items():
            if want is None:  # dy of a frozen y: None by construction (see count_launches)
                continue
            assert_no_worse(f"{impl} {what} {name} ({dtype})", got[name], native[name], want,
                            SLACK[dtype], floor=FLOOR.get(name, 1e-30))
