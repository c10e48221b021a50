"""edge-rt's command line: parse, call the Python API, print. With --json the last
line on stdout is one JSON object and streamed text goes to stderr."""
from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

import click

from .errors import EdgeRtError
from .formats import DEFAULT_GROUP_SIZE
from .plan import format_size

EXIT_ERROR, EXIT_INTERRUPTED, EXIT_TERMINATED = 1, 130, 143


class Terminated(BaseException):
    """SIGTERM, raised where the program is, so that temporary files are removed on the way out."""


def _on_sigterm(signum, frame):
    raise Terminated


def _emit_json(obj: dict) -> None:
    click.echo(json.dumps(obj, separators=(",", ":"), default=str))


class Size(click.ParamType):
    """2GB, 512M, 1.5GiB: powers of 1024."""
    name = "size"

    def convert(self, value, param, ctx):
        from .plan import parse_size
        try:
            return parse_size(value)
        except EdgeRtError as e:
            self.fail(str(e), param, ctx)


def _enforcement(enforce: bool, budget: int | None):
    """--enforce: the run inside a memory cgroup set to the budget (or an RSS watchdog)."""
    import contextlib
    if not enforce:
        return contextlib.nullcontext()
    if budget is None:
        raise EdgeRtError("--enforce needs --mem-budget")
    from .enforce import enforce as start
    return start(budget)


def _threads(value):
    if value is not None and value < 1:
        raise click.BadParameter("must be at least 1")
    return value


BACKEND = click.option("--backend", type=click.Choice(["edge-rt", "onnxruntime"]), default="edge-rt", show_default=True,
                       help="onnxruntime: run an .onnx from `convert --format onnx` (float32 KV cache; no memory plan).")


def _load_measured(model, **kw):
    """api.load in a command that reports its memory against the plan, budget or not: freed
    arrays go back to the kernel (memory.return_freed_memory)."""
    from . import memory
    from .api import load
    memory.return_freed_memory()
    return load(model, **kw)


def _load(model, backend: str, mem_budget, threads, ctx, kv_type, **kw):
    """api.load, or the onnxruntime backend (which plans no memory and keeps a float32 cache)."""
    if backend == "edge-rt":
        if str(model).endswith(".onnx"):
            raise EdgeRtError(f"{model}: an ONNX graph; run it with --backend onnxruntime")
        return _load_measured(model, mem_budget=mem_budget, threads=threads, ctx=ctx, kv_type=kv_type, **kw)
    refused = [flag for flag, given in (("--mem-budget", mem_budget is not None), (f"--kv-type {kv_type}", kv_type != "f16"),
                                        ("--kv-policy sink-window", kw.get("kv_policy") == "sink-window")) if given]
    if refused:
        raise EdgeRtError(f"{', '.join(refused)}: not offered by --backend onnxruntime")
    from .ort import OrtModel
    return OrtModel(model, threads=threads, ctx=ctx)


KV_TYPE = click.option("--kv-type", type=click.Choice(["f16", "f32", "q8_0"]), default="f16", show_default=True,
                       help="KV cache precision (q8_0: llama.cpp's 8-bit blocks of 32 values, head sizes 32k).")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="edge-rt")
def cli():
    """On-device LLM inference under a hard memory budget."""


@cli.command()
def models():
    """List the models `pull` can fetch."""
    from .models.registry import MODELS
    from .pull import cached_path
    for e in MODELS.values():
        state = "cached" if cached_path(e).exists() else "not fetched"
        click.echo(f"{e.name:14s} {e.arch:7s} {e.size / 2**20:6.0f} MiB  {state:11s}  {e.description}; license: {e.license}")


@cli.command()
@click.argument("name")
def pull(name):
    """Fetch a registry model into the cache ($EDGE_RT_HOME, default ~/.cache/edge-rt)."""
    from .pull import pull as do_pull
    click.echo(str(do_pull(name)))


@cli.command()
@click.argument("src")
@click.option("-o", "--output", "out", required=True, type=click.Path(dir_okay=False),
              help="Output GGUF file (.onnx with --format onnx).")
@click.option("--bits", type=float, default=4, show_default=True,
              help="2, 3, 4, 5, 6, 8, 16 or 32; a fraction (e.g. 3.5) is an average: mixed precision, "
                   "8 x file bytes / parameters at most.")
