"""Training end to end on a tiny model: the loss goes down, checkpoints round-trip, --resume
continues exactly where an interrupted run stopped, bad flags fail with one line."""
import contextlib
import json
import os
import random

import numpy as np
import pytest
import torch

import data
import eval_seg
import tagalign
from _clip import make_ref_clip, write_clip
from _planted import Planted
from eval_seg import load_model
from world import SHAPES, WORLD_BENCHMARKS, write_world_shards

TINY = dict(stem_width=8, vision_width=32, vision_layers=1, vision_heads=2, context_length=28,
            text_width=32, text_layers=1, text_heads=2, embed_dim=16, decoder_blocks=1)


Config = tagalign.Config  # the real dataclass, before any test patches it


def tiny_config(**kw):
    return Config(**{**TINY, **kw})  # fields given explicitly win


@pytest.fixture
def tiny(monkeypatch):
    """Every Config that train() builds is the tiny one."""
    monkeypatch.setattr(tagalign, "Config", tiny_config)


def dies_at_call(fn, n):
    """fn that raises KeyboardInterrupt at its n-th call (a run killed mid-training)."""
    calls = []

    def wrapped(*a, **kw):
        calls.append(1)
        if len(calls) == n:
            raise KeyboardInterrupt
        return fn(*a, **kw)
    return wrapped


@contextlib.contextmanager
def killed_at_batch(monkeypatch, step):
    """The world run in the block is killed when it asks for batch `step` (between checkpoints)."""
    batch = tagalign.world_batch

    def batch_or_die(world, s, *rest):
        if s == step:
            raise KeyboardInterrupt
        return batch(world, s, *rest)

    monkeypatch.setattr(tagalign, "world_batch", batch_or_die)
    try:
        with pytest.raises(KeyboardInterrupt):
            yield
    finally:
        monkeypatch.setattr(tagalign, "world_batch", batch)


def run(out, *flags):
    base = ["train", "--out", str(out), "--batch-size", "16", "--corpus", "600", "--vocab-size", "600",
            "--min-tag-count", "1", "--eval-images", "0", "--quiet", "--log-every", "1"]
    return tagalign.main(base + list(flags))


