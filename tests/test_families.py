"""Every family on small random-weight models written by our own writer: the C path
(one C call per layer, edge_rt/layer.py) against llama.cpp (float32) and against the
numpy oracle (every format)."""
from __future__ import annotations

import numpy as np
import pytest

import peer
from edge_rt.gguf_file import GGUFFile
from edge_rt.layer import CLayers
from edge_rt.models import spec_from_meta
from edge_rt.models.transformer import KVCache, forward, layer, logits
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
    # numpy's) can flip the rounding of one int8 activation or table entry, and the
    # flip travels on: ~1-2% RMS after six layers, at any position. The products
    # alone agree with the twin exactly (tests/test_kernels.py).
    assert np.sqrt(np.mean((ours - twin) ** 2) / np.mean(twin ** 2)) < 0.03
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
