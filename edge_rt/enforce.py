"""`--enforce`: hold the memory budget the way a real board does, page cache included.

Where this process may create a child memory cgroup under its own (cgroup v1 or v2),
it makes one with limit = budget and moves itself in (v1: with its charges, so the
interpreter already resident counts). Elsewhere a watchdog thread samples the RSS and
ends the run, in one line, when it passes the budget. Only cgroups this process made
are ever written or removed; the child is removed on exit.

    with enforce(budget) as e:
        ...                       # the run
        e.stats()                 # {"enforced_by": "cgroup-v1", "cgroup_peak_bytes": ..., "cgroup_failcnt": 0}
"""
from __future__ import annotations

import atexit
import os
import sys
import threading
from pathlib import Path

from . import metrics
from .plan import format_size

ROOT = Path("/sys/fs/cgroup")


def own_cgroup(controller: str) -> tuple[Path, int] | None:
    """(folder, version) of this process's cgroup for a v1 controller, or its v2 cgroup."""
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        _, names, path = line.split(":", 2)
        if controller in names.split(","):
            return ROOT / controller / path.lstrip("/"), 1
    for line in lines:
        if line.startswith("0::") and (ROOT / "cgroup.controllers").exists():
            return ROOT / line[3:].lstrip("/"), 2
    return None


def cgroup_limit() -> tuple[int, int] | None:
    """(limit, usage) in bytes of the memory cgroup this process is in (v2 or v1), or
    None when there is no limit. The kernel kills a process of a cgroup over its
    limit outright, with no chance to say why: so the plan is checked against it."""
    found = own_cgroup("memory")
    if found is None:
        return None
    folder, version = found
    names = ("memory.max", "memory.current") if version == 2 else ("memory.limit_in_bytes", "memory.usage_in_bytes")
    try:
        limit, usage = ((folder / name).read_text().strip() for name in names)
    except OSError:
        return None
    return (int(limit), int(usage)) if limit.isdigit() and int(limit) < 1 << 62 else None  # v2 "max", v1 huge


class ChildCgroup:
    """A cgroup made under this process's own, with `settings` (file -> value) written
    before `pids` move in. close() moves them back and removes it."""

    def __init__(self, controller: str, settings: dict[str, str], optional: tuple[str, ...] = ()):
        found = own_cgroup(controller)
        if found is None:
            raise OSError(f"no {controller} cgroup")
        self.parent, self.version = found
        self.path = self.parent / f"edge-rt.{os.getpid()}.{controller}"
        self.path.mkdir()
        try:
            for key, value in settings.items():
                try:
                    (self.path / key).write_text(value)
                except OSError:
                    if key not in optional:
                        raise
        except OSError:
            self.path.rmdir()
            raise
        self.members: list[int] = []

    def add(self, pid: int) -> None:
        (self.path / "cgroup.procs").write_text(str(pid))
        self.members.append(pid)

    def read(self, key: str) -> str | None:
        try:
            return (self.path / key).read_text()
        except OSError:
            return None

    def close(self) -> None:
        if not self.path.exists():
            return
        for pid in self.members:
            try:
                (self.parent / "cgroup.procs").write_text(str(pid))
            except OSError:  # the process has ended
                pass
        try:
            self.path.rmdir()
        except OSError:
            pass


def memory_cgroup(limit: int) -> ChildCgroup:
    """A child memory cgroup limited to `limit` bytes, swap excluded."""
    found = own_cgroup("memory")
    if found and found[1] == 2:
        return ChildCgroup("memory", {"memory.max": str(limit), "memory.swap.max": "0"}, optional=("memory.swap.max",))
    # v1: charges move with the process (3 = anonymous and mapped file pages)
    return ChildCgroup("memory", {"memory.move_charge_at_immigrate": "3", "memory.limit_in_bytes": str(limit),
                                  "memory.memsw.limit_in_bytes": str(limit)},
                       optional=("memory.move_charge_at_immigrate", "memory.memsw.limit_in_bytes"))


def cgroup_stats(cg: ChildCgroup) -> dict:
    if cg.version == 1:
        return {"cgroup_peak_bytes": int(cg.read("memory.max_usage_in_bytes") or 0),
                "cgroup_failcnt": int(cg.read("memory.failcnt") or 0)}
    events = dict(line.split() for line in (cg.read("memory.events") or "").splitlines())
    return {"cgroup_peak_bytes": int(cg.read("memory.peak") or 0), "cgroup_failcnt": int(events.get("max", 0))}


class Watchdog:
    """Samples VmRSS every `period` seconds; past the budget the run ends in one line."""

    def __init__(self, budget: int, period: float = 0.005):
        self.budget, self.period, self.peak = budget, period, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="edge-rt-watchdog", daemon=True)
        self._thread.start()

    def _watch(self) -> None:
        while not self._stop.wait(self.period):
            rss = metrics.rss_bytes()
            self.peak = max(self.peak, rss)
            if rss > self.budget:
                sys.stderr.write(f"edge-rt: error: resident memory {format_size(rss)} passed --mem-budget "
                                 f"{format_size(self.budget)} (--enforce watchdog)\n")
                sys.stderr.flush()
                os._exit(1)

    def close(self) -> None:
        self._stop.set()


class Enforcement:
    def __init__(self, budget: int):
        self.budget, self.cgroup, self.watchdog = budget, None, None
        try:
            self.cgroup = memory_cgroup(budget)
            self.cgroup.add(os.getpid())
            self.kind = f"cgroup-v{self.cgroup.version}"
        except OSError:
            if self.cgroup is not None:  # made, but this process may not move in: remove it
                self.cgroup.close()
                self.cgroup = None
            self.watchdog, self.kind = Watchdog(budget), "rss-watchdog"
        atexit.register(self.close)

    def stats(self) -> dict:
        if self.cgroup:
            return {"enforced_by": self.kind} | cgroup_stats(self.cgroup)
        return {"enforced_by": self.kind, "watchdog_peak_rss_bytes": max(self.watchdog.peak, metrics.peak_rss_bytes())}

    def close(self) -> None:
        if self.cgroup:
            self.cgroup.close()
        if self.watchdog:
            self.watchdog.close()

    def __enter__(self) -> "Enforcement":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def enforce(budget: int) -> Enforcement:
    return Enforcement(budget)
