"""Processes at once: two `run`s of one model file give the output one `run` gives
alone; two `pull`s of one model into an empty cache fetch it once (a lock, then an
atomic rename) and leave one good copy."""
from __future__ import annotations

import json
import os
import subprocess
import sys

from edge_rt.models.registry import MODELS
from edge_rt.pull import sha256_file

CLI = [sys.executable, "-m", "edge_rt.cli"]


def test_two_runs_of_one_model_at_once(converted):
    model = converted("smollm2-135m", 4)
    args = CLI + ["run", str(model), "-p", "The three primary colours are", "-n", "24", "-t", "1", "--json"]
    alone = json.loads(subprocess.run(args, capture_output=True, text=True, check=True, timeout=300).stdout.splitlines()[-1])
    procs = [subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    for p in procs:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-2000:]
        assert json.loads(out.splitlines()[-1])["text"] == alone["text"]
    assert alone["n_generated"] == 24


def test_two_pulls_at_once_fetch_once(tmp_path):
    env = os.environ | {"EDGE_RT_HOME": str(tmp_path)}
    procs = [subprocess.Popen(CLI + ["pull", "smollm2-135m"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=env) for _ in range(2)]
    results = [(p.wait(timeout=600), *p.communicate()) for p in procs]
    entry = MODELS["smollm2-135m"]
    out = tmp_path / "models" / entry.filename
    for rc, stdout, stderr in results:
        assert rc == 0, stderr
        assert stdout.strip() == str(out)
    assert sum("fetching" in stderr for _, _, stderr in results) == 1, results  # the second waited, then found it
    assert sorted(p.name for p in out.parent.iterdir()) == sorted([out.name, out.with_suffix(".lock").name])
    assert sha256_file(out) == entry.sha256


def test_a_pull_killed_outright_leaves_nothing_the_next_pull_keeps(tmp_path):
    import signal
    import time
    env = os.environ | {"EDGE_RT_HOME": str(tmp_path)}
    entry = MODELS["smollm2-135m"]
    models = tmp_path / "models"
    p = subprocess.Popen(CLI + ["pull", "smollm2-135m"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    t0 = time.monotonic()
    while p.poll() is None and not list(models.glob(".*.pull-*")) and time.monotonic() - t0 < 120:
        time.sleep(0.05)
    time.sleep(1.0)  # into the download
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert not (models / entry.filename).exists()
    r = subprocess.run(CLI + ["pull", "smollm2-135m"], capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in models.iterdir()) == sorted([entry.filename, entry.filename.rsplit(".", 1)[0] + ".lock"]), \
        (r.stdout, r.stderr)
    assert sha256_file(models / entry.filename) == entry.sha256
