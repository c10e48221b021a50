#!/usr/bin/env python3
"""The runtime's own footprint: what edge-rt holds besides weights, KV cache and
buffers (the interpreter, libraries, metadata, tokenizer), which in the "model twice
the memory" case is memory taken from the weights.

    .venv/bin/python benchmarks/bench_footprint.py [--models smollm2-135m,gemma3-270m] [--bits 8] [--reps 3] [--json]

For each model (ours, `edge-rt convert --bits B`), each rep runs three fresh processes:
`edge-rt plan MODEL --json` (the plan's measured runtime `base_bytes`, CALL_BYTES
included, and `open_peak_bytes`, VmHWM once the model is opened), `edge-rt run MODEL -n 16
--json` (`peak_rss_bytes`, weights included) and `edge_rt.load(MODEL)` timed from before
`import edge_rt` (time to load: imports, metadata, tokenizer). Medians over the reps;
the load time is for direction only on a shared machine.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
PROMPT = "The capital of France is"
LOAD = "import time; t = time.perf_counter(); import edge_rt; edge_rt.load({!r}, threads=1); print(time.perf_counter() - t)"


def last_line(cmd: list[str]) -> str:
    return subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]


def measure(model: Path) -> dict:
    cli = [sys.executable, "-m", "edge_rt.cli"]
    plan = json.loads(last_line([*cli, "plan", str(model), "--threads", "1", "--json"]))
    run = json.loads(last_line([*cli, "run", str(model), "-p", PROMPT, "-n", "16", "--threads", "1", "--json"]))
    return {"base_mib": plan["base_bytes"] / 2**20, "open_peak_mib": plan["open_peak_bytes"] / 2**20,
            "run_peak_mib": run["peak_rss_bytes"] / 2**20,
            "load_s": float(last_line([sys.executable, "-c", LOAD.format(str(model))]))}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="smollm2-135m,gemma3-270m")
    ap.add_argument("--bits", type=int, default=8)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args(argv)
    from conftest import _converted
    rows = []
    for name in a.models.split(","):
        reps = [measure(_converted(name, a.bits)) for _ in range(a.reps)]
        rows.append({"model": name, "bits": a.bits, "reps": a.reps} |
                    {k: statistics.median(r[k] for r in reps) for k in reps[0]})
    print("| model | plan base MiB | open peak MiB | `run -n 16` peak RSS MiB | load s |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} q{r['bits']} | {r['base_mib']:.1f} | {r['open_peak_mib']:.1f} | {r['run_peak_mib']:.1f} "
              f"| {r['load_s']:.2f} |")
    if a.json:
        print(json.dumps(rows))


if __name__ == "__main__":
    main()