def read_log(out):
    with open(os.path.join(out, "log.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_a_few_steps_lower_the_loss(tiny, tmp_path):
    run(tmp_path, "--steps", "30", "--lr", "2e-3", "--warmup", "0.1")
    log = read_log(tmp_path)
    first, last = log[0], log[-1]
    assert last["step"] == 29
    # Each batch is new data, so compare averages of the first and last five steps.
    early = sum(r["loss"] for r in log[:5]) / 5
    late = sum(r["loss"] for r in log[-5:]) / 5
    assert late < early - 0.3, (early, late)
    assert first["tag"] > 0 and first["itc"] > 0


def test_tag_weight_zero_trains_itc_only(tiny, tmp_path):
    run(tmp_path, "--steps", "3", "--tag-weight", "0")
    log = read_log(tmp_path)
    assert all(r["tag"] == 0 and r["loss"] == r["itc"] for r in log)


def test_checkpoint_round_trip(tiny, tmp_path):
    model = run(tmp_path, "--steps", "2")
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    assert ckpt["step"] == 2 and ckpt["args"]["steps"] == 2
    assert ckpt["config"]["vision_width"] == TINY["vision_width"]
    assert not os.path.exists(tmp_path / "ckpt.pt.tmp")  # written atomically: no leftovers
    seg = load_model(str(tmp_path / "ckpt.pt"))
    for k, v in model.state_dict().items():
        torch.testing.assert_close(seg.model.state_dict()[k], v, rtol=0, atol=0)
    images = torch.randn(2, 3, 64, 64)
    torch.testing.assert_close(seg.encode_dense(images), model.eval().dense(images).permute(0, 3, 1, 2))
    assert seg.encode_text(["a red circle.", "grass"]).shape == (2, TINY["embed_dim"])
    own = load_model(str(tmp_path / "ckpt.pt"), reading="maskclip")
    torch.testing.assert_close(own.encode_dense(images), model.dense(images, "maskclip").permute(0, 3, 1, 2))
    metrics = eval_seg.main(["--ckpt", str(tmp_path / "ckpt.pt"), "--dense", "maskclip", "--world-images", "4",
                             "--n-vis", "0", "--out", str(tmp_path / "self")])
    saved = json.loads((tmp_path / "self" / "metrics.json").read_text())
    assert saved["args"]["dense"] == "maskclip" and set(WORLD_BENCHMARKS) <= set(metrics)


def test_resume_continues_exactly(tiny, tmp_path, monkeypatch):
    straight, broken = tmp_path / "straight", tmp_path / "broken"
    flags = ["--steps", "6", "--ckpt-every", "3"]
    reference = run(straight, *flags)

    # Kill the second run between checkpoints: it has logged steps 0-4, its checkpoint is from
    # step 3, and step 5's batch never arrives.
    with killed_at_batch(monkeypatch, 5):
        run(broken, *flags)
    assert torch.load(broken / "ckpt.pt", weights_only=True)["step"] == 3
    assert [r["step"] for r in read_log(broken)] == [0, 1, 2, 3, 4]
    resumed = run(broken, *flags, "--resume")

    for k, v in reference.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[k], v, rtol=0, atol=0, msg=k)
    a, b = read_log(straight), read_log(broken)
    assert [r["step"] for r in b] == [0, 1, 2, 3, 4, 5]  # nothing repeated, nothing skipped
    assert [r["loss"] for r in a] == [r["loss"] for r in b]
    from PIL import Image  # the curves are drawn again from the whole log on resume
    assert Image.open(broken / "curves.png").size == Image.open(straight / "curves.png").size == (900, 600)


def test_resume_refuses_a_different_run(tiny, tmp_path):
    run(tmp_path, "--steps", "2")
    with pytest.raises(SystemExit, match="--lr"):
        run(tmp_path, "--steps", "2", "--lr", "5e-4", "--resume")


def test_resume_refuses_what_is_not_a_plain_checkpoint(tiny, tmp_path):
    """--resume from a checkpoint whose pickle would run code, of an earlier version (numpy's RNG
    state as an array), missing what a run needs or of another shape: one line naming it,
    nothing run, nothing written (the folder stays as it was)."""
    run(tmp_path, "--steps", "2")
    good = torch.load(tmp_path / "ckpt.pt", weights_only=True)  # plain data only
    earlier = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    cases = {"it holds a Python object, posix.system,": {**good, "rng": Planted(tmp_path / "pwned")},
             "written by an earlier version of tagalign": {**good, "rng": earlier},
             "it has no 'args'": {k: v for k, v in good.items() if k != "args"},
             "it has no 'optimizer'": {k: v for k, v in good.items() if k != "optimizer"},
             "it has no 'rng.numpy'": {**good, "rng": {"torch": good["rng"]["torch"]}},
             "its weights do not fit its config": {**good, "config": {**good["config"], "vision_width": 64}}}
    for message, ckpt in cases.items():
        torch.save(ckpt, tmp_path / "ckpt.pt")
        before = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()}
        with pytest.raises(SystemExit) as e:
            run(tmp_path, "--steps", "2", "--resume")
        line = e.value.code
        assert line.startswith(f"error: {tmp_path / 'ckpt.pt'}") and message in line and "\n" not in line, line
        assert not (tmp_path / "pwned").exists()
        assert {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()} == before


def test_bad_input_fails_with_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit, match="does not exist"):
        run(tmp_path / "empty", "--resume")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "ckpt.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(SystemExit, match="not a tagalign checkpoint"):
        load_model(str(tmp_path / "bad" / "ckpt.pt"))
    with pytest.raises(SystemExit):
        run(tmp_path, "--steps", "0")
    assert "--steps must be at least 1" in capsys.readouterr().err
    for flag in (["--augment", "light"], ["--decode", "full"]):  # the world is drawn, not decoded
        with pytest.raises(SystemExit):
            run(tmp_path, "--steps", "1", *flag)
        assert "--augment and --decode: paper mode only" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="vocab_size=300: must be at least 514"):  # one line, not a traceback
        run(tmp_path, "--steps", "1", "--vocab-size", "300")


