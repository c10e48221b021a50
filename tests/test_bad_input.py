"""Bad input through the real CLI: hostile GGUF files, missing or unreadable files,
bad sizes, refused runs. Each must end in one line on stderr ("edge-rt: error: ...")
and a non-zero exit: no traceback, no crash, no hang, no large allocation. Also:
a convert interrupted by Ctrl-C or by a full disk leaves nothing at OUT.
"""
from __future__ import annotations

import ctypes
import os
import re
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from edge_rt import formats
from edge_rt.errors import EdgeRtError
from edge_rt.gguf_file import GGUFFile
from edge_rt.plan import parse_size
from tiny import tiny_source, write_tiny

CLI = [sys.executable, "-m", "edge_rt.cli"]
ENV = {k: v for k, v in os.environ.items() if k != "EDGE_RT_DEBUG"}
MAX_SECONDS = 5       # per refused command (startup is ~0.3 s)
MAX_EXTRA_MB = 100    # peak RSS above the same command refusing an empty file


# -- running the CLI ---------------------------------------------------------------
@dataclass
class Result:
    args: list
    rc: int
    out: str
    err: str
    seconds: float
    maxrss_mb: float
    timed_out: bool

    def __str__(self):
        return (f"edge-rt {' '.join(map(str, self.args))}\n  exit {self.rc} after {self.seconds:.2f} s, "
                f"peak RSS {self.maxrss_mb:.0f} MB{' (killed: timeout)' if self.timed_out else ''}\n"
                f"  stdout: {self.out[-800:]!r}\n  stderr: {self.err[-1500:]!r}")


# A small parent between pytest and edge-rt: a child's peak RSS (ru_maxrss) counts its
# parent's RSS at fork, so forking from pytest (200+ MB) would hide what edge-rt uses.
_REAPER = """import os, sys
pid = os.fork()
if pid == 0:
    os.execv(sys.argv[2], sys.argv[2:])
_, status, ru = os.wait4(pid, 0)
with open(sys.argv[1], "w") as f:
    f.write(f"{os.waitstatus_to_exitcode(status)} {ru.ru_maxrss}")
"""


def cli(*args, timeout: float = 30, preexec_fn=None) -> Result:
    """Run `edge-rt ARGS`: exit status, output, seconds and the child's own peak RSS."""
    args = [str(a) for a in args]
    with tempfile.TemporaryDirectory() as d:
        out, err, status = (Path(d) / n for n in ("out", "err", "status"))
        with open(out, "wb") as fo, open(err, "wb") as fe:
            t0 = time.monotonic()
            p = subprocess.Popen([sys.executable, "-S", "-I", "-c", _REAPER, str(status), *CLI, *args],
                                 stdin=subprocess.DEVNULL, stdout=fo, stderr=fe, env=ENV, preexec_fn=preexec_fn,
                                 start_new_session=True)
            try:
                p.wait(timeout)
                timed_out = False
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)  # edge-rt and its reaper
                p.wait()
                timed_out = True
            seconds = time.monotonic() - t0
        rc, maxrss = (int(x) for x in status.read_text().split()) if status.exists() else (p.returncode, 0)
        return Result(args, rc, out.read_text(errors="replace"), err.read_text(errors="replace"), seconds,
                      maxrss / 1024, timed_out)


def assert_error(r: Result, *needles: str, code: int = 1) -> str:
    """Exit `code`, stderr exactly one line "edge-rt: error: ..." holding every needle."""
    assert not r.timed_out, f"hung:\n{r}"
    assert r.rc > 0, f"killed by a signal or exit 0:\n{r}"
    assert r.rc == code, f"exit {r.rc}, expected {code}:\n{r}"
    assert "Traceback" not in r.err, f"traceback:\n{r}"
    lines = r.err.strip().splitlines()
    assert len(lines) == 1, f"{len(lines)} lines on stderr:\n{r}"
    assert lines[0].startswith("edge-rt: error:"), f"not an edge-rt error line:\n{r}"
    for n in needles:
        assert n.lower() in lines[0].lower(), f"{n!r} not in the message:\n{r}"
    return lines[0]


def assert_no_leftovers(folder: Path) -> None:
    left = sorted(p.name for p in folder.iterdir())
    assert not left, f"left behind in {folder}: {left}"


