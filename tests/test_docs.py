"""Every command that README.md and RESULTS.md show, run at a tiny size through the real entry
points (tagalign.main, eval_seg.main, bench.main; torchrun as forked gloo ranks), in the order
the documents give them, in one folder laid out as a reader's checkout would be after the
commands before. A documented command that crashes, or does not do what it says, fails here.

What counts as a documented command (documented_commands):
- each line of a fenced code block, a trailing backslash joining lines, `# comments` dropped; a
  ```python block is one command, its code run as it is;
  "python bench.py losses | tags | world | paper" is four commands;
- each backticked span that starts with `python `, `torchrun `, `pytest` or a script (*.py) and its
  flags (`eval_seg.py --clip runs/world_clip/clip.pt`); a span that starts with `... ` is the
  command before it with these flags ("... --dense maskclip" after "python eval_seg.py --clip X
  --dense plain"), and "the train command, `--flag`" is the last train command of the code
  block above it with the flag.

How it runs at a tiny size (plan): the files the documents take as given are made by the
`house` fixture under their documented names (ViT-B-16.pt: a small OpenAI-layout CLIP; DATA:
the ten benchmarks' layouts, one image each; DIR: predictions for --preds; cc12m/: 4 shards);
PLACEHOLDERS rewrites what cannot keep its name (1,243 shards, --seed S, --clip ...); SIZES
shrinks the sizes a command gives and TINY appends the tiny flags of its script and subcommand.
A command whose script and subcommand TINY does not know fails
test_every_documented_command_has_a_tiny_size: a document that gains a command gains its test.
`pip install -r requirements.txt` is checked as an import of every requirement, and `pytest`
is this run.
"""
import contextlib
import glob
import io
import json
import os
import re
import shlex
import traceback
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import bench
import data
import eval_seg
import model as model_lib
import tagalign
from _clip import make_ref_clip, write_clip
from tags import read_synonyms, TagVocab
from test_bench import TINY_LOADER
from test_distributed import launch
from test_eval_seg import write_tree
from test_train import tiny_config
from world import write_world_shards

REPO = Path(__file__).resolve().parent.parent
DOCS = ("README.md", "RESULTS.md")
SCRIPTS = ("tagalign.py", "eval_seg.py", "bench.py")


# ---------------------------------------------------------------- the commands the documents show
def _is_command(span):
    first = span.split()[0]
    return (span.startswith(("python ", "torchrun ", "... ")) or span == "pytest"
            or (first.endswith(".py") and len(span.split()) > 1))


def _commands_of(text):
    """[(offset, command)]: the lines of the fenced code blocks (offset of their first line), the
    backticked commands and "the train command, `--flag`" (see the module docstring)."""
    found, block, joined, start, offset, code = [], False, "", None, 0, None
    for line in text.splitlines(keepends=True):
        here, offset = offset, offset + len(line)
        if line.startswith("```"):
            block = not block
            if line.strip() == "```python":
                code, start = "", here
            elif code is not None:  # the end of a Python block: one snippet
                found.append((start, "block", "python-snippet\n" + code))
                code, start = None, None
            continue
        if code is not None:
            code += line
            continue
        if block:
            line = re.sub(r"\s+#.*$", "", line.rstrip("\n")).rstrip()
            start = here if start is None else start
            if line.endswith("\\"):
                joined += line[:-1]
                continue
            if (joined + line).strip():
                found.append((start, "block", " ".join((joined + line).split())))
            joined, start = "", None
    prose = re.sub(r"(?ms)^```.*?^```", lambda m: re.sub(r"[^\n]", " ", m.group(0)), text)  # blocks blanked
    for m in re.finditer(r"`([^`]+)`", prose):
        span = " ".join(m.group(1).split())
        if span and _is_command(span):
            found.append((m.start(), "span", span))
    for m in re.finditer(r"the train command, `([^`]+)`", prose):
        found.append((m.start(), "train", " ".join(m.group(1).split())))
    return sorted(found)


def documented_commands():
    """[(where, command)] in document order, duplicates kept."""
    out = []
    for doc in DOCS:
        text, last, blocks = (REPO / doc).read_text(), None, []
        for offset, how, command in _commands_of(text):
            if how == "block":
                blocks.append(command)
            if how == "train":  # the last train command of the code blocks above, with the flags
                command = [c for c in blocks if "tagalign.py train" in c][-1] + " " + command
            elif command.startswith("... "):  # the command before, from these flags on
                words, flags = last.split(), command.split()[1:]
                command = " ".join(words[:words.index(flags[0])] + flags)
            where = f"{doc}:{text.count(chr(10), 0, offset) + 1}"
            command = "python " + command if command.split()[0].endswith(".py") else command
            head, *alternatives = command.split(" | ")
            if alternatives and all(len(a.split()) == 1 for a in alternatives):  # "losses | tags | ..."
                out += [(where, head)] + [(where, head.rsplit(" ", 1)[0] + " " + a) for a in alternatives]
            else:
                out.append((where, command))
            last = command if command != "pytest" else last
    return out


