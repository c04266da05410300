"""The `tags` command (tag_files): every input format, malformed samples, the vocabulary,
the counts, and the per-sample tag file aligned with the input order."""
import json

import numpy as np
import pytest

from data import write_tar
from tags import format_tag_stats, read_tags, tag_files, TagVocab


@pytest.fixture
def corpus(tmp_path):
    """Small files in the four formats, with malformed samples, and the rows they must give
    (tag names per sample, in input order; [] for a malformed sample)."""
    txt = tmp_path / "a.txt"
    txt.write_bytes(b"a red car on the road\n\n"  # an empty line
                    b"a black cat and a white dog\r\n"
                    b"a cat on a \xff\xfe mat\n"  # not UTF-8
                    b"two red cars\n")
    tsv = tmp_path / "b.tsv"
    tsv.write_text("url\tcaption\nhttp://x/1\ta blue car on grass\nhttp://x/2\nhttp://x/3\t  \n"
                   "http://x/4\ta dog on the grass\n")
    jsonl = tmp_path / "c.jsonl"
    jsonl.write_text('{"caption": "a dog and a cat", "id": 1}\n{"caption": "a car\n'  # bad JSON
                     '{"text": "no caption field"}\n\n{"caption": 7}\n{"caption": "a big dog"}\n')
    tar = tmp_path / "d.tar"
    write_tar(str(tar), [
        ("s/0001.jpg", b"\xff\xd8"), ("s/0001.txt", b"a green tree in a park"),
        ("s/0002.jpg", b"\xff\xd8"), ("s/0002.json", json.dumps({"caption": "a yellow car"}).encode()),
        ("s/0003.jpg", b"\xff\xd8"),  # an image without a caption
        ("s/0004.json", b"{not json"),
        ("s/0005.txt", b"a white cat"), ("s/0005.json", b'{"caption": "ignored: txt wins"}'),
    ])
    rows = [
        ["car", "road", "red"], [], ["cat", "dog", "black", "white"], [], ["car", "red"],  # a.txt
        ["car", "grass", "blue"], [], [], ["dog", "grass"],  # b.tsv
        ["dog", "cat"], [], [], [], [], ["dog", "big"],  # c.jsonl
        ["tree", "park", "green"], ["car", "yellow"], [], [], ["cat", "white"],  # d.tar
    ]
    return [str(txt), str(tsv), str(jsonl), str(tar)], rows


def read_rows(out):
    vocab = TagVocab.load(str(out / "vocab.json"))
    offsets, ids = read_tags(str(out))
    return vocab, [[vocab.tags[j] for j in ids[offsets[i]:offsets[i + 1]]] for i in range(len(offsets) - 1)]


def test_tags_all_formats_alignment_counts_and_malformed(corpus, tmp_path):
    paths, want_rows = corpus
    out = tmp_path / "out"
    stats = tag_files(paths, str(out), min_count=1, workers=1, chunk_size=4, progress=False)
    vocab, rows = read_rows(out)
    assert rows == want_rows
    assert stats["samples"] == len(want_rows) == 20 and stats["malformed"] == 10
    assert stats["tagged"] == 10
    assert [(f["samples"], f["malformed"]) for f in stats["files"]] == [(5, 2), (4, 2), (6, 4), (5, 2)]
    reasons = " | ".join(stats["malformed_examples"])
    assert "a.txt:2: empty line" in reasons and "a.txt:4: not UTF-8" in reasons
    assert "b.tsv:3: missing caption column" in reasons
    assert "malformed samples: 10" in format_tag_stats(stats)
    # Vocabulary: objects by number of captions (ties by name), then attributes.
    counts = dict(zip(vocab.tags, vocab.counts))
    assert vocab.tags[:4] == ["car", "dog", "cat", "grass"]  # 4, 4 (by name), 3, 2
    assert counts == {"car": 4, "cat": 3, "dog": 4, "grass": 2, "park": 1, "road": 1, "tree": 1,
                      "red": 2, "white": 2, "big": 1, "black": 1, "blue": 1, "green": 1, "yellow": 1}
    assert vocab.kinds == ["object"] * 7 + ["attribute"] * 7
    assert vocab.meta["corpus"]["samples"] == 20 and vocab.meta["params"]["min_count"] == 1
    assert sorted(p.name for p in out.iterdir()) == ["tag_ids.npy", "tag_keys.npy", "tag_offsets.npy", "vocab.json"]
    # Keys: line numbers (no key or image column here), tar keys; the files' first rows and sizes.
    keys = [k.decode() for k in read_tags(str(out), keys=True)[2]]
    assert keys == ["1", "2", "3", "4", "5", "2", "3", "4", "5", "1", "2", "3", "4", "5", "6",
                    "s/0001", "s/0002", "s/0003", "s/0004", "s/0005"]
    files = vocab.meta["corpus"]["files"]
    assert [f["first_row"] for f in files] == [0, 5, 9, 15]
    assert [f["name"] for f in files] == ["a.txt", "b.tsv", "c.jsonl", "d.tar"]
    assert all(f["bytes"] == (tmp_path / f["name"]).stat().st_size for f in files)


