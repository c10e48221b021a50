"""edge-rt against llama.cpp on the real models (SmolLM2-135M and Gemma-3-270M).

  1. logits: on the same float32 GGUF (the downloaded model dequantized by our converter),
     our runtime and llama.cpp agree on the top-1 token at >= 99% of 2,000 positions of
     wikitext-2 (test split), at ctx 512 (consecutive non-overlapping windows, each from
     position 0 with a fresh cache) and at ctx 2048 (one sequence of 2,000 tokens: longer
     than Gemma-3's 512-token sliding window); the logits themselves differ by little;
  2. perplexity: `edge-rt eval` (the CLI) on that file, ctx 512, 5 windows, is within 0.1%
     of the real `llama-perplexity` on the same file, text, context and windows;
  3. `edge-rt convert --format llama.cpp --bits 8|4` writes Q8_0 / Q4_0 that llama.cpp
     loads and runs, whose perplexity is close to float32's, and whose quantized tensors
     are byte for byte those of llama.cpp's own `llama-quantize --pure`;
  4. a Hugging Face folder exported from SmolLM2 converts to the same logits as the GGUF
     it came from.

Token ids are ours for both engines (their equality with llama.cpp's is tested in
test_tokenizer.py). Gemma's vocabulary has 262,144 entries (1 MiB of logits per position):
the comparisons reduce each engine's logits chunk by chunk to the top-1 token, the top-2
margin and a sample of full rows, and never hold two 2 GB arrays at once.
"""
from __future__ import annotations

import gc
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import peer
from edge_rt import api
from edge_rt.converters.convert import convert
from edge_rt.converters.hf import LazyTensors, write_hf_folder
from edge_rt.gguf_file import GGUFFile

THREADS = 2
N_POSITIONS = 2000
CTXS = (512, 2048)
MODELS = {"smollm2": ("smollm2-135m", "smollm2_f32"), "gemma3": ("gemma3-270m", "gemma3_f32")}
SAMPLE_EVERY = 8  # full logit rows of every 8th position are compared value by value
CHUNK = 128       # rows reduced at a time (128 MiB of Gemma logits)
EDGE_RT = Path(sys.executable).with_name("edge-rt")

needs_llama = pytest.mark.skipif(not peer.llama_available(),
                                 reason="llama_cpp (llama-cpp-python, the peer) is not importable: run scripts/peer.sh")


def _need_tools(*names: str) -> None:
    for name in names:
        try:
            peer.tool(name)
        except FileNotFoundError as e:
            pytest.skip(str(e))


def _wikitext_ids(tokenizer, path: Path, n: int) -> list[int]:
    """Our token ids for the first n tokens of the file (encoding a prefix cut at a line end
    is enough, and much quicker than the whole file for Gemma's vocabulary)."""
    text = path.read_text(encoding="utf-8")
    chars = 16 * n
    while True:
        cut = text.find("\n", chars)
        ids = tokenizer.encode(text if cut < 0 else text[:cut + 1])
        if len(ids) >= n or cut < 0:
            break
        chars *= 2
    assert len(ids) >= n, f"{path} has only {len(ids)} tokens"
    return [int(t) for t in ids[:n]]


def _sequences(ids: list[int], ctx: int, tokenizer) -> list[list[int]]:
    """ctx 512: consecutive non-overlapping windows (the last one shorter) up to N_POSITIONS,
    each read from position 0, its first token replaced by BOS where the model adds one (as
    llama-perplexity does); ctx >= N_POSITIONS: the whole run as one sequence."""
    seqs = []
    for start in range(0, len(ids), ctx):
        seq = list(ids[start:start + ctx])
        if tokenizer.add_bos:
            seq[0] = tokenizer.bos_id
        seqs.append(seq)
    return seqs


