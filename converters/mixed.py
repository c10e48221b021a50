"""Mixed precision under a size budget: each matrix (token embeddings and output head
included) gets one of WIDTHS bits, chosen from measured sensitivity so that
the whole file (header, metadata, padding and all) fits the budget.

Sensitivity of a matrix at b bits, measured end to end (converters/sensitivity.py): the
mean KL divergence of the model's next-token distribution with only that matrix quantized
to b bits (by the quantizer the file is written with: GPTQ under --method gptq) against
the float model's, on one window of 128 tokens of calibration text, 64 positions scored.
The widest width costs 0 (measured, under 1% of the 4-bit cost). The widths minimize
the summed costs within the budget: a multiple-choice knapsack, solved by dynamic
programming over the spare bytes in steps of at most 1/8192 of them, each cost rounded up
to a step so that the choice always fits (exact up to that rounding); the bytes the
rounding leaves then go, greedily, to the matrix that buys the most cost per added byte.
(A greedy walk alone can strand bytes before a big step: Gemma-3's tied head costs 84 MB
more at 8 bits than at 4.) Tensors named in `keep` (the embeddings/head under a mix with
--embed-bits) keep the width they were given and are not part of the choice.
Known limit: the costs are measured one matrix at a time on a float model and added, as
if independent; the errors of many narrow matrices compound (BENCHMARKS.md, issue 5,
round 7, says where this beats and where it misses llama.cpp's files). One window of
text makes the measure noisy (two windows disagree by up to 3x on one matrix)."""
from __future__ import annotations

import numpy as np

from edge_rt import formats
from edge_rt.errors import EdgeRtError
from edge_rt.plan import format_size

from . import sensitivity

WIDTHS = (2, 3, 4, 5, 6, 8)


def allocate(errors: list[dict], costs: list[dict], spare: int, steps: int = 8192) -> list[int]:
    """The widths (one of WIDTHS per matrix) minimizing sum errors[i][b_i] subject to
    sum costs[i][b_i] <= spare (costs: bytes over the narrowest width, 0 for it)."""
    step = max(1, -(-spare // steps))
    cap = spare // step
    units = [{b: -(-c[b] // step) for b in WIDTHS} for c in costs]
    best = np.zeros(cap + 1)  # best[u]: least error of the matrices so far within u steps
    pick = np.zeros((len(errors), cap + 1), np.int8)
    for i, (err, unit) in enumerate(zip(errors, units)):
        new = np.full(cap + 1, np.inf)
        for k, b in enumerate(WIDTHS):
            if unit[b] > cap:
                continue
            cand = np.full(cap + 1, np.inf)
            cand[unit[b]:] = best[:cap + 1 - unit[b]] + err[b]
            better = cand < new
            new[better], pick[i, better] = cand[better], k
        best = new
    out, u = [], cap
    for i in reversed(range(len(errors))):
        b = WIDTHS[pick[i, u]]
        out.append(b)
        u -= units[i][b]
    return out[::-1]


def choose_widths(src, chosen: dict, budget: int, file_size, quantize, group_size: int,
                  progress: bool | None = None, keep=(), calib_text=None) -> dict:
    """chosen: name -> format with every quantizable matrix as a GroupQuant (its width is
    replaced, except for the names in keep); file_size(chosen) -> exact bytes of the file;
    quantize(name, fmt, w) -> parts: the quantizer the file is written with, which the
    measure uses too. Returns the new choice."""
    names = [n for n, f in chosen.items() if isinstance(f, formats.GroupQuant) and n not in keep]

    def with_bits(b):
        return chosen | {n: formats.GroupQuant(b[n], group_size) for n in names}

    # header, the float tensors and every matrix at the narrowest width
    fixed = file_size(with_bits(dict.fromkeys(names, WIDTHS[0])))
    if fixed > budget:
        raise EdgeRtError(f"the budget {format_size(budget)} is below the smallest file this model makes "
                          f"({format_size(fixed)}, every matrix at {WIDTHS[0]} bits)")
    # the widest width's cost is taken as 0: measured at 8 bits it is 0.3-0.7% of the 4-bit cost
    # (SmolLM2, GPTQ, BENCHMARKS.md round 7), below the measure's noise, and not worth a run per matrix
    costs = sensitivity.measure(src, names, WIDTHS[:-1], group_size, quantize, calib_text, progress=progress)
    costs = {n: c | {WIDTHS[-1]: 0.0} for n, c in costs.items()}
    sizes = {n: {b: matrix_bytes(src.shapes[n], b, group_size) for b in WIDTHS} for n in names}
    return with_bits(fit(costs, sizes, budget - fixed))


def matrix_bytes(shape, bits: int, group_size: int) -> int:
    """Bytes of a group-quantized matrix in our file: codes, then d and m (float16 per
    group), each part starting on a 64-byte boundary."""
    pad = lambda n: -(-n // 64) * 64  # noqa: E731
    rows, cols = shape
    return pad(rows * cols * bits // 8) + 2 * pad(2 * rows * -(-cols // group_size))


def fit(costs: dict, sizes: dict, spare: int) -> dict:
    """name -> width minimizing sum costs[name][width] with the bytes over every matrix
    at WIDTHS[0], sum sizes[name][width] - sizes[name][WIDTHS[0]], within spare: the
    knapsack (allocate), then the bytes its rounding left, greedily."""
    names = list(costs)
    extra = {n: {b: sizes[n][b] - sizes[n][WIDTHS[0]] for b in WIDTHS} for n in names}
    bits = dict(zip(names, allocate([costs[n] for n in names], [extra[n] for n in names], spare)))
    spare -= sum(extra[n][bits[n]] for n in names)
    while True:
        best, gain = None, 0.0
        for n in names:
            i = WIDTHS.index(bits[n])
            if i + 1 == len(WIDTHS):
                continue
            nb = WIDTHS[i + 1]
            cost = extra[n][nb] - extra[n][bits[n]]
            if cost <= spare and (costs[n][bits[n]] - costs[n][nb]) / cost > gain:
                best, gain = n, (costs[n][bits[n]] - costs[n][nb]) / cost
        if best is None:
            return bits
        nb = WIDTHS[WIDTHS.index(bits[best]) + 1]
        spare -= extra[best][nb] - extra[best][bits[best]]
        bits[best] = nb
