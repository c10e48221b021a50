"""The Python API an app uses: `edge_rt.load(model, mem_budget=..., threads=...)`."""
from __future__ import annotations

import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
from threadpoolctl import threadpool_limits

from . import enforce, formats, kernels, memory, metrics
from .errors import EdgeRtError
from .flash import Layout, StreamedWeights
from .gguf_file import GGUFFile
from .models import spec_from_meta
from .models.transformer import KVCache, forward, logits
from .plan import Plan, check, format_size, make_plan, parse_size
from .pull import resolve
from .sample import Sampler
from .layer import CLayers
from .tokenizer import Tokenizer
from .verify import check_loaded
from .weights import Weights

N_BATCH = 512       # tokens per forward step while reading a prompt
SINK_TOKENS = 4     # kv_policy "sink-window": the first positions always kept (StreamingLLM's attention sinks)
KV_POLICIES = ("stop", "sink-window")
LOGIT_ROWS = 32     # positions whose logits are scored at once by eval


@dataclass
class Metrics:
    n_prompt: int = 0
    n_generated: int = 0
    tokens: list = field(default_factory=list)  # the generated token ids
    prefill_s: float = 0.0
    decode_s: float = 0.0
    ttft_s: float = 0.0
    values: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        decode_steps = max(self.n_generated - 1, 0)  # the first token comes from the prefill
        return {
            "n_prompt": self.n_prompt, "n_generated": self.n_generated, "tokens": self.tokens,
            "prefill_tokens_per_s": self.n_prompt / self.prefill_s if self.prefill_s else 0.0,
            "decode_tokens_per_s": decode_steps / self.decode_s if self.decode_s else 0.0,
            "ttft_s": self.ttft_s, "prefill_s": self.prefill_s, "decode_s": self.decode_s,
        } | self.values


def prompt_ids(tokenizer: Tokenizer, prompt: str, chat: bool) -> list[int]:
    """The prompt's token ids; with chat, wrapped in the model's chat template (its special
    tokens parsed, its own BOS not doubled)."""
    if chat:
        text = tokenizer.render_chat([{"role": "user", "content": prompt}])
        ids = tokenizer.encode(text, add_bos=not text.startswith(tokenizer.bos_text), special=True)
    else:
        ids = tokenizer.encode(prompt)
    if not ids:
        raise EdgeRtError("the prompt is empty")
    return ids


def perplexity_windows(tokenizer: Tokenizer, text: str, ctx: int, loaded_ctx: int,
                       windows: int | None) -> tuple[np.ndarray, int]:
    """The text's token ids and how many whole windows of ctx tokens eval scores."""
    if ctx > loaded_ctx:
        raise EdgeRtError(f"--ctx {ctx} is larger than the context this model was loaded with ({loaded_ctx})")
    ids = np.array(tokenizer.encode(text))
    available = len(ids) // ctx
    if available < 1:
        raise EdgeRtError(f"the text has {len(ids)} tokens: fewer than one window of --ctx {ctx}")
    return ids, min(windows or available, available)


def score_windows(tokenizer: Tokenizer, ids: np.ndarray, ctx: int, windows: int, progress, window_nll) -> dict:
    """Perplexity as llama.cpp's llama-perplexity computes it: non-overlapping windows of
    ctx tokens, each window's first token replaced by BOS where the model adds one, the
    second half of each window scored; window_nll(chunk, first) is the summed negative
    log-likelihood of chunk[first + 1:]."""
    first, nll, count = ctx // 2, 0.0, 0
    for w in range(windows):
        chunk = ids[w * ctx:(w + 1) * ctx].copy()
        if tokenizer.add_bos:
            chunk[0] = tokenizer.bos_id
        nll += window_nll(chunk, first)
        count += ctx - 1 - first
        if progress:
            progress(w + 1, windows, float(np.exp(nll / count)))
    return {"ppl": float(np.exp(nll / count)), "tokens_scored": count, "ctx": ctx, "windows": windows,
            "peak_rss_bytes": metrics.peak_rss_bytes()}


