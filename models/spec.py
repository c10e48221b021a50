"""What a family file says about an architecture: sizes from the GGUF metadata plus a
few named switches. The forward pass (models/transformer.py) reads nothing else."""
from __future__ import annotations

from dataclasses import dataclass

from edge_rt.errors import EdgeRtError


@dataclass(frozen=True)
class Spec:
    arch: str
    n_layers: int
    d_model: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    d_ff: int
    n_vocab: int
    ctx_train: int
    norm_eps: float
    rope_base: float
    rope_dim: int
    # -- switches: where families differ ------------------------------------------
    rope_style: str = "norm"        # "norm": rotate pairs (x[2i], x[2i+1]); "neox": (x[i], x[i+d/2])
    act: str = "silu"               # FFN gate activation: "silu" (SwiGLU) or "gelu_tanh" (GeGLU)
    qkv_bias: bool = False          # biases on the q, k, v projections (qwen2)
    qk_norm: bool = False           # RMSNorm of each query and key head (gemma3)
    post_norms: bool = False        # RMSNorm after attention and after the FFN, before the residual add (gemma3)
    embed_scale: float = 1.0        # embeddings multiplied by this (gemma3: sqrt(d_model))
    attn_scale: float = 0.0         # 0: 1/sqrt(head_dim)
    sliding_window: int = 0         # 0: none; else local layers see the last `sliding_window` positions
    global_every: int = 0           # with sliding_window: every k-th layer (k-1, 2k-1, ...) is global
    rope_base_local: float = 0.0    # RoPE base of the sliding-window layers (0: rope_base)
    rope_scale: float = 1.0         # linear RoPE scaling of global layers: positions divided by this

    def is_local(self, layer: int) -> bool:
        return bool(self.sliding_window) and (not self.global_every or (layer + 1) % self.global_every != 0)

    def kv_dim(self) -> int:
        return self.n_kv_heads * self.head_dim


class Meta:
    """GGUF metadata of one architecture: `m.get("block_count")` reads "{arch}.block_count"."""

    def __init__(self, meta: dict, path=""):
        self.meta, self.path = meta, path
        self.arch = meta.get("general.architecture")

    def get(self, key: str, default=None):
        value = self.meta.get(f"{self.arch}.{key}", default)
        if value is None:
            raise EdgeRtError(f"{self.path}: missing metadata key {self.arch}.{key}")
        return value

    def sizes(self, n_vocab: int) -> dict:
        n_heads, d_model = int(self.get("attention.head_count")), int(self.get("embedding_length"))
        head_dim = int(self.get("attention.key_length", d_model // n_heads))
        return dict(
            arch=self.arch, n_layers=int(self.get("block_count")), d_model=d_model,
            n_heads=n_heads, n_kv_heads=int(self.get("attention.head_count_kv", n_heads)),
            head_dim=head_dim, d_ff=int(self.get("feed_forward_length")), n_vocab=n_vocab,
            ctx_train=int(self.get("context_length")),
            norm_eps=float(self.get("attention.layer_norm_rms_epsilon")),
            rope_base=float(self.get("rope.freq_base", 10000.0)),
            rope_dim=int(self.get("rope.dimension_count", head_dim)),
        )
