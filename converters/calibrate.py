"""Calibration: run the source model's own forward pass (models/transformer.forward) on
calibration text and keep, for every matrix, the Gram matrix of its inputs
H = sum_t x_t x_t^T (the Hessian of the layer's squared output error, up to a factor 2).

Calibration text is the wikitext-2 *validation* file by default: never the test file,
which is what perplexity is reported on."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from tqdm import tqdm

from edge_rt.errors import EdgeRtError
from edge_rt.models import spec_from_meta
from edge_rt.models.transformer import KVCache, forward, output_name
from edge_rt.tokenizer import Tokenizer

from .readers import Source

VALID_TEXT = Path(__file__).resolve().parent.parent / "data" / "wikitext-2" / "valid.txt"
# 64 windows (32,768 tokens): on SmolLM2 GPTQ's layer output error on held-out text is 22%
# lower than with 8 windows and 7% lower than with 32 (BENCHMARKS.md, "Round 10")
DEFAULT_WINDOWS, DEFAULT_CTX = 64, 512


class RecordingWeights:
    """The source's tensors in float32 with numpy products (as ReferenceWeights), adding
    each matrix's input Gram matrix into `gram` (float64) and its row count into `count`."""

    def __init__(self, src: Source):
        self.src, self._cache = src, {}
        self.gram: dict[str, np.ndarray] = {}
        self.count: dict[str, int] = {}

    def has(self, name: str) -> bool:
        return name in self.src.shapes

    def matrix(self, name: str) -> np.ndarray:
        if name not in self._cache:
            self._cache[name] = np.asarray(self.src.load(name), dtype=np.float32)
        return self._cache[name]

    vec = matrix

    def record(self, name: str, x: np.ndarray) -> None:
        g = (x.T @ x).astype(np.float64)
        if name in self.gram:
            self.gram[name] += g
        else:
            self.gram[name] = g
        self.count[name] = self.count.get(name, 0) + len(x)

    def linear(self, name: str, x: np.ndarray) -> np.ndarray:
        self.record(name, x)
        return x @ self.matrix(name).T

    def embed(self, tokens) -> np.ndarray:
        return self.matrix("token_embd.weight")[np.asarray(tokens)]

    def begin_layer(self, i: int) -> None:
        """Every tensor is in memory: nothing to read."""


def calibration_windows(src: Source, text_path=None, windows: int = DEFAULT_WINDOWS, ctx: int = DEFAULT_CTX):
    """Token windows of ctx tokens cut from the calibration text (BOS first where the model adds one)."""
    path = Path(text_path or VALID_TEXT)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise EdgeRtError(f"{path}: cannot read calibration text ({getattr(e, 'strerror', None) or e}); "
                          f"give one with --calib-text") from None
    tok = Tokenizer.from_gguf_meta(src.meta)
    ids = np.array(tok.encode(text[: 8 * ctx * windows]))  # ~4 characters a token: enough text, not all of it
    n = min(windows, len(ids) // ctx)
    if n < 1:
        raise EdgeRtError(f"{path}: calibration text has {len(ids)} tokens, fewer than one window of {ctx}")
    out = []
    for w in range(n):
        chunk = ids[w * ctx:(w + 1) * ctx].copy()
        if tok.add_bos:
            chunk[0] = tok.bos_id
        out.append(chunk)
    return out


def collect(src: Source, text_path=None, windows: int = DEFAULT_WINDOWS, ctx: int = DEFAULT_CTX,
            progress: bool | None = None) -> RecordingWeights:
    """Run the calibration windows through the float source; the head's inputs are
    the final hidden states (recorded under the head's own name)."""
    tok_count = len(src.meta.get("tokenizer.ggml.tokens", []))
    spec = spec_from_meta(src.meta, tok_count, src.path)
    W = RecordingWeights(src)
    chunks = calibration_windows(src, text_path, windows, ctx)
    for chunk in tqdm(chunks, desc="calibrate", unit="window", disable=None if progress is None else not progress):
        h = forward(spec, W, chunk, 0, KVCache(spec, ctx, "f32"))
        W.record(output_name(W), h)
    return W
