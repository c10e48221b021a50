"""Activation-aware scaling (AWQ, Lin et al. 2023), folded into the model exactly.

A matrix W multiplies inputs x; scaling its input channels by s changes nothing,
    x . W^T = (x / s) . (W * s)^T,
when x / s can be made upstream for free. Here it always can:
  - attn_q, attn_k, attn_v (one input: the attention norm's output) and ffn_gate,
    ffn_up (the FFN norm's output): divide that RMS norm's weight by s;
  - ffn_down (input act(gate) * up): divide ffn_up's rows by s.
(attn_output's input comes through the attention weights, shared by the query heads
of a key/value head, and a tied embedding/head is also the input table: not scaled.)

Quantizing W * s instead of W gives large-activation channels finer steps. Per group
of matrices sharing an input, s = rms(x)^alpha (normalized to a geometric mean of 1),
alpha searched over ALPHAS by the layer's output error sum ||(W - Q(W s)/s) x||^2 =
tr(D H D^T), D = W - Q(W s)/s, H the input Gram matrix from calibration. alpha = 0 is
plain round-to-nearest, so the chosen scale never does worse on that measure.

`apply` returns a Source whose loads are the scaled tensors and the Gram matrices of
the scaled inputs (H / (s s^T)), for any of the quantizers afterwards (RTN, GPTQ)."""
from __future__ import annotations

from dataclasses import replace

import numpy as np
from tqdm import tqdm

from edge_rt import formats

from .readers import Source

ALPHAS = np.linspace(0.0, 1.0, 11)


def groups(shapes: dict) -> list[tuple[str, str, list[str]]]:
    """(where s folds, "vec" or "rows", the matrices sharing the input) of every layer
    whose tensors are all present."""
    out, i = [], 0
    while f"blk.{i}.attn_norm.weight" in shapes:
        p = f"blk.{i}."
        for fold, kind, mats in ((p + "attn_norm.weight", "vec", [p + "attn_q.weight", p + "attn_k.weight", p + "attn_v.weight"]),
                                 (p + "ffn_norm.weight", "vec", [p + "ffn_gate.weight", p + "ffn_up.weight"]),
                                 (p + "ffn_up.weight", "rows", [p + "ffn_down.weight"])):
            if fold in shapes and all(m in shapes for m in mats):
                out.append((fold, kind, mats))
        i += 1
    return out


def output_error(w: np.ndarray, wq: np.ndarray, H: np.ndarray) -> float:
    """tr(D H D^T), D = w - wq: the summed squared output error over the calibration rows."""
    D = (w - wq).astype(np.float32)
    return float(np.einsum("ij,ij->", D @ H.astype(np.float32), D, dtype=np.float64))


def rtn(fmt: formats.GroupQuant, w: np.ndarray) -> np.ndarray:
    """w round-to-nearest in fmt, dequantized (fmt.dequantize(fmt.quantize(w)) without the packing)."""
    return fmt.decode(*fmt.round(w))


def search(ws: list[np.ndarray], fmts: list, H: np.ndarray, count: int) -> tuple[np.ndarray, float, list]:
    """The scale s [cols] minimizing the summed output error of ws quantized by round-to-
    nearest in their formats; returns (s, alpha, [(alpha, error), ...])."""
    rms = np.sqrt(np.maximum(np.diag(H) / max(count, 1), 0)).astype(np.float32)
    rms = np.maximum(rms, rms.max() * 1e-4 + 1e-12)
    best, tried = None, []
    for alpha in ALPHAS:
        s = rms ** np.float32(alpha)
        s /= np.exp(np.mean(np.log(s)))
        err = sum(output_error(w, rtn(f, w * s) / s, H) for w, f in zip(ws, fmts))
        tried.append((float(alpha), err))
        if best is None or err < best[1]:
            best = (s, err, float(alpha))
    return best[0], best[2], tried


def apply(src: Source, chosen: dict, gram: dict, count: dict, progress: bool | None = None) -> tuple[Source, dict, dict]:
    """The scaled source, the Gram matrices of the scaled inputs, and name -> alpha of
    every group's first matrix. Groups whose matrices are not all group-quantized stay."""
    col_scale, row_scale, vec_scale, alphas = {}, {}, {}, {}
    todo = [g for g in groups(src.shapes)
            if all(isinstance(chosen.get(m), formats.GroupQuant) and m in gram for m in g[2])]
    for fold, kind, mats in tqdm(todo, desc="awq", unit="group", disable=None if progress is None else not progress):
        H = gram[mats[0]]
        ws = [np.asarray(src.load(m), np.float32) for m in mats]
        s, alpha, _ = search(ws, [chosen[m] for m in mats], H, count[mats[0]])
        alphas[mats[0]] = alpha
        for m in mats:
            col_scale[m] = s
        (vec_scale if kind == "vec" else row_scale)[fold] = s
    gram = dict(gram)
    for m, s in col_scale.items():
        gram[m] = gram[m] / np.outer(s, s)

    def load(name, base=src.load):
        w = np.asarray(base(name), np.float32)
        if name in vec_scale:
            w = w / vec_scale[name]
        if name in col_scale:
            w = w * col_scale[name][None, :]
        if name in row_scale:
            w = w / row_scale[name][:, None]
        return np.ascontiguousarray(w, np.float32)
    return replace(src, load=load), gram, alphas
