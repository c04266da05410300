"""TagAlign's official training step, re-stated in plain formulas from the authors' code
(github.com/Qinying-Liu/TagAlign at 02757a4), as the oracle of test_official_step.py. Nothing here
calls the code under test; the CLIP Surgery tokens come from _clip.ref_dense_tokens (itself a
loop re-statement of sclip/model.py).

What each part re-states:
- names and decay: the trainable parameters under the official names (models/tagalign/
  tagalign.py wraps GDecoder and the clip_proj copy in nn.Sequential "projector"; the two loss
  modules hold a logit_scale each) and utils/optimizer.py set_weight_decay's rule;
- image_embedding: tagalign.py forward: patch tokens -> (B, C, h, w) -> GDecoder
  (models/tagalign/projectors.py, modules.py ResConv/ConvBlock/LayerNorm2d/Gate) -> clip_proj
  (encoders.py LNProjLayer: ln_post then @ proj) -> mean over (h, w);
- losses: models/tagalign/loss.py InfoNCE and MultiClassificationLoss, cl_w = ce_w = 1
  (configs/tagalign.yml), summed as utils/misc.py parse_losses does;
- step: main.py clip_grad_norm_(model.parameters(), 5.0) then torch AdamW (utils/optimizer.py,
  betas from configs/default.yml, eps and weight decay from configs/tagalign.yml), written out.
"""
import math

import torch
import torch.nn.functional as F

from _clip import ref_dense_tokens

BETAS, EPS, WEIGHT_DECAY, MAX_NORM = (0.9, 0.999), 1e-6, 0.05, 5.0  # default.yml, tagalign.yml


# ---------------------------------------------------------------- parameters under the official names
def official_to_ours(n_layers=2):
    """{official name: our name} for every trainable parameter of the paper-mode model."""
    names = {}
    for i in range(n_layers):
        for theirs, ours in (("conv", "conv1"), ("conv2", "conv2")):  # ResConv(double=True)'s two ConvBlocks
            o, t = f"projector.projector.net.{i}.{theirs}", f"decoder.{i}.{ours}"
            names.update({f"{o}.norm.weight": f"{t}.norm.weight", f"{o}.norm.bias": f"{t}.norm.bias",
                          f"{o}.conv.weight": f"{t}.conv.weight", f"{o}.conv.bias": f"{t}.conv.bias",
                          f"{o}.gate.gate": f"{t}.gate"})
    names.update({"projector.clip_proj.ln.weight": "dense_ln.weight", "projector.clip_proj.ln.bias": "dense_ln.bias",
                  "projector.clip_proj.proj": "dense_proj",
                  "cl_loss.logit_scale": "logit_scale", "ce_loss.logit_scale": "tag_logit_scale"})
    return names


def decays(name, p):
    """set_weight_decay: no decay for 1-D tensors and names ending in ".bias"; everything else,
    0-d gates and logit scales included, decays."""
    return not (len(p.shape) == 1 or name.endswith(".bias"))


def fixed_params(visual, itc_scale, tag_scale, n_layers=2, seed=1):
    """Seeded, non-trivial values for every trainable parameter (official names), so that no part
    hides: gates away from their zero init (tanh(g) in +-[0.38, 0.72]), conv weights at the
    default init's size, LayerNorm affines away from 1 and 0, the clip_proj copy perturbed away
    from CLIP's ln_post and proj; logit scales given (log of the multiplier)."""
    g = torch.Generator().manual_seed(seed)
    W = visual.ln_post.weight.shape[0]
    randn = lambda *shape: torch.randn(*shape, generator=g)  # noqa: E731
    params = {}
    for name in official_to_ours(n_layers):
        if name.endswith("gate.gate"):
            sign = 1.0 if torch.rand((), generator=g) < 0.5 else -1.0
            params[name] = sign * (0.4 + 0.5 * torch.rand((), generator=g))
        elif name.endswith("conv.weight"):
            params[name] = randn(W, W, 3, 3) / math.sqrt(9 * W)
        elif name.endswith("conv.bias"):
            params[name] = 0.05 * randn(W)
        elif name.endswith("norm.weight"):
            params[name] = 1 + 0.2 * randn(W)
        elif name.endswith("norm.bias"):
            params[name] = 0.1 * randn(W)
    params["projector.clip_proj.ln.weight"] = visual.ln_post.weight.detach() + 0.1 * randn(W)
    params["projector.clip_proj.ln.bias"] = visual.ln_post.bias.detach() + 0.1 * randn(W)
    proj = visual.proj.detach()
    params["projector.clip_proj.proj"] = proj + 0.2 * proj.std() * randn(*proj.shape)
    params["cl_loss.logit_scale"] = torch.tensor(math.log(itc_scale))
    params["ce_loss.logit_scale"] = torch.tensor(math.log(tag_scale))
    return {k: v.float().contiguous() for k, v in params.items()}


