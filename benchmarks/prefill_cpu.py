#!/usr/bin/env python3
"""Prefill CPU cost at 1 thread: edge-rt against llama.cpp, robust to a busy machine.

    .venv/bin/python benchmarks/prefill_cpu.py [--models smollm2-135m,gemma3-270m]
        [--variants q8] [--reps 3] [--json]

On a shared machine the wall clock of a 512-token prefill swings with the other processes;
at one thread the CPU time the process spends (user + sys, getrusage) hardly does. For each
model and variant (bench_speed.py's files, made from one f32 conversion, and its 512-token
wikitext prompt) one process per engine runs the prompt reps + 1 times at 1 thread, the first
a warm-up: edge-rt `Model.generate(prompt, n=1)` (prefill and the first token), llama.cpp
`Llama.eval(ids)` and the argmax of the last logits (llama-cpp-python on the native build,
flash attention on, as benchmarks/peer_decode.py). Reported: prompt tokens per CPU second of
the best rep, and the ratio edge-rt / llama.cpp. One thread only (at two, time spent waiting
for the other thread would count differently in the two engines): bench_speed.py's wall
clock stays the figure of record; this is its check when the machine is busy.
With --json the last line on stdout is one JSON object.
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_speed import PEER_OF, log, make_prompt, prepare_models  # noqa: E402
from machine import loadavg  # noqa: E402


def cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def worker(engine: str, model: str, prompt_file: str, reps: int) -> dict:
    """Runs in its own process: the prompt reps + 1 times, CPU and wall seconds of each."""
    prompt = Path(prompt_file).read_text(encoding="utf-8")
    if engine == "edge-rt":
        from edge_rt import api
        m = api.load(model, threads=1, ctx=640)
        n_prompt = len(api.prompt_ids(m.tokenizer, prompt, False))
        run = lambda: list(m.generate(prompt, n=1))  # noqa: E731
    else:
        import llama_cpp
        llm = llama_cpp.Llama(model_path=model, n_ctx=640, n_batch=640, n_ubatch=640, n_threads=1,
                              n_threads_batch=1, flash_attn=True, verbose=False)
        ids = llm.tokenize(prompt.encode("utf-8"), add_bos=True)
        n_prompt = len(ids)

        def run():
            llm.reset()
            llm.eval(ids)
            return int(llm.scores[llm.n_tokens - 1].argmax())
    cpu, wall = [], []
    for _ in range(reps + 1):
        c, t = cpu_seconds(), time.perf_counter()
        run()
        cpu.append(cpu_seconds() - c)
        wall.append(time.perf_counter() - t)
    return {"engine": engine, "n_prompt": n_prompt, "cpu_s": cpu[1:], "wall_s": wall[1:]}


def measure(engine: str, model: Path, prompt_file: Path, reps: int) -> dict:
    cmd = [sys.executable, __file__, "--worker", engine, str(model), str(prompt_file), str(reps)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    r = json.loads(out.strip().splitlines()[-1])
    r["tok_per_cpu_s"] = r["n_prompt"] / min(r["cpu_s"])
    return r


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="smollm2-135m,gemma3-270m")
    ap.add_argument("--variants", default="q8", help=f"comma-separated, of {','.join(PEER_OF)}; default q8")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--worker", nargs=4, metavar=("ENGINE", "MODEL", "PROMPT_FILE", "REPS"), help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.worker:
        engine, model, prompt_file, reps = a.worker
        print(json.dumps(worker(engine, model, prompt_file, int(reps))))
        return
    variants = a.variants.split(",")
    results, load0 = [], loadavg()
    for mn in a.models.split(","):
        files = prepare_models(ours=variants, peers=[PEER_OF[v] for v in variants], model=mn)
        with tempfile.TemporaryDirectory() as td:  # bench_speed.py's prompt, for the workers
            prompt_file = Path(td) / "prompt.txt"
            prompt_file.write_text(make_prompt(files[variants[0]].path)[0], encoding="utf-8")
            for v in variants:
                log(f"{mn} {v} vs {PEER_OF[v]}")
                ours = measure("edge-rt", files[v].path, prompt_file, a.reps)
                peer = measure("llama.cpp", files[PEER_OF[v]].path, prompt_file, a.reps)
                results.append({"model": mn, "variant": v, "peer": PEER_OF[v], "edge_rt": ours, "llama_cpp": peer,
                                "ratio": ours["tok_per_cpu_s"] / peer["tok_per_cpu_s"]})
    print(f"load average {load0} at start, {loadavg()} at end; 1 thread; best of {a.reps} reps after a warm-up\n")
    print("| model | edge-rt | llama.cpp | edge-rt prompt tok per CPU s | llama.cpp | ratio |")
    print("|---|---|---|---:|---:|---:|")
    for r in results:
        print(f"| {r['model']} | {r['variant']} | {r['peer']} | {r['edge_rt']['tok_per_cpu_s']:.1f} | "
              f"{r['llama_cpp']['tok_per_cpu_s']:.1f} | {r['ratio']:.2f} |")
    if a.json:
        print(json.dumps({"loadavg_start": load0, "loadavg_end": loadavg(), "reps": a.reps, "results": results}))


if __name__ == "__main__":
    main()
