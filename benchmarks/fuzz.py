"""Coverage-guided fuzzing (atheris = libFuzzer for Python) of everything that parses a
file we did not write. Each input must end in a loaded model (or folder, or rendered
template) or in one EdgeRtError of one line: any other exception, a crash, a hang
(> --timeout s) or an allocation the file cannot justify is a finding, saved to
--artifacts. Allocations: after warming up on the seeds, the address space is capped
at what the seeds needed plus --headroom-mb (the seeds are < 100 KB each: nothing in
them justifies reserving more), so a too-large reservation raises MemoryError.

Targets (one libFuzzer process each; tests/fuzz_corpus/TARGET/ holds their seeds):
  gguf      GGUF bytes -> api.load (header, metadata of every type, nested arrays,
            tensor infos, alignment, offsets, checksums, tokenizer from metadata,
            chat template, hyper-parameters), then 2 tokens generated.
            Structure-aware: half the mutations set one GGUF field (a count, a
            length, a type id, a dimension, an offset) to a value near a boundary.
  hf        one file of a tiny Hugging Face folder (config.json, tokenizer.json,
            tokenizer_config.json, model.safetensors, ...) -> open_source + every tensor.
  template  a chat template -> the sandboxed jinja2 render.

  python benchmarks/fuzz.py --runs 1000000 --json    # the long run (BENCHMARKS.md), split over the targets
  python benchmarks/fuzz.py --make-seeds             # rewrite tests/fuzz_corpus from the cached models
"""
from __future__ import annotations

