"""Device profiles (data: one TOML file each) and detection of the host."""
from __future__ import annotations

import os
import platform
import tomllib
from importlib.resources import files


def profiles() -> dict[str, dict]:
    """name -> profile, from the .toml files beside this module."""
    out = {}
    for f in files(__name__).iterdir():
        if f.name.endswith(".toml"):
            out[f.name[:-5]] = tomllib.loads(f.read_text())
    return out


def host() -> dict:
    """What this machine is: architecture, cores, memory, CPU model."""
    model = ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith(("model name", "hardware", "cpu model")):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return {"machine": platform.machine(), "cores": os.cpu_count(), "memory_bytes": mem, "cpu": model}
