"""The TagAlign model: a hand-written CLIP (ViT and causal text transformer with OpenAI's parameter
names, so that a CLIP state dict loads as it is) and TagAlign's dense head on top of it.

    images -> ViT patch tokens -> decoder -> LayerNorm -> projection -> (B, h, w, E) patch embeddings
    image embedding = their mean; text embedding = CLIP's text tower at the end-of-text token

The losses, the optimizer and the training loop live in tagalign.py; eval_seg.py reads models
through its `SegmentationModel`.
"""
import contextlib
import dataclasses
import hashlib
import io
import math
import os
import pickle
import re
import warnings
import zipfile
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


# ---------------------------------------------------------------- config
# How the ViT's patch tokens are read out: a "reading" (VisionTransformer.tokens). The setting
# that picks one keeps its user-facing name, `dense` (Config.dense, `--set dense=`, eval_seg's
# --dense), which checkpoints and documented commands carry; in the code it is `reading`.
READINGS = ("plain", "maskclip", "surgery")


@dataclass
class Config:
    # image encoder (ViT)
    image_size: int = 64        # training resolution (pixels, square)
    patch_size: int = 8         # pixels per patch side: the dense grid is image_size / patch_size
    stem: str = "conv"          # "conv": stride-2 3x3 convs down to the patch grid; "patch": CLIP's patchify
    stem_width: int = 24        # channels of the conv stem's first conv, doubled by each next one
    vision_width: int = 96      # transformer width
    vision_layers: int = 1      # residual attention blocks
    vision_heads: int = 3       # attention heads
    vision_local: int = 1       # -1: global attention (CLIP); r >= 0: a patch attends to the
    #   patches within r grid steps (0: itself alone), the class token to everything
    # text encoder (causal transformer)
    vocab_size: int = 1000      # tokenizer vocabulary, set from the tokenizer
    context_length: int = 28    # tokens per caption, start and end tokens included
    text_width: int = 64        # transformer width
    text_layers: int = 2        # residual attention blocks
    text_heads: int = 2         # attention heads
    # joint space and the TagAlign head
    embed_dim: int = 64         # dimension of the shared image-text space
    dense: str = "plain"        # the reading (READINGS) of the ViT's patch tokens that the decoder gets:
    #   "plain" (its outputs), "maskclip" (last block: each patch attends to itself) or "surgery"
    surgery_blocks: int = 6     # blocks with the value-value path when dense is "surgery" (the paper: 6)
    decoder_blocks: int = 0     # TCL's residual conv blocks on the patch grid (the paper: 2 on CLIP;
    #   the world model: none, as each 3x3 block widens the context a patch sees: RESULTS.md, the halo)
    quick_gelu: bool = False    # x * sigmoid(1.702 x) as in OpenAI CLIP; exact GELU otherwise

    def check(self):
        """Raise ValueError with one line naming the field when the shape cannot be built."""
        for k, v in dataclasses.asdict(self).items():
            if isinstance(v, int) and not isinstance(v, bool) and v < {"vision_local": -1}.get(k, 0):
                raise ValueError(f"{k}={v}: must be {'>= -1' if k == 'vision_local' else 'non-negative'}")
        for k in ("image_size", "patch_size", "vision_width", "vision_heads", "text_width", "text_heads",
                  "vocab_size", "context_length", "embed_dim"):
            if getattr(self, k) < 1:
                raise ValueError(f"{k}={getattr(self, k)}: must be at least 1")
        if self.stem not in ("conv", "patch"):
            raise ValueError(f"stem={self.stem!r}: must be 'conv' or 'patch'")
        if self.dense not in READINGS:
            raise ValueError(f"dense={self.dense!r}: must be one of {', '.join(READINGS)}")
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size={self.image_size} is not a multiple of patch_size={self.patch_size}")
        if self.stem == "conv" and (self.patch_size & (self.patch_size - 1) or self.patch_size < 2):
            raise ValueError(f"patch_size={self.patch_size}: the conv stem needs a power of two >= 2")
        for side in ("vision", "text"):
            width, heads = getattr(self, f"{side}_width"), getattr(self, f"{side}_heads")
            if width % heads:
                raise ValueError(f"{side}_width={width} is not a multiple of {side}_heads={heads}")
        if self.dense == "surgery" and not 1 <= self.surgery_blocks <= self.vision_layers:
            raise ValueError(f"surgery_blocks={self.surgery_blocks}: must lie in 1..vision_layers={self.vision_layers}")
        return self

    @classmethod
    def from_clip_state_dict(cls, sd):
        """Infer the shape of an OpenAI CLIP ViT from its state dict, as CLIP's build_model does
        (heads = width // 64), with the paper's head: surgery features and 2 decoder blocks."""
        vw = sd["visual.conv1.weight"].shape[0]
        patch = sd["visual.conv1.weight"].shape[-1]
        grid = round((sd["visual.positional_embedding"].shape[0] - 1) ** 0.5)
        tw = sd["ln_final.weight"].shape[0]
        count = lambda prefix: len({k[len(prefix):].split(".")[0] for k in sd if k.startswith(prefix)})  # noqa: E731
        layers = count("visual.transformer.resblocks.")
        return cls(image_size=grid * patch, patch_size=patch, stem="patch",
                   vision_width=vw, vision_layers=layers, vision_heads=vw // 64, vision_local=-1,
                   vocab_size=sd["token_embedding.weight"].shape[0],
                   context_length=sd["positional_embedding"].shape[0], text_width=tw,
                   text_layers=count("transformer.resblocks."), text_heads=tw // 64,
                   embed_dim=sd["text_projection"].shape[1], dense="surgery",
                   surgery_blocks=min(6, layers), decoder_blocks=2, quick_gelu=True)


