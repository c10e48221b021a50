"""Weight formats: one small class per format, quantize and dequantize in numpy.

A format stores a matrix W[rows, cols] row by row as a few arrays ("parts"). The C
kernels in kernels_c/ read the same bytes; a format's `id` is its value in
`enum ert_format` (kernels_c/include/edgert.h), and the C side agrees with
`dequantize` bit for bit.

Group-quantized formats (Q2, Q3, Q4, Q8), layout version FORMAT_VERSION:
  - each row is cut into groups of `group_size` columns (a multiple of 32; the last
    group of a row may be shorter), each with a scale d and a minimum m (float16):
        w = d * c + m,   c = clip(round((w - m) / d), 0, 2^bits - 1)
  - codes are stored in blocks of 32 columns. The bits of a code are split into
    sub-planes of widths PLANES[bits] (3 bits = a 2-bit plane and a 1-bit plane); a
    sub-plane of width w holds the block's 32 fields in 4*w bytes, field i at byte
    i % (4*w), bit offset w * (i // (4*w)). A code is sum(field_k << shift_k), shift_k
    being the sum of the widths before plane k. A block takes 4*bits bytes.
  - parts: "codes" uint8[rows, cols*bits/8], "scale" and "min" float16[rows, groups].
"""
from __future__ import annotations

import numpy as np

FORMAT_VERSION = 1
BLOCK = 32  # columns per code block
DEFAULT_GROUP_SIZE = 64  # columns per (scale, min) pair unless asked otherwise
PLANES = {1: (1,), 2: (2,), 3: (2, 1), 4: (4,), 8: (8,)}
# the values of enum ert_format in kernels_c/include/edgert.h
FORMAT_IDS = {"f32": 0, "f16": 1, "q1": 2, "q2": 3, "q3": 4, "q4": 5, "q8": 6}


class F32:
    id, name, bits = FORMAT_IDS["f32"], "f32", 32

    def quantize(self, w: np.ndarray) -> dict[str, np.ndarray]:
        return {"": np.ascontiguousarray(w, dtype=np.float32)}

    def dequantize(self, parts: dict[str, np.ndarray], cols: int) -> np.ndarray:
        return np.asarray(parts[""], dtype=np.float32)

    def nbytes(self, rows: int, cols: int) -> int:
        return 4 * rows * cols


class F16(F32):
    id, name, bits = FORMAT_IDS["f16"], "f16", 16

    def quantize(self, w):
        return {"": np.ascontiguousarray(w, dtype=np.float16)}

    def nbytes(self, rows, cols):
        return 2 * rows * cols


