"""Which format each tensor gets. Matrices take the requested width; norms, biases
and anything whose rows are not a whole number of 32-column blocks stay float32."""
from __future__ import annotations

from edge_rt import formats

LLAMA_CPP_TYPES = {32: "F32", 16: "F16", 8: "Q8_0", 4: "Q4_0"}


def is_weight_matrix(name: str, shape) -> bool:
    return name.endswith(".weight") and len(shape) == 2


def choose_formats(shapes: dict, bits: int, group_size: int) -> dict:
    """name -> format object from edge_rt.formats, for our GGUF."""
    wanted = formats.for_bits(bits, group_size)
    chosen = {}
    for name, shape in shapes.items():
        fits = not isinstance(wanted, formats.GroupQuant) or shape[-1] % formats.BLOCK == 0
        chosen[name] = wanted if is_weight_matrix(name, shape) and fits else formats.F32()
    return chosen
