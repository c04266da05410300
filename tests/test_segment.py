"""`tagalign.py segment` and the Segmenter API on a tiny world model trained here: the same
pixels as eval_seg.py's prediction, synonyms as averaged prompts, raw CLIP, bad files skipped
and counted, outputs written atomically, bad input refused with one line. (The README's
segment commands and its Python example run in tests/test_docs.py.)"""
import json
import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import eval_seg
import segment
import tagalign
from _clip import make_ref_clip, write_clip
from segment import Segmenter
from test_train import run, tiny_config
from world import WORLD_MEAN, WORLD_STD, WorldBenchmark

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """A tiny world model, 10 steps: OUT/ckpt.pt."""
    out = tmp_path_factory.mktemp("world")
    with pytest.MonkeyPatch.context() as m:
        m.setattr(tagalign, "Config", tiny_config)
        run(out, "--steps", "10")
    return str(out / "ckpt.pt")


def segment_cli(*argv):
    return tagalign.main(["segment", "--quiet", *map(str, argv)])


def read_labels(path):
    im = Image.open(path)
    assert im.mode == "P"
    return np.array(im)


def eval_seg_predictions(monkeypatch, argv):
    """{benchmark: [prediction per image]} as eval_seg.py's main makes them (IoU.update's input)."""
    preds, update = {}, eval_seg.IoU.update

    def spy(self, pred, label):
        preds.setdefault(self.C, []).append(np.asarray(pred))
        return update(self, pred, label)

    monkeypatch.setattr(eval_seg.IoU, "update", spy)
    eval_seg.main(argv)
    monkeypatch.setattr(eval_seg.IoU, "update", update)
    return preds


# ----------------------------------------------------------------------------- one scoring path
def test_segment_predicts_what_eval_seg_predicts(ckpt, tmp_path, monkeypatch):
    """world-object (background on) and world-attr (off): the demo scenes are the benchmarks'
    images, so segment's labels PNGs must equal eval_seg's predictions pixel for pixel; the API
    returns the same labels, and labels are the argmax of [background, scores]."""
    preds = eval_seg_predictions(monkeypatch, ["--ckpt", ckpt, "--benchmarks", "world-object,world-attr",
                                               "--world-images", "3", "--n-vis", "0", "--out", str(tmp_path / "eval")])
    obj, attr = WorldBenchmark("world-object", 3), WorldBenchmark("world-attr", 3)
    out = tmp_path / "seg"
    run_obj = segment_cli("--demo", 3, "--ckpt", ckpt, "--classes", "; ".join(obj.classes[1:]), "--out", out)
    assert [Path(r["file"]).name for r in run_obj["images"]] == [f"world-{i:05d}.png" for i in range(3)]
    assert run_obj["protocol"].score == "softmax" and run_obj["background"] == 0.5  # the world's protocol
    segment_cli(out / "demo", "--ckpt", ckpt, "--classes", "; ".join(attr.classes), "--background", "none",
                "--out", tmp_path / "attr")
    seg = Segmenter.load(ckpt)
    for i in range(3):
        image = obj[i][0]
        np.testing.assert_array_equal(np.asarray(Image.open(out / "demo" / f"world-{i:05d}.png")), image)
        want = preds[len(obj.classes)][i]
        np.testing.assert_array_equal(read_labels(out / f"world-{i:05d}.labels.png"), want)
        np.testing.assert_array_equal(read_labels(tmp_path / "attr" / f"world-{i:05d}.labels.png"),
                                      preds[len(attr.classes)][i])
        labels, scores = seg(image, obj.classes[1:])
        assert labels.dtype == np.int64 and scores.shape == (4, 64, 64) and scores.dtype == np.float32
        np.testing.assert_array_equal(labels, want)
        with_bg = np.concatenate([np.full((1, 64, 64), 0.5, np.float32), scores])
        np.testing.assert_array_equal(labels, with_bg.argmax(0))
    shares = run_obj["images"][0]["classes"]
    assert set(shares) == set(obj.classes[1:])
    total = run_obj["images"][0]["background"]["share"] + sum(c["share"] for c in shares.values())
    assert abs(total - 100) < 1e-9