def test_triton_and_torch_kernels_train_the_same(tiny, tmp_path):
    """Ten steps through the fused kernels (the Triton interpreter on CPU) and through the
    PyTorch reference, from the same seed: the same losses and parameters to float tolerance."""
    fused = run(tmp_path / "triton", "--steps", "10", "--kernels", "triton")
    plain = run(tmp_path / "torch", "--steps", "10", "--kernels", "torch")
    a, b = read_log(tmp_path / "triton"), read_log(tmp_path / "torch")
    for ra, rb in zip(a, b, strict=True):
        for k in ("loss", "itc", "tag"):
            assert abs(ra[k] - rb[k]) <= 1e-5 * max(1.0, abs(rb[k])), (ra["step"], k, ra[k], rb[k])
    for k, v in plain.state_dict().items():
        got, tol = fused.state_dict()[k], 1e-5
        if k.endswith("attn.in_proj_bias"):
            # The key bias has no true gradient (a softmax ignores what it adds to every logit of
            # a row), so both runs feed Adam rounding noise, which it normalises into steps of up
            # to lr: compare the key third within 10 steps x lr, the rest as everything else.
            W = v.shape[0] // 3
            torch.testing.assert_close(got[W:2 * W], v[W:2 * W], rtol=0, atol=10 * 1e-3, msg=k)
            got, v = torch.cat([got[:W], got[2 * W:]]), torch.cat([v[:W], v[2 * W:]])
        # fp32 sums in another order drift by ~1e-7 a step; a wrong gradient moves a parameter
        # by ~lr = 1e-3 a step
        torch.testing.assert_close(got, v, rtol=1e-4, atol=tol, msg=k)


@pytest.mark.parametrize("tag_grad", ["both", "image"])
def test_tag_grad_chooses_the_towers_the_tag_loss_trains(tag_grad):
    torch.manual_seed(0)
    model = tagalign.TagAlign(Config(image_size=32, patch_size=8, **TINY, vocab_size=60))
    images, tokens = torch.randn(4, 3, 32, 32), torch.randint(1, 60, (4, 28))
    tag_tokens, targets = torch.randint(1, 60, (5, 28)), torch.rand(4, 5) < 0.5
    _, _, tag = tagalign.compute_loss(model, images, tokens, targets, tag_tokens=tag_tokens, tag_grad=tag_grad,
                                      impl="torch")
    tag.backward()
    text_grad = model.clip.token_embedding.weight.grad
    image_grad = model.clip.visual.conv1.weight.grad
    assert image_grad is not None and image_grad.abs().sum() > 0
    assert (text_grad is not None and text_grad.abs().sum() > 0) == (tag_grad == "both")


# ---------------------------------------------------------------- settings from the command line
def test_set_changes_the_model_and_the_world_and_is_recorded(tiny, tmp_path):
    run(tmp_path, "--steps", "1", "--eval-images", "2", "--set", "vision_layers=2", "--set", "world.pairs=false",
        "--set", "world.shapes=circle,ring", "--set", "vision_local=0")
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    assert ckpt["config"]["vision_layers"] == 2 and ckpt["config"]["vision_local"] == 0
    assert ckpt["world"]["pairs"] is False and ckpt["world"]["shapes"] == ("circle", "ring")
    assert sum(k.endswith("attn.in_proj_weight") and k.startswith("clip.visual") for k in ckpt["model"]) == 2
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["config"]["vision_layers"] == 2 and metrics["world"]["shapes"] == ["circle", "ring"]
    assert list(metrics["world-object"]["IoU"]) == ["background", "circle", "ring"]  # the run's own world
    seg = load_model(str(tmp_path / "ckpt.pt"))
    assert seg.world_cfg.shapes == ("circle", "ring")


