"""One load at a time per state store: an exclusive lock beside it.

Two loads that share a state store would both read "not yet sent" for the
same rows and both send them. A scheduled import makes that overlap likely
(last week's run is still going when this week's starts), so every load
takes ``<state>.lock`` with ``flock`` for its whole duration. The kernel
drops the lock when the process ends, however it ends, so a killed run never
leaves a stale lock behind. The file itself stays: deleting it while another
process waits on it would let a third take a different file.

The holder writes its pid and start time into the file so that the run that
is refused can say who holds it. The file is opened like the store itself:
never through a symbolic link (the holder truncates it), owner-only, another
user's refused (:func:`etl.files.check_private_file`). POSIX only (``fcntl``).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import os
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from etl.errors import StateError
from etl.files import check_private_file, private_dir

__all__ = ["lock_path", "state_lock"]

_POLL = 0.2  # seconds between attempts while waiting


def lock_path(state: Path) -> Path:
    """The lock file of a state store: ``<state>.lock`` beside it."""
    return state.with_name(state.name + ".lock")


def _warn(note: str) -> None:
    print(f"warning: {note}", file=sys.stderr, flush=True)


def _unusable(path: Path, exc: OSError) -> StateError:
    return StateError(f"{path}: cannot use the state store's lock file: {exc.strerror or exc}")


def _holder(path: Path) -> str:
    try:
        text = path.read_text(encoding="utf-8").strip()
    except OSError:
        text = ""
    return f" ({text})" if text else ""


@contextlib.contextmanager
def state_lock(
    state: Path, *, wait: bool = False, on_wait: Callable[[str], None] | None = None, poll: float = _POLL
) -> Iterator[Path]:
    """Hold the state store's lock for the block; fail at once (or, with ``wait``, wait) if another run has it."""
    path = lock_path(state)
    private_dir(path.parent)
    if note := check_private_file(path, "state store's lock file"):
        _warn(note)
    # The file names a process and a start time only; still owner-only, like the store.
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        raise _unusable(path, exc) from exc
    try:
        told = False
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                message = f"another clinik-etl run{_holder(path)} is using the state store {state}"
                if not wait:
                    raise StateError(
                        message + "; it loads the same rows, so this run stops here. "
                        "Let it finish (or pass --wait to queue behind it)"
                    ) from None
                if not told and on_wait is not None:
                    on_wait(message + "; waiting for it to finish")
                    told = True
                time.sleep(poll)
        stamp = dt.datetime.now().astimezone().isoformat(timespec="seconds")
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"pid {os.getpid()}, started {stamp}\n".encode(), 0)
        except OSError as exc:  # a full disk: the store could not be written either
            raise _unusable(path, exc) from exc
        try:
            yield path
        finally:
            os.ftruncate(fd, 0)
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)
