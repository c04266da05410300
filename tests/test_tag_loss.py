"""kernels/tag_loss.py: soft-target softmax CE and BCE over K tags, fused Triton (the interpreter on
CPU) and chunked torch paths against an fp64 ground truth, native torch as the yardstick."""
import importlib

import pytest
import torch
import torch.nn.functional as F

import kernels
from _diag import assert_no_worse, diff_report

clip_mod = importlib.import_module("kernels.clip_loss")

# As in test_clip_loss.py: half an ulp of the gradient's final rounding in fp16/bf16, 1e-6 fp32.
SLACK = {torch.float32: 1e-6, torch.float16: 2e-4, torch.bfloat16: 1e-3}
UPSTREAM = 0.7  # a non-unit upstream gradient, so a dropped factor shows
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # as in test_clip_loss.py
# Errors are relative to max(|truth|, floor). The loss (nats) is measured absolutely below 1;
# the scale's gradient is a sum of terms of size ~UPSTREAM that cancel on confident rows, so it
# is measured against at least 1% of that size (a missing term is still off by ~UPSTREAM).
FLOOR = {"loss": 1.0, "dscale": 0.01 * UPSTREAM}


@pytest.fixture(autouse=True)
def _small_chunks(monkeypatch):
    monkeypatch.setattr(clip_mod, "CHUNK_LOGITS", 1000)  # several chunks for the chunked path


def unit_rows(n, d, dtype=torch.float64):
    return F.normalize(torch.randn(n, d, dtype=torch.float64), dim=1).to(dtype)


def multi_hot(N, K, per_row=3.0, empty=0.2, dtype=torch.bool):
    """About per_row tags per row, a fraction `empty` of the rows without any."""
    y = torch.rand(N, K) < per_row / K
    y[torch.rand(N) < empty] = False
    return y.to(dtype)


def run(impl, x, w, targets, scale, kind, grad_w=True):
    x = x.detach().to(DEVICE, copy=True).requires_grad_()
    w = w.detach().to(DEVICE, copy=True).requires_grad_(grad_w)
    s = scale.detach().to(DEVICE, copy=True).requires_grad_()
    targets = targets.to(DEVICE)
    before = [t.detach().clone() for t in (x, w, targets, s)]
    loss = kernels.tag_loss(x, w, targets, s, kind=kind, impl=impl)
    loss.backward(torch.tensor(UPSTREAM, dtype=loss.dtype))
    for t, b in zip((x, w, targets, s), before):  # the inputs, targets above all, are untouched
        assert torch.equal(t, b), f"{impl} {kind} modified an input"
    return {"loss": loss.detach(), "dx": x.grad, "dw": w.grad, "dscale": s.grad}


def check_against_truth(x, w, targets, scale, kind, dtype, grad_w=True):
    scale = torch.tensor(scale)
    truth = run("torch", x.double(), w.double(), targets, scale.double(), kind, grad_w)
    native = run("torch", x, w, targets, scale, kind, grad_w)
    for impl in ("triton", "chunked"):
        got = run(impl, x, w, targets, scale, kind, grad_w)
        assert got["loss"].dtype == torch.float32 and got["loss"].shape == ()
        for name, want in truth.items():
            if want is None:
                assert got[name] is None, f"{impl} {name}: expected no gradient"
                continue
            floor = FLOOR.get(name, 1e-30)
            assert_no_worse(f"{impl} {kind} {name} ({dtype})", got[name], native[name], want,
                            SLACK[dtype], floor=floor)


# N: 1, and both sides of the interpreter's 64-row blocks; K: 1, 7 and 1000 (16 tag blocks,
# the last one partial); D: 48, 96, 123 against 64-wide slices; scale 100 overflows a naive exp.
# Each kind meets each N, K, D, dtype and both target dtypes somewhere, not in a full product.
@pytest.mark.parametrize("kind, N, K, D, scale, dtype, tdtype", [
    ("softmax", 1, 7, 48, 14.3, torch.float32, torch.bool),
    ("softmax", 31, 1000, 96, 100.0, torch.bfloat16, torch.bool),
    ("softmax", 100, 1, 123, 1.0, torch.float16, torch.float32),
    ("softmax", 257, 7, 48, 14.3, torch.float32, torch.float32),
    ("bce", 1, 1000, 123, 100.0, torch.float16, torch.float32),
    ("bce", 31, 7, 48, 1.0, torch.float32, torch.bool),
    ("bce", 100, 7, 96, 14.3, torch.bfloat16, torch.bool),
    ("bce", 257, 1, 96, 100.0, torch.float32, torch.float32),
])
def test_tag_loss_matches_fp64(kind, N, K, D, scale, dtype, tdtype):
    x, w = unit_rows(N, D, dtype), unit_rows(K, D, dtype)
    check_against_truth(x, w, multi_hot(N, K, dtype=tdtype), scale, kind, dtype)


# Confident rows: each image is a small perturbation of its one tag's embedding, so
# softmax - yhat (sigmoid - y) nearly cancels where the tag is.
@pytest.mark.parametrize("kind, dtype", [
    ("softmax", torch.float32), ("softmax", torch.bfloat16),
    ("bce", torch.float32), ("bce", torch.float16),
])
def test_tag_loss_confident_rows(kind, dtype):
    N, K, D = 64, 100, 96
    w = unit_rows(K, D)
    tag = torch.randint(0, K, (N,))
    x = F.normalize(w[tag] + 0.5 * torch.randn(N, D, dtype=torch.float64) / D ** 0.5, dim=1)
    y = torch.zeros(N, K, dtype=torch.bool)
    y[torch.arange(N), tag] = True
    scale = 14.3 if kind == "softmax" else 30.0  # BCE needs a larger scale to be confident
    check_against_truth(x.to(dtype), w.to(dtype), y, scale, kind, dtype)


@pytest.mark.parametrize("kind", ["softmax", "bce"])
def test_frozen_tag_embeddings(kind):
    # TagAlign's setting: W has no gradient, the second backward launch is skipped
    x, w = unit_rows(31, 48, torch.float32), unit_rows(100, 48, torch.float32)
    check_against_truth(x, w, multi_hot(31, 100), 14.3, kind, torch.float32, grad_w=False)


@pytest.mark.parametrize("impl", ["torch", "triton", "chunked"])
def test_softmax_without_tags_is_zero_with_zero_gradients(impl):
    x, w = unit_rows(31, 48, torch.float32), unit_rows(7, 48, torch.float32)
    got = run(impl, x, w, torch.zeros(31, 7, dtype=torch.bool), torch.tensor(14.3), "softmax")
    assert got["loss"].item() == 0.0
    for name in ("dx", "dw", "dscale"):
        assert torch.equal(got[name], torch.zeros_like(got[name])), diff_report(
            name, got[name], torch.zeros_like(got[name]))


@pytest.mark.parametrize("impl", ["triton", "chunked"])
def test_rows_without_tags_are_left_out_of_the_softmax_mean(impl):
    x, w = unit_rows(31, 96, torch.float32).to(DEVICE), unit_rows(7, 96, torch.float32).to(DEVICE)
    y = multi_hot(31, 7, empty=0.4).to(DEVICE)
    has = y.any(1)
    assert 0 < has.sum() < 31
    s = torch.tensor(14.3, device=DEVICE)
    every = kernels.tag_loss(x, w, y, s, impl=impl)
    kept = kernels.tag_loss(x[has], w, y[has], s, impl=impl)
    assert torch.allclose(every, kept, rtol=1e-6), (every.item(), kept.item())


def test_soft_target_weights():
    # float targets are weights: yhat = y / sum y, and BCE takes them as probabilities
    x, w = unit_rows(31, 48, torch.float32), unit_rows(7, 48, torch.float32)
    y = torch.rand(31, 7) * multi_hot(31, 7, dtype=torch.float32)
    for kind in ("softmax", "bce"):
        check_against_truth(x, w, y, 14.3, kind, torch.float32)


def _bad_calls():
    x, w, s = torch.randn(4, 8), torch.randn(7, 8), torch.tensor(2.0)
    y = torch.zeros(4, 7, dtype=torch.bool)
    return [
        (lambda: kernels.tag_loss(x, w, y, s, kind="focal"), "kind"),
        (lambda: kernels.tag_loss(x, w, y[:, :6], s), "targets"),
        (lambda: kernels.tag_loss(x, w, y.long(), s), "targets"),
        (lambda: kernels.tag_loss(x, w[:, :5], y, s), "D"),
        (lambda: kernels.tag_loss(x, w, y, s, impl="fast"), "impl"),
        (lambda: kernels.tag_loss(x, w.half(), y, s), "dtype"),
        (lambda: kernels.tag_loss(x, w, y, torch.ones(2)), "scale"),
    ]


@pytest.mark.parametrize("i", range(len(_bad_calls())))
def test_bad_input_gets_one_clear_line(i):
    call, word = _bad_calls()[i]
    with pytest.raises(ValueError) as info:
        call()
    msg = str(info.value)
    assert word in msg and "\n" not in msg, msg
