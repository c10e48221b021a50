"""Tensors of an open GGUF file, seen by the forward pass through three calls:
`linear(name, x)`, `vec(name)` and `embed(tokens)`.

`Weights` multiplies with the C kernels over the mmapped file (no copies);
`ReferenceWeights` dequantizes to float32 and multiplies in numpy: the test oracle."""
from __future__ import annotations

import numpy as np
from gguf import GGMLQuantizationType as T

from . import formats, kernels
from .errors import EdgeRtError
from .gguf_file import GGUFFile

FMT_KEY = "edgert.format."  # + tensor name -> "q4:64": a group-quantized tensor of ours


def tensor_format(g: GGUFFile, name: str, array=None):
    """(format, parts, rows, cols) of a 2-D weight the kernels can multiply by; its
    arrays from array(name) (default: views of the file's mmap)."""
    array = array or g.array
    spec = g.meta.get(FMT_KEY + name)
    t = g.tensors[name]
    if spec is not None:
        try:
            kind, group = str(spec).split(":")
            fmt = formats.by_name(kind, int(group))
            codes = array(name).view(np.uint8)
            parts = {"codes": codes, "scale": array(name + ".scale"), "min": array(name + ".min")}
        except (ValueError, KeyError) as e:  # a hostile or damaged file: name what is wrong
            raise EdgeRtError(f"{g.path}: tensor {name} ({FMT_KEY}{name} = {str(spec)[:40]!r}) is not a valid "
                              f"group-quantized tensor: {e}") from None
        return fmt, parts, codes.shape[0], codes.shape[1] * 8 // fmt.bits
    if t.ggml_type in (T.F32, T.F16) and len(t.shape) == 2:
        fmt = formats.F32() if t.ggml_type == T.F32 else formats.F16()
        return fmt, {"": array(name)}, t.shape[0], t.shape[1]
    raise EdgeRtError(f"{g.path}: tensor {name} is {t.type_name}, which edge-rt does not run directly; "
                      f"convert the file first: edge-rt convert {g.path} -o OUT --bits 4")


def is_matrix(g: GGUFFile, name: str) -> bool:
    return not name.endswith((".scale", ".min")) and (FMT_KEY + name in g.meta or len(g.tensors[name].shape) == 2)


class ReferenceWeights:
    """Float32 weights (any ggml type or ours, dequantized), numpy products. With
    same_arithmetic, products of our formats follow the kernels' integer arithmetic
    (formats.matmul_reference), so the C path can be checked tightly."""

    def __init__(self, g: GGUFFile, same_arithmetic: bool = False):
        self.g, self._cache, self.same_arithmetic = g, {}, same_arithmetic

    def has(self, name: str) -> bool:
        return name in self.g.tensors

    def matrix(self, name: str) -> np.ndarray:
        if name not in self._cache:
            if FMT_KEY + name in self.g.meta:
                fmt, parts, rows, cols = tensor_format(self.g, name)
                self._cache[name] = fmt.dequantize(parts, cols)
            else:
                self._cache[name] = self.g.dequantize(name)
        return self._cache[name]

    def vec(self, name: str) -> np.ndarray:
        return self.matrix(name)

    def linear(self, name: str, x: np.ndarray) -> np.ndarray:
        if self.same_arithmetic and FMT_KEY + name in self.g.meta:
            fmt, parts, rows, cols = tensor_format(self.g, name)
            return formats.matmul_reference(fmt, parts, cols, x)
        return x @ self.matrix(name).T

    def embed(self, tokens) -> np.ndarray:
        return self.matrix("token_embd.weight")[np.asarray(tokens)]

    def begin_layer(self, i: int) -> None:
        """Every tensor is resident: nothing to read."""


class Weights:
    """The runtime's weights: views of the mapped file (or of the arrays array(name)
    gives: flash.StreamedWeights), multiplied by the C kernels."""

    streamed = 0  # layers 0..streamed-1 are read from storage by begin_layer (flash.StreamedWeights)
    check_seconds = 0.0  # spent checking streamed bytes' checksums (flash.StreamedWeights)
    wait_seconds = 0.0   # the forward pass spent waiting for streamed bytes (flash.StreamedWeights)
    layer_uses = layer_hits = 0  # uses of streamed layers; of those, served by the pool without a read

    def __init__(self, g: GGUFFile, threads: int = 1, array=None):
        self.g, self.threads = g, threads
        array = array or g.array
        self.matrices = {}
        for name in g.tensors:
            if is_matrix(g, name):
                fmt, parts, rows, cols = tensor_format(g, name, array)
                try:
                    self.matrices[name] = kernels.Weight(fmt, rows, cols, parts)
                except (ValueError, TypeError, kernels.KernelError) as e:  # parts that do not fit together
                    raise EdgeRtError(f"{g.path}: tensor {name}: {e}") from None
        self.vectors = {}
        for name, t in g.tensors.items():
            if name in self.matrices or name.endswith((".scale", ".min")):
                continue
            if t.ggml_type not in (T.F32, T.F16):
                raise EdgeRtError(f"{g.path}: tensor {name} is {t.type_name}; norms, biases and factors must be F32 or F16")
            self.vectors[name] = array(name)

    def has(self, name: str) -> bool:
        return name in self.matrices or name in self.vectors

    def vec(self, name: str) -> np.ndarray:
        return self.vectors[name]

    def begin_layer(self, i: int) -> None:
        """Layer i is about to run: its matrices must point at resident bytes. Here they
        always do (the mapped file, made resident by populate)."""

    def linear(self, name: str, x: np.ndarray) -> np.ndarray:
        return kernels.matmul(self.matrices[name], x, self.threads)

    def embed(self, tokens) -> np.ndarray:
        return kernels.dequantize_rows(self.matrices["token_embd.weight"], np.asarray(tokens))

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {n: (w.rows, w.cols) for n, w in self.matrices.items()} | {n: v.shape for n, v in self.vectors.items()}

    def kernel(self) -> str:
        """The kernels dispatched for the model's matrices, e.g. 'q4:avx2'."""
        return ",".join(sorted({kernels.kernel_name(w.fmt.id) for w in self.matrices.values()}))

    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.g.tensors.values())