# --- 1. logits ------------------------------------------------------------------------
def _reduce_llama(path: Path, tokens: list[int], n_ctx: int, sampled: np.ndarray, release: bool):
    """llama.cpp's logits for one sequence (peer.LOGITS_CONFIG: exact attention, f32 KV
    cache, one ubatch), reduced in chunks of the model's own score buffer (peer.logits
    would copy all of it: 2 GB for Gemma at 2,000 positions) to top-1, top-2 margin and
    the full rows at `sampled` positions. release: free the llama.cpp model afterwards
    (its score and output buffers are 2 x 2 GB for Gemma at ctx 2048)."""
    n = len(tokens)
    llm = peer._model(str(path), int(n_ctx))
    llm.reset()
    llm.eval(tokens)
    scores = llm.scores  # [n_ctx, n_vocab] float32, owned by llm
    top = np.empty(n, np.int64)
    margin = np.empty(n, np.float32)
    for i in range(0, n, CHUNK):
        z = scores[i:min(i + CHUNK, n)]
        top[i:i + len(z)] = z.argmax(1)
        two = np.partition(z, -2, axis=1)[:, -2:]
        margin[i:i + len(z)] = two[:, 1] - two[:, 0]
    rows = np.array(scores[sampled], dtype=np.float32)
    del scores, llm
    if release:
        peer.release_models()
        gc.collect()
    return top, margin, rows


def _compare(model: api.Model, path: Path, seqs: list[list[int]], ctx: int) -> dict:
    tops_ref, tops_ours, margins_ref, margins_ours = [], [], [], []
    max_diff, max_rel, sum_sq_diff, sum_sq_ref, n_sampled = 0.0, 0.0, 0.0, 0.0, 0
    seconds = {"llama.cpp": 0.0, "edge-rt": 0.0}
    for k, seq in enumerate(seqs):
        n = len(seq)
        sampled = np.arange(0, n, SAMPLE_EVERY)
        t0 = time.perf_counter()
        ref_top, ref_margin, ref_rows = _reduce_llama(path, seq, ctx, sampled, release=k == len(seqs) - 1)
        t1 = time.perf_counter()
        ours = model.logits(np.array(seq))  # [n, n_vocab] float32: the one big array alive
        seconds["llama.cpp"] += t1 - t0
        seconds["edge-rt"] += time.perf_counter() - t1
        assert ours.shape[0] == n and ours.dtype == np.float32
        top = np.empty(n, np.int64)
        our_margin = np.empty(n, np.float32)  # our max minus our logit at llama.cpp's top-1
        for i in range(0, n, CHUNK):
            z = ours[i:i + CHUNK]
            top[i:i + len(z)] = z.argmax(1)
            our_margin[i:i + len(z)] = z.max(1) - z[np.arange(len(z)), ref_top[i:i + len(z)]]
        d = np.abs(ours[sampled] - ref_rows)
        max_diff = max(max_diff, float(d.max()))
        max_rel = max(max_rel, float((d.max(1) / np.abs(ref_rows).max(1)).max()))
        sum_sq_diff += float(np.square(d, dtype=np.float64).sum())
        sum_sq_ref += float(np.square(ref_rows - ref_rows.mean(1, keepdims=True), dtype=np.float64).sum())
        n_sampled += len(sampled)
        del ours, d, ref_rows
        gc.collect()
        tops_ref.append(ref_top)
        tops_ours.append(top)
        margins_ref.append(ref_margin)
        margins_ours.append(our_margin)
    ref_top, top = np.concatenate(tops_ref), np.concatenate(tops_ours)
    ref_margin, our_margin = np.concatenate(margins_ref), np.concatenate(margins_ours)
    differ = np.nonzero(ref_top != top)[0]
    return {"n": len(top), "agree": float((ref_top == top).mean()), "differ": differ.tolist(),
            # at a disagreement, how close llama.cpp's own top-2 were, and how far our
            # logit of llama.cpp's choice is below our top-1: both small for near-ties
            "ref_margin_at_differ": ref_margin[differ].tolist(), "our_gap_at_differ": our_margin[differ].tolist(),
            "max_abs_diff": max_diff, "max_rel_diff": max_rel, "n_sampled": n_sampled,
            "rms_diff_over_logit_std": float(np.sqrt(sum_sq_diff / sum_sq_ref)),
            "seconds": {k: round(v, 1) for k, v in seconds.items()}}


