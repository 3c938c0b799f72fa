"""Owner-only folders and files for what a run leaves on disk, and CSV cells a spreadsheet cannot run.

State stores, their locks, the embedded sandbox's database and reports hold
PHI or PHI-adjacent ids, so:

- **Folders** (:func:`private_dir`): a folder given as a symbolic link is
  refused (:class:`~etl.errors.OutputError`, exit 2), so a planted link never
  sends a report or a state store somewhere else. Every missing folder is
  created readable by its owner only (0700), whatever the umask. A folder that
  already exists is not this tool's to change: its mode is left as it is (a
  shared 1777 folder keeps its sticky bit).
- **Files** (:func:`private_file`, :func:`private_text`, :func:`write_csv`):
  never written in place and never through a link. Each is written to a new
  file, created exclusively (``O_CREAT | O_EXCL | O_NOFOLLOW``) as 0600 in
  the same folder, and renamed onto its name when complete: a symbolic link
  planted under that name is replaced, its target untouched; a reader never
  sees half a file; a second run into the same folder replaces the first
  run's files.
- **CSV cells** (:func:`guard_formulas`): every text cell and header that a
  spreadsheet would run as a formula gets a leading ``'``; the tool removes it
  again (:func:`unguard_formulas`) when it reads one of its own files back.
- **Files that hold PHI and live on** (a state store, its lock, the sandbox's
  database): created owner-only and never through a link
  (:func:`create_private_file`); one that already exists
  (:func:`check_private_file`) must be a regular file of this user's: one with
  group or other permission bits is tightened to 0600 (and the caller says so);
  a symbolic link, a device or pipe, or another user's file is refused with
  :class:`~etl.errors.UnsafeFileError`, since it is not ours to change.
"""

from __future__ import annotations

import contextlib
import errno
import io
import os
import secrets
import stat
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO, TextIO, TypeVar

import polars as pl

from etl.errors import OutputError, UnsafeFileError

__all__ = [
    "FORMULA_GUARD",
    "FORMULA_STARTS",
    "check_private_file",
    "create_private_file",
    "first_byte_in",
    "guard_formulas",
    "guarded",
    "private_dir",
    "private_file",
    "private_text",
    "publish_file",
    "scratch_dir",
    "unguard_formulas",
    "unguarded",
    "write_csv",
]

#: First characters that make a spreadsheet treat a cell as a formula (OWASP's list: ``=``, ``+``,
#: ``-``, ``@``, tab, carriage return), and their fullwidth forms, which some spreadsheets fold to them.
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r", "\uff1d", "\uff0b", "\uff0d", "\uff20")

#: What a guarded cell starts with.
FORMULA_GUARD = "'"

_Frame = TypeVar("_Frame", pl.DataFrame, pl.LazyFrame)

# A cell is guarded when it starts with a formula character after any number of quotes: quoting
# "'=x" too (as "''=x") makes unguarding exact, so a value survives a write and a read unchanged.
_TRIGGER = "[" + "".join(f"\\x{{{ord(c):x}}}" for c in FORMULA_STARTS) + "]"
_RISKY = f"^'*{_TRIGGER}"
_GUARDED = f"^'+{_TRIGGER}"
_RISKY_FIRST_BYTES = sorted({c.encode()[0] for c in (FORMULA_GUARD, *FORMULA_STARTS)})
_GUARDED_FIRST_BYTES = [FORMULA_GUARD.encode()[0]]


def guarded(value: str) -> str:
    """One text cell (or header) as :func:`guard_formulas` writes it."""
    return FORMULA_GUARD + value if value.lstrip(FORMULA_GUARD).startswith(FORMULA_STARTS) else value


def unguarded(value: str) -> str:
    """One cell (or header) of a file the tool wrote, as it was before :func:`guarded`."""
    rest = value.lstrip(FORMULA_GUARD)
    return value[1:] if rest != value and rest.startswith(FORMULA_STARTS) else value


