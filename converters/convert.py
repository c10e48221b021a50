"""The convert journey: read the source as float32, choose each tensor's format,
quantize and write, atomically."""
from __future__ import annotations

from pathlib import Path

from edge_rt.errors import EdgeRtError
from edge_rt.models import spec_from_meta
from edge_rt.models.registry import by_sha256

from . import calibrate
from .quantize import CALIBRATED, LLAMA_CPP_TYPES, METHODS, choose_formats, quantizer
from .readers import open_source
from .writers import edge_rt_items, llama_cpp_items, provenance, write_gguf

BITS = (2, 3, 4, 8, 16, 32)
from edge_rt.formats import DEFAULT_GROUP_SIZE, GroupQuant


def convert(src_path, out_path, bits: int = 4, group_size: int = DEFAULT_GROUP_SIZE,
            target: str = "edge-rt", progress: bool | None = None, method: str = "rtn",
            embed_bits: int | None = None, calib_text=None, calib_windows: int = calibrate.DEFAULT_WINDOWS) -> Path:
    """Convert a GGUF or Hugging Face folder to `target` ("edge-rt" or "llama.cpp").
    method: how group codes are chosen (quantize.METHODS); the calibrated ones run the
    source on calib_windows windows of calib_text (default: wikitext-2 validation)."""
    if method not in METHODS:
        raise EdgeRtError(f"--method {method} is not offered (choose from {', '.join(METHODS)})")
    if embed_bits is not None and embed_bits not in BITS:
        raise EdgeRtError(f"--embed-bits {embed_bits} is not offered (choose from {', '.join(map(str, BITS))})")
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
        chosen = choose_formats(src.shapes, bits, group_size, embed_bits)
        quantized = any(isinstance(f, GroupQuant) for f in chosen.values())
        gram = None
        if method in CALIBRATED and quantized:
            gram = calibrate.collect(src, calib_text, calib_windows, progress=progress).gram
        items, extra = edge_rt_items(src, chosen, quantizer(method, gram))
        extra["edgert.method"] = method
        write_gguf(out_path, src, items, extra | provenance(src, bits, group_size), progress)
    return Path(out_path)