def test_synonyms_average_their_prompts(ckpt):
    """"grass, lawn": one class whose prompt embedding is the mean of both prompts' (un-normalised,
    as templates are averaged), restated here from the model's encoders and the world protocol
    (softmax over the classes at the model's temperature, bilinear to the image)."""
    seg = Segmenter.load(ckpt, background=False)
    image = WorldBenchmark("world-stuff", 1)[0][0]
    _, scores = seg(image, ["grass, lawn", "circle"])
    m = seg.model
    text = torch.stack([m.encode_text(["a grass.", "a lawn."]).mean(0), m.encode_text(["a circle."])[0]])
    x = (torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255 - torch.tensor(WORLD_MEAN).view(1, 3, 1, 1)) \
        / torch.tensor(WORLD_STD).view(1, 3, 1, 1)
    cos = torch.einsum("nehw,ce->nchw", F.normalize(m.encode_dense(x), dim=1), F.normalize(text, dim=1))
    want = F.interpolate(torch.softmax(m.logit_scale * cos, 1), size=(64, 64), mode="bilinear", align_corners=False)
    torch.testing.assert_close(torch.from_numpy(scores), want[0], rtol=1e-5, atol=1e-6)
    for alone in ("grass", "lawn"):  # either word alone scores otherwise
        assert not np.allclose(seg(image, [alone, "circle"])[1], scores, atol=1e-4), alone
    assert np.array_equal(seg(image, "grass, lawn; circle")[1], scores)  # the CLI's syntax, same classes


def test_background_threshold(ckpt):
    """On at the world's 0.5 by default; a threshold no score beats (1) or every score beats (0);
    off: labels index the classes."""
    image = WorldBenchmark("world-object", 1)[0][0]
    classes = ["circle", "triangle", "cross", "ring"]
    assert Segmenter.load(ckpt).protocol.bg_thresh == 0.5
    assert (Segmenter.load(ckpt, background=1.0)(image, classes)[0] == 0).all()
    assert (Segmenter.load(ckpt, background=0.0)(image, classes)[0] >= 1).all()
    labels, scores = Segmenter.load(ckpt, background=False)(image, classes)
    np.testing.assert_array_equal(labels, scores.argmax(0))


def test_class_lists():
    assert segment.parse_classes(" cat ;grass,  lawn;; red   car ;") == [["cat"], ["grass", "lawn"], ["red car"]]
    assert segment.parse_classes(["cat", "grass, lawn"]) == [["cat"], ["grass", "lawn"]]
    for bad, message in (("", "no class names"), (" ; , ", "no class names"), ("cat; dog; Cat", "'cat' is given twice"),
                         ("grass, lawn; lawn", "'lawn' is given twice")):
        with pytest.raises(ValueError, match=message):
            segment.parse_classes(bad)


