#!/usr/bin/env python3
"""Wikitext-2 test perplexity of edge-rt's 32/8/4/3/2-bit SmolLM2, with llama.cpp's
F32/Q8_0/Q4_0 of the same float32 source for reference.

    .venv/bin/python benchmarks/bench_ppl.py [--windows 40] [--ctx 512] [--bits 32,8,4,3,2] [--json]

The files are the ones bench_speed.py makes (cached under $EDGE_RT_HOME/bench/): one
float32 source (`edge-rt convert smollm2-135m --bits 32 --format llama.cpp`), ours from
it with `edge-rt convert F32 --bits B` (group size 64 unless --group-size), llama.cpp's
Q8_0/Q4_0 from it with the real `llama-quantize` (its default recipe, not --pure).

Each model is scored by its own engine on data/wikitext-2/test.txt:
  edge-rt eval MODEL --text data/wikitext-2/test.txt --ctx 512 --windows 40 --threads 2 --json
  llama-perplexity -m MODEL -f data/wikitext-2/test.txt -c 512 --chunks 40 -t 2
Both tokenize the whole file once, cut it into non-overlapping windows of ctx tokens and
score the second half of each window (edge-rt's eval follows llama-perplexity's method),
so the numbers are comparable across the rows. Prints a markdown table; with --json the
last line on stdout is one JSON object.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import re
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_speed as bs  # noqa: E402  (model files, process runner, helpers)

import numpy as np  # noqa: E402
from threadpoolctl import threadpool_limits  # noqa: E402
from tqdm import tqdm  # noqa: E402

from edge_rt import formats  # noqa: E402
from edge_rt.gguf_file import GGUFFile  # noqa: E402
from edge_rt.models import spec_from_meta  # noqa: E402
from edge_rt.models.transformer import KVCache, forward, logits  # noqa: E402
from edge_rt.tokenizer import Tokenizer  # noqa: E402
from edge_rt.weights import FMT_KEY, ReferenceWeights, Weights, tensor_format  # noqa: E402

BITS_KEY = {32: "f32", 8: "q8", 4: "q4", 3: "q3", 2: "q2"}
PEERS = ("F32", "Q8_0", "Q4_0")
FINAL_RE = re.compile(r"Final estimate: PPL = ([0-9.]+|nan|inf) \+/- ([0-9.]+|nan|inf)")


def ours_cmd(model, text, ctx, windows, threads, kv_type="f16"):
    return [*bs.edge_rt_exe(), "eval", model, "--text", text, "--ctx", str(ctx), "--windows", str(windows),
            "--threads", str(threads), "--kv-type", kv_type, "--json"]


def peer_cmd(model, text, ctx, windows, threads):
    return [bs.peer.tool("llama-perplexity"), "-m", model, "-f", text, "-c", str(ctx), "--chunks", str(windows),
            "-t", str(threads)]


short = bs.short_cmd


# -- the same weights with float arithmetic, and the kernels' activation rounding emulated ---------------
ARITH = ("float", "kernels", "i16", "lut-sub4", "c")  # numpy twins: see ArithWeights


class ArithWeights(ReferenceWeights):
    """A file's weights dequantized to float32, products in numpy float32, with the
    kernels' activation rounding added back on demand:
      float     x . W^T, nothing rounded (the float-arithmetic reference of issue 3)
      kernels   q8: x rounded as the int8 kernels round it (per formats.ACT_SPAN values,
                int16 codes, amax/formats.ACT_LEVELS);
                q1..q4: the LUT kernels' int8 tables (formats.lut_tables: per group of the
                weights, scale amax/127 with amax the largest |sum of 4|; in groups of several
                blocks a step per 32-column block, ls*q/32768): y = x . W^T + sum_j sum_k 2^(k-1) d e[j, p_kj],
                e = t*ls - T the rounding error of table entry p of sub-group j
                (formats.matmul_reference, reordered: the same numbers as the C kernels
                up to float summation order)
      i16       as kernels, but int16 tables (32767 levels, not 127), and 32767 levels at q8
      lut-sub4  as kernels, but one table scale per 4 columns (per sub-group)
      c         the C kernels' products themselves (kernels.matmul): the numpy layer
                around them (norms, RoPE, attention) is then all that differs from edge-rt eval"""

    def __init__(self, g, arith: str = "float"):
        super().__init__(g)
        self.arith, self._spread = arith, {}
        self.levels = np.float32(32767.0 if arith == "i16" else 127.0)  # the tables'
        self.act_levels = np.float32(32767.0 if arith == "i16" else formats.ACT_LEVELS)  # q8's activations'
        self.c = Weights(g, threads=2) if arith == "c" else None

    def _table_error(self, x, group_size):
        """e[n, J*16]: the tables' rounding error t*step - T for this arithmetic (the block
        multipliers' own rounding, half a unit of ls per block, left out)."""
        xs = x.reshape(len(x), -1, 4)
        sign = np.where(((np.arange(16)[:, None] >> np.arange(4)) & 1).astype(bool), 1.0, -1.0).astype(np.float32)
        T = xs @ sign.T  # [n, J, 16]
        if self.arith == "kernels":
            t, ls, lq = formats.lut_tables(x, group_size, formats.lut_block_mult(group_size))
            J = xs.shape[1]
            step = np.repeat(ls, group_size // 4, axis=-1)[:, :J]  # [n, J]
            if lq is not None:
                step = step * np.repeat(lq.astype(np.float32) / np.float32(32768.0), formats.BLOCK // 4, axis=-1)
            return (t * step[..., None] - T).reshape(len(x), -1)
        a = np.abs(xs).sum(axis=-1)  # [n, J]
        J, sg = a.shape[1], group_size // 4
        ng = -(-J // sg)
        amax = a if self.arith == "lut-sub4" else np.repeat(
            np.pad(a, ((0, 0), (0, ng * sg - J))).reshape(len(x), ng, sg).max(axis=-1), sg, axis=-1)[:, :J]
        ls = amax / self.levels
        inv = np.divide(1.0, ls, out=np.zeros_like(ls), where=ls != 0)
        return ((np.rint(T * inv[..., None]) * ls[..., None]) - T).reshape(len(x), -1)

    def _spread_matrix(self, name, fmt, parts, cols, r0, r1):
        """A[J*16, r1-r0]: how much each table entry's error moves each output row."""
        key = (name, r0)
        if key in self._spread:
            return self._spread[key]
        c = fmt.unpack(parts["codes"], cols)[r0:r1]
        rows, J = r1 - r0, cols // 4
        d = fmt.unpack_groups(parts["scale"]).astype(np.float32)[r0:r1][:, (np.arange(J) * 4) // fmt.group_size]
        A = np.zeros((J, 16, rows), np.float32)
        quad = c.reshape(rows, J, 4)
        for k in range(fmt.bits):
            nib = (((quad >> k) & 1) << np.arange(4, dtype=np.uint8)).sum(axis=-1)  # [rows, J]
            A[np.arange(J)[None, :], nib, np.arange(rows)[:, None]] += np.float32(2.0 ** (k - 1)) * d
        A = A.reshape(J * 16, rows)
        if A.nbytes < (64 << 20):
            self._spread[key] = A
        return A

    def linear(self, name, x):
        x = np.asarray(x, np.float32)
        if self.c is not None:
            return self.c.linear(name, x)
        if self.arith == "float" or FMT_KEY + name not in self.g.meta:
            return x @ self.matrix(name).T
        fmt, parts, rows, cols = tensor_format(self.g, name)
        if fmt.bits == 8:  # formats.quantize_activations, with self.act_levels
            q, da = formats.quantize_activations(x, self.act_levels)
            return (q * da[..., None]).reshape(x.shape) @ self.matrix(name).T
        y, e = x @ self.matrix(name).T, self._table_error(x, fmt.group_size)
        step = max(1, (16 << 20) // (cols * 16))  # rows per spread matrix of at most 64 MiB
        for r0 in range(0, rows, step):
            y[:, r0:r0 + step] += e @ self._spread_matrix(name, fmt, parts, cols, r0, min(r0 + step, rows))
        return y


def arith_perplexity(path, text: str, ctx: int, windows: int, arith: str, threads: int) -> dict:
    """Perplexity of one file, windows cut and scored as `edge-rt eval` (api.eval_perplexity),
    but the forward pass in numpy (models/transformer.py) over ArithWeights, KV cache float32."""
    g = GGUFFile(path)
    tok = Tokenizer.from_gguf_meta(g.meta)
    spec = spec_from_meta(g.meta, tok.n_vocab, path)
    W = ArithWeights(g, arith)
    ids = np.array(tok.encode(text))
    windows = min(windows, len(ids) // ctx)
    first, nll, count = ctx // 2, 0.0, 0
    with threadpool_limits(threads):
        for w in tqdm(range(windows), desc=f"{Path(path).name} {arith}", unit="window", leave=False):
            chunk = ids[w * ctx:(w + 1) * ctx].copy()
            if tok.add_bos:
                chunk[0] = tok.bos_id
            h = forward(spec, W, chunk, 0, KVCache(spec, ctx, "f32"))[first:ctx - 1]
            z = logits(W, h).astype(np.float64)
            z -= z.max(axis=1, keepdims=True)
            nll -= (z[np.arange(len(z)), chunk[first + 1:]] - np.log(np.exp(z).sum(axis=1))).sum()
            count += len(z)
    return {"ppl": float(np.exp(nll / count)), "tokens_scored": count, "windows": windows}


def _delta(ppl: float, base: float) -> str:
    """+8.29%, or x14.9 / x6.2e+07 once the perplexity has more than doubled."""
    q = ppl / base
    if not math.isfinite(q):
        return str(q)
    if q < 2:
        return f"{100 * (q - 1):+.2f}%"
    return f"x{q:.1f}" if q < 1000 else f"x{q:.1e}"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--windows", type=int, default=40, help="windows (llama-perplexity: chunks); default 40")
    ap.add_argument("--ctx", type=int, default=512, help="tokens per window; default 512")
    ap.add_argument("--bits", default="32,8,4,3,2", help="our widths; default 32,8,4,3,2")
    ap.add_argument("--group-size", type=int, default=formats.DEFAULT_GROUP_SIZE)
    ap.add_argument("--peers", default=",".join(PEERS), help=f"llama.cpp files; default {','.join(PEERS)}; '' for none")
    ap.add_argument("--threads", type=int, default=2, help="threads for both engines; default 2")
    ap.add_argument("--text", default=str(bs.WIKITEXT_TEST), help="default: data/wikitext-2/test.txt")
    ap.add_argument("--kv-type", default="f16", choices=("f16", "f32"), help="edge-rt's KV cache; default f16")
    ap.add_argument("--arith", default="", help=f"also score our files in numpy with these arithmetics "
                    f"({', '.join(ARITH)}; see ArithWeights), e.g. float,kernels; default none")
    ap.add_argument("--json", action="store_true", help="end stdout with one JSON line of all results")
    a = ap.parse_args(argv)
    ariths = [x for x in a.arith.split(",") if x]
    for x in ariths:
        if x not in ARITH:
            ap.error(f"--arith: {x!r} is not one of {', '.join(ARITH)}")
    bits = [int(b) for b in a.bits.split(",") if b]
    for b in bits:
        if b not in BITS_KEY:
            ap.error(f"--bits: {b} is not one of {', '.join(map(str, BITS_KEY))}")
    peers = [p for p in a.peers.split(",") if p]
    for p in peers:
        if p not in PEERS:
            ap.error(f"--peers: {p!r} is not one of {', '.join(PEERS)}")

    started = _dt.datetime.now(_dt.timezone.utc)
    load0 = bs.loadavg()
    t_start = time.perf_counter()
    bs.log(f"preparing models in {bs.bench_dir()}")
    models = bs.prepare_models(ours=[BITS_KEY[b] for b in bits], peers=peers, group_size=a.group_size)
    rows = []
    for key, m in models.items():
        facts = bs.file_facts(m.path)
        if m.engine == "edge-rt":
            cmd = ours_cmd(m.path, a.text, a.ctx, a.windows, a.threads, a.kv_type)
        else:
            cmd = peer_cmd(m.path, a.text, a.ctx, a.windows, a.threads)
        bs.log(f"{m.label}: {bs.cmd_str(cmd)}")
        r = bs.run_measured(cmd)
        if m.engine == "edge-rt":
            j = json.loads(r["stdout"].strip().splitlines()[-1])
            ppl, err, scored, windows = j["ppl"], None, j["tokens_scored"], j["windows"]
        else:
            mm = FINAL_RE.search(r["stdout"] + "\n" + r["stderr"])
            if mm is None:
                raise SystemExit(f"no 'Final estimate' from llama-perplexity: {bs.cmd_str(cmd)}")
            ppl, err = float(mm.group(1)), float(mm.group(2))
            scored = windows = None
            mw = re.search(r"calculating perplexity over (\d+) chunks", r["stderr"])
            if mw:
                windows = int(mw.group(1))
                scored = windows * (a.ctx - 1 - a.ctx // 2)
        bs.log(f"  ppl {ppl:.4f} in {r['wall_s']:.1f} s, peak RSS {(r['maxrss_bytes'] or 0) / bs.MiB:.0f} MiB")
        arith = {}
        for x in ariths if m.engine == "edge-rt" else ():
            arith[x] = arith_perplexity(m.path, Path(a.text).read_text(encoding="utf-8"), a.ctx, a.windows, x,
                                        a.threads)["ppl"]
            bs.log(f"  numpy {x}: ppl {arith[x]:.4f} (C kernels {_delta(ppl, arith[x])} against it)")
        rows.append({"engine": m.engine, "model": key, "file": str(m.path), "made_by": bs.cmd_str(m.make_cmd),
                     "file_bytes": facts["file_bytes"], "bits_per_weight": facts["bits_per_weight"],
                     "block_matrix_bits_per_weight": facts["block_matrix_bits_per_weight"],
                     "tensor_types": facts["tensor_types"], "ppl": ppl, "ppl_stderr": err, "arith_ppl": arith,
                     "tokens_scored": scored, "windows": windows, "wall_s": r["wall_s"],
                     "peak_rss_bytes": r["maxrss_bytes"], "command": bs.cmd_str(cmd), "command_short": short(cmd)})

    base = {r["engine"]: r["ppl"] for r in rows if r["model"] in ("f32", "F32")}  # engine -> its float32 ppl
    elapsed = time.perf_counter() - t_start
    this_cmd = bs.cmd_str([".venv/bin/python", "benchmarks/bench_ppl.py",
                           *(argv if argv is not None else sys.argv[1:])])
    out = []
    w = out.append
    w(f"## Wikitext-2 test perplexity, SmolLM2-135M ({bs.MODEL}), ctx {a.ctx}, {a.windows} windows\n")
    w(f"- command: `{this_cmd}` ({started:%Y-%m-%d %H:%M} UTC, {elapsed / 60:.1f} min)")
    w(f"- text: {short(['cat', a.text])[4:]} (the tokenized WikiText-2 release with <unk>; not wiki.test.raw, so these "
      f"figures compare only with figures from the same file, ctx and window count)")
    w(f"- all files from one float32 source: `{short(bs.f32_source()[1])}` "
      f"(the downloaded SmolLM2-135M-Instruct is itself Q4_1, 4-bit with a scale and a minimum per 32 columns: "
      f"this float32 model is its dequantization, and every row here is a re-quantization of it)")
    w(f"- edge-rt group size {a.group_size}; llama.cpp files by `llama-quantize F32 OUT TYPE` with its default "
      f"recipe (not --pure)")
    w("- bits/weight: 8 x file bytes / parameters (whole file, tokenizer included); matrix b/w: the "
      "blk.* matrices alone (codes with their scales, and minimums where the format has them)")
    w("- Δ: perplexity relative to the same engine's float32 row")
    w("")
    if ariths:
        w(f"- numpy columns: the same file scored in numpy (KV cache float32) with that arithmetic "
          f"(bench_ppl.ArithWeights); in brackets the C kernels' perplexity relative to it")
    w("| engine | model | types (2-D tensors) | file MiB | bits/weight | matrix b/w | ppl | Δ vs f32 | tokens scored "
      "| time s | " + "".join(f"numpy {x} | " for x in ariths) + "command |")
    w("|---|---|---|---:|---:|---:|---:|---:|---:|---:|" + "---:|" * len(ariths) + "---|")
    for r in rows:
        b = base.get(r["engine"])
        delta = _delta(r["ppl"], b) if b and r["model"] not in ("f32", "F32") else "–"
        pm = f" ± {r['ppl_stderr']:.3f}" if r["ppl_stderr"] is not None else ""
        w(f"| {r['engine']} | {r['model']} | {bs.types_str({'tensor_types': r['tensor_types']})} "
          f"| {r['file_bytes'] / bs.MiB:.1f} | {r['bits_per_weight']:.3f} | {r['block_matrix_bits_per_weight']} "
          f"| {r['ppl']:.4f}{pm} | {delta} | {r['tokens_scored'] if r['tokens_scored'] is not None else '?'} "
          f"| {r['wall_s']:.0f} | "
          + "".join(f"{r['arith_ppl'][x]:.4f} ({_delta(r['ppl'], r['arith_ppl'][x])}) | " if x in r["arith_ppl"]
                    else "– | " for x in ariths) + f"`{r['command_short']}` |")
    if "edge-rt" in base and "llama.cpp" in base:
        w(f"\nedge-rt f32 vs llama.cpp F32 (the same weights): {base['edge-rt']:.4f} vs {base['llama.cpp']:.4f} "
          f"({100 * (base['edge-rt'] / base['llama.cpp'] - 1):+.3f}%): the engines' arithmetic differs (llama.cpp: "
          f"f16 KV cache, its own attention; edge-rt: float32 throughout).")
    w(f"\nLoad average at start: {load0} (perplexity does not depend on it; the times do).")
    bad = [r for r in rows if not math.isfinite(r["ppl"])]
    for r in bad:
        w(f"\n**warning:** {r['engine']} {r['model']}: perplexity is {r['ppl']}")
    print("\n".join(out), flush=True)
    if a.json:
        print(json.dumps({"command": this_cmd, "started_utc": started.isoformat(), "elapsed_s": elapsed,
                          "model": bs.MODEL, "ctx": a.ctx, "windows": a.windows, "threads": a.threads,
                          "group_size": a.group_size, "text": a.text, "rows": rows},
                         separators=(",", ":"), default=str))


if __name__ == "__main__":
    main()
