"""The Hugging Face folder reader (converters/hf.py).

No HF checkpoint can be downloaded here, so:
  - the real SmolLM2 GGUF is exported to an HF folder and read back: every tensor and
    hyper-parameter must come back exactly, and the tokenizer must encode text to the
    same ids from the folder as from the GGUF;
  - tiny random Qwen2 / Gemma-3 / Llama folders are written by hand in HF's own layout
    and read, and the results checked against llama.cpp's rules re-derived here
    (q/k permute by explicit indices, Gemma's 1 + w, Qwen2's biases, llama3 rope
    factors), then written back and read again;
  - bad folders end in one EdgeRtError.
"""
from __future__ import annotations

import json
import math
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest

from edge_rt.converters.hf import LazyTensors, read_hf_folder, write_hf_folder
from edge_rt.errors import EdgeRtError
from edge_rt.gguf_file import GGUFFile

WIKITEXT = Path(__file__).resolve().parents[1] / "data" / "wikitext-2" / "test.txt"


# --- helpers --------------------------------------------------------------------------
def _same(a, b) -> bool:
    if isinstance(a, float) or isinstance(b, float):
        return np.float32(a) == np.float32(b)
    if isinstance(a, (list, tuple, np.ndarray)) or isinstance(b, (list, tuple, np.ndarray)):
        a, b = list(np.asarray(a).tolist()), list(np.asarray(b).tolist())
    return a == b


def _paragraphs(n: int) -> list[str]:
    paras = [p.strip() for p in WIKITEXT.read_text(encoding="utf-8").split("\n") if len(p.strip()) > 200]
    return paras[:n]


def _write_safetensors(path: Path, arrays: dict[str, np.ndarray], bf16: bool = False) -> None:
    """safetensors by hand (float32, or bfloat16 from values that are exactly bf16)."""
    header, blobs, off = {}, [], 0
    for name, a in arrays.items():
        a = np.ascontiguousarray(a, dtype=np.float32)
        if bf16:
            u = a.view(np.uint32)
            assert not np.any(u & 0xFFFF), "test values must be exact in bfloat16"
            raw = (u >> 16).astype("<u2").tobytes()
        else:
            raw = a.astype("<f4").tobytes()
        header[name] = {"dtype": "BF16" if bf16 else "F32", "shape": list(a.shape),
                        "data_offsets": [off, off + len(raw)]}
        blobs.append(raw)
        off += len(raw)
    h = json.dumps(header).encode()
    h += b" " * (-len(h) % 8)
    path.write_bytes(struct.pack("<Q", len(h)) + h + b"".join(blobs))


def _ref_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's LlamaModel.permute, by explicit row indices: within head h, GGUF row
    2*i + p is HF row p*(d/2) + i."""
    d = w.shape[0] // n_head
    out = np.empty_like(w)
    for h in range(n_head):
        for i in range(d // 2):
            for p in range(2):
                out[h * d + 2 * i + p] = w[h * d + p * (d // 2) + i]
    return out


def _bf16_exact(rng, shape, scale=0.1) -> np.ndarray:
    a = (rng.standard_normal(shape) * scale).astype(np.float32)
    return (a.view(np.uint32) & 0xFFFF0000).view(np.float32)


# --- fixtures -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def smol(smollm2_gguf):
    return GGUFFile(smollm2_gguf)


@pytest.fixture(scope="module")
def tokenizer_files(smol, tmp_path_factory):
    """SmolLM2's tokenizer.json / tokenizer_config.json, as write_hf_folder makes them."""
    from edge_rt.tokenizer import Tokenizer

    d = tmp_path_factory.mktemp("tok")
    (d / "tokenizer.json").write_text(Tokenizer.from_gguf_meta(dict(smol.meta)).hf.to_str(), encoding="utf-8")
    tcfg = {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "add_bos_token": False,
            "chat_template": smol.meta["tokenizer.chat_template"]}
    (d / "tokenizer_config.json").write_text(json.dumps(tcfg), encoding="utf-8")
    return d