# ---------------------------------------------------------------- forward
def surgery_patches(visual, images):
    """(B, 3, H, W) -> (B, C, h, w): the surgery patch tokens, as tagalign.py's rearrange
    "B (H W) C -> B C H W" (class token dropped, no ln_post: the encoder skips it)."""
    with torch.no_grad():
        tokens = ref_dense_tokens(visual, images, "surgery", k=6)  # (B, 1 + h*w, C)
    B, C = tokens.shape[0], tokens.shape[-1]
    h, w = images.shape[-2] // visual.conv1.kernel_size[0], images.shape[-1] // visual.conv1.kernel_size[0]
    return tokens[:, 1:].reshape(B, h, w, C).permute(0, 3, 1, 2)


def layer_norm_channels(x, weight, bias, eps=1e-5):
    """LayerNorm2d: LayerNorm over C of (B, C, h, w), biased variance, eps 1e-5."""
    mu = x.mean(dim=1, keepdim=True)
    var = ((x - mu) ** 2).mean(dim=1, keepdim=True)
    return (x - mu) / torch.sqrt(var + eps) * weight[None, :, None, None] + bias[None, :, None, None]


def gelu(x):
    return 0.5 * x * (1 + torch.erf(x / math.sqrt(2)))  # nn.GELU(): the exact, erf form


def conv_block(p, prefix, x):
    """ConvBlock(norm="ln", activ="gelu", gate=True), pre-activation: tanh(g) conv(gelu(LN(x)))."""
    y = gelu(layer_norm_channels(x, p[f"{prefix}.norm.weight"], p[f"{prefix}.norm.bias"]))
    y = F.conv2d(y, p[f"{prefix}.conv.weight"], p[f"{prefix}.conv.bias"], padding=1)  # 3x3, zeros padding
    return torch.tanh(p[f"{prefix}.gate.gate"]) * y


def image_embedding(p, patches, n_layers=2):
    """(B, C, h, w) surgery patches -> (B, E): GDecoder, the clip_proj copy, mean over (h, w)."""
    x = patches
    for i in range(n_layers):  # ResConv(double=True): x + conv(x), then + conv2 of the result
        x = x + conv_block(p, f"projector.projector.net.{i}.conv", x)
        x = x + conv_block(p, f"projector.projector.net.{i}.conv2", x)
    x = x.permute(0, 2, 3, 1)  # LNProjLayer works on (B, h*w, C): LayerNorm over C, then @ proj
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    x = (x - mu) / torch.sqrt(var + 1e-5) * p["projector.clip_proj.ln.weight"] + p["projector.clip_proj.ln.bias"]
    x = x @ p["projector.clip_proj.proj"]  # (B, h, w, E)
    return x.mean(dim=(1, 2))


# ---------------------------------------------------------------- losses
def info_nce(p, image_emb, text_emb):
    """InfoNCE on one process: cross-entropy both ways at exp(t).clamp(max=100), averaged."""
    i, t = F.normalize(image_emb, dim=-1, eps=1e-6), F.normalize(text_emb, dim=-1, eps=1e-6)
    labels = torch.arange(i.shape[0])
    s = torch.clamp(p["cl_loss.logit_scale"].exp(), max=100)
    return 0.5 * (F.cross_entropy(i @ t.T * s, labels) + F.cross_entropy(t @ i.T * s, labels))


def multi_classification(p, image_emb, label_emb, labels):
    """MultiClassificationLoss, literally: probabilities clamped at 1e-8 before the log, targets
    L1-normalised (an untagged row is all zeros), mean over all B rows."""
    i, w = F.normalize(image_emb, dim=-1, eps=1e-6), F.normalize(label_emb, dim=-1, eps=1e-6)
    preds = (i @ w.T * torch.clamp(p["ce_loss.logit_scale"].exp(), max=100)).softmax(dim=-1)
    return -(preds.clamp(min=1e-8).log() * F.normalize(labels, p=1, dim=-1)).sum(-1).mean()


def losses(p, patches, text_emb, label_emb, labels):
    """(total, cl_loss, ce_loss) with cl_w = ce_w = 1."""
    img = image_embedding(p, patches)
    cl, ce = info_nce(p, img, text_emb), multi_classification(p, img, label_emb, labels)
    return cl + ce, cl, ce


# ---------------------------------------------------------------- one optimizer step
def step(p, grads, lr, weight_decay=WEIGHT_DECAY, betas=BETAS, eps=EPS, max_norm=MAX_NORM):
    """clip_grad_norm_ (the 2-norm over all gradients, scaled by max_norm / (norm + 1e-6) when
    that is below 1) then AdamW's first step, decoupled decay first, bias-corrected moments.
    Returns (new params, first moments, second moments, total gradient norm)."""
    norm = torch.sqrt(sum((g.double() ** 2).sum() for g in grads.values())).float()
    coef = min(1.0, (max_norm / (norm + 1e-6)).item())
    new, m, v = {}, {}, {}
    for name, x in p.items():
        g = grads[name] * coef
        m[name] = (1 - betas[0]) * g  # exp_avg from 0
        v[name] = (1 - betas[1]) * g * g  # exp_avg_sq from 0
        m_hat, v_hat = m[name] / (1 - betas[0]), v[name] / (1 - betas[1])
        decayed = x * (1 - lr * (weight_decay if decays(name, x) else 0.0))
        new[name] = decayed - lr * m_hat / (torch.sqrt(v_hat) + eps)
    return new, m, v, norm
