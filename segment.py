"""Segment your own images with your own words: any photos, any class names, scored by the
evaluator's one path from pixels to labels (eval_seg.predict), so that what a user sees is what
the benchmarks measure.

    python tagalign.py segment photos/ --classes "cat; grass, lawn; sky" --ckpt out/ckpt.pt
    python tagalign.py segment 'shots/*.jpg' --classes-file classes.txt --clip ViT-B-16.pt --dense maskclip
    python tagalign.py segment --demo 4 --classes "red circle; ring; grass, lawn" --ckpt out/ckpt.pt

    from segment import Segmenter
    seg = Segmenter.load("out/ckpt.pt")           # or Segmenter.load(clip="ViT-B-16.pt", dense="maskclip")
    labels, scores = seg("photo.jpg", ["cat", "grass, lawn"])

Classes: `;` between classes, `,` between the synonyms of one class. A class's prompts are every
template filled with every synonym, their embeddings averaged un-normalised and L2-normalised,
as eval_seg.text_embeddings averages templates. Attribute phrases are classes like any other.

The protocol is the model's, picked as eval_seg.run_benchmarks picks it: a model trained on the
world gets the world benchmarks' (the image whole, the world's normalisation and prompt, softmax
over the classes at the model's temperature, background 0.5); every other (a paper-mode
checkpoint, raw CLIP) TCL/TagAlign's (short side 448 with the long side capped at 2048, 448 / 224
sliding windows, sigmoid(10 cos - 2.5), the raw-CLIP blend, background 0.4).

Outputs under --out for each image STEM (its file name's stem, made unique in the run):
STEM.overlay.png (input | labels over the faded input, a legend with each class's share of the
pixels), STEM.labels.png (palette PNG of class indices: 0 = background when it is on, class k
= k, counting from 1; without the background from 0), STEM.scores.npy (--save-scores: float16
(C, H, W), each class's score at the image's size), STEM.features.npy (--save-features: float32
(h, w, E), the model's dense embeddings of the resized image), and segment.json for the run.
Every file is written under a temporary name and renamed: an interrupted run leaves no half file.
"""
import glob
import os
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from tqdm import tqdm

import eval_seg
from data import write_atomic
from model import READINGS, autocast
from world import WorldBenchmark


# ----------------------------------------------------------------------------- classes
def parse_classes(classes):
    """"cat; grass, lawn" or ["cat", "grass, lawn"] -> [["cat"], ["grass", "lawn"]]: classes
    split at `;`, synonyms at `,`, spaces squeezed, empty entries dropped. ValueError (one line)
    for an empty list or a name given twice (case and spacing ignored)."""
    items = classes.split(";") if isinstance(classes, str) else [part for c in classes for part in c.split(";")]
    groups = [[" ".join(s.split()) for s in c.split(",") if s.strip()] for c in items]
    groups = [g for g in groups if g]
    if not groups:
        raise ValueError("no class names (expected e.g. \"cat; grass, lawn; sky\")")
    seen = set()
    for name in (s.lower() for g in groups for s in g):
        if name in seen:
            raise ValueError(f"'{name}' is given twice")
        seen.add(name)
    return groups


def read_classes_file(path):
    """A classes file: one class a line (synonyms after commas), `#` starts a comment."""
    try:
        lines = Path(path).read_text().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"cannot read it ({e.strerror or e})") from None
    return parse_classes([line.split("#")[0] for line in lines])

# ----------------------------------------------------------------------------- images
def read_image(image):
    """A path, a PIL image or an (H, W, 3) uint8 array -> (H, W, 3) uint8 array, turned as the
    file's EXIF orientation says (as a photo viewer shows it). ValueError (one line) for a file
    that is not an image or is cut short."""
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"expected an (H, W, 3) uint8 array, got {image.dtype} {image.shape}")
        return image
    try:
        im = image if isinstance(image, Image.Image) else Image.open(image)
        return np.asarray(ImageOps.exif_transpose(im).convert("RGB"))
    except UnidentifiedImageError:
        raise ValueError("not an image") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:  # truncated, corrupt, huge
        raise ValueError(f"unreadable image ({e})") from None