# ---------------------------------------------------------------- how each runs at a tiny size
# What cannot keep its documented name here: a text, or (flag, value), and its stand-in.
PLACEHOLDERS = {"'cc12m/{00000..01242}.tar'": "'cc12m/{00000..00003}.tar'", ("--seed", "S"): "0",
                ("--clip", "..."): "runs/world_clip/clip.pt"}
SIZES = {"--steps": "3", "--batch-size": "4", "--scenes": "40", "--workers": "1", "--nproc_per_node": "2"}
TINY = {  # (script, subcommand) -> the flags appended, each unless the command gives it
    ("tagalign.py", "train"): ["--steps", "3", "--batch-size", "4", "--corpus", "600", "--vocab-size", "600",
                               "--min-tag-count", "1", "--shuffle-buffer", "8", "--eval-images", "1", "--quiet"],
    ("tagalign.py", "pretrain"): ["--steps", "3", "--batch-size", "4", "--eval-images", "1", "--quiet"],
    ("tagalign.py", "tags"): ["--workers", "1", "--quiet"],
    ("tagalign.py", "shards"): ["--per-shard", "2"],  # --scenes 40: the 20 shards the train command reads
    ("eval_seg.py", None): ["--world-images", "1", "--limit", "1", "--n-vis", "1"],
    ("bench.py", "losses"): ["--sizes", "8", "--dim", "16", "--tags", "32", "--repeat", "1", "--warmup", "0",
                             "--impls", "chunked", "torch"],  # compile: a minute of compiling, not a tiny size
    ("bench.py", "tags"): ["--n", "300"],
    ("bench.py", "world"): ["--images", "4", "--batch-size", "4", "--repeat", "1", "--warmup", "0",
                            "--eval-images", "1", "--reference-images", "2"],
    ("bench.py", "paper"): ["--clip", "ViT-B-16.pt", "--batch-size", "2", "--repeat", "1", "--warmup", "0",
                            "--eval-crops", "1"],  # the house's small CLIP in ViT-B/16's place
    ("bench.py", "loader"): TINY_LOADER,
    ("tagalign.py", "segment"): ["--quiet"],
}


def _flag_groups(words):
    """["--a", "1", "--b", "x", "y"] -> [["--a", "1"], ["--b", "x", "y"]]."""
    groups = []
    for w in words:
        if w.startswith("--") or not groups:
            groups.append([w])
        else:
            groups[-1].append(w)
    return groups


def plan(command):
    """(kind, script, words): how `command` runs here at a tiny size, its words still quoted as
    the shell would read them (expand them with shell_words when the files exist); ValueError for
    a command nothing here knows how to run small."""
    for k, v in PLACEHOLDERS.items():
        command = command.replace(k, v) if isinstance(k, str) else command
    if command.startswith("python-snippet\n"):
        return "snippet", None, command.split("\n", 1)[1]
    words = shlex.split(command, posix=False)  # quoted words stay whole, quotes kept
    for i in range(1, len(words)):
        words[i] = PLACEHOLDERS.get((words[i - 1], words[i]), SIZES.get(words[i - 1], words[i]))
    if words == ["pytest"] or words[:2] == ["pip", "install"]:
        return words[0], None, words[1:]
    kind = words[0] if words[0] in ("python", "torchrun") else "python"
    words = words[next((i for i, w in enumerate(words) if w in SCRIPTS), len(words)):]
    if not words:
        raise ValueError("runs none of " + ", ".join(SCRIPTS))
    script, argv = words[0], words[1:]
    sub = None if script == "eval_seg.py" else argv[0] if argv else None
    if (script, sub) not in TINY:
        raise ValueError(f"no tiny size for {script} {sub or ''}: add one to TINY in tests/test_docs.py")
    given = {w for w in argv if w.startswith("--")}
    return kind, script, argv + [w for g in _flag_groups(TINY[(script, sub)]) if g[0] not in given for w in g]


def shell_words(words):
    """The words as a shell passes them: quotes removed; an unquoted word with braces or a glob
    expanded against the current folder (kept as it is when nothing matches)."""
    out = []
    for word in words:
        if word[:1] in "'\"":
            out.append(word[1:-1])
            continue
        found = [f for w in data._braces(word) for f in (sorted(glob.glob(w)) if glob.has_magic(w) else [w])]
        out += found or [word]
    return out


