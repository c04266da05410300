"""One paper-mode training step against the authors' code, re-stated in tests/_official.py
(github.com/Qinying-Liu/TagAlign at 02757a4): a small random OpenAI-format CLIP, frozen, with
the decoder, the head and both temperatures set to the same seeded non-trivial values on both
sides (the official gates start at 0, which would hide the decoder), one batch; in fp32:
the image embedding, the loss terms, the gradient of every trainable parameter for each term,
and every parameter (with AdamW's moments) after clip_grad_norm_(5.0) and one AdamW step with the
official weight-decay groups.

The batch is built to reach the official tag loss's corners: two untagged rows (they count in
its mean), tags whose probability is far below 1e-8 (the clamp: log(1e-8) and no gradient), a
row whose every tag is clamped, and both temperatures below and above CLIP's cap of 100."""
import pytest
import torch
import torch.nn.functional as F

import _official as official
import tagalign
from _clip import make_ref_clip, write_clip
from _harness import DEVICE, diff_report
from model import load_clip

B, K = 8, 40  # images (and captions), tags
LR = 1e-3  # the official 1e-3 x batch / 4096 would make the step too small to see
# (ITC, tag) temperatures as multipliers exp(t): a large tag scale sends many probabilities below
# 1e-8; "capped": both above the cap of 100, so both scales get exactly zero gradient and the
# official step moves them by weight decay alone.
SCALES = {"uncapped": (30.0, 80.0), "capped": (150.0, 120.0)}
# Which tags each row gets, by rank of its probability: "t0" the most probable, "l0" the least.
ROW_TAGS = [["t0"], ["t0", "l0"], [], ["t0", "t1", "l0"], ["l0", "l1"], [], ["t0", "t1"], ["t1", "l0", "l2", "t0"]]
TERMS = ("total", "itc", "tag")

# Tolerances (fp32 throughout; measured errors in brackets). Both sides read the same frozen CLIP
# tokens, computed by different attention code (SDPA against loops over heads), and sum in
# other orders:
EMB_RTOL = 1e-6    # image embedding, relative to its largest entry [1.7e-7]
LOSS_RTOL = 1e-6   # each loss term, relative [2e-7]
GRAD_RTOL = 1e-4   # gradients, relative to the tensor's largest entry [4.2e-5]: the worst is a gate's,
#                    one scalar summed over every conv output with cancellation, each fp32 side
#                    3e-5 from fp64 at an ITC scale of 100; Adam's second moment doubles it
PARAM_ATOL, PARAM_RTOL = 1e-7, 2.4e-7  # after the step, from the same gradients [3e-8]: two ulps of
#                    the parameter; a missing decay moves it by lr x 0.05 x |p| = 5e-5 |p|


@pytest.fixture(autouse=True)
def full_fp32():
    """On a GPU, no TF32 in matmuls or convolutions: this file compares fp32 to 1e-5."""
    matmul, cudnn = torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32
    torch.set_float32_matmul_precision("highest")
    torch.backends.cudnn.allow_tf32 = False
    yield
    torch.set_float32_matmul_precision(matmul)
    torch.backends.cudnn.allow_tf32 = cudnn


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    """An 8-block CLIP ViT (surgery's 6 blocks and 2 before them) and its file."""
    ref = make_ref_clip(vision_layers=8)
    return ref, write_clip(ref, tmp_path_factory.mktemp("clip") / "clip.pt", "fp16")


def pick_targets(probs):
    """(B, K) bool targets from ROW_TAGS, and how many targets fall below the clamp."""
    order = probs.argsort(dim=1, descending=True)
    targets = torch.zeros(B, K, dtype=torch.bool)
    for i, tags in enumerate(ROW_TAGS):
        for t in tags:
            targets[i, order[i, int(t[1:])] if t[0] == "t" else order[i, K - 1 - int(t[1:])]] = True
    p = probs[targets]
    # every target clearly on one side of 1e-8, so that rounding cannot move it across
    assert ((p > 1e-6) | (p < 1e-10)).all(), p
    return targets, int((p < 1e-10).sum())


