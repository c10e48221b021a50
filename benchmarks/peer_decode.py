#!/usr/bin/env python3
"""llama.cpp timed the way `edge-rt run --json` times itself: one process, a prompt, greedy
decoding, the wall clock of the decode loop with the sampler in it (bench_speed.py runs it
as llama.cpp's side of each pair).

    .venv/bin/python benchmarks/peer_decode.py MODEL.gguf --prompt-file F -n 128 --ctx 640 --threads T

llama.cpp through llama-cpp-python (the peer built by scripts/peer.sh with GGML_NATIVE=ON,
the same compile as llama-bench), at its fastest settings: flash attention on, the whole
prompt in one batch, f16 KV cache (its default). As in edge-rt's run (edge_rt/api.py):
- prefill tok/s = prompt tokens / (the prompt's forward pass + the first greedy sample);
- decode tok/s = (n - 1) / the wall clock of the loop that makes tokens 2..n: each step
  detokenizes the last token, evaluates it, and takes the argmax of the logits.
Tokenizing the prompt is outside both clocks, in both engines. The loop does not stop at
an end-of-generation token (llama-bench does not either). Prints one JSON line.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np


def peak_rss_bytes() -> int | None:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return None


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model")
    ap.add_argument("--prompt-file", required=True)
    ap.add_argument("-n", type=int, default=128)
    ap.add_argument("--ctx", type=int, default=640)
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args(argv)
    import llama_cpp
    from llama_cpp._utils import suppress_stdout_stderr

    prompt = Path(a.prompt_file).read_text(encoding="utf-8")
    with suppress_stdout_stderr(disable=False):
        llm = llama_cpp.Llama(model_path=a.model, n_ctx=a.ctx, n_batch=a.ctx, n_ubatch=a.ctx, n_threads=a.threads,
                              n_threads_batch=a.threads, flash_attn=True, verbose=False)
    ids = llm.tokenize(prompt.encode("utf-8"), add_bos=True)
    if len(ids) + a.n > a.ctx:
        sys.exit(f"peer_decode: the prompt ({len(ids)} tokens) plus -n {a.n} exceeds --ctx {a.ctx}")

    t0 = time.perf_counter()
    llm.eval(ids)
    tok = int(np.argmax(llm.scores[llm.n_tokens - 1]))
    prefill_s = time.perf_counter() - t0
    t1, out = time.perf_counter(), []
    for _ in range(a.n - 1):
        out.append(llm.detokenize([tok]))
        llm.eval([tok])
        tok = int(np.argmax(llm.scores[llm.n_tokens - 1]))
    decode_s = time.perf_counter() - t1
    print(json.dumps({"n_prompt": len(ids), "n_generated": a.n, "prefill_s": prefill_s, "decode_s": decode_s,
                      "prefill_tokens_per_s": len(ids) / prefill_s,
                      "decode_tokens_per_s": (a.n - 1) / decode_s if decode_s else 0.0,
                      "threads": a.threads, "peak_rss_bytes": peak_rss_bytes(),
                      "system_info": llama_cpp.llama_print_system_info().decode(errors="replace")}))


if __name__ == "__main__":
    main()