@pytest.mark.parametrize("setting, message", [
    ("vision_layer=2", "unknown setting"), ("world.colour=red", "unknown setting"),
    ("vision_layers=two", "invalid literal"), ("world.pairs=maybe", "true or false"),
    ("vision_heads=5", "not a multiple"), ("world.shapes=circle,blob", "expected distinct names"),
    ("world.objects=0.5,0.4", "summing to 1"), ("stem=pixel", "stem"), ("vision_layers", "unknown setting")])
def test_set_refuses_bad_settings_with_one_line(tiny, tmp_path, setting, message):
    with pytest.raises(SystemExit, match=message) as e:
        run(tmp_path, "--steps", "1", "--set", setting)
    assert "\n" not in str(e.value)


# ---------------------------------------------------------------- paper mode: frozen CLIP on shards
@pytest.fixture(scope="module")
def paper(tmp_path_factory):
    """A small OpenAI-format CLIP (8 blocks), the world as 4 shards of 12 scenes, their tags."""
    root = tmp_path_factory.mktemp("paper")
    clip = write_clip(make_ref_clip(vision_layers=8), root / "clip.pt", "torchscript")
    shards = write_world_shards(str(root / "shards"), 48, per_shard=12)
    tagalign.main(["tags", "--captions", *shards, "--out", str(root / "tags"), "--min-count", "1", "--quiet",
                   "--workers", "1"])
    return root, clip


@pytest.fixture(scope="module")
def other_clip(paper):
    """Another CLIP file of the same shapes (other weights, fp16 state dict)."""
    return write_clip(make_ref_clip(seed=1, vision_layers=8), paper[0] / "other.pt", "fp16")


def run_paper(paper, out, *flags):
    root, clip = paper
    base = ["train", "--clip", clip, "--data", str(root / "shards" / "world-{00000..00003}.tar"),
            "--tags", str(root / "tags"), "--out", str(out), "--batch-size", "4", "--shuffle-buffer", "5",
            "--quiet", "--log-every", "1", "--lr", "1e-3"]
    return tagalign.main(base + list(flags))


def test_paper_mode_trains_the_head_alone(paper, tmp_path):
    from model import read_clip_state_dict
    model = run_paper(paper, tmp_path, "--steps", "4")
    original = read_clip_state_dict(paper[1])
    for k, v in model.clip.state_dict().items():  # both towers bit-identical after training
        assert torch.equal(v, original[k]), k
    assert not model.clip.training and model.decoder.training  # a frozen CLIP stays in eval mode
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    assert not any(k.startswith("clip.") for k in ckpt["model"])  # checkpoints hold what trains
    trained = {k for k in ckpt["model"]}
    assert {k.split(".")[0] for k in trained} == {"decoder", "dense_ln", "dense_proj", "logit_scale", "tag_logit_scale"}
    n_opt = sum(len(g["params"]) for g in ckpt["optimizer"]["param_groups"])
    assert n_opt == len(trained)  # one optimizer entry per trainable tensor, no CLIP weight among them
    assert ckpt["clip"]["sha256"] == __import__("model").file_sha256(paper[1]) and ckpt["tokenizer"] == "clip"
    assert (ckpt["args"]["augment"], ckpt["args"]["decode"]) == ("official", "draft")  # the paper mode's defaults
    assert any(p.abs().sum() > 0 for n, p in model.decoder.named_parameters() if n.endswith("gate"))  # gates moved
    log = read_log(tmp_path)
    assert [r["step"] for r in log] == [0, 1, 2, 3] and all(r["tag"] > 0 for r in log)
    assert set(log[-1]["skipped"]) == set(data.SKIPS)


