"""The hand-written ViT, text transformer and TagAlign head: shapes, causal masking, and
OpenAI CLIP state-dict compatibility against an independent re-statement of CLIP's architecture
(nn.MultiheadAttention, sequence-first layout, an additive causal mask), as in CLIP's model.py."""
import dataclasses
import io
import random
import warnings

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from _clip import make_ref_clip, ref_dense_tokens, write_clip
from _planted import Planted, write_planted_module
from eval_seg import SegmentationModel, load_model
from model import (CLIP, VIT_B16, Config, LayerNorm, ResConv, TagAlign, load_clip, read_clip_state_dict,
                   trainable_parameters)
from tokenizer import Tokenizer
from world import WorldConfig


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
def test_openai_state_dict_loads_as_is_and_matches():
    ref = make_ref_clip(vocab=60, ctx=10, vision_layers=2)
    sd = ref.state_dict()
    cfg = Config.from_clip_state_dict(sd)
    assert (cfg.image_size, cfg.patch_size, cfg.vision_width, cfg.vision_layers, cfg.vision_heads) == (32, 8, 64, 2, 1)
    assert (cfg.vocab_size, cfg.context_length, cfg.text_width, cfg.text_layers, cfg.embed_dim) == (60, 10, 64, 2, 24)
    assert cfg.stem == "patch" and cfg.quick_gelu and cfg.vision_local == -1
    ours = CLIP(cfg).eval()
    missing, unexpected = ours.load_state_dict(sd, strict=True)  # every key, as it is
    assert not missing and not unexpected
    images = torch.randn(2, 3, 32, 32)
    tokens = torch.randint(1, 58, (3, 10))
    tokens[:, 6] = 59
    with torch.no_grad():
        torch.testing.assert_close(ours.encode_image(images), ref.visual(images), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(ours.encode_text(tokens), ref.encode_text(tokens), rtol=1e-4, atol=1e-5)


@pytest.fixture(scope="module")
def small_clip(tmp_path_factory):
    """An 8-block CLIP ViT (so that surgery's last 6 blocks exist) in the three file formats."""
    ref = make_ref_clip(vision_layers=8)
    root = tmp_path_factory.mktemp("clip")
    return ref, {fmt: write_clip(ref, root / f"{fmt}.pt", fmt) for fmt in ("torchscript", "fp16", "wrapped")}


@pytest.fixture(scope="module")
def small_model(small_clip):
    return load_clip(small_clip[1]["fp16"])


def test_clip_files_load_to_the_same_model(small_clip):
    """OpenAI's TorchScript archive, an fp16 state dict and a wrapped fp32 one: the same float32
    weights, and a model whose outputs match the re-statement of OpenAI's forward."""
    ref, paths = small_clip
    sds = {fmt: read_clip_state_dict(p) for fmt, p in paths.items()}
    for fmt, sd in sds.items():
        assert set(sd) == set(ref.state_dict()), fmt  # build_model's three int entries dropped
        for k, v in ref.state_dict().items():
            assert sd[k].dtype == torch.float32 and torch.equal(sd[k], v), (fmt, k)
    model = load_clip(paths["torchscript"])
    assert model.frozen_clip and not any(p.requires_grad for p in model.clip.parameters())
    images, tokens = torch.randn(2, 3, 32, 32), torch.randint(1, 49000, (3, 16))
    tokens[:, 9] = 49407
    with torch.no_grad():
        d_img = (model.clip.encode_image(images) - ref.visual(images)).abs().max().item()
        d_txt = (model.clip.encode_text(tokens) - ref.encode_text(tokens)).abs().max().item()
    assert d_img < 1e-4 and d_txt < 1e-4, (d_img, d_txt)


@pytest.mark.parametrize("size", [(32, 32), (48, 32), (24, 40)])  # square, and interpolated positions
@pytest.mark.parametrize("reading", ["surgery", "maskclip", "plain"])
def test_dense_readings_match_the_official_algorithm(small_clip, small_model, size, reading):
    ref, model = small_clip[0], small_model
    images = torch.randn(2, 3, *size)
    with torch.no_grad():
        ours, (h, w) = model.clip.visual.tokens(images, reading, surgery_blocks=6)
        want = ref_dense_tokens(ref.visual, images, reading, k=6)
    assert (h, w) == (size[0] // 8, size[1] // 8)
    diff = (ours - want).abs().max().item()
    assert diff < 1e-4, f"{reading} {size}: max |diff| {diff:.2e}"
    if reading == "surgery":  # the class token is the original path's, the patches are not
        plain = model.clip.visual.tokens(images, "plain")[0]
        torch.testing.assert_close(ours[:, 0], plain[:, 0])
        assert (ours[:, 1:] - plain[:, 1:]).abs().max() > 1e-2


def test_paper_head_starts_as_raw_clip(small_clip):
    """The decoder is the identity at initialisation and the head a copy of CLIP's ln_post and
    proj, so a fresh paper-mode model reads exactly as raw CLIP on the surgery tokens; the
    copies are separate parameters (training them leaves CLIP's untouched)."""
    model = load_clip(small_clip[1]["wrapped"])
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        x = model.features(images)
        torch.testing.assert_close(model.head(x), model.clip_head(x), rtol=0, atol=0)
        model.dense_proj.add_(1.0)
    assert not torch.equal(model.dense_proj, model.clip.visual.proj)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {n for n in trainable if not n.startswith("clip.")} and "logit_scale" in trainable
    assert set(model.trainable_state_dict()) == {k for k in model.state_dict() if not k.startswith("clip.")}


def test_vit_b16_trainable_parameters():
    """ViT-B/16's shapes, built on the meta device: TCL's decoder 4 x (768 * 768 * 9 + 768 +
    2 * 768 + 1) = 21,242,884, the head's LayerNorm and 768 x 512 projection 394,752, two scales."""
    cfg = Config(**VIT_B16)
    with torch.device("meta"):
        model = TagAlign(cfg, frozen_clip=True)
    counts = trainable_parameters(model)
    assert counts == {"decoder": 21_242_884, "head": 394_752, "scales": 2, "total": 21_637_638}, counts


def test_clip_file_errors(tmp_path, small_clip):
    ref, paths = small_clip
    resnet = {**{k: v for k, v in ref.state_dict().items() if not k.startswith("visual.")},
              "visual.conv1.weight": torch.zeros(32, 3, 3, 3), "visual.layer1.0.conv1.weight": torch.zeros(1),
              "visual.attnpool.c_proj.weight": torch.zeros(1)}
    torch.save(resnet, tmp_path / "rn50.pt")
    data = open(paths["torchscript"], "rb").read()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    torch.save({"encoder.weight": torch.zeros(2)}, tmp_path / "foreign.pt")
    cases = {"rn50.pt": "ResNet CLIP", "cut.pt": "truncated or foreign", "foreign.pt": "not an OpenAI CLIP",
             "absent.pt": "no such file"}
    for name, message in cases.items():
        with pytest.raises(SystemExit, match=message) as e:
            read_clip_state_dict(str(tmp_path / name))
        assert str(tmp_path / name) in str(e.value) and "\n" not in str(e.value)


def test_torchscript_archive_is_read_without_running_its_code(tmp_path):
    """An archive whose __setstate__ writes a file: read for its tensors (none of CLIP's here),
    the file never written; torch.jit.load, the control, runs the code and writes it."""
    path, pwned = write_planted_module(tmp_path / "planted.pt", tmp_path / "pwned"), tmp_path / "pwned"
    with pytest.raises(SystemExit, match="not an OpenAI CLIP state dict"):
        read_clip_state_dict(path)
    assert not pwned.exists()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit is deprecated
        torch.jit.load(path)
    assert pwned.exists()


def test_clip_file_holding_a_pickled_object_is_refused(tmp_path):
    torch.save({"visual.conv1.weight": Planted(tmp_path / "pwned", call="open")}, tmp_path / "clip.pt")
    with pytest.raises(SystemExit, match=r"a Python object, io.open, that loading would build or call: refused"):
        read_clip_state_dict(str(tmp_path / "clip.pt"))
    assert not (tmp_path / "pwned").exists()


# ---------------------------------------------------------------- checkpoints (reading)
def world_checkpoint():
    """What `tagalign.py train` writes for a tiny world model, less what only --resume reads."""
    cfg = tiny_config()
    return {"model": TagAlign(cfg).trainable_state_dict(), "config": dataclasses.asdict(cfg),
            "tokenizer": Tokenizer([]).state_dict(), "tags": ["circle"], "args": {"command": "train"},
            "world": dataclasses.asdict(WorldConfig())}


def test_load_model_refuses_what_is_not_a_plain_checkpoint(tmp_path):
    """Pickled objects (code that loading would run), an earlier version's numpy RNG state,
    broken and foreign files, missing entries, weights that do not fit: one line naming the file
    (a SystemExit whose message starts "error: ", so exit status 1), and nothing run."""
    good, pwned = world_checkpoint(), tmp_path / "pwned"
    buf = io.BytesIO()
    torch.save(good, buf)
    saved = lambda obj: lambda path: torch.save(obj, path)  # noqa: E731
    raw = lambda b: lambda path: path.write_bytes(b)  # noqa: E731
    cases = {  # name: (how the file is written, what the line says)
        "system": (saved({**good, "rng": Planted(pwned)}), "a Python object, posix.system, that loading would"),
        "open": (saved({**good, "args": Planted(pwned, call="open")}), "a Python object, io.open,"),
        "torchscript": (lambda path: write_planted_module(path, pwned), "a TorchScript archive"),
        "earlier": (saved({**good, "rng": {"torch": torch.get_rng_state(), "numpy": np.random.get_state(),
                                           "python": random.getstate()}}), "written by an earlier version of tagalign"),
        "random": (raw(bytes(torch.randint(0, 256, (4096,)).tolist())), "truncated or foreign file"),
        "truncated": (raw(buf.getvalue()[:len(buf.getvalue()) // 2]), "truncated or foreign file"),
        "empty": (raw(b""), "truncated or foreign file (EOFError)"),
        "list": (saved([good]), "a list, not a dict"),
        "state_dict": (saved(TagAlign(tiny_config()).state_dict()), "it has no 'model'"),
        "no_args": (saved({k: v for k, v in good.items() if k != "args"}), "it has no 'args'"),
        "no_tokenizer": (saved({k: v for k, v in good.items() if k != "tokenizer"}), "its 'tokenizer' is neither"),
        "config_str": (saved({**good, "config": "vit"}), "its 'config' is str, not dict"),
        "no_model_keys": (saved({**good, "model": {"encoder.weight": torch.zeros(2)}}), "weights do not fit"),
        "other_shape": (saved({**good, "config": {**good["config"], "vision_width": 64}}), "weights do not fit"),
        "other_version": (saved({**good, "config": {**good["config"], "dropout": 0.1}}), "not one this version"),
        "clip_no_sha256": (saved({**good, "clip": {"path": "x.pt"}}), "it has no 'clip.sha256'"),
    }
    for name, (write, message) in cases.items():
        path = tmp_path / f"{name}.pt"
        write(path)
        with pytest.raises(SystemExit) as e:
            load_model(str(path))
        line = e.value.code
        assert isinstance(line, str) and line.startswith(f"error: {path}") and "\n" not in line, (name, line)
        assert message in line, (name, line)
        assert not pwned.exists(), name
    torch.save(good, tmp_path / "good.pt")  # the control: the same checkpoint, whole, loads
    seg = load_model(str(tmp_path / "good.pt"))
    assert all(torch.equal(seg.model.state_dict()[k], v) for k, v in good["model"].items())


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
