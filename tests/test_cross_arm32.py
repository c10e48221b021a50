"""32-bit ARM builds of the C library under qemu-arm (Debian's cross compilers, `make cross`).

- armv7-a, hard float, -mfpu=neon (arm-linux-gnueabihf), run as a Cortex-A7 (Raspberry Pi 2);
  and with -mfpu=neon-vfpv4 -mfp16-format=ieee (the Pi 2's full FPU: fused multiply-add and
  float16 conversions, which the layer's NEON helpers use when the build has them).
- armv6 without NEON (arm-linux-gnueabi: Debian's armel is built for ARMv5TE, so its libc runs
  on an ARMv6 core; 32-bit Raspberry Pi OS is armv6 + VFP2), run as an ARM1176 (Pi 1 / Zero).

Both run the matmul kernels of ref.c: arm/neon.c is AArch64 code, and there are no 32-bit
NEON matmul kernels (by design, CMakeLists.txt). The layer's vector helpers (layer.c:
attention over the KV cache, softmax, GLU) have 32-bit NEON twins: the armv7 run asserts that
NEON is detected (HWCAP_NEON, shown by `edge-rt info`), that every format dispatches to
`:ref`, and that the layer runs the NEON helpers, checked against the portable ones
(kernel_check.c's layer cases); the armv6 run asserts that NEON is not detected, that the
layer runs the portable helpers, and that the library holds no NEON code. The scalar
path is checked by tests/arm/kernel_check.c --ref-digest: a hash of the reference outputs
(matmul and dequantization) of every format on every test shape, which must be identical,
bit for bit, to the same driver's native run on this machine (the native reference is
tested against the numpy definitions in tests/test_kernels.py).
"""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from edge_rt import formats
from edge_rt import kernels as K
from test_kernels import REPO, cross_build

TARGETS = {
    # name: (compiler, CMAKE_SYSTEM_PROCESSOR, flags, qemu -cpu, sysroot)
    "armv7": ("arm-linux-gnueabihf-gcc", "armv7-a", "-march=armv7-a -mfpu=neon -mfloat-abi=hard",
              "cortex-a7", "/usr/arm-linux-gnueabihf"),
    # the layer helpers' other 32-bit NEON paths: fused multiply-add and float16 conversions
    "armv7-vfpv4": ("arm-linux-gnueabihf-gcc", "armv7-a",
                    "-march=armv7-a -mfpu=neon-vfpv4 -mfp16-format=ieee -mfloat-abi=hard",
                    "cortex-a7", "/usr/arm-linux-gnueabihf"),
    "armv6": ("arm-linux-gnueabi-gcc", "armv6", "-march=armv6 -marm -mfpu=vfp -mfloat-abi=softfp",
              "arm1176", "/usr/arm-linux-gnueabi"),
}


def _build(tmp_path_factory, target):
    cc, processor, cflags, cpu, sysroot = TARGETS[target]
    tools = {t: shutil.which(t) for t in (cc, "qemu-arm", "cmake", cc.replace("-gcc", "-readelf"))}
    missing = [t for t, p in tools.items() if not p]
    if missing:
        pytest.skip(f"{target} check needs {', '.join(missing)} (make cross: apt-get install "
                    "gcc-arm-linux-gnueabihf gcc-arm-linux-gnueabi qemu-user cmake)")
    if not Path(sysroot).is_dir():
        pytest.skip(f"no {target} sysroot at {sysroot}")
    build = tmp_path_factory.mktemp(target)
    exe = cross_build(build, tools["cmake"], tools[cc], processor, cflags)
    return {"exe": exe, "build": build, "cpu": cpu, "sysroot": sysroot, "qemu": tools["qemu-arm"],
            "readelf": tools[cc.replace("-gcc", "-readelf")]}


@pytest.fixture(scope="module")
def armv7(tmp_path_factory):
    return _build(tmp_path_factory, "armv7")


@pytest.fixture(scope="module")
def armv7_vfpv4(tmp_path_factory):
    return _build(tmp_path_factory, "armv7-vfpv4")


@pytest.fixture(scope="module")
def armv6(tmp_path_factory):
    return _build(tmp_path_factory, "armv6")


@pytest.fixture(scope="module")
def native_digest(tmp_path_factory):
    """kernel_check --ref-digest built natively against the installed library."""
    cc = shutil.which("cc") or shutil.which("gcc")
    if not cc:
        pytest.skip("no native C compiler")
    lib = K.library_path()
    exe = tmp_path_factory.mktemp("native") / "kernel_check"
    subprocess.run([cc, "-O2", f"-I{REPO / 'kernels_c/include'}", str(REPO / "tests/arm/kernel_check.c"), "-o", str(exe),
                    str(lib), "-lm", f"-Wl,-rpath,{lib.parent}"], check=True, capture_output=True)
    r = subprocess.run([str(exe), "--ref-digest"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    return _digests(r.stdout)


def _digests(out: str) -> list[str]:
    lines = [x for x in out.splitlines() if x.startswith("digest: ")]
    assert len(lines) > 50, out  # every format on every shape
    return lines


def _qemu(b, *args):
    return subprocess.run([b["qemu"], "-cpu", b["cpu"], "-L", b["sysroot"], "-E", f"LD_LIBRARY_PATH={b['build']}",
                           str(b["exe"]), *args], capture_output=True, text=True, timeout=300)


def _check(b, native_digest, neon: bool):
    r = _qemu(b)
    assert r.returncode == 0, r.stdout + r.stderr
    features = r.stdout.splitlines()[0]
    assert features.startswith("features:"), r.stdout
    assert ("neon" in features.split()) == neon, features
    for name in formats.FORMAT_IDS:  # the scalar path, by design, on both (no 32-bit NEON matmul kernels)
        assert f"kernel: {name}:ref\n" in r.stdout, r.stdout
    assert f"layer: {'neon' if neon else 'ref'}\n" in r.stdout, r.stdout
    assert ("checked layer: neon " in r.stdout) == neon, r.stdout  # NEON helpers against the portable ones
    assert "PASSED" in r.stdout, r.stdout
    r = _qemu(b, "--ref-digest")
    assert r.returncode == 0, r.stdout + r.stderr
    got = _digests(r.stdout)
    diff = [f"{n}  !=  {g}" for n, g in zip(native_digest, got) if n != g]
    assert len(got) == len(native_digest) and not diff, "\n".join(diff[:10])


def _attributes(b) -> str:
    return subprocess.run([b["readelf"], "-A", str(b["build"] / "libedgert.so")], capture_output=True, text=True,
                          check=True).stdout


def test_armv7_neon_qemu(armv7, native_digest):
    attrs = _attributes(armv7)
    assert "Tag_CPU_arch: v7" in attrs and "Tag_Advanced_SIMD_arch: NEON" in attrs, attrs
    _check(armv7, native_digest, neon=True)


def test_armv7_neon_vfpv4_qemu(armv7_vfpv4, native_digest):
    attrs = _attributes(armv7_vfpv4)
    assert "Tag_Advanced_SIMD_arch: NEONv1 with Fused-MAC" in attrs and "Tag_ABI_FP_16bit_format: IEEE 754" in attrs, attrs
    _check(armv7_vfpv4, native_digest, neon=True)


def test_armv6_without_neon_qemu(armv6, native_digest):
    attrs = _attributes(armv6)
    assert "Tag_CPU_arch: v6" in attrs and "Advanced_SIMD" not in attrs, attrs
    _check(armv6, native_digest, neon=False)