def emit(tokenizer: Tokenizer, m: Metrics, tok: int, n: int, next_token) -> Iterator[str]:
    """The text of tok and of the tokens next_token(tok) gives after it, until n tokens or an
    end-of-generation token; each counted in m, and m.decode_s timed from the first call to
    next_token's last return (the last text flushed after it)."""
    decoder = tokenizer.stream_decoder()
    t1 = time.perf_counter()
    while tok not in tokenizer.eos_ids:
        m.n_generated += 1
        m.tokens.append(int(tok))
        piece = decoder.push(tok)
        if piece:
            yield piece
        if m.n_generated >= n:
            break
        tok = next_token(tok)
    m.decode_s = time.perf_counter() - t1
    rest = decoder.flush()
    if rest:
        yield rest


def nll_of(z: np.ndarray, targets: np.ndarray) -> float:
    """Negative log-likelihood of targets[j] under logits z[j]."""
    z = z.astype(np.float64)
    z -= z.max(axis=1, keepdims=True)
    return float(-(z[np.arange(len(targets)), targets] - np.log(np.exp(z).sum(axis=1))).sum())


class Model:
    """A model opened for running. Opening maps the file and reads its metadata; the
    weights and the KV cache are made resident by the first call that passes the plan."""

    def __init__(self, model, mem_budget=None, threads: int | None = None, ctx: int = 2048, kv_type: str = "f16",
                 kv_policy: str = "stop", verify: bool = True, keep_encoder: bool = True):
        if mem_budget is not None:  # a budget to keep: resident memory must be live memory
            memory.return_freed_memory()
        self.path = resolve(model)
        self.g = GGUFFile(self.path)
        version = self.g.meta.get("edgert.format_version")
        if version is not None and version != formats.FORMAT_VERSION:
            raise EdgeRtError(f"{self.path}: made by edge-rt with layout version {version}; this edge-rt reads "
                              f"version {formats.FORMAT_VERSION}: convert the source model again")
        self.tokenizer = Tokenizer.from_gguf_meta(self.g.meta, take=True)  # the tokenizer holds the arrays now
        memory.trim()
        self.spec = spec_from_meta(self.g.meta, self.tokenizer.n_vocab, self.path)
        if ctx < 2 or ctx > self.spec.ctx_train:
            raise EdgeRtError(f"--ctx {ctx} is outside 2..{self.spec.ctx_train} (the model's trained context)")
        self.threads = threads or os.cpu_count() or 1
        self.budget = parse_size(mem_budget) if mem_budget is not None else None
        self.weights = Weights(self.g, self.threads)  # views of the mmap: nothing is read yet
        self.spec.check_tensors(self.weights.shapes(), self.path)
        if kv_type not in KVCache.DTYPES:
            raise EdgeRtError(f"--kv-type {kv_type}: use one of {', '.join(KVCache.DTYPES)}")
        if self.spec.head_dim % KVCache.PER_ELEMENT[kv_type]:
            raise EdgeRtError(f"--kv-type {kv_type} stores blocks of {KVCache.PER_ELEMENT[kv_type]} values along a head "
                              f"(as llama.cpp); this model's heads have {self.spec.head_dim} values: use --kv-type f16")
        if kv_policy not in KV_POLICIES:
            raise EdgeRtError(f"--kv-policy {kv_policy}: use one of {', '.join(KV_POLICIES)}")
        if kv_policy == "sink-window" and ctx < 4 * SINK_TOKENS:
            raise EdgeRtError(f"--kv-policy sink-window needs --ctx {4 * SINK_TOKENS} or more")
        self.kv_policy = kv_policy
        self.ctx, self.kv_type, self.kv, self.verify = ctx, kv_type, None, verify
        self.keep_encoder = keep_encoder
        self.layers = CLayers(self.spec, self.weights, self.threads, ctx, kv_type)  # structs only: nothing is read yet
        self.layout, self.streamed = Layout.of(self.g, self.spec.n_layers), None  # streamed: fixed by the first call
        self.base_bytes = metrics.rss_bytes()  # the interpreter, libraries, metadata and tokenizer
        self.open_peak = metrics.peak_rss_bytes()  # and what building them held at once
        self.io_start = metrics.storage_read_bytes()  # flash_bytes_read counts from here: loading included
        self.plan = self.plan_for(ctx, 0)  # the worst case: a prompt that fills the context
        self.metrics = Metrics()

    def drop_encoder(self) -> None:
        """Encode no more (a one-shot run: its text is encoded): free the tokenizer's
        encoder, keep its id -> text table, and measure the runtime anew without it. The
        plan's peak is then the larger of this set-up phase (VmHWM so far: building the
        tokenizer and encoding, measured) and the run phase (the runtime without the
        encoder, the weights, the pool, the KV cache and the buffers)."""
        self.open_peak = metrics.peak_rss_bytes()
        self.tokenizer.drop_encoder()
        memory.trim()  # the `tokenizers` model's many small blocks: back to the kernel
        self.base_bytes = metrics.rss_bytes()
        self.plan = self.plan_for(self.ctx, 0)

    def _set_up_done(self, rss: int) -> None:
        """The call's set-up (encoding its text, imports it needed) is done, RSS was rss
        before it: what it left resident is runtime. A one-shot model (keep_encoder=False)
        drops its encoder here, before the first call makes the weights resident."""
        if not self.keep_encoder and self.tokenizer.hf is not None and self.kv is None:
            self.drop_encoder()
        else:
            self.base_bytes += max(metrics.rss_bytes() - rss, 0)

    def plan_for(self, n_prompt: int, n_predict: int, logit_rows: int = 1, scored: bool = False) -> Plan:
        """The memory a call reading n_prompt tokens and generating n_predict would hold."""
        n = min(N_BATCH, max(n_prompt, 1))
        return make_plan(self.spec, self.layout, self.base_bytes, self.ctx, self.kv_type, n, self.layers.scratch_bytes(n),
                         logit_rows, scored, self.budget, self.streamed, self.open_peak)

    def _reserve(self, plan: Plan) -> None:
        """Check the plan against the budget, then make the resident weights and the KV
        cache resident (and the stream pool, when the plan streams layers)."""
        grown = metrics.rss_bytes() - self.base_bytes
        check(plan, self.budget, metrics.available_bytes() + grown)
        cgroup = enforce.cgroup_limit()  # its OOM kill would end us without a word: refuse now instead
        if cgroup is not None and cgroup[0] + (1 << 20) < (self.budget or plan.total_bytes):  # (--enforce rounds it to pages)
            raise EdgeRtError(f"this run needs {format_size(plan.total_bytes)}"
                              f"{f' (--mem-budget {format_size(self.budget)})' if self.budget else ''} but the "
                              f"memory cgroup it runs in is limited to {format_size(cgroup[0])}: the kernel would "
                              f"kill it; give a --mem-budget of at most that")
        self.plan = plan
        if self.kv is None:
            self.streamed = (plan.streamed_layers, plan.streamed_head, plan.resident_head_rows)
            if plan.pool_bytes:
                self.weights = StreamedWeights(self.g, self.threads, self.layout, *self.streamed,
                                               verify=self.verify)
                self.layers = CLayers(self.spec, self.weights, self.threads, self.ctx, self.kv_type)  # over the arena and pool
            else:
                self.g.populate()
                if self.verify:  # the weights are resident now: their checksums cost ~1 ms per 2 MB a thread
                    check_loaded(self.g, self.threads)
            self.kv = KVCache(self.spec, self.ctx, self.kv_type)

    # -- the forward pass under the thread limit ------------------------------------
    def _step(self, tokens: np.ndarray, pos: int) -> np.ndarray:
        """The final-normed hidden states of tokens read at positions pos.. (the family's
        forward, its layers run by the C library)."""
        return forward(self.spec, self.weights, tokens, pos, self.kv, self.layers.run, self.layers.run_rest,
                       kernels.rmsnorm)

    def _forward(self, tokens: np.ndarray, keep_from: int) -> np.ndarray:
        """Read tokens from position 0 in steps of N_BATCH; the hidden states of
        positions keep_from.. (the others are dropped as soon as a step is done)."""
        kept = []
        for i in range(0, len(tokens), N_BATCH):
            h = self._step(tokens[i:i + N_BATCH], i)
            if i + len(h) > keep_from:
                kept.append(h[max(keep_from - i, 0):])
        return np.concatenate(kept)

    def _info(self) -> dict:
        return {"threads": self.threads, "kernel": self.weights.kernel(), "model_bytes": self.path.stat().st_size,
                "mem_budget_bytes": self.budget, "planned_bytes": self.plan.total_bytes, "ctx": self.ctx,
                "kv_type": self.kv_type, "kv_policy": self.kv_policy,
                "resident_weight_bytes": self.plan.weights_bytes, "streamed_weight_bytes": self.plan.streamed_bytes,
                "streamed_layers": self.plan.streamed_layers, "streamed_head": self.plan.streamed_head,
                "resident_head_rows": self.plan.resident_head_rows,
                "pool_bytes": self.plan.pool_bytes, "o_direct": bool(self.plan.pool_bytes and self.weights.reader.direct),
                "flash_checksum_seconds": self.weights.check_seconds, "flash_wait_seconds": self.weights.wait_seconds,
                "window_hit_rate": (self.weights.layer_hits / self.weights.layer_uses
                                    if self.weights.layer_uses else None)}

    def generate(self, prompt: str, n: int = 128, temperature: float = 0.0, top_k: int = 40, top_p: float = 0.95,
                 seed: int | None = None, chat: bool = False) -> Iterator[str]:
        """Stream the text of up to n new tokens; stops at the model's end-of-generation tokens."""
        rss = metrics.rss_bytes()  # the call's set-up is runtime, measured: with --chat, jinja2 (~10 MiB resident);
        ids = prompt_ids(self.tokenizer, prompt, chat)  # above temperature 0, numpy.random (~6 MiB)
        if self.kv_policy == "stop" and len(ids) + n > self.ctx:
            raise EdgeRtError(f"the prompt ({len(ids)} tokens) plus -n {n} exceeds --ctx {self.ctx} "
                              f"(--kv-policy sink-window keeps generating past it)")
        if len(ids) >= self.ctx:
            raise EdgeRtError(f"the prompt ({len(ids)} tokens) does not fit --ctx {self.ctx}")
        sample = Sampler(temperature, top_k, top_p, seed)
        self._set_up_done(rss)
        self._reserve(self.plan_for(len(ids), n))
        m = self.metrics = Metrics(n_prompt=len(ids))
        io0 = metrics.storage_read_bytes()
        with threadpool_limits(self.threads):
            t0 = time.perf_counter()
            h = self._forward(np.array(ids), len(ids) - 1)
            tok = sample(logits(self.weights, h)[0])
            m.prefill_s = m.ttft_s = time.perf_counter() - t0
            pos, io1 = len(ids), metrics.storage_read_bytes()
            in_c = -self.layers.seconds  # time inside the C calls of the decode loop
            kv_shifts = 0

            def next_token(tok):
                nonlocal pos, in_c, kv_shifts
                if pos == self.ctx:  # full (sink-window only)
                    pos -= self._drop_older_half(SINK_TOKENS, pos)
                    kv_shifts += 1
                h = self._step(np.array([tok]), pos)
                t = time.perf_counter()
                z = logits(self.weights, h[-1:])[0]
                in_c += time.perf_counter() - t
                pos += 1
                return sample(z)
            yield from emit(self.tokenizer, m, tok, n, next_token)
            in_c += self.layers.seconds
        io2 = metrics.storage_read_bytes()
        m.values = self._info() | {"kv_shifts": kv_shifts, "orchestrator_fraction": 1 - in_c / m.decode_s if m.decode_s else 0.0,
                                   "peak_rss_bytes": metrics.peak_rss_bytes(), "storage_read_bytes": io2 - io0,
                                   "flash_bytes_read": io2 - self.io_start,
                                   "flash_bytes_per_token": (io2 - io1) / max(m.n_generated - 1, 1)}

    def logits(self, tokens) -> np.ndarray:
        """Logits at every position of one sequence starting at position 0."""
        tokens = np.asarray(tokens)
        if len(tokens) > self.ctx:
            raise EdgeRtError(f"{len(tokens)} tokens exceed the context this model was loaded with ({self.ctx})")
        self._reserve(self.plan_for(len(tokens), 0, LOGIT_ROWS))
        with threadpool_limits(self.threads):
            h = self._forward(tokens, 0)
            return np.concatenate([logits(self.weights, h[i:i + LOGIT_ROWS]) for i in range(0, len(h), LOGIT_ROWS)])

    def _drop_older_half(self, keep: int, used: int) -> int:
        """Make room in a full KV cache (positions 0..used-1): keep the first `keep`
        positions, drop the older half of the rest; returns how many were dropped."""
        discard = (self.ctx - keep) // 2
        self.layers.kv_shift(self.spec, self.weights, self.kv, keep, discard, used)
        return discard

    def _nll(self, h: np.ndarray, targets: np.ndarray) -> float:
        """Negative log-likelihood of targets[j] under the logits of hidden state h[j],
        LOGIT_ROWS rows at a time."""
        nll = 0.0
        for i in range(0, len(targets), LOGIT_ROWS):
            nll += nll_of(logits(self.weights, h[i:i + LOGIT_ROWS]), targets[i:i + LOGIT_ROWS])
        return nll

    def eval_stream(self, text: str, n_tokens: int, score_from: int | None = None, keep: int = SINK_TOKENS,
                    chunk: int = 64) -> dict:
        """Perplexity of the first n_tokens of a text read as ONE sequence through this
        model's KV cache of ctx positions: when the next chunk does not fit, positions
        keep.. are dropped (the older half of the rest at least), as --kv-policy
        sink-window does (keep=0: a plain sliding window). Tokens from score_from (default
        ctx/2) on are scored; each has at least ctx/2 - chunk tokens of context."""
        rss = metrics.rss_bytes()
        ids = np.array(self.tokenizer.encode(text)[:n_tokens])
        self._set_up_done(rss)
        if self.tokenizer.add_bos:
            ids[0] = self.tokenizer.bos_id
        score_from = self.ctx // 2 if score_from is None else score_from
        if len(ids) <= score_from + 1 or chunk > self.ctx // 4:
            raise EdgeRtError(f"{len(ids)} tokens, scored from {score_from}, --ctx {self.ctx}: too few tokens, "
                              f"or chunks larger than ctx/4")
        self._reserve(self.plan_for(chunk, 0, LOGIT_ROWS, scored=True))
        nll, count, pos, shifts = 0.0, 0, 0, 0
        with threadpool_limits(self.threads):
            for i in range(0, len(ids) - 1, chunk):
                toks = ids[i:min(i + chunk, len(ids) - 1)]
                if pos + len(toks) > self.ctx:
                    pos, shifts = pos - self._drop_older_half(keep, pos), shifts + 1
                h = self._step(toks, pos)
                pos += len(toks)
                scored = np.arange(i, i + len(toks)) >= score_from
                nll += self._nll(h[scored], ids[i + 1:i + 1 + len(toks)][scored])
                count += int(scored.sum())
        return {"ppl": float(np.exp(nll / count)), "tokens_scored": count, "tokens": len(ids), "score_from": score_from,
                "keep": keep,
                "kv_shifts": shifts} | self._info()

    def eval_perplexity(self, text: str, ctx: int = 512, windows: int | None = None, progress=None) -> dict:
        """Perplexity as llama.cpp's llama-perplexity computes it: the text tokenized once,
        cut into non-overlapping windows of ctx tokens, each window's first token replaced
        by BOS where the model adds one, the second half of each window scored."""
        rss = metrics.rss_bytes()
        ids, windows = perplexity_windows(self.tokenizer, text, ctx, self.ctx, windows)
        self._set_up_done(rss)
        self._reserve(self.plan_for(ctx, 0, LOGIT_ROWS, scored=True))
        with threadpool_limits(self.threads):  # h[j] is position first + j
            return score_windows(self.tokenizer, ids, ctx, windows, progress,
                                 lambda chunk, first: self._nll(self._forward(chunk, first)[:ctx - 1 - first],
                                                                chunk[first + 1:])) | self._info()

def load(model, mem_budget=None, threads: int | None = None, ctx: int = 2048, kv_type: str = "f16",
         kv_policy: str = "stop", verify: bool = True, keep_encoder: bool = True) -> Model:
    """Open a model (a path, or a registry name such as 'smollm2-135m'), plan its memory
    against mem_budget ('2GB', or bytes) and map its weights. kv_type: 'f16', 'f32' or
    'q8_0' (llama.cpp's 8-bit blocks of 32 values; head sizes that are a multiple of 32);
    kv_policy: 'stop' at a full context, or 'sink-window' (keep the first SINK_TOKENS
    positions and the most recent ones, and go on). verify: check the weights against the
    checksums convert stored, when they are first made resident (streamed layers and a
    streamed head every time they are read). keep_encoder=False: a one-shot model, whose
    first call encodes its text, then frees the tokenizer's encoder (~60 MiB on Gemma-3's
    262k vocabulary) before the weights are loaded; later calls can still decode
    (generate's output) but not encode (a second prompt, eval) and raise EdgeRtError."""
    return Model(model, mem_budget=mem_budget, threads=threads, ctx=ctx, kv_type=kv_type, kv_policy=kv_policy,
                 verify=verify, keep_encoder=keep_encoder)
