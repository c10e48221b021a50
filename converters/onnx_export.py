"""The decoder as an ONNX graph (written with the `onnx` package, no torch), in the
Hugging Face / optimum decoder layout, read by onnxruntime (edge_rt/ort.py).

Inputs:  input_ids int64 [batch, seq]; attention_mask int64 [batch, past + seq] (1: a
         real token); position_ids int64 [batch, seq] (RoPE positions);
         past_key_values.{i}.key / .value float32 [batch, kv_heads, past, head_dim];
         logits_to_keep int64 scalar (logits of the last that many positions; 0: all).
Outputs: logits float32 [batch, kept, vocab]; present.{i}.key / .value
         [batch, kv_heads, past + seq, head_dim] (the cache to feed back).

The same weights as our GGUF of the same options: each matrix's codes, scales and
minimums come from the quantizer convert uses (w = d * c + m per group of columns):
  4 bits: com.microsoft.MatMulNBits (bits=4, block_size = the group size, zero point 8:
          d * (c - 8)), plus (sum of x over each group) . (m + 8d)^T, a small MatMul:
          MatMulNBits' zero points are integers (or, as floats, 10x slower here), and a
          minimum off the code grid is not one.
  8 bits: DequantizeLinear (codes stored [cols, rows], blocked along axis 0, zero point
          128) gives (d * (c - 128))^T, then MatMul, plus (sums of x) . (m + 128d)^T.
          onnxruntime fuses the pair into an 8-bit MatMulNBits.
Products are float32 (MatMulNBits accuracy_level 0) unless --int8-activations (level
4, activations rounded to int8 as our own kernels do: faster, less exact); the level is
in the metadata ("edgert.accuracy_level"), and edge_rt/ort.py gives it to onnxruntime's
DequantizeLinear + MatMul fusion too.
The embedding rows are gathered from the same tensors as the output head when tied.
The graph follows models/transformer.py, driven by the same Spec switches (rope_style,
act, qkv_bias, qk_norm, post_norms, embed_scale, attn_scale, sliding_window, rope bases).

Files: OUT (the graph, small), OUT.data (every tensor over 1 KiB, ONNX external data,
64-byte aligned; it begins with the export's 16-byte id, which the graph's metadata
names, so a graph and a data file of different exports are refused), written under
temporary names and renamed (OUT.data first). The source's GGUF metadata (tokenizer,
chat template, hyper-parameters) is in the graph's metadata_props as "gguf:KEY" -> JSON."""
from __future__ import annotations

import json
import os
import secrets
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from onnx.external_data_helper import set_external_data
from tqdm import tqdm

from edge_rt import formats
from edge_rt.atomic import atomic_output
from edge_rt.errors import EdgeRtError
from edge_rt.models import spec_from_meta
from edge_rt.models.spec import Spec
from edge_rt.models.transformer import rope_base_scale

from .readers import Source

OPSET = 21            # DequantizeLinear with block_size
EXTERNAL_MIN = 1024   # bytes: larger tensors go to the data file
ALIGN = 64
ID_BYTES = 16
META_PREFIX = "gguf:"
ID_KEY = "edgert.data_id"
ACCURACY_KEY = "edgert.accuracy_level"
BLOCK_SIZES = (32, 64, 128, 256)  # MatMulNBits block sizes a group size may be


def data_path(out: Path) -> Path:
    return out.with_name(out.name + ".data")


def check_options(bits: int, group_size: int, embed_bits: int | None) -> None:
    for flag, b in (("--bits", bits), ("--embed-bits", embed_bits)):
        if b is not None and b not in (4, 8, 32):
            raise EdgeRtError(f"--format onnx writes 4-bit (MatMulNBits), 8-bit (DequantizeLinear) or 32-bit "
                              f"matrices; {flag} {b} is not one of them")
    if group_size not in BLOCK_SIZES:
        raise EdgeRtError(f"--format onnx needs --group-size {', '.join(map(str, BLOCK_SIZES))} "
                          f"(MatMulNBits block sizes), got {group_size}")