CASES = [(m, c) for m in MODELS for c in CTXS]


@pytest.fixture(scope="module", params=CASES, ids=[f"{m}-ctx{c}" for m, c in CASES])
def parity(request, wikitext_test):
    """One comparison per (model, ctx): our model loaded once, both engines run once."""
    if not peer.llama_available():
        pytest.skip("llama_cpp (llama-cpp-python, the peer) is not importable: run scripts/peer.sh")
    name, ctx = request.param
    path = request.getfixturevalue(MODELS[name][1])
    model = api.load(path, threads=THREADS, ctx=ctx, kv_type="f32")  # as peer.LOGITS_CONFIG
    ids = _wikitext_ids(model.tokenizer, wikitext_test, N_POSITIONS)
    seqs = _sequences(ids, ctx, model.tokenizer)
    assert sum(map(len, seqs)) == N_POSITIONS and max(map(len, seqs)) <= ctx
    result = _compare(model, path, seqs, ctx) | {"model": name, "ctx": ctx, "windows": len(seqs)}
    del model
    gc.collect()
    print(f"\nparity {name} ctx {ctx}: {json.dumps(result)}", flush=True)
    return result


def test_top1_agreement(parity):
    r = parity
    detail = "; ".join(f"pos {p}: llama.cpp top-2 margin {m:.4f}, our gap {g:.4f}" for p, m, g in
                       zip(r["differ"], r["ref_margin_at_differ"], r["our_gap_at_differ"]))
    assert r["n"] == N_POSITIONS
    assert r["agree"] >= 0.99, (f"{r['model']} ctx {r['ctx']}: top-1 agrees at {r['agree']:.2%} of "
                                f"{r['n']} positions; {len(r['differ'])} differ: {detail[:3000]}")


# Loose bounds on the logits of every 8th position: 5-10x the measured figures, which were
# (max |diff|, rms diff / std of the logits) at ctx 512 and 2048:
#   SmolLM2  1.8e-4, 4.7e-6 | 1.1e-3, 2.1e-5   (float32 on both sides, sums in another order)
#   Gemma-3  1.9e-2, 4.3e-4 | 2.8e-2, 4.4e-4   (ggml also evaluates GELU through a float16 table)
# Logits span about +-40, so even Gemma's bound is far below what moves a clear top-1.
LOGIT_BOUNDS = {"smollm2": (0.01, 2e-4), "gemma3": (0.15, 2e-3)}


def test_logit_difference(parity):
    r = parity
    max_abs, rms = LOGIT_BOUNDS[r["model"]]
    msg = (f"{r['model']} ctx {r['ctx']}: max |ours - llama.cpp| = {r['max_abs_diff']:.4g} over "
           f"{r['n_sampled']} sampled positions (relative to the row's max |logit| {r['max_rel_diff']:.3g}), "
           f"rms diff / logit std {r['rms_diff_over_logit_std']:.3g}")
    assert r["max_abs_diff"] <= max_abs, msg
    assert r["rms_diff_over_logit_std"] <= rms, msg


# --- 2. perplexity --------------------------------------------------------------------
PPL_CTX, PPL_WINDOWS = 512, 5  # measured at 10 windows: +0.000% (SmolLM2), -0.002% (Gemma-3)


def _edge_rt(*args: str) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(EDGE_RT), *map(str, args)], capture_output=True, text=True)
    assert proc.returncode == 0, f"edge-rt {' '.join(map(str, args))} exited {proc.returncode}: {proc.stderr[-2000:]}"
    return proc


