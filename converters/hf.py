"""Hugging Face model folders <-> the converter's common form.

The common form is GGUF's own convention (so a GGUF source is read as it is):
  - meta: GGUF metadata keys and values as llama.cpp's convert_hf_to_gguf.py writes them
    (Python int / float / bool / str, numpy arrays or lists for arrays; floats rounded to
    float32 as a GGUF file holds them);
  - tensors: float32 arrays in numpy shape [rows, cols] under GGUF tensor names, with
    llama.cpp's conversion applied: llama's q/k rows permuted for its rope layout,
    Gemma-3's RMSNorm weights stored as (1 + w), Qwen2's q/k/v biases kept, and, for a
    "llama3" rope scaling, the generated rope_freqs.weight.

`read_hf_folder` reads config.json + *.safetensors (sharded or not) + tokenizer.json (+
tokenizer_config.json, chat_template.jinja); `write_hf_folder` is its inverse, used by the
tests to make a folder from a GGUF. Weights are read only from safetensors: pickled
checkpoints (*.bin, *.pt) can run code when loaded, and are refused.
"""
from __future__ import annotations

import json
import os
import math
import struct
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
from gguf import Keys

from edge_rt.errors import EdgeRtError
from edge_rt.gguf_file import os_message, short

# HF class -> (GGUF architecture, HF model_type)
SUPPORTED = {"LlamaForCausalLM": ("llama", "llama"), "Qwen2ForCausalLM": ("qwen2", "qwen2"),
             "Gemma3ForCausalLM": ("gemma3", "gemma3_text")}
_HF_CLASS = {arch: cls for cls, (arch, _) in SUPPORTED.items()}
_BY_MODEL_TYPE = {mt: cls for cls, (_, mt) in SUPPORTED.items()}

# HF's defaults for keys a config.json may leave out (transformers' *Config classes)
_DEFAULTS = {
    "llama": {"rms_norm_eps": 1e-6, "rope_theta": 10000.0, "max_position_embeddings": 2048,
              "tie_word_embeddings": False},
    "qwen2": {"rms_norm_eps": 1e-6, "rope_theta": 10000.0, "max_position_embeddings": 32768,
              "tie_word_embeddings": False},
    # convert_hf_to_gguf.py's Gemma3Model defaults, which are also HF's
    "gemma3": {"rms_norm_eps": 1e-6, "rope_theta": 1_000_000.0, "max_position_embeddings": 131072,
               "tie_word_embeddings": True, "num_attention_heads": 8, "num_key_value_heads": 4,
               "head_dim": 256, "sliding_window": 4096, "rope_local_base_freq": 10000.0},
}

# per-layer tensors: HF suffix (after model.layers.N.) -> GGUF suffix (after blk.N.)
_LAYER = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}
_BIAS = {"self_attn.q_proj.bias": "attn_q.bias", "self_attn.k_proj.bias": "attn_k.bias",
         "self_attn.v_proj.bias": "attn_v.bias"}
_LAYER_ARCH = {
    "llama": {"post_attention_layernorm.weight": "ffn_norm.weight"},
    "qwen2": {"post_attention_layernorm.weight": "ffn_norm.weight", **_BIAS},
    "gemma3": {"post_attention_layernorm.weight": "post_attention_norm.weight",
               "pre_feedforward_layernorm.weight": "ffn_norm.weight",
               "post_feedforward_layernorm.weight": "post_ffw_norm.weight",
               "self_attn.q_norm.weight": "attn_q_norm.weight",
               "self_attn.k_norm.weight": "attn_k_norm.weight"},
}
_GLOBAL = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
           "lm_head.weight": "output.weight"}
_SKIPPED = (".rotary_emb.inv_freq",)  # recomputed at run time; llama.cpp drops them too
_PICKLES = ("*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl")
_ST_DTYPES = {"F32": np.float32, "F16": np.float16, "F64": np.float64, "BF16": None}


def _f32(x: float) -> float:
    """A float as a GGUF file holds it (float32), back as a Python float."""
    return float(np.float32(x))


def _short(x: float) -> float:
    """The shortest decimal that is the same float32 (1e-05, not 9.999999747378752e-06)."""
    return float(str(np.float32(x)))


# --- lazy tensors ---------------------------------------------------------------------
class LazyTensors(Mapping):
    """name -> float32 array, computed each time it is asked for and not kept, so a model
    can be converted one tensor at a time. Behaves as a read-only dict; `shape(name)`
    answers without reading."""

    def __init__(self, items: dict[str, tuple[tuple[int, ...], Callable[[], np.ndarray]]]):
        self._items = items

    def __getitem__(self, name: str) -> np.ndarray:
        return self._items[name][1]()

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._items[name][0]


