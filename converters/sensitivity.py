"""End-to-end sensitivity of each matrix, for the mix chooser (converters/mixed.py).

cost(m, b) = mean over scored tokens t of KL(p_t || q_t): p the float model's next-token
distribution, q the same model's with only matrix m quantized to b bits (by the quantizer
the file is written with) and dequantized; every other tensor stays float. Measured on
`windows` windows of `ctx` tokens of calibration text (wikitext-2 validation by default),
KL taken at `scored` positions spread over the second half of each window (as `edge-rt eval`
scores the second half), so the head product, the costliest one on a 262k-token vocabulary,
runs on those positions only.

The float run keeps every layer's input residual states, so a matrix of layer L re-runs
layers L..end (+ final norm + head) only. The token embeddings re-run the whole model and,
when tied (no output.weight), are the head as well: both uses quantized at once; an untied
head re-runs the head only."""
from __future__ import annotations

import re

import numpy as np
from threadpoolctl import threadpool_limits
from tqdm import tqdm

from edge_rt import formats
from edge_rt.models import spec_from_meta
from edge_rt.models import transformer as tf

from .calibrate import calibration_windows
from .readers import Source

DEFAULT_WINDOWS, DEFAULT_CTX, DEFAULT_SCORED = 1, 128, 64


class SwappedWeights:
    """The source's tensors in float32, numpy products, with the matrices in `swap`
    (name -> float32 array) used in place of the source's."""

    def __init__(self, src: Source):
        self.src, self._cache, self.swap = src, {}, {}

    def has(self, name: str) -> bool:
        return name in self.src.shapes

    def matrix(self, name: str) -> np.ndarray:
        if name in self.swap:
            return self.swap[name]
        if name not in self._cache:
            self._cache[name] = np.asarray(self.src.load(name), dtype=np.float32)
        return self._cache[name]

    vec = matrix

    def linear(self, name: str, x: np.ndarray) -> np.ndarray:
        return x @ self.matrix(name).T

    def embed(self, tokens) -> np.ndarray:
        return self.matrix("token_embd.weight")[np.asarray(tokens)]

    def begin_layer(self, i: int) -> None:
        """Every tensor is in memory: nothing to read."""


def log_softmax(z: np.ndarray) -> np.ndarray:
    """In float64: the KL of an 8-bit matrix is small beside float32's rounding of log-probabilities."""
    z = z.astype(np.float64)
    z = z - z.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


class Window:
    """One calibration window run through the float model: every layer's input, the
    final-normed hidden states and the float log-probabilities at the scored positions."""

    def __init__(self, spec, W: SwappedWeights, tokens: np.ndarray, scored: int):
        self.spec, self.W, self.tokens = spec, W, tokens
        n = len(tokens)
        self.pos = np.unique(np.linspace(n // 2, n - 1, min(scored, n - n // 2)).round().astype(int))
        self.kv = tf.KVCache(spec, n, "f32")
        self.inputs = []  # inputs[i]: layer i's input [n, d_model]
        self.hidden = self.run(0, W.embed(tokens) * np.float32(spec.embed_scale))
        self.z = tf.logits(W, self.hidden)
        self.logp = log_softmax(self.z)
        self.p = np.exp(self.logp)

    def run(self, first: int, x: np.ndarray | None = None) -> np.ndarray:
        """Layers first..end from x (default: the float run's input of layer first), the
        final norm: the hidden states at the scored positions."""
        spec, W = self.spec, self.W
        x = self.inputs[first] if x is None else x
        for i in range(first, spec.n_layers):
            if len(self.inputs) == i:  # the float run
                self.inputs.append(x)
            x = tf.layer(spec, W, i, x, 0, self.kv)
        return tf.rmsnorm(x[self.pos], W.vec("output_norm.weight"), spec.norm_eps)

    def kl(self, name: str) -> float:
        """Mean KL(float || swapped) over the scored positions, with W.swap set by the caller."""
        layer = re.match(r"blk\.(\d+)\.", name)
        if layer:
            hidden = self.run(int(layer[1]))
        elif name == "token_embd.weight":  # the input (and, tied, the head too)
            hidden = self.run(0, self.W.embed(self.tokens) * np.float32(self.spec.embed_scale))
        else:  # an untied head: the hidden states do not change
            hidden = self.hidden
        # with the logits moved by d, log q = log p - d + log sum_v p_v e^(d_v): the KL is
        # taken from d (float32, exact where the logits are close), its exponentials in
        # float32 (~4x faster than float64's; within 0.1% of the float64 KL at 8 bits on SmolLM2)
        d = tf.logits(self.W, hidden) - self.z
        dm = d.max(axis=-1)
        lse = dm + np.log(np.einsum("ij,ij->i", self.p, np.exp(d - dm[:, None])))
        return float(np.mean(lse - np.einsum("ij,ij->i", self.p, d)))


def measure(src: Source, names: list[str], options, quantize, calib_text=None,
            windows: int = DEFAULT_WINDOWS, ctx: int = DEFAULT_CTX, scored: int = DEFAULT_SCORED,
            progress: bool | None = None) -> dict[str, dict[tuple[int, int], float]]:
    """name -> {(bits, group size): cost} for every matrix in names and pair in options;
    quantize(name, fmt, w) -> (codes, d, m) (the convert's quantizer)."""
    spec = spec_from_meta(src.meta, len(src.meta.get("tokenizer.ggml.tokens", [])), src.path)
    W = SwappedWeights(src)
    # one BLAS thread: products of 128 rows gain little from a second, and on a loaded
    # machine two threads ran a forward 3-12x slower (BENCHMARKS.md, issue 5, round 7)
    with threadpool_limits(1), tqdm(total=len(names) * len(options), desc="sensitivity (end to end)", unit="run",
                                    disable=None if progress is None else not progress) as bar:
        runs = [Window(spec, W, chunk, scored) for chunk in calibration_windows(src, calib_text, windows, ctx)]
        out = {}
        for name in names:
            w = W.matrix(name)
            out[name] = {}
            for opt in options:
                fmt = formats.GroupQuant(*opt)
                W.swap = {name: fmt.decode(*quantize(name, fmt, w))}
                out[name][opt] = float(np.mean([r.kl(name) for r in runs]))
                bar.update()
            W.swap = {}
    return out