def find_images(photos, out):
    """PHOTOS arguments -> files: a file as it is, a folder's files (not its subfolders'; files
    under `out` left out, so a rerun does not read its own outputs), a glob's matches
    ('shots/**/*.jpg' recurses). Each file once, in order. A path that does not exist or a glob
    that matches nothing: ValueError."""
    out, files = Path(out).resolve(), []
    for arg in photos:
        p = Path(arg)
        if p.is_dir():
            files += sorted(f for f in p.iterdir() if f.is_file() and out not in f.resolve().parents)
        elif p.is_file():
            files.append(p)
        elif any(c in arg for c in "*?["):
            matches = sorted(Path(m) for m in glob.glob(arg, recursive=True) if os.path.isfile(m))
            if not matches:
                raise ValueError(f"{arg}: matches no file")
            files += matches
        else:
            raise ValueError(f"{arg}: no such file or folder")
    unique = {f.resolve(): f for f in reversed(files)}  # the first mention of each file wins
    return [f for f in files if unique[f.resolve()] is f]

# ----------------------------------------------------------------------------- the segmenter
class Segmenter:
    """A model, its protocol and the background rule; called on an image and class names.

    seg(image, classes) -> labels (H, W) int64, scores (C, H, W) float32 (numpy): labels index
    ["background", *classes] when the background is on (a pixel is background where no class
    scores above the threshold), else the classes; scores are the classes' own (the background
    is a constant). Works through eval_seg.predict, the evaluator's path.
    """

    def __init__(self, model, protocol, background=True, batch_size=16):
        self.model, self.protocol, self.background, self.batch_size = model, protocol, background, batch_size
        self.device = torch.device(getattr(model, "device", "cpu"))
        self._embedded = {}  # class list -> its (C, E) embeddings: seg(image, classes) in a loop embeds once

    @classmethod
    def load(cls, ckpt=None, *, clip=None, dense=None, device=None, background=None, pamr=False,
             templates=None, batch_size=16):
        """ckpt: a checkpoint of tagalign.py train (a paper-mode one finds its CLIP as
        eval_seg.load_model does: `clip`, else the path it recorded); clip alone: raw CLIP, its
        ln_post + proj on the `dense` reading with ImageNet normalisation (eval_seg --clip).
        background: None = on at the protocol's threshold, False = off, a number = on at that
        score. templates: a key of eval_seg.TEMPLATES (default: the protocol's prompts)."""
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        if ckpt is not None:
            model = eval_seg.load_model(ckpt, device, reading=dense, clip=clip)
        elif clip is not None:
            model = eval_seg.load_raw_clip(clip, device, dense)
        else:
            raise SystemExit("error: give a checkpoint (--ckpt PATH) or a CLIP file (--clip PATH)")
        overrides = {"pamr": pamr}
        if templates is not None:
            overrides["templates"] = eval_seg.TEMPLATES[templates]
        if background is not None and not isinstance(background, bool):  # 0.0 is a threshold, not "off"
            overrides["bg_thresh"] = float(background)
        # The model's protocol, as run_benchmarks picks it: the world's (a world benchmark's
        # geometry, normalisation and prompt) for a model trained on the world, else TCL's.
        world = WorldBenchmark("world-object", 0, cfg=model.world_cfg) if model.world_cfg is not None else None
        protocol = eval_seg.model_protocol(model, "tcl" if world is None else world.name, world, overrides)
        return cls(model, protocol, background is not False, batch_size)

    def names(self, classes):
        """What labels index: ["background", *classes] with the background on, else the classes
        (synonyms joined by ", "); classes as parse_classes reads them."""
        groups = parse_classes(classes)
        if self.background and any(s.lower() == "background" for g in groups for s in g):
            raise ValueError("'background' is the background class here (turn it off to name one)")
        return ["background"] * self.background + [", ".join(g) for g in groups]

    def embed(self, classes):
        """(C, E) class embeddings on the model's device; classes as parse_classes reads them."""
        key = classes if isinstance(classes, str) else tuple(classes)
        if key not in self._embedded:
            self.names(classes)
            self._embedded[key] = eval_seg.text_embeddings(self.model, parse_classes(classes),
                                                           self.protocol.templates).to(self.device)
        return self._embedded[key]

    def segment(self, items, text):
        """eval_seg.predict on (image, key) items: yields (key, labels (H, W) int64 numpy,
        scores (C, H, W) float32 on the device), the background channel left out of scores."""
        for key, s, labels in eval_seg.predict(self.model, items, text, self.protocol, self.background,
                                               self.batch_size):
            yield key, labels, s[1:] if self.background else s

    def __call__(self, image, classes):
        ((_, labels, scores),) = self.segment([(read_image(image), None)], self.embed(classes))
        return labels, scores.cpu().numpy()

    @torch.no_grad()
    def features(self, image):
        """(h, w, E) float32 numpy: the dense embeddings (not normalised) of the image resized
        as the protocol resizes it, in one pass over the whole image (the world's protocol has
        one window anyway; under the sliding window this is one grid for the image rather than
        one per window)."""
        x = eval_seg.preprocess(read_image(image), self.protocol, self.device)
        with autocast(self.device, eval_seg.precision(self.device)):
            f = self.model.encode_dense(x)  # (1, E, h, w)
        return f[0].permute(1, 2, 0).float().cpu().numpy()

