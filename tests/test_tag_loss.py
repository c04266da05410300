"""kernels/tag_loss.py: soft-target softmax CE and BCE over K tags, fused Triton (the interpreter on
CPU) and chunked torch paths against an fp64 ground truth, native torch as the yardstick."""
import importlib
import math

import pytest
import torch

import kernels
from _harness import (DEVICE, check_against_truth, clip_mod, count_launches, diff_report,
                      embeddings, run, small_chunks)  # noqa: F401 (small_chunks: autouse)

tag_mod = importlib.import_module("kernels.tag_loss")


def tag_loss(x, w, scale, targets, kind="softmax", impl="auto", **kw):
    """kernels.tag_loss with the harness's argument order: (x, y, scale, **kw)."""
    return kernels.tag_loss(x, w, targets, scale, kind=kind, impl=impl, **kw)


def multi_hot(N, K, per_row=3.0, empty=0.2, dtype=torch.bool):
    """About per_row tags per row, a fraction `empty` of the rows without any."""
    y = torch.rand(N, K) < per_row / K
    y[torch.rand(N) < empty] = False
    return y.to(dtype)


# N: 1, and both sides of the interpreter's 64-row blocks; K: 1, 7 and 1000 (16 tag blocks,
# the last one partial); D: 48, 96, 123 against 64-wide slices; scale 100 (the models' cap)
# overflows a naive exp, and at 100 and 150 most random tags fall below the softmax loss's clamp.
# Each kind meets each N, K, D, dtype and both target dtypes somewhere, not in a full product.
@pytest.mark.parametrize("kind, N, K, D, scale, dtype, tdtype", [
    ("softmax", 1, 7, 48, 14.3, torch.float32, torch.bool),
    ("softmax", 31, 1000, 96, 100.0, torch.bfloat16, torch.bool),
    ("softmax", 100, 1, 123, 1.0, torch.float16, torch.float32),
    ("softmax", 257, 7, 48, 14.3, torch.float32, torch.float32),
    ("softmax", 67, 250, 48, 150.0, torch.float32, torch.bool),
    ("bce", 1, 1000, 123, 100.0, torch.float16, torch.float32),
    ("bce", 31, 7, 48, 1.0, torch.float32, torch.bool),
    ("bce", 100, 7, 96, 14.3, torch.bfloat16, torch.bool),
    ("bce", 257, 1, 96, 100.0, torch.float32, torch.float32),
])
def test_tag_loss_matches_fp64(kind, N, K, D, scale, dtype, tdtype):
    x, w = embeddings(N, D, dtype), embeddings(K, D, dtype)
    check_against_truth(tag_loss, x, w, scale, targets=multi_hot(N, K, dtype=tdtype), kind=kind)


# Confident rows: each image is a small perturbation of its one tag's embedding, so
# softmax - yhat (sigmoid - y) nearly cancels where the tag is.
@pytest.mark.parametrize("kind, dtype", [
    ("softmax", torch.float32), ("softmax", torch.bfloat16),
    ("bce", torch.float32), ("bce", torch.float16),
])
def test_tag_loss_confident_rows(kind, dtype):
    N, K, D = 64, 100, 96
    w = embeddings(K, D)
    tag = torch.randint(0, K, (N,))
    x = embeddings(N, D, near=w[tag])
    y = torch.zeros(N, K, dtype=torch.bool)
    y[torch.arange(N), tag] = True
    scale = 14.3 if kind == "softmax" else 30.0  # BCE needs a larger scale to be confident
    check_against_truth(tag_loss, x.to(dtype), w.to(dtype), scale, targets=y, kind=kind)


@pytest.mark.parametrize("kind", ["softmax", "bce"])
def test_frozen_tag_embeddings(kind, monkeypatch):
    # TagAlign's setting: W has no gradient, so the second backward launch (dW) is skipped
    mod, name = (clip_mod, "_ce_bwd") if kind == "softmax" else (tag_mod, "_bce_bwd")
    bwd = count_launches(monkeypatch, mod, name)
    x, w = embeddings(31, 48, torch.float32), embeddings(100, 48, torch.float32)
    check_against_truth(tag_loss, x, w, 14.3, grad_y=False, targets=multi_hot(31, 100),
                        kind=kind)
    assert bwd.launches == 1, f"{bwd.launches} backward launches for frozen W, expected 1"


@pytest.mark.parametrize("impl", ["torch", "triton", "chunked"])
def test_softmax_without_tags_is_zero_with_zero_gradients(impl):
    x, w = embeddings(31, 48, torch.float32), embeddings(7, 48, torch.float32)
    no_tags = torch.zeros(31, 7, dtype=torch.bool)
    got = run(tag_loss, impl, x, w, torch.tensor(14.3), targets=no_tags)
    assert got["loss"].item() == 0.0
    for name in ("dx", "dy", "dscale"):
        assert torch.equal(got[name], torch.zeros_like(got[name])), diff_report(
            name, got[name], torch.zeros_like(got[name]))


