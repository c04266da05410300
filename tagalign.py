"""TagAlign: CLIP-style image-text alignment plus multi-tag classification (arXiv 2312.14149).

The training program, top to bottom: the two losses wired from kernels/, AdamW and its
schedule, `--set`, checkpoints, each mode's setup (the world from scratch, the paper's decoder
on a frozen CLIP, a CLIP pretrained on the world), which hands the training loop one Run, the
loop (`train`), and the command line (`train`, `pretrain`, `tags`, `shards`, `segment`).

    python tagalign.py train                 # the synthetic world, from scratch, on a CPU
    python tagalign.py train --tag-weight 0  # the ITC-only baseline
    python tagalign.py tags --captions caps.txt --out tags/
    torchrun --standalone --nproc_per_node 8 tagalign.py train --clip ... --data ... --tags ...

Where the rest lives:
    model.py        config, the hand-written CLIP, TagAlign's head, OpenAI CLIP files, checkpoint reading
    kernels/        the fused losses, each beside its PyTorch reference
    tokenizer.py    CLIP's text cleaning and byte-level BPE
    tags.py         the tag parser, the tag vocabulary, the `tags` command's files, ShardTags
    world.py        the synthetic world, its shards and its three benchmarks
    data.py         caption files, image-text shards and their stream, normalisations, write_atomic
    augment.py      the official training augmentation
    distributed.py  torchrun: collectives, SyncBatchNorm2d, the DDP plumbing
    eval_seg.py     the zero-shot segmentation evaluator, its models and pictures
    segment.py      your own images with your own class names (the `segment` command)
    bench.py        speed and memory
"""
import argparse
import contextlib
import dataclasses
import functools
import hashlib
import json
import math
import os
import random
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

import data
import distributed
import eval_seg
import kernels
import model as model_lib
import segment
from eval_seg import SegmentationModel
from model import Config, TagAlign, read_checkpoint
from tags import build_vocab, format_tag_stats, read_synonyms, ShardTags, tag_files, TagVocab
from tokenizer import Tokenizer
from world import to_tensor, World, WORLD_BENCHMARKS, WORLD_MEAN, WORLD_STD, WORLD_TEMPLATES, WorldConfig, write_world_shards


# ---------------------------------------------------------------- losses
# Under torchrun each loss a rank computes is R x its share of the global batch's (see
# distributed.py): the contrastive loss through the negatives of every rank, gathered here, by
# the loss that needs them (as open_clip's loss owns its gather); the tag loss as it is.
def clip_loss_across_ranks(img, txt, scale, impl):
    """R x rank r's share of the symmetric InfoNCE over the global batch, as open_clip's "local
    loss": its n images against all R n texts and its n texts against all R n images, the
    positives at columns r n .. r n + n - 1 (the one-sided fused loss, twice). The mean over the
    ranks equals kernels.clip_loss on the concatenated batch, and so do the gradients that DDP
    averages. img, txt (n, E) normalised; a frozen text tower's txt carries no gradient."""
    r, R = distributed.rank_and_count()
    n = img.shape[0]
    all_img, all_txt = distributed.GatherWithGrad.apply(img), distributed.GatherWithGrad.apply(txt)  # (R n, E)
    i2t = kernels.clip_loss_one_sided(img, all_txt, scale, offset=r * n, impl=impl)
    t2i = kernels.clip_loss_one_sided(txt, all_img, scale, offset=r * n, impl=impl)
    return (i2t + t2i) / 2


def compute_loss(model, images, tokens, targets, *, tag_tokens=None, tag_emb=None, tag_weight=1.0,
                 tag_loss="softmax", tag_grad="both", impl="auto"):
    """Total loss = ITC + tag_weight x tag loss, as in the paper; returns (total, itc, tag).

    images (B, 3, H, W), tokens (B, L) captions, targets (B, K) multi-hot tags parsed from the
    captions. The tag embeddings: tag_tokens (K, L), the tag names embedded afresh each step by
    the text tower being trained (the world, from scratch), or tag_emb (K, E), fixed (a frozen
    CLIP's, computed once). A frozen text tower embeds the captions without gradients.
    tag_loss: "softmax" (the paper's) or "bce"; tag_grad (from scratch): "both" or "image";
    impl: the kernels' implementation. Under torchrun each term is R x this rank's share of the
    global batch's: ITC through the gathered negatives, the tag loss as it is (a mean over this
    rank's rows, as every rank has as many).
    """
    img = F.normalize(model.encode_image(images), dim=-1)  # (B, E)
    txt = F.normalize(model.encode_text(tokens), dim=-1)  # (B, E)
    scale = model.itc_logit_scale.exp().clamp(max=100)  # CLIP's cap on the temperature
    if dist.is_initialized():  # under torchrun: the negatives of every rank
        itc = clip_loss_across_ranks(img, txt, scale, impl)
    else:
        itc = kernels.clip_loss(img, txt, scale, impl=impl)
    if tag_weight == 0:  # the ITC-only baseline: tags are not even embedded
        return itc, itc, torch.zeros_like(itc)
    if tag_emb is None:
        # --tag-grad image is the paper's wiring: tag embeddings are targets the tag loss does not
        # move, as frozen CLIP's are. From scratch (the default, both) the tag loss also teaches
        # the text tower the tag words: ITC alone leaves the shape words nearly one point in the
        # text space, and a detached tag loss cannot then tell the shapes apart (RESULTS.md).
        with torch.no_grad() if tag_grad == "image" else contextlib.nullcontext():
            tag_emb = F.normalize(model.encode_text(tag_tokens), dim=-1)  # (K, E)
    tag_scale = model.tag_logit_scale.exp().clamp(max=100)
    tag = kernels.tag_loss(img, tag_emb.to(img.dtype), targets, tag_scale, kind=tag_loss, impl=impl)
    return itc + tag_weight * tag, itc, tag


