"""Write a file so that OUT is either absent or complete: write a temporary file
beside it, fsync, rename. Interrupted or failed writes leave nothing behind; a writer
killed outright (SIGKILL, power loss) leaves its temporary file, named with its pid,
and the next write of OUT removes it."""
from __future__ import annotations

import errno
import glob
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path

from .errors import EdgeRtError


def check_output(path: str | os.PathLike) -> Path:
    """OUT as a Path, if a file can be written there (checked before long work starts)."""
    out = Path(path)
    if out.is_dir():
        raise EdgeRtError(f"{out}: is a folder; give a file name for the output")
    if not out.parent.is_dir():
        raise EdgeRtError(f"{out.parent}: no such folder")
    return out


@contextmanager
def atomic_output(path: str | os.PathLike):
    """Yields a temporary path in OUT's folder; renames it to OUT if the block succeeds."""
    out = check_output(path)
    _remove_stale(out)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.{os.getpid()}.", suffix=".part", dir=out.parent)
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # as an ordinary open() would have made it
    try:
        yield Path(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, out)
        dfd = os.open(out.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError as e:
        if e.errno == errno.ENOSPC or "free space" in str(e):  # numpy's tofile says so without an errno
            raise EdgeRtError(f"{out}: no space left on the device; nothing was written") from None
        raise EdgeRtError(f"{out}: cannot write: {e.strerror or e}") from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _remove_stale(out: Path) -> None:
    """Temporary files of OUT left by writers that no longer run."""
    for part in out.parent.glob(f".{glob.escape(out.name)}.*.part"):
        pid = part.name[len(out.name) + 2:].split(".")[0]
        if pid.isdigit() and not _alive(int(pid)):
            try:
                part.unlink()
            except OSError:
                pass


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
