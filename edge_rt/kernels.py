"""ctypes binding of the C kernel library (libedgert.so, built from kernels_c/).

    w = Weight(fmt, rows, cols, parts)      # parts = fmt.quantize(W), or memmaps of a file
    y = matmul(w, x, threads=2)             # x [n, cols] or [cols] -> [n, rows] or [rows]
    e = dequantize_rows(w, token_ids)       # [k, cols] float32 (embedding lookup)

The C side knows arrays, shapes and a format id (formats.FORMAT_IDS); its arithmetic
is formats.matmul_reference and formats.<fmt>.dequantize.
"""
from __future__ import annotations

import ctypes
import functools
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import formats

__all__ = ["Weight", "matmul", "bind_matmul", "BoundMatmul", "dequantize_rows", "kernel_name", "cpu_features", "layer_isa", "force_isa",
           "max_threads", "KernelError", "library_path"]

_LIBNAME = {"win32": "edgert.dll", "darwin": "libedgert.dylib"}.get(sys.platform, "libedgert.so")
_ERRORS = {-1: "invalid argument", -2: "unknown format", -3: "bad shape (cols or group size)",
           -4: "row index out of range", -5: "out of memory", -6: "instruction set unavailable"}


class KernelError(RuntimeError):
    pass


def _candidates():
    env = os.environ.get("EDGERT_LIB")
    if env:
        yield Path(env)
    here = Path(__file__).resolve().parent
    yield here / _LIBNAME
    # editable installs (scikit-build-core) keep the python sources in the repo and the
    # built library in site-packages/edge_rt: look through the package's search path
    for p in list(getattr(sys.modules.get(__package__ or "edge_rt"), "__path__", [])):
        yield Path(p) / _LIBNAME
    try:
        from importlib.resources import files
        yield Path(str(files(__package__ or "edge_rt") / _LIBNAME))
    except Exception:  # pragma: no cover - depends on the install layout
        pass
    import sysconfig
    for key in ("platlib", "purelib"):
        yield Path(sysconfig.get_paths()[key]) / "edge_rt" / _LIBNAME


def library_path() -> Path:
    env = os.environ.get("EDGERT_LIB")
    if env and not Path(env).is_file():
        raise KernelError(f"EDGERT_LIB={env} is not a file")
    tried = []
    for p in _candidates():
        if p.is_file():
            return p
        tried.append(str(p))
    raise KernelError(
        f"{_LIBNAME} not found (looked in: {', '.join(dict.fromkeys(tried))}). Build it with "
        "`pip install --no-build-isolation -e .` in the repository, or set EDGERT_LIB.")


class _CWeight(ctypes.Structure):
    _fields_ = [("format", ctypes.c_int), ("rows", ctypes.c_int), ("cols", ctypes.c_int),
                ("group_size", ctypes.c_int), ("data", ctypes.c_void_p),
                ("scale", ctypes.c_void_p), ("min", ctypes.c_void_p)]


_lib = None


def _load():
    global _lib
    if _lib is not None:
        return _lib
    lib = ctypes.CDLL(str(library_path()))
    vp, ci = ctypes.c_void_p, ctypes.c_int
    lib.ert_matmul.argtypes = [vp, vp, ci, vp, ci]
    lib.ert_matmul_many.argtypes = [ci, vp, vp, ci, vp, ci]
    lib.ert_matmul.restype = ci
    lib.ert_dequantize_rows.argtypes = [vp, ci, ci, vp]
    lib.ert_dequantize_rows.restype = ci
    lib.ert_dequantize_gather.argtypes = [vp, vp, ci, vp]
    lib.ert_dequantize_gather.restype = ci
    lib.ert_kernel_name.argtypes = [ci]
    lib.ert_kernel_name.restype = ctypes.c_char_p
    lib.ert_cpu_features.argtypes = []
    lib.ert_cpu_features.restype = ctypes.c_char_p
    lib.ert_layer_isa.argtypes = []
    lib.ert_layer_isa.restype = ctypes.c_char_p
    lib.ert_force_isa.argtypes = [ctypes.c_char_p]
    lib.ert_force_isa.restype = ci
    lib.ert_weight_nbytes.argtypes = [vp]
    lib.ert_weight_nbytes.restype = ctypes.c_size_t
    lib.ert_rmsnorm.argtypes = [vp, ci, ci, vp, ctypes.c_float, vp]
    lib.ert_rmsnorm.restype = ci
    lib.ert_max_threads.argtypes = []
    lib.ert_max_threads.restype = ci
    _lib = lib
    return lib


