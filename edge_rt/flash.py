"""Weights the budget cannot keep resident, read from storage layer by layer.

The plan (plan.py) streams layers 0..m-1 and keeps the rest resident. Streamed layers'
matrices are read with pread (O_DIRECT where the filesystem allows, else buffered reads
whose pages are dropped at once with POSIX_FADV_DONTNEED) into ONE preallocated pool
of min(2, m) slots; a background thread reads the next streamed layer into the free
slot while the current one computes (and, once the last streamed layer has computed, the
next token's second one into its slot), and the head's first chunks (a streamed head)
while the layers compute. Reads go in aligned pieces of at least PIECE bytes, up to DEPTH
at once, into transparent huge pages (so each piece is one large device request: on a
virtual disk the number of requests, not bytes, sets the speed). Streamed weights are
never mmapped, so the page cache does not grow behind the budget. Everything else
(embedding/output head, norms, resident layers) is read once into an anonymous arena,
so after loading nothing of the file is touched through the mmap, and a file truncated
or replaced while streaming ends in one EdgeRtError instead of a SIGBUS.

The forward pass calls `W.begin_layer(i)` at the start of layer i; from then on the
kernels.Weight objects of layer i point at its bytes in the pool (their C descriptors
are rewritten in place, so code that kept the Weight objects, or their descriptor
addresses, sees the change)."""
from __future__ import annotations

import ctypes
import mmap
import os
import re
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass

import numpy as np
from gguf import GGMLQuantizationType as T

from . import kernels
from .errors import EdgeRtError
from .gguf_file import GGUFFile, os_message, short
from .verify import crc32, damaged, mismatch, mismatches, usable
from .weights import Weights, is_matrix, tensor_format

ALIGN = 4096            # O_DIRECT: file offset, length and buffer address are multiples of this
CHUNK = 4 << 20         # buffered reads go in chunks, each dropped from the page cache after
ARENA_ALIGN = 64        # resident tensors start on a cache line in the arena
HEAD_BUFFER = 4 << 20   # a streamed output head / embedding table is read into two halves of this, one
                        # chunk by the I/O thread while the product runs over the other
DEPTH = 2               # preads in flight: a read is split into pieces read by up to this many threads at once
PIECE = 2 << 20         # ... each piece at least this long: on a virtual disk a request's cost barely depends
                        # on its size, so few large ones beat many small (BENCHMARKS.md, bench_read.py)
HUGE = 2 << 20          # a transparent huge page: the pool and the arena are made of them where the kernel allows
THREAD_BYTES = 1 << 20  # what streaming adds beyond the pool: the I/O threads' stacks and malloc
                        # arenas, the slots' descriptors (measured ~0.5 MiB on SmolLM2 with one thread)
_LAYER = re.compile(r"blk\.(\d+)\.")
_DTYPES = {T.F32: np.float32, T.F16: np.float16, T.I8: np.int8, T.I16: np.int16, T.I32: np.int32}


def _down(x: int) -> int:
    return x // ALIGN * ALIGN