class Graph:
    """Nodes and initializers; large initializers are written to the data file at once."""

    def __init__(self, data, location: str):
        self.nodes, self.inits, self.n, self.small = [], [], 0, {}
        self.data, self.location = data, location

    def fresh(self, hint: str) -> str:
        self.n += 1
        return f"{hint}.{self.n}"

    def op(self, op_type: str, *inputs, outputs=None, domain: str = "", **attrs):
        outs = outputs or [self.fresh(op_type)]
        self.nodes.append(helper.make_node(op_type, list(inputs), outs, name=outs[0], domain=domain, **attrs))
        return outs[0] if len(outs) == 1 else outs

    def init(self, name: str, a: np.ndarray) -> str:
        t = numpy_helper.from_array(np.ascontiguousarray(a), name)
        if t.ByteSize() > EXTERNAL_MIN:
            raw = t.raw_data
            offset = self.data.tell()
            self.data.write(raw)
            self.data.write(b"\0" * (-len(raw) % ALIGN))
            set_external_data(t, self.location, offset, len(raw))
            t.ClearField("raw_data")
        self.inits.append(t)
        return name

    def const(self, value, dtype=np.int64) -> str:
        """A small constant, shared by every node that uses the same value."""
        a = np.asarray(value, dtype=dtype)
        key = (a.dtype.str, a.shape, a.tobytes())
        if key not in self.small:
            self.small[key] = self.init(self.fresh("const"), a)
        return self.small[key]


