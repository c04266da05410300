"""Image-text shards (data.py): brace lists, the join to the `tags` output, the stream's split
across workers, its skip counts on broken data, its exact resume (official augmentation and
draft decoding on, with workers), its small state, and the tag targets its workers build."""
import io
import os
import pickle
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image

import data
from augment import cc12m_like_jpeg
from bench import targets_loop
from data import write_tar
from tags import ShardTags, tag_files
from tokenizer import Tokenizer
from world import World, write_world_shards


def png(seed, size=24):
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size, size + 4, 3), np.uint8)).save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """5 world shards of 12, 12, 12, 12 and 8 scenes (uneven), tagged."""
    root = tmp_path_factory.mktemp("world")
    paths = write_world_shards(str(root / "shards"), 56, per_shard=12)
    tag_files(paths, str(root / "tags"), min_count=1, workers=1, progress=False)
    w = World(0)
    tok = Tokenizer.train([w.caption(i) for i in range(300)], 600)
    return root, paths, tok


@pytest.fixture(scope="module")
def jpegs(tmp_path_factory, world):
    """4 webdataset shards of 6 CC12M-like JPEGs (100-200 px, so that crops to 32 px decode at
    1/2 or 1/4 scale) with world captions, tagged."""
    root = tmp_path_factory.mktemp("jpegs")
    rng, w, paths = np.random.default_rng(0), World(0), []
    for s in range(4):
        members = []
        for i in range(6 * s, 6 * s + 6):
            members += [(f"{i:04d}.jpg", cc12m_like_jpeg(rng, sides=(100, 200))),
                        (f"{i:04d}.txt", w.caption(i).encode())]
        paths.append(write_tar(root / f"j-{s}.tar", members))
    tag_files(paths, str(root / "tags"), min_count=1, workers=1, progress=False)
    return root, paths, world[2]


def stream(paths, tags, tok, workers=0, buffer=7, batch=4, seed=0, size=16, **kw):
    return data.ImageTextStream(paths, tags, tok, 16, batch, image_size=size, seed=seed, buffer=buffer,
                                workers=workers, **kw)


def test_brace_lists_and_globs(tmp_path):
    assert data._braces("a{00..02}b{x,y}") == ["a00bx", "a00by", "a01bx", "a01by", "a02bx", "a02by"]
    assert data._braces("s{8..10}") == ["s8", "s9", "s10"]
    for name in ("s-000.tar", "s-001.tar", "s-002.tar"):
        write_tar(tmp_path / name, [])
    assert data.expand_shards(str(tmp_path / "s-{000..001}.tar")) == [str(tmp_path / "s-000.tar"), str(tmp_path / "s-001.tar")]
    assert len(data.expand_shards(str(tmp_path / "s-*.tar"))) == 3
    with pytest.raises(ValueError, match="no file matches"):
        data.expand_shards(str(tmp_path / "s-{000..003}.tar"))
    with pytest.raises(ValueError, match="captions.tsv"):
        data.expand_shards(str(tmp_path))


def test_every_sample_once_per_epoch_across_two_workers(world):
    """Shards split across 2 DataLoader workers (5 shards: one worker has one more): over the
    first epochs every (epoch, sample) comes exactly once, and batches alternate workers."""
    root, paths, tok = world
    tags = ShardTags(str(root / "tags"), paths)
    loader = torch.utils.data.DataLoader(stream(paths, tags, tok, workers=2), batch_size=None, num_workers=2)
    seen, workers = Counter(), []
    for k, b in enumerate(loader):
        seen.update(zip(b["epochs"].tolist(), b["rows"].tolist()))
        workers.append(b["worker"])
        if k == 80:
            break
    assert workers[:6] == [0, 1, 0, 1, 0, 1]
    assert max(seen.values()) == 1
    for epoch in (0, 1):
        assert sorted(r for e, r in seen if e == epoch) == list(range(56)), epoch


def test_every_sample_once_per_epoch_across_two_ranks_of_two_workers(world):
    """torchrun's split: 2 ranks x 2 workers = 4 slots over 5 shards (one slot reads two, and
    starts its next epoch later; the others earlier). Over the first two epochs every (epoch,
    sample) comes exactly once from all four slots together, and the ranks' streams differ."""
    root, paths, tok = world
    tags = ShardTags(str(root / "tags"), paths)
    seen, per_rank = Counter(), []
    for rank in (0, 1):
        s = data.ImageTextStream(paths, tags, tok, 16, 4, image_size=16, buffer=7, rank=rank, ranks=2, workers=2)
        mine = Counter()
        for k, b in enumerate(torch.utils.data.DataLoader(s, batch_size=None, num_workers=2)):
            mine.update(zip(b["epochs"].tolist(), b["rows"].tolist()))
            if k == 40:  # 164 samples: past the second epoch of the slowest slot (24 samples an epoch)
                break
        seen.update(mine)
        per_rank.append({r for e, r in mine if e == 0})
    assert max(seen.values()) == 1
    for epoch in (0, 1):
        assert sorted(r for e, r in seen if e == epoch) == list(range(56)), epoch
    assert not per_rank[0] & per_rank[1]  # an epoch's samples split, not shared, between the ranks
    with pytest.raises(ValueError, match="5 shards for 2 ranks x 3 workers"):
        data.ImageTextStream(paths, tags, tok, 16, 4, rank=1, ranks=2, workers=3)


