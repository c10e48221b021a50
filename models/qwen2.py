"""qwen2: Qwen2 / Qwen2.5. Llama plus biases on q, k and v, and NEOX-style RoPE."""
from .spec import Meta, Spec


def spec(meta: dict, n_vocab: int, path="") -> Spec:
    return Spec(**Meta(meta, path).sizes(n_vocab), rope_style="neox", qkv_bias=True)