# ---------------------------------------------------------------- precision
def autocast(device, precision):
    """torch.autocast to bf16 or fp16 (precision "bf16", "fp16") on `device`; nothing for "fp32"."""
    if precision in ("bf16", "fp16"):
        return torch.autocast(device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)
    return contextlib.nullcontext()


# ---------------------------------------------------------------- transformer blocks (CLIP names)
class LayerNorm(nn.LayerNorm):
    """LayerNorm computed in fp32 whatever the input dtype, as OpenAI CLIP's."""

    def forward(self, x):
        return super().forward(x.float()).to(x.dtype)


class QuickGELU(nn.Module):
    def forward(self, x):
        return x * torch.sigmoid(1.702 * x)


class Attention(nn.Module):
    """Multi-head self-attention with nn.MultiheadAttention's packed parameter names."""

    def __init__(self, width, heads):
        super().__init__()
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * width))
        self.out_proj = nn.Linear(width, width)
        nn.init.xavier_uniform_(self.in_proj_weight)
        nn.init.zeros_(self.out_proj.bias)

    def forward(self, x, causal=False, mask=None):
        """x (B, N, W); causal: token i sees tokens <= i; mask: (N, N) bool, True = may attend."""
        B, N, W = x.shape
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias)  # (B, N, 3W)
        q, k, v = qkv.view(B, N, 3, self.heads, W // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal)  # (B, H, N, W/H)
        return self.out_proj(y.transpose(1, 2).reshape(B, N, W))

    def value_value(self, x, mask=None):
        """CLIP Surgery's attention (Li et al. 2023): queries and keys replaced by the values, so
        that a token attends to the tokens whose values resemble its own; same scale
        head_dim^-0.5 and out_proj (with its bias). x (B, N, W) -> (B, N, W)."""
        B, N, W = x.shape
        v = F.linear(x, self.in_proj_weight[2 * W:], self.in_proj_bias[2 * W:])  # (B, N, W)
        v = v.view(B, N, self.heads, W // self.heads).transpose(1, 2)  # (B, H, N, W/H)
        y = F.scaled_dot_product_attention(v, v, v, attn_mask=mask)
        return self.out_proj(y.transpose(1, 2).reshape(B, N, W))


class MLP(nn.Module):
    def __init__(self, width, quick_gelu):
        super().__init__()
        self.c_fc = nn.Linear(width, 4 * width)
        self.gelu = QuickGELU() if quick_gelu else nn.GELU()
        self.c_proj = nn.Linear(4 * width, width)

    def forward(self, x):
        return self.c_proj(self.gelu(self.c_fc(x)))


class ResidualBlock(nn.Module):
    """Pre-LN block: x + attn(ln_1(x)), then x + mlp(ln_2(x))."""

    def __init__(self, width, heads, quick_gelu):
        super().__init__()
        self.ln_1, self.attn = LayerNorm(width), Attention(width, heads)
        self.ln_2, self.mlp = LayerNorm(width), MLP(width, quick_gelu)

    def forward(self, x, causal=False, mask=None):
        x = x + self.attn(self.ln_1(x), causal, mask)
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    def __init__(self, width, layers, heads, quick_gelu):
        super().__init__()
        self.resblocks = nn.ModuleList(ResidualBlock(width, heads, quick_gelu) for _ in range(layers))

    def forward(self, x, causal=False, mask=None):
        for block in self.resblocks:
            x = block(x, causal, mask)
        return x


# ---------------------------------------------------------------- image encoder
def local_attention_mask(h, w, r, device=None):
    """(1 + h*w, 1 + h*w) bool mask, True = may attend: the class token sees everything; a patch
    sees the patches within r steps (Chebyshev distance) and not the class token.

    Why: the image embedding is the mean of the patch embeddings. Under global attention every
    patch can carry the whole image's content, and nothing ties "circle" to the circle's patches
    (trained from scratch, a patch on the grass ended up closest to the shape names). With a
    bounded receptive field only the patches that see the circle can say "circle" -- the same
    prior that makes class activation maps work (Zhou et al. 2016). CLIP attends globally
    (Config.vision_local = -1: no mask at all); with r = 0 a patch sees itself alone (the
    MaskCLIP reading of a last block).
    """
    y, x = torch.meshgrid(torch.arange(h, device=device), torch.arange(w, device=device), indexing="ij")
    y, x = y.flatten(), x.flatten()
    near = ((y[:, None] - y[None]).abs() <= r) & ((x[:, None] - x[None]).abs() <= r)  # (hw, hw)
    mask = torch.ones(1 + h * w, 1 + h * w, dtype=torch.bool, device=device)
    mask[1:, 0] = False
    mask[1:, 1:] = near
    return mask


class VisionTransformer(nn.Module):
    """CLIP's ViT; `dense()` returns the patch tokens, `forward()` the class-token embedding."""

    def __init__(self, cfg):
        super().__init__()
        W, c = cfg.vision_width, cfg.stem_width
        if cfg.stem == "conv":
            # Early convolutions (Xiao et al. 2021, "Early Convolutions Help Transformers See
            # Better"): stride-2 3x3 conv-BN-GELU, doubling the channels, down to the patch grid; conv1
            # is then a 1x1 patch embedding. patch_size P must be a power of two. Symmetric padding
            # would centre cell i's receptive field on pixel P*i, (P-1)/2 px before the cell's
            # centre, and shift every predicted mask by that much; padding the last conv on the
            # bottom and right only moves it to P*i + P/2, half a pixel past the centre.
            n = int(math.log2(cfg.patch_size))
            chans = [3] + [c * 2 ** i for i in range(n)]
            pad = lambda i: nn.ZeroPad2d((0, 1, 0, 1) if i == n - 1 else 1)  # noqa: E731
            self.stem = nn.Sequential(*[m for i in range(n) for m in (
                pad(i), nn.Conv2d(chans[i], chans[i + 1], 3, 2, bias=False), nn.BatchNorm2d(chans[i + 1]), nn.GELU())])
            self.conv1 = nn.Conv2d(chans[-1], W, 1, bias=False)
        else:
            self.stem = nn.Identity()
            self.conv1 = nn.Conv2d(3, W, cfg.patch_size, cfg.patch_size, bias=False)
        grid = cfg.image_size // cfg.patch_size
        self.class_embedding = nn.Parameter(W ** -0.5 * torch.randn(W))
        self.positional_embedding = nn.Parameter(W ** -0.5 * torch.randn(grid * grid + 1, W))
        self.ln_pre = LayerNorm(W)
        self.transformer = Transformer(W, cfg.vision_layers, cfg.vision_heads, cfg.quick_gelu)
        self.local = cfg.vision_local
        self.ln_post = LayerNorm(W)
        self.proj = nn.Parameter(W ** -0.5 * torch.randn(W, cfg.embed_dim))

    def positions(self, h, w):
        """Positional embeddings for an h x w grid, interpolated bicubically when it differs."""
        pos = self.positional_embedding
        g = round((pos.shape[0] - 1) ** 0.5)
        if (h, w) == (g, g):
            return pos
        grid = pos[1:].reshape(1, g, g, -1).permute(0, 3, 1, 2)  # (1, W, g, g)
        grid = F.interpolate(grid.float(), size=(h, w), mode="bicubic", align_corners=False)
        return torch.cat([pos[:1], grid.to(pos.dtype).flatten(2)[0].T])

    def tokens(self, x, reading="plain", surgery_blocks=6):
        """(B, 3, H, W) images -> (B, 1 + h*w, width) tokens, and (h, w). The class token is always
        the ordinary one; the patch tokens depend on the reading:

        plain:    the last block's outputs, as trained.
        maskclip: in the last block every patch attends to itself alone, so its attention output
                  is out_proj(its own value); FFN kept (MaskCLIP, Zhou et al. 2022).
        surgery:  CLIP Surgery (Li et al. 2023) as TagAlign's code computes it. With L blocks and
                  k = surgery_blocks, a second path s starts from the hidden state h_{L-k}
                  entering block L-k and adds, for each block i >= L-k, the value-value attention
                  of that block's ln_1(h_i) -- h_i being the ORIGINAL path's state -- and no FFN:
                  s_{i+1} = s_i + vv_i(ln_1(h_i)). The original path runs unchanged and never
                  reads s. Patch tokens are s_L (no ln_post: the decoder reads raw tokens).
        """
        if reading not in READINGS:
            raise ValueError(f"reading {reading!r}: must be one of {', '.join(READINGS)}")
        x = self.conv1(self.stem(x))  # (B, W, h, w)
        B, W, h, w = x.shape
        x = x.flatten(2).transpose(1, 2)  # (B, h*w, W)
        cls = self.class_embedding.to(x.dtype).expand(B, 1, W)
        x = torch.cat([cls, x], dim=1) + self.positions(h, w).to(x.dtype)
        mask = local_attention_mask(h, w, self.local, x.device) if self.local >= 0 else None
        blocks, x = self.transformer.resblocks, self.ln_pre(x)
        L, s = len(blocks), None
        for i, block in enumerate(blocks):
            if reading == "surgery" and i >= L - surgery_blocks:
                s = (x if s is None else s) + block.attn.value_value(block.ln_1(x), mask)
            own = reading == "maskclip" and i == L - 1  # r = 0: a patch sees itself alone
            x = block(x, mask=local_attention_mask(h, w, 0, x.device) if own else mask)
        if s is not None:
            x = torch.cat([x[:, :1], s[:, 1:]], dim=1)  # the class token keeps the original path
        return x, (h, w)

    def forward(self, x):
        x, _ = self.tokens(x)
        return self.ln_post(x[:, 0]) @ self.proj  # (B, E)


# ---------------------------------------------------------------- CLIP (names as OpenAI's)
class CLIP(nn.Module):
    """Image and text towers with OpenAI CLIP's module names: its state dict loads as it is."""

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.visual = VisionTransformer(cfg)
        W = cfg.text_width
        self.token_embedding = nn.Embedding(cfg.vocab_size, W)
        self.positional_embedding = nn.Parameter(0.01 * torch.randn(cfg.context_length, W))
        self.transformer = Transformer(W, cfg.text_layers, cfg.text_heads, cfg.quick_gelu)
        self.ln_final = LayerNorm(W)
        self.text_projection = nn.Parameter(W ** -0.5 * torch.randn(W, cfg.embed_dim))
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        nn.init.normal_(self.token_embedding.weight, std=0.02)

    def encode_text(self, tokens):
        """(B, L) token ids -> (B, E): the end-of-text position (the largest id, as in CLIP)."""
        x = self.token_embedding(tokens) + self.positional_embedding[: tokens.shape[1]]
        x = self.ln_final(self.transformer(x, causal=True))
        eot = tokens.argmax(dim=-1)  # (B,)
        return x[torch.arange(x.shape[0]), eot] @ self.text_projection

    def encode_image(self, images):
        return self.visual(images)

    # What the training loop asks of a model (TagAlign has the same): a CLIP trained on its own
    # (tagalign.py pretrain) uses its logit_scale for ITC and trains every parameter.
    @property
    def itc_logit_scale(self):
        return self.logit_scale

    def trainable_state_dict(self):
        return self.state_dict()


# ---------------------------------------------------------------- TagAlign: decoder, head and model
class ConvBlock(nn.Module):
    """Pre-activation conv through a tanh gate: tanh(g) * conv3x3(gelu(LN_channels(x))), g = 0 at
    first, so the block starts as zero (TCL's ConvBlock with norm "ln", activ "gelu", gate)."""

    def __init__(self, width):
        super().__init__()
        self.norm = nn.LayerNorm(width)  # over the channels of each grid cell
        self.conv = nn.Conv2d(width, width, 3, padding=1)
        self.gate = nn.Parameter(torch.zeros(()))

    def forward(self, x):  # (B, W, h, w)
        y = self.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        return torch.tanh(self.gate) * self.conv(F.gelu(y))


class ResConv(nn.Module):
    """TCL's decoder block (Cha et al. 2023, GDecoder with double=True): two gated ConvBlocks added
    one after the other, x = x + c1(x); x = x + c2(x). A fresh block is the identity."""

    def __init__(self, width):
        super().__init__()
        self.conv1, self.conv2 = ConvBlock(width), ConvBlock(width)

    def forward(self, x):
        x = x + self.conv1(x)
        return x + self.conv2(x)


class TagAlign(nn.Module):
    """Dense patch embeddings in the text space; the image embedding is their mean.

    images -> ViT patch tokens (read as cfg.dense) -> decoder -> LayerNorm -> projection:
    (B, h, w, E). So the image embedding that the contrastive and tag losses train is an average
    of patch embeddings, and a patch's cosine to a class name's text embedding segments the image
    zero-shot. Each loss has its own temperature (itc_logit_scale, tag_logit_scale).

    frozen_clip=False (the world, from scratch): everything trains. frozen_clip=True (the paper):
    both CLIP towers are fixed -- no gradients, always in eval mode, left out of the optimizer
    and of checkpoints -- and only the decoder, the head (dense_ln and dense_proj, copies of
    CLIP's ln_post and proj: see init_head_from_clip) and the two temperatures train.
    """

    def __init__(self, cfg, frozen_clip=False):
        super().__init__()
        self.cfg, self.frozen_clip = cfg.check(), frozen_clip
        self.clip = CLIP(cfg)
        W = cfg.vision_width
        self.decoder = nn.Sequential(*(ResConv(W) for _ in range(cfg.decoder_blocks)))
        self.dense_ln = LayerNorm(W)
        self.dense_proj = nn.Parameter(W ** -0.5 * torch.randn(W, cfg.embed_dim))
        self.tag_logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))  # the tag loss's own
        if frozen_clip:
            self.clip.requires_grad_(False)
            # A frozen CLIP's temperature is OpenAI's fixed 100: ITC gets its own, at CLIP's init
            self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))

    @property
    def itc_logit_scale(self):
        """The contrastive loss's temperature: CLIP's own while CLIP trains (from scratch), a new
        one beside a frozen CLIP (TagAlign's InfoNCE has its own, initialised at 1/0.07)."""
        return self.logit_scale if self.frozen_clip else self.clip.logit_scale

    def init_head_from_clip(self):
        """Start the head as CLIP's own ln_post and proj, so that before training the model reads
        the features as CLIP would (TagAlign's trainable copy of CLIP's projection)."""
        with torch.no_grad():
            self.dense_ln.load_state_dict(self.clip.visual.ln_post.state_dict())
            self.dense_proj.copy_(self.clip.visual.proj)

    def train(self, mode=True):
        super().train(mode)
        if self.frozen_clip:
            self.clip.eval()
        return self

    def features(self, images, reading=None):
        """(B, 3, H, W) normalised images -> (B, W, h, w) ViT patch tokens, the decoder's input."""
        with torch.no_grad() if self.frozen_clip else contextlib.nullcontext():
            x, (h, w) = self.clip.visual.tokens(images, reading or self.cfg.dense, self.cfg.surgery_blocks)
        return x[:, 1:].transpose(1, 2).unflatten(2, (h, w))  # class token dropped

    def head(self, x):
        """(B, W, h, w) patch tokens -> (B, h, w, E) patch embeddings (not normalised)."""
        x = self.decoder(x)
        return self.dense_ln(x.permute(0, 2, 3, 1)) @ self.dense_proj

    def clip_head(self, x):
        """(B, W, h, w) -> (B, h, w, E) through CLIP's own frozen ln_post and proj: raw CLIP."""
        return self.clip.visual.ln_post(x.permute(0, 2, 3, 1)) @ self.clip.visual.proj

    def dense(self, images, reading=None):
        return self.head(self.features(images, reading))  # (B, h, w, E)

    def encode_image(self, images):
        return self.dense(images).mean(dim=(1, 2))  # (B, E)

    def encode_text(self, tokens):
        with torch.no_grad() if self.frozen_clip else contextlib.nullcontext():
            return self.clip.encode_text(tokens)  # (B, E)

    def trainable_state_dict(self):
        """What a checkpoint keeps: everything, or without the frozen CLIP (a file holds that)."""
        return {k: v for k, v in self.state_dict().items() if not (self.frozen_clip and k.startswith("clip."))}

    def load_trainable_state_dict(self, sd):
        missing, unexpected = self.load_state_dict(sd, strict=False)
        missing = [k for k in missing if not (self.frozen_clip and k.startswith("clip."))]
        if missing or unexpected:
            raise ValueError(f"state dict does not fit the model: missing {missing[:3]}, unexpected {unexpected[:3]}")