def guard_formulas(frame: _Frame) -> _Frame:
    """``frame`` with every text cell and every column name that a spreadsheet would run prefixed with ``'``.

    The rule: a text cell that starts with one of :data:`FORMULA_STARTS`, after any number of
    ``'``, gets one more ``'`` in front. Only text columns are touched: a number column's ``-0.5``
    stays a number. :func:`unguard_formulas` undoes it exactly.
    """
    return _rewrite(frame, _RISKY, _RISKY_FIRST_BYTES, lambda cell: pl.lit(FORMULA_GUARD) + cell, guarded)


def unguard_formulas(frame: _Frame) -> _Frame:
    """A frame read from a CSV the tool wrote, with :func:`guard_formulas` undone (cells and column names)."""
    return _rewrite(frame, _GUARDED, _GUARDED_FIRST_BYTES, lambda cell: cell.str.slice(1), unguarded)


def first_byte_in(text: pl.Expr, first_bytes: list[int] | pl.Series | pl.Expr) -> pl.Expr:
    """Whether each text's first byte (UTF-8) is one of ``first_bytes`` (null for an empty or null text): read
    from the text's header, a quarter of the cost of a pattern's search over it."""
    return text.cast(pl.Binary).bin.get(0, null_on_oob=True).is_in(first_bytes)


def _rewrite(
    frame: _Frame, pattern: str, first_bytes: list[int], cell: Callable[[pl.Expr], pl.Expr], name: Callable[[str], str]
) -> _Frame:
    """``frame`` with ``cell`` applied to each text cell matching ``pattern``, and ``name`` to each column name.

    ``first_bytes``: the first bytes (UTF-8) a cell matching ``pattern`` can start with. An in-memory frame's
    columns with no cell starting so are left alone: reading a cell's first byte costs a quarter of the
    pattern's search, and a report's columns seldom hold such a cell (a quarter of what writing ``rows.csv``
    cost was that search)."""
    schema = frame.collect_schema()
    texts = [c for c, dtype in schema.items() if dtype == pl.String]
    if texts and isinstance(frame, pl.DataFrame):
        starts = frame.select(first_byte_in(pl.col(c), first_bytes).any() for c in texts).row(0)
        texts = [c for c, maybe in zip(texts, starts, strict=True) if maybe]
    cells = [
        pl.when(pl.col(c).str.contains(pattern)).then(cell(pl.col(c))).otherwise(pl.col(c)).alias(c) for c in texts
    ]
    frame = frame.with_columns(cells) if cells else frame
    names = {c: name(c) for c in schema.names() if name(c) != c}
    return frame.rename(names) if names else frame


def _refuse_link(path: Path) -> None:
    if path.is_symlink():
        raise OutputError(str(path), "is a symbolic link; give the folder itself")


def private_dir(path: Path) -> Path:
    """Make ``path`` a folder: it and any missing parents are created owner-only; existing ones stay as they are.

    Raises :class:`~etl.errors.OutputError` when ``path`` is a symbolic link or not a folder.
    """
    _refuse_link(path)
    missing: list[Path] = []
    for folder in (path, *path.parents):
        if folder.is_dir():
            break
        missing.append(folder)
    for folder in reversed(missing):
        try:
            folder.mkdir(mode=0o700)
        except FileExistsError:
            # Made meanwhile, by another process (not ours to change) or planted (refused).
            _refuse_link(folder)
            if not folder.is_dir():
                raise OutputError(str(folder), "is a file, not a folder") from None
            continue
        except OSError as exc:
            raise OutputError(str(folder), f"cannot be created: {exc.strerror or exc}") from exc
        # mkdir's mode passes through the umask, which could leave even the owner out.
        _tighten(folder)
    return path


def _tighten(folder: Path) -> None:
    """Make a folder this process just created 0700, opened without following a link."""
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        os.fchmod(fd, 0o700)
    finally:
        os.close(fd)


