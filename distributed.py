"""Training under torchrun: collectives with gradients, the synced BatchNorm, and the plumbing
of a DDP run (its process group, rank 0 first, the loss as DDP's module, the losses and skip
counts across ranks). Without torchrun there is no process group and every function here does
what one process would.

`torchrun --nproc_per_node R tagalign.py train ...` starts R copies of the program with RANK,
LOCAL_RANK, WORLD_SIZE and the rendezvous in the environment. Each rank trains on --batch-size
samples of every step's global batch of R x --batch-size, and DDP averages the ranks'
gradients. So every loss a rank computes is R times its share of the loss of the global batch:
the average over ranks of the gradients is then the gradient of the global loss, and the
average of the ranks' losses is the global loss (what the log shows). Rank 0 alone writes the
log, the checkpoints and the curves and runs the evaluation; the other ranks stop after the
final checkpoint (a barrier would time out under a long evaluation).
"""
import contextlib
import datetime
import gc
import os
import re
import traceback
import warnings

import torch
import torch.distributed as dist
import torch.nn as nn


# ---------------------------------------------------------------- collectives
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


def gather_objects(obj):
    """[rank 0's obj, rank 1's, ...] on every rank (pickled); [obj] without a process group."""
    if not dist.is_initialized():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


# ---------------------------------------------------------------- BatchNorm over the global batch
class SyncBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d whose training statistics are those of the global batch: per-channel sums
    gathered (with gradients) over the ranks, so that R ranks normalise as one process with the
    whole batch would, and the running statistics (updated alike on every rank) stay equal.
    torch.nn.SyncBatchNorm does the same but refuses CPU tensors, so it could not be tested
    with gloo; this is one plain-torch path for both. Assumes equal per-rank batches and a set
    momentum (BatchNorm2d's 0.1). Computed in fp32 at least (two passes: the mean, then the
    squared deviations)."""

    @classmethod
    def convert(cls, module):
        """`module` with every nn.BatchNorm2d in it replaced by a SyncBatchNorm2d that holds the
        same parameter and buffer tensors (as torch.nn.SyncBatchNorm.convert_sync_batchnorm
        does): an optimizer built before keeps training them, and the state dict's keys stay."""
        if type(module) is nn.BatchNorm2d:
            sync = cls(module.num_features, module.eps, module.momentum, module.affine, module.track_running_stats)
            sync.weight, sync.bias = module.weight, module.bias  # the same Parameters
            sync.running_mean, sync.running_var = module.running_mean, module.running_var
            sync.num_batches_tracked = module.num_batches_tracked
            return sync.train(module.training)
        for name, child in module.named_children():
            module.add_module(name, cls.convert(child))  # replaces the child in place, same position
        return module

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


# ---------------------------------------------------------------- the process group of a run
PROGRESS = {"step": None}  # the step in progress, named when a collective fails


@contextlib.contextmanager
def process_group(ranks, device, dist_timeout, batch_size):
    """The process group of a torchrun run (nothing without one, ranks == 1): NCCL with one GPU
    per rank (cuda:LOCAL_RANK) or gloo on CPUs, collectives that give up after dist_timeout
    seconds; the other ranks' stdout silenced. A failed collective (a rank died, or stalled past
    the timeout) becomes one line naming this rank and the step (PROGRESS)."""
    if ranks == 1:
        yield
        return
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))  # "cuda" is now this rank's GPU
    dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(seconds=dist_timeout))
    rank = dist.get_rank()
    if rank == 0:
        print(f"torchrun: {ranks} ranks ({dist.get_backend()}), batch {batch_size} per rank = "
              f"{batch_size * ranks} global")
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
                             f"died, or stalled past --dist-timeout {dist_timeout:g}s): {why}") from None
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


# ---------------------------------------------------------------- the training step under DDP
class LossOfBatch(nn.Module):
    """A loss function of (model, *batch) as a module, so that DDP sees the whole step (the
    gathers included) in one forward: (*batch) -> loss_fn(model, *batch)."""

    def __init__(self, model, loss_fn):
        super().__init__()
        self.model, self.loss_fn = model, loss_fn

    def forward(self, *batch):
        return self.loss_fn(self.model, *batch)


def data_parallel(model, loss_fn, device):
    """The training step's loss, loss_fn(model, *batch), as LossOfBatch; wrapped in DDP under
    torchrun.

    DDP averages the gradients of the parameters that train; a frozen CLIP is left out even of
    its start-up broadcast (every rank loaded the same file). Some parameters get no gradient
    (the world model's unused CLIP head, the tag temperature with --tag-weight 0): static_graph
    has DDP find them in the first step (the graph is the same every step) and leaves their .grad
    None, as one process does (find_unused_parameters would too, with a graph traversal every
    step). The world model's BatchNorms become SyncBatchNorm2d; their running statistics stay
    equal on every rank, so DDP need not broadcast buffers before each forward."""
    step = LossOfBatch(model, loss_fn)
    if not dist.is_initialized():
        return step
    # A 1x1 conv's weight gradient comes with other strides than DDP's bucket: a copy, not an error
    warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")
    SyncBatchNorm2d.convert(model)
    frozen = [f"model.{k}" for k, p in model.named_parameters() if not p.requires_grad]
    torch.nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(step, frozen)
    return torch.nn.parallel.DistributedDataParallel(
        step, device_ids=[torch.cuda.current_device()] if device.type == "cuda" else None,  # cuda:LOCAL_RANK
        static_graph=True, forward_sync_buffers=False)


def losses_across_ranks(step, loss, itc, tag, counts):
    """The global batch's (loss, itc, tag) as floats, and `counts` (e.g. the samples the data
    skipped, by reason; the same keys on every rank) summed over the ranks.

    Each rank's losses are R x its share (see the module docstring), so the global ones are their
    means. A non-finite loss stops the run here, before the backward: the values are all-gathered
    first, so every rank stops at the same step with the same message (a rank that raised alone
    would leave the others waiting in the backward's collectives)."""
    mine = torch.tensor([loss.item(), itc.item(), tag.item(), *counts.values()], dtype=torch.float64,
                        device=loss.device)
    every = [mine]
    if dist.is_initialized():
        every = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
        dist.all_gather(every, mine)
    every = torch.stack(every).cpu()  # (R, 3 + len(counts))
    bad = [r for r in range(len(every)) if not torch.isfinite(every[r, 0])]
    if bad:
        loss, itc, tag = every[bad[0], :3].tolist()
        where = f" on rank {', '.join(map(str, bad))}" if dist.is_initialized() else ""
        raise SystemExit(f"error: loss is {loss} at step {step}{where} (itc {itc}, tag {tag}); "
                         "lower --lr or check the data")
    total = every.mean(0).tolist()
    return *total[:3], {k: int(v) for k, v in zip(counts, every[:, 3:].sum(0).tolist())}
