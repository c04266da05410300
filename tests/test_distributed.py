"""Training under torchrun, checked on CPUs: 2 processes with gloo and torchrun's environment.

The gathered contrastive loss, the count-weighted tag loss and the synced BatchNorm against one
process on the concatenated batch; 2 ranks x batch b against 1 process x batch 2b, in both
modes; exact resume of the paper's shard streams across ranks; a non-finite loss or a dead rank
stops both ranks, never a hang. (The split of the shards over ranks x workers is tested in
test_shards.py: it needs no processes.)
"""
import multiprocessing
import os
import socket
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

import data
import distributed
import kernels
import tagalign
from test_train import (dies_at_call, paper, read_log, run, run_paper, tiny,  # noqa: F401 (fixtures)
                        tiny_config)

RANKS = 2


@pytest.fixture(autouse=True)
def one_thread():
    """The ranks and this process share a few cores: one thread each (more only contend)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def free_ports(k):
    socks = [socket.socket() for _ in range(k)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def _child(rank, ports, out, fn, args):
    """One rank: torchrun's environment, then fn(rank, *args); its result, or the one line it
    stopped with, saved to `out` for the parent. ports: one per process group the rank starts."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(ports[0]), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(RANKS), LOCAL_WORLD_SIZE=str(RANKS))
    torch.set_num_threads(1)  # two ranks on a few shared cores
    try:
        result = fn(rank, ports, *args)
    except SystemExit as e:
        result = {"exit": str(e)}
    except BaseException:
        result = {"error": traceback.format_exc()}
    torch.save(result, out)


def launch(tmp_path, fn, *args, groups=1, timeout=60, may_die=False):
    """fn(rank, ports, *args) on RANKS forked processes; returns their results in rank order
    (None for a rank that died without one, when may_die). A rank that has not finished after
    `timeout` seconds is a hang: killed, and the test fails."""
    # fork: the ranks start at once with everything imported (spawn would import torch again, for
    # seconds per launch); safe here because they train on the CPU (--device cpu), never CUDA.
    ctx = multiprocessing.get_context("fork")
    ports, outs = free_ports(groups), [str(tmp_path / f"rank{r}.pt") for r in range(RANKS)]
    procs = [ctx.Process(target=_child, args=(r, ports, outs[r], fn, args)) for r in range(RANKS)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout)
    hung = [r for r, p in enumerate(procs) if p.is_alive()]
    for p in procs:
        if p.is_alive():
            p.kill()
    assert not hung, f"ranks {hung} still running after {timeout}s"
    results = [torch.load(o, weights_only=False) if os.path.exists(o) else None if may_die else {"error": "no result"}
               for o in outs]
    for r, res in enumerate(results):
        assert not (isinstance(res, dict) and "error" in res), f"rank {r}:\n{res['error']}"
    return results


def report(name, got, want):
    """The largest absolute difference, printed (pytest -s shows it) and returned."""
    d = (got.double() - want.double()).abs().max().item()
    print(f"{name}: max abs diff {d:.2e}")
    return d


# ---------------------------------------------------------------- the losses and BatchNorm across ranks
def _pieces(rank, ports, cases):
    """Each rank, for each (impl, dtype): its rows of the same global tensors; the gathered ITC,
    the weighted tag loss and a synced BatchNorm forward and backward. Returns what the parent
    compares."""
    dist.init_process_group("gloo")
    try:
        return [_pieces_of_case(rank, impl, dtype) for impl, dtype, _ in cases]
    finally:
        dist.destroy_process_group()