def check_resume(make, stop=9, total=24):
    """Restarted from the worker states of the first `stop` batches, the stream of `make()` (a
    DataLoader) gives the same batches as one that never stopped. Returns the states."""
    whole = []
    for b in make():
        whole.append(b)
        if len(whole) == total:
            break
    states = {}
    for b in whole[:stop]:
        states[b["worker"]] = b["state"]
    assert any(s["resume"] for s in states.values())  # stopped inside a shard
    resumed = make()
    resumed.dataset.resume(states, stop)
    for k, b in enumerate(resumed):
        a = whole[stop + k]
        for key in ("images", "tokens", "targets", "rows", "epochs"):
            assert torch.equal(a[key], b[key]), (k, key)
        if stop + k == len(whole) - 1:
            break
    return states


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_continues_the_stream_exactly(world, workers):
    """Restarted from the worker states of the first 9 batches (mid-shard, mid-buffer), the
    stream gives the same images, tokens, targets and rows as one that never stopped."""
    root, paths, tok = world
    tags = ShardTags(str(root / "tags"), paths)
    check_resume(lambda: torch.utils.data.DataLoader(stream(paths, tags, tok, workers), batch_size=None,
                                                     num_workers=workers))


@pytest.mark.parametrize("augment,decode", [("official", "draft"), ("light", "full")])
def test_resume_with_workers_on_jpegs(jpegs, augment, decode):
    """2 workers on JPEGs, the official augmentation with draft decoding (the paper mode's
    default) and the light one with full decoding: resumed mid-shard, the same batches. The
    states carry the shuffle buffer as ints only: a few bytes a buffered sample."""
    root, paths, tok = jpegs
    tags = ShardTags(str(root / "tags"), paths)
    make = lambda: torch.utils.data.DataLoader(  # noqa: E731
        stream(paths, tags, tok, 2, buffer=5, batch=2, size=32, augment=augment, decode=decode),
        batch_size=None, num_workers=2, collate_fn=data.as_is)
    states = check_resume(make, stop=5, total=14)
    for st in states.values():
        buf = st["buffer"]
        assert len(buf["sources"]) == len(buf["samples"]) == len(buf["epochs"]) == 4  # buffer 5, one just left
        assert all(type(v) is int for lst in buf.values() for v in lst)
        assert len(pickle.dumps(st)) < 600  # rng, counts and position ~ 480 bytes, + ~8 per sample


def test_resume_from_a_shard_that_changed_says_so(tmp_path):
    """A saved shuffle buffer names samples by their number in a shard: one that is gone when
    the stream resumes (the shard rewritten shorter) stops it with a clear error."""
    def members(n):
        return [m for i in range(n) for m in ((f"{i:04d}.png", png(i)), (f"{i:04d}.txt", b"a red circle"))]
    path = write_tar(tmp_path / "a.tar", members(12))
    tok = Tokenizer.train(["a red circle"], 520)
    b = next(iter(stream([path], None, tok, buffer=6, batch=2)))
    assert max(b["state"]["buffer"]["samples"]) >= 4
    write_tar(tmp_path / "a.tar", members(3))
    s = stream([path], None, tok, buffer=6, batch=2)
    s.resume({0: b["state"]}, 1)
    with pytest.raises(ValueError, match=r"a.tar no longer holds sample \d+ of the saved shuffle buffer \(the shard changed"):
        next(iter(s))


def test_official_augmentation_reaches_the_batches(jpegs):
    """The stream's images are the Augment's. A worker's first sample is the same whatever the
    augmentation (later ones differ: official draws more numbers per image): draft decoding
    gives it close to the full decode's, and official adds RandAugment or erasing to it."""
    root, paths, tok = jpegs
    changed = 0
    for seed in range(6):
        first = {}
        for augment, decode in (("light", "full"), ("light", "draft"), ("official", "draft")):
            first[augment, decode] = next(iter(stream(paths, None, tok, buffer=3, batch=1, size=32, seed=seed,
                                                      augment=augment, decode=decode)))
        a, d, o = first["light", "full"], first["light", "draft"], first["official", "draft"]
        assert torch.equal(a["tokens"], d["tokens"]) and torch.equal(a["tokens"], o["tokens"])  # the same sample
        assert (a["images"] - d["images"]).abs().mean() < 0.05  # ~ 1.5 levels / 255 / std, at most
        changed += (o["images"] - d["images"]).abs().max() > 0.5
        assert a["targets"].shape == (1, 0) and (a["rows"] == -1).all()  # no tags given
    assert changed >= 3  # an op or an erasure applies with probability 1 - 0.5^2 x 0.75 = 0.81


