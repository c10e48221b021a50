"""Fuzzing of everything that parses a file we did not write (benchmarks/fuzz.py):
every seed of tests/fuzz_corpus ends in a loaded model or one EdgeRtError of one line,
with an allocation bounded by its size; then a short coverage-guided run (atheris) of
each target. The long run (1,000,000 inputs) is a benchmark: BENCHMARKS.md."""
from __future__ import annotations

import json
import subprocess
import sys
import tracemalloc
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
import fuzz  # noqa: E402

MAX_TRACED = 64 << 20  # bytes a seed of < 120 KB may make Python and numpy allocate at once


@pytest.fixture(scope="module")
def harness(tmp_path_factory):
    return fuzz.Harness(tmp_path_factory.mktemp("fuzz"))


@pytest.mark.parametrize("target", list(fuzz.TARGETS))
def test_every_seed_loads_or_is_refused_in_one_line(harness, target):
    seeds = sorted((fuzz.CORPUS / target).iterdir())
    assert len(seeds) >= 10
    for seed in seeds:
        data = seed.read_bytes()
        tracemalloc.start()
        try:
            getattr(harness, target)(data)  # raises anything but a one-line EdgeRtError
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert peak < MAX_TRACED, f"{seed.name}: {peak / 2**20:.0f} MiB allocated for a {len(data)}-byte input"


@pytest.mark.parametrize("name", [p.name for p in sorted((fuzz.CORPUS / "gguf").glob("hostile-*"))])
def test_hostile_gguf_seeds_are_refused(harness, name):
    from edge_rt import api
    from edge_rt.errors import EdgeRtError
    path = fuzz.CORPUS / "gguf" / name
    with pytest.raises(EdgeRtError) as e:
        api.load(path, ctx=64, threads=1)
    assert "\n" not in str(e.value)


def test_the_structure_walker_finds_every_kind_of_field():
    data = (fuzz.CORPUS / "gguf" / "smollm2-tiny.gguf").read_bytes()
    kinds = {k for _, _, k in fuzz.gguf_fields(data)}
    assert kinds == {"n_tensors", "n_kv", "strlen", "vtype", "etype", "count", "n_dims", "dim", "ttype", "offset", "align"}


def test_short_coverage_guided_run(tmp_path):
    pytest.importorskip("atheris", reason="atheris has no wheel for this platform / Python")
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "fuzz.py"), "--runs", "100000", "--max-time", "5",
                        "--artifacts", str(tmp_path / "findings"), "--work-corpus", str(tmp_path / "corpus"), "--json"],
                       capture_output=True, text=True, timeout=600)
    summary = json.loads(r.stdout.strip().splitlines()[-1])
    for t in summary["targets"]:
        assert t["exit"] == 0, f"{t['target']}: a finding:\n{t.get('finding')}"
        assert t["inputs"] >= 50 and t["coverage_edges"], t  # a few thousand on an idle 2-core machine
    assert r.returncode == 0


def test_size_limits_refuse_before_reading(tmp_path):
    """A string longer than MAX_STRING in a GGUF, and a JSON file longer than MAX_TEXT in a
    folder, are refused by their length (sparse files: nothing is read or allocated)."""
    import shutil
    import struct
    from edge_rt.converters.hf import MAX_TEXT
    from edge_rt.converters.readers import open_source
    from edge_rt.errors import EdgeRtError
    from edge_rt.gguf_file import MAX_STRING, GGUFFile
    g = tmp_path / "long-string.gguf"
    with open(g, "wb") as f:
        f.write(b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + struct.pack("<Q", MAX_STRING + 1))
        f.truncate(MAX_STRING + 64)
    tracemalloc.start()
    with pytest.raises(EdgeRtError, match=f"string of {MAX_STRING + 1} bytes"):
        GGUFFile(g)
    assert tracemalloc.get_traced_memory()[1] < 1 << 20
    tracemalloc.stop()
    folder = tmp_path / "hf"
    shutil.copytree(fuzz.CORPUS / "hf-folder", folder)
    for name in ("config.json", "tokenizer.json"):
        shutil.copytree(fuzz.CORPUS / "hf-folder", folder, dirs_exist_ok=True)
        with open(folder / name, "ab") as f:
            f.truncate(MAX_TEXT + 1)
        with pytest.raises(EdgeRtError, match=f"{name}: {MAX_TEXT + 1} bytes"):
            open_source(folder)