def test_weight_decay_groups(paper):
    # paper: the authors' rule, not 1-d and not ".bias", so the 0-d gates and temperatures decay;
    # the world from scratch: matrices only
    from model import load_clip
    head = load_clip(paper[1])
    world = tagalign.TagAlign(tiny_config(vocab_size=60))
    for model, rule in ((head, "official"), (world, "matrices")):
        opt = tagalign.make_optimizer(model, lr=1e-3, weight_decay=0.05, decay=rule)
        names = {id(p): k for k, p in model.named_parameters()}
        decayed = {names[id(p)] for g in opt.param_groups if g["weight_decay"] == 0.05 for p in g["params"]}
        kept = {names[id(p)] for g in opt.param_groups if g["weight_decay"] == 0 for p in g["params"]}
        trains = {k for k, p in model.named_parameters() if p.requires_grad}
        assert decayed | kept == trains and not decayed & kept
        if rule == "official":
            gates = {k for k in trains if k.endswith("gate")}
            assert gates and gates | {"logit_scale", "tag_logit_scale", "dense_proj"} <= decayed
            assert all(k.endswith((".bias", "norm.weight", "dense_ln.weight")) for k in kept), kept
        else:
            assert decayed == {k for k in trains if model.get_parameter(k).ndim >= 2}
            assert {"clip.logit_scale", "tag_logit_scale"} <= kept


def test_tag_embedding_cache_is_reused_and_invalidated(paper, other_clip, tmp_path, capsys):
    root, clip = paper
    cache = root / "tags" / "tag_embeddings.pt"
    if cache.exists():
        cache.unlink()
    run_paper(paper, tmp_path / "a", "--steps", "1", "--eval-images", "0")
    assert "computed" in capsys.readouterr().out and cache.exists()
    first = torch.load(cache, weights_only=True)
    run_paper(paper, tmp_path / "b", "--steps", "1", "--eval-images", "0")
    assert f"from {cache}" in capsys.readouterr().out  # same CLIP, tags and template: reused
    run_paper(paper, tmp_path / "c", "--steps", "1", "--eval-images", "0", "--template", "a {}.")
    assert "recomputing" in capsys.readouterr().out
    assert not torch.equal(torch.load(cache, weights_only=True)["embeddings"], first["embeddings"])
    run_paper(paper, tmp_path / "d", "--steps", "1", "--eval-images", "0", "--clip", other_clip)
    assert "recomputing" in capsys.readouterr().out  # another CLIP file
    cache.write_bytes(cache.read_bytes()[:100])
    run_paper(paper, tmp_path / "e", "--steps", "1", "--eval-images", "0")
    assert "recomputing" in capsys.readouterr().out  # a broken cache is made anew
    assert torch.equal(torch.load(cache, weights_only=True)["embeddings"], first["embeddings"])


def test_paper_mode_resume_continues_exactly(paper, other_clip, tmp_path, monkeypatch):
    """Killed after step 4 with a checkpoint from step 3 (mid-shard, mid-buffer), resumed: the
    same losses and head as an uninterrupted run."""
    flags = ["--steps", "6", "--ckpt-every", "3", "--eval-images", "0"]
    reference = run_paper(paper, tmp_path / "straight", *flags)
    loss = tagalign.compute_loss
    monkeypatch.setattr(tagalign, "compute_loss", dies_at_call(loss, 6))
    with pytest.raises(KeyboardInterrupt):
        run_paper(paper, tmp_path / "broken", *flags)
    monkeypatch.setattr(tagalign, "compute_loss", loss)
    assert torch.load(tmp_path / "broken" / "ckpt.pt", weights_only=True)["step"] == 3
    resumed = run_paper(paper, tmp_path / "broken", *flags, "--resume")
    a, b = read_log(tmp_path / "straight"), read_log(tmp_path / "broken")
    assert [r["step"] for r in b] == list(range(6)) and [r["loss"] for r in a] == [r["loss"] for r in b]
    for k, v in reference.trainable_state_dict().items():
        torch.testing.assert_close(resumed.trainable_state_dict()[k], v, rtol=0, atol=0, msg=k)
    with pytest.raises(SystemExit, match="another file"):  # the same run needs the same CLIP
        run_paper(paper, tmp_path / "broken", *flags, "--resume", "--clip", other_clip)
    with pytest.raises(SystemExit, match="--augment official, this command says light"):  # and the same images
        run_paper(paper, tmp_path / "broken", *flags, "--resume", "--augment", "light")


