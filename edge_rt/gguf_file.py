"""Read a GGUF file strictly: every count, length and offset is checked against the
file before anything is allocated, so a hostile file ends in one EdgeRtError.

Why not gguf.GGUFReader: it builds a numpy view per array element (40 s to open
Gemma-3's 262k-token vocabulary) and trusts the counts it reads. The `gguf` package
still supplies the type table, dequantization and the writer.
"""
from __future__ import annotations

import errno
import mmap
import os
import stat
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf.quants import dequantize as ggml_dequantize

from .errors import EdgeRtError

MAGIC = b"GGUF"
MAX_DIMS = 4
MAX_STRING = 16 << 20  # 16 MiB: no key, token or template is longer
MAX_DEPTH = 4  # nested arrays

# GGUF value types -> (struct code, numpy dtype)
_SCALARS = {0: ("<B", np.uint8), 1: ("<b", np.int8), 2: ("<H", np.uint16), 3: ("<h", np.int16),
            4: ("<I", np.uint32), 5: ("<i", np.int32), 6: ("<f", np.float32), 7: ("<?", np.bool_),
            10: ("<Q", np.uint64), 11: ("<q", np.int64), 12: ("<d", np.float64)}
_STRING, _ARRAY = 8, 9


@dataclass(frozen=True)
class Tensor:
    name: str
    shape: tuple[int, ...]  # numpy order (rows first): GGUF's ne reversed
    ggml_type: GGMLQuantizationType
    offset: int  # absolute, in the file
    nbytes: int

    @property
    def type_name(self) -> str:
        return self.ggml_type.name


class _Cursor:
    def __init__(self, buf, path):
        self.buf, self.pos, self.path = buf, 0, path

    def fail(self, what: str):
        raise EdgeRtError(f"{self.path}: not a valid GGUF file: {what} (at byte {self.pos})")

    def take(self, n: int) -> int:
        if n < 0 or self.pos + n > len(self.buf):
            self.fail("truncated")
        p, self.pos = self.pos, self.pos + n
        return p

    def scalar(self, vtype: int):
        code, _ = _SCALARS[vtype]
        return struct.unpack_from(code, self.buf, self.take(struct.calcsize(code)))[0]

    def string(self) -> str:
        n = self.scalar(10)
        if n > MAX_STRING:
            self.fail(f"string of {n} bytes")
        p = self.take(n)
        try:
            return bytes(self.buf[p:p + n]).decode("utf-8")
        except UnicodeDecodeError:
            self.fail("string is not UTF-8")

    def typed_value(self) -> tuple[Any, tuple[int, int | None]]:
        """A metadata value and its GGUF type: (value type, element type of an array)."""
        vtype = self.scalar(4)
        if vtype != _ARRAY:
            return self.value(vtype), (vtype, None)
        etype = struct.unpack_from("<I", self.buf, self.pos)[0] if self.pos + 4 <= len(self.buf) else None
        return self.value(vtype), (vtype, etype)

    def value(self, vtype: int, depth: int = 0) -> Any:
        if vtype in _SCALARS:
            return self.scalar(vtype)
        if vtype == _STRING:
            return self.string()
        if vtype != _ARRAY or depth >= MAX_DEPTH:
            self.fail(f"value type {vtype}")
        etype, count = self.scalar(4), self.scalar(10)
        if etype in _SCALARS:
            size = struct.calcsize(_SCALARS[etype][0])
            p = self.take(count * size)  # bounds-checked before any allocation
            return np.frombuffer(self.buf, dtype=_SCALARS[etype][1], count=count, offset=p).copy()
        if count > (len(self.buf) - self.pos) // 8:  # every string or array takes >= 8 bytes
            self.fail(f"array of {count} elements")
        return [self.value(etype, depth + 1) for _ in range(count)]


