"""Streaming weights (edge_rt/flash.py): a budget that holds only part of the model
gives the resident run's outputs bit for bit, the reader survives short reads and
EINTR, and a model file changed under a streaming run ends in one clear error."""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from edge_rt.api import load
from edge_rt.errors import EdgeRtError
from edge_rt.flash import Reader, _anonymous

CLI = [sys.executable, "-m", "edge_rt.cli"]
PROMPT = "The capital of France is"
TOKENS = np.array([1, 504, 3575, 282, 4649, 314, 7042, 30, 378, 1345, 282, 3575, 314])


def edge_rt(*args, timeout=600) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *map(str, args)], capture_output=True, text=True, timeout=timeout)


def last_json(r: subprocess.CompletedProcess) -> dict:
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout.strip().splitlines()[-1])


def weights_budget(model, fraction: float, ctx: int = 256) -> int:
    """A budget leaving `fraction` of the model's tensor bytes for weights (resident
    part plus the stream pool), after what the run needs besides weights (measured
    by `plan` in its own process, +3% for the next process's interpreter), and never
    below the set-up phase's measured peak (+3%): opening the model, building the
    tokenizer (Gemma-3's 262k vocabulary: ~214 MiB, more than 40% of its weights leave)."""
    p = last_json(edge_rt("plan", model, "--ctx", ctx, "--prompt-tokens", 8, "--json"))
    return int(max((p["run_bytes"] - p["weights_bytes"]) * 1.03 + fraction * p["weights_bytes"],
                   p["open_peak_bytes"] * 1.03))


@pytest.fixture(scope="module", params=[8, 16], ids=["q8", "f16"])
def model(request, converted):
    return converted("smollm2-135m", request.param)


@pytest.fixture(scope="module")
def resident(model):
    r = last_json(edge_rt("run", model, "-p", PROMPT, "-n", 12, "--ctx", 256, "--threads", 1, "--json"))
    assert r["streamed_layers"] == 0
    return r


@pytest.mark.parametrize("fraction", [0.6, 0.4])
def test_streamed_run_generates_the_resident_runs_tokens(model, resident, fraction):
    budget = weights_budget(model, fraction)
    r = last_json(edge_rt("run", model, "-p", PROMPT, "-n", 12, "--ctx", 256, "--threads", 1, "--json",
                          "--mem-budget", budget))
    assert r["tokens"] == resident["tokens"] and len(r["tokens"]) == 12
    assert r["streamed_layers"] > 0 and 0 <= r["window_hit_rate"] <= 1
    assert r["resident_weight_bytes"] + r["pool_bytes"] <= (fraction + 0.05) * resident["resident_weight_bytes"]
    assert r["peak_rss_bytes"] <= budget
    # every decode step reads the streamed layers from storage (page cache bypassed or dropped)
    assert r["flash_bytes_per_token"] >= 0.9 * r["streamed_weight_bytes"], r


# one slot; two; an odd count wraps across tokens; the embedding table and (tied) output
# head too, alone (the plan for Gemma-3, whose head is most of the model) or with layers;
# the head's first rows resident (TOKENS has ids on both sides of 1000), the rest streamed
@pytest.mark.parametrize("streamed", [(1, False), (2, False), (29, False), (30, False), (30, True), (0, True),
                                      (2, True), (0, True, 1000), (3, True, 30000), (0, True, 49151)])
def test_streamed_logits_are_bit_identical(model, streamed):
    resident = load(model, ctx=64, threads=1)
    full, short = resident.logits(TOKENS), resident.logits(TOKENS[:5])
    m = load(model, ctx=64, threads=1)
    m.streamed = streamed  # the layout by hand: layers 0..streamed[0]-1 stream (and the head)
    assert np.array_equal(m.logits(TOKENS), full)
    assert np.array_equal(m.logits(TOKENS[:5]), short)  # again: the slots now hold other layers
    # one or two streamed layers stay in the pool's two slots; more are read at every use
    assert (m.weights.layer_hits > 0) == (streamed[0] in (1, 2)), (m.weights.layer_hits, m.weights.layer_uses)
    if streamed[0] > 2:
        assert m.weights.reader.bytes_read >= 2 * m.layout.streamed_bytes(*streamed)
    if 2 < streamed[0] < m.spec.n_layers:  # the next token's first two streamed layers are on their way
        assert set(m.weights.pending) == {0, 1}, m.weights.pending