# ---------------------------------------------------------------- optimizer
def decays(name, p, rule):
    """Whether AdamW's weight decay applies to parameter `name`.
    official: the authors' set_weight_decay (utils/optimizer.py of Qinying-Liu/TagAlign at
    02757a4): every tensor that is not 1-d and whose name does not end in ".bias". Its quirk is
    kept: 0-d tensors are "not 1-d", so the decoder's tanh gates and both logit scales decay
    (at wd 0.05 and lr 1e-3 over 30k steps, a factor of about e^-1.5 on each, from the decay
    alone); LayerNorm weights and biases and conv biases do not.
    matrices: ndim >= 2 only (the world from scratch: its temperatures and norms do not decay)."""
    if rule == "official":
        return p.ndim != 1 and not name.endswith(".bias")
    return p.ndim >= 2


def make_optimizer(model, *, lr, weight_decay, beta2=0.999, decay="official"):
    """AdamW as the paper (betas (0.9, beta2), eps 1e-6) over the parameters that train (a frozen
    CLIP's are left out), weight decay on the parameters `decays` picks by rule `decay`."""
    params = [(k, p) for k, p in model.named_parameters() if p.requires_grad]
    groups = [{"params": [p for k, p in params if decays(k, p, decay)], "weight_decay": weight_decay},
              {"params": [p for k, p in params if not decays(k, p, decay)], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, beta2), eps=1e-6)


def lr_at(step, *, lr, steps, warmup, schedule):
    """The learning rate of `step` of `steps`: a linear warm-up over the fraction `warmup` of the
    steps, then constant (the paper) or a cosine decay to 10% of lr (the world default: a few
    thousand steps from scratch converge better with a decay)."""
    warmup_steps = max(1, int(warmup * steps))
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    if schedule == "constant":
        return lr
    t = (step - warmup_steps) / max(1, steps - warmup_steps)
    return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(t, 1.0))))


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


def apply_settings(settings, cfg, world_cfg, allowed=None):
    """nanoGPT's configurator with validation: each --set key=value changes a Config field
    (vision_layers=2) or a world setting (world.pairs=false), parsed as the field's type.
    allowed: the keys that may be set (default: all). An unknown or refused key, a bad value,
    or a shape that cannot be built: SystemExit with one line naming it. Returns new (cfg,
    world_cfg)."""
    cfg, world_cfg = dataclasses.replace(cfg), dataclasses.replace(world_cfg)
    keys = [f.name for f in dataclasses.fields(cfg)] + ["world." + f.name for f in dataclasses.fields(world_cfg)]
    keys = [k for k in keys if allowed is None or k in allowed]
    for item in settings:
        key, sep, text = item.partition("=")
        if not sep or key not in keys:
            raise SystemExit(f"error: --set {item}: unknown setting here; choose from {', '.join(keys) or 'none'}")
        target, field = (world_cfg, key[len("world."):]) if key.startswith("world.") else (cfg, key)
        try:
            setattr(target, field, parse_value(text, getattr(target, field)))
        except ValueError as e:
            raise SystemExit(f"error: --set {item}: {e}") from None
    try:
        cfg.check(), world_cfg.check()
    except ValueError as e:
        raise SystemExit(f"error: --set: {e}") from None
    return cfg, world_cfg


# ---------------------------------------------------------------- checkpoints
def rng_state():
    """torch's, numpy's and Python's RNG states as plain data: a uint8 tensor, numpy's MT19937
    state with its key array as a list of ints, and Python's tuple of ints."""
    name, key, pos, has_gauss, gauss = np.random.get_state()  # key: (624,) uint32
    return {"torch": torch.get_rng_state(), "numpy": [name, key.tolist(), pos, has_gauss, gauss],
            "python": random.getstate()}


def set_rng_state(rng):
    name, key, pos, has_gauss, gauss = rng["numpy"]
    torch.set_rng_state(rng["torch"])
    np.random.set_state((name, np.array(key, dtype=np.uint32), pos, has_gauss, gauss))
    random.setstate(rng["python"])


def checkpoint_state(run, optimizer, scaler, step, args):
    """What a checkpoint holds: what trains, the optimizer, the scaler, the step, the RNGs, the
    config and the arguments, and what the mode adds (run.extra_state: tokenizer, tags, world or
    CLIP file; the batch source's position). Plain data only (tensors, numbers, strings, lists,
    tuples, dicts), which read_checkpoint reads with weights_only=True: a shared checkpoint
    carries no code. Under torchrun every rank builds it (the data positions are gathered)."""
    return {"model": run.model.trainable_state_dict(), "optimizer": optimizer.state_dict(),
            "scaler": scaler.state_dict(), "step": step, "rng": rng_state(),
            "config": dataclasses.asdict(run.model.cfg), "args": vars(args),
            **run.extra_state, **run.batches.state()}


def save_atomic(obj, path):
    """torch.save(obj) to path through data.write_atomic: the old file or the new one, never half."""
    with data.write_atomic(path) as tmp:
        torch.save(obj, tmp)


def save_checkpoint(path, state):
    """Write a checkpoint atomically; under torchrun rank 0 alone writes."""
    if distributed.rank_and_count()[0] == 0:
        save_atomic(state, path)


RESUME_MUST_MATCH = ("steps", "batch_size", "lr", "warmup", "schedule", "beta2", "weight_decay", "seed",
                     "tag_weight", "tag_loss", "tag_grad", "corpus", "vocab_size", "top_tags", "min_tag_count",
                     "set", "data", "tags", "norm", "template", "shuffle_buffer", "synonyms", "crop_scale",
                     "augment", "decode")


