"""The fuzz seed corpus, tests/fuzz_corpus/ (`python benchmarks/fuzz.py --make-seeds`):
  gguf/      tiny SmolLM2 (GPT-2 BPE) and Gemma-3 (SentencePiece) models whose metadata,
             vocabulary (cut to 512 tokens) and chat template are the cached real
             models', with 1-layer random weights; and hostile headers cut from them,
             each with one field set to a value that has broken GGUF readers (counts
             and lengths near 2^64, offsets that wrap or overlap, dimensions whose
             product overflows, type ids out of range, alignment 0, deep nesting).
  hf-folder/ a tiny Hugging Face folder written from the SmolLM2 seed.
  hf/        one input per file of that folder: its index, then its bytes; and hostile ones.
  template/  the real chat templates and hand-made hostile ones.
"""
from __future__ import annotations

import json
import shutil
import struct
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
N_VOCAB = 512


def tiny_model(arch: str, real: Path):
    """tests/tiny.py's model at 1 layer of width 64, with the real vocabulary cut to N_VOCAB."""
    import tiny
    tiny.D, tiny.FF, tiny.H, tiny.KV, tiny.HD, tiny.LAYERS = 64, 64, 2, 1, 32, 1
    src = tiny.tiny_source(arch, real)
    meta = src.meta
    tokens = meta["tokenizer.ggml.tokens"][:N_VOCAB]
    meta["tokenizer.ggml.tokens"] = tokens
    for key in ("tokenizer.ggml.scores", "tokenizer.ggml.token_type"):
        if key in meta:
            meta[key] = meta[key][:N_VOCAB]
    if "tokenizer.ggml.merges" in meta:
        have = set(tokens)
        meta["tokenizer.ggml.merges"] = [m for m in meta["tokenizer.ggml.merges"]
                                         if all(p in have for p in m.split(" ")) and m.replace(" ", "") in have]
    meta.pop(f"{arch}.vocab_size", None)
    load = src.load
    src.load = lambda n: load(n)[:N_VOCAB] if n in ("token_embd.weight", "output.weight") else load(n)
    src.shapes = {n: (N_VOCAB, *s[1:]) if n in ("token_embd.weight", "output.weight") else s for n, s in src.shapes.items()}
    return src


def write_model(src, out: Path) -> None:
    from edge_rt import formats
    from edge_rt.converters.quantize import choose_formats
    from edge_rt.converters.writers import edge_rt_items, write_gguf
    items, extra = edge_rt_items(src, choose_formats(src.shapes, 4, 64))
    write_gguf(out, src, items, extra | {"edgert.format_version": formats.FORMAT_VERSION}, progress=False)


def hostile_ggufs(seed: bytes) -> dict[str, bytes]:
    """One field of the seed's header changed; the tensor data cut off where it matters not."""
    from fuzz import gguf_fields, set_field
    fields = gguf_fields(seed)

    def first(kind, nth=0):
        return [f for f in fields if f[2] == kind][nth]

    out = {}
    cases = {"n_tensors-max": ("n_tensors", 0, 2**64 - 1), "n_kv-max": ("n_kv", 0, 2**64 - 1),
             "strlen-max": ("strlen", 0, 2**64 - 1), "strlen-wraps": ("strlen", 3, 2**64 - 8),
             "count-near-2^64": ("count", 0, 2**64 - 8), "count-2^61": ("count", 0, 2**61),
             "vtype-13": ("vtype", 2, 13), "etype-out-of-range": ("etype", 0, 2**32 - 1),
             "etype-array": ("etype", 0, 9), "n_dims-0": ("n_dims", 0, 0), "n_dims-5": ("n_dims", 0, 5),
             "dims-overflow-a": ("dim", 0, 2**32), "dims-overflow-b": ("dim", 1, 2**63),
             "type-id-40": ("ttype", 0, 40), "type-id-max": ("ttype", 1, 2**32 - 1),
             "offset-wraps": ("offset", 1, 2**64 - 64), "offset-past-end": ("offset", 2, 2**40),
             "alignment-0": ("align", 0, 0), "alignment-3": ("align", 0, 3), "alignment-2^31": ("align", 0, 2**31)}
    for name, (kind, nth, value) in cases.items():
        pos, size, _ = first(kind, nth)
        out[name] = set_field(seed, pos, size, value)
    offs = [f for f in fields if f[2] == "offset"]
    a = int.from_bytes(seed[offs[1][0]:offs[1][0] + 8], "little")
    out["offset-overlaps"] = set_field(seed, offs[2][0], 8, a)  # two tensors on the same bytes
    dims = [f for f in fields if f[2] == "dim"]
    out["dims-product-2^64"] = set_field(set_field(seed, dims[0][0], 8, 2**32), dims[1][0], 8, 2**32)
    head = seed[:4096]
    out["header-only"] = head
    # arrays nested 6 deep, then a count of 2^64-1
    nest = struct.pack("<Q", 4) + b"deep" + struct.pack("<I", 9)
    for _ in range(6):
        nest += struct.pack("<IQ", 9, 1)
    nest += struct.pack("<IQ", 4, 2**64 - 1)
    out["nested-arrays"] = b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + nest
    return out


