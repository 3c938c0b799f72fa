"""Owner-only folders and files for what a run leaves on disk.

State stores, their locks, the embedded sandbox's database and reports hold
PHI or PHI-adjacent ids, so every folder the tool creates for them is
readable by its owner only (0700), whatever the umask. A folder that already
exists is not this tool's to change: a state store's parent may be the
working directory or a shared one.

A file that holds PHI is created owner-only (0600) and never reached through
a symbolic link (:func:`create_private_file`). One that already exists
(:func:`check_private_file`) must be a regular file of this user's: one with
group or other permission bits is tightened to 0600 (and the caller says so);
a symbolic link, a device or pipe, or another user's file is refused with
:class:`~etl.errors.UnsafeFileError`, since it is not ours to change.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

from etl.errors import UnsafeFileError

__all__ = ["check_private_file", "create_private_file", "private_dir"]


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


def create_private_file(path: Path) -> bool:
    """Create ``path`` empty and owner-only if it does not exist (True), never through a symbolic link.

    An existing file is left as it is (False): check it with :func:`check_private_file`.
    """
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_NOFOLLOW, 0o600)
    except FileExistsError:
        return False  # a dangling symbolic link lands here too: the check refuses it
    try:
        os.fchmod(fd, 0o600)  # the umask could have taken bits away from the owner
    finally:
        os.close(fd)
    return True


def check_private_file(path: Path, what: str) -> str | None:
    """Make sure an existing ``path`` (``what`` names it in messages) is safely this user's alone.

    Returns None when it is absent or already owner-only, or a one-line note when its group/other
    permission bits were just removed (the caller shows it). Raises
    :class:`~etl.errors.UnsafeFileError` for a symbolic link, anything but a regular file, or a
    file another user owns. The checks and the change go through one descriptor opened without
    following links, so the file checked is the file changed.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY)
    except FileNotFoundError:
        return None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise UnsafeFileError(
                f"{path}: the {what} is a symbolic link; files that hold patient data are never opened "
                "through one: give the real path"
            ) from None
        raise
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise UnsafeFileError(f"{path}: the {what} is not a regular file")
        if st.st_uid != os.geteuid():
            raise UnsafeFileError(
                f"{path}: the {what} belongs to another user (uid {st.st_uid}); it holds patient data and is "
                "not this user's to use or to change: give a path of your own"
            )
        loose = stat.S_IMODE(st.st_mode) & 0o077
        if not loose:
            return None
        os.fchmod(fd, 0o600)
    finally:
        os.close(fd)
    return f"{path}: the {what} was readable by others (mode {stat.S_IMODE(st.st_mode):04o}); now owner-only (0600)"