def run_args(path, *extra):
    return ["run", path, "-p", "hi", "-n", "2", *extra]


# -- hostile GGUF files, built by hand ----------------------------------------------
U32, STR, ARR, U64 = 4, 8, 9, 10  # GGUF value types
T_F32, T_Q4_0 = 0, 2


def gstr(s: str | bytes, length: int | None = None) -> bytes:
    b = s.encode() if isinstance(s, str) else s
    return struct.pack("<Q", len(b) if length is None else length) + b


def kv(key: str | bytes, vtype: int, payload: bytes) -> bytes:
    return gstr(key) + struct.pack("<I", vtype) + payload


def kv_str(key, val) -> bytes:
    return kv(key, STR, gstr(val))


def kv_u32(key, val) -> bytes:
    return kv(key, U32, struct.pack("<I", val))


def tinfo(name: str | bytes, ne, type_id: int = T_F32, offset: int = 0, n_dims: int | None = None) -> bytes:
    return (gstr(name) + struct.pack("<I", len(ne) if n_dims is None else n_dims)
            + b"".join(struct.pack("<Q", n) for n in ne) + struct.pack("<IQ", type_id, offset))


BASE_KVS = [kv_str("general.architecture", "llama"), kv_str("general.name", "hostile")]
BASE_INFOS = [tinfo("a.weight", [32], T_F32, 0), tinfo("b.weight", [32, 2], T_F32, 128)]
BASE_DATA = 384  # 128 + 256 bytes of float32