@pytest.fixture(scope="module")
def batches(clip):
    """Per temperature setting: the official parameters, the batch, and the official results
    (image embedding, losses, gradients per term, AdamW's moments after the step)."""
    ref, _ = clip
    out = {}
    for key, (itc_scale, tag_scale) in SCALES.items():
        g = torch.Generator().manual_seed(3)
        images = torch.randn(B, 3, 32, 32, generator=g)
        tokens = torch.randint(1, 49000, (B, 16), generator=g)
        for i in range(B):  # the end token (CLIP's largest id) at a random place, zeros after it
            end = int(torch.randint(3, 16, (), generator=g))
            tokens[i, end], tokens[i, end + 1:] = 49407, 0
        label_emb = F.normalize(torch.randn(K, ref.text_projection.shape[1], generator=g), dim=-1)
        params = official.fixed_params(ref.visual, itc_scale, tag_scale)
        patches = official.surgery_patches(ref.visual, images)
        with torch.no_grad():
            text_emb = ref.encode_text(tokens)
            img = F.normalize(official.image_embedding(params, patches), dim=-1)
            probs = (img @ label_emb.T * min(tag_scale, 100.0)).softmax(dim=-1)
        targets, clamped = pick_targets(probs)
        assert clamped >= 4 and (targets.sum(1) == 0).sum() == 2
        assert (probs[4, targets[4]] < 1e-10).all()  # row 4: every tag clamped, no tag gradient

        leaves = {k: v.clone().requires_grad_() for k, v in params.items()}
        terms = dict(zip(TERMS, official.losses(leaves, patches, text_emb, label_emb, targets.float())))
        grads = {}
        for term, loss in terms.items():
            gs = torch.autograd.grad(loss, list(leaves.values()), retain_graph=True, allow_unused=True)
            grads[term] = {k: torch.zeros_like(v) if d is None else d for (k, v), d in zip(leaves.items(), gs)}
        _, m, v, norm = official.step(params, grads["total"], LR)
        out[key] = dict(images=images, tokens=tokens, label_emb=label_emb, targets=targets, params=params,
                        want_emb=official.image_embedding(params, patches).detach(),
                        losses={k: t.detach() for k, t in terms.items()}, grads=grads,
                        exp_avg=m, exp_avg_sq=v, grad_norm=norm)
    return out


def our_model(clip, params):
    """Our paper-mode model on the same CLIP file, its trainable parameters set to `params`."""
    model = load_clip(clip[1])
    names = official.official_to_ours()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == set(names.values()), trainable ^ set(names.values())
    with torch.no_grad():
        for theirs, ours in names.items():
            model.get_parameter(ours).copy_(params[theirs])
    return model.to(DEVICE).train()


def our_losses(model, batch, impl):
    b = {k: batch[k].to(DEVICE) for k in ("images", "tokens", "targets", "label_emb")}
    return tagalign.compute_loss(model, b["images"], b["tokens"], b["targets"], tag_emb=b["label_emb"],
                                 tag_weight=1.0, tag_loss="softmax", impl=impl)


def rel(got, want):
    """max |got - want| / max |want|; an all-zero `want` must be matched exactly."""
    got, want = got.detach().cpu().double(), want.detach().double()
    d = (got - want).abs().max().item()
    top = want.abs().max().item()
    return d / top if top else (0.0 if d == 0 else float("inf"))


def mismatches(pairs, tol, measure=rel):
    """One report per (name, got, want) whose error exceeds tol: the failure message."""
    bad = [diff_report(name, got.detach().cpu(), want) for name, got, want in pairs if not measure(got, want) <= tol]
    return "\n".join(bad)


# ---------------------------------------------------------------- the forward
def test_image_embedding_matches_official(clip, batches):
    """Surgery tokens -> GDecoder -> the clip_proj copy -> mean over (h, w), as tagalign.py."""
    batch = batches["uncapped"]
    model = our_model(clip, batch["params"])
    with torch.no_grad():
        got = model.encode_image(batch["images"].to(DEVICE))
    assert rel(got, batch["want_emb"]) <= EMB_RTOL, diff_report("image embedding", got.cpu(), batch["want_emb"])


