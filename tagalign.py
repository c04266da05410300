"""TagAlign: CLIP-style image-text alignment plus multi-tag classification (arXiv 2312.14149).

The training side: the two losses wired from `kernels/`, AdamW, the world's training stream, the
training loop with atomic checkpoints and `--resume`, and the command line (`train`, `tags`).
The model is in model.py, the evaluator in eval_seg.py, the data in data.py.

    python tagalign.py train                 # the synthetic world, from scratch, on a CPU
    python tagalign.py train --tag-weight 0  # the ITC-only baseline
    python tagalign.py tags --captions caps.txt --out tags/
    torchrun --standalone --nproc_per_node 8 tagalign.py train --clip ... --data ... --tags ...
"""
import argparse
import contextlib
import dataclasses
import datetime
import gc
import hashlib
import json
import math
import os
import random
import re
import time
import traceback
import warnings
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

import data
import eval_seg
import kernels
import model as model_lib
from eval_seg import SegmentationModel
from model import Config, TagAlign, read_checkpoint
from tags import build_vocab, format_tag_stats, read_synonyms, ShardTags, tag_files, TagVocab
from tokenizer import Tokenizer
from world import to_tensor, World, WORLD_BENCHMARKS, WORLD_MEAN, WORLD_STD, WORLD_TEMPLATES, WorldConfig, write_world_shards


# ---------------------------------------------------------------- distributed: collectives with gradients
# Under torchrun each of R ranks trains on its own n = --batch-size samples of a global batch of
# R x n, and DDP averages the ranks' gradients. So every loss a rank computes is R times its share
# of the loss of the global batch: the average over ranks of the gradients is then the gradient
# of the global loss, and the average of the ranks' losses is the global loss (what the log
# shows). Without torchrun there is no process group and nothing here runs.
def rank_and_count():
    """(this process's rank, the number of ranks): (0, 1) without a process group."""
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


class GatherWithGrad(torch.autograd.Function):
    """(n, ...) on every rank -> (R n, ...), the ranks' tensors in rank order, on every rank,
    with gradients back to each rank's own rows (open_clip's gather_with_grad).

    Backward: every rank's loss reads every rank's rows, so the gradient of rank q's rows is the
    sum over ranks of what each rank's loss sends them: an all_reduce (sum) of the whole gathered
    gradient, of which rank q keeps its rows. (Keeping only its own loss's gradient would drop
    the other ranks' terms, which DDP's averaging cannot restore.) Summed in fp32 at least: a
    bf16 sum of R terms loses bits. Every rank must hold the same shape (equal per-rank batches).
    """

    @staticmethod
    def forward(ctx, x):
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        ctx.dtype = x.dtype
        return torch.cat(parts)  # (R n, ...)

    @staticmethod
    def backward(ctx, dy):
        r, R = rank_and_count()
        dy = dy.to(torch.promote_types(dy.dtype, torch.float32), copy=True)  # all_reduce works in place
        dist.all_reduce(dy)
        n = dy.shape[0] // R
        return dy[r * n:(r + 1) * n].to(ctx.dtype)


def clip_loss_across_ranks(img, txt, scale, impl):
    """R x rank r's share of the symmetric InfoNCE over the global batch, as open_clip's "local
    loss": its n images against all R n texts and its n texts against all R n images, the
    positives at columns r n .. r n + n - 1 (the one-sided fused loss, twice). The mean over the
    ranks equals kernels.clip_loss on the concatenated batch, and so do the gradients that DDP
    averages. img, txt (n, E) normalised; a frozen text tower's txt carries no gradient."""
    r, R = rank_and_count()
    n = img.shape[0]
    all_img, all_txt = GatherWithGrad.apply(img), GatherWithGrad.apply(txt)  # (R n, E)
    i2t = kernels.clip_loss_one_sided(img, all_txt, scale, offset=r * n, impl=impl)
    t2i = kernels.clip_loss_one_sided(txt, all_img, scale, offset=r * n, impl=impl)
    return (i2t + t2i) / 2


class SyncBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d whose training statistics are those of the global batch: per-channel sums
    gathered (with gradients) over the ranks, so that R ranks normalise as one process with the
    whole batch would, and the running statistics (updated alike on every rank) stay equal.
    torch.nn.SyncBatchNorm does the same but refuses CPU tensors, so it could not be tested
    with gloo; this is one plain-torch path for both. Assumes equal per-rank batches and a set
    momentum (BatchNorm2d's 0.1). Computed in fp32 at least (two passes: the mean, then the
    squared deviations)."""

    def forward(self, x):
        if not (self.training and dist.is_initialized()):
            return super().forward(x)
        _, R = rank_and_count()
        dtype, x = x.dtype, x.to(torch.promote_types(x.dtype, torch.float32))
        N = x.numel() // x.shape[1] * R  # values per channel in the global batch
        mean = GatherWithGrad.apply(x.sum((0, 2, 3))[None]).sum(0) / N  # (C,)
        d = x - mean[:, None, None]
        var = GatherWithGrad.apply((d * d).sum((0, 2, 3))[None]).sum(0) / N  # (C,), biased
        with torch.no_grad():  # as F.batch_norm: the running variance is the unbiased one
            m = self.momentum
            self.running_mean.mul_(1 - m).add_(m * mean)
            self.running_var.mul_(1 - m).add_(m * var * N / max(N - 1, 1))
            self.num_batches_tracked.add_(1)
        y = d * torch.rsqrt(var + self.eps)[:, None, None]
        return (y * self.weight[:, None, None] + self.bias[:, None, None]).to(dtype)


# ---------------------------------------------------------------- losses
def compute_loss(model, images, tokens, targets, *, tag_tokens=None, tag_emb=None, tag_weight=1.0,
                 tag_loss="softmax", tag_grad="both", impl="auto"):
    """Total loss = ITC + tag_weight x tag loss, as in the paper; returns (total, itc, tag).

    images (B, 3, H, W), tokens (B, L) captions, targets (B, K) multi-hot tags parsed from the
    captions. The tag embeddings: tag_tokens (K, L), the tag names embedded afresh each step by
    the text tower being trained (the world, from scratch), or tag_emb (K, E), fixed (a frozen
    CLIP's, computed once). A frozen text tower embeds the captions without gradients.
    tag_loss: "softmax" (the paper's) or "bce"; tag_grad (from scratch): "both" or "image";
    impl: the kernels' implementation. Under torchrun each term is R x this rank's share of the
    global batch's (see the distributed section): ITC through the gathered negatives, the tag
    loss as it is (a mean over this rank's rows, as every rank has as many).
    """
    img = F.normalize(model.encode_image(images), dim=-1)  # (B, E)
    txt = F.normalize(model.encode_text(tokens), dim=-1)  # (B, E)
    scale = model.itc_logit_scale.exp().clamp(max=100)  # CLIP's cap on the temperature
    if dist.is_initialized():  # under torchrun: the negatives of every rank (see above)
        itc = clip_loss_across_ranks(img, txt, scale, impl)
    else:
        itc = kernels.clip_loss(img, txt, scale, impl=impl)
    if tag_weight == 0:  # the ITC-only baseline: tags are not even embedded
        return itc, itc, torch.zeros_like(itc)
    if tag_emb is None:
        # --tag-grad image is the paper's wiring: tag embeddings are targets the tag loss does not
        # move, as frozen CLIP's are. From scratch (the default, both) the tag loss also teaches
        # the text tower the tag words: ITC alone leaves "a triangle." and "a cross." at cosine
        # 0.98 on the world, and a detached tag loss cannot then tell the two shapes apart.
        with torch.no_grad() if tag_grad == "image" else contextlib.nullcontext():
            tag_emb = F.normalize(model.encode_text(tag_tokens), dim=-1)  # (K, E)
    tag_scale = model.tag_logit_scale.exp().clamp(max=100)
    tag = kernels.tag_loss(img, tag_emb.to(img.dtype), targets, tag_scale, kind=tag_loss, impl=impl)
    return itc + tag_weight * tag, itc, tag


# ---------------------------------------------------------------- optimizer
DECAY_RULES = ("official", "matrices")


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


def lr_at(step, args):
    """Linear warmup over a fraction of the steps, then constant (the paper) or cosine decay to
    10% (the world default: a few thousand steps from scratch converge better with a decay)."""
    warmup = max(1, int(args.warmup * args.steps))
    if step < warmup:
        return args.lr * (step + 1) / warmup
    if args.schedule == "constant":
        return args.lr
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


def apply_settings(settings, cfg, world, allowed=None):
    """nanoGPT's configurator with validation: each --set key=value changes a Config field
    (vision_layers=2) or a world setting (world.pairs=false), parsed as the field's type.
    allowed: the keys that may be set (default: all). An unknown or refused key, a bad value,
    or a shape that cannot be built: SystemExit with one line naming it. Returns (cfg, world)."""
    cfg, world = dataclasses.replace(cfg), dataclasses.replace(world)
    keys = [f.name for f in dataclasses.fields(cfg)] + ["world." + f.name for f in dataclasses.fields(world)]
    keys = [k for k in keys if allowed is None or k in allowed]
    for item in settings:
        key, sep, text = item.partition("=")
        if not sep or key not in keys:
            raise SystemExit(f"error: --set {item}: unknown setting here; choose from {', '.join(keys) or 'none'}")
        target, field = (world, key[len("world."):]) if key.startswith("world.") else (cfg, key)
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
    tokenizer = Tokenizer.train(corpus, vocab_size=args.vocab_size)
    try:
        synonyms = read_synonyms(args.synonyms) if args.synonyms else None
    except ValueError as e:
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


def tag_texts(vocab, template=WORLD_TEMPLATES[0]):
    return [template.format(t) for t in vocab.tags]


def world_setup(args, ckpt):
    """The world, from scratch: TagAlign (train), or a plain CLIP with CLIP's own tokenizer
    (pretrain). Returns (model, tokenizer, vocab, world, tag tokens (K, L))."""
    pretrain = args.command == "pretrain"
    if ckpt:
        model = model_lib.model_from_checkpoint(ckpt, os.path.join(args.out, "ckpt.pt"))
        cfg, wcfg = model.cfg, WorldConfig(**ckpt["world"])
        world = World(args.seed, cfg.image_size, cfg=wcfg)
        tokenizer = (Tokenizer.from_clip() if ckpt["tokenizer"] == "clip"
                     else Tokenizer.from_state_dict(ckpt["tokenizer"]))
        vocab = TagVocab.from_tags(ckpt["tags"], ckpt.get("synonyms"), ckpt.get("tag_kinds"))
    else:
        cfg, wcfg = apply_settings(args.set, Config(**model_lib.WORLD_CLIP) if pretrain else Config(),
                                   WorldConfig())
        world = World(args.seed, cfg.image_size, cfg=wcfg)
        t0 = time.time()
        if pretrain:  # CLIP's own tokenizer, so that its token ids mean what they mean in OpenAI's files
            tokenizer, vocab = Tokenizer.from_clip(), TagVocab([], [], [])
        else:
            tokenizer, vocab = build_world_text(args, world)
            print(f"world text: {args.corpus} captions, {tokenizer.vocab_size} tokens, {len(vocab.tags)} tags "
                  f"({time.time() - t0:.1f}s): {' '.join(vocab.tags)}")
        cfg.vocab_size = tokenizer.vocab_size
        model = model_lib.CLIP(cfg.check()) if pretrain else TagAlign(cfg)
    return model, tokenizer, vocab, world, tokenizer(tag_texts(vocab), cfg.context_length)  # (K, L)


def export_clip(model, path):
    """A pretrained CLIP as an OpenAI-format state dict (its module names are OpenAI's), written
    atomically; `--clip path` reads it through the same loader as ViT-B-16.pt."""
    save_atomic({k: v.detach().cpu() for k, v in model.state_dict().items()}, path)


def as_raw_clip(clip, device):
    """A trained CLIP as a frozen TagAlign whose CLIP head (ln_post + proj) the evaluator reads."""
    model = TagAlign(clip.cfg, frozen_clip=True)
    model.clip.load_state_dict(clip.state_dict())
    return model.to(device)


# ---------------------------------------------------------------- paper mode: frozen CLIP, shards, cached text
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


def paper_setup(args, ckpt, device):
    """OpenAI CLIP frozen, TagAlign's decoder on top, trained on image-text shards: (model,
    tokenizer, vocab, shard tags, the shard stream, CLIP file identity)."""
    clip_path, (rank, ranks) = args.clip, rank_and_count()
    sha = model_lib.file_sha256(clip_path) if os.path.isfile(clip_path) else None
    if ckpt and ckpt["clip"]["sha256"] != sha:
        raise SystemExit(f"error: --resume: {args.out}/ckpt.pt was trained on the CLIP file with sha256 "
                         f"{ckpt['clip']['sha256'][:12]}..., --clip {clip_path} is another file")
    if ckpt:
        model = model_lib.model_from_checkpoint(ckpt, os.path.join(args.out, "ckpt.pt"), clip_path)
    else:
        model = model_lib.load_clip(clip_path)
        if args.set:  # the paper's head with other settings: build it anew
            cfg, _ = apply_settings(args.set, model.cfg, WorldConfig(), allowed=PAPER_SETTINGS)
            model = model_lib.load_clip(clip_path, cfg)
    tokenizer = Tokenizer.from_clip()
    if model.cfg.vocab_size != tokenizer.vocab_size:
        raise SystemExit(f"error: --clip {clip_path}: {model.cfg.vocab_size} token embeddings, CLIP's tokenizer "
                         f"has {tokenizer.vocab_size} ids")
    try:
        sources = data.expand_shards(args.data)
        tags = ShardTags(args.tags, sources) if args.tags else None
        mean, std = data.NORMS[args.norm]
        stream = data.ImageTextStream(sources, tags, tokenizer, model.cfg.context_length, args.batch_size,
                                      model.cfg.image_size, args.seed, args.shuffle_buffer, mean, std,
                                      rank=rank, world_size=ranks, workers=args.workers,
                                      crop_scale=(args.crop_scale, 1.0))
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(f"error: {e}") from None
    if ckpt:
        if ckpt["data"]["workers"] != args.workers:
            raise SystemExit(f"error: --resume: the run read its shards with --workers {ckpt['data']['workers']}; "
                             f"the stream continues exactly only with the same number")
        stream.resume(ckpt["data"]["states"][rank], ckpt["step"] + 1)  # this rank's workers
    vocab = tags.vocab if tags else TagVocab([], [], [])
    print(f"data: {len(sources)} shards ({args.data}), tags: {args.tags or 'none'} ({len(vocab)} tags)")
    return model.to(device), tokenizer, vocab, tags, stream, {"path": os.path.abspath(clip_path), "sha256": sha}


# ---------------------------------------------------------------- checkpoints
def save_atomic(obj, path):
    """torch.save through a temporary file: a crash mid-write leaves the old file, never half of one."""
    torch.save(obj, path + ".tmp")
    os.replace(path + ".tmp", path)


def save_checkpoint(path, state):
    """Write a checkpoint atomically. Under torchrun rank 0 alone writes (every rank builds
    `state`: gathering it may need them all)."""
    if rank_and_count()[0] == 0:
        save_atomic(state, path)


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


def checkpoint_state(model, optimizer, scaler, step, args):
    """What every checkpoint holds: what trains, the optimizer, the step, the RNGs, the config
    and the arguments (the mode adds its own: tokenizer, tags, world or CLIP file, data). Plain
    data only (tensors, numbers, strings, lists, tuples, dicts), which read_checkpoint reads
    with weights_only=True: a shared checkpoint carries no code."""
    return {"model": model.trainable_state_dict(), "optimizer": optimizer.state_dict(),
            "scaler": scaler.state_dict(), "step": step, "rng": rng_state(),
            "config": dataclasses.asdict(model.cfg), "args": vars(args)}


# ---------------------------------------------------------------- distributed training (torchrun)
# `torchrun --nproc_per_node R tagalign.py train ...` starts R copies of this program with RANK,
# LOCAL_RANK, WORLD_SIZE and the rendezvous in the environment. Each rank trains on --batch-size
# samples of every step's global batch of R x --batch-size: the world's rank r takes batch
# step R + r of the single-process stream of that size (so the world's contrast pairs, scenes
# 2k and 2k + 1, stay on one rank when --batch-size is even); the paper's shards are dealt each
# epoch to R x --workers slots (data.ImageTextStream: every sample once per epoch; a slot dealt
# one shard fewer starts its next epoch earlier). Rank 0 alone writes the log, the checkpoints
# and the curves and runs the evaluation; the other ranks stop after the final checkpoint (a
# barrier would time out under a long evaluation).
PROGRESS = {"step": None}  # the step in progress, named when a collective fails


@contextlib.contextmanager
def process_group(args):
    """The process group of a torchrun run (nothing without one, args.ranks == 1): NCCL with
    one GPU per rank (cuda:LOCAL_RANK) or gloo on CPUs, collectives that give up after
    --dist-timeout seconds; the other ranks' stdout silenced. A failed collective (a rank died,
    or stalled past the timeout) becomes one line naming this rank and the step."""
    if args.ranks == 1:
        yield
        return
    cuda = args.device.startswith("cuda")
    if cuda:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))  # "cuda" is now this rank's GPU
    dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(seconds=args.dist_timeout))
    rank = dist.get_rank()
    if rank == 0:
        print(f"torchrun: {args.ranks} ranks ({dist.get_backend()}), batch {args.batch_size} per rank = "
              f"{args.batch_size * args.ranks} global")
    try:
        with contextlib.redirect_stdout(open(os.devnull, "w")) if rank else contextlib.nullcontext():
            yield
    except BaseException as e:
        # Free the run (train's frames, its DDP among them) while the group still exists: DDP's
        # C++ reducer, freed after destroy_process_group, destroys the group while holding the GIL
        # and joins gloo's thread, which may be waiting for the GIL: a hang at exit (torch 2.13).
        traceback.clear_frames(e.__traceback__)
        # NCCL and the store raise DistError; gloo's transport a RuntimeError that names gloo
        if isinstance(e, RuntimeError) and (isinstance(e, dist.DistError) or "gloo" in str(e)):
            why = re.sub(r"^\[[^\]]*\]\s*", "", str(e).strip()).split(". ")[0]  # "[.../pair.cc:553] Connection..."
            raise SystemExit(f"error: rank {rank}: a collective failed at step {PROGRESS['step']} (another rank "
                             f"died, or stalled past --dist-timeout {args.dist_timeout:g}s): {why}") from None
        raise
    finally:
        gc.collect()  # the same for a run that returned (DDP may sit in reference cycles)
        dist.destroy_process_group()


@contextlib.contextmanager
def rank0_first():
    """Rank 0 runs the block first (e.g. writes a cache), then the others (which read it)."""
    rank, ranks = rank_and_count()
    if rank > 0:
        dist.barrier()
    yield
    if rank == 0 and ranks > 1:
        dist.barrier()


class LossOfBatch(nn.Module):
    """compute_loss as a module, so that DDP sees the whole step (the gathers included) in one
    forward: (images, tokens, targets, tag_tokens, tag_emb) -> (total, itc, tag)."""

    def __init__(self, model, args):
        super().__init__()
        self.model, self.args = model, args

    def forward(self, images, tokens, targets, tag_tokens=None, tag_emb=None):
        a = self.args
        return compute_loss(self.model, images, tokens, targets, tag_tokens=tag_tokens, tag_emb=tag_emb,
                            tag_weight=a.tag_weight, tag_loss=a.tag_loss, tag_grad=a.tag_grad, impl=a.kernels)


def data_parallel(model, args, device):
    """The training step's loss function: LossOfBatch, wrapped in DDP under torchrun.

    DDP averages the gradients of the parameters that train; a frozen CLIP is left out even of
    its start-up broadcast (every rank loaded the same file). Some parameters get no gradient
    (the world model's unused CLIP head, the tag temperature with --tag-weight 0): static_graph
    has DDP find them in the first step (the graph is the same every step) and leaves their .grad
    None, as one process does (find_unused_parameters would too, with a graph traversal every
    step). The world model's BatchNorms become SyncBatchNorm2d; their running statistics stay
    equal on every rank, so DDP need not broadcast buffers before each forward."""
    step = LossOfBatch(model, args)
    if not dist.is_initialized():
        return step
    # A 1x1 conv's weight gradient comes with other strides than DDP's bucket: a copy, not an error
    warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")
    for m in model.modules():
        if type(m) is nn.BatchNorm2d:
            m.__class__ = SyncBatchNorm2d  # a subclass with no state of its own: same parameters and keys
    frozen = [f"model.{k}" for k, p in model.named_parameters() if not p.requires_grad]
    torch.nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(step, frozen)
    return torch.nn.parallel.DistributedDataParallel(
        step, device_ids=[torch.cuda.current_device()] if device.type == "cuda" else None,  # cuda:LOCAL_RANK
        static_graph=True, forward_sync_buffers=False)


def losses_across_ranks(step, loss, itc, tag, counts):
    """The global batch's (loss, itc, tag) as floats and the skip counts summed over the ranks.

    Each rank's losses are R x its share (see compute_loss), so the global ones are their means.
    A non-finite loss stops the run here, before the backward: the values are all-gathered first,
    so every rank stops at the same step with the same message (a rank that raised alone would
    leave the others waiting in the backward's collectives)."""
    mine = torch.tensor([loss.item(), itc.item(), tag.item(), *(counts.get(k, 0) for k in data.SKIPS)],
                        dtype=torch.float64, device=loss.device)
    every = [mine]
    if dist.is_initialized():
        every = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
        dist.all_gather(every, mine)
    every = torch.stack(every).cpu()  # (R, 3 + skips)
    bad = [r for r in range(len(every)) if not torch.isfinite(every[r, 0])]
    if bad:
        loss, itc, tag = every[bad[0], :3].tolist()
        where = f" on rank {', '.join(map(str, bad))}" if dist.is_initialized() else ""
        raise SystemExit(f"error: loss is {loss} at step {step}{where} (itc {itc}, tag {tag}); "
                         "lower --lr or check the data")
    total = every.mean(0).tolist()
    skipped = {k: int(v) for k, v in zip(data.SKIPS, every[:, 3:].sum(0).tolist())} if counts else {}
    return *total[:3], skipped


def gather_objects(obj):
    """[rank 0's obj, rank 1's, ...] on every rank (pickled); [obj] without a process group."""
    if not dist.is_initialized():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


# ---------------------------------------------------------------- training
RESUME_MUST_MATCH = ("steps", "batch_size", "lr", "warmup", "schedule", "beta2", "weight_decay", "seed",
                     "tag_weight", "tag_loss", "tag_grad", "corpus", "vocab_size", "top_tags", "min_tag_count",
                     "set", "data", "tags", "norm", "template", "shuffle_buffer", "synonyms", "crop_scale")


def autocast(device, precision):
    if precision in ("bf16", "fp16"):
        return torch.autocast(device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)
    return contextlib.nullcontext()


def train(args):
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    random.seed(args.seed)
    ckpt_path = os.path.join(args.out, "ckpt.pt")
    ckpt = None
    if args.resume:  # a file that is not a checkpoint is refused with one line before anything is written
        ckpt = read_checkpoint(ckpt_path, resume=True)
        for k in RESUME_MUST_MATCH:  # a resumed run must be the same run
            if ckpt["args"].get(k) != getattr(args, k, None):
                raise SystemExit(f"error: {ckpt_path} was trained with --{k.replace('_', '-')} "
                                 f"{ckpt['args'].get(k)}, this command says {getattr(args, k, None)}")
        if ckpt["args"].get("pairs", False) != args.pairs:  # checkpoints from before --pairs have none
            raise SystemExit(f"error: {ckpt_path} was trained {'without' if args.pairs else 'with'} --pairs, "
                             f"this command says {'with' if args.pairs else 'without'}")
        if ckpt["args"]["ranks"] != args.ranks:  # each rank's data and the global batch depend on it
            raise SystemExit(f"error: {ckpt_path} was trained on {ckpt['args']['ranks']} ranks, this run has "
                             f"{args.ranks}: resume with as many (torchrun --nnodes x --nproc_per_node)")
    os.makedirs(args.out, exist_ok=True)
    device = torch.device(args.device)
    rank, ranks = rank_and_count()

    paper = args.clip is not None
    if paper:
        model, tokenizer, vocab, tags, stream, clip_file = paper_setup(args, ckpt, device)
        with rank0_first():  # rank 0 writes the cache of tag embeddings, the others read it
            tag_emb = (tag_embeddings(model, tokenizer, vocab, args.tags, clip_file["sha256"], args.template, device)
                       if args.tag_weight and len(vocab) else None)
        # The stream yields whole batches; collate_fn=data.as_is spares the default conversion
        # a walk through every batch's stream state (the shuffle buffer's references).
        loader = torch.utils.data.DataLoader(stream, batch_size=None, num_workers=args.workers,
                                             collate_fn=data.as_is, pin_memory=device.type == "cuda",
                                             timeout=600 if args.workers else 0)
        batches, states = iter(loader), dict(ckpt["data"]["states"][rank]) if ckpt else {}
        counts = {}

        def next_batch(step):
            b = next(batches)
            states[b["worker"]] = b["state"]  # the state after the last batch consumed, per worker
            counts.update({k: sum(s["counts"][k] for s in states.values()) for k in data.SKIPS})
            targets = (tags.targets(b["rows"]) if tags else torch.zeros(len(b["rows"]), 0, dtype=torch.bool))
            return b["images"], b["tokens"], targets

        def mode_state():
            return {"clip": clip_file, "tokenizer": "clip", "tags": vocab.tags,
                    "data": {"states": gather_objects(dict(states)), "workers": args.workers}}  # [rank][worker]
    else:
        model, tokenizer, vocab, world, tag_tokens = world_setup(args, ckpt)
        model, tag_emb, counts = model.to(device), None, {}
        # The next batch is drawn in a thread while this one trains: world generation is numpy
        # and Python, and torch releases the GIL inside its kernels, so the two overlap.
        prefetch = ThreadPoolExecutor(1)
        pretrain = args.command == "pretrain"
        norm = data.NORMS[args.norm] if pretrain else (WORLD_MEAN, WORLD_STD)
        # rank r of R reads batch s R + r of the stream: its share of the global batch (see process_group)
        fetch = lambda s: world_batch(world, s * ranks + rank, args.batch_size, tokenizer, vocab, model.cfg,  # noqa: E731
                                      norm)
        pending = {}

        def next_batch(step):
            batch = (pending.pop(step) if step in pending else fetch(step))
            if step + 1 < args.steps:
                pending[step + 1] = prefetch.submit(fetch, step + 1)
            return batch if isinstance(batch, tuple) else batch.result()

        def mode_state():
            return {"tokenizer": "clip" if pretrain else tokenizer.state_dict(), "tags": vocab.tags,
                    "synonyms": vocab.synonyms, "world": dataclasses.asdict(world.cfg),
                    **({"tag_kinds": vocab.kinds} if vocab.pairs else {})}

    # the paper's head: the authors' decay groups; the world from scratch (and pretrain): matrices
    optimizer = make_optimizer(model, lr=args.lr, weight_decay=args.weight_decay, beta2=args.beta2,
                               decay="official" if paper else "matrices")
    scaler = torch.amp.GradScaler(device.type, enabled=args.precision == "fp16")
    start = 0
    if ckpt:
        optimizer.load_state_dict(ckpt["optimizer"])
        if ckpt["scaler"]:  # empty when fp16 was off
            scaler.load_state_dict(ckpt["scaler"])
        set_rng_state(ckpt["rng"])
        start = ckpt["step"] + 1
        print(f"resumed from {ckpt_path} at step {start}")
    if paper:
        n = model_lib.trainable_parameters(model)
        print(f"model: CLIP {model.cfg.vision_width}w x {model.cfg.vision_layers} frozen ({model.cfg.dense} features), "
              f"trainable {n['total']:,} = decoder {n['decoder']:,} + head {n['head']:,} + scales {n['scales']}; "
              f"batch {args.batch_size}, lr {args.lr:.3g} ({args.schedule}), {args.precision} on {device}")
    else:
        n_params = sum(p.numel() for p in model.parameters())
        print(f"model: {n_params / 1e6:.2f}M parameters, grid {model.cfg.image_size // model.cfg.patch_size}^2, "
              f"tag weight {args.tag_weight} ({args.tag_loss}), kernels {args.kernels}")

    loss_of_batch = data_parallel(model, args, device)  # compute_loss; through DDP under torchrun
    bar = tqdm(range(start, args.steps), initial=start, total=args.steps, disable=args.quiet or rank > 0,
               dynamic_ncols=True)
    log_path = os.path.join(args.out, "log.jsonl")
    rows = []
    if ckpt and rank == 0 and os.path.exists(log_path):  # keep the log up to the checkpoint: no step twice
        with open(log_path) as f:
            rows = [line for line in f if json.loads(line)["step"] < start]
    log = open(log_path if rank == 0 else os.devnull, "w")  # rank 0 alone writes the log
    log.writelines(rows)
    t_train, seen = 0.0, 0
    tag_tokens = None if paper else tag_tokens.to(device)
    model.train()
    for step in bar:
        t0 = time.time()
        PROGRESS["step"] = step  # named if a collective fails
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, args)
        try:
            images, tokens, targets = next_batch(step)
        except (ValueError, RuntimeError) as e:  # the stream refused its data (the message says why)
            raise SystemExit(f"error: data at step {step}: {str(e).strip().splitlines()[-1]}") from None
        images, tokens, targets = (x.to(device, non_blocking=True) for x in (images, tokens, targets))
        with autocast(device, args.precision):
            loss, itc, tag = loss_of_batch(images, tokens, targets, tag_tokens, tag_emb)
        loss_v, itc_v, tag_v, skipped = losses_across_ranks(step, loss, itc, tag, counts)  # stops on non-finite
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        scaler.step(optimizer)
        scaler.update()
        t_train += time.time() - t0
        seen += args.batch_size * ranks
        bar.set_postfix(loss=f"{loss_v:.3f}", img_s=f"{seen / t_train:.0f}",
                        **({"skipped": sum(skipped.values())} if paper else {}))
        if step % args.log_every == 0 or step == args.steps - 1:
            row = {"step": step, "loss": loss_v, "itc": itc_v, "tag": tag_v,
                   "lr": lr_at(step, args), "scale": model.itc_logit_scale.exp().item(),
                   "img_per_s": seen / t_train, **({"skipped": skipped} if paper else {})}
            log.write(json.dumps(row) + "\n")
            log.flush()
            if args.quiet or step % (10 * args.log_every) == 0:
                tqdm.write(" ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()))
        if args.ckpt_every and step > start and step % args.ckpt_every == 0:
            save_checkpoint(ckpt_path, {**checkpoint_state(model, optimizer, scaler, step, args), **mode_state()})
    bar.close()
    log.close()
    if not paper:
        prefetch.shutdown()
    if start <= args.steps:  # the final checkpoint (a finished run resumed has nothing to add)
        save_checkpoint(ckpt_path, {**checkpoint_state(model, optimizer, scaler, args.steps, args), **mode_state()})
    if rank > 0:  # rank 0 alone draws the curves and evaluates
        return model
    if t_train:
        print(f"trained {args.steps - start} steps in {t_train:.0f}s ({seen / t_train:.0f} images/s)"
              + (f"; skipped samples: {skipped}" if paper else ""))
    if eval_seg.save_curves(log_path, os.path.join(args.out, "curves.png")):
        print(f"wrote {os.path.join(args.out, 'curves.png')}")
    if args.command == "pretrain":
        export_clip(model, os.path.join(args.out, "clip.pt"))
        print(f"wrote {os.path.join(args.out, 'clip.pt')} (OpenAI's layout: give it to --clip)")
    names = eval_seg.parse_names(args.eval_benchmarks) if args.eval_benchmarks else []
    if args.eval_images and names:
        if args.command == "pretrain":  # raw CLIP: its own ln_post + proj on the surgery tokens
            seg = SegmentationModel(as_raw_clip(model, device), tokenizer, device, head="clip",
                                    norm=data.NORMS[args.norm])
        else:
            seg = SegmentationModel(model, tokenizer, device, norm=data.NORMS[args.norm] if paper else None)
        extra = {"config": dataclasses.asdict(model.cfg), "args": vars(args)}
        extra.update({} if paper else {"world": dataclasses.asdict(world.cfg)})
        eval_seg.run_benchmarks(seg, names, data_root=args.data_root, out_dir=args.out, n_images=args.eval_images,
                                extra=extra, world=None if paper else world.cfg)
    return model


# ---------------------------------------------------------------- command line
# Defaults that differ between the world (from scratch) and the paper (--clip: frozen CLIP on
# shards; the paper's settings: AdamW betas (0.9, 0.999), lr 1e-3 at a global batch of 4096,
# constant, no warm-up, 30k steps at 512 per GPU).
MODE_DEFAULTS = {
    "world": {"steps": 1500, "batch_size": 64, "warmup": 0.05, "schedule": "cosine", "beta2": 0.98,
              "eval_benchmarks": ",".join(WORLD_BENCHMARKS)},
    "paper": {"steps": 30000, "batch_size": 512, "warmup": 0.0, "schedule": "constant", "beta2": 0.999,
              "eval_benchmarks": ""},
    "pretrain": {"steps": 5000, "batch_size": 64, "warmup": 0.05, "schedule": "cosine", "beta2": 0.98,
                 "eval_benchmarks": ",".join(WORLD_BENCHMARKS)},
}
PAPER_SETTINGS = ("dense", "surgery_blocks", "decoder_blocks")  # what --set may change beside a CLIP file


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
                        ".jsonl ({\"caption\": ...} a line) or webdataset .tar shards (KEY.txt / KEY.json)")
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
    return parser


def finish_train_args(parser, args):
    """Mode defaults, derived values and checks of `train`'s (and `pretrain`'s) arguments."""
    mode = "pretrain" if args.command == "pretrain" else "paper" if args.clip else "world"
    if mode == "pretrain" and (args.clip or args.data or args.tags or args.tag_weight != 1.0):
        parser.error("pretrain trains a CLIP on the world with ITC alone: no --clip, --data, --tags or --tag-weight")
    if mode == "pretrain":
        args.tag_weight = 0.0
    if mode == "world" and args.norm != "imagenet":
        parser.error("--norm: paper mode and pretrain only (the world model uses the world's own pixel statistics)")
    for k, v in MODE_DEFAULTS[mode].items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    args.ranks = int(os.environ.get("WORLD_SIZE", 1))  # torchrun's world size: processes, one per device
    if args.lr is None:  # the paper: 1e-3 at a global batch of 4096, scaled linearly
        args.lr = 1e-3 * args.batch_size * args.ranks / 4096 if args.clip else 1e-3
    if args.precision == "auto":
        args.precision = "bf16" if args.device.startswith("cuda") else "fp32"
    if args.clip and not args.data:
        parser.error("--clip needs --data (the image-text shards to train on)")
    if args.synonyms and args.clip:
        parser.error("--synonyms: in paper mode the tags come from `tags`; give --synonyms to that command")
    if args.pairs and mode != "world":
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
    if args.ranks > 1 and not args.clip and args.batch_size % 2:
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
            stats = tag_files(args.captions, args.out, top_objects=args.top_objects,
                                   top_attributes=args.top_attributes, min_count=args.min_count,
                                   workers=args.workers, progress=not args.quiet, synonyms=synonyms,
                                   pairs=args.pairs, top_pairs=args.top_pairs, min_pair_count=args.min_pair_count)
        except (ValueError, FileNotFoundError) as e:
            raise SystemExit(f"error: {e}")
        print(format_tag_stats(stats))
        return stats
    if args.command == "shards":
        _, wcfg = apply_settings(args.set, Config(), WorldConfig(),
                                 allowed=["world." + f.name for f in dataclasses.fields(WorldConfig)])
        paths = write_world_shards(args.out, args.scenes, args.per_shard, args.seed, args.image_size, wcfg)
        print(f"wrote {args.scenes} world scenes in {len(paths)} shards: {paths[0]} ... {paths[-1]}")
        return paths
    if args.command in ("train", "pretrain"):
        args = finish_train_args(parser, args)
        with process_group(args):  # under torchrun; nothing otherwise
            return train(args)


if __name__ == "__main__":
    main()
