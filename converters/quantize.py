"""Which format each tensor gets, and how its codes are chosen. Matrices take the
requested width; norms, biases and anything whose rows are not a whole number of
32-column blocks stay float32.

Methods (how a group-quantized tensor's codes and (d, m) are chosen):
  rtn    the format's own round-to-nearest over each group's [min, max]
  clip   a per-group search over clipped ranges with a least-squares refit (gptq.search)
  gptq   calibrated: GPTQ error compensation with each matrix's input Gram matrix,
         groups fitted by the clip search weighted by the Gram diagonal, then each
         row's (d, m) refitted to its final codes on the whole Gram matrix
  awq    calibrated: activation-aware input scales (converters/awq.py), then rtn
  awq+gptq  the scales, then gptq with the scaled inputs' Gram matrices
  auto   each of AUTO in turn, keeping the file with the lowest perplexity on held-out
         validation text (converters/convert.py)"""
from __future__ import annotations

from edge_rt import formats

from . import gptq

LLAMA_CPP_TYPES = {32: "F32", 16: "F16", 8: "Q8_0", 4: "Q4_0"}
METHODS = ("rtn", "clip", "gptq", "awq", "awq+gptq", "auto")
CALIBRATED = ("gptq", "awq", "awq+gptq", "auto")
AUTO = ("gptq", "awq", "awq+gptq")
EMBEDDINGS = ("token_embd.weight", "output.weight")


def is_weight_matrix(name: str, shape) -> bool:
    return name.endswith(".weight") and len(shape) == 2


def choose_formats(shapes: dict, bits: int, group_size: int, embed_bits: int | None = None) -> dict:
    """name -> format object from edge_rt.formats, for our GGUF. embed_bits: the width of
    the token embeddings and output head (default: bits)."""
    chosen = {}
    for name, shape in shapes.items():
        wanted = formats.for_bits(embed_bits if embed_bits and name in EMBEDDINGS else bits, group_size)
        fits = not isinstance(wanted, formats.GroupQuant) or shape[-1] % formats.BLOCK == 0
        chosen[name] = wanted if is_weight_matrix(name, shape) and fits else formats.F32()
    return chosen


def quantizer(method: str, gram: dict | None = None):
    """quantize(name, fmt, w) -> (codes, d, m) for a method, as fmt.round returns them
    (unpacked: fmt.encode makes the file's parts, fmt.decode the float weights);
    gram: name -> input Gram matrix."""
    def quantize(name, fmt, w):
        if method in ("rtn", "awq"):
            return fmt.round(w)
        H = (gram or {}).get(name)
        if method in ("gptq", "awq+gptq") and H is not None:
            return gptq.gptq(w, H, fmt)
        return gptq.search(w, fmt)
    return quantize