def scratch_dir(folder: Path, prefix: str) -> Path:
    """A new, empty, owner-only folder inside ``folder`` (named ``prefix`` and a random tail), made exclusively.

    Nothing there can have been planted beforehand: scratch files may be written into it plainly.
    """
    try:
        made = Path(tempfile.mkdtemp(prefix=prefix, dir=folder))
    except OSError as exc:
        raise OutputError(str(folder), f"cannot be written to: {exc.strerror or exc}") from exc
    _tighten(made)
    return made


@contextlib.contextmanager
def private_file(path: Path) -> Iterator[BinaryIO]:
    """Write ``path`` (binary) owner-only, never in place and never through a link.

    The block writes to a new 0600 file created exclusively in ``path``'s folder (opened without
    following a link); when the block ends normally it is renamed onto ``path``, replacing whatever
    had that name (a planted link is replaced, not followed). If the block raises, the new file is
    removed and ``path`` is left as it was.
    """
    folder = _open_folder(path)
    try:
        temp = f".{path.name}.{secrets.token_hex(6)}.tmp"
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        try:
            fd = os.open(temp, flags, 0o600, dir_fd=folder)
        except OSError as exc:
            raise OutputError(str(path), f"cannot be written: {exc.strerror or exc}") from exc
        try:
            os.fchmod(fd, 0o600)  # the umask may have taken the owner's bits too
            with os.fdopen(fd, "wb") as fh:
                yield fh
            _replace(temp, path, folder, src_dir_fd=folder)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(temp, dir_fd=folder)
            raise
    finally:
        os.close(folder)


def publish_file(source: Path, path: Path) -> None:
    """Move a finished file that this process wrote in a scratch folder of its own (:func:`scratch_dir`, the
    same file system) onto ``path``, as :func:`private_file` puts a file in place: owner-only, the file
    of that name removed first and replaced, a link planted there replaced and never followed. Nothing is
    copied."""
    folder = _open_folder(path)
    try:
        try:
            fd = os.open(source, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError as exc:
            raise OutputError(str(path), f"cannot be written: {exc.strerror or exc}") from exc
        try:
            os.fchmod(fd, 0o600)
        finally:
            os.close(fd)
        _replace(source, path, folder)
    finally:
        os.close(folder)


def _open_folder(path: Path) -> int:
    """``path``'s folder, opened without following a link (what the file is put into)."""
    try:
        return os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        raise OutputError(str(path.parent), f"cannot be written to: {exc.strerror or exc}") from exc


def _replace(source: str | Path, path: Path, folder: int, *, src_dir_fd: int | None = None) -> None:
    """Rename ``source`` onto ``path``'s name in ``folder`` (an open folder), never following a link planted there.

    The file it replaces is removed first: a rename onto an existing file makes ext4 write the new one out
    to disk before it returns (a tenth of a second per 100 MB, at every run into the same report folder).
    """
    with contextlib.suppress(OSError):
        os.unlink(path.name, dir_fd=folder)
    try:
        os.replace(source, path.name, src_dir_fd=src_dir_fd, dst_dir_fd=folder)
    except OSError as exc:  # a folder of that name, say
        raise OutputError(str(path), f"cannot be written: {exc.strerror or exc}") from exc


@contextlib.contextmanager
def private_text(path: Path) -> Iterator[TextIO]:
    """:func:`private_file` for UTF-8 text (no newline translation)."""
    with private_file(path) as raw:
        fh = io.TextIOWrapper(raw, encoding="utf-8", newline="")
        try:
            yield fh
        finally:
            fh.detach()  # flushed; the binary file is closed by private_file


def write_csv(frame: pl.DataFrame, path: Path) -> Path:
    """Write ``frame`` as a CSV file at ``path``: owner-only (:func:`private_file`), formulas guarded."""
    with private_file(path) as fh:
        guard_formulas(frame).write_csv(fh)
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
