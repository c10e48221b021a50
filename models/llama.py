"""llama: SmolLM2, TinyLlama, Llama-3.2, SmolLM. RMSNorm, SwiGLU, RoPE on adjacent
pairs (the GGUF convert permutes q/k rows for it), grouped-query attention."""
from .spec import Meta, Spec


def spec(meta: dict, n_vocab: int, path="") -> Spec:
    return Spec(**Meta(meta, path).sizes(n_vocab))
