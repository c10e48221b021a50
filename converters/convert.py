"""The convert journey: read the source as float32, choose each tensor's format,
quantize and write, atomically."""
from __future__ import annotations

from pathlib import Path

from edge_rt.errors import EdgeRtError
from edge_rt.models import spec_from_meta
from edge_rt.models.registry import by_sha256

from .quantize import LLAMA_CPP_TYPES, choose_formats
from .readers import open_source
from .writers import edge_rt_items, llama_cpp_items, provenance, write_gguf

BITS = (2, 3, 4, 8, 16, 32)
from edge_rt.formats import DEFAULT_GROUP_SIZE


def convert(src_path, out_path, bits: int = 4, group_size: int = DEFAULT_GROUP_SIZE,
            target: str = "edge-rt", progress: bool | None = None) -> Path:
    """Convert a GGUF or Hugging Face folder to `target` ("edge-rt" or "llama.cpp")."""
    if bits not in BITS:
        raise EdgeRtError(f"--bits {bits} is not offered (choose from {', '.join(map(str, BITS))})")
    if target == "llama.cpp" and bits not in LLAMA_CPP_TYPES:
        raise EdgeRtError(f"--format llama.cpp writes {', '.join(f'{b} bits as {t}' for b, t in LLAMA_CPP_TYPES.items())}; "
                          f"--bits {bits} has no llama.cpp type here")
    if group_size <= 0 or group_size % 32:
        raise EdgeRtError(f"--group-size must be a positive multiple of 32, got {group_size}")
    src = open_source(src_path)
    known = by_sha256(src.sha256)
    if known and known.chat_template and "tokenizer.chat_template" not in src.meta:
        src.meta["tokenizer.chat_template"] = known.chat_template
    # the architecture and every tensor's shape, checked before anything is written
    spec_from_meta(src.meta, len(src.meta.get("tokenizer.ggml.tokens", [])), src.path).check_tensors(src.shapes, src.path)
    if target == "llama.cpp":
        items, extra = llama_cpp_items(src, bits)
        write_gguf(out_path, src, items, extra, progress, alignment=None)
    else:
        items, extra = edge_rt_items(src, choose_formats(src.shapes, bits, group_size))
        write_gguf(out_path, src, items, extra | provenance(src, bits, group_size), progress)
    return Path(out_path)
