"""Every family on small random-weight models written by our own writer: the C path
(one C call per layer, edge_rt/layer.py) against llama.cpp (float32) and against the
numpy oracle (every format)."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

import peer
from edge_rt.gguf_file import GGUFFile
from edge_rt.layer import CLayers
from edge_rt.models import spec_from_meta
from edge_rt.models.transformer import KVCache, forward, kv_shift, layer, logits
from edge_rt.weights import ReferenceWeights, Weights
from tiny import write_tiny

ARCHS = ["llama", "qwen2", "gemma3"]
N_TOKENS = 40  # longer than the tiny gemma3's 16-token sliding window


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, smollm2_gguf):
    made = {}

    def get(arch, bits=32):
        """arch "llama+rope_freqs": llama with Llama-3's RoPE frequency factors."""
        if (arch, bits) not in made:
            out = tmp_path_factory.mktemp("tiny") / f"{arch}-{bits}.gguf"
            family = arch.split("+")[0]
            made[arch, bits] = write_tiny(family, smollm2_gguf, out, bits=bits, tied=family != "llama",
                                          rope_freqs=arch.endswith("+rope_freqs"))
        return made[arch, bits]
    return get


def run_logits(path, W_cls, tokens, kv_type="f16", **kw):
    g = GGUFFile(path)
    spec = spec_from_meta(g.meta, len(g.meta["tokenizer.ggml.tokens"]), path)
    W = W_cls(g, **kw)
    run_layer = CLayers(spec, W, W.threads, 64, kv_type).run if W_cls is Weights else layer
    return logits(W, forward(spec, W, tokens, 0, KVCache(spec, 64, kv_type), run_layer))


def tokens(seed=1):
    return np.random.default_rng(seed).integers(100, 40000, N_TOKENS)


@pytest.mark.skipif(not peer.llama_available(), reason="llama-cpp-python (the peer) is not installed")
@pytest.mark.parametrize("arch", ARCHS + ["llama+rope_freqs"])
def test_float32_logits_match_llama_cpp(tiny, arch):
    toks = tokens()
    ref = peer.logits(tiny(arch), [int(t) for t in toks], 64)
    ours = run_logits(tiny(arch), Weights, toks, kv_type="f32", threads=2)  # as peer.LOGITS_CONFIG
    scale = np.abs(ref).max()
    # ggml evaluates GELU through a float16 table: gemma3 differs by ~1e-4 of the scale
    assert np.abs(ours - ref).max() < 2e-4 * scale
    assert (ours.argmax(-1) == ref.argmax(-1)).all()


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("bits", [32, 16, 8, 4, 3, 2])
def test_c_path_matches_numpy_twin(tiny, arch, bits):
    # float32 KV cache: float16 rounding would turn last-bit differences into 1e-3 steps
    # (the float16 cache is checked by test_oracle.py and the token-by-token test below)
    toks = tokens(2)
    ours = run_logits(tiny(arch, bits), Weights, toks, kv_type="f32", threads=2)
    twin = run_logits(tiny(arch, bits), ReferenceWeights, toks, kv_type="f32", same_arithmetic=True)
    if bits >= 16:
        assert np.abs(ours - twin).max() < 1e-4 * np.abs(twin).max()
        return
    # A float difference in the last bit (C's exp, norms and summation order against
    # numpy's) can flip the rounding of one activation code or table entry, and the
    # flip travels on. The products alone agree with the twin exactly (tests/test_kernels.py).
    rms = np.sqrt(np.mean((ours - twin) ** 2) / np.mean(twin ** 2))
    if bits == 8:  # int16 activations: a flip is 1/8128 of a span's largest value (measured 2-4e-4 RMS)
        assert rms < 1e-3 and (ours.argmax(-1) == twin.argmax(-1)).all()
        return
    # 1-4 bits, int8 tables: ~1-2% RMS after six layers, at any position
    assert rms < 0.03
    assert (ours.argmax(-1) == twin.argmax(-1)).mean() >= 0.9