@pytest.mark.parametrize("depth", [1, 3])
def test_reader_survives_short_reads(model, depth):
    """Every pread capped at an odd size: the reader loops until each span is full (at
    depth 3, each piece of the spans of one call, read at once: a long span cut in
    2 MiB pieces, two short ones, one at an odd offset)."""
    data = open(model, "rb").read()
    for cap, n in ((1, 5000), (4095, 1_300_000), (65537, 5_300_000)):
        r = Reader(model, max_read=cap, depth=depth)
        spans = [(4096, n), (9_000_000, n // 20), (20_000_001, min(n, 3000))]
        bufs = [bytearray(k) for _, k in spans]
        r.read_spans([(memoryview(b), at, len(b)) for b, (at, _) in zip(bufs, spans)])
        assert [bytes(b) for b in bufs] == [data[at:at + k] for at, k in spans]
        assert r.bytes_read == sum(k for _, k in spans)
        r.close()


def test_reader_reads_aligned_spans_into_the_pool_memory(model):
    """Page-aligned spans into _anonymous memory (the pool's kind): O_DIRECT where the
    filesystem allows, several pieces in flight; the bytes are the file's."""
    data, r = open(model, "rb").read(), Reader(model, depth=3)
    buf = _anonymous(8 << 20)
    spans = [(buf[:5 << 20], 4096, 5 << 20), (buf[5 << 20:], 12 << 20, 3 << 20)]
    r.read_spans(spans)
    assert [bytes(v) for v, _, _ in spans] == [data[at:at + n] for _, at, n in spans]
    r.close()


def test_pool_memory_is_huge_pages_where_the_kernel_has_them():
    """_anonymous memory is private and advised for transparent huge pages (a MAP_SHARED
    mapping is shmem, never huge here, and its O_DIRECT requests stay ~1 MiB)."""
    thp = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    if not thp.exists() or "[never]" in thp.read_text():
        pytest.skip("no transparent huge pages on this kernel")
    buf = _anonymous(8 << 20)
    addr = np.frombuffer(buf, np.uint8).ctypes.data
    huge, inside = 0, False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        if re.match(r"[0-9a-f]+-[0-9a-f]+ ", line):
            lo, hi = (int(x, 16) for x in line.split()[0].split("-"))
            inside = lo <= addr < hi
        elif inside and line.startswith("AnonHugePages:"):
            huge = int(line.split()[1]) << 10
    assert addr % (2 << 20) == 0 and huge >= 2 << 20, (addr, huge)


def test_reader_survives_eintr(model):
    """A signal handler firing every 200 us while every layer streams: same logits."""
    full = load(model, ctx=64, threads=1).logits(TOKENS)
    m = load(model, ctx=64, threads=1)
    m.streamed = (m.spec.n_layers, False)
    hits = []
    old = signal.signal(signal.SIGALRM, lambda *a: hits.append(1))
    signal.setitimer(signal.ITIMER_REAL, 0.0002, 0.0002)
    try:
        got = m.logits(TOKENS)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
    assert len(hits) > 10 and np.array_equal(got, full)


@pytest.mark.parametrize("change", ["truncate", "replace"])
def test_model_file_changed_while_streaming(model, tmp_path, change):
    path = tmp_path / "m.gguf"
    shutil.copy(model, path)
    m = load(path, ctx=64, threads=1)
    m.streamed = (m.spec.n_layers, False)
    m.logits(TOKENS[:4])
    if change == "truncate":
        os.truncate(path, path.stat().st_size // 2)
    else:
        shutil.copy(model, tmp_path / "new.gguf")
        os.replace(tmp_path / "new.gguf", path)
    with pytest.raises(EdgeRtError, match="truncated, rewritten or replaced while streaming"):
        m.logits(TOKENS[:4])


def test_truncated_while_streaming_through_the_cli(model, tmp_path):
    """One line on stderr, exit 1, no traceback, no crash (a mapped file would SIGBUS)."""
    path = tmp_path / "m.gguf"
    shutil.copy(model, path)
    budget = weights_budget(path, 0.4, ctx=1024)
    proc = subprocess.Popen([*CLI, "run", str(path), "-p", PROMPT, "-n", "1000", "--ctx", "1024", "--threads", "1",
                             "--mem-budget", str(budget)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    first = proc.stdout.read(1)  # generation has started
    assert first
    os.truncate(path, path.stat().st_size // 2)
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 1, err
    assert err.strip().startswith("edge-rt: error:") and len(err.strip().splitlines()) == 1, err
    assert "truncated" in err


def flip_byte(src, dst, name: str, at: float) -> None:
    """A copy of src with one byte of tensor `name` (at fraction `at` of it) flipped."""
    from edge_rt.gguf_file import GGUFFile
    shutil.copy(src, dst)
    t = GGUFFile(dst).tensors[name]
    with open(dst, "r+b") as f:
        f.seek(t.offset + int(at * t.nbytes))
        b = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([b[0] ^ 0x10]))


# a streamed layer (checked at every read), a resident layer (the arena, checked once),
# the streamed tied head (checked across its chunks every token), and with its first
# 30000 of 49152 rows resident, damage in a streamed row or in a resident one (the
# pass checks the resident rows' CRC-32 and the streamed rows' together)
@pytest.mark.parametrize("name,streamed,at", [("blk.1.ffn_down.weight", (2, False), 0.9),
                                              ("blk.5.attn_q.weight", (2, False), 0.9),
                                              ("token_embd.weight", (30, True), 0.9),
                                              ("token_embd.weight", (0, True, 30000), 0.9),
                                              ("token_embd.weight", (0, True, 30000), 0.1)])
def test_damaged_weights_are_caught_when_streamed(model, tmp_path, name, streamed, at):
    path = tmp_path / "m.gguf"
    flip_byte(model, path, name, at)
    m = load(path, ctx=64, threads=1)
    m.streamed = streamed
    with pytest.raises(EdgeRtError, match=f"tensor {name}: checksum mismatch.*damaged"):
        m.logits(TOKENS[:4])
    m = load(path, ctx=64, threads=1, verify=False)  # unchecked, the same file runs
    m.streamed = streamed
    assert m.logits(TOKENS[:4]).shape == (4, m.spec.n_vocab)
    assert m.weights.check_seconds == 0.0


@pytest.mark.parametrize("when", ["on disk", "while streaming"])
def test_damaged_untied_embedding_rows_are_caught(smollm2_gguf, tmp_path, when):
    """An untied table's rows are read one per token: the table is checked whole at load
    (damage already on disk), and every row read later against that row's checksum
    (bytes that changed under the run without a new modification time: the storage)."""
    from tests.tiny import write_tiny
    path = write_tiny("llama", smollm2_gguf, tmp_path / "untied.gguf", bits=8, tied=False)
    row = int(TOKENS[2])
    m = load(path, ctx=64, threads=1)
    m.streamed = (0, True)
    t = m.g.tensors["token_embd.weight"]
    at = (row + 0.5) / t.shape[0]  # a byte in the middle of the row
    if when == "on disk":
        flip_byte(path, tmp_path / "damaged.gguf", "token_embd.weight", at)
        m = load(tmp_path / "damaged.gguf", ctx=64, threads=1)
        m.streamed = (0, True)
        with pytest.raises(EdgeRtError, match="tensor token_embd.weight: checksum mismatch.*damaged"):
            m.logits(TOKENS[:4])
    else:
        want = load(path, ctx=64, threads=1).logits(TOKENS[:4])
        assert np.array_equal(m.logits(TOKENS[:4]), want) and m.weights.row_crcs is not None
        st = path.stat()
        with open(path, "r+b") as f:
            f.seek(t.offset + int(at * t.nbytes))
            b = f.read(1)
            f.seek(-1, os.SEEK_CUR)
            f.write(bytes([b[0] ^ 0x10]))
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
        with pytest.raises(EdgeRtError, match=f"tensor token_embd.weight row {row}: checksum mismatch"):
            m.logits(TOKENS[:4])


def test_untied_head_partly_resident_is_bit_identical(smollm2_gguf, tmp_path):
    """An untied model: output.weight's first rows resident, the rest streamed, the
    embedding table's rows read per token."""
    from tests.tiny import write_tiny
    path = write_tiny("llama", smollm2_gguf, tmp_path / "untied.gguf", bits=8, tied=False)
    want = load(path, ctx=64, threads=1).logits(TOKENS)
    m = load(path, ctx=64, threads=1)
    m.streamed = (1, True, m.layout.out_rows // 3)
    assert np.array_equal(m.logits(TOKENS), want)
    assert "output.weight" in m.weights.g.tensors and m.weights.head_prefix.rows == m.layout.out_rows // 3
    m.weights.begin_layer(0)  # starts reading the head's first chunks, as in a forward pass; no head pass follows:
    assert m.weights.head_ahead  # the next embedding read waits for them before it uses the head buffer
    assert np.array_equal(m.logits(TOKENS), want)


@pytest.fixture(scope="module")
def gemma3_q8(converted):
    return converted("gemma3-270m", 8)


@pytest.fixture(scope="module")
def gemma3_resident(gemma3_q8):
    r = last_json(edge_rt("run", gemma3_q8, "-p", PROMPT, "-n", 8, "--ctx", 256, "--threads", 1, "--json"))
    assert r["streamed_layers"] == 0 and not r["streamed_head"]
    return r


@pytest.mark.parametrize("fraction", [0.6, 0.4])
def test_gemma3_head_partly_resident_generates_the_resident_runs_tokens(gemma3_q8, gemma3_resident, fraction):
    """Gemma-3 8-bit, its tied 262k x 640 head most of the model: the budget keeps the
    head's first rows and streams the rest; under --enforce the cgroup's peak stays
    under the budget with failcnt 0. At 40% the budget is the set-up phase's peak
    (building the tokenizer), which leaves the run ~54% of the weights."""
    budget = weights_budget(gemma3_q8, fraction)
    r = last_json(edge_rt("run", gemma3_q8, "-p", PROMPT, "-n", 8, "--ctx", 256, "--threads", 1, "--json",
                          "--mem-budget", budget, "--enforce"))
    assert r["tokens"] == gemma3_resident["tokens"] and len(r["tokens"]) == 8
    assert r["streamed_head"] and r["streamed_layers"] == 0 and 0 < r["resident_head_rows"] < 262144, r
    assert r["peak_rss_bytes"] <= budget and r["planned_bytes"] <= budget
    if r["enforced_by"].startswith("cgroup"):
        assert 0 < r["cgroup_peak_bytes"] <= budget and r["cgroup_failcnt"] == 0, r
    assert r["flash_bytes_per_token"] >= 0.9 * r["streamed_weight_bytes"], r