def _pieces_of_case(rank, impl, dtype):
    g = torch.Generator().manual_seed(0)  # the same global batch on both ranks
    n, E, K, C = 5, 24, 7, 3
    img = F.normalize(torch.randn(RANKS * n, E, generator=g, dtype=dtype), dim=-1)
    txt = F.normalize(torch.randn(RANKS * n, E, generator=g, dtype=dtype), dim=-1)
    tags = F.normalize(torch.randn(K, E, generator=g, dtype=dtype), dim=-1)
    targets = torch.rand(RANKS * n, K, generator=g) < 0.3
    targets[:n - 1] |= torch.eye(K, dtype=torch.bool)[:n - 1]  # rank 0: 4+ tagged rows
    targets[n:2 * n - 1] = False  # rank 1: at most one tagged row, so the counts differ
    x = torch.randn(RANKS * n, C, 4, 3, generator=g, dtype=dtype)
    dy = torch.randn(RANKS * n, C, 4, 3, generator=g, dtype=dtype)
    mine = slice(rank * n, (rank + 1) * n)

    i, t = img[mine].clone().requires_grad_(), txt[mine].clone().requires_grad_()
    s = torch.tensor(14.0, dtype=dtype, requires_grad=True)
    itc = tagalign.clip_loss_across_ranks(i, t, s, impl)
    itc.backward()
    i2, s2 = img[mine].clone().requires_grad_(), torch.tensor(11.0, dtype=dtype, requires_grad=True)
    tag = kernels.tag_loss(i2, tags, targets[mine], s2, impl=impl)  # a mean over all rows: as it is
    tag.backward()

    bn = distributed.SyncBatchNorm2d.convert(nn.BatchNorm2d(C).to(dtype))
    xr = x[mine].clone().requires_grad_()
    y = bn(xr)
    (RANKS * (y * dy[mine]).sum()).backward()  # R x this rank's share of sum(y * dy)
    return {"inputs": (img, txt, tags, targets, x, dy), "itc": itc.detach(), "dimg": i.grad, "dtxt": t.grad,
            "ds": s.grad, "tag": tag.detach(), "dimg_tag": i2.grad, "ds_tag": s2.grad, "y": y.detach(),
            "dx": xr.grad, "dw": bn.weight.grad, "db": bn.bias.grad,
            "running": (bn.running_mean, bn.running_var, bn.num_batches_tracked)}


def test_sync_batchnorm_convert_keeps_the_parameters():
    """SyncBatchNorm2d.convert replaces every BatchNorm2d, nested ones too, by one that holds the
    same Parameter and buffer tensors: an optimizer built before still trains them, and the state
    dict keeps its keys and values."""
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Sequential(nn.GELU(), nn.BatchNorm2d(4)))
    model(torch.randn(2, 3, 5, 5))  # running statistics away from their start
    params, state = list(model.parameters()), {k: v.clone() for k, v in model.state_dict().items()}
    assert distributed.SyncBatchNorm2d.convert(model) is model
    assert [type(m) for m in model.modules()].count(distributed.SyncBatchNorm2d) == 2
    assert not any(type(m) is nn.BatchNorm2d for m in model.modules())
    assert all(a is b for a, b in zip(model.parameters(), params, strict=True))
    assert list(model.state_dict()) == list(state)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


CASES = [  # (impl, dtype, tolerance of O(1) values); one launch runs them all (a launch costs seconds)
    ("torch", torch.float64, 1e-12),    # the identity itself: only fp64 rounding differs
    ("chunked", torch.float32, 2e-6),   # fp32: sums in another order, about 10 ulp of O(1) values
] + ([("triton", torch.float32, 2e-6)] if kernels.INTERPRET else [])  # the one-sided kernel, interpreted


def test_losses_across_ranks_equal_one_process(tmp_path):
    """Mean over ranks of each rank's loss = the loss of the concatenated batch; the gradients,
    averaged over ranks as DDP does (summed over ranks for the rows each rank owns: each rank
    returns R x its share's gradient), = the concatenated batch's. The tag loss with different
    numbers of tagged rows per rank, and BatchNorm's output, gradients and running statistics."""
    for case, *ranks in zip(CASES, *launch(tmp_path, _pieces, CASES), strict=True):
        print(case[:2])
        check_pieces(ranks, *case)


