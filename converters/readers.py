"""Sources a convert starts from, as one common form: GGUF metadata (key -> value),
GGUF tensor names, and each tensor as float32 on demand."""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from gguf import GGMLQuantizationType as T

from edge_rt.errors import EdgeRtError
from edge_rt.gguf_file import GGUFFile, os_message, short


@dataclass
class Source:
    path: Path
    meta: dict
    shapes: dict[str, tuple[int, ...]]  # numpy shape of every tensor, in file order
    load: Callable[[str], np.ndarray]   # name -> float32 array
    sha256: str
    types: dict = field(default_factory=dict)  # GGUF value types of meta keys, where known


def sha256_files(paths) -> str:
    h = hashlib.sha256()
    for p in paths:
        with open(p, "rb") as f:
            while chunk := f.read(1 << 22):
                h.update(chunk)
    return h.hexdigest()


PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
# ggml types gguf-py turns into float32 (the integer and F64 types are not weights)
DEQUANTIZABLE = {T.F32, T.F16, T.BF16, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0, T.Q2_K, T.Q3_K, T.Q4_K, T.Q5_K,
                 T.Q6_K, T.IQ2_XXS, T.IQ2_XS, T.IQ2_S, T.IQ3_XXS, T.IQ3_S, T.IQ1_S, T.IQ1_M, T.IQ4_NL,
                 T.IQ4_XS, T.TQ1_0, T.TQ2_0}


def refuse_pickle(path: Path) -> None:
    """PyTorch checkpoints are pickles, which run code when loaded: never opened."""
    head = b""
    if path.is_file():  # opening a FIFO would wait for a writer; GGUFFile refuses non-files
        try:
            with open(path, "rb") as f:
                head = f.read(4)
        except OSError as e:
            raise EdgeRtError(f"{short(path)}: {os_message(e)}") from None
    if path.suffix.lower() in PICKLE_SUFFIXES or head.startswith((b"PK\x03\x04", b"\x80")):
        raise EdgeRtError(f"{path}: looks like a PyTorch checkpoint (a pickle, which can run code); "
                          f"edge-rt reads GGUF or safetensors: save the model with safetensors")


def open_source(path: str | Path) -> Source:
    """A GGUF file of any ggml type (dequantized to float32), or a Hugging Face folder."""
    path = Path(path)
    if path.is_dir():
        from .hf import read_hf_folder  # noqa: PLC0415 (only HF sources need safetensors)
        meta, tensors = read_hf_folder(path)
        files = sorted(p for p in path.iterdir() if p.suffix in (".json", ".safetensors"))
        return Source(path, meta, {k: tensors.shape(k) for k in tensors.keys()}, tensors.__getitem__, sha256_files(files))
    if not path.exists():
        raise EdgeRtError(f"{path}: no such file or folder")
    refuse_pickle(path)
    g = GGUFFile(path)
    if "edgert.format_version" in g.meta:
        raise EdgeRtError(f"{path}: already an edge-rt file; convert from the model it was made from")
    order = sorted(g.tensors.values(), key=lambda t: t.offset)
    for t in order:
        if t.ggml_type not in DEQUANTIZABLE:
            raise EdgeRtError(f"{path}: tensor {t.name} is {t.type_name}, which edge-rt cannot convert from")
    return Source(path, dict(g.meta), {t.name: t.shape for t in order}, g.dequantize, sha256_files([path]), dict(g.types))
