"""Weight formats: one small class per format, quantize and dequantize in numpy.

A format stores a matrix W[rows, cols] row by row as a few arrays ("parts"). The C
kernels in kernels_c/ read the same bytes; a format's `id` is its value in
`enum ert_format` (kernels_c/include/edgert.h), and the C side agrees with
`dequantize` bit for bit.

Group-quantized formats (Q1..Q6, Q8), layout version FORMAT_VERSION:
  - each row is cut into groups of `group_size` columns (a multiple of 32; the last
    group of a row may be shorter), each with a scale d and a minimum m (float16):
        w = d * c + m,   c = clip(round((w - m) / d), 0, 2^bits - 1)
  - parts: "codes" uint8[rows, cols*bits/8], "scale" and "min" float16[rows, groups]
    (q5, q6, q8: in row order; q1..q4: in tile order, see below).
  - q5, q6, q8 (the int8 dot-product kernels) store codes row by row, a block of 32 codes
    in bits*4 bytes: q8 one byte per code; q5, q6 16 bytes of low nibbles, byte i =
    (c[i] & 15) | (c[i + 16] & 15) << 4, then the high fields h[i] = c[i] >> 4 (hb =
    bits - 4 bits each) in 4*hb bytes: byte j holds h[j + 4*hb*q] at bit hb*q, q < 8/hb
    (q5: byte j has h of codes j, j+4, ..., j+28 at bits 0..7; q6: h of codes j, j+8,
    j+16, j+24 at bits 0, 2, 4, 6). A kernel broadcasts them to every 32-bit (q5) or
    64-bit (q6) lane, shifts lane q right by hb*q and masks: one shift for all 32 codes.
  - q1..q4 codes are in the LUT kernels' tile order (ISA independent): rows in tiles
    of TILE=32 (the last tile has rows % 32 rows, h = its height). A code's bit k is in
    plane k; nib(r, j, k) = sum_i (bit k of code[r, 32b + 4j + i]) << i, i < 4, is the
    index into sub-group j's 16-entry activation table (see lut_tables). The planes go
    in pairs u = (2u, 2u+1) (an odd plane count ends with a lone plane). Inside a tile:
    for each 32-column block b, each plane pair u:
        pair:  for s < 4: 2h bytes, byte 2r + e = nib(r, 2s, 2u+e) | nib(r, 2s+1, 2u+e) << 4
        lone:  for s < 2: 2h bytes, byte 2r + e = nib(r, 4s+2e, k) | nib(r, 4s+2e+1, k) << 4
    (a row's two nibbles of a pair, or of a lone plane, side by side: after the table
    lookups one multiply-add weighs and sums them into the row). A tile takes h*cols*bits/8
    bytes, so "codes" keeps its shape [rows, cols*bits/8] (a byte array whose row index
    is not a matrix row). "scale" and "min" go by the same tiles (pack_groups): inside a
    tile, group by group, the h rows' values in row order (a group's scales of a tile are
    what the kernels load at once); the shape stays [rows, groups].
"""
from __future__ import annotations

import numpy as np

FORMAT_VERSION = 4  # 3: q1..q4 scales and mins in tile order; 4: q5, q6 high fields packed per lane
BLOCK = 32  # columns per code block
DEFAULT_GROUP_SIZE = 64  # columns per (scale, min) pair unless asked otherwise
BITS = (1, 2, 3, 4, 5, 6, 8)
LUT_BITS = (1, 2, 3, 4)  # bit-plane layout, table-lookup kernels; the others: int8 dot products
TILE = 32  # rows per tile of the bit-plane layout
# the values of enum ert_format in kernels_c/include/edgert.h
FORMAT_IDS = {"f32": 0, "f16": 1, "q1": 2, "q2": 3, "q3": 4, "q4": 5, "q5": 7, "q6": 8, "q8": 6}  # by width


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


def codes_for(w: np.ndarray, d: np.ndarray, m: np.ndarray, qmax: int) -> np.ndarray:
    """The group formats' rounding of w to a given (d, m): c = clip(rint((w - m) * (1/d)),
    0, qmax) in float32, d and m taken as float16 values; d == 0 gives 0. One working array."""
    d32, m32 = d.astype(np.float32), m.astype(np.float32)
    inv = np.divide(1.0, d32, out=np.zeros_like(d32), where=d32 != 0)
    c = w - m32
    c *= inv
    return np.clip(np.rint(c, out=c), 0, qmax, out=c)