def test_targets_built_in_the_workers_are_the_tag_rows(world):
    """The (B, K) targets a worker builds in one scatter equal the row-by-row loop the main
    process ran before; and the scatter on rows with no tags, repeated rows and one row."""
    root, paths, tok = world
    tags = ShardTags(str(root / "tags"), paths)
    loader = torch.utils.data.DataLoader(stream(paths, tags, tok, workers=2), batch_size=None, num_workers=2,
                                         collate_fn=data.as_is)
    for k, b in enumerate(loader):
        assert b["targets"].dtype == torch.bool and b["targets"].shape == (4, len(tags.vocab))
        assert torch.equal(b["targets"], targets_loop(tags, b["rows"])), k
        if k == 6:
            break
    fake = object.__new__(ShardTags)  # offsets and ids by hand: row 1 has no tags
    fake.offsets, fake.ids, fake.vocab = np.array([0, 2, 2, 5, 6]), np.array([3, 0, 1, 4, 3, 2], np.uint16), range(5)
    for rows in ([2, 1, 0, 2, 3], [1], [1, 1], [3], [0, 3, 2, 1]):
        assert torch.equal(fake.targets(np.array(rows)), targets_loop(fake, torch.tensor(rows))), rows
    assert fake.targets(np.array([0, 1, 2])).tolist() == [[1, 0, 0, 1, 0], [0] * 5, [0, 1, 0, 1, 1]]


def test_broken_data_is_skipped_and_counted(tmp_path):
    """A corrupt image, an image without caption, a caption without image, a caption that is
    not UTF-8, a truncated tar and an empty shard: skipped, counted, never fatal."""
    good = [(f"{i:04d}.png", png(i)) for i in range(6)] + [(f"{i:04d}.txt", f"a red circle {i}".encode()) for i in range(6)]
    good.sort()
    a = write_tar(tmp_path / "a.tar", good + [("0100.jpg", b"\xff\xd8 not a jpeg"), ("0100.txt", b"a cat"),
                                              ("0101.png", png(101)), ("0102.txt", b"a dog"),
                                              ("0103.png", png(103)), ("0103.txt", b"\xff\xfe")])
    b, d = write_tar(tmp_path / "b.tar", good), write_tar(tmp_path / "d.tar", good)
    raw = open(b, "rb").read()
    open(b, "wb").write(raw[: len(raw) // 2])  # cut between two members
    open(d, "wb").write(raw[: len(raw) // 2 - 700])  # cut inside a member
    c = write_tar(tmp_path / "c.tar", [])
    tok = Tokenizer.train(["a red circle"], 520)
    s = stream([a, b, c, d], None, tok, workers=0, buffer=2, batch=2)
    states, rows = {}, []
    it = iter(s)
    for _ in range(8):
        batch = next(it)
        states[batch["worker"]] = batch["state"]
        rows += batch["rows"].tolist()
    counts = states[0]["counts"]
    epochs = states[0]["epoch"] + 1  # epochs begun: each counts its skips again
    assert counts["bad_image"] >= 1 and counts["unpaired"] >= 2 and counts["bad_caption"] >= 1
    assert 2 <= counts["truncated"] <= 2 * epochs  # both cut shards, once per epoch each
    assert rows and all(r == -1 for r in rows)  # no tags given


def test_tags_from_other_shards_are_refused(world, tmp_path):
    root, paths, tok = world
    other = write_world_shards(str(tmp_path / "other"), 12, per_shard=12, start=1000)
    os.rename(other[0], str(tmp_path / "other" / "elsewhere.tar"))
    with pytest.raises(ValueError, match="built from other files"):
        ShardTags(str(root / "tags"), [str(tmp_path / "other" / "elsewhere.tar")])
    changed = write_world_shards(str(tmp_path / "changed"), 14, per_shard=14)  # same name, other size
    with pytest.raises(ValueError, match="bytes"):
        ShardTags(str(root / "tags"), changed)


def test_keys_are_checked_against_the_tags(world, tmp_path):
    """A shard of the same name and size but other samples: the first key that differs stops
    the stream with a clear error."""
    root, paths, tok = world
    fake = write_world_shards(str(tmp_path / "fake"), 12, per_shard=12, start=500)[0]
    os.makedirs(tmp_path / "renamed")
    target = str(tmp_path / "renamed" / os.path.basename(paths[0]))
    os.rename(fake, target)
    if os.path.getsize(target) != os.path.getsize(paths[0]):
        pytest.skip("the stand-in shard's PNGs differ in size from the original's")
    tags = ShardTags(str(root / "tags"), [target])
    with pytest.raises(ValueError, match="tags do not match"):
        next(iter(stream([target], tags, tok, buffer=1)))



def test_write_atomic_replaces_the_file_or_leaves_it(tmp_path):
    """data.write_atomic: a writer that raises leaves the old file and no temporary; one that
    finishes replaces it."""
    path = tmp_path / "f.txt"
    path.write_text("old")
    with pytest.raises(RuntimeError):
        with data.write_atomic(path) as tmp:
            open(tmp, "w").write("half")
            raise RuntimeError("killed mid-write")
    assert path.read_text() == "old" and not os.path.exists(f"{path}.tmp")
    with data.write_atomic(path) as tmp, open(tmp, "w") as f:
        f.write("new")
    assert path.read_text() == "new" and not os.path.exists(f"{path}.tmp")