# ---------------------------------------------------------------- the house: what the documents take as given
@pytest.fixture(scope="module")
def house(tmp_path_factory):
    """A folder as a reader's checkout is when the documents' first command runs: the word lists,
    a small OpenAI-layout CLIP at ViT-B-16.pt, 4 world shards at cc12m/00000.tar ..., the ten
    benchmarks' layouts under DATA (one image each), and ground-truth label PNGs in DIR (the
    predictions `--preds DIR` scores), and the README's own photos: photos/ with a PNG and a
    JPEG, classes.txt."""
    root = tmp_path_factory.mktemp("house")
    os.symlink(REPO / "words", root / "words")
    write_clip(make_ref_clip(vision_layers=1), root / "ViT-B-16.pt", "torchscript")
    for i, path in enumerate(write_world_shards(str(root / "cc12m"), 32, per_shard=8)):
        os.rename(path, root / "cc12m" / f"{i:05d}.tar")
    for name in ("voc", "context", "coco-stuff", "imagenets50", "imagenets300", "cityscapes", "ade20k"):
        write_tree(root / "DATA", name, n=1)
    (root / "DIR").mkdir()
    voc = eval_seg.load_benchmark("voc", root / "DATA")
    for i in range(len(voc)):
        _, label, image_id = voc[i]
        Image.fromarray(np.asarray(label, np.uint8)).save(root / "DIR" / f"{image_id}.png")
    (root / "photos").mkdir()
    image = np.asarray(voc[0][0], np.uint8)
    Image.fromarray(image).save(root / "photos" / "a.png")
    Image.fromarray(image[:, ::-1]).save(root / "photos" / "b.jpg")
    (root / "classes.txt").write_text("cat\ngrass, lawn  # synonyms\n")
    return root


def _torchrun_rank(rank, ports, argv):
    return tagalign.main(argv) is not None


def run_and_check(kind, script, argv):
    """Run one planned command (shell_words done) in the current folder and check what it made;
    returns its stdout."""
    if kind == "pytest":
        return ""  # this run
    if kind == "snippet":  # a README Python example, run as it is
        scope = {}
        exec(compile(argv, "README.md", "exec"), scope)
        return ""
    if kind == "pip":  # the requirements are installed: each one imports
        for line in (REPO / "requirements.txt").read_text().splitlines():
            name = re.split(r"[=<>~\[; ]", line.split("#")[0].strip())[0]
            if name:
                __import__({"pillow": "PIL"}.get(name, name))
        return ""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        if kind == "torchrun":  # 2 gloo ranks, forked, as tests/test_distributed.py runs them
            assert launch(Path.cwd(), _torchrun_rank, [*argv, "--device", "cpu"], timeout=120) == [True, True]
        elif script == "tagalign.py" and "--resume" in argv:
            _interrupted(argv)
            result = tagalign.main(argv)
        elif script == "tagalign.py":
            result = tagalign.main(argv)
        elif script == "eval_seg.py":
            result = eval_seg.main(argv)
        else:
            result = bench.main(argv)
    text = out.getvalue()
    if kind == "torchrun":
        ckpt = torch.load("out/ckpt.pt", weights_only=True)
        assert ckpt["args"]["ranks"] == 2 and ckpt["step"] == int(SIZES["--steps"])
    elif script == "tagalign.py":
        _check_tagalign(argv, result)
    elif script == "eval_seg.py":
        _check_eval_seg(argv, result)
    else:
        expect = {"losses": "chunked", "tags": "captions/s", "world": "majority class", "paper": "training step",
                  "loader": "goals"}
        assert expect[argv[0]] in text, text
    return text


def _given(argv, flag, default=None):
    return argv[argv.index(flag) + 1] if flag in argv else default


def _interrupted(argv):
    """The run that `--resume` continues: the same command, stopped after its checkpoint at step 1."""
    saves, save = [], tagalign.save_checkpoint

    def save_then_stop(*a):
        saves.append(1)
        if len(saves) == 2:
            raise KeyboardInterrupt
        save(*a)

    tagalign.save_checkpoint = save_then_stop
    try:
        tagalign.main([w for w in argv if w != "--resume"] + ["--ckpt-every", "1"])
    except KeyboardInterrupt:
        pass
    finally:
        tagalign.save_checkpoint = save
    assert torch.load(os.path.join(_given(argv, "--out", "out"), "ckpt.pt"), weights_only=True)["step"] == 1