@pytest.mark.parametrize("arch", ARCHS)
def test_quantization_error_shrinks_with_each_bit(tiny, arch):
    """Random (untrained) models amplify errors, so the bound is loose at 8 bits
    (measured ~3%), but each bit removed must cost more error (measured ~2x a bit)."""
    toks = tokens(3)
    f32 = run_logits(tiny(arch, 32), ReferenceWeights, toks)
    errs = []
    for bits in (8, 4, 3, 2):
        q = run_logits(tiny(arch, bits), Weights, toks, threads=1)
        errs.append(np.sqrt(np.mean((q - f32) ** 2) / np.mean(f32 ** 2)))
    assert errs[0] < 0.05, errs
    assert all(b > 1.4 * a for a, b in zip(errs, errs[1:])), errs


@pytest.mark.parametrize("arch", ARCHS)
def test_decoding_token_by_token_equals_one_batch(tiny, arch):
    """The decode path (one token at a time, attending over the KV cache, past the
    gemma3 window) gives the logits of the same tokens read in one batch."""
    g = GGUFFile(tiny(arch, 8))
    spec = spec_from_meta(g.meta, len(g.meta["tokenizer.ggml.tokens"]), "tiny")
    W, toks = Weights(g, threads=2), tokens(4)
    batch = logits(W, forward(spec, W, toks, 0, KVCache(spec, 64), CLayers(spec, W, 2, 64).run))
    kv, run = KVCache(spec, 64), CLayers(spec, W, 2, 64).run
    steps = np.concatenate([logits(W, forward(spec, W, toks[i:i + 1], i, kv, run)) for i in range(len(toks))])
    assert np.abs(steps - batch).max() < 1e-4 * np.abs(batch).max()


@pytest.mark.parametrize("kv_type", ["f16", "q8_0"])
@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_attention_is_one_arithmetic_however_it_is_shared_out(tiny, arch, kv_type):
    """A token attends over its positions in chunks folded in order (layer.c): one item a
    token and head group (a batch, and decode at 1 thread) or one a run of chunks (decode at
    2 threads: the tiny model's 2 head groups are fewer than 2 a thread). The hidden states
    are the same bits either way, past 512 positions too (16 chunks of more than 32)."""
    g = GGUFFile(tiny(arch, 8))
    spec = spec_from_meta(g.meta, len(g.meta["tokenizer.ggml.tokens"]), "tiny")
    toks, ctx, last = np.random.default_rng(3).integers(100, 40000, 600), 640, 24
    runs = []
    for threads, batch in ((2, len(toks)), (2, len(toks) - last), (1, len(toks) - last)):
        W = Weights(g, threads=threads)
        kv, run = KVCache(spec, ctx, kv_type), CLayers(spec, W, threads, ctx, kv_type).run
        h = [forward(spec, W, toks[:batch], 0, kv, run)]
        h += [forward(spec, W, toks[i:i + 1], i, kv, run) for i in range(batch, len(toks))]
        runs.append(np.concatenate(h)[-last:])
    assert np.array_equal(runs[0], runs[1]) and np.array_equal(runs[0], runs[2])


@pytest.mark.parametrize("kv_type", ["f32", "f16", "q8_0"])
@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_kv_shift_in_c_equals_the_numpy_twin(tiny, arch, kv_type):
    """The sink-window policy's cache shift: positions 4..4+d-1 dropped, later ones
    moved down with their keys turned back by d RoPE positions (gemma3: two bases;
    q8_0: dequantized, turned, quantized again)."""
    g = GGUFFile(tiny(arch, 8))
    spec = spec_from_meta(g.meta, len(g.meta["tokenizer.ggml.tokens"]), "tiny")
    W, toks = Weights(g, threads=2), tokens(5)
    layers, kv = CLayers(spec, W, 2, 64, kv_type), KVCache(spec, 64, kv_type)
    forward(spec, W, toks, 0, kv, layers.run)
    twin = KVCache(spec, 64, kv_type)
    twin.k[...], twin.v[...] = kv.k, kv.v
    layers.kv_shift(spec, W, kv, 4, 17, N_TOKENS)
    kv_shift(spec, W, twin, 4, 17, N_TOKENS)
    used = N_TOKENS - 17
    assert np.array_equal(kv.v[:, :, :used], twin.v[:, :, :used])
    k, t = kv.decode(kv.k[:, :, :used]), twin.decode(twin.k[:, :, :used])
    ulp = {"f32": 1e-6, "f16": 1e-3, "q8_0": 1 / 127}[kv_type]  # one float32 / float16 rounding, one q8_0 step
    assert np.abs(k - t).max() <= ulp * np.abs(t).max()
    assert np.array_equal(kv.k[:, :, :4], twin.k[:, :, :4])  # the sinks stay
    # layer 0's keys depend only on the token and its position: the shifted cache holds
    # what a fresh run of the kept tokens writes there
    fresh = KVCache(spec, 64, kv_type)
    forward(spec, W, np.concatenate([toks[:4], toks[4 + 17:]]), 0, fresh, CLayers(spec, W, 2, 64, kv_type).run)
    f0, k0 = fresh.decode(fresh.k[0, :, :used]), kv.decode(kv.k[0, :, :used])
    assert np.abs(f0 - k0).max() <= 10 * ulp * np.abs(f0).max()


