"""Readers: CSV and Excel files into polars frames of text.

Every column is read as text, so ``08`` (a CVX code) and ``02134`` (a ZIP)
keep their zeros and a bad value becomes a rejected row later rather than a
crash now. Each frame gains ``__row``: the row number a spreadsheet user sees
(the header is row 1), which is what reports cite.
"""

from __future__ import annotations

import codecs
import hashlib
import io
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import polars as pl

from etl.errors import InputError

__all__ = ["ROW", "Notice", "Table", "file_sha256", "read_table"]

#: Name of the source-row column every reader adds.
ROW = "__row"

DELIMITERS = (",", ";", "\t", "|")
_SNIFF_BYTES = 64 * 1024
_ZIP_MAGIC = b"PK\x03\x04"
_OLE_MAGIC = b"\xd0\xcf\x11\xe0"  # legacy .xls, and password-protected .xlsx


@dataclass(frozen=True)
class Notice:
    """A warning about an input that does not stop it being read."""

    code: str
    message: str
    file: str
    row: int | None = None
    column: str | None = None
    value: str | None = None


@dataclass
class Table:
    """One input file read as text."""

    path: Path
    format: Literal["csv", "xlsx"]
    frame: pl.DataFrame
    sha256: str
    encoding: str | None = None
    delimiter: str | None = None
    sheet: str | None = None
    notices: list[Notice] = field(default_factory=list)

    @property
    def columns(self) -> list[str]:
        """The source headers, in file order."""
        return [c for c in self.frame.columns if c != ROW]


def file_sha256(path: Path) -> str:
    """Hex SHA-256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def read_table(path: str | Path, *, sheet: str | None = None) -> Table:
    """Read a CSV (any of ``, ; tab |``) or an ``.xlsx`` file as text.

    Raises :class:`InputError` naming the file (and row or column when known)
    for anything that cannot be read as a table.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(str(path), "no such file")
    with path.open("rb") as fh:
        head = fh.read(_SNIFF_BYTES)
    if not head.strip():
        raise InputError(str(path), "the file is empty")
    if head.startswith(_ZIP_MAGIC) or path.suffix.lower() in {".xlsx", ".xlsm"}:
        table = _read_xlsx(path, head, sheet)
    else:
        if sheet is not None:
            raise InputError(str(path), "--sheet applies to Excel files only")
        table = _read_csv(path, head)
    _check_headers(table)
    return table


def _decode_choice(path: Path, head: bytes) -> tuple[str, list[Notice]]:
    """The encoding to read with: UTF-8 (with or without BOM), UTF-16 with BOM, else cp1252."""
    if head.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        return "utf-16", []
    if head[:4] == _OLE_MAGIC:
        raise InputError(str(path), "this is a legacy .xls or an encrypted workbook; save it as .xlsx or CSV")
    if b"\x00" in head:
        raise InputError(str(path), "this looks like a binary file, not a CSV")
    try:
        # An incomplete multi-byte sequence may be cut at the sniff boundary.
        codecs.getincrementaldecoder("utf-8")().decode(head, final=False)
        return "utf-8", []
    except UnicodeDecodeError as exc:
        notice = Notice(
            "encoding-fallback",
            f"not valid UTF-8 (byte {exc.start}); read as Windows-1252 (cp1252): check accented characters",
            str(path),
        )
        return "cp1252", [notice]


def sniff_delimiter(sample: str) -> str:
    """The candidate delimiter that splits the header into the most fields, outside quotes."""
    header = _first_record(sample)
    counts: Counter[str] = Counter()
    in_quotes = False
    for ch in header:
        if ch == '"':
            in_quotes = not in_quotes
        elif not in_quotes and ch in DELIMITERS:
            counts[ch] += 1
    if not counts:
        return ","
    best, _ = max(counts.items(), key=lambda kv: (kv[1], -DELIMITERS.index(kv[0])))
    return best


