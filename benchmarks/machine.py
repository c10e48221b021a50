"""What the benchmarks need to know about this machine, in one place for bench_speed.py
and bench_gemv.py: its last-level cache, its load, its CPU, and its memory read bandwidth,
measured the way decode reads weights (one pass over an array far larger than the
last-level cache, split across 1, 2, ... threads; both scripts divide by it in the same run):

    from machine import llc_bytes, measure_bandwidth
    bw = measure_bandwidth([1, 2], cache_dir)   # bw["1"]["best"] in bytes/s

The read loop is a small C function (32 float32 accumulators, compiled here with
cc -O3 -march=native, so it is vectorized with AVX2 on x86 and NEON on ARM), called once
per thread through ctypes, which releases the GIL. The array holds max(512 MiB,
8 x the last-level cache) and is written first, so every page is resident. Without a C
compiler it falls back to numpy's sum (said so in "method"; numpy's sum is slower than
memory, so fractions of it come out too high).
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import statistics
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

MiB = 2**20
MIN_ARRAY_BYTES = 512 * MiB
LLC_FACTOR = 8  # working sets at least this many times the last-level cache

_C = r"""
#include <stddef.h>
/* Sum of n floats with 32 independent accumulators (vectorized by -O3 into 4 AVX2
   registers on x86, 8 NEON registers on ARM): bound by memory, not by add latency. */
float edge_rt_bench_sum(const float *x, size_t n) {
    float acc[32] = {0};
    size_t i = 0;
    for (; i + 32 <= n; i += 32)
        for (int j = 0; j < 32; j++) acc[j] += x[i + j];
    float s = 0.0f;
    for (int j = 0; j < 32; j++) s += acc[j];
    for (; i < n; i++) s += x[i];
    return s;
}
"""


def _size(text: str) -> int | None:
    """'32768K', '1M', '512' (sysfs cache sizes) -> bytes."""
    text = text.strip().upper()
    mult = {"K": 2**10, "M": 2**20, "G": 2**30}.get(text[-1:], 1)
    digits = text[:-1] if text[-1:] in "KMG" else text
    return int(digits) * mult if digits.isdigit() else None


def llc_bytes() -> tuple[int, str]:
    """(size of the last-level cache in bytes, where it was read). From sysfs (the
    highest-level data/unified cache of cpu0), else sysconf; 32 MiB when neither says."""
    best = (0, 0)
    for d in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*"):
        try:
            if (d / "type").read_text().strip() == "Instruction":
                continue
            level, size = int((d / "level").read_text()), _size((d / "size").read_text())
        except (OSError, ValueError):
            continue
        if size and (level, size) > best:
            best = (level, size)
    if best[1]:
        return best[1], f"sysfs (L{best[0]})"
    for name, src in (("SC_LEVEL3_CACHE_SIZE", "sysconf L3"), ("SC_LEVEL2_CACHE_SIZE", "sysconf L2")):
        try:
            v = os.sysconf(name)
        except (ValueError, OSError):
            continue
        if v and v > 0:
            return int(v), src
    return 32 * MiB, "unknown (assumed 32 MiB)"


def working_set_bytes(factor: int = LLC_FACTOR) -> int:
    """The smallest working set these benchmarks use: factor x the last-level cache."""
    return factor * llc_bytes()[0]


def _kernel(cache_dir: Path):
    """(sum function taking a float32 array, description). The C loop when cc works."""
    src_hash = hashlib.sha256((_C + platform.machine()).encode()).hexdigest()[:12]
    so = Path(cache_dir) / f"bw-{src_hash}.so"
    cflags = ["-O3", "-march=native", "-shared", "-fPIC"]
    if not so.exists():
        with tempfile.TemporaryDirectory() as td:
            c, tmp = Path(td) / "bw.c", Path(td) / "bw.so"
            c.write_text(_C)
            try:
                r = subprocess.run(["cc", *cflags, str(c), "-o", str(tmp)], capture_output=True, text=True)
            except OSError:
                r = None
            if r is not None and r.returncode == 0:
                os.replace(tmp, so)
    if so.exists():
        lib = ctypes.CDLL(str(so))
        lib.edge_rt_bench_sum.restype = ctypes.c_float
        lib.edge_rt_bench_sum.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
        return (lambda a: lib.edge_rt_bench_sum(a.ctypes.data, a.size)), \
            f"C loop (cc {' '.join(cflags[:2])}), 32 float32 accumulators"
    return (lambda a: float(a.sum())), "numpy float32 sum (no C compiler found: numpy is slower than memory)"


def measure_bandwidth(threads_list, cache_dir: Path, trials: int = 5) -> dict:
    """Read bandwidth in bytes/s for each thread count: best and median of `trials`
    passes over the array, cut into one slice per thread."""
    fn, how = _kernel(cache_dir)
    llc, llc_src = llc_bytes()
    nbytes = max(MIN_ARRAY_BYTES, LLC_FACTOR * llc)
    a = np.ones(nbytes // 4, np.float32)  # written, so resident
    fn(a)  # warm
    res = {"method": how, "array_bytes": a.nbytes, "llc_bytes": llc, "llc_source": llc_src}
    for t in threads_list:
        parts = np.array_split(a, t)
        rates = []
        for _ in range(trials):
            ths = [threading.Thread(target=fn, args=(p,)) for p in parts]
            t0 = time.perf_counter()
            for th in ths:
                th.start()
            for th in ths:
                th.join()
            rates.append(a.nbytes / (time.perf_counter() - t0))
        res[str(t)] = {"best": max(rates), "median": statistics.median(rates), "trials": rates}
    del a
    return res


def loadavg() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "?"


def busy_warning(load: str) -> str | None:
    """A warning when other work was running as the benchmark started (1-minute load
    average above 1 on this machine's cores): timings, 2-thread ones above all, suffer."""
    try:
        one = float(load.split()[0])
    except (ValueError, IndexError):
        return None
    if one > 1.0:
        return (f"the machine was busy when this run started (1-minute load average {one:.1f} on "
                f"{os.cpu_count()} cores): other processes took CPU time from these timings, the 2-thread ones "
                f"above all (each step waits for its slowest thread); run again on an idle machine")
    return None


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "?"


def describe(bw: dict) -> str:
    """One line for the benchmark headers."""
    return (f"{bw['method']}, {bw['array_bytes'] / MiB:.0f} MiB float32 = "
            f"{bw['array_bytes'] / bw['llc_bytes']:.0f}x the last-level cache "
            f"({bw['llc_bytes'] / MiB:.0f} MiB, {bw['llc_source']})")
