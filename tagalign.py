"""TagAlign: CLIP-style image-text alignment plus multi-tag classification (arXiv 2312.14149).

The training side: the two losses wired from `kernels/`, AdamW, the world's training stream, the
training loop with atomic checkpoints and `--resume`, and the command line (`train`, `tags`).
The model is in model.py, the evaluator in eval_seg.py, the data in data.py.

    python tagalign.py train                 # the synthetic world, from scratch, on a CPU
    python tagalign.py train --tag-weight 0  # the ITC-only baseline
    python tagalign.py tags --captions caps.txt --out tags/
"""
import argparse
import contextlib
import dataclasses
import json
import math
import os
import random
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

import data
import eval_seg
import kernels
from model import Config, SegmentationModel, TagAlign, read_checkpoint


# ---------------------------------------------------------------- losses
def compute_loss(model, images, tokens, tag_tokens, targets, args):
    """Total loss = ITC + tag_weight x tag loss, as in the paper; returns (total, itc, tag).

    images (B, 3, H, W), tokens (B, L) captions, tag_tokens (K, L) the tag names, targets (B, K)
    multi-hot tags parsed from the captions. In world mode the tag embeddings come from the text
    encoder being trained, embedded afresh each step (in CLIP mode they are frozen CLIP text
    embeddings).
    """
    img = F.normalize(model.encode_image(images), dim=-1)  # (B, E)
    txt = F.normalize(model.encode_text(tokens), dim=-1)  # (B, E)
    scale = model.itc_logit_scale.exp().clamp(max=100)  # CLIP's cap on the temperature
    itc = kernels.clip_loss(img, txt, scale, impl=args.kernels)
    if args.tag_weight == 0:  # the ITC-only baseline: tags are not even embedded
        return itc, itc, torch.zeros_like(itc)
    # --tag-grad image is the paper's wiring: tag embeddings are targets the tag loss does not move,
    # as frozen CLIP's are. From scratch (the default, both) the tag loss also teaches the text
    # tower the tag words: ITC alone leaves "a triangle." and "a cross." at cosine 0.98 on the
    # world, and a detached tag loss cannot then tell the two shapes apart (README, results).
    with torch.no_grad() if args.tag_grad == "image" else contextlib.nullcontext():
        tag_emb = F.normalize(model.encode_text(tag_tokens), dim=-1)  # (K, E)
    tag_scale = model.tag_logit_scale.exp().clamp(max=100)
    tag = kernels.tag_loss(img, tag_emb, targets, tag_scale, kind=args.tag_loss, impl=args.kernels)
    return itc + args.tag_weight * tag, itc, tag


