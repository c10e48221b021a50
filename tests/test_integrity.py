"""Integrity of what we write and load: every tensor carries a CRC-32 that
`edge-rt verify` and `run` check (one flipped byte is caught), and a convert killed
with SIGKILL at random moments leaves no file at OUT or a complete one that verifies."""
from __future__ import annotations

import signal
import subprocess
import time

import numpy as np
import pytest

from edge_rt.gguf_file import GGUFFile
from edge_rt.verify import CHECKSUM_KEY, problems
from test_bad_input import CLI, ENV, assert_error, cli, run_args, tiny_models  # noqa: F401 (a fixture)


def test_every_tensor_carries_a_checksum_that_matches(tiny_models):
    g = GGUFFile(tiny_models["t4"])
    assert {k[len(CHECKSUM_KEY):] for k in g.meta if k.startswith(CHECKSUM_KEY)} == set(g.tensors)
    assert problems(g) == []
    r = cli("verify", tiny_models["t4"])
    assert r.rc == 0 and "every checksum matches" in r.out, str(r)


def _flip(data: bytearray, pos: int) -> None:
    data[pos] ^= 1 << (pos % 8)


@pytest.mark.parametrize("trial", range(4))
def test_one_flipped_byte_is_caught(tiny_models, tmp_path, trial):
    """A byte anywhere in any tensor's data (rng-chosen): verify names that tensor, run refuses."""
    g = GGUFFile(tiny_models["t4"])
    rng = np.random.default_rng(trial)
    t = list(g.tensors.values())[rng.integers(len(g.tensors))]
    pos = t.offset + int(rng.integers(t.nbytes))
    data = bytearray(tiny_models["t4"].read_bytes())
    _flip(data, pos)
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(bytes(data))
    r = cli("verify", bad)
    lines = r.err.strip().splitlines()
    assert r.rc == 1 and len(lines) == 1 and f"tensor {t.name}: checksum mismatch" in lines[0], str(r)
    assert_error(cli(*run_args(bad)), t.name, "checksum", "edge-rt verify")
    r = cli(*run_args(bad, "--no-verify"))  # the damage is otherwise silent
    assert r.rc == 0, str(r)


def test_a_damaged_checksum_is_caught(tiny_models, tmp_path):
    g = GGUFFile(tiny_models["t4"])
    key = CHECKSUM_KEY + "blk.0.attn_q.weight"
    data = bytearray(tiny_models["t4"].read_bytes())
    _flip(data, g.value_offsets[key] + 4)  # the uint32 after the value type
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(bytes(data))
    r = cli("verify", bad)
    assert r.rc == 1 and "tensor blk.0.attn_q.weight: checksum mismatch" in r.err, str(r)


def test_a_file_without_checksums_is_not_verified(smollm2_gguf):
    r = cli("verify", smollm2_gguf)
    assert r.rc == 1 and "carries no checksums" in r.err and "Traceback" not in r.err, str(r)


def test_llama_cpp_output_carries_checksums(tiny_models, tmp_path):
    out = tmp_path / "q8.gguf"
    r = cli("convert", tiny_models["src32"], "-o", out, "--bits", "8", "--format", "llama.cpp")
    assert r.rc == 0, str(r)
    assert problems(GGUFFile(out)) == []


def test_sigkill_during_convert_leaves_no_file_or_a_verifying_one(tiny_models, tmp_path):
    """10 converts killed: the even ones at uniformly random moments of their run, the odd
    ones as soon as their temporary file appears (so some die while writing, however the
    machine's load stretches the run); then one more that finishes and removes the
    temporary files the killed ones left. Round to nearest: every method writes through
    the same temporary file, and rtn's convert is most of it writing (gptq's 64 calibration
    windows would make this test 90 s on a busy 2-core machine)."""
    out = tmp_path / "out.gguf"
    args = CLI + ["convert", str(tiny_models["src32"]), "-o", str(out), "--bits", "4", "--method", "rtn"]
    t0 = time.monotonic()
    subprocess.run(args, check=True, capture_output=True, env=ENV, timeout=120)
    full = time.monotonic() - t0
    out.unlink()
    rng = np.random.default_rng(20)
    outcomes = []
    for trial in range(10):
        p = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             env=ENV)
        delay = float(rng.uniform(0.2, 1.0)) * full
        if trial % 2:
            t1 = time.monotonic()
            while p.poll() is None and not list(tmp_path.glob(f".out.gguf.{p.pid}.*.part")):
                time.sleep(0.001)
            delay = time.monotonic() - t1
        else:
            time.sleep(delay)
        p.send_signal(signal.SIGKILL)
        p.wait()
        killed = p.returncode == -signal.SIGKILL
        outcomes.append(killed)
        if out.exists():  # renamed into place before the kill: whole
            assert problems(GGUFFile(out)) == [], f"trial {trial}: killed after {delay:.2f} s"
            out.unlink()
    assert sum(outcomes) >= 5, f"most converts finished before the kill: {outcomes}"
    assert list(tmp_path.glob(".*.part")), "no temporary file was left by any killed convert: the kills came too early"
    subprocess.run(args, check=True, capture_output=True, env=ENV, timeout=120)
    assert [p.name for p in tmp_path.iterdir()] == ["out.gguf"]
    assert problems(GGUFFile(out)) == []


def _wait_for(path_glob, proc, seconds=120):
    t0 = time.monotonic()
    while proc.poll() is None and not path_glob() and time.monotonic() - t0 < seconds:
        time.sleep(0.01)


def test_sigterm_during_convert_one_line_and_nothing_left(tiny_models, tmp_path):
    out = tmp_path / "out.gguf"
    p = subprocess.Popen(CLI + ["convert", str(tiny_models["src32"]), "-o", str(out), "--bits", "4", "--method", "rtn"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    _wait_for(lambda: list(tmp_path.glob(".*.part")), p)
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=60)
    assert p.returncode == 143, err
    assert err.strip().splitlines()[-1].startswith("edge-rt: terminated (SIGTERM)"), err
    assert "Traceback" not in err and list(tmp_path.iterdir()) == []


def test_sigterm_during_run_one_line(converted):
    p = subprocess.Popen(CLI + ["run", str(converted("smollm2-135m", 4)), "-p", "Once upon a time", "-n", "400"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    assert p.stdout.read(1)  # generating
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=60)
    assert p.returncode == 143, err
    assert err.strip().splitlines() == ["edge-rt: terminated (SIGTERM); no output file was left half-written"]
