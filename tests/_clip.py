"""Small OpenAI-format CLIPs for the tests, and independent re-statements of what the model
must compute on them: OpenAI CLIP's forward (nn.MultiheadAttention, sequence-first, as CLIP's
model.py), and CLIP Surgery and MaskCLIP as TagAlign's code computes them, in plain loops over
heads (not the code under test)."""
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F
from collections import OrderedDict


class RefQuickGELU(nn.Module):
    def forward(self, x):
        return x * torch.sigmoid(1.702 * x)


class RefBlock(nn.Module):
    """OpenAI CLIP's residual block, restated: nn.MultiheadAttention on (L, B, W)."""

    def __init__(self, width, heads, mask=None):
        super().__init__()
        self.attn = nn.MultiheadAttention(width, heads)
        self.ln_1, self.ln_2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.mlp = nn.Sequential(OrderedDict([("c_fc", nn.Linear(width, 4 * width)), ("gelu", RefQuickGELU()),
                                              ("c_proj", nn.Linear(4 * width, width))]))
        self.mask = mask

    def forward(self, x):
        h = self.ln_1(x)
        x = x + self.attn(h, h, h, need_weights=False, attn_mask=self.mask)[0]
        return x + self.mlp(self.ln_2(x))


class RefTransformer(nn.Module):
    def __init__(self, width, layers, heads, mask=None):
        super().__init__()
        self.resblocks = nn.Sequential(*[RefBlock(width, heads, mask) for _ in range(layers)])