TEMPLATES = {
    "range-huge": "{% for i in range(10**9) %}x{% endfor %}",
    "string-times": "{{ 'a' * 10**9 }}",
    "doubling": "{% set ns = namespace(x='ab') %}{% for i in range(64) %}{% set ns.x = ns.x ~ ns.x %}{% endfor %}{{ ns.x }}",
    "dunder": "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "format": "{{ '{0.__class__}'.format(messages) }}",
    "recursion": "{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}",
    "raise": "{{ raise_exception('refused by the template') }}",
    "replace-grow": "{% set s = 'a' * 1000 %}{{ s.replace('a', s).replace('a', s) }}",
    "join-huge": "{{ [messages[0].content] * 10**7 | join }}",
    "tojson": "{{ messages | tojson(indent=2) }}{{ strftime_now('%Y') }}",
    "unclosed": "{% for m in messages %}{{ m.content }",
    "filters": "{{ messages | map(attribute='content') | join(', ') | upper | truncate(5) | wordcount }}",
}


def write_all(corpus: Path) -> None:
    from edge_rt.converters.hf import write_hf_folder
    from edge_rt.gguf_file import GGUFFile
    from edge_rt.models.registry import MODELS
    from edge_rt.pull import pull
    shutil.rmtree(corpus, ignore_errors=True)
    for d in ("gguf", "hf", "hf-folder", "template"):
        (corpus / d).mkdir(parents=True)
    smol = tiny_model("llama", pull("smollm2-135m"))
    write_model(smol, corpus / "gguf" / "smollm2-tiny.gguf")
    gemma = tiny_model("gemma3", pull("gemma3-270m"))
    gemma.meta.setdefault("tokenizer.chat_template", MODELS["gemma3-270m"].chat_template)  # as convert adds it
    write_model(gemma, corpus / "gguf" / "gemma3-tiny.gguf")
    for name, data in hostile_ggufs((corpus / "gguf" / "smollm2-tiny.gguf").read_bytes()).items():
        (corpus / "gguf" / f"hostile-{name}.gguf").write_bytes(data)

    write_hf_folder(smol.meta, {n: smol.load(n) for n in smol.shapes}, corpus / "hf-folder", dtype="float16")
    files = sorted(p.name for p in (corpus / "hf-folder").iterdir())
    for i, name in enumerate(files):
        (corpus / "hf" / f"{name}").write_bytes(bytes([i]) + (corpus / "hf-folder" / name).read_bytes())
    st = files.index("model.safetensors")
    blob = (corpus / "hf-folder" / "model.safetensors").read_bytes()
    n = struct.unpack_from("<Q", blob)[0]
    header = json.loads(blob[8:8 + n])
    first = next(k for k in header if k != "__metadata__")

    def with_header(h: dict, length: int | None = None) -> bytes:
        text = json.dumps(h).encode()
        return bytes([st]) + struct.pack("<Q", len(text) if length is None else length) + text + blob[8 + n:]

    (corpus / "hf" / "st-length-max").write_bytes(with_header(header, 2**64 - 1))
    for label, change in {"shape-overflow": {"shape": [2**32, 2**32, 2**32]}, "offsets-wrap": {"data_offsets": [2**64 - 2, 4]},
                          "dtype-unknown": {"dtype": "F8_E9M9"}, "offsets-overlap": {"data_offsets": [0, 8]}}.items():
        h = json.loads(json.dumps(header))
        h[first] |= change
        (corpus / "hf" / f"st-{label}").write_bytes(with_header(h))
    cfg = files.index("config.json")
    config = json.loads((corpus / "hf-folder" / "config.json").read_text())
    for label, change in {"hidden-huge": {"hidden_size": 2**40}, "layers-negative": {"num_hidden_layers": -1},
                          "heads-zero": {"num_attention_heads": 0}, "vocab-2^63": {"vocab_size": 2**63}}.items():
        (corpus / "hf" / f"config-{label}").write_bytes(bytes([cfg]) + json.dumps(config | change).encode())

    for name in ("smollm2-tiny", "gemma3-tiny"):
        t = GGUFFile(corpus / "gguf" / f"{name}.gguf").meta["tokenizer.chat_template"]
        (corpus / "template" / f"real-{name.split('-')[0]}.jinja").write_text(t)
    for name, t in TEMPLATES.items():
        (corpus / "template" / f"hostile-{name}.jinja").write_text(t)
    total = sum(p.stat().st_size for p in corpus.rglob("*") if p.is_file())
    print(f"wrote {sum(1 for p in corpus.rglob('*') if p.is_file())} files, {total / 1024:.0f} KiB, to {corpus}")
