"""The onnxruntime backend: an .onnx written by `edge-rt convert --format onnx`
(converters/onnx_export.py) run with the same tokenizer, sampling and metrics as our
runtime (api.Model), so the two runtimes can be compared on the same weights.

The tokenizer, chat template and hyper-parameters are the source's GGUF metadata, kept
in the graph's metadata_props ("gguf:KEY" -> JSON). The KV cache is the graph's own
past_key_values / present tensors (float32), fed back each step."""
from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from . import metrics
from .api import Metrics, emit, nll_of, perplexity_windows, prompt_ids, score_windows
from .errors import EdgeRtError
from .gguf_file import os_message
from .models import spec_from_meta
from .sample import Sampler
from .tokenizer import Tokenizer

# as converters/onnx_export.py writes them
META_PREFIX, ID_KEY, ID_BYTES, ACCURACY_KEY = "gguf:", "edgert.data_id", 16, "edgert.accuracy_level"
CHUNK = 256  # tokens per step when scoring a sequence


def _graph_meta(path: Path) -> tuple[dict, str]:
    """The GGUF metadata in the graph's metadata_props (read without the weights), and its
    MatMulNBits accuracy level; a file that is not an edge-rt ONNX graph (a GGUF, a
    truncated file, another exporter's, a graph beside another export's data) is refused."""
    import onnx  # noqa: PLC0415
    from google.protobuf.message import DecodeError  # noqa: PLC0415
    try:
        with open(path, "rb") as f:
            head = f.read(4)
            f.seek(0)
            if head == b"GGUF":
                raise EdgeRtError(f"{path}: is a GGUF file; --backend onnxruntime runs an .onnx made by "
                                  f"`edge-rt convert SRC --format onnx`")
            model = onnx.load_model(f, load_external_data=False)
    except OSError as e:
        raise EdgeRtError(f"{path}: {os_message(e)}") from None
    except (DecodeError, ValueError, RuntimeError) as e:
        raise EdgeRtError(f"{path}: not a readable ONNX file (truncated or damaged?): {str(e).splitlines()[0]}") from None
    props = {p.key: p.value for p in model.metadata_props}
    if ID_KEY not in props:
        raise EdgeRtError(f"{path}: an ONNX graph not written by `edge-rt convert --format onnx` (no tokenizer in it)")
    data = path.with_name(path.name + ".data")
    try:
        with open(data, "rb") as f:
            found = f.read(ID_BYTES).hex()
    except OSError as e:
        raise EdgeRtError(f"{data}: {os_message(e)} (the weights of {path.name})") from None
    if found != props[ID_KEY]:
        raise EdgeRtError(f"{data}: the weights of another export than {path.name}; convert again")
    try:
        meta = {k[len(META_PREFIX):]: json.loads(v) for k, v in props.items() if k.startswith(META_PREFIX)}
    except json.JSONDecodeError as e:
        raise EdgeRtError(f"{path}: damaged metadata: {e}") from None
    return meta, props.get(ACCURACY_KEY, "0")


