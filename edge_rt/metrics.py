"""What a run measures about itself: resident memory (now and peak, from /proc, since
psutil has no peak on Linux), memory available, and bytes read from storage."""
from __future__ import annotations

import re
from pathlib import Path


def _status(field: str) -> int:
    m = re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M)
    return int(m.group(1)) * 1024 if m else 0


def rss_bytes() -> int:
    return _status("VmRSS")


def peak_rss_bytes() -> int:
    """VmHWM: the most this process has ever had resident (mapped file pages included)."""
    return _status("VmHWM")


def available_bytes() -> int:
    """Memory the kernel can hand out without swapping: MemAvailable, the figure psutil
    reports on Linux, read here (psutil on the run path: ~2 MiB resident); psutil elsewhere."""
    try:
        m = re.search(r"^MemAvailable:\s+(\d+) kB", Path("/proc/meminfo").read_text(), re.M)
    except OSError:
        m = None
    if m:
        return int(m.group(1)) * 1024
    import psutil  # noqa: PLC0415
    return psutil.virtual_memory().available


def storage_read_bytes() -> int:
    """Bytes this process caused to be read from storage (page-cache hits excluded)."""
    try:
        m = re.search(r"^read_bytes:\s+(\d+)", Path("/proc/self/io").read_text(), re.M)
        return int(m.group(1)) if m else 0
    except OSError:
        return 0