# ---------------------------------------------------------------- optimizer
def make_optimizer(model, args):
    """AdamW as the paper: eps 1e-6, weight decay 0.05 on matrices only (no decay on 1-d params)."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": args.weight_decay},
              {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.98), eps=1e-6)


def lr_at(step, args):
    """Linear warmup, then cosine decay to 10% (the paper keeps it constant over 30k steps; a
    few thousand steps from scratch converge better with a decay)."""
    warmup = max(1, int(args.warmup * args.steps))
    if step < warmup:
        return args.lr * (step + 1) / warmup
    t = (step - warmup) / max(1, args.steps - warmup)
    return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(t, 1.0))))


# ---------------------------------------------------------------- settings from the command line
def parse_value(text, current):
    """text parsed as the type of the setting's current value: bool, int, float, str, or a
    comma-separated tuple of the type of its first element."""
    if isinstance(current, bool):
        if text.lower() not in ("true", "false", "1", "0", "yes", "no"):
            raise ValueError("expected true or false")
        return text.lower() in ("true", "1", "yes")
    if isinstance(current, tuple):
        kind = type(current[0]) if current else str
        return tuple(parse_value(x.strip(), kind()) for x in text.split(",") if x.strip())
    return type(current)(text)  # int, float or str: int("2.5") fails, as it should


def apply_settings(settings, cfg, world):
    """nanoGPT's configurator with validation: each --set key=value changes a Config field
    (vision_layers=2) or a world setting (world.pairs=false), parsed as the field's type.
    An unknown key, a bad value or a shape that cannot be built: one line naming it."""
    for item in settings:
        key, sep, text = item.partition("=")
        target, field = (world, key[len("world."):]) if key.startswith("world.") else (cfg, key)
        names = [f.name for f in dataclasses.fields(target)]
        if not sep or field not in names:
            raise SystemExit(f"error: --set {item}: unknown setting; model: {', '.join(f.name for f in dataclasses.fields(cfg))}; "
                             f"world: {', '.join('world.' + f.name for f in dataclasses.fields(world))}")
        try:
            setattr(target, field, parse_value(text, getattr(target, field)))
        except ValueError as e:
            raise SystemExit(f"error: --set {item}: {e}") from None
    try:
        cfg.check(), world.check()
    except ValueError as e:
        raise SystemExit(f"error: --set: {e}") from None
    return cfg, world


# ---------------------------------------------------------------- world data: tokenizer, tags, batches
def build_world_text(args, world):
    """Tokenizer and tag vocabulary learned from a corpus of world captions (the training split).

    Tags come from the tag parser run on the captions, exactly as on real data; nothing is read
    from the world's internals.
    """
    corpus = [world.caption(i) for i in range(args.corpus)]
    tokenizer = data.Tokenizer.train(corpus, vocab_size=args.vocab_size)
    vocab = data.build_vocab(corpus, top_objects=args.top_tags, top_attributes=args.top_tags,
                             min_count=args.min_tag_count)
    return tokenizer, vocab


def world_batch(world, step, batch_size, tokenizer, vocab, cfg):
    """Batch `step` of the endless training stream: a pure function of (seed, step), which is
    what makes --resume exact. Returns images (B, 3, H, W), tokens (B, L), targets (B, K)."""
    scenes = [world.sample(step * batch_size + i) for i in range(batch_size)]
    images = data.to_tensor(np.stack([s.image for s in scenes]), data.WORLD_MEAN, data.WORLD_STD)
    captions = [s.caption for s in scenes]
    tokens = tokenizer(captions, cfg.context_length)
    targets = torch.zeros(batch_size, len(vocab.tags), dtype=torch.bool)
    for i, caption in enumerate(captions):
        targets[i, vocab.encode(caption)] = True
    return images, tokens, targets


def tag_texts(vocab):
    return [data.WORLD_TEMPLATES[0].format(t) for t in vocab.tags]


# ---------------------------------------------------------------- checkpoints
def save_checkpoint(path, model, optimizer, step, args, tokenizer, vocab, world):
    """Everything --resume needs, written atomically: a crash mid-write leaves the old file."""
    state = {
        "model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step,
        "rng": {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()},
        "config": dataclasses.asdict(model.cfg), "world": dataclasses.asdict(world.cfg), "args": vars(args),
        "tokenizer": tokenizer.state_dict(), "tags": vocab.tags,
    }
    tmp = path + ".tmp"
    torch.save(state, tmp)
    os.replace(tmp, path)


# ---------------------------------------------------------------- training
RESUME_MUST_MATCH = ("steps", "batch_size", "lr", "warmup", "weight_decay", "seed", "tag_weight",
                     "tag_loss", "tag_grad", "corpus", "vocab_size", "top_tags", "min_tag_count", "set")


def train(args):
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    random.seed(args.seed)
    os.makedirs(args.out, exist_ok=True)
    ckpt_path = os.path.join(args.out, "ckpt.pt")
    ckpt = None
    if args.resume:
        ckpt = read_checkpoint(ckpt_path)
        for k in RESUME_MUST_MATCH:  # a resumed run must be the same run
            if ckpt["args"][k] != getattr(args, k):
                raise SystemExit(f"error: {ckpt_path} was trained with --{k.replace('_', '-')} "
                                 f"{ckpt['args'][k]}, this command says {getattr(args, k)}")

    cfg = Config(**ckpt["config"]) if ckpt else Config()
    if ckpt:
        tokenizer = data.Tokenizer.from_state_dict(ckpt["tokenizer"])
        vocab = data.TagVocab.from_tags(ckpt["tags"])
    else:
        t0 = time.time()
        tokenizer, vocab = build_world_text(args, cfg)
        cfg.vocab_size = tokenizer.vocab_size
        print(f"world text: {args.corpus} captions, {tokenizer.vocab_size} tokens, {len(vocab.tags)} tags "
              f"({time.time() - t0:.1f}s): {' '.join(vocab.tags)}")
    world = data.World(args.seed, cfg.image_size)
    tag_tokens = tokenizer(tag_texts(vocab), cfg.context_length)  # (K, L)

    model = TagAlign(cfg)
    optimizer = make_optimizer(model, args)
    start = 0
    if ckpt:
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        torch.set_rng_state(ckpt["rng"]["torch"])
        np.random.set_state(ckpt["rng"]["numpy"])
        random.setstate(ckpt["rng"]["python"])
        start = ckpt["step"] + 1
        print(f"resumed from {ckpt_path} at step {start}")
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params / 1e6:.2f}M parameters, grid {cfg.image_size // cfg.patch_size}^2, "
          f"tag weight {args.tag_weight} ({args.tag_loss}), kernels {args.kernels}")

    bar = tqdm(range(start, args.steps), initial=start, total=args.steps, disable=args.quiet,
               dynamic_ncols=True)
    log_path = os.path.join(args.out, "log.jsonl")
    rows = []
    if ckpt and os.path.exists(log_path):  # keep the log up to the checkpoint: no step twice
        with open(log_path) as f:
            rows = [line for line in f if json.loads(line)["step"] < start]
    log = open(log_path, "w")
    log.writelines(rows)
    t_train, seen = 0.0, 0
    # The next batch is drawn in a thread while this one trains: world generation is numpy and
    # Python, and torch releases the GIL inside its kernels, so the two overlap.
    prefetch = ThreadPoolExecutor(1)
    fetch = lambda s: world_batch(world, s, args.batch_size, tokenizer, vocab, cfg)  # noqa: E731
    pending = prefetch.submit(fetch, start)
    for step in bar:
        t0 = time.time()
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, args)
        images, tokens, targets = pending.result()
        if step + 1 < args.steps:
            pending = prefetch.submit(fetch, step + 1)
        loss, itc, tag = compute_loss(model, images, tokens, tag_tokens, targets, args)
        if not torch.isfinite(loss):
            raise SystemExit(f"error: loss is {loss.item()} at step {step} (itc {itc.item()}, "
                             f"tag {tag.item()}); lower --lr or check the data")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        optimizer.step()
        t_train += time.time() - t0
        seen += args.batch_size
        bar.set_postfix(loss=f"{loss.item():.3f}", img_s=f"{seen / t_train:.0f}")
        if step % args.log_every == 0 or step == args.steps - 1:
            row = {"step": step, "loss": loss.item(), "itc": itc.item(), "tag": tag.item(),
                   "lr": lr_at(step, args), "scale": model.itc_logit_scale.exp().item(),
                   "img_per_s": seen / t_train}
            log.write(json.dumps(row) + "\n")
            log.flush()
            if args.quiet or step % (10 * args.log_every) == 0:
                tqdm.write(" ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()))
        if args.ckpt_every and step > start and step % args.ckpt_every == 0:
            save_checkpoint(ckpt_path, model, optimizer, step, cfg, args, tokenizer, vocab)
    bar.close()
    log.close()
    prefetch.shutdown()
    if start <= args.steps:  # the final checkpoint (a finished run resumed has nothing to add)
        save_checkpoint(ckpt_path, model, optimizer, args.steps, cfg, args, tokenizer, vocab)
    if t_train:
        print(f"trained {args.steps - start} steps in {t_train:.0f}s ({seen / t_train:.0f} images/s)")
    if args.eval_images:
        seg = SegmentationModel(model, tokenizer)
        eval_seg.run_benchmarks(seg, list(data.WORLD_BENCHMARKS), out_dir=args.out, n_images=args.eval_images,
                                extra={"config": dataclasses.asdict(cfg), "args": vars(args)})
    return model


# ---------------------------------------------------------------- command line
def build_parser():
    """The command line: `train` and `tags`, with their flags and defaults."""
    parser = argparse.ArgumentParser(description="TagAlign: train, or tag a caption corpus.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train (default: from scratch on the synthetic world) and evaluate")
    p.add_argument("--steps", type=int, default=1500, help="optimizer steps")
    p.add_argument("--batch-size", type=int, default=64, help="images (and captions) per step")
    p.add_argument("--lr", type=float, default=1e-3, help="peak learning rate of AdamW")
    p.add_argument("--warmup", type=float, default=0.05, help="fraction of the steps spent warming up the lr")
    p.add_argument("--weight-decay", type=float, default=0.05, help="AdamW weight decay on matrices")
    p.add_argument("--grad-clip", type=float, default=5.0, help="clip the gradient norm to this")
    p.add_argument("--seed", type=int, default=0, help="seed of the initialisation and of the training stream")
    p.add_argument("--tag-weight", type=float, default=1.0, help="weight of the tag loss; 0 = the ITC-only baseline")
    p.add_argument("--tag-loss", choices=("softmax", "bce"), default="softmax",
                   help="softmax: soft-target CE over all tags (the paper); bce: per-tag binary CE (ablation)")
    p.add_argument("--tag-grad", choices=("both", "image"), default="both",
                   help="which towers the tag loss trains: both (the text tower learns the tag words too), "
                        "or image (tag embeddings detached, like the paper's frozen CLIP ones)")
    p.add_argument("--kernels", choices=("auto", "triton", "torch"), default="auto",
                   help="loss implementation: fused Triton kernels, the PyTorch reference, or auto (Triton on CUDA)")
    p.add_argument("--corpus", type=int, default=20000, help="world captions used to learn the tokenizer and tag vocabulary")
    p.add_argument("--vocab-size", type=int, default=1024, help="BPE vocabulary size learned on the world captions")
    p.add_argument("--top-tags", type=int, default=10000, help="most frequent objects (and as many attributes) kept as tags")
    p.add_argument("--min-tag-count", type=int, default=5, help="a tag must occur this often in the corpus")
    p.add_argument("--eval-images", type=int, default=500, help="validation images per world benchmark (0: no evaluation)")
    p.add_argument("--out", default="out", help="output folder: ckpt.pt, log.jsonl, metrics.json, vis/")
    p.add_argument("--resume", action="store_true", help="continue from OUT/ckpt.pt exactly where it stopped")
    p.add_argument("--ckpt-every", type=int, default=250, help="write OUT/ckpt.pt every N steps (0: only at the end)")
    p.add_argument("--log-every", type=int, default=25, help="append a line to OUT/log.jsonl every N steps")
    p.add_argument("--quiet", action="store_true", help="no progress bar; print the log lines instead")

    p = sub.add_parser("tags", help="parse a caption corpus into a tag vocabulary and per-sample tags")
    p.add_argument("--captions", nargs="+", required=True, metavar="FILE",
                   help="caption files: .txt (one caption a line), .tsv (header with a 'caption' column), "
                        ".jsonl ({\"caption\": ...} a line) or webdataset .tar shards (KEY.txt / KEY.json)")
    p.add_argument("--out", required=True, help="output folder: vocab.json, tag_offsets.npy, tag_ids.npy")
    p.add_argument("--top-objects", type=int, default=9000, help="most frequent objects kept as tags")
    p.add_argument("--top-attributes", type=int, default=1000, help="most frequent attributes kept as tags")
    p.add_argument("--min-count", type=int, default=5, help="a tag must occur in at least this many captions")
    p.add_argument("--workers", type=int, default=None, help="parser processes (default: all cores)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "tags":
        try:
            stats = data.tag_files(args.captions, args.out, top_objects=args.top_objects,
                                   top_attributes=args.top_attributes, min_count=args.min_count,
                                   workers=args.workers, progress=not args.quiet)
        except (ValueError, FileNotFoundError) as e:
            raise SystemExit(f"error: {e}")
        print(data.format_tag_stats(stats))
        return stats
    if args.command == "train":
        for flag in ("steps", "batch_size", "corpus", "vocab_size"):
            if getattr(args, flag) < 1:
                parser.error(f"--{flag.replace('_', '-')} must be at least 1")
        if args.lr <= 0 or args.tag_weight < 0:
            parser.error("--lr must be positive and --tag-weight non-negative")
        return train(args)


if __name__ == "__main__":
    main()