def test_paper_checkpoint_evaluates_through_eval_seg(paper, other_clip, tmp_path):
    run_paper(paper, tmp_path, "--steps", "2", "--eval-benchmarks", "world-object", "--eval-images", "3")
    seg = load_model(str(tmp_path / "ckpt.pt"))
    assert seg.clip_blend and seg.reading == "surgery" and seg.norm == (data.IMAGENET_MEAN, data.IMAGENET_STD)
    m = eval_seg.main(["--ckpt", str(tmp_path / "ckpt.pt"), "--benchmarks", "world-object,world-attr",
                       "--world-images", "3", "--n-vis", "0", "--out", str(tmp_path / "eval")])
    assert m["world-object"]["protocol"].clip_w == 0.3 and m["world-object"]["images"] == 3
    assert m["world-object"]["protocol"].score == "softmax"  # the world preset
    t = eval_seg.main(["--ckpt", str(tmp_path / "ckpt.pt"), "--benchmarks", "world-object", "--scoring", "tagalign",
                       "--world-images", "3", "--n-vis", "0", "--out", str(tmp_path / "eval_t")])
    p = t["world-object"]["protocol"]
    assert (p.score, p.score_scale, p.score_bias, p.bg_thresh, p.clip_w, p.window) == ("sigmoid", 10, -2.5, 0.4, 0.3, None)
    raw = eval_seg.main(["--clip", paper[1], "--dense", "maskclip", "--benchmarks", "world-object",
                         "--world-images", "3", "--n-vis", "0", "--out", str(tmp_path / "raw")])
    assert raw["world-object"]["protocol"].clip_w == 0.0  # raw CLIP has nothing to blend
    with pytest.raises(SystemExit, match="another file"):
        load_model(str(tmp_path / "ckpt.pt"), clip=other_clip)


def test_paper_mode_refuses_bad_input(paper, tmp_path, capsys):
    root, clip = paper
    with pytest.raises(SystemExit):
        tagalign.main(["train", "--clip", clip, "--out", str(tmp_path)])
    assert "--clip needs --data" in capsys.readouterr().err
    other = write_world_shards(str(tmp_path / "other"), 8, per_shard=8, start=100)[0]
    for name, message in (("world-00000.tar", r"has \d+ bytes, \d+ when it was tagged"),
                          ("x.tar", "built from other files: x.tar")):
        os.rename(other, tmp_path / "other" / name)
        other = str(tmp_path / "other" / name)
        with pytest.raises(SystemExit, match=message):
            tagalign.main(["train", "--clip", clip, "--data", other, "--tags", str(root / "tags"),
                           "--out", str(tmp_path), "--quiet"])
    with pytest.raises(SystemExit, match="--set decoder_width=3: unknown setting"):
        run_paper(paper, tmp_path, "--steps", "1", "--set", "decoder_width=3")
    with pytest.raises(SystemExit, match="unknown setting"):
        run_paper(paper, tmp_path, "--steps", "1", "--set", "vision_layers=3")  # the file decides the shape


