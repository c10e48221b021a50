#!/usr/bin/env python3
"""GEMV micro-benchmark: y = W x on 7B-class shapes, weights streamed from memory.

    .venv/bin/python benchmarks/bench_gemv.py [--shapes 4096x4096,11008x4096,4096x11008]
        [--bits 2,3,4,8] [--threads 1,2] [--reps 5] [--json]

For each shape (rows x cols of W: 4096x4096 = a 7B attention projection, 11008x4096 = its
gate/up projection, 4096x11008 = its down projection) and bit width, one random float32
matrix is quantized with edge-rt's own format (formats.by_name("qB").quantize) and copied
into as many distinct matrices as it takes for their bytes to reach at least 8x the
last-level cache (read from sysfs; benchmarks/machine.py), so every product reads its
weights from memory, as decode does. A pass multiplies one activation vector by each
matrix in turn (edge_rt.kernels.matmul, the dispatched kernel, --threads T); GB/s = the
weight bytes of a pass (codes + scales + offsets, Weight.nbytes) / its wall time. Median
and best of --reps passes after one warm-up pass, at each thread count, as a fraction of
the machine's read bandwidth measured in the same run (the same loop bench_speed.py
uses: a C read loop over max(512 MiB, 8x the LLC), best of 5, at the start and the end).

Issue 3's target: at 2 and 4 bits, 80% of the measured bandwidth at 2 threads.
Only the public API is used (edge_rt.formats, edge_rt.kernels), so the script measures
whatever kernels the library dispatches. With --json the last line on stdout is one JSON
object. Progress goes to stderr.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import busy_warning, cpu_name, llc_bytes, loadavg, measure_bandwidth, working_set_bytes  # noqa: E402
from machine import describe as describe_bandwidth  # noqa: E402

from edge_rt import __version__ as EDGE_RT_VERSION  # noqa: E402
from edge_rt import formats  # noqa: E402
from edge_rt import kernels as K  # noqa: E402
from edge_rt.pull import home  # noqa: E402

SHAPES = "4096x4096,11008x4096,4096x11008"
TARGET = 0.8  # of the 2-thread bandwidth, at 2 and 4 bits
MiB = 2**20


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def parse_shapes(text: str) -> list[tuple[int, int]]:
    out = []
    for s in text.split(","):
        r, _, c = s.strip().lower().partition("x")
        if not (r.isdigit() and c.isdigit()) or int(r) < 1 or int(c) < 1:
            raise ValueError(f"shape {s!r} is not ROWSxCOLS")
        out.append((int(r), int(c)))
    return out


def make_weights(rows: int, cols: int, bits: int, group_size: int, min_bytes: int, rng) -> list:
    """Distinct copies of one quantized random matrix, at least min_bytes of weights in all."""
    fmt = formats.by_name(f"q{bits}", group_size)
    w32 = (rng.standard_normal((rows, cols), dtype=np.float32) * np.float32(0.02))
    parts = fmt.quantize(w32)
    del w32
    first = K.Weight(fmt, rows, cols, parts)
    n = max(2, math.ceil(min_bytes / first.nbytes))
    copy = lambda v: np.array(v, copy=True) if isinstance(v, np.ndarray) else v  # noqa: E731
    return [first] + [K.Weight(fmt, rows, cols, {k: copy(v) for k, v in parts.items()}) for _ in range(n - 1)]


def time_passes(weights, x, y, threads: int, reps: int) -> list[float]:
    """Seconds per pass over all the matrices (one warm-up pass first)."""
    for w in weights:
        K.matmul(w, x, threads=threads, out=y)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        for w in weights:
            K.matmul(w, x, threads=threads, out=y)
        times.append(time.perf_counter() - t0)
    return times


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", default=SHAPES, help=f"ROWSxCOLS,...; default {SHAPES}")
    ap.add_argument("--bits", default="2,3,4,8", help="comma-separated; default 2,3,4,8")
    ap.add_argument("--group-size", type=int, default=formats.DEFAULT_GROUP_SIZE)
    ap.add_argument("--threads", default="1,2", help="comma-separated thread counts; default 1,2")
    ap.add_argument("--reps", type=int, default=5, help="timed passes per (shape, bits, threads); default 5")
    ap.add_argument("--llc-factor", type=int, default=8, help="working set >= this x the LLC; default 8 (minimum)")
    ap.add_argument("--json", action="store_true", help="end stdout with one JSON line of all results")
    a = ap.parse_args(argv)
    try:
        shapes = parse_shapes(a.shapes)
        bits_list = [int(b) for b in a.bits.split(",") if b]
        threads_list = [int(t) for t in a.threads.split(",") if t]
    except ValueError as e:
        ap.error(str(e))
    if any(b not in formats.BITS for b in bits_list):
        ap.error(f"--bits: each of {', '.join(map(str, formats.BITS))}")
    if a.reps < 1 or a.llc_factor < 8 or any(t < 1 for t in threads_list):
        ap.error("--reps and --threads must be at least 1, --llc-factor at least 8")

    started = _dt.datetime.now(_dt.timezone.utc)
    load0 = loadavg()
    cache = home() / "bench"
    cache.mkdir(parents=True, exist_ok=True)
    llc, llc_src = llc_bytes()
    min_bytes = working_set_bytes(a.llc_factor)
    log(f"last-level cache {llc / MiB:.0f} MiB ({llc_src}): working sets of at least {min_bytes / MiB:.0f} MiB")
    log("measuring memory read bandwidth")
    bw0 = measure_bandwidth(threads_list, cache)
    rng = np.random.default_rng(0)
    results = []
    for rows, cols in shapes:
        x = rng.standard_normal(cols, dtype=np.float32)
        y = np.empty(rows, np.float32)
        for bits in bits_list:
            weights = make_weights(rows, cols, bits, a.group_size, min_bytes, rng)
            nbytes = sum(w.nbytes for w in weights)
            kernel = K.kernel_name(weights[0].fmt.id)
            for T in threads_list:
                times = time_passes(weights, x, y, T, a.reps)
                rates = [nbytes / t for t in times]
                r = {"rows": rows, "cols": cols, "bits": bits, "group_size": a.group_size, "threads": T,
                     "kernel": kernel, "matrices": len(weights), "bytes_per_matrix": weights[0].nbytes,
                     "working_set_bytes": nbytes, "pass_s": times,
                     "gbps_median": statistics.median(rates) / 1e9, "gbps_best": max(rates) / 1e9,
                     "us_per_gemv_median": 1e6 * statistics.median(times) / len(weights)}
                results.append(r)
                log(f"{rows}x{cols} q{bits} t={T} ({kernel}, {len(weights)} matrices, {nbytes / MiB:.0f} MiB): "
                    f"{r['gbps_median']:.1f} GB/s median, {r['us_per_gemv_median']:.0f} us per GEMV")
            del weights
    log("measuring memory read bandwidth again")
    bw1 = measure_bandwidth(threads_list, cache)
    bandwidth = {str(T): max(bw0[str(T)]["best"], bw1[str(T)]["best"]) for T in threads_list}
    for r in results:
        r["fraction_of_bandwidth"] = r["gbps_median"] * 1e9 / bandwidth[str(r["threads"])]
        r["target"] = TARGET if r["threads"] == 2 and r["bits"] in (2, 4) else None
        r["target_met"] = None if r["target"] is None else r["fraction_of_bandwidth"] >= TARGET

    this_cmd = " ".join([".venv/bin/python", "benchmarks/bench_gemv.py", *(argv if argv is not None else sys.argv[1:])])
    load1 = loadavg()
    out = [f"## GEMV micro-benchmark (7B-class shapes, weights from memory)\n",
           f"- command: `{this_cmd}` ({started:%Y-%m-%d %H:%M} UTC)",
           f"- machine: {cpu_name()} ({platform.machine()}), {os.cpu_count()} cores; load average {load0} at start, "
           f"{load1} at end; edge-rt {EDGE_RT_VERSION}, "
           f"CPU features `{K.cpu_features()}`",
           f"- read bandwidth ({describe_bandwidth(bw0)}; best of 5 at start and end): "
           + ", ".join(f"{T} thread{'s' if T > 1 else ''} {bandwidth[str(T)] / 1e9:.1f} GB/s" for T in threads_list),
           f"- each row: distinct copies of one quantized random matrix, >= {a.llc_factor}x the LLC "
           f"({min_bytes / MiB:.0f} MiB); GB/s = weight bytes per pass / pass time, median of {a.reps} passes; "
           f"target {TARGET:.0%} of the bandwidth at 2 threads, 2 and 4 bits",
           "",
           "| shape (rows x cols) | bits | kernel | threads | matrices | MiB | us/GEMV | GB/s | % BW | target |",
           "|---|---:|---|---:|---:|---:|---:|---:|---:|---|"]
    for r in results:
        tgt = "" if r["target"] is None else ("met" if r["target_met"] else "**missed**")
        out.append(f"| {r['rows']}x{r['cols']} | {r['bits']} | {r['kernel']} | {r['threads']} | {r['matrices']} "
                   f"| {r['working_set_bytes'] / MiB:.0f} | {r['us_per_gemv_median']:.0f} | {r['gbps_median']:.1f} "
                   f"| {100 * r['fraction_of_bandwidth']:.0f}% | {tgt} |")
    busy = busy_warning(load0)
    if busy:
        out.append(f"\n**warning:** {busy}")
    print("\n".join(out), flush=True)
    if a.json:
        print(json.dumps({"command": this_cmd, "started_utc": started.isoformat(), "load_average": {"start": load0, "end": load1},
                          "llc_bytes": llc, "llc_source": llc_src, "min_working_set_bytes": min_bytes,
                          "bandwidth": {"start": bw0, "end": bw1, "used_bytes_per_s": bandwidth},
                          "cpu_features": K.cpu_features(), "results": results}, separators=(",", ":")))


if __name__ == "__main__":
    main()
