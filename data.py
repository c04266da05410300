"""Paper-mode training data: caption files (txt, tsv, jsonl, webdataset tars), shard
expansion, and ImageTextStream, which streams image-text shards for a DataLoader with exact
resume, each worker building whole batches (images through augment.py, tokens, tag targets);
the image normalisations (ImageNet's, CLIP's); write_atomic and write_tar, how checkpoints,
tag files, shards and segment's outputs are written.
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

from augment import Augment


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


def write_tar(path, members):
    """A tar of (name, bytes) members, in the order given (an iterable: written as it comes),
    as webdataset shards are; returns the path."""
    with tarfile.open(path, "w") as tf:
        for name, payload in members:
            info = tarfile.TarInfo(name)  # mtime 0, mode 0644: the same bytes on every run
            info.size = len(payload)
            tf.addfile(info, io.BytesIO(payload))
    return str(path)


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
# shuffle buffer as sample numbers in the shards, its random generator) and travels with every
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


def as_is(batch):
    """A DataLoader's collate_fn for a dataset that yields whole batches."""
    return batch


def shared_empty(shape, dtype):
    """torch.empty(shape), in shared memory when called in a DataLoader worker: a batch built in
    it crosses to the main process as a handle, not a copy (as torch's default_collate does)."""
    if torch.utils.data.get_worker_info() is None:
        return torch.empty(shape, dtype=dtype)
    storage = torch.empty(0, dtype=dtype)._typed_storage()._new_shared(math.prod(shape))
    return torch.empty(0, dtype=dtype).new(storage).view(shape)


