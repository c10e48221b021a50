"""`edge-rt bench MODEL --simulate PROFILE`: a run on THIS host under a device profile's
memory and storage limits. It is a simulation: the CPU, its caches and the memory
bandwidth stay this host's; only the memory a run may use (a child memory cgroup at
the profile's app_memory_mib, page cache included) and the storage speed (a child
blkio cgroup throttling reads of the model's disk to the profile's MB/s and IOPS) are
the device's. The model file is dropped from the page cache first, so every byte the
run needs comes from the throttled disk. Cgroups are made under this process's own
(cgroup v1 blkio; memory v1 or v2) and removed afterwards."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from .enforce import ChildCgroup, cgroup_stats, memory_cgroup
from .errors import EdgeRtError
from .targets import profile as find_profile

CLI = [sys.executable, "-m", "edge_rt.cli"]


def disk_of(path) -> str:
    """'major:minor' of the whole disk holding path (blkio throttles disks, not partitions)."""
    dev = os.stat(path).st_dev
    node = Path(f"/sys/dev/block/{os.major(dev)}:{os.minor(dev)}")
    if (node / "partition").exists():
        return (node.resolve().parent / "dev").read_text().strip()
    return f"{os.major(dev)}:{os.minor(dev)}"


def drop_from_page_cache(path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def limits(prof: dict) -> dict:
    return {"memory_limit_bytes": prof["app_memory_mib"] << 20,
            "read_bps": int(prof["storage_read_mbps"] * 1e6) if prof.get("storage_read_mbps") else None,
            "read_iops": prof.get("storage_read_iops")}


def run_limited(argv: list[str], model, memory: int | None, read_bps: int | None, read_iops: int | None) -> dict:
    """Run argv (an edge-rt or peer command printing one JSON line last) inside fresh
    memory/blkio cgroups, the model dropped from the page cache first; its JSON plus
    the cgroup's peak, failcnt, exit status and wall time."""
    groups = []
    try:
        if memory:
            groups.append(memory_cgroup(memory))
        if read_bps or read_iops:
            disk = disk_of(model)
            settings = {}
            if read_bps:
                settings["blkio.throttle.read_bps_device"] = f"{disk} {read_bps}"
            if read_iops:
                settings["blkio.throttle.read_iops_device"] = f"{disk} {read_iops}"
            groups.append(ChildCgroup("blkio", settings))
    except OSError as e:
        for g in groups:
            g.close()
        raise EdgeRtError(f"cannot simulate here: this process may not create child cgroups ({e})") from None
    drop_from_page_cache(model)

    def enter():  # in the child, before exec: every byte it touches is charged and throttled
        for g in groups:
            (g.path / "cgroup.procs").write_text(str(os.getpid()))
    try:
        t = time.perf_counter()
        proc = subprocess.run(argv, capture_output=True, text=True, preexec_fn=enter)
        out = {"exit_status": proc.returncode, "wall_s": time.perf_counter() - t}
        lines = proc.stdout.strip().splitlines()
        if proc.returncode == 0 and lines:
            out |= json.loads(lines[-1])
        else:
            out["error"] = (proc.stderr.strip().splitlines() or ["killed"])[-1]
        if memory:
            out |= cgroup_stats(groups[0])
            out["oom_killed"] = proc.returncode in (-9, 137)
        return out
    finally:
        for g in groups:
            g.close()


def simulate(name: str, model, prompt: str, n: int, ctx: int, threads: int | None) -> dict:
    prof = find_profile(name, probe=model)
    lim = limits(prof) if name != "host" else {"memory_limit_bytes": None, "read_bps": None, "read_iops": None}
    threads = threads or min(prof.get("cores", 1), os.cpu_count() or 1)
    argv = [*CLI, "run", str(model), "-p", prompt, "-n", str(n), "--ctx", str(ctx), "--threads", str(threads), "--json"]
    if lim["memory_limit_bytes"]:
        argv += ["--mem-budget", str(lim["memory_limit_bytes"])]
    r = run_limited(argv, model, lim["memory_limit_bytes"], lim["read_bps"], lim["read_iops"])
    note = ("SIMULATION on this host: memory limit and storage throttle of the profile; CPU, caches and memory "
            "bandwidth are this host's, so speed is not the device's") if name != "host" else "this host, no limits"
    return {"simulation": name != "host", "profile": name, "profile_name": prof["name"], "note": note,
            "threads": threads} | lim | r
