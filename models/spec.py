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

    def validate(self, path="") -> "Spec":
        sizes = {k: getattr(self, k) for k in ("n_layers", "d_model", "n_heads", "n_kv_heads", "head_dim", "d_ff",
                                               "n_vocab", "ctx_train", "rope_dim")}
        problems = [f"{k}={v}" for k, v in sizes.items() if v <= 0]
        if not problems and self.n_heads % self.n_kv_heads:
            problems.append(f"{self.n_heads} heads do not share {self.n_kv_heads} key/value heads evenly")
        if not problems and (self.rope_dim > self.head_dim or self.rope_dim % 2):
            problems.append(f"rope dimension {self.rope_dim} does not fit head dimension {self.head_dim}")
        if problems:
            raise EdgeRtError(f"{path}: impossible {self.arch} hyper-parameters ({'; '.join(problems)})")
        return self

    def tensor_shapes(self) -> dict[str, tuple[int, ...]]:
        """Every tensor the forward pass reads, with the shape it must have."""
        d, hq, hkv, ff, hd = self.d_model, self.n_heads * self.head_dim, self.kv_dim(), self.d_ff, self.head_dim
        shapes = {"token_embd.weight": (self.n_vocab, d), "output_norm.weight": (d,)}
        for i in range(self.n_layers):
            p = f"blk.{i}."
            shapes |= {p + "attn_norm.weight": (d,), p + "attn_q.weight": (hq, d), p + "attn_k.weight": (hkv, d),
                       p + "attn_v.weight": (hkv, d), p + "attn_output.weight": (d, hq), p + "ffn_norm.weight": (d,),
                       p + "ffn_gate.weight": (ff, d), p + "ffn_up.weight": (ff, d), p + "ffn_down.weight": (d, ff)}
            if self.qkv_bias:
                shapes |= {p + "attn_q.bias": (hq,), p + "attn_k.bias": (hkv,), p + "attn_v.bias": (hkv,)}
            if self.qk_norm:
                shapes |= {p + "attn_q_norm.weight": (hd,), p + "attn_k_norm.weight": (hd,)}
            if self.post_norms:
                shapes |= {p + "post_attention_norm.weight": (d,), p + "post_ffw_norm.weight": (d,)}
        return shapes

    def check_tensors(self, shapes: dict[str, tuple[int, ...]], path="") -> None:
        """The file's tensors (name -> shape) against the hyper-parameters."""
        optional = {"output.weight": (self.n_vocab, self.d_model), "rope_freqs.weight": (self.rope_dim // 2,)}
        expected = self.tensor_shapes() | {k: v for k, v in optional.items() if k in shapes}
        for name, want in expected.items():
            got = shapes.get(name)
            if got is None:
                raise EdgeRtError(f"{path}: tensor {name} is missing ({self.arch}, {self.n_layers} layers)")
            if tuple(got) != want:
                raise EdgeRtError(f"{path}: tensor {name} has shape {list(got)}, but the hyper-parameters say {list(want)}")

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
        head_dim = int(self.get("attention.key_length", d_model // n_heads if n_heads > 0 else 0))
        return dict(
            arch=self.arch, n_layers=int(self.get("block_count")), d_model=d_model,
            n_heads=n_heads, n_kv_heads=int(self.get("attention.head_count_kv", n_heads)),
            head_dim=head_dim, d_ff=int(self.get("feed_forward_length")), n_vocab=n_vocab,
            ctx_train=int(self.get("context_length")),
            norm_eps=float(self.get("attention.layer_norm_rms_epsilon")),
            rope_base=float(self.get("rope.freq_base", 10000.0)),
            rope_dim=int(self.get("rope.dimension_count", head_dim)),
        )
