#!/usr/bin/env python3
"""What `run`'s checksum check costs: the CRC-32 of every tensor of a model whose pages
are already resident (as they are when run checks them), against the time to open the
model and make it resident.

    .venv/bin/python benchmarks/verify_cost.py MODEL [--reps 7] [--threads 1,2] [--json]
"""
from __future__ import annotations

import argparse
import json
import statistics
import time


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    from edge_rt.api import load
    from edge_rt.verify import check_loaded

    def timed(f):
        ts = []
        for _ in range(args.reps):
            t0 = time.perf_counter()
            f()
            ts.append(time.perf_counter() - t0)
        return statistics.median(ts)

    t0 = time.perf_counter()
    m = load(args.model, verify=False)
    m.g.populate()
    load_s = time.perf_counter() - t0
    size = m.weights.nbytes()
    r = {"model": args.model, "tensor_bytes": size, "open_and_populate_s": round(load_s, 4), "crc32": {}}
    for th in map(int, args.threads.split(",")):
        s = timed(lambda: check_loaded(m.g, th))
        r["crc32"][th] = {"median_s": round(s, 4), "GB_per_s": round(size / s / 1e9, 2)}
    if args.json:
        print(json.dumps(r))
    else:
        for th, v in r["crc32"].items():
            print(f"{size / 2**20:.1f} MiB of tensors: checksums in {v['median_s'] * 1e3:.0f} ms at {th} thread(s) "
                  f"({v['GB_per_s']} GB/s); opening and populating took {load_s * 1e3:.0f} ms")


if __name__ == "__main__":
    main()
