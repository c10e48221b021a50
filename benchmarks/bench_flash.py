#!/usr/bin/env python3
"""The "model twice the memory" case: edge-rt streaming weights against llama.cpp's
mmap under the same memory limit and storage throttle, in the same run.

    sudo .venv/bin/python benchmarks/bench_flash.py [--models smollm2-135m,gemma3-270m] [--variants q8,f16]
        [--throttles none,90M:2000,400M] [--reps 1] [-n 32] [--threads 1] [--json]

For each model, variant (ours: `edge-rt convert --bits 8|16`; llama.cpp's: the same
source converted with `--format llama.cpp`, Q8_0 / F16), throttle and rep:

- The memory limit: what edge-rt's run phase needs besides weights (`edge-rt plan
  --json`: the measured interpreter without the tokenizer's encoder, KV cache for
  --ctx, buffers) +3%, plus 50% of the model's tensor bytes; never below its set-up
  phase's measured peak +3% (opening the model, building the tokenizer: Gemma-3's
  262k vocabulary peaks at ~214 MiB). The interpreter alone is ~55 MiB, so "50% of the
  model's bytes" as the whole limit would leave edge-rt nothing; llama.cpp, with a few
  MiB of runtime, gets the same limit, i.e. more room for weights than we have.
  --limit-mib sets the limit instead (to compare with a run whose limit was larger).
- Each run is a child process in a fresh memory cgroup at that limit (page cache
  counts) and, when throttled, a blkio cgroup limiting reads of the model's disk
  (read_bps, read_iops); the model file is dropped from the page cache before every
  run (posix_fadvise DONTNEED on that file only: other users' caches are untouched).
  edge-rt runs `edge-rt run MODEL --mem-budget LIMIT --json`. llama.cpp runs through
  llama-cpp-python (tests/peer.py's cached build) in this script's --peer-run mode,
  twice: default (mmap, CPU repacking on) and with repacking off; the better is kept.
- Reported: decode tokens/s, time to first token (prefill of the prompt, after load),
  wall time of the process, storage bytes read (/proc/PID/io read_bytes of each
  process) and per decoded token, peak RSS, the cgroup's peak (RSS + page cache) and
  failcnt. Medians over --reps. This machine is shared: numbers are noisy.

`--read-probe 1,2,4,8` measures instead the streaming reader alone: MB/s reading the first
model's file in the head's 2 MiB chunks, per throttle, with a reader of that depth (a 2 MiB
read is one piece, flash.PIECE: the depth matters for longer reads; benchmarks/bench_read.py
measures request size against requests in flight).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

PROMPT = "The history of the Raspberry Pi began in 2006, when"
CTX = 512
VARIANTS = {"q8": (8, "Q8_0"), "f16": (16, "F16")}


def parse_throttle(text: str) -> tuple[str, int | None, int | None]:
    """'none' | '90M:2000' (MB/s, IOPS) | '400M'."""
    if text == "none":
        return text, None, None
    bps, _, iops = text.partition(":")
    return text, int(float(bps.rstrip("Mm")) * 1e6), int(iops) if iops else None


def peer_run(model: str, n: int, threads: int, repack: bool) -> None:
    """One llama.cpp generation (greedy, n tokens), printed as one JSON line."""
    import llama_cpp
    import llama_cpp.llama_cpp as C
    if not repack:
        default = C.llama_model_default_params

        def no_repack():
            p = default()
            p.use_extra_bufts = False
            return p
        C.llama_model_default_params = no_repack
    from llama_cpp._utils import suppress_stdout_stderr
    from edge_rt import metrics
    io0 = metrics.storage_read_bytes()
    with suppress_stdout_stderr(disable=False):
        llm = llama_cpp.Llama(model_path=model, n_ctx=CTX, n_threads=threads, n_threads_batch=threads, verbose=False)
    t0 = time.perf_counter()
    stamps, io1 = [], 0
    for _ in llm(PROMPT, max_tokens=n, temperature=0.0, stream=True):
        stamps.append(time.perf_counter())
        io1 = io1 or metrics.storage_read_bytes()
    steps = len(stamps) - 1
    print(json.dumps({"ttft_s": stamps[0] - t0, "n_generated": len(stamps),
                      "decode_tokens_per_s": steps / (stamps[-1] - stamps[0]) if steps else 0.0,
                      "flash_bytes_read": metrics.storage_read_bytes() - io0,
                      "flash_bytes_per_token": (metrics.storage_read_bytes() - io1) / max(steps, 1),
                      "peak_rss_bytes": metrics.peak_rss_bytes(), "repack": repack}))


def probe_run(model: str, depth: int, mib: int) -> None:
    """Read the model file's first `mib` MiB (of tensor data) as the streamed head is
    read, in chunks of half the head buffer, with `depth` reads in flight; one JSON line."""
    from edge_rt.flash import HEAD_BUFFER, Reader, _anonymous
    from edge_rt.gguf_file import GGUFFile
    start = min(t.offset for t in GGUFFile(model).tensors.values()) // 4096 * 4096
    r, half = Reader(model, depth=depth), HEAD_BUFFER // 2
    buf = _anonymous(half)
    t0 = time.perf_counter()
    for at in range(start, start + (mib << 20), half):
        r.read(memoryview(buf), at, half)
    dt = time.perf_counter() - t0
    print(json.dumps({"depth": depth, "direct": r.direct, "mb_per_s": r.bytes_read / dt / 1e6, "seconds": dt}))


def read_probe(a) -> None:
    """MB/s of the streaming reader at each queue depth and throttle (the page cache
    dropped before each run)."""
    from edge_rt.simulate import run_limited
    rows = []
    for name in a.models.split(","):
        ours, _ = model_files(name, a.variants.split(",")[0])
        for throttle in a.throttles.split(","):
            label, bps, iops = parse_throttle(throttle)
            for depth in map(int, a.read_probe.split(",")):
                r = run_limited([sys.executable, __file__, "--probe-run", str(ours), str(depth), str(a.probe_mib)],
                                ours, None, bps, iops)
                rows.append({"model": name, "throttle": label, **r})
                print(f"  {name} {label} depth {depth}: {r.get('mb_per_s', r.get('error'))}", file=sys.stderr)
    print(json.dumps({"rows": rows, "mib": a.probe_mib, "loadavg": os.getloadavg()}))


def model_files(name: str, variant: str) -> tuple[Path, Path]:
    from conftest import _converted
    bits, _ = VARIANTS[variant]
    return _converted(name, bits), _converted(name, bits, "llama.cpp")


def limit_for(ours: Path) -> tuple[int, dict]:
    cmd = [sys.executable, "-m", "edge_rt.cli", "plan", str(ours), "--ctx", str(CTX), "--prompt-tokens", "16", "--json"]
    p = json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1])
    return int(max((p["run_bytes"] - p["weights_bytes"]) * 1.03 + 0.5 * p["weights_bytes"],
                   p["open_peak_bytes"] * 1.03)), p


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="smollm2-135m,gemma3-270m")
    ap.add_argument("--variants", default="q8,f16")
    ap.add_argument("--throttles", default="none,90M:2000")
    ap.add_argument("--reps", type=int, default=1)
    ap.add_argument("-n", type=int, default=32)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--limit-mib", type=int, default=None, help="The memory limit (default: from the plan, above).")
    ap.add_argument("--read-probe", metavar="DEPTHS", help="Instead: the reader's MB/s at these queue depths "
                    "(e.g. 1,2,4,8) per throttle, reading --probe-mib MiB of the first model and variant.")
    ap.add_argument("--probe-mib", type=int, default=128)
    ap.add_argument("--peer-run", nargs=2, metavar=("MODEL", "REPACK"), help=argparse.SUPPRESS)
    ap.add_argument("--probe-run", nargs=3, metavar=("MODEL", "DEPTH", "MIB"), help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.peer_run:
        return peer_run(a.peer_run[0], a.n, a.threads, a.peer_run[1] == "on")
    if a.probe_run:
        return probe_run(a.probe_run[0], int(a.probe_run[1]), int(a.probe_run[2]))
    if a.read_probe:
        return read_probe(a)
    from edge_rt.simulate import run_limited
    rows = []
    for name in a.models.split(","):
        for variant in a.variants.split(","):
            ours, theirs = model_files(name, variant)
            limit, plan = limit_for(ours)
            limit = a.limit_mib << 20 if a.limit_mib else limit
            for throttle in a.throttles.split(","):
                label, bps, iops = parse_throttle(throttle)
                runs = {"edge-rt": [], "llama.cpp": []}
                for rep in range(a.reps):
                    r = run_limited([sys.executable, "-m", "edge_rt.cli", "run", str(ours), "-p", PROMPT, "-n", str(a.n),
                                     "--ctx", str(CTX), "--threads", str(a.threads), "--mem-budget", str(limit), "--json"],
                                    ours, limit, bps, iops)
                    runs["edge-rt"].append(r)
                    best = None
                    for repack in ("on", "off"):
                        p = run_limited([sys.executable, __file__, "--peer-run", str(theirs), repack, "-n", str(a.n),
                                         "--threads", str(a.threads)], theirs, limit, bps, iops)
                        if "error" not in p and (best is None or p["decode_tokens_per_s"] > best["decode_tokens_per_s"]):
                            best = p
                        print(f"  {name} {variant} {label} rep {rep} llama.cpp repack {repack}: "
                              f"{p.get('decode_tokens_per_s', p.get('error'))}", file=sys.stderr)
                    runs["llama.cpp"].append(best or p)
                    print(f"  {name} {variant} {label} rep {rep} edge-rt: {r.get('decode_tokens_per_s', r.get('error'))}",
                          file=sys.stderr)
                for engine, rs in runs.items():
                    ok = [r for r in rs if "error" not in r]
                    med = (lambda k: statistics.median(r[k] for r in ok) if ok and all(r.get(k) is not None for r in ok)
                           else None)
                    rows.append({"model": name, "variant": variant, "throttle": label, "engine": engine,
                                 "limit_bytes": limit, "model_bytes": plan["weights_bytes"],
                                 "streamed_layers": ok[0].get("streamed_layers") if ok else None,
                                 "streamed_head": ok[0].get("streamed_head") if ok else None,
                                 "resident_head_rows": ok[0].get("resident_head_rows") if ok else None,
                                 "repack": ok[0].get("repack") if ok else None,
                                 "failed": [r["error"] for r in rs if "error" in r],
                                 **{k: med(k) for k in ("decode_tokens_per_s", "ttft_s", "wall_s", "flash_bytes_read",
                                                        "flash_bytes_per_token", "peak_rss_bytes", "cgroup_peak_bytes",
                                                        "cgroup_failcnt")}})
    if a.json:
        print(json.dumps({"rows": rows, "reps": a.reps, "n": a.n, "threads": a.threads, "ctx": CTX,
                          "loadavg": os.getloadavg()}))
        return
    mib = lambda x: "–" if x is None else f"{x / 2**20:.0f}"  # noqa: E731
    num = lambda x, f=".2f": "–" if x is None else format(x, f)  # noqa: E731
    print(f"| model | limit MiB | storage | engine | decode tok/s | ttft s | wall s | MiB read | MiB/token | "
          f"peak RSS MiB | cgroup peak MiB | failcnt |\n|" + "---|" * 12)
    for r in rows:
        rows = f", its first {r['resident_head_rows']} rows resident" if r.get("resident_head_rows") else ""
        what = r["engine"] + (f" ({r['streamed_layers']} layers{' + head' if r['streamed_head'] else ''} streamed{rows})"
                              if r["engine"] == "edge-rt" else
                              f" (repack {'on' if r['repack'] else 'off'})")
        if r["failed"]:
            what += f" FAILED: {r['failed'][0]}"
        print(f"| {r['model']} {r['variant']} | {mib(r['limit_bytes'])} | {r['throttle']} | {what} | "
              f"{num(r['decode_tokens_per_s'])} | {num(r['ttft_s'])} | {num(r['wall_s'], '.1f')} | "
              f"{mib(r['flash_bytes_read'])} | {mib(r['flash_bytes_per_token'])} | {mib(r['peak_rss_bytes'])} | "
              f"{mib(r['cgroup_peak_bytes'])} | {num(r['cgroup_failcnt'], 'd')} |")
    print(f"\nload average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores (shared machine: noisy). "
          f"{a.reps} rep(s), {a.n} tokens, {a.threads} thread(s), ctx {CTX}.")


if __name__ == "__main__":
    main()
