"""kernels/clip_loss.py: the fused Triton path (the interpreter on CPU) and the chunked torch path
against an fp64 ground truth, with native torch in the same dtype as the yardstick."""
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import kernels
from _harness import (DEVICE, check_against_truth, clip_mod, count_launches, diff_report,
                      embeddings, rel_err, small_chunks)  # noqa: F401 (small_chunks: autouse)


# ----------------------------------------------------------------------------- symmetric loss
# N covers 1, 2, both sides of the interpreter's 64-row blocks (31, 64, 100, 257); D covers
# one, two and a partial 64-wide slice (48, 96, 123); scale 100 overflows a naive exp in fp32.
@pytest.mark.parametrize("N, D, scale, dtype", [
    (1, 48, 14.3, torch.float32),
    (2, 96, 1.0, torch.bfloat16),
    (31, 123, 100.0, torch.float16),
    (100, 48, 100.0, torch.bfloat16),
    (257, 96, 14.3, torch.float32),
])
def test_clip_loss_matches_fp64(N, D, scale, dtype):
    x, y = embeddings(N, D, dtype), embeddings(N, D, dtype)
    check_against_truth(kernels.clip_loss, x, y, scale)


# Confident rows: every text is a small perturbation of its image, so softmax - onehot nearly
# cancels (loss ~1e-3 at scale 14.3, ~1e-30 at 100) -- where a careless kernel loses the gradient.
@pytest.mark.parametrize("N, D, scale, dtype", [
    (64, 96, 14.3, torch.float32),
    (64, 96, 14.3, torch.bfloat16),
    (31, 48, 100.0, torch.float32),
    (31, 48, 14.3, torch.float16),
])
def test_clip_loss_confident_rows(N, D, scale, dtype):
    x = embeddings(N, D, torch.float64)
    y = embeddings(N, D, dtype, near=x)
    check_against_truth(kernels.clip_loss, x.to(dtype), y, scale)


@pytest.mark.parametrize("impl", ["triton", "chunked"])
def test_confident_row_losses_keep_their_digits(impl):
    # Per-row losses of about 1e-5: the fused op keeps the log-sum as log1p of the sum without
    # the max's 1 (kernels/clip_loss.py docstring), so they come out to ~1e-5 relative. torch
    # rounds 1 + 1e-5 in fp32 first and is off by ~1e-3 here; log(1 + l) gave 5e-4.
    x = embeddings(64, 96, torch.float64)
    y = embeddings(64, 96, torch.float32, near=x).to(DEVICE)
    x, s, labels = x.float().to(DEVICE), torch.tensor(20.0, device=DEVICE), torch.arange(64)
    labels = labels.to(DEVICE)
    X = s.double() * x.double() @ y.double().T
    rows, cols, _ = clip_mod.scaled_matmul_ce(x, y, s, symmetric=True, impl=impl)
    for got, want in ((rows, F.cross_entropy(X, labels, reduction="none")),
                      (cols, F.cross_entropy(X.T, labels, reduction="none"))):
        assert want.max() < 1e-3  # the rows really are confident
        err = rel_err(got, want)
        assert err < 5e-5, f"relative error {err:.2e}\n" + diff_report("rows", got, want)


# ----------------------------------------------------------------------------- one-sided loss
@pytest.mark.parametrize("n, M, offset, D, scale, dtype", [
    (1, 257, 256, 48, 14.3, torch.float32),
    (31, 100, 40, 96, 100.0, torch.bfloat16),
    (100, 100, 0, 123, 1.0, torch.float16),
])
def test_one_sided_matches_fp64(n, M, offset, D, scale, dtype):
    q, k = embeddings(n, D, dtype), embeddings(M, D, dtype)
    check_against_truth(kernels.clip_loss_one_sided, q, k, scale, offset=offset)


def test_one_sided_confident_rows():
    k = embeddings(128, 96, torch.float64)
    q = embeddings(64, 96, torch.float32, near=k[64:])  # the positive of row i is key 64 + i
    check_against_truth(kernels.clip_loss_one_sided, q, k.float(), 14.3, offset=64)


def test_one_sided_frozen_keys_and_float_scale(monkeypatch):
    # keys without gradient: the second backward launch (dk) is skipped; a Python float as scale
    bwd = count_launches(monkeypatch, clip_mod, "_ce_bwd")
    q = embeddings(31, 48, torch.float32).to(DEVICE)
    k = embeddings(100, 48, torch.float32).to(DEVICE)
    grads = {}
    for impl in ("torch", "triton", "chunked"):
        qq = q.clone().requires_grad_()
        loss = kernels.clip_loss_one_sided(qq, k, 14.3, offset=50, impl=impl)
        loss.backward()
        grads[impl] = (loss.detach(), qq.grad)
    for impl in ("triton", "chunked"):
        for a, b, what in zip(grads[impl], grads["torch"], ("loss", "dq")):
            assert torch.allclose(a, b, rtol=1e-5, atol=1e-7), diff_report(f"{impl} {what}", a, b)
    assert bwd.launches == 1, f"{bwd.launches} backward launches for frozen keys, expected 1"