def _shape_of(tensors: Mapping, name: str) -> tuple[int, ...]:
    if isinstance(tensors, LazyTensors):
        return tensors.shape(name)
    return tuple(tensors[name].shape)


# --- safetensors ----------------------------------------------------------------------
class _Shard:
    """One safetensors file, validated whole on open (safetensors checks that the header's
    offsets cover the data exactly), read tensor by tensor."""

    def __init__(self, path: Path):
        from safetensors import safe_open

        self.path = path
        try:
            self._st = safe_open(str(path), framework="numpy")
            with open(path, "rb") as f:
                (n,) = struct.unpack("<Q", f.read(8))
                header = json.loads(f.read(n))
        except Exception as e:  # SafetensorError, OSError, bad JSON
            msg = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise EdgeRtError(f"{path}: not a valid safetensors file ({msg})") from None
        self.data_start = 8 + n
        self.entries = {k: v for k, v in header.items() if k != "__metadata__"}

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(int(d) for d in self.entries[name]["shape"])

    def dtype(self, name: str) -> str:
        return self.entries[name]["dtype"]

    def load(self, name: str) -> np.ndarray:
        dt, shape = self.dtype(name), self.shape(name)
        if dt == "BF16":  # numpy has no bfloat16: its bits are float32's high half
            begin = self.entries[name]["data_offsets"][0]
            with open(self.path, "rb") as f:
                f.seek(self.data_start + begin)
                raw = np.fromfile(f, dtype="<u2", count=math.prod(shape))
            return (raw.astype(np.uint32) << 16).view(np.float32).reshape(shape)
        return np.asarray(self._st.get_tensor(name), dtype=np.float32).reshape(shape)


def _open_weights(folder: Path) -> dict[str, _Shard]:
    """HF tensor name -> the shard that holds it."""
    index_path = folder / "model.safetensors.index.json"
    if index_path.is_file():
        index = _read_json(index_path)
        weight_map = index.get("weight_map")
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise EdgeRtError(f"{index_path}: no weight_map of tensor name -> file")
        shards = {}
        for fname in sorted(set(weight_map.values())):
            p = folder / fname
            if Path(fname).name != fname or not p.is_file():
                raise EdgeRtError(f"{index_path}: names shard {fname!r}, which is not in {folder}")
            shards[fname] = _Shard(p)
        where = {}
        for name, fname in weight_map.items():
            if name not in shards[fname].entries:
                raise EdgeRtError(f"{index_path}: says {name} is in {fname}, but it is not")
            where[name] = shards[fname]
        return where
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        pickles = sorted({p.name for pat in _PICKLES for p in folder.glob(pat)})
        if pickles:
            raise EdgeRtError(f"{folder}: weights only in {', '.join(pickles[:3])} (PyTorch pickle), which "
                              f"edge-rt does not load; convert them to safetensors first "
                              f"(e.g. save_pretrained(..., safe_serialization=True))")
        raise EdgeRtError(f"{folder}: no *.safetensors weights found")
    where = {}
    for p in files:
        shard = _Shard(p)
        for name in shard.entries:
            if name in where:
                raise EdgeRtError(f"{folder}: tensor {name} is in both {where[name].path.name} and {p.name}")
            where[name] = shard
    return where


