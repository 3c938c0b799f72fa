"""Owner-only folders for what a run leaves on disk.

State stores, their locks, the embedded sandbox's database and reports hold
PHI or PHI-adjacent ids, so every folder the tool creates for them is
readable by its owner only (0700), whatever the umask. A folder that already
exists is not this tool's to change: a state store's parent may be the
working directory or a shared one.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["private_dir"]


def private_dir(path: Path) -> Path:
    """Make ``path`` a folder: it and any missing parents are created owner-only; existing ones stay as they are."""
    missing: list[Path] = []
    for folder in (path, *path.parents):
        if folder.is_dir():
            break
        missing.append(folder)
    for folder in reversed(missing):
        try:
            folder.mkdir(mode=0o700)
        except FileExistsError:
            if not folder.is_dir():
                raise
            continue  # another process made it meanwhile: not ours to change
        # mkdir's mode passes through the umask, which could leave even the owner out.
        os.chmod(folder, 0o700)
    return path
