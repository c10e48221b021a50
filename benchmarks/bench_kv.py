"""Perplexity at long context with a KV cache smaller than the text: the first N tokens
of wikitext-2 test read as ONE sequence (Model.eval_stream), the same tokens scored in
every configuration, through caches of several sizes with the sink-window policy
(4 sink positions kept) and without sinks (a plain sliding window), against a cache
that holds the whole text, for each cache precision (--kv-types: f16, f32, q8_0). Also
the cache's bytes at each size and precision.

    python benchmarks/bench_kv.py --models smollm2-135m --bits 8 --tokens 4096 --score-from 1024 --kv-types f16,q8_0 --json

With --decode-at P: instead, greedy decode speed at a depth of P positions for each
precision: one model per precision, its cache filled once with the first P tokens of the
text, then --rounds rounds in which the precisions take turns decoding --steps tokens
from position P (the same positions rewritten every round); the median round per
precision. Taking turns in one process keeps a shared machine's load alike for both.

    python benchmarks/bench_kv.py --models smollm2-135m --bits 8 --kv-types f16,q8_0 --decode-at 2000 --json
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
from threadpoolctl import threadpool_limits

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

import edge_rt  # noqa: E402
from conftest import _converted  # noqa: E402  (the tests' cached conversions)
from edge_rt.models.transformer import KVCache, forward, logits  # noqa: E402


def decode_speed(path: Path, text: str, kv_types: list[str], depth: int, steps: int, rounds: int,
                 threads: int) -> dict[str, list[float]]:
    """Tokens/s of each round of `steps` greedy decode steps from position `depth`, by precision."""
    models = {}
    for kv_type in kv_types:
        m = edge_rt.load(path, ctx=depth + steps, threads=threads, kv_type=kv_type)
        ids = np.array(m.tokenizer.encode(text)[:depth])
        m._reserve(m.plan_for(depth, steps))
        with threadpool_limits(threads):
            models[kv_type] = m, int(logits(m.weights, m._forward(ids, depth - 1))[0].argmax())
    speed = {kv_type: [] for kv_type in kv_types}
    with threadpool_limits(threads):
        for _ in range(rounds):
            for kv_type, (m, tok) in models.items():
                t0 = time.perf_counter()
                for pos in range(depth, depth + steps):
                    h = forward(m.spec, m.weights, np.array([tok]), pos, m.kv, m.layers.run)
                    tok = int(logits(m.weights, h)[0].argmax())
                speed[kv_type].append(steps / (time.perf_counter() - t0))
    return speed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="smollm2-135m")
    ap.add_argument("--bits", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--score-from", type=int, default=1024)
    ap.add_argument("--caches", default="256,512,1024", help="KV cache sizes (positions) to try")
    ap.add_argument("--kv-types", default="f16", help="cache precisions to try, e.g. f16,q8_0")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--decode-at", type=int, default=0, help="measure decode speed at this depth instead")
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    text = (ROOT / "data/wikitext-2/test.txt").read_text()
    rows = []
    for name in args.models.split(","):
        path = _converted(name, args.bits)
        if args.decode_at:
            speed = decode_speed(path, text, args.kv_types.split(","), args.decode_at, args.steps, args.rounds,
                                 args.threads)
            for kv_type, rounds in speed.items():
                rows.append({"model": name, "bits": args.bits, "kv_type": kv_type, "depth": args.decode_at,
                             "steps": args.steps, "decode_tokens_per_s": statistics.median(rounds), "rounds": rounds})
                print(f"{name} {args.bits}-bit, {kv_type} cache, decode at depth {args.decode_at}: median "
                      f"{statistics.median(rounds):.2f} tok/s over {len(rounds)} rounds of {args.steps}", file=sys.stderr)
            continue
        configs = [(c, keep) for c in map(int, args.caches.split(",")) for keep in (4, 0)] + [(args.tokens, 4)]
        for kv_type in args.kv_types.split(","):
            for ctx, keep in configs:
                m = edge_rt.load(path, ctx=ctx, threads=args.threads, kv_type=kv_type)
                r = m.eval_stream(text, args.tokens, score_from=args.score_from, keep=keep)
                row = {"model": name, "bits": args.bits, "kv_type": kv_type, "cache_positions": ctx, "sinks": keep,
                       "ppl": r["ppl"], "tokens_scored": r["tokens_scored"], "kv_shifts": r["kv_shifts"],
                       "kv_bytes": KVCache.nbytes(m.spec, ctx, kv_type)}
                rows.append(row)
                print(f"{name} {args.bits}-bit, cache {ctx:5d} ({row['kv_bytes'] / 2**20:6.1f} MiB {kv_type}), "
                      f"sinks {keep}: ppl {r['ppl']:.3f} over {r['tokens_scored']} tokens, {r['kv_shifts']} shifts",
                      file=sys.stderr)
    if args.json:
        print(json.dumps(rows))


if __name__ == "__main__":
    main()