def _write_safetensors(path: Path, tensors: Mapping, names: list[str], hf_dtype: str,
                       get: Callable[[str], np.ndarray]) -> int:
    """Write tensors one at a time (never the whole model in memory); returns bytes of data."""
    itemsize = {"F32": 4, "F16": 2, "BF16": 2}[hf_dtype]
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name in names:
        shape = _shape_of(tensors, name)
        n = math.prod(shape) * itemsize
        header[name] = {"dtype": hf_dtype, "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for name in names:
            a = np.ascontiguousarray(get(name), dtype=np.float32)
            if hf_dtype == "F16":
                a = a.astype(np.float16)
            elif hf_dtype == "BF16":  # round to nearest even
                u = a.view(np.uint32).astype(np.uint64)
                a = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype("<u2")
            f.write(a.astype(a.dtype.newbyteorder("<"), copy=False).tobytes())
    return offset


# --- config ---------------------------------------------------------------------------
MAX_TEXT = 256 << 20  # bytes of a JSON or template file (Gemma 3's tokenizer.json: 33 MB)


def _read_text(path: Path) -> str:
    """A UTF-8 file of at most MAX_TEXT bytes: a hostile size is refused before it is read."""
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size > MAX_TEXT:
                raise EdgeRtError(f"{path}: {size} bytes is more than a model's text files hold ({MAX_TEXT >> 20} MiB)")
            return f.read().decode("utf-8")
    except UnicodeDecodeError as e:
        raise EdgeRtError(f"{path}: not UTF-8 ({e})") from None
    except OSError as e:
        raise EdgeRtError(f"{short(path)}: {os_message(e)}") from None


def _read_json(path: Path) -> dict:
    try:
        value = json.loads(_read_text(path))
    except json.JSONDecodeError as e:
        raise EdgeRtError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(value, dict):
        raise EdgeRtError(f"{path}: expected a JSON object")
    return value


class _Config:
    """config.json, with HF's defaults and checks that name the file and key."""

    def __init__(self, path: Path):
        self.path = path
        cfg = _read_json(path)
        archs = cfg.get("architectures")
        hf_class = archs[0] if isinstance(archs, list) and archs else _BY_MODEL_TYPE.get(cfg.get("model_type"))
        if hf_class not in SUPPORTED:
            shown = hf_class or cfg.get("model_type") or "none given"
            raise EdgeRtError(f"{path}: architecture {shown} is not supported "
                              f"(supported: {', '.join(SUPPORTED)})")
        if cfg.get("quantization_config"):
            q = cfg["quantization_config"]
            method = q.get("quant_method", "?") if isinstance(q, dict) else "?"
            raise EdgeRtError(f"{path}: pre-quantized checkpoint (quantization_config: {method}); "
                              f"use the float16/bfloat16/float32 original")
        self.hf_class = hf_class
        self.arch = SUPPORTED[hf_class][0]
        self.cfg = {**_DEFAULTS[self.arch], **{k: v for k, v in cfg.items() if v is not None}}
        self.raw = cfg

    def get(self, key, default=None):
        return self.cfg.get(key, default)

    def int(self, key: str, default: int | None = None) -> int:
        v = self.cfg.get(key, default)
        if v is None:
            raise EdgeRtError(f"{self.path}: missing {key}")
        if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
            raise EdgeRtError(f"{self.path}: {key} must be a positive integer, not {v!r}")
        return v

    def float(self, key: str) -> float:
        v = self.cfg.get(key)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise EdgeRtError(f"{self.path}: {key} must be a number, not {v!r}")
        return float(v)


class _Dims:
    def __init__(self, c: _Config):
        self.n_layer = c.int("num_hidden_layers")
        self.hidden = c.int("hidden_size")
        self.ff = c.int("intermediate_size")
        self.vocab = c.int("vocab_size")
        self.n_head = c.int("num_attention_heads")
        self.n_kv = c.int("num_key_value_heads", self.n_head)
        if "head_dim" in c.cfg:
            self.head_dim = c.int("head_dim")
        elif self.hidden % self.n_head:
            raise EdgeRtError(f"{c.path}: hidden_size {self.hidden} is not a multiple of "
                              f"num_attention_heads {self.n_head}, and no head_dim is given")
        else:
            self.head_dim = self.hidden // self.n_head
        if self.n_head % self.n_kv:
            raise EdgeRtError(f"{c.path}: num_attention_heads {self.n_head} is not a multiple of "
                              f"num_key_value_heads {self.n_kv}")
        if self.head_dim % 2:
            raise EdgeRtError(f"{c.path}: head dimension {self.head_dim} is odd")
        tied = c.get("tie_word_embeddings")
        if not isinstance(tied, bool):
            raise EdgeRtError(f"{c.path}: tie_word_embeddings must be true or false, not {tied!r}")
        self.tied = tied
        self.attn_bias = c.arch == "qwen2" or c.get("attention_bias") is True
        if c.arch == "llama" and c.get("mlp_bias") is True:
            raise EdgeRtError(f"{c.path}: mlp_bias = true is not supported")


def _rope_params(c: _Config) -> dict:
    """rope_scaling / rope_parameters (transformers 5), as convert_hf_to_gguf.py reads them."""
    p = c.raw.get("rope_parameters", c.raw.get("rope_scaling")) or {}
    if not isinstance(p, dict):
        raise EdgeRtError(f"{c.path}: rope_scaling must be an object, not {p!r}")
    p = dict(p.get("full_attention", p))
    if "rope_type" not in p and "type" in p:
        p["rope_type"] = p["type"]
    p.setdefault("rope_theta", c.get("rope_theta"))
    if "original_max_position_embeddings" not in p and "original_max_position_embeddings" in c.cfg:
        p["original_max_position_embeddings"] = c.cfg["original_max_position_embeddings"]
    return p


def _hparams_meta(c: _Config, d: _Dims) -> dict[str, Any]:
    a = c.arch
    m: dict[str, Any] = {"general.architecture": a, "general.type": "model"}
    if isinstance(c.raw.get("_name_or_path"), str) and c.raw["_name_or_path"]:
        m["general.name"] = c.raw["_name_or_path"].rstrip("/").split("/")[-1]
    m[f"{a}.block_count"] = d.n_layer
    m[f"{a}.context_length"] = c.int("max_position_embeddings")
    m[f"{a}.embedding_length"] = d.hidden
    m[f"{a}.feed_forward_length"] = d.ff
    m[f"{a}.attention.head_count"] = d.n_head
    m[f"{a}.attention.head_count_kv"] = d.n_kv
    rope = _rope_params(c)
    rope_type = rope.get("rope_type")
    if rope_type in (None, "default"):
        pass
    elif rope_type == "linear":
        m[f"{a}.rope.scaling.type"] = "linear"
        m[f"{a}.rope.scaling.factor"] = _f32(_num(c, rope, "factor"))
    elif rope_type == "yarn":
        m[f"{a}.rope.scaling.type"] = "yarn"
        m[f"{a}.rope.scaling.factor"] = _f32(_num(c, rope, "factor"))
        m[f"{a}.rope.scaling.original_context_length"] = int(_num(c, rope, "original_max_position_embeddings"))
        for hf_key, key in (("extrapolation_factor", Keys.Rope.SCALING_YARN_EXT_FACTOR),
                            ("attention_factor", Keys.Rope.SCALING_YARN_ATTN_FACTOR),
                            ("attn_factor", Keys.Rope.SCALING_YARN_ATTN_FACTOR),
                            ("beta_fast", Keys.Rope.SCALING_YARN_BETA_FAST),
                            ("beta_slow", Keys.Rope.SCALING_YARN_BETA_SLOW)):
            if rope.get(hf_key) is not None and key.format(arch=a) not in m:
                m[key.format(arch=a)] = _f32(_num(c, rope, hf_key))
    elif rope_type == "llama3" and a == "llama":
        pass  # becomes the rope_freqs.weight tensor
    else:
        raise EdgeRtError(f"{c.path}: rope scaling type {rope_type!r} is not supported for {c.hf_class} "
                          f"(supported: linear, yarn" + (", llama3)" if a == "llama" else ")"))
    m[f"{a}.rope.freq_base"] = _f32(rope["rope_theta"] if rope.get("rope_theta") is not None
                                    else c.float("rope_theta"))
    m[f"{a}.attention.layer_norm_rms_epsilon"] = _f32(c.float("rms_norm_eps"))
    if "head_dim" in c.raw or a == "gemma3":
        m[f"{a}.attention.key_length"] = d.head_dim
        m[f"{a}.attention.value_length"] = d.head_dim
    if a == "llama":
        m[f"{a}.vocab_size"] = d.vocab
        m[f"{a}.rope.dimension_count"] = d.head_dim
    if a == "gemma3":
        local = c.raw.get("rope_parameters", {}) or {}
        local = local.get("sliding_attention", {}).get("rope_theta") if isinstance(local, dict) else None
        m[f"{a}.rope.freq_base_swa"] = _f32(local if local is not None else c.float("rope_local_base_freq"))
        if c.raw.get("attn_logit_softcapping") is not None:
            raise EdgeRtError(f"{c.path}: attn_logit_softcapping is not used by Gemma 3")
        if c.raw.get("final_logit_softcapping"):
            m[f"{a}.final_logit_softcapping"] = _f32(c.float("final_logit_softcapping"))
        if c.raw.get("sliding_window_pattern") != 1:
            m[f"{a}.attention.sliding_window"] = c.int("sliding_window")
    return m


def _num(c: _Config, d: dict, key: str) -> float:
    v = d.get(key)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise EdgeRtError(f"{c.path}: rope scaling {key} must be a number, not {v!r}")
    return v


def _llama3_rope_factors(c: _Config, d: _Dims) -> np.ndarray:
    """LlamaModel.generate_extra_tensors, in float32 as torch computes it."""
    p = _rope_params(c)
    base = float(p.get("rope_theta") or c.float("rope_theta"))
    dim = d.head_dim
    freqs = np.float32(1.0) / (np.float32(base) ** (np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim)))
    factor = float(p.get("factor", 8.0))
    low, high = float(p.get("low_freq_factor", 1.0)), float(p.get("high_freq_factor", 4.0))
    old_ctx = float(p.get("original_max_position_embeddings", 8192))
    low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
    out = []
    for freq in freqs:
        wavelen = np.float32(2 * math.pi) / freq
        if wavelen < high_wavelen:
            out.append(1.0)
        elif wavelen > low_wavelen:
            out.append(factor)
        else:
            smooth = (np.float32(old_ctx) / wavelen - np.float32(low)) / np.float32(high - low)
            out.append(np.float32(1) / ((np.float32(1) - smooth) / np.float32(factor) + smooth))
    return np.array(out, dtype=np.float32)