# ----------------------------------------------------------------------------- outputs
def save(path, write):
    """write(f) into path through data.write_atomic: a reader sees the whole file or none, and
    an interrupted write leaves nothing behind."""
    with write_atomic(path) as tmp, open(tmp, "wb") as f:
        write(f)


def overlay(image, labels, names, shares, background):
    """(panels, legend) for eval_seg.draw_panels: the input, and the labels' colours blended
    60 / 40 over the input's grey (its luma: the shapes show through, its colours do not mix
    with the class colours), each at eval_seg's panel size; the legend lists every class with
    its share of the pixels."""
    H, W = labels.shape
    (w, h), colours = eval_seg.panel_size(H, W), eval_seg.palette(background)
    resample = Image.NEAREST if w >= W else Image.BILINEAR
    shown = np.asarray(Image.fromarray(image).resize((w, h), resample)).astype(np.float32)
    grey = shown @ np.array([0.299, 0.587, 0.114], np.float32)  # (h, w) luma
    flat = np.asarray(Image.fromarray(labels.astype(np.uint8)).resize((w, h), Image.NEAREST))
    blend = 0.6 * colours[flat] + 0.4 * grey[..., None]
    panels = [("input", shown.astype(np.uint8)), ("labels", blend.round().astype(np.uint8))]
    legend = [(k, f"{name}  {share:.1f}%") for k, (name, share) in enumerate(zip(names, shares))]
    return panels, legend


def save_image_outputs(out, stem, image, labels, scores, names, background, title, features=None,
                       save_scores=False):
    """Write one image's files (overlay, labels, optional scores and features); returns its
    record for segment.json: size, files, each class's pixel share (%) and mean score over the
    pixels it labels (null where it labels none)."""
    H, W = labels.shape
    counts = np.bincount(labels.ravel(), minlength=len(names))
    shares = (100 * counts / labels.size).tolist()
    colours = eval_seg.palette(background)
    panels, legend = overlay(image, labels, names, shares, background)
    files = {"overlay": f"{stem}.overlay.png", "labels": f"{stem}.labels.png"}
    save(out / files["overlay"], lambda f: eval_seg.draw_panels(f, title, panels, legend, colours))
    png = Image.fromarray(labels.astype(np.uint8), mode="P")
    png.putpalette(colours.ravel().tolist())
    save(out / files["labels"], lambda f: png.save(f, format="PNG"))
    if save_scores:
        files["scores"] = f"{stem}.scores.npy"
        s16 = scores.cpu().numpy().astype(np.float16)
        save(out / files["scores"], lambda f: np.save(f, s16))
    if features is not None:
        files["features"] = f"{stem}.features.npy"
        save(out / files["features"], lambda f: np.save(f, features))
    bg = int(background)
    lab = torch.from_numpy(labels).to(scores.device)
    classes = {}
    for c, name in enumerate(names[bg:]):
        mine = lab == c + bg
        classes[name] = {"share": shares[c + bg],
                         "score": scores[c][mine].mean().item() if counts[c + bg] else None}
    record = {"size": [H, W], "files": files, "classes": classes}
    if background:
        record["background"] = {"share": shares[0]}
    return record


def unique_stems(paths):
    """A file-name stem per path, unique in the run: photo, photo-2, photo-3, ..."""
    seen, stems = set(), []
    for p in paths:
        stem, k = p.stem, 1
        while stem in seen:
            k += 1
            stem = f"{p.stem}-{k}"
        seen.add(stem)
        stems.append(stem)
    return stems


