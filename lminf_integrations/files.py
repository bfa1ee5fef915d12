"""File modes for what the package writes where other processes (or users) read it: document states, the model
cache. Tools that write through a private temporary file (safetensors, ``tempfile.mkdtemp``) leave mode 0600 or
0700; these give the mode any file the user creates would get. And the age of what a killed process left behind."""

from __future__ import annotations

import os
import time
from pathlib import Path


def umask() -> int:
    """The process's umask. Read from ``/proc`` where Linux has it: setting it to read it back would, for that
    moment, give files other threads create the wrong mode."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def file_mode() -> int:
    """The mode a new file gets from ``open()`` under the process's umask."""
    return 0o666 & ~umask()


def folder_mode() -> int:
    """The mode a new folder gets from ``mkdir()`` under the process's umask."""
    return 0o777 & ~umask()


def age_seconds(path: Path) -> float | None:
    """Seconds since ``path`` was last modified, or ``None`` if it is gone (removed by another process meanwhile).
    What a killed process left (a lock, a staging folder) is told from live work by being far older than it takes."""
    try:
        return time.time() - path.stat().st_mtime
    except OSError:
        return None
