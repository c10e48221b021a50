"""Device profiles (data: one TOML file each) and detection of the host.

A profile says what a device has: cores, SIMD features, RAM and what a run may use of
it (app_memory_mib), memory read bandwidth, storage read MB/s and IOPS. `host()`
measures the same for this machine."""
from __future__ import annotations

import mmap
import os
import platform
import random
import time
import tomllib
from importlib.resources import files

from ..errors import EdgeRtError


def profiles() -> dict[str, dict]:
    """name -> profile, from the .toml files beside this module."""
    out = {}
    for f in files(__name__).iterdir():
        if f.name.endswith(".toml"):
            out[f.name[:-5]] = tomllib.loads(f.read_text())
    return out


def profile(name: str, probe=None) -> dict:
    """A profile by name; 'host' is this machine, detected (storage measured on probe)."""
    if name == "host":
        return host(probe)
    known = profiles()
    if name not in known:
        raise EdgeRtError(f"unknown target {name!r}: choose one of host, {', '.join(sorted(known))}")
    return known[name]


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith(("model name", "hardware", "cpu model")):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def memory_read_gbps(nbytes: int = 64 << 20, repeats: int = 5) -> float:
    """Best of `repeats` numpy sums over an array of nbytes (one thread)."""
    import numpy as np
    a = np.ones(nbytes // 8)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        a.sum()
        best = min(best, time.perf_counter() - t)
    return nbytes / best / 1e9


def storage_read(path, seq_bytes: int = 64 << 20, seconds: float = 0.3) -> dict:
    """Sequential MB/s (1 MiB reads) and 4 KiB random-read IOPS of the disk holding
    path, with O_DIRECT so the page cache does not answer; {} where O_DIRECT is refused."""
    size = os.stat(path).st_size
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    except (OSError, AttributeError):
        return {}
    buf = mmap.mmap(-1, 1 << 20)
    try:
        t, done = time.perf_counter(), 0
        while done < min(seq_bytes, size - (1 << 20)):
            done += os.preadv(fd, [memoryview(buf)], done)
        mbps = done / (time.perf_counter() - t) / 1e6
        blocks, rng, n, t = size // 4096, random.Random(0), 0, time.perf_counter()
        while time.perf_counter() - t < seconds:
            os.preadv(fd, [memoryview(buf)[:4096]], rng.randrange(blocks) * 4096)
            n += 1
        return {"storage_read_mbps": round(mbps), "storage_read_iops": round(n / (time.perf_counter() - t))}
    except OSError:
        return {}
    finally:
        os.close(fd)
        buf.close()


def host(probe=None) -> dict:
    """What this machine is: architecture, cores, SIMD, memory (and its read bandwidth),
    and, given a file to probe, its storage's read speed."""
    from ..kernels import cpu_features
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    out = {"name": f"this host ({_cpu_model() or platform.machine()})", "arch": platform.machine(),
           "cores": os.cpu_count(), "isa": cpu_features().split(), "memory_gib": round(mem / 2**30, 1),
           "app_memory_mib": mem >> 20, "mem_read_gbps": round(memory_read_gbps(), 1), "cpu": _cpu_model()}
    return out | (storage_read(probe) if probe else {})