class OrtModel:
    """api.Model's generate / logits / eval_perplexity, with onnxruntime doing the forward pass."""

    def __init__(self, model, threads: int | None = None, ctx: int = 2048):
        import onnxruntime as ort  # noqa: PLC0415
        self.path = Path(model)
        if not self.path.is_file():
            raise EdgeRtError(f"{self.path}: no such file")
        meta, accuracy = _graph_meta(self.path)
        self.tokenizer = Tokenizer.from_gguf_meta(meta)
        self.spec = spec_from_meta(meta, self.tokenizer.n_vocab, self.path)
        if ctx < 2 or ctx > self.spec.ctx_train:
            raise EdgeRtError(f"--ctx {ctx} is outside 2..{self.spec.ctx_train} (the model's trained context)")
        self.ctx, self.threads = ctx, threads or os.cpu_count() or 1
        so = ort.SessionOptions()
        so.intra_op_num_threads, so.inter_op_num_threads = self.threads, 1
        so.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", accuracy)  # 8 bits: DQ + MatMul fused
        try:
            self.session = ort.InferenceSession(str(self.path), so, providers=["CPUExecutionProvider"])
        except Exception as e:  # onnxruntime's own exception types (Fail, InvalidGraph, ...)
            raise EdgeRtError(f"{self.path}: onnxruntime cannot load it: {str(e).splitlines()[0]}") from None
        self.version = ort.__version__
        self.metrics = Metrics()

    def _cache(self) -> list[np.ndarray]:
        s = self.spec
        return [np.zeros((1, s.n_kv_heads, 0, s.head_dim), np.float32)] * (2 * s.n_layers)

    def _step(self, tokens, past: list[np.ndarray], keep: int) -> tuple[np.ndarray, list[np.ndarray]]:
        """tokens after the cached ones: logits of the last `keep` (0: all) [n, vocab], and the new cache."""
        p, n = past[0].shape[2], len(tokens)
        feed = {"input_ids": np.asarray(tokens, np.int64)[None], "attention_mask": np.ones((1, p + n), np.int64),
                "position_ids": np.arange(p, p + n, dtype=np.int64)[None], "logits_to_keep": np.array(keep, np.int64)}
        feed |= {f"past_key_values.{i // 2}.{('key', 'value')[i % 2]}": a for i, a in enumerate(past)}
        z, *present = self.session.run(None, feed)
        return z[0], present

    def _info(self) -> dict:
        data = self.path.with_name(self.path.name + ".data")
        return {"backend": "onnxruntime", "kernel": f"onnxruntime {self.version} CPU", "threads": self.threads,
                "ctx": self.ctx, "kv_type": "f32", "model_bytes": self.path.stat().st_size + data.stat().st_size,
                "mem_budget_bytes": None}

    def generate(self, prompt: str, n: int = 128, temperature: float = 0.0, top_k: int = 40, top_p: float = 0.95,
                 seed: int | None = None, chat: bool = False) -> Iterator[str]:
        """Stream the text of up to n new tokens; stops at the model's end-of-generation tokens."""
        ids = prompt_ids(self.tokenizer, prompt, chat)
        if len(ids) + n > self.ctx:
            raise EdgeRtError(f"the prompt ({len(ids)} tokens) plus -n {n} exceeds --ctx {self.ctx}")
        sample = Sampler(temperature, top_k, top_p, seed)
        m = self.metrics = Metrics(n_prompt=len(ids))
        t0 = time.perf_counter()
        z, past = self._step(ids, self._cache(), 1)
        tok = sample(z[-1])
        m.prefill_s = m.ttft_s = time.perf_counter() - t0

        def next_token(tok):
            nonlocal past
            z, past = self._step([tok], past, 1)
            return sample(z[-1])
        yield from emit(self.tokenizer, m, tok, n, next_token)
        m.values = self._info() | {"peak_rss_bytes": metrics.peak_rss_bytes()}

    def logits(self, tokens) -> np.ndarray:
        """Logits at every position of one sequence starting at position 0, read CHUNK
        tokens a step through the KV cache."""
        tokens = np.asarray(tokens)
        if len(tokens) > self.ctx:
            raise EdgeRtError(f"{len(tokens)} tokens exceed the context this model was loaded with ({self.ctx})")
        out, past = [], self._cache()
        for i in range(0, len(tokens), CHUNK):
            z, past = self._step(tokens[i:i + CHUNK], past, 0)
            out.append(z)
        return np.concatenate(out)

    def eval_perplexity(self, text: str, ctx: int = 512, windows: int | None = None, progress=None) -> dict:
        """Perplexity scored as api.Model.eval_perplexity (llama-perplexity's way)."""
        ids, windows = perplexity_windows(self.tokenizer, text, ctx, self.ctx, windows)
        return score_windows(self.tokenizer, ids, ctx, windows, progress,  # positions first..ctx-1
                             lambda chunk, first: nll_of(self._step(chunk, self._cache(), ctx - first)[0][:-1],
                                                         chunk[first + 1:])) | self._info()
