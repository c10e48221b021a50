"""The memory plan: every byte a run will hold, added up before anything is loaded,
and checked against the budget. When the whole model does not fit, layers 0..m-1
stream from storage through a pool of min(2, m) slots (flash.py) and the rest stays
resident, with the smallest m that fits: the output head and embedding table, norms
and the last layers stay in memory, unless streaming the head (with fewer layers)
reads fewer bytes per token. The head can stream in part: its first rows stay
resident (as many as the budget leaves room for), the rest is read every token."""
from __future__ import annotations

import re
from dataclasses import asdict, dataclass

from .errors import EdgeRtError
from .flash import Layout
from .models.spec import Spec
from .models.transformer import KVCache

UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_size(text: str | int) -> int:
    """'2GB', '2G', '2GiB', '512M', '1.5g', 1024 -> bytes; every unit is a power of 1024."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(?:I?B)?\s*", str(text), re.I)
    if not m:
        raise EdgeRtError(f"cannot read size {text!r}: use a number with K, M or G, e.g. 2GB or 512M")
    return int(float(m.group(1)) * UNITS[m.group(2).upper()])


def format_size(n: int) -> str:
    for unit in ("G", "M", "K"):
        if n >= UNITS[unit]:
            return f"{n / UNITS[unit]:.2f} {unit}iB"
    return f"{n} B"


@dataclass
class Plan:
    base_bytes: int      # the interpreter, libraries and tokenizer, measured before loading weights
                         # (+ CALL_BYTES: what the first call allocates beyond its arrays)
    weights_bytes: int   # resident tensors: the mapped file, or (streaming) an arena read once
    kv_bytes: int        # the KV cache for ctx positions (float16, float32, or q8_0: 34 bytes per 32 values)
    buffer_bytes: int    # activations, attention scores and logits of the largest step
    ctx: int
    n_batch: int
    streamed_layers: int = 0       # layers 0..streamed_layers-1 are read from storage every step
    streamed_bytes: int = 0        # their bytes (not resident: read into the pool, counted there)
    pool_bytes: int = 0            # the preallocated slots streamed layers are read into, and the I/O thread
    streamed_head: bool = False    # the embedding table and output head read from storage too (when it reads less a token)
    open_peak_bytes: int = 0       # the set-up phase's peak, VmHWM: opening the model (the tokenizer's build is
                                   # transient but can pass everything else when most weights stream: Gemma-3's
                                   # 262k vocabulary) and, for a one-shot run, encoding its prompt
    kv_precision: str = "f16"
    resident_head_rows: int = 0    # with streamed_head: the output head's first rows, kept resident (the rest streams)

    @property
    def run_bytes(self) -> int:
        """The run phase: everything held once the weights are loaded."""
        return self.base_bytes + self.weights_bytes + self.pool_bytes + self.kv_bytes + self.buffer_bytes

    @property
    def total_bytes(self) -> int:
        return max(self.run_bytes, self.open_peak_bytes)

    def as_dict(self) -> dict:
        return asdict(self) | {"run_bytes": self.run_bytes, "total_bytes": self.total_bytes}

    def describe(self) -> str:
        head = f"the output head{f' but its first {self.resident_head_rows} rows' if self.resident_head_rows else ''}"
        what = " and ".join(([f"{self.streamed_layers} layers"] if self.streamed_layers else [])
                            + ([head] if self.streamed_head else []))
        stream = (f" + stream pool {format_size(self.pool_bytes)} ({what}, "
                  f"{format_size(self.streamed_bytes)}, streamed)") if self.pool_bytes else ""
        opening = (f"; the set-up (opening the model, reading the prompt) peaked at "
                   f"{format_size(self.open_peak_bytes)}" if self.open_peak_bytes == self.total_bytes else "")
        return (f"weights {format_size(self.weights_bytes)}{stream} + KV cache {format_size(self.kv_bytes)} "
                f"(ctx {self.ctx}) + buffers {format_size(self.buffer_bytes)} + runtime {format_size(self.base_bytes)}"
                f"{opening}")


def buffer_bytes(spec: Spec, n: int, layer_scratch: int, logit_rows: int, scored: bool) -> int:
    """The largest set of arrays alive at once in one forward step of n tokens, then
    logit_rows rows of logits (scored: with their float64 log-softmax). layer_scratch
    is what the C layer asks for (ert_layer_scratch_bytes: every activation of the
    layer and a row of attention scores per thread)."""
    d, ff = spec.d_model, spec.d_ff
    stream = 4 * n * d * 4                     # embeddings, x, the final norm's temporaries
    # ert_matmul's prepared input, under 4.5 bytes a column: q1..q4 tables (4 bytes) and their
    # scales; q5..q8 int16 codes (2), their int8 digits on neon-dotprod (2) and scales
    kernels = n * max(ff, d) * 9 // 2
    logits = logit_rows * spec.n_vocab * (4 + (16 if scored else 0))
    return stream + layer_scratch + kernels + logits


# Resident memory a call adds beyond the arrays counted here (lazy imports, thread-pool
# set-up, the prompt's objects): measured 2-3 MiB on every model and prompt we tried.
CALL_BYTES = 4 << 20


def make_plan(spec: Spec, layout: Layout, base_bytes: int, ctx: int, kv_type: str, n: int, layer_scratch: int,
              logit_rows: int = 1, scored: bool = False, budget: int | None = None,
              streamed: tuple | None = None, open_peak: int = 0) -> Plan:
    """The plan streaming `streamed` = (layers, head[, resident head rows]); by default
    the one that fits the budget reading the fewest bytes per token: streaming layers
    0..m-1, with or without the output head (read whole every token: streamed when that
    reads less, as for Gemma-3, whose tied head is most of the model), whose first rows
    then fill what the budget has left. When nothing fits, everything streams and
    check() refuses it, naming its total."""
    def with_streamed(m: int, head: bool, rows: int = 0) -> Plan:
        return Plan(base_bytes + CALL_BYTES, layout.resident_bytes(m, head, rows), KVCache.nbytes(spec, ctx, kv_type),
                    buffer_bytes(spec, n, layer_scratch, logit_rows, scored), ctx, n,
                    m, layout.streamed_bytes(m, head, rows), layout.pool_bytes(m, head), head, open_peak, kv_type,
                    rows)
    if streamed is not None:
        return with_streamed(*streamed)
    n_layers = len(layout.layer_bytes)
    plans = [with_streamed(m, head) for head in (False, True) for m in range(n_layers + 1)]
    if budget is not None:  # the head's first rows in what each plan streaming it leaves
        plans += [with_streamed(p.streamed_layers, True, rows) for p in plans if p.streamed_head
                  and 0 < (rows := min((budget - p.run_bytes) // layout.out_row_bytes, layout.out_rows - 1))]
    fits = [p for p in plans if budget is None or p.total_bytes <= budget]
    return min(fits, key=lambda p: (p.streamed_bytes, p.total_bytes)) if fits else with_streamed(n_layers, True)


# The interpreter's measured footprint differs by a MiB or so from one start to the
# next, so the smallest budget named on refusal carries this much headroom.
RESTART_MARGIN = 0.02


def check(plan: Plan, budget: int | None, available: int) -> None:
    """Refuse up front, naming the smallest budget that works."""
    need = plan.total_bytes
    if budget is not None and need > budget:
        smallest = -(-int(need * (1 + RESTART_MARGIN)) // (1 << 20))
        raise EdgeRtError(f"--mem-budget {format_size(budget)} is too small: this run needs at least "
                          f"{format_size(need)} ({plan.describe()}); try --mem-budget {smallest}M"
                          f"{' or a smaller --ctx' if plan.kv_bytes > need // 4 else ''}")
    if budget is None and need > available:
        raise EdgeRtError(f"this run needs {format_size(need)} ({plan.describe()}) but only "
                          f"{format_size(available)} of memory is available")