@click.option("--size", type=Size(), default=None,
              help="Mixed precision: the largest file allowed, e.g. 60MB (powers of 1024).")
@click.option("--group-size", type=int, default=DEFAULT_GROUP_SIZE, show_default=True,
              help="Columns per (scale, min) pair; a mix (--size, or --bits with a fraction) offers each "
                   "width at this size and at each doubling of it up to 128.")
@click.option("--format", "target", type=click.Choice(["edge-rt", "llama.cpp", "onnx"]), default="edge-rt",
              show_default=True, help="edge-rt: our group-quantized GGUF; llama.cpp: its own Q4_0/Q8_0/F16/F32 types; "
                                      "onnx: edge-rt's weights as an ONNX graph (OUT and OUT.data) for onnxruntime.")
@click.option("--method", type=click.Choice(["rtn", "clip", "gptq", "awq", "awq+gptq", "auto"]), default="gptq",
              show_default=True, help="How group codes are chosen: round-to-nearest, clipped-range search, GPTQ "
                   "or AWQ scaling (or both) calibrated on --calib-text, or auto: the best of gptq, awq and "
                   "awq+gptq by perplexity on the held-out half of --calib-text.")
@click.option("--embed-bits", type=click.Choice(["2", "3", "4", "5", "6", "8", "16", "32"]), default=None,
              help="Width of the token embeddings and output head (default: --bits).")
@click.option("--calib-text", type=click.Path(dir_okay=False, exists=True), default=None,
              help="Calibration text (default: the wikitext-2 validation file).")
@click.option("--calib-windows", type=click.IntRange(1), default=None,
              help="Calibration windows of 512 tokens (default: converters/calibrate.py's DEFAULT_WINDOWS, 64).")
@click.option("--prune", default=None, help="wanda:0.5 (unstructured), 2:4, or ffn:0.25 (drop that fraction "
              "of FFN neurons: a smaller file and less compute); calibrated on --calib-text.")
@click.option("--int8-activations", is_flag=True,
              help="--format onnx: 4-bit products with int8 activations (MatMulNBits accuracy_level 4; faster, less exact).")
def convert(src, out, bits, size, group_size, target, method, embed_bits, calib_text, calib_windows, prune,
            int8_activations):
    """Convert SRC (a GGUF of any ggml type, a Hugging Face folder, or a registry name)."""
    from .converters.convert import convert as do_convert
    from .pull import resolve
    path = do_convert(resolve(src), out, int(bits) if bits.is_integer() else bits, group_size, target,
                      method=method, embed_bits=int(embed_bits) if embed_bits else None, calib_text=calib_text,
                      calib_windows=calib_windows, size=size, prune=prune, int8_activations=int8_activations)
    click.echo(f"wrote {path} ({format_size(path.stat().st_size)})")


@cli.command()
@click.argument("model")
@click.option("--prompt", "-p", required=True, help="The prompt text.")
@click.option("-n", "n_predict", type=click.IntRange(1), default=128, show_default=True, help="Tokens to generate.")
@click.option("--ctx", type=click.IntRange(2), default=2048, show_default=True, help="Context length (KV cache).")
@KV_TYPE
@click.option("--kv-policy", type=click.Choice(["stop", "sink-window"]), default="stop", show_default=True,
              help="At a full context: stop, or keep the first 4 positions and the most recent half and go on.")
