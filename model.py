"""The TagAlign model: a hand-written CLIP (ViT and causal text transformer with OpenAI's parameter
names, so that a CLIP state dict loads as it is) and TagAlign's dense head on top of it.

    images -> ViT patch tokens -> decoder -> LayerNorm -> projection -> (B, h, w, E) patch embeddings
    image embedding = their mean; text embedding = CLIP's text tower at the end-of-text token

The losses, the optimizer and the training loop live in tagalign.py; the evaluator in eval_seg.py
reads models through `SegmentationModel` and `load_model` here.
"""
import dataclasses
import math
import os
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

import data

# ---------------------------------------------------------------- config
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
    vision_local: int = 1       # 0: global attention (CLIP); r > 0: a patch attends to patches within r grid steps
    # text encoder (causal transformer)
    vocab_size: int = 1000      # tokenizer vocabulary, set from the tokenizer
    context_length: int = 28    # tokens per caption, start and end tokens included
    text_width: int = 64        # transformer width
    text_layers: int = 2        # residual attention blocks
    text_heads: int = 2         # attention heads
    # joint space and the TagAlign head
    embed_dim: int = 64         # dimension of the shared image-text space
    decoder_blocks: int = 0     # gated residual conv blocks on the patch grid (TCL's decoder; the
    #   paper has 2 on CLIP. The world model has none: each 3x3 block widens the context a patch
    #   sees, and on the world that context became a halo of shape labels around every object)
    quick_gelu: bool = False    # x * sigmoid(1.702 x) as in OpenAI CLIP; exact GELU otherwise

    @classmethod
    def from_clip_state_dict(cls, sd):
        """Infer the shape of an OpenAI CLIP ViT from its state dict, as CLIP's build_model does."""
        vw = sd["visual.conv1.weight"].shape[0]
        patch = sd["visual.conv1.weight"].shape[-1]
        grid = round((sd["visual.positional_embedding"].shape[0] - 1) ** 0.5)
        tw = sd["ln_final.weight"].shape[0]
        count = lambda prefix: len({k[len(prefix):].split(".")[0] for k in sd if k.startswith(prefix)})  # noqa: E731
        return cls(image_size=grid * patch, patch_size=patch, stem="patch",
                   vision_width=vw, vision_layers=count("visual.transformer.resblocks."),
                   vision_heads=vw // 64, vision_local=0, vocab_size=sd["token_embedding.weight"].shape[0],
                   context_length=sd["positional_embedding"].shape[0], text_width=tw,
                   text_layers=count("transformer.resblocks."), text_heads=tw // 64,
                   embed_dim=sd["text_projection"].shape[1], decoder_blocks=2, quick_gelu=True)


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
    prior that makes class activation maps work (Zhou et al. 2016). CLIP mode attends globally
    (Config.vision_local = 0: no mask at all); called with r = 0 the mask lets a patch see
    itself alone (the dense "self" reading).
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

    def tokens(self, x, last_self=False):
        """(B, 3, H, W) images -> (B, 1 + h*w, width) transformer outputs, and (h, w).

        last_self: in the last block every patch attends to itself alone, so its attention output
        is its own value (MaskCLIP's reading of CLIP's last layer, Zhou et al. 2022); the class
        token attends as trained. A dense-inference option: the losses train the normal path.
        """
        x = self.conv1(self.stem(x))  # (B, W, h, w)
        B, W, h, w = x.shape
        x = x.flatten(2).transpose(1, 2)  # (B, h*w, W)
        cls = self.class_embedding.to(x.dtype).expand(B, 1, W)
        x = torch.cat([cls, x], dim=1) + self.positions(h, w).to(x.dtype)
        mask = local_attention_mask(h, w, self.local, x.device) if self.local else None
        blocks, x = self.transformer.resblocks, self.ln_pre(x)
        for i, block in enumerate(blocks):
            own = last_self and i == len(blocks) - 1  # r = 0: a patch sees itself alone
            x = block(x, mask=local_attention_mask(h, w, 0, x.device) if own else mask)
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