def test_tags_keys_from_key_and_image_columns(tmp_path):
    tsv = tmp_path / "caps.tsv"
    tsv.write_text("image\tcaption\nimg/a.jpg\ta red car\nimg/b.jpg\ta dog\n")
    jsonl = tmp_path / "caps.jsonl"
    jsonl.write_text('{"key": "k1", "image": "x.jpg", "caption": "a cat"}\n{"image": "y.jpg", "caption": "a dog"}\n')
    tag_files([str(tsv), str(jsonl)], str(tmp_path / "out"), min_count=1, workers=1, progress=False)
    keys = [k.decode() for k in read_tags(str(tmp_path / "out"), keys=True)[2]]
    assert keys == ["img/a.jpg", "img/b.jpg", "k1", "y.jpg"]  # "key" wins over "image"


def test_tags_workers_give_identical_files(corpus, tmp_path):
    paths, _ = corpus
    for w in (1, 2):
        tag_files(paths, str(tmp_path / f"w{w}"), min_count=1, workers=w, chunk_size=3, progress=False)
    for name in ("vocab.json", "tag_offsets.npy", "tag_ids.npy"):
        assert (tmp_path / "w1" / name).read_bytes() == (tmp_path / "w2" / name).read_bytes(), name


def test_tags_top_k_and_min_count(corpus, tmp_path):
    paths, want_rows = corpus
    out = tmp_path / "out"
    tag_files(paths, str(out), top_objects=2, top_attributes=1, min_count=2, workers=1, progress=False)
    vocab, rows = read_rows(out)
    assert vocab.tags == ["car", "dog", "red"]  # "cat" (3) loses to car and dog (4 each)
    keep = set(vocab.tags)
    assert rows == [[t for t in r if t in keep] for r in want_rows]
    offsets, ids = read_tags(str(out))
    assert offsets.dtype == np.int64 and ids.dtype == np.uint16 and len(offsets) == 21


def test_tags_bad_input_is_one_clear_error(corpus, tmp_path):
    paths, _ = corpus
    (tmp_path / "x.csv").write_text("caption\nhi\n")
    (tmp_path / "nocol.tsv").write_text("url\ttext\nhttp://x\thi\n")
    (tmp_path / "junk.tar").write_bytes(b"this is not a tar archive" * 40)
    out = str(tmp_path / "o")
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        tag_files([str(tmp_path / "missing.txt")], out, progress=False)
    with pytest.raises(ValueError, match="x.csv: unsupported"):
        tag_files([str(tmp_path / "x.csv")], out, progress=False)
    with pytest.raises(ValueError, match="nocol.tsv: TSV header has no 'caption' column"):
        tag_files(paths + [str(tmp_path / "nocol.tsv")], out, progress=False)
    with pytest.raises(ValueError, match="junk.tar: not a readable tar"):
        tag_files([str(tmp_path / "junk.tar")], out, progress=False)
    with pytest.raises(ValueError, match="--top-objects"):
        tag_files(paths, out, top_objects=-1, progress=False)
    with pytest.raises(ValueError, match="--workers"):
        tag_files(paths, out, workers=0, progress=False)
    with pytest.raises(FileNotFoundError, match="tag_offsets.npy"):
        read_tags(str(tmp_path))


