#!/usr/bin/env python3
"""edge-rt against onnxruntime on the same 4-bit weights (issue 5's ONNX part).

    .venv/bin/python benchmarks/bench_onnx.py [--models smollm2-135m,gemma3-270m] [--reps 3]
        [--prompt-tokens 512] [-n 128] [--threads 2] [--json]

For each model: `edge-rt convert MODEL --bits 4 --method rtn` (our GGUF) and the same
weights as `--format onnx` twice (float32 products, and --int8-activations), cached under
$EDGE_RT_HOME/bench/onnx-<converter hash>/. Then K reps, in alternating order, of
`edge-rt run FILE -p PROMPT -n N --json` (a wikitext-2 test prompt of --prompt-tokens
tokens, greedy) with --backend edge-rt / onnxruntime; each run is its own process.
Prints medians of prefill and decode tok/s and the peak RSS (VmHWM) per engine."""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))
from conftest import _converter_hash  # noqa: E402

from edge_rt.pull import home, pull  # noqa: E402
from edge_rt.tokenizer import Tokenizer  # noqa: E402
from edge_rt.gguf_file import GGUFFile  # noqa: E402

ENGINES = {"edge-rt q4": ("gguf", "edge-rt"), "onnxruntime q4 (float32 products)": ("onnx", "onnxruntime"),
           "onnxruntime q4 (int8 activations)": ("onnx-int8", "onnxruntime")}


def files(name: str) -> dict:
    from edge_rt.converters.convert import convert
    folder = home() / "bench" / f"onnx-{_converter_hash()}"
    folder.mkdir(parents=True, exist_ok=True)
    out = {"gguf": folder / f"{name}-q4.gguf", "onnx": folder / f"{name}-q4.onnx",
           "onnx-int8": folder / f"{name}-q4-int8.onnx"}
    for kind, path in out.items():
        if not path.exists():
            target = "edge-rt" if kind == "gguf" else "onnx"
            convert(pull(name), path, 4, target=target, progress=False, int8_activations=kind == "onnx-int8")
    return out


def prompt(gguf: Path, n: int) -> str:
    tok = Tokenizer.from_gguf_meta(GGUFFile(gguf).meta)
    ids = tok.encode((REPO / "data" / "wikitext-2" / "test.txt").read_text(encoding="utf-8")[:20 * n])[:n]
    return tok.decode(ids)


def run(path: Path, backend: str, text: str, n: int, threads: int) -> dict:
    r = subprocess.run([sys.executable, "-m", "edge_rt.cli", "run", str(path), "--backend", backend, "-p", text,
                        "-n", str(n), "-t", str(threads), "--json"], capture_output=True, text=True, timeout=1800)
    if r.returncode:
        raise SystemExit(f"{path} ({backend}): {r.stderr.strip()}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="smollm2-135m,gemma3-270m")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--prompt-tokens", type=int, default=512)
    ap.add_argument("-n", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    results = {}
    for name in a.models.split(","):
        f = files(name)
        text = prompt(f["gguf"], a.prompt_tokens)
        got = {e: [] for e in ENGINES}
        for rep in range(a.reps):
            order = list(ENGINES) if rep % 2 == 0 else list(ENGINES)[::-1]
            for e in order:
                kind, backend = ENGINES[e]
                got[e].append(run(f[kind], backend, text, a.n, a.threads))
        results[name] = {e: {k: statistics.median(r[k] for r in runs) for k in
                             ("prefill_tokens_per_s", "decode_tokens_per_s", "peak_rss_bytes", "n_prompt")}
                         for e, runs in got.items()}
    if a.json:
        print(json.dumps(results))
        return
    print(f"load average at the end: {os.getloadavg()[0]:.1f}")
    print("| model | engine | prompt tokens | prefill tok/s | decode tok/s | peak RSS MiB |\n|---|---|---|---|---|---|")
    for name, rows in results.items():
        for e, r in rows.items():
            print(f"| {name} | {e} | {r['n_prompt']:.0f} | {r['prefill_tokens_per_s']:.1f} | "
                  f"{r['decode_tokens_per_s']:.1f} | {r['peak_rss_bytes'] / 2**20:.0f} |")


if __name__ == "__main__":
    main()