# ---------------------------------------------------------------- losses, gradients, one step
@pytest.mark.parametrize("scales", list(SCALES))
@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_losses_match_official(clip, batches, impl, scales):
    batch = batches[scales]
    with torch.no_grad():
        got = dict(zip(TERMS, our_losses(our_model(clip, batch["params"]), batch, impl)))
    errors = {k: abs(got[k].item() - batch["losses"][k].item()) / abs(batch["losses"][k].item()) for k in TERMS}
    assert all(e <= LOSS_RTOL for e in errors.values()), (
        f"relative errors {errors}; ours {({k: v.item() for k, v in got.items()})}, "
        f"official {({k: v.item() for k, v in batch['losses'].items()})}")


@pytest.mark.parametrize("scales", list(SCALES))
@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_gradients_match_official(clip, batches, impl, scales):
    """The gradient of every trainable parameter, for each loss term on its own and the total."""
    batch = batches[scales]
    model = our_model(clip, batch["params"])
    terms = dict(zip(TERMS, our_losses(model, batch, impl)))
    names = official.official_to_ours()
    params = [model.get_parameter(ours) for ours in names.values()]
    report = []
    for term, loss in terms.items():
        gs = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
        pairs = [(f"{term}: {theirs}", torch.zeros_like(p) if d is None else d, batch["grads"][term][theirs])
                 for (theirs, p), d in zip(zip(names, params), gs)]
        report.append(mismatches(pairs, GRAD_RTOL))
    if scales == "capped":  # above the cap no gradient reaches a temperature: ours must be exactly 0 too
        assert all(batch["grads"]["total"][k].item() == 0 for k in ("cl_loss.logit_scale", "ce_loss.logit_scale"))
    report = "\n".join(r for r in report if r)
    assert not report, report


@pytest.mark.parametrize("scales", list(SCALES))
@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_one_official_step(clip, batches, impl, scales):
    """One step as main.py takes it: clip_grad_norm_(5.0), then AdamW (betas 0.9/0.999, eps
    1e-6, weight decay 0.05 on every tensor that is not 1-D and not a bias: conv weights, the
    projection copy, the 0-d gates and logit scales). AdamW's moments hold the clipped gradients:
    they are compared with the official ones. The parameters are compared with the official step
    taken from our own gradients: Adam's first update, lr g / (|g| + eps), turns the 1e-8
    summation noise of a gradient entry near eps = 1e-6 into 1e-3 of lr, which would hide a
    missing decay of the small conv weights (lr x 0.05 x |p|, about 5e-7)."""
    batch = batches[scales]
    assert batch["grad_norm"] > official.MAX_NORM  # clipping acts, so the moments test it
    model = our_model(clip, batch["params"])
    total, _, _ = our_losses(model, batch, impl)
    total.backward()
    names = official.official_to_ours()
    ours = {theirs: model.get_parameter(o) for theirs, o in names.items()}
    want, _, _, _ = official.step(batch["params"], {k: p.grad.detach().cpu().clone() for k, p in ours.items()}, LR)
    torch.nn.utils.clip_grad_norm_(model.parameters(), official.MAX_NORM)  # main.py's call
    optimizer = tagalign.make_optimizer(model, lr=LR, weight_decay=official.WEIGHT_DECAY, beta2=official.BETAS[1],
                                        decay="official")
    optimizer.step()
    m = [(f"{k} exp_avg", optimizer.state[p]["exp_avg"], batch["exp_avg"][k]) for k, p in ours.items()]
    v = [(f"{k} exp_avg_sq", optimizer.state[p]["exp_avg_sq"], batch["exp_avg_sq"][k]) for k, p in ours.items()]
    after = [(k, p, want[k]) for k, p in ours.items()]
    excess = lambda got, want: ((got.detach().cpu() - want).abs() - PARAM_RTOL * want.abs()).max().item()  # noqa: E731
    report = "\n".join(r for r in (mismatches(m, GRAD_RTOL), mismatches(v, 2 * GRAD_RTOL),
                                     mismatches(after, PARAM_ATOL, excess)) if r)
    assert not report, report
