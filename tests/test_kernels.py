"""The C kernels (libedgert via edge_rt.kernels) against the numpy definitions in
edge_rt/formats.py: matmul vs formats.matmul_reference (the same integer table / dot
arithmetic; the C kernels differ only by float32 summation order: TOL), the table
approximation against the float product (formats.lut_error_bound), the bit-plane tile
layout, row dequantization bit-exact with fmt.dequantize, SIMD vs forced scalar
reference, thread-count and batch independence, and (when a cross compiler and qemu
are installed) the aarch64 NEON / NEON-dotprod kernels under qemu."""
from __future__ import annotations

import os
import shutil
import subprocess
import zlib
from pathlib import Path

import numpy as np
import pytest

from edge_rt import formats
from edge_rt import kernels as K

REPO = Path(__file__).resolve().parents[1]
GROUP_BITS = [1, 2, 3, 4, 5, 6, 8]
# (rows, cols): one row, the minimum width, odd row counts (not multiples of the 32-row
# tile: a last tile of 5, 3, 1, 2 rows), whole tiles, and cols=192 / 96 which leave a
# ragged last group for g=128 / g=64
SHAPES = [(1, 32), (37, 192), (67, 256), (33, 96), (130, 576), (64, 160)]
NS = [1, 3, 17]
TOL = 1e-5  # C vs matmul_reference, of the output's scale: float32 summation order


def fmt_cases():
    yield pytest.param(formats.F32(), id="f32")
    yield pytest.param(formats.F16(), id="f16")
    for bits in GROUP_BITS:
        for g in (32, 64, 128):
            yield pytest.param(formats.GroupQuant(bits, g), id=f"q{bits}-g{g}")


def rand_weight(rng, rows, cols):
    # a nonzero mean and per-row spread, like real weights
    return (rng.standard_normal((rows, cols)) * rng.uniform(0.01, 0.1, (rows, 1)) + 0.005).astype(np.float32)


def rand_act(rng, n, cols):
    x = rng.standard_normal((n, cols)) * np.exp(rng.standard_normal((n, cols)))  # heavy tails
    x[:, 5] *= 30.0  # an outlier channel
    x += 0.3
    x[0, 32:64] = 0.0 if cols >= 64 else x[0, 32:64]  # an all-zero block (amax == 0)
    return x.astype(np.float32)


@pytest.fixture(autouse=True)
def _auto_isa():
    K.force_isa("auto")
    yield
    K.force_isa("auto")


def close(y, ref, scale=None):
    """|y - ref| within TOL of scale (default max |ref|; a rounding error is relative to
    the terms summed, so where y may cancel to near 0 pass magnitude(...) instead)."""
    scale = scale or float(np.abs(ref).max()) or 1.0
    err = float(np.abs(y.astype(np.float64) - ref).max()) if y.size else 0.0
    return err <= TOL * scale, err / scale


def magnitude(fmt, parts, cols, x):
    """max over outputs of |x| . |W|: what a float32 sum's rounding error is relative to
    (one output of a 1x32 matrix can cancel to near 0: max |y| is then no scale)."""
    w = np.abs(fmt.dequantize(parts, cols)).astype(np.float64)
    return float((np.abs(x).astype(np.float64) @ w.T).max())


# --------------------------------------------------------------------------- matmul

@pytest.mark.parametrize("fmt", list(fmt_cases()))
def test_matmul_matches_reference(fmt):
    rng = np.random.default_rng(zlib.crc32(fmt.name.encode()) + getattr(fmt, "group_size", 0))
    for rows, cols in SHAPES:
        parts = fmt.quantize(rand_weight(rng, rows, cols))
        w = K.Weight(fmt, rows, cols, parts)
        for n in NS:
            x = rand_act(rng, n, cols)
            ref = formats.matmul_reference(fmt, parts, cols, x).astype(np.float64)
            outs = {}
            for isa in ("auto", "ref"):
                K.force_isa(isa)
                for threads in (1, 2, rows + 5):
                    y = K.matmul(w, x, threads=threads)
                    assert y.shape == (n, rows) and y.dtype == np.float32
                    ok, rel = close(y, ref, magnitude(fmt, parts, cols, x))
                    assert ok, f"{fmt.name} {rows}x{cols} n={n} isa={isa} threads={threads}: rel err {rel:.3g}"
                    outs[isa, threads] = y
            # a row is computed the same way whichever thread computes it
            for isa in ("auto", "ref"):
                for threads in (2, rows + 5):
                    assert np.array_equal(outs[isa, 1], outs[isa, threads]), (fmt.name, rows, cols, n, isa, threads)
            K.force_isa("auto")


