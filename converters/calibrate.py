"""Calibration: run the source model's own forward pass (models/transformer.forward) on
calibration text and keep, for every matrix, the Gram matrix of its inputs
H = sum_t x_t x_t^T (the Hessian of the layer's squared output error, up to a factor 2).

Calibration text is the wikitext-2 *validation* file by default: never the test file,
which is what perplexity is reported on.

Where an RMSNorm follows a matrix (Gemma-3: the q/k norms over each head, the norms after
attention and after the FFN over the hidden size) the matrix's raw output error is not
what the model sees. For y = W x followed by z = g * y / rms(y), rms(y)^2 = mean over the
normalized group (a head, or all rows) of y^2 + eps, a small output error e changes z by

    dz_r = g_r / rms(y) * (e_r - y_r (y . e) / (n rms(y)^2))      (n: the group's length)

to first order; the second term takes out e's component along y, 1/n of a random e's
energy (n = 256 or 640 here), and is dropped. So ||dz||^2 = sum_r g_r^2 e_r^2 / rms_t^2 at
token t. With e_tr = sum_j x_tj D_rj (D the weight error) and its cross terms dropped (the
Gram diagonal, as the mix chooser's measure does), sum_t ||dz_t||^2 = sum_rj D_rj^2 *
g_r^2 * sum_t x_tj^2 / rms_t(group of r)^2: the raw measure's column weight sum_t x_tj^2
times g_r^2 * ratio[group, j], ratio = sum_t (x_tj^2 / rms_t^2) / sum_t x_tj^2 (NormWeight;
a ratio, so an input scaling of column j, awq's, cancels in it).
Matrices earlier in a branch (attn_v, ffn_gate, ffn_up; attn_q and attn_k after their own
norm) reach the residual stream through the branch's last matrix and its norm: they take
that norm's mean weight over its rows and input energy, a scalar (the raw errors of a
branch without a norm, SmolLM2's, reach the residual stream as they are: no weights there)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from edge_rt.errors import EdgeRtError
from edge_rt.models import spec_from_meta
from edge_rt.models.transformer import KVCache, forward, output_name
from edge_rt.tokenizer import Tokenizer

from .readers import Source

VALID_TEXT = Path(__file__).resolve().parent.parent / "data" / "wikitext-2" / "valid.txt"
DEFAULT_WINDOWS, DEFAULT_CTX = 16, 512


class RecordingWeights:
    """The source's tensors in float32 with numpy products (as ReferenceWeights), adding
    each matrix's input Gram matrix into `gram` (float64) and its row count into `count`."""

    def __init__(self, src: Source, spec=None):
        self.src, self._cache = src, {}
        self.gram: dict[str, np.ndarray] = {}
        self.count: dict[str, int] = {}
        # matrix -> the norm after it; with the module docstring's sums per group of rows
        self.norm_after = norms_after(spec, src.shapes) if spec else {}
        self.eps = spec.norm_eps if spec else 0.0
        self._normed: dict[str, np.ndarray] = {}
        self.norm_weight: dict[str, NormWeight] = {}

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
        y = x @ self.matrix(name).T
        if name in self.norm_after:
            n = len(self.vec(self.norm_after[name]))
            ms = np.mean(np.square(y.reshape(len(y), -1, n), dtype=np.float64), axis=-1) + self.eps  # [tokens, groups]
            s = (1.0 / ms).T @ np.square(x, dtype=np.float64)  # [groups, cols]
            self._normed[name] = self._normed.get(name, 0.0) + s
        return y

    def finish(self) -> None:
        """norm_weight from the sums (module docstring); the branch's earlier matrices last."""
        for name, norm in self.norm_after.items():
            h = np.diag(self.gram[name])
            ratio = np.divide(self._normed[name], h, out=np.zeros_like(self._normed[name]), where=h > 0)
            self.norm_weight[name] = NormWeight(np.square(self.vec(norm), dtype=np.float64), ratio)
        for name, end in branch_ends(self.norm_after).items():
            nw = self.norm_weight.get(name, NormWeight())
            nw.scale = self.norm_weight[end].mean(np.diag(self.gram[end]))
            self.norm_weight[name] = nw

    def embed(self, tokens) -> np.ndarray:
        return self.matrix("token_embd.weight")[np.asarray(tokens)]

    def begin_layer(self, i: int) -> None:
        """Every tensor is in memory: nothing to read."""


@dataclass
class NormWeight:
    """The weight of a matrix's squared error D[r, j]^2 after the norms that follow it:
    scale * g2[r % n] * ratio[r // n, j] (n = len(g2); without g2, scale alone)."""
    g2: np.ndarray | None = None  # the norm's gains squared [n]
    ratio: np.ndarray | None = None  # [groups, cols]
    scale: float = 1.0

    def expand(self, rows: int):
        """[rows, cols] float32, or a float."""
        if self.g2 is None:
            return self.scale
        return (self.scale * self.ratio[:, None, :] * self.g2[None, :, None]).reshape(rows, -1).astype(np.float32)

    def mean(self, h: np.ndarray) -> float:
        """The mean weight over rows, columns weighted by their input energy h."""
        return float(self.scale * np.mean(self.g2) * (self.ratio @ h).mean() / h.sum())


def norms_after(spec, shapes: dict) -> dict[str, str]:
    """matrix -> the RMSNorm applied right after it (models/transformer.layer)."""
    out = {}
    for i in range(spec.n_layers):
        p = f"blk.{i}."
        if spec.qk_norm:
            out |= {p + "attn_q.weight": p + "attn_q_norm.weight", p + "attn_k.weight": p + "attn_k_norm.weight"}
        if spec.post_norms:
            out |= {p + "attn_output.weight": p + "post_attention_norm.weight",
                    p + "ffn_down.weight": p + "post_ffw_norm.weight"}
    return {m: n for m, n in out.items() if m in shapes and n in shapes}


def branch_ends(norm_after: dict) -> dict[str, str]:
    """matrix -> the normed last matrix of its branch (attention or FFN), for the matrices before it."""
    firsts = {"attn_output.weight": ("attn_q.weight", "attn_k.weight", "attn_v.weight"),
              "ffn_down.weight": ("ffn_gate.weight", "ffn_up.weight")}
    return {end[: -len(last)] + m: end for end in norm_after for last, ms in firsts.items()
            if end.endswith(last) for m in ms}


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
    W = RecordingWeights(src, spec)
    chunks = calibration_windows(src, text_path, windows, ctx)
    for chunk in tqdm(chunks, desc="calibrate", unit="window", disable=None if progress is None else not progress):
        h = forward(spec, W, chunk, 0, KVCache(spec, ctx, "f32"))
        W.record(output_name(W), h)
    W.finish()
    return W