def check_pieces(ranks, impl, dtype, tol):
    img, txt, tags, targets, x, dy = ranks[0]["inputs"]
    mean = lambda key: sum(r[key] for r in ranks) / RANKS  # noqa: E731  what DDP's average gives
    rows = lambda key: torch.cat([r[key] for r in ranks]) / RANKS  # noqa: E731  each rank's own rows

    i, t = img.clone().requires_grad_(), txt.clone().requires_grad_()
    s = torch.tensor(14.0, dtype=dtype, requires_grad=True)
    itc = kernels.clip_loss(i, t, s, impl="torch")
    itc.backward()
    assert report("itc", mean("itc"), itc) <= tol
    assert report("d img", rows("dimg"), i.grad) <= tol and report("d txt", rows("dtxt"), t.grad) <= tol
    assert report("d scale", mean("ds"), s.grad) <= tol * 14

    i, s = img.clone().requires_grad_(), torch.tensor(11.0, dtype=dtype, requires_grad=True)
    # unequal counts of tagged rows: the official mean is over all rows, so no weight is needed
    assert targets[:5].any(1).sum() != targets[5:].any(1).sum()
    tag = kernels.tag_loss(i, tags, targets, s, impl="torch")
    tag.backward()
    assert report("tag", mean("tag"), tag) <= tol
    assert report("d img (tag)", rows("dimg_tag"), i.grad) <= tol
    assert report("d scale (tag)", mean("ds_tag"), s.grad) <= tol * 11

    bn = nn.BatchNorm2d(3).to(dtype)
    xg = x.clone().requires_grad_()
    y = bn(xg)
    (y * dy).sum().backward()
    assert report("bn y", torch.cat([r["y"] for r in ranks]), y) <= 10 * tol
    assert report("bn dx", rows("dx"), xg.grad) <= 10 * tol
    # sums over all 2n x 12 positions: a larger rounding than the per-element values above
    assert report("bn dw", mean("dw"), bn.weight.grad) <= 100 * tol
    assert report("bn db", mean("db"), bn.bias.grad) <= 100 * tol
    for r in ranks:  # the same running statistics on both ranks as in one process
        assert report("running mean", r["running"][0], bn.running_mean) <= tol
        assert report("running var", r["running"][1], bn.running_var) <= tol
        assert r["running"][2] == bn.num_batches_tracked == 1


# ---------------------------------------------------------------- 2 ranks x b = 1 process x 2b
def _world(rank, ports, out, flags):
    tagalign.Config = tiny_config  # the `tiny` fixture, in this process
    model = run(out, *flags)
    return {k: v.clone() for k, v in model.state_dict().items()}


# Both ranks follow the same float path (DDP keeps their parameters equal), but not the path of
# one process: the loss is two one-sided losses instead of one symmetric one, and BatchNorm's
# statistics and DDP's gradient average are summed in another order. The gradients then differ
# by fp32 rounding, ~2e-6 of each tensor's largest entry. Adam turns that into parameter
# differences up to ~1% of lr (lr g / (|g| + eps) is steep where a gradient is near eps = 1e-6:
# measured 1e-5 after 4 steps at lr 1e-3) and the losses into ~1e-6 relative differences; a
# wrong gradient (a missing cross-rank term, a wrong weight) moves parameters by ~lr a step.
LOSS_RTOL, PARAM_ATOL, LR, STEPS = 1e-5, 5e-5, 1e-3, 4


def compare_runs(name, one, two, log_one, log_two):
    """max abs differences of the logged losses and of the parameters; rank 0 and 1 identical."""
    for k, v in two[0].items():
        assert torch.equal(v, two[1][k]), f"{k} differs between ranks"
    worst = 0.0
    for a, b in zip(log_one, log_two, strict=True):
        for k in ("loss", "itc", "tag"):
            worst = max(worst, abs(a[k] - b[k]))
            assert abs(a[k] - b[k]) <= LOSS_RTOL * max(1.0, abs(a[k])), (a["step"], k, a[k], b[k])
    print(f"{name}: losses over {len(log_one)} steps, max abs diff {worst:.2e}")
    worst = 0.0
    for k, v in one.items():
        if k.endswith("attn.in_proj_bias"):
            # The key bias has no true gradient (softmax ignores a shift of a row), so each run
            # feeds Adam its own rounding noise, which Adam scales up to steps of lr: the key
            # third is compared within steps x lr, the rest as everything else.
            W = v.shape[0] // 3
            torch.testing.assert_close(two[0][k][W:2 * W], v[W:2 * W], rtol=0, atol=STEPS * LR, msg=k)
            v, got = torch.cat([v[:W], v[2 * W:]]), torch.cat([two[0][k][:W], two[0][k][2 * W:]])
        else:
            got = two[0][k]
        worst = max(worst, (got.double() - v.double()).abs().max().item())
        torch.testing.assert_close(got, v, rtol=0, atol=PARAM_ATOL, msg=k)
    print(f"{name}: parameters max abs diff {worst:.2e}")


