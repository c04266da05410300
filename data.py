"""Paper-mode training data: caption files (txt, tsv, jsonl, webdataset tars), shard
expansion, the training transform, and ImageTextStream, which streams image-text shards for a
DataLoader with exact resume; the image normalisations (ImageNet's, CLIP's); write_atomic, how
every file of the project is written.
"""
import contextlib
import io
import json
import math
import os
import re
import tarfile

import numpy as np
import torch


# ---------------------------------------------------------------- writing files
@contextlib.contextmanager
def write_atomic(path):
    """`with write_atomic(path) as tmp:` write the file at tmp; when the block ends, tmp is
    renamed onto path, so that a crash mid-write leaves the old file (or none), never half of
    one. A block that raises removes tmp and leaves path as it was."""
    tmp = f"{path}.tmp"
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


# ---------------------------------------------------------------- caption files
_CAPTION_FORMATS = {".txt": "text", ".tsv": "tsv", ".jsonl": "jsonl", ".tar": "tar",
                    ".tar.gz": "tar", ".tgz": "tar"}


def caption_format(path):
    name = path.lower()
    for ext in (".tar.gz", ".tgz", ".tar", ".jsonl", ".tsv", ".txt"):
        if name.endswith(ext):
            return _CAPTION_FORMATS[ext]
    raise ValueError(f"{path}: unsupported caption file (expected .txt, .tsv, .jsonl or .tar)")


def _json_caption(raw):
    """The "caption" string of a JSON object given as bytes, and the object; or ValueError."""
    try:
        obj = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"bad JSON ({e.__class__.__name__})") from None
    cap = obj.get("caption") if isinstance(obj, dict) else None
    if not isinstance(cap, str):
        raise ValueError("no 'caption' string")
    return cap, obj


def tsv_caption_column(path, header_line):
    header = header_line.decode("utf-8", "replace").rstrip("\r\n").split("\t")
    names = [h.strip().lower() for h in header]
    if "caption" not in names:
        raise ValueError(f"{path}: TSV header has no 'caption' column (header: {header[:8]})")
    return names.index("caption")


def _key_column(names):
    """The column (or field) that names a sample: "key", else "image", else None."""
    return next((c for c in ("key", "image") if c in names), None)


def iter_captions(path):
    """The samples of one caption file, in order, as (key, caption, None), or (key, None, reason)
    for a malformed one, so that row i of the tag file is sample i of the input.

    .txt: one caption a line. .tsv: a header line naming a "caption" column, then one row a
    sample. .jsonl: one {"caption": ...} object a line. .tar (webdataset): one sample per key,
    its caption in KEY.txt, else in the "caption" field of KEY.json; a key with neither (an
    image alone) is a malformed sample. Non-UTF-8 text and empty captions are malformed.
    The key: the tar key; a "key" (else "image") column or field of .tsv / .jsonl rows; else
    the line number."""
    fmt = caption_format(path)
    if fmt == "tar":
        yield from _iter_tar_captions(path)
        return
    with open(path, "rb") as f:
        col = key_col = None
        if fmt == "tsv":
            header = f.readline()
            col = tsv_caption_column(path, header)
            names = [h.strip().lower() for h in header.decode("utf-8", "replace").rstrip("\r\n").split("\t")]
            key_col = names.index(_key_column(names)) if _key_column(names) else None
        for n, raw in enumerate(f, 2 if fmt == "tsv" else 1):
            where, key = f"{path}:{n}", str(n)
            raw = raw.rstrip(b"\r\n")
            if not raw.strip():
                yield key, None, f"{where}: empty line"
                continue
            try:
                if fmt == "jsonl":
                    cap, obj = _json_caption(raw)
                    k = _key_column(obj)
                    key = str(obj[k]) if k else key
                else:
                    line = raw.decode("utf-8")
                    if fmt == "tsv":
                        fields = line.split("\t")
                        if key_col is not None and len(fields) > key_col:
                            key = fields[key_col]
                        if len(fields) <= col:
                            raise ValueError("missing caption column")
                        line = fields[col]
                    cap = line
            except UnicodeDecodeError:
                yield key, None, f"{where}: not UTF-8"
                continue
            except ValueError as e:
                yield key, None, f"{where}: {e}"
                continue
            cap = cap.strip()
            yield (key, cap, None) if cap else (key, None, f"{where}: empty caption")


def tar_groups(tf):
    """The samples of an open tar in the webdataset layout: consecutive members with the same
    key (the path up to the first dot of the file name) form one sample. Yields (key,
    {extension: TarInfo}); a broken tar raises tarfile.TarError, EOFError or OSError."""
    key, members = None, {}
    for m in tf:
        if not m.isfile():
            continue
        d, base = os.path.split(m.name)
        stem, _, ext = base.partition(".")
        k = f"{d}/{stem}" if d else stem
        if k != key:
            if key is not None:
                yield key, members
            key, members = k, {}
        members[ext.lower()] = m
    if key is not None:
        yield key, members