# ----------------------------------------------------------------------------- raw CLIP, files
def test_raw_clip_with_the_sliding_window(tmp_path):
    """--clip alone on a small CLIP file: TCL's protocol (30 x 70 -> 448 x 1045, four windows),
    the reading given, scores and features saved; the scores file is the API's scores."""
    clip = write_clip(make_ref_clip(vision_layers=2, patch=16), tmp_path / "clip.pt", "fp16")  # 28^2 patches a window
    image = np.random.default_rng(0).integers(0, 256, (30, 70, 3), np.uint8)
    Image.fromarray(image).save(tmp_path / "photo.png")
    out = tmp_path / "out"
    r = segment_cli(tmp_path / "photo.png", "--clip", clip, "--dense", "maskclip", "--classes", "red; blue, navy",
                    "--out", out, "--save-scores", "--save-features", "--batch-size", 3)
    assert (r["protocol"].short_side, r["protocol"].window, r["model"]["dense"]) == (448, 448, "maskclip")
    assert r["prompts"]["blue, navy"] == ["a photo of a blue.", "a photo of a navy."]
    scores = np.load(out / "photo.scores.npy")
    assert scores.dtype == np.float16 and scores.shape == (2, 30, 70)
    assert np.load(out / "photo.features.npy").shape == (448 // 16, 1045 // 16, 24)  # (h, w, E) of the resized image
    labels, api = Segmenter.load(clip=clip, dense="maskclip")(tmp_path / "photo.png", ["red", "blue, navy"])
    np.testing.assert_array_equal(read_labels(out / "photo.labels.png"), labels)
    np.testing.assert_allclose(scores, api, atol=1e-3)  # float16 of the same scores
    assert len(eval_seg.window_grid(448, 1045, 448, 224)) == 4


def test_a_folder_with_bad_files(ckpt, tmp_path, capsys):
    """A text file and a truncated JPEG are skipped with one line each and counted; the good
    image is segmented."""
    photos = tmp_path / "photos"
    photos.mkdir()
    image = WorldBenchmark("world-object", 1)[0][0]
    Image.fromarray(image).save(photos / "good.png")
    (photos / "notes.txt").write_text("not a picture\n")
    Image.fromarray(np.repeat(np.repeat(image, 4, 0), 4, 1)).save(photos / "cut.jpg", quality=95)
    data = (photos / "cut.jpg").read_bytes()
    (photos / "cut.jpg").write_bytes(data[:len(data) // 2])
    out = tmp_path / "out"
    r = segment_cli(photos, "--ckpt", ckpt, "--classes", "circle; ring", "--out", out)
    printed = capsys.readouterr().out
    assert f"skipped {photos / 'notes.txt'}: not an image" in printed
    assert re.search(rf"skipped {re.escape(str(photos / 'cut.jpg'))}: unreadable image \(.*truncated", printed)
    assert "segmented 1 images" in printed and "skipped 2" in printed
    assert [Path(x["file"]).name for x in r["images"]] == ["good.png"] and len(r["skipped"]) == 2
    assert sorted(p.name for p in out.iterdir()) == ["good.labels.png", "good.overlay.png", "segment.json"]
    saved = json.loads((out / "segment.json").read_text())
    assert [Path(s["file"]).name for s in saved["skipped"]] == ["cut.jpg", "notes.txt"]


def test_outputs_are_written_atomically(ckpt, tmp_path, monkeypatch):
    """Every output arrives by a rename from a temporary file beside it; a run interrupted while
    writing leaves neither the temporary file nor a half file."""
    renames, replace = [], os.replace

    def spy(src, dst):
        renames.append((Path(src), Path(dst)))
        return replace(src, dst)

    monkeypatch.setattr(segment.os, "replace", spy)
    monkeypatch.setattr(eval_seg.os, "replace", spy)
    out = tmp_path / "out"
    segment_cli("--demo", 2, "--ckpt", ckpt, "--classes", "circle; sky", "--out", out, "--save-scores",
                "--save-features")
    written = {p for p in out.rglob("*") if p.is_file()}
    assert len(written) == 2 + 2 * 4 + 1  # demo images, 4 files per image, segment.json
    assert written == {dst for _, dst in renames}
    assert all(src.parent == dst.parent and not src.exists() for src, dst in renames)

    def dies_halfway(f, a):  # np.save into the file, cut short
        f.write(b"\x93NUMPY half")
        raise KeyboardInterrupt

    monkeypatch.setattr(segment.np, "save", dies_halfway)
    with pytest.raises(KeyboardInterrupt):
        segment_cli("--demo", 1, "--ckpt", ckpt, "--classes", "circle", "--out", tmp_path / "cut", "--save-scores")
    names = sorted(p.name for p in (tmp_path / "cut").iterdir())
    assert names == ["demo", "world-00000.labels.png", "world-00000.overlay.png"]  # no scores file, whole or half


@pytest.mark.parametrize("flags, message", [
    (["--classes", " ; ;"], "--classes: no class names"),
    (["--classes", "cat; dog; cat"], "--classes: 'cat' is given twice"),
    (["--classes", "background; cat"], "--classes: 'background' is the background class"),
    (["--classes-file", "missing.txt"], "--classes-file missing.txt: cannot read it"),
    (["--classes", "cat", "--classes-file", "c.txt"], "--classes \"cat; grass, lawn\" or --classes-file"),
    (["--classes", "cat", "--background", "maybe"], "--background maybe: expected a score in [0, 1] or 'none'"),
    (["--classes", "cat", "--background", "1.5"], "--background 1.5"),
    (["--classes", "cat", "--dense", "sharp"], "--dense sharp: expected one of plain, maskclip, surgery"),
    (["--classes", "cat", "--templates", "fancy"], "--templates fancy: expected one of simple, tcl"),
    (["--classes", "cat", "--batch-size", "0"], "--batch-size must be at least 1"),
    (["--classes", "cat", "--device", "tpu:x"], "--device tpu:x"),
    (["--classes", "cat", "--ckpt", "nowhere.pt"], "checkpoint nowhere.pt does not exist"),
    (["--classes", "cat", "--clip", "nowhere.pt"], "--clip nowhere.pt: no such file"),
    (["--classes", "cat", "missing.png"], "PHOTOS: missing.png: no such file or folder"),
    (["--classes", "cat", "shots/*.jpg"], "PHOTOS: shots/*.jpg: matches no file"),
])
def test_bad_input_gives_one_line_and_writes_nothing(ckpt, tmp_path, monkeypatch, flags, message):
    monkeypatch.chdir(tmp_path)
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save("a.png")
    Path("c.txt").write_text("# only a comment\n")
    model = [] if "--ckpt" in flags or "--clip" in flags else ["--ckpt", ckpt]
    photos = [] if message.startswith("PHOTOS") else ["a.png"]
    with pytest.raises(SystemExit) as e:
        segment_cli(*photos, *model, *flags, "--out", "out")
    line = str(e.value.code)
    assert line.startswith("error: ") and message in line and "\n" not in line, line
    assert not Path("out").exists()


def test_a_classes_file(ckpt, tmp_path):
    f = tmp_path / "classes.txt"
    f.write_text("# what to look for\ncircle   # the shape\ngrass, lawn\n\nred ring\n")
    r = segment_cli("--demo", 1, "--ckpt", ckpt, "--classes-file", f, "--out", tmp_path / "out")
    assert r["classes"] == ["circle", "grass, lawn", "red ring"]
    with pytest.raises(SystemExit, match="error: --classes-file .*: no class names"):
        f.write_text("# nothing\n\n")
        segment_cli("--demo", 1, "--ckpt", ckpt, "--classes-file", f, "--out", tmp_path / "none")
