"""The planner with streaming, through the CLI: a budget sweep from the whole model
down to the planner's minimum where every run keeps its budget (under --enforce: the
memory cgroup's peak, page cache included, with failcnt 0) and generates the same
tokens; one budget below the minimum is refused, naming the minimum."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from edge_rt.enforce import own_cgroup

CLI = [sys.executable, "-m", "edge_rt.cli"]
PROMPT = "The capital of France is"
ARGS = ("-p", PROMPT, "-n", 8, "--ctx", 256, "--threads", 1)


def edge_rt(*args) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *map(str, args)], capture_output=True, text=True, timeout=600)


def last_json(r: subprocess.CompletedProcess) -> dict:
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout.strip().splitlines()[-1])


def named_minimum(r: subprocess.CompletedProcess) -> int:
    assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr, r.stderr
    return int(re.search(r"try --mem-budget (\d+)M", r.stderr).group(1)) << 20


@pytest.fixture(scope="module")
def cold_model(converted, tmp_path_factory) -> Path:
    """A private copy of SmolLM2 8-bit, dropped from the page cache before each use."""
    path = tmp_path_factory.mktemp("plan") / "smollm2-q8.gguf"
    shutil.copy(converted("smollm2-135m", 8), path)
    return path


def drop_from_page_cache(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    os.fsync(fd)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    os.close(fd)


def test_plan_names_what_streams_and_refuses_below_the_minimum(cold_model):
    full = last_json(edge_rt("plan", cold_model, "--ctx", 256, "--json"))
    assert full["streamed_layers"] == 0 and full["streamed_tensors"] == []
    half = last_json(edge_rt("plan", cold_model, "--ctx", 256, "--json", "--mem-budget", full["total_bytes"] * 0.8))
    assert 0 < half["streamed_layers"] < 30 and half["total_bytes"] <= full["total_bytes"] * 0.8
    assert "token_embd.weight" in half["resident_tensors"]  # the tied output head stays resident
    assert "blk.0.ffn_up.weight" in half["streamed_tensors"] and "blk.0.ffn_norm.weight" in half["resident_tensors"]
    assert half["pool_bytes"] > 0 and half["weights_bytes"] + half["streamed_bytes"] == full["weights_bytes"]
    smallest = named_minimum(edge_rt("plan", cold_model, "--ctx", 256, "--mem-budget", "10M"))
    assert 0 < smallest < full["total_bytes"] * 0.8
    least = last_json(edge_rt("plan", cold_model, "--ctx", 256, "--json", "--mem-budget", smallest))
    # at the minimum everything streams; the next process's measured runtime can come out
    # ~1 MiB smaller than this one's (numpy's BLAS threads), and with the MiB the minimum
    # was rounded up to, one 3.6 MiB layer may then fit resident
    assert least["streamed_layers"] >= 29 and least["streamed_head"] and least["total_bytes"] <= smallest
    assert "token_embd.weight" in least["streamed_tensors"]


def test_plan_streams_a_head_larger_than_the_layers_first(converted):
    """Gemma-3's tied 262k x 640 table is most of the model: at half its weights the
    plan streams the head and keeps every layer, reading fewer bytes per token than
    streaming every layer and the head, and keeps the head's first rows resident in what
    is left (the budget: no less than the set-up phase's peak, building the tokenizer)."""
    model = converted("gemma3-270m", 8)
    full = last_json(edge_rt("plan", model, "--ctx", 256, "--json"))
    half = last_json(edge_rt("plan", model, "--ctx", 256, "--json", "--mem-budget",
                             max(full["total_bytes"] - full["weights_bytes"] // 2, int(full["open_peak_bytes"] * 1.03))))
    assert half["streamed_head"] and half["streamed_layers"] == 0 and half["resident_head_rows"] > 0
    assert "token_embd.weight" in half["streamed_tensors"] and "blk.0.ffn_up.weight" in half["resident_tensors"]
    assert half["streamed_bytes"] < 0.7 * full["weights_bytes"]


def test_budget_sweep_holds_under_enforce(cold_model):
    resident = last_json(edge_rt("run", cold_model, *ARGS, "--json"))
    smallest = named_minimum(edge_rt("run", cold_model, *ARGS, "--mem-budget", "10M"))
    top = int(resident["planned_bytes"] * 1.02)
    for budget in [top - k * (top - smallest) // 4 for k in range(5)]:
        drop_from_page_cache(cold_model)
        r = last_json(edge_rt("run", cold_model, *ARGS, "--json", "--mem-budget", budget, "--enforce"))
        assert r["tokens"] == resident["tokens"], budget
        assert r["peak_rss_bytes"] <= budget, r
        if r["enforced_by"].startswith("cgroup"):
            assert 0 < r["cgroup_peak_bytes"] <= budget and r["cgroup_failcnt"] == 0, r
    # The minimum counts the interpreter's resident pages as measured at start; under memory
    # pressure the kernel drops some of its file-backed pages (seen: 3% less on a loaded
    # machine), so the budget below it and the named minimum's tolerance leave room for that.
    below = edge_rt("run", cold_model, *ARGS, "--mem-budget", int(smallest * 0.9), "--enforce")
    assert abs(named_minimum(below) - smallest) <= 0.05 * smallest


def test_enforce_leaves_no_cgroup_behind(cold_model):
    proc = subprocess.Popen([*CLI, "run", str(cold_model), *map(str, ARGS), "--mem-budget", "400M", "--enforce"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    proc.communicate(timeout=600)
    assert proc.returncode == 0
    found = own_cgroup("memory")
    assert found is None or not (found[0] / f"edge-rt.{proc.pid}.memory").exists()


def test_enforce_needs_a_budget(cold_model):
    r = edge_rt("run", cold_model, *ARGS, "--enforce")
    assert r.returncode != 0 and "--enforce needs --mem-budget" in r.stderr


def test_bench_simulates_a_profile_plainly(cold_model):
    """rpi4-2gb: the run is charged to a 1700 MiB memory cgroup and its reads throttled
    to 45 MB/s: the cold model file cannot load faster than that."""
    r = last_json(edge_rt("bench", cold_model, "--simulate", "rpi4-2gb", "-n", 4, "--threads", 1, "--json"))
    assert r["simulation"] is True and r["note"].startswith("SIMULATION on this host")
    assert r["exit_status"] == 0 and r["memory_limit_bytes"] == 1700 << 20
    assert 0 < r["cgroup_peak_bytes"] <= r["memory_limit_bytes"] and r["cgroup_failcnt"] == 0
    model_bytes = cold_model.stat().st_size
    assert r["flash_bytes_read"] >= 0.9 * model_bytes  # read from the disk, not the page cache
    assert r["wall_s"] >= 0.8 * model_bytes / r["read_bps"]  # ... at no more than the profile's speed
    text = edge_rt("bench", cold_model, "--simulate", "rpi4-2gb", "-n", 4, "--threads", 1)
    assert text.returncode == 0 and "SIMULATION" in text.stdout.splitlines()[0]
    unknown = edge_rt("bench", cold_model, "--simulate", "pi-zero")
    assert unknown.returncode == 1 and "rpi4-2gb" in unknown.stderr


def test_rss_watchdog_ends_the_run_in_one_line():
    """Where no child cgroup can be made, --enforce falls back to this watchdog."""
    code = "from edge_rt.enforce import Watchdog; import time; Watchdog(1 << 20); time.sleep(5)"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and r.stderr.startswith("edge-rt: error: resident memory") and "watchdog" in r.stderr


def test_a_cgroup_below_the_budget_is_refused_in_one_line(cold_model):
    """Run inside a memory cgroup limited below --mem-budget: the kernel would kill the
    run without a word once it passed the limit, so it refuses up front, naming the limit."""
    from edge_rt.simulate import run_limited
    limit = 300 << 20
    try:
        r = run_limited([*CLI, "run", str(cold_model), *map(str, ARGS), "--mem-budget", "400M", "--json"],
                        cold_model, limit, None, None)
    except Exception as e:  # no child cgroups here (not root, or no memory controller)
        pytest.skip(str(e))
    assert r["exit_status"] == 1 and not r["oom_killed"], r
    assert r["error"].startswith("edge-rt: error: ") and "memory cgroup it runs in is limited to 300" in r["error"], r
    ok = run_limited([*CLI, "run", str(cold_model), *map(str, ARGS), "--mem-budget", "290M", "--json"],
                     cold_model, limit, None, None)
    assert ok["exit_status"] == 0 and ok["peak_rss_bytes"] <= 290 << 20 and ok["cgroup_failcnt"] == 0, ok
