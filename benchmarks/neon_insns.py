#!/usr/bin/env python3
"""Instructions the aarch64 q8 kernel executes, counted under qemu-user: a proxy for its
cost where there is no ARM machine (qemu's wall clock says nothing about a real core).

    .venv/bin/python benchmarks/neon_insns.py [--revs c2c0c2b,WORKTREE]
        [--cpus cortex-a72,cortex-a76] [--shape 128x576] [--tokens 1,4,16,64] [--json]

For each git revision (WORKTREE: the files as they are) the library is cross-built for
aarch64 (gcc-aarch64-linux-gnu, CMakeLists.txt, Release) and a small driver runs one
ert_matmul of a q8 weight (group size 64, deterministic codes and scales) with n tokens at
1 thread under `qemu-aarch64 -cpu CPU -singlestep -d exec,nochain`, which logs every
executed instruction; the count is of those inside the q8 kernel that CPU dispatches
(ert_q8_matmul_neon on cortex-a72, ert_q8_matmul_neon_dotprod on cortex-a76), so start-up,
the activation quantizer and the driver are left out. It says nothing of memory stalls or
instruction latencies: direction only. With --json the last line on stdout is one JSON object.
"""
from __future__ import annotations

import argparse
import bisect
import collections
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SYSROOT = "/usr/aarch64-linux-gnu"

DRIVER = r"""
#define _GNU_SOURCE
#include "edgert.h"
#include <dlfcn.h>
#include <stdio.h>
#include <stdlib.h>
int main(int argc, char **argv) { /* rows cols n */
    const int rows = atoi(argv[1]), cols = atoi(argv[2]), n = atoi(argv[3]), gs = 64, ng = (cols + gs - 1) / gs;
    uint8_t *data = malloc((size_t)rows * cols);
    uint16_t *sc = malloc(2 * (size_t)rows * ng), *mn = malloc(2 * (size_t)rows * ng);
    float *x = malloc(4 * (size_t)n * cols + 4), *y = malloc(4 * (size_t)n * rows + 4);
    for (size_t i = 0; i < (size_t)rows * cols; i++) data[i] = (uint8_t)(i * 2654435761u >> 13);
    for (size_t i = 0; i < (size_t)rows * ng; i++) sc[i] = (uint16_t)(0x2000 + i % 64), mn[i] = (uint16_t)(0xA000 + i % 32);
    for (size_t i = 0; i < (size_t)n * cols; i++) x[i] = (float)((i * 40503u) % 1000) / 500.0f - 1.0f;
    ert_weight w = {ERT_Q8, rows, cols, gs, data, sc, mn};
    int rc = ert_matmul(&w, x, n, y, 1);
    Dl_info info; /* where the library is loaded */
    if (!dladdr((void *)ert_matmul, &info)) return 1;
    printf("%s rc=%d base=%p\n", ert_kernel_name(ERT_Q8), rc, info.dli_fbase);
    return rc != 0;
}
"""


def build(rev: str, out: Path) -> Path:
    """libedgert.so for aarch64 from `rev` (WORKTREE: the working tree), and the driver."""
    src = REPO if rev == "WORKTREE" else out / "src"
    if rev != "WORKTREE":
        src.mkdir(parents=True)
        archive = subprocess.run(["git", "-C", str(REPO), "archive", rev], capture_output=True, check=True).stdout
        subprocess.run(["tar", "-x", "-C", str(src)], input=archive, check=True)
    b = out / "build"
    run = lambda *cmd: subprocess.run(cmd, capture_output=True, text=True, check=True)  # noqa: E731
    run("cmake", "-S", str(src), "-B", str(b), "-DCMAKE_SYSTEM_NAME=Linux", "-DCMAKE_SYSTEM_PROCESSOR=aarch64",
        "-DCMAKE_C_COMPILER=aarch64-linux-gnu-gcc", "-DCMAKE_BUILD_TYPE=Release")
    run("cmake", "--build", str(b), "-j", str(os.cpu_count() or 2))
    (out / "driver.c").write_text(DRIVER)
    run("aarch64-linux-gnu-gcc", "-O2", f"-I{src / 'kernels_c/include'}", str(out / "driver.c"), "-o", str(b / "driver"),
        f"-L{b}", "-ledgert", "-lm", "-ldl")
    return b


def kernel_range(lib: Path, name: str) -> tuple[int, int]:
    nm = subprocess.run(["aarch64-linux-gnu-nm", str(lib)], capture_output=True, text=True, check=True).stdout
    syms = sorted(int(a, 16) for a, t, _ in (l.split() for l in nm.splitlines() if len(l.split()) == 3) if t in "tT")
    start = next(int(a, 16) for a, t, n in (l.split() for l in nm.splitlines() if len(l.split()) == 3) if n == name)
    return start, syms[bisect.bisect_right(syms, start)]


def count(b: Path, cpu: str, rows: int, cols: int, n: int) -> int:
    """instructions executed inside the q8 kernel dispatched on `cpu`"""
    p = subprocess.Popen(["qemu-aarch64", "-cpu", cpu, "-singlestep", "-d", "exec,nochain", "-D", "/dev/stdout",
                          "-L", SYSROOT, "-E", f"LD_LIBRARY_PATH={b}", str(b / "driver"), str(rows), str(cols), str(n)],
                         stdout=subprocess.PIPE, text=True)
    pcs, kernel, base = collections.Counter(), None, None
    for line in p.stdout:
        if line.startswith("Trace "):
            pcs[line.split("/", 2)[1]] += 1
        elif line.startswith("q8:"):
            kernel, base = line.split()[0], int(line.split("base=")[1], 16)
    assert p.wait() == 0 and kernel, f"driver failed on {cpu}"
    start, end = kernel_range(b / "libedgert.so", "ert_q8_matmul_" + kernel.split(":")[1].replace("-", "_"))
    return sum(c for pc, c in pcs.items() if start <= int(pc, 16) - base < end)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--revs", default="WORKTREE")
    ap.add_argument("--cpus", default="cortex-a72,cortex-a76")
    ap.add_argument("--shape", default="128x576")
    ap.add_argument("--tokens", default="1,4,16,64")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    missing = [t for t in ("aarch64-linux-gnu-gcc", "aarch64-linux-gnu-nm", "qemu-aarch64", "cmake") if not shutil.which(t)]
    if missing:
        sys.exit(f"neon_insns.py: error: needs {', '.join(missing)} (make cross)")
    rows, cols = map(int, args.shape.split("x"))
    results = []
    with tempfile.TemporaryDirectory(prefix="neon-insns-") as tmp:
        for i, rev in enumerate(args.revs.split(",")):
            b = build(rev, Path(tmp) / str(i))
            for cpu in args.cpus.split(","):
                for n in map(int, args.tokens.split(",")):
                    c = count(b, cpu, rows, cols, n)
                    results.append({"rev": rev, "cpu": cpu, "rows": rows, "cols": cols, "tokens": n, "instructions": c,
                                    "per_block_token": round(c / (rows * cols / 32 * n), 2)})
                    print(f"{rev:>10s} {cpu:>11s} {rows}x{cols} n={n:3d}: {c:9d} instructions "
                          f"({results[-1]['per_block_token']} per 32-column block and token)", file=sys.stderr)
    if args.json:
        print(json.dumps({"command": " ".join(sys.argv), "results": results}))


if __name__ == "__main__":
    main()