def write_demo(folder, n, world=None):
    """The first n scenes of the world's validation split, the world benchmarks' images (of the
    model's own world when it was trained on one), as PNG files folder/world-00000.png, ..."""
    folder.mkdir(parents=True, exist_ok=True)
    bench, paths = WorldBenchmark("world-object", n, cfg=world), []
    for i in range(n):
        paths.append(folder / f"world-{i:05d}.png")
        image = Image.fromarray(bench[i][0])
        save(paths[-1], lambda f: image.save(f, format="PNG"))
    return paths


def segment_files(seg, paths, classes, out, *, save_scores=False, save_features=False, progress=True,
                  record=None):
    """Segment image files with seg (a Segmenter) into the folder `out`; a file that is not an
    image, or is smaller than the model's patches, is skipped with one line. Writes and returns
    segment.json's content: `record` (what the caller adds: model, arguments), classes, prompts,
    protocol, one entry per image and the skipped files."""
    groups, names, text = parse_classes(classes), seg.names(classes), seg.embed(classes)
    patch = seg.model.config.get("patch_size", 1)
    out.mkdir(parents=True, exist_ok=True)
    stems = dict(zip(paths, unique_stems(paths)))
    skipped, images = [], []
    bar = tqdm(total=len(paths), unit="img", disable=not progress)

    def items():  # (image, path) of every readable file
        for p in paths:
            try:
                image = read_image(p)
                if min(eval_seg.input_size(*image.shape[:2], seg.protocol)) < patch:
                    raise ValueError(f"{image.shape[1]} x {image.shape[0]} px, smaller than the model's "
                                     f"{patch} px patches")
            except ValueError as e:
                tqdm.write(f"skipped {p}: {e}")
                skipped.append({"file": str(p), "reason": str(e)})
                bar.update(1)
                continue
            yield image, (p, image)

    t0 = time.time()
    for (p, image), labels, scores in seg.segment(items(), text):
        features = seg.features(image) if save_features else None
        r = save_image_outputs(out, stems[p], image, labels, scores, names, seg.background, p.name,
                               features, save_scores)
        images.append({"file": str(p), **r})
        bar.update(1)
    bar.close()
    seconds = time.time() - t0
    run = {**(record or {}), "classes": names[seg.background:],
           "prompts": {n: eval_seg.prompts(g, seg.protocol.templates)
                       for n, g in zip(names[seg.background:], groups)},
           "background": seg.protocol.bg_thresh if seg.background else None, "protocol": seg.protocol,
           "images": images, "skipped": skipped, "seconds": seconds}
    eval_seg.write_json(out / "segment.json", run)
    print(f"segmented {len(images)} images in {seconds:.1f} s ({len(images) / max(seconds, 1e-9):.2f} images/s), "
          f"skipped {len(skipped)}: {out}/ (segment.json, *.overlay.png, *.labels.png)")
    return run