def test_two_ranks_train_the_world_as_one_process(tiny, tmp_path):
    """4 steps of 2 ranks x 8 scenes against 1 process x 16 (the same scenes: rank r takes batch
    2 s + r of the 8-scene stream): the same losses and parameters, BatchNorm synced."""
    flags = ["--steps", str(STEPS), "--lr", str(LR), "--ckpt-every", "0", "--device", "cpu"]
    one = run(tmp_path / "one", *flags)  # --batch-size 16 (run's default)
    two = launch(tmp_path, _world, tmp_path / "two", [*flags, "--batch-size", "8"])
    compare_runs("world", one.state_dict(), two, read_log(tmp_path / "one"), read_log(tmp_path / "two"))
    for k in ("clip.visual.proj", "clip.visual.ln_post.weight"):  # unused: no gradient, no step, no decay
        assert torch.equal(two[0][k], one.state_dict()[k]), k
    ckpt = torch.load(tmp_path / "two" / "ckpt.pt", weights_only=True)
    assert ckpt["args"]["ranks"] == 2 and ckpt["args"]["batch_size"] == 8


class HalvesOfOneStream(data.ImageTextStream):
    """The single-process stream of global batches, of which each rank keeps its rows: so that
    2 x b and 1 x 2b read the same samples (the real split gives the ranks different shards)."""

    def __init__(self, *a, rank=0, ranks=1, **kw):
        a = list(a)  # as paper_setup passes them: a[4] is the batch size
        self.n, self.r = a[4], rank
        a[4] *= ranks
        super().__init__(*a, **kw)

    def __iter__(self):
        for b in super().__iter__():
            mine = slice(self.r * self.n, (self.r + 1) * self.n)
            yield {**b, **{k: b[k][mine] for k in ("images", "tokens", "targets", "rows", "epochs")}}


def _paper(rank, ports, paper_files, out, flags):
    data.ImageTextStream = HalvesOfOneStream
    wrap, synced = distributed.data_parallel, []

    def data_parallel(*a):  # what the DDP wrapper syncs: names of the parameters it keeps
        ddp = wrap(*a)
        synced.extend(n.removeprefix("model.") for n, _ in ddp.module.named_parameters()
                      if n not in ddp.parameters_to_ignore)
        return ddp

    distributed.data_parallel = data_parallel
    model = run_paper(paper_files, out, *flags)
    return model.trainable_state_dict(), synced


def test_two_ranks_train_the_paper_head_as_one_process(paper, tmp_path):
    """Frozen CLIP, 2 ranks x 2 images against 1 process x 4 on the same samples: the same
    losses and head. DDP syncs what trains and leaves the frozen CLIP out."""
    flags = ["--steps", str(STEPS), "--lr", str(LR), "--ckpt-every", "0", "--eval-images", "0", "--device", "cpu"]
    one = run_paper(paper, tmp_path / "one", *flags)  # --batch-size 4 (run_paper's)
    two = launch(tmp_path, _paper, paper, tmp_path / "two", [*flags, "--batch-size", "2"])
    compare_runs("paper", one.trainable_state_dict(), [r[0] for r in two], read_log(tmp_path / "one"),
                 read_log(tmp_path / "two"))
    trained = {n for n, p in one.named_parameters() if p.requires_grad}
    assert set(two[0][1]) == trained and not any(n.startswith("clip.") for n in trained)


