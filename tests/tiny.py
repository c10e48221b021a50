"""Small random-weight models of every family, written by our own writer, with the
vocabulary borrowed from a real model (no Qwen2 checkpoint is obtainable here)."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from edge_rt.converters.readers import Source
from edge_rt.converters.writers import edge_rt_items, write_gguf
from edge_rt.converters.quantize import choose_formats
from edge_rt import formats
from edge_rt.gguf_file import GGUFFile

D, FF, H, KV, HD, LAYERS = 128, 256, 4, 2, 32, 6


def tiny_source(arch: str, vocab_from: Path, seed: int = 0, tied: bool = True, rope_freqs: bool = False,
                layers: int = LAYERS) -> Source:
    real = GGUFFile(vocab_from)
    meta = {k: v for k, v in real.meta.items() if k.startswith("tokenizer.")}
    types = {k: v for k, v in real.types.items() if k.startswith("tokenizer.")}
    n_vocab = len(meta["tokenizer.ggml.tokens"])
    meta |= {"general.architecture": arch, "general.name": f"tiny-{arch}",
             f"{arch}.block_count": layers, f"{arch}.context_length": 4096, f"{arch}.embedding_length": D,
             f"{arch}.feed_forward_length": FF, f"{arch}.attention.head_count": H,
             f"{arch}.attention.head_count_kv": KV, f"{arch}.attention.layer_norm_rms_epsilon": 1e-6,
             f"{arch}.rope.freq_base": 10000.0 if arch != "gemma3" else 1000000.0,
             f"{arch}.attention.key_length": HD, f"{arch}.attention.value_length": HD}
    if arch == "gemma3":
        meta[f"{arch}.attention.sliding_window"] = 16
    rng = np.random.default_rng(seed)
    t: dict[str, np.ndarray] = {"token_embd.weight": rng.standard_normal((n_vocab, D)) * 0.5}
    for i in range(layers):
        p = f"blk.{i}."
        t |= {p + "attn_norm.weight": 1 + 0.1 * rng.standard_normal(D),
              p + "attn_q.weight": rng.standard_normal((H * HD, D)) / np.sqrt(D),
              p + "attn_k.weight": rng.standard_normal((KV * HD, D)) / np.sqrt(D),
              p + "attn_v.weight": rng.standard_normal((KV * HD, D)) / np.sqrt(D),
              p + "attn_output.weight": rng.standard_normal((D, H * HD)) / np.sqrt(H * HD),
              p + "ffn_norm.weight": 1 + 0.1 * rng.standard_normal(D),
              p + "ffn_gate.weight": rng.standard_normal((FF, D)) / np.sqrt(D),
              p + "ffn_up.weight": rng.standard_normal((FF, D)) / np.sqrt(D),
              p + "ffn_down.weight": rng.standard_normal((D, FF)) / np.sqrt(FF)}
        if arch == "qwen2":
            t |= {p + f"attn_{x}.bias": 0.1 * rng.standard_normal(n) for x, n in (("q", H * HD), ("k", KV * HD), ("v", KV * HD))}
        if arch == "gemma3":
            t |= {p + "attn_q_norm.weight": 1 + 0.1 * rng.standard_normal(HD),
                  p + "attn_k_norm.weight": 1 + 0.1 * rng.standard_normal(HD),
                  p + "post_attention_norm.weight": 1 + 0.1 * rng.standard_normal(D),
                  p + "post_ffw_norm.weight": 1 + 0.1 * rng.standard_normal(D)}
    t["output_norm.weight"] = 1 + 0.1 * rng.standard_normal(D)
    if rope_freqs:  # Llama-3's long-context frequency factors, one per rotated pair
        t["rope_freqs.weight"] = np.geomspace(1.0, 8.0, HD // 2)
    if not tied:
        t["output.weight"] = rng.standard_normal((n_vocab, D)) / np.sqrt(D)
    t = {k: v.astype(np.float32) for k, v in t.items()}
    return Source(Path(f"tiny-{arch}"), meta, {k: v.shape for k, v in t.items()}, t.__getitem__, "0" * 64, types)


def write_tiny(arch: str, vocab_from: Path, out: Path, bits: int = 32, **kw) -> Path:
    src = tiny_source(arch, vocab_from, **kw)
    items, extra = edge_rt_items(src, choose_formats(src.shapes, bits, 64))
    write_gguf(out, src, items, extra | {"edgert.format_version": formats.FORMAT_VERSION}, progress=False)
    return out
