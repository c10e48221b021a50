"""What a GGUF file holds: architecture, hyper-parameters, tensors, bits per weight."""
from __future__ import annotations

from pathlib import Path

from .formats import DEFAULT_GROUP_SIZE
from .gguf_file import GGUFFile
from .models import spec_from_meta
from .weights import FMT_KEY


def inspect(path: Path) -> dict:
    g = GGUFFile(path)
    vocab = g.meta.get("tokenizer.ggml.tokens")
    spec = spec_from_meta(g.meta, len(vocab) if vocab is not None else 0, path)
    tensors, params = [], 0
    for t in sorted(g.tensors.values(), key=lambda t: t.offset):
        if t.name.endswith((".scale", ".min")) and FMT_KEY + t.name.rsplit(".", 1)[0] in g.meta:
            continue  # shown with its tensor
        fmt = g.meta.get(FMT_KEY + t.name)
        if fmt:
            bits = int(fmt.split(":")[0][1:])
            shape = (t.shape[0], t.shape[1] * 8 // bits)
            nbytes = t.nbytes + g.tensors[t.name + ".scale"].nbytes + g.tensors[t.name + ".min"].nbytes
        else:
            shape, nbytes = t.shape, t.nbytes
        count = 1
        for n in shape:
            count *= n
        params += count
        tensors.append({"name": t.name, "type": fmt or t.type_name, "shape": list(shape), "bytes": nbytes})
    size = path.stat().st_size
    widths = {}
    for t in tensors:
        if len(t["shape"]) == 2:
            widths[t["type"]] = widths.get(t["type"], 0) + 1
    summary = {"file": str(path), "file_bytes": size, "architecture": spec.arch, "parameters": params,
               "bits_per_weight": round(8 * size / params, 3),
               "edge_rt_layout_version": g.meta.get("edgert.format_version", "none (not converted by edge-rt)"),
               "group_size": g.meta.get("edgert.group_size", "n/a"),
               "method": g.meta.get("edgert.method", "n/a"),
               "matrix_types": ", ".join(f"{n}x{k}" for k, n in sorted(widths.items())),
               "default_group_size": DEFAULT_GROUP_SIZE}
    summary |= {k: v for k, v in vars(spec).items() if k != "arch"}
    return {"summary": summary, "tensors": tensors}
