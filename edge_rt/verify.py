"""Tensor checksums: convert stores the CRC-32 of every tensor's bytes under
`edgert.checksum.<tensor>` (a uint32); `edge-rt verify` recomputes all of them, and
`run` recomputes those of the tensors it loads before the first token (a streaming run,
edge_rt/flash.py: those of its resident arena once, and those of every streamed layer
and streamed head each time they are read).

CRC-32 (zlib's) because it catches every single flipped byte and every burst of up to
32 bits; computed by zlib-ng (the same CRC-32, with the CPU's carry-less multiply or
CRC instructions: ~6 GB/s a core here against the standard library zlib's ~1.9, which
made it most of a streamed Gemma-3 token; it releases the GIL, so tensors are checked
on all threads at once)."""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

from zlib_ng import zlib_ng

from .errors import EdgeRtError
from .gguf_file import GGUFFile, short

CHECKSUM_KEY = "edgert.checksum."


def crc32(buf, start: int = 0) -> int:
    """CRC-32 of buf; of the bytes before it and buf, given start = the CRC of those."""
    return zlib_ng.crc32(buf, start)


def stored(g: GGUFFile) -> dict[str, object]:
    """tensor name -> the checksum the file carries for it."""
    return {k[len(CHECKSUM_KEY):]: v for k, v in g.meta.items() if k.startswith(CHECKSUM_KEY)}


def mismatch(name: str, got: int, want: int) -> str:
    return f"tensor {name}: checksum mismatch (data hashes to {got:08x}, the file says {want:08x}): the file is damaged"


def mismatches(g: GGUFFile, names, want: dict, threads: int = 1, raw=None) -> list[str]:
    """One line per tensor in `names` whose bytes (raw(name), default the file's map)
    do not hash to want[name]."""
    names, raw = list(names), raw or g.raw
    with ThreadPoolExecutor(max(threads, 1)) as ex:
        got = dict(zip(names, ex.map(lambda n: crc32(raw(n)), names)))
    return [mismatch(n, got[n], want[n]) for n in names if got[n] != want[n]]


def usable(g: GGUFFile) -> dict[str, int]:
    """tensor name -> its stored checksum, for the tensors of the file that carry one."""
    return {n: v for n, v in stored(g).items() if n in g.tensors and isinstance(v, int)}


def damaged(g: GGUFFile, bad: list[str]) -> None:
    """Raise the one-line error for these mismatch lines (none: return)."""
    if bad:
        raise EdgeRtError(f"{short(g.path)}: {bad[0]}"
                          + (f" (and {len(bad) - 1} more)" if len(bad) > 1 else "")
                          + f"; `edge-rt verify {short(g.path)}` lists every problem")


def problems(g: GGUFFile, threads: int = 1) -> list[str]:
    """Every problem with the file's checksums, one line each (empty: all match)."""
    want = stored(g)
    if not want:
        return ["carries no checksums (it was not written by edge-rt convert): nothing to verify"]
    out = [f"checksum for {n}: not a uint32 ({v!r})" for n, v in want.items() if not isinstance(v, int)]
    out += [f"checksum for {n}: no such tensor in the file" for n in want if n not in g.tensors]
    out += [f"tensor {n}: has no checksum" for n in g.tensors if n not in want]
    out += mismatches(g, [n for n in g.tensors if isinstance(want.get(n), int)], want, threads)
    return out


def check_loaded(g: GGUFFile, threads: int = 1) -> None:
    """For `run`: the tensors that carry a checksum must match it (a file from another
    tool has none and is not checked)."""
    want = usable(g)
    damaged(g, mismatches(g, want, want, threads))