@pytest.mark.parametrize("name", list(MODELS))
def test_perplexity_matches_llama_perplexity(request, name, wikitext_test):
    _need_tools("llama-perplexity")
    path = request.getfixturevalue(MODELS[name][1])
    t0 = time.perf_counter()
    proc = _edge_rt("eval", path, "--text", wikitext_test, "--ctx", PPL_CTX, "--windows", PPL_WINDOWS,
                    "--threads", THREADS, "--json")
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    assert (r["ctx"], r["windows"]) == (PPL_CTX, PPL_WINDOWS)
    assert r["tokens_scored"] == PPL_WINDOWS * (PPL_CTX // 2 - 1)  # 5 * 255
    t1 = time.perf_counter()
    ref = peer.perplexity(path, wikitext_test, PPL_CTX, PPL_WINDOWS)
    print(f"\nperplexity {name}: edge-rt {r['ppl']:.4f} ({t1 - t0:.0f} s), llama-perplexity {ref:.4f} "
          f"({time.perf_counter() - t1:.0f} s): {(r['ppl'] / ref - 1):+.3%}", flush=True)
    assert abs(r["ppl"] / ref - 1) <= 0.001, f"{name}: edge-rt eval {r['ppl']:.4f} vs llama-perplexity {ref:.4f}"


# --- 3. --format llama.cpp ------------------------------------------------------------
LLAMA_TYPES = {8: "Q8_0", 4: "Q4_0"}
PPL_TOLERANCE = {8: 0.02, 4: 0.25}
QUALITY_WINDOWS = 4


@pytest.fixture(scope="module")
def llama_f32(converted):
    """name -> the model in float32 as a plain llama.cpp GGUF. (Our own float32 files,
    smollm2_f32 / gemma3_f32, carry edge-rt's layout keys, and the converter refuses an
    edge-rt file as a source; the tensors are the same.)"""
    return lambda name: converted(MODELS[name][0], 32, "llama.cpp")


@pytest.fixture(scope="module")
def quantized(llama_f32, tmp_path_factory):
    """(name, bits) -> `edge-rt convert F32 -o X --format llama.cpp --bits B` (made once)."""
    made = {}

    def get(name: str, bits: int) -> Path:
        if (name, bits) not in made:
            out = tmp_path_factory.mktemp(f"{name}-{bits}") / f"edge-rt-{LLAMA_TYPES[bits]}.gguf"
            _edge_rt("convert", llama_f32(name), "-o", out, "--format", "llama.cpp", "--bits", bits)
            made[name, bits] = out
        return made[name, bits]
    return get


def _llama_quantize(src: Path, out: Path, qtype: str) -> GGUFFile:
    """`llama-quantize --pure SRC OUT TYPE 2`, opened."""
    proc = subprocess.run([str(peer.tool("llama-quantize")), "--pure", str(src), str(out), qtype, str(THREADS)],
                          capture_output=True, text=True, errors="replace")
    assert proc.returncode == 0, f"llama-quantize exited {proc.returncode}: {proc.stderr[-2000:]}"
    return GGUFFile(out)


@pytest.mark.parametrize("bits", list(LLAMA_TYPES))
@pytest.mark.parametrize("name", list(MODELS))
def test_llama_cpp_format_is_llama_quantize_byte_for_byte(quantized, llama_f32, tmp_path, name, bits):
    """Every tensor has the type and the bytes llama-quantize --pure gives it: matrices
    Q8_0 / Q4_0 (token_embd too: --pure takes no special type for it), 1-D tensors (norms)
    F32. A tensor of another type on either side would be listed in the failure message;
    none is, for either model."""
    _need_tools("llama-quantize")
    qtype = LLAMA_TYPES[bits]
    ours = GGUFFile(quantized(name, bits))
    theirs = _llama_quantize(llama_f32(name), tmp_path / f"llama-quantize-{qtype}.gguf", qtype)
    assert sorted(ours.tensors) == sorted(theirs.tensors)
    other_type, differ, n_quant = [], [], 0
    for tname, t in theirs.tensors.items():
        o = ours.tensors[tname]
        if o.ggml_type != t.ggml_type or o.shape != t.shape:
            other_type.append(f"{tname}: ours {o.type_name}{list(o.shape)}, llama-quantize {t.type_name}{list(t.shape)}")
            continue
        n_quant += t.type_name == qtype
        if not np.array_equal(ours.raw(tname), theirs.raw(tname)):
            nb = int((ours.raw(tname) != theirs.raw(tname)).sum())
            differ.append(f"{tname} ({t.type_name}: {nb} of {t.nbytes} bytes differ)")
    print(f"\n{name} {qtype}: {len(theirs.tensors) - len(other_type)} of {len(theirs.tensors)} tensors of the same "
          f"type ({n_quant} {qtype}), {len(differ)} differ in bytes; other types: {other_type}", flush=True)
    assert n_quant > 0
    assert not differ, f"{name} {qtype}: bytes differ from llama-quantize --pure: {differ[:20]}"
    assert not other_type, f"{name} {qtype}: types differ from llama-quantize --pure: {other_type}"
    assert ours.meta.get("general.file_type") == theirs.meta.get("general.file_type")


@needs_llama
@pytest.mark.parametrize("bits", list(LLAMA_TYPES))
def test_llama_cpp_format_runs_in_llama_cpp(quantized, llama_f32, wikitext_test, bits):
    """SmolLM2 (the quicker model): llama.cpp loads the file, generates greedily, and its
    own perplexity over 4 windows is close to float32's."""
    _need_tools("llama-perplexity")
    import llama_cpp

    path = quantized("smollm2", bits)
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=128, n_threads=THREADS, n_threads_batch=THREADS,
                          verbose=False)
    out = llm("The capital of France is", max_tokens=8, temperature=0.0, top_k=1)
    text = out["choices"][0]["text"]
    del llm
    gc.collect()
    assert out["usage"]["completion_tokens"] > 0 and text.strip(), f"{LLAMA_TYPES[bits]}: empty generation {out}"
    q = peer.perplexity(path, wikitext_test, PPL_CTX, QUALITY_WINDOWS)
    f32 = _f32_ppl(llama_f32("smollm2"), wikitext_test)
    print(f"\nsmollm2 {LLAMA_TYPES[bits]} in llama.cpp: {text!r}; perplexity {q:.4f} vs float32 {f32:.4f} "
          f"({q / f32 - 1:+.2%})", flush=True)
    assert abs(q / f32 - 1) <= PPL_TOLERANCE[bits], f"{LLAMA_TYPES[bits]}: perplexity {q:.4f} vs float32 {f32:.4f}"