def trainable_parameters(model):
    """Counts of the parameters that train, by part: decoder, head (dense_ln, dense_proj),
    scales (the two temperatures), clip (when it trains), and their total."""
    parts = {"decoder": 0, "head": 0, "scales": 0, "clip": 0}
    for name, p in model.named_parameters():
        if p.requires_grad:
            part = ("clip" if name.startswith("clip.") else "decoder" if name.startswith("decoder.")
                    else "scales" if name.endswith("logit_scale") else "head")
            parts[part] += p.numel()
    parts = {k: v for k, v in parts.items() if v or k != "clip"}
    return {**parts, "total": sum(parts.values())}


# A CLIP for the synthetic world, in OpenAI's layout (tagalign.py pretrain writes it as an
# OpenAI-format file that --clip reads like ViT-B-16.pt): 64 px images in 8 px patches (an 8 x 8
# grid), CLIP's patchify stem and global attention, widths that are multiples of 64 (CLIP infers
# heads = width // 64), CLIP's tokenizer (vocab 49408) with a short context (world captions are
# short), and the paper's head settings for the model read from it.
WORLD_CLIP = dict(image_size=64, patch_size=8, stem="patch", vision_width=128, vision_layers=3, vision_heads=2,
                  vision_local=-1, vocab_size=49408, context_length=32, text_width=128, text_layers=3,
                  text_heads=2, embed_dim=128, dense="surgery", surgery_blocks=3, decoder_blocks=2, quick_gelu=True)
