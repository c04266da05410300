"""The hand-written ViT, text transformer and TagAlign head: shapes, causal masking, and
OpenAI CLIP state-dict compatibility against an independent re-statement of CLIP's architecture
(nn.MultiheadAttention, sequence-first layout, an additive causal mask), as in CLIP's model.py."""
from collections import OrderedDict

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from model import CLIP, Config, LayerNorm, QuickGELU, ResConv, SegmentationModel, TagAlign


def tiny_config(**kw):
    base = dict(image_size=32, patch_size=8, stem="conv", stem_width=8, vision_width=32,
                vision_layers=2, vision_heads=2, vocab_size=50, context_length=12, text_width=32,
                text_layers=2, text_heads=2, embed_dim=16, decoder_blocks=2)
    base.update(kw)
    return Config(**base)


# ---------------------------------------------------------------- shapes and masking
def test_shapes_and_image_embedding_is_patch_mean():
    cfg = tiny_config()
    model = TagAlign(cfg)
    images = torch.randn(3, 3, 32, 32)
    dense = model.dense(images)
    assert dense.shape == (3, 4, 4, 16)  # (B, h, w, E): 32 px / patch 8
    torch.testing.assert_close(model.encode_image(images), dense.mean(dim=(1, 2)))
    tokens = torch.randint(1, 48, (5, 12))
    tokens[:, 7] = 49  # the end token is the largest id
    assert model.encode_text(tokens).shape == (5, 16)


def test_dense_grid_follows_the_input_size():
    """A larger image gives a larger grid with interpolated positions (eval at other sizes)."""
    model = TagAlign(tiny_config())
    assert model.dense(torch.randn(1, 3, 48, 64)).shape == (1, 6, 8, 16)
    pos = model.clip.visual.positions(4, 4)
    assert pos is model.clip.visual.positional_embedding  # same grid: no interpolation


def test_text_is_causal():
    """Changing a token changes no output before it, and changes its own position's output."""
    model = CLIP(tiny_config()).eval()
    tokens = torch.randint(1, 48, (2, 12))
    x = model.token_embedding(tokens) + model.positional_embedding
    y = model.transformer(x, causal=True)
    tokens2 = tokens.clone()
    tokens2[:, 6] = (tokens[:, 6] + 1) % 48
    y2 = model.transformer(model.token_embedding(tokens2) + model.positional_embedding, causal=True)
    torch.testing.assert_close(y[:, :6], y2[:, :6])
    assert (y[:, 6:] - y2[:, 6:]).abs().amax() > 1e-3


def test_text_takes_the_end_token_position():
    model = CLIP(tiny_config()).eval()
    tokens = torch.tensor([[48, 5, 6, 49, 0, 0, 0, 0, 0, 0, 0, 0]])
    padded_differently = tokens.clone()
    padded_differently[0, 5] = 7  # after the end token: invisible to it under the causal mask
    torch.testing.assert_close(model.encode_text(tokens), model.encode_text(padded_differently))


def test_decoder_starts_as_identity_and_its_gates_open():
    """TCL's decoder blocks are gated by tanh of zero-initialised scalars: the identity at first,
    and each of the two sub-blocks adds its own term once its gate moves."""
    block = ResConv(8)
    x = torch.randn(2, 8, 5, 5)
    torch.testing.assert_close(block(x), x, rtol=0, atol=0)
    with torch.no_grad():
        block.conv1.gate.fill_(0.5)
    y1 = x + torch.tanh(torch.tensor(0.5)) * block.conv1.conv(F.gelu(F.layer_norm(
        x.permute(0, 2, 3, 1), (8,), block.conv1.norm.weight, block.conv1.norm.bias).permute(0, 3, 1, 2)))
    torch.testing.assert_close(block(x), y1)  # conv2's gate still 0: y1 passes unchanged