@click.option("--mem-budget", type=Size(), default=None, help="Peak memory this run may use, e.g. 2GB (powers of 1024).")
@click.option("--threads", "-t", type=int, callback=lambda c, p, v: _threads(v), default=None, help="Default: all cores.")
@click.option("--temperature", type=float, default=0.0, show_default=True, help="0 is greedy.")
@click.option("--top-k", type=int, default=40, show_default=True)
@click.option("--top-p", type=float, default=0.95, show_default=True)
@click.option("--seed", type=int, default=None)
@click.option("--chat", is_flag=True, help="Wrap the prompt in the model's own chat template.")
@click.option("--enforce", is_flag=True, help="Hold --mem-budget with a memory cgroup (page cache counts) or an RSS watchdog.")
@click.option("--no-verify", is_flag=True, help="Skip checking the weights against their stored checksums.")
@click.option("--json", "as_json", is_flag=True, help="Metrics as one JSON line on stdout; text to stderr.")
@BACKEND
def run(model, prompt, n_predict, ctx, kv_type, kv_policy, mem_budget, threads, temperature, top_k, top_p, seed, chat,
        enforce, no_verify, as_json, backend):
    """Generate text from MODEL (a path or a registry name) and report speed and memory."""
    with _enforcement(enforce, mem_budget) as held:
        m = _load(model, backend, mem_budget, threads, ctx, kv_type, kv_policy=kv_policy, verify=not no_verify,
                  keep_encoder=False)  # one prompt: the encoder is freed once it is read
        out = sys.stderr if as_json else sys.stdout
        pieces = []
        for piece in m.generate(prompt, n_predict, temperature, top_k, top_p, seed, chat):
            pieces.append(piece)
            out.write(piece)
            out.flush()
        out.write("\n")
        r = m.metrics.as_dict() | {"text": "".join(pieces)} | (held.stats() if held else {})
    if as_json:
        _emit_json(r)
        return
    budget = format_size(r["mem_budget_bytes"]) if r["mem_budget_bytes"] else "none"
    planned = f"planned {format_size(r['planned_bytes'])}, " if "planned_bytes" in r else ""
    click.echo(f"prefill {r['n_prompt']} tokens at {r['prefill_tokens_per_s']:.1f} tok/s, decode {r['n_generated']} "
               f"tokens at {r['decode_tokens_per_s']:.1f} tok/s, ttft {r['ttft_s']:.3f} s | peak RSS "
               f"{format_size(r['peak_rss_bytes'])} ({planned}budget {budget}) | "
               f"kernel {r['kernel']}, {r['threads']} threads", err=True)


@cli.command()
@click.argument("model")
@click.option("--mem-budget", type=Size(), default=None, help="Peak memory the run may use, e.g. 2GB.")
@click.option("--ctx", type=click.IntRange(2), default=2048, show_default=True, help="Context length (KV cache).")
@KV_TYPE
@click.option("--prompt-tokens", type=click.IntRange(1), default=None, help="Prompt length planned for (default: --ctx).")
@click.option("--threads", "-t", type=int, callback=lambda c, p, v: _threads(v), default=None)
@click.option("--json", "as_json", is_flag=True)
def plan(model, mem_budget, ctx, kv_type, prompt_tokens, threads, as_json):
    """The memory plan `run` would use: what stays resident, what streams, and the total."""
    from .flash import HEAD_BUFFER, Reader, residency
    from .plan import check
    m = _load_measured(model, mem_budget=mem_budget, threads=threads, ctx=ctx, kv_type=kv_type)
    m.drop_encoder()  # as run does once its prompt is read
    p = m.plan_for(min(prompt_tokens or ctx, ctx), 0)
    check(p, m.budget, 1 << 62)  # refuses an impossible budget, naming the smallest that works
    resident, streamed = residency(m.g, p.streamed_layers, p.streamed_head)
    reader = Reader(m.path)
    r = p.as_dict() | {"model": str(m.path), "model_bytes": m.path.stat().st_size, "mem_budget_bytes": m.budget,
                       "threads": m.threads, "o_direct": reader.direct, "slots": min(2, p.streamed_layers),
                       "slot_bytes": m.layout.slot_bytes(p.streamed_layers),
                       "resident_tensors": [t.name for t in resident], "streamed_tensors": [t.name for t in streamed]}
    reader.close()
    if as_json:
        _emit_json(r)
        return
    layers = m.spec.n_layers
    kept = sorted({t.name.removesuffix(".scale").removesuffix(".min") for t in resident if not t.name.startswith("blk.")})
    click.echo(f"model      {m.path.name}: {format_size(r['model_bytes'])}, {layers} layers")
    click.echo(f"resident   {format_size(p.weights_bytes)}: {', '.join(kept)}, norms, "
               f"layers {p.streamed_layers}-{layers - 1}" if p.streamed_layers < layers else
               f"resident   {format_size(p.weights_bytes)}: {', '.join(kept)}, norms")
    if p.streamed_layers:
        click.echo(f"streamed   layers 0-{p.streamed_layers - 1}: {format_size(p.streamed_bytes)} read from storage every "
                   f"step into a pool of {r['slots']} x {format_size(r['slot_bytes'])} "
                   f"({'O_DIRECT' if r['o_direct'] else 'buffered reads, pages dropped'})")
    if p.streamed_head:
        kept = f"its first {p.resident_head_rows} of {m.layout.out_rows} rows resident, " if p.resident_head_rows else ""
        click.echo(f"streamed   the embedding table and output head: {kept}the other rows read per token, the head's "
                   f"read every token in {format_size(HEAD_BUFFER // 2)} chunks")
    if not p.pool_bytes:
        click.echo("streamed   nothing: the whole model is resident")
    click.echo(f"KV cache   {format_size(p.kv_bytes)} ({p.kv_precision}, ctx {ctx})")
    click.echo(f"buffers    {format_size(p.buffer_bytes)} (a step of {p.n_batch} tokens)")
    click.echo(f"runtime    {format_size(p.base_bytes)} (the interpreter, measured, and libraries; without the "
               f"tokenizer's encoder, freed once the prompt is read)")
    click.echo(f"set-up     {format_size(p.open_peak_bytes)} peak (opening the model, building the tokenizer), measured")
    budget = f" of a {format_size(m.budget)} budget" if m.budget else " (no budget)"
    click.echo(f"total      {format_size(p.total_bytes)}{budget}")