def resume_checkpoint(args, path):
    """The checkpoint `--resume` continues, if it is one of the same run (RESUME_MUST_MATCH, the
    number of ranks); a file that is not a checkpoint, or another run's, is refused with one line
    before anything is written."""
    ckpt = read_checkpoint(path, resume=True)
    for k in RESUME_MUST_MATCH:
        if ckpt["args"].get(k) != getattr(args, k, None):
            raise SystemExit(f"error: {path} was trained with --{k.replace('_', '-')} "
                             f"{ckpt['args'].get(k)}, this command says {getattr(args, k, None)}")
    if ckpt["args"].get("pairs", False) != args.pairs:  # checkpoints from before --pairs have none
        raise SystemExit(f"error: {path} was trained {'without' if args.pairs else 'with'} --pairs, "
                         f"this command says {'with' if args.pairs else 'without'}")
    if ckpt["args"]["ranks"] != args.ranks:  # each rank's data and the global batch depend on it
        raise SystemExit(f"error: {path} was trained on {ckpt['args']['ranks']} ranks, this run has "
                         f"{args.ranks}: resume with as many (torchrun --nnodes x --nproc_per_node)")
    return ckpt


# ---------------------------------------------------------------- what a mode hands the training loop
@dataclass
class Run:
    """Everything the training loop needs from a mode, built once by the mode's setup (nanoGPT's
    init_from): with it the loop, the final checkpoint and the evaluation ask no mode question."""
    model: nn.Module            # what trains, on the device: TagAlign, or pretrain's CLIP
    batches: object             # the batch source: next_batch(step) -> (images (B, 3, H, W), tokens
    #   (B, L), targets (B, K)); skipped: its skip counts by reason; state(): its position, for the
    #   checkpoint; close()
    extra_state: dict           # what the mode's checkpoints hold besides: tokenizer, tags, world or CLIP file
    eval_model: Callable        # () -> the trained model as the evaluator reads it (SegmentationModel)
    decay: str                  # AdamW's weight-decay rule (decays): "official" (paper) or "matrices"
    summary: str                # the line that describes the model before training
    tag_tokens: torch.Tensor = None  # (K, L) tag prompts, embedded each step by the text tower that trains
    tag_emb: torch.Tensor = None     # (K, E) fixed tag embeddings: a frozen CLIP's, computed once
    finish: Callable = lambda: None  # rank 0, after the final checkpoint: the mode's other files


# ---------------------------------------------------------------- the world: tokenizer, tags, batches
def build_world_text(args, world):
    """Tokenizer and tag vocabulary learned from a corpus of world captions (the training split).

    Tags come from the tag parser run on the captions, exactly as on real data; nothing is read
    from the world's internals.
    """
    corpus = [world.caption(i) for i in range(args.corpus)]
    try:
        tokenizer = Tokenizer.train(corpus, vocab_size=args.vocab_size)
        synonyms = read_synonyms(args.synonyms) if args.synonyms else None
    except ValueError as e:  # --vocab-size too small, a broken synonym file
        raise SystemExit(f"error: {e}") from None
    vocab = build_vocab(corpus, top_objects=args.top_tags, top_attributes=args.top_tags,
                        min_count=args.min_tag_count, synonyms=synonyms, pairs=args.pairs,
                        top_pairs=args.top_tags, min_pair_count=args.min_tag_count)
    return tokenizer, vocab


def world_batch(world, step, batch_size, tokenizer, vocab, cfg, norm=(WORLD_MEAN, WORLD_STD)):
    """Batch `step` of the endless training stream: a pure function of (seed, step), which is
    what makes --resume exact. Returns images (B, 3, H, W) normalised with norm = (mean, std),
    tokens (B, L), targets (B, K)."""
    scenes = [world.sample(step * batch_size + i) for i in range(batch_size)]
    images = to_tensor(np.stack([s.image for s in scenes]), *norm)
    captions = [s.caption for s in scenes]
    tokens = tokenizer(captions, cfg.context_length)
    targets = torch.zeros(batch_size, len(vocab.tags), dtype=torch.bool)
    for i, caption in enumerate(captions):
        targets[i, vocab.encode(caption)] = True
    return images, tokens, targets


class WorldBatches:
    """The world's batch source for this rank: batch `step` is world_batch(step R + r), rank r's
    share of the global batch of R x batch_size consecutive scenes (so the contrast pairs,
    scenes 2k and 2k + 1, stay on one rank when batch_size is even). The next batch is drawn in
    a thread while this one trains: world generation is numpy and Python, and torch releases the
    GIL inside its kernels, so the two overlap."""
    skipped = {}  # the world skips nothing

    def __init__(self, world, batch_size, steps, tokenizer, vocab, cfg, norm):
        self.world, self.batch_size, self.steps = world, batch_size, steps
        self.tokenizer, self.vocab, self.cfg, self.norm = tokenizer, vocab, cfg, norm
        self.rank, self.ranks = distributed.rank_and_count()
        self.prefetch, self.pending = ThreadPoolExecutor(1), {}

    def fetch(self, step):
        return world_batch(self.world, step * self.ranks + self.rank, self.batch_size, self.tokenizer, self.vocab,
                           self.cfg, self.norm)

    def next_batch(self, step):
        batch = self.pending.pop(step) if step in self.pending else self.fetch(step)
        if step + 1 < self.steps:
            self.pending[step + 1] = self.prefetch.submit(self.fetch, step + 1)
        return batch if isinstance(batch, tuple) else batch.result()

    def state(self):
        return {}  # a pure function of (seed, step): the step is the whole position

    def close(self):
        self.prefetch.shutdown()


def tag_texts(vocab, template=WORLD_TEMPLATES[0]):
    return [template.format(t) for t in vocab.tags]


def export_clip(model, path):
    """A pretrained CLIP as an OpenAI-format state dict (its module names are OpenAI's), written
    atomically; `--clip path` reads it through the same loader as ViT-B-16.pt."""
    save_atomic({k: v.detach().cpu() for k, v in model.state_dict().items()}, path)
    print(f"wrote {path} (OpenAI's layout: give it to --clip)")


def as_raw_clip(clip, device):
    """A trained CLIP as a frozen TagAlign whose CLIP head (ln_post + proj) the evaluator reads."""
    model = TagAlign(clip.cfg, frozen_clip=True)
    model.clip.load_state_dict(clip.state_dict())
    return model.to(device)


