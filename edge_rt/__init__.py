"""edge-rt: on-device LLM inference under a hard memory budget."""
__version__ = "0.1.0"


def __getattr__(name):  # `edge_rt.load` without importing numpy and the runtime at `import edge_rt`
    if name in ("load", "Model"):
        from . import api
        return getattr(api, name)
    raise AttributeError(f"module 'edge_rt' has no attribute {name!r}")
