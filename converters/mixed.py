"""Mixed precision under a size budget: each matrix (token embeddings and output head
included) gets one of WIDTHS bits at one of the offered group sizes (`group_sizes`:
the convert's --group-size and each doubling of it up to MAX_GROUP), chosen from measured
sensitivity so that the whole file (header, metadata, padding and all) fits the budget.
A choice is an option (bits, group size); 8 bits is offered at the largest group size
only (its cost is taken as 0, so a smaller group would only cost bytes).

Sensitivity of a matrix at an option, measured end to end (converters/sensitivity.py): the
mean KL divergence of the model's next-token distribution with only that matrix quantized
to it (by the quantizer the file is written with: GPTQ under --method gptq) against
the float model's, on one window of 128 tokens of calibration text, 64 positions scored.
The widest width costs 0 (measured, under 1% of the 4-bit cost). The options minimize
the summed costs within the budget: a multiple-choice knapsack, solved by dynamic
programming over the spare bytes in steps of at most 1/8192 of them, each cost rounded up
to a step so that the choice always fits (exact up to that rounding); the bytes the
rounding leaves then go, greedily, to the move to a wider option that buys the most cost
per added byte.
(A greedy walk alone can strand bytes before a big step: Gemma-3's tied head costs 84 MB
more at 8 bits than at 4.) Tensors named in `keep` (the embeddings/head under a mix with
--embed-bits) keep the format they were given and are not part of the choice.
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
MAX_GROUP = 128


def group_sizes(group_size: int) -> tuple[int, ...]:
    """The group sizes a mix offers: group_size and each doubling of it up to MAX_GROUP."""
    out = [group_size]
    while out[-1] * 2 <= MAX_GROUP:
        out.append(out[-1] * 2)
    return tuple(out)


def options(groups) -> list[tuple[int, int]]:
    """(bits, group size) pairs, narrowest first: every width below 8 at every group size,
    and 8 bits at the largest."""
    return [(b, g) for b in WIDTHS[:-1] for g in sorted(groups, reverse=True)] + [(WIDTHS[-1], max(groups))]


def allocate(errors: list[dict], costs: list[dict], spare: int, steps: int = 8192) -> list:
    """The options (the keys of errors[i] and costs[i], the same for every i) minimizing
    sum errors[i][o_i] subject to sum costs[i][o_i] <= spare (costs: bytes over the
    narrowest option, 0 for it)."""
    keys = list(costs[0]) if costs else []
    step = max(1, -(-spare // steps))
    cap = spare // step
    units = [{o: -(-c[o] // step) for o in keys} for c in costs]
    best = np.zeros(cap + 1)  # best[u]: least error of the matrices so far within u steps
    pick = np.zeros((len(errors), cap + 1), np.int8)
    for i, (err, unit) in enumerate(zip(errors, units)):
        new = np.full(cap + 1, np.inf)
        for k, o in enumerate(keys):
            if unit[o] > cap:
                continue
            cand = np.full(cap + 1, np.inf)
            cand[unit[o]:] = best[:cap + 1 - unit[o]] + err[o]
            better = cand < new
            new[better], pick[i, better] = cand[better], k
        best = new
    out, u = [], cap
    for i in reversed(range(len(errors))):
        o = keys[pick[i, u]]
        out.append(o)
        u -= units[i][o]
    return out[::-1]


def choose_widths(src, chosen: dict, budget: int, file_size, quantize, group_size: int,
                  progress: bool | None = None, keep=(), calib_text=None) -> dict:
    """chosen: name -> format with every quantizable matrix as a GroupQuant (its format is
    replaced, except for the names in keep); file_size(chosen) -> exact bytes of the file;
    quantize(name, fmt, w) -> (codes, d, m): the quantizer the file is written with, which the
    measure uses too. Returns the new choice."""
    names = [n for n, f in chosen.items() if isinstance(f, formats.GroupQuant) and n not in keep]
    opts = options(group_sizes(group_size))

    def with_options(o):
        return chosen | {n: formats.GroupQuant(*o[n]) for n in names}

    # header, the float tensors and every matrix at the narrowest option
    fixed = file_size(with_options(dict.fromkeys(names, opts[0])))
    if fixed > budget:
        raise EdgeRtError(f"the budget {format_size(budget)} is below the smallest file this model makes "
                          f"({format_size(fixed)}, every matrix at {opts[0][0]} bits in groups of {opts[0][1]})")
    # the widest width's cost is taken as 0: measured at 8 bits it is 0.3-0.7% of the 4-bit cost
    # (SmolLM2, GPTQ, BENCHMARKS.md round 7), below the measure's noise, and not worth a run per matrix
    costs = sensitivity.measure(src, names, opts[:-1], quantize, calib_text, progress=progress)
    costs = {n: c | {opts[-1]: 0.0} for n, c in costs.items()}
    sizes = {n: {o: matrix_bytes(src.shapes[n], *o) for o in opts} for n in names}
    return with_options(fit(costs, sizes, budget - fixed))


def matrix_bytes(shape, bits: int, group_size: int) -> int:
    """Bytes of a group-quantized matrix in our file: codes, then d and m (float16 per
    group), each part starting on a 64-byte boundary."""
    pad = lambda n: -(-n // 64) * 64  # noqa: E731
    rows, cols = shape
    return pad(rows * cols * bits // 8) + 2 * pad(2 * rows * -(-cols // group_size))


def fit(costs: dict, sizes: dict, spare: int) -> dict:
    """name -> option minimizing sum costs[name][option] with the bytes over every matrix
    at its narrowest (smallest) option within spare: the knapsack (allocate), then the bytes
    its rounding left, greedily."""
    names = list(costs)
    extra = {n: {o: b - min(sizes[n].values()) for o, b in sizes[n].items()} for n in names}
    pick = dict(zip(names, allocate([costs[n] for n in names], [extra[n] for n in names], spare)))
    spare -= sum(extra[n][pick[n]] for n in names)
    while True:
        best, gain = None, 0.0
        for n in names:
            now = pick[n]
            for o in extra[n]:
                added = extra[n][o] - extra[n][now]
                if 0 < added <= spare and (costs[n][now] - costs[n][o]) / added > gain:
                    best, gain = (n, o), (costs[n][now] - costs[n][o]) / added
        if best is None:
            return pick
        n, o = best
        spare -= extra[n][o] - extra[n][pick[n]]
        pick[n] = o