def world_setup(args, ckpt, device):
    """The world, from scratch. train: TagAlign, with a tokenizer and a tag vocabulary learned
    from world captions, evaluated through its decoder. pretrain: a plain CLIP with CLIP's own
    tokenizer (so that its token ids mean what they mean in OpenAI's files) and no tags,
    evaluated as raw CLIP and written as OUT/clip.pt in OpenAI's layout."""
    pretrain = args.mode == "pretrain"
    if ckpt:
        model = model_lib.model_from_checkpoint(ckpt, os.path.join(args.out, "ckpt.pt"))
        cfg, world_cfg = model.cfg, WorldConfig(**ckpt["world"])
    else:
        cfg, world_cfg = apply_settings(args.set, Config(**model_lib.WORLD_CLIP) if pretrain else Config(),
                                        WorldConfig())
    world = World(args.seed, cfg.image_size, cfg=world_cfg)
    if ckpt:
        tokenizer = Tokenizer.from_checkpoint(ckpt["tokenizer"])
        vocab = TagVocab.from_tags(ckpt["tags"], ckpt.get("synonyms"), ckpt.get("tag_kinds"))
    elif pretrain:
        tokenizer, vocab = Tokenizer.from_clip(), TagVocab([], [], [])
    else:
        t0 = time.time()
        tokenizer, vocab = build_world_text(args, world)
        print(f"world text: {args.corpus} captions, {tokenizer.vocab_size} tokens, {len(vocab.tags)} tags "
              f"({time.time() - t0:.1f}s): {' '.join(vocab.tags)}")
    if not ckpt:
        cfg = dataclasses.replace(cfg, vocab_size=tokenizer.vocab_size)
        model = model_lib.CLIP(cfg.check()) if pretrain else TagAlign(cfg)
    model = model.to(device)
    norm = data.NORMS[args.norm] if pretrain else (WORLD_MEAN, WORLD_STD)
    if pretrain:  # evaluated as raw CLIP (its own ln_post + proj on the surgery tokens), then exported
        eval_model = lambda: SegmentationModel(as_raw_clip(model, device), tokenizer, device, head="clip",  # noqa: E731
                                               norm=norm, world_cfg=world_cfg)
        finish = functools.partial(export_clip, model, os.path.join(args.out, "clip.pt"))
    else:
        eval_model = functools.partial(SegmentationModel, model, tokenizer, device, world_cfg=world_cfg)
        finish = lambda: None  # noqa: E731
    n_params = sum(p.numel() for p in model.parameters())
    return Run(
        model=model, batches=WorldBatches(world, args.batch_size, args.steps, tokenizer, vocab, cfg, norm),
        extra_state={"tokenizer": "clip" if pretrain else tokenizer.state_dict(), "tags": vocab.tags,
                     "synonyms": vocab.synonyms, "world": dataclasses.asdict(world_cfg),
                     **({"tag_kinds": vocab.kinds} if vocab.pairs else {})},
        eval_model=eval_model, decay="matrices",
        summary=f"model: {n_params / 1e6:.2f}M parameters, grid {cfg.image_size // cfg.patch_size}^2, "
                f"tag weight {args.tag_weight} ({args.tag_loss}), kernels {args.kernels}",
        tag_tokens=tokenizer(tag_texts(vocab), cfg.context_length).to(device),  # (K, L)
        finish=finish)


# ---------------------------------------------------------------- the paper: frozen CLIP, shards, cached text
PAPER_SETTINGS = ("dense", "surgery_blocks", "decoder_blocks")  # what --set may change beside a CLIP file


def tag_embeddings(model, tokenizer, vocab, tags_dir, clip_sha256, template, device):
    """(K, E) L2-normalised tag embeddings from the frozen text tower on `template`, computed
    once and kept in tags_dir/tag_embeddings.pt; reused while the CLIP file, the tags and the
    template are the same, recomputed (and rewritten) otherwise."""
    path = os.path.join(tags_dir, "tag_embeddings.pt")
    key = {"clip_sha256": clip_sha256, "template": template,
           "tags_sha256": hashlib.sha256("\n".join(vocab.tags).encode()).hexdigest()}
    if os.path.isfile(path):
        try:
            cached = model_lib.load_plain(path)
        except Exception:  # truncated or foreign: recomputed (and rewritten) below
            cached = None
        if isinstance(cached, dict) and {k: cached.get(k) for k in key} == key:
            print(f"tag embeddings: {len(vocab)} from {path}")
            return cached["embeddings"].to(device)
        print(f"tag embeddings: {path} was made for another CLIP, template or vocabulary: recomputing")
    tokens = tokenizer(tag_texts(vocab, template), model.cfg.context_length)
    with torch.no_grad():
        emb = torch.cat([model.encode_text(tokens[i:i + 1024].to(device)).float() for i in range(0, len(tokens), 1024)])
    emb = F.normalize(emb, dim=-1).cpu()
    save_atomic({**key, "embeddings": emb}, path)
    print(f"tag embeddings: {len(vocab)} computed with {template!r}, saved to {path}")
    return emb.to(device)


class ShardBatches:
    """The paper's batch source: the shard stream (data.ImageTextStream) read by a DataLoader's
    workers. It keeps each worker's stream state after the last batch consumed (a checkpoint
    holds them all: resume continues exactly) and the samples the workers skipped, summed."""

    def __init__(self, stream, workers, device, states):
        # Each worker yields whole batches, targets included (collate_fn=data.as_is: nothing to
        # convert), and keeps prefetch_factor of them ready. The one iterator lives for the whole
        # run, so its workers persist without persistent_workers (which matters only for a new
        # iterator per epoch).
        loader = torch.utils.data.DataLoader(stream, batch_size=None, num_workers=workers, collate_fn=data.as_is,
                                             pin_memory=device.type == "cuda",
                                             prefetch_factor=2 if workers else None, timeout=600 if workers else 0)
        self.batches, self.workers = iter(loader), workers
        self.states, self.skipped = dict(states), {}  # {worker: its state}, {reason: count}

    def next_batch(self, step):
        b = next(self.batches)
        self.states[b["worker"]] = b["state"]
        self.skipped = {k: sum(s["counts"][k] for s in self.states.values()) for k in data.SKIPS}
        return b["images"], b["tokens"], b["targets"]  # targets: built in the worker

    def state(self):
        """Every rank's worker states, [rank][worker] (a collective under torchrun)."""
        return {"data": {"states": distributed.gather_objects(dict(self.states)), "workers": self.workers}}

    def close(self):
        pass  # the DataLoader's workers stop with the program


