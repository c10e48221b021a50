"""Architecture families (one file each) and the registry of fetchable models."""
from edge_rt.errors import EdgeRtError

from . import gemma3, llama, qwen2
from .spec import Spec

FAMILIES = {"llama": llama, "qwen2": qwen2, "gemma3": gemma3}


def spec_from_meta(meta: dict, n_vocab: int, path="") -> Spec:
    arch = meta.get("general.architecture")
    if arch not in FAMILIES:
        raise EdgeRtError(f"{path}: unsupported architecture {arch!r} (supported: {', '.join(FAMILIES)})")
    return FAMILIES[arch].spec(meta, n_vocab, path).validate(path)