@pytest.mark.parametrize("impl", ["triton", "chunked"])
def test_rows_without_tags_count_in_the_softmax_mean(impl):
    # the official mean is over all N rows: an untagged row adds 0 and counts
    x, w = (embeddings(31, 96, torch.float32).to(DEVICE),
            embeddings(7, 96, torch.float32).to(DEVICE))
    y = multi_hot(31, 7, empty=0.4).to(DEVICE)
    has = y.any(1)
    assert 0 < has.sum() < 31
    s = torch.tensor(14.3, device=DEVICE)
    every = kernels.tag_loss(x, w, y, s, impl=impl)
    kept = kernels.tag_loss(x[has], w, y[has], s, impl=impl)
    assert torch.allclose(every * 31, kept * has.sum(), rtol=1e-6), (every.item(), kept.item())


def clamp_mix(N, K, D, scale):
    """Rows near their first tag (unclamped at `scale`) with a second tag that is clamped
    (probability below 1e-8) on about half of the rows; 1/8 of the rows untagged."""
    w = embeddings(K, D)
    first = torch.randint(0, K, (N,))
    x = embeddings(N, D, near=w[first], noise=0.3)
    y = torch.zeros(N, K, dtype=torch.bool)
    y[torch.arange(N), first] = True
    far = (x @ w.T).argmin(1)  # each row's least similar tag
    second = torch.rand(N) < 0.5
    y[torch.arange(N)[second], far[second]] = True
    y[torch.rand(N) < 0.125] = False
    p = (scale * x @ w.T).softmax(1)
    clamped = (p < 1e-8) & y
    assert clamped.any() and (y & ~clamped).any(), "the case must mix clamped and unclamped"
    return x, w, y


# Clamped and unclamped positives in one row: the clamped ones add -log 1e-8 and no gradient,
# and the row's LSE term is weighted by the mass that is not clamped.
@pytest.mark.parametrize("N, K, D, dtype, grad_w", [
    (67, 300, 96, torch.float32, True),
    (31, 1000, 48, torch.bfloat16, False),
    (1, 7, 123, torch.float16, True),
])
def test_clamped_and_unclamped_targets(N, K, D, dtype, grad_w):
    if N == 1:  # one row: its tag near, the other far
        x, w, y = clamp_mix(8, K, D, 100.0)
        keep = (y.sum(1) == 2).nonzero()[0]
        x, y = x[keep], y[keep]
    else:
        x, w, y = clamp_mix(N, K, D, 100.0)
    check_against_truth(tag_loss, x.to(dtype), w.to(dtype), 100.0, grad_y=grad_w, targets=y)


@pytest.mark.parametrize("impl", ["triton", "chunked"])
def test_without_the_clamp(impl):
    # min_prob=0: the plain soft-target CE, whose far targets keep their gradient
    x, w, y = clamp_mix(67, 300, 96, 100.0)
    x, w = x.float(), w.float()
    check_against_truth(tag_loss, x, w, 100.0, impls=(impl,), targets=y, min_prob=0.0)
    capped = kernels.tag_loss(x, w, y, torch.tensor(100.0), impl=impl)
    plain = kernels.tag_loss(x, w, y, torch.tensor(100.0), impl=impl, min_prob=0.0)
    assert plain > capped + 1, (plain.item(), capped.item())


def test_soft_target_weights():
    # float targets are weights: yhat = y / sum y, and BCE takes them as probabilities
    x, w = embeddings(31, 48, torch.float32), embeddings(7, 48, torch.float32)
    y = torch.rand(31, 7) * multi_hot(31, 7, dtype=torch.float32)
    for kind in ("softmax", "bce"):
        check_against_truth(tag_loss, x, w, 14.3, targets=y, kind=kind)


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
        (lambda: kernels.tag_loss(x, w, y, s, min_prob=1.5), "min_prob"),
    ]


@pytest.mark.parametrize("i", range(len(_bad_calls())))
def test_bad_input_gets_one_clear_line(i):
    call, word = _bad_calls()[i]
    with pytest.raises(ValueError) as info:
        call()
    msg = str(info.value)
    assert word in msg and "\n" not in msg, msg


# ---------------------------------------------------------------- the official semantics, by hand
# TagAlign's MultiClassificationLoss (models/tagalign/loss.py at 02757a4), which the softmax kind
# computes: -(softmax(Z).clamp(min=1e-8).log() * F.normalize(Y, p=1, dim=-1)).sum(-1).mean().
# With W = I and s = 1 the logits Z are the rows of x, so every expected value is written out.
NEG_LOG_1E8 = 18.420680743952367  # -log(1e-8): what a clamped target's probability adds


