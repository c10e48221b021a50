"""gemma3: Gemma-3 text models. GeGLU, RMSNorm of queries and keys, norms after
attention and after the FFN, embeddings scaled by sqrt(d_model), and five local
(sliding-window, RoPE base 10k) layers to every global one (RoPE base from the file).
The GGUF convert stores Gemma's (1 + w) norm weights already added up."""
import math

from .spec import Meta, Spec

LOCAL_ROPE_BASE = 10000.0  # as llama.cpp's gemma3 loader; not in the GGUF
GLOBAL_EVERY = 6


def spec(meta: dict, n_vocab: int, path="") -> Spec:
    m = Meta(meta, path)
    sizes = m.sizes(n_vocab)
    scaling = m.get("rope.scaling.type", "none")
    return Spec(
        **sizes, rope_style="neox", act="gelu_tanh", qk_norm=True, post_norms=True,
        embed_scale=math.sqrt(sizes["d_model"]), attn_scale=1.0 / math.sqrt(sizes["head_dim"]),
        sliding_window=int(m.get("attention.sliding_window", 0)), global_every=GLOBAL_EVERY,
        rope_base_local=LOCAL_ROPE_BASE,
        rope_scale=float(m.get("rope.scaling.factor", 1.0)) if scaling == "linear" else 1.0,
    )
