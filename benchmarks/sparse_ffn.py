"""How sparse are our models' FFNs? Perplexity against the fraction of FFN neurons
(and of 32-neuron bundles) a token reads, in numpy, before any sparse runtime exists.

The FFN is f = W_down (act(W_gate h) * W_up h). A token that reads only the neurons
in a set S computes W_down[:, S] (act(W_gate[S] h) * W_up[S] h). S is picked per token
as the top fraction of neurons by a score:
  oracle   |act(g) * u| itself (the bound no predictor beats; reads everything to know)
  gate     |act(g)| with W_gate kept resident (S's up and down rows are read)
  lowrank  |act(g~) * u~|, g~ = h A_g B_g, u~ = h A_u B_u: rank-r reduced-rank regressions
           of the gate and up products, fitted on calibration text (wikitext-2 valid.txt)
Granularity "neuron" picks neurons; "bundle" picks whole tiles of 32 consecutive
neurons by the sum of their scores (what one >= 32 KiB read holds); "sorted" the same
with the neurons first sorted (at calibration) by how often they are in the top half.
`bundles` is the fraction of tiles with at least one active neuron (what the reads
cost when storage is bundled in tiles), `bundles4` the same for groups of 4 neurons
(a 32 KiB read on a 3B model at 8 bits holds ~3 neurons). `window_new_*` is the fraction of neurons
(bundles) a token must newly load when those active in the last k tokens stay in memory,
`window_held_neurons` the fraction of neurons that window holds (its memory).

Perplexity as edge-rt eval computes it (windows of ctx tokens of wikitext-2 test.txt,
the second half of each window scored). Float32 weights, numpy products.

    python benchmarks/sparse_ffn.py MODEL_F32.gguf --windows 3 --json out.json
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from edge_rt.gguf_file import GGUFFile
from edge_rt.models import spec_from_meta
from edge_rt.models import transformer as tf
from edge_rt.tokenizer import Tokenizer
from edge_rt.weights import ReferenceWeights

DATA = Path(__file__).resolve().parent.parent / "data" / "wikitext-2"
TILE = 32


class SparseFFN(ReferenceWeights):
    """Float32 weights whose FFN down product sees only the selected neurons; records
    the FFN inputs (calibration) and the selections (statistics)."""

    def __init__(self, g, spec):
        super().__init__(g)
        self.spec, self.act = spec, tf.ACTIVATIONS[spec.act]
        self.rule = None            # (score, fraction, granularity) or None: dense
        self.predictor = {}         # layer -> (A_g, B_g, A_u, B_u)
        self.record = None          # layer -> list of FFN inputs (calibration)
        self.hot = {}               # layer -> per neuron, calibration tokens with it in the top half by |act(g)*u|
        self.perm = {}              # layer -> neurons, hottest first (the "sorted" bundles' order)
        self.masks = {}             # layer -> bool [n, d_ff] of the last forward
        self.h = {}

    def linear(self, name, x):
        i = int(name.split(".")[1]) if name.startswith("blk.") else -1
        if name.endswith("ffn_gate.weight"):
            self.h[i] = x
            if self.record is not None:
                self.record.setdefault(i, []).append(x)
        if name.endswith("ffn_down.weight") and self.record is not None:
            a = np.abs(x)
            self.hot[i] = self.hot.get(i, 0) + (a >= np.median(a, axis=1, keepdims=True)).sum(axis=0)
        if name.endswith("ffn_down.weight") and self.rule:
            x = x * self.select(i, x)
        return super().linear(name, x)

    def score(self, i, x, kind):
        h = self.h[i]
        if kind == "oracle":
            return np.abs(x)
        if kind == "gate":
            return np.abs(self.act(h @ self.matrix(f"blk.{i}.ffn_gate.weight").T))
        ag, bg, au, bu = self.predictor[i]
        return np.abs(self.act((h @ ag) @ bg) * ((h @ au) @ bu))

    def select(self, i, x):
        kind, frac, gran = self.rule
        s = self.score(i, x, kind)
        n, ff = s.shape
        if gran in ("bundle", "sorted"):
            order = self.perm[i] if gran == "sorted" else np.arange(ff)
            t = s[:, order].reshape(n, ff // TILE, TILE).sum(axis=-1)
            k = max(1, round(frac * t.shape[1]))
            keep = np.zeros_like(t, dtype=bool)
            np.put_along_axis(keep, np.argpartition(-t, k - 1, axis=1)[:, :k], True, axis=1)
            mask = np.empty_like(s, dtype=bool)
            mask[:, order] = np.repeat(keep, TILE, axis=1)
        else:
            k = max(1, round(frac * ff))
            mask = np.zeros_like(s, dtype=bool)
            np.put_along_axis(mask, np.argpartition(-s, k - 1, axis=1)[:, :k], True, axis=1)
        self.masks[i] = mask
        return mask

    def fit(self, rank: int):
        """Reduced-rank regression of W h on the calibration inputs: the rank-r W~ that
        minimises sum over calibration h of |W h - W~ h|^2 is P_r W, P_r the projection
        on the top r left singular vectors of (W X^T)."""
        self.perm = {i: np.argsort(-hot, kind="stable") for i, hot in self.hot.items()}
        if not rank:  # no low-rank predictor asked for
            return
        for i, hs in self.record.items():
            X = np.concatenate(hs)
            parts = []
            for m in ("gate", "up"):
                W = self.matrix(f"blk.{i}.ffn_{m}.weight")  # [ff, d]
                Y = X @ W.T                                  # [N, ff]
                _, _, vt = np.linalg.svd(Y, full_matrices=False)
                V = vt[:rank].T                              # [ff, r]
                parts += [(W.T @ V).astype(np.float32), V.T.astype(np.float32).copy()]  # h A [r] then B [ff]
            self.predictor[i] = tuple(parts)


def windows_of(tok, path, ctx, n):
    ids = np.array(tok.encode(path.read_text()))
    out = []
    for w in range(min(n, len(ids) // ctx)):
        c = ids[w * ctx:(w + 1) * ctx].copy()
        if tok.add_bos:
            c[0] = tok.bos_id
        out.append(c)
    return out


def nll_of(W, spec, chunk):
    kv = tf.KVCache(spec, len(chunk), "f32")
    h = tf.forward(spec, W, chunk, 0, kv)
    first = len(chunk) // 2
    nll = 0.0
    for a in range(first, len(chunk) - 1, 64):
        b = min(a + 64, len(chunk) - 1)
        z = tf.logits(W, h[a:b]).astype(np.float64)
        z -= z.max(axis=1, keepdims=True)
        t = chunk[a + 1:b + 1]
        nll -= (z[np.arange(len(t)), t] - np.log(np.exp(z).sum(axis=1))).sum()
    return nll, len(chunk) - 1 - first


def stats(masks, k_window, perm):
    """Fractions of neurons, of bundles of 4 and of TILE neurons (in the stored order
    perm: layer -> neuron order) read per token, and of neurons and TILE-bundles newly loaded
    with a window of the last k tokens (all layers pooled)."""
    def fresh(a):  # [n, units] -> mean fraction of units active at j but not in j-k..j-1
        return np.mean([(a[j] & ~a[max(0, j - k_window):j].any(axis=0)).mean() for j in range(1, len(a))])

    def held(a):  # [n, units] -> mean fraction of units active in j-k+1..j (what the window keeps in memory)
        return np.mean([a[max(0, j - k_window + 1):j + 1].any(axis=0).mean() for j in range(k_window, len(a))])

    out = []
    for i, m in masks.items():
        n, ff = m.shape
        t = m[:, perm[i]].reshape(n, ff // TILE, TILE).any(axis=-1)
        t4 = m[:, perm[i]].reshape(n, ff // 4, 4).any(axis=-1)
        out.append((m.mean(), t4.mean(), t.mean(), fresh(m), fresh(t), held(m)))
    return tuple(map(float, np.mean(out, axis=0)))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model", type=Path, help="a float32 edge-rt GGUF (edge-rt convert --bits 32)")
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--windows", type=int, default=3)
    ap.add_argument("--calib-windows", type=int, default=4, help="windows of valid.txt to fit the predictor on")
    ap.add_argument("--rank", type=int, default=64)
    ap.add_argument("--fractions", default="0.75,0.5,0.35,0.25")
    ap.add_argument("--settings", default="oracle/neuron,oracle/bundle,oracle/sorted,gate/neuron,gate/sorted,"
                                          "lowrank/neuron", help="score/granularity pairs")
    ap.add_argument("--k-window", type=int, default=5)
    ap.add_argument("--json", type=Path)
    a = ap.parse_args()
    g = GGUFFile(a.model)
    tok = Tokenizer.from_gguf_meta(g.meta)
    spec = spec_from_meta(g.meta, tok.n_vocab, a.model)
    W = SparseFFN(g, spec)
    t0 = time.time()
    W.record = {}
    for c in windows_of(tok, DATA / "valid.txt", a.ctx, a.calib_windows):
        tf.forward(spec, W, c, 0, tf.KVCache(spec, len(c), "f32"))
    W.fit(a.rank if "lowrank/" in a.settings else 0)
    W.record, W.h = None, {}
    print(f"predictor rank {a.rank} fitted in {time.time() - t0:.0f}s", flush=True)
    test = windows_of(tok, DATA / "test.txt", a.ctx, a.windows)

    def run(rule):
        W.rule, W.masks = rule, {}
        nll, cnt, st = 0.0, 0, []
        for c in test:
            x, n = nll_of(W, spec, c)
            nll, cnt = nll + x, cnt + n
            if rule:
                st.append(stats(W.masks, a.k_window, W.perm if rule[2] == "sorted" else
                                {i: np.arange(m.shape[1]) for i, m in W.masks.items()}))
        s = np.mean(st, axis=0) if st else (1.0,) * 6
        return float(np.exp(nll / cnt)), *map(float, s)

    def save():
        if a.json:
            a.json.write_text(json.dumps({"model": a.model.name, "arch": spec.arch, "ctx": a.ctx, "windows": len(test),
                                          "rank": a.rank, "k_window": a.k_window,
                                          "calib": f"valid.txt, {a.calib_windows} windows", "rows": rows}, indent=1))

    base = run(None)[0]
    rows = [{"score": "dense", "granularity": "-", "fraction": 1.0, "ppl": base, "ppl_cost": 0.0,
             "neurons": 1.0, "bundles4": 1.0, "bundles": 1.0, "window_new_neurons": 1.0, "window_new_bundles": 1.0,
             "window_held_neurons": 1.0}]
    print(f"dense ppl {base:.3f}", flush=True)
    for kind, gran in (x.split("/") for x in a.settings.split(",")):
        for frac in map(float, a.fractions.split(",")):
            ppl, neur, bund4, bund, new_n, new_b, held_n = run((kind, frac, gran))
            rows.append({"score": kind, "granularity": gran, "fraction": frac, "ppl": ppl,
                         "ppl_cost": ppl / base - 1, "neurons": neur, "bundles4": bund4, "bundles": bund,
                         "window_new_neurons": new_n, "window_new_bundles": new_b, "window_held_neurons": held_n})
            print(f"{kind:8s} {gran:7s} keep {frac:.2f}: ppl {ppl:.3f} ({100 * (ppl / base - 1):+.1f}%) "
                  f"neurons {neur:.3f} bundles of 4 {bund4:.3f} of {TILE} {bund:.3f}; newly loaded with a window: "
                  f"neurons {new_n:.3f} bundles {new_b:.3f}, held {held_n:.3f} of the neurons", flush=True)
            save()


if __name__ == "__main__":
    main()
