"""Multi-tag classification loss over K tags that never builds the N x K logits.

Math
----
Image embeddings I (N, D), tag embeddings W (K, D) (L2-normalised rows; frozen in TagAlign),
multi-hot targets Y (N, K), a scale s: logits Z = s I W^T.

Soft-target softmax CE, as TagAlign's code computes it (MultiClassificationLoss in
models/tagalign/loss.py of Qinying-Liu/TagAlign at 02757a4: `-(softmax(Z).clamp(1e-8).log() *
F.normalize(Y, p=1)).sum(-1).mean()`): with n_i = sum_k Y_ik, yhat_i = Y_i / n_i (0 for a row
without tags) and P = softmax(Z) over the K tags,

    L_i = -sum_k yhat_ik log max(P_ik, p_min) = sum_k yhat_ik min(LSE_i - Z_ik, -log p_min),
    L = (1/N) sum_i L_i      over ALL N rows, p_min = 1e-8.

Two quirks of the official loss are kept: a row without tags adds 0 but counts in the mean, and
a tag whose probability is below 1e-8 (an image far from a tag its caption names: parsing noise)
adds -log 1e-8 = 18.42 and no gradient. The gradient is dL/dZ_ij = (U_i P_ij - yhat_ij
[P_ij >= p_min]) / N with U_i = sum_k yhat_ik [P_ik >= p_min], the target mass not clamped.
min_prob=0 drops the clamp (then L_i is the plain soft-target CE). BCE (the ablation,
BCEWithLogits' mean):

    L = 1/(N K) sum_ik [softplus(Z_ik) - Y_ik Z_ik].

Both are a dense reduction over all N K logits plus the positives' sum sum_k Y_ik Z_ik
(Cut Cross-Entropy's split into an LSE and an indexed dot, Wijmans et al. 2024). The sparse
positives are picked out of each tile with the targets tile (1 byte per logit for bool targets,
read next to 2 D flops per logit), not gathered with autograd: softmax - yhat (sigmoid - y) must
be formed in fp32 before G is rounded for the dot (see clip_loss.py).
- softmax: L_i and n_i come from ``scaled_matmul_ce`` of clip_loss.py, one-sided with dense
  targets and the cap -log p_min on each positive's cross-entropy: the same kernels as the
  contrastive loss (its docstring's "Capped positives" derives the cap's forward and backward).
- BCE: the kernels below give the row sums b_i = sum_k [softplus(Z_ik) - Y_ik Z_ik], each term
  formed per element (as BCEWithLogits does, so confident logits do not cancel in a sum).
  Gradient: G_ik = (sigmoid(Z_ik) - Y_ik) a_i, dI = s G W, dW = s G^T I, ds = sum G_ik <I_i, W_k>.

Tiling: as in clip_loss.py. Forward: one program per BLOCK_M rows, loop over BLOCK_N tag blocks,
fp32 tile over BLOCK_K slices of D, softplus(z) = max(z, 0) + log1p(exp(-|z|)) in the epilogue
(log1p written out: libdevice's does not run in the interpreter). Backward: one kernel launched
for dI (programs own image rows) and, only if W needs a gradient, again with the roles swapped
for dW (programs own tag rows); G in [-1, 1] (after dividing by g = max |a|) feeds the fp16/bf16
dot, g and s are applied in the epilogue; the scale gradient is summed per program.
No atomics. Work: forward 1 matmul unit, backward 2 (4 when W is trainable).
The GPU configs, and the pruning that keeps those that fit the device's shared memory, are
clip_loss.py's (its "Configs" section): the tiles and the dq product have the same shapes.

Memory (bytes beyond the inputs; b = bytes per input element)
-------------------------------------------------------------
Fused: about 40 N (statistics per row) + 4 N D fp32 gradient + b N D cast [+ (4 + b) K D when
W trains].
Eager reference: Z in fp32 (4 N K, kept), the float targets and their normalisation
(2 x 4 N K), the log-softmax (4 N K, kept), b N K for the matmul output and 4 N K per gradient:
about 16-28 N K bytes -- 5-9 GiB at N = 32768, K = 10000, against about 0.1 GiB fused (bf16,
frozen W). The bool targets themselves (N K bytes) are an input to both.

References (ideas, not code): Cut Cross-Entropy (Wijmans et al., 2024), FlashAttention's
online softmax, Inf-CL, Liger-Kernel's fused linear cross-entropy.
"""
import math

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from .clip_loss import (BWD_CONFIGS, BWD_MIN_BLOCK_M, FWD_BLOCK_M, FWD_CONFIGS, INTERPRET,
                        _acc_dtype, _dot_tile, _log1p, _row_chunks, check_pair, check_triton,
                        dot_precision, pick_impl, prune_configs, scaled_matmul_ce, targets_arg)

