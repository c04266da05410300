"""Contrastive (InfoNCE / CLIP) loss that never builds the N x N logits.

Math
----
With I (N, D) image and T (N, D) text embeddings (L2-normalised rows) and a scale s > 0 (the
multiplier, e.g. ``logit_scale.exp().clamp(max=100)``), the logits are X = s I T^T and the
symmetric InfoNCE loss of CLIP is

    L = 1/2 [ mean_i (LSE_j X_ij - X_ii) + mean_j (LSE_i X_ij - X_jj) ]

with LSE the log-sum-exp. Everything in it comes from one fused op over the tiles of X, the
per-row (and per-column) cross-entropy of the scaled matmul:

    scaled_matmul_ce(x, y, s, Y) -> row_i = LSE_j X_ij - sum_j Y_ij X_ij / n_i,  n_i = sum_j Y_ij
                                    col_j = LSE_i X_ij - X_jj            (symmetric only)

where Y marks the positives: the diagonal shifted by an offset (Y_ij = [j = i + offset]) for
the contrastive loss, or a dense (N, M) multi-hot matrix (the tag loss of tag_loss.py reuses
this op with M = K tags). For upstream gradients a (rows) and b (columns):

    G_ij = a_i (exp(X_ij - r_i) - Y_ij / n_i) + b_j (exp(X_ij - c_j) - Y_ij)
    dx = s G y,   dy = s G^T x,   ds = sum_ij G_ij <x_i, y_j>.

Two precision details matter for confident rows, where softmax - onehot nearly cancels:
- The positives enter G inside the tile, in fp32, before G is rounded for a bf16/fp16 dot (as
  torch's cross-entropy forms softmax - onehot before its matmul). A positive term gathered
  outside the kernel and added after its own rounding gave a 380% gradient error on confident
  bf16 rows where torch's was 2%.
- LSEs are kept as a pair (max m, log-sum l), never summed into one fp32 number: near X = 13
  one fp32 ulp is 1e-6, more than 1 - p of a confident row. So row_i = (m_i - pos_i) + l_i and
  p = exp((X - m) - l), which is what torch's log_softmax computes (x - max first). And the sum
  behind l leaves out the max element's exact 1: l = log1p(sum_(j != argmax) exp(X_ij - m_i)),
  or 1 + 1e-3 would round away 1e-4 of the 1e-3 (torch on CPU sums in fp64 instead).
- The backward recomputes X, and a tile of another shape or orientation can round X_ii one ulp
  differently from the forward (BLAS and tensor-core sums depend on the tile), which is again
  more than 1 - p. So on the diagonal positives the backward uses the forward's X_ii, saved in
  pos: p_ii = exp((pos_i - m_i) - l_i) is then exact to fp32 (a 1e-3 relative gradient error
  on confident fp32 rows before, 1e-4 like torch after). With dense targets (tags) the forward
  saves each row's argmax column instead and the backward uses m_i there (dW of confident
  single-tag rows: 6e-4 before, 1e-4 like torch after). Elsewhere the recompute noise is
  FlashAttention's, about 1e-6 relative to each softmax entry, with nothing to cancel against.

Capped positives (dense targets; TagAlign's tag loss, which takes log(max(P, 1e-8))): each
positive's cross-entropy c_ij = LSE_i - X_ij is capped at C = -log(1e-8), so

    row_i = sum_j yhat_ij min(c_ij, C),   yhat_ij = Y_ij / n_i
    G_ij  = a_i (U_i exp(X_ij - LSE_i) - yhat_ij [c_ij <= C]),   U_i = sum_j yhat_ij [c_ij <= C]

a capped positive adds C and no gradient, and the LSE term is weighted by the target mass that
is not capped. The cap needs the final LSE, so the forward finds the capped positives after the
kernel: the targets' nonzeros, their logits recomputed as row dot products (O(nnz D)), and
subtracts sum yhat (c - C) from row_i (_capped_positives). The backward decides [c_ij <= C] in
the tile it recomputes anyway and takes U_i from the forward. (A logit within rounding of the
cap could be decided differently by the two recomputes; its gradient then differs by yhat_ij
times the row's weight. No test data comes near it.)

The one-sided variant (rows only: c and b drop out) is the loss of open_clip's distributed
"local loss": each rank scores its n local queries against all M gathered keys, and the
positive of row i is column i + offset (offset = rank * n).

Tiling (the Triton path)
------------------------
Forward, one program per BLOCK_M rows of x (FlashAttention's online softmax, Dao et al. 2022):
loop over BLOCK_N column blocks of y; each tile acc = x_blk y_blk^T is accumulated in fp32
over BLOCK_K slices of D; the program keeps a running row max m_i and sum l_i
(l_i <- l_i exp(m_i - m_new) + sum_j exp(X_ij - m_new)) and the positives' sums, and stores
(m_i, log l_i, pos_i, n_i). For the symmetric loss the same tile also gives each column's
(max, log-sum) over the program's rows, stored to two [cdiv(N, BLOCK_M), M] fp32 buffers that
torch reduces after the kernel: deterministic, no atomics (Inf-CL, Wang et al. 2024, tiles the
same way).

Backward, one kernel launched twice (atomic-free, like FlashAttention-2's split of dQ and dK):
launch 1 gives every program BLOCK_M rows of x and loops over all column blocks, recomputing
each tile and adding G_blk y_blk into a (BLOCK_M, D) fp32 accumulator it owns; launch 2 swaps
the roles of x and y (G^T has the same form with rows and columns swapped and Y transposed) to
get dy, and is skipped when y needs no gradient (frozen tag embeddings). The scale gradient
sum G * acc is summed per program in launch 1 and reduced with torch. The upstream gradients
are divided by g = max(|a|, |b|, |a / n|) (a is about 1/N: G itself would underflow fp16) and
g is multiplied back in the epilogue.

Work, in units of one N x M x D matmul: forward 1, backward 2 x (recompute + product) = 4, total
5 -- open_clip's ClipLoss does 3 (+ softmax passes) but keeps N M floats; two one-sided Inf-CL
calls do 10.

Memory (bytes beyond the inputs and their .grad; b = bytes per input element, BM = 128)
-------------------------------------------------------------------------------------
Fused forward: 8 M ceil(N/BM) for the column partials (symmetric only; reduced in place, freed
before the backward) + about 40 (N + M) for the statistics. Fused backward: dx in fp32 (4 N D)
and cast (b N D), then dy the same (4 M D + b M D; skipped for frozen y), at most
(4 + b) (N + M) D. Peak: the larger of the two.
Eager reference: the fp32 copy of the logits and the scaled logits (kept for the scale's
gradient), two log-softmaxes, b N M for the matmul output: 16 N M at the forward's peak, and
about 4 N M per gradient in backward: 16-24 N M bytes.
At N = M = 32768, D = 512, bf16: 16-24 GiB eager against 192 MiB fused (64 MiB of partials in
the forward); at N = 65536, 64-96 GiB against 384 MiB. The chunked torch path needs
4 (N + M) D (fp32 copies) + its gradients + a few CHUNK_LOGITS-sized blocks (16 MiB each).

Memory traffic of the forward: y is read ceil(N/BM) times and x ceil(M/BN) times (mostly L2
hits), 8 M ceil(N/BM) bytes of column partials are written; the eager path writes and reads
an N x M matrix about six times.

Precision: tiles feed ``tl.dot`` in the input dtype (bf16/fp16 tensor cores on GPU; fp32 uses
TF32 unless ``torch.set_float32_matmul_precision("highest")``, mirroring torch.matmul),
accumulation and all statistics are fp32, offsets int64, every tail masked. In Triton's CPU
interpreter bf16 ``tl.dot`` is silently wrong, so bf16 tiles are upcast to fp32 there.
Gradients are stored in fp32 and cast with torch (the interpreter's fp32 -> bf16 store
truncates, and one code path is easier to trust than two).

Configs (the GPU's; the interpreter runs one small config)
---------------------------------------------------------
Forward: BLOCK_M = 128 rows (fixed: it sizes the column partials) against BLOCK_N = 64 or 128
columns, BLOCK_K = 32 or 64, 3 or 4 pipeline stages: 4 configs. Backward: each program holds
its whole (BLOCK_M, BLOCK_D) fp32 dq accumulator (BLOCK_D = D rounded up to a power of two),
so the configs have few rows, 32 to 128, BLOCK_N = 32 or 64, BLOCK_K = 64: 7 configs, the last
(32 rows on 8 warps) for BLOCK_D = 1024. Before autotuning, prune_configs drops those that
- need more shared memory than a block may use on the device (shared_memory_bound: the
  forward's pipelined x and y slices; the backward's k block (BLOCK_N, BLOCK_D) and, on sm_90,
  its accumulator on the way to the store, 4 BLOCK_M BLOCK_D bytes: 256 KiB at BLOCK_M = 64,
  D = 1024, over H100's 227 KiB), or
- hold more than 128 accumulator values per thread, which spill (the register rule:
  dq_values_per_thread).
tests/test_compile.py compiles every kernel, branch and config for sm_80 and sm_90 and checks
the shared-memory bound against the compiler's figure. What is left, the same on A100 and
H100 in fp16, bf16 and fp32:

                  D <= 256    D 257-512                      D 513-1024
    forward       4 of 4      4 of 4                         4 of 4
    backward      7 of 7      5 of 7 (not 128 x 32, nor      1 of 7 (32 x 32 on 8 warps)
                              64 x 32 on 4 warps)

On A100 and H100 every config that passes the register rule also fits in shared memory: the
shared-memory check guards GPUs with less of it (99 KiB on RTX 30xx / 40xx) and new configs.
Beyond D = 1024 every backward config spills, and on H100 none is known to fit (the one tried
may raise OutOfResources).
fp32 at torch's default matmul precision ("highest") takes the "ieee" dot, which has no
tensor-core path: it stages less shared memory than the bound assumes.

References (ideas, not code): FlashAttention 1/2 (online softmax, recompute in backward),
Inf-CL "Breaking the Memory Barrier" (tiled contrastive loss), Apple's Cut Cross-Entropy
(never materialise the logits; error vs fp64 no worse than torch's), open_clip's ClipLoss.
"""
import torch
import torch.nn.functional as F
import triton
import triton.language as tl