def paper_setup(args, ckpt, device):
    """The paper: OpenAI CLIP frozen, TagAlign's decoder and a copy of CLIP's projection on top,
    trained on image-text shards with the `tags` command's tags, whose embeddings are the frozen
    text tower's (computed once); evaluated with the decoder and raw CLIP blended."""
    rank, ranks = distributed.rank_and_count()
    if ckpt:  # the checkpoint holds the head; the CLIP file must be the one it was trained on
        model = model_lib.model_from_checkpoint(ckpt, os.path.join(args.out, "ckpt.pt"), args.clip)
    else:
        model = model_lib.load_clip(args.clip)
        if args.set:  # the paper's head with other settings: build it anew
            cfg, _ = apply_settings(args.set, model.cfg, WorldConfig(), allowed=PAPER_SETTINGS)
            model = model_lib.load_clip(args.clip, cfg)
    clip_file = {"path": os.path.abspath(args.clip),
                 "sha256": ckpt["clip"]["sha256"] if ckpt else model_lib.file_sha256(args.clip)}
    tokenizer = Tokenizer.from_clip()
    if model.cfg.vocab_size != tokenizer.vocab_size:
        raise SystemExit(f"error: --clip {args.clip}: {model.cfg.vocab_size} token embeddings, CLIP's tokenizer "
                         f"has {tokenizer.vocab_size} ids")
    try:
        sources = data.expand_shards(args.data)
        tags = ShardTags(args.tags, sources) if args.tags else None
        mean, std = data.NORMS[args.norm]
        stream = data.ImageTextStream(sources, tags, tokenizer, model.cfg.context_length, args.batch_size,
                                      model.cfg.image_size, args.seed, args.shuffle_buffer, mean, std,
                                      rank=rank, ranks=ranks, workers=args.workers,
                                      crop_scale=(args.crop_scale, 1.0), augment=args.augment, decode=args.decode)
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(f"error: {e}") from None
    if ckpt:
        if ckpt["data"]["workers"] != args.workers:
            raise SystemExit(f"error: --resume: the run read its shards with --workers {ckpt['data']['workers']}; "
                             f"the stream continues exactly only with the same number")
        stream.resume(ckpt["data"]["states"][rank], ckpt["step"] + 1)  # this rank's workers
    vocab = tags.vocab if tags else TagVocab([], [], [])
    print(f"data: {len(sources)} shards ({args.data}), tags: {args.tags or 'none'} ({len(vocab)} tags)")
    model = model.to(device)
    with distributed.rank0_first():  # rank 0 writes the cache of tag embeddings, the others read it
        tag_emb = (tag_embeddings(model, tokenizer, vocab, args.tags, clip_file["sha256"], args.template, device)
                   if args.tag_weight and len(vocab) else None)
    n = model_lib.trainable_parameters(model)
    return Run(
        model=model,
        batches=ShardBatches(stream, args.workers, device, ckpt["data"]["states"][rank] if ckpt else {}),
        extra_state={"clip": clip_file, "tokenizer": "clip", "tags": vocab.tags},
        eval_model=functools.partial(SegmentationModel, model, tokenizer, device, norm=data.NORMS[args.norm]),
        decay="official",  # the authors' weight-decay groups
        summary=f"model: CLIP {model.cfg.vision_width}w x {model.cfg.vision_layers} frozen ({model.cfg.dense} "
                f"features), trainable {n['total']:,} = decoder {n['decoder']:,} + head {n['head']:,} + scales "
                f"{n['scales']}; batch {args.batch_size}, lr {args.lr:.3g} ({args.schedule}), {args.precision} "
                f"on {device}",
        tag_emb=tag_emb)