@pytest.mark.parametrize("bits", GROUP_BITS)
def test_matmul_larger_threads_prefill(bits):
    """Big enough for the threaded path; n=37 exercises the token groups, the 4-token
    chunks and the tail, each token's rows equal to the token alone."""
    rng = np.random.default_rng(bits)
    rows, cols, n = 300, 1536, 37
    fmt = formats.GroupQuant(bits, 64)
    parts = fmt.quantize(rand_weight(rng, rows, cols))
    w = K.Weight(fmt, rows, cols, parts)
    x = rand_act(rng, n, cols)
    ref = formats.matmul_reference(fmt, parts, cols, x).astype(np.float64)
    y1 = K.matmul(w, x, threads=1)
    y2 = K.matmul(w, x, threads=2)
    y0 = K.matmul(w, x, threads=0)  # the OpenMP default
    assert close(y1, ref)[0], close(y1, ref)[1]
    assert np.array_equal(y1, y2) and np.array_equal(y1, y0)
    # 37 tokens go in groups of 20 (tables of 20 tokens kept in cache) and chunks of 4
    for j in (0, 19, 20, 36):
        assert np.array_equal(K.matmul(w, x[j]), y1[j]), j


@pytest.mark.parametrize("isa", ["auto", "ref"])
def test_matmul_batch_invariant(isa):
    """A row of x gives bit-identical outputs alone or anywhere in a batch (decode of a
    token reproduces its prefill logits exactly)."""
    rng = np.random.default_rng(21)
    K.force_isa(isa)
    for fmt in [formats.F32(), formats.F16()] + [formats.GroupQuant(b, 64) for b in GROUP_BITS]:
        rows, cols = 45, 320
        parts = fmt.quantize(rand_weight(rng, rows, cols))
        w = K.Weight(fmt, rows, cols, parts)
        x = rand_act(rng, 7, cols)
        y = K.matmul(w, x, threads=2)
        for j in range(7):
            assert np.array_equal(K.matmul(w, x[j]), y[j]), (fmt.name, j)
        assert np.array_equal(K.matmul(w, x[2:5]), y[2:5]), fmt.name


def test_matmul_integer_parts_exact():
    """With power-of-two scales and activations whose integer form is exact (q5, q6, q8: amax =
    127 in every block, so q == 128x, da == 1/128; q1..q4: integer x with a 4-column |sum| of 127 in every
    block, so the tables are the exact sums and ls == 1), everything is exact in float32:
    the kernels must agree with the reference to the last bit (catches any off-by-one in
    the codes, the layout or the tables)."""
    rng = np.random.default_rng(7)
    for bits in GROUP_BITS:
        fmt = formats.GroupQuant(bits, 64)
        for rows in (20, 70):
            cols = 192
            parts = fmt.quantize(rand_weight(rng, rows, cols))
            ng = fmt.groups(cols)
            parts["scale"] = np.full((rows, ng), 2.0**-6, np.float16)
            parts["min"] = (-(2.0 ** (bits - 1)) * 2.0**-6 + rng.integers(-4, 4, (rows, ng)) * 2.0**-8).astype(np.float16)
            if not fmt.lut:
                x = rng.integers(-127, 128, (3, cols)).astype(np.float32)
                x[:, ::32] = 127.0  # amax = 127 in every span: q == 64x (ACT_LEVELS = 127*64), da == 1/64
            else:
                x = rng.integers(-31, 32, (3, cols)).astype(np.float32)  # 4-column |sums| <= 124
                x[:, 0::32], x[:, 1::32], x[:, 2::32], x[:, 3::32] = 31.0, -32.0, 32.0, 32.0  # amax = 127
            w = K.Weight(fmt, rows, cols, parts)
            ref = formats.matmul_reference(fmt, parts, cols, x)
            for isa in ("auto", "ref"):
                K.force_isa(isa)
                assert np.array_equal(K.matmul(w, x), ref), (bits, rows, isa)