# Read once, at import: the @triton.jit functions below were defined under the same setting
# (kernels/__init__.py sets TRITON_INTERPRET=1 when there is no GPU, before importing us).
INTERPRET = bool(triton.knobs.runtime.interpret)

IMPLS = ("auto", "triton", "torch", "chunked")
# impl="auto" on CPU switches from the plain reference to the chunked path above this many
# logits (N * M): 2^24 fp32 logits are 64 MiB per N x M matrix, and the reference keeps several.
AUTO_CHUNK_LOGITS = 2 ** 24
# The chunked torch path holds at most this many logits per chunk (16 MiB of fp32).
CHUNK_LOGITS = 2 ** 22
TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


# ----------------------------------------------------------------------------- reference
def _acc_dtype(dtype):
    """fp32 for half inputs and fp32, fp64 for fp64 (the tests' ground truth)."""
    return torch.promote_types(dtype, torch.float32)


def clip_loss_ref(image_emb, text_emb, scale):
    """Symmetric InfoNCE, the readable way: build the (N, N) logits, cross-entropy both ways.

    The matmul runs in the input dtype (as under autocast), the softmax in fp32.
    """
    logits = scale * (image_emb @ text_emb.T).to(_acc_dtype(image_emb.dtype))  # (N, N)
    labels = torch.arange(logits.shape[0], device=logits.device)
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


def clip_loss_one_sided_ref(query, keys, scale, offset=0):
    """Rows only: query (n, D) against keys (M, D), the positive of row i is column i + offset."""
    logits = scale * (query @ keys.T).to(_acc_dtype(query.dtype))  # (n, M)
    labels = torch.arange(offset, offset + logits.shape[0], device=logits.device)
    return F.cross_entropy(logits, labels)