def caption_of(txt, js):
    """The caption of a webdataset sample from its .txt (preferred) or .json bytes; ValueError
    (UnicodeDecodeError included) when there is none."""
    if txt is not None:
        cap = txt.decode("utf-8").strip()
    elif js is not None:
        cap = _json_caption(js)[0].strip()
    else:
        raise ValueError("no .txt or .json caption")
    if not cap:
        raise ValueError("empty caption")
    return cap


def _iter_tar_captions(path):
    try:
        tf = tarfile.open(path, "r:*")
    except tarfile.TarError as e:
        raise ValueError(f"{path}: not a readable tar file ({e})") from None
    key = None
    with tf:
        try:
            for key, members in tar_groups(tf):
                read = lambda ext: tf.extractfile(members[ext]).read() if ext in members else None  # noqa: E731
                try:
                    yield key, caption_of(read("txt"), read("json")), None
                except ValueError as e:
                    yield key, None, f"{path}:{key}: {'not UTF-8' if isinstance(e, UnicodeDecodeError) else e}"
        except (tarfile.TarError, EOFError, OSError) as e:
            yield None, None, f"{path}: truncated or corrupt tar after key {key!r} ({e.__class__.__name__})"


# ---------------------------------------------------------------- image-text shards (paper mode)
# Training data as CC12M is distributed: webdataset tar shards (KEY.jpg|jpeg|png|webp beside
# KEY.txt or KEY.json), or a folder with captions.tsv / captions.jsonl naming image files. The
# stream is exactly resumable: a worker's state is small (where it is in its shards, the
# shuffle buffer as references into the shards, its random generator) and travels with every
# batch, so a checkpoint can hold the state of the batches it has consumed.
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # the official training norm
CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
NORMS = {"imagenet": (IMAGENET_MEAN, IMAGENET_STD), "clip": (CLIP_MEAN, CLIP_STD)}  # --norm
SKIPS = ("unpaired", "bad_image", "bad_caption", "truncated")  # what the stream skips and counts


def _braces(pattern):
    """Brace expansion as the shell and webdataset do: "a{00..02}b" -> a00b a01b a02b (zero
    padding kept), "{x,y}" -> x y; nested and repeated braces expand left to right."""
    m = re.search(r"\{([^{}]*)\}", pattern)
    if not m:
        return [pattern]
    head, body, tail = pattern[:m.start()], m.group(1), pattern[m.end():]
    r = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if r:
        lo, hi = int(r.group(1)), int(r.group(2))
        width = len(r.group(1)) if r.group(1).startswith("0") else 0
        items = [str(i).zfill(width) for i in range(lo, hi + 1)]
    else:
        items = body.split(",")
    return [x for item in items for x in _braces(head + item + tail)]


def expand_shards(spec, flag="--data"):
    """--data (or `flag`, named in errors) as a list of sources: tar shards given by brace lists
    and globs (several specs separated by spaces or given as a list), or a folder holding
    captions.tsv / captions.jsonl (with an "image" column or field: image paths relative to the
    folder)."""
    import glob
    specs = spec.split() if isinstance(spec, str) else list(spec)
    sources = []
    for one in specs:
        if os.path.isdir(one):
            table = next((os.path.join(one, f) for f in ("captions.tsv", "captions.jsonl")
                          if os.path.isfile(os.path.join(one, f))), None)
            if table is None:
                raise ValueError(f"{flag} {one}: a folder needs captions.tsv or captions.jsonl")
            sources.append(table)
            continue
        for p in _braces(one):
            found = sorted(glob.glob(p)) if glob.has_magic(p) else ([p] if os.path.isfile(p) else [])
            if not found:
                raise ValueError(f"{flag} {one}: no file matches {p}")
            sources += found
    if not sources:
        raise ValueError(f"{flag} {spec!r}: no shards")
    return sources


def random_resized_crop(width, height, rng, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)):
    """(x, y, w, h) of torchvision's RandomResizedCrop: up to 10 tries at an area fraction in
    `scale` and a log-uniform aspect ratio in `ratio`, else the centre crop clamped to `ratio`."""
    area = width * height
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
        w, h = int(round(math.sqrt(target * aspect))), int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1)), w, h
    aspect = width / height
    w, h = (width, round(width / ratio[0])) if aspect < ratio[0] else \
        (round(height * ratio[1]), height) if aspect > ratio[1] else (width, height)
    return (width - w) // 2, (height - h) // 2, w, h


