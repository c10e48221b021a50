"""The convert journey: read the source as float32, choose each tensor's format,
quantize and write, atomically."""
from __future__ import annotations

import math
import os
import sys
from pathlib import Path

from edge_rt.atomic import check_output
from edge_rt.errors import EdgeRtError
from edge_rt.formats import DEFAULT_GROUP_SIZE, GroupQuant
from edge_rt.models import spec_from_meta
from edge_rt.models.registry import by_sha256

from . import awq, calibrate
from . import prune as pruning
from .mixed import WIDTHS as MIXED_WIDTHS, choose_widths
from .quantize import AUTO, CALIBRATED, EMBEDDINGS, LLAMA_CPP_TYPES, METHODS, choose_formats, quantizer
from .readers import open_source
from .writers import edge_rt_items, file_bytes, llama_cpp_items, provenance, write_gguf

BITS = (2, 3, 4, 5, 6, 8, 16, 32)
AUTO_WINDOWS = 8  # windows of held-out validation text that --method auto scores each candidate on


def convert(src_path, out_path, bits: float = 4, group_size: int = DEFAULT_GROUP_SIZE,
            target: str = "edge-rt", progress: bool | None = None, method: str = "rtn",
            embed_bits: int | None = None, calib_text=None, calib_windows: int | None = None,
            size: int | None = None, prune: str | None = None, int8_activations: bool = False) -> Path:
    """Convert a GGUF or Hugging Face folder to `target` ("edge-rt", "llama.cpp", or "onnx":
    edge-rt's weights as an ONNX graph, converters/onnx_export.py; int8_activations: its
    4-bit products with int8 activations).
    method: how group codes are chosen (quantize.METHODS); the calibrated ones run the
    source on calib_windows windows of calib_text (defaults: calibrate.DEFAULT_WINDOWS of
    wikitext-2 validation).
    Mixed precision: bits not one of BITS (an average, 8 x file bytes / parameters) or a
    size in bytes; the file then never exceeds that budget, and each matrix's group size is
    chosen too, from group_size and its doublings up to mixed.MAX_GROUP. prune: see
    converters/prune.py."""
    mixed = size is not None or bits not in BITS
    if mixed and target != "edge-rt":
        raise EdgeRtError("mixed precision (--bits with a fraction, or --size) writes only --format edge-rt")
    if mixed and size is None and not MIXED_WIDTHS[0] <= bits <= MIXED_WIDTHS[-1]:
        raise EdgeRtError(f"--bits {bits}: an average width must lie in {MIXED_WIDTHS[0]}..{MIXED_WIDTHS[-1]} "
                          f"(or be one of {', '.join(map(str, BITS))})")
    if method not in METHODS:
        raise EdgeRtError(f"--method {method} is not offered (choose from {', '.join(METHODS)})")
    if embed_bits is not None and embed_bits not in BITS:
        raise EdgeRtError(f"--embed-bits {embed_bits} is not offered (choose from {', '.join(map(str, BITS))})")
    if not mixed and bits not in BITS:
        raise EdgeRtError(f"--bits {bits} is not offered (choose from {', '.join(map(str, BITS))})")
    if target == "llama.cpp" and bits not in LLAMA_CPP_TYPES:
        raise EdgeRtError(f"--format llama.cpp writes {', '.join(f'{b} bits as {t}' for b, t in LLAMA_CPP_TYPES.items())}; "
                          f"--bits {bits} has no llama.cpp type here")
    if prune is not None:
        pruning.parse(prune)
        if target != "edge-rt":
            raise EdgeRtError("--prune writes only --format edge-rt")
    if group_size <= 0 or group_size % 32:
        raise EdgeRtError(f"--group-size must be a positive multiple of 32, got {group_size}")
    if method == "auto" and target != "edge-rt":
        raise EdgeRtError("--method auto writes only --format edge-rt (it scores each candidate with edge-rt eval)")
    if int8_activations and target != "onnx":
        raise EdgeRtError("--int8-activations is an option of --format onnx")
    if target == "onnx":
        from . import onnx_export  # noqa: PLC0415 (only this target needs onnx)
        onnx_export.check_options(bits, group_size, embed_bits)
    check_output(out_path)  # before the source is read and calibrated
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
        chosen = choose_formats(src.shapes, MIXED_WIDTHS[0] if mixed else bits, group_size, embed_bits)
        quantized = any(isinstance(f, GroupQuant) for f in chosen.values())
        stats = calibrate.collect(src, calib_text, calib_windows or calibrate.DEFAULT_WINDOWS, progress=progress) \
            if (method in CALIBRATED and quantized) or prune else None
        gram, count = (stats.gram, stats.count) if stats else (None, None)
        del stats  # and with it its float32 copy of every tensor (1.1 GB for Gemma-3): only the Grams go on
        meta = provenance(src, bits, group_size)
        if prune:
            src, gram = pruning.apply(src, prune, gram, count)
            meta["edgert.prune"] = prune
        runs = AUTO if method == "auto" else (method,)
        outs = {m: Path(out_path) if len(runs) == 1 else Path(f"{out_path}.{m}.tmp") for m in runs}
        try:
            for m in runs:
                _quantize_and_write(src, chosen, m, gram, count, meta, outs[m], mixed, size, bits, group_size, progress,
                                    target, int8_activations, embed_bits, calib_text)
            if len(runs) > 1:
                scores = {m: held_out_perplexity(outs[m], calib_text) for m in runs}
                best = min(scores, key=scores.get)
                print("edge-rt: --method auto: validation perplexity " + ", ".join(
                    f"{m} {p:.4f}" for m, p in scores.items()) + f"; kept {best}", file=sys.stderr)
                os.replace(outs[best], out_path)
        finally:
            for p in outs.values():
                if p != Path(out_path):
                    p.unlink(missing_ok=True)
    return Path(out_path)