# ----------------------------------------------------------------------------- chunked torch path
# The kernels' algorithm in torch: blocks of rows against all columns, statistics kept, logits
# recomputed in backward. Memory O((N + M) D + CHUNK_LOGITS) instead of O(N M).
def _row_chunks(N, M):
    rows = max(1, CHUNK_LOGITS // max(M, 1))
    return [(i, min(i + rows, N)) for i in range(0, N, rows)]


def _reduce_lse(cm, cl):
    """(max, log-sum) over dim 0 of (max, log-sum) pairs, (B, M) -> (M,), (M,). The block that
    holds the maximum keeps its log-sum exactly; the rest enter through log1p (see the
    docstring: a confident column's log-sum is smaller than exp's rounding near 1)."""
    c_max, b_max = cm.max(0)
    base = cl.gather(0, b_max[None]).squeeze(0)
    # (B, M): the other blocks relative to b_max, computed in cm's memory (cm is spent)
    w = cm.sub_(c_max).add_(cl).sub_(base).exp_().scatter_(0, b_max[None], 0.0)
    return c_max, base + torch.log1p(w.sum(0))


def _max_logsum(X, dim):
    """(max, log sum exp(X - max)) along dim, the sum taken without the max's own 1."""
    m, idx = X.max(dim, keepdim=True)
    e = (X - m).exp_().scatter_(dim, idx, 0.0)  # one temporary the size of X
    return m.squeeze(dim), torch.log1p(e.sum(dim))


def _ce_fwd_chunked(x, y, scale, targets, offset, symmetric):
    """Per row: max, log-sum, positives' sum and count; per column: (max, log-sum) or empty."""
    acc = _acc_dtype(x.dtype)
    xf, yf, s = x.to(acc), y.to(acc), scale.to(acc)
    N, M = x.shape[0], y.shape[0]
    m, logl, pos = (torch.empty(N, dtype=acc, device=x.device) for _ in range(3))
    cnt = torch.ones(N, dtype=acc, device=x.device)
    cm = torch.full((M if symmetric else 0,), float("-inf"), dtype=acc, device=x.device)
    cl = torch.zeros_like(cm)
    with torch.autocast(x.device.type, enabled=False):
        for i0, i1 in _row_chunks(N, M):
            X = (xf[i0:i1] @ yf.T).mul_(s)  # (rows, M); in-place ops keep the temporaries few
            m[i0:i1], logl[i0:i1] = _max_logsum(X, 1)
            if targets is None:  # the positive of row i is column i + offset
                i = torch.arange(i1 - i0, device=x.device)
                pos[i0:i1] = X[i, i + i0 + offset]
            else:
                t = targets[i0:i1].to(acc, copy=True)  # (rows, M), ours to overwrite
                cnt[i0:i1] = t.sum(1)
                pos[i0:i1] = t.mul_(X).sum(1)
            if symmetric:  # running column (max, log-sum)
                bm, bl = _max_logsum(X, 0)
                cm, cl = _reduce_lse(torch.stack([cm, bm]), torch.stack([cl, bl]))
    return (m, logl, pos, cnt, None), (cm, cl)  # no argmax: its recompute is bitwise the same


def _ce_bwd_chunked(x, y, scale, targets, offset, rows, cols, need_dy, cap=None, capped=None):
    """rows, cols: (max, log-sum, upstream grad, upstream grad / n) or None for cols; cap: the
    cap on each positive's cross-entropy (dense targets), or None; capped: (N,) bool, the rows
    where the forward found a capped positive (the others need no mask)."""
    acc = _acc_dtype(x.dtype)
    xf, yf, s = x.to(acc), y.to(acc), scale.to(acc)
    dx = torch.empty_like(xf)
    dy = torch.zeros_like(yf) if need_dy else None
    ds = torch.zeros((), dtype=acc, device=x.device)
    m, logl, a, a_pos = rows
    with torch.autocast(x.device.type, enabled=False):
        for i0, i1 in _row_chunks(x.shape[0], y.shape[0]):
            # three (rows, M) blocks at a time: A, X and G (in-place ops)
            A = xf[i0:i1] @ yf.T  # unscaled cosines
            X = A * s
            G = (X - m[i0:i1, None]).sub_(logl[i0:i1, None])  # log-probabilities
            if targets is None:
                G.exp_().mul_(a[i0:i1, None])
                i = torch.arange(i1 - i0, device=x.device)
                G[i, i + i0 + offset] -= a_pos[i0:i1]
            else:
                t = targets[i0:i1]
                if cap is not None and capped[i0:i1].any():  # capped positives: no gradient of their own
                    t = t * (G >= -cap)  # bool * bool stays bool (float targets: float); converted below
                t = t.to(acc)
                G.exp_().mul_(a[i0:i1, None]).addcmul_(t, a_pos[i0:i1, None], value=-1)
            if cols is not None:  # symmetric: diagonal positives, offset 0
                cm, cl, b, _ = cols
                G += X.sub_(cm[None, :]).sub_(cl[None, :]).exp_().mul_(b[None, :])
                i = torch.arange(i1 - i0, device=x.device)
                G[i, i + i0] -= b[i0:i1]
            dx[i0:i1] = s * (G @ yf)
            if need_dy:
                dy += s * (G.T @ xf[i0:i1])
            ds += G.mul_(A).sum()  # G is spent: no temporary
    return dx.to(x.dtype), (dy.to(y.dtype) if need_dy else None), ds


# ----------------------------------------------------------------------------- Triton kernels
@triton.jit
def _dot_tile(a_ptr, b_ptr,            # a (Na, D) and b (Nb, D), unit stride along D
              offs_m, offs_n,          # (BLOCK_M,), (BLOCK_N,) int64 row indices into a and b
              mask_m, mask_n,          # which of those rows exist
              D, stride_a, stride_b,   # feature size, row strides of a and b (elements)
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
              BLOCK_K: tl.constexpr,   # slice of D per tl.dot
              UPCAST: tl.constexpr,    # interpreter + bf16: tl.dot is wrong there, go through fp32
              PRECISION: tl.constexpr):  # fp32 dot: "tf32" or "ieee"
    """acc = a[offs_m] b[offs_n]^T in fp32, (BLOCK_M, BLOCK_N); missing rows give zeros."""
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, D, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < D
        a = tl.load(a_ptr + offs_m[:, None] * stride_a + offs_k[None, :],
                    mask=mask_m[:, None] & mask_k[None, :], other=0.0)  # (BLOCK_M, BLOCK_K)
        bt = tl.load(b_ptr + offs_n[None, :] * stride_b + offs_k[:, None],
                     mask=mask_n[None, :] & mask_k[:, None], other=0.0)  # (BLOCK_K, BLOCK_N)
        if UPCAST:
            a = a.to(tl.float32)
            bt = bt.to(tl.float32)
        acc = tl.dot(a, bt, acc, input_precision=PRECISION)
    return acc


@triton.jit
def _log1p(u):
    """log(1 + u) to a few ulps for small u (libdevice's log1p does not run in the interpreter):
    Goldberg's trick, log(w) * u / (w - 1) with w = 1 + u rounded."""
    w = 1.0 + u
    exact = w == 1.0  # u below half an ulp of 1: log1p(u) = u
    return tl.where(exact, u, tl.log(w) * (u / tl.where(exact, 1.0, w - 1.0)))


@triton.jit
def _ce_fwd_kernel(x_ptr, y_ptr,        # x (N, D), y (M, D), same dtype
                   scale_ptr,           # () the multiplier s
                   t_ptr,               # (N, M) dense targets Y (DENSE_T), any real dtype
                   m_ptr, logl_ptr,     # (N,) fp32 out: row max of X, log sum_j exp(X_ij - m_i)
                   pos_ptr, cnt_ptr,    # (N,) fp32 out: sum_j Y_ij X_ij, sum_j Y_ij
                   arg_ptr,             # (N,) int32 out: argmax_j X_ij (DENSE_T)
                   cm_ptr, cl_ptr,      # (cdiv(N, BLOCK_M), M) fp32 out: the same per column and
                                        # row block (HAS_COL)
                   N, M, D,
                   offset,              # diagonal positives: Y_ij = [j == i + offset]
                   stride_x, stride_y,  # row strides of x and y (elements)
                   stride_tn, stride_tm,  # strides of Y along rows and columns
                   DENSE_T: tl.constexpr,  # positives from t_ptr (else the shifted diagonal)
                   HAS_COL: tl.constexpr,  # symmetric loss: also write the column partials
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                   UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    NEG: tl.constexpr = -1.0e30  # finite "minus infinity": masked lanes never make inf - inf
    pid = tl.program_id(0)
    offs_m = pid.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < N
    s = tl.load(scale_ptr).to(tl.float32)
    m_i = tl.full((BLOCK_M,), NEG, dtype=tl.float32)  # running row max
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)      # running sum of exp(X - m_i), less the 1
    pos = tl.zeros((BLOCK_M,), dtype=tl.float32)
    cnt = tl.zeros((BLOCK_M,), dtype=tl.float32)
    arg = tl.zeros((BLOCK_M,), dtype=tl.int32)       # running argmax
    for n0 in range(0, M, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N).to(tl.int64)
        mask_n = offs_n < M
        acc = _dot_tile(x_ptr, y_ptr, offs_m, offs_n, mask_m, mask_n, D, stride_x, stride_y,
                        BLOCK_M, BLOCK_N, BLOCK_K, UPCAST, PRECISION)
        X = s * acc  # (BLOCK_M, BLOCK_N); 0 on missing rows and columns
        if DENSE_T:
            t = tl.load(t_ptr + offs_m[:, None] * stride_tn + offs_n[None, :] * stride_tm,
                        mask=mask_m[:, None] & mask_n[None, :], other=0).to(tl.float32)
            pos += tl.sum(t * X, axis=1)
            cnt += tl.sum(t, axis=1)
        else:
            pos += tl.sum(tl.where(offs_n[None, :] == offs_m[:, None] + offset, X, 0.0), axis=1)
        X = tl.where(mask_n[None, :], X, NEG)
        X_max = tl.max(X, axis=1)
        X_arg = tl.argmax(X, axis=1).to(tl.int32) + n0
        new = X_max > m_i  # this tile holds the new row max: its exp(0) = 1 is left out of l_i
        m_new = tl.maximum(m_i, X_max)
        e = tl.exp(X - m_new[:, None])
        e = tl.where(new[:, None] & (offs_n[None, :] == X_arg[:, None]), 0.0, e)
        l_i = tl.where(new, (l_i + 1.0) * tl.exp(m_i - m_new), l_i) + tl.sum(e, axis=1)
        arg = tl.where(new, X_arg, arg)
        m_i = m_new
        if HAS_COL:
            Xc = tl.where(mask_m[:, None], X, NEG)  # every column block has a valid row
            c_max = tl.max(Xc, axis=0)
            c_arg = tl.argmax(Xc, axis=0)
            ec = tl.exp(Xc - c_max[None, :])
            ec = tl.where(tl.arange(0, BLOCK_M)[:, None] == c_arg[None, :], 0.0, ec)
            part = pid.to(tl.int64) * M + offs_n
            tl.store(cm_ptr + part, c_max, mask=mask_n)
            tl.store(cl_ptr + part, _log1p(tl.sum(ec, axis=0)), mask=mask_n)
    tl.store(m_ptr + offs_m, m_i, mask=mask_m)
    tl.store(logl_ptr + offs_m, _log1p(l_i), mask=mask_m)
    tl.store(pos_ptr + offs_m, pos, mask=mask_m)
    if DENSE_T:
        tl.store(cnt_ptr + offs_m, cnt, mask=mask_m)
        tl.store(arg_ptr + offs_m, arg, mask=mask_m)


@triton.jit
def _ce_bwd_kernel(q_ptr, k_ptr,          # q (Nq, D): the side whose gradient we write; k (Nk, D)
                   scale_ptr,             # () s
                   gscale_ptr,            # () g: the upstream gradients were divided by g
                   t_ptr,                 # dense targets Y (DENSE_T), read as Y[q row, k row]
                   pos_ptr,               # (rows of x,) the forward's X_(i, i+offset) (diagonal Y)
                   q_m_ptr, q_l_ptr,      # (Nq,) (max, log-sum) of the softmax over q's rows,
                   q_arg_ptr,             # the argmax's position (int32, DENSE_T),
                   q_d_ptr, q_dpos_ptr,   # its upstream grad a / g and a / (g n)
                   k_m_ptr, k_l_ptr,      # (Nk,) the same for the softmax over k's rows
                   k_arg_ptr, k_d_ptr, k_dpos_ptr,
                   dq_ptr,                # (Nq, D) fp32 out: s g sum_j G_ij k_j
                   ds_ptr,                # (cdiv(Nq, 32),) fp32 out: per-program sum G <q_i, k_j>
                   Nq, Nk, D,
                   diag_offset,           # diagonal positives: at (i, j) with j - i == diag_offset
                   cap,                   # DENSE_T: a positive whose cross-entropy LSE - X
                                          # exceeds this gets no gradient of its own (inf: none)
                   stride_q, stride_k, stride_dq,
                   stride_tq, stride_tk,  # strides of Y along q rows and along k rows
                   HAS_Q_TERM: tl.constexpr,  # the softmax over q's rows is part of the loss
                   HAS_K_TERM: tl.constexpr,  # the softmax over k's rows is part of the loss
                   DENSE_T: tl.constexpr,     # positives from t_ptr (else the shifted diagonal)
                   POS_ON_Q: tl.constexpr,    # q holds the rows of x (pos is indexed by q rows)
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                   BLOCK_D: tl.constexpr,     # next power of two >= D: the dq accumulator width
                   UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    pid = tl.program_id(0)
    offs_m = pid.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < Nq
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < D
    s = tl.load(scale_ptr).to(tl.float32)
    if HAS_Q_TERM:
        # +inf log-sum on missing rows: exp(X - m - inf) = 0, never inf * 0
        q_m = tl.load(q_m_ptr + offs_m, mask=mask_m, other=0.0)[:, None]
        q_l = tl.load(q_l_ptr + offs_m, mask=mask_m, other=float("inf"))[:, None]
        q_d = tl.load(q_d_ptr + offs_m, mask=mask_m, other=0.0)[:, None]
        q_dpos = tl.load(q_dpos_ptr + offs_m, mask=mask_m, other=0.0)[:, None]
        if DENSE_T:
            q_arg = tl.load(q_arg_ptr + offs_m, mask=mask_m, other=-1)[:, None]
    if not DENSE_T and POS_ON_Q:
        q_pos = tl.load(pos_ptr + offs_m, mask=mask_m, other=0.0)[:, None]
    dq = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    ds = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for n0 in range(0, Nk, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N).to(tl.int64)
        mask_n = offs_n < Nk
        mask_mn = mask_m[:, None] & mask_n[None, :]
        acc = _dot_tile(q_ptr, k_ptr, offs_m, offs_n, mask_m, mask_n, D, stride_q, stride_k,
                        BLOCK_M, BLOCK_N, BLOCK_K, UPCAST, PRECISION)  # (BLOCK_M, BLOCK_N)
        X = s * acc
        if DENSE_T:
            t = tl.load(t_ptr + offs_m[:, None] * stride_tq + offs_n[None, :] * stride_tk,
                        mask=mask_mn, other=0).to(tl.float32)
        else:
            t = tl.where(offs_n[None, :] - offs_m[:, None] == diag_offset, 1.0, 0.0)
            # on the positives, the forward's logit: it set the row max (see the docstring)
            if POS_ON_Q:
                X = tl.where(t > 0, q_pos, X)
            else:
                X = tl.where(t > 0, tl.load(pos_ptr + offs_n, mask=mask_n, other=0.0)[None, :], X)
        # softmax - onehot, in fp32, before anything is rounded (see the module docstring)
        # (log-probability: a capped positive, -lp > cap, drops out of the positives' term)
        G = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        if HAS_Q_TERM:
            Xq = X
            if DENSE_T:  # at the row's argmax, the forward's maximum (see the docstring)
                Xq = tl.where(offs_n[None, :] == q_arg, q_m, X)
            lp = (Xq - q_m) - q_l
            tq = t
            if DENSE_T:
                tq = tl.where(lp >= -cap, t, 0.0)
            G += tl.exp(lp) * q_d - tq * q_dpos
        if HAS_K_TERM:
            k_m = tl.load(k_m_ptr + offs_n, mask=mask_n, other=0.0)[None, :]
            k_l = tl.load(k_l_ptr + offs_n, mask=mask_n, other=float("inf"))[None, :]
            k_d = tl.load(k_d_ptr + offs_n, mask=mask_n, other=0.0)[None, :]
            k_dpos = tl.load(k_dpos_ptr + offs_n, mask=mask_n, other=0.0)[None, :]
            Xk = X
            if DENSE_T:
                k_arg = tl.load(k_arg_ptr + offs_n, mask=mask_n, other=-1)[None, :]
                Xk = tl.where(offs_m[:, None] == k_arg, k_m, X)
            lp = (Xk - k_m) - k_l
            tk = t
            if DENSE_T:
                tk = tl.where(lp >= -cap, t, 0.0)
            G += tl.exp(lp) * k_d - tk * k_dpos
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


# Block sizes. The interpreter gets one small config (multi-config autotune needs a driver, and
# small blocks make the tests hit both sides of every block size), with backward tiles shaped
# unlike the forward's so that its recompute rounds differently, as autotuned GPU configs may;
# the GPU gets a few configs sized for H100 (fp32 accumulators: 128 x 128 forward tiles,
# (64, BLOCK_D) backward rows), of which the autotuner times those that fit the device's shared
# memory (prune_configs below; the module docstring's "Configs" says which).
FWD_BLOCK_M = 64 if INTERPRET else 128  # fixed: it sets the size of the column-partial buffers
BWD_MIN_BLOCK_M = 32                    # the smallest backward BLOCK_M: sizes the ds buffer
if INTERPRET:
    FWD_CONFIGS = [triton.Config({"BLOCK_N": 64, "BLOCK_K": 64})]
    BWD_CONFIGS = [triton.Config({"BLOCK_M": 32, "BLOCK_N": 64, "BLOCK_K": 32})]
else:
    FWD_CONFIGS = [triton.Config({"BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=st)
                   for bn, bk, w, st in [(128, 64, 8, 3), (128, 32, 8, 4), (64, 64, 4, 4),
                                         (64, 64, 8, 3)]]
    BWD_CONFIGS = [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": 64},
                                 num_warps=w, num_stages=st)
                   for bm, bn, w, st in [(64, 64, 8, 2), (64, 32, 8, 2), (64, 32, 4, 2),
                                         (32, 64, 4, 2), (128, 32, 8, 1), (32, 32, 4, 1),
                                         (32, 32, 8, 1)]]  # the last for BLOCK_D 1024 (docstring)


def shared_memory_bound(config, meta, itemsize, arch):
    """Bytes of shared memory one program of `config` needs at most. meta: the launch's
    constexprs (BLOCK_M of the forward, BLOCK_D of the backward); itemsize: bytes per input
    element; arch: the GPU's compute capability, 10 major + minor (80 for A100, 90 for H100).
    The largest of what is live at one time:
    - the tile loop (_dot_tile): the pipelined x and y slices, (BLOCK_M + BLOCK_N, BLOCK_K)
      elements per buffer, num_stages buffers on sm_90 (TMA), num_stages - 1 before it;
    - backward, the dq product's operands: the k block (BLOCK_N, BLOCK_D) and G (BLOCK_M,
      BLOCK_N) in the input dtype;
    - backward on sm_90, the (BLOCK_M, BLOCK_D) fp32 dq accumulator, which crosses shared
      memory when its wgmma layout is converted for the store.
    tests/test_compile.py compiles every config for sm_80 and sm_90 and checks the bound
    against the compiler's figure: exact where these terms dominate, above it elsewhere (the
    fp32 "ieee" dots run without tensor cores and stage less). Other GPUs are treated like the
    older (< 90) or newer of the two.
    """
    b = {**meta, **config.kwargs}
    stages = config.num_stages if arch >= 90 else max(config.num_stages - 1, 1)
    tiles = stages * (b["BLOCK_M"] + b["BLOCK_N"]) * b["BLOCK_K"] * itemsize
    if "BLOCK_D" not in b:  # forward
        return tiles
    dq_operands = (b["BLOCK_N"] * b["BLOCK_D"] + b["BLOCK_M"] * b["BLOCK_N"]) * itemsize
    dq_store = 4 * b["BLOCK_M"] * b["BLOCK_D"] if arch >= 90 else 0
    return max(tiles, dq_operands, dq_store)


def device_shared_memory(device):
    """(compute capability as 10 major + minor, bytes of shared memory one block may use) of a
    CUDA device. The bytes are the opt-in maximum that triton checks at launch: 227 KiB on
    H100, 163 KiB on A100, 99 KiB on RTX 30xx / 40xx."""
    major, minor = torch.cuda.get_device_capability(device)
    props = triton.runtime.driver.active.utils.get_device_properties(device.index)
    return 10 * major + minor, props["max_shared_mem"]


def dq_values_per_thread(config, meta):
    """fp32 values of the backward's (BLOCK_M, BLOCK_D) dq accumulator each thread holds (0 in
    the forward). A thread has 255 registers. In these configs, ptxas spills 2-84 KB per thread
    wherever a thread holds 256 or more, and 0-0.9 KB (up to 2 KB with fp32 "ieee" dots) where
    it holds 128 or fewer (measured at BLOCK_D 512 and 1024, on sm_80 and sm_90)."""
    b = {**meta, **config.kwargs}
    return b["BLOCK_M"] * b.get("BLOCK_D", 0) // (32 * config.num_warps)


def prune_configs(configs, named_args, **meta):
    """The autotuners' early_config_prune: the configs whose shared_memory_bound fits the
    device and that hold at most 128 dq values per thread. If there is none, the best of the
    rest: one that fits (with the fewest dq values per thread: it spills, but runs), else the
    smallest (triton then raises OutOfResources at launch if that does not fit either). Runs
    once per autotune key (sizes, D, dtypes), before any config is compiled or timed."""
    x = next(iter(named_args.values()))  # the first argument: x or q, the (rows, D) embeddings
    arch, limit = device_shared_memory(x.device)

    def cost(c):  # (does not fit, dq values per thread, bound): ordered for the fallback
        bound = shared_memory_bound(c, meta, x.element_size(), arch)
        return bound > limit, dq_values_per_thread(c, meta), bound

    kept = [c for c in configs if not cost(c)[0] and cost(c)[1] <= 128]
    return kept or [min(configs, key=cost)]


_ce_fwd = triton.autotune(FWD_CONFIGS, key=["N", "M", "D", "DENSE_T", "HAS_COL"],
                          prune_configs_by={"early_config_prune": prune_configs})(
    _ce_fwd_kernel)
_ce_bwd = triton.autotune(BWD_CONFIGS, key=["Nq", "Nk", "D", "HAS_Q_TERM", "HAS_K_TERM",
                                            "DENSE_T"], reset_to_zero=["ds_ptr"],
                          prune_configs_by={"early_config_prune": prune_configs})(
    _ce_bwd_kernel)


# ----------------------------------------------------------------------------- launchers
def dot_precision(dtype):
    if dtype == torch.float32 and torch.get_float32_matmul_precision() == "highest":
        return "ieee"
    return "tf32"  # ignored by tl.dot for fp16/bf16 tiles


def check_triton(name, x, y):
    if x.dtype not in TRITON_DTYPES:
        raise ValueError(f"{name}: impl='triton' supports float32, float16 and bfloat16 "
                         f"embeddings, got {x.dtype}")
    if x.device.type == "cpu" and not INTERPRET:
        raise RuntimeError(f"{name}: impl='triton' needs CUDA tensors, or TRITON_INTERPRET=1 set "
                           "before `import kernels` to run Triton's CPU interpreter; got cpu "
                           "tensors (use impl='torch' or 'chunked' on CPU)")


def targets_arg(targets):
    """A tensor Triton can load: bool is viewed as uint8 (same bytes, no copy)."""
    return targets.view(torch.uint8) if targets.dtype == torch.bool else targets


def _ce_fwd_triton(x, y, scale, targets, offset, symmetric):
    N, D = x.shape
    M = y.shape[0]
    m, logl, pos, cnt = (torch.empty(N, dtype=torch.float32, device=x.device) for _ in range(4))
    arg = torch.empty(N if targets is not None else 0, dtype=torch.int32, device=x.device)
    n_blocks = triton.cdiv(N, FWD_BLOCK_M)
    cm, cl = (torch.empty((n_blocks, M) if symmetric else (0, 0), dtype=torch.float32,
                          device=x.device) for _ in range(2))
    t = m if targets is None else targets_arg(targets)  # m: an unused placeholder pointer
    _ce_fwd[(n_blocks,)](
        x, y, scale, t, m, logl, pos, cnt, arg, cm, cl, N, M, D, offset, x.stride(0), y.stride(0),
        t.stride(0), t.stride(-1), DENSE_T=targets is not None, HAS_COL=symmetric,
        BLOCK_M=FWD_BLOCK_M, UPCAST=INTERPRET and x.dtype == torch.bfloat16,
        PRECISION=dot_precision(x.dtype))
    if targets is None:
        cnt.fill_(1.0)
    if symmetric:  # reduce the per-row-block column partials: (max, log-sum) of each column
        cols = _reduce_lse(cm, cl)
    else:
        cols = (cm.new_empty(0), cm.new_empty(0))
    return (m, logl, pos, cnt, arg), cols


def _ce_bwd_triton(q, k, scale, g, targets, diag_offset, pos, pos_on_q, q_stats, k_stats, cap):
    """dq (fp32) = s g sum_j G_ij k_j and the scale-gradient sum, G as in the module docstring.

    q_stats, k_stats: (max, log-sum, argmax, a / g, a / (g n)) of the softmax over q's or k's
    rows, or None (argmax: any placeholder unless targets are dense). targets: dense Y with rows
    indexed by q (transposed for the second launch), or None for diagonal positives at
    diag_offset. pos: the forward's positive logit per row of x, on q's side if pos_on_q.
    cap: the cap on each positive's cross-entropy (dense targets), or None.
    """
    Nq, D = q.shape
    dq = torch.empty((Nq, D), dtype=torch.float32, device=q.device)
    ds = torch.zeros(triton.cdiv(Nq, BWD_MIN_BLOCK_M), dtype=torch.float32, device=q.device)
    q_stats = q_stats if q_stats is not None else (ds,) * 5  # ds: placeholder pointers
    k_stats = k_stats if k_stats is not None else (ds,) * 5
    t = ds if targets is None else targets_arg(targets)
    grid = lambda meta: (triton.cdiv(Nq, meta["BLOCK_M"]),)  # noqa: E731
    _ce_bwd[grid](
        q, k, scale, g, t, pos, *q_stats, *k_stats, dq, ds, Nq, k.shape[0], D, diag_offset,
        float("inf") if cap is None else float(cap), q.stride(0), k.stride(0), dq.stride(0),
        t.stride(0) if targets is not None else 0, t.stride(-1) if targets is not None else 0,
        HAS_Q_TERM=q_stats[0] is not ds, HAS_K_TERM=k_stats[0] is not ds,
        DENSE_T=targets is not None, POS_ON_Q=pos_on_q,
        BLOCK_D=max(16, triton.next_power_of_2(D)),
        UPCAST=INTERPRET and q.dtype == torch.bfloat16, PRECISION=dot_precision(q.dtype))
    return dq, ds.sum()


# ----------------------------------------------------------------------------- autograd
def _capped_positives(x, y, scale, targets, m, logl, cnt, cap):
    """What capping each positive's cross-entropy at `cap` takes from each row: (sum_j yhat_ij
    (c_ij - cap), sum_j yhat_ij) over the row's positives with c_ij = LSE_i - X_ij > cap, (N,)
    each. The positives are gathered from the targets' nonzeros and their logits recomputed as
    row dot products in fp32: O(nnz D) work in chunks, no N x M matrix."""
    acc = m.dtype
    over, lost = torch.zeros_like(m), torch.zeros_like(m)
    i, j = targets.nonzero(as_tuple=True)  # (nnz,) each
    chunk = max(1, CHUNK_LOGITS // (4 * x.shape[1]))  # rows gathered at a time: 4 MiB of fp32 each side
    for c0 in range(0, i.numel(), chunk):
        ii, jj = i[c0:c0 + chunk], j[c0:c0 + chunk]
        X = scale.to(acc) * (x[ii].to(acc) * y[jj].to(acc)).sum(1)
        c = (m[ii] - X) + logl[ii]  # the positive's cross-entropy, -log p
        w = torch.where(c > cap, targets[ii, jj].to(acc) / cnt[ii], 0.0)  # yhat where capped
        over.index_add_(0, ii, w * (c - cap))
        lost.index_add_(0, ii, w)
    return over, lost


class ScaledMatmulCE(torch.autograd.Function):
    """(x, y, s, Y) -> (row (N,), col (M,) or empty, n (N,)); see the module docstring.
    n, the positives' count per row, is not differentiable. cap (dense targets): each
    positive's cross-entropy is capped, see "Capped positives" in the module docstring."""

    @staticmethod
    def forward(ctx, x, y, scale, targets, offset, symmetric, impl, cap=None):
        fwd = _ce_fwd_triton if impl == "triton" else _ce_fwd_chunked
        (m, logl, pos, cnt, arg), (cm, cl) = fwd(x, y, scale, targets, offset, symmetric)
        row = (m - pos / torch.where(cnt > 0, cnt, 1.0)) + logl  # LSE - mean positive logit
        u = None  # U_i, the weight of the row's LSE term: 1 unless positives are capped
        if cap is not None:
            over, lost = _capped_positives(x, y, scale, targets, m, logl, cnt, cap)
            row, u = row - over, 1 - lost
        # symmetric: the positive of column j is X_jj = pos_j (offset is 0)
        col = (cm - pos) + cl if symmetric else cm
        ctx.save_for_backward(x, y, scale, targets, m, logl, pos, cnt, arg, cm, cl, u)
        ctx.offset, ctx.symmetric, ctx.impl, ctx.cap = offset, symmetric, impl, cap
        ctx.mark_non_differentiable(cnt)
        return row, col, cnt

    @staticmethod
    def backward(ctx, a, b, _dcnt):
        x, y, scale, targets, m, logl, pos, cnt, arg, cm, cl, u = ctx.saved_tensors
        offset, sym, cap = ctx.offset, ctx.symmetric, ctx.cap
        need_dx, need_dy, need_ds = ctx.needs_input_grad[:3]
        a = a.to(m.dtype)
        b = b.to(m.dtype) if sym else None
        a_pos = a / torch.where(cnt > 0, cnt, 1.0)  # the positives' share of a row's gradient
        if u is not None:
            a = a * u  # the LSE term's share: the target mass that is not capped
        if ctx.impl != "triton":
            rows, cols = (m, logl, a, a_pos), ((cm, cl, b, b) if sym else None)
            dx, dy, ds = _ce_bwd_chunked(x, y, scale, targets, offset, rows, cols, need_dy, cap,
                                         None if u is None else u < 1)
        else:
            # Divide the upstream gradients by g so that G stays O(1) for the fp16/bf16 dot.
            g = torch.maximum(a.abs().max(), a_pos.abs().max())
            if sym:
                g = torch.maximum(g, b.abs().max())
            g = g.clamp(min=torch.finfo(torch.float32).tiny)
            rows = (m, logl, m if arg is None else arg, a / g, a_pos / g)
            cols = (cm, cl, cm, b / g, b / g) if sym else None  # 3rd: placeholder, no argmax
            dx = dy = ds = None
            if need_dx or need_ds:
                dx, ds = _ce_bwd_triton(x, y, scale, g, targets, offset, pos, True, rows, cols,
                                        cap)
                dx, ds = dx.to(x.dtype), ds * g
            if need_dy:
                # G^T: y's rows now own the column softmax, x's rows the row softmax
                t = targets.T if targets is not None else None
                dy, _ = _ce_bwd_triton(y, x, scale, g, t, -offset, pos, False, cols, rows, cap)
                dy = dy.to(y.dtype)
        ds = ds.to(scale.dtype).reshape(scale.shape) if need_ds else None
        return (dx if need_dx else None), dy, ds, None, None, None, None, None


# ----------------------------------------------------------------------------- public API
def check_pair(name, a_name, a, b_name, b, scale):
    """Validate two (rows, D) embedding matrices and a scale; return the scale as a tensor."""
    for arg, t in ((a_name, a), (b_name, b)):
        if not isinstance(t, torch.Tensor) or t.dim() != 2 or not t.is_floating_point():
            got = f"{tuple(t.shape)} {t.dtype}" if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"{name}: {arg} must be a 2-d floating tensor (rows, D), got {got}")
        if t.shape[0] == 0 or t.shape[1] == 0:
            raise ValueError(f"{name}: {arg} is empty, shape {tuple(t.shape)}")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"{name}: {a_name} and {b_name} must share D, got {tuple(a.shape)} "
                         f"and {tuple(b.shape)}")
    if a.dtype != b.dtype or a.device != b.device:
        raise ValueError(f"{name}: {a_name} and {b_name} must have the same dtype and device, got "
                         f"{a.dtype} on {a.device} and {b.dtype} on {b.device}")
    if isinstance(scale, (int, float)) and not isinstance(scale, bool):
        scale = torch.tensor(float(scale), dtype=_acc_dtype(a.dtype), device=a.device)
    if not isinstance(scale, torch.Tensor) or scale.dim() != 0 or not scale.is_floating_point():
        got = (f"shape {tuple(scale.shape)} {scale.dtype}" if isinstance(scale, torch.Tensor)
               else type(scale).__name__)
        raise ValueError(f"{name}: scale must be a 0-d floating tensor holding the multiplier "
                         f"(not its log), got {got}")
    if scale.device != a.device:
        raise ValueError(f"{name}: scale is on {scale.device} but the embeddings on {a.device}")
    return scale


def pick_impl(name, impl, x, n_logits):
    """Resolve "auto": Triton for CUDA tensors; on CPU the reference, or the chunked path when
    the logits would exceed AUTO_CHUNK_LOGITS (float64 always takes a torch path)."""
    if impl not in IMPLS:
        raise ValueError(f"{name}: impl must be one of {', '.join(IMPLS)}, got {impl!r}")
    if impl != "auto":
        return impl
    if x.is_cuda and x.dtype in TRITON_DTYPES:
        return "triton"
    return "chunked" if n_logits > AUTO_CHUNK_LOGITS else "torch"


def scaled_matmul_ce(x, y, scale, targets=None, offset=0, symmetric=False, impl="triton",
                     cap=None):
    """The fused op: (row (N,), col (M,) or empty, n (N,)) as in the module docstring; fp32
    (fp64 for fp64 inputs on the chunked path). impl: "triton" or "chunked". cap: with dense
    targets, the cap on each positive's cross-entropy (None: uncapped)."""
    if impl == "triton":
        check_triton("scaled_matmul_ce", x, y)
    return ScaledMatmulCE.apply(x.contiguous(), y.contiguous(), scale, targets, offset,
                                symmetric, impl, cap)


def clip_loss(image_emb, text_emb, scale, impl="auto"):
    """Symmetric InfoNCE of image_emb (N, D) and text_emb (N, D) with logits scale I T^T.

    scale: 0-d tensor holding the multiplier (e.g. logit_scale.exp().clamp(max=100)).
    impl: "triton" (fused kernels; CUDA, or CPU through the interpreter), "torch" (the
    reference, O(N^2) memory), "chunked" (the kernels' algorithm in torch, O(N D) memory),
    "auto" (triton on CUDA; torch on CPU, chunked above AUTO_CHUNK_LOGITS logits).
    Returns the 0-d fp32 loss (fp64 for fp64 inputs), differentiable in all three inputs.
    """
    scale = check_pair("clip_loss", "image_emb", image_emb, "text_emb", text_emb, scale)
    if image_emb.shape[0] != text_emb.shape[0]:
        raise ValueError(f"clip_loss: image_emb and text_emb need the same number of rows, got "
                         f"{image_emb.shape[0]} and {text_emb.shape[0]}")
    N = image_emb.shape[0]
    impl = pick_impl("clip_loss", impl, image_emb, N * N)
    if impl == "torch":
        return clip_loss_ref(image_emb, text_emb, scale)
    row, col, _ = scaled_matmul_ce(image_emb, text_emb, scale, symmetric=True, impl=impl)
    return (row.mean() + col.mean()) / 2


def clip_loss_one_sided(query, keys, scale, offset=0, impl="auto"):
    """mean_i (LSE_j s <q_i, k_j> - s <q_i, k_(i+offset)>), query (n, D), keys (M, D).

    Two calls make one rank's share of the symmetric loss in data-parallel training (open_clip's
    local loss): local images against all texts and local texts against all images, with
    offset = rank * n.
    """
    scale = check_pair("clip_loss_one_sided", "query", query, "keys", keys, scale)
    n, M = query.shape[0], keys.shape[0]
    if isinstance(offset, bool) or not isinstance(offset, int) or offset < 0 or offset + n > M:
        raise ValueError(f"clip_loss_one_sided: offset must be an int with 0 <= offset and "
                         f"offset + n <= M (n={n}, M={M}), got {offset!r}")
    impl = pick_impl("clip_loss_one_sided", impl, query, n * M)
    if impl == "torch":
        return clip_loss_one_sided_ref(query, keys, scale, offset)
    row, _, _ = scaled_matmul_ce(query, keys, scale, offset=offset, impl=impl)
    return row.mean()