# ---------------------------------------------------------------- OpenAI CLIP compatibility
class RefBlock(nn.Module):
    """OpenAI CLIP's residual block, restated: nn.MultiheadAttention on (L, B, W)."""

    def __init__(self, width, heads, mask=None):
        super().__init__()
        self.attn = nn.MultiheadAttention(width, heads)
        self.ln_1, self.ln_2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.mlp = nn.Sequential(OrderedDict([("c_fc", nn.Linear(width, 4 * width)), ("gelu", QuickGELU()),
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

    def forward(self, x):
        x = self.conv1(x).flatten(2).permute(0, 2, 1)
        cls = self.class_embedding + torch.zeros(x.shape[0], 1, x.shape[-1])
        x = self.ln_pre(torch.cat([cls, x], dim=1) + self.positional_embedding)
        x = self.transformer.resblocks(x.permute(1, 0, 2)).permute(1, 0, 2)  # (L, B, W) inside
        return self.ln_post(x[:, 0]) @ self.proj


class RefCLIP(nn.Module):
    def __init__(self, vocab=60, ctx=10, width=64, layers=2, res=32, patch=8, out=24):
        super().__init__()
        self.visual = RefVisual(res, patch, 64, 2, 1, out)  # 64 wide: CLIP's heads = width // 64
        mask = torch.full((ctx, ctx), float("-inf")).triu(1)
        self.transformer = RefTransformer(width, layers, 1, mask)
        self.token_embedding = nn.Embedding(vocab, width)
        self.positional_embedding = nn.Parameter(torch.randn(ctx, width) * 0.01)
        self.ln_final = nn.LayerNorm(width)
        self.text_projection = nn.Parameter(torch.randn(width, out) * width ** -0.5)
        self.logit_scale = nn.Parameter(torch.tensor(2.0))

    def encode_text(self, tokens):
        x = self.token_embedding(tokens) + self.positional_embedding
        x = self.ln_final(self.transformer.resblocks(x.permute(1, 0, 2)).permute(1, 0, 2))
        return x[torch.arange(x.shape[0]), tokens.argmax(-1)] @ self.text_projection


def test_openai_state_dict_loads_as_is_and_matches():
    torch.manual_seed(0)
    ref = RefCLIP().eval()
    for p in ref.parameters():  # LayerNorm weights away from 1/0 so that a misplaced one shows
        p.data.add_(0.05 * torch.randn_like(p))
    sd = ref.state_dict()
    cfg = Config.from_clip_state_dict(sd)
    assert (cfg.image_size, cfg.patch_size, cfg.vision_width, cfg.vision_layers, cfg.vision_heads) == (32, 8, 64, 2, 1)
    assert (cfg.vocab_size, cfg.context_length, cfg.text_width, cfg.text_layers, cfg.embed_dim) == (60, 10, 64, 2, 24)
    assert cfg.stem == "patch" and cfg.quick_gelu
    ours = CLIP(cfg).eval()
    missing, unexpected = ours.load_state_dict(sd, strict=True)  # every key, as it is
    assert not missing and not unexpected
    images = torch.randn(2, 3, 32, 32)
    tokens = torch.randint(1, 58, (3, 10))
    tokens[:, 6] = 59
    with torch.no_grad():
        torch.testing.assert_close(ours.encode_image(images), ref.visual(images), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(ours.encode_text(tokens), ref.encode_text(tokens), rtol=1e-4, atol=1e-5)


def test_layernorm_computes_in_fp32():
    ln = LayerNorm(16)
    x = (torch.randn(4, 16) * 100).half()
    y = ln(x)
    assert y.dtype == torch.float16
    torch.testing.assert_close(y.float(), nn.functional.layer_norm(x.float(), (16,)), atol=2e-3, rtol=1e-3)


def test_maskclip_reading_changes_only_the_last_block():
    """The maskclip reading: in the last block a patch attends to itself alone. With patchify
    and two radius-1 blocks, a change in patch (0, 0) reaches (0, 2) through two hops on the
    plain reading, but only (0, 1) when the last hop is removed; the class token is untouched."""
    model = TagAlign(tiny_config(stem="patch", vision_local=1, decoder_blocks=0)).eval()
    x = torch.randn(1, 3, 32, 32)
    y = x.clone()
    y[..., :8, :8] += 1.0  # patch (0, 0) only
    with torch.no_grad():
        changed = lambda a, b: (a - b).abs().amax(-1)[0] > 1e-5  # noqa: E731  (h, w) bool
        trained = changed(model.dense(x), model.dense(y))
        own = changed(model.dense(x, "maskclip"), model.dense(y, "maskclip"))
        assert trained[0, 2] and trained[2, 2] and not trained[0, 3]
        assert own[0, 0] and own[0, 1] and own[1, 1] and not own[0, 2] and not own[2, 2]
        cls = [model.clip.visual.tokens(x, r)[0][:, 0] for r in ("plain", "maskclip")]
    torch.testing.assert_close(cls[0], cls[1])


def test_segmentation_model_readings():
    model = TagAlign(tiny_config())
    images = torch.randn(2, 3, 32, 32)
    seg = SegmentationModel(model, tokenizer=None, reading="maskclip")
    torch.testing.assert_close(seg.encode_dense(images), model.dense(images, "maskclip").permute(0, 3, 1, 2))
    assert not seg.clip_blend  # trained from scratch: no frozen CLIP to blend in
    with pytest.raises(ValueError, match="raw CLIP path"):
        seg.encode_dense(images, with_clip=True)
    with pytest.raises(ValueError, match="reading"):
        SegmentationModel(model, tokenizer=None, reading="value")


@pytest.mark.parametrize("stem", ["conv", "patch"])
def test_both_stems_build_and_run(stem):
    model = TagAlign(tiny_config(stem=stem))
    assert model.dense(torch.randn(2, 3, 32, 32)).shape == (2, 4, 4, 16)


def test_conv_stem_cells_see_their_own_pixels():
    """Cell (i, j) of the patch grid covers pixels P*i .. P*i + P-1; the conv stem's receptive field
    must be centred there (within half a pixel), or every predicted mask comes out shifted."""
    cfg = tiny_config(stem="conv")
    P = cfg.patch_size
    stem = TagAlign(cfg).clip.visual.stem.eval()
    with torch.no_grad():
        for m in stem.modules():
            if isinstance(m, nn.Conv2d):
                m.weight.fill_(1.0)  # an all-positive, symmetric kernel: the field's weight is symmetric
    x = torch.rand(1, 3, 8 * P, 8 * P, requires_grad=True)
    out = stem(x)
    assert out.shape[-2:] == (8, 8)
    for i, j in [(3, 4), (5, 2)]:
        (g,) = torch.autograd.grad(out[0, 0, i, j], x, retain_graph=True)
        w = g.abs().sum((0, 1))
        ys, xs = torch.meshgrid(torch.arange(8 * P), torch.arange(8 * P), indexing="ij")
        cy, cx = (w * ys).sum() / w.sum(), (w * xs).sum() / w.sum()
        centre = torch.tensor([P * i + (P - 1) / 2, P * j + (P - 1) / 2])
        assert (torch.stack([cy, cx]) - centre).abs().max() <= 0.5 + 1e-4, (i, j, cy, cx)