# --- tensors --------------------------------------------------------------------------
def permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """HF q/k rows -> llama.cpp's rope layout (LlamaModel.permute): within each head, the
    two halves of the rows are interleaved."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _expected(c: _Config, d: _Dims) -> dict[str, tuple[str, tuple[int, ...]]]:
    """HF name -> (GGUF name, HF shape) of every tensor the model must have."""
    q, kv, h = d.n_head * d.head_dim, d.n_kv * d.head_dim, d.hidden
    shapes = {
        "input_layernorm.weight": (h,), "post_attention_layernorm.weight": (h,),
        "pre_feedforward_layernorm.weight": (h,), "post_feedforward_layernorm.weight": (h,),
        "self_attn.q_proj.weight": (q, h), "self_attn.k_proj.weight": (kv, h),
        "self_attn.v_proj.weight": (kv, h), "self_attn.o_proj.weight": (h, q),
        "self_attn.q_proj.bias": (q,), "self_attn.k_proj.bias": (kv,), "self_attn.v_proj.bias": (kv,),
        "self_attn.o_proj.bias": (h,),
        "self_attn.q_norm.weight": (d.head_dim,), "self_attn.k_norm.weight": (d.head_dim,),
        "mlp.gate_proj.weight": (d.ff, h), "mlp.up_proj.weight": (d.ff, h), "mlp.down_proj.weight": (h, d.ff),
    }
    layer = {**_LAYER, **_LAYER_ARCH[c.arch]}
    if c.arch == "llama" and d.attn_bias:
        layer.update(_BIAS, **{"self_attn.o_proj.bias": "attn_output.bias"})
    out = {}
    for i in range(d.n_layer):
        for hf, gg in layer.items():
            out[f"model.layers.{i}.{hf}"] = (f"blk.{i}.{gg}", shapes[hf])
    out["model.embed_tokens.weight"] = ("token_embd.weight", (d.vocab, h))
    out["model.norm.weight"] = ("output_norm.weight", (h,))
    if not d.tied:
        out["lm_head.weight"] = ("output.weight", (d.vocab, h))
    return out


def _loader(shard: _Shard, hf_name: str, arch: str, d: _Dims, n_rows: int | None):
    def load() -> np.ndarray:
        w = shard.load(hf_name)
        if arch == "llama":
            if hf_name.endswith(("q_proj.weight", "q_proj.bias")):
                w = permute(w, d.n_head)
            elif hf_name.endswith(("k_proj.weight", "k_proj.bias")):
                w = permute(w, d.n_kv)
        elif arch == "gemma3" and hf_name.endswith("norm.weight"):
            w = w + np.float32(1.0)  # Gemma3RMSNorm scales by (1 + weight)
        if n_rows is not None:
            w = w[:n_rows]
        return np.ascontiguousarray(w, dtype=np.float32)
    return load


def read_hf_folder(path) -> tuple[dict[str, Any], LazyTensors]:
    """A Hugging Face folder -> (GGUF metadata, GGUF-named float32 tensors read on demand)."""
    folder = Path(path)
    if not folder.is_dir():
        raise EdgeRtError(f"{folder}: no such folder" if not folder.exists() else f"{folder}: not a folder")
    if not (folder / "config.json").is_file():
        raise EdgeRtError(f"{folder}: no config.json (not a Hugging Face model folder?)")
    c = _Config(folder / "config.json")
    d = _Dims(c)
    meta = _hparams_meta(c, d)
    where = _open_weights(folder)
    expected = _expected(c, d)

    for name in where:
        if name not in expected and not name.endswith(_SKIPPED) and not (name == "lm_head.weight" and d.tied):
            raise EdgeRtError(f"{folder}: unexpected tensor {name} for {c.hf_class} "
                              f"with {d.n_layer} layers")
    missing = [n for n in expected if n not in where]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise EdgeRtError(f"{folder}: missing tensor {missing[0]}{more}")
    for hf_name, (_, shape) in expected.items():
        shard = where[hf_name]
        got = shard.shape(hf_name)
        if got != shape:
            raise EdgeRtError(f"{shard.path}: tensor {hf_name} has shape {list(got)}, "
                              f"config.json implies {list(shape)}")
        if shard.dtype(hf_name) not in _ST_DTYPES:
            raise EdgeRtError(f"{shard.path}: tensor {hf_name} is {shard.dtype(hf_name)}; "
                              f"only F32, F16 and BF16 weights are supported")

    tok_meta, n_rows = _tokenizer_meta(folder, c, d)
    meta.update(tok_meta)

    items: dict[str, tuple[tuple[int, ...], Callable[[], np.ndarray]]] = {}
    for hf_name, (gguf_name, shape) in expected.items():
        rows = None
        if hf_name == "model.embed_tokens.weight" and n_rows < shape[0]:
            rows, shape = n_rows, (n_rows, *shape[1:])  # Gemma3Model drops OOV rows
        items[gguf_name] = (shape, _loader(where[hf_name], hf_name, c.arch, d, rows))
    if c.arch == "llama" and _rope_params(c).get("rope_type") == "llama3":
        factors = _llama3_rope_factors(c, d)
        items["rope_freqs.weight"] = (factors.shape, factors.copy)
    return meta, LazyTensors(items)


# --- tokenizer ------------------------------------------------------------------------
# config.json's {typ}_token_id -> GGUF key (gguf.Keys.Tokenizer)
_SPECIAL = {"bos": Keys.Tokenizer.BOS_ID, "eos": Keys.Tokenizer.EOS_ID, "unk": Keys.Tokenizer.UNK_ID,
            "sep": Keys.Tokenizer.SEP_ID, "pad": Keys.Tokenizer.PAD_ID, "mask": Keys.Tokenizer.MASK_ID}


def _tokenizer_meta(folder: Path, c: _Config, d: _Dims) -> tuple[dict[str, Any], int]:
    """The tokenizer.ggml.* keys, and the number of embedding rows to keep (vocab_size, or
    for Gemma 3 the tokenizer's size if smaller); the token list is padded to that."""
    from edge_rt.tokenizer import Tokenizer

    tj_path = folder / "tokenizer.json"
    if not tj_path.is_file():
        extra = " (a tokenizer.model alone is not supported)" if (folder / "tokenizer.model").is_file() else ""
        raise EdgeRtError(f"{folder}: no tokenizer.json{extra}")
    text = _read_text(tj_path)
    tcfg_path = folder / "tokenizer_config.json"
    tcfg = _read_json(tcfg_path) if tcfg_path.is_file() else None
    jinja = folder / "chat_template.jinja"
    if jinja.is_file() and not (tcfg and tcfg.get("chat_template")):
        tcfg = {**(tcfg or {}), "chat_template": _read_text(jinja)}
    try:
        tok = Tokenizer.from_hf_json(text, tcfg)
        meta = dict(tok.gguf_meta())
    except EdgeRtError:
        raise
    except Exception as e:  # a malformed tokenizer.json, however it shows
        raise EdgeRtError(f"{tj_path}: cannot read the tokenizer ({type(e).__name__}: {e})") from None

    n_rows = d.vocab  # embedding rows
    if c.arch == "gemma3":  # Gemma3Model.modify_tensors drops embedding rows past the tokenizer's
        try:
            tj = json.loads(text)
            n_rows = min(n_rows, len(tj["model"]["vocab"]) + len(tj["added_tokens"]))
        except (KeyError, TypeError, ValueError):
            pass
    tokens = list(meta.get("tokenizer.ggml.tokens", []))
    if len(tokens) > n_rows:
        raise EdgeRtError(f"{tj_path}: {len(tokens)} tokens, but the embedding has {n_rows} rows "
                          f"(vocab_size in config.json)")
    if len(tokens) < n_rows:  # get_vocab_base pads the list up to vocab_size with unused tokens
        n_pad = n_rows - len(tokens)
        meta["tokenizer.ggml.tokens"] = tokens + [f"[PAD{i}]" for i in range(len(tokens), n_rows)]
        if "tokenizer.ggml.token_type" in meta:
            meta["tokenizer.ggml.token_type"] = np.concatenate(
                [np.asarray(meta["tokenizer.ggml.token_type"], dtype=np.int32), np.full(n_pad, 5, np.int32)])
        if "tokenizer.ggml.scores" in meta:
            meta["tokenizer.ggml.scores"] = np.concatenate(
                [np.asarray(meta["tokenizer.ggml.scores"], dtype=np.float32), np.full(n_pad, -1000.0, np.float32)])
    # SpecialVocab fills the special ids tokenizer.json/tokenizer_config.json left out from config.json
    for typ, key in _SPECIAL.items():
        tid = c.raw.get(f"{typ}_token_id")
        if key not in meta and isinstance(tid, int) and not isinstance(tid, bool) and 0 <= tid < d.vocab:
            meta[key] = tid
    if c.arch == "llama" and tcfg and isinstance(tcfg.get("add_prefix_space"), bool):
        meta[Keys.Tokenizer.ADD_PREFIX] = tcfg["add_prefix_space"]  # LlamaModel.set_vocab, any model
    if c.arch == "gemma3" and meta.get("tokenizer.ggml.model") == "llama":
        meta[Keys.Tokenizer.ADD_PREFIX] = False  # Gemma3Model.set_vocab
    if c.arch == "llama" and d.vocab == 49152:  # LlamaModel.set_vocab: granite-small (and SmolLM) vocab
        meta["tokenizer.ggml.add_bos_token"] = False

    return meta, n_rows


# --- writing (the inverse, for tests) ---------------------------------------------------
def _hf_config(meta: Mapping[str, Any], tensors: Mapping, extra: dict | None) -> dict[str, Any]:
    a = meta.get("general.architecture")
    if a not in _HF_CLASS:
        raise EdgeRtError(f"architecture {a} cannot be written as a Hugging Face folder "
                          f"(supported: {', '.join(_HF_CLASS)})")
    hf_class = _HF_CLASS[a]

    def get(key, default=None):
        return meta.get(f"{a}.{key}", default)

    vocab, hidden = _shape_of(tensors, "token_embd.weight")
    n_head = int(get("attention.head_count"))
    cfg: dict[str, Any] = {
        "architectures": [hf_class], "model_type": SUPPORTED[hf_class][1],
        "hidden_size": int(get("embedding_length")), "intermediate_size": int(get("feed_forward_length")),
        "num_hidden_layers": int(get("block_count")), "num_attention_heads": n_head,
        "num_key_value_heads": int(get("attention.head_count_kv", n_head)),
        "max_position_embeddings": int(get("context_length")),
        "rms_norm_eps": _short(get("attention.layer_norm_rms_epsilon")),
        "rope_theta": _short(get("rope.freq_base", _DEFAULTS[a]["rope_theta"])),
        "vocab_size": int(meta.get(f"{a}.vocab_size", vocab)),
        "tie_word_embeddings": "output.weight" not in tensors,
        "torch_dtype": "float32",
    }
    if get("attention.key_length") is not None:
        cfg["head_dim"] = int(get("attention.key_length"))
    scaling = get("rope.scaling.type")
    if scaling == "linear":
        cfg["rope_scaling"] = {"rope_type": "linear", "factor": _short(get("rope.scaling.factor"))}
    elif scaling == "yarn":
        cfg["rope_scaling"] = {"rope_type": "yarn", "factor": _short(get("rope.scaling.factor")),
                               "original_max_position_embeddings": int(get("rope.scaling.original_context_length"))}
        for hf_key, key in (("extrapolation_factor", "rope.scaling.yarn_ext_factor"),
                            ("attention_factor", "rope.scaling.yarn_attn_factor"),
                            ("beta_fast", "rope.scaling.yarn_beta_fast"),
                            ("beta_slow", "rope.scaling.yarn_beta_slow")):
            if get(key) is not None:
                cfg["rope_scaling"][hf_key] = _short(get(key))
    elif scaling not in (None, "none"):
        raise EdgeRtError(f"rope scaling type {scaling!r} cannot be written")
    if a == "qwen2":
        cfg["use_sliding_window"] = False
    if a == "gemma3":
        head_dim = cfg.setdefault("head_dim", 256)
        cfg.update({"query_pre_attn_scalar": head_dim, "hidden_activation": "gelu_pytorch_tanh",
                    "rope_local_base_freq": _short(get("rope.freq_base_swa", 10000.0)),
                    "final_logit_softcapping": get("final_logit_softcapping"),
                    "attn_logit_softcapping": None})
        if get("attention.sliding_window") is not None:
            cfg["sliding_window"] = int(get("attention.sliding_window"))
            cfg["sliding_window_pattern"] = 6
        else:
            cfg["sliding_window_pattern"] = 1
    for typ in ("bos", "eos", "pad"):
        if meta.get(_SPECIAL[typ]) is not None:
            cfg[f"{typ}_token_id"] = int(meta[_SPECIAL[typ]])
    cfg.update(extra or {})
    return cfg


def write_hf_folder(meta: Mapping[str, Any], tensors: Mapping[str, np.ndarray], out_dir, *,
                    dtype: str = "float32", max_shard_bytes: int | None = None,
                    extra_config: dict | None = None) -> Path:
    """The common form -> a Hugging Face folder (model.safetensors or shards + index,
    config.json, tokenizer.json, tokenizer_config.json, generation_config.json).
    dtype: float32, float16 or bfloat16 (rounded to nearest even). extra_config is merged
    into config.json (e.g. a llama3 rope_scaling, which a GGUF keeps only as rope_freqs)."""
    from edge_rt.tokenizer import Tokenizer

    hf_dtype = {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}.get(dtype)
    if hf_dtype is None:
        raise EdgeRtError(f"dtype {dtype!r}: use float32, float16 or bfloat16")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg = _hf_config(meta, tensors, extra_config)
    cfg["torch_dtype"] = dtype
    a = meta["general.architecture"]
    n_head, n_kv = cfg["num_attention_heads"], cfg["num_key_value_heads"]

    inverse = {v: k for k, v in _GLOBAL.items()}
    layer = {v: k for k, v in {**_LAYER, **_BIAS, **_LAYER_ARCH[a],
                               "self_attn.o_proj.bias": "attn_output.bias"}.items()}
    if "rope_freqs.weight" in tensors and "rope_scaling" not in (extra_config or {}):
        raise EdgeRtError("rope_freqs.weight comes from a llama3 rope_scaling, which the metadata "
                          "does not keep: pass it in extra_config")
    to_hf: dict[str, str] = {}
    for name in tensors:
        if name == "rope_freqs.weight":
            continue  # generated from rope_scaling on reading
        if name in inverse:
            to_hf[inverse[name]] = name
            continue
        parts = name.split(".", 2)
        if len(parts) != 3 or parts[0] != "blk" or not parts[1].isdigit() or parts[2] not in layer:
            raise EdgeRtError(f"tensor {name} has no Hugging Face name for {a}")
        to_hf[f"model.layers.{parts[1]}.{layer[parts[2]]}"] = name

    def get(hf_name: str) -> np.ndarray:
        w = np.asarray(tensors[to_hf[hf_name]], dtype=np.float32)
        if a == "llama":
            if hf_name.endswith(("q_proj.weight", "q_proj.bias")):
                w = unpermute(w, n_head)
            elif hf_name.endswith(("k_proj.weight", "k_proj.bias")):
                w = unpermute(w, n_kv)
        elif a == "gemma3" and hf_name.endswith("norm.weight"):
            w = w - np.float32(1.0)
        return w

    names = list(to_hf)
    view = LazyTensors({hf: (_shape_of(tensors, gg), None) for hf, gg in to_hf.items()})
    itemsize = 4 if hf_dtype == "F32" else 2
    groups: list[list[str]] = [[]]
    size = 0
    for n in names:
        nb = math.prod(view.shape(n)) * itemsize
        if max_shard_bytes and groups[-1] and size + nb > max_shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append(n)
        size += nb
    if len(groups) == 1:
        _write_safetensors(out / "model.safetensors", view, names, hf_dtype, get)
    else:
        weight_map, total = {}, 0
        for i, group in enumerate(groups):
            fname = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
            total += _write_safetensors(out / fname, view, group, hf_dtype, get)
            weight_map.update({n: fname for n in group})
        _dump(out / "model.safetensors.index.json", {"metadata": {"total_size": total}, "weight_map": weight_map})
    _dump(out / "config.json", cfg)

    tok = Tokenizer.from_gguf_meta(dict(meta))
    (out / "tokenizer.json").write_text(tok.hf.to_str(), encoding="utf-8")
    tokens = meta.get("tokenizer.ggml.tokens", [])
    tcfg: dict[str, Any] = {"tokenizer_class": "PreTrainedTokenizerFast",
                            "model_max_length": cfg["max_position_embeddings"]}
    for typ in ("bos", "eos", "unk", "pad"):
        tid = meta.get(_SPECIAL[typ])
        if tid is not None and 0 <= int(tid) < len(tokens):
            tcfg[f"{typ}_token"] = tokens[int(tid)]
    for key, hf_key in (("add_bos_token", "add_bos_token"), ("add_eos_token", "add_eos_token"),
                        ("add_space_prefix", "add_prefix_space")):
        if meta.get(f"tokenizer.ggml.{key}") is not None:
            tcfg[hf_key] = bool(meta[f"tokenizer.ggml.{key}"])
    if meta.get("tokenizer.chat_template"):
        tcfg["chat_template"] = meta["tokenizer.chat_template"]
    _dump(out / "tokenizer_config.json", tcfg)
    gen = {k: cfg[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if k in cfg}
    _dump(out / "generation_config.json", gen)
    return out


def _dump(path: Path, value: dict) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(value, f, indent=2, ensure_ascii=False)
        f.write("\n")