# ----------------------------------------------------------------------------- command line
def add_parser(sub):
    """The `segment` command on tagalign.py's subparsers. Values are checked in main (one line
    each), so no flag has argparse choices."""
    p = sub.add_parser("segment", help="segment your own images with your own class names")
    p.add_argument("photos", nargs="*", metavar="PHOTOS", help="image files, folders (their files) or globs "
                   "('shots/**/*.jpg'); what is not an image is skipped")
    p.add_argument("--classes", help="class names: ';' between classes, ',' between synonyms of one class "
                   "(\"cat; grass, lawn; red car\")")
    p.add_argument("--classes-file", help="a file of class names, one class a line (synonyms after commas), "
                   "'#' starts a comment")
    p.add_argument("--ckpt", help="a checkpoint of `tagalign.py train` (e.g. out/ckpt.pt)")
    p.add_argument("--clip", help="an OpenAI CLIP file: alone, segment with raw CLIP; with a paper-mode --ckpt, "
                   "the CLIP it was trained on (default: the path it recorded)")
    p.add_argument("--dense", help=f"how patch tokens are read out of the ViT: {', '.join(READINGS)} "
                   "(default: the model's own)")
    p.add_argument("--background", default=None, help="score a pixel must beat to get a class, else it is "
                   "background (default: the protocol's, 0.4; the world's 0.5); 'none': every pixel gets a class")
    p.add_argument("--pamr", action="store_true", help="refine the scores with PAMR (TCL's post-processing)")
    p.add_argument("--templates", help=f"prompt set: {', '.join(sorted(eval_seg.TEMPLATES))} "
                   "(default: the protocol's: 'a photo of a {}.', the world's 'a {}.')")
    p.add_argument("--out", default="out/segment", help="output folder (default: out/segment)")
    p.add_argument("--save-scores", action="store_true", help="also write each image's class scores, "
                   "STEM.scores.npy, float16 (C, H, W)")
    p.add_argument("--save-features", action="store_true", help="also write each image's dense embeddings, "
                   "STEM.features.npy, float32 (h, w, E)")
    p.add_argument("--demo", type=int, default=0, metavar="N", help="write N scenes of the world's validation "
                   "split to OUT/demo/ as PNG files and segment them too")
    p.add_argument("--batch-size", type=int, default=16, help="windows per forward pass")
    p.add_argument("--device", default=None, help="device for the model (default: cuda if available, else cpu)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def check_args(args):
    """One line (SystemExit "error: ...") for each bad value; returns the background setting."""
    def fail(message):
        raise SystemExit(f"error: {message}")
    if (args.classes is None) == (args.classes_file is None):
        fail("give the class names with --classes \"cat; grass, lawn\" or --classes-file FILE (one of them)")
    if args.ckpt is None and args.clip is None:
        fail("give a checkpoint (--ckpt out/ckpt.pt) or a CLIP file (--clip ViT-B-16.pt)")
    if args.dense is not None and args.dense not in READINGS:
        fail(f"--dense {args.dense}: expected one of {', '.join(READINGS)}")
    if args.templates is not None and args.templates not in eval_seg.TEMPLATES:
        fail(f"--templates {args.templates}: expected one of {', '.join(sorted(eval_seg.TEMPLATES))}")
    if args.batch_size < 1 or args.demo < 0:
        fail("--batch-size must be at least 1 and --demo at least 0")
    if not args.photos and not args.demo:
        fail("no images: give files, folders or globs, or --demo N")
    try:
        device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError:
        fail(f"--device {args.device}: expected cpu, cuda or cuda:N")
    if device.type == "cuda" and not torch.cuda.is_available():
        fail(f"--device {args.device}: no CUDA device here")
    if device.type not in ("cpu", "cuda"):
        fail(f"--device {args.device}: expected cpu, cuda or cuda:N")
    if args.background is None or args.background.lower() == "none":
        return None if args.background is None else False
    try:
        value = float(args.background)
    except ValueError:
        value = None
    if value is None or not 0 <= value <= 1:
        fail(f"--background {args.background}: expected a score in [0, 1] or 'none'")
    return value


def main(args):
    """`tagalign.py segment`: check everything, load the model, then write the outputs."""
    background = check_args(args)
    out = Path(args.out)
    try:
        where = "--classes" if args.classes is not None else f"--classes-file {args.classes_file}"
        classes = parse_classes(args.classes) if args.classes is not None else read_classes_file(args.classes_file)
        where = "PHOTOS"
        paths = find_images(args.photos, out)
    except ValueError as e:
        raise SystemExit(f"error: {where}: {e}") from None
    seg = Segmenter.load(args.ckpt, clip=args.clip, dense=args.dense, device=args.device, background=background,
                         pamr=args.pamr, templates=args.templates, batch_size=args.batch_size)
    classes = [", ".join(g) for g in classes]
    try:
        seg.names(classes)  # a class named "background" while the background is on
    except ValueError as e:
        raise SystemExit(f"error: --classes: {e}") from None
    if len(classes) + seg.background > 255:
        raise SystemExit(f"error: --classes: {len(classes)} classes; at most {255 - seg.background} "
                         f"fit a palette PNG")
    if args.demo:
        paths += write_demo(out / "demo", args.demo, seg.model.world_cfg)
    model = {"ckpt": args.ckpt, "clip": args.clip, "dense": seg.model.reading, "config": seg.model.config}
    return segment_files(seg, paths, classes, out, save_scores=args.save_scores, save_features=args.save_features,
                         progress=not args.quiet, record={"model": model, "args": vars(args)})