class GroupQuant:
    """Asymmetric round-to-nearest, one (scale, min) pair per group of columns."""

    def __init__(self, bits: int, group_size: int = DEFAULT_GROUP_SIZE):
        if bits not in BITS:
            raise ValueError(f"no {bits}-bit format (have {list(BITS)})")
        if group_size <= 0 or group_size % BLOCK:
            raise ValueError(f"group size must be a positive multiple of {BLOCK}, got {group_size}")
        self.bits, self.group_size = bits, group_size
        self.lut = bits in LUT_BITS  # table lookups over bit-plane tiles, or int8 dot products
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
        return self.encode(*self.round(w))

    def encode(self, c: np.ndarray, d: np.ndarray, m: np.ndarray) -> dict[str, np.ndarray]:
        """The stored parts for codes c [rows, cols] and float16 d, m [rows, groups]."""
        return {"codes": self.pack(np.asarray(c, np.uint8)), "scale": self.pack_groups(d), "min": self.pack_groups(m)}

    def round(self, w: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Round-to-nearest: codes uint8 [rows, cols] and d, m float16 [rows, groups]."""
        w = np.asarray(w, dtype=np.float32)
        rows, cols = w.shape
        self.check_shape(cols)
        g, ng, qmax = self.group_size, self.groups(cols), (1 << self.bits) - 1
        pad = ng * g - cols
        wg = (np.pad(w, ((0, 0), (0, pad)), mode="edge") if pad else w).reshape(rows, ng, g)
        lo, hi = wg.min(axis=2), wg.max(axis=2)
        m = lo.astype(np.float16)
        d = ((hi - lo) / qmax).astype(np.float16)
        c = codes_for(wg, d[..., None], m[..., None], qmax)
        return c.astype(np.uint8).reshape(rows, ng * g)[:, :cols], d, m

    def pack(self, c: np.ndarray) -> np.ndarray:
        """uint8 codes [rows, cols] -> uint8 [rows, cols*bits/8] in the layout above
        (q8: the codes themselves; q5, q6: blocks of nibbles and high fields; q1..q4:
        tiles of bit planes)."""
        c = np.asarray(c, dtype=np.uint8)
        rows, cols = c.shape
        if self.bits == 8:
            return np.ascontiguousarray(c)
        if not self.lut:
            b = c.reshape(rows, cols // BLOCK, BLOCK)
            nib = (b[..., :16] & 15) | ((b[..., 16:] & 15) << 4)
            hb = self.bits - 4
            h = (b >> 4).reshape(rows, cols // BLOCK, 8 // hb, 4 * hb)  # [.., q, j]: code 4hb*q + j
            high = np.bitwise_or.reduce(h << (hb * np.arange(8 // hb, dtype=np.uint8))[:, None], axis=-2)
            return np.concatenate([nib, high], axis=-1).reshape(rows, cols * self.bits // 8)
        full = rows - rows % TILE
        out = [_pack_tiles(c[:full].reshape(full // TILE, TILE, cols), self.bits),
               _pack_tiles(c[full:].reshape(1, rows - full, cols), self.bits)]
        return np.concatenate(out).reshape(rows, cols * self.bits // 8)

    def unpack(self, packed: np.ndarray, cols: int) -> np.ndarray:
        packed = np.asarray(packed).view(np.uint8)
        rows = packed.shape[0]
        if self.bits == 8:
            return np.ascontiguousarray(packed.reshape(rows, cols))
        if not self.lut:
            b = packed.reshape(rows, cols // BLOCK, self.bits * 4)
            c = np.concatenate([b[..., :16] & 15, b[..., :16] >> 4], axis=-1)
            hb = self.bits - 4
            h = (b[..., None, 16:] >> (hb * np.arange(8 // hb, dtype=np.uint8))[:, None]) & ((1 << hb) - 1)  # [.., q, j]
            return (c | h.reshape(c.shape) << 4).reshape(rows, cols)
        flat, full = packed.reshape(-1), rows - rows % TILE
        cut = full * cols * self.bits // 8
        return np.concatenate([_unpack_tiles(flat[:cut], TILE, cols, self.bits),
                               _unpack_tiles(flat[cut:], rows - full, cols, self.bits)])

    def pack_groups(self, a: np.ndarray) -> np.ndarray:
        """float16 per-group values (scale or min) [rows, groups] in row order -> the
        layout above (q5, q6, q8: unchanged; q1..q4: [tile][group][row of the tile]), same shape."""
        a = np.asarray(a, dtype=np.float16)
        if not self.lut:
            return np.ascontiguousarray(a)
        rows, ng = a.shape
        full = rows - rows % TILE
        tiles = a[:full].reshape(-1, TILE, ng).transpose(0, 2, 1).reshape(-1)
        return np.concatenate([tiles, a[full:].T.reshape(-1)]).reshape(rows, ng)

    def unpack_groups(self, a: np.ndarray) -> np.ndarray:
        """The inverse of pack_groups: [rows, groups] in row order."""
        a = np.asarray(a)
        if not self.lut:
            return a
        rows, ng = a.shape
        full = rows - rows % TILE
        flat = a.reshape(-1)
        tiles = flat[:full * ng].reshape(-1, ng, TILE).transpose(0, 2, 1).reshape(full, ng)
        return np.concatenate([tiles, flat[full * ng:].reshape(ng, rows - full).T])

    # -- dequantize ----------------------------------------------------------------
    def dequantize(self, parts: dict[str, np.ndarray], cols: int) -> np.ndarray:
        return self.decode(self.unpack(np.asarray(parts["codes"]).view(np.uint8), cols),
                           self.unpack_groups(parts["scale"]), self.unpack_groups(parts["min"]))

    def decode(self, c: np.ndarray, d: np.ndarray, m: np.ndarray) -> np.ndarray:
        """w = d*c + m in float32 from codes [rows, cols] and per-group d, m [rows, groups]."""
        rows, cols = c.shape
        ng, g = self.groups(cols), self.group_size
        w = np.zeros((rows, ng * g), np.float32)  # the last group padded to its full size
        w[:, :cols] = c
        wg = w.reshape(rows, ng, g)
        wg *= d.astype(np.float32)[..., None]  # d*c is exact in float32, so d*c + m equals fmaf(d, c, m)
        wg += m.astype(np.float32)[..., None]
        return w if ng * g == cols else np.ascontiguousarray(w[:, :cols])


def _plane_pairs(bits: int) -> list[tuple[int, int]]:
    """(first plane, width) of each plane pair: (0, 2), (2, 2) ... and (bits-1, 1) if odd"""
    return [(k, min(2, bits - k)) for k in range(0, bits, 2)]


def _pack_tiles(c: np.ndarray, bits: int) -> np.ndarray:
    """codes [ntiles, h, cols] -> the tiles' bytes, flat: [tile][block][pair u][s][row][e]."""
    nt, h, cols = c.shape
    nblk = cols // BLOCK
    # byte s of a block in plane k: bit p is bit k of the code in column 8s + p (nibble j = 2s, 2s+1)
    byte = np.stack([np.packbits((c >> k) & 1, axis=-1, bitorder="little") for k in range(bits)])
    byte = byte.reshape(bits, nt, h, nblk, 4)  # [k, t, r, b, s]
    parts = [(byte[k:k + 2].transpose(1, 3, 4, 2, 0) if wd == 2  # [t, b, s, r, e]
              else byte[k].reshape(nt, h, nblk, 2, 2).transpose(0, 2, 3, 1, 4)  # [t, b, s, r, e]: sub-group pair 2s+e
              ).reshape(nt, nblk, 4 * h * wd) for k, wd in _plane_pairs(bits)]
    return np.concatenate(parts, axis=2).reshape(-1)


# _SPREAD[v]: a uint64 whose byte p is bit p of v
_SPREAD = np.array([sum(((v >> p) & 1) << (8 * p) for p in range(8)) for v in range(256)], "<u8")


def _unpack_tiles(flat: np.ndarray, h: int, cols: int, bits: int) -> np.ndarray:
    """The inverse of _pack_tiles: flat bytes of tiles of height h -> codes [rows, cols]."""
    if h == 0 or flat.size == 0:
        return np.zeros((0, cols), dtype=np.uint8)
    nblk = cols // BLOCK
    tiles = flat.reshape(-1, nblk, bits * 4 * h)
    planes, pos = [], 0
    for _, wd in _plane_pairs(bits):
        part = tiles[:, :, pos:pos + wd * 4 * h].reshape(-1, nblk, 2 * wd, h, 2)  # [t, b, s, r, e]
        if wd == 2:
            planes.append(part.transpose(4, 0, 3, 1, 2))  # [e = plane, t, r, b, s]
        else:
            planes.append(part.transpose(0, 3, 1, 2, 4).reshape(1, -1, h, nblk, 4))  # [1, t, r, b, 2s+e]
        pos += wd * 4 * h
    byte = np.concatenate(planes)  # [k, t, r, b, s]
    c = _SPREAD[byte[0]]  # 8 codes of a byte's columns as the 8 bytes of a uint64 (little-endian)
    for k in range(1, bits):
        c |= _SPREAD[byte[k]] << np.uint64(k)
    return np.ascontiguousarray(c).view(np.uint8).reshape(-1, cols)


def by_name(name: str, group_size: int = DEFAULT_GROUP_SIZE):
    """'f32', 'f16', 'q1' .. 'q6', 'q8' -> a format object."""
    if name == "f32":
        return F32()
    if name == "f16":
        return F16()
    if name.startswith("q") and name[1:].isdigit():
        return GroupQuant(int(name[1:]), group_size)
    raise ValueError(f"unknown weight format {name!r}")


def for_bits(bits: int, group_size: int = DEFAULT_GROUP_SIZE):
    return {32: F32, 16: F16}.get(bits, lambda: GroupQuant(bits, group_size))()


ACT_LEVELS = 8128  # ERT_ACT_LEVELS in kernels_c/include/edgert.h, which gives the reasons: 127 * 64
ACT_SPAN = 64  # columns sharing an activation scale (ERT_ACT_SPAN): a pair of blocks


def quantize_activations(x: np.ndarray, levels: float = ACT_LEVELS) -> tuple[np.ndarray, np.ndarray]:
    """The int8 kernels' activation format (q5, q6, q8): per ACT_SPAN values (a row's last
    block alone when it has an odd number), int16 q = rint(x * L/amax), L = levels, and
    the scale amax/L (float32), repeated for each block of the span.
    x: float32 [..., k], k a multiple of 32 -> q [..., k/32, 32], da [..., k/32]."""
    x = np.asarray(x, dtype=np.float32)
    xb = x.reshape(*x.shape[:-1], -1, BLOCK)
    per = ACT_SPAN // BLOCK
    bmax = np.abs(xb).max(axis=-1)  # [..., nblk]
    pad = np.zeros((*bmax.shape[:-1], -bmax.shape[-1] % per), np.float32)
    smax = np.concatenate([bmax, pad], axis=-1).reshape(*bmax.shape[:-1], -1, per).max(axis=-1)
    amax = np.repeat(smax, per, axis=-1)[..., :bmax.shape[-1]]
    inv = np.divide(np.float32(levels), amax, out=np.zeros_like(amax), where=amax != 0)
    q = np.rint(xb * inv[..., None]).astype(np.int16)
    return q, (amax / np.float32(levels)).astype(np.float32)


def lut_block_mult(group_size: int) -> bool:
    """Whether the LUT kernels use block multipliers for weights in groups of group_size
    columns: where a group holds more than one block, as ERT_LUT_BLOCK_MULT in
    kernels_c/include/edgert.h, which gives the measured reasons."""
    return group_size > BLOCK


def lut_tables(x: np.ndarray, group_size: int, block_mult: bool = False):
    """The LUT kernels' activation format. For each 4 columns x0..x3 (sub-group j) the
    16 sums T[j, p] = ((s0*x0 + s1*x1) + s2*x2) + s3*x3, s_i = +1 if bit i of p else -1
    (float32, in that order; T[j, 15-p] = -T[j, p]). Per group of group_size columns (the
    weights' groups; the last may be shorter), with amax = max over its sub-groups of
    ((|x0| + |x1|) + |x2|) + |x3| (= max |T|), inv = 127/amax: int8 t = rint(T * inv)
    and the table scale ls = amax/127 (float32). One scale per group lets the kernels sum
    a group's lookups in int16 before any float arithmetic.
    With block multipliers (lut_block_mult), each 32-column block b of the group gets a
    finer step where its own amax_b allows: the int16 q_b = min(32767, ceil((amax_b/amax)
    * 32768)) and t = rint(T * (inv * (32768/q_b))) (float32, in that order), so the
    block's step is ls * q_b/32768; the kernels weigh the block's integer sum I_b by
    (I_b * q_b + 2^14) >> 15 (one rounding multiply: its error, half a unit of ls per
    block, is far below the tables').
    x: float32 [..., k], k a multiple of 32 -> t int8 [..., k/4, 16], ls float32
    [..., groups], lq int16 [..., k/32] (None without block multipliers)."""
    x = np.asarray(x, dtype=np.float32)
    k, sg = x.shape[-1], group_size // 4
    ng = -(-k // group_size)
    xs = x.reshape(*x.shape[:-1], -1, 4)
    sign = (np.arange(16)[:, None] >> np.arange(4)) & 1  # [p, i]
    v = np.where(sign.astype(bool), xs[..., None, :], -xs[..., None, :])  # [..., j, p, i]
    T = ((v[..., 0] + v[..., 1]) + v[..., 2]) + v[..., 3]
    a = np.abs(xs)
    s4 = ((a[..., 0] + a[..., 1]) + a[..., 2]) + a[..., 3]  # [..., J]
    pad = np.zeros((*s4.shape[:-1], ng * sg - s4.shape[-1]), np.float32)
    amax = np.concatenate([s4, pad], axis=-1).reshape(*s4.shape[:-1], ng, sg).max(axis=-1)
    inv = np.divide(np.float32(127.0), amax, out=np.zeros_like(amax), where=amax != 0)
    inv_j = np.repeat(inv, sg, axis=-1)[..., :k // 4]  # [..., J]
    lq = None
    if block_mult:
        ab = s4.reshape(*s4.shape[:-1], -1, BLOCK // 4).max(axis=-1)  # [..., nblk]
        gb = (np.arange(k // BLOCK) * BLOCK) // group_size
        ag = amax[..., gb]
        r = np.divide(ab, ag, out=np.zeros_like(ab), where=ag != 0)
        lq = np.minimum(np.ceil(r * np.float32(32768.0)), np.float32(32767.0)).astype(np.int16)
        qf = lq.astype(np.float32)
        step = np.divide(np.float32(32768.0), qf, out=np.zeros_like(qf), where=lq != 0)
        inv_j = (inv[..., gb] * step).astype(np.float32).repeat(BLOCK // 4, axis=-1)
    t = np.rint(T * inv_j[..., None]).astype(np.int8)
    return t, (amax / np.float32(127.0)).astype(np.float32), lq


def lut_error_bound(fmt, parts: dict[str, np.ndarray], cols: int, x: np.ndarray) -> np.ndarray:
    """Bound on |LUT result - x . dequantize(W)^T| from the int8 tables alone, [n, rows]:
    each table entry is off by at most half its step s (ls of the group, or ls * q_b/32768
    with block multipliers), a 4-column dot sum_k 2^(k-1) T[p_k] by at most
    (2^bits - 1) * s/4, so a block of 32 columns by 2 * (2^bits - 1) * d * s (d of the
    block's group); block multipliers add their rounding, half a unit of ls times d/2."""
    mult = lut_block_mult(fmt.group_size)
    _, ls, lq = lut_tables(np.atleast_2d(x), fmt.group_size, mult)
    gidx = (np.arange(cols // BLOCK) * BLOCK) // fmt.group_size
    d = fmt.unpack_groups(parts["scale"]).astype(np.float64)[:, gidx]  # [rows, nblk]
    s = ls.astype(np.float64)[:, gidx]  # [n, nblk]
    if not mult:
        return 2.0 * ((1 << fmt.bits) - 1) * (s @ d.T)
    return (2.0 * ((1 << fmt.bits) - 1) * (s * lq / 32768.0) + s / 4) @ d.T


def int8_offset(bits: int) -> int:
    """o of the int8 kernels' s = c - o (ert_int8_offset in edgert.h): q8's codes 0..255 are
    shifted into int8 by 128; q5, q6 codes (< 64) are int8 as they are."""
    return 128 if bits == 8 else 0


def matmul_reference(fmt, parts: dict[str, np.ndarray], cols: int, x: np.ndarray) -> np.ndarray:
    """The numpy twin of the C kernels: y[n, rows] = x[n, cols] . W^T with the same
    integer arithmetic, accumulated in float64 (the C kernels sum in float32).
      f32/f16: float weights.
      q5, q6, q8 (int8 weights): int16 activations (quantize_activations), per block
        da * (d * sum(s*qa) + (m + o*d) * sum(qa)), s = c - o, o = int8_offset(bits).
      q1..q4 (table lookups, lut_tables): with bit planes c = sum_k 2^k b_k,
        sum_i c_i x_i = sum_k 2^(k-1) T[p_k] + (2^bits - 1)/2 * sum_i x_i, so
        y = sum_g d * ls_g/2 * I_g + (m + d*(2^bits - 1)/2) * sum_{i in g} x_i,
        I_g = sum_{b in g} I_b, or with block multipliers (lut_block_mult) sum_{b in g}
        (I_b * q_b + 2^14) >> 15, I_b = sum_k 2^k sum_{j in b} t[j, p_kj], exact integers
        (|I_b| <= 8*127*(2^bits-1))."""
    x = np.atleast_2d(np.asarray(x, dtype=np.float32))
    if not isinstance(fmt, GroupQuant):
        return (x.astype(np.float64) @ fmt.dequantize(parts, cols).T.astype(np.float64)).astype(np.float32)
    rows, nblk = parts["codes"].shape[0], cols // BLOCK
    c = fmt.unpack(parts["codes"], cols)
    gidx = (np.arange(nblk) * BLOCK) // fmt.group_size
    d = fmt.unpack_groups(parts["scale"]).astype(np.float64)[:, gidx]  # [rows, nblk]
    m = fmt.unpack_groups(parts["min"]).astype(np.float64)[:, gidx]
    if not fmt.lut:
        o = int8_offset(fmt.bits)
        s = (c.reshape(rows, nblk, BLOCK).astype(np.float64) - o).transpose(1, 2, 0)  # [nblk, 32, rows]
        qa, da = quantize_activations(x)  # [n, nblk, 32], [n, nblk]
        # integer dots in float64 products: every partial sum is an integer below 2^25, exact
        dot = np.matmul(qa.astype(np.float64).transpose(1, 0, 2), s).transpose(1, 2, 0)  # [n, rows, nblk]
        sq = qa.astype(np.int64).sum(axis=-1)  # [n, nblk]
        y = da.astype(np.float64)[:, None, :] * (d[None] * dot + (m + o * d)[None] * sq[:, None, :])
        return y.sum(axis=-1).astype(np.float32)
    t, ls, lq = lut_tables(x, fmt.group_size, lut_block_mult(fmt.group_size))  # [n, J, 16], [n, ngroups], [n, nblk]
    quad = c.reshape(rows, nblk, 8, 4)
    I = np.zeros((x.shape[0], rows, nblk), dtype=np.int64)  # I_b, |I_b| <= 8*127*15
    for k in range(fmt.bits):
        nib = (((quad >> k) & 1) << np.arange(4, dtype=np.uint8)).sum(axis=-1)  # [rows, nblk, 8]
        for q in range(8):  # sub-group q of every block: table j = 8b + q
            I += (1 << k) * t[:, q::8][:, np.arange(nblk)[None, :], nib[:, :, q]].astype(np.int32)
    if lq is not None:
        I = (I * lq.astype(np.int64)[:, None, :] + (1 << 14)) >> 15  # floor, as mulhrs / vqrdmulh
    xsum = x.astype(np.float64).reshape(x.shape[0], nblk, BLOCK).sum(axis=-1)  # per block; groups are whole blocks
    y = (d[None] * ls.astype(np.float64)[:, None, gidx] / 2) * I + (m + d * ((1 << fmt.bits) - 1) / 2)[None] * xsum[:, None, :]
    return y.sum(axis=-1).astype(np.float32)
