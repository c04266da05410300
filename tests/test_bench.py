"""bench.py: the documented `loader` command at a tiny size through the real entry point, and
what its numbers must satisfy (the benchmark's measurements themselves are not tested)."""
import pytest

import bench

# `python bench.py loader` (README, bench.py's docstring), with sizes that run in seconds
TINY_LOADER = ["--samples", "16", "--distinct", "2", "--sides", "64", "96", "--size", "32", "--batch-size", "4",
               "--buffer", "5", "--batches", "2", "--workers", "2", "--gpu-rate", "6000"]


def test_loader_at_a_tiny_size(capsys):
    res = bench.main(["loader", *TINY_LOADER])
    out = capsys.readouterr().out
    assert list(res["configs"]) == ["today", "light full", "light draft", "official full", "official draft"]
    for name, r in res["configs"].items():
        assert set(r["split_ms"]) == {"read", "decode", "transform", "tokenise", "collate", "state"}, name
        assert r["split_total_ms"] > 0 and r["cpu_ms"] > 0 and r["wall_ms"] > 0, name
        assert r["cores"] == pytest.approx(6000 * r["cpu_ms"] / 1e3), name  # cores = rate x CPU s per image
    for name in ("today", "light draft", "official draft"):
        assert res["configs"][name]["workers_img_s"] > 0, name
    st = res["state_bytes"]
    assert st["buffered"] == 4 and 0 < st["now"] < st["today"]  # buffer 5, one sample just left it
    g = res["goals"]
    assert g["official_draft_on_cores"] == pytest.approx(16 * res["configs"]["official draft"]["per_core"])
    for line in ("cost split", "end to end", "2 DataLoader workers", "state per batch", "goals"):
        assert line in out, line


def test_loader_refuses_bad_sizes(capsys):
    with pytest.raises(SystemExit):
        bench.main(["loader", "--sides", "900", "500"])
    assert "--sides LOW HIGH" in capsys.readouterr().err
