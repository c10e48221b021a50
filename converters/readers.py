"""Sources a convert starts from, as one common form: GGUF metadata (key -> value),
GGUF tensor names, and each tensor as float32 on demand."""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from edge_rt.errors import EdgeRtError
from edge_rt.gguf_file import GGUFFile


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
    g = GGUFFile(path)
    if "edgert.format_version" in g.meta:
        raise EdgeRtError(f"{path}: already an edge-rt file; convert from the model it was made from")
    order = sorted(g.tensors.values(), key=lambda t: t.offset)
    return Source(path, dict(g.meta), {t.name: t.shape for t in order}, g.dequantize, sha256_files([path]), dict(g.types))
