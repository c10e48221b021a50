"""Writers: our GGUF (group-quantized tensors as codes + scale + min) and llama.cpp's
own ggml types. Both stream one tensor at a time into a temporary file, then rename."""
from __future__ import annotations

import struct
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType, GGUFWriter
from gguf.quants import quantize as ggml_quantize
from tqdm import tqdm

from edge_rt import __version__, formats
from edge_rt.atomic import atomic_output
from edge_rt.gguf_file import GGUFFile
from edge_rt.verify import CHECKSUM_KEY, crc32
from edge_rt.weights import FMT_KEY

from .quantize import LLAMA_CPP_TYPES, is_weight_matrix
from .readers import Source

ALIGNMENT = 64  # bytes; every tensor starts on a cache line, so mapped data needs no copy
SKIP_KEYS = ("GGUF.", "general.architecture", "general.alignment", "general.file_type",
             "general.quantization_version", "edgert.")
LLAMA_FILE_TYPES = {"F32": 0, "F16": 1, "Q4_0": 2, "Q8_0": 7}  # llama.cpp's LLAMA_FTYPE_*


@dataclass
class Item:
    """One source tensor: the GGUF tensors it becomes, and how to make their data."""
    infos: list[tuple[str, tuple, np.dtype, GGMLQuantizationType | None, int]]  # name, shape, dtype, raw type, bytes
    produce: Callable[[], list[np.ndarray]]


def _value_type(val) -> GGUFValueType:
    """GGUF's conventions for values whose type is not known: ints are u32 (as every
    hyper-parameter llama.cpp reads), floats f32."""
    if isinstance(val, bool):
        return GGUFValueType.BOOL
    if isinstance(val, int):
        return GGUFValueType.UINT32 if 0 <= val < 2**32 else GGUFValueType.INT64
    if isinstance(val, float):
        return GGUFValueType.FLOAT32
    return GGUFValueType.get_type(val)


def _add_meta(w: GGUFWriter, meta: dict) -> None:
    for key, (val, vtype, sub) in meta.items():
        w.add_key_value(key, val, vtype, sub)


def typed_meta(meta: dict, types: dict, skip: tuple = SKIP_KEYS) -> dict:
    """key -> (value, value type, element type) for the keys a converted file keeps."""
    out = {}
    for key, val in meta.items():
        if key.startswith(skip):
            continue
        if isinstance(val, np.ndarray):
            val = val.tolist()
        vtype, etype = types.get(key, (None, None))
        vtype = GGUFValueType(vtype) if vtype is not None else _value_type(val)
        sub = None
        if vtype == GGUFValueType.ARRAY:
            sub = GGUFValueType(etype) if etype is not None else _value_type(val[0]) if val else None
        out[key] = (val, vtype, sub)
    return out


def write_gguf(out, src: Source, items: list[Item], extra: dict, progress: bool | None = None,
               alignment: int | None = ALIGNMENT) -> None:
    """alignment None: GGUF's default (32) and no general.alignment key, as llama.cpp's
    own tools write and expect (llama-quantize copies the key but lays data out at 32).
    Every tensor's CRC-32 goes in `edgert.checksum.<name>`: written as 0 in the header,
    computed while the data streams out, patched in before the rename."""
    checksums = {}
    with atomic_output(out) as tmp:
        w = _write_header(tmp, src, items, extra, alignment)
        for item in tqdm(items, desc="convert", unit="tensor", disable=None if progress is None else not progress):
            for (name, *_), arr in zip(item.infos, item.produce()):
                arr = np.ascontiguousarray(arr)
                checksums[CHECKSUM_KEY + name] = crc32(arr)
                w.write_tensor_data(arr)
        w.close()
        _patch_u32(tmp, checksums)


def _patch_u32(path, values: dict[str, int]) -> None:
    """Overwrite the values of uint32 metadata keys in place."""
    offsets = GGUFFile(path).value_offsets
    with open(path, "r+b") as f:
        for key, val in values.items():
            f.seek(offsets[key] + 4)  # past the value type
            f.write(struct.pack("<I", val))


