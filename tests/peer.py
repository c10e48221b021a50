"""The llama.cpp peer, for tests and benchmarks only (the runtime never imports llama_cpp).

`scripts/peer.sh` builds llama-cpp-python (pinned below) once from its PyPI sdist with
GGML_NATIVE=ON, in the same CMake pass as llama.cpp's own tools (llama-perplexity,
llama-bench, llama-quantize, llama-imatrix), caches the wheel and the tools under
``${EDGE_RT_HOME:-~/.cache/edge-rt}/peer/llama-cpp-python-<version>/`` and installs the
wheel into the venv. This module finds those pieces and wraps the few calls tests need.

Every helper uses 2 threads and keeps llama.cpp quiet (verbose=False).
"""

from __future__ import annotations

import functools
import importlib.util
import os
import re
import subprocess
from pathlib import Path

import numpy as np

LLAMA_CPP_PYTHON_VERSION = "0.3.36"  # keep in step with scripts/peer.sh
THREADS = 2

# How logits() runs llama.cpp, so a comparison can say what it compared against:
# exact (non-flash) attention, f32 K/V cache, the whole sequence in one ubatch.
LOGITS_CONFIG = {
    "flash_attn": False,
    "type_k": "f32",
    "type_v": "f32",
    "n_threads": THREADS,
    "n_batch": "n_ctx",
    "n_ubatch": "n_ctx",
    "logits_all": True,
    "n_seq": 1,
}
_GGML_TYPE_F32 = 0


def edge_rt_home() -> Path:
    home = os.environ.get("EDGE_RT_HOME")
    return Path(home) if home else Path.home() / ".cache" / "edge-rt"


def peer_dir() -> Path:
    """Cache folder of the pinned peer build (wheel/, bin/, BUILD_INFO)."""
    override = os.environ.get("EDGE_RT_PEER_DIR")
    if override:
        return Path(override)
    return edge_rt_home() / "peer" / f"llama-cpp-python-{LLAMA_CPP_PYTHON_VERSION}"


@functools.lru_cache(maxsize=None)
def llama_available() -> bool:
    """True when llama_cpp is importable and its shared libraries load."""
    try:
        if importlib.util.find_spec("llama_cpp") is None:
            return False
        import llama_cpp  # noqa: F401
    except (ImportError, OSError, RuntimeError, ValueError):
        return False
    return True


def _llama_cpp():
    if not llama_available():
        raise RuntimeError("llama_cpp is not installed: run scripts/peer.sh")
    import llama_cpp

    return llama_cpp


def tool(name: str) -> Path:
    """Path of one of llama.cpp's tools built with the peer, e.g. tool("llama-perplexity")."""
    path = peer_dir() / "bin" / name
    if not (path.is_file() and os.access(path, os.X_OK)):
        raise FileNotFoundError(
            f"llama.cpp tool {name!r} not found at {path}: run scripts/peer.sh"
        )
    return path


def tools_available(*names: str) -> bool:
    names = names or ("llama-perplexity",)
    try:
        for n in names:
            tool(n)
    except FileNotFoundError:
        return False
    return True


def _quiet_llama(**kwargs):
    """llama_cpp.Llama(verbose=False, ...) with the C-level log lines that still get
    through (e.g. the n_ctx_train warning of a vocab-only context) sent to /dev/null."""
    llama_cpp = _llama_cpp()
    from llama_cpp._utils import suppress_stdout_stderr

    with suppress_stdout_stderr(disable=False):
        return llama_cpp.Llama(verbose=False, **kwargs)


@functools.lru_cache(maxsize=4)
def _vocab(gguf_path: str):
    return _quiet_llama(model_path=gguf_path, vocab_only=True, n_ctx=64)


def tokenize(gguf_path, text: str, add_bos: bool, special: bool = False) -> list[int]:
    """llama.cpp's tokenization of `text` (special=True parses <|...|> control tokens)."""
    llm = _vocab(str(gguf_path))
    return list(llm.tokenize(text.encode("utf-8"), add_bos=add_bos, special=special))


def detokenize(gguf_path, tokens) -> str:
    llm = _vocab(str(gguf_path))
    return llm.detokenize(list(tokens)).decode("utf-8", errors="replace")


@functools.lru_cache(maxsize=1)  # one f32 model in memory at a time
def _model(gguf_path: str, n_ctx: int):
    return _quiet_llama(
        model_path=gguf_path,
        n_ctx=n_ctx,
        n_batch=n_ctx,
        n_ubatch=n_ctx,
        n_threads=THREADS,
        n_threads_batch=THREADS,
        logits_all=True,
        flash_attn=LOGITS_CONFIG["flash_attn"],
        type_k=_GGML_TYPE_F32,
        type_v=_GGML_TYPE_F32,
    )


def logits(gguf_path, tokens, n_ctx: int | None = None) -> np.ndarray:
    """Logits at every position, float32 [len(tokens), n_vocab], one sequence from pos 0.

    Settings are in LOGITS_CONFIG (no flash attention, f32 KV cache, one ubatch)."""
    tokens = [int(t) for t in tokens]
    n_ctx = n_ctx or max(len(tokens), 1)
    if len(tokens) > n_ctx:
        raise ValueError(f"{len(tokens)} tokens do not fit n_ctx={n_ctx}")
    llm = _model(str(gguf_path), int(n_ctx))
    llm.reset()  # n_tokens = 0; eval() then drops the KV cells from 0 on
    llm.eval(tokens)
    return np.array(llm.scores[: len(tokens)], dtype=np.float32, copy=True)


def release_models() -> None:
    """Free cached llama.cpp models (f32 models are large)."""
    _model.cache_clear()
    _vocab.cache_clear()


_FINAL_RE = re.compile(r"Final estimate: PPL = ([0-9.]+|nan|inf) \+/- ([0-9.]+|nan|inf)")


def perplexity(gguf_path, text_file, ctx: int, chunks: int, extra_args=()) -> float:
    """Run the real `llama-perplexity -m F -f FILE -c CTX --chunks K -t 2` and parse
    its "Final estimate: PPL = X +/- Y" line (llama.cpp's defaults otherwise)."""
    cmd = [
        str(tool("llama-perplexity")),
        "-m", str(gguf_path),
        "-f", str(text_file),
        "-c", str(ctx),
        "--chunks", str(chunks),
        "-t", str(THREADS),
        *map(str, extra_args),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, errors="replace")
    out = proc.stdout + "\n" + proc.stderr
    m = _FINAL_RE.search(out)
    if proc.returncode != 0 or m is None:
        tail = "\n".join(out.strip().splitlines()[-25:])
        raise RuntimeError(
            f"llama-perplexity failed (exit {proc.returncode}): {' '.join(cmd)}\n{tail}"
        )
    return float(m.group(1))


def system_info() -> str:
    """llama.cpp's system info line (which SIMD paths the build uses)."""
    info = _llama_cpp().llama_print_system_info()
    return info.decode() if isinstance(info, bytes) else str(info)