def test_two_one_sided_calls_make_the_symmetric_loss():
    x, y, s = (embeddings(31, 96, torch.float32).to(DEVICE),
               embeddings(31, 96, torch.float32).to(DEVICE), 14.3)
    both = (kernels.clip_loss_one_sided(x, y, s, impl="triton")
            + kernels.clip_loss_one_sided(y, x, s, impl="triton")) / 2
    sym = kernels.clip_loss(x, y, s, impl="triton")
    assert torch.allclose(both, sym, rtol=1e-6), (both.item(), sym.item())


def test_sharded_one_sided_is_the_full_loss():
    # open_clip's local loss: rank r scores its n images against all gathered texts, offset r n
    x, y, n, s = embeddings(30, 48, torch.float64), embeddings(30, 48, torch.float64), 10, 14.3
    shards = [kernels.clip_loss_one_sided(x[r * n:(r + 1) * n], y, s, offset=r * n,
                                          impl="chunked") for r in range(3)]
    full = F.cross_entropy(s * x @ y.T, torch.arange(30))
    assert torch.allclose(torch.stack(shards).mean(), full, rtol=1e-12)


# ----------------------------------------------------------------------------- dispatch, errors
def test_auto_dispatch_on_cpu(monkeypatch):
    x, y, s = embeddings(31, 48, torch.float32), embeddings(31, 48, torch.float32), 14.3
    ref = kernels.clip_loss(x, y, s, impl="torch")
    assert torch.equal(kernels.clip_loss(x, y, s), ref)  # small: the reference
    monkeypatch.setattr(clip_mod, "AUTO_CHUNK_LOGITS", 0)
    assert torch.equal(kernels.clip_loss(x, y, s), kernels.clip_loss(x, y, s, impl="chunked"))


def _bad_calls():
    x, y, s = torch.randn(4, 8), torch.randn(4, 8), torch.tensor(2.0)
    return [
        (lambda: kernels.clip_loss(x, y, s, impl="cuda"), ValueError, "impl"),
        (lambda: kernels.clip_loss(x[0], y, s), ValueError, "image_emb"),
        (lambda: kernels.clip_loss(x, y[:, :5], s), ValueError, "D"),
        (lambda: kernels.clip_loss(x, y[:3], s), ValueError, "rows"),
        (lambda: kernels.clip_loss(x, y.double(), s), ValueError, "dtype"),
        (lambda: kernels.clip_loss(x, y, s.reshape(1)), ValueError, "scale"),
        (lambda: kernels.clip_loss(x, torch.randn(0, 8), s), ValueError, "text_emb"),
        (lambda: kernels.clip_loss(x.double(), y.double(), s, impl="triton"), ValueError,
         "float64"),
        (lambda: kernels.clip_loss_one_sided(x, y, s, offset=1), ValueError, "offset"),
        (lambda: kernels.clip_loss_one_sided(x, y, s, offset=-1), ValueError, "offset"),
    ]


@pytest.mark.parametrize("i", range(len(_bad_calls())))
def test_bad_input_gets_one_clear_line(i):
    call, exc, word = _bad_calls()[i]
    with pytest.raises(exc) as info:
        call()
    msg = str(info.value)
    assert word in msg and "\n" not in msg, msg


def test_triton_on_cpu_without_interpreter_says_so(monkeypatch):
    monkeypatch.setattr(clip_mod, "INTERPRET", False)
    x = embeddings(4, 8, torch.float32)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET") as info:
        kernels.clip_loss(x, x, 1.0, impl="triton")
    assert "\n" not in str(info.value)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only import path")
def test_import_turns_on_the_interpreter_without_cuda():
    # A fresh process without conftest's setting: `import kernels` alone must make impl="triton"
    # work on CPU tensors (through the interpreter).
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    code = ("import os, torch, kernels\n"
            "assert os.environ['TRITON_INTERPRET'] == '1' and kernels.INTERPRET\n"
            "x = torch.nn.functional.normalize(torch.randn(5, 16), dim=1)\n"
            "a = kernels.clip_loss(x, x, torch.tensor(3.0), impl='triton')\n"
            "b = kernels.clip_loss(x, x, torch.tensor(3.0), impl='torch')\n"
            "assert torch.allclose(a, b, rtol=1e-5), (a, b)\n")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
