"""edge-rt: on-device LLM inference under a hard memory budget."""
__version__ = "0.1.0"
