#!/usr/bin/env python3
"""Quality per byte: wikitext-2 test perplexity against file size, for llama.cpp's
Q8_0 / Q4_K_M / Q4_1 / Q4_0 / Q3_K_S / Q2_K (each plain and with an importance matrix
from the validation text) and edge-rt's 8/4/3/2-bit and mixed-precision files.

    .venv/bin/python benchmarks/bench_quality.py [--models smollm2-135m,gemma3-270m]
        [--windows 40] [--ctx 512] [--rows ROW,...] [--plot quality.png] [--json]
        [--save quality-MODEL.json]   # rewritten after each row; rows already in it are skipped

Every file comes from one float32 source per model (`edge-rt convert NAME --bits 32
--format llama.cpp`, cached with the others under $EDGE_RT_HOME/bench/):
  llama.cpp:  llama-imatrix -m F32 -f data/wikitext-2/valid.txt -c 512 --chunks 40 -o IMAT
              llama-quantize [--imatrix IMAT] F32 OUT TYPE
  edge-rt:    edge-rt convert F32 -o OUT --bits B [--embed-bits E] [--prune ffn:0.25]
              --method M (default gptq; calibrated on the same validation file, never the
              test file)
Each file is scored by its own engine on data/wikitext-2/test.txt (edge-rt eval,
llama-perplexity: the same windows, as bench_ppl.py explains). Prints a markdown table
and writes a PNG of perplexity against file size.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import re
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_ppl as bp  # noqa: E402  (eval commands, llama-perplexity's output)
import bench_speed as bs  # noqa: E402  (model files, process runner, helpers)

from edge_rt import formats  # noqa: E402
from edge_rt.atomic import atomic_output  # noqa: E402
from edge_rt.converters.calibrate import DEFAULT_WINDOWS  # noqa: E402
from edge_rt.converters.quantize import METHODS  # noqa: E402
from edge_rt.pull import pull  # noqa: E402

MODELS = ("smollm2-135m", "gemma3-270m")
PEER_TYPES = ("Q8_0", "Q4_K_M", "Q4_1", "Q4_0", "Q3_K_S", "Q2_K")
OURS = {"q8": ["--bits", "8"], "q4": ["--bits", "4"], "q4+e8": ["--bits", "4", "--embed-bits", "8"],
        "q3": ["--bits", "3"], "q3+e4": ["--bits", "3", "--embed-bits", "4"], "q2": ["--bits", "2"],
        "q2+e4": ["--bits", "2", "--embed-bits", "4"], "mix3.5": ["--bits", "3.5"], "mix2.5": ["--bits", "2.5"],
        "ffn0.25+q4": ["--bits", "4", "--prune", "ffn:0.25"], "q8g128": ["--bits", "8", "--group-size", "128"],
        "q8g96": ["--bits", "8", "--group-size", "96"]}
# +eN: token embeddings / output head at N bits. Rows 'edge-rt mix[F]@TYPE[+e8]': a mix with
# --size the smaller of llama.cpp's TYPE and TYPE+imat files (ours at an equal or smaller
# file), times F when given (mix0.8@Q4_0: 80% of Q4_0's file).
MIX_RE = re.compile(r"mix(?P<f>0\.\d+)?@(?P<type>\w+?)(?P<e8>\+e8)?")
VALID = bs.REPO / "data" / "wikitext-2" / "valid.txt"
IMATRIX_CHUNKS = 40


def rows_of(model: str) -> list[str]:
    """Every row key: 'F32', 'Q4_0', 'Q4_0+imat', ..., 'edge-rt q4', ..."""
    return (["F32"] + [t + s for t in PEER_TYPES for s in ("", "+imat")] + [f"edge-rt {k}" for k in OURS]
            + [f"edge-rt mix@{t}{e}" for t in PEER_TYPES for e in ("", "+e8")] + ["edge-rt mix0.8@Q4_0"])


def make(path: Path, cmd: list, what: str, tmp: Path | None = None) -> None:
    if path.exists():
        return
    bs.log(f"making {path.name}")
    bs._run_checked(cmd, what)
    if tmp is not None:
        os.replace(tmp, path)


def model_file(model: str, row: str, threads: int, method: str = "gptq",
               calib_windows: int = DEFAULT_WINDOWS, known: dict | None = None) -> tuple[Path, list, str]:
    """(path, the command that makes it, engine) for one row, made when missing. known:
    (model, row) -> file bytes of rows already measured (a mix's budget comes from there
    when both of its llama.cpp rows are, without making their files)."""
    d, v = bs.bench_dir(), formats.FORMAT_VERSION
    pull(model)
    f32 = d / f"{model}-F32-v{v}.gguf"
    f32_cmd = [*bs.edge_rt_exe(), "convert", model, "-o", f32, "--bits", "32", "--format", "llama.cpp"]
    make(f32, f32_cmd, "edge-rt convert")
    if row == "F32":
        return f32, f32_cmd, "llama.cpp"
    if row.startswith("edge-rt "):
        key = row.split()[1]
        calib = [] if method in ("rtn", "clip") else ["--calib-windows", str(calib_windows)]
        path = d / f"{model}-edge-rt-{key}-{method}{''.join(calib[1:])}-v{v}.gguf"
        mix = MIX_RE.fullmatch(key)
        if mix:
            peers = [mix["type"] + s for s in ("", "+imat")]
            size = min(known[model, p] if (model, p) in (known or {}) else model_file(model, p, threads)[0].stat().st_size
                       for p in peers)
            size = int(size * float(mix["f"] or 1))
            args = ["--size", str(size), *(["--embed-bits", "8"] if mix["e8"] else [])]
        else:
            args = OURS[key]
        cmd = [*bs.edge_rt_exe(), "convert", f32, "-o", path, *args, "--method", method, *calib]
        make(path, cmd, "edge-rt convert")
        return path, cmd, "edge-rt"
    qtype, imat = row.removesuffix("+imat"), row.endswith("+imat")
    extra = []
    if imat:
        im = d / f"{model}-imatrix-valid-{IMATRIX_CHUNKS}-v{v}.dat"
        make(im, [bs.peer.tool("llama-imatrix"), "-m", f32, "-f", VALID, "-c", "512", "--chunks",
                  str(IMATRIX_CHUNKS), "-t", str(threads), "-o", im], "llama-imatrix")
        extra = ["--imatrix", im]
    path = d / f"{model}-llama.cpp-{qtype}{'-imat' if imat else ''}-v{v}.gguf"
    tmp = path.with_name(path.name + ".tmp")
    make(path, [bs.peer.tool("llama-quantize"), *extra, f32, tmp, qtype, str(threads)], "llama-quantize", tmp)
    return path, [bs.peer.tool("llama-quantize"), *extra, f32, path, qtype, str(threads)], "llama.cpp"


def score(path: Path, engine: str, text: str, ctx: int, windows: int, threads: int) -> tuple[float, list]:
    if engine == "edge-rt":
        cmd = bp.ours_cmd(path, text, ctx, windows, threads)
        r = bs.run_measured(cmd)
        return json.loads(r["stdout"].strip().splitlines()[-1])["ppl"], cmd
    cmd = bp.peer_cmd(path, text, ctx, windows, threads)
    r = bs.run_measured(cmd)
    m = bp.FINAL_RE.search(r["stdout"] + "\n" + r["stderr"])
    if m is None:
        raise SystemExit(f"no 'Final estimate' from llama-perplexity: {bs.cmd_str(cmd)}")
    return float(m.group(1)), cmd


def save(rows: list[dict], out: Path, meta: dict) -> None:
    """The run so far, as the --json line (atomically: a killed run keeps its finished rows)."""
    with atomic_output(out) as tmp:
        tmp.write_text(json.dumps({**meta, "rows": rows}, separators=(",", ":"), default=str) + "\n")


def plot(rows: list[dict], out: Path) -> None:
    import matplotlib  # noqa: PLC0415 (a benchmark extra)
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415
    models = sorted({r["model"] for r in rows})
    fig, axes = plt.subplots(1, len(models), figsize=(6.5 * len(models), 4.8), squeeze=False)
    for ax, model in zip(axes[0], models):
        # rows above 2.5x the model's best perplexity sit on the top edge (a triangle and
        # their value), so that a broken file does not squeeze the rows being compared
        top = 2.5 * min(r["ppl"] for r in rows if r["model"] == model)
        for engine, style in (("llama.cpp", "s"), ("edge-rt", "o")):
            pts = sorted((r["file_bytes"] / bs.MiB, r["ppl"], r["row"]) for r in rows
                         if r["model"] == model and r["engine"] == engine)
            ax.scatter([x for x, y, _ in pts if y <= top], [y for _, y, _ in pts if y <= top], marker=style,
                       label=engine, color=f"C{style == 'o':d}")
            ax.scatter([x for x, y, _ in pts if y > top], [top] * sum(y > top for _, y, _ in pts), marker="^",
                       color=f"C{style == 'o':d}")
            for x, y, name in pts:
                label = name.removeprefix("edge-rt ") + (f" ({y:.0f}, off the scale)" if y > top else "")
                ax.annotate(label, (x, min(y, top)), fontsize=7, xytext=(3, -9 if y > top else 3),
                            textcoords="offset points")
        ax.set_xlabel("file MiB")
        ax.set_ylabel("wikitext-2 test perplexity")
        ax.set_yscale("log")
        ax.set_title(model)
        ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=120)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--windows", type=int, default=40)
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rows", default="", help="only these rows (e.g. 'Q4_0,Q4_0+imat,edge-rt q4'); default all")
    ap.add_argument("--text", default=str(bs.WIKITEXT_TEST))
    ap.add_argument("--method", default="gptq", choices=METHODS, help="edge-rt convert --method; default gptq "
                    "(rows made another way are labelled 'edge-rt q4 rtn' etc.)")
    ap.add_argument("--calib-windows", type=int, default=DEFAULT_WINDOWS,
                    help=f"edge-rt convert --calib-windows (default {DEFAULT_WINDOWS})")
    ap.add_argument("--save", default=None, help="write the rows (as --json) to this file after each row; "
                    "rows already in it (same model and label) are kept and not measured again")
    ap.add_argument("--plot", default="benchmarks/quality.png")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--from-json", default=None, help="print the table and plot of saved --json lines (their "
                    "rows; several files separated by commas) instead of measuring")
    a = ap.parse_args(argv)
    started, t0 = _dt.datetime.now(_dt.timezone.utc), time.perf_counter()
    saved = [f for f in (a.from_json or "").split(",") if f] or ([a.save] if a.save and Path(a.save).exists() else [])
    runs = [json.loads(Path(f).read_text()) for f in saved]
    if a.save and not a.from_json and any(r["windows"] != a.windows or r["ctx"] != a.ctx for r in runs):
        ap.error(f"--save: {a.save} holds rows of another --windows/--ctx; give another file")
    rows = [r for run in runs for r in run["rows"]]
    this_cmd = bs.cmd_str([".venv/bin/python", "benchmarks/bench_quality.py", *(argv if argv is not None else sys.argv[1:])])
    for model in [] if a.from_json else a.models.split(","):
        if model not in MODELS:
            ap.error(f"--models: {model!r} is not one of {', '.join(MODELS)}")
        wanted = [r for r in a.rows.split(",") if r] or rows_of(model)
        for row in wanted:
            if row not in rows_of(model):
                ap.error(f"--rows: {row!r} is not one of {', '.join(rows_of(model))}")
            label = row if a.method == "gptq" or not row.startswith("edge-rt ") else f"{row} {a.method}"
            if any(r["model"] == model and r["row"] == label for r in rows):
                continue
            known = {(r["model"], r["row"]): r["file_bytes"] for r in rows}
            path, make_cmd, engine = model_file(model, row, a.threads, a.method, a.calib_windows, known)
            ppl, cmd = score(path, engine, a.text, a.ctx, a.windows, a.threads)
            facts = bs.file_facts(path)
            bs.log(f"{model} {row}: ppl {ppl:.4f}, {facts['file_bytes'] / bs.MiB:.1f} MiB")
            rows.append({"model": model, "row": label, "engine": engine, "file_bytes": facts["file_bytes"],
                         "bits_per_weight": facts["bits_per_weight"], "types": bs.types_str(facts), "ppl": ppl,
                         "made_by": bs.short_cmd(make_cmd), "command": bs.short_cmd(cmd)})
            if a.save:
                save(rows, Path(a.save), {"command": this_cmd, "windows": a.windows, "ctx": a.ctx})
    print(f"## Perplexity against file size, ctx {a.ctx}, {a.windows} windows\n")
    print(f"- command: `{this_cmd}` ({started:%Y-%m-%d %H:%M} UTC, {(time.perf_counter() - t0) / 60:.1f} min)\n")
    print("| model | row | types (2-D tensors) | file MiB | bits/weight | ppl | Δ vs F32 | made by |")
    print("|---|---|---|---:|---:|---:|---:|---|")
    base = {r["model"]: r["ppl"] for r in rows if r["row"] == "F32"}
    for r in rows:
        delta = bp._delta(r["ppl"], base[r["model"]]) if r["model"] in base and r["row"] != "F32" else "–"
        print(f"| {r['model']} | {r['row']} | {r['types']} | {r['file_bytes'] / bs.MiB:.1f} | "
              f"{r['bits_per_weight']:.3f} | {r['ppl']:.4f} | {delta} | `{r['made_by']}` |")
    if a.plot:
        plot(rows, Path(a.plot))
        print(f"\nplot: {a.plot}")
    if a.json:
        print(json.dumps({"command": this_cmd, "windows": a.windows, "ctx": a.ctx, "rows": rows},
                         separators=(",", ":"), default=str))


if __name__ == "__main__":
    main()
