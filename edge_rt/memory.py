"""Keep resident memory equal to live memory, so the plan can be checked against it."""
from __future__ import annotations

import ctypes
import ctypes.util

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
_done = False


def return_freed_memory() -> None:
    """glibc raises its mmap threshold each time a large block is freed, after which
    large arrays come from the heap and stay resident after they die (~90 MiB of a
    2k-token prefill). A fixed threshold sends them back to the kernel on free."""
    global _done
    if _done:
        return
    _done = True
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt(M_MMAP_THRESHOLD, 256 << 10)
        libc.mallopt(M_TRIM_THRESHOLD, 1 << 20)
    except (OSError, AttributeError):  # not glibc: musl and others return memory already
        pass


def cgroup_limit() -> tuple[int, int] | None:
    """(limit, usage) in bytes of the memory cgroup this process is in (v2 or v1), or
    None when there is no limit. The kernel kills a process of a cgroup over its
    limit outright, with no chance to say why: so the plan is checked against it."""
    try:
        lines = open("/proc/self/cgroup").read().splitlines()
    except OSError:
        return None
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controllers == "":  # v2
            files = f"/sys/fs/cgroup{path}/memory.max", f"/sys/fs/cgroup{path}/memory.current"
        elif "memory" in controllers.split(","):  # v1
            files = (f"/sys/fs/cgroup/memory{path}/memory.limit_in_bytes",
                     f"/sys/fs/cgroup/memory{path}/memory.usage_in_bytes")
        else:
            continue
        try:
            limit, usage = (open(f).read().strip() for f in files)
        except OSError:
            continue
        if limit.isdigit() and int(limit) < 1 << 62:  # v2 says "max", v1 a huge number
            return int(limit), int(usage)
    return None