# OpenAI's ViT-B/16 with TagAlign's head: what load_clip infers from ViT-B-16.pt (bench.py, tests)
VIT_B16 = dict(image_size=224, patch_size=16, stem="patch", vision_width=768, vision_layers=12, vision_heads=12,
               vision_local=-1, vocab_size=49408, context_length=77, text_width=512, text_layers=12,
               text_heads=8, embed_dim=512, dense="surgery", surgery_blocks=6, decoder_blocks=2, quick_gelu=True)


# ---------------------------------------------------------------- OpenAI CLIP files
_CLIP_KEYS = ("visual.conv1.weight", "visual.class_embedding", "visual.positional_embedding",
              "visual.transformer.resblocks.0.attn.in_proj_weight", "visual.ln_post.weight", "visual.proj",
              "token_embedding.weight", "positional_embedding", "transformer.resblocks.0.attn.in_proj_weight",
              "ln_final.weight", "text_projection", "logit_scale")


def file_sha256(path, chunk=1 << 24):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


# OpenAI ships CLIP as a TorchScript archive: a zip of TorchScript code (code/), the module tree
# pickled with it (data.pkl) and one record per tensor (data/0, data/1, ...). torch.jit.load
# compiles that code and runs it (a class's __setstate__ runs while loading, and TorchScript
# can write files, torch.from_file), so it is not how a file given on the command line is
# read here: data.pkl is unpickled with nothing callable but the tensors' rebuilding, each
# module becoming the dict of its attributes, and the tensors are collected by attribute path.
# OpenAI's archives are traced, so a module's tensor attributes are its state dict's entries.
class _Attributes:
    """What an object of the archive becomes: its pickled attributes, none of its code."""
    state = {}

    def __init__(self, *args):  # a call the pickle makes (a TorchScript list helper, say): inert
        pass

    def __setstate__(self, state):
        self.state = state if isinstance(state, dict) else {}