def by_hand(impl, Z, targets):
    """Loss and gradients (dx, dW, ds) of kernels.tag_loss(x = Z, W = I, s = 1), fp32."""
    x = torch.tensor(Z, dtype=torch.float32, device=DEVICE, requires_grad=True)
    w = torch.eye(x.shape[1], device=DEVICE, requires_grad=True)
    s = torch.tensor(1.0, device=DEVICE, requires_grad=True)
    loss = kernels.tag_loss(x, w, targets.to(DEVICE), s, impl=impl)
    loss.backward()
    return loss.item(), x.grad.cpu().double(), w.grad.cpu().double(), s.grad.item()


def check_by_hand(impl, Z, targets, loss, dZ):
    """dZ by hand; then dx = dZ W s = dZ, dW = s dZ^T x = dZ^T Z, ds = sum dZ * (x W^T) = sum dZ * Z."""
    Z, dZ = torch.tensor(Z, dtype=torch.float64), torch.tensor(dZ, dtype=torch.float64)
    got, dx, dw, ds = by_hand(impl, Z.tolist(), targets)
    assert abs(got - loss) <= 1e-6 * loss, (got, loss)  # fp32 log-sum-exp of O(1) logits
    ds = torch.tensor(ds, dtype=torch.float64)
    for name, g, want in (("dx", dx, dZ), ("dW", dw, dZ.T @ Z), ("ds", ds, (dZ * Z).sum())):
        assert torch.allclose(g, want, rtol=1e-5, atol=1e-7), diff_report(name, g, want)  # fp32 sums of O(1)


@pytest.mark.parametrize("impl", ["torch", "triton", "chunked"])
def test_untagged_rows_count_in_the_official_mean(impl):
    """Rows with 3, 2, 1 and 0 tags: the mean is over all 4 rows, the untagged one adding 0 to
    the loss and getting no gradient; dL/dZ_ij = (P_ij - yhat_ij) / 4 on the others."""
    l3, l2 = math.log(3), math.log(2)
    Z = [[0.0, 0.0, 0.0, 0.0],   # P = 1/4 each; tags 0, 1, 2: -log(1/4)
         [l3, 0.0, 0.0, 0.0],    # P = 1/2, 1/6, 1/6, 1/6; tags 0, 1: -(log(1/2) + log(1/6)) / 2
         [0.0, l2, 0.0, 0.0],    # P = 1/5, 2/5, 1/5, 1/5; tag 1: -log(2/5)
         [1.0, 2.0, 3.0, 4.0]]   # no tag
    targets = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0], [0, 1, 0, 0], [0, 0, 0, 0]], dtype=torch.bool)
    loss = (math.log(4) + math.log(12) / 2 + math.log(5 / 2)) / 4
    dZ = [[(1 / 4 - 1 / 3) / 4, (1 / 4 - 1 / 3) / 4, (1 / 4 - 1 / 3) / 4, (1 / 4) / 4],
          [(1 / 2 - 1 / 2) / 4, (1 / 6 - 1 / 2) / 4, (1 / 6) / 4, (1 / 6) / 4],
          [(1 / 5) / 4, (2 / 5 - 1) / 4, (1 / 5) / 4, (1 / 5) / 4],
          [0.0, 0.0, 0.0, 0.0]]
    check_by_hand(impl, Z, targets, loss, dZ)


@pytest.mark.parametrize("impl", ["torch", "triton", "chunked"])
def test_a_target_below_1e8_adds_log_1e8_and_no_gradient(impl):
    """Row 0's tag 2 has probability e^-30 / (2 + e^-30), about 5e-14: the official clamp makes it
    add -log(1e-8) x its weight 1/2 and pass no gradient, so the row's softmax gradient is scaled
    by the unclamped weight U_0 = 1/2: dL/dZ_0j = (P_0j U_0 - yhat_0j [j unclamped]) / B."""
    e = math.exp(-30.0)
    Z = [[0.0, 0.0, -30.0],      # tags 0 and 2; P = (1, 1, e^-30) / (2 + e^-30)
         [math.log(3), 0.0, 0.0]]  # tag 1; P = 3/5, 1/5, 1/5
    targets = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]])
    p0 = [1 / (2 + e), 1 / (2 + e), e / (2 + e)]
    loss = ((math.log(2 + e) + NEG_LOG_1E8) / 2 + math.log(5)) / 2
    dZ = [[(p0[0] / 2 - 1 / 2) / 2, (p0[1] / 2) / 2, (p0[2] / 2) / 2],  # tag 2 clamped: no -yhat term
          [(3 / 5) / 2, (1 / 5 - 1) / 2, (1 / 5) / 2]]
    check_by_hand(impl, Z, targets, loss, dZ)