class Weights:
    """Each source tensor once, in the format convert chose, as graph initializers."""

    def __init__(self, g: Graph, src: Source, chosen: dict, quantize, bar, accuracy: int):
        self.g, self.src, self.chosen, self.quantize, self.bar, self.done = g, src, chosen, quantize, bar, {}
        self.accuracy = accuracy  # MatMulNBits accuracy_level: 0 float32 products, 4 int8 activations

    def get(self, name: str) -> tuple:
        if name not in self.done:
            self.done[name] = self._make(name)
            self.bar.update()
        return self.done[name]

    def _make(self, name: str) -> tuple:
        w, fmt = self.src.load(name), self.chosen[name]
        if not isinstance(fmt, formats.GroupQuant):
            return "f32", self.g.init(name, np.asarray(w, np.float32))
        rows, cols = w.shape
        c, d, m = self.quantize(name, fmt, w)
        d, m = d.astype(np.float32), m.astype(np.float32)
        centered = (m + (1 << fmt.bits - 1) * d).T  # the minimum term of d * (c - 2^(bits-1))
        if fmt.bits == 8:  # codes [cols, rows]: DequantizeLinear along axis 0, no transpose at run time
            zero = np.full(d.T.shape, 128, np.uint8)
            return ("q8", self.g.init(name + ".codes", c.T), self.g.init(name + ".scale", d.T),
                    self.g.init(name + ".min", centered), fmt.group_size, self.g.init(name + ".zero", zero))
        g, nb = fmt.group_size, fmt.groups(cols)
        c = np.pad(c, ((0, 0), (0, nb * g - cols))).reshape(rows, nb, g // 2, 2)
        packed = c[..., 0] | (c[..., 1] << 4)  # element 2j in the low nibble of byte j
        return "q4", self.g.init(name + ".qweight", packed), self.g.init(name + ".scales", d), \
            self.g.init(name + ".min", centered), g

    def linear(self, name: str, x: str) -> str:
        """x [..., cols] . W^T -> [..., rows]; a group-quantized W = d * c + m adds
        (sum of x over each group) . m^T to x . (d * c)^T, as our kernels do."""
        w, g = self.get(name), self.g
        rows, cols = self.src.shapes[name]
        if w[0] == "f32":
            return g.op("MatMul", x, g.op("Transpose", w[1], perm=[1, 0]))
        kind, c, d, m, group = w[:5]
        if kind == "q4":
            y = g.op("MatMulNBits", x, c, d, domain="com.microsoft", K=cols, N=rows, bits=4, block_size=group,
                     accuracy_level=self.accuracy)  # zero point 8 (the default): d * (c - 8)
        else:
            y = g.op("MatMul", x, g.op("DequantizeLinear", c, d, w[5], axis=0, block_size=group))
        nb = -(-cols // group)
        if nb * group != cols:
            x = g.op("Pad", x, g.const([0, 0, 0, 0, 0, nb * group - cols]))
        sums = g.op("ReduceSum", g.op("Reshape", x, g.const([0, 0, nb, group])), g.const([-1]), keepdims=0)
        return g.op("Add", y, g.op("MatMul", sums, m))

    def rows(self, name: str, ids: str) -> str:
        """Rows ids [...] of the matrix, dequantized: [..., cols]."""
        w, g = self.get(name), self.g
        cols = self.src.shapes[name][1]
        if w[0] == "f32":
            return g.op("Gather", w[1], ids)
        kind, c, d, m, group = w[:5]
        if kind == "q8":  # [cols, rows] -> [..., cols]
            codes = g.op("Gather", c, ids, axis=1)
            codes = g.op("Transpose", codes, perm=[1, 2, 0])
            d = g.op("Transpose", g.op("Gather", d, ids, axis=1), perm=[1, 2, 0])  # [..., groups]
        else:
            packed = g.op("Gather", c, ids)  # [..., nb, group/2]
            lo = g.op("BitwiseAnd", packed, g.const(15, np.uint8))
            hi = g.op("BitShift", packed, g.const(4, np.uint8), direction="RIGHT")
            last = g.const([-1])
            codes = g.op("Concat", g.op("Unsqueeze", lo, last), g.op("Unsqueeze", hi, last), axis=-1)
            codes = g.op("Slice", g.op("Reshape", codes, g.const([0, 0, -1])), g.const([0]), g.const([cols]), last)
            d = g.op("Gather", d, ids)
        per_col = g.const(np.arange(cols) // group)
        d, m = g.op("Gather", d, per_col, axis=-1), g.op("Gather", g.op("Transpose", g.op("Gather", m, ids, axis=1),
                                                                        perm=[1, 2, 0]), per_col, axis=-1)
        codes = g.op("Sub", g.op("Cast", codes, to=TensorProto.FLOAT), g.const(8 if kind == "q4" else 128, np.float32))
        return g.op("Add", g.op("Mul", codes, d), m)


class Builder:
    """models/transformer.py's forward pass as graph nodes."""

    def __init__(self, spec: Spec, g: Graph, W: Weights, rope_factors: np.ndarray | None):
        self.spec, self.g, self.W, self.factors = spec, g, W, rope_factors
        self.tables, self.masks = {}, {}

    def rmsnorm(self, x: str, weight: str) -> str:
        g = self.g
        ms = g.op("ReduceMean", g.op("Pow", x, g.const(2.0, np.float32)), g.const([-1]), keepdims=1)
        den = g.op("Sqrt", g.op("Add", ms, g.const(self.spec.norm_eps, np.float32)))
        return g.op("Mul", g.op("Div", x, den), self.W.get(weight)[1])

    def rope_table(self, layer: int) -> tuple[str, str]:
        """cos, sin [batch, seq, 1, rope_dim/2] of the positions, as rope_tables computes them
        (angles in float64, then float32)."""
        key = rope_base_scale(self.spec, layer)
        if key not in self.tables:
            base, scale = key
            dim = self.spec.rope_dim
            inv_freq = base ** (-np.arange(0, dim, 2, dtype=np.float64) / dim)
            if self.factors is not None:
                inv_freq = inv_freq / self.factors
            g = self.g
            pos = g.op("Cast", g.op("Unsqueeze", "position_ids", g.const([-1])), to=TensorProto.DOUBLE)
            angle = g.op("Mul", g.op("Div", pos, g.const(scale, np.float64)), g.const(inv_freq, np.float64))
            angle = g.op("Unsqueeze", g.op("Cast", angle, to=TensorProto.FLOAT), g.const([2]))
            self.tables[key] = g.op("Cos", angle), g.op("Sin", angle)
        return self.tables[key]

    def rope(self, x: str, cos: str, sin: str) -> str:
        """x [batch, seq, heads, head_dim]: rotate the first rope_dim features."""
        g, dim, hd = self.g, self.spec.rope_dim, self.spec.head_dim
        last = g.const([-1])
        if self.spec.rope_style == "norm":  # pairs (x[2i], x[2i+1])
            a = g.op("Slice", x, g.const([0]), g.const([dim]), last, g.const([2]))
            b = g.op("Slice", x, g.const([1]), g.const([dim]), last, g.const([2]))
        else:  # neox: pairs (x[i], x[i + dim/2])
            a = g.op("Slice", x, g.const([0]), g.const([dim // 2]), last)
            b = g.op("Slice", x, g.const([dim // 2]), g.const([dim]), last)
        ra = g.op("Sub", g.op("Mul", a, cos), g.op("Mul", b, sin))
        rb = g.op("Add", g.op("Mul", a, sin), g.op("Mul", b, cos))
        if self.spec.rope_style == "norm":
            rot = g.op("Concat", g.op("Unsqueeze", ra, last), g.op("Unsqueeze", rb, last), axis=-1)
            rot = g.op("Reshape", rot, g.const([0, 0, 0, dim]))
        else:
            rot = g.op("Concat", ra, rb, axis=-1)
        if dim == hd:
            return rot
        return g.op("Concat", rot, g.op("Slice", x, g.const([dim]), g.const([hd]), last), axis=-1)

    def mask(self, layer: int) -> str:
        """bool [batch, 1, 1, seq, past + seq]: which keys each query sees (causal, the
        attention mask, and the sliding window of local layers)."""
        window = self.spec.sliding_window if self.spec.is_local(layer) else 0
        if window not in self.masks:
            g = self.g
            total = g.op("Squeeze", g.op("Shape", "attention_mask", start=1, end=2), g.const([0]))
            seq = g.op("Squeeze", g.op("Shape", "input_ids", start=1, end=2), g.const([0]))
            one = g.const(1)
            kpos = g.op("Range", g.const(0), total, one)
            qpos = g.op("Unsqueeze", g.op("Range", g.op("Sub", total, seq), total, one), g.const([1]))
            ok = g.op("LessOrEqual", kpos, qpos)  # [seq, total]
            if window:
                ok = g.op("And", ok, g.op("Less", g.op("Sub", qpos, kpos), g.const(window)))
            real = g.op("Cast", g.op("Unsqueeze", "attention_mask", g.const([1, 2, 3])), to=TensorProto.BOOL)
            self.masks[window] = g.op("And", ok, real)
        return self.masks[window]

    def attention(self, i: int, h: str) -> str:
        s, g, W, p = self.spec, self.g, self.W, f"blk.{i}."
        H, KV, hd = s.n_heads, s.n_kv_heads, s.head_dim
        q, k, v = (W.linear(p + f"attn_{t}.weight", h) for t in "qkv")
        if s.qkv_bias:
            q, k, v = (g.op("Add", x, W.get(p + f"attn_{t}.bias")[1]) for x, t in zip((q, k, v), "qkv"))
        q = g.op("Reshape", q, g.const([0, 0, H, hd]))
        k = g.op("Reshape", k, g.const([0, 0, KV, hd]))
        v = g.op("Reshape", v, g.const([0, 0, KV, hd]))
        if s.qk_norm:
            q, k = self.rmsnorm(q, p + "attn_q_norm.weight"), self.rmsnorm(k, p + "attn_k_norm.weight")
        cos, sin = self.rope_table(i)
        q, k = self.rope(q, cos, sin), self.rope(k, cos, sin)
        heads_first = [0, 2, 1, 3]
        keys = g.op("Concat", f"past_key_values.{i}.key", g.op("Transpose", k, perm=heads_first), axis=2,
                    outputs=[f"present.{i}.key"])
        values = g.op("Concat", f"past_key_values.{i}.value", g.op("Transpose", v, perm=heads_first), axis=2,
                      outputs=[f"present.{i}.value"])
        # grouped-query attention: [batch, KV, G, seq, hd] against [batch, KV, 1, total, hd]
        qg = g.op("Reshape", g.op("Transpose", q, perm=heads_first), g.const([0, KV, H // KV, -1, hd]))
        kt = g.op("Unsqueeze", g.op("Transpose", keys, perm=[0, 1, 3, 2]), g.const([2]))
        scores = g.op("Mul", g.op("MatMul", qg, kt), g.const(s.attn_scale or 1.0 / np.sqrt(hd), np.float32))
        scores = g.op("Where", self.mask(i), scores, g.const(np.finfo(np.float32).min, np.float32))
        out = g.op("MatMul", g.op("Softmax", scores, axis=-1), g.op("Unsqueeze", values, g.const([2])))
        out = g.op("Transpose", g.op("Reshape", out, g.const([0, H, -1, hd])), perm=heads_first)
        a = W.linear(p + "attn_output.weight", g.op("Reshape", out, g.const([0, 0, H * hd])))
        return self.rmsnorm(a, p + "post_attention_norm.weight") if s.post_norms else a

    def ffn(self, i: int, h: str) -> str:
        s, g, W, p = self.spec, self.g, self.W, f"blk.{i}."
        gate = W.linear(p + "ffn_gate.weight", h)
        act = g.op("Mul", gate, g.op("Sigmoid", gate)) if s.act == "silu" else g.op("Gelu", gate, approximate="tanh")
        f = W.linear(p + "ffn_down.weight", g.op("Mul", act, W.linear(p + "ffn_up.weight", h)))
        return self.rmsnorm(f, p + "post_ffw_norm.weight") if s.post_norms else f

    def forward(self, head: str) -> None:
        s, g = self.spec, self.g
        x = self.W.rows("token_embd.weight", "input_ids")
        if s.embed_scale != 1.0:
            x = g.op("Mul", x, g.const(s.embed_scale, np.float32))
        for i in range(s.n_layers):
            x = g.op("Add", x, self.attention(i, self.rmsnorm(x, f"blk.{i}.attn_norm.weight")))
            x = g.op("Add", x, self.ffn(i, self.rmsnorm(x, f"blk.{i}.ffn_norm.weight")))
        x = self.rmsnorm(x, "output_norm.weight")
        keep = g.op("Neg", g.op("Unsqueeze", "logits_to_keep", g.const([0])))
        x = g.op("Slice", x, keep, g.const([np.iinfo(np.int64).max]), g.const([1]))
        g.op("Identity", self.W.linear(head, x), outputs=["logits"])


def io(spec: Spec) -> tuple[list, list]:
    f, i64 = TensorProto.FLOAT, TensorProto.INT64
    cache = ["batch", spec.n_kv_heads, "past", spec.head_dim]
    inputs = [helper.make_tensor_value_info("input_ids", i64, ["batch", "seq"]),
              helper.make_tensor_value_info("attention_mask", i64, ["batch", "total"]),
              helper.make_tensor_value_info("position_ids", i64, ["batch", "seq"])]
    outputs = [helper.make_tensor_value_info("logits", f, ["batch", "kept", spec.n_vocab])]
    for i in range(spec.n_layers):
        for t in ("key", "value"):
            inputs.append(helper.make_tensor_value_info(f"past_key_values.{i}.{t}", f, cache))
            outputs.append(helper.make_tensor_value_info(f"present.{i}.{t}", f, cache[:2] + ["total", cache[3]]))
    inputs.append(helper.make_tensor_value_info("logits_to_keep", i64, []))
    return inputs, outputs


def write_onnx(out, src: Source, chosen: dict, quantize, meta: dict, progress: bool | None = None,
               int8_activations: bool = False) -> Path:
    """Write OUT and OUT.data (see the module's docstring); chosen: name -> format,
    quantize(name, fmt, w) -> (codes, d, m) (converters/quantize.quantizer). int8_activations:
    4-bit products with int8 activations (MatMulNBits accuracy_level 4: faster, less exact)."""
    out = Path(out)
    spec = spec_from_meta(src.meta, len(src.meta.get("tokenizer.ggml.tokens", [])), src.path)
    head = "output.weight" if "output.weight" in src.shapes else "token_embd.weight"
    export_id, accuracy = secrets.token_hex(ID_BYTES), 4 if int8_activations else 0
    loc = data_path(out).name
    with atomic_output(out) as tmp_graph, atomic_output(data_path(out)) as tmp_data:  # the data is renamed first
        with open(tmp_data, "wb") as data, tqdm(total=len(src.shapes), desc="convert", unit="tensor",
                                                 disable=None if progress is None else not progress) as bar:
            data.write(bytes.fromhex(export_id).ljust(ALIGN, b"\0"))
            g = Graph(data, loc)
            factors = src.load("rope_freqs.weight") if "rope_freqs.weight" in src.shapes else None
            Builder(spec, g, Weights(g, src, chosen, quantize, bar, accuracy), factors).forward(head)
            data.flush()
            os.fsync(data.fileno())
        inputs, outputs = io(spec)
        graph = helper.make_graph(g.nodes, f"edge-rt {spec.arch}", inputs, outputs, g.inits)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET),
                                                        helper.make_opsetid("com.microsoft", 1)],
                                  producer_name="edge-rt", ir_version=10)
        keep = {k: v for k, v in src.meta.items() if not k.startswith(("GGUF.", "edgert."))}
        props = {META_PREFIX + k: json.dumps(v, default=lambda o: o.tolist()) for k, v in (keep | meta).items()} | {ID_KEY: export_id, ACCURACY_KEY: str(accuracy)}
        helper.set_model_props(model, props)
        Path(tmp_graph).write_bytes(model.SerializeToString())
    return out