class _TorchScriptUnpickler(pickle.Unpickler):
    def __init__(self, archive, root):
        super().__init__(io.BytesIO(archive.read(root + "data.pkl")))
        self.archive, self.root = archive, root

    def find_class(self, module, name):
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):  # (storage, offset, size, stride, ...)
            return lambda storage, offset, size, stride, *_: storage.as_strided(size, stride, offset)
        if module == "torch" and name.endswith("Storage") and isinstance(getattr(torch, name, None), type):
            return getattr(torch, name).dtype  # torch.HalfStorage -> torch.float16, read by persistent_load
        return _Attributes  # a module class (__torch__.*) or anything else: attributes only

    def persistent_load(self, pid):  # ("storage", dtype, key, location, numel): one tensor record
        raw = bytearray(self.archive.read(f"{self.root}data/{pid[2]}"))
        return torch.frombuffer(raw, dtype=pid[1]) if raw else torch.empty(0, dtype=pid[1])


def read_torchscript_tensors(path):
    """{attribute path: tensor} of a TorchScript archive, its code never run (see above)."""
    def tensors(obj, prefix):  # a module's tensors, then its submodules', by attribute path
        for k, v in obj.state.items():
            if isinstance(v, torch.Tensor):
                yield prefix + k, v
            elif isinstance(v, _Attributes):
                yield from tensors(v, f"{prefix}{k}.")

    with zipfile.ZipFile(path) as archive, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.HalfStorage & co. are deprecated, and name the dtypes here
        root = next(n for n in archive.namelist() if n.endswith("/data.pkl")).removesuffix("data.pkl")
        return dict(tensors(_TorchScriptUnpickler(archive, root).load(), ""))


