"""Tests for eval_seg.py: the mmseg metric, the readers on tiny trees in each benchmark's exact
layout, the protocol's geometry, background, templates, PAMR, and the CLI, without real data."""
import dataclasses
import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

import eval_seg as E
from _planted import Planted

# ----------------------------------------------------------------------------- metric
def ref_metric(preds, labels, C, ignore=255):
    """Independent reference: one (C+1) x (C+1) confusion matrix over non-ignored pixels, row =
    label, column = prediction, index C collecting every out-of-range value."""
    cm = np.zeros((C + 1, C + 1), np.int64)
    for p, l in zip(preds, labels):
        p, l = np.asarray(p).ravel().astype(np.int64), np.asarray(l).ravel().astype(np.int64)
        keep = l != ignore
        p, l = p[keep], l[keep]
        p[(p < 0) | (p >= C)] = C
        l[(l < 0) | (l >= C)] = C
        np.add.at(cm, (l, p), 1)
    inter = np.diag(cm)[:C].astype(float)
    area_pred = cm[:, :C].sum(0).astype(float)  # out-of-range labels still count predictions
    area_label = cm[:C, :].sum(1).astype(float)
    union = area_pred + area_label - inter
    with np.errstate(invalid="ignore", divide="ignore"):
        iou, acc = inter / union * 100, inter / area_label * 100
    return iou, acc, inter.sum() / area_label.sum() * 100


def test_metric_matches_confusion_matrix_reference():
    rng = np.random.default_rng(1)
    C, m = 7, E.IoU(7)
    preds, labels = [], []
    for shape in [(13, 17), (5, 31), (1, 1), (40, 3)]:
        label = rng.integers(0, C - 1, shape)  # class C-1 never labelled
        label[rng.random(shape) < 0.2] = 255
        label[rng.random(shape) < 0.05] = 9  # out-of-range label that is not ignored
        pred = rng.integers(-1, C + 2, shape)  # out-of-range predictions on both sides
        pred[rng.random(shape) < 0.1] = 255
        m.update(pred, torch.from_numpy(label) if shape == (5, 31) else label)
        preds.append(pred)
        labels.append(label)
    r = m.compute()
    iou, acc, aacc = ref_metric(preds, labels, C)
    np.testing.assert_allclose(r["IoU"], iou, equal_nan=True)
    np.testing.assert_allclose(r["Acc"], acc, equal_nan=True)
    assert r["IoU"][C - 1] == 0.0  # predicted, never labelled: 0 and counted
    assert r["mIoU"] == pytest.approx(np.nanmean(iou)) and r["aAcc"] == pytest.approx(aacc)
    assert r["mAcc"] == pytest.approx(np.nanmean(acc))


def test_metric_absent_class_nan_and_out_of_range_prediction():
    m = E.IoU(4)
    label = np.array([[0, 0, 1, 255]])
    m.update(np.array([[0, 2, 7, 3]]), label)  # 7: a miss with no false positive; 3 on ignore
    r = m.compute()
    # class 0: inter 1, union 2; class 1: 0/1; class 2: predicted, absent -> 0; class 3: NaN
    assert r["IoU"][:3] == [50.0, 0.0, 0.0] and math.isnan(r["IoU"][3])
    assert r["mIoU"] == pytest.approx(50 / 3)
    assert r["aAcc"] == pytest.approx(100 / 3) and r["mAcc"] == pytest.approx(25.0)


def test_metric_reduce_zero_label():
    rng = np.random.default_rng(2)
    raw = rng.integers(0, 6, (20, 20)).astype(np.uint8)
    raw[:2] = 255
    pred = rng.integers(0, 5, (20, 20))
    shifted = np.where((raw == 0) | (raw == 255), 255, raw.astype(int) - 1)
    a, b = E.IoU(5, reduce_zero_label=True), E.IoU(5)
    a.update(pred, raw)
    b.update(pred, shifted)
    assert a.compute() == b.compute()
    np.testing.assert_array_equal(E.reduce_zero(np.array([0, 1, 5, 255])), [255, 0, 4, 255])

# ----------------------------------------------------------------------------- fixture trees
# Raw label ids drawn in the fixtures; the image's colour encodes the raw id (one pure channel
# each, so the 25/75 blends of a 2x bilinear resize stay nearest to the majority colour), so an
# oracle model can read the ground truth back from the pixels.
RAW = {"voc": (0, 15, 8), "voc20": (0, 15, 8), "context": (0, 5, 59), "context59": (0, 5, 59),
       "coco-object": (0, 1, 80), "imagenets50": (0, 7, 50), "imagenets300": (0, 120, 300),
       "coco-stuff": (0, 100, 170), "cityscapes": (0, 10, 18), "ade20k": (0, 1, 150)}
IGNORE = {"imagenets50": 1000, "imagenets300": 1000}  # raw ignore value; 255 elsewhere
COLORS = ((200, 0, 0), (0, 200, 0), (0, 0, 200))
IGNORE_COLOR = (200, 200, 200)
IDS = {"voc": ["2007_000033", "2007_000042", "2008_000002"], "cityscapes":
       ["aachen_000000_000019", "aachen_000001_000019", "bonn_000000_000019"]}


def paint(name, label):
    """The image whose colours encode the raw label: COLORS for the three raw ids, grey elsewhere."""
    lut = np.tile(np.array(IGNORE_COLOR, np.uint8), (1001, 1))
    lut[list(RAW[name])] = COLORS
    return lut[label]


def draw(name, i, h=32, w=48):
    """(image uint8 (h, w, 3), raw label (h, w)): blocks of the three raw ids and an ignore patch."""
    r0, r1, r2 = RAW[name]
    s = h / 32
    label = np.full((h, w), r0, np.int64)
    y = lambda v: int(v * s)  # noqa: E731  (block corners scale with the image)
    label[y(4 + i):y(20 + i), y(6):y(30)] = r1
    label[y(18):y(30), y(28 - 2 * i):y(44)] = r2
    label[:y(3), :y(5)] = IGNORE.get(name, 255)
    return paint(name, label), label