def test_matmul_vector_and_out():
    rng = np.random.default_rng(3)
    fmt = formats.GroupQuant(4, 64)
    parts = fmt.quantize(rand_weight(rng, 40, 128))
    w = K.Weight(fmt, 40, 128, parts)
    x = rand_act(rng, 2, 128)
    y = K.matmul(w, x[1])
    assert y.shape == (40,)
    np.testing.assert_array_equal(y, K.matmul(w, x)[1])
    out = np.empty((2, 40), np.float32)
    assert K.matmul(w, x, out=out) is out
    assert K.matmul(w, np.zeros((0, 128), np.float32)).shape == (0, 40)
    # bound call on fixed buffers: sees the buffer's current content
    xb = x.copy()
    mm = K.bind_matmul(w, xb, threads=2)
    np.testing.assert_array_equal(mm(), K.matmul(w, x))
    xb[:] = x[::-1]
    np.testing.assert_array_equal(mm(), K.matmul(w, x[::-1]))
    with pytest.raises(ValueError):
        K.bind_matmul(w, x.astype(np.float64))
    # non-contiguous / float64 activations are converted
    xt = np.asfortranarray(x.astype(np.float64))
    np.testing.assert_array_equal(K.matmul(w, xt), K.matmul(w, x))


# --------------------------------------------------------------------------- layout, table approximation

@pytest.mark.parametrize("fmts", [("q2-g64", "q3-g64", "q4-g64"), ("q4-g64", "q8-g64", "f16"), ("q4-g64", "q4-g128"),
                                  ("q8-g32", "q8-g32")])
def test_matmul_many_equals_one_at_a_time(fmts):
    """q, k, v (gate, up) in one call: one prepared input when the weights take the same
    kind (tables, int8, floats) over the same groups, one at a time otherwise; the results
    are those of separate products, bit for bit, at any thread count."""
    rng = np.random.default_rng(7)
    by_name = {p.id: p.values[0] for p in fmt_cases()}
    ws = [K.Weight.from_float(by_name[f], rand_weight(rng, rows, 192)) for f, rows in zip(fmts, (67, 32, 130))]
    for n in (1, 17):
        x = rand_act(rng, n, 192)
        for threads in (1, 2):
            for w, y in zip(ws, K.matmul_many(ws, x, threads=threads)):
                assert np.array_equal(y, K.matmul(w, x, threads=threads))