def is_torchscript(path):
    """A TorchScript archive: a zip with constants.pkl beside data.pkl (torch.save's zips have none)."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(n.endswith("/constants.pkl") for n in archive.namelist())


def load_plain(path):
    """torch.load(path) of plain data only (weights_only=True: tensors, numbers, strings, bools,
    None and lists, tuples and dicts of them): no object is built and no code runs."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch's notes on pickle protocols
        return torch.load(path, map_location="cpu", weights_only=True)


def refused_global(e):
    """The Python object (module.name) that load_plain refused to build, or None."""
    found = re.search(r"GLOBAL ([\w.]+)", str(e))  # weights_only's refusal names it so
    return found[1] if found else None


def why_unreadable(e):
    """One line saying why load_plain or read_torchscript_tensors refused a file."""
    if refused_global(e):
        return f"it holds a Python object, {refused_global(e)}, that loading would build or call: refused"
    text = str(e).strip()
    if "TorchScript" in text:
        return "a TorchScript archive (a CLIP file? give it with --clip)"
    detail = re.search(r"WeightsUnpickler error:\s*(.+)", text)  # under torch's note on weights_only
    why = detail[1] if detail else text.split("\n")[0].split(". ")[0]
    return f"truncated or foreign file ({why[:200] or type(e).__name__})"