_F32_PPL: dict = {}


def _f32_ppl(path: Path, text: Path) -> float:
    if path not in _F32_PPL:
        _F32_PPL[path] = peer.perplexity(path, text, PPL_CTX, QUALITY_WINDOWS)
    return _F32_PPL[path]


# --- 4. Hugging Face folder -----------------------------------------------------------
def test_hf_folder_converts_to_the_same_logits(smollm2_f32, wikitext_test, tmp_path):
    src = GGUFFile(smollm2_f32)
    lazy = LazyTensors({n: (t.shape, (lambda n=n: src.dequantize(n))) for n, t in src.tensors.items()})
    folder = write_hf_folder(src.meta, lazy, tmp_path / "smollm2-hf")
    out = convert(folder, tmp_path / "from-hf.gguf", 32, progress=False)

    back = GGUFFile(out)
    assert sorted(back.tensors) == sorted(src.tensors)
    identical = all(back.tensors[n].ggml_type == t.ggml_type and np.array_equal(back.raw(n), src.raw(n))
                    for n, t in src.tensors.items())

    a = api.load(smollm2_f32, threads=THREADS, ctx=64)
    ids = _wikitext_ids(a.tokenizer, wikitext_test, 64)
    want = a.logits(ids)
    del a
    got = api.load(out, threads=THREADS, ctx=64).logits(ids)
    diff = float(np.abs(got - want).max())
    print(f"\nHF folder -> GGUF: tensors identical: {identical}; max |logit diff| over {len(ids)} tokens: {diff}",
          flush=True)
    if identical:
        assert np.array_equal(got, want), f"identical tensors, yet logits differ by up to {diff}"
    else:
        assert diff <= 1e-5, f"logits from the HF folder differ by up to {diff}"