class GGUFFile:
    """An open GGUF file: `meta` (key -> value), `tensors` (name -> Tensor), and
    read-only numpy views of tensor data over one shared mmap."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_NONBLOCK)  # a FIFO must not block us
            try:
                st = os.fstat(fd)
                if stat.S_ISDIR(st.st_mode):
                    raise EdgeRtError(f"{short(self.path)}: is a folder, not a GGUF file")
                if not stat.S_ISREG(st.st_mode):
                    raise EdgeRtError(f"{short(self.path)}: not a regular file")
                size = st.st_size
                if size < 24:
                    raise EdgeRtError(f"{short(self.path)}: not a valid GGUF file: only {size} bytes")
                self._mm = mmap.mmap(fd, 0, access=mmap.ACCESS_READ)
            finally:
                os.close(fd)
        except OSError as e:
            raise EdgeRtError(f"{short(self.path)}: {os_message(e)}") from None
        self.size = size
        self._parse()
        try:  # the header's pages were read once into `meta`: out of this process's resident memory
            self._mm.madvise(mmap.MADV_DONTNEED, 0, self.data_start // mmap.PAGESIZE * mmap.PAGESIZE)
        except (AttributeError, OSError, ValueError):  # no madvise (not Linux), or a header under a page
            pass

    def _parse(self):
        c = _Cursor(self._mm, self.path)
        if bytes(self._mm[:4]) != MAGIC:
            c.fail("wrong magic (expected 'GGUF')")
        c.take(4)
        self.version = c.scalar(4)
        if self.version not in (2, 3):
            c.fail(f"unsupported GGUF version {self.version}")
        n_tensors, n_kv = c.scalar(10), c.scalar(10)
        if n_tensors > size_left(c) // 24 or n_kv > size_left(c) // 12:
            c.fail(f"{n_tensors} tensors and {n_kv} keys cannot fit in {self.size} bytes")
        self.meta: dict[str, Any] = {}
        self.types: dict[str, tuple[int, int | None]] = {}  # key -> (value type, array element type)
        self.value_offsets: dict[str, int] = {}  # key -> byte offset of its value type (writers patch values)
        for _ in range(n_kv):
            key = c.string()
            self.value_offsets[key] = c.pos
            self.meta[key], self.types[key] = c.typed_value()
        infos = []
        for _ in range(n_tensors):
            name, n_dims = c.string(), c.scalar(4)
            if not 1 <= n_dims <= MAX_DIMS:
                c.fail(f"tensor {name!r} has {n_dims} dimensions")
            ne = [c.scalar(10) for _ in range(n_dims)]
            type_id, offset = c.scalar(4), c.scalar(10)
            infos.append((name, ne, type_id, offset))
        align = self.meta.get("general.alignment", 32)
        if not isinstance(align, int) or align <= 0 or align & (align - 1):
            c.fail(f"alignment {align!r} is not a power of two")
        self.alignment = align
        self.data_start = -(-c.pos // align) * align
        self.tensors: dict[str, Tensor] = {}
        end_prev = 0
        for name, ne, type_id, offset in sorted(infos, key=lambda i: i[3]):
            try:
                qtype = GGMLQuantizationType(type_id)
            except ValueError:
                c.fail(f"tensor {name!r} has unknown type id {type_id}")
            block, type_size = GGML_QUANT_SIZES[qtype]
            if any(n <= 0 for n in ne) or ne[0] % block:
                c.fail(f"tensor {name!r} has bad dimensions {ne}")
            count = 1
            for n in ne:
                count *= n
            nbytes = count // block * type_size
            start = self.data_start + offset
            if offset % align or offset < end_prev or start + nbytes > self.size:
                c.fail(f"tensor {name!r} data (offset {offset}, {nbytes} bytes) is misaligned, "
                       f"overlaps another, or runs past the end of the file")
            if name in self.tensors:
                c.fail(f"tensor {name!r} appears twice")
            end_prev = offset + nbytes
            self.tensors[name] = Tensor(name, tuple(reversed(ne)), qtype, start, nbytes)

    # -- access ---------------------------------------------------------------------
    @property
    def arch(self) -> str:
        arch = self.meta.get("general.architecture")
        if not isinstance(arch, str):
            raise EdgeRtError(f"{self.path}: no general.architecture in the file")
        return arch

    def raw(self, name: str) -> np.ndarray:
        """The tensor's bytes, uint8 [rows..., bytes per row], a view of the mmap."""
        t = self.tensors[name]
        block, type_size = GGML_QUANT_SIZES[t.ggml_type]
        row_bytes = t.shape[-1] // block * type_size
        return np.frombuffer(self._mm, np.uint8, t.nbytes, t.offset).reshape(*t.shape[:-1], row_bytes)

    def array(self, name: str) -> np.ndarray:
        """A plain-typed tensor (F32, F16, I8, ...) as a numpy view of the mmap."""
        t = self.tensors[name]
        dtype = {GGMLQuantizationType.F32: np.float32, GGMLQuantizationType.F16: np.float16,
                 GGMLQuantizationType.I8: np.int8, GGMLQuantizationType.I16: np.int16,
                 GGMLQuantizationType.I32: np.int32}.get(t.ggml_type)
        if dtype is None:
            raise EdgeRtError(f"{self.path}: tensor {name} is {t.type_name}, not a plain array")
        return np.frombuffer(self._mm, dtype, t.nbytes // np.dtype(dtype).itemsize, t.offset).reshape(t.shape)

    def dequantize(self, name: str) -> np.ndarray:
        """Any ggml type -> float32 in numpy shape (gguf-py's dequantize, which matches
        ggml's to_float bit for bit: tests/test_dequant_ggml.py)."""
        t = self.tensors[name]
        if t.ggml_type == GGMLQuantizationType.F32:
            return np.array(self.array(name))
        return ggml_dequantize(self.raw(name), t.ggml_type).astype(np.float32, copy=False).reshape(t.shape)

    def populate(self) -> None:
        """Make every page of the file resident in this process now (weights the plan
        keeps in memory), rather than at first touch in the middle of a token."""
        try:
            self._mm.madvise(mmap.MADV_POPULATE_READ)
        except (AttributeError, OSError):  # before Linux 5.14: touch one byte a page
            np.frombuffer(self._mm, np.uint8)[::mmap.PAGESIZE].sum()

    def get(self, key: str, default=None):
        return self.meta.get(key, default)

    def require(self, key: str):
        if key not in self.meta:
            raise EdgeRtError(f"{self.path}: missing metadata key {key}")
        return self.meta[key]


def short(path, keep: int = 120) -> str:
    """A path for a one-line message: long ones are cut in the middle."""
    text = str(path)
    return text if len(text) <= keep else text[: keep // 2] + "..." + text[-keep // 2:]


def os_message(e: OSError) -> str:
    """'no such file', 'permission denied', ... for an OSError."""
    return {errno.ENOENT: "no such file", errno.EACCES: "permission denied", errno.EISDIR: "is a folder, not a file",
            errno.ENAMETOOLONG: "file name too long"}.get(e.errno, (e.strerror or str(e)).lower())


def size_left(c: _Cursor) -> int:
    return len(c.buf) - c.pos