@cli.command()
@click.argument("model")
@click.option("--simulate", "target", default="host", show_default=True,
              help="A targets/ profile (rpi4-2gb, rpi5-8gb, jetson-orin-nano-8gb, phone-8gen3) or host.")
@click.option("--prompt", "-p", default="The history of the Raspberry Pi began", show_default=True)
@click.option("-n", "n_predict", type=click.IntRange(2), default=32, show_default=True)
@click.option("--ctx", type=click.IntRange(2), default=512, show_default=True)
@click.option("--threads", "-t", type=int, callback=lambda c, p, v: _threads(v), default=None,
              help="Default: the profile's cores, at most this host's.")
@click.option("--json", "as_json", is_flag=True)
def bench(model, target, prompt, n_predict, ctx, threads, as_json):
    """Run MODEL under a device profile's memory limit and storage throttle (a simulation)."""
    from .pull import resolve
    from .simulate import simulate
    r = simulate(target, resolve(model), prompt, n_predict, ctx, threads)
    if as_json:
        _emit_json(r)
        return
    click.echo(f"{r['profile_name']}: {r['note']}")
    if r["simulation"]:
        click.echo(f"limits     memory {format_size(r['memory_limit_bytes'])} (cgroup, page cache counts), storage "
                   f"{(r['read_bps'] or 0) / 1e6:.0f} MB/s, {r['read_iops'] or '-'} IOPS (blkio)")
    if "error" in r:
        click.echo(f"result     failed (exit {r['exit_status']}): {r['error']}")
        return
    click.echo(f"speed      decode {r['decode_tokens_per_s']:.2f} tok/s, ttft {r['ttft_s']:.2f} s, {r['threads']} threads")
    click.echo(f"storage    {format_size(r['flash_bytes_read'])} read, {format_size(int(r['flash_bytes_per_token']))} "
               f"per token; {r['streamed_layers']} layers streamed")
    peak = f", cgroup peak {format_size(r['cgroup_peak_bytes'])}, failcnt {r['cgroup_failcnt']}" if "cgroup_peak_bytes" in r else ""
    click.echo(f"memory     peak RSS {format_size(r['peak_rss_bytes'])}{peak}")


@cli.command(name="eval")
@click.argument("model")
@click.option("--text", "text_file", required=True, type=click.Path(dir_okay=False), help="UTF-8 text file.")
@click.option("--ctx", type=click.IntRange(2), default=512, show_default=True)
@KV_TYPE
@click.option("--windows", type=click.IntRange(1), default=None, help="Windows to score (default: all).")
@click.option("--mem-budget", type=Size(), default=None)
@click.option("--threads", "-t", type=int, callback=lambda c, p, v: _threads(v), default=None)
@click.option("--enforce", is_flag=True, help="Hold --mem-budget with a memory cgroup or an RSS watchdog.")
@click.option("--json", "as_json", is_flag=True)
@BACKEND
def eval_cmd(model, text_file, ctx, kv_type, windows, mem_budget, threads, enforce, as_json, backend):
    """Perplexity of MODEL on a text, scored as llama.cpp's llama-perplexity scores it."""
    try:
        text = Path(text_file).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise EdgeRtError(f"{text_file}: cannot read text: {getattr(e, 'strerror', None) or e}") from None
    show = None if as_json else (lambda i, n, ppl: click.echo(f"[{i}/{n}] ppl {ppl:.4f}", err=True))
    with _enforcement(enforce, mem_budget) as held:
        m = _load(model, backend, mem_budget, threads, ctx, kv_type, keep_encoder=False)
        r = m.eval_perplexity(text, ctx, windows, progress=show) | (held.stats() if held else {})
    if as_json:
        _emit_json(r)
    else:
        click.echo(f"perplexity {r['ppl']:.4f} over {r['tokens_scored']} tokens ({r['windows']} windows of ctx {ctx})")


