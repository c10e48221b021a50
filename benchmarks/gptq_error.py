"""How much calibration GPTQ needs: the layer output error of GPTQ's codes on held-out text
against the number of calibration windows and the Hessian dampening.

For each matrix W (with input Gram matrix H = X^T X) the relative output error is
tr(E H E^T) / tr(W H W^T), E = W - Q, Q the dequantized codes. GPTQ minimizes it on its
own calibration Gram; the number that counts is on other text: H_test is the Gram of
--test-windows windows cut from the second half of the calibration text (the calibration
windows come from its start, as `edge-rt convert` takes them). Reported per width: the
geometric mean over the matrices of the clip search (no calibration) and of GPTQ with
each (windows, damp), on H_test and on its own calibration Gram.

    OPENBLAS_NUM_THREADS=1 python benchmarks/gptq_error.py MODEL_F32.gguf --windows 8,32,64 \\
        --damp 0.01,0.03 --bits 3,4 --json
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

from edge_rt import formats
from edge_rt.converters import calibrate, gptq
from edge_rt.converters.readers import open_source

MATRICES = ("attn_q", "attn_v", "attn_output", "ffn_up", "ffn_down")


def rel_error(w: np.ndarray, q: np.ndarray, H: np.ndarray) -> float:
    E, W = (w - q).astype(np.float64), w.astype(np.float64)
    return float(np.einsum("ij,jk,ik->", E, H, E) / np.einsum("ij,jk,ik->", W, H, W))


def geomean(v) -> float:
    return float(np.exp(np.mean(np.log(v))))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model", help="a float GGUF (edge-rt convert MODEL --bits 32 --format llama.cpp)")
    ap.add_argument("--windows", default="8,64", help="calibration windows of 512 tokens to compare")
    ap.add_argument("--damp", default=str(gptq.DAMP), help="Hessian dampenings to compare")
    ap.add_argument("--bits", default="3,4")
    ap.add_argument("--group-size", type=int, default=formats.DEFAULT_GROUP_SIZE)
    ap.add_argument("--layers", default="2,10,20,28")
    ap.add_argument("--test-windows", type=int, default=4)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    src = open_source(a.model)
    text = calibrate.VALID_TEXT.read_text(encoding="utf-8")
    with tempfile.NamedTemporaryFile("w", suffix=".txt") as held_out:
        held_out.write(text[len(text) // 2:])
        held_out.flush()
        H_test = calibrate.collect(src, held_out.name, a.test_windows, progress=False).gram
    grams = {n: calibrate.collect(src, None, n, progress=False).gram for n in map(int, a.windows.split(","))}
    names = [f"blk.{layer}.{m}.weight" for layer in map(int, a.layers.split(",")) for m in MATRICES]
    weights = {n: np.asarray(src.load(n), np.float32) for n in names}
    damps = [float(x) for x in a.damp.split(",")]
    rows = []
    for bits in map(int, a.bits.split(",")):
        fmt = formats.GroupQuant(bits, a.group_size)
        search = [rel_error(w, fmt.decode(*gptq.search(w, fmt)), H_test[n])
                  for n, w in weights.items()]
        width_rows = [{"bits": bits, "method": "clip search", "test": geomean(search)}]
        for windows, G in grams.items():
            for damp in damps:
                test, own = [], []
                for n, w in weights.items():
                    q = fmt.decode(*gptq.gptq(w, G[n], fmt, damp=damp))
                    test.append(rel_error(w, q, H_test[n]))
                    own.append(rel_error(w, q, G[n]))
                width_rows.append({"bits": bits, "method": "gptq", "windows": windows, "damp": damp,
                                   "test": geomean(test), "own": geomean(own)})
        rows += width_rows
        for r in width_rows:
            print(f"q{r['bits']}:{a.group_size} {r['method']:11s} windows {r.get('windows', '-'):>4} "
                  f"damp {r.get('damp', '-'):>5}  held-out {r['test']:.3e}"
                  + (f"  own calibration {r['own']:.3e}" if "own" in r else ""), file=sys.stderr)
    if a.json:
        print(json.dumps({"model": Path(a.model).name, "matrices": names, "group_size": a.group_size,
                          "test_windows": a.test_windows, "rows": rows}))


if __name__ == "__main__":
    main()