KINDS = ("softmax", "bce")
MIN_PROB = 1e-8  # the official clamp on each tag's probability before the log


# ----------------------------------------------------------------------------- reference
def tag_loss_ref(image_emb, tag_emb, targets, scale, kind="softmax", min_prob=MIN_PROB):
    """The readable version: build the (N, K) logits, then the official soft-target CE or BCE
    with logits. The official log(max(softmax, p_min)) is taken as max(log_softmax, log p_min):
    the same function and gradient (log is monotonic), without log(softmax)'s rounding on
    confident rows.

    The matmul runs in the input dtype (as under autocast), the losses in fp32.
    """
    acc = _acc_dtype(image_emb.dtype)
    logits = scale * (image_emb @ tag_emb.T).to(acc)  # (N, K)
    y = targets.to(acc)
    if kind == "bce":
        return F.binary_cross_entropy_with_logits(logits, y)
    yhat = F.normalize(y, p=1, dim=1)  # rows sum to 1; a row without tags stays 0
    logp = logits.log_softmax(1)
    if min_prob:
        logp = logp.clamp(min=math.log(min_prob))  # no gradient where clamped
    return -(logp * yhat).sum(1).mean()  # over all N rows


# ----------------------------------------------------------------------------- chunked torch path
def _bce_fwd_chunked(x, w, scale, targets):
    acc = _acc_dtype(x.dtype)
    xf, wf, s = x.to(acc), w.to(acc), scale.to(acc)
    rows = torch.empty(x.shape[0], dtype=acc, device=x.device)
    with torch.autocast(x.device.type, enabled=False):
        for i0, i1 in _row_chunks(x.shape[0], w.shape[0]):
            Z = (xf[i0:i1] @ wf.T).mul_(s)  # (rows, K)
            t = targets[i0:i1].to(acc, copy=True).mul_(Z)  # Y * Z (a copy: never the caller's)
            rows[i0:i1] = F.softplus(Z).sub_(t).sum(1)
    return rows


def _bce_bwd_chunked(x, w, scale, targets, a, need_dw):
    acc = _acc_dtype(x.dtype)
    xf, wf, s = x.to(acc), w.to(acc), scale.to(acc)
    dx = torch.empty_like(xf)
    dw = torch.zeros_like(wf) if need_dw else None
    ds = torch.zeros((), dtype=acc, device=x.device)
    with torch.autocast(x.device.type, enabled=False):
        for i0, i1 in _row_chunks(x.shape[0], w.shape[0]):
            A = xf[i0:i1] @ wf.T  # (rows, K) unscaled cosines
            G = (A * s).sigmoid_().sub_(targets[i0:i1].to(acc)).mul_(a[i0:i1, None])
            dx[i0:i1] = s * (G @ wf)
            if need_dw:
                dw += s * (G.T @ xf[i0:i1])
            ds += G.mul_(A).sum()  # G is spent: no temporary
    return dx.to(x.dtype), (dw.to(w.dtype) if need_dw else None), ds