def test_sink_window_generates_past_the_context(tiny):
    r = subprocess.run([sys.executable, "-m", "edge_rt.cli", "run", str(tiny("llama", 8)), "-p", "Once upon a time",
                        "-n", "100", "--ctx", "32", "--kv-policy", "sink-window", "--json", "--threads", "2"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["n_generated"] == 100 and out["kv_shifts"] >= 6, out
    stop = subprocess.run([sys.executable, "-m", "edge_rt.cli", "run", str(tiny("llama", 8)), "-p", "Once upon a time",
                           "-n", "100", "--ctx", "32"], capture_output=True, text=True, timeout=300)
    assert stop.returncode == 1 and "--kv-policy sink-window" in stop.stderr


HEAD_GROUPS = [(2, 2, 8), (9, 3, 16), (4, 1, 32), (5, 1, 12)]
Q8_0_HEAD_GROUPS = [(2, 2, 32), (4, 2, 32), (9, 3, 64), (4, 1, 32), (5, 1, 64)]  # q8_0: head sizes 32k


@pytest.mark.parametrize("heads,kv_type", [(h, t) for t in ("f32", "f16") for h in HEAD_GROUPS]
                         + [(h, "q8_0") for h in Q8_0_HEAD_GROUPS],
                         ids=lambda a: "H%d-KV%d-HD%d" % a if isinstance(a, tuple) else a)
def test_attention_head_groups_match_the_twin(tmp_path, smollm2_gguf, monkeypatch, heads, kv_type):
    """The C attention reads each key/value row once for up to 4 query heads of a group
    (SmolLM2: 9 heads on 3, Gemma-3: 4 on 1) and splits a group when the threads need
    more items; head sizes that are not a multiple of 8 take the portable path. A gemma3
    (16-token window), in one batch and token by token, at 1 and 2 threads; the twin
    keeps the same kind of cache (q8_0: numpy's llama.cpp blocks)."""
    import tiny as tiny_module
    monkeypatch.setattr(tiny_module, "H", heads[0])
    monkeypatch.setattr(tiny_module, "KV", heads[1])
    monkeypatch.setattr(tiny_module, "HD", heads[2])
    path = write_tiny("gemma3", smollm2_gguf, tmp_path / "tiny.gguf", bits=32)
    g = GGUFFile(path)
    spec = spec_from_meta(g.meta, len(g.meta["tokenizer.ggml.tokens"]), path)
    toks = tokens(6)
    twin_W = ReferenceWeights(g, same_arithmetic=True)
    twin = logits(twin_W, forward(spec, twin_W, toks, 0, KVCache(spec, 64, kv_type), layer))
    # float16 caches round keys and values computed in a different order: last-bit
    # differences become float16 steps (q8_0: a code one step apart, now and then)
    tol = {"f32": 1e-4, "f16": 2e-3, "q8_0": 5e-4}[kv_type]  # (q8_0 against an f16 twin: ~1.5e-3)
    for threads in (1, 2):
        W = Weights(g, threads=threads)
        batch = logits(W, forward(spec, W, toks, 0, KVCache(spec, 64, kv_type), CLayers(spec, W, threads, 64, kv_type).run))
        kv, run = KVCache(spec, 64, kv_type), CLayers(spec, W, threads, 64, kv_type).run
        steps = np.concatenate([logits(W, forward(spec, W, toks[i:i + 1], i, kv, run)) for i in range(len(toks))])
        for ours in (batch, steps):
            assert np.abs(ours - twin).max() < tol * np.abs(twin).max(), (threads, np.abs(ours - twin).max() / np.abs(twin).max())