def _check_tagalign(argv, result):
    sub, out = argv[0], _given(argv, "--out", "out")
    if sub == "shards":
        scenes, per_shard = int(_given(argv, "--scenes")), int(_given(argv, "--per-shard"))
        assert len(result) == scenes // per_shard and all(os.path.isfile(p) for p in result)
        return
    if sub == "segment":  # every image segmented, each with its label map
        out = _given(argv, "--out", "out/segment")
        assert result["images"] and not result["skipped"]
        assert all(os.path.isfile(os.path.join(out, i["files"]["labels"])) for i in result["images"])
        return
    if sub == "tags":
        vocab = TagVocab.load(os.path.join(out, "vocab.json"))
        assert result["samples"] > 0 and len(vocab) > 0 and os.path.isfile(os.path.join(out, "tag_keys.npy"))
        if "--synonyms" in argv:  # every group one tag, named by its first name
            assert not set(read_synonyms(_given(argv, "--synonyms"))) & set(vocab.tags)
        return
    # train and pretrain: the run the flags describe, every step in the log, its evaluation
    ckpt = torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)
    args = vars(tagalign.build_parser().parse_args(argv))
    assert ckpt["step"] == int(SIZES["--steps"])
    for flag in (w for w in argv if w.startswith("--") and w not in ("--resume", "--ckpt-every")):
        key = flag[2:].replace("-", "_")
        assert ckpt["args"][key] == args[key], (flag, ckpt["args"][key], args[key])
    with open(os.path.join(out, "log.jsonl")) as f:  # every --log-every steps and the last, each once
        steps = [json.loads(line)["step"] for line in f]
    assert steps == sorted(set(steps)) and steps[0] == 0 and steps[-1] == int(SIZES["--steps"]) - 1, steps
    if sub == "pretrain":
        assert model_lib.load_clip(os.path.join(out, "clip.pt")).cfg.vision_width == model_lib.WORLD_CLIP["vision_width"]
    names = eval_seg.parse_names(ckpt["args"]["eval_benchmarks"]) if ckpt["args"]["eval_benchmarks"] else []
    if names:
        metrics = json.loads(Path(out, "metrics.json").read_text())
        assert all(np.isfinite(metrics[k]["mIoU"]) for k in names), metrics["mean"]


def _check_eval_seg(argv, metrics):
    names = eval_seg.parse_names(_given(argv, "--benchmarks"))
    assert all(k in metrics for k in names) and np.isfinite(metrics["mean"]["mIoU"])
    if "--preds" in argv:  # the house's predictions are the ground truth
        assert metrics["voc"]["mIoU"] == 100.0
        return
    protocol = metrics[names[0]]["protocol"]
    for flag, field, value in (("--scoring", "score", "sigmoid"), ("--clip-w", "clip_w", 0.0)):
        if flag in argv:
            assert getattr(protocol, field) == value
    if "--dense" in argv:
        assert metrics["args"]["dense"] == _given(argv, "--dense")
    if "--cosines" in argv:
        assert all("cosines" in metrics[k] for k in names)


# ---------------------------------------------------------------- the tests
COMMANDS = documented_commands()
UNIQUE = list(dict.fromkeys(c for _, c in COMMANDS))


def test_the_documents_show_commands():
    """The extraction finds the documents' commands (a broken extractor would test nothing)."""
    assert {"python tagalign.py train", "pytest", "python bench.py world", "python tagalign.py train --resume",
            "python eval_seg.py --ckpt DIR/ckpt.pt --clip-w 0 --out DIR/no_blend",
            "python eval_seg.py --clip runs/world_clip/clip.pt --dense maskclip --out DIR"} <= set(UNIQUE)
    assert any(c.startswith("torchrun --standalone") for c in UNIQUE)
    assert any(c.startswith("python tagalign.py train --clip runs/world_clip/clip.pt") and c.endswith("--tag-weight 0")
               for c in UNIQUE)


def test_every_documented_command_has_a_tiny_size():
    """plan knows how to run each documented command small: a new script, subcommand or
    placeholder in the documents fails here until TINY (or PLACEHOLDERS) learns it."""
    for where, command in COMMANDS:
        try:
            plan(command)
        except ValueError as e:
            pytest.fail(f"{where}: {command}: {e}")


@pytest.fixture(scope="module")
def ran(house):
    """Every documented command, once, in document order, in the house, with the tiny model of
    tests/test_train.py: {command: None, or why it failed (the end of its traceback)}."""
    results, threads = {}, torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: a second thread only adds synchronisation
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(house)
        mp.setattr(tagalign, "Config", tiny_config)
        for command in UNIQUE:
            try:
                kind, script, words = plan(command)
                run_and_check(kind, script, words if kind == "snippet" else shell_words(words))
                results[command] = None
            except BaseException as e:  # SystemExit and KeyboardInterrupt too: the command failed
                results[command] = "".join(traceback.format_exception(e))[-3000:]
    torch.set_num_threads(threads)
    return results


@pytest.mark.parametrize("command", UNIQUE, ids=lambda c: " ".join(c.split("\n")[:2]))
def test_documented_command_runs(ran, command):
    where = ", ".join(w for w, c in COMMANDS if c == command)
    assert ran[command] is None, f"{where}: {command}\n{ran[command]}"