class GroupQuant:
    """Asymmetric round-to-nearest, one (scale, min) pair per group of columns."""

    def __init__(self, bits: int, group_size: int = DEFAULT_GROUP_SIZE):
        if bits not in PLANES:
            raise ValueError(f"no {bits}-bit format (have {sorted(PLANES)})")
        if group_size <= 0 or group_size % BLOCK:
            raise ValueError(f"group size must be a positive multiple of {BLOCK}, got {group_size}")
        self.bits, self.group_size = bits, group_size
        self.name = f"q{bits}"
        self.id = FORMAT_IDS[self.name]

    def groups(self, cols: int) -> int:
        return -(-cols // self.group_size)

    def nbytes(self, rows: int, cols: int) -> int:
        return rows * (cols * self.bits // 8 + 4 * self.groups(cols))

    def check_shape(self, cols: int) -> None:
        if cols % BLOCK:
            raise ValueError(f"{self.name} needs rows whose length is a multiple of {BLOCK}, got {cols}")

    # -- quantize ------------------------------------------------------------------
    def quantize(self, w: np.ndarray) -> dict[str, np.ndarray]:
        w = np.asarray(w, dtype=np.float32)
        rows, cols = w.shape
        self.check_shape(cols)
        g, ng, qmax = self.group_size, self.groups(cols), (1 << self.bits) - 1
        pad = ng * g - cols
        wg = np.pad(w, ((0, 0), (0, pad)), mode="edge").reshape(rows, ng, g)
        lo, hi = wg.min(axis=2), wg.max(axis=2)
        m = lo.astype(np.float16)
        d = ((hi - lo) / qmax).astype(np.float16)
        d32, m32 = d.astype(np.float32), m.astype(np.float32)
        inv = np.divide(1.0, d32, out=np.zeros_like(d32), where=d32 != 0)
        c = np.rint((wg - m32[..., None]) * inv[..., None])
        c = np.clip(c, 0, qmax).astype(np.uint8).reshape(rows, ng * g)[:, :cols]
        return {"codes": self.pack(c), "scale": d, "min": m}

    def pack(self, c: np.ndarray) -> np.ndarray:
        """uint8 codes [rows, cols] -> uint8 [rows, cols*bits/8] in block/sub-plane order."""
        rows, cols = c.shape
        blocks = c.reshape(rows, cols // BLOCK, BLOCK).astype(np.uint32)
        out, shift = [], 0
        for width in PLANES[self.bits]:
            field = (blocks >> shift) & ((1 << width) - 1)
            nb = 4 * width  # bytes of this sub-plane in a block
            # field i -> byte i % nb, bit width*(i // nb)
            f = field.reshape(rows, cols // BLOCK, BLOCK // nb, nb)
            sh = (width * np.arange(BLOCK // nb, dtype=np.uint32))[None, None, :, None]
            out.append(np.bitwise_or.reduce(f << sh, axis=2).astype(np.uint8))
            shift += width
        return np.concatenate(out, axis=2).reshape(rows, cols * self.bits // 8)

    def unpack(self, packed: np.ndarray, cols: int) -> np.ndarray:
        rows = packed.shape[0]
        blocks = packed.reshape(rows, cols // BLOCK, 4 * self.bits).astype(np.uint32)
        c = np.zeros((rows, cols // BLOCK, BLOCK), dtype=np.uint32)
        pos = shift = 0
        for width in PLANES[self.bits]:
            nb = 4 * width
            plane = blocks[:, :, pos:pos + nb]
            sh = (width * np.arange(BLOCK // nb, dtype=np.uint32))[None, None, :, None]
            field = (plane[:, :, None, :] >> sh) & ((1 << width) - 1)
            c |= field.reshape(rows, cols // BLOCK, BLOCK) << shift
            pos, shift = pos + nb, shift + width
        return c.reshape(rows, cols).astype(np.uint8)

    # -- dequantize ----------------------------------------------------------------
    def dequantize(self, parts: dict[str, np.ndarray], cols: int) -> np.ndarray:
        c = self.unpack(np.asarray(parts["codes"]).view(np.uint8), cols).astype(np.float32)
        gidx = np.arange(cols) // self.group_size
        d = np.asarray(parts["scale"]).astype(np.float32)[:, gidx]
        m = np.asarray(parts["min"]).astype(np.float32)[:, gidx]
        return d * c + m  # d*c is exact in float32, so this equals fmaf(d, c, m)


def by_name(name: str, group_size: int = DEFAULT_GROUP_SIZE):
    """'f32', 'f16', 'q2', 'q3', 'q4', 'q8' -> a format object."""
    if name == "f32":
        return F32()
    if name == "f16":
        return F16()
    if name.startswith("q") and name[1:].isdigit():
        return GroupQuant(int(name[1:]), group_size)
    raise ValueError(f"unknown weight format {name!r}")


def for_bits(bits: int, group_size: int = DEFAULT_GROUP_SIZE):
    return {32: F32, 16: F16}.get(bits, lambda: GroupQuant(bits, group_size))()


def quantize_activations(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The kernels' activation format: per 32 values, int8 q = rint(x * 127/amax) and
    the block scale amax/127 (float32). x: float32 [..., k], k a multiple of 32."""
    x = np.asarray(x, dtype=np.float32)
    xb = x.reshape(*x.shape[:-1], -1, BLOCK)
    amax = np.abs(xb).max(axis=-1)
    inv = np.divide(np.float32(127.0), amax, out=np.zeros_like(amax), where=amax != 0)
    q = np.rint(xb * inv[..., None]).astype(np.int8)
    return q, (amax / np.float32(127.0)).astype(np.float32)


def matmul_reference(fmt, parts: dict[str, np.ndarray], cols: int, x: np.ndarray) -> np.ndarray:
    """The numpy twin of the C kernels: y[n, rows] = x[n, cols] . W^T, with the same
    arithmetic (float weights for f32/f16; int8 activations and integer block dot
    products, combined per block as da * (d * sum(s*qa) + (m + d*2^(bits-1)) * sum(qa))
    with s = c - 2^(bits-1), for the group formats). Accumulates in float64."""
    x = np.atleast_2d(np.asarray(x, dtype=np.float32))
    if not isinstance(fmt, GroupQuant):
        return (x.astype(np.float64) @ fmt.dequantize(parts, cols).T.astype(np.float64)).astype(np.float32)
    rows, nblk = parts["codes"].shape[0], cols // BLOCK
    s = fmt.unpack(np.asarray(parts["codes"]).view(np.uint8), cols).astype(np.int64) - (1 << (fmt.bits - 1))
    s = s.reshape(rows, nblk, BLOCK)
    qa, da = quantize_activations(x)  # [n, nblk, 32], [n, nblk]
    dot = np.einsum("rbi,nbi->nrb", s, qa.astype(np.int64))  # exact integers
    sq = qa.astype(np.int64).sum(axis=-1)  # [n, nblk]
    gidx = (np.arange(nblk) * BLOCK) // fmt.group_size
    d = np.asarray(parts["scale"]).astype(np.float64)[:, gidx]
    m = np.asarray(parts["min"]).astype(np.float64)[:, gidx] + d * (1 << (fmt.bits - 1))
    y = da.astype(np.float64)[:, None, :] * (d[None] * dot + m[None] * sq[:, None, :])
    return y.sum(axis=-1).astype(np.float32)