VOCAB = 49152  # SmolLM2's tokenizer serves every tiny model
TINY = {"num_hidden_layers": 2, "hidden_size": 32, "intermediate_size": 48, "num_attention_heads": 4,
        "num_key_value_heads": 2, "rms_norm_eps": 1e-6, "max_position_embeddings": 4096,
        "vocab_size": VOCAB, "bos_token_id": 1, "eos_token_id": 2}


def _tiny_folder(path: Path, tokenizer_files: Path, arch: str, rng, bf16=False, **cfg_over):
    """A tiny HF folder in HF's own layout; returns (config, HF tensors)."""
    hf_class = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "gemma3": "Gemma3ForCausalLM"}[arch]
    cfg = {"architectures": [hf_class], "model_type": {"gemma3": "gemma3_text"}.get(arch, arch), **TINY,
           "rope_theta": 10000.0, "tie_word_embeddings": arch == "gemma3"}
    if arch == "gemma3":
        cfg.update(head_dim=16, sliding_window=512, sliding_window_pattern=6, rope_local_base_freq=10000.0,
                   rope_theta=1_000_000.0, query_pre_attn_scalar=16, final_logit_softcapping=None,
                   attn_logit_softcapping=None)
    cfg.update(cfg_over)
    h, ff, L = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]
    hd = cfg.get("head_dim", h // cfg["num_attention_heads"])
    q, kv = cfg["num_attention_heads"] * hd, cfg["num_key_value_heads"] * hd
    t = {"model.embed_tokens.weight": _bf16_exact(rng, (cfg["vocab_size"], h)),
         "model.norm.weight": _bf16_exact(rng, (h,))}
    for i in range(L):
        p = f"model.layers.{i}."
        t |= {p + "input_layernorm.weight": _bf16_exact(rng, (h,)),
              p + "post_attention_layernorm.weight": _bf16_exact(rng, (h,)),
              p + "self_attn.q_proj.weight": _bf16_exact(rng, (q, h)),
              p + "self_attn.k_proj.weight": _bf16_exact(rng, (kv, h)),
              p + "self_attn.v_proj.weight": _bf16_exact(rng, (kv, h)),
              p + "self_attn.o_proj.weight": _bf16_exact(rng, (h, q)),
              p + "mlp.gate_proj.weight": _bf16_exact(rng, (ff, h)),
              p + "mlp.up_proj.weight": _bf16_exact(rng, (ff, h)),
              p + "mlp.down_proj.weight": _bf16_exact(rng, (h, ff)),
              p + "self_attn.rotary_emb.inv_freq": np.ones(hd // 2, np.float32)}  # dropped
        if arch == "qwen2":
            t |= {p + "self_attn.q_proj.bias": _bf16_exact(rng, (q,)),
                  p + "self_attn.k_proj.bias": _bf16_exact(rng, (kv,)),
                  p + "self_attn.v_proj.bias": _bf16_exact(rng, (kv,))}
        if arch == "gemma3":
            t |= {p + "pre_feedforward_layernorm.weight": _bf16_exact(rng, (h,)),
                  p + "post_feedforward_layernorm.weight": _bf16_exact(rng, (h,)),
                  p + "self_attn.q_norm.weight": _bf16_exact(rng, (hd,)),
                  p + "self_attn.k_norm.weight": _bf16_exact(rng, (hd,))}
    if not cfg["tie_word_embeddings"]:
        t["lm_head.weight"] = _bf16_exact(rng, (cfg["vocab_size"], h))
    path.mkdir(parents=True, exist_ok=True)
    names = list(t)
    half = len(names) // 2  # two shards + index
    _write_safetensors(path / "model-00001-of-00002.safetensors", {n: t[n] for n in names[:half]}, bf16)
    _write_safetensors(path / "model-00002-of-00002.safetensors", {n: t[n] for n in names[half:]}, bf16)
    wm = {n: f"model-0000{1 if k < half else 2}-of-00002.safetensors" for k, n in enumerate(names)}
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": wm}))
    (path / "config.json").write_text(json.dumps(cfg))
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tokenizer_files / f, path / f)
    return cfg, t


def _expect_gguf(arch: str, cfg: dict, t: dict) -> dict[str, np.ndarray]:
    """llama.cpp's conversion of HF tensors, re-derived independently."""
    out = {}
    for i in range(cfg["num_hidden_layers"]):
        p, b = f"model.layers.{i}.", f"blk.{i}."
        m = {"input_layernorm.weight": "attn_norm.weight", "self_attn.q_proj.weight": "attn_q.weight",
             "self_attn.k_proj.weight": "attn_k.weight", "self_attn.v_proj.weight": "attn_v.weight",
             "self_attn.o_proj.weight": "attn_output.weight", "mlp.gate_proj.weight": "ffn_gate.weight",
             "mlp.up_proj.weight": "ffn_up.weight", "mlp.down_proj.weight": "ffn_down.weight"}
        if arch == "gemma3":
            m |= {"post_attention_layernorm.weight": "post_attention_norm.weight",
                  "pre_feedforward_layernorm.weight": "ffn_norm.weight",
                  "post_feedforward_layernorm.weight": "post_ffw_norm.weight",
                  "self_attn.q_norm.weight": "attn_q_norm.weight", "self_attn.k_norm.weight": "attn_k_norm.weight"}
        else:
            m["post_attention_layernorm.weight"] = "ffn_norm.weight"
        if arch == "qwen2":
            m |= {"self_attn.q_proj.bias": "attn_q.bias", "self_attn.k_proj.bias": "attn_k.bias",
                  "self_attn.v_proj.bias": "attn_v.bias"}
        for hf, gg in m.items():
            out[b + gg] = t[p + hf]
        if arch == "llama":
            out[b + "attn_q.weight"] = _ref_permute(t[p + "self_attn.q_proj.weight"], cfg["num_attention_heads"])
            out[b + "attn_k.weight"] = _ref_permute(t[p + "self_attn.k_proj.weight"], cfg["num_key_value_heads"])
    out["token_embd.weight"] = t["model.embed_tokens.weight"]
    out["output_norm.weight"] = t["model.norm.weight"]
    if "lm_head.weight" in t:
        out["output.weight"] = t["lm_head.weight"]
    if arch == "gemma3":
        for k in out:
            if k.endswith("norm.weight"):
                out[k] = out[k] + np.float32(1.0)
    return out


def _check_tensors(got, want):
    assert sorted(got) == sorted(want)
    for k, w in want.items():
        g = got[k]
        assert g.dtype == np.float32 and g.shape == w.shape, k
        assert np.array_equal(g, w), k


# --- the real model -------------------------------------------------------------------
def test_smollm2_round_trip(smol, tmp_path):
    from edge_rt.tokenizer import Tokenizer

    lazy = LazyTensors({n: (t.shape, (lambda n=n: smol.dequantize(n))) for n, t in smol.tensors.items()})
    folder = write_hf_folder(smol.meta, lazy, tmp_path / "smol", max_shard_bytes=300 << 20)
    assert (folder / "model.safetensors.index.json").is_file()  # sharded
    cfg = json.loads((folder / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"] and cfg["tie_word_embeddings"] is True
    assert cfg["num_key_value_heads"] == 3 and cfg["rms_norm_eps"] == 1e-05

    meta, tensors = read_hf_folder(folder)
    assert sorted(tensors) == sorted(smol.tensors)
    for name in tensors:
        got, want = tensors[name], smol.dequantize(name)
        assert got.dtype == np.float32 and got.shape == want.shape, name
        assert np.array_equal(got, want), name

    keys = [k for k in smol.meta if k.startswith(("llama.", "tokenizer.")) or k == "general.architecture"]
    assert "llama.rope.dimension_count" in keys and "tokenizer.ggml.merges" in keys
    for k in keys:
        assert k in meta, k
        assert _same(meta[k], smol.meta[k]), k
    extra = {k for k in meta if k.startswith("llama.")} - set(keys)
    assert not extra

    # the same ids from the GGUF's tokenizer, the folder's tokenizer.json as the converter
    # reads it, and the HF tokenizers library on the folder's files
    import tokenizers

    from_gguf = Tokenizer.from_gguf_meta(dict(smol.meta)).hf
    from_folder = Tokenizer.from_gguf_meta(meta).hf
    from_hf = tokenizers.Tokenizer.from_file(str(folder / "tokenizer.json"))
    for text in _paragraphs(4):
        ids = from_gguf.encode(text, add_special_tokens=False).ids
        assert len(ids) > 30
        assert from_folder.encode(text, add_special_tokens=False).ids == ids
        assert from_hf.encode(text, add_special_tokens=False).ids == ids


# --- tiny random models ---------------------------------------------------------------
@pytest.mark.parametrize("arch,bf16", [("qwen2", True), ("gemma3", False), ("llama", True)])
def test_tiny_round_trip(arch, bf16, tokenizer_files, tmp_path):
    rng = np.random.default_rng(0)
    over = {}
    if arch == "llama":  # Llama-3.2 style: explicit head_dim, llama3 rope scaling, untied
        over = {"head_dim": 8, "rope_theta": 500000.0,
                "rope_scaling": {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                 "high_freq_factor": 4.0, "original_max_position_embeddings": 256}}
    if arch == "qwen2":  # Qwen2.5 with a yarn rope scaling
        over = {"rope_scaling": {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 1024}}
    cfg, hf = _tiny_folder(tmp_path / "hf", tokenizer_files, arch, rng, bf16=bf16, **over)
    meta, tensors = read_hf_folder(tmp_path / "hf")

    want = _expect_gguf(arch, cfg, hf)
    if arch == "llama":
        f = tensors["rope_freqs.weight"]
        want["rope_freqs.weight"] = f
        # head_dim 8, base 5e5: wavelengths 2*pi*5e5^(i/4) = 6.3, 167, 4443, 118145 against
        # 256/4 (below: 1) and 256/1 (above: factor), smooth in between
        wavelen = 2 * math.pi * 5e5 ** (1 / 4)
        smooth = (256 / wavelen - 1) / (4 - 1)
        assert f.shape == (4,) and f[0] == 1.0 and f[2] == 32.0 and f[3] == 32.0
        assert f[1] == pytest.approx(1 / ((1 - smooth) / 32 + smooth), rel=1e-6)
    _check_tensors(tensors, want)
    if arch == "qwen2":
        assert "blk.1.attn_k.bias" in tensors and "output.weight" in tensors
    if arch == "gemma3":
        assert "output.weight" not in tensors  # tied

    a = {"qwen2": "qwen2", "gemma3": "gemma3", "llama": "llama"}[arch]
    expect = {"general.architecture": a, f"{a}.block_count": 2, f"{a}.embedding_length": 32,
              f"{a}.feed_forward_length": 48, f"{a}.attention.head_count": 4,
              f"{a}.attention.head_count_kv": 2, f"{a}.context_length": 4096,
              f"{a}.attention.layer_norm_rms_epsilon": 1e-6,
              f"{a}.rope.freq_base": cfg["rope_theta"]}
    if arch == "llama":
        expect |= {"llama.vocab_size": VOCAB, "llama.rope.dimension_count": 8,
                   "llama.attention.key_length": 8, "llama.attention.value_length": 8}
    if arch == "qwen2":
        expect |= {"qwen2.rope.scaling.type": "yarn", "qwen2.rope.scaling.factor": 4.0,
                   "qwen2.rope.scaling.original_context_length": 1024}
    if arch == "gemma3":
        expect |= {"gemma3.attention.key_length": 16, "gemma3.attention.value_length": 16,
                   "gemma3.attention.sliding_window": 512, "gemma3.rope.freq_base_swa": 10000.0}
    for k, v in expect.items():
        assert _same(meta[k], v), (k, meta.get(k), v)
    arch_keys = {k for k in meta if k.startswith(a + ".")}
    assert arch_keys == {k for k in expect if k.startswith(a + ".")}
    assert meta["tokenizer.ggml.bos_token_id"] == 1 and len(meta["tokenizer.ggml.tokens"]) == VOCAB

    # back to HF (the exporter) and in again: the same
    extra = {"rope_scaling": cfg["rope_scaling"]} if arch == "llama" else None
    write_hf_folder(meta, tensors, tmp_path / "again", dtype="bfloat16" if bf16 else "float32",
                    extra_config=extra)
    if not bf16:  # the exporter's files are HF's layout (checked with the safetensors library)
        from safetensors.numpy import load_file

        back = load_file(str(tmp_path / "again" / "model.safetensors"))
        for k, v in hf.items():
            if not k.endswith("inv_freq"):
                assert np.array_equal(back[k], v), k
    meta2, tensors2 = read_hf_folder(tmp_path / "again")
    _check_tensors(tensors2, want)
    for k in meta:
        if k.startswith((a + ".", "tokenizer.")):
            assert _same(meta2[k], meta[k]), k


def test_gemma3_drops_rows_past_the_tokenizer(tokenizer_files, tmp_path):
    rng = np.random.default_rng(1)
    _tiny_folder(tmp_path, tokenizer_files, "gemma3", rng, vocab_size=VOCAB + 64, num_hidden_layers=1)
    tj = json.loads((tmp_path / "tokenizer.json").read_text())
    n_real = len(tj["model"]["vocab"]) + len(tj["added_tokens"])
    meta, tensors = read_hf_folder(tmp_path)
    rows = min(VOCAB + 64, n_real)
    assert tensors["token_embd.weight"].shape == (rows, 32)
    assert len(meta["tokenizer.ggml.tokens"]) == rows


def test_llama_pads_token_list_to_vocab_size(tokenizer_files, tmp_path):
    rng = np.random.default_rng(2)
    _tiny_folder(tmp_path, tokenizer_files, "llama", rng, vocab_size=VOCAB + 8, num_hidden_layers=1)
    meta, tensors = read_hf_folder(tmp_path)
    toks = meta["tokenizer.ggml.tokens"]
    assert len(toks) == VOCAB + 8 and toks[-1] == f"[PAD{VOCAB + 7}]"
    assert list(np.asarray(meta["tokenizer.ggml.token_type"])[-8:]) == [5] * 8  # UNUSED
    assert tensors["token_embd.weight"].shape == (VOCAB + 8, 32)


# --- bad input ------------------------------------------------------------------------
@pytest.fixture
def tiny(tokenizer_files, tmp_path):
    _tiny_folder(tmp_path / "m", tokenizer_files, "qwen2", np.random.default_rng(3), num_hidden_layers=1)
    return tmp_path / "m"


def _cfg(folder: Path, **kw):
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(kw)
    (folder / "config.json").write_text(json.dumps(cfg))


def test_tiny_reads(tiny):
    meta, tensors = read_hf_folder(tiny)
    assert meta["general.architecture"] == "qwen2" and len(tensors) == 15


def test_float16_weights_and_one_file(tiny, tmp_path):
    meta, tensors = read_hf_folder(tiny)
    write_hf_folder(meta, tensors, tmp_path / "f16", dtype="float16")
    assert (tmp_path / "f16" / "model.safetensors").is_file()
    meta2, tensors2 = read_hf_folder(tmp_path / "f16")
    for k in tensors:
        assert np.array_equal(tensors2[k], tensors[k].astype(np.float16).astype(np.float32)), k


def test_prequantized_checkpoint_is_refused(tiny):
    _cfg(tiny, quantization_config={"quant_method": "gptq", "bits": 4})
    with pytest.raises(EdgeRtError, match="pre-quantized checkpoint .*gptq"):
        read_hf_folder(tiny)


def test_missing_folder_or_config(tiny, tmp_path):
    with pytest.raises(EdgeRtError, match="no such folder"):
        read_hf_folder(tmp_path / "nope")
    (tiny / "config.json").unlink()
    with pytest.raises(EdgeRtError, match="no config.json"):
        read_hf_folder(tiny)


def test_bad_json(tiny):
    (tiny / "config.json").write_text('{"architectures": ["Qwen2ForCausalLM"],')
    with pytest.raises(EdgeRtError, match="config.json: not valid JSON"):
        read_hf_folder(tiny)


@pytest.mark.parametrize("arch", ["MistralForCausalLM", "Gemma3ForConditionalGeneration", "Qwen3ForCausalLM"])
def test_unsupported_architecture(tiny, arch):
    _cfg(tiny, architectures=[arch])
    with pytest.raises(EdgeRtError, match=f"architecture {arch} is not supported.*LlamaForCausalLM"):
        read_hf_folder(tiny)


def test_unsupported_rope_scaling(tiny):
    _cfg(tiny, rope_scaling={"rope_type": "dynamic", "factor": 2.0})
    with pytest.raises(EdgeRtError, match="rope scaling type 'dynamic'"):
        read_hf_folder(tiny)


def test_pickle_only_folder_is_refused(tiny):
    for p in tiny.glob("model*"):
        p.unlink()
    (tiny / "pytorch_model.bin").write_bytes(b"\x80\x04not really a pickle")
    with pytest.raises(EdgeRtError, match="pytorch_model.bin.*safetensors"):
        read_hf_folder(tiny)


def test_no_weights(tiny):
    for p in tiny.glob("model*"):
        p.unlink()
    with pytest.raises(EdgeRtError, match="no \\*.safetensors"):
        read_hf_folder(tiny)


def test_truncated_safetensors(tiny):
    p = tiny / "model-00002-of-00002.safetensors"
    p.write_bytes(p.read_bytes()[:-100])
    with pytest.raises(EdgeRtError, match="model-00002-of-00002.safetensors: not a valid safetensors file"):
        read_hf_folder(tiny)
    p.write_bytes(b"\x05")
    with pytest.raises(EdgeRtError, match="not a valid safetensors file"):
        read_hf_folder(tiny)


def test_index_names_a_missing_shard(tiny):
    (tiny / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(EdgeRtError, match="names shard 'model-00002-of-00002.safetensors'"):
        read_hf_folder(tiny)


def test_missing_tensor(tiny):
    for p in tiny.glob("model*"):
        p.unlink()
    _write_safetensors(tiny / "model.safetensors", {"model.norm.weight": np.ones(32, np.float32)})
    with pytest.raises(EdgeRtError, match="missing tensor model.layers.0.input_layernorm.weight"):
        read_hf_folder(tiny)


def test_unexpected_tensor(tiny):
    p = tiny / "extra.safetensors"
    _write_safetensors(p, {"model.layers.5.mlp.gate_proj.weight": np.ones((2, 2), np.float32)})
    (tiny / "model.safetensors.index.json").unlink()
    with pytest.raises(EdgeRtError, match="unexpected tensor model.layers.5.mlp.gate_proj.weight"):
        read_hf_folder(tiny)


def test_shape_mismatch(tiny):
    _cfg(tiny, intermediate_size=64)
    with pytest.raises(EdgeRtError, match="mlp.gate_proj.weight has shape \\[48, 32\\], config.json implies \\[64, 32\\]"):
        read_hf_folder(tiny)


def test_bad_config_values(tiny):
    _cfg(tiny, num_attention_heads=3)
    with pytest.raises(EdgeRtError, match="not a multiple of"):
        read_hf_folder(tiny)
    _cfg(tiny, num_attention_heads="4")
    with pytest.raises(EdgeRtError, match="num_attention_heads must be a positive integer"):
        read_hf_folder(tiny)


def test_missing_tokenizer(tiny):
    (tiny / "tokenizer.json").unlink()
    with pytest.raises(EdgeRtError, match="no tokenizer.json"):
        read_hf_folder(tiny)


def test_too_many_tokens(tokenizer_files, tmp_path):
    _tiny_folder(tmp_path, tokenizer_files, "llama", np.random.default_rng(4), vocab_size=1000,
                 num_hidden_layers=1)
    with pytest.raises(EdgeRtError, match="49152 tokens, but the embedding has 1000 rows"):
        read_hf_folder(tmp_path)