class RefVisual(nn.Module):
    def __init__(self, res, patch, width, layers, heads, out):
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, patch, patch, bias=False)
        self.class_embedding = nn.Parameter(torch.randn(width))
        self.positional_embedding = nn.Parameter(torch.randn((res // patch) ** 2 + 1, width))
        self.ln_pre, self.ln_post = nn.LayerNorm(width), nn.LayerNorm(width)
        self.transformer = RefTransformer(width, layers, heads)
        self.proj = nn.Parameter(torch.randn(width, out) * width ** -0.5)
        self.grid = res // patch

    def embed(self, x):
        """(B, 3, H, W) -> (B, 1 + h*w, W) after ln_pre, positions interpolated bicubically as
        TagAlign's sclip/model.py interpolate_pos_emb does when the grid differs."""
        x = self.conv1(x)
        h, w = x.shape[-2:]
        x = x.flatten(2).permute(0, 2, 1)
        pos = self.positional_embedding
        g = self.grid
        if (h, w) != (g, g):
            grid = pos[1:].T.reshape(1, -1, g, g)
            grid = F.interpolate(grid, size=(h, w), mode="bicubic", align_corners=False)[0]
            pos = torch.cat([pos[:1], grid.reshape(grid.shape[0], -1).T])
        cls = self.class_embedding + torch.zeros(x.shape[0], 1, x.shape[-1])
        return self.ln_pre(torch.cat([cls, x], dim=1) + pos)

    def forward(self, x):
        x = self.transformer.resblocks(self.embed(x).permute(1, 0, 2)).permute(1, 0, 2)  # (L, B, W) inside
        return self.ln_post(x[:, 0]) @ self.proj


class RefCLIP(nn.Module):
    """A small OpenAI-layout CLIP ViT. Widths are multiples of 64 (CLIP's heads = width // 64);
    vocab 49408 by default so that CLIP's real tokenizer fits it."""

    def __init__(self, vocab=49408, ctx=16, width=64, layers=2, res=32, patch=8, out=24,
                 vision_width=64, vision_layers=8):
        super().__init__()
        self.visual = RefVisual(res, patch, vision_width, vision_layers, vision_width // 64, out)
        mask = torch.full((ctx, ctx), float("-inf")).triu(1)
        self.transformer = RefTransformer(width, layers, width // 64, mask)
        self.token_embedding = nn.Embedding(vocab, width)
        self.positional_embedding = nn.Parameter(torch.randn(ctx, width) * 0.01)
        self.ln_final = nn.LayerNorm(width)
        self.text_projection = nn.Parameter(torch.randn(width, out) * width ** -0.5)
        self.logit_scale = nn.Parameter(torch.tensor(4.6052))

    def encode_text(self, tokens):
        x = self.token_embedding(tokens) + self.positional_embedding
        x = self.ln_final(self.transformer.resblocks(x.permute(1, 0, 2)).permute(1, 0, 2))
        return x[torch.arange(x.shape[0]), tokens.argmax(-1)] @ self.text_projection

    def forward(self, images, tokens):
        return self.visual(images), self.encode_text(tokens)


def make_ref_clip(seed=0, **kw):
    """A RefCLIP in eval mode whose weights are fp16 numbers (as OpenAI ships them), LayerNorm
    weights moved away from 1 and 0 so that a misplaced one shows."""
    torch.manual_seed(seed)
    ref = RefCLIP(**kw).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.05 * torch.randn_like(p))
            p.copy_(p.half().float())
    return ref


def write_clip(ref, path, fmt):
    """Write ref as OpenAI distributes it ("torchscript": a traced archive, like ViT-B-16.pt) or
    as a state dict: "fp16" (half tensors, plus the three int entries CLIP's build_model drops)
    or "wrapped" (under "state_dict" with DDP's "module." prefix, as a training script saves)."""
    path = str(path)
    if fmt == "torchscript":
        images, tokens = torch.randn(1, 3, 32, 32), torch.ones(1, ref.positional_embedding.shape[0], dtype=torch.long)
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch.jit.trace is deprecated, and is how OpenAI's were made
            torch.jit.save(torch.jit.trace(ref, (images, tokens), check_trace=False), path)
    elif fmt == "fp16":
        sd = {k: v.half() for k, v in ref.state_dict().items()}
        sd.update(input_resolution=torch.tensor(32), context_length=torch.tensor(16), vocab_size=torch.tensor(49408))
        torch.save(sd, path)
    elif fmt == "wrapped":
        torch.save({"epoch": 3, "state_dict": {"module." + k: v for k, v in ref.state_dict().items()}}, path)
    else:
        raise ValueError(fmt)
    return path


def _mha_parts(attn):
    W = attn.embed_dim
    wq, wk, wv = attn.in_proj_weight.split(W)
    bq, bk, bv = attn.in_proj_bias.split(W)
    return (wq, bq), (wk, bk), (wv, bv)


def ref_dense_tokens(visual, images, reading, k=6):
    """Official readings of the patch tokens, for one image at a time, heads in a loop.

    surgery (TagAlign's sclip/model.py): blocks before L-k run normally; from block L-k on, a
    second path s starts at the hidden state entering block L-k and adds, per block, out_proj of
    value-value attention (softmax(v v^T / sqrt(d)) v per head, v from ln_1 of the ORIGINAL
    path's state), no FFN; the class token is the original path's. maskclip: the last block's
    patch tokens add out_proj(v) (attention to themselves) and keep the FFN.
    Returns (B, 1 + h*w, W) without ln_post."""
    out = []
    blocks = list(visual.transformer.resblocks)
    L = len(blocks)
    for img in images:
        x = visual.embed(img[None])[0]  # (N, W)
        s = None
        for i, blk in enumerate(blocks):
            y = blk.ln_1(x)
            (wq, bq), (wk, bk), (wv, bv) = _mha_parts(blk.attn)
            H = blk.attn.num_heads
            d = x.shape[1] // H
            v = y @ wv.T + bv
            if reading == "surgery" and i >= L - k:
                heads = []
                for hd in range(H):
                    vh = v[:, hd * d:(hd + 1) * d]
                    heads.append(torch.softmax(vh @ vh.T * d ** -0.5, dim=-1) @ vh)
                vv = blk.attn.out_proj(torch.cat(heads, dim=1))
                s = (x if s is None else s) + vv
            if reading == "maskclip" and i == L - 1:
                q, kk = y @ wq.T + bq, y @ wk.T + bk
                heads = []
                for hd in range(H):
                    sl = slice(hd * d, (hd + 1) * d)
                    heads.append(torch.softmax(q[:, sl] @ kk[:, sl].T * d ** -0.5, dim=-1) @ v[:, sl])
                a = blk.attn.out_proj(torch.cat(heads, dim=1))
                a[1:] = blk.attn.out_proj(v[1:])  # patches: their own value
                x = x + a
                x = x + blk.mlp(blk.ln_2(x))
            else:
                x = blk(x[:, None])[:, 0]  # the unchanged block
        if s is not None:
            x = torch.cat([x[:1], s[1:]])
        out.append(x)
    return torch.stack(out)
