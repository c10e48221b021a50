"""Dequantization of every ggml type we read matches llama.cpp's own (ggml's to_float)
bit for bit.

Our reader (edge_rt.gguf_file.GGUFFile.dequantize) uses gguf-py's numpy dequantize; the
reference is `ggml_get_type_traits(type)->to_float` from the libggml-base.so shipped in
the installed llama_cpp package (the peer built by scripts/peer.sh). Inputs:
  * every tensor of the two real models, whole (SmolLM2: Q4_1, Q8_0, F32;
    Gemma-3-270m: Q5_0, Q4_K, Q6_K, Q8_0, F32);
  * types not in those files (F16, BF16, Q4_0, Q5_1, Q2_K, Q3_K, Q5_K, and again the
    ones that are), from real weights quantized by gguf-py (its quantize) or, for
    the K-quants gguf-py cannot quantize, by ggml's reference quantizer (from_float_ref);
  * random blocks of every type: random bits everywhere except finite random f16 scales.
Comparison is on the float32 bit patterns (np.array_equal on uint32 views), so even
-0.0 vs +0.0 or a differently rounded last bit fails.
"""

from __future__ import annotations

import ctypes
from pathlib import Path

import numpy as np
import pytest
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as T
from gguf.quants import dequantize as gguf_dequantize
from gguf.quants import quantize as gguf_quantize

from edge_rt.gguf_file import GGUFFile
from peer import llama_available

pytestmark = pytest.mark.skipif(
    not llama_available(),
    reason="llama_cpp (the llama.cpp peer) is not installed: run scripts/peer.sh",
)

# Types that must be present in each model file (a pinned download: anything else
# means the wrong file).
MODEL_TYPES = {
    "smollm2_gguf": {T.F32, T.Q4_1, T.Q8_0},
    "gemma3_gguf": {T.F32, T.Q5_0, T.Q4_K, T.Q6_K, T.Q8_0},
}
# Every type our reader claims to read exactly: the file types plus the cheap extras.
CHECKED_TYPES = [T.F32, T.F16, T.BF16, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0,
                 T.Q2_K, T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K]
GGUF_PY_CAN_QUANTIZE = {T.F16, T.BF16, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0}

# Byte offsets of the f16 scale fields in each block (ggml-common.h), for random blocks.
F16_FIELDS = {
    T.Q4_0: [0], T.Q4_1: [0, 2], T.Q5_0: [0], T.Q5_1: [0, 2], T.Q8_0: [0],
    T.Q2_K: [80, 82], T.Q3_K: [108], T.Q4_K: [0, 2], T.Q5_K: [0, 2], T.Q6_K: [208],
}


# -- ggml, through ctypes --------------------------------------------------------------

class _TypeTraits(ctypes.Structure):
    # struct ggml_type_traits in ggml/include/ggml.h (llama-cpp-python 0.3.36's vendored copy)
    _fields_ = [
        ("type_name", ctypes.c_char_p),
        ("blck_size", ctypes.c_int64),
        ("blck_size_interleave", ctypes.c_int64),
        ("type_size", ctypes.c_size_t),
        ("is_quantized", ctypes.c_bool),
        ("to_float", ctypes.c_void_p),
        ("from_float_ref", ctypes.c_void_p),
    ]


# typedef void (*ggml_to_float_t)(const void * x, float * y, int64_t k);
_TO_FLOAT = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64)
# typedef void (*ggml_from_float_t)(const float * x, void * y, int64_t k);
_FROM_FLOAT = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64)


@pytest.fixture(scope="module")
def ggml():
    import llama_cpp

    lib_dir = Path(llama_cpp.__file__).parent / "lib"
    lib = ctypes.CDLL(str(lib_dir / "libggml-base.so"))
    lib.ggml_get_type_traits.restype = ctypes.POINTER(_TypeTraits)
    lib.ggml_get_type_traits.argtypes = [ctypes.c_int]
    return lib


def _traits(ggml, qtype: T) -> _TypeTraits:
    tr = ggml.ggml_get_type_traits(int(qtype)).contents
    # Guards the struct layout above and the enum numbering against gguf-py's table.
    assert tr.type_name.decode().upper() == qtype.name.upper()
    assert (tr.blck_size, tr.type_size) == GGML_QUANT_SIZES[qtype]
    return tr


def ggml_to_float(ggml, raw: np.ndarray, qtype: T) -> np.ndarray:
    """ggml's dequantization of raw ggml blocks -> flat float32."""
    raw = np.ascontiguousarray(raw).view(np.uint8).reshape(-1)
    block, type_size = GGML_QUANT_SIZES[qtype]
    assert raw.size % type_size == 0
    n = raw.size // type_size * block
    tr = _traits(ggml, qtype)
    if not tr.to_float:
        # ggml has no to_float for F32: its "dequantization" is reading the bytes.
        assert qtype == T.F32, f"ggml has no to_float for {qtype.name}"
        return raw.view(np.float32).copy()
    out = np.empty(n, np.float32)
    _TO_FLOAT(tr.to_float)(raw.ctypes.data, out.ctypes.data, n)
    return out


