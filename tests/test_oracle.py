"""End to end against the numpy oracle: `edge-rt run` (one C call per layer, the
kernels' integer arithmetic) decodes greedily, token by token; the oracle (numpy
layers, formats.matmul_reference) reads the prompt and those tokens in one batch and
must pick the same token at (nearly) every position.

Why "nearly": the C layer's float arithmetic (exp, norms, summation order) differs from
numpy's in the last bits, and a last-bit difference can flip the rounding of an int16
activation code; the flips travel through 30 layers. With int16 activations (8 and 6 bits
here) the tiny models of tests/test_families.py differ by ~2e-4 RMS in their logits, and
these 64 tokens were all equal (measured);
with int8 activations (before) they differed by ~2% and 2 of 64 tokens moved, each at a
near tie. So the test allows one different token, and only at a near tie (the oracle's
top-two margin under 0.1% of its top logit)."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from edge_rt.gguf_file import GGUFFile
from edge_rt.models import spec_from_meta
from edge_rt.models.transformer import KVCache, forward, output_name
from edge_rt.tokenizer import Tokenizer
from edge_rt.weights import ReferenceWeights

N = 64
PROMPT = "The history of the Roman Empire begins"


@pytest.mark.parametrize("name,bits", [("smollm2-135m", 8), ("smollm2-135m", 6)])  # q6: int8 dots on unpacked codes
def test_greedy_tokens_equal_the_numpy_oracle(converted, name, bits):
    model = converted(name, bits)
    r = subprocess.run([sys.executable, "-m", "edge_rt.cli", "run", str(model), "-p", PROMPT, "-n", str(N),
                        "--threads", "2", "--json"], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    ours = json.loads(r.stdout.strip().splitlines()[-1])["tokens"]

    g = GGUFFile(model)
    tok = Tokenizer.from_gguf_meta(g.meta)
    spec = spec_from_meta(g.meta, tok.n_vocab, model)
    prompt = tok.encode(PROMPT)
    assert len(ours) == N
    seq = np.array(prompt + ours[:-1])
    W = ReferenceWeights(g, same_arithmetic=True)
    h = forward(spec, W, seq, 0, KVCache(spec, len(seq)))[len(prompt) - 1:]
    head = output_name(W)
    z = np.concatenate([W.linear(head, h[i:i + 8]) for i in range(0, N, 8)])
    oracle = z.argmax(-1)
    differ = [i for i in range(N) if oracle[i] != ours[i]]
    near_tie = [z[i, oracle[i]] - z[i, ours[i]] < 0.001 * abs(z[i, oracle[i]]) for i in differ]
    assert len(differ) <= 1 and all(near_tie), [(i, oracle[i], ours[i], z[i, oracle[i]] - z[i, ours[i]]) for i in differ]