@cli.command()
@click.argument("model")
@click.option("--json", "as_json", is_flag=True)
def inspect(model, as_json):
    """Architecture, hyper-parameters, tensors and bits per weight of a GGUF file."""
    from .inspect import inspect as do_inspect
    from .pull import resolve
    r = do_inspect(resolve(model))
    if as_json:
        _emit_json(r)
        return
    for key, val in r["summary"].items():
        click.echo(f"{key:22s} {val}")
    click.echo(f"{'tensor':40s} {'type':8s} {'shape':>16s} {'bytes':>12s}")
    for t in r["tensors"]:
        click.echo(f"{t['name']:40s} {t['type']:8s} {'x'.join(map(str, t['shape'])):>16s} {t['bytes']:12d}")


@cli.command()
@click.argument("model")
@click.option("--threads", "-t", type=int, callback=lambda c, p, v: _threads(v), default=None, help="Default: all cores.")
def verify(model, threads):
    """Check every tensor of MODEL against the checksum convert stored: one line per problem."""
    from .gguf_file import GGUFFile
    from .pull import resolve
    from .verify import problems
    g = GGUFFile(resolve(model))
    bad = problems(g, threads or os.cpu_count() or 1)
    for line in bad:
        click.echo(f"{g.path}: {line}", err=True)
    if bad:
        sys.exit(EXIT_ERROR)
    click.echo(f"{g.path}: {len(g.tensors)} tensors, every checksum matches")


@cli.command()
@click.option("--json", "as_json", is_flag=True)
def info(as_json):
    """The CPU features found and the kernel chosen for each weight format."""
    from . import formats, kernels
    r = {"cpu_features": kernels.cpu_features(),
         "kernels": {name: kernels.kernel_name(fid) for name, fid in formats.FORMAT_IDS.items()},
         "layer": kernels.layer_isa()}
    if as_json:
        _emit_json(r)
        return
    click.echo(f"cpu features: {r['cpu_features']}")
    for name, k in r["kernels"].items():
        click.echo(f"{name:4s} -> {k}")
    click.echo(f"layer (attention, softmax, GLU) -> {r['layer']}")


def main(argv=None) -> None:
    """Entry point: a user error is one line on stderr and exit status 1, never a traceback."""
    signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        cli.main(args=argv, prog_name="edge-rt", standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("edge-rt: interrupted", err=True)
        sys.exit(EXIT_INTERRUPTED)
    except click.ClickException as e:  # usage errors: one line too (`--help` shows the usage)
        click.echo(f"edge-rt: error: {e.format_message()}", err=True)
        sys.exit(e.exit_code)
    except EdgeRtError as e:
        click.echo(f"edge-rt: error: {e}", err=True)
        sys.exit(EXIT_ERROR)
    except KeyboardInterrupt:
        click.echo("edge-rt: interrupted", err=True)
        sys.exit(EXIT_INTERRUPTED)
    except Terminated:
        click.echo("edge-rt: terminated (SIGTERM); no output file was left half-written", err=True)
        sys.exit(EXIT_TERMINATED)
    except MemoryError:
        click.echo("edge-rt: error: out of memory (try a smaller --ctx, or see `edge-rt run --mem-budget`)", err=True)
        sys.exit(EXIT_ERROR)
    except BrokenPipeError:
        sys.exit(EXIT_ERROR)
    except Exception as e:  # a bug of ours: one line, and the traceback on request
        if os.environ.get("EDGE_RT_DEBUG"):
            raise
        click.echo(f"edge-rt: internal error: {type(e).__name__}: {e} (set EDGE_RT_DEBUG=1 for the traceback)", err=True)
        sys.exit(70)


if __name__ == "__main__":
    main()