# ---------------------------------------------------------------- TagAlign: dense head and model
class GatedBlock(nn.Module):
    """Residual block of two 3x3 convs with LayerNorm and GELU, added through a gate that starts
    at zero, so a fresh decoder is the identity (TCL's decoder, Cha et al. 2023)."""

    def __init__(self, width):
        super().__init__()
        self.norm1, self.conv1 = LayerNorm(width), nn.Conv2d(width, width, 3, padding=1)
        self.norm2, self.conv2 = LayerNorm(width), nn.Conv2d(width, width, 3, padding=1)
        self.gate = nn.Parameter(torch.zeros(()))

    def forward(self, x):  # (B, W, h, w)
        ln = lambda norm, t: norm(t.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)  # noqa: E731  over W
        y = self.conv1(F.gelu(ln(self.norm1, x)))
        y = self.conv2(F.gelu(ln(self.norm2, y)))
        return x + self.gate * y


class TagAlign(nn.Module):
    """Dense patch embeddings in the text space; the image embedding is their mean.

    images -> ViT patch tokens -> decoder -> LayerNorm -> projection: (B, h, w, E). So the image
    embedding that the contrastive and tag losses train is an average of patch embeddings, and a
    patch's cosine to a class name's text embedding segments the image zero-shot.
    """

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.clip = CLIP(cfg)
        W = cfg.vision_width
        self.decoder = nn.ModuleList(GatedBlock(W) for _ in range(cfg.decoder_blocks))
        self.dense_ln = LayerNorm(W)  # in CLIP mode: a trainable copy of visual.ln_post
        self.dense_proj = nn.Parameter(W ** -0.5 * torch.randn(W, cfg.embed_dim))  # copy of visual.proj
        self.tag_logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))  # the tag loss's own

    def dense(self, images, last_self=False):
        """(B, 3, H, W) normalised images -> (B, h, w, E) patch embeddings (not normalised).
        last_self: the last ViT block's patches attend to themselves only (see VisionTransformer)."""
        x, (h, w) = self.clip.visual.tokens(images, last_self)
        x = x[:, 1:].transpose(1, 2).unflatten(2, (h, w))  # (B, W, h, w), class token dropped
        for block in self.decoder:
            x = block(x)
        return self.dense_ln(x.permute(0, 2, 3, 1)) @ self.dense_proj

    def encode_image(self, images):
        return self.dense(images).mean(dim=(1, 2))  # (B, E)

    def encode_text(self, tokens):
        return self.clip.encode_text(tokens)  # (B, E)


DENSE_PATHS = ("trained", "self")  # dense inference: the trained path, or last block self-only


class SegmentationModel:
    """The evaluator's model interface (eval_seg.py): dense embeddings and text embeddings.

    dense: "trained" reads the patch embeddings the losses trained (their mean is the image
    embedding); "self" lets every patch attend only to itself in the last ViT block, which
    keeps a patch from voting for the objects it only sees nearby (README, the halo).
    """

    def __init__(self, model, tokenizer, device="cpu", dense="trained"):
        if dense not in DENSE_PATHS:
            raise ValueError(f"dense must be one of {DENSE_PATHS}, not {dense!r}")
        self.model, self.tokenizer, self.device = model.eval(), tokenizer, torch.device(device)
        self.dense = dense
        self.config = dataclasses.asdict(model.cfg)
        self.logit_scale = model.clip.logit_scale.exp().clamp(max=100).item()  # the ITC temperature

    @torch.no_grad()
    def encode_dense(self, images):  # (B, 3, H, W) -> (B, E, h, w)
        return self.model.dense(images.to(self.device), self.dense == "self").permute(0, 3, 1, 2)

    @torch.no_grad()
    def encode_text(self, texts):  # list of T strings -> (T, E)
        tokens = self.tokenizer(texts, self.model.cfg.context_length).to(self.device)
        return self.model.encode_text(tokens)


# ---------------------------------------------------------------- checkpoints (reading)
def read_checkpoint(path):
    if not os.path.isfile(path):
        raise SystemExit(f"error: checkpoint {path} does not exist")
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # a truncated or foreign file: one line, not a pickle traceback
        raise SystemExit(f"error: {path} is not a tagalign checkpoint ({type(e).__name__}: {e})")


def load_model(path, device="cpu", dense="trained"):
    """A trained checkpoint as the evaluator's SegmentationModel (used by eval_seg.py)."""
    ckpt = read_checkpoint(path)
    model = TagAlign(Config(**ckpt["config"]))
    model.load_state_dict(ckpt["model"])
    tokenizer = data.Tokenizer.from_state_dict(ckpt["tokenizer"])
    return SegmentationModel(model.to(device), tokenizer, device, dense)