import argparse
import inspect
import json
import os
import random
import re
import resource
import shutil
import struct
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CORPUS = ROOT / "tests" / "fuzz_corpus"
TARGETS = {"gguf": 0.6, "hf": 0.25, "template": 0.15}  # share of --runs
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi <|im_start|> there"},
            {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Bye"}]


# -- GGUF fields, for the structure-aware mutator and the hostile seeds ----------------
def gguf_fields(data: bytes) -> list[tuple[int, int, str]]:
    """(position, size, kind) of every count, length, type id, dimension and offset
    in a GGUF header, as far as it can be walked."""
    fields, pos = [(8, 8, "n_tensors"), (16, 8, "n_kv")], 24

    def u(size, kind):
        nonlocal pos
        fields.append((pos, size, kind))
        v = int.from_bytes(data[pos:pos + size], "little")
        pos += size
        if pos > len(data):
            raise IndexError
        return v

    def string():
        nonlocal pos
        n = u(8, "strlen")
        pos += n

    def value(vtype, depth=0):
        nonlocal pos
        sizes = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
        if vtype in sizes:
            pos += sizes[vtype]
        elif vtype == 8:
            string()
        elif vtype == 9 and depth < 4:
            etype, count = u(4, "etype"), u(8, "count")
            if etype in sizes:
                pos += sizes[etype] * count
                if pos > len(data):
                    raise IndexError
            else:
                for _ in range(min(count, len(data))):
                    value(etype, depth + 1)
        else:
            raise IndexError

    try:
        n_tensors, n_kv = struct.unpack_from("<QQ", data, 8)
        for _ in range(min(n_kv, len(data))):
            key_at = pos + 8
            string()
            key = data[key_at:pos]
            vtype = u(4, "vtype")
            if key == b"general.alignment":
                fields.append((pos, 4, "align"))
            value(vtype)
        for _ in range(min(n_tensors, len(data))):
            string()
            for _ in range(min(u(4, "n_dims"), 8)):
                u(8, "dim")
            u(4, "ttype")
            u(8, "offset")
    except (IndexError, struct.error):
        pass
    return [f for f in fields if f[0] + f[1] <= len(data)]


INTERESTING = {
    1: [0, 1, 0x7F, 0x80, 0xFF],
    2: [0, 1, 0x7FFF, 0x8000, 0xFFFF],
    4: [0, 1, 2, 3, 4, 7, 8, 9, 10, 12, 13, 31, 32, 33, 39, 40, 255, 1 << 16, (1 << 31) - 1, 1 << 31, (1 << 32) - 1],
    8: [0, 1, 2, 31, 32, 63, 64, 4096, 1 << 16, (1 << 31), (1 << 32) - 1, 1 << 32, (1 << 32) + 1, (1 << 62),
        (1 << 63) - 1, 1 << 63, (1 << 64) - 64, (1 << 64) - 32, (1 << 64) - 8, (1 << 64) - 1],
}


def set_field(data: bytes, pos: int, size: int, value: int) -> bytes:
    return data[:pos] + (value % (1 << (8 * size))).to_bytes(size, "little") + data[pos + size:]


def mutate_gguf(data: bytes, max_size: int, seed: int) -> bytes:
    import atheris
    rng = random.Random(seed)
    fields = gguf_fields(data) if data[:4] == b"GGUF" else []
    if not fields or rng.random() < 0.5:
        return atheris.Mutate(data, max_size)
    pos, size, kind = rng.choice(fields)
    old = int.from_bytes(data[pos:pos + size], "little")
    choice = rng.random()
    if choice < 0.5:
        value = rng.choice(INTERESTING[size])
    elif choice < 0.8:
        value = old + rng.choice([-1, 1, -8, 8, 32, -32, len(data), -len(data)])
    else:
        value = old * rng.choice([2, 1 << 16, 1 << 32]) or 1 << 32
    return set_field(data, pos, size, value)[:max_size]


# -- the targets ---------------------------------------------------------------------
class Harness:
    """Everything the targets need, imported under atheris' instrumentation."""

    def __init__(self, work: Path):
        from edge_rt import api
        from edge_rt.converters.readers import open_source
        from edge_rt.errors import EdgeRtError
        from edge_rt.gguf_file import GGUFFile
        from edge_rt.tokenizer import Tokenizer
        self.api, self.open_source, self.EdgeRtError = api, open_source, EdgeRtError
        self.work = work
        self.gguf_path = work / "input.gguf"
        self.hf_dir = work / "hf"
        seed_hf = sorted((CORPUS / "hf-folder").iterdir())
        self.hf_files = [p.name for p in seed_hf]
        shutil.copytree(CORPUS / "hf-folder", self.hf_dir)
        self.hf_seed = {p.name: p.read_bytes() for p in seed_hf}
        g = GGUFFile(next((CORPUS / "gguf").glob("smollm2-*.gguf")))
        self.tok = Tokenizer.from_gguf_meta(g.meta)

    def one_line(self, e: Exception) -> None:
        msg = str(e)
        if not msg or "\n" in msg:
            raise AssertionError(f"an EdgeRtError that is not one line: {msg!r}")

    def gguf(self, data: bytes) -> None:
        self.gguf_path.write_bytes(data)
        try:
            m = self.api.load(self.gguf_path, ctx=64, threads=1)
            text = "".join(m.generate("Hello", 2))
            ids = m.tokenizer.encode("héllo wörld <|im_start|> \u2028 \x00", special=True)
            m.tokenizer.decode(ids + [0, m.tokenizer.n_vocab - 1])
            if m.tokenizer.chat_template:
                m.tokenizer.render_chat(MESSAGES)
            assert isinstance(text, str)
        except self.EdgeRtError as e:
            self.one_line(e)

    def hf(self, data: bytes) -> None:
        if not data:
            return
        name = self.hf_files[data[0] % len(self.hf_files)]
        for n, content in self.hf_seed.items():  # the folder as seeded, one file replaced
            (self.hf_dir / n).write_bytes(data[1:] if n == name else content)
        try:
            src = self.open_source(self.hf_dir)
            for t in src.shapes:
                src.load(t)
        except self.EdgeRtError as e:
            self.one_line(e)

    def template(self, data: bytes) -> None:
        self.tok.chat_template = data.decode("utf-8", "replace")
        try:
            self.tok.render_chat(MESSAGES)
        except self.EdgeRtError as e:
            self.one_line(e)


def instrument(atheris, packages) -> None:
    """Coverage of every function and method of these packages loaded by now (edge_rt is
    imported through the editable install's own loader, which atheris.instrument_imports
    does not see; atheris.instrument_all also instruments numpy & co, 20x slower)."""
    for name, mod in list(sys.modules.items()):
        if name.split(".")[0] not in packages or mod is None:
            continue
        for obj in list(vars(mod).values()):
            if getattr(obj, "__module__", None) != name:
                continue
            members = vars(obj).values() if inspect.isclass(obj) else [obj]
            for f in members:
                f = getattr(f, "__func__", f)  # static and class methods
                if inspect.isfunction(f):
                    atheris.instrument_func(f)


def cap_address_space(headroom_mb: int) -> None:
    vm = int(re.search(r"VmSize:\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1)) * 1024
    limit = vm + (headroom_mb << 20)
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))


def fuzz_one_target(args) -> None:
    """In the child process: run libFuzzer on one target."""
    import atheris
    warnings.simplefilter("ignore")  # numpy's overflow warnings on hostile weights are not findings
    h = Harness(Path(args.work))
    target = getattr(h, args.target)
    seeds = sorted((CORPUS / args.target).iterdir())
    for s in seeds:  # warm up: every lazy import, thread pool and cache the targets use
        target(s.read_bytes())
    instrument(atheris, ("edge_rt", "jinja2", "safetensors"))
    cap_address_space(args.headroom_mb)
    corpus = Path(args.work_corpus)
    corpus.mkdir(parents=True, exist_ok=True)
    argv = [sys.argv[0], f"-runs={args.runs}", f"-timeout={args.timeout}", f"-rss_limit_mb={args.rss_limit_mb}",
            f"-max_len={args.max_len}", f"-artifact_prefix={args.artifacts}/{args.target}-", f"-seed={args.seed}",
            "-print_final_stats=1", str(corpus), str(CORPUS / args.target)]
    if args.max_time:
        argv.insert(2, f"-max_total_time={args.max_time}")
    atheris.Setup(argv, target, custom_mutator=mutate_gguf if args.target == "gguf" else None)
    atheris.Fuzz()


def run_target(target: str, runs: int, args) -> dict:
    """One target in a child process; its libFuzzer statistics."""
    cmd = [sys.executable, __file__, "--child", target, "--runs", str(runs), "--timeout", str(args.timeout),
           "--headroom-mb", str(args.headroom_mb), "--artifacts", args.artifacts, "--seed", str(args.seed),
           "--work-corpus", str(Path(args.work_corpus) / target)]
    if args.max_time:
        cmd += ["--max-time", str(args.max_time)]
    with tempfile.TemporaryDirectory(prefix="ert-fuzz-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None) as work:
        t0 = time.monotonic()
        p = subprocess.run(cmd + ["--work", work], capture_output=True, text=True)  # libFuzzer ends it with exit()
        seconds = time.monotonic() - t0
    log = p.stdout + p.stderr
    done = re.findall(r"#(\d+)\s+DONE\s+cov: (\d+) ft: (\d+) corp: (\d+)", log)
    stat = dict(re.findall(r"stat::(\w+):\s+(\d+)", log))
    result = {"target": target, "exit": p.returncode, "seconds": round(seconds, 1),
              "inputs": int(stat.get("number_of_executed_units", 0)),
              "coverage_edges": int(done[-1][1]) if done else None, "features": int(done[-1][2]) if done else None,
              "corpus": int(done[-1][3]) if done else None, "peak_rss_mb": int(stat.get("peak_rss_mb", 0))}
    if p.returncode:
        result["finding"] = log[-4000:]
    return result


def make_seeds() -> None:
    from fuzz_seeds import write_all  # noqa: PLC0415 (only here: it needs the cached models)
    write_all(CORPUS)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=1_000_000, help="inputs in all, split over the targets")
    ap.add_argument("--targets", default=",".join(TARGETS))
    ap.add_argument("--max-time", type=int, default=0, help="seconds per target (0: no limit)")
    ap.add_argument("--timeout", type=int, default=10, help="seconds one input may take")
    ap.add_argument("--headroom-mb", type=int, default=512)
    ap.add_argument("--rss-limit-mb", type=int, default=2048)
    ap.add_argument("--max-len", type=int, default=1 << 17)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--artifacts", default=str(Path(tempfile.gettempdir()) / "ert-fuzz-findings"))
    ap.add_argument("--work-corpus", default=str(Path(tempfile.gettempdir()) / "ert-fuzz-corpus"))
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--make-seeds", action="store_true")
    ap.add_argument("--child", dest="target", help=argparse.SUPPRESS)
    ap.add_argument("--work", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.make_seeds:
        make_seeds()
        return
    if args.target:
        fuzz_one_target(args)
        return
    Path(args.artifacts).mkdir(parents=True, exist_ok=True)
    chosen = args.targets.split(",")
    share = sum(TARGETS[t] for t in chosen)
    results = []
    for t in chosen:
        r = run_target(t, max(int(args.runs * TARGETS[t] / share), 1), args)
        results.append(r)
        if not args.json:
            print(f"{t:9s} {r['inputs']:9d} inputs in {r['seconds']:7.1f} s, {r['coverage_edges']} edges, "
                  f"corpus {r['corpus']}, exit {r['exit']}", flush=True)
            if r["exit"]:
                print(r["finding"], file=sys.stderr)
    summary = {"inputs": sum(r["inputs"] for r in results), "findings": sum(r["exit"] != 0 for r in results),
               "targets": results}
    if args.json:
        print(json.dumps(summary))
    sys.exit(1 if summary["findings"] else 0)


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    main()