@pytest.mark.parametrize("bits", GROUP_BITS)
def test_pack_layout(bits):
    """pack/unpack (and pack_groups/unpack_groups) are inverse for any row count and keep
    the shape; q1..q4 put row r's plane-k nibble of sub-group j, and its group g's scale,
    where the kernels read them (ert_lut_offset, ert_group_offset); q5, q6 a block's low
    nibbles and high fields where the kernels unpack them."""
    rng = np.random.default_rng(bits)
    fmt = formats.GroupQuant(bits, 64)
    for rows in (1, 5, 31, 32, 33, 64, 77):
        c = rng.integers(0, 1 << bits, (rows, 96)).astype(np.uint8)
        p = fmt.pack(c)
        assert p.shape == (rows, 96 * bits // 8) and p.dtype == np.uint8
        assert np.array_equal(fmt.unpack(p, 96), c)
        d = rng.standard_normal((rows, 3)).astype(np.float16)
        pd = fmt.pack_groups(d)
        assert pd.shape == d.shape and pd.dtype == np.float16 and np.array_equal(fmt.unpack_groups(pd), d)
        for r, g in [(0, 0), (rows - 1, 2), (rows // 2, 1)]:
            t0 = r - r % formats.TILE
            at = r * 3 + g if not fmt.lut else t0 * 3 + g * min(formats.TILE, rows - t0) + r - t0
            assert pd.reshape(-1)[at] == d[r, g], (rows, r, g)
    if not fmt.lut:
        c = rng.integers(0, 1 << bits, (3, 64)).astype(np.uint8)
        p = fmt.pack(c)
        for r, b, i in [(0, 0, 0), (2, 1, 5), (1, 1, 15)]:  # block b of row r: bits*4 bytes
            blk, code = p[r, b * bits * 4:(b + 1) * bits * 4], c[r, 32 * b:32 * b + 32]
            if bits == 8:
                assert blk[i] == code[i] and blk[i + 16] == code[i + 16]
                continue
            assert blk[i] == (code[i] & 15) | (code[i + 16] & 15) << 4
            hb = bits - 4  # code j's high field: byte 16 + j % 4hb, at bit hb * (j // 4hb)
            for j in (i, i + 16):
                assert (blk[16 + j % (4 * hb)] >> hb * (j // (4 * hb))) & ((1 << hb) - 1) == code[j] >> 4
        return
    rows, cols = 45, 64  # a full tile and a tile of 13 rows
    c = rng.integers(0, 1 << bits, (rows, cols)).astype(np.uint8)
    flat = fmt.pack(c).reshape(-1)
    for r, b, k, j in [(0, 0, 0, 0), (31, 1, bits - 1, 7), (32, 0, 0, 3), (44, 1, bits - 1, 6), (40, 1, 0, 5)]:
        t0 = r - r % formats.TILE
        h = min(formats.TILE, rows - t0)
        u, wu = k // 2, min(2, bits - k // 2 * 2)
        s, e = (j // 2, k % 2) if wu == 2 else (j // 4, j // 2 % 2)  # 2h bytes per s, byte 2r + e
        byte = flat[t0 * cols * bits // 8 + (b * bits + 2 * u) * 4 * h + 2 * h * s + 2 * (r - t0) + e]
        nib = (byte >> (4 * (j % 2))) & 15
        want = sum(((int(c[r, 32 * b + 4 * j + i]) >> k) & 1) << i for i in range(4))
        assert nib == want, (r, b, k, j)


def test_lut_tables():
    """16 entries per 4 columns: the +-1 sums, mirrored, scaled to int8 by the group's
    largest |sum|, which maps to +-127 (a last group shorter than the others too)."""
    rng = np.random.default_rng(4)
    x = rand_act(rng, 2, 160)
    t, ls, _ = formats.lut_tables(x, 64)
    assert t.shape == (2, 40, 16) and ls.shape == (2, 3)
    assert np.array_equal(t[..., ::-1], -t)
    sign = 2 * ((np.arange(16)[:, None] >> np.arange(4)) & 1) - 1
    exact = x.reshape(2, 40, 4) @ sign.T  # [n, j, p]
    scale = np.repeat(ls, 16, axis=1)[:, :40, None]
    assert np.abs(t * scale - exact).max() <= 0.5 * scale.max() * (1 + 1e-5)
    big = np.abs(t).max(axis=-1)  # [n, j]
    assert all(big[:, 16 * g:16 * g + 16].max(axis=-1).min() == 127 for g in range(3)) or not ls.all()


def test_lut_block_multipliers():
    """Groups of several blocks: each 32-column block of a group gets its own table step
    ls * q/32768 (q the int16 multiplier, 32767 for the group's loudest block), the entries
    stay within int8, and the C kernels (every ISA, every width) agree with the numpy twin
    and beat one step per group. Groups of one block have none (q would be 32767)."""
    assert [formats.lut_block_mult(g) for g in (32, 64, 128)] == [False, True, True]
    rng = np.random.default_rng(11)
    x = rand_act(rng, 3, 192)
    x[:, 32:64] *= 0.01  # a quiet block next to the outlier's (column 5)
    x[2, 64:128] = 0.0  # a silent group
    t, ls, lq = formats.lut_tables(x, 64, block_mult=True)
    assert lq.shape == (3, 6) and lq.dtype == np.int16
    assert np.all(lq.reshape(3, 3, 2)[:2].max(axis=-1) == 32767) and np.all(lq[2, 2:4] == 0)
    assert np.all(lq[:, 1] < 1000)  # the quiet block: a step ~100x finer
    step = np.repeat(ls, 2, axis=1) * lq / np.float32(32768.0)  # [n, nblk]
    sign = 2 * ((np.arange(16)[:, None] >> np.arange(4)) & 1) - 1
    exact = x.reshape(3, 48, 4) @ sign.T
    st = np.repeat(step, 8, axis=1)[..., None]
    assert np.abs(t).max() <= 127 and np.all(np.abs(t * st - exact) <= 0.5 * st * (1 + 1e-5))
    for bits in (1, 2, 3, 4):
        fmt = formats.GroupQuant(bits, 64)
        parts = fmt.quantize(rand_weight(rng, 70, 192))
        w = K.Weight(fmt, 70, 192, parts)
        ref = formats.matmul_reference(fmt, parts, 192, x).astype(np.float64)
        for isa in ("auto", "ref"):
            K.force_isa(isa)
            for n in (1, 3):  # batch invariance: a token alone or with others
                assert close(K.matmul(w, x[:n], threads=2), ref[:n])[0], (bits, isa)
        K.force_isa("auto")
        exact_y = x.astype(np.float64) @ fmt.dequantize(parts, 192).T.astype(np.float64)
        assert np.all(np.abs(ref - exact_y) <= formats.lut_error_bound(fmt, parts, 192, x) + 1e-5 * np.abs(exact_y).max())
    t1, ls1, _ = formats.lut_tables(x, 64)  # one step per group: a coarser quiet block
    quiet = x[:, 32:64].astype(np.float64).reshape(3, 8, 4) @ sign.T
    assert (np.abs(t[:, 8:16] * st[:, 8:16] - quiet).max()
            < 0.1 * np.abs(t1[:, 8:16] * ls1[:, :1, None] - quiet).max())


@pytest.mark.parametrize("bits", [1, 2, 3, 4])
def test_lut_within_bound_of_float_product(bits):
    """The only approximation of the LUT path is the int8 rounding of the tables:
    |y - x . dequantize(W)^T| <= formats.lut_error_bound (2 (2^bits-1) sum_b d s_b per
    row, s_b the block's table step; float32 rounding is far below it). Also reports how
    tight the bound is."""
    rng = np.random.default_rng(bits + 40)
    for g in (32, 64, 128):
        fmt = formats.GroupQuant(bits, g)
        rows, cols = 70, 576
        parts = fmt.quantize(rand_weight(rng, rows, cols))
        x = rand_act(rng, 3, cols)
        y = K.matmul(K.Weight(fmt, rows, cols, parts), x).astype(np.float64)
        exact = x.astype(np.float64) @ fmt.dequantize(parts, cols).T.astype(np.float64)
        bound = formats.lut_error_bound(fmt, parts, cols, x)
        slack = 1e-5 * np.abs(exact).max()
        assert np.all(np.abs(y - exact) <= bound + slack), (g, float((np.abs(y - exact) / bound).max()))
        assert np.abs(y - exact).max() < 0.5 * bound.max()  # the bound is a worst case, not the typical error


@pytest.mark.parametrize("bits", GROUP_BITS)
def test_real_weights(smollm2_gguf, bits):
    """SmolLM2-135M matrices (ffn_down 576x1536, attn_k 192x576), quantized, every group
    size, against the numpy twin and (q1..q4) within the table bound of the float product."""
    from edge_rt.converters.readers import open_source
    src = open_source(smollm2_gguf)
    rng = np.random.default_rng(bits)
    x = (rng.standard_normal((5, 1536)) * np.exp(rng.standard_normal(1536))).astype(np.float32)
    for name in ("blk.3.ffn_down.weight", "blk.5.attn_k.weight"):
        w32 = src.load(name)
        rows, cols = w32.shape
        for g in (32, 64, 128):
            fmt = formats.GroupQuant(bits, g)
            parts = fmt.quantize(w32)
            w = K.Weight(fmt, rows, cols, parts)
            xs = x[:, :cols]
            ref = formats.matmul_reference(fmt, parts, cols, xs).astype(np.float64)
            for isa in ("auto", "ref"):
                K.force_isa(isa)
                y = K.matmul(w, xs, threads=2)
                assert close(y, ref)[0], (name, g, isa, close(y, ref)[1])
            K.force_isa("auto")
            if fmt.lut:
                exact = xs.astype(np.float64) @ fmt.dequantize(parts, cols).T.astype(np.float64)
                bound = formats.lut_error_bound(fmt, parts, cols, xs)
                assert np.all(np.abs(ref - exact) <= bound + 1e-5 * np.abs(exact).max()), (name, g)


def test_old_layout_refused(tmp_path, smollm2_gguf, monkeypatch):
    """A file of layout version 3 (q5, q6 high bits as one 32-bit mask per bit, before they
    were packed per lane) is refused with a message saying to convert again."""
    from tiny import write_tiny
    from edge_rt import api
    from edge_rt.errors import EdgeRtError
    monkeypatch.setattr(formats, "FORMAT_VERSION", 3)
    old = write_tiny("llama", smollm2_gguf, tmp_path / "v3.gguf", bits=6)
    monkeypatch.undo()
    assert formats.FORMAT_VERSION == 4
    with pytest.raises(EdgeRtError, match="layout version 3.*version 4: convert the source model again"):
        api.Model(old)


# --------------------------------------------------------------------------- dequantize

@pytest.mark.parametrize("fmt", list(fmt_cases()))
def test_dequantize_bit_exact(fmt):
    rng = np.random.default_rng(11)
    for rows, cols in [(1, 32), (37, 192), (50, 96), (9, 576)]:
        parts = fmt.quantize(rand_weight(rng, rows, cols))
        w = K.Weight(fmt, rows, cols, parts)
        ref = fmt.dequantize(parts, cols)
        for isa in ("auto", "ref"):
            K.force_isa(isa)
            assert np.array_equal(K.dequantize_rows(w, slice(None)), ref)
            assert np.array_equal(K.dequantize_rows(w, slice(rows // 2, rows)), ref[rows // 2:])
            assert np.array_equal(K.dequantize_rows(w, slice(None, None, 3)), ref[::3])
            idx = rng.integers(-rows, rows, 40)
            assert np.array_equal(K.dequantize_rows(w, idx), ref[idx])
            assert np.array_equal(K.dequantize_rows(w, rows - 1), ref[rows - 1])
            assert K.dequantize_rows(w, np.array([], dtype=np.int64)).shape == (0, cols)
        K.force_isa("auto")
        with pytest.raises(IndexError):
            K.dequantize_rows(w, [rows])


def test_f16_special_values_exact():
    vals = np.array([0.0, -0.0, 1.0, -2.5, 65504.0, -65504.0, 6.1e-5, 5.96e-8, -3.0e-6, np.inf, -np.inf,
                     1e-7, 0.33325195, 1024.5, -7.0, 2.0**-24] * 4, dtype=np.float16).reshape(2, 32)
    parts = {"": vals}
    w = K.Weight(formats.F16(), 2, 32, parts)
    ref = formats.F16().dequantize(parts, 32)
    for isa in ("auto", "ref"):
        K.force_isa(isa)
        got = K.dequantize_rows(w, slice(None))
        assert np.array_equal(got.view(np.uint32), ref.view(np.uint32))


def test_group_quant_degenerate_groups():
    """Constant groups (d == 0), huge and tiny ranges."""
    rng = np.random.default_rng(5)
    rows, cols = 6, 128
    w32 = rand_weight(rng, rows, cols)
    w32[0] = 0.25
    w32[1, :64] = -3.0
    w32[2] *= 1000.0
    w32[3] *= 1e-4
    for bits in GROUP_BITS:
        fmt = formats.GroupQuant(bits, 32)
        parts = fmt.quantize(w32)
        w = K.Weight(fmt, rows, cols, parts)
        assert np.array_equal(K.dequantize_rows(w, slice(None)), fmt.dequantize(parts, cols))
        x = rand_act(rng, 2, cols)
        ref = formats.matmul_reference(fmt, parts, cols, x).astype(np.float64)
        assert close(K.matmul(w, x), ref)[0]


# --------------------------------------------------------------------------- dispatch, binding

def test_rmsnorm_in_c_matches_numpy():
    """kernels.rmsnorm (the layer's RMS norm, the runtime's final norm) against the numpy
    oracle's: rows of odd and even lengths, one row, none; a float16 w (a model's F16 norm)
    as its float32 values; a w of the wrong shape refused."""
    from edge_rt.models.transformer import rmsnorm
    rng = np.random.default_rng(5)
    for n, d in ((1, 576), (7, 640), (3, 37), (0, 16)):
        x = (rng.standard_normal((n, d)) * 3).astype(np.float32)
        w = rng.standard_normal(d).astype(np.float32)
        got, want = K.rmsnorm(x, w, 1e-6), rmsnorm(x, w, 1e-6)
        assert got.shape == want.shape and np.allclose(got, want, rtol=2e-6, atol=1e-7), (n, d)
        if n:
            assert np.array_equal(K.rmsnorm(x[0], w, 1e-6), got[0])
            w16 = w.astype(np.float16)
            assert np.array_equal(K.rmsnorm(x, w16, 1e-6), K.rmsnorm(x, w16.astype(np.float32), 1e-6))
    with pytest.raises(ValueError):
        K.rmsnorm(np.ones((2, 8), np.float32), np.ones(7, np.float32), 1e-6)


def test_kernel_names_and_features():
    feats = K.cpu_features().split()
    for name, fid in formats.FORMAT_IDS.items():
        kname = K.kernel_name(fid)
        assert kname.startswith(name + ":"), kname
        if "avx2" in feats and "fma" in feats and "f16c" in feats:
            assert kname == f"{name}:avx2", kname
    assert K.kernel_name(99) == "?"
    if "avx2" in feats and "fma" in feats and "f16c" in feats:
        assert K.layer_isa() == "avx2"
    K.force_isa("ref")
    assert all(K.kernel_name(fid).endswith(":ref") for fid in formats.FORMAT_IDS.values())
    assert K.layer_isa() == "ref"
    K.force_isa("auto")
    with pytest.raises(K.KernelError):
        K.force_isa("no-such-isa")
    if "neon" not in feats:
        with pytest.raises(K.KernelError):
            K.force_isa("neon")


def test_format_ids_match_header():
    header = (REPO / "kernels_c/include/edgert.h").read_text()
    for name, fid in formats.FORMAT_IDS.items():
        assert f"ERT_{name.upper()} = {fid}," in header


def test_weight_validation():
    fmt = formats.GroupQuant(4, 64)
    rng = np.random.default_rng(0)
    parts = fmt.quantize(rand_weight(rng, 8, 128))
    w = K.Weight(fmt, 8, 128, parts)
    with pytest.raises(ValueError):
        K.matmul(w, np.zeros((2, 64), np.float32))
    with pytest.raises(ValueError):  # not contiguous: the binding never copies weights
        K.Weight(fmt, 8, 64, {"codes": parts["codes"][:, ::2], "scale": parts["scale"][:, :1],
                              "min": parts["min"][:, :1]})
    with pytest.raises(ValueError):
        K.Weight(fmt, 9, 128, parts)
    with pytest.raises(TypeError):
        K.Weight(fmt, 8, 128, {**parts, "scale": parts["scale"].astype(np.float32)})
    with pytest.raises(ValueError):
        K.Weight(fmt, 8, 100, parts)  # cols not a multiple of 32
    assert w.nbytes == fmt.nbytes(8, 128)


def test_memmap_weights(tmp_path):
    """Weights that are read-only memmaps of a file work without a copy."""
    rng = np.random.default_rng(9)
    fmt = formats.GroupQuant(3, 64)
    rows, cols = 48, 320
    parts = fmt.quantize(rand_weight(rng, rows, cols))
    mm = {}
    for key, arr in parts.items():
        path = tmp_path / f"{key}.bin"
        arr.tofile(path)
        mm[key] = np.memmap(path, dtype=arr.dtype, mode="r", shape=arr.shape)
    w = K.Weight(fmt, rows, cols, mm)
    assert w._arrays[0] is mm["codes"]
    x = rand_act(rng, 3, cols)
    np.testing.assert_array_equal(K.matmul(w, x), K.matmul(K.Weight(fmt, rows, cols, parts), x))
    assert np.array_equal(K.dequantize_rows(w, [0, 47]), fmt.dequantize(parts, cols)[[0, 47]])


# --------------------------------------------------------------------------- aarch64 under qemu

def _arm_tools():
    tools = {t: shutil.which(t) for t in ("aarch64-linux-gnu-gcc", "qemu-aarch64", "cmake")}
    missing = [t for t, p in tools.items() if not p]
    if missing:
        pytest.skip(f"aarch64 check needs {', '.join(missing)} "
                    "(apt-get install gcc-aarch64-linux-gnu qemu-user cmake)")
    sysroot = Path("/usr/aarch64-linux-gnu")
    if not sysroot.is_dir():
        pytest.skip("no aarch64 sysroot at /usr/aarch64-linux-gnu")
    return tools, sysroot


@pytest.fixture(scope="module")
def arm_build(tmp_path_factory):
    """libedgert.so cross-built for aarch64 with the project's CMakeLists.txt, plus the
    tests/arm/kernel_check.c driver linked against it."""
    tools, sysroot = _arm_tools()
    build = tmp_path_factory.mktemp("arm")
    exe = cross_build(build, tools["cmake"], tools["aarch64-linux-gnu-gcc"], "aarch64")
    return tools["qemu-aarch64"], sysroot, build, exe


def cross_build(build: Path, cmake: str, cc: str, processor: str, cflags: str = "") -> Path:
    """Cross-build libedgert.so into `build` with the project's CMakeLists.txt and link the
    tests/arm/kernel_check.c driver against it (tests/test_cross_arm32.py uses this too)."""
    def run(*cmd):
        r = subprocess.run(cmd, capture_output=True, text=True)
        assert r.returncode == 0, f"{' '.join(map(str, cmd))}\n{r.stdout[-3000:]}{r.stderr[-3000:]}"
    run(cmake, "-S", str(REPO), "-B", str(build), "-DCMAKE_SYSTEM_NAME=Linux",
        f"-DCMAKE_SYSTEM_PROCESSOR={processor}", f"-DCMAKE_C_COMPILER={cc}", f"-DCMAKE_C_FLAGS={cflags}",
        "-DCMAKE_BUILD_TYPE=Release")
    run(cmake, "--build", str(build), "-j", str(os.cpu_count() or 2))
    exe = build / "kernel_check"
    run(cc, "-O2", *cflags.split(), f"-I{REPO / 'kernels_c/include'}", str(REPO / "tests/arm/kernel_check.c"),
        "-o", str(exe), f"-L{build}", "-ledgert", "-lm")
    return exe


def _qemu(arm_build, cpu):
    qemu, sysroot, build, exe = arm_build
    return subprocess.run([qemu, "-cpu", cpu, "-L", str(sysroot), "-E", f"LD_LIBRARY_PATH={build}", str(exe)],
                          capture_output=True, text=True, timeout=120)


def test_arm_neon_dotprod_qemu(arm_build):
    r = _qemu(arm_build, "cortex-a76")  # ARMv8.2 with the dot product extension
    assert r.returncode == 0, r.stdout + r.stderr
    assert "features: neon dotprod" in r.stdout
    for name in ("q1", "q2", "q3", "q4"):  # table lookups: no dot products to use
        assert f"kernel: {name}:neon\n" in r.stdout, r.stdout
    for name in ("q5", "q6", "q8"):  # int8 dot products
        assert f"kernel: {name}:neon-dotprod" in r.stdout, r.stdout
    assert "kernel: f32:neon" in r.stdout and "kernel: f16:neon" in r.stdout
    assert "checked: neon\n" in r.stdout and "checked: neon-dotprod" in r.stdout and "PASSED" in r.stdout
    # layer.c's NEON helpers chosen and checked against the portable ones for both kernel sets
    assert "layer: neon\n" in r.stdout and "checked layer: neon " in r.stdout and "checked layer: neon-dotprod" in r.stdout


def test_arm_neon_without_dotprod_qemu(arm_build):
    r = _qemu(arm_build, "cortex-a72")  # ARMv8.0: sdot would be SIGILL
    assert r.returncode == 0, r.stdout + r.stderr
    assert "dotprod" not in r.stdout.split("\n")[0]
    for name in ("q1", "q2", "q3", "q4", "q5", "q6", "q8"):
        assert f"kernel: {name}:neon\n" in r.stdout, r.stdout
    assert "checked: neon\n" in r.stdout and "neon-dotprod" not in r.stdout and "PASSED" in r.stdout
    assert "layer: neon\n" in r.stdout and "checked layer: neon " in r.stdout


def test_native_kernel_check(tmp_path):
    """The same C driver natively, against the installed library (SIMD vs ref in C)."""
    cc = shutil.which("cc") or shutil.which("gcc")
    if not cc:
        pytest.skip("no C compiler")
    lib = K.library_path()
    exe = tmp_path / "kernel_check"
    subprocess.run([cc, "-O2", f"-I{REPO / 'kernels_c/include'}", str(REPO / "tests/arm/kernel_check.c"), "-o", str(exe),
                    str(lib), "-lm", f"-Wl,-rpath,{lib.parent}"], check=True, capture_output=True)
    r = subprocess.run([str(exe)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "PASSED" in r.stdout
    if "checked: avx2" in r.stdout:  # the layer's AVX2 helpers against the portable ones too
        assert "layer: avx2\n" in r.stdout and "checked layer: avx2 " in r.stdout, r.stdout


def test_q8_long_rows():
    """q8 rows longer than the SIMD kernels' block buffers (1024 blocks: the AVX2 kernel runs
    the scalar one there), and prefill batches (int16 path) next to decode (block dots):
    against the reference, and each token alone equal to its row of the batch."""
    rng = np.random.default_rng(33)
    fmt = formats.GroupQuant(8, 64)
    for rows, cols, n in ((5, 33024, 5), (7, 2048, 9)):
        parts = fmt.quantize(rand_weight(rng, rows, cols))
        w = K.Weight(fmt, rows, cols, parts)
        x = rand_act(rng, n, cols)
        y = K.matmul(w, x, threads=2)
        assert close(y, formats.matmul_reference(fmt, parts, cols, x).astype(np.float64))[0]
        for j in range(n):
            assert np.array_equal(K.matmul(w, x[j]), y[j]), (rows, cols, j)
