#!/usr/bin/env python3
"""How fast this machine's storage serves one byte range of a model file, per way of
reading it: O_DIRECT preads by request size and requests in flight, buffered preads
(with and without readahead, pages dropped after each read or not) and mmap + touch
(what llama.cpp's page faults do). The file's pages are dropped from the page cache
before every measurement (posix_fadvise DONTNEED on that file only, or --drop-all:
`echo 3 > /proc/sys/vm/drop_caches`, root).

    sudo .venv/bin/python benchmarks/bench_read.py FILE [--offset N] [--mib 128]
        [--sizes 256K,1M,2M,4M,8M,16M] [--depths 1,2,4,8,16] [--reps 3] [--json]

Requests in flight are threads each doing preads of the next request of the range in
file order (os.preadv releases the GIL). MB/s is bytes / wall time, median of --reps
rounds (each round measures every configuration once, so a shared machine's drift
spreads over all). The device's request count and bytes (/sys/dev/block/*/stat, every
process's reads) give the average request size."""
from __future__ import annotations

import argparse
import ctypes
import itertools
import json
import mmap
import os
import statistics
import sys
import threading
import time

import numpy as np

from edge_rt.plan import parse_size

ALIGN = 4096


def drop(path: str, everything: bool) -> None:
    """The file's pages out of the page cache (or all clean pages, with everything)."""
    if everything:
        os.sync()
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fdatasync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def cached_bytes(path: str, offset: int, length: int) -> int:
    """Bytes of [offset, offset+length) in the page cache (mincore)."""
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(path, os.O_RDONLY)
    try:
        m = mmap.mmap(fd, length, prot=mmap.PROT_READ, offset=offset)
    finally:
        os.close(fd)
    pages = -(-length // ALIGN)
    vec = (ctypes.c_ubyte * pages)()
    view = np.frombuffer(m, np.uint8)
    libc.mincore(ctypes.c_void_p(view.ctypes.data), ctypes.c_size_t(length), vec)
    del view
    m.close()
    return sum(v & 1 for v in vec) * ALIGN


def device_reads(path: str) -> tuple[int, int]:
    """(read requests completed, bytes read) of the block device holding path."""
    st = os.stat(path)
    with open(f"/sys/dev/block/{os.major(st.st_dev)}:{os.minor(st.st_dev)}/stat") as f:
        fields = f.read().split()
    return int(fields[0]), int(fields[2]) * 512


HUGE = 2 << 20  # a transparent huge page (x86-64, arm64 with 4 KiB pages)


def buffer(size: int, kind: str) -> memoryview:
    """Page-aligned anonymous memory, as O_DIRECT needs, every page written. kind "shmem":
    Python's default mmap(-1, n), MAP_SHARED (shmem pages, 4 KiB each); "4k": MAP_PRIVATE,
    MADV_NOHUGEPAGE; "thp": MAP_PRIVATE, 2 MiB-aligned, MADV_HUGEPAGE (physically
    contiguous 2 MiB pages where the kernel has them: a DMA segment each, instead of 512)."""
    if kind == "shmem":
        m, at = mmap.mmap(-1, size), 0
    else:
        m = mmap.mmap(-1, size + HUGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        at = -np.frombuffer(m, np.uint8).ctypes.data % HUGE
        m.madvise(mmap.MADV_HUGEPAGE if kind == "thp" else mmap.MADV_NOHUGEPAGE, at, size)
    view = memoryview(m)[at:at + size]
    np.frombuffer(view, np.uint8)[::ALIGN] = 0
    return view


def preads(fd: int, offset: int, length: int, size: int, depth: int, dontneed: bool, kind: str = "thp") -> int:
    """Read [offset, offset+length) in requests of `size` bytes, `depth` at once; bytes read."""
    starts = iter(range(offset, offset + length, size))
    lock, total = threading.Lock(), [0]

    def worker():
        view, done = buffer(size, kind), 0
        while True:
            with lock:
                at = next(starts, None)
            if at is None:
                break
            n = os.preadv(fd, [view[:min(size, offset + length - at)]], at)
            if dontneed:
                os.posix_fadvise(fd, at, n, os.POSIX_FADV_DONTNEED)
            done += n
        with lock:
            total[0] += done
    threads = [threading.Thread(target=worker) for _ in range(depth)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return total[0]


def touch(path: str, offset: int, length: int, advice: str) -> int:
    """mmap the range and read one byte of every page, as a page-faulting matmul would."""
    fd = os.open(path, os.O_RDONLY)
    try:
        m = mmap.mmap(fd, length, prot=mmap.PROT_READ, offset=offset)
    finally:
        os.close(fd)
    if advice != "normal":
        m.madvise({"sequential": mmap.MADV_SEQUENTIAL, "random": mmap.MADV_RANDOM}[advice])
    pages = np.frombuffer(m, np.uint8)[::ALIGN]
    int(pages.sum(dtype=np.uint64))
    del pages
    m.close()
    return length


def measure(path: str, offset: int, length: int, method: str, size: int, depth: int, everything: bool) -> dict:
    drop(path, everything)
    left = cached_bytes(path, offset, length)
    io0, t0 = device_reads(path), time.perf_counter()
    if method == "mmap":
        n = touch(path, offset, length, "normal")
    elif method == "mmap-seq":
        n = touch(path, offset, length, "sequential")
    else:
        flags = os.O_RDONLY | (os.O_DIRECT if method.startswith("direct") else 0)
        fd = os.open(path, flags)
        try:
            advice = {"buffered-random": os.POSIX_FADV_RANDOM, "buffered-seq": os.POSIX_FADV_SEQUENTIAL}.get(method)
            if advice is not None:
                os.posix_fadvise(fd, 0, 0, advice)
            n = preads(fd, offset, length, size, depth, dontneed=method.startswith("buffered-"),
                       kind=method.removeprefix("direct-") if method.startswith("direct-") else "4k")
        finally:
            os.close(fd)
    dt = time.perf_counter() - t0
    io1 = device_reads(path)
    requests, nbytes = io1[0] - io0[0], io1[1] - io0[1]
    return {"method": method, "size": size, "depth": depth, "mb_per_s": n / dt / 1e6, "seconds": dt,
            "device_bytes": nbytes, "device_request_bytes": nbytes / max(requests, 1),
            "cached_before": left, "cached_after": cached_bytes(path, offset, length)}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("file")
    ap.add_argument("--offset", type=int, default=0, help="first byte (rounded down to 4 KiB)")
    ap.add_argument("--mib", type=int, default=128, help="MiB to read from --offset")
    ap.add_argument("--sizes", default="256K,1M,2M,4M,8M,16M")
    ap.add_argument("--depths", default="1,2,4,8,16")
    ap.add_argument("--methods", default="direct-shmem,direct-4k,direct-thp,buffered,buffered-random,buffered-seq,"
                    "mmap", help="direct-shmem / direct-4k / direct-thp: O_DIRECT into MAP_SHARED anonymous memory / "
                    "MAP_PRIVATE 4 KiB pages / MAP_PRIVATE transparent huge pages (see buffer()); buffered: plain "
                    "preads (readahead on, pages kept); buffered-random / buffered-seq: FADV_RANDOM / SEQUENTIAL, "
                    "then DONTNEED after each read; mmap / mmap-seq: touch every page (MADV_NORMAL / SEQUENTIAL)")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--drop-all", action="store_true", help="drop every clean page (root) instead of the file's")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args(argv)
    offset, length = a.offset // ALIGN * ALIGN, a.mib << 20
    sizes, depths = [parse_size(s) for s in a.sizes.split(",")], [int(d) for d in a.depths.split(",")]
    configs = [(m, size, depth) for m in a.methods.split(",")
               for size, depth in ([(0, 1)] if m.startswith("mmap") else itertools.product(sizes, depths))]
    runs = {c: [] for c in configs}
    for rep in range(a.reps):  # every configuration once per round: the machine's drift spreads over all
        for c in configs:
            runs[c].append(measure(a.file, offset, length, *c, a.drop_all))
    rows = []
    for (method, size, depth), rs in runs.items():
        row = rs[0] | {k: statistics.median(r[k] for r in rs) for k in ("mb_per_s", "device_bytes",
                                                                         "device_request_bytes")} | {
            "runs_mb_per_s": [round(r["mb_per_s"]) for r in rs], "cached_before": max(r["cached_before"] for r in rs)}
        rows.append(row)
        print(f"  {method} {size >> 10} KiB x{depth}: {row['mb_per_s']:.0f} MB/s {row['runs_mb_per_s']}, "
              f"device: {row['device_bytes'] / 2**20:.0f} MiB in requests of "
              f"{row['device_request_bytes'] / 1024:.0f} KiB"
              f"{' (cache not empty before!)' if row['cached_before'] else ''}", file=sys.stderr)
    out = {"file": a.file, "offset": offset, "bytes": length, "reps": a.reps, "rows": rows,
           "loadavg": os.getloadavg()}
    if a.json:
        print(json.dumps(out))
        return
    print("MB/s (device request KiB); columns: requests in flight\n")
    print("| method | request | " + " | ".join(f"x{d}" for d in depths) + " |\n|---|---|" + "---:|" * len(depths))
    for method in a.methods.split(","):
        for s in [0] if method.startswith("mmap") else sizes:
            cells = {r["depth"]: f"{r['mb_per_s']:.0f} ({r['device_request_bytes'] / 1024:.0f})" for r in rows
                     if r["method"] == method and r["size"] == s}
            print(f"| {method} | {f'{s >> 10} KiB' if s else 'touch'} | " +
                  " | ".join(cells.get(d, "") for d in depths) + " |")
    print(f"\nload average {os.getloadavg()[0]:.1f}, {a.reps} rep(s), {a.mib} MiB from byte {offset}")


if __name__ == "__main__":
    main()