def gguf(kvs=None, infos=None, data: int = BASE_DATA, magic=b"GGUF", version=3, n_tensors=None, n_kv=None,
         align=32) -> bytes:
    kvs = BASE_KVS if kvs is None else kvs
    infos = BASE_INFOS if infos is None else infos
    head = magic + struct.pack("<IQQ", version, len(infos) if n_tensors is None else n_tensors,
                               len(kvs) if n_kv is None else n_kv)
    body = head + b"".join(kvs) + b"".join(infos)
    body += b"\0" * (-len(body) % align)
    return body + np.arange(data // 4, dtype=np.float32).tobytes()


def _offsets():
    kv_end = 24 + sum(map(len, BASE_KVS))
    info_end = kv_end + sum(map(len, BASE_INFOS))
    return kv_end, info_end, info_end + (-info_end % 32)


def nested_array(depth: int) -> bytes:
    """depth arrays, each holding the next, the innermost holding one u32."""
    inner = struct.pack("<IQ", U32, 1) + struct.pack("<I", 7)
    for _ in range(depth - 1):
        inner = struct.pack("<IQ", ARR, 1) + inner
    return inner


def hostile_cases() -> dict[str, tuple[bytes, str]]:
    """name -> (file bytes, a word the message must hold)."""
    base = gguf()
    kv_end, info_end, data_start = _offsets()
    cases = {
        "empty": (b"", "0 bytes"),
        "cut-in-header-10": (base[:10], "only 10 bytes"),
        "cut-in-header-23": (base[:23], "only 23 bytes"),
        "cut-in-first-key": (base[:24 + 5], "not a valid GGUF"),
        "cut-in-metadata": (base[:(24 + kv_end) // 2], "not a valid GGUF"),
        "cut-before-value": (base[:kv_end - 3], "not a valid GGUF"),
        "cut-in-tensor-infos": (base[:kv_end + 7], "not a valid GGUF"),
        "cut-in-last-tensor-info": (base[:info_end - 4], "not a valid GGUF"),
        "cut-in-tensor-data": (base[:data_start + 200], "past the end"),
        "cut-last-byte": (base[:-1], "past the end"),
        "wrong-magic": (gguf(magic=b"GGML"), "magic"),
        "zero-magic": (b"\0" * 64, "magic"),
        "version-1": (gguf(version=1), "version 1"),
        "version-99": (gguf(version=99), "version 99"),
        "tensor-count-2^63": (gguf(n_tensors=2**63), "cannot fit"),
        "kv-count-2^63": (gguf(n_kv=2**63), "cannot fit"),
        "tensor-count-1e6": (gguf(n_tensors=10**6), "cannot fit"),
        "key-length-2^64-1": (gguf(kvs=[gstr(b"general.architecture", 2**64 - 1)] + BASE_KVS), "string of"),
        "value-length-2^64-1": (gguf(kvs=[kv("general.architecture", STR, gstr(b"llama", 2**64 - 1))]),
                                "string of"),
        "name-length-2^64-1": (gguf(infos=[gstr(b"a.weight", 2**64 - 1)]), "string of"),
        "u64-array-of-2^61": (gguf(kvs=BASE_KVS + [kv("x", ARR, struct.pack("<IQ", U64, 2**61))]), "truncated"),
        "string-array-of-2^62": (gguf(kvs=BASE_KVS + [kv("x", ARR, struct.pack("<IQ", STR, 2**62))]), "array of"),
        "nested-arrays-depth-12": (gguf(kvs=BASE_KVS + [kv("x", ARR, nested_array(12))]), "value type 9"),
        "value-type-13": (gguf(kvs=BASE_KVS + [kv("x", 13, b"\0" * 8)]), "value type 13"),
        "value-type-2^32-1": (gguf(kvs=BASE_KVS + [kv("x", 2**32 - 1, b"\0" * 8)]), "value type"),
        "five-dims": (gguf(infos=[tinfo("a.weight", [32, 1, 1, 1, 1])]), "5 dimensions"),
        "zero-dims": (gguf(infos=[tinfo("a.weight", [], n_dims=0)]), "0 dimensions"),
        "dims-2^32-cubed": (gguf(infos=[tinfo("a.weight", [2**32, 2**32, 2**32])]), "past the end"),
        "dims-product-wraps-to-0": (gguf(infos=[tinfo("a.weight", [2**32, 2**32, 2**32, 2**32])]), "past the end"),
        "dims-2^64-1": (gguf(infos=[tinfo("a.weight", [2**64 - 1, 2**64 - 1])]), "past the end"),
        "dim-0": (gguf(infos=[tinfo("a.weight", [32, 0])]), "bad dimensions"),
        "q4_0-row-not-whole-blocks": (gguf(infos=[tinfo("a.weight", [33], T_Q4_0)]), "bad dimensions"),
        "type-id-999": (gguf(infos=[tinfo("a.weight", [32], 999)]), "unknown type id 999"),
        "offsets-overlap": (gguf(infos=[tinfo("a.weight", [32], T_F32, 0), tinfo("b.weight", [32], T_F32, 64)]),
                            "overlaps"),
        "offset-misaligned": (gguf(infos=[tinfo("a.weight", [32], T_F32, 0), tinfo("b.weight", [32], T_F32, 132)]),
                              "misaligned"),
        "offset-past-end": (gguf(infos=[tinfo("a.weight", [32], T_F32, 4096)]), "past the end"),
        "offset-2^64-32": (gguf(infos=[tinfo("a.weight", [32], T_F32, 2**64 - 32)]), "past the end"),
        "alignment-0": (gguf(kvs=BASE_KVS + [kv_u32("general.alignment", 0)]), "alignment 0"),
        "alignment-3": (gguf(kvs=BASE_KVS + [kv_u32("general.alignment", 3)], align=3), "alignment 3"),
        "alignment-a-string": (gguf(kvs=BASE_KVS + [kv_str("general.alignment", "32")]), "alignment"),
        "duplicate-tensor-names": (gguf(infos=[tinfo("a.weight", [32], T_F32, 0),
                                               tinfo("a.weight", [32], T_F32, 128)]), "appears twice"),
        "key-not-utf8": (gguf(kvs=BASE_KVS + [kv(b"general.\xff\xfe", U32, b"\0" * 4)]), "UTF-8"),
        "tensor-name-not-utf8": (gguf(infos=[tinfo(b"a.\xc3(", [32])]), "UTF-8"),
    }
    return cases


CASES = hostile_cases()
# the cases also given to `run` and `convert` (every one goes through `inspect`)
THROUGH_ALL = ["cut-in-header-10", "cut-in-tensor-infos", "cut-in-tensor-data", "tensor-count-2^63",
               "dims-2^32-cubed", "type-id-999"]


@pytest.fixture(scope="module")
def hostile(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("hostile")
    for name, (data, _) in CASES.items():
        (d / f"{name}.gguf").write_bytes(data)
    return d


@pytest.fixture(scope="module")
def baseline_mb(hostile, tmp_path_factory) -> dict[str, float]:
    """Peak RSS of each command refusing an empty file: what the imports cost."""
    out = tmp_path_factory.mktemp("baseline") / "out.gguf"
    empty = hostile / "empty.gguf"
    got = {}
    for cmd, args in {"inspect": ["inspect", empty], "run": run_args(empty),
                      "convert": ["convert", empty, "-o", out]}.items():
        r = cli(*args)
        assert_error(r, "empty.gguf", "0 bytes")
        got[cmd] = r.maxrss_mb
    return got


def test_the_unspoiled_hand_built_file_opens(tmp_path):
    """The hostile cases are each one defect away from a file the reader accepts."""
    p = tmp_path / "base.gguf"
    p.write_bytes(gguf())
    g = GGUFFile(p)
    assert g.arch == "llama" and set(g.tensors) == {"a.weight", "b.weight"}
    assert g.array("b.weight").shape == (2, 32) and g.array("b.weight")[1, 0] == 64
    p.write_bytes(gguf(kvs=BASE_KVS + [kv("x", ARR, nested_array(3))]))  # nesting within the limit is fine
    GGUFFile(p)


def _check_hostile(r: Result, name: str, cmd: str, baseline: dict) -> None:
    assert_error(r, f"{name}.gguf", CASES[name][1])
    assert r.seconds < MAX_SECONDS, f"took {r.seconds:.1f} s:\n{r}"
    assert r.maxrss_mb < baseline[cmd] + MAX_EXTRA_MB, f"peak RSS {r.maxrss_mb:.0f} MB:\n{r}"


@pytest.mark.parametrize("name", list(CASES))
def test_hostile_gguf_inspect(name, hostile, baseline_mb):
    _check_hostile(cli("inspect", hostile / f"{name}.gguf", timeout=20), name, "inspect", baseline_mb)


@pytest.mark.parametrize("name", THROUGH_ALL)
def test_hostile_gguf_run(name, hostile, baseline_mb):
    _check_hostile(cli(*run_args(hostile / f"{name}.gguf"), timeout=20), name, "run", baseline_mb)


@pytest.mark.parametrize("name", THROUGH_ALL)
def test_hostile_gguf_convert(name, hostile, baseline_mb, tmp_path):
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    r = cli("convert", hostile / f"{name}.gguf", "-o", out_dir / "out.gguf", timeout=20)
    _check_hostile(r, name, "convert", baseline_mb)
    assert_no_leftovers(out_dir)


# -- random mutants, in process ------------------------------------------------------
def _mutation_base(path: Path) -> bytes:
    """A small valid GGUF of several value and tensor types, by gguf-py's writer."""
    from gguf import GGMLQuantizationType, GGUFWriter
    from gguf.quants import quantize
    w = GGUFWriter(path, "llama")
    w.add_name("mutant")
    w.add_uint32("llama.block_count", 2)
    w.add_float32("llama.attention.layer_norm_rms_epsilon", 1e-6)
    w.add_bool("x.flag", True)
    w.add_array("tokenizer.ggml.tokens", [f"tok{i}" for i in range(60)])
    w.add_array("tokenizer.ggml.scores", [float(i) for i in range(60)])
    w.add_array("x.ints", [1, 2, 3])
    rng = np.random.default_rng(0)
    w.add_tensor("a.weight", rng.standard_normal(64).astype(np.float32))
    w.add_tensor("b.weight", rng.standard_normal((4, 32)).astype(np.float16))
    w.add_tensor("c.weight", np.arange(16, dtype=np.int32))
    for t, name in ((GGMLQuantizationType.Q4_0, "d.weight"), (GGMLQuantizationType.Q8_0, "e.weight")):
        w.add_tensor(name, quantize(rng.standard_normal((2, 64)).astype(np.float32), t), raw_dtype=t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path.read_bytes()


N_MUTANTS = 500
INTERESTING = [0, 1, 2**31, 2**32 - 1, 2**32, 2**63, 2**64 - 1, 64, 4096]


def _mutate(base: bytes, rng) -> bytes:
    b = bytearray(base)
    span = min(4096, len(b))
    kind = rng.integers(5)
    if kind == 0:  # truncate
        return bytes(b[:rng.integers(0, len(b))])
    for _ in range(rng.integers(1, 9)):
        i = int(rng.integers(span))
        if kind == 1:
            b[i] ^= 1 << int(rng.integers(8))
        elif kind == 2:
            b[i] = int(rng.integers(256))
        elif kind == 3 and i + 8 <= len(b):  # a field-sized overwrite with a boundary value
            b[i:i + 8] = struct.pack("<Q", INTERESTING[rng.integers(len(INTERESTING))])
        else:
            b[i] = (0, 0xFF)[int(rng.integers(2))]
    return bytes(b)


def test_random_mutants_open_or_raise_edge_rt_error(tmp_path):
    base = _mutation_base(tmp_path / "base.gguf")
    g = GGUFFile(tmp_path / "base.gguf")
    assert len(g.tensors) == 5 and len(base) < 8192
    rng = np.random.default_rng(20240611)
    bad, opened, refused, slowest = [], 0, 0, 0.0
    t_all = time.monotonic()
    for i in range(N_MUTANTS):
        data = _mutate(base, rng)
        p = tmp_path / f"m{i}.gguf"  # a new file each time: earlier mappings stay valid
        p.write_bytes(data)
        t0 = time.monotonic()
        try:
            g = GGUFFile(p)
            for name in g.tensors:  # every tensor the reader accepts can be viewed
                g.raw(name)
            opened += 1
        except EdgeRtError as e:
            assert "\n" not in str(e)
            refused += 1
        except Exception as e:  # noqa: BLE001 (any other exception is the failure)
            bad.append(f"mutant {i} ({len(data)} bytes): {type(e).__name__}: {e}")
        slowest = max(slowest, time.monotonic() - t0)
        p.unlink()
    assert not bad, "\n".join(bad)
    assert refused > N_MUTANTS // 2 and opened > 0, (opened, refused)  # the loop exercises both outcomes
    assert slowest < 1.0 and time.monotonic() - t_all < 20


# -- sizes -------------------------------------------------------------------------
@pytest.mark.parametrize("text,value", [("2GB", 2 << 30), ("2G", 2 << 30), ("2GiB", 2 << 30), ("512M", 512 << 20),
                                        ("1.5G", 3 << 29), ("100", 100), ("2gb", 2 << 30), (" 64 K ", 64 << 10)])
def test_parse_size_accepts(text, value):
    assert parse_size(text) == value


@pytest.mark.parametrize("text", ["2XB", "", "-1G", "G", "1.2.3G", "2 G B", "0x10M"])
def test_parse_size_refuses(text):
    with pytest.raises(EdgeRtError, match="cannot read size"):
        parse_size(text)


def test_cli_refuses_a_bad_budget(tiny_models):
    assert_error(cli(*run_args(tiny_models["t4"], "--mem-budget", "2XB")), "2XB", "--mem-budget", code=2)


# -- real models, refused for a reason -----------------------------------------------
def _patch_u32(data: bytes, key: str, value: int) -> bytes:
    k = key.encode()
    i = data.index(gstr(k) + struct.pack("<I", U32)) + 8 + len(k) + 4
    return data[:i] + struct.pack("<I", value) + data[i + 4:]


def _patch_arch(data: bytes, new: str) -> bytes:
    old = gstr("general.architecture") + struct.pack("<I", STR) + gstr("llama")
    assert len(new) == 5 and data.count(old) == 1
    return data.replace(old, gstr("general.architecture") + struct.pack("<I", STR) + gstr(new))


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory, smollm2_gguf) -> dict[str, Path]:
    """t4: our 4-bit tiny llama (5.6 MB); src32: a plain float32 GGUF of it (29 MB), a convert source."""
    from edge_rt.converters.quantize import choose_formats
    from edge_rt.converters.writers import edge_rt_items, write_gguf
    d = tmp_path_factory.mktemp("tiny")
    t4 = write_tiny("llama", smollm2_gguf, d / "t4.gguf", bits=4)
    src = tiny_source("llama", smollm2_gguf)
    items, extra = edge_rt_items(src, choose_formats(src.shapes, 32, 64))
    write_gguf(d / "src32.gguf", src, items, extra, progress=False)
    return {"t4": t4, "src32": d / "src32.gguf", "dir": d}


def test_the_tiny_model_runs(tiny_models):
    """The refusals below are of this file, changed in one way."""
    r = cli(*run_args(tiny_models["t4"]))
    assert r.rc == 0, str(r)


def test_unsupported_architecture(tiny_models, tmp_path):
    run_me = tmp_path / "mamba.gguf"
    run_me.write_bytes(_patch_arch(tiny_models["t4"].read_bytes(), "mamba"))
    src = tmp_path / "mamba-src.gguf"
    src.write_bytes(_patch_arch(tiny_models["src32"].read_bytes(), "mamba"))
    for args in (["inspect", run_me], run_args(run_me), ["convert", src, "-o", tmp_path / "out.gguf"]):
        assert_error(cli(*args), "unsupported architecture", "mamba")
    assert not (tmp_path / "out.gguf").exists()


def test_other_layout_version_says_convert_again(tiny_models, tmp_path):
    p = tmp_path / "old.gguf"
    p.write_bytes(_patch_u32(tiny_models["t4"].read_bytes(), "edgert.format_version", formats.FORMAT_VERSION + 1))
    assert_error(cli(*run_args(p)), "old.gguf", f"version {formats.FORMAT_VERSION + 1}", "convert")


def test_llama_cpp_quant_types_say_convert_first(smollm2_gguf):
    line = assert_error(cli(*run_args(smollm2_gguf)), smollm2_gguf.name, "convert")
    assert "edge-rt convert" in line


def test_ctx_beyond_the_trained_context(tiny_models):
    assert_error(cli(*run_args(tiny_models["t4"], "--ctx", "5000")), "--ctx 5000", "4096")
    assert_error(cli(*run_args(tiny_models["t4"], "--ctx", "1")), "--ctx", code=2)


def test_prompt_plus_n_longer_than_ctx(tiny_models):
    r = cli("run", tiny_models["t4"], "-p", "one two three four five six seven eight nine ten", "-n", "4",
            "--ctx", "8")
    assert_error(r, "-n 4", "--ctx 8", "prompt")


def test_budget_below_the_plan_names_one_that_works(tiny_models):
    """The named budget must then succeed (twice: the plan's runtime part is measured)."""
    for _ in range(2):
        line = assert_error(cli(*run_args(tiny_models["t4"], "--mem-budget", "1M")), "too small")
        m = re.search(r"try --mem-budget (\d+M)\b", line)
        assert m, line
        r = cli(*run_args(tiny_models["t4"], "--mem-budget", m.group(1)))
        assert r.rc == 0, f"the budget the refusal named was refused:\n{r}"


@pytest.mark.parametrize("key,value", [("llama.attention.head_count", 0), ("llama.attention.head_count", 3),
                                       ("llama.attention.head_count_kv", 0), ("llama.attention.key_length", 0)])
def test_absurd_hyper_parameters(tiny_models, tmp_path, key, value):
    """Metadata that disagrees with the tensors: refused, not a numpy error mid-run."""
    p = tmp_path / "absurd.gguf"
    p.write_bytes(_patch_u32(tiny_models["t4"].read_bytes(), key, value))
    assert_error(cli(*run_args(p)), "absurd.gguf")


def _retype(data: bytes, name: str, ne: list[int], old: int, new: int) -> bytes:
    """The tensor info of `name` with its ggml type id changed (same bytes per element)."""
    head = gstr(name) + struct.pack("<I", len(ne)) + b"".join(struct.pack("<Q", n) for n in ne)
    info = head + struct.pack("<I", old)
    assert data.count(info) == 1
    return data.replace(info, head + struct.pack("<I", new))


I32 = 26  # ggml's integer tensor type: readable, but nothing a model's weights are


def test_integer_tensor_type_in_a_convert_source(tiny_models, tmp_path):
    """gguf-py cannot dequantize I8/I16/I32/I64/F64/Q8_1/Q8_K: a clear refusal, not a NotImplementedError."""
    src = tmp_path / "int.gguf"
    src.write_bytes(_retype(tiny_models["src32"].read_bytes(), "output_norm.weight", [128], 0, I32))
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    assert_error(cli("convert", src, "-o", out_dir / "out.gguf"), "int.gguf", "I32")
    assert_no_leftovers(out_dir)


def test_integer_norm_weights_are_refused_by_run(tiny_models, tmp_path):
    """A norm vector of int32 is not a model edge-rt can run: refused, not read as numbers."""
    p = tmp_path / "int-norm.gguf"
    p.write_bytes(_retype(tiny_models["t4"].read_bytes(), "output_norm.weight", [128], 0, I32))
    assert_error(cli(*run_args(p)), "int-norm.gguf", "I32")


# -- files that are not there, not files, or not readable ----------------------------
def test_missing_file(tmp_path):
    p = tmp_path / "nope.gguf"
    for args in (["inspect", p], run_args(p), ["convert", p, "-o", tmp_path / "out.gguf"]):
        assert_error(cli(*args), "nope.gguf", "no such")
    assert_no_leftovers(tmp_path)


def test_name_too_long(tmp_path):
    p = tmp_path / ("a" * 5000 + ".gguf")
    for args in (["inspect", p], run_args(p)):
        line = assert_error(cli(*args))
        assert len(line) < 1000, "the message should not echo 5000 characters"


def test_folder_as_model(tmp_path):
    d = tmp_path / "folder"
    d.mkdir()
    for args in (["inspect", d], run_args(d)):
        assert_error(cli(*args), "folder")
    assert_error(cli("convert", d, "-o", tmp_path / "out.gguf"), "folder", "config.json")  # a Hugging Face folder?
    assert not (tmp_path / "out.gguf").exists()


def test_output_is_a_folder_or_in_a_missing_folder(tiny_models, tmp_path):
    assert_error(cli("convert", tiny_models["src32"], "-o", tmp_path), code=2)  # click: dir_okay=False
    assert_error(cli("convert", tiny_models["src32"], "-o", tmp_path / "no" / "out.gguf"), "no such folder")
    assert_no_leftovers(tmp_path)


def test_special_files(tmp_path):
    assert_error(cli("inspect", "/dev/null"), "/dev/null", "not a regular file")
    fifo = tmp_path / "pipe.gguf"
    os.mkfifo(fifo)  # nobody writes to it: opening it must not wait forever
    for args in (["inspect", fifo], run_args(fifo), ["convert", fifo, "-o", tmp_path / "out.gguf"]):
        assert_error(cli(*args, timeout=3), "pipe.gguf")


def _drop_dac_capabilities():
    """In the child: give up CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH, so that root
    obeys file modes after exec (PR_CAPBSET_DROP = 24)."""
    libc = ctypes.CDLL(None, use_errno=True)
    for cap in (1, 2):
        if libc.prctl(24, cap, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")


def test_unreadable_file(tiny_models, tmp_path):
    p = tmp_path / "secret.gguf"
    shutil.copy(tiny_models["t4"], p)
    p.chmod(0)
    if os.geteuid() == 0:
        probe = subprocess.run(["cat", str(p)], preexec_fn=_drop_dac_capabilities, capture_output=True)
        if probe.returncode == 0:
            pytest.skip("running as root and cannot drop CAP_DAC_OVERRIDE: chmod 000 does not stop reads")
        kw = {"preexec_fn": _drop_dac_capabilities}
    else:
        kw = {}
    for args in (["inspect", p], run_args(p), ["convert", p, "-o", tmp_path / "out.gguf"]):
        assert_error(cli(*args, **kw), "secret.gguf", "permission denied")
    assert not (tmp_path / "out.gguf").exists()


def test_unreadable_proc_file():
    p = Path("/proc/sys/vm/compact_memory")  # write-only (0200), even for root
    try:
        p.open("rb").close()
        pytest.skip(f"{p} is not there or is readable here")
    except FileNotFoundError:
        pytest.skip(f"{p} is not there")
    except PermissionError:
        pass
    assert_error(cli("inspect", p), str(p), "permission denied")


# -- convert sources that are not GGUF ------------------------------------------------
def test_pytorch_bin_file_suggests_safetensors(tmp_path):
    p = tmp_path / "pytorch_model.bin"
    p.write_bytes(b"PK\x03\x04" + b"\0" * 60)  # torch.save's zip
    assert_error(cli("convert", p, "-o", tmp_path / "out.gguf"), "pytorch_model.bin", "safetensors")
    assert not (tmp_path / "out.gguf").exists()


def test_pytorch_bin_folder_suggests_safetensors(tmp_path):
    d = tmp_path / "hf"
    d.mkdir()
    (d / "config.json").write_text(
        '{"architectures": ["LlamaForCausalLM"], "model_type": "llama", "num_hidden_layers": 2, "hidden_size": 32, '
        '"intermediate_size": 48, "num_attention_heads": 4, "num_key_value_heads": 2, "rms_norm_eps": 1e-6, '
        '"max_position_embeddings": 4096, "vocab_size": 49152, "rope_theta": 10000.0, "tie_word_embeddings": false}')
    (d / "pytorch_model.bin").write_bytes(b"\x80\x02not really a pickle")
    assert_error(cli("convert", d, "-o", tmp_path / "out.gguf"), "pytorch_model.bin", "safetensors")
    assert not (tmp_path / "out.gguf").exists()


def test_edge_rt_file_as_convert_source(tiny_models, tmp_path):
    assert_error(cli("convert", tiny_models["t4"], "-o", tmp_path / "out.gguf"), "t4.gguf", "already")
    assert_no_leftovers(tmp_path)


# -- atomic output ------------------------------------------------------------------
def test_ctrl_c_during_convert_leaves_nothing(smollm2_gguf, tmp_path):
    """SIGINT at random moments of a real convert: OUT is absent, or complete."""
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    out = out_dir / "smol.gguf"
    args = CLI + ["convert", str(smollm2_gguf), "-o", str(out), "--bits", "4", "--method", "rtn"]
    t0 = time.monotonic()
    subprocess.run(args, check=True, capture_output=True, env=ENV, timeout=300)
    full = time.monotonic() - t0
    n_tensors = len(GGUFFile(out).tensors)
    out.unlink()
    rng = np.random.default_rng(7)
    outcomes = []
    for trial in range(5):
        # as from a terminal: a launcher without job control (CI, `cmd &` in a script)
        # starts us with SIGINT ignored, and Python keeps an ignored SIGINT ignored
        p = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             env=ENV, text=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        # once the temporary output exists (the write has begun), a random moment of
        # the write: robust to the machine's speed drifting between runs
        t_start = time.monotonic()
        while p.poll() is None and not list(out_dir.glob(".*.part")) and time.monotonic() - t_start < 120:
            time.sleep(0.01)
        delay = float(rng.uniform(0.0, 0.5)) * full * 0.5
        time.sleep(delay)
        if p.poll() is None:
            p.send_signal(signal.SIGINT)
        stdout, stderr = p.communicate(timeout=120)
        what = f"trial {trial}: SIGINT after {delay:.2f} s of {full:.2f} s: exit {p.returncode}, stderr {stderr!r}"
        assert "Traceback" not in stderr, what
        if p.returncode == 0:  # finished first: the file is whole
            assert len(GGUFFile(out).tensors) == n_tensors, what
            out.unlink()
        else:
            assert p.returncode == 130, what
            assert stderr.strip().splitlines() == ["edge-rt: interrupted"], what
            assert not out.exists(), what
        assert_no_leftovers(out_dir)
        outcomes.append(p.returncode)
    assert outcomes.count(130) >= 3, f"the signals mostly came too late to test anything: {outcomes}"


@pytest.fixture
def small_tmpfs(tmp_path):
    """mount(size) -> a folder on a tmpfs of that size; unmounted afterwards."""
    mounted = []

    def mount(size: str) -> Path:
        d = tmp_path / f"tmpfs-{size}"
        d.mkdir()
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(d)],
                           capture_output=True, text=True)
        if r.returncode:
            pytest.skip(f"cannot mount a tmpfs to fill (needs root or CAP_SYS_ADMIN): {r.stderr.strip()}")
        mounted.append(d)
        return d
    yield mount
    for d in mounted:
        subprocess.run(["umount", str(d)], check=True)


@pytest.mark.parametrize("size,phase", [("8m", "tensor data"), ("64k", "metadata")])
def test_full_disk_leaves_nothing(tiny_models, small_tmpfs, size, phase):
    """A 29 MB convert into a tmpfs of `size`: the disk fills while writing `phase`."""
    d = small_tmpfs(size)
    r = cli("convert", tiny_models["src32"], "-o", d / "out.gguf", "--bits", "32")
    assert_error(r, "out.gguf", "space")
    assert_no_leftovers(d)
