"""Keep resident memory equal to live memory, so the plan can be checked against it."""
from __future__ import annotations

import ctypes

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
_done = False


def return_freed_memory() -> None:
    """glibc raises its mmap threshold each time a large block is freed, after which
    large arrays come from the heap and stay resident after they die (~90 MiB of a
    2k-token prefill). A fixed threshold sends them back to the kernel on free.

    Process-wide, and not free: every array over 256 KiB is then mapped and faulted in
    anew, and numpy's element-wise work on 5 MB arrays ran 2-12x slower on this host
    (a converter's clip search 2x). So only a process that measures its memory against
    a plan sets it: the CLI's run, eval, bench and plan, and a Model given a budget."""
    global _done
    if _done:
        return
    _done = True
    try:
        libc = ctypes.CDLL(None)  # the C library the interpreter runs on (ctypes.util would load subprocess: ~1 MiB)
        libc.mallopt(M_MMAP_THRESHOLD, 256 << 10)
        libc.mallopt(M_TRIM_THRESHOLD, 1 << 20)
    except (OSError, AttributeError):  # not glibc: musl and others return memory already
        pass


def trim() -> None:
    """Hand the heap's free pages back to the kernel now: many small objects freed
    together (a 262k-token vocabulary's build: ~30 MiB) leave pages the trim threshold
    alone does not release, because live objects sit above them."""
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass
