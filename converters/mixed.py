"""Mixed precision under a size budget: each matrix (token embeddings and output head
included) gets one of WIDTHS bits, chosen greedily from measured sensitivity so that
the whole file (header, metadata, padding and all) fits the budget.

Sensitivity of a matrix at b bits: its round-to-nearest error weighted by the mean
squared input of each column, sum_j E[x_j^2] ||W[:, j] - Q_b(W)[:, j]||^2 (the diagonal
of the layer's output error; convert always calibrates for a mix: with E[x_j^2] = 1 the
tied SmolLM2 head went to 2 bits and a 3.5-bit mix scored a perplexity of 5389). Start every matrix at
the narrowest width; then, while something still fits, widen the matrix that buys the
most error per added byte. Tensors named in `keep` (the embeddings/head under a mix
with --embed-bits) keep the width they were given and are not part of the choice."""
from __future__ import annotations

import numpy as np
from tqdm import tqdm

from edge_rt import formats
from edge_rt.errors import EdgeRtError
from edge_rt.plan import format_size

WIDTHS = (2, 3, 4, 8)


def sensitivity(w: np.ndarray, importance: np.ndarray, group_size: int) -> dict[int, float]:
    """bits -> importance-weighted squared error of round-to-nearest at that width."""
    out = {}
    for bits in WIDTHS:
        fmt = formats.GroupQuant(bits, group_size)
        err = np.square(w - fmt.dequantize(fmt.quantize(w), w.shape[1]))
        out[bits] = float(err.sum(axis=0, dtype=np.float64) @ importance)
    return out


def choose_widths(src, chosen: dict, budget: int, file_size, gram: dict | None, count: dict | None,
                  group_size: int, progress: bool | None = None, keep=()) -> dict:
    """chosen: name -> format with every quantizable matrix as a GroupQuant (its width is
    replaced, except for the names in keep); file_size(chosen) -> exact bytes of the file.
    Returns the new choice."""
    names = [n for n, f in chosen.items() if isinstance(f, formats.GroupQuant) and n not in keep]
    bits = {n: WIDTHS[0] for n in names}

    def with_bits(b):
        return chosen | {n: formats.GroupQuant(b[n], group_size) for n in names}

    fixed = file_size(with_bits(bits))  # header, the float tensors and every matrix at the narrowest width
    if fixed > budget:
        raise EdgeRtError(f"the budget {format_size(budget)} is below the smallest file this model makes "
                          f"({format_size(fixed)}, every matrix at {WIDTHS[0]} bits)")
    sens = {}
    for name in tqdm(names, desc="sensitivity", unit="tensor", disable=None if progress is None else not progress):
        w = np.asarray(src.load(name), np.float32)
        h = np.diag(gram[name]) / count[name] if gram and name in gram else np.ones(w.shape[1])
        sens[name] = sensitivity(w, h, group_size)
    pad = lambda n: -(-n // 64) * 64  # noqa: E731 (every tensor part starts on a 64-byte boundary)

    def size(name, b):
        rows, cols = src.shapes[name]
        g = -(-cols // group_size)
        return pad(rows * cols * b // 8) + 2 * pad(2 * rows * g)

    spare = budget - fixed
    while True:
        best, gain = None, 0.0
        for n in names:
            i = WIDTHS.index(bits[n])
            if i + 1 == len(WIDTHS):
                continue
            nb = WIDTHS[i + 1]
            cost = size(n, nb) - size(n, bits[n])
            if cost <= spare and (sens[n][bits[n]] - sens[n][nb]) / cost > gain:
                best, gain = n, (sens[n][bits[n]] - sens[n][nb]) / cost
        if best is None:
            break
        nb = WIDTHS[WIDTHS.index(bits[best]) + 1]
        spare -= size(best, nb) - size(best, bits[best])
        bits[best] = nb
    return with_bits(bits)
