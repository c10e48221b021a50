"""`edge-rt convert --format onnx` and `edge-rt run --backend onnxruntime`.

The graph is checked against our forward pass on the same weights: the numpy oracle
(models/transformer.py with the GGUF's weights dequantized, float32 KV cache) reading
the same wikitext-2 test tokens, top-1 compared at every position. Against the oracle
and not the C runtime: the C kernels round activations (4-bit: into int8 lookup
tables), which alone moves the top token at ~2.6% of these positions (SmolLM2 4-bit,
measured: C runtime vs oracle 97.35%, ONNX vs oracle 100.0%, ONNX vs C runtime 97.35%);
the ONNX graph's products are float32 (accuracy_level 0)."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import onnx
import pytest

from edge_rt.converters.convert import convert
from edge_rt.gguf_file import GGUFFile
from edge_rt.models import spec_from_meta
from edge_rt.models.transformer import KVCache, forward, output_name
from edge_rt.ort import OrtModel
from edge_rt.pull import pull
from edge_rt.tokenizer import Tokenizer
from edge_rt.weights import ReferenceWeights

PROMPT = "The history of the Roman Empire begins"


@pytest.fixture(scope="session")
def exported(tmp_path_factory):
    """exported(name, bits) -> an .onnx of the same weights as converted(name, bits)."""
    made = {}

    def make(name, bits):
        if (name, bits) not in made:
            out = tmp_path_factory.mktemp("onnx") / f"{name}-{bits}.onnx"
            convert(pull(name), out, bits, target="onnx", progress=False)
            made[name, bits] = out
        return made[name, bits]
    return make


def oracle_top1(gguf, ids: np.ndarray) -> np.ndarray:
    g = GGUFFile(gguf)
    spec = spec_from_meta(g.meta, Tokenizer.from_gguf_meta(g.meta).n_vocab, gguf)
    W = ReferenceWeights(g, same_arithmetic=False)
    h = forward(spec, W, ids, 0, KVCache(spec, len(ids), "f32"))
    head = output_name(W)
    return np.concatenate([W.linear(head, h[i:i + 64]).argmax(-1) for i in range(0, len(h), 64)])


def cli(*args):
    return subprocess.run([sys.executable, "-m", "edge_rt.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=600)


@pytest.mark.parametrize("name,bits,positions", [("smollm2-135m", 4, 2000), ("smollm2-135m", 8, 2000),
                                                  ("gemma3-270m", 4, 600)])  # gemma: past its 512-token window
def test_graph_checks_runs_and_matches_our_forward_pass(converted, exported, wikitext_test, name, bits, positions):
    path = exported(name, bits)
    onnx.checker.check_model(str(path), full_check=True)  # with the external data
    nodes = {n.op_type for n in onnx.load(str(path), load_external_data=False).graph.node}
    assert ("MatMulNBits" in nodes) == (bits == 4) and ("DequantizeLinear" in nodes) == (bits == 8)
    m = OrtModel(path, threads=2, ctx=2048)
    ids = np.array(m.tokenizer.encode(wikitext_test.read_text(encoding="utf-8")[:50000])[:positions])
    assert len(ids) == positions
    z = m.logits(ids)  # 256 tokens a step through the KV cache
    assert z.shape == (positions, m.spec.n_vocab) and np.isfinite(z).all()
    agree = float((z.argmax(-1) == oracle_top1(converted(name, bits), ids)).mean())
    assert agree >= 0.99, agree


def test_run_greedy_decode_equals_the_oracle(converted, exported):
    """`run --backend onnxruntime` decodes token by token through the cache: the tokens it
    picks are the oracle's argmax on prompt + those tokens (one batch)."""
    r = cli("run", exported("smollm2-135m", 4), "--backend", "onnxruntime", "-p", PROMPT, "-n", 24, "-t", 2, "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["backend"] == "onnxruntime" and out["n_generated"] == 24 and out["decode_tokens_per_s"] > 0
    assert out["prefill_tokens_per_s"] > 0 and out["peak_rss_bytes"] > 0
    gguf = converted("smollm2-135m", 4)
    prompt = Tokenizer.from_gguf_meta(GGUFFile(gguf).meta).encode(PROMPT)
    oracle = oracle_top1(gguf, np.array(prompt + out["tokens"][:-1]))[len(prompt) - 1:]
    assert (oracle == np.array(out["tokens"])).sum() >= 23, (oracle, out["tokens"])


def test_eval_perplexity_close_to_ours(converted, exported, wikitext_test):
    """Same weights, same scoring: the perplexities agree to the int8 table rounding of our kernels."""
    ours = cli("eval", converted("smollm2-135m", 4), "--text", wikitext_test, "--windows", 2, "-t", 2, "--json")
    theirs = cli("eval", exported("smollm2-135m", 4), "--text", wikitext_test, "--windows", 2, "-t", 2, "--json",
                 "--backend", "onnxruntime")
    assert ours.returncode == 0 and theirs.returncode == 0, ours.stderr + theirs.stderr
    a, b = (json.loads(r.stdout.strip().splitlines()[-1]) for r in (ours, theirs))
    assert a["tokens_scored"] == b["tokens_scored"] and abs(a["ppl"] / b["ppl"] - 1) < 0.02, (a["ppl"], b["ppl"])


def one_line_error(r, *words):
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 1 and len(lines) == 1 and lines[0].startswith("edge-rt: error:"), r.stderr
    assert all(w in lines[0] for w in words), lines[0]


def test_bad_input_is_one_line(exported, smollm2_gguf, tmp_path):
    good = exported("smollm2-135m", 4)
    one_line_error(cli("run", smollm2_gguf, "--backend", "onnxruntime", "-p", "x"), "GGUF", "--format onnx")
    one_line_error(cli("run", good, "-p", "x"), "--backend onnxruntime")
    cut = tmp_path / "cut.onnx"
    cut.write_bytes(good.read_bytes()[:100_000])
    (tmp_path / "cut.onnx.data").write_bytes(good.with_name(good.name + ".data").read_bytes()[:4096])
    one_line_error(cli("run", cut, "--backend", "onnxruntime", "-p", "x"), "cut.onnx")
    other = tmp_path / "other.onnx"  # a graph beside another export's data
    other.write_bytes(good.read_bytes())
    (tmp_path / "other.onnx.data").write_bytes(b"\1" * 64)
    one_line_error(cli("run", other, "--backend", "onnxruntime", "-p", "x"), "another export")
    one_line_error(cli("run", good, "--backend", "onnxruntime", "-p", "x", "--mem-budget", "1GB"), "--mem-budget")
    one_line_error(cli("convert", smollm2_gguf, "-o", tmp_path / "x.onnx", "--format", "onnx", "--bits", 3), "--bits 3")
    one_line_error(cli("convert", smollm2_gguf, "-o", tmp_path / "x.onnx", "--format", "onnx", "--group-size", 96),
                   "--group-size")
    assert not list(tmp_path.glob("x.onnx*")) and not list(good.parent.glob(".*.part"))