def read_clip_state_dict(path):
    """OpenAI CLIP ViT weights as a float32 state dict with OpenAI's keys, from the TorchScript
    archive OpenAI distributes (ViT-B-16.pt: its tensors, its code never run) or a torch.save'd
    state dict (also under "state_dict" or "model", with or without DDP's "module." prefix).
    Anything else: SystemExit with one line naming the file."""
    if not os.path.isfile(path):
        raise SystemExit(f"error: --clip {path}: no such file")
    try:
        sd = read_torchscript_tensors(path) if is_torchscript(path) else load_plain(path)
    except Exception as e:  # a pickled object, a broken file: one line, not a pickle traceback
        raise SystemExit(f"error: --clip {path}: neither a TorchScript archive nor a torch state dict: "
                         f"{why_unreadable(e)}") from None
    for key in ("state_dict", "model"):
        if isinstance(sd, dict) and isinstance(sd.get(key), dict):
            sd = sd[key]
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise SystemExit(f"error: --clip {path}: expected a state dict of tensors, got {type(sd).__name__}")
    sd = {k.removeprefix("module."): v for k, v in sd.items()}
    if any(k.startswith(("visual.layer1.", "visual.attnpool.")) for k in sd):
        raise SystemExit(f"error: --clip {path}: a ResNet CLIP; only ViT CLIPs are supported")
    missing = [k for k in _CLIP_KEYS if k not in sd]
    if missing:
        raise SystemExit(f"error: --clip {path}: not an OpenAI CLIP state dict ({len(missing)} of its keys "
                         f"missing, e.g. {missing[0]})")
    # CLIP's build_model drops these three entries of the TorchScript archives before loading
    return {k: v.float() for k, v in sd.items() if k not in ("input_resolution", "context_length", "vocab_size")}


def load_clip(path, cfg=None):
    """A frozen TagAlign around the CLIP in `path`: CLIP's weights loaded as they are, the head
    initialised from CLIP's ln_post and proj. cfg: the shape to check against (a checkpoint's)."""
    sd = read_clip_state_dict(path)
    inferred = Config.from_clip_state_dict(sd)
    cfg = cfg or inferred
    shape = ("image_size", "patch_size", "vision_width", "vision_layers", "text_width", "text_layers",
             "embed_dim", "vocab_size", "context_length")
    for k in shape:
        if getattr(cfg, k) != getattr(inferred, k):
            raise SystemExit(f"error: --clip {path}: {k} is {getattr(inferred, k)}, the checkpoint expects {getattr(cfg, k)}")
    try:
        model = TagAlign(cfg, frozen_clip=True)
    except ValueError as e:
        raise SystemExit(f"error: --clip {path}: {e}") from None
    model.clip.load_state_dict(sd, strict=True)
    model.init_head_from_clip()
    return model


