"""Training end to end on a tiny model: the loss goes down, checkpoints round-trip, --resume
continues exactly where an interrupted run stopped, bad flags fail with one line."""
import argparse
import dataclasses
import json
import os

import pytest
import torch

import data
import eval_seg
import tagalign
from model import load_model

TINY = dict(stem_width=8, vision_width=32, vision_layers=1, vision_heads=2, context_length=28,
            text_width=32, text_layers=1, text_heads=2, embed_dim=16, decoder_blocks=1)


Config = tagalign.Config  # the real dataclass, before any test patches it


@pytest.fixture
def tiny(monkeypatch):
    """Every Config that train() builds is the tiny one (fields given explicitly still win)."""
    monkeypatch.setattr(tagalign, "Config", lambda **kw: Config(**{**TINY, **kw}))


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
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=False)
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
    assert saved["args"]["dense"] == "maskclip" and set(data.WORLD_BENCHMARKS) <= set(metrics)


def test_resume_continues_exactly(tiny, tmp_path, monkeypatch):
    straight, broken = tmp_path / "straight", tmp_path / "broken"
    flags = ["--steps", "6", "--ckpt-every", "3"]
    reference = run(straight, *flags)

    # Kill the second run between checkpoints: it has logged steps 0-4, its checkpoint is from
    # step 3, and step 5's batch never arrives.
    batch = tagalign.world_batch

    def batch_or_die(world, step, *rest):
        if step == 5:
            raise KeyboardInterrupt
        return batch(world, step, *rest)

    monkeypatch.setattr(tagalign, "world_batch", batch_or_die)
    with pytest.raises(KeyboardInterrupt):
        run(broken, *flags)
    assert torch.load(broken / "ckpt.pt", weights_only=False)["step"] == 3
    assert [r["step"] for r in read_log(broken)] == [0, 1, 2, 3, 4]
    monkeypatch.setattr(tagalign, "world_batch", batch)
    resumed = run(broken, *flags, "--resume")

    for k, v in reference.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[k], v, rtol=0, atol=0, msg=k)
    a, b = read_log(straight), read_log(broken)
    assert [r["step"] for r in b] == [0, 1, 2, 3, 4, 5]  # nothing repeated, nothing skipped
    assert [r["loss"] for r in a] == [r["loss"] for r in b]


def test_resume_refuses_a_different_run(tiny, tmp_path):
    run(tmp_path, "--steps", "2")
    with pytest.raises(SystemExit, match="--lr"):
        run(tmp_path, "--steps", "2", "--lr", "5e-4", "--resume")


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


def test_config_is_stored_as_a_plain_dict(tiny, tmp_path):
    run(tmp_path, "--steps", "1")
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=False)
    cfg = Config(**ckpt["config"])
    assert dataclasses.asdict(cfg) == ckpt["config"]


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
    args = argparse.Namespace(kernels="torch", tag_weight=1.0, tag_loss="softmax", tag_grad=tag_grad)
    _, _, tag = tagalign.compute_loss(model, images, tokens, targets, args, tag_tokens=tag_tokens)
    tag.backward()
    text_grad = model.clip.token_embedding.weight.grad
    image_grad = model.clip.visual.conv1.weight.grad
    assert image_grad is not None and image_grad.abs().sum() > 0
    assert (text_grad is not None and text_grad.abs().sum() > 0) == (tag_grad == "both")