def rgb_label(label):
    """ImageNet-S's encoding: class k as the colour (k % 256, k // 256, 0), so k = R + 256 G."""
    return np.stack([label % 256, label // 256, np.zeros_like(label)], -1).astype(np.uint8)


def voc_palette():
    p = np.zeros((256, 3), np.uint8)
    for k in range(256):  # the usual VOC bit-interleaved colour map
        c = k
        for j in range(8):
            p[k] |= np.array([(c >> 0) & 1, (c >> 1) & 1, (c >> 2) & 1], np.uint8) << (7 - j)
            c >>= 3
    return p


# name -> (folder under the data root, image path, label paths, split file); {id}, {city} filled
# per image. COCO keeps both label files of an image side by side: the first is the benchmark's,
# the second a decoy the reader must not pick.
VOC_LAYOUT = ("VOC2012", "JPEGImages/{id}.jpg", ["SegmentationClass/{id}.png"],
              "ImageSets/Segmentation/val.txt")
CONTEXT_LAYOUT = ("VOC2010", "JPEGImages/{id}.jpg", ["SegmentationClassContext/{id}.png"],
                  "ImageSets/SegmentationContext/val.txt")
COCO_LABELS = ["annotations/val2017/{id}_labelTrainIds.png", "annotations/val2017/{id}_instanceTrainIds.png"]
IMAGENET_S = ("validation/{wnid}/{id}.JPEG", ["validation-segmentation/{wnid}/{id}.png"], None)
LAYOUT = {
    "voc": VOC_LAYOUT, "voc20": VOC_LAYOUT, "context": CONTEXT_LAYOUT, "context59": CONTEXT_LAYOUT,
    "coco-stuff": ("coco_stuff164k", "images/val2017/{id}.jpg", COCO_LABELS, None),
    "coco-object": ("coco_stuff164k", "images/val2017/{id}.jpg", COCO_LABELS[::-1], None),
    "imagenets50": ("ImageNetS50",) + IMAGENET_S, "imagenets300": ("ImageNetS300",) + IMAGENET_S,
    "cityscapes": ("cityscapes", "leftImg8bit/val/{city}/{id}_leftImg8bit.png",
                   ["gtFine/val/{city}/{id}_gtFine_labelTrainIds.png"], None),
    "ade20k": ("ADEChallengeData2016", "images/validation/{id}.jpg", ["annotations/validation/{id}.png"], None),
}


def image_ids(name, n):
    if name.startswith("coco"):
        return [f"{i:012d}" for i in range(n)]
    if name == "ade20k":
        return [f"ADE_val_{i + 1:08d}" for i in range(n)]
    if name.startswith("imagenets"):
        return [f"ILSVRC2012_val_{7 * i + 3:08d}" for i in range(n)]
    return IDS["cityscapes" if name == "cityscapes" else "voc"][:n]


def write_tree(root, name, n=3, size=(32, 48)):
    """n images in `name`'s on-disk layout under root; returns [(image, raw label, id)]."""
    folder, image_fmt, label_fmts, split = LAYOUT[name]
    out = []
    for i, image_id in enumerate(image_ids(name, n)):
        image, label = draw(name, i, *size)
        wnid = ("n01443537", "n01491361")[i // 2]  # ImageNet-S: class folders
        fill = {"id": image_id, "city": image_id.split("_")[0], "wnid": wnid}
        paths = [root / folder / f.format(**fill) for f in [image_fmt] + label_fmts]
        for p in paths:
            p.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(paths[0], quality=100, subsampling=0)  # JPEG options, PNG ignores
        decoy = np.where(label == 255, 255, 77).astype(np.uint8)
        for p, lab in zip(paths[1:], [label, decoy]):
            if folder.startswith("ImageNetS"):  # RGB labels: class = R + 256 G
                Image.fromarray(rgb_label(lab)).save(p)
                continue
            im = Image.fromarray(lab.astype(np.uint8), mode="L")
            if folder == "VOC2012":  # VOC ground truth is a palette PNG: indices, not colours
                im = im.convert("P")
                im.putpalette(voc_palette().ravel().tolist())
            im.save(p)
        out.append((image, label, image_id))
    if split:
        (root / folder / split).parent.mkdir(parents=True, exist_ok=True)
        (root / folder / split).write_text("".join(f"{x[2]}\n" for x in out))
    return out


@pytest.mark.parametrize("name", list(E.BENCHMARKS))
def test_reader_on_fixture_tree(tmp_path, name, capsys):
    written = write_tree(tmp_path, name)
    bench = E.load_benchmark(name, tmp_path)
    n_cls = {"voc": 21, "voc20": 20, "context": 60, "context59": 59, "coco-object": 81,
             "imagenets50": 51, "imagenets300": 301, "coco-stuff": 171, "cityscapes": 19,
             "ade20k": 150}[name]
    assert len(bench.classes) == n_cls and len(bench) == 3
    assert bench.reduce_zero_label == (name in ("voc20", "context59", "ade20k"))
    assert bench.background == (name in ("voc", "context", "coco-object", "imagenets50", "imagenets300"))
    assert bench.ignore_index == IGNORE.get(name, 255)
    for (image, label, image_id), (img2, lab2, id2) in zip(written, [bench[i] for i in range(3)]):
        assert id2 == image_id
        np.testing.assert_array_equal(lab2, label)  # palette PNGs as indices, RGB ones as R + 256 G
        assert img2.shape == image.shape and img2.dtype == np.uint8
        assert np.abs(img2.astype(int) - image).max() <= 4  # JPEG at quality 100
    assert "standard val split has" in capsys.readouterr().out  # 3 images is not the val split


def test_class_lists_spot_checks():
    assert E.CONTEXT[1:] == sorted(E.CONTEXT[1:])  # mmseg 1.x: alphabetical after background
    assert E.ADE20K[7] == "bed" and E.ADE20K[-1] == "flag" and E.COCO_STUFF[80] == "banner"
    assert E.COCO_OBJECT[-1] == "toothbrush" and E.CITYSCAPES[-1] == "bicycle"
    # ImageNet-S (mmseg's ImageNetSDataset, "others" renamed "background" as in TagAlign's copy)
    s50, s300 = E.IMAGENET_S50, E.IMAGENET_S300
    assert len(s50) == 51 and len(set(s50)) == 51 and len(s300) == 301 and len(set(s300)) == 301
    assert s50[:2] == ["background", "goldfish"] and s50[25] == "clog" and s50[-1] == "agaric"
    assert s300[:2] == ["background", "tench"] and s300[-1] == "bolete"
    assert s300[56] == "staffordshire bullterrier"  # one name split over two lines in mmseg
    assert s300[147] == "carpenter's kit" and s300[150] == "chain saw" and s300[260] == "trimaran"
    rest = iter(s300[1:])
    assert all(c in rest for c in s50[1:])  # both in wnid order: S50 is a subsequence of S300


def test_reader_errors(tmp_path):
    with pytest.raises(SystemExit, match="ADEChallengeData2016"):
        E.load_benchmark("ade20k", tmp_path)
    with pytest.raises(SystemExit, match="needs --data-root"):
        E.load_benchmark("voc", None)
    write_tree(tmp_path, "ade20k")
    (tmp_path / "ADEChallengeData2016/annotations/validation/ADE_val_00000002.png").unlink()
    with pytest.raises(SystemExit, match=r"annotations/validation: 2 '\*.png' files for 3 images"):
        E.load_benchmark("ade20k", tmp_path)
    write_tree(tmp_path, "voc")
    (tmp_path / "VOC2012/SegmentationClass/2008_000002.png").unlink()
    with pytest.raises(SystemExit, match=r"SegmentationClass: 1 of 3 files missing \(first: 2008_000002"):
        E.load_benchmark("voc", tmp_path)
    Image.new("RGB", (4, 4)).save(tmp_path / "rgb.png")
    with pytest.raises(SystemExit, match="rgb.png: mode RGB"):
        E.read_label(tmp_path / "rgb.png")
    with pytest.raises(SystemExit, match="unknown benchmark 'vocc'"):
        E.parse_names("voc,vocc")
    assert E.parse_names("ade20k,voc") == ["voc", "ade20k"]  # the paper's column order
    assert E.parse_names("all") == list(E.BENCHMARKS) == [
        "voc", "context", "coco-object", "imagenets50", "imagenets300",
        "voc20", "context59", "coco-stuff", "cityscapes", "ade20k"]
    assert E.parse_names("ADE20K,imagenets300,voc") == ["voc", "imagenets300", "ade20k"]


def test_imagenet_s_label_decoding(tmp_path):
    # Colours written by hand: (R, G, B) -> R + 256 G (the dataset's README); blue is not read.
    pixels = np.array([[[0, 0, 0], [7, 0, 0], [255, 0, 0]],
                       [[0, 1, 0], [44, 1, 9], [232, 3, 0]]], np.uint8)
    Image.fromarray(pixels).save(tmp_path / "hand.png")
    assert E.read_rgb_label(tmp_path / "hand.png").tolist() == [[0, 7, 255], [256, 300, 1000]]
    values = np.array([[0, 1, 50, 255], [256, 300, 919, 1000]])
    Image.fromarray(rgb_label(values)).save(tmp_path / "label.png")
    assert np.asarray(Image.open(tmp_path / "label.png"))[1, 1].tolist() == [44, 1, 0]  # 300 = 44 + 256
    label = E.read_rgb_label(tmp_path / "label.png")
    assert label.dtype == np.int64 and label.tolist() == values.tolist()
    Image.fromarray(values.astype(np.uint8), mode="L").save(tmp_path / "gray.png")
    with pytest.raises(SystemExit, match="gray.png: mode L, expected an RGB label PNG"):
        E.read_rgb_label(tmp_path / "gray.png")
    # The reader and the metric: 1000 is ignored, 0 is a class (background), nothing else moves.
    write_tree(tmp_path, "imagenets300")
    bench = E.load_benchmark("imagenets300", tmp_path)
    _, label, _ = bench[0]
    assert set(np.unique(label)) == {0, 120, 300, 1000}
    m = E.IoU(len(bench.classes), bench.ignore_index)
    m.update(np.where(label == 1000, 5, label), label)  # wrong only where ignored
    r = m.compute()
    assert r["mIoU"] == 100.0 and math.isnan(r["IoU"][5])


def test_imagenet_s_downsampling_rule():
    """mmseg's LoadImageNetSImageFromFile: more than 1000 x 1000 pixels (the area decides) ->
    long side 1000, short side int(1000 * short / long), bilinear; otherwise untouched."""
    want = {(502, 2000): (251, 1000), (2000, 502): (1000, 251), (1001, 1000): (1000, 999),
            (1000, 1001): (999, 1000), (1000, 1000): (1000, 1000), (800, 1250): (800, 1250),
            (480, 2080): (480, 2080), (1003, 1003): (1000, 1000)}
    for shape, out in want.items():
        image = np.zeros(shape + (3,), np.uint8)
        assert E.downsample_large(image).shape == out + (3,), shape
    rng = np.random.default_rng(4)
    image = rng.integers(0, 256, (1200, 900, 3)).astype(np.uint8)  # -> (1000, 750)
    small = E.downsample_large(image)
    assert small.shape == (1000, 750, 3) and small.dtype == np.uint8
    np.testing.assert_array_equal(small, E.resize_uint8_linear(image, (1000, 750)))  # cv2's path
    ref = np.clip(np.round(ref_resize(image.astype(float), 1000, 750)), 0, 255)
    assert np.abs(small.astype(float) - ref).max() <= 1  # fixed point vs float: one level at most

# ----------------------------------------------------------------------------- models
class Oracle:
    """Returns the one-hot ground truth: reads each pixel's colour (undoing the protocol's
    normalisation), maps the nearest known colour to a class name, and embeds names as one-hot
    vectors; background (name None) embeds to zero, so every class scores sigmoid(-2.5) < 0.4."""

    def __init__(self, color_to_name, vocab, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225),
                 templates=tuple(E.TEMPLATES["simple"])):
        self.vocab = list(vocab)
        self.text = {t.format(n): k for k, n in enumerate(self.vocab) for t in templates}
        self.colors = torch.tensor(list(color_to_name), dtype=torch.float)  # (K, 3)
        table = torch.zeros(len(self.colors), len(self.vocab))
        for k, n in enumerate(color_to_name.values()):
            if n is not None:
                table[k, self.vocab.index(n)] = 1
        self.table = table
        self.mean, self.std = torch.tensor(mean) * 255, torch.tensor(std) * 255
        self.calls = 0

    def encode_text(self, texts):
        return torch.eye(len(self.vocab))[[self.text[t] for t in texts]] * 3.0  # norm != 1 on purpose

    def encode_dense(self, x):  # (B, 3, H, W) -> (B, V, H, W)
        self.calls += 1
        v = x.permute(0, 2, 3, 1) * self.std + self.mean  # (B, H, W, 3) pixel values
        k = ((v[..., None, :] - self.colors) ** 2).sum(-1).argmin(-1)
        return self.table[k].permute(0, 3, 1, 2)


def oracle_for(name, cls=None, **kw):
    _, _, classes, rzl, bg, _ = E.BENCHMARKS[name]

    def class_name(raw):  # None: background (or ignored after reduce_zero_label)
        if raw == 0 and (bg or rzl):
            return None
        return classes[raw - 1] if rzl else classes[raw]

    names = {c: class_name(raw) for c, raw in zip(COLORS, RAW[name])}
    names[IGNORE_COLOR] = names[COLORS[2]]  # ignore patches: anything
    return (cls or Oracle)(names, classes, **kw)


SMALL = dataclasses.replace(E.PRESETS["tcl"], short_side=64, window=48, stride=24)  # same code, tiny sizes


@pytest.mark.parametrize("name", list(E.BENCHMARKS))
def test_oracle_scores_100_through_the_protocol(tmp_path, name):
    write_tree(tmp_path, name)
    bench = E.load_benchmark(name, tmp_path)
    r = E.evaluate(oracle_for(name), bench, SMALL, name, batch_size=4)
    assert r["mIoU"] == 100.0 and r["aAcc"] == 100.0
    present = sum(not math.isnan(v) for v in r["IoU"])
    assert present == (2 if name in ("voc20", "context59", "ade20k") else 3)
    assert r["crops"] == 3 * 6  # 64 x 96, window 48, stride 24: 2 rows x 3 columns


def test_oracle_scores_100_with_published_preset(tmp_path):
    write_tree(tmp_path, "voc", size=(224, 300))  # resized x2 to 448 x 600: two 448 windows
    bench = E.load_benchmark("voc", tmp_path)
    model = oracle_for("voc")
    r = E.evaluate(model, bench, E.PRESETS["tcl"], "voc", batch_size=16)
    assert r["mIoU"] == 100.0 and r["crops"] == 6
    assert model.calls == 1  # all six crops (three images, same size) in one batch


def test_imagenet_s_large_image_predicted_small_scored_at_label_size(tmp_path):
    """A 502 x 2000 image (over 1000^2 pixels) is read at 251 x 1000 while its label stays
    502 x 2000: the oracle predicts at the image's size and the nearest resize back to the label
    (mmseg's ImageNetSDataset.pre_eval) scores 100. Blocks sit on even pixels, so the exact 2x
    resizes both ways add no error of their own."""
    label = np.zeros((502, 2000), np.int64)
    label[100:300, 400:1200] = 7
    label[300:, 1500:] = 50
    label[:40, :60] = 1000
    image_path = tmp_path / "ImageNetS50/validation/n01443537/ILSVRC2012_val_00000001.JPEG"
    label_path = tmp_path / "ImageNetS50/validation-segmentation/n01443537/ILSVRC2012_val_00000001.png"
    for p in (image_path, label_path):
        p.parent.mkdir(parents=True)
    Image.fromarray(paint("imagenets50", label)).save(image_path, quality=100, subsampling=0)
    Image.fromarray(rgb_label(label)).save(label_path)
    bench = E.load_benchmark("imagenets50", tmp_path)
    image, got, image_id = bench[0]
    assert image.shape == (251, 1000, 3) and image_id == "ILSVRC2012_val_00000001"
    np.testing.assert_array_equal(got, label)  # full size, decoded exactly
    # One window, no resize: the oracle reads every pixel of the downsampled image as it is.
    protocol = dataclasses.replace(E.PRESETS["tcl"], short_side=None, window=None)
    r = E.evaluate(oracle_for("imagenets50"), bench, protocol, "imagenets50", n_vis=1,
                   vis_dir=tmp_path / "vis")
    assert r["mIoU"] == 100.0 and r["aAcc"] == 100.0 and r["crops"] == 1
    assert sum(not math.isnan(v) for v in r["IoU"]) == 3
    vis = np.asarray(Image.open(tmp_path / "vis/imagenets50_ILSVRC2012_val_00000001.png"))
    w, h = E.panel_size(502, 2000)  # panels from the label's size (the image's would be 2000 x 502)
    assert (w, h) == (1020, 256) and vis.shape[1] == 3 * w + 4 * 10


class SmallImageLargeLabel:
    """One 3 x 3 image with a 4 x 4 label, as ImageNet-S's downsampled images have: the label is
    the image's classes resized with cv2.INTER_NEAREST (rows and columns 0, 0, 1, 2). Bilinear
    scores resized to 4 x 4 would give rows 0, 1, 1, 2 instead."""
    classes, background, reduce_zero_label = E.IMAGENET_S50, True, False
    ignore_index, large_side = 1000, 1000

    def __len__(self):
        return 1

    def __getitem__(self, i):
        small = np.array([[0, 7, 50], [7, 50, 0], [50, 0, 7]])
        label = np.array([[0, 0, 7, 50], [0, 0, 7, 50], [7, 7, 50, 0], [50, 50, 0, 7]])
        return paint("imagenets50", small), label, "small"


def test_prediction_resized_to_the_label_nearest():
    protocol = dataclasses.replace(E.PRESETS["tcl"], short_side=None, window=None)
    r = E.evaluate(oracle_for("imagenets50"), SmallImageLargeLabel(), protocol, "imagenets50")
    assert r["mIoU"] == 100.0
    bench = SmallImageLargeLabel()
    bench.large_side = None  # a benchmark that does not downsample: a size mismatch is an error
    with pytest.raises(ValueError, match=r"label \(4, 4\) vs image \(3, 3, 3\)"):
        E.evaluate(oracle_for("imagenets50"), bench, protocol, "imagenets50")


class NoisyOracle(Oracle):
    """The oracle with salt noise: a random 60% of each crop's pixels embed a random class."""

    def encode_dense(self, x):
        f = super().encode_dense(x)
        g = torch.Generator().manual_seed(self.calls)
        flip = torch.rand(f.shape[0], 1, *f.shape[2:], generator=g) < 0.6
        noise = self.table[torch.randint(len(self.table), f.shape[2:], generator=g)].permute(2, 0, 1)
        return torch.where(flip, noise, f)


def test_pamr_in_the_protocol_removes_noise(tmp_path):
    write_tree(tmp_path, "voc20")
    bench = E.load_benchmark("voc20", tmp_path)
    plain = E.evaluate(oracle_for("voc20", NoisyOracle), bench, SMALL, "voc20")
    pamr = dataclasses.replace(SMALL, pamr=True)
    refined = E.evaluate(oracle_for("voc20", NoisyOracle), bench, pamr, "voc20")
    assert plain["mIoU"] < 85 and refined["mIoU"] > plain["mIoU"] + 3  # measured: 77.1 -> 86.4


def test_constant_predictor_closed_form(tmp_path):
    written = write_tree(tmp_path, "coco-stuff")
    bench = E.load_benchmark("coco-stuff", tmp_path)
    k = RAW["coco-stuff"][1]
    model = Oracle({c: E.COCO_STUFF[k] for c in COLORS + (IGNORE_COLOR,)}, E.COCO_STUFF)
    r = E.evaluate(model, bench, SMALL, "coco-stuff")
    labels = np.concatenate([lab.ravel() for _, lab, _ in written])
    valid = labels != 255
    frac = (labels[valid] == k).mean() * 100
    assert r["IoU"][k] == pytest.approx(frac) and r["aAcc"] == pytest.approx(frac)
    assert [r["IoU"][c] for c in RAW["coco-stuff"] if c != k] == [0.0, 0.0]
    assert r["mIoU"] == pytest.approx(frac / 3) and r["mAcc"] == pytest.approx(100 / 3)
    # Background benchmark, a model that matches no class: everything is background.
    written = write_tree(tmp_path, "voc")
    model = Oracle({c: None for c in COLORS + (IGNORE_COLOR,)}, E.VOC)
    r = E.evaluate(model, E.load_benchmark("voc", tmp_path), SMALL, "voc")
    labels = np.concatenate([lab.ravel() for _, lab, _ in written])
    frac = (labels[labels != 255] == 0).mean() * 100
    assert r["IoU"][0] == pytest.approx(frac) and r["mIoU"] == pytest.approx(frac / 3)

# ----------------------------------------------------------------------------- geometry
def test_resize_rule():
    assert E.resized_shape(375, 500) == (448, 597)  # VOC's usual size
    assert E.resized_shape(500, 375) == (597, 448)
    assert E.resized_shape(1024, 2048) == (448, 896)  # Cityscapes
    assert E.resized_shape(100, 2000) == (102, 2048)  # long side capped: short side < 448
    assert E.resized_shape(32, 48, 64) == (64, 96)  # small images are upscaled
    assert E.resized_shape(333, 500) == (448, int(500 * 448 / 333 + 0.5))
    assert E.resized_shape(256, 262) == (448, 459)  # 458.5 rounds up (Python's round gives 458)


def ref_resize(a, out_h, out_w):
    """Independent numpy bilinear with half-pixel centres, edges clamped (cv2.INTER_LINEAR)."""
    def taps(n_in, n_out):
        src = np.maximum((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0)
        i0 = np.minimum(np.floor(src).astype(int), n_in - 1)
        return i0, np.minimum(i0 + 1, n_in - 1), src - i0
    y0, y1, wy = taps(a.shape[0], out_h)
    x0, x1, wx = taps(a.shape[1], out_w)
    rows = a[y0] * (1 - wy)[:, None, None] + a[y1] * wy[:, None, None]
    return rows[:, x0] * (1 - wx)[None, :, None] + rows[:, x1] * wx[None, :, None]


def test_resizes_match_half_pixel_bilinear():
    rng = np.random.default_rng(3)
    image = rng.integers(0, 256, (30, 41, 3)).astype(np.uint8)
    protocol = dataclasses.replace(E.PRESETS["tcl"], short_side=64, mean=(0, 0, 0), std=(1 / 255,) * 3)
    x = E.preprocess(image, protocol, "cpu")  # (1, 3, 64, 87): scale 64/30, not an integer
    assert x.shape == (1, 3, 64, 87)
    got = x[0].permute(1, 2, 0).numpy()
    # the resize is cv2's 8-bit one (atol: std * 255 is 1 up to float32 rounding)
    np.testing.assert_allclose(got, E.resize_uint8_linear(image, (64, 87)), atol=1e-3)
    want = np.clip(np.round(ref_resize(image.astype(float), 64, 87)), 0, 255)
    assert np.abs(got - want).max() <= 1  # OpenCV's fixed point vs float: one grey level at most
    scores = torch.from_numpy(rng.random((1, 5, 64, 87)))  # and back to the original size
    back = E.resize_bilinear(scores, (30, 41))[0].permute(1, 2, 0).numpy()
    np.testing.assert_allclose(back, ref_resize(scores[0].permute(1, 2, 0).numpy(), 30, 41), atol=1e-12)


# A 3 x 5 image resized by hand with OpenCV's 8-bit INTER_LINEAR (resize.cpp), to check the
# implementation against numbers that do not come from it.
# Columns 5 -> 7: scale 5/7, f = (k + 0.5) * 5/7 - 0.5 = -1/7, 4/7, 9/7, 2, 19/7, 24/7, 29/7;
# k = 0 and 6 fall off the image and take the edge pixel (weights 2048, 0); the others take
# round((1 - frac) * 2048), round(frac * 2048) with frac in sevenths (2048/7 = 292.57):
#   k:      0        1          2          3        4          5          6
#   taps:   0,1      0,1        1,2        2,3      2,3        3,4        4,4
#   w:      2048,0   878,1170   1463,585   2048,0   585,1463   1170,878   2048,0
# Row 0 (10 50 200 30 255), horizontal sums S, then S >> 4:
#   20480 67280 190150 409600 160890 258990 522240 -> 1280 4205 11884 25600 10055 16186 32640
# Row 1 (0 100 20 220 90): 0 117000 158000 40960 333560 336420 184320
#                       -> 0 7312 9875 2560 20847 21026 11520
# Row 2 (255 7 64 128 33): 522240 232080 47681 131072 224704 178734 67584
#                       -> 32640 14505 2980 8192 14044 11170 4224
# Rows 3 -> 2: scale 1.5, f = 0.25, 1.75: rows (0, 1) with weights (1536, 512), rows (1, 2) with
# (512, 1536). out = ((b0 * S0 >> 16) + (b1 * S1 >> 16) + 2) >> 2, e.g. column 4 of output row 0:
# 1536 * 10055 >> 16 = 235, 512 * 20847 >> 16 = 162, (397 + 2) >> 2 = 99, where float bilinear
# gives 99.64 -> 100 (and column 5 of row 1: 164 + 261 -> 106, float 106.52 -> 107).
# Rows 3 -> 4 (upscaling): scale 0.75, f = -0.125, 0.625, 1.375, 2.125. Rows keep their fraction
# and clip their indices, so output row 0 reads row 0 twice with weights (256, 1792):
# (256 * 10055 >> 16) + (1792 * 10055 >> 16) = 39 + 274 -> (313 + 2) >> 2 = 78 (float: 78.56 -> 79);
# then rows (0, 1) with (768, 1280), rows (1, 2) with (1280, 768), row 2 twice with (1792, 256).
HAND_IMAGE = np.array([[10, 50, 200, 30, 255], [0, 100, 20, 220, 90], [255, 7, 64, 128, 33]],
                      np.uint8)
HAND_DOWN = [[8, 39, 89, 155, 99, 136, 214], [191, 99, 37, 53, 123, 106, 47]]  # (2, 7)
HAND_UP = [[10, 33, 93, 200, 78, 126, 255], [4, 48, 83, 88, 131, 150, 152],  # (4, 7)
           [96, 78, 57, 37, 143, 135, 69], [255, 113, 23, 64, 110, 87, 33]]


def test_uint8_linear_by_hand():
    assert E.resize_uint8_linear(HAND_IMAGE, (2, 7)).tolist() == HAND_DOWN
    assert E.resize_uint8_linear(HAND_IMAGE, (4, 7)).tolist() == HAND_UP
    # channels are independent: a (H, W, C) image gives each channel's own result
    rgb = np.stack([HAND_IMAGE, 255 - HAND_IMAGE, HAND_IMAGE[:, ::-1]], -1)
    out = E.resize_uint8_linear(rgb, (4, 7))
    assert out.shape == (4, 7, 3) and out.dtype == np.uint8
    assert out[..., 0].tolist() == HAND_UP
    np.testing.assert_array_equal(out[..., 1], E.resize_uint8_linear(255 - HAND_IMAGE, (4, 7)))
    # float bilinear + rounding misses by one on these pixels
    fl = E.resize_bilinear(torch.from_numpy(HAND_IMAGE)[None, None].float(), (4, 7)).round()[0, 0]
    assert (fl.numpy() != np.array(HAND_UP)).sum() == 2


def test_uint8_linear_edges_and_exact_factors():
    rng = np.random.default_rng(7)
    image = rng.integers(0, 256, (6, 10, 3)).astype(np.uint8)
    # exact 2x down: OpenCV sends it to INTER_AREA's fast path, the rounded mean of 2 x 2 blocks;
    # the fixed-point weights (1024, 1024) give the same numbers
    q = image.astype(int)
    mean = (q[0::2, 0::2] + q[0::2, 1::2] + q[1::2, 0::2] + q[1::2, 1::2] + 2) >> 2
    np.testing.assert_array_equal(E.resize_uint8_linear(image, (3, 5)), mean)
    # integer upscale: output column 3k + 1 sits on input column k exactly (weights 2048, 0)
    up = E.resize_uint8_linear(image, (18, 30))
    np.testing.assert_array_equal(up[1::3, 1::3], image)
    # a constant image stays constant, whatever the size, edges included
    flat = np.full((5, 7, 3), 173, np.uint8)
    for size in ((1, 1), (2, 13), (11, 3), (5, 8), (40, 41)):
        assert (E.resize_uint8_linear(flat, size) == 173).all(), size
    # one pixel or one row in, and the same size returned as it is
    assert (E.resize_uint8_linear(image[:1, :1], (3, 4)) == image[0, 0]).all()
    np.testing.assert_array_equal(E.resize_uint8_linear(image[:1], (2, 10)), image[[0, 0]])
    assert E.resize_uint8_linear(image, (6, 10)) is image
    with pytest.raises(ValueError, match="uint8"):
        E.resize_uint8_linear(image.astype(np.float32), (3, 5))


def test_uint8_linear_is_opencvs():
    """Bit for bit against cv2.resize(INTER_LINEAR), where OpenCV is installed (it is not a
    requirement): random sizes both ways, odd and prime sides, exact 2x, 1 to 4 channels, and
    the protocol's own sizes."""
    cv2 = pytest.importorskip("cv2")
    rng = np.random.default_rng(11)
    cases = [((375, 500, 3), E.resized_shape(375, 500)), ((500, 375, 3), E.resized_shape(500, 375)),
             ((1200, 900, 3), (1000, 750)), ((64, 46, 3), (128, 92)), ((64, 46, 3), (32, 23)),
             ((1, 1, 1), (5, 3)), ((3, 5, 1), (2, 7)), ((97, 31, 4), (13, 211))]
    for _ in range(300):
        H, W = rng.integers(1, 60, 2)
        h, w = rng.integers(1, 120, 2)
        cases.append(((H, W, int(rng.choice([1, 2, 3, 4]))), (h, w)))
    for shape, (h, w) in cases:
        image = rng.integers(0, 256, shape).astype(np.uint8)
        if rng.random() < 0.3:  # hard edges: the extremes 0 and 255 side by side
            image = np.where(image > 127, 255, 0).astype(np.uint8)
        want = cv2.resize(image, (int(w), int(h)), interpolation=cv2.INTER_LINEAR).reshape(h, w, -1)
        got = E.resize_uint8_linear(image, (h, w)).reshape(h, w, -1)
        bad = got != want
        assert not bad.any(), (f"{shape} -> {(h, w)} (cv2 {cv2.__version__}): {bad.sum()} values "
                               f"differ, first at {np.argwhere(bad)[0].tolist()}")


def test_resize_nearest_is_opencvs():
    """cv2.INTER_NEAREST: output i <- input min(floor(i * n_in / n_out), n_in - 1)."""
    a = np.arange(3)[:, None] * 10 + np.arange(4)  # (3, 4)
    up = E.resize_nearest(a, (7, 9))
    assert up[:, 0].tolist() == [0, 0, 0, 10, 10, 20, 20]  # floor(i * 3/7)
    assert up[0].tolist() == [0, 0, 0, 1, 1, 2, 2, 3, 3]  # floor(i * 4/9)
    assert E.resize_nearest(a, (2, 2)).tolist() == [[0, 2], [10, 12]]  # floor(i * 1.5), floor(i * 2)
    np.testing.assert_array_equal(E.resize_nearest(a, (6, 8)), a.repeat(2, 0).repeat(2, 1))
    assert E.resize_nearest(a, (3, 4)) is a
    rgb = np.zeros((2, 3, 3), np.uint8)
    assert E.resize_nearest(rgb, (4, 6)).shape == (4, 6, 3)  # trailing channels ride along


def test_window_grid():
    assert E.window_grid(448, 597, 448, 224) == [(0, 448, 0, 448), (0, 448, 149, 597)]
    assert E.window_grid(448, 448, 448, 224) == [(0, 448, 0, 448)]
    assert [b[2] for b in E.window_grid(448, 896, 448, 224)] == [0, 224, 448]
    boxes = E.window_grid(102, 2048, 448, 224)  # shorter than the window: crops 102 x 448
    assert len(boxes) == 9 and boxes[-1] == (0, 102, 1600, 2048) and boxes[-2][2] == 1568
    assert E.window_grid(100, 200, 448, 224) == [(0, 100, 0, 200)]
    assert E.window_grid(64, 96, 48, 24) == [(y, y + 48, x, x + 48) for y in (0, 16) for x in (0, 24, 48)]
    assert E.window_grid(30, 40, None, 224) == [(0, 30, 0, 40)]


def test_stitching_is_exact_with_an_analytic_model():
    H, W = 448, 597
    ys, xs = torch.meshgrid(torch.arange(H).float(), torch.arange(W).float(), indexing="ij")
    x = torch.stack([xs, ys, xs * 0.5 - ys * 2 + 3])[None].repeat(2, 1, 1, 1)
    x[1, 2] += 1  # the two images differ

    def crop_scores(c):  # logits linear in pixel coordinates, plus the crop's left edge x1
        x1 = c[:, 0, :1, :1].expand(-1, c.shape[2], c.shape[3])
        return torch.stack([c[:, 0], c[:, 1], c[:, 2], x1], 1)

    for bs in (1, 3, 16):
        out = E.slide_inference(x, crop_scores, 4, 448, 224, bs)
        assert torch.equal(out[:, :3], x)  # every crop placed where it came from
        # averaging: windows at x1 = 0 and 149 overlap on [149, 448)
        want = torch.where(xs < 149, 0.0, torch.where(xs < 448, 74.5, 149.0))
        assert torch.equal(out[0, 3], want) and torch.equal(out[1, 3], want)

# ----------------------------------------------------------------------------- background, text, PAMR
def test_background_threshold_on_sigmoid_scores():
    # cos to class "a" per column; TagAlign's score sigmoid(10 cos - 2.5) passes 0.4 at
    # cos* = (log(0.4 / 0.6) + 2.5) / 10 = 0.2095.
    cos = torch.tensor([0.0, 0.1, 0.2, 0.205, 0.214, 0.3, 0.9])

    class Model:
        def encode_text(self, texts):
            return torch.eye(3)[:2][[("b" in t) * 1 for t in texts]]

        def encode_dense(self, x):  # (n, 3, h, w): embedding cos*e_a + sqrt(1-cos^2)*e_3
            c = cos.view(1, 1, -1).expand(x.shape[0], x.shape[2], -1)
            return torch.stack([c, torch.zeros_like(c), (1 - c ** 2).sqrt()], 1)

    text = E.text_embeddings(Model(), ["a", "b"], ("a photo of a {}.",))
    crops = torch.zeros(1, 3, 2, 7)
    s = E.crop_scorer(Model(), text, E.PRESETS["tcl"], True)(crops)
    assert s.shape == (1, 3, 2, 7) and torch.all(s[:, 0] == 0.4)
    assert s.argmax(1)[0, 0].tolist() == [0, 0, 0, 0, 1, 1, 1]
    s = E.crop_scorer(Model(), text, dataclasses.replace(E.PRESETS["tcl"], bg_thresh=0.9), True)(crops)
    assert s.argmax(1)[0, 0].tolist() == [0] * 6 + [1]  # 0.9 <=> cos* = 0.4697


def test_tagalign_blend_of_decoder_and_raw_clip_scores():
    """TagAlign's generate_masks: (1 - w) sigmoid(10 cos_decoder - 2.5) + w sigmoid(10 cos_clip -
    2.5) per class on the patch grid (w = clip_w = 0.3), then the background constant. The two
    paths see different cosines here, so a dropped or swapped path shows."""
    cos_dec, cos_clip = torch.tensor([0.9, 0.1, 0.3]), torch.tensor([0.0, 0.8, 0.3])

    def embed(c):  # (3,) cosines to class "a" -> (1, 3, 1, 3) unit embeddings
        return torch.stack([c, torch.zeros_like(c), (1 - c ** 2).sqrt()], 0)[None, :, None, :]

    class Model:
        clip_blend = True

        def encode_text(self, texts):
            return torch.eye(3)[:2][[("b" in t) * 1 for t in texts]]

        def encode_dense(self, x, with_clip=False):
            return (embed(cos_dec), embed(cos_clip)) if with_clip else embed(cos_dec)

    text = E.text_embeddings(Model(), ["a", "b"], ("a photo of a {}.",))
    s = E.crop_scorer(Model(), text, E.PRESETS["tcl"], True)(torch.zeros(1, 3, 1, 3))
    sig = lambda c: torch.sigmoid(10 * c - 2.5)  # noqa: E731
    torch.testing.assert_close(s[0, 1, 0], 0.7 * sig(cos_dec) + 0.3 * sig(cos_clip))
    torch.testing.assert_close(s[0, 2, 0], sig(torch.zeros(3)))  # class "b": cosine 0 on both paths
    assert torch.all(s[0, 0] == 0.4)
    assert E.effective_clip_w(Model(), E.PRESETS["tcl"]) == 0.3
    plain = E.crop_scorer(Model(), text, dataclasses.replace(E.PRESETS["tcl"], clip_w=0.0), True)
    torch.testing.assert_close(plain(torch.zeros(1, 3, 1, 3))[0, 1, 0], sig(cos_dec))
    Model.clip_blend = False  # a model without a raw CLIP path: nothing to blend
    assert E.effective_clip_w(Model(), E.PRESETS["tcl"]) == 0.0


def test_raw_clip_end_to_end_on_a_voc_tree(tmp_path):
    """`eval_seg.py --clip FILE --benchmarks voc --data-root ROOT` on a small OpenAI-format CLIP:
    the published protocol (448 resize, 448/224 windows) through raw CLIP, each reading."""
    from _clip import make_ref_clip, write_clip
    write_tree(tmp_path, "voc", n=2, size=(40, 60))
    clip = write_clip(make_ref_clip(vision_layers=8), tmp_path / "small.pt", "torchscript")
    miou = {}
    for reading in ("plain", "maskclip", "surgery"):
        m = E.main(["--clip", clip, "--dense", reading, "--benchmarks", "voc", "--data-root", str(tmp_path),
                    "--n-vis", "0", "--out", str(tmp_path / reading)])
        r = m["voc"]
        assert r["images"] == 2 and r["crops"] == 2 * 2 and 0 <= r["mIoU"] <= 100  # 448 x 672: two windows
        assert r["protocol"].clip_w == 0.0 and m["config"]["dense"] == "surgery"
        miou[reading] = r["mIoU"]
    assert miou["plain"] != miou["surgery"], miou  # the reading reached the model


def test_background_on_softmax_scores_is_relative():
    """The world preset: softmax over classes at the model's logit scale; the background (0.5)
    wins where no class holds the majority, however high the cosines are in absolute terms."""
    cos = torch.tensor([[0.5, 0.1, 0.1, 0.5], [0.5, 0.9, 0.1, 0.45], [0.5, 0.1, 0.1, 0.0]])  # 3 classes x 4 px

    class Model:
        logit_scale = 20.0

        def encode_text(self, texts):
            return torch.eye(4)[["abc".index(t) for t in texts]]

        def encode_dense(self, x):  # unit vectors: (cos_a, cos_b, cos_c, the rest)
            e = torch.cat([cos, (1 - (cos ** 2).sum(0, keepdim=True)).sqrt()])
            return e[None, :, None, :].expand(x.shape[0], 4, x.shape[2], 4)

    text = E.text_embeddings(Model(), ["a", "b", "c"], ("{}",))
    crops = torch.zeros(1, 3, 1, 4)
    s = E.crop_scorer(Model(), text, E.PRESETS["world"], True)(crops)
    torch.testing.assert_close(s[0, 1:, 0], torch.softmax(20 * cos, 0))  # the model's temperature
    # pixel 0: all three at cos 0.5 -> 1/3 each -> background; pixel 1: b; pixel 2: low and
    # flat -> background; pixel 3: a at 0.5 vs b at 0.45 -> 0.73 for a -> a.
    assert s.argmax(1)[0, 0].tolist() == [0, 2, 0, 1]
    # At scale 1 the scores flatten: only pixel 1 keeps a majority (e^.9 / (2 e^.1 + e^.9) = 0.53).
    fixed = dataclasses.replace(E.PRESETS["world"], score_scale=1.0)
    assert E.crop_scorer(Model(), text, fixed, True)(crops).argmax(1)[0, 0].tolist() == [0, 2, 0, 0]


def test_template_averaging_uses_unnormalised_embeddings():
    table = {"t1 cat": [3.0, 0.0], "t2 cat": [0.0, 1.0], "t1 dog": [0.0, 2.0], "t2 dog": [0.0, 5.0]}

    class Model:
        def encode_text(self, texts):
            return torch.tensor([table[t] for t in texts])

    emb = E.text_embeddings(Model(), ["cat", "dog"], ("t1 {}", "t2 {}"))
    want = torch.tensor([[1.5, 0.5], [0.0, 3.5]])
    torch.testing.assert_close(emb, want / want.norm(dim=1, keepdim=True))  # not mean of unit vectors
    assert len(E.TEMPLATES["tcl"]) == 9 and E.TEMPLATES["simple"] == ("a photo of a {}.",)


def test_pamr_follows_image_edges():
    g = torch.Generator().manual_seed(0)
    H, W = 24, 32
    image = torch.zeros(1, 3, H, W)
    image[..., W // 2:] = 1.0
    image += 0.02 * torch.rand(image.shape, generator=g)  # mild texture
    truth = torch.zeros(H, W, dtype=torch.long)
    truth[:, W // 2:] = 1
    mask = torch.nn.functional.one_hot(truth, 2).permute(2, 0, 1)[None].float()
    flip = torch.rand(H, W, generator=g) < 0.15  # salt noise on the mask
    noisy = torch.where(flip, 1 - mask, mask)
    out = E.pamr(image, noisy)
    assert out.shape == noisy.shape
    assert (noisy.argmax(1)[0] != truth).sum() > 50 and torch.equal(out.argmax(1)[0], truth)
    torch.testing.assert_close(out.sum(1), torch.ones(1, H, W))  # convex combinations
    const = torch.full((1, 2, H, W), 0.3)
    torch.testing.assert_close(E.pamr(image, const), const)

# ----------------------------------------------------------------------------- entry points
def test_preds_mode_scores_ground_truth_100(tmp_path):
    for name in ("voc20", "ade20k", "cityscapes"):
        write_tree(tmp_path, name)
    preds = tmp_path / "preds"
    preds.mkdir()
    for name in ("voc20", "ade20k", "cityscapes"):
        bench = E.load_benchmark(name, tmp_path)
        for i in range(len(bench)):
            _, label, image_id = bench[i]
            gt = E.reduce_zero(label) if bench.reduce_zero_label else label
            Image.fromarray(gt.astype(np.uint8), mode="L").save(preds / f"{image_id}.png")
    out = tmp_path / "out"
    m = E.main(["--preds", str(preds), "--benchmarks", "voc20,ade20k", "--data-root", str(tmp_path),
                "--out", str(out), "--n-vis", "2"])
    saved = json.loads((out / "metrics.json").read_text())
    for name in ("voc20", "ade20k"):
        assert m[name]["mIoU"] == 100.0 and saved[name]["mIoU"] == 100.0
        assert saved[name]["IoU"]["aeroplane" if name == "voc20" else "sky"] is None  # NaN -> null
    assert len(list((out / "vis").glob("voc20_*.png"))) == 2
    assert saved["args"]["preds"] == str(preds)
    (preds / f"{IDS['cityscapes'][1]}.png").unlink()
    with pytest.raises(SystemExit, match="1 of 3 prediction files missing"):
        E.main(["--preds", str(preds), "--benchmarks", "cityscapes", "--data-root", str(tmp_path),
                "--out", str(out)])
    with pytest.raises(SystemExit, match="needs --data-root"):
        E.main(["--preds", str(preds), "--benchmarks", "voc", "--out", str(out)])
    with pytest.raises(SystemExit, match="give a model"):
        E.main(["--benchmarks", "voc"])


class FakeWorld:
    """The shape of WorldBenchmark(name): classes, background, mean, std, templates."""

    def __init__(self, name, n_images=3):
        self.background = name == "world-object"
        self.classes = (["background", "circle", "square"] if self.background
                        else ["grass", "red circle", "blue circle"])
        self.mean, self.std, self.templates = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), ["a {}.", "the {}"]
        self.n = n_images

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        label = np.zeros((20, 28), np.uint8)
        label[3:12, 4 + i:15] = 1
        label[10:18, 16:26 - i] = 2
        label[0, :3] = 255
        image = np.array(COLORS, np.uint8)[np.minimum(label, 2)]
        return image, label, f"{i:05d}"


def test_world_path_run_benchmarks(tmp_path, monkeypatch):
    monkeypatch.setattr(E, "WorldBenchmark", lambda name, n_images=3: FakeWorld(name, n_images))
    models = {}
    for name in E.WORLD_BENCHMARKS:
        w = FakeWorld(name)
        names = {c: (None if w.background and k == 0 else w.classes[k]) for k, c in enumerate(COLORS)}
        models[name] = Oracle(names, w.classes, mean=w.mean, std=w.std, templates=w.templates)
    m = E.run_benchmarks(models["world-stuff"], ["world-stuff"], out_dir=tmp_path, n_vis=2,
                         extra={"config": {"width": 64}, "args": {"steps": 1}})
    assert m["world-stuff"]["mIoU"] == 100.0 and m["world-stuff"]["images"] == 3
    assert m["world-stuff"]["crops"] == 3  # world preset: one window = the whole image
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert set(saved) == {"world-stuff", "mean", "config", "args"}
    assert saved["world-stuff"]["protocol"]["templates"] == ["a {}.", "the {}"]
    assert saved["world-stuff"]["IoU"] == {"grass": 100.0, "red circle": 100.0, "blue circle": 100.0}
    assert sorted(p.name for p in (tmp_path / "vis").iterdir()) == ["world-stuff_00000.png",
                                                                     "world-stuff_00002.png"]
    # The run's picture is save_overlay's for the same image (the oracle predicts the label, and
    # the ignored pixels (row 0, columns 0-2) as class 2, their colour), which draws every panel
    # 13 x (20, 28) = (260, 364) px, the label panels in the palette's flat colours.
    image, label, _ = FakeWorld("world-stuff")[0]
    pred = np.where(label == 255, 2, label)
    classes = FakeWorld("world-stuff").classes
    legend, boxes = E.save_overlay(tmp_path / "ref.png", image, label, pred, classes, False,
                                   "world-stuff 00000")
    vis = np.asarray(Image.open(tmp_path / "vis/world-stuff_00000.png"))
    np.testing.assert_array_equal(vis, np.asarray(Image.open(tmp_path / "ref.png")))
    assert [e[:2] for e in legend] == [(0, "grass"), (1, "red circle"), (2, "blue circle"),
                                       (255, "ignore")]
    inp, gt, pr = (vis[y0:y1, x0:x1] for x0, y0, x1, y1 in boxes)
    assert inp.shape == gt.shape == pr.shape == (260, 364, 3)
    np.testing.assert_array_equal(inp, image.repeat(13, 0).repeat(13, 1))  # nearest neighbour
    colours = E.palette(False)
    np.testing.assert_array_equal(gt[13:], colours[label[1:]].repeat(13, 0).repeat(13, 1))
    np.testing.assert_array_equal(gt[13:], pr[13:])  # gt | pred agree below the ignored row
    assert set(map(tuple, gt[:13, :39].reshape(-1, 3))) == {E.IGNORE_RGB, E.HATCH_RGB}  # hatched
    assert (pr[:13, :39] == colours[2]).all()
    for name in ("world-object", "world-attr"):
        r = E.run_benchmarks(models[name], [name], out_dir=tmp_path / name, n_vis=0)
        assert r[name]["mIoU"] == 100.0

# ----------------------------------------------------------------------------- pictures
def colours_in(a):
    return set(map(tuple, np.asarray(a)[..., :3].reshape(-1, 3).tolist()))


def test_overlay_panels_legend_and_ignore(tmp_path):
    """A 64 px image: panels of 256 px (x4), a legend of exactly the classes in the label or the
    prediction, each swatch in its class's colour, ignore hatched black and grey."""
    classes = [f"c{k}" for k in range(10)]
    image = np.random.default_rng(0).integers(0, 256, (64, 64, 3)).astype(np.uint8)
    label = np.zeros((64, 64), np.int64)
    label[10:30, 10:50], label[40:60, :] = 2, 5
    label[:4, :8] = 255
    pred = label.copy()
    pred[:4, :8], pred[40:60, 32:] = 0, 7  # class 7 only predicted
    legend, boxes = E.save_overlay(tmp_path / "o.png", image, label, pred, classes, background=True,
                                   title="world-object 00003")
    assert [e[:2] for e in legend] == [(0, "c0"), (2, "c2"), (5, "c5"), (7, "c7"), (255, "ignore")]
    vis = np.asarray(Image.open(tmp_path / "o.png"))
    inp, gt, pr = (vis[y0:y1, x0:x1] for x0, y0, x1, y1 in boxes)
    assert inp.shape == gt.shape == pr.shape == (256, 256, 3)
    assert [b[0] for b in boxes] == sorted(b[0] for b in boxes) and boxes[0][2] < boxes[1][0]
    np.testing.assert_array_equal(inp, image.repeat(4, 0).repeat(4, 1))
    colours = E.palette(True)
    assert tuple(colours[0]) == E.BACKGROUND_RGB and tuple(colours[255]) == E.IGNORE_RGB
    assert (gt[100, 100] == colours[2]).all() and (pr[200, 200] == colours[7]).all()
    assert colours_in(gt[:16, :32]) == {E.IGNORE_RGB, E.HATCH_RGB}  # ignore: hatched black
    assert (pr[:16, :32] == colours[0]).all()
    # Each swatch, below the panels, is its class's colour; no other class colour is drawn.
    for k, _, (x0, y0, x1, y1) in legend:
        assert y0 >= boxes[0][3] and x1 - x0 == y1 - y0 >= 8
        want = {E.IGNORE_RGB, E.HATCH_RGB} if k == 255 else {tuple(colours[k])}
        assert colours_in(vis[y0:y1, x0:x1]) == want, k
    absent = {tuple(colours[k]) for k in (1, 3, 4, 6, 8, 9)}
    assert not absent & (colours_in(gt) | colours_in(pr) | colours_in(vis[boxes[0][3]:]))


def test_overlay_sizes_and_palette(tmp_path):
    assert E.panel_size(64, 64) == (256, 256) and E.panel_size(20, 28) == (364, 260)
    assert E.panel_size(375, 500) == (500, 375)  # VOC: as it is, three panels ~1540 px wide
    assert E.panel_size(1024, 2048) == (512, 256)  # Cityscapes: shrunk to 512 wide
    assert E.panel_size(512, 683) == (512, 384)  # ADE20K
    p = E.palette(False)
    assert len(colours_in(p[:255])) == 255 and np.array_equal(p, E.palette(False))  # fixed, distinct
    assert E.BACKGROUND_RGB not in colours_in(p[:255]) and E.IGNORE_RGB not in colours_in(p[:255])
    # A VOC-sized image with all 21 classes and ignore: 22 legend entries, wrapped over rows.
    rng = np.random.default_rng(1)
    image = rng.integers(0, 256, (375, 500, 3)).astype(np.uint8)
    label = np.broadcast_to(np.arange(500) // 24 % 21, (375, 500)).copy()
    label[:40] = 255
    pred = np.roll(label, 30, 1)
    legend, boxes = E.save_overlay(tmp_path / "voc.png", image, label, pred, E.VOC, True)
    assert [e[1] for e in legend] == E.VOC + ["ignore"]
    vis = np.asarray(Image.open(tmp_path / "voc.png"))
    assert vis.shape[1] == 3 * 500 + 40
    for k, _, (x0, y0, x1, y1) in legend[:-1]:
        assert colours_in(vis[y0:y1, x0:x1]) == {tuple(E.palette(True)[k])}
    assert legend[-1][2][1] > legend[0][2][3]  # the entries wrap: ignore's swatch on a lower row
    assert max(e[2][2] for e in legend) <= vis.shape[1] and legend[-1][2][3] <= vis.shape[0]


def test_overlay_of_a_reduce_zero_label_benchmark(tmp_path):
    class Bench:  # voc20-like: raw 0 is ignored, raw k is classes[k - 1]
        classes, background, reduce_zero_label = ["aeroplane", "bicycle", "bird"], False, True

    raw = np.array([[0, 1], [3, 255]], np.uint8)
    legend, _ = E._save_vis(tmp_path, "voc20", "2007_000033", np.zeros((2, 2, 3), np.uint8), raw,
                            np.array([[0, 0], [2, 2]]), Bench())
    assert [e[:2] for e in legend] == [(0, "aeroplane"), (2, "bird"), (255, "ignore")]
    assert (tmp_path / "voc20_2007_000033.png").is_file()


def write_log(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


TAG_RGB, LR_RGB = (245, 130, 49), (60, 150, 75)  # save_curves' colours for tag and lr


def test_save_curves(tmp_path):
    rows = [{"step": s, "loss": 8 - s / 10, "itc": 5 - s / 20, "tag": 3 - s / 20,
             "lr": 1e-3 * min(1, s / 20), "scale": 14.0} for s in range(0, 60, 5)]
    png = E.save_curves(write_log(tmp_path / "log.jsonl", rows), tmp_path / "c.png")
    assert png == tmp_path / "c.png"
    im = Image.open(tmp_path / "c.png")
    assert im.size == (900, 600)
    assert TAG_RGB in colours_in(im) and LR_RGB in colours_in(im)
    # ITC-only baseline (tag 0 throughout) and a log with no tag key, a NaN and a row without lr.
    itc_only = [{**r, "tag": 0.0, "loss": r["itc"]} for r in rows]
    no_tag = [{k: v for k, v in r.items() if k != "tag"} for r in rows]
    no_tag[3]["loss"], no_tag[4] = float("nan"), {"step": 20, "loss": 6.0}
    for name, log in (("itc_only", itc_only), ("no_tag", no_tag)):
        png = E.save_curves(write_log(tmp_path / f"{name}.jsonl", log), tmp_path / f"{name}.png")
        im = Image.open(png)
        assert im.size == (900, 600) and TAG_RGB not in colours_in(im) and LR_RGB in colours_in(im)
    one = E.save_curves(write_log(tmp_path / "one.jsonl", rows[:1]), tmp_path / "one.png")
    assert Image.open(one).size == (900, 600)  # a single row: one point, no division by zero


def test_save_curves_empty_and_malformed_logs(tmp_path, capsys):
    for text in ("", "\n\n"):
        (tmp_path / "empty.jsonl").write_text(text)
        assert E.save_curves(tmp_path / "empty.jsonl", tmp_path / "e.png") is None
        assert not (tmp_path / "e.png").exists() and "has no rows" in capsys.readouterr().out
    (tmp_path / "bad.jsonl").write_text('{"step": 0, "loss": 1}\n{"step": 1, "loss"\n')
    with pytest.raises(ValueError, match="bad.jsonl line 2: expected a JSON object"):
        E.save_curves(tmp_path / "bad.jsonl", tmp_path / "b.png")
    (tmp_path / "bad.jsonl").write_text('{"loss": 1}\n')
    with pytest.raises(ValueError, match="line 1: expected a JSON object with a 'step'"):
        E.save_curves(tmp_path / "bad.jsonl", tmp_path / "b.png")


class RandomDense:
    """Random dense embeddings on a stride-4 grid and random prompt embeddings, remembered so
    that a test can recompute what was measured from them."""

    def __init__(self, E_dim=6):
        self.g, self.E, self.text, self.outputs = torch.Generator().manual_seed(0), E_dim, {}, []

    def encode_text(self, texts):
        for t in texts:
            self.text.setdefault(t, torch.randn(self.E, generator=self.g))
        return torch.stack([self.text[t] for t in texts])

    def encode_dense(self, x):
        out = torch.randn(len(x), self.E, x.shape[-2] // 4, x.shape[-1] // 4, generator=self.g)
        self.outputs.append(out)
        return out


@pytest.mark.parametrize("name", ["world-stuff", "world-object"])
def test_prompt_cosines_against_a_loop(name):
    bench = FakeWorld(name, n_images=3)
    model = RandomDense()
    protocol = E.protocol_for(name, bench)
    got = E.prompt_cosines(model, bench, protocol, batch_size=2)
    names = bench.classes[1:] if bench.background else bench.classes
    text = torch.stack([sum(model.text[t.format(n)] for t in bench.templates) for n in names])
    text = text / text.norm(dim=1, keepdim=True)
    dense = torch.cat(model.outputs)  # (3, E, 5, 7) for 20 x 28 images
    sums = {n: [0.0, 0.0, 0] for n in names}
    for i in range(len(bench)):
        label = bench[i][1]
        for r in range(dense.shape[2]):
            for c in range(dense.shape[3]):
                k = int(label[4 * r + 2, 4 * c + 2]) - (1 if bench.background else 0)  # the patch centre
                if not 0 <= k < len(names):
                    continue
                f = dense[i, :, r, c] / dense[i, :, r, c].norm()
                cos = [float(f @ t) for t in text]
                sums[names[k]][0] += cos[k]
                sums[names[k]][1] += cos[k] - max(v for j, v in enumerate(cos) if j != k)
                sums[names[k]][2] += 1
    assert set(got) == set(names)
    for n, (cos, margin, count) in sums.items():
        assert got[n]["patches"] == count and count > 0
        assert got[n]["cos"] == pytest.approx(cos / count, abs=1e-6)
        assert got[n]["margin"] == pytest.approx(margin / count, abs=1e-6)


def test_cosines_flag_refuses_other_benchmarks():
    with pytest.raises(SystemExit, match="--cosines"):
        E.main(["--ckpt", "x.pt", "--benchmarks", "voc", "--cosines"])


def test_ckpt_whose_pickle_would_run_code_is_refused(tmp_path):
    """A checkpoint holding a pickled os.system call: one line, the call never made, nothing written."""
    evil = tmp_path / "evil.pt"
    torch.save({"model": {}, "config": {}, "args": Planted(tmp_path / "pwned")}, evil)
    with pytest.raises(SystemExit) as e:
        E.main(["--ckpt", str(evil), "--world-images", "2", "--n-vis", "0", "--out", str(tmp_path / "eval")])
    assert e.value.code == (f"error: {evil} is not a tagalign checkpoint: it holds a Python object, posix.system, "
                            f"that loading would build or call: refused")
    assert not (tmp_path / "pwned").exists() and not (tmp_path / "eval").exists()
