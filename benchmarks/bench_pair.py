#!/usr/bin/env python3
"""Speed of two given files side by side: an edge-rt GGUF and a llama.cpp GGUF of the same model
(e.g. our size-budgeted mix and llama.cpp's Q4_K_M at the same bytes), timed exactly as
bench_speed.py times its pairs.

    .venv/bin/python benchmarks/bench_pair.py OURS.gguf PEER.gguf [--reps 3] [--threads 2] [--json]

Per rep, one `edge-rt run` and one benchmarks/peer_decode.py run (llama-cpp-python, flash
attention on) in alternating order (edge-rt first on even reps), the same 512-token wikitext-2
prompt (bench_speed.make_prompt, from OURS's tokenizer) and 128 greedy tokens, each process
under /usr/bin/time for its peak RSS. Prints the medians and the median of the per-rep ratios
(ours / llama.cpp).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_speed as bs  # noqa: E402
from machine import loadavg  # noqa: E402

KEYS = ("decode_tps", "prefill_tps", "time_maxrss_bytes")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("ours", type=Path)
    ap.add_argument("peer", type=Path)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args(argv)
    for p in (a.ours, a.peer):
        if not p.is_file():
            ap.error(f"no such file: {p}")
    prompt, n = bs.make_prompt(a.ours)
    runs = {"ours": [], "peer": []}
    load0 = loadavg()
    with tempfile.TemporaryDirectory() as td:
        prompt_file = Path(td) / "prompt.txt"
        prompt_file.write_text(prompt, encoding="utf-8")
        for rep in range(a.reps):
            order = ("ours", "peer") if rep % 2 == 0 else ("peer", "ours")
            for who in order:
                r = bs.run_ours(a.ours, prompt, a.threads) if who == "ours" else \
                    bs.run_peer_loop(a.peer, prompt_file, a.threads)
                runs[who].append(r)
                bs.log(f"rep {rep} {who}: decode {r['decode_tps']:.1f} tok/s, prefill {r['prefill_tps']:.1f} tok/s")
    out = {"ours": str(a.ours), "peer": str(a.peer), "threads": a.threads, "reps": a.reps, "prompt_tokens": n,
           "loadavg": [load0, loadavg()], "kernel": runs["ours"][0]["kernel"]}
    for k in KEYS:
        out[k] = {who: statistics.median(r[k] for r in rs) for who, rs in runs.items()}
        out[k]["ratio"] = statistics.median(o[k] / p[k] for o, p in zip(runs["ours"], runs["peer"]))
    print("| | edge-rt | llama.cpp | ratio |\n|---|---:|---:|---:|")
    for k, name, scale in (("decode_tps", "decode tok/s", 1), ("prefill_tps", "prefill tok/s", 1),
                           ("time_maxrss_bytes", "peak RSS MiB", 1 / bs.MiB)):
        print(f"| {name} | {out[k]['ours'] * scale:.1f} | {out[k]['peer'] * scale:.1f} | {out[k]['ratio']:.2f}x |")
    if a.json:
        print(json.dumps(out))


if __name__ == "__main__":
    main()