def test_tags_truncated_tar_counts_and_keeps_going(tmp_path):
    good = tmp_path / "good.tar"
    write_tar(str(good), [(f"{i:04d}.txt", f"a red ball, photo {i}".encode()) for i in range(20)])
    cut = tmp_path / "cut.tar"
    cut.write_bytes(good.read_bytes()[:512 * 15 + 100])  # stops inside a member
    txt = tmp_path / "after.txt"
    txt.write_text("a blue car\n")
    stats = tag_files([str(cut), str(txt)], str(tmp_path / "out"), min_count=1, workers=1, progress=False)
    vocab, rows = read_rows(tmp_path / "out")
    assert stats["malformed"] == 1 and "truncated or corrupt tar" in stats["malformed_examples"][0]
    assert rows[-1] == ["car", "blue"] and all(r == ["ball", "red"] for r in rows[:-2])


PAIRS = {0: ["red car"], 2: ["black cat", "white dog"], 4: ["red car"], 5: ["blue car"], 14: ["big dog"],
         15: ["green tree"], 16: ["yellow car"], 19: ["white cat"]}  # the corpus rows' pair tags


def test_tags_pairs_end_to_end(corpus, tmp_path, capsys):
    import tagalign
    paths, want_rows = corpus
    base = ["tags", "--captions", *paths, "--min-count", "1", "--workers", "1", "--quiet"]
    stats = tagalign.main(base + ["--out", str(tmp_path / "p"), "--pairs", "--min-pair-count", "1"])
    vocab, rows = read_rows(tmp_path / "p")
    assert rows == [r + PAIRS.get(i, []) for i, r in enumerate(want_rows)]  # pairs after the words
    assert vocab.kinds == ["object"] * 7 + ["attribute"] * 7 + ["pair"] * 8
    assert vocab.tags[14:16] == ["red car", "big dog"] and vocab.counts[14:16] == [2, 1]  # by count, then name
    assert vocab.meta["params"]["min_pair_count"] == 1 and vocab.meta["params"]["top_pairs"] == 1000
    assert (stats["pairs"], stats["distinct_pairs"]) == (8, 8)
    assert "22 tags = 7 objects + 7 attributes + 8 pairs (of 7 distinct objects, 7 distinct attributes, " \
           "8 distinct pairs seen)" in capsys.readouterr().out
    # The pair threshold and cap are their own: the words keep min_count 1.
    tagalign.main(base + ["--out", str(tmp_path / "m2"), "--pairs", "--min-pair-count", "2"])
    assert read_rows(tmp_path / "m2")[0].tags[14:] == ["red car"]
    tagalign.main(base + ["--out", str(tmp_path / "top"), "--pairs", "--min-pair-count", "1", "--top-pairs", "2"])
    assert read_rows(tmp_path / "top")[0].tags[14:] == ["red car", "big dog"]
    with pytest.raises(SystemExit, match="--min-pair-count must be an integer >= 1"):
        tagalign.main(base + ["--out", str(tmp_path / "bad"), "--pairs", "--min-pair-count", "0"])


def test_tags_without_pairs_are_todays_files(corpus, tmp_path):
    """Off by default: no pair parameter, kind or count anywhere, and the object and attribute
    tags, counts and rows the same as the pair run's with its pairs taken out."""
    paths, want_rows = corpus
    plain = tag_files(paths, str(tmp_path / "a"), min_count=1, workers=1, progress=False)
    tag_files(paths, str(tmp_path / "b"), min_count=1, workers=1, progress=False, pairs=False, top_pairs=3,
              min_pair_count=9)  # the pair settings are ignored without pairs
    for name in ("vocab.json", "tag_offsets.npy", "tag_ids.npy", "tag_keys.npy"):
        a, b = (tmp_path / "a" / name).read_bytes(), (tmp_path / "b" / name).read_bytes()
        assert a == b, name
    doc = json.loads((tmp_path / "a" / "vocab.json").read_text())
    assert set(doc["kinds"]) == {"object", "attribute"} and set(doc["params"]) == {"top_objects", "top_attributes", "min_count"}
    assert "7 attributes (of 7 distinct objects, 7 distinct attributes seen)" in format_tag_stats(plain)
    tag_files(paths, str(tmp_path / "p"), min_count=1, workers=1, progress=False, pairs=True, min_pair_count=1)
    v, rows = read_rows(tmp_path / "a")
    vp, rows_p = read_rows(tmp_path / "p")
    assert vp.tags[:len(v)] == v.tags and vp.counts[:len(v)] == v.counts
    assert rows == [[t for t in r if t in v.index] for r in rows_p] == want_rows