def _first_record(sample: str) -> str:
    in_quotes = False
    for i, ch in enumerate(sample):
        if ch == '"':
            in_quotes = not in_quotes
        elif ch in "\r\n" and not in_quotes:
            return sample[:i]
    return sample


def _read_csv(path: Path, head: bytes) -> Table:
    encoding, notices = _decode_choice(path, head)
    if encoding == "utf-8":
        source: Path | io.BytesIO = path
        sample = head.decode("utf-8", errors="ignore").lstrip("\ufeff")
    else:
        # polars reads UTF-8 only: transcode. cp1252 and UTF-16 files are the
        # exception, not the migration-sized case, so holding them once is fine.
        text = path.read_bytes().decode(encoding, errors="replace")
        source = io.BytesIO(text.lstrip("\ufeff").encode("utf-8"))
        sample = text[:_SNIFF_BYTES]
    delimiter = sniff_delimiter(sample)
    try:
        frame = pl.read_csv(
            source,
            separator=delimiter,
            infer_schema=False,
            has_header=True,
            quote_char='"',
            raise_if_empty=True,
        )
    except pl.exceptions.NoDataError as exc:
        raise InputError(str(path), "the file is empty") from exc
    except pl.exceptions.ComputeError as exc:
        raise InputError(str(path), _polars_reason(exc)) from exc
    except pl.exceptions.PolarsError as exc:
        raise InputError(str(path), f"cannot be read as CSV: {_polars_reason(exc)}") from exc
    frame = frame.with_row_index(ROW, offset=2)
    return Table(path, "csv", frame, file_sha256(path), encoding=encoding, delimiter=delimiter, notices=notices)


def _polars_reason(exc: Exception) -> str:
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if "more fields than defined" in first:
        return "a row has more fields than the header (a stray delimiter or an unterminated quote?)"
    if "invalid utf-8" in first:
        return "not valid UTF-8"
    return first[:300]


def _read_xlsx(path: Path, head: bytes, sheet: str | None) -> Table:
    import fastexcel

    if not head.startswith(_ZIP_MAGIC):
        raise InputError(str(path), "named .xlsx but is not an Excel workbook")
    try:
        reader = fastexcel.read_excel(str(path))
        names = list(reader.sheet_names)
        if sheet is not None and sheet not in names:
            raise InputError(str(path), f"no sheet {sheet!r}; sheets: {', '.join(names)}")
        chosen = sheet if sheet is not None else names[0]
        frame = reader.load_sheet(chosen, dtypes="string").to_polars()
    except InputError:
        raise
    except Exception as exc:  # fastexcel raises its own CalamineError family
        raise InputError(str(path), f"cannot be read as an Excel workbook: {str(exc).splitlines()[0][:300]}") from exc
    notices = []
    if sheet is None and len(names) > 1:
        notices.append(Notice("other-sheets", f"read sheet {chosen!r}; not read: {', '.join(names[1:])}", str(path)))
    # Excel hands back typed cells; the reader promises text.
    frame = frame.select(pl.all().cast(pl.String)).with_row_index(ROW, offset=2)
    return Table(path, "xlsx", frame, file_sha256(path), sheet=chosen, notices=notices)


def _check_headers(table: Table) -> None:
    columns = table.columns
    if not columns:
        raise InputError(str(table.path), "no header row")
    blanks = [i + 1 for i, c in enumerate(columns) if not c.strip() or c.startswith("__UNNAMED__")]
    if blanks and len(blanks) == len(columns):
        raise InputError(str(table.path), "the header row is empty")
    stripped = [c.strip() for c in columns]
    dupes = sorted({c for c in stripped if stripped.count(c) > 1 and c})
    # polars renames the second `a` to `a_duplicated_0`; that is a source error worth naming.
    renamed = sorted({c.rsplit("_duplicated_", 1)[0] for c in columns if "_duplicated_" in c})
    if dupes or renamed:
        raise InputError(str(table.path), f"duplicate column header(s): {', '.join(dupes or renamed)}", row=1)
