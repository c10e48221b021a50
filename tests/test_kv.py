"""The q8_0 KV cache (`--kv-type q8_0`): its blocks are llama.cpp's (checked against
gguf-py), the C layer writes the blocks the numpy twin writes, the planner counts 34 bytes
per 32 values, sink-window shifts work with it, and what it cannot do is refused in one
line. The C attention over a q8_0 cache against the twin: tests/test_families.py
(head groups, sliding window, batch and token by token; the sink-window shift)."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

import tiny as tiny_module
from edge_rt import kernels
from edge_rt.gguf_file import GGUFFile
from edge_rt.layer import CLayers
from edge_rt.models import spec_from_meta
from edge_rt.models.transformer import KVCache, dequantize_q8_0, forward, layer, logits, quantize_q8_0
from edge_rt.weights import ReferenceWeights, Weights
from tiny import write_tiny

CLI = [sys.executable, "-m", "edge_rt.cli"]


def cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *map(str, args)], capture_output=True, text=True, timeout=300)


def one_line_error(r: subprocess.CompletedProcess, *words) -> None:
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 1 and len(lines) == 1 and lines[0].startswith("edge-rt: error:"), r.stderr
    assert all(w in lines[0] for w in words), lines[0]


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory, smollm2_gguf):
    return write_tiny("llama", smollm2_gguf, tmp_path_factory.mktemp("kv") / "llama-8.gguf", bits=8, tied=False)


def test_q8_0_blocks_are_llama_cpps():
    """The twin's blocks are llama.cpp's block_q8_0 (34 bytes: float16 d, then 32 codes):
    values back within half a step (plus d's float16 rounding) wherever d is a normal float16,
    an all-zero block, and halves rounded away from zero (d = 1 exactly)."""
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((64, 3, 64)) * rng.choice([1e-6, 1e-3, 1.0, 100.0], (64, 3, 1))).astype(np.float32)
    x[0, 0, :32] = 0
    x[1, 0, :32] = [127.0] + [k + 0.5 for k in range(-15, 16)]  # d = 1: codes are x rounded, halves away from 0
    blocks = quantize_q8_0(x)
    assert blocks.dtype.itemsize == 34 and blocks.shape == (64, 3, 2)
    raw = blocks.view(np.uint8).reshape(64, 3, 2, 34)
    assert np.array_equal(raw[..., :2].copy().view(np.float16)[..., 0], blocks["d"])
    assert np.array_equal(raw[..., 2:].view(np.int8), blocks["qs"])
    assert blocks["d"][1, 0, 0] == 1 and not blocks["qs"][0, 0, 0].any() and blocks["d"][0, 0, 0] == 0
    assert blocks["qs"][1, 0, 0, 1] == -15 and blocks["qs"][1, 0, 0, 16] == 1  # -14.5 -> -15, 0.5 -> 1
    d = blocks["d"].astype(np.float32)[..., None]
    err = np.abs(dequantize_q8_0(blocks).reshape(64, 3, 2, 32) - x.reshape(64, 3, 2, 32))
    normal = d >= 2.0 ** -14  # a float16 d below that is subnormal: no error bound from its width
    assert normal.sum() > 200 and (err <= d * (0.5 + 127 * 2.0 ** -11))[np.broadcast_to(normal, err.shape)].all()


def test_the_c_layer_writes_the_twins_blocks(tiny_llama):
    """Layer 0's keys and values do not depend on the cache: the q8_0 blocks C writes are
    the twin's quantize_q8_0 of what C writes to a float32 cache, bit for bit (in one
    batch and token by token)."""
    g = GGUFFile(tiny_llama)
    spec = spec_from_meta(g.meta, len(g.meta["tokenizer.ggml.tokens"]), "tiny")
    W, toks = Weights(g, threads=2), np.random.default_rng(7).integers(100, 40000, 24)
    f32, q8 = KVCache(spec, 64, "f32"), KVCache(spec, 64, "q8_0")
    forward(spec, W, toks, 0, f32, CLayers(spec, W, 2, 64, "f32").run)
    forward(spec, W, toks[:10], 0, q8, run := CLayers(spec, W, 2, 64, "q8_0").run)
    for i in range(10, len(toks)):
        forward(spec, W, toks[i:i + 1], i, q8, run)
    n = len(toks)
    for ours, floats in ((q8.k, f32.k), (q8.v, f32.v)):
        assert np.array_equal(ours[0, :, :n].view(np.uint8), quantize_q8_0(floats[0, :, :n]).view(np.uint8))
        # later layers read the quantized cache: close to the float32 run, not equal
        rel = np.abs(q8.decode(ours[-1, :, :n]) - floats[-1, :, :n]).max() / np.abs(floats[-1, :, :n]).max()
        assert 0 < rel < 0.05, rel


@pytest.mark.parametrize("kv_type", ["f16", "q8_0"])
def test_the_portable_attention_matches_the_twin(tmp_path, smollm2_gguf, monkeypatch, kv_type):
    """force_isa("ref") selects the portable attention of ARM builds (each row converted
    once for its head group); x86 takes it otherwise only for head sizes that are not a
    multiple of 8, never with q8_0. A gemma3 (window 16) with 9 heads on 3 of 64 values,
    in one batch and token by token, against the twin and against the AVX2 path."""
    for name, value in (("H", 9), ("KV", 3), ("HD", 64)):
        monkeypatch.setattr(tiny_module, name, value)
    g = GGUFFile(write_tiny("gemma3", smollm2_gguf, tmp_path / "tiny.gguf", bits=32))
    spec = spec_from_meta(g.meta, len(g.meta["tokenizer.ggml.tokens"]), "tiny")
    toks = np.random.default_rng(6).integers(100, 40000, 40)
    twin_W, W = ReferenceWeights(g, same_arithmetic=True), Weights(g, threads=2)
    twin = logits(twin_W, forward(spec, twin_W, toks, 0, KVCache(spec, 64, kv_type), layer))
    out = {}
    try:
        for isa in ("ref", "auto"):
            kernels.force_isa(isa)
            kv, run = KVCache(spec, 64, kv_type), CLayers(spec, W, 2, 64, kv_type).run
            batch = logits(W, forward(spec, W, toks[:30], 0, kv, run))
            out[isa] = np.concatenate([batch] + [logits(W, forward(spec, W, toks[i:i + 1], i, kv, run))
                                                 for i in range(30, len(toks))])
    finally:
        kernels.force_isa("auto")
    scale = np.abs(twin).max()
    for isa, ours in out.items():
        assert np.abs(ours - twin).max() < {"f16": 2e-3, "q8_0": 5e-4}[kv_type] * scale, (isa, np.abs(ours - twin).max() / scale)
    assert np.abs(out["ref"] - out["auto"]).max() < 5e-4 * scale


def test_plan_counts_34_bytes_per_32_values(tiny_llama):
    f16, q8 = (json.loads(cli("plan", tiny_llama, "--ctx", 256, "--kv-type", t, "--json").stdout) for t in ("f16", "q8_0"))
    values = 2 * tiny_module.LAYERS * 256 * tiny_module.KV * tiny_module.HD  # keys and values
    assert q8["kv_precision"] == "q8_0" and q8["kv_bytes"] == values // 32 * 34 and f16["kv_bytes"] == 2 * values


def test_sink_window_generates_past_the_context_with_q8_0(tiny_llama):
    r = cli("run", tiny_llama, "-p", "Once upon a time", "-n", 100, "--ctx", 32, "--kv-policy", "sink-window",
            "--kv-type", "q8_0", "--json", "--threads", 2)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["n_generated"] == 100 and out["kv_shifts"] >= 6 and out["kv_type"] == "q8_0", out


def test_what_q8_0_cannot_do_is_refused_in_one_line(tmp_path, smollm2_gguf, monkeypatch):
    monkeypatch.setattr(tiny_module, "HD", 16)  # llama.cpp's q8_0 needs heads of 32k values too
    odd = write_tiny("llama", smollm2_gguf, tmp_path / "hd16.gguf", bits=8, tied=False)
    for cmd in (("run", odd, "-p", "x", "-n", 2), ("plan", odd)):
        one_line_error(cli(*cmd, "--kv-type", "q8_0"), "--kv-type q8_0", "16", "--kv-type f16")
    assert cli("run", odd, "-p", "x", "-n", 2, "--kv-type", "f16").returncode == 0
    one_line_error(cli("run", tmp_path / "any.onnx", "--backend", "onnxruntime", "-p", "x", "--kv-type", "q8_0"),
                   "--kv-type q8_0", "--backend onnxruntime")


def test_q8_0_cache_costs_little_perplexity(converted, wikitext_test):
    """SmolLM2 8-bit, two windows of 256 tokens: a q8_0 cache within 1% of float16's
    perplexity (benchmarks/bench_kv.py and BENCHMARKS.md measure it at length)."""
    ppl = {}
    for t in ("f16", "q8_0"):
        r = cli("eval", converted("smollm2-135m", 8), "--text", wikitext_test, "--ctx", 256, "--windows", 2,
                "--kv-type", t, "--threads", 2, "--json")
        assert r.returncode == 0, r.stderr
        ppl[t] = json.loads(r.stdout.strip().splitlines()[-1])["ppl"]
    assert ppl["q8_0"] != ppl["f16"] and abs(ppl["q8_0"] / ppl["f16"] - 1) < 0.01, ppl
