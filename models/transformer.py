"""The forward pass of every family, top to bottom, in numpy. A family differs only by
the switches of its Spec. Matrix products go through `W.linear`, so the same code is
the test oracle (float weights, numpy products) and the runtime (C kernels)."""
from __future__ import annotations

import numpy as np

from .spec import Spec


def rmsnorm(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
    """x times 1 / sqrt(mean(x^2) + eps), times w (as llama.cpp and kernels_c/layer.c compute it):
    no division of whole rows, which numpy does with vdivps ymm, on the host the tests run on
    now and then 1 ulp off (BENCHMARKS.md, "A faulty division")."""
    ms = np.mean(np.square(x), axis=-1, keepdims=True, dtype=np.float32)
    return x * (np.float32(1.0) / np.sqrt(ms + np.float32(eps))) * w


def silu(x):
    return x / (np.float32(1.0) + np.exp(-x))


def gelu_tanh(x):
    c = np.float32(np.sqrt(2.0 / np.pi))
    return np.float32(0.5) * x * (np.float32(1.0) + np.tanh(c * (x + np.float32(0.044715) * x * x * x)))


ACTIVATIONS = {"silu": silu, "gelu_tanh": gelu_tanh}


def rope_tables(pos: np.ndarray, base: float, dim: int, scale: float = 1.0,
                factors: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """cos and sin [n, 1, dim/2] of each position's angles; frequency i is divided by
    factors[i] where the model has them (Llama-3's long-context factors)."""
    inv_freq = base ** (-np.arange(0, dim, 2, dtype=np.float64) / dim)
    if factors is not None:
        inv_freq = inv_freq / factors
    angle = (pos[:, None] / scale * inv_freq[None, :]).astype(np.float32)
    return np.cos(angle)[:, None, :], np.sin(angle)[:, None, :]


def rope(x: np.ndarray, cos: np.ndarray, sin: np.ndarray, style: str) -> np.ndarray:
    """Rotate the first 2*cos.shape[-1] features of each head of x[n, heads, head_dim]."""
    dim = 2 * cos.shape[-1]
    out = x.copy()
    if style == "norm":  # pairs (x[2i], x[2i+1])
        a, b = x[..., 0:dim:2], x[..., 1:dim:2]
        out[..., 0:dim:2], out[..., 1:dim:2] = a * cos - b * sin, a * sin + b * cos
    else:  # neox: pairs (x[i], x[i + dim/2])
        a, b = x[..., : dim // 2], x[..., dim // 2: dim]
        out[..., : dim // 2], out[..., dim // 2: dim] = a * cos - b * sin, a * sin + b * cos
    return out


# llama.cpp's block_q8_0: 32 values x ~ d * qs, 34 bytes
Q8_0 = np.dtype([("d", "<f2"), ("qs", "i1", (32,))])


def quantize_q8_0(x: np.ndarray) -> np.ndarray:
    """x[..., n] (n a multiple of 32) as q8_0 blocks [..., n/32]: gguf-py's Q8_0, bit-exact
    with llama.cpp's quantize_row_q8_0_ref (d = max|x| / 127 of each 32 values, codes
    round(x / d) with halves away from zero, then d stored as float16)."""
    from gguf import GGMLQuantizationType, quants
    return np.ascontiguousarray(quants.quantize(np.asarray(x, np.float32), GGMLQuantizationType.Q8_0)).view(Q8_0)


def dequantize_q8_0(blocks: np.ndarray) -> np.ndarray:
    """q8_0 blocks [..., m] -> float32 [..., 32 m] (d * code: exact in float32)."""
    from gguf import GGMLQuantizationType, quants
    return quants.dequantize(np.ascontiguousarray(blocks).view(np.uint8), GGMLQuantizationType.Q8_0)


class KVCache:
    """Keys and values of every layer for positions 0..ctx-1: float16 (as llama.cpp
    keeps them by default; rounded to nearest even), float32, or q8_0 (llama.cpp's
    8-bit blocks of 32 values along a head: head sizes that are a multiple of 32), as
    k, v[layer, kv head, position, element] (a head's positions one after the other, as
    the C attention reads them). encode / decode turn float32 keys or values
    [..., head_dim] into stored elements and back."""

    DTYPES = {"f16": np.float16, "f32": np.float32, "q8_0": Q8_0}
    PER_ELEMENT = {"f16": 1, "f32": 1, "q8_0": 32}  # values an element holds

    def __init__(self, spec: Spec, ctx: int, dtype: str = "f16"):
        per = self.PER_ELEMENT[dtype]
        if spec.head_dim % per:
            raise ValueError(f"a {dtype} KV cache needs a head size that is a multiple of {per}, not {spec.head_dim}")
        shape = (spec.n_layers, spec.n_kv_heads, ctx, spec.head_dim // per)
        self.dtype, self.ctx = dtype, ctx
        self.k, self.v = np.empty(shape, self.DTYPES[dtype]), np.empty(shape, self.DTYPES[dtype])
        self.k.view(np.uint8).fill(0)  # written now, so the whole cache is resident from the start
        self.v.view(np.uint8).fill(0)

    def encode(self, x: np.ndarray) -> np.ndarray:
        return quantize_q8_0(x) if self.dtype == "q8_0" else x.astype(self.DTYPES[self.dtype])

    def decode(self, a: np.ndarray) -> np.ndarray:
        return dequantize_q8_0(a) if self.dtype == "q8_0" else a.astype(np.float32)

    @classmethod
    def nbytes(cls, spec: Spec, ctx: int, dtype: str = "f16") -> int:
        values = 2 * spec.n_layers * ctx * spec.n_kv_heads * spec.head_dim
        return values // cls.PER_ELEMENT[dtype] * np.dtype(cls.DTYPES[dtype]).itemsize


def attention(q, k, v, pos, first, window, scale):
    """q[n, H, d] at positions pos; k, v[T, KV, d] hold positions first..first+T-1.
    Causal; with a window, position p sees only p-window+1 .. p."""
    n, H, d = q.shape
    T, KV = k.shape[0], k.shape[1]
    G = H // KV  # query heads per key/value head
    qh = q.reshape(n, KV, G, d).transpose(1, 2, 0, 3)  # [KV, G, n, d]
    scores = qh @ k.transpose(1, 2, 0)[:, None] * np.float32(scale)  # [KV, G, n, T]
    kpos = first + np.arange(T)
    masked = kpos[None, :] > pos[:, None]
    if window:
        masked |= pos[:, None] - kpos[None, :] >= window
    np.copyto(scores, np.float32(-np.inf), where=masked)
    scores -= scores.max(axis=-1, keepdims=True)
    p = np.exp(scores)
    p /= p.sum(axis=-1, keepdims=True)
    out = p @ v.transpose(1, 0, 2)[:, None]  # [KV, G, n, d]
    return out.transpose(2, 0, 1, 3).reshape(n, H * d)


def rope_base_scale(spec: Spec, layer: int) -> tuple[float, float]:
    """RoPE base and position scale of a layer (local layers have their own base)."""
    local = spec.is_local(layer)
    return (spec.rope_base_local if local and spec.rope_base_local else spec.rope_base,
            1.0 if local else spec.rope_scale)


def layer(spec: Spec, W, i: int, x: np.ndarray, pos0: int, kv: KVCache) -> np.ndarray:
    """Layer i on x[n, d_model] (tokens at positions pos0, pos0+1, ...), filling its part
    of the KV cache; returns the new x."""
    n, eps, p = len(x), spec.norm_eps, f"blk.{i}."
    H, KV, hd = spec.n_heads, spec.n_kv_heads, spec.head_dim
    pos = pos0 + np.arange(n)
    # attention
    h = rmsnorm(x, W.vec(p + "attn_norm.weight"), eps)
    q, k, v = W.linear(p + "attn_q.weight", h), W.linear(p + "attn_k.weight", h), W.linear(p + "attn_v.weight", h)
    if spec.qkv_bias:
        q, k, v = q + W.vec(p + "attn_q.bias"), k + W.vec(p + "attn_k.bias"), v + W.vec(p + "attn_v.bias")
    q, k, v = q.reshape(n, H, hd), k.reshape(n, KV, hd), v.reshape(n, KV, hd)
    if spec.qk_norm:
        q, k = rmsnorm(q, W.vec(p + "attn_q_norm.weight"), eps), rmsnorm(k, W.vec(p + "attn_k_norm.weight"), eps)
    factors = W.vec("rope_freqs.weight") if W.has("rope_freqs.weight") else None
    base, scale = rope_base_scale(spec, i)
    cos, sin = rope_tables(pos, base, spec.rope_dim, scale, factors)
    q, k = rope(q, cos, sin, spec.rope_style), rope(k, cos, sin, spec.rope_style)
    kv.k[i, :, pos0:pos0 + n], kv.v[i, :, pos0:pos0 + n] = kv.encode(k).swapaxes(0, 1), kv.encode(v).swapaxes(0, 1)
    window = spec.sliding_window if spec.is_local(i) else 0
    first = max(0, pos0 - window + 1) if window else 0
    keys, values = (kv.decode(c[i, :, first:pos0 + n]).swapaxes(0, 1) for c in (kv.k, kv.v))
    a = attention(q, keys, values, pos, first, window,
                  spec.attn_scale or 1.0 / np.sqrt(hd))
    a = W.linear(p + "attn_output.weight", a)
    if spec.post_norms:
        a = rmsnorm(a, W.vec(p + "post_attention_norm.weight"), eps)
    x = x + a
    # feed-forward
    h = rmsnorm(x, W.vec(p + "ffn_norm.weight"), eps)
    act = ACTIVATIONS[spec.act]
    f = W.linear(p + "ffn_down.weight", act(W.linear(p + "ffn_gate.weight", h)) * W.linear(p + "ffn_up.weight", h))
    if spec.post_norms:
        f = rmsnorm(f, W.vec(p + "post_ffw_norm.weight"), eps)
    return x + f


def kv_shift(spec: Spec, W, kv: KVCache, keep: int, discard: int, used: int) -> None:
    """Drop cache positions keep..keep+discard-1 (of 0..used-1): later positions move
    down by `discard`, their keys turned back by `discard` positions of RoPE (a turn by
    an angle linear in the position), so they read as if written there (q8_0 keys:
    dequantized, turned, quantized again; values move as they are)."""
    factors = W.vec("rope_freqs.weight") if W.has("rope_freqs.weight") else None
    for i in range(spec.n_layers):
        base, scale = rope_base_scale(spec, i)
        cos, sin = rope_tables(np.array([-discard]), base, spec.rope_dim, scale, factors)
        k = kv.decode(kv.k[i, :, keep + discard:used])
        kv.k[i, :, keep:used - discard] = kv.encode(rope(k, cos, sin, spec.rope_style))
        kv.v[i, :, keep:used - discard] = kv.v[i, :, keep + discard:used]


def forward(spec: Spec, W, tokens: np.ndarray, pos0: int, kv: KVCache, run_layer=layer, run_rest=None,
            norm=rmsnorm) -> np.ndarray:
    """Run tokens (at positions pos0, pos0+1, ...) through the model, filling the KV
    cache; returns the final-normed hidden states [n, d_model]. run_layer is `layer`
    above, or the runtime's one C call per layer (edge_rt/layer.py); run_rest(spec, W, i,
    x, pos0, kv), if given, runs layers i.. and the final norm at once from the first layer
    that is not streamed (the runtime's one C call for all resident layers); norm is the
    final norm's rmsnorm otherwise (the runtime's: kernels.rmsnorm, the same C)."""
    x = W.embed(tokens)
    if spec.embed_scale != 1.0:
        x = x * np.float32(spec.embed_scale)
    for i in range(spec.n_layers):
        W.begin_layer(i)  # layer i's matrices now point at resident bytes (edge_rt/flash.py streams them)
        if run_rest is not None and i >= W.streamed:
            return run_rest(spec, W, i, x, pos0, kv)
        x = run_layer(spec, W, i, x, pos0, kv)
    return norm(x, W.vec("output_norm.weight"), spec.norm_eps)


def output_name(W) -> str:
    """The output head: its own tensor, or the embedding table when tied."""
    return "output.weight" if W.has("output.weight") else "token_embd.weight"


def logits(W, hidden: np.ndarray) -> np.ndarray:
    return W.linear(output_name(W), hidden)
