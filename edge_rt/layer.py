"""The runtime's layer: one C call (kernels_c/layer.c) per transformer layer, the twin
of models/transformer.py `layer`. The Spec's switches become the fields of the C
struct; weights are the kernels' descriptors of the mapped file (no copies)."""
from __future__ import annotations

import ctypes
import time

import numpy as np

from . import kernels
from .models.spec import Spec
from .models.transformer import KVCache, rope_base_scale

_F = ctypes.POINTER(ctypes.c_float)
ACTIVATIONS = {"silu": 0, "gelu_tanh": 1}  # enum ert_activation
KV_TYPES = {"f32": 0, "f16": 1, "q8_0": 2}  # enum ert_kv_type


class _CLayer(ctypes.Structure):
    _fields_ = ([(k, ctypes.c_int) for k in ("d_model", "n_heads", "n_kv_heads", "head_dim", "d_ff")]
                + [("norm_eps", ctypes.c_float), ("attn_scale", ctypes.c_float), ("window", ctypes.c_int),
                   ("rope_dim", ctypes.c_int), ("rope_neox", ctypes.c_int), ("rope_base", ctypes.c_float),
                   ("rope_scale", ctypes.c_float), ("rope_factors", _F), ("act", ctypes.c_int), ("kv_type", ctypes.c_int)]
                + [(k, _F) for k in ("attn_norm", "q_bias", "k_bias", "v_bias", "q_norm", "k_norm", "post_attn_norm",
                                     "ffn_norm", "post_ffn_norm")]
                + [(k, kernels._CWeight) for k in ("wq", "wk", "wv", "wo", "gate", "up", "down")])


VECTORS = {"attn_norm": "attn_norm.weight", "q_bias": "attn_q.bias", "k_bias": "attn_k.bias", "v_bias": "attn_v.bias",
           "q_norm": "attn_q_norm.weight", "k_norm": "attn_k_norm.weight",
           "post_attn_norm": "post_attention_norm.weight", "ffn_norm": "ffn_norm.weight",
           "post_ffn_norm": "post_ffw_norm.weight"}
MATRICES = {"wq": "attn_q.weight", "wk": "attn_k.weight", "wv": "attn_v.weight", "wo": "attn_output.weight",
            "gate": "ffn_gate.weight", "up": "ffn_up.weight", "down": "ffn_down.weight"}


def _f32(a) -> np.ndarray:
    return np.ascontiguousarray(a, dtype=np.float32)