# ----------------------------------------------------------------------------- Triton kernels
@triton.jit
def _bce_fwd_kernel(x_ptr, w_ptr,        # x (N, D), w (K, D), same dtype
                    scale_ptr,           # () s
                    t_ptr,               # (N, K) targets Y, any real dtype
                    rows_ptr,            # (N,) fp32 out: sum_k softplus(Z_ik) - Y_ik Z_ik
                    N, K, D,
                    stride_x, stride_w,  # row strides of x and w (elements)
                    stride_tn, stride_tk,  # strides of Y
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                    UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    pid = tl.program_id(0)
    offs_m = pid.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < N
    s = tl.load(scale_ptr).to(tl.float32)
    total = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for n0 in range(0, K, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N).to(tl.int64)
        mask_n = offs_n < K
        mask_mn = mask_m[:, None] & mask_n[None, :]
        acc = _dot_tile(x_ptr, w_ptr, offs_m, offs_n, mask_m, mask_n, D, stride_x, stride_w,
                        BLOCK_M, BLOCK_N, BLOCK_K, UPCAST, PRECISION)
        z = s * acc
        t = tl.load(t_ptr + offs_m[:, None] * stride_tn + offs_n[None, :] * stride_tk,
                    mask=mask_mn, other=0).to(tl.float32)
        # softplus(z) - t z, with softplus(z) = max(z, 0) + log1p(exp(-|z|)): stable, and
        # log1p keeps the tiny loss of a confident logit (log(1 + 1e-9) would round to 0)
        bce = tl.maximum(z, 0.0) - t * z + _log1p(tl.exp(-tl.abs(z)))
        total += tl.sum(tl.where(mask_mn, bce, 0.0), axis=1)
    tl.store(rows_ptr + offs_m, total, mask=mask_m)


@triton.jit
def _bce_bwd_kernel(q_ptr, k_ptr,        # q (Nq, D): the side whose gradient we write; k (Nk, D)
                    scale_ptr,           # () s
                    gscale_ptr,          # () g: a was divided by g
                    t_ptr,               # targets Y, read as Y[q row, k row]
                    a_ptr,               # (N,) upstream grad / g of the row sums (image rows)
                    dq_ptr,              # (Nq, D) fp32 out: s g sum_j G_ij k_j
                    ds_ptr,              # (cdiv(Nq, 32),) fp32 out: per-program sum G <q, k>
                    Nq, Nk, D,
                    stride_q, stride_k, stride_dq,
                    stride_tq, stride_tk,  # strides of Y along q rows and along k rows
                    ROWS_ON_Q: tl.constexpr,  # q holds the image rows (else k does)
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                    BLOCK_D: tl.constexpr,  # next power of two >= D
                    UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    pid = tl.program_id(0)
    offs_m = pid.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < Nq
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < D
    s = tl.load(scale_ptr).to(tl.float32)
    if ROWS_ON_Q:
        a_q = tl.load(a_ptr + offs_m, mask=mask_m, other=0.0)[:, None]
    dq = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    ds = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for n0 in range(0, Nk, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N).to(tl.int64)
        mask_n = offs_n < Nk
        mask_mn = mask_m[:, None] & mask_n[None, :]
        acc = _dot_tile(q_ptr, k_ptr, offs_m, offs_n, mask_m, mask_n, D, stride_q, stride_k,
                        BLOCK_M, BLOCK_N, BLOCK_K, UPCAST, PRECISION)  # (BLOCK_M, BLOCK_N)
        z = s * acc
        e = tl.exp(-tl.abs(z))  # stable sigmoid: never exp of a large positive number
        sig = tl.where(z >= 0, 1.0 / (1.0 + e), e / (1.0 + e))
        t = tl.load(t_ptr + offs_m[:, None] * stride_tq + offs_n[None, :] * stride_tk,
                    mask=mask_mn, other=0).to(tl.float32)
        if ROWS_ON_Q:
            G = (sig - t) * a_q  # sigmoid - y in fp32, before any rounding
        else:
            G = (sig - t) * tl.load(a_ptr + offs_n, mask=mask_n, other=0.0)[None, :]
        G = tl.where(mask_mn, G, 0.0)
        ds += tl.sum(G * acc, axis=1)
        k_blk = tl.load(k_ptr + offs_n[:, None] * stride_k + offs_d[None, :],
                        mask=mask_n[:, None] & mask_d[None, :], other=0.0)  # (BLOCK_N, BLOCK_D)
        if UPCAST:
            k_blk = k_blk.to(tl.float32)
        dq = tl.dot(G.to(k_blk.dtype), k_blk, dq, input_precision=PRECISION)
    g = tl.load(gscale_ptr).to(tl.float32)
    tl.store(dq_ptr + offs_m[:, None] * stride_dq + offs_d[None, :], dq * (s * g),
             mask=mask_m[:, None] & mask_d[None, :])
    tl.store(ds_ptr + pid, tl.sum(ds, axis=0))


# Same block sizes, configs and shared-memory pruning as clip_loss.py (see there): the tiles
# and the dq product have the same shapes.
_bce_fwd = triton.autotune(FWD_CONFIGS, key=["N", "K", "D"],
                           prune_configs_by={"early_config_prune": prune_configs})(
    _bce_fwd_kernel)
_bce_bwd = triton.autotune(BWD_CONFIGS, key=["Nq", "Nk", "D", "ROWS_ON_Q"],
                           reset_to_zero=["ds_ptr"],
                           prune_configs_by={"early_config_prune": prune_configs})(
    _bce_bwd_kernel)


# ----------------------------------------------------------------------------- launchers
def _bce_fwd_triton(x, w, scale, targets):
    N, D = x.shape
    rows = torch.empty(N, dtype=torch.float32, device=x.device)
    t = targets_arg(targets)
    _bce_fwd[(triton.cdiv(N, FWD_BLOCK_M),)](
        x, w, scale, t, rows, N, w.shape[0], D, x.stride(0), w.stride(0),
        t.stride(0), t.stride(1), BLOCK_M=FWD_BLOCK_M,
        UPCAST=INTERPRET and x.dtype == torch.bfloat16, PRECISION=dot_precision(x.dtype))
    return rows


def _bce_bwd_triton(q, k, scale, g, targets, a, rows_on_q):
    """dq (fp32) = s g sum_j G_ij k_j and the scale-gradient sum; targets indexed [q, k]."""
    Nq, D = q.shape
    dq = torch.empty((Nq, D), dtype=torch.float32, device=q.device)
    ds = torch.zeros(triton.cdiv(Nq, BWD_MIN_BLOCK_M), dtype=torch.float32, device=q.device)
    t = targets_arg(targets)
    grid = lambda meta: (triton.cdiv(Nq, meta["BLOCK_M"]),)  # noqa: E731
    _bce_bwd[grid](
        q, k, scale, g, t, a, dq, ds, Nq, k.shape[0], D,
        q.stride(0), k.stride(0), dq.stride(0), t.stride(0), t.stride(1),
        ROWS_ON_Q=rows_on_q, BLOCK_D=max(16, triton.next_power_of_2(D)),
        UPCAST=INTERPRET and q.dtype == torch.bfloat16, PRECISION=dot_precision(q.dtype))
    return dq, ds.sum()


# ----------------------------------------------------------------------------- autograd
class ScaledMatmulBCE(torch.autograd.Function):
    """(x, w, s, Y) -> (N,) row sums of softplus(Z_ik) - Y_ik Z_ik with Z = s x w^T."""

    @staticmethod
    def forward(ctx, x, w, scale, targets, impl):
        ctx.save_for_backward(x, w, scale, targets)
        ctx.impl = impl
        fwd = _bce_fwd_triton if impl == "triton" else _bce_fwd_chunked
        return fwd(x, w, scale, targets)

    @staticmethod
    def backward(ctx, a):
        x, w, scale, targets = ctx.saved_tensors
        need_dx, need_dw, need_ds = ctx.needs_input_grad[:3]
        a = a.to(_acc_dtype(x.dtype))
        dx = dw = ds = None
        if ctx.impl != "triton":
            dx, dw, ds = _bce_bwd_chunked(x, w, scale, targets, a, need_dw)
        else:
            g = a.abs().max().float().clamp(min=torch.finfo(torch.float32).tiny)
            a = a.float() / g  # G in [-1, 1] for the fp16/bf16 dot
            if need_dx or need_ds:
                dx, ds = _bce_bwd_triton(x, w, scale, g, targets, a, True)
                dx, ds = dx.to(x.dtype), ds * g
            if need_dw:
                dw, _ = _bce_bwd_triton(w, x, scale, g, targets.T, a, False)
                dw = dw.to(w.dtype)
        ds = ds.to(scale.dtype).reshape(scale.shape) if need_ds else None
        return (dx if need_dx else None), dw, ds, None, None


# ----------------------------------------------------------------------------- public API
def tag_loss(image_emb, tag_emb, targets, scale, kind="softmax", impl="auto", min_prob=MIN_PROB):
    """Multi-tag loss of image_emb (N, D) against tag_emb (K, D) with logits scale I W^T.

    targets: dense (N, K) multi-hot, bool or float (nonnegative weights). kind: "softmax"
    (TagAlign's soft-target CE: a mean over all N rows, each tag's probability clamped at
    min_prob before the log; 0 drops the clamp) or "bce" (BCEWithLogits, mean over N K). scale:
    0-d tensor holding the multiplier. impl: as in clip_loss. Returns the 0-d fp32 loss (fp64
    for fp64 inputs), differentiable in image_emb, tag_emb (when it requires grad) and scale.
    """
    scale = check_pair("tag_loss", "image_emb", image_emb, "tag_emb", tag_emb, scale)
    N, K = image_emb.shape[0], tag_emb.shape[0]
    if not isinstance(targets, torch.Tensor) or tuple(targets.shape) != (N, K) or not (
            targets.dtype == torch.bool or targets.is_floating_point()):
        got = (f"{tuple(targets.shape)} {targets.dtype}" if isinstance(targets, torch.Tensor)
               else type(targets).__name__)
        raise ValueError(f"tag_loss: targets must be a bool or float tensor of shape (N, K) = "
                         f"({N}, {K}), got {got}")
    if targets.device != image_emb.device:
        raise ValueError(f"tag_loss: targets is on {targets.device} but the embeddings on "
                         f"{image_emb.device}")
    if kind not in KINDS:
        raise ValueError(f"tag_loss: kind must be one of {', '.join(KINDS)}, got {kind!r}")
    if not 0 <= min_prob < 1:
        raise ValueError(f"tag_loss: min_prob must be in [0, 1), got {min_prob!r}")
    impl = pick_impl("tag_loss", impl, image_emb, N * K)
    if impl == "torch":
        return tag_loss_ref(image_emb, tag_emb, targets, scale, kind, min_prob)
    if impl == "triton":
        check_triton("tag_loss", image_emb, tag_emb)
    targets = targets.detach()
    x, w = image_emb.contiguous(), tag_emb.contiguous()
    if kind == "bce":
        return ScaledMatmulBCE.apply(x, w, scale, targets, impl).sum() / (N * K)
    cap = -math.log(min_prob) if min_prob else None  # on each tag's cross-entropy
    row, _, n = scaled_matmul_ce(x, w, scale, targets, impl=impl, cap=cap)  # L_i and n_i, (N,)
    return torch.where(n > 0, row, 0.0).sum() / N  # a row without tags adds 0, and counts