# ---------------------------------------------------------------- training
def train(args):
    """Train as `args` says (finish_train_args's), write the final checkpoint, evaluate (rank 0);
    returns the trained model."""
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    random.seed(args.seed)
    ckpt_path, log_path = os.path.join(args.out, "ckpt.pt"), os.path.join(args.out, "log.jsonl")
    ckpt = resume_checkpoint(args, ckpt_path) if args.resume else None
    os.makedirs(args.out, exist_ok=True)
    device = torch.device(args.device)
    rank, ranks = distributed.rank_and_count()
    # The one mode question: each mode's setup builds the model, its data, its tags, what its
    # checkpoints add and how it is evaluated, and hands them over as a Run.
    run = (paper_setup if args.mode == "paper" else world_setup)(args, ckpt, device)
    model = run.model

    optimizer = make_optimizer(model, lr=args.lr, weight_decay=args.weight_decay, beta2=args.beta2, decay=run.decay)
    scaler = torch.amp.GradScaler(device.type, enabled=args.precision == "fp16")
    start = 0
    if ckpt:
        optimizer.load_state_dict(ckpt["optimizer"])
        if ckpt["scaler"]:  # empty when fp16 was off
            scaler.load_state_dict(ckpt["scaler"])
        set_rng_state(ckpt["rng"])
        start = ckpt["step"] + 1
        print(f"resumed from {ckpt_path} at step {start}")
    print(run.summary)
    loss_of_batch = distributed.data_parallel(model, functools.partial(  # through DDP under torchrun
        compute_loss, tag_tokens=run.tag_tokens, tag_emb=run.tag_emb, tag_weight=args.tag_weight,
        tag_loss=args.tag_loss, tag_grad=args.tag_grad, impl=args.kernels), device)
    rows = []
    if ckpt and rank == 0 and os.path.exists(log_path):  # keep the log up to the checkpoint: no step twice
        with open(log_path) as f:
            rows = [line for line in f if json.loads(line)["step"] < start]
    log = open(log_path if rank == 0 else os.devnull, "w")  # rank 0 alone writes the log
    log.writelines(rows)
    bar = tqdm(range(start, args.steps), initial=start, total=args.steps, disable=args.quiet or rank > 0,
               dynamic_ncols=True)
    t_train, seen = 0.0, 0
    model.train()
    for step in bar:
        t0 = time.time()
        distributed.PROGRESS["step"] = step  # named if a collective fails
        lr = lr_at(step, lr=args.lr, steps=args.steps, warmup=args.warmup, schedule=args.schedule)
        for group in optimizer.param_groups:
            group["lr"] = lr
        try:
            images, tokens, targets = run.batches.next_batch(step)
        except (ValueError, RuntimeError) as e:  # the stream refused its data (the message says why)
            raise SystemExit(f"error: data at step {step}: {str(e).strip().splitlines()[-1]}") from None
        images, tokens, targets = (x.to(device, non_blocking=True) for x in (images, tokens, targets))
        with model_lib.autocast(device, args.precision):
            loss, itc, tag = loss_of_batch(images, tokens, targets)
        # the global batch's losses and skip counts; stops every rank on a non-finite loss
        loss_v, itc_v, tag_v, skipped = distributed.losses_across_ranks(step, loss, itc, tag, run.batches.skipped)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        scaler.step(optimizer)
        scaler.update()
        t_train += time.time() - t0
        seen += args.batch_size * ranks
        bar.set_postfix(loss=f"{loss_v:.3f}", img_s=f"{seen / t_train:.0f}",
                        **({"skipped": sum(skipped.values())} if skipped else {}))
        if step % args.log_every == 0 or step == args.steps - 1:
            row = {"step": step, "loss": loss_v, "itc": itc_v, "tag": tag_v, "lr": lr,
                   "scale": model.itc_logit_scale.exp().item(), "img_per_s": seen / t_train,
                   **({"skipped": skipped} if skipped else {})}
            log.write(json.dumps(row) + "\n")
            log.flush()
            if args.quiet or step % (10 * args.log_every) == 0:
                tqdm.write(" ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()))
        if args.ckpt_every and step > start and step % args.ckpt_every == 0:
            save_checkpoint(ckpt_path, checkpoint_state(run, optimizer, scaler, step, args))
    bar.close()
    log.close()
    run.batches.close()
    if start <= args.steps:  # the final checkpoint (a finished run resumed has nothing to add)
        save_checkpoint(ckpt_path, checkpoint_state(run, optimizer, scaler, args.steps, args))
    if rank > 0:  # rank 0 alone draws the curves, writes the mode's files and evaluates
        return model
    if t_train:
        print(f"trained {args.steps - start} steps in {t_train:.0f}s ({seen / t_train:.0f} images/s)"
              + (f"; skipped samples: {skipped}" if skipped else ""))
    if eval_seg.save_curves(log_path, os.path.join(args.out, "curves.png")):
        print(f"wrote {os.path.join(args.out, 'curves.png')}")
    run.finish()
    names = eval_seg.parse_names(args.eval_benchmarks) if args.eval_benchmarks else []
    if args.eval_images and names:  # after the timing: evaluation is not training time
        seg = run.eval_model()  # the world's models carry the world they were trained on
        extra = {"config": dataclasses.asdict(model.cfg), "args": vars(args)}
        extra.update({"world": dataclasses.asdict(seg.world_cfg)} if seg.world_cfg else {})
        eval_seg.run_benchmarks(seg, names, data_root=args.data_root, out_dir=args.out,
                                n_images=args.eval_images, extra=extra, world_cfg=seg.world_cfg)
    return model


# ---------------------------------------------------------------- command line
# Defaults that differ between the world (from scratch) and the paper (--clip: frozen CLIP on
# shards; the paper's settings: AdamW betas (0.9, 0.999), lr 1e-3 at a global batch of 4096,
# constant, no warm-up, 30k steps at 512 per GPU).
MODE_DEFAULTS = {
    "world": {"steps": 1500, "batch_size": 64, "warmup": 0.05, "schedule": "cosine", "beta2": 0.98,
              "eval_benchmarks": ",".join(WORLD_BENCHMARKS)},
    "paper": {"steps": 30000, "batch_size": 512, "warmup": 0.0, "schedule": "constant", "beta2": 0.999,
              "eval_benchmarks": "", "augment": "official", "decode": "draft"},
    "pretrain": {"steps": 5000, "batch_size": 64, "warmup": 0.05, "schedule": "cosine", "beta2": 0.98,
                 "eval_benchmarks": ",".join(WORLD_BENCHMARKS)},
}


def build_parser():
    """The command line: `train`, `tags` and `shards`, with their flags and defaults."""
    parser = argparse.ArgumentParser(description="TagAlign: train, tag a caption corpus, or write world shards.")
    sub = parser.add_subparsers(dest="command", required=True)

    for name, what in (("train", "train (default: from scratch on the synthetic world; --clip: the paper's "
                                  "decoder on a frozen CLIP) and evaluate"),
                       ("pretrain", "pretrain a CLIP on the synthetic world (ITC alone, CLIP's tokenizer) and "
                                    "write it as an OpenAI-format file, OUT/clip.pt")):
        p = sub.add_parser(name, help=what)
        p.add_argument("--clip", help="paper mode: an OpenAI CLIP file (ViT-B-16.pt or a state dict), frozen")
        p.add_argument("--data", help="paper mode: webdataset shards ('shards/{00000..00999}.tar', globs) or a "
                                      "folder with captions.tsv/.jsonl")
        p.add_argument("--tags", help="paper mode: the `tags` command's output folder for those shards")
        p.add_argument("--steps", type=int, help="optimizer steps (world: 1500; pretrain: 5000; paper: 30000)")
        p.add_argument("--batch-size", type=int, help="images (and captions) per step and per rank: under torchrun the "
                                                      "global batch is ranks x this (world: 64; paper: 512)")
        p.add_argument("--lr", type=float, help="learning rate of AdamW (world: 1e-3; paper: 1e-3 x global batch / 4096)")
        p.add_argument("--warmup", type=float, help="fraction of the steps spent warming up the lr (world: 0.05; paper: 0)")
        p.add_argument("--schedule", choices=("cosine", "constant"), help="lr after the warm-up (world: cosine to "
                                                                         "10%%; paper: constant)")
        p.add_argument("--beta2", type=float, help="AdamW's beta2 (world: 0.98; paper: 0.999)")
        p.add_argument("--weight-decay", type=float, default=0.05, help="AdamW weight decay (paper mode: on the authors' groups, "
                       "0-d gates and temperatures included; world: on matrices)")
        p.add_argument("--grad-clip", type=float, default=5.0, help="clip the gradient norm to this")
        p.add_argument("--seed", type=int, default=0, help="seed of the initialisation and of the training stream")
        p.add_argument("--tag-weight", type=float, default=1.0, help="weight of the tag loss; 0 = the ITC-only baseline")
        p.add_argument("--tag-loss", choices=("softmax", "bce"), default="softmax",
                       help="softmax: soft-target CE over all tags (the paper); bce: per-tag binary CE (ablation)")
        p.add_argument("--tag-grad", choices=("both", "image"), default="both",
                       help="world: which towers the tag loss trains: both (the text tower learns the tag words "
                            "too), or image (tag embeddings detached, like the paper's frozen CLIP ones)")
        p.add_argument("--template", default="a photo of a {}.", help="paper mode: the prompt that embeds each tag")
        p.add_argument("--synonyms", help="world: a synonym-group file (e.g. words/world_synonyms.txt) that makes "
                                          "each group one tag (paper mode: give it to `tags` instead)")
        p.add_argument("--pairs", action="store_true", help="world: also pair tags 'attribute object' ('red circle'), "
                                                             "under --top-tags and --min-tag-count (paper mode: `tags --pairs`)")
        p.add_argument("--norm", choices=("imagenet", "clip"), default="imagenet",
                       help="paper mode and pretrain: image normalisation (the official code's ImageNet mean/std, or CLIP's)")
        p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="change a model setting (Config field, e.g. vision_layers=2) or a world setting "
                            "(world.pairs=false); repeat for several; paper mode: dense, surgery_blocks, decoder_blocks")
        p.add_argument("--kernels", choices=("auto", "triton", "torch"), default="auto",
                       help="loss implementation: fused Triton kernels, the PyTorch reference, or auto (Triton on CUDA)")
        p.add_argument("--precision", choices=("auto", "fp32", "bf16", "fp16"), default="auto",
                       help="autocast (auto: bf16 on CUDA, fp32 on CPU)")
        p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="training device")
        p.add_argument("--workers", type=int, default=0, help="paper mode: DataLoader workers reading the shards "
                                                              "(per rank: ranks x max(1, workers) shards at least)")
        p.add_argument("--dist-timeout", type=float, default=600, help="under torchrun: seconds a rank waits for the "
                                                                       "others in a collective before the run stops")
        p.add_argument("--shuffle-buffer", type=int, default=1000, help="paper mode: samples in each worker's shuffle buffer")
        p.add_argument("--crop-scale", type=float, default=0.08, help="paper mode: smallest area fraction of the "
                                                                       "random resized crop (the official 0.08)")
        p.add_argument("--augment", choices=("official", "light"), help="paper mode: training augmentation, the "
                       "authors' (crop, flip, RandAugment, random erasing: augment.py) or light (crop, flip); "
                       "default official")
        p.add_argument("--decode", choices=("draft", "full"), help="paper mode: decode a JPEG at the smallest "
                       "1/2, 1/4, 1/8 scale its crop allows (draft), or at full size; default draft")
        p.add_argument("--corpus", type=int, default=20000, help="world captions used to learn the tokenizer and tag vocabulary")
        p.add_argument("--vocab-size", type=int, default=1024, help="BPE vocabulary size learned on the world captions")
        p.add_argument("--top-tags", type=int, default=10000, help="most frequent objects (and as many attributes) kept as tags")
        p.add_argument("--min-tag-count", type=int, default=5, help="a tag must occur this often in the corpus")
        p.add_argument("--eval-benchmarks", help="benchmarks evaluated at the end, comma-separated (world: the three "
                                                 "world ones; paper: none); see eval_seg.py")
        p.add_argument("--data-root", help="folder of the standard benchmarks for --eval-benchmarks")
        p.add_argument("--eval-images", type=int, default=500, help="validation images per world benchmark (0: no evaluation)")
        p.add_argument("--out", default="out", help="output folder: ckpt.pt, log.jsonl, metrics.json, vis/")
        p.add_argument("--resume", action="store_true", help="continue from OUT/ckpt.pt exactly where it stopped")
        p.add_argument("--ckpt-every", type=int, default=250, help="write OUT/ckpt.pt every N steps (0: only at the end)")
        p.add_argument("--log-every", type=int, default=25, help="append a line to OUT/log.jsonl every N steps")
        p.add_argument("--quiet", action="store_true", help="no progress bar; print the log lines instead")

    p = sub.add_parser("tags", help="parse a caption corpus into a tag vocabulary and per-sample tags")
    p.add_argument("--captions", nargs="+", required=True, metavar="FILE",
                   help="caption files: .txt (one caption a line), .tsv (header with a 'caption' column), "
                        ".jsonl ({\"caption\": ...} a line) or webdataset .tar shards (KEY.txt / KEY.json); "
                        "brace lists and globs as --data takes them ('cc12m/{00000..01242}.tar')")
    p.add_argument("--out", required=True, help="output folder: vocab.json, tag_offsets.npy, tag_ids.npy, tag_keys.npy")
    p.add_argument("--top-objects", type=int, default=9000, help="most frequent objects kept as tags")
    p.add_argument("--top-attributes", type=int, default=1000, help="most frequent attributes kept as tags")
    p.add_argument("--min-count", type=int, default=5, help="a tag must occur in at least this many captions")
    p.add_argument("--workers", type=int, default=None, help="parser processes (default: all cores)")
    p.add_argument("--synonyms", help="a synonym-group file (e.g. words/synonyms.txt): each group becomes one tag")
    p.add_argument("--pairs", action="store_true", help="also pair tags 'attribute object' ('black cat'), after "
                                                        "the objects and attributes (not in the paper)")
    p.add_argument("--top-pairs", type=int, default=1000, help="with --pairs: most frequent pairs kept as tags")
    p.add_argument("--min-pair-count", type=int, default=5, help="with --pairs: a pair must occur in at least "
                                                                  "this many captions")
    p.add_argument("--quiet", action="store_true", help="no progress bar")

    p = sub.add_parser("shards", help="write the world's training split as webdataset shards (PNG + caption)")
    p.add_argument("--out", required=True, help="output folder for world-NNNNN.tar")
    p.add_argument("--scenes", type=int, default=20000, help="scenes to write")
    p.add_argument("--per-shard", type=int, default=1000, help="scenes per shard (even: contrast pairs stay together)")
    p.add_argument("--seed", type=int, default=0, help="world seed")
    p.add_argument("--image-size", type=int, default=64, help="image side in pixels")
    p.add_argument("--set", action="append", default=[], metavar="world.KEY=VALUE", help="a world setting")

    segment.add_parser(sub)  # segment.py: your own images, your own class names
    return parser