def _up(x: int) -> int:
    return -(-x // ALIGN) * ALIGN


# -- which bytes stream ------------------------------------------------------------
def streamable(g: GGUFFile, name: str) -> int | None:
    """The layer whose matrix (with its .scale/.min) this tensor belongs to, else None:
    norms and biases are a few KiB and always stay resident."""
    m = _LAYER.match(name)
    if not m:
        return None
    base = name.removesuffix(".scale").removesuffix(".min")
    return int(m.group(1)) if base in g.tensors and is_matrix(g, base) else None


EMBD, OUTPUT = "token_embd.weight", "output.weight"
HEAD = (EMBD, OUTPUT)  # the embedding table and the output head (or the tied table)


def is_head(name: str) -> bool:
    return name.removesuffix(".scale").removesuffix(".min") in HEAD


def output_name(g: GGUFFile) -> str:
    """The matrix the output head multiplies by: output.weight, or the tied table."""
    return OUTPUT if OUTPUT in g.tensors else EMBD


def matrix_parts(g: GGUFFile, name: str) -> list:
    """The tensors of matrix `name`: its codes, and our formats' .scale and .min."""
    return [g.tensors[n] for n in (name, name + ".scale", name + ".min") if n in g.tensors]


def head_parts(g: GGUFFile) -> list:
    """The output head's tensors."""
    return matrix_parts(g, output_name(g))


def row_bytes(parts) -> int:
    """Bytes of one row of a matrix stored as these tensors (one row of each)."""
    return sum(t.nbytes // t.shape[0] for t in parts)


def residency(g: GGUFFile, streamed: int, head: bool = False) -> tuple[list, list]:
    """(resident, streamed) tensors, in file order, when layers 0..streamed-1 stream
    (and, with head, the embedding table and output head)."""
    names = sorted(g.tensors.values(), key=lambda t: t.offset)
    out = [t for t in names if (head and is_head(t.name)) or
           ((i := streamable(g, t.name)) is not None and i < streamed)]
    return [t for t in names if t not in out], out


@dataclass(frozen=True)
class Layout:
    """Byte counts the planner needs: per layer, its streamable bytes and the aligned
    file span one read of them covers; everything else."""
    layer_bytes: tuple[int, ...]
    span: tuple[tuple[int, int], ...]   # aligned [start, end) in the file, per layer
    head_bytes: int                     # the embedding table and output head
    total_bytes: int
    row_crc_bytes: int                  # an untied embedding table's per-row CRC-32s, kept when the head streams
    out_rows: int = 0                   # rows of the output head (the tied table, or output.weight)
    out_row_bytes: int = 1              # bytes of one of its rows (codes, scale and min)

    @classmethod
    def of(cls, g: GGUFFile, n_layers: int) -> "Layout":
        nbytes = [0] * n_layers
        lo, hi = [g.size] * n_layers, [0] * n_layers
        for t in g.tensors.values():
            i = streamable(g, t.name)
            if i is None or i >= n_layers:
                continue
            nbytes[i] += t.nbytes
            lo[i], hi[i] = min(lo[i], t.offset), max(hi[i], t.offset + t.nbytes)
        head = sum(t.nbytes for t in g.tensors.values() if is_head(t.name))
        total = sum(t.nbytes for t in g.tensors.values())
        row_crcs = 4 * g.tensors[EMBD].shape[0] if EMBD in g.tensors and OUTPUT in g.tensors else 0
        out = head_parts(g)
        rows = out[0].shape[0] if out else 0
        return cls(tuple(nbytes), tuple((_down(a), _up(b)) for a, b in zip(lo, hi)), head, total, row_crcs,
                   rows, row_bytes(out) if rows else 1)

    def slot_bytes(self, streamed: int) -> int:
        return max((b - a for a, b in self.span[:streamed]), default=0)

    def pool_bytes(self, streamed: int, head: bool = False) -> int:
        return (min(2, streamed) * self.slot_bytes(streamed) + (HEAD_BUFFER + self.row_crc_bytes if head else 0)
                + (THREAD_BYTES if streamed or head else 0))

    def streamed_bytes(self, streamed: int, head: bool = False, head_rows: int = 0) -> int:
        """With head, all of the embedding table and output head but the head's first
        head_rows rows."""
        return sum(self.layer_bytes[:streamed]) + (self.head_bytes - head_rows * self.out_row_bytes if head else 0)

    def resident_bytes(self, streamed: int, head: bool = False, head_rows: int = 0) -> int:
        return self.total_bytes - self.streamed_bytes(streamed, head, head_rows)


# -- reading -----------------------------------------------------------------------
class Reader:
    """pread of a GGUF file that survives short reads and EINTR, prefers O_DIRECT, and
    notices the file being truncated, rewritten or replaced. The spans of one call are
    cut into aligned pieces of at least PIECE bytes, read by up to `depth` threads at
    once (the calling thread among them), so the device has more than one request in
    flight."""

    def __init__(self, path, max_read: int | None = None, depth: int = DEPTH):
        self.path, self.max_read = path, max_read  # max_read: cap each syscall (tests)
        self.depth = depth
        self.fan = ThreadPoolExecutor(depth - 1, thread_name_prefix="edge-rt-read") if depth > 1 else None
        try:
            self.fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as e:
            raise EdgeRtError(f"{short(path)}: {os_message(e)}") from None
        os.posix_fadvise(self.fd, 0, 0, os.POSIX_FADV_RANDOM)  # no readahead: it would cache pages past each read
        st = os.fstat(self.fd)
        self.identity = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
        self.direct_fd = self._open_direct()
        self.bytes_read = 0

    def _open_direct(self) -> int | None:
        """An O_DIRECT descriptor if this filesystem honours one (tmpfs does not)."""
        flag = getattr(os, "O_DIRECT", 0)
        if not flag:
            return None
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC | flag)
        except OSError:
            return None
        probe = mmap.mmap(-1, ALIGN)
        try:
            os.preadv(fd, [memoryview(probe)], 0)
            return fd
        except OSError:
            os.close(fd)
            return None
        finally:
            probe.close()

    @property
    def direct(self) -> bool:
        return self.direct_fd is not None

    def check_unchanged(self) -> None:
        try:
            st, now = os.fstat(self.fd), os.stat(self.path)
        except OSError as e:
            raise EdgeRtError(f"{short(self.path)}: model file vanished while streaming weights: {os_message(e)}") from None
        if (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns) != self.identity or (now.st_dev, now.st_ino) != self.identity[:2]:
            raise EdgeRtError(f"{short(self.path)}: model file was truncated, rewritten or replaced while streaming "
                              f"weights; run again")

    def read(self, view: memoryview, offset: int, need: int) -> None:
        """Fill view (at least its first `need` bytes) from file byte `offset`."""
        self.read_spans([(view, offset, need)])

    def read_spans(self, spans: list[tuple[memoryview, int, int]]) -> None:
        """read() each (view, offset, need), all of them at once."""
        self.check_unchanged()
        pieces = []
        for view, offset, need in spans:
            step = max(_up(-(-len(view) // self.depth)), PIECE)
            pieces += [(view[a:a + step], offset + a, min(step, need - a))
                       for a in range(0, min(need, len(view)), step)]
        queue, lock = iter(pieces), threading.Lock()

        def drain() -> int:  # read pieces until none is left; bytes read
            done = 0
            while True:
                with lock:
                    piece = next(queue, None)
                if piece is None:
                    return done
                done += self._read(*piece)
        helpers = [self.fan.submit(drain) for _ in range(min(self.depth, len(pieces)) - 1)] if self.fan else []
        try:
            done = drain()
        finally:  # every piece finished (or failed) before the caller may reuse a view
            wait(helpers)
        self.bytes_read += done + sum(f.result() for f in helpers)

    def _read(self, view: memoryview, offset: int, need: int) -> int:
        done = 0
        while done < need:
            pos = offset + done
            direct = self.direct and pos % ALIGN == 0 and (len(view) - done) % ALIGN == 0 and \
                ctypes.addressof(ctypes.c_char.from_buffer(view, done)) % ALIGN == 0
            size = len(view) - done if direct else min(CHUNK, need - done)
            if self.max_read:
                size = min(size, self.max_read)
            try:
                n = os.preadv(self.direct_fd if direct else self.fd, [view[done:done + size]], pos)
            except InterruptedError:  # Python retries EINTR itself (PEP 475); a handler's exception lands here
                continue
            except OSError as e:
                raise EdgeRtError(f"{short(self.path)}: cannot read weights at byte {pos}: {os_message(e)}") from None
            if n == 0:
                raise EdgeRtError(f"{short(self.path)}: model file ends at byte {pos}, expected {offset + need}: "
                                  f"truncated while streaming weights")
            if not direct:
                os.posix_fadvise(self.fd, pos, n, os.POSIX_FADV_DONTNEED)
            done += n
        return done

    def close(self) -> None:
        if self.fan:
            self.fan.shutdown()
        for fd in (self.fd, self.direct_fd):
            if fd is not None:
                os.close(fd)
        self.fd = self.direct_fd = None


def _anonymous(nbytes: int) -> memoryview:
    """Page-aligned private anonymous memory, every page written now (resident from the
    start, as the plan counts it), of transparent huge pages where the kernel has them.
    An O_DIRECT read into 4 KiB pages is cut into requests of at most max_segments pages
    (254 on virtio: ~1 MiB); into 2 MiB pages, one request carries up to max_sectors_kb.
    On this VM's disk that is 1 GB/s against 5 GB/s (BENCHMARKS.md, bench_read.py). (A
    MAP_SHARED mapping, Python's default, is shmem: never huge pages here.)"""
    huge = nbytes >= HUGE and hasattr(mmap, "MADV_HUGEPAGE")
    m = mmap.mmap(-1, max(nbytes, 1) + (HUGE if huge else 0), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    at = -ctypes.addressof(ctypes.c_char.from_buffer(m)) % HUGE if huge else 0
    if huge:
        try:  # only [at, at + nbytes): the mapping's unused tail never gets a huge page
            m.madvise(mmap.MADV_HUGEPAGE, at, nbytes)
        except OSError:  # a kernel without transparent huge pages
            pass
    view = memoryview(m)[at:at + max(nbytes, 1)]
    np.frombuffer(view, np.uint8)[::mmap.PAGESIZE] = 0
    return view


def _retarget(w: kernels.Weight, src: kernels.Weight) -> None:
    """Point w's C descriptor (and its arrays) where src's point: same object, new bytes."""
    ctypes.memmove(w._ref, src._ref, ctypes.sizeof(w._c))
    w.parts, w._arrays = src.parts, src._arrays


def _row_crc(w: kernels.Weight, i: int) -> int:
    """CRC-32 of row i of w, its parts (codes, scale, min) one after the other."""
    c = 0
    for part in w.parts.values():
        c = crc32(np.ascontiguousarray(part[i]), c)
    return c


class StreamedWeights(Weights):
    """Weights with layers 0..streamed-1 read from storage into a pool at begin_layer;
    with head, the embedding table's rows are read on demand and the output head in
    chunks of HEAD_BUFFER / 2 bytes at every product, but for its first head_rows rows,
    kept resident in the arena (of a tied table, embedding rows too)."""

    def __init__(self, g: GGUFFile, threads: int, layout: Layout, streamed: int, head: bool = False,
                 head_rows: int = 0, reader: Reader | None = None, verify: bool = False):
        self.layout, self.streamed, self.head = layout, streamed, head
        self.out, self.head_rows = output_name(g), head_rows if head else 0
        self.reader = reader or Reader(g.path)
        # verify: the arena's tensors are checked against their stored CRC-32 once, a
        # streamed layer's every time it is read (in the I/O thread, beside the compute)
        self.want = usable(g) if verify else {}
        self.check_seconds = 0.0  # spent computing checksums of streamed bytes
        resident_names, streamed_names = residency(g, streamed, head)
        # the arena: every resident tensor, read once
        # and the first head_rows rows of each part of the output head
        prefix = {t.name: self.head_rows * row_bytes([t]) for t in head_parts(g)} if self.head_rows else {}
        where, size, nbytes = {}, 0, {t.name: t.nbytes for t in resident_names} | prefix
        for name, n in nbytes.items():
            where[name] = size
            size += -(-n // ARENA_ALIGN) * ARENA_ALIGN
        self.arena = _anonymous(size)
        for name, n in nbytes.items():
            self.reader.read(memoryview(self.arena)[where[name]:where[name] + n], g.tensors[name].offset, n)
        damaged(g, mismatches(g, [t.name for t in resident_names if t.name in self.want], self.want, threads,
                              lambda n: memoryview(self.arena)[where[n]:where[n] + g.tensors[n].nbytes]))
        # the resident rows' CRC-32, where each head pass's running CRC of its part starts
        # (the pass checks prefix and streamed rows together against the stored CRC)
        self.head_crc0 = {name: crc32(memoryview(self.arena)[where[name]:where[name] + n])
                          for name, n in prefix.items() if name in self.want}
        # the pool: slot s holds one streamed layer's span
        self.slot_bytes = layout.slot_bytes(streamed)
        self.n_slots = min(2, streamed)
        self.pool = _anonymous(self.n_slots * self.slot_bytes)
        self.head_buffer = _anonymous(HEAD_BUFFER if head else 0)

        def view(buf, offset, t, rows=None):  # (the first `rows` rows of) tensor t at buf[offset:]
            dtype, rows = _DTYPES[t.ggml_type], t.shape[0] if rows is None else rows
            return np.frombuffer(buf, dtype, row_bytes([t]) * rows // np.dtype(dtype).itemsize,
                                 offset).reshape(rows, *t.shape[1:])

        def array(name, slot=0):
            t = g.tensors[name]
            if name in where and name not in prefix:
                return view(self.arena, where[name], t)
            if is_head(name):  # never read through the map: embed and linear read it with the reader
                return g.array(name)
            i = streamable(g, name)
            return view(self.pool, slot * self.slot_bytes + t.offset - layout.span[i][0], t)

        super().__init__(g, threads, array)
        if self.head_rows:
            _, parts, _, cols = tensor_format(g, self.out, lambda n: view(self.arena, where[n], g.tensors[n],
                                                                          self.head_rows))
            self.head_prefix = kernels.Weight(self.matrices[self.out].fmt, self.head_rows, cols, parts)
        # per streamed layer and slot, Weight objects over that slot; begin_layer copies
        # their descriptors into the layer's own Weight objects
        self.slot_views = {}
        for t in streamed_names:
            if t.name in self.matrices and not is_head(t.name):
                for s in range(self.n_slots):
                    fmt, parts, rows, cols = tensor_format(g, t.name, lambda n: array(n, s))
                    self.slot_views[streamable(g, t.name), s, t.name] = kernels.Weight(fmt, rows, cols, parts)
        self.layer_names = {i: [n for (j, s, n) in self.slot_views if j == i and s == 0] for i in range(streamed)}
        self.layer_tensors = {i: [(t.name, t.offset - layout.span[i][0], t.nbytes) for t in streamed_names
                                  if streamable(g, t.name) == i and t.name in self.want] for i in range(streamed)}
        self.in_slot = [None] * self.n_slots     # layer held by each slot
        self.current = 1 if self.n_slots == 2 else 0  # slot of the layer computing now
        self.pending: dict[int, tuple[int, Future]] = {}  # layer -> (slot, its read in the I/O thread)
        self.fresh = set()  # layers read into a slot and not used since
        self.io = ThreadPoolExecutor(1, thread_name_prefix="edge-rt-io")
        self.head_ahead: dict[int, Future] = {}  # chunk -> its read, started before the head pass
        # an embedding row read on demand is checked against its own CRC-32, taken here in
        # one pass that checks the whole table (untied tables; a tied table is read and
        # checked whole by the head pass of every token, so damage to it is caught there)
        self.row_crcs = self._row_crcs() if head and EMBD in self.want and OUTPUT in g.tensors else None

    def _load(self, layer: int, slot: int) -> None:
        a, b = self.layout.span[layer]
        need = min(b, self.g.size) - a
        at = slot * self.slot_bytes
        self.reader.read(memoryview(self.pool)[at:at + (b - a)], a, need)
        if self.want:
            t0, pool = time.perf_counter(), memoryview(self.pool)
            bad = [mismatch(name, got, self.want[name]) for name, off, n in self.layer_tensors[layer]
                   if (got := crc32(pool[at + off:at + off + n])) != self.want[name]]
            self.check_seconds += time.perf_counter() - t0
            damaged(self.g, bad)

    def _finish_pending(self, layer: int | None = None) -> None:
        """Wait for the read of `layer` (by default: every read) into its slot."""
        for j in [layer] if layer is not None else list(self.pending):
            slot, fut = self.pending.pop(j)
            fut.result()  # re-raises the reader's EdgeRtError here, in the forward pass
            self.in_slot[slot] = j
            self.fresh.add(j)

    def _read_ahead(self, layer: int, slot: int) -> None:
        """Have the I/O thread read `layer` into `slot` (free: its layer has computed),
        unless it is there already or on its way."""
        if layer not in self.in_slot and layer not in self.pending and \
                all(s != slot for s, _ in self.pending.values()):
            self.in_slot[slot] = None
            self.pending[layer] = (slot, self.io.submit(self._load, layer, slot))

    # -- the streamed head ------------------------------------------------------------
    def _part(self, name: str, key: str):
        """The tensor holding part `key` (codes, scale, min) of head matrix `name`."""
        return self.g.tensors[name + (f".{key}" if key in ("scale", "min") else "")]

    def _head_rows(self, name: str, r0: int, r1: int, at: int = 0) -> kernels.Weight:
        """Rows r0..r1-1 of a head matrix, read into the head buffer from byte `at` (each
        part's rows within the aligned span around them, so the read can bypass the page
        cache)."""
        w, parts, spans = self.matrices[name], {}, []
        for key in w.parts:
            t = self._part(name, key)
            row = row_bytes([t])
            start, n = t.offset + r0 * row, (r1 - r0) * row
            a, b = _down(start), _up(start + n)
            spans.append((self.head_buffer[at:at + b - a], a, min(b, self.g.size) - a))
            parts[key] = np.frombuffer(self.head_buffer[at + start - a:at + start - a + n],
                                       _DTYPES[t.ggml_type]).reshape(r1 - r0, -1)
            at += b - a
        self.reader.read_spans(spans)  # the parts' reads in flight together
        return kernels.Weight(w.fmt, r1 - r0, w.cols, parts)

    def _head_chunk(self, name: str) -> int:
        """Rows of a head matrix that fit half the head buffer at once (each of its up to
        three parts' spans widened to whole pages)."""
        return max(1, (HEAD_BUFFER // 2 - 3 * 2 * ALIGN) // row_bytes(matrix_parts(self.g, name)))

    def _head_chunks(self, name: str) -> list[tuple[int, int]]:
        """[first, end) rows of each chunk a pass over a head matrix reads."""
        rows, step = self.matrices[name].rows, self._head_chunk(name)
        return [(r, min(r + step, rows)) for r in range(self.head_rows if name == self.out else 0, rows, step)]

    def _read_chunk(self, name: str, chunks: list, k: int) -> Future:
        """Chunk k of a head pass, read by the I/O thread into half k % 2 of the head buffer."""
        return self.io.submit(self._head_rows, name, *chunks[k], k % 2 * (HEAD_BUFFER // 2))

    def _prefetch_head(self) -> None:
        """Start reading the output head's first two chunks (both halves of the head
        buffer) now, while the layers compute; the next head pass takes them."""
        chunks = self._head_chunks(self.out)
        self.head_ahead = {k: self._read_chunk(self.out, chunks, k) for k in range(min(2, len(chunks)))}

    def _settle_head(self) -> None:
        """Wait for the head's read-ahead (unused: no head pass followed) before the
        head buffer is written otherwise."""
        ahead, self.head_ahead = self.head_ahead, {}
        for f in ahead.values():
            f.result()

    def _head_pass(self, name: str):
        """(first row, Weight) of each chunk of the streamed rows of a head matrix (all
        of them, or those after the resident head_rows), in order, each read by the I/O
        thread into one half of the head buffer while the caller uses the chunk before
        it in the other half (the output head's first two: started by begin_layer);
        verified, each part's CRC-32 over the whole matrix (its resident rows' CRC, then
        the streamed rows', taken here while the next chunk is read) is checked at its end."""
        crcs = (dict(self.head_crc0) if name == self.out else {}) if self.want else None
        chunks = self._head_chunks(name)
        if name != self.out:
            self._settle_head()
        early, self.head_ahead = self.head_ahead, {}  # the chunks _prefetch_head started

        def read(k):
            return None if k >= len(chunks) else early.pop(k, None) or self._read_chunk(name, chunks, k)
        ahead = read(0)
        for k, (r, _) in enumerate(chunks):
            t0 = time.perf_counter()
            chunk = ahead.result()  # re-raises the reader's EdgeRtError here
            self.wait_seconds += time.perf_counter() - t0
            ahead = read(k + 1)
            if crcs is not None:
                t0 = time.perf_counter()
                for key, part in chunk.parts.items():
                    n = self._part(name, key).name
                    crcs[n] = crc32(part, crcs.get(n, 0))
                self.check_seconds += time.perf_counter() - t0
            yield r, chunk
        damaged(self.g, [mismatch(n, got, self.want[n]) for n, got in (crcs or {}).items()
                         if n in self.want and got != self.want[n]])

    def _row_crcs(self) -> np.ndarray:
        """The CRC-32 of every row of the embedding table, read once (and checked whole)."""
        out = np.zeros(self.matrices[EMBD].rows, np.uint32)
        for r, w in self._head_pass(EMBD):
            t0 = time.perf_counter()
            out[r:r + w.rows] = [_row_crc(w, i) for i in range(w.rows)]
            self.check_seconds += time.perf_counter() - t0
        return out

    def embed(self, tokens) -> np.ndarray:
        if not self.head:
            return super().embed(tokens)
        self._settle_head()
        out = []
        for r in np.asarray(tokens).reshape(-1):
            if r < self.head_rows and self.out == EMBD:  # a resident row of the tied table
                out.append(kernels.dequantize_rows(self.head_prefix, [r]))
                continue
            w = self._head_rows(EMBD, r, r + 1)
            if self.row_crcs is not None and (got := _row_crc(w, 0)) != self.row_crcs[r]:
                damaged(self.g, [mismatch(f"{EMBD} row {r}", got, int(self.row_crcs[r]))])
            out.append(kernels.dequantize_rows(w, [0]))
        return np.concatenate(out).reshape(*np.shape(tokens), -1)

    def linear(self, name: str, x: np.ndarray) -> np.ndarray:
        if not (self.head and is_head(name)):
            return super().linear(name, x)
        resident = [kernels.matmul(self.head_prefix, x, self.threads)] if self.head_rows and name == self.out else []
        return np.concatenate(resident + [kernels.matmul(w, x, self.threads) for _, w in self._head_pass(name)],
                              axis=-1)

    def begin_layer(self, i: int) -> None:
        self._stream_layer(i)
        if self.head and i == max(self.streamed - 1, 0) and not self.head_ahead:  # queued after the next layer's read
            self._prefetch_head()

    def _stream_layer(self, i: int) -> None:
        if i >= self.streamed:
            if i == self.streamed >= 2:  # the last streamed layer has computed: its slot takes the next token's second
                self._read_ahead(1, self.current)  # (the first is read into the other since that layer began)
            return
        t0 = time.perf_counter()
        if i in self.pending:
            self._finish_pending(i)
        if i not in self.in_slot:
            self._finish_pending()
            slot = (self.current + 1) % self.n_slots
            self.in_slot[slot] = None
            self._load(i, slot)
            self.in_slot[slot] = i
            self.fresh.add(i)
        self.wait_seconds += time.perf_counter() - t0
        self.layer_uses += 1
        if i in self.fresh:
            self.fresh.discard(i)
        else:  # still in its slot from its last use (one or two streamed layers)
            self.layer_hits += 1
        self.current = self.in_slot.index(i)
        for name in self.layer_names[i]:
            _retarget(self.matrices[name], self.slot_views[i, self.current, name])
        nxt = (i + 1) % self.streamed  # after the last streamed layer: the first, for the next token
        if nxt != i:
            self._read_ahead(nxt, (self.current + 1) % self.n_slots)
