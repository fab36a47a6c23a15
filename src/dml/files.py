"""Files that dml writes, created as ``open()`` creates them: readable by the people the umask lets read."""

from __future__ import annotations

import errno
import os
import secrets
from pathlib import Path


def create_temp_file(path: Path, suffix: str) -> tuple[int, Path]:
    """A new, empty file beside ``path`` to write and then rename over it: (descriptor, path).

    Created as ``open()`` would create ``path`` itself (mode 0o666 less the umask, default ACLs
    applied), not owner-only like ``tempfile.mkstemp``: colleagues on a shared filesystem read runs.
    """
    path = Path(path)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
    for _ in range(100):
        tmp = path.parent / f".{path.name}.{secrets.token_hex(4)}{suffix}"
        try:
            return os.open(tmp, flags, 0o666), tmp
        except FileExistsError:
            continue
    raise FileExistsError(errno.EEXIST, "no unused temporary file name", str(path.parent))