# ---------------------------------------------------------------- resume across ranks
def _paper_resume(rank, ports, paper_files, root, flags):
    """Straight; killed after step 4 (checkpoint at 3); resumed: three runs, one port each."""
    os.environ["MASTER_PORT"] = str(ports[0])
    straight = run_paper(paper_files, root / "straight", *flags)
    loss = tagalign.compute_loss
    os.environ["MASTER_PORT"] = str(ports[1])
    tagalign.compute_loss = dies_at_call(loss, 6)  # both ranks stop at the same point
    try:
        run_paper(paper_files, root / "broken", *flags)
    except KeyboardInterrupt:
        pass
    tagalign.compute_loss = loss
    os.environ["MASTER_PORT"] = str(ports[2])
    resumed = run_paper(paper_files, root / "broken", *flags, "--resume")
    return straight.trainable_state_dict(), resumed.trainable_state_dict()


def test_paper_resume_across_ranks_continues_exactly(paper, tmp_path):
    """2 ranks x 2 workers, each reading its own shard (4 slots, 4 shards): a run killed mid-way
    and resumed gives the same losses and head as one that never stopped; the checkpoint holds
    every rank's worker states; another number of ranks is refused with one line."""
    flags = ["--steps", "6", "--ckpt-every", "3", "--eval-images", "0", "--workers", "2", "--batch-size", "2",
             "--device", "cpu"]
    ranks = launch(tmp_path, _paper_resume, paper, tmp_path, flags, groups=3, timeout=90)
    a, b = read_log(tmp_path / "straight"), read_log(tmp_path / "broken")
    assert [r["step"] for r in b] == list(range(6)) and [r["loss"] for r in a] == [r["loss"] for r in b]
    for straight, resumed in ranks:
        for k, v in straight.items():
            assert torch.equal(resumed[k], v), k
    ckpt = torch.load(tmp_path / "broken" / "ckpt.pt", weights_only=True)
    states = ckpt["data"]["states"]
    assert ckpt["args"]["ranks"] == 2 and len(states) == 2 and all(set(s) == {0, 1} for s in states)
    assert states[0][0]["rng"] != states[1][0]["rng"]  # each rank's own streams
    with pytest.raises(SystemExit, match="trained on 2 ranks, this run has 1"):
        run_paper(paper, tmp_path / "broken", *flags, "--resume")


# ---------------------------------------------------------------- failures stop every rank
def _failing(rank, ports, out, how):
    """World run in which rank 1's loss turns NaN at step 1 ("nan") or rank 1 dies at step 2."""
    tagalign.Config = tiny_config
    loss, calls = tagalign.compute_loss, []

    def broken_loss(*a, **kw):
        calls.append(1)
        total, itc, tag = loss(*a, **kw)
        if rank == 1 and how == "nan" and len(calls) == 2:
            total = total * float("nan")
        if rank == 1 and how == "dead" and len(calls) == 3:
            os._exit(3)  # no clean-up, no message: as a killed process
        return total, itc, tag

    tagalign.compute_loss = broken_loss
    run(out, "--steps", "4", "--batch-size", "8", "--dist-timeout", "30", "--device", "cpu")
    return "finished"


def test_a_non_finite_loss_on_one_rank_stops_both(tiny, tmp_path):
    ranks = launch(tmp_path, _failing, tmp_path / "nan", "nan")
    for r in ranks:
        assert r == {"exit": r["exit"]} and "loss is nan at step 1 on rank 1" in r["exit"], r


def test_a_dead_rank_stops_the_others(tiny, tmp_path):
    """Rank 1 vanishes mid-run: rank 0 stops with one line naming the step, not a hang."""
    ranks = launch(tmp_path, _failing, tmp_path / "dead", "dead", may_die=True)
    assert ranks[1] is None
    assert "error: rank 0: a collective failed at step 2" in ranks[0]["exit"], ranks[0]