# ---------------------------------------------------------------- checkpoints (reading)
# A checkpoint is plain data (tagalign.py writes nothing else), read with load_plain: sharing one
# shares numbers, never code. What each reader needs of it, by dotted key, is checked up front.
def checkpoint_keys(paper, resume):
    """{dotted key: type of its value} that a reader needs: the model (eval_seg.py), or the whole
    run (train --resume); paper: a checkpoint on a frozen CLIP file ("clip")."""
    keys = {"model": dict, "config": dict, "args": dict, "args.command": str}
    if paper:
        keys |= {"clip.path": str, "clip.sha256": str, "args.norm": str}
    if resume:
        keys |= {"optimizer": dict, "scaler": dict, "step": int, "rng.torch": torch.Tensor, "rng.numpy": list,
                 "rng.python": tuple, "args.ranks": int, "tags": list}
        keys |= {"data.states": list, "data.workers": int} if paper else {"world": dict}
    return keys


def check_checkpoint(ckpt, path, resume=False):
    """SystemExit with one line naming `path` unless ckpt has what a reader needs (checkpoint_keys)."""
    if not isinstance(ckpt, dict):
        raise SystemExit(f"error: {path} is not a tagalign checkpoint: a {type(ckpt).__name__}, not a dict")
    for key, kind in checkpoint_keys(ckpt.get("clip") is not None, resume).items():
        value = ckpt
        for part in key.split("."):
            value = value.get(part) if isinstance(value, dict) else None
        if value is None:
            raise SystemExit(f"error: {path} is not a tagalign checkpoint: it has no {key!r}")
        if not isinstance(value, kind):
            raise SystemExit(f"error: {path} is not a tagalign checkpoint: its {key!r} is {type(value).__name__}, "
                             f"not {kind.__name__}")
    tokenizer = ckpt.get("tokenizer")  # "clip" (CLIP's own) or Tokenizer.state_dict()
    if tokenizer != "clip" and not (isinstance(tokenizer, dict) and isinstance(tokenizer.get("merges"), list)):
        raise SystemExit(f"error: {path} is not a tagalign checkpoint: its 'tokenizer' is neither 'clip' nor "
                         f"a dict of 'merges'")


def read_checkpoint(path, resume=False):
    """A checkpoint written by tagalign.py, as plain data, with what its reader needs
    (check_checkpoint). Anything else, or an earlier version's checkpoint (it held numpy's
    RNG state as a numpy array): SystemExit with one line naming the file; nothing is built."""
    if not os.path.isfile(path):
        raise SystemExit(f"error: checkpoint {path} does not exist")
    try:
        ckpt = load_plain(path)
    except Exception as e:  # a pickled object, a truncated or foreign file: one line, not a traceback
        if (refused_global(e) or "").startswith("numpy."):
            raise SystemExit(f"error: {path} was written by an earlier version of tagalign (it holds numpy "
                             f"objects: {refused_global(e)}); retrain or re-save it") from None
        raise SystemExit(f"error: {path} is not a tagalign checkpoint: {why_unreadable(e)}") from None
    check_checkpoint(ckpt, path, resume)
    return ckpt


def model_from_checkpoint(ckpt, path, clip=None):
    """The model of a checkpoint (read_checkpoint's) with its weights: TagAlign, or the CLIP of
    `tagalign.py pretrain`. A frozen-CLIP (paper-mode) checkpoint holds only what trained: the
    CLIP comes from `clip` or the file the checkpoint names, and must be the same file (sha256)
    that it was trained on. A config or weights that do not make a model: one line."""
    try:
        cfg = Config(**ckpt["config"]).check()
    except (TypeError, ValueError) as e:  # a field of another version, or a shape that cannot be built
        raise SystemExit(f"error: {path}: its config is not one this version of tagalign builds ({e})") from None
    if ckpt["args"]["command"] == "pretrain":
        model = CLIP(cfg)
    elif not ckpt.get("clip"):
        model = TagAlign(cfg)
    else:
        clip = clip or ckpt["clip"]["path"]
        if not os.path.isfile(clip):
            raise SystemExit(f"error: {path} needs its CLIP file {clip}, which does not exist (give it with --clip)")
        if file_sha256(clip) != ckpt["clip"]["sha256"]:
            raise SystemExit(f"error: {path} was trained on the CLIP file with sha256 {ckpt['clip']['sha256'][:12]}..., "
                             f"and {clip} is another file (give the right one with --clip)")
        model = load_clip(clip, cfg)
    try:
        if isinstance(model, TagAlign):
            model.load_trainable_state_dict(ckpt["model"])
        else:
            model.load_state_dict(ckpt["model"])
    except (ValueError, RuntimeError) as e:  # missing or unexpected keys, other shapes
        why = re.sub(r"\s+", " ", str(e)).strip()[:300]
        raise SystemExit(f"error: {path}: its weights do not fit its config ({why})") from None
    return model