def _write_header(path, src: Source, items: list[Item], extra: dict, alignment: int | None) -> GGUFWriter:
    """Metadata (with a 0 for every tensor's CRC-32, patched in once known) and tensor infos."""
    w = GGUFWriter(path, src.meta["general.architecture"])
    if alignment is not None:
        w.add_custom_alignment(alignment)
    checksums = {CHECKSUM_KEY + info[0]: 0 for item in items for info in item.infos}
    _add_meta(w, typed_meta(src.meta, src.types) | typed_meta(extra | checksums, {}, skip=()))
    for item in items:
        for name, shape, dtype, raw, nbytes in item.infos:
            w.add_tensor_info(name, shape, dtype, nbytes, raw_dtype=raw)
    w.write_header_to_file(path)
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    return w


def file_bytes(src: Source, items: list[Item], extra: dict, alignment: int = ALIGNMENT) -> int:
    """The exact size write_gguf would give (header, then every tensor padded to alignment),
    found by writing the header alone to a scratch file."""
    with tempfile.TemporaryDirectory() as d:
        w = _write_header(Path(d) / "header.gguf", src, items, extra, alignment)
        header = w.fout[0].tell()
        w.close()
    pad = lambda n: -(-n // alignment) * alignment  # noqa: E731
    return pad(header) + sum(pad(info[4]) for item in items for info in item.infos)


def edge_rt_items(src: Source, chosen: dict, quantize: Callable | None = None) -> tuple[list[Item], dict]:
    """Items and per-tensor metadata for our GGUF; quantize(name, fmt, w) -> (codes, d, m)
    quantizes a group-quantized tensor (default: the format's own round-to-nearest)."""
    items, extra = [], {}
    for name, shape in src.shapes.items():
        fmt = chosen[name]
        if isinstance(fmt, formats.GroupQuant):
            rows, cols = shape
            g = fmt.groups(cols)
            infos = [(name, (rows, cols * fmt.bits // 8), np.dtype(np.int8), None, rows * cols * fmt.bits // 8),
                     (name + ".scale", (rows, g), np.dtype(np.float16), None, rows * g * 2),
                     (name + ".min", (rows, g), np.dtype(np.float16), None, rows * g * 2)]
            extra[FMT_KEY + name] = f"{fmt.name}:{fmt.group_size}"

            def produce(name=name, fmt=fmt):
                w = src.load(name)
                p = fmt.encode(*quantize(name, fmt, w)) if quantize else fmt.quantize(w)
                return [p["codes"].view(np.int8), p["scale"], p["min"]]
        else:
            dtype = np.dtype(np.float16 if isinstance(fmt, formats.F16) else np.float32)
            infos = [(name, shape, dtype, None, int(np.prod(shape)) * dtype.itemsize)]

            def produce(name=name, dtype=dtype):
                return [np.ascontiguousarray(src.load(name), dtype=dtype)]
        items.append(Item(infos, produce))
    return items, extra


def llama_cpp_items(src: Source, bits: int) -> tuple[list[Item], dict]:
    """Items for a GGUF of llama.cpp's types: matrices in Q4_0/Q8_0/F16/F32, the rest F32."""
    wanted = GGMLQuantizationType[LLAMA_CPP_TYPES[bits]]
    plain = {GGMLQuantizationType.F32: np.float32, GGMLQuantizationType.F16: np.float16}
    items = []
    for name, shape in src.shapes.items():
        t = wanted if is_weight_matrix(name, shape) and shape[-1] % 32 == 0 else GGMLQuantizationType.F32
        block, size = GGML_QUANT_SIZES[t]
        nbytes = int(np.prod(shape)) // block * size
        if t in plain:
            info = (name, shape, np.dtype(plain[t]), None, nbytes)
        else:
            info = (name, (*shape[:-1], shape[-1] // block * size), np.dtype(np.uint8), t, nbytes)

        def produce(name=name, t=t):
            w = src.load(name)
            return [np.ascontiguousarray(w, plain[t]) if t in plain else ggml_quantize(w, t)]
        items.append(Item([info], produce))
    extra = {"general.file_type": LLAMA_FILE_TYPES[wanted.name], "general.quantization_version": 2}
    return items, extra


def provenance(src: Source, bits: int, group_size: int) -> dict:
    return {"edgert.format_version": formats.FORMAT_VERSION, "edgert.version": __version__,
            "edgert.source_sha256": src.sha256, "edgert.bits": bits, "edgert.group_size": group_size}