def ggml_quantize_ref(ggml, x: np.ndarray, qtype: T) -> np.ndarray:
    """ggml's reference quantizer (quantize_row_*_ref) -> raw blocks as uint8."""
    x = np.ascontiguousarray(x, np.float32).reshape(-1)
    block, type_size = GGML_QUANT_SIZES[qtype]
    assert x.size % block == 0
    tr = _traits(ggml, qtype)
    assert tr.from_float_ref, f"ggml has no from_float_ref for {qtype.name}"
    out = np.empty(x.size // block * type_size, np.uint8)
    _FROM_FLOAT(tr.from_float_ref)(x.ctypes.data, out.ctypes.data, x.size)
    return out


# -- comparison ------------------------------------------------------------------------

def assert_bit_equal(ours: np.ndarray, ref: np.ndarray, what: str) -> None:
    ours = np.ascontiguousarray(ours, np.float32).reshape(-1)
    ref = np.ascontiguousarray(ref, np.float32).reshape(-1)
    assert ours.shape == ref.shape, f"{what}: {ours.shape} elements vs ggml's {ref.shape}"
    a, b = ours.view(np.uint32), ref.view(np.uint32)
    if not np.array_equal(a, b):
        bad = np.flatnonzero(a != b)
        i = int(bad[0])
        pytest.fail(
            f"{what}: {bad.size} of {a.size} values differ from ggml's to_float; first at "
            f"{i}: ours {ours[i]!r} (0x{a[i]:08x}) vs ggml {ref[i]!r} (0x{b[i]:08x})"
        )


def check_raw(ggml, raw: np.ndarray, qtype: T, what: str) -> None:
    block, type_size = GGML_QUANT_SIZES[qtype]
    rows = np.ascontiguousarray(raw).view(np.uint8).reshape(-1, type_size)  # one block a row
    assert_bit_equal(gguf_dequantize(rows, qtype), ggml_to_float(ggml, rows, qtype), what)


# -- inputs ----------------------------------------------------------------------------

def real_weights(path: Path, n: int) -> np.ndarray:
    """n float32 values taken from real weight matrices (dequantized), plus edge cases."""
    f = GGUFFile(path)
    parts, got = [], 0
    for name, t in f.tensors.items():
        if len(t.shape) == 2 and t.ggml_type != T.F32 and "embd" not in name:
            w = f.dequantize(name).reshape(-1)[: n - got]
            parts.append(w)
            got += w.size
            if got >= n:
                break
    x = np.concatenate(parts)
    # Blocks that stress the quantizers: all zero, constant, one outlier, tiny, huge.
    edge = np.zeros((5, 256), np.float32)
    edge[1] = 0.5
    edge[2, 7] = 40.0
    edge[3] = np.linspace(-1e-6, 1e-6, 256)
    edge[4] = np.linspace(-3e3, 3e3, 256)
    return np.concatenate([x[: n - edge.size], edge.reshape(-1)]).astype(np.float32)


def random_blocks(qtype: T, n_blocks: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    block, type_size = GGML_QUANT_SIZES[qtype]
    if qtype in (T.F16, T.BF16, T.F32):
        bits = {T.F16: 16, T.BF16: 16, T.F32: 32}[qtype]
        dtype = {16: np.uint16, 32: np.uint32}[bits]
        v = rng.integers(0, 2**bits, n_blocks * block, dtype=np.uint64).astype(dtype)
        # keep finite: clear an all-ones exponent (NaN/Inf payloads are not weights)
        exp_mask = {T.F16: 0x7C00, T.BF16: 0x7F80, T.F32: 0x7F800000}[qtype]
        v[(v & exp_mask) == exp_mask] &= dtype((2**bits - 1) ^ exp_mask)
        return v.view(np.uint8)
    raw = rng.integers(0, 256, (n_blocks, type_size), dtype=np.uint8)
    for off in F16_FIELDS[qtype]:
        scale = (rng.standard_normal(n_blocks) * rng.choice([1e-4, 1e-2, 1.0], n_blocks))
        raw[:, off:off + 2] = scale.astype(np.float16).view(np.uint8).reshape(n_blocks, 2)
    return raw


# -- tests -----------------------------------------------------------------------------

@pytest.mark.parametrize("model", sorted(MODEL_TYPES))
def test_every_tensor_of_the_model(request, ggml, model):
    """Whole tensors of the real file, through our reader: GGUFFile.dequantize."""
    f = GGUFFile(request.getfixturevalue(model))
    seen: dict[T, int] = {}
    for name, t in f.tensors.items():
        assert t.ggml_type in CHECKED_TYPES, f"{name}: type {t.type_name} is not covered here"
        assert_bit_equal(f.dequantize(name), ggml_to_float(ggml, f.raw(name), t.ggml_type),
                         f"{model} {name} ({t.type_name})")
        seen[t.ggml_type] = seen.get(t.ggml_type, 0) + 1
    assert set(seen) == MODEL_TYPES[model], (
        f"{model} has types {sorted(q.name for q in seen)}, expected "
        f"{sorted(q.name for q in MODEL_TYPES[model])}")


@pytest.mark.parametrize("qtype", [q for q in CHECKED_TYPES if q != T.F32], ids=lambda q: q.name)
def test_quantized_real_weights(ggml, smollm2_gguf, qtype):
    """Real weights quantized to each type (by gguf-py where it can, else by ggml)."""
    x = real_weights(smollm2_gguf, 64 * 1024)
    if qtype in GGUF_PY_CAN_QUANTIZE:
        raw = gguf_quantize(x.reshape(-1, 256), qtype)
        how = "gguf-py quantize"
    else:
        raw = ggml_quantize_ref(ggml, x, qtype)
        how = "ggml quantize_row_ref"
    check_raw(ggml, raw, qtype, f"{qtype.name} from real weights ({how})")


@pytest.mark.parametrize("qtype", CHECKED_TYPES, ids=lambda q: q.name)
def test_random_blocks(ggml, qtype):
    """Random bits in every field except finite f16 scales (both signs, 3 magnitudes)."""
    check_raw(ggml, random_blocks(qtype, 4096, seed=int(qtype)), qtype,
              f"{qtype.name} random blocks")