# ---------------------------------------------------------------- pair tags
def test_pairs_train_and_resume_exactly(tiny, tmp_path, monkeypatch):
    """`train --pairs`: the vocabulary gets the world's pair tags, the targets name them, the
    checkpoint keeps their kinds, so --resume continues the same run; without --pairs, none."""
    straight, broken = tmp_path / "straight", tmp_path / "broken"
    flags = ["--pairs", "--steps", "4", "--ckpt-every", "2"]
    reference = run(straight, *flags)
    ckpt = torch.load(straight / "ckpt.pt", weights_only=True)
    tags, kinds = ckpt["tags"], ckpt["tag_kinds"]
    pairs = [t for t, k in zip(tags, kinds) if k == "pair"]
    assert kinds == sorted(kinds, key=("object", "attribute", "pair").index) and ckpt["args"]["pairs"]
    assert "red circle" in pairs and "big ring" in pairs and all(" " in t for t in pairs)
    assert set(tags) - set(pairs) == set(torch.load(_plain_ckpt(tmp_path), weights_only=True)["tags"])
    vocab = tagalign.TagVocab.from_tags(tags, kinds=kinds)
    targets = tagalign.world_batch(tagalign.World(0), 0, 8, tagalign.Tokenizer.from_state_dict(ckpt["tokenizer"]),
                                   vocab, tiny_config())[2]
    assert targets[:, len(tags) - len(pairs):].any(1).float().mean() > 0.5  # most captions name a pair
    # RESULTS.md reads the pair runs with the evaluator's cosines, world-attr's classes being pair phrases
    metrics = eval_seg.main(["--ckpt", str(straight / "ckpt.pt"), "--benchmarks", "world-stuff,world-attr", "--cosines",
                             "--world-images", "2", "--n-vis", "0", "--out", str(tmp_path / "cosines")])
    assert "red circle" in metrics["world-attr"]["cosines"] and "grass" in metrics["world-stuff"]["cosines"]

    with killed_at_batch(monkeypatch, 3):
        run(broken, *flags)
    with pytest.raises(SystemExit, match="trained with --pairs, this command says without"):
        run(broken, *flags[1:], "--resume")
    resumed = run(broken, *flags, "--resume")
    for k, v in reference.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[k], v, rtol=0, atol=0, msg=k)
    assert [r["loss"] for r in read_log(straight)] == [r["loss"] for r in read_log(broken)]


def _plain_ckpt(tmp_path):
    run(tmp_path / "plain", "--steps", "1")
    ckpt = torch.load(tmp_path / "plain" / "ckpt.pt", weights_only=True)
    assert "tag_kinds" not in ckpt and not ckpt["args"]["pairs"]
    return tmp_path / "plain" / "ckpt.pt"


def test_paper_mode_trains_on_pair_tags(paper, tmp_path, capsys):
    """The miniature's pair rows: `tags --pairs` on the shards, then `train --clip ... --tags`."""
    root, clip = paper
    shards = sorted(str(p) for p in (root / "shards").glob("world-*.tar"))
    tagalign.main(["tags", "--captions", *shards, "--out", str(root / "tags_pairs"), "--pairs", "--min-count", "1",
                   "--min-pair-count", "1", "--quiet", "--workers", "1"])
    vocab = tagalign.TagVocab.load(str(root / "tags_pairs" / "vocab.json"))
    assert vocab.pairs and "pair" not in tagalign.TagVocab.load(str(root / "tags" / "vocab.json")).kinds
    syn = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "words", "world_synonyms.txt")
    tagalign.main(["tags", "--captions", *shards, "--out", str(root / "tags_syn_pairs"), "--synonyms", syn, "--pairs",
                   "--min-count", "1", "--min-pair-count", "1", "--quiet", "--workers", "1"])
    merged = tagalign.TagVocab.load(str(root / "tags_syn_pairs" / "vocab.json"))
    merged_pairs = [t for t, k in zip(merged.tags, merged.kinds) if k == "pair"]
    assert merged_pairs and {t.split()[-1] for t in merged_pairs} <= set(SHAPES)  # "red disk" -> "red circle"
    run_paper(paper, tmp_path, "--steps", "2", "--tags", str(root / "tags_pairs"))
    emb = torch.load(root / "tags_pairs" / "tag_embeddings.pt", weights_only=True)["embeddings"]
    assert emb.shape[0] == len(vocab) and f"tag embeddings: {len(vocab)} computed" in capsys.readouterr().out
    assert all(r["tag"] > 0 for r in read_log(tmp_path))
    with pytest.raises(SystemExit):
        tagalign.main(["train", "--clip", clip, "--data", shards[0], "--tags", str(root / "tags_pairs"),
                       "--pairs", "--out", str(tmp_path / "x")])
    assert "--pairs: the world from scratch only" in capsys.readouterr().err