def _check(rc: int, what: str) -> None:
    if rc != 0:
        raise KernelError(f"{what}: {_ERRORS.get(rc, 'error')} ({rc})")


def _addr(a: np.ndarray) -> int:
    return a.__array_interface__["data"][0]


_VIEWS = {np.dtype(np.uint8): (np.uint8, np.int8), np.dtype(np.float16): (np.float16, np.uint16),
          np.dtype(np.float32): (np.float32,)}


def _part(parts, key, dtype, shape, name):
    a = parts[key]
    if not isinstance(a, np.ndarray):
        raise TypeError(f"{name}: part {key!r} must be a numpy array, got {type(a).__name__}")
    dtype = np.dtype(dtype)
    if a.dtype not in [np.dtype(t) for t in _VIEWS[dtype]]:
        raise TypeError(f"{name}: part {key!r} has dtype {a.dtype}, expected {dtype}")
    if tuple(a.shape) != tuple(shape):
        raise ValueError(f"{name}: part {key!r} has shape {a.shape}, expected {tuple(shape)}")
    if not a.flags.c_contiguous:
        raise ValueError(f"{name}: part {key!r} must be C-contiguous (the kernels never copy weights)")
    return a


@dataclass(eq=False)
class Weight:
    """A weight matrix W[rows, cols] in format `fmt` (formats.F32 / F16 / GroupQuant),
    stored as `parts` (the dict of fmt.quantize(W); arrays may be read-only memmaps,
    they are referenced, never copied). The C descriptor is built once, here."""
    fmt: object
    rows: int
    cols: int
    parts: dict
    _c: _CWeight = field(init=False, repr=False)
    _arrays: tuple = field(init=False, repr=False)

    def __post_init__(self):
        rows, cols, fmt = int(self.rows), int(self.cols), self.fmt
        self.rows, self.cols = rows, cols
        name = getattr(fmt, "name", "?")
        if isinstance(fmt, formats.GroupQuant):
            fmt.check_shape(cols)
            ng = fmt.groups(cols)
            codes = _part(self.parts, "codes", np.uint8, (rows, cols * fmt.bits // 8), name)
            scale = _part(self.parts, "scale", np.float16, (rows, ng), name)
            mn = _part(self.parts, "min", np.float16, (rows, ng), name)
            self._arrays = (codes, scale, mn)
            self._c = _CWeight(fmt.id, rows, cols, fmt.group_size, _addr(codes), _addr(scale), _addr(mn))
        elif isinstance(fmt, (formats.F32, formats.F16)):
            dt = np.float16 if isinstance(fmt, formats.F16) else np.float32
            data = _part(self.parts, "", dt, (rows, cols), name)
            self._arrays = (data,)
            self._c = _CWeight(fmt.id, rows, cols, 0, _addr(data), None, None)
        else:
            raise TypeError(f"unsupported weight format {fmt!r}")
        self._ref = ctypes.addressof(self._c)

    @classmethod
    def from_float(cls, fmt, w: np.ndarray) -> "Weight":
        w = np.asarray(w, dtype=np.float32)
        return cls(fmt, w.shape[0], w.shape[1], fmt.quantize(w))

    @property
    def nbytes(self) -> int:
        return int(_load().ert_weight_nbytes(self._ref))


_F32 = np.dtype(np.float32)
_from_buffer = ctypes.c_char.from_buffer


def _ptr(a: np.ndarray) -> int:
    """Address of a C-contiguous array's data. (ctypes.from_buffer is several times
    faster than __array_interface__ but needs a writable, non-empty buffer.)"""
    try:
        return ctypes.addressof(_from_buffer(a))
    except (TypeError, ValueError, BufferError):
        return a.__array_interface__["data"][0]


def _prep_x(w: Weight, x) -> np.ndarray:
    if type(x) is not np.ndarray or x.dtype != _F32 or not x.flags.c_contiguous:
        x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim not in (1, 2) or x.shape[-1] != w.cols:
        raise ValueError(f"x has shape {x.shape}, expected [n, {w.cols}] or [{w.cols}]")
    return x


def _prep_out(shape, out):
    if out is None:
        return np.empty(shape, dtype=np.float32)
    if out.shape != shape or out.dtype != _F32 or not out.flags.c_contiguous:
        raise ValueError(f"out must be a C-contiguous float32 array of shape {shape}")
    return out


def matmul(w: Weight, x: np.ndarray, threads: int = 1, out: np.ndarray | None = None) -> np.ndarray:
    """y = x . W^T: x float32 [n, cols] (or [cols]) -> float32 [n, rows] (or [rows]).
    threads <= 0: all OpenMP threads. `out` (float32, C-contiguous, right shape) is
    filled instead of allocating."""
    lib = _lib or _load()
    x = _prep_x(w, x)
    n = 1 if x.ndim == 1 else x.shape[0]
    out = _prep_out((w.rows,) if x.ndim == 1 else (n, w.rows), out)
    if n and w.rows:
        rc = lib.ert_matmul(w._ref, _ptr(x), n, _ptr(out), threads)
        if rc:
            _check(rc, "ert_matmul")
    return out


def matmul_many(ws: list[Weight], x: np.ndarray, threads: int = 1) -> list[np.ndarray]:
    """[x . W^T for W in ws], up to 3 weights with the same cols (q, k, v): the input is
    prepared once and the products run in one parallel region when the weights take the
    same kind of input (ert_matmul_many); each result equals matmul(W, x)."""
    lib = _lib or _load()
    x = _prep_x(ws[0], x)
    if any(w.cols != ws[0].cols for w in ws):
        raise ValueError("matmul_many: the weights must have the same number of columns")
    n = 1 if x.ndim == 1 else x.shape[0]
    outs = [np.empty((w.rows,) if x.ndim == 1 else (n, w.rows), dtype=np.float32) for w in ws]
    refs = (ctypes.c_void_p * len(ws))(*[w._ref for w in ws])
    ptrs = (ctypes.c_void_p * len(ws))(*[o.__array_interface__["data"][0] for o in outs])
    if n:
        _check(lib.ert_matmul_many(len(ws), refs, _ptr(x), n, ptrs, threads), "ert_matmul_many")
    return outs


class BoundMatmul:
    """out = x . W^T on fixed buffers, with every argument converted once: the cheapest
    call for a decode loop that reuses its activation and output buffers.

        mm = bind_matmul(w, xbuf, outbuf, threads=2)
        xbuf[:] = h; mm()          # outbuf now holds h . W^T
    """

    __slots__ = ("w", "x", "out", "_call")

    def __init__(self, w: Weight, x: np.ndarray, out: np.ndarray | None = None, threads: int = 1):
        if type(x) is not np.ndarray or x.dtype != _F32 or not x.flags.c_contiguous:
            raise ValueError("bind_matmul needs x as a C-contiguous float32 array (it is not copied)")
        self.w, self.x = w, _prep_x(w, x)
        n = 1 if x.ndim == 1 else x.shape[0]
        self.out = _prep_out((w.rows,) if x.ndim == 1 else (n, w.rows), out)
        self._call = functools.partial(_load().ert_matmul, w._ref, _ptr(self.x), n, _ptr(self.out), int(threads))

    def __call__(self) -> np.ndarray:
        rc = self._call()
        if rc:
            _check(rc, "ert_matmul")
        return self.out


def bind_matmul(w: Weight, x: np.ndarray, out: np.ndarray | None = None, threads: int = 1) -> BoundMatmul:
    return BoundMatmul(w, x, out, threads)


def dequantize_rows(w: Weight, rows) -> np.ndarray:
    """float32 [k, cols]: the rows `rows` (a slice, an int, or an integer array) of W,
    bit-exact with fmt.dequantize."""
    lib = _lib or _load()
    if isinstance(rows, slice):
        start, stop, step = rows.indices(w.rows)
        if step == 1:
            k = max(0, stop - start)
            out = np.empty((k, w.cols), dtype=np.float32)
            if k:
                _check(lib.ert_dequantize_rows(w._ref, start, k, _ptr(out)), "ert_dequantize_rows")
            return out
        rows = np.arange(start, stop, step)
    idx = np.asarray(rows)
    if idx.size == 1 and idx.dtype.kind in "iu" and -w.rows <= idx.flat[0] < w.rows:  # one token: a slice, fewer calls
        i = int(idx.flat[0]) % w.rows
        out = dequantize_rows(w, slice(i, i + 1))
        return out[0] if idx.ndim == 0 else out
    if idx.dtype.kind not in "iu":
        raise TypeError(f"row indices must be integers, got {idx.dtype}")
    scalar = idx.ndim == 0
    idx = np.ascontiguousarray(idx.reshape(-1), dtype=np.int64)
    if idx.size and (idx.min() < -w.rows or idx.max() >= w.rows):
        raise IndexError(f"row index out of range for {w.rows} rows")
    idx = np.where(idx < 0, idx + w.rows, idx)
    out = np.empty((idx.size, w.cols), dtype=np.float32)
    if idx.size:
        _check(lib.ert_dequantize_gather(w._ref, _ptr(idx), idx.size, _ptr(out)), "ert_dequantize_gather")
    return out[0] if scalar else out


def rmsnorm(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
    """transformer.rmsnorm in C (the layer's: the sum of squares in double): rows of x
    (float32 [n, d] or [d]) times 1 / sqrt(mean(x^2) + eps), times w [d]. The runtime's
    final norm when every layer streams; otherwise ert_layers_forward applies the same C
    function in the resident layers' call (numpy calls right after it run on cold caches)."""
    lib = _lib or _load()
    if type(x) is not np.ndarray or x.dtype != _F32 or not x.flags.c_contiguous:
        x = np.ascontiguousarray(x, dtype=np.float32)
    d = x.shape[-1]
    if w.shape != (d,):
        raise ValueError(f"rmsnorm: w has shape {w.shape}, expected [{d}]")
    if w.dtype != _F32 or not w.flags.c_contiguous:  # a float16 norm vector
        w = np.ascontiguousarray(w, dtype=np.float32)
    out = np.empty_like(x)
    if x.size:
        _check(lib.ert_rmsnorm(_ptr(x), x.size // d, d, _addr(w), eps, _ptr(out)), "ert_rmsnorm")
    return out


def kernel_name(format_id: int) -> str:
    """The kernel ert_matmul uses for a format id, e.g. 'q4:avx2'."""
    return _load().ert_kernel_name(int(format_id)).decode()


def cpu_features() -> str:
    """CPU features detected by the library, e.g. 'avx avx2 fma f16c'."""
    return _load().ert_cpu_features().decode()


def layer_isa() -> str:
    """The instruction set of the layer's vector helpers (attention over the KV cache,
    softmax, GLU) in use: 'avx2', 'neon' or 'ref'."""
    return _load().ert_layer_isa().decode()


def force_isa(name: str) -> None:
    """'ref' / 'avx2' / 'neon' / 'neon-dotprod' to force an instruction set (tests),
    'auto' to go back to the best one. Raises KernelError if unavailable."""
    _check(_load().ert_force_isa(name.encode()), f"force_isa({name!r})")


def max_threads() -> int:
    return int(_load().ert_max_threads())