class ImageTextStream(torch.utils.data.IterableDataset):
    """Endless batches of (image, caption, tags) from shards, for a DataLoader with
    batch_size=None: each worker yields whole batches, built where they are read.

    Split without duplicates: each epoch the sources are shuffled (seed, epoch) and source i
    goes to slot i mod (ranks x workers); a slot with one source fewer than others starts its
    next epoch that much earlier. A worker scans its sources into a shuffle buffer of
    references (source, sample, key, byte ranges or an image path) and reads, decodes and
    augments a sample (augment.Augment: `augment` "official" or "light", `decode` "draft" or
    "full") only when it leaves the buffer, straight into its slot of the batch. Skipped and
    counted, never fatal: a sample without its image or caption ("unpaired"), an image that does
    not decode ("bad_image"), a caption that is not UTF-8 or is empty ("bad_caption"), a tar that
    ends early ("truncated": the rest of that shard is lost).

    Batch: {"images" (B, 3, S, S) float32, "tokens" (B, L), "targets" (B, K) bool multi-hot tags
    (K = 0 without tags), "rows" (B,) tag rows (-1 without tags), "epochs" (B,), "worker": its
    logical worker, "state": that worker's state after the batch}. Batch g of the stream comes
    from worker g mod W (the DataLoader's round robin), so resume(states, g) restarts every
    worker where the batches consumed so far left it.

    A state is small, so that every batch can carry one: where the worker is (epoch, source,
    position in it), its skip counts, its random generator, and the shuffle buffer as three
    lists of ints (source, sample number in the source, epoch), about 8 bytes a sample pickled;
    the references themselves are found again by scanning those sources on resume.
    """

    def __init__(self, sources, tags, tokenizer, context_length, batch_size, image_size=224,
                 seed=0, buffer=1000, mean=IMAGENET_MEAN, std=IMAGENET_STD, rank=0, ranks=1, workers=0,
                 crop_scale=(0.08, 1.0), augment="official", decode="draft"):
        super().__init__()
        self.augment = Augment(kind=augment, size=image_size, crop_scale=crop_scale, mean=mean, std=std,
                               decode=decode)
        self.sources, self.tags, self.tokenizer = sources, tags, tokenizer
        self.context_length, self.batch_size, self.image_size = context_length, batch_size, image_size
        self.seed, self.buffer = seed, max(buffer, 1)
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
        (source, sample number in source, key, image, caption). A tar's image and caption are
        byte ranges; a table's image is a path and its caption the text. Unpaired samples are
        counted."""
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

    def _row(self, ref):
        """The tag row of a reference (-1 without tags); checks its key against the tags."""
        return self.tags.row(ref[0], ref[1], ref[2]) if self.tags is not None else -1

    def _read(self, ref):
        """A reference -> (the image as bytes or a path, the caption); ValueError for a caption
        that is not UTF-8 or is empty."""
        i, _, _, img, cap = ref
        if isinstance(img, str):  # a table: the image's path and the caption's text
            return img, cap
        with open(self.sources[i], "rb") as f:  # a tar: both byte ranges
            f.seek(img[0])
            raw = f.read(img[1])
            f.seek(cap[0])
            text = f.read(cap[1])
        return raw, caption_of(text, None) if cap[2] == "txt" else caption_of(None, text)

    def _load(self, ref, rng, out):
        """Read, decode and augment a reference into `out` (a (3, S, S) slot of the batch):
        (caption, None), or (None, the name of the skip count it falls under)."""
        try:
            src, cap = self._read(ref)
        except ValueError:
            return None, "bad_caption"
        try:
            self.augment(src, rng, out)
        except Exception:  # corrupt, truncated, missing or not an image
            return None, "bad_image"
        return cap, None

    def _batch(self, images, captions, rows, epochs, logical, state):
        """The batch's text side, tokens and multi-hot targets, made here (in the worker)."""
        rows = torch.tensor(rows, dtype=torch.int64)
        targets = (self.tags.targets(rows.numpy()) if self.tags is not None
                   else torch.zeros(len(rows), 0, dtype=torch.bool))
        return {"images": images, "tokens": self.tokenizer(captions, self.context_length), "targets": targets,
                "rows": rows, "epochs": torch.tensor(epochs), "worker": logical, "state": state}

    def _rebuild(self, saved):
        """A saved shuffle buffer {"sources", "samples", "epochs"} -> [(reference, tag row,
        epoch)] in its order, each reference found again by scanning its source."""
        wanted = {}
        for i, j in zip(saved["sources"], saved["samples"]):
            wanted.setdefault(i, set()).add(j)
        found, unused = {}, dict.fromkeys(SKIPS, 0)
        for i, js in wanted.items():
            refs = self._refs(i, None, unused)
            for ref, _ in refs:
                if ref[1] in js:
                    found[i, ref[1]] = ref
                    js.discard(ref[1])
                    if not js:
                        break
            refs.close()
            if js:
                raise ValueError(f"--resume: {self.sources[i]} no longer holds sample {min(js)} of the saved "
                                 f"shuffle buffer (the shard changed since the checkpoint)")
        return [(found[i, j], self._row(found[i, j]), e)
                for i, j, e in zip(saved["sources"], saved["samples"], saved["epochs"])]

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
            "epoch": 0, "cursor": 0, "resume": None, "counts": dict.fromkeys(SKIPS, 0),
            "buffer": {"sources": [], "samples": [], "epochs": []},
            "rng": np.random.default_rng([self.seed, self._slot(logical)]).bit_generator.state}
        rng = np.random.default_rng()
        rng.bit_generator.state = st["rng"]
        epoch, cursor, resume, counts = st["epoch"], st["cursor"], st["resume"], dict(st["counts"])
        buffer = self._rebuild(st["buffer"])  # [(reference, tag row, epoch)]
        S, images, captions, rows, epochs, idle = self.image_size, None, [], [], [], 0
        while True:
            sources, pushed, tried, loaded = self._my_sources(epoch, logical), 0, 0, 0
            for cursor in range(cursor, len(sources)):
                i = sources[cursor]
                for ref, resume in self._refs(i, resume, counts):
                    buffer.append((ref, self._row(ref), epoch))
                    pushed += 1
                    while len(buffer) >= self.buffer:  # full: one leaves at random
                        ref_out, row, e = buffer.pop(int(rng.integers(len(buffer))))
                        if images is None:  # (B, 3, S, S), filled slot by slot
                            images = shared_empty((self.batch_size, 3, S, S), torch.float32)
                        cap, skip = self._load(ref_out, rng, images[len(captions)])
                        tried += 1
                        if skip:  # the slot is written again by the next sample
                            counts[skip] += 1
                            continue
                        loaded += 1
                        captions.append(cap)
                        rows.append(row)
                        epochs.append(e)
                        if len(captions) == self.batch_size:
                            state = {"epoch": epoch, "cursor": cursor, "resume": resume, "counts": dict(counts),
                                     "buffer": {"sources": [r[0] for r, _, _ in buffer],
                                                "samples": [r[1] for r, _, _ in buffer],
                                                "epochs": [e for _, _, e in buffer]},
                                     "rng": rng.bit_generator.state}
                            yield self._batch(images, captions, rows, epochs, logical, state)
                            images, captions, rows, epochs = None, [], [], []
                resume = None
            epoch, cursor = epoch + 1, 0
            idle = 0 if pushed and (loaded or not tried) else idle + 1
            if idle >= 2:  # two epochs without a usable sample: fail rather than hang
                raise RuntimeError(f"worker {logical}: its shards gave no usable sample in a whole epoch "
                                   f"(skipped: {counts})")