def train_transform(image, size, rng, mean, std, scale=(0.08, 1.0)):
    """A PIL image -> (3, size, size) float32: random resized crop (area fraction in `scale`, the
    official img_scale), horizontal flip, normalised (the official training transform without
    its colour jitter, RandAugment and random erasing)."""
    from PIL import Image
    x, y, w, h = random_resized_crop(image.width, image.height, rng, scale)
    image = image.resize((size, size), Image.BILINEAR, box=(x, y, x + w, y + h))
    a = np.asarray(image, np.float32) / 255
    if rng.uniform() < 0.5:
        a = a[:, ::-1]
    a = (a - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    return torch.from_numpy(np.ascontiguousarray(a.transpose(2, 0, 1)))


def as_is(batch):
    """A DataLoader's collate_fn for a dataset that yields whole batches."""
    return batch


class ImageTextStream(torch.utils.data.IterableDataset):
    """Endless batches of (image, caption, tag row) from shards, for a DataLoader with
    batch_size=None: each worker yields whole batches.

    Split without duplicates: each epoch the sources are shuffled (seed, epoch) and source i
    goes to slot i mod (ranks x workers); a slot with one source fewer than others starts its
    next epoch that much earlier. A worker scans its sources into a shuffle buffer of
    references (source, tag row, key, byte ranges or an image path) and reads and decodes a
    sample only when it leaves the buffer. Skipped and counted, never fatal: a sample without
    its image or caption ("unpaired"), an image that does not decode ("bad_image"), a caption
    that is not UTF-8 or is empty ("bad_caption"), a tar that ends early ("truncated": the
    rest of that shard is lost).

    Batch: {"images" (B, 3, S, S), "tokens" (B, L), "rows" (B,) tag rows (-1 without tags),
    "epochs" (B,), "worker": its logical worker, "state": that worker's state after the batch}.
    Batch g of the stream comes from worker g mod W (the DataLoader's round robin), so
    resume(states, g) restarts every worker where the batches consumed so far left it.
    """

    def __init__(self, sources, tags, tokenizer, context_length, batch_size, image_size=224,
                 seed=0, buffer=1000, mean=IMAGENET_MEAN, std=IMAGENET_STD, rank=0, ranks=1, workers=0,
                 crop_scale=(0.08, 1.0)):
        super().__init__()
        self.crop_scale = crop_scale
        self.sources, self.tags, self.tokenizer = sources, tags, tokenizer
        self.context_length, self.batch_size, self.image_size = context_length, batch_size, image_size
        self.seed, self.buffer, self.mean, self.std = seed, max(buffer, 1), mean, std
        self.rank, self.ranks, self.workers = rank, ranks, max(workers, 1)
        self.states, self.step = {}, 0
        if len(sources) < self.ranks * self.workers:
            raise ValueError(f"--data has {len(sources)} shards for {self.ranks} ranks x {self.workers} "
                             f"workers: give fewer --workers or more shards")
        for p in sources:
            if not p.endswith(".tar"):
                with open(p, "rb") as f:
                    head = f.readline().decode("utf-8", "replace").lower()
                fields = head.rstrip("\r\n").split("\t") if p.endswith(".tsv") else json.loads(head or "{}")
                if "image" not in fields or "key" in fields:
                    raise ValueError(f"--data {p}: a captions table needs an 'image' column (the image path, "
                                     f"relative to its folder, is the sample's key) and no 'key' column")
        self._tables = {}

    def resume(self, states, step):
        """Continue from the worker states of a checkpoint taken after `step` batches."""
        self.states, self.step = {int(k): v for k, v in states.items()}, step

    # -- reading sources
    def _refs(self, i, resume, counts):
        """References to the samples of source i, each with the position to resume after it:
        (source, row in source, key, image, caption). A tar's image and caption are byte ranges;
        a table's image is a path and its caption the text. Unpaired samples are counted."""
        path = self.sources[i]
        if not path.endswith(".tar"):
            if i not in self._tables:  # read once per worker
                self._tables[i] = [(k, c) for k, c, _ in iter_captions(path)]
            for j, (key, cap) in enumerate(self._tables[i][resume or 0:], resume or 0):
                if cap is None:
                    counts["bad_caption"] += 1
                else:
                    yield (i, j, key, os.path.join(os.path.dirname(path), key), cap), j + 1
            return
        offset, j, skip = resume or (0, 0, False)  # skip: the group at offset was taken before
        size, end = os.path.getsize(path), offset  # end: where the last member's data blocks end
        with open(path, "rb") as f:
            f.seek(offset)
            try:
                for key, members in tar_groups(tarfile.open(fileobj=f, mode="r:")):
                    end = max(m.offset_data + -(-m.size // 512) * 512 for m in members.values())
                    if end > size:
                        raise EOFError  # a cut member: tarfile reads its header and stops quietly
                    here = (min(m.offset for m in members.values()), j, True)  # resume after this one
                    j += 1
                    if skip:
                        skip = False
                        continue
                    img = next((members[e] for e in IMAGE_EXTENSIONS if e in members), None)
                    cap = members.get("txt") or members.get("json")
                    if img is None or cap is None:
                        counts["unpaired"] += 1
                        continue
                    ext = "txt" if "txt" in members else "json"
                    yield (i, j - 1, key, (img.offset_data, img.size), (cap.offset_data, cap.size, ext)), here
                f.seek(end)  # a whole tar ends in zero blocks; one cut between members does not
                if f.read(512).strip(b"\0") or f.tell() - end < 512:
                    raise EOFError
            except (tarfile.TarError, EOFError, OSError):
                counts["truncated"] += 1

    def _load(self, ref, rng):
        """A reference -> (image tensor, caption), or the name of the skip count it falls under."""
        from PIL import Image
        i, _, _, img, cap = ref
        if not isinstance(img, str):  # a tar: read both byte ranges
            with open(self.sources[i], "rb") as f:
                f.seek(img[0])
                raw = f.read(img[1])
                f.seek(cap[0])
                text = f.read(cap[1])
            try:
                cap = caption_of(text, None) if cap[2] == "txt" else caption_of(None, text)
            except ValueError:
                return "bad_caption"
            img = io.BytesIO(raw)
        try:
            with Image.open(img) as image:
                return train_transform(image.convert("RGB"), self.image_size, rng, self.mean, self.std,
                                       self.crop_scale), cap
        except Exception:  # corrupt, truncated, missing or not an image
            return "bad_image"

    def _collate(self, batch, logical, state):
        images, captions, rows, epochs = zip(*batch)
        return {"images": torch.stack(images), "tokens": self.tokenizer(list(captions), self.context_length),
                "rows": torch.tensor(rows), "epochs": torch.tensor(epochs), "worker": logical, "state": state}

    # -- the stream
    def _slot(self, logical):
        return self.rank * self.workers + logical

    def _my_sources(self, epoch, logical):
        order = np.random.default_rng([self.seed, epoch]).permutation(len(self.sources))
        return order[self._slot(logical)::self.ranks * self.workers].tolist()

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        if (info.num_workers if info else 1) != self.workers:
            raise ValueError(f"ImageTextStream made for {self.workers} workers, read by {info.num_workers if info else 1}")
        logical = ((info.id if info else 0) + self.step) % self.workers  # the round robin goes on
        st = self.states.get(logical) or {
            "epoch": 0, "cursor": 0, "resume": None, "buffer": [], "counts": dict.fromkeys(SKIPS, 0),
            "rng": np.random.default_rng([self.seed, self._slot(logical)]).bit_generator.state}
        rng = np.random.default_rng()
        rng.bit_generator.state = st["rng"]
        epoch, cursor, resume, counts = st["epoch"], st["cursor"], st["resume"], dict(st["counts"])
        buffer = [tuple(x) for x in st["buffer"]]  # (reference with its tag row, epoch)
        batch, idle = [], 0
        while True:
            sources, pushed, tried, loaded = self._my_sources(epoch, logical), 0, 0, 0
            for cursor in range(cursor, len(sources)):
                i = sources[cursor]
                for ref, resume in self._refs(i, resume, counts):
                    row = self.tags.row(i, ref[1], ref[2]) if self.tags is not None else -1
                    buffer.append(((i, row, *ref[2:]), epoch))
                    pushed += 1
                    while len(buffer) >= self.buffer:  # full: one leaves at random
                        ref_out, e = buffer.pop(int(rng.integers(len(buffer))))
                        sample = self._load(ref_out, rng)
                        tried += 1
                        if isinstance(sample, str):
                            counts[sample] += 1
                            continue
                        loaded += 1
                        batch.append((*sample, ref_out[1], e))
                        if len(batch) == self.batch_size:
                            state = {"epoch": epoch, "cursor": cursor, "resume": resume, "counts": dict(counts),
                                     "buffer": [[list(r), e] for r, e in buffer], "rng": rng.bit_generator.state}
                            yield self._collate(batch, logical, state)
                            batch = []
                resume = None
            epoch, cursor = epoch + 1, 0
            idle = 0 if pushed and (loaded or not tried) else idle + 1
            if idle >= 2:  # two epochs without a usable sample: fail rather than hang
                raise RuntimeError(f"worker {logical}: its shards gave no usable sample in a whole epoch "
                                   f"(skipped: {counts})")
