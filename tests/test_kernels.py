"""The C kernels (libedgert via edge_rt.kernels) against the numpy definitions in
edge_rt/formats.py: matmul vs formats.matmul_reference (tight tolerance), row
dequantization bit-exact with fmt.dequantize, SIMD vs forced scalar reference,
thread-count independence, and (when a cross compiler and qemu are installed) the
aarch64 NEON / NEON-dotprod kernels under qemu."""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from edge_rt import formats
from edge_rt import kernels as K

REPO = Path(__file__).resolve().parents[1]
GROUP_BITS = [1, 2, 3, 4, 8]
# (rows, cols): one row, the minimum width, odd row counts (not multiples of 8/16/32),
# and cols=192 / 96 which leave a ragged last group for g=128 / g=64
SHAPES = [(1, 32), (37, 192), (67, 256), (33, 96), (130, 576)]
NS = [1, 3, 17]
TOL = 1e-5  # of the output's scale (max |y|)


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


def close(y, ref):
    scale = float(np.abs(ref).max()) or 1.0
    err = float(np.abs(y.astype(np.float64) - ref).max()) if y.size else 0.0
    return err <= TOL * scale, err / scale


# --------------------------------------------------------------------------- matmul

@pytest.mark.parametrize("fmt", list(fmt_cases()))
def test_matmul_matches_reference(fmt):
    rng = np.random.default_rng(hash(fmt.name) % 2**32 + getattr(fmt, "group_size", 0))
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
                    ok, rel = close(y, ref)
                    assert ok, f"{fmt.name} {rows}x{cols} n={n} isa={isa} threads={threads}: rel err {rel:.3g}"
                    outs[isa, threads] = y
            # a row is computed the same way whichever thread computes it
            for isa in ("auto", "ref"):
                for threads in (2, rows + 5):
                    assert np.array_equal(outs[isa, 1], outs[isa, threads]), (fmt.name, rows, cols, n, isa, threads)
            K.force_isa("auto")


@pytest.mark.parametrize("bits", GROUP_BITS)
def test_matmul_larger_threads_prefill(bits):
    """Big enough for the threaded path; n=37 exercises the 4-row blocks and the tail."""
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
    """With power-of-two scales everything is exact in float32: the kernels must then
    agree with the reference to the last bit (catches any off-by-one in the codes)."""
    rng = np.random.default_rng(7)
    for bits in GROUP_BITS:
        fmt = formats.GroupQuant(bits, 64)
        rows, cols = 20, 192
        parts = fmt.quantize(rand_weight(rng, rows, cols))
        ng = fmt.groups(cols)
        parts["scale"] = np.full((rows, ng), 2.0**-6, np.float16)
        parts["min"] = (-(2.0 ** (bits - 1)) * 2.0**-6 + rng.integers(-4, 4, (rows, ng)) * 2.0**-8).astype(np.float16)
        x = rng.integers(-127, 128, (3, cols)).astype(np.float32)
        x[:, ::32] = 127.0  # amax = 127 in every block: q == x, da == 1
        w = K.Weight(fmt, rows, cols, parts)
        ref = formats.matmul_reference(fmt, parts, cols, x)
        for isa in ("auto", "ref"):
            K.force_isa(isa)
            assert np.array_equal(K.matmul(w, x), ref), (bits, isa)


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

def test_kernel_names_and_features():
    feats = K.cpu_features().split()
    for name, fid in formats.FORMAT_IDS.items():
        kname = K.kernel_name(fid)
        assert kname.startswith(name + ":"), kname
        if "avx2" in feats and "fma" in feats and "f16c" in feats:
            assert kname == f"{name}:avx2", kname
    assert K.kernel_name(99) == "?"
    K.force_isa("ref")
    assert all(K.kernel_name(fid).endswith(":ref") for fid in formats.FORMAT_IDS.values())
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
    for name in ("q1", "q2", "q3", "q4", "q8"):
        assert f"kernel: {name}:neon-dotprod" in r.stdout, r.stdout
    assert "kernel: f32:neon" in r.stdout and "kernel: f16:neon" in r.stdout
    assert "checked: neon\n" in r.stdout and "checked: neon-dotprod" in r.stdout and "PASSED" in r.stdout


def test_arm_neon_without_dotprod_qemu(arm_build):
    r = _qemu(arm_build, "cortex-a72")  # ARMv8.0: sdot would be SIGILL
    assert r.returncode == 0, r.stdout + r.stderr
    assert "dotprod" not in r.stdout.split("\n")[0]
    for name in ("q1", "q2", "q3", "q4", "q8"):
        assert f"kernel: {name}:neon\n" in r.stdout, r.stdout
    assert "checked: neon\n" in r.stdout and "neon-dotprod" not in r.stdout and "PASSED" in r.stdout


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
