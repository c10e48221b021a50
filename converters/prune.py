"""Pruning, driven by the calibration statistics (converters/calibrate.py):

  wanda:F   unstructured (Sun et al. 2023): in every row of every block matrix, zero the
            fraction F of weights with the smallest |W_ij| * ||x_j|| (||x_j||^2 = H_jj)
  N:M       the same score, N of every M consecutive columns kept (2:4)
  ffn:F     structured: drop the fraction F of FFN neurons (rows of ffn_gate/ffn_up,
            columns of ffn_down) with the smallest ||W_down[:, i]||^2 * E[a_i^2], a being
            ffn_down's input; d_ff shrinks (to a multiple of 32, the same in every
            layer), and with it the file and the compute

The result is a new Source (shapes, metadata, float32 loads) for the writer, and the
Gram matrices of the matrices whose inputs changed, cut to the kept neurons.
Unstructured zeros are weights like any other to the group formats: they make no file
smaller, and a group's (d, m) grid need not hold 0 exactly."""
from __future__ import annotations

import re
from dataclasses import replace

import numpy as np

from edge_rt import formats
from edge_rt.errors import EdgeRtError

from .readers import Source

PRUNE_RE = re.compile(r"^(?:(wanda):(0?\.\d+)|(\d+):(\d+)|(ffn):(0?\.\d+))$")


def parse(spec: str):
    """'wanda:0.5' -> ('wanda', 0.5); '2:4' -> ('nm', (2, 4)); 'ffn:0.25' -> ('ffn', 0.25)."""
    m = PRUNE_RE.match(spec or "")
    if not m:
        raise EdgeRtError(f"--prune {spec!r}: expected wanda:F, N:M (e.g. 2:4) or ffn:F, with 0 < F < 1")
    if m.group(1):
        return "wanda", float(m.group(2))
    if m.group(5):
        return "ffn", float(m.group(6))
    n, mm = int(m.group(3)), int(m.group(4))
    if not 0 < n < mm or formats.BLOCK % mm:
        raise EdgeRtError(f"--prune {spec}: N:M needs 0 < N < M with M dividing {formats.BLOCK}")
    return "nm", (n, mm)


def _unstructured(w: np.ndarray, H: np.ndarray, kind: str, arg) -> np.ndarray:
    score = np.abs(w) * np.sqrt(np.maximum(np.diag(H), 0))[None, :].astype(np.float32)
    w = w.copy()
    if kind == "wanda":
        k = int(w.shape[1] * arg)
        drop = np.argpartition(score, k, axis=1)[:, :k] if k else np.zeros((w.shape[0], 0), int)
        np.put_along_axis(w, drop, 0.0, axis=1)
        return w
    n, m = arg
    rows, cols = w.shape
    s = score.reshape(rows, cols // m, m)
    drop = np.argsort(s, axis=2)[:, :, : m - n]
    wv = w.reshape(rows, cols // m, m)
    np.put_along_axis(wv, drop, 0.0, axis=2)
    return wv.reshape(rows, cols)


def apply(src: Source, spec: str, gram: dict, count: dict) -> tuple[Source, dict]:
    """The pruned source and its Gram matrices (name -> H)."""
    kind, arg = parse(spec)
    blocks = [n for n in src.shapes if n.startswith("blk.") and n.endswith(".weight") and len(src.shapes[n]) == 2]
    if kind in ("wanda", "nm"):
        def load(name, base=src.load):
            w = np.asarray(base(name), np.float32)
            return _unstructured(w, gram[name], kind, arg) if name in blocks and name in gram else w
        return replace(src, load=load), gram
    # structured FFN pruning: the same number of neurons kept in every layer
    arch = src.meta["general.architecture"]
    d_ff = int(src.meta[f"{arch}.feed_forward_length"])
    keep_n = int(d_ff * (1 - arg)) // formats.BLOCK * formats.BLOCK
    if not 0 < keep_n < d_ff:
        raise EdgeRtError(f"--prune {spec}: keeps {keep_n} of {d_ff} FFN neurons (rounded to a multiple of "
                          f"{formats.BLOCK}); choose a fraction that removes some and keeps some")
    keep, gram = {}, dict(gram)
    for name in blocks:
        if name.endswith("ffn_down.weight"):
            layer = name[: -len("ffn_down.weight")]
            down = np.asarray(src.load(name), np.float32)
            importance = np.square(down).sum(axis=0) * np.diag(gram[name]) / count[name]
            keep[layer] = np.sort(np.argsort(importance)[::-1][:keep_n])
            gram[name] = gram[name][np.ix_(keep[layer], keep[layer])]
    shapes = dict(src.shapes)
    for layer, idx in keep.items():
        shapes[layer + "ffn_gate.weight"] = (keep_n, shapes[layer + "ffn_gate.weight"][1])
        shapes[layer + "ffn_up.weight"] = (keep_n, shapes[layer + "ffn_up.weight"][1])
        shapes[layer + "ffn_down.weight"] = (shapes[layer + "ffn_down.weight"][0], keep_n)

    def load(name, base=src.load):
        w = np.asarray(base(name), np.float32)
        layer, _, tail = name.rpartition("ffn_")
        if layer in keep and tail in ("gate.weight", "up.weight"):
            return np.ascontiguousarray(w[keep[layer]])
        if layer in keep and tail == "down.weight":
            return np.ascontiguousarray(w[:, keep[layer]])
        return w
    meta = dict(src.meta) | {f"{arch}.feed_forward_length": keep_n}
    return replace(src, shapes=shapes, load=load, meta=meta), gram