def _quantize_and_write(src, chosen, method, gram, count, meta, out_path, mixed, size, bits, group_size, progress,
                        target="edge-rt", int8_activations=False, embed_bits=None, calib_text=None):
    """Scale (awq), choose the widths (a mix: embed_bits, when given, fixes the embeddings'
    and head's), quantize with `method` and write out_path (our GGUF, or the ONNX graph
    for target "onnx")."""
    meta = meta | {"edgert.method": method}
    if method.startswith("awq"):
        src, gram, _ = awq.apply(src, chosen, gram, count, progress)
    budget = None
    if mixed:
        budget = size if size is not None else int(bits * sum(math.prod(s) for s in src.shapes.values()) / 8)
        meta["edgert.budget_bytes"] = budget

        def file_size(ch):
            items, extra = edge_rt_items(src, ch)
            return file_bytes(src, items, extra | meta)
        keep = EMBEDDINGS if embed_bits is not None else ()
        chosen = choose_widths(src, chosen, budget, file_size, quantizer(method, gram), group_size, progress, keep,
                               calib_text)
    if target == "onnx":
        from . import onnx_export  # noqa: PLC0415 (only this target needs onnx)
        onnx_export.write_onnx(out_path, src, chosen, quantizer(method, gram), meta, progress, int8_activations)
        return
    items, extra = edge_rt_items(src, chosen, quantizer(method, gram))
    write_gguf(out_path, src, items, extra | meta, progress)
    if budget is not None and Path(out_path).stat().st_size > budget:  # file_bytes disagrees with the writer
        Path(out_path).unlink()
        raise EdgeRtError(f"internal: the mixed-precision file came out over its budget of {budget} bytes")


def held_out_perplexity(path: Path, calib_text=None) -> float:
    """Perplexity of a converted file on the second half of the calibration text (the
    calibration windows come from its start), AUTO_WINDOWS windows of DEFAULT_CTX."""
    from edge_rt.api import load  # noqa: PLC0415 (the runtime, only for --method auto)
    text = Path(calib_text or calibrate.VALID_TEXT).read_text(encoding="utf-8")
    model = load(path, ctx=calibrate.DEFAULT_CTX, verify=False)
    return model.eval_perplexity(text[len(text) // 2:], calibrate.DEFAULT_CTX, AUTO_WINDOWS)["ppl"]