class CLayers:
    """`run(spec, W, i, x, pos0, kv)` has the signature of transformer.layer; the C
    structs are built once per layer, the scratch grows to the largest step seen."""

    def __init__(self, spec: Spec, W, threads: int, ctx: int, kv_type: str = "f16"):
        self.lib, self.threads, self.ctx, self.kv_type = kernels._load(), int(threads), ctx, kv_type
        self._keep = []  # the float32 vectors the structs point at
        factors = self._vec(W.vec("rope_freqs.weight")) if W.has("rope_freqs.weight") else None  # shared by all layers
        self.layers = [self._struct(spec, W, i, factors) for i in range(spec.n_layers)]
        self._out_norm, self._eps = self._vec(W.vec("output_norm.weight")), spec.norm_eps  # run_rest's final norm
        vp, ci = ctypes.c_void_p, ctypes.c_int
        self.lib.ert_layer_scratch_bytes.argtypes = [vp, ci, ci, ci]
        self.lib.ert_layer_scratch_bytes.restype = ctypes.c_size_t
        self.lib.ert_layer_forward.argtypes = [vp, vp, ci, ci, ci, vp, vp, vp, ci]
        self.lib.ert_layer_forward.restype = ci
        self.lib.ert_layers_forward.argtypes = [vp, ci, vp, ci, ci, ci, vp, vp, vp, ci, vp, ctypes.c_float]
        self.lib.ert_layers_forward.restype = ci
        self.lib.ert_layer_kv_shift.argtypes = [vp, vp, vp, ci, ci, ci, ci, vp]
        self.lib.ert_layer_kv_shift.restype = ci
        self.scratch, self._scratch_n = None, 0  # the scratch, and the most tokens a step may have with it
        self._kv = None, []  # the KV cache and its per-layer addresses
        self._rest = {}  # i -> (layer pointers, key and value cache pointers) of layers i.. for ert_layers_forward
        self.seconds = 0.0  # wall time inside the C calls (for the orchestrator's share)

    def _vec(self, a) -> _F:
        a = _f32(a)
        self._keep.append(a)
        return a.ctypes.data_as(_F)

    def _struct(self, spec: Spec, W, i: int, factors) -> _CLayer:
        p = f"blk.{i}."
        base, scale = rope_base_scale(spec, i)
        c = _CLayer(d_model=spec.d_model, n_heads=spec.n_heads, n_kv_heads=spec.n_kv_heads, head_dim=spec.head_dim,
                    d_ff=spec.d_ff, norm_eps=spec.norm_eps, attn_scale=spec.attn_scale or 1.0 / np.sqrt(spec.head_dim),
                    window=spec.sliding_window if spec.is_local(i) else 0, rope_dim=spec.rope_dim,
                    rope_neox=int(spec.rope_style == "neox"), rope_base=base, rope_scale=scale,
                    act=ACTIVATIONS[spec.act], kv_type=KV_TYPES[self.kv_type])
        if factors is not None:
            c.rope_factors = factors
        for field, name in VECTORS.items():
            if W.has(p + name):
                setattr(c, field, self._vec(W.vec(p + name)))
        self._bind(c, W, i)
        return c

    @staticmethod
    def _bind(c: _CLayer, W, i: int) -> None:
        """Copy layer i's matrix descriptors into its struct."""
        for field, name in MATRICES.items():
            setattr(c, field, W.matrices[f"blk.{i}." + name]._c)

    def scratch_bytes(self, n: int) -> int:
        return int(self.lib.ert_layer_scratch_bytes(ctypes.addressof(self.layers[0]), n, self.ctx, self.threads))

    def _cache(self, kv: KVCache) -> list[tuple[int, int]]:
        """The addresses of each layer's keys and values."""
        if self._kv[0] is not kv:
            if (kv.ctx, kv.dtype) != (self.ctx, self.kv_type):
                raise ValueError(f"a {kv.dtype} KV cache of {kv.ctx} positions; the layers were set up for "
                                 f"{self.kv_type}, {self.ctx}")
            self._kv = kv, [(kv.k[j].ctypes.data, kv.v[j].ctypes.data) for j in range(len(self.layers))]
            self._rest = {}
        return self._kv[1]

    def kv_shift(self, spec: Spec, W, kv: KVCache, keep: int, discard: int, used: int) -> None:
        """transformer.kv_shift, in C."""
        row = np.empty(spec.kv_dim(), np.float32)
        t0 = time.perf_counter()
        for i, (k, v) in enumerate(self._cache(kv)):
            rc = self.lib.ert_layer_kv_shift(ctypes.addressof(self.layers[i]), k, v, self.ctx, keep, discard, used,
                                             row.ctypes.data)
            if rc:
                kernels._check(rc, f"ert_layer_kv_shift (layer {i})")
        self.seconds += time.perf_counter() - t0

    def _prepare(self, x: np.ndarray) -> np.ndarray:
        """x as the C calls take it, and the scratch grown for its tokens (its size only grows with n)."""
        x = np.ascontiguousarray(x, dtype=np.float32)
        if x.shape[0] > self._scratch_n:
            self.scratch = None  # freed before the larger one is made
            self.scratch, self._scratch_n = np.empty(self.scratch_bytes(x.shape[0]) // 4, np.float32), x.shape[0]
        return x

    def run(self, spec: Spec, W, i: int, x: np.ndarray, pos0: int, kv: KVCache) -> np.ndarray:
        x = self._prepare(x)
        k, v = self._cache(kv)[i]
        if i < W.streamed:  # W.begin_layer(i) has just read it into the stream pool (flash.py): new addresses
            self._bind(self.layers[i], W, i)
        t0 = time.perf_counter()
        rc = self.lib.ert_layer_forward(ctypes.addressof(self.layers[i]), kernels._ptr(x), x.shape[0], pos0, self.ctx, k, v,
                                        kernels._ptr(self.scratch), self.threads)
        self.seconds += time.perf_counter() - t0
        if rc:
            kernels._check(rc, f"ert_layer_forward (layer {i})")
        return x

    def run_rest(self, spec: Spec, W, i: int, x: np.ndarray, pos0: int, kv: KVCache) -> np.ndarray:
        """Layers i.. (resident: W.streamed <= i) and the final norm in one C call:
        transformer.forward's run_rest. A call from Python per layer cost ~5 us each, ~4% of
        a SmolLM2 token at 2 threads; the final norm in numpy after it, ~50 us, its caches
        cold (BENCHMARKS.md, issue 3)."""
        x = self._prepare(x)
        caches = self._cache(kv)
        if i not in self._rest:
            vp, nl = ctypes.c_void_p, len(self.layers) - i
            self._rest[i] = ((vp * nl)(*[ctypes.addressof(c) for c in self.layers[i:]]),
                             (vp * nl)(*[k for k, _ in caches[i:]]), (vp * nl)(*[v for _, v in caches[i:]]))
        layers, ks, vs = self._rest[i]
        t0 = time.perf_counter()
        rc = self.lib.ert_layers_forward(layers, len(layers), kernels._ptr(x), x.shape[0], pos0, self.ctx, ks, vs,
                                         kernels._ptr(self.scratch), self.threads, self._out_norm, self._eps)
        self.seconds += time.perf_counter() - t0
        if rc:
            kernels._check(rc, f"ert_layers_forward (layers {i}..)")
        return x