def finish_train_args(parser, args):
    """The mode (args.mode: world, paper or pretrain, worked out here alone), its defaults, the
    derived values and the checks of `train`'s (and `pretrain`'s) arguments."""
    args.mode = "pretrain" if args.command == "pretrain" else "paper" if args.clip else "world"
    if args.mode == "pretrain" and (args.clip or args.data or args.tags or args.tag_weight != 1.0):
        parser.error("pretrain trains a CLIP on the world with ITC alone: no --clip, --data, --tags or --tag-weight")
    if args.mode == "pretrain":
        args.tag_weight = 0.0
    if args.mode == "world" and args.norm != "imagenet":
        parser.error("--norm: paper mode and pretrain only (the world model uses the world's own pixel statistics)")
    if args.mode != "paper" and (args.augment or args.decode):
        parser.error("--augment and --decode: paper mode only (the world's images are drawn, not decoded or augmented)")
    for k, v in MODE_DEFAULTS[args.mode].items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    args.ranks = int(os.environ.get("WORLD_SIZE", 1))  # torchrun's WORLD_SIZE: processes, one per device
    if args.lr is None:  # the paper: 1e-3 at a global batch of 4096, scaled linearly
        args.lr = 1e-3 * args.batch_size * args.ranks / 4096 if args.mode == "paper" else 1e-3
    if args.precision == "auto":
        args.precision = "bf16" if args.device.startswith("cuda") else "fp32"
    if args.clip and not args.data:
        parser.error("--clip needs --data (the image-text shards to train on)")
    if args.synonyms and args.clip:
        parser.error("--synonyms: in paper mode the tags come from `tags`; give --synonyms to that command")
    if args.pairs and args.mode != "world":
        parser.error("--pairs: the world from scratch only (paper mode: give --pairs to `tags`; pretrain has no tags)")
    if (args.data or args.tags) and not args.clip:
        parser.error("--data and --tags train the paper's decoder: give --clip PATH as well")
    if args.clip and not args.tags and args.tag_weight:
        parser.error("--clip: give --tags DIR (the `tags` command's output), or --tag-weight 0 for ITC alone")
    for flag in ("steps", "batch_size", "corpus", "vocab_size", "shuffle_buffer"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag.replace('_', '-')} must be at least 1")
    if args.lr <= 0 or args.tag_weight < 0 or args.workers < 0 or not 0 < args.crop_scale <= 1:
        parser.error("--lr must be positive, --tag-weight and --workers non-negative, --crop-scale in (0, 1]")
    if args.precision != "fp32" and not args.device.startswith("cuda"):
        parser.error(f"--precision {args.precision} needs a CUDA device (fp32 on CPU)")
    if args.ranks > 1 and args.mode != "paper" and args.batch_size % 2:
        parser.error("under torchrun the world needs an even --batch-size: its contrast pairs (scenes 2k, 2k+1) "
                     "must stay on one rank")
    if args.ranks > 1 and ":" in args.device:
        parser.error(f"--device {args.device}: under torchrun each rank takes cuda:LOCAL_RANK; give --device cuda")
    if args.dist_timeout <= 0:
        parser.error("--dist-timeout must be positive")
    return args


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "tags":
        try:
            synonyms = read_synonyms(args.synonyms) if args.synonyms else None
            paths = data.expand_shards(args.captions, flag="--captions")  # brace lists and globs, as --data
            stats = tag_files(paths, args.out, top_objects=args.top_objects,
                                   top_attributes=args.top_attributes, min_count=args.min_count,
                                   workers=args.workers, progress=not args.quiet, synonyms=synonyms,
                                   pairs=args.pairs, top_pairs=args.top_pairs, min_pair_count=args.min_pair_count)
        except (ValueError, FileNotFoundError) as e:
            raise SystemExit(f"error: {e}")
        print(format_tag_stats(stats))
        return stats
    if args.command == "shards":
        _, world_cfg = apply_settings(args.set, Config(), WorldConfig(),
                                      allowed=["world." + f.name for f in dataclasses.fields(WorldConfig)])
        paths = write_world_shards(args.out, args.scenes, args.per_shard, args.seed, args.image_size, world_cfg)
        print(f"wrote {args.scenes} world scenes in {len(paths)} shards: {paths[0]} ... {paths[-1]}")
        return paths
    if args.command == "segment":
        return segment.main(args)
    if args.command in ("train", "pretrain"):
        args = finish_train_args(parser, args)
        with distributed.process_group(ranks=args.ranks, device=args.device, dist_timeout=args.dist_timeout,
                                       batch_size=args.batch_size):  # under torchrun; nothing otherwise
            return train(args)


if __name__ == "__main__":
    main()
