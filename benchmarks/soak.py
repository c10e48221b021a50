#!/usr/bin/env python3
"""Soak: 10,000 generated tokens in one process, resident memory sampled every 100.

    nice -n 10 .venv/bin/python benchmarks/soak.py [--model FILE] [--tokens 10000] [--ctx 2048]
        [--kv-policy sink-window|stop] [--json]

What it does: loads the model once (default: SmolLM2-135M converted to 4 bits, made
once into $EDGE_RT_HOME/converted/smollm2-135m-q4.gguf as `make demo` makes it), then
calls Model.generate again and again, each call a fresh prompt from wikitext-2
(sampled at temperature 0.8, top-k 40, top-p 0.95, seed = call number) generating
up to --per-call tokens (a call ends at the model's end-of-generation token), until
--tokens tokens have been generated. With `--kv-policy sink-window` (the default) a call
generates past the context (the cache keeps its first positions and drops the older
half of the rest each time it is full), so a call runs until its end-of-generation
token or the remaining tokens; with `stop` no call can pass the context (--per-call
defaults to it). Either way one Model (one KV cache, one mmap, one tokenizer): what a
long-lived server or app does. RSS (VmRSS of /proc/self/status) is sampled every 100
generated tokens; growth is measured from the first sample after --warmup tokens
(default: --ctx, by when the KV cache and every buffer are full) to the last sample and
to the largest one. Pass: both growths under 1%.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def default_model() -> Path:
    from edge_rt.converters.convert import convert
    from edge_rt.pull import home, pull
    from edge_rt.formats import FORMAT_VERSION
    from edge_rt.gguf_file import GGUFFile
    out = home() / "converted" / "smollm2-135m-q4.gguf"
    if not out.exists() or GGUFFile(out).meta.get("edgert.format_version") != FORMAT_VERSION:
        out.parent.mkdir(parents=True, exist_ok=True)
        convert(pull("smollm2-135m"), out, 4)
    return out


def prompts():
    paras = [p.strip() for p in (ROOT / "data" / "wikitext-2" / "test.txt").read_text(encoding="utf-8").split("\n")
             if 200 < len(p.strip()) < 600]
    i = 0
    while True:
        yield paras[i % len(paras)]
        i += 1


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path)
    ap.add_argument("--tokens", type=int, default=10_000)
    ap.add_argument("--ctx", type=int, default=2048)
    ap.add_argument("--kv-policy", choices=["sink-window", "stop"], default="sink-window")
    ap.add_argument("--per-call", type=int, default=None)
    ap.add_argument("--warmup", type=int, default=None, help="tokens before the reference sample (default: --ctx)")
    ap.add_argument("--every", type=int, default=100)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    from edge_rt import api, metrics
    model = args.model or default_model()
    m = api.load(model, ctx=args.ctx, threads=args.threads, kv_policy=args.kv_policy)
    window = args.kv_policy == "sink-window"
    per_call = args.per_call or (args.tokens if window else args.ctx)
    samples, calls, total, next_sample = [], [], 0, args.every  # samples: (tokens so far, RSS bytes)
    t0 = time.perf_counter()
    for call, prompt in enumerate(prompts()):
        if total >= args.tokens:
            break
        n = min(per_call, args.tokens - total)
        if not window:  # no call can pass the context
            n = min(n, args.ctx - len(m.tokenizer.encode(prompt)))
        for _ in m.generate(prompt, n, temperature=0.8, seed=call):
            done = total + m.metrics.n_generated  # generate counts before it yields
            if done >= next_sample:
                samples.append((done, metrics.rss_bytes()))
                next_sample += args.every
        total += m.metrics.n_generated
        calls.append({"call": call, "prompt_tokens": m.metrics.n_prompt, "generated": m.metrics.n_generated,
                      "kv_shifts": m.metrics.values["kv_shifts"],
                      "decode_tokens_per_s": round(m.metrics.as_dict()["decode_tokens_per_s"], 2)})
        print(f"call {call}: {m.metrics.n_generated} tokens, {total} in all, RSS "
              f"{metrics.rss_bytes() / 2**20:.1f} MiB", file=sys.stderr, flush=True)
    seconds = time.perf_counter() - t0
    warmup = args.warmup if args.warmup is not None else args.ctx
    after = [r for t, r in samples if t > warmup]
    ref = after[0]
    result = {"model": str(model), "ctx": args.ctx, "kv_policy": args.kv_policy, "per_call": per_call,
              "tokens": total, "calls": len(calls), "kv_shifts": sum(c["kv_shifts"] for c in calls),
              "seconds": round(seconds, 1), "warmup_tokens": warmup, "samples": len(samples),
              "rss_first_mib": round(samples[0][1] / 2**20, 2), "rss_ref_mib": round(ref / 2**20, 2),
              "rss_last_mib": round(after[-1] / 2**20, 2), "rss_max_mib": round(max(after) / 2**20, 2),
              "growth_last_pct": round(100 * (after[-1] - ref) / ref, 3),
              "growth_max_pct": round(100 * (max(after) - ref) / ref, 3),
              "peak_rss_mib": round(metrics.peak_rss_bytes() / 2**20, 2),
              "per_call_detail": calls, "rss_samples": samples}
    result["pass"] = result["growth_last_pct"] < 1 and result["growth_max_pct"] < 1
    if args.json:
        print(json.dumps(result))
    else:
        print(f"{total} tokens in {len(calls)} calls ({seconds:.0f} s); RSS {result['rss_ref_mib']} MiB after "
              f"{warmup} tokens -> {result['rss_last_mib']} MiB at the end (max {result['rss_max_mib']}): growth "
              f"{result['growth_last_pct']}% (max {result['growth_max_pct']}%) -> {'PASS' if result['pass'] else 'FAIL'}")
    sys.exit(0 if result["pass"] else 1)


if __name__ == "__main__":
    main()
