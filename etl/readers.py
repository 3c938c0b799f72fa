"""Readers: CSV, Excel and HL7 v2 files into polars frames of text.

Every column is read as text, so ``08`` (a CVX code) and ``02134`` (a ZIP)
keep their zeros and a bad value becomes a rejected row later rather than a
crash now. Each frame gains ``__row``: the row number a spreadsheet user sees
(a CSV's first line is row 1, and a record whose quoted cell spans lines is
one row; a sheet keeps its own numbering), which is what reports cite. Rows
above the header and blank rows are counted too, so the numbers never shift.

A file is read by what it holds, not by what its name says, and anything
that cannot be read as a table is an :class:`~etl.errors.InputError` naming
the file, and the row where one is to blame; never another exception:

- a password-protected workbook or a legacy ``.xls`` (an OLE container), a
  ZIP that is not a workbook, gzip, PDF or images, binary bytes: refused;
- a workbook past its limits (a zip bomb, a forged ZIP header, a grid of
  billions of cells: :mod:`etl.workbooks`), or with a cell longer than Excel's
  32,767 characters: refused, before or after the Excel reader sees it;
- a ``.csv`` that is really a workbook is read as one, with a notice;
- UTF-8 (with or without BOM), UTF-16 (with a BOM, or recognisably without),
  else Windows-1252 with a notice, also when bad bytes come late in a file;
- a file that starts with an HL7 segment (``MSH|``, or the batch wrappers ``FHS|``, ``BHS|``) is
  read as HL7 v2 VXU messages, one row per RXA segment (:mod:`etl.hl7`), whatever its name;
- ``\\r\\n``, ``\\n`` and lone ``\\r`` line endings, even mixed, are all line breaks;
- a row with more cells than the header, or a quote never closed, is refused
  with the row it starts on; a row with fewer cells reads the rest as empty;
- title rows above the header (a report title, an export date, notes, blank lines) are passed
  over: the header is the first row that names at least two known columns
  (:class:`HeaderHint`), or the row a user names (``--header-row``), with a ``title-rows``
  notice; row numbers stay the ones a spreadsheet shows, counted from the top of the file;
- blank rows, and rows of bare separators (``;;;;``) or whitespace, anywhere, are no rows:
  left out and counted (:attr:`Table.blank_rows`), never rejected;
- a blank header cell, or one that repeats an earlier header, is named ``column_N`` (N: its
  1-based position) with a ``header-renamed`` notice, in a CSV as in a workbook;
- a ``rejects.csv`` of this tool, fixed and imported again (its header starts
  with ``source_file, source_row`` and ends with ``reasons``), has the ``'``
  the tool put before formula characters taken off again, in cells and
  headers (:func:`etl.files.unguard_formulas`).
"""

from __future__ import annotations

import codecs
import csv
import hashlib
import io
import mmap
import re
import sys
import zipfile
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import polars as pl

from etl.errors import InputError
from etl.files import unguard_formulas, unguarded
from etl.hl7 import is_hl7, parse_hl7
from etl.lazy_numpy import loaded, np
from etl.rules import RULES
from etl.workbooks import EXCEL_MAX_CELL_CHARS, WorkbookLimits, column_letters, scan_workbook

__all__ = [
    "REJECTS_BOOKKEEPING",
    "ROW",
    "Batches",
    "HeaderHint",
    "Notice",
    "Table",
    "file_sha256",
    "is_own_rejects",
    "own_bookkeeping",
    "read_batches",
    "read_table",
    "sniff_delimiter",
]

#: Name of the source-row column every reader adds.
ROW = "__row"

DELIMITERS = (",", ";", "\t", "|")
_DELIMITER_NAMES = {",": "comma", ";": "semicolon", "\t": "tab", "|": "pipe"}
_SNIFF_BYTES = 64 * 1024
_ZIP_MAGICS = (b"PK\x03\x04", b"PK\x05\x06")  # a ZIP with entries; an empty one
_OLE_MAGIC = b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1"  # legacy .xls, and password-protected .xlsx
_EXCEL_SUFFIXES = frozenset({".xlsx", ".xlsm"})
_NOT_TABLES = {
    b"\x1f\x8b": "gzip-compressed: decompress it first",
    b"%PDF-": "a PDF document",
    b"\x89PNG": "a PNG image",
    b"\xff\xd8\xff": "a JPEG image",
    b"7z\xbc\xaf": "a 7-Zip archive: extract it first",
    b"Rar!": "a RAR archive: extract it first",
}
# C0 control characters that no text table holds (tab, LF, FF and CR are fine).
_CONTROL = bytes(b for b in range(32) if b not in (9, 10, 12, 13)) + b"\x7f"
_BARE_CR = re.compile(rb"\r(?!\n)")
_LINE_BREAKS = re.compile(rb"\r\n?")
_BARE_CR_TEXT = re.compile(r"\r\n?")
_BARE_CR_TEXT_ALONE = re.compile(r"\r(?!\n)")
#: A span of a chunk this long or longer is scanned with numpy, which lets go of the GIL: ``bytes.count`` and
#: ``re`` hold it, about 10 ms per 20 MB chunk each, while the threads that check the batches wait for it.
_SCAN_FROM = 1 << 16
_QUOTE, _CR, _LF = 34, 13, 10


@dataclass(frozen=True)
class Notice:
    """A warning about an input that does not stop it being read."""

    code: str
    message: str
    file: str
    row: int | None = None
    column: str | None = None
    value: str | None = None


@dataclass(frozen=True)
class HeaderHint:
    """Where a file's header row is.

    ``row``: the row a user names (1-based, as a spreadsheet numbers rows: ``--header-row``, a
    profile's ``header_row``). Else the header is the first row (of the first 64 KiB, or 200 rows)
    with at least two cells that ``known`` accepts (a mapping knows those names); else, and when
    ``known`` is None, the first row that is not blank.
    """

    row: int | None = None
    known: Callable[[str], bool] | None = None


#: How many cells a row must name (``HeaderHint.known``) to be taken for the header.
_HEADER_MIN_KNOWN = 2
_HEADER_SCAN_ROWS = 200


@dataclass
class Table:
    """One input file read as text; ``blank_rows``: the blank rows below the header left out (so far,
    for a table read in batches: the count is whole once the batches end)."""

    path: Path
    format: Literal["csv", "xlsx", "hl7"]
    frame: pl.DataFrame
    sha256: str
    encoding: str | None = None
    delimiter: str | None = None
    sheet: str | None = None
    notices: list[Notice] = field(default_factory=list)
    blank_rows: int = 0
    header_row: int = 1  # the file's (or sheet's) row that holds the header: title rows above it are skipped

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


def read_table(
    path: str | Path,
    *,
    sheet: str | None = None,
    limits: WorkbookLimits | None = None,
    header: HeaderHint | None = None,
) -> Table:
    """Read a CSV (any of ``, ; tab |``) or an ``.xlsx`` file as text.

    ``header`` says where the header row is (:class:`HeaderHint`; by default the first row that is not
    blank). Blank rows below it are left out and counted in :attr:`Table.blank_rows`.

    A workbook is first checked against ``limits`` (:func:`etl.workbooks.scan_workbook`; the
    defaults when ``None``), and a cell longer than Excel's 32,767 characters refuses it.
    Raises :class:`InputError` naming the file (and row or column when known)
    for anything that cannot be read as a table, and nothing else.
    """
    path = Path(path)
    head = _head(path)
    try:
        hint = header or HeaderHint()
        if is_hl7(head):
            if sheet is not None:
                raise InputError(str(path), "--sheet applies to Excel files only")
            table = _read_hl7(path)
        elif _is_workbook(path, head):
            table = _read_xlsx(path, sheet, limits, hint)
            if path.suffix.lower() not in _EXCEL_SUFFIXES:
                named = f"named {path.suffix}" if path.suffix else "named without an extension"
                mismatch = RULES["format-mismatch"]
                table.notices.append(Notice(mismatch.code, mismatch.text(named=named), str(path)))
        else:
            if path.suffix.lower() in _EXCEL_SUFFIXES:
                raise InputError(
                    str(path), "named .xlsx but is not an Excel workbook (if it is a CSV, give it a .csv name)"
                )
            if sheet is not None:
                raise InputError(str(path), "--sheet applies to Excel files only")
            table = _read_csv(path, head, hint)
        table.frame, table.blank_rows = _without_blank_rows(table.frame)
        if is_own_rejects(table.columns):
            table.frame = unguard_formulas(table.frame)
        table.sha256 = file_sha256(path)
    except OSError as exc:  # the file vanished or became unreadable while being read
        raise InputError(str(path), f"cannot be read: {exc.strerror or exc}") from exc
    return table


#: Files below this size are read whole (and cut into batches); larger ones are scanned in batches.
STREAM_FROM_BYTES = 64 * 1024 * 1024
#: A streamed file of more than this many batches (by its estimated rows) starts with a smaller one ...
_RAMP_FROM = 3
#: ... of this share of a batch.
_FIRST_SHARE = 4


@dataclass
class Batches:
    """A table read a batch of rows at a time: ``table`` has the columns and metadata, no rows."""

    table: Table
    batches: Iterator[pl.DataFrame]
    rows: int = 0  # the rows it holds (of a CSV read in chunks: an estimate from its first rows' length)


def read_batches(
    path: str | Path,
    *,
    sheet: str | None = None,
    rows: int = 75_000,
    stream_from: int | None = None,
    limits: WorkbookLimits | None = None,
    header: HeaderHint | None = None,
) -> Batches:
    """Read a table in batches of at most ``rows`` rows, each with its ``__row`` numbers.

    A large UTF-8 CSV (``stream_from`` bytes or more, :data:`STREAM_FROM_BYTES` by default) is read a
    chunk of whole records at a time (cut where a line break is outside quotes) and parsed by polars,
    so it is never held whole; anything else (a workbook, another encoding, a small file) is read by
    :func:`read_table`, with every check it makes, and then cut. A CSV that turns out to be broken
    part-way is read again whole, so the error names its row as usual. Blank rows are left out of
    the batches and counted in the table's :attr:`~Table.blank_rows` as they go.
    """
    path = Path(path)
    hint = header or HeaderHint()
    threshold = STREAM_FROM_BYTES if stream_from is None else stream_from
    head = _head(path)
    size = path.stat().st_size
    streamable = (
        size >= threshold
        and sheet is None
        and path.suffix.lower() not in _EXCEL_SUFFIXES
        and not is_hl7(head)
        and not _is_workbook(path, head)
        and _decode_choice(path, head) == ("utf-8", [])
        # A lone \r in the head (the header's line may end in one) is read whole; one further on is
        # seen by the chunk that holds it (_chunked): the whole file is not searched before reading.
        and _BARE_CR.search(head.rstrip(b"\r")) is None
    )
    if not streamable:
        table = read_table(path, sheet=sheet, limits=limits, header=hint)
        frame, table.frame = table.frame, table.frame.clear()
        # Each batch in one chunk per column (see _chunked).
        return Batches(
            table, (frame.slice(i, rows).rechunk() for i in range(0, max(frame.height, 1), rows)), frame.height
        )
    sample = head.decode("utf-8", errors="ignore").lstrip("\ufeff")
    at, delimiter = _find_header(str(path), _records(sample, max(_HEADER_SCAN_ROWS, hint.row or 0)), hint)
    body = head.removeprefix(codecs.BOM_UTF8)
    header_start = 0
    for _ in range(at):  # the rows above the header
        header_start += max(0, _first_record_end(body[header_start:]))
    header_end = _first_record_end(body[header_start:])
    if header_end < 0:  # a header longer than the sniffed head: not the migration-sized case
        return read_batches(path, sheet=sheet, rows=rows, stream_from=size + 1, limits=limits, header=hint)
    header_end += header_start
    header_line = body[header_start:header_end]
    first = _parse_chunk(path, header_line, b"", delimiter)
    names, notices = _name_headers(str(path), _raw_names(first.columns), row=at + 1)
    top = first.rename(dict(zip(first.columns, names, strict=True))).with_row_index(ROW, offset=at + 2)
    table = Table(path, "csv", top, "", encoding="utf-8", delimiter=delimiter, notices=notices, header_row=at + 1)
    if at:
        table.notices.insert(0, _title_notice(str(path), at))
    # The file's digest is read beside the batches (hashlib lets go of the GIL) and is there once they end.
    digest = ThreadPoolExecutor(1, thread_name_prefix="sha256")
    future = digest.submit(file_sha256, path)
    digest.shutdown(wait=False)
    per_row = max(1, len(body) - header_end) / max(1, body.count(b"\n", header_end))
    skip = len(head) - len(body) + header_end
    def bare_cr() -> None:
        if not any(n.code == RULES["line-endings"].code for n in table.notices):
            table.notices.append(Notice(RULES["line-endings"].code, RULES["line-endings"].text(), str(path)))

    estimate = int((size - skip) / per_row) + 1
    # A file of several batches starts with a quarter of one: its checks start while the next is read and
    # prepared, rather than after a whole batch was (a run's start is otherwise two threads waiting on one).
    ramp = max(1, rows // _FIRST_SHARE) if estimate > _RAMP_FROM * rows else None
    chunks = _chunked(
        path, top.columns[1:], skip, delimiter, rows, max(4096, int(per_row * rows)), at + 2, bare_cr=bare_cr,
        first_rows=ramp,
    )
    chunks = _counting_blanks(chunks, table)
    if is_own_rejects(table.columns):
        table.frame = unguard_formulas(table.frame)
        chunks = (unguard_formulas(chunk) for chunk in chunks)
    return Batches(table, _then(chunks, lambda: setattr(table, "sha256", future.result())), estimate)


#: The columns of its own ``rejects.csv`` the tool writes around a file's (etl.plan: ``_rejects_columns``).
REJECTS_BOOKKEEPING = ("source_file", "source_row", "reasons")


def own_bookkeeping(columns: list[str]) -> set[str]:
    """The bookkeeping columns of a table that is the tool's own ``rejects.csv`` (none otherwise): what the run
    that wrote it said of each row. A run of it writes its own in their place, so no field is matched to them
    (a ``reasons`` column read as reason codes would send the tool's own error text as clinical data)."""
    return set(REJECTS_BOOKKEEPING) if is_own_rejects(columns) else set()


def is_own_rejects(columns: list[str]) -> bool:
    """Whether a table with these headers is a ``rejects.csv`` the tool wrote (perhaps fixed by hand since),
    whose formula guard comes off on reading."""
    shaped = len(columns) >= 3 and columns[:2] == ["source_file", "source_row"] and columns[-1] == "reasons"
    # A hand-edited header could unguard onto another one; then the file is read as written.
    return shaped and len({unguarded(c) for c in columns}) == len(columns)


def _without_blank_rows(frame: pl.DataFrame) -> tuple[pl.DataFrame, int]:
    """``frame`` without its blank rows (every cell empty or whitespace: an empty line, ``;;;;``), and
    how many there were. Their ``__row`` numbers are not reused: the rows left keep theirs."""
    cells = [c for c in frame.columns if c != ROW]
    if not cells or not frame.height:
        return frame, 0
    # Column by column, over the rows still blank so far: most rows are ruled out by their first
    # cells, so a wide batch costs about one column's check, not one per cell.
    blank = pl.int_range(0, frame.height, dtype=pl.UInt32, eager=True)
    for name in cells:
        column = frame.get_column(name)
        column = column if len(blank) == frame.height else column.gather(blank)
        blank = blank.filter(column.is_null() | (column.str.strip_chars() == ""))
        if blank.is_empty():
            return frame, 0
    keep = pl.repeat(True, frame.height, dtype=pl.Boolean, eager=True).scatter(blank, False)
    return frame.filter(keep), len(blank)


def _counting_blanks(batches: Iterator[pl.DataFrame], table: Table) -> Iterator[pl.DataFrame]:
    for batch in batches:
        kept, blank = _without_blank_rows(batch)
        table.blank_rows += blank
        yield kept


def _then(batches: Iterator[pl.DataFrame], done: Callable[[], None]) -> Iterator[pl.DataFrame]:
    yield from batches
    done()


def _first_record_end(data: bytes) -> int:
    """Just past the line break that ends the first record of ``data``, or -1 (see :func:`_record_end`)."""
    start, quotes = 0, 0
    while (end := data.find(b"\n", start)) >= 0:
        quotes += data.count(b'"', start, end)
        if quotes % 2 == 0:
            return end + 1
        start = end + 1
    return -1


def _record_end(data: bytes, start: int = 0) -> int:
    """Just past the last line break of ``data`` that ends a record (not one inside a quoted cell), or -1.

    ``data[start:]`` begins at a record's start. A line break ends a record when an even number of
    quotes precede it (an escaped quote, ``""``, counts twice and keeps the parity).
    """
    end = data.rfind(b"\n", start)
    quotes = _count(data, _QUOTE, start, end) if end >= 0 else 0
    while end >= 0:
        if quotes % 2 == 0:
            return end + 1
        previous = data.rfind(b"\n", start, end)
        quotes -= data.count(b'"', previous + 1 if previous >= 0 else start, end)
        end = previous
    return -1


def _count(data: bytes, byte: int, start: int, end: int) -> int:
    """How many ``byte`` ``data[start:end]`` holds: counted by numpy over a long span (see :data:`_SCAN_FROM`),
    once it is imported (:func:`etl.lazy_numpy.loaded`)."""
    if end - start < _SCAN_FROM or not loaded():  # the first chunk: numpy may still be on its way
        return data.count(bytes((byte,)), start, end)
    return int(np.count_nonzero(np.frombuffer(data, np.uint8, end - start, start) == byte))


def _lone_cr(data: bytes) -> bool:
    """Whether ``data`` holds a ``\\r`` that no ``\\n`` follows (old Mac line ends, or a mix of endings);
    looked for by numpy in a long ``data`` (see :data:`_SCAN_FROM`)."""
    if b"\r" not in data:
        return False
    if len(data) < _SCAN_FROM or not loaded():
        return _BARE_CR.search(data) is not None
    cells = np.frombuffer(data, np.uint8)
    after = np.flatnonzero(cells == _CR) + 1  # where each \r's next byte is
    return bool(after[-1] == cells.size or (cells[after] != _LF).any())


def _chunked(
    path: Path,
    header: list[str],
    skip: int,
    delimiter: str,
    rows: int,
    chunk_bytes: int,
    first_row: int = 2,
    bare_cr: Callable[[], None] | None = None,
    first_rows: int | None = None,
) -> Iterator[pl.DataFrame]:
    """The records after the header, parsed a chunk of whole records at a time, cut to ``rows``;
    the first is row ``first_row`` (the header's row and one). A chunk with lines that end in a lone
    ``\r`` has its line breaks read as a whole file's are (:func:`_read_csv`), and ``bare_cr`` is called.
    ``first_rows``: the first chunk is read for this many rows and its first batch holds this many (the
    chunk's other rows go with the next chunk's), so the checks of a long file start while the next batch is
    read."""
    next_row = first_row
    left: pl.DataFrame | None = None  # the rows of the last chunk that did not fill a batch
    start, tail = skip, 0  # where the next chunk starts in the file, and the bytes of it read before
    batch = first_rows or rows  # this chunk's batches, then ``rows``
    want = max(4096, chunk_bytes * batch // rows)
    with path.open("rb") as fh:
        while True:
            # The part of a record the last chunk cut off is read again with the next one, from the file
            # (a few bytes of page cache), not joined to it: that copied every chunk once more.
            fh.seek(start)
            data = fh.read(tail + want)
            more = len(data) > tail  # bytes not read before: not at the end yet
            if not more:
                if not data.strip():
                    break
                cut = len(data)  # the last record, with or without a final line break
            else:
                cut = _record_end(data, 0)
                if cut < 0:  # no record ends in this chunk yet (a long quoted cell): read on
                    tail = len(data)
                    continue
            size = len(data)
            records = data if cut == size else data[:cut]
            del data  # not held beside its records' copy while they are parsed, nor while a batch is out
            start, tail = start + cut, size - cut
            if records[:1] in (b"\n", b"\r") and not records.strip(b"\r\n"):
                # Blank lines alone (an export's last ones, cut into a chunk of their own): no rows, and nothing
                # polars could read columns from.
                if not more:
                    break
                continue
            if _lone_cr(records):  # old Mac lines, or mixed endings
                records = _LINE_BREAKS.sub(b"\n", records)
                if bare_cr is not None:
                    bare_cr()
            # One chunk per column: polars' reader leaves a chunk per thread's share, and every step
            # of validation after it is slower over many (and some of polars' string functions fail).
            frame = _parse_chunk(path, header, records, delimiter)
            del records  # nor the bytes once parsed
            frame = frame.with_row_index(ROW, offset=next_row).rechunk()
            next_row += frame.height
            # Whole batches of ``rows``: a chunk's last rows wait for the next chunk's first ones
            # (a short batch costs a whole batch's fixed overhead).
            spans = 0 if left is None else left.height  # the first batch holds the last chunk's rows too
            frame = frame if left is None else pl.concat([left, frame], rechunk=False)
            if batch < rows:  # the first chunk: one smaller batch, and its other rows go with the next chunk's
                yield frame.slice(0, batch).rechunk()
                left = frame.slice(batch) if batch < frame.height else None
                batch, want = rows, chunk_bytes
            else:
                full = frame.height - frame.height % rows
                for i in range(0, full, rows):
                    yield frame.slice(i, rows).rechunk() if i < spans else frame.slice(i, rows)  # one chunk each
                left = frame.slice(full) if full < frame.height else None
            if not more:
                break
    if left is not None:
        yield left


def _parse_chunk(path: Path, header: bytes | list[str], records: bytes, delimiter: str) -> pl.DataFrame:
    """Records parsed under a header: its line (then ``records`` may be empty), or its column names."""
    try:
        if isinstance(header, list):  # not prepended to the records: that would copy the chunk again
            return pl.read_csv(
                records,
                separator=delimiter,
                has_header=False,
                schema=dict.fromkeys(header, pl.String),
                quote_char='"',
            )
        return pl.read_csv(
            io.BytesIO(header + records), separator=delimiter, infer_schema=False, has_header=True, quote_char='"'
        )
    except pl.exceptions.PolarsError as exc:
        read_table(path)  # raises the InputError that names the row
        raise InputError(str(path), f"cannot be read as CSV: {_polars_reason(exc)}") from exc


def _head(path: Path) -> bytes:
    """The first bytes of a readable, non-empty regular file."""
    if path.is_dir():
        raise InputError(str(path), "is a folder, not a file")
    if not path.exists():
        raise InputError(str(path), "no such file")
    if not path.is_file():
        raise InputError(str(path), "is not a regular file (a device or a pipe?)")
    try:
        with path.open("rb") as fh:
            head = fh.read(_SNIFF_BYTES)
    except OSError as exc:
        raise InputError(str(path), f"cannot be read: {exc.strerror or exc}") from exc
    bare = head.strip()
    for bom in (codecs.BOM_UTF8, codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE):
        bare = bare.removeprefix(bom)
    if not bare.strip(b" \t\r\n\x00"):
        raise InputError(str(path), "the file is empty")
    return head


def _is_workbook(path: Path, head: bytes) -> bool:
    """Whether the content is an .xlsx workbook; refuses containers that are no table."""
    if head.startswith(_OLE_MAGIC):
        raise InputError(
            str(path),
            "is a password-protected (encrypted) workbook or a legacy .xls: "
            "remove the password, or save it as .xlsx or CSV",
        )
    if head.startswith(_ZIP_MAGICS):
        try:
            with zipfile.ZipFile(path) as archive:
                members = archive.namelist()
        except (zipfile.BadZipFile, OSError, ValueError):
            return True  # a damaged workbook, most likely: its reader says how
        if any(m.startswith("xl/") for m in members):
            return True
        shown = ", ".join(m[:60] for m in members[:3]) + (" ..." if len(members) > 3 else "")
        raise InputError(
            str(path), f"is a ZIP archive ({shown or 'empty'}), not a CSV or an Excel workbook: extract it first"
        )
    for magic, what in _NOT_TABLES.items():
        if head.startswith(magic):
            raise InputError(str(path), f"is {what}, not a CSV or an Excel workbook")
    return False


# -- HL7 ---------------------------------------------------------------------------


def _read_hl7(path: Path) -> Table:
    """An HL7 v2 file (:mod:`etl.hl7`): one row per RXA segment, numbered by the line it is on."""
    data = path.read_bytes()
    parsed = parse_hl7(data, str(path), row_column=ROW)
    notices = []
    if parsed.bad_byte is not None:
        notices.append(_fallback_notice(path, data, parsed.bad_byte))
    if parsed.empty_messages:
        rule, lines = RULES["message-without-dose"], parsed.empty_messages
        shown = ", ".join(map(str, lines[:10])) + (f" and {len(lines) - 10} more" if len(lines) > 10 else "")
        notices.append(Notice(rule.code, rule.text(count=len(lines), lines=shown), str(path), row=lines[0]))
    return Table(path, "hl7", parsed.frame, "", encoding=parsed.encoding, notices=notices)


# -- CSV ---------------------------------------------------------------------------


def _decode_choice(path: Path, head: bytes) -> tuple[str, list[Notice]]:
    """The encoding to read with: UTF-8 (with or without BOM), UTF-16 (BOM, or
    recognisably without), else cp1252."""
    if head.startswith(codecs.BOM_UTF8):
        return "utf-8", []
    if head.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        return "utf-16", []
    if b"\x00" in head:
        guess = _utf16_without_bom(head)
        if guess is None:
            raise InputError(str(path), "this looks like a binary file, not a CSV (it holds NUL bytes)")
        guessed = RULES["encoding-guessed"]
        notice = Notice(guessed.code, guessed.text(encoding=guess.upper()), str(path))
        return guess, [notice]
    controls = len(head) - len(head.translate(None, _CONTROL))
    if controls > max(8, len(head) // 100):
        raise InputError(str(path), "this looks like a binary file, not a CSV (it holds control characters)")
    try:
        # An incomplete multi-byte sequence may be cut at the sniff boundary.
        codecs.getincrementaldecoder("utf-8")().decode(head, final=False)
        return "utf-8", []
    except UnicodeDecodeError as exc:
        return "cp1252", [_fallback_notice(path, head, exc.start)]


def _utf16_without_bom(head: bytes) -> str | None:
    # UTF-16 text in a Latin script has a NUL in every other byte.
    sample = head[: len(head) // 2 * 2]
    pairs = len(sample) // 2
    if pairs < 2:
        return None
    high_first, high_second = sample[0::2].count(0) / pairs, sample[1::2].count(0) / pairs
    if high_second > 0.3 and high_first < 0.05:
        return "utf-16-le"
    if high_first > 0.3 and high_second < 0.05:
        return "utf-16-be"
    return None


def _fallback_notice(path: Path, data: bytes, offset: int) -> Notice:
    line = data.count(b"\n", 0, offset) + 1
    fallback = RULES["encoding-fallback"]
    return Notice(fallback.code, fallback.text(line=line, offset=offset), str(path))


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


def _has_bare_cr(path: Path) -> bool:
    """Whether any line ends in a lone ``\\r`` (old Mac files, or a mix of endings)."""
    carry = b""
    with path.open("rb") as fh:
        # The mapped file is searched where it lies, not read into memory in chunks to look (that cost
        # as much as parsing a migration-sized file); most files have no \r at all.
        try:
            with mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
                if mapped.find(b"\r") < 0:
                    return False
                return _BARE_CR.search(mapped) is not None or mapped[-1:] == b"\r"
        except (OSError, ValueError):  # not mappable (an empty file, a pipe): looked at in chunks
            pass
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            if b"\r" not in chunk and not carry:  # most files: nothing to look at
                continue
            data = carry + chunk
            # A \r at the end of a chunk may be the first half of \r\n.
            carry = b"\r" if data.endswith(b"\r") else b""
            if _BARE_CR.search(data[:-1] if carry else data):
                return True
    return carry == b"\r"


class _NotUtf8Error(Exception):
    """polars met bytes that are not UTF-8 past the sniffed head."""


def _read_csv(path: Path, head: bytes, hint: HeaderHint) -> Table:
    encoding, notices = _decode_choice(path, head)
    if encoding == "utf-8" and not _has_bare_cr(path):
        # The common case: polars reads the file itself, never held whole in Python.
        sample = head.decode("utf-8", errors="ignore").lstrip("\ufeff")
        try:
            return _parse_csv(path, path, sample, encoding, notices, hint)
        except _NotUtf8Error:
            pass  # bad bytes after the sniffed head: read it all as text below
    data = path.read_bytes()
    if encoding == "utf-8":
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            notices.append(_fallback_notice(path, data, exc.start))
            encoding, text = "cp1252", data.decode("cp1252", errors="replace")
    else:
        # polars reads UTF-8 only: transcode. These files are the exception,
        # not the migration-sized case, so holding them once is fine.
        text = data.decode(encoding, errors="replace")
    text = text.removeprefix("\ufeff")
    if "\r" in text:
        if _BARE_CR_TEXT_ALONE.search(text):
            notices.append(Notice(RULES["line-endings"].code, RULES["line-endings"].text(), str(path)))
        text = _BARE_CR_TEXT.sub("\n", text)
    return _parse_csv(path, io.BytesIO(text.encode("utf-8")), text[:_SNIFF_BYTES], encoding, notices, hint)


def _parse_csv(
    path: Path, source: Path | io.BytesIO, sample: str, encoding: str, notices: list[Notice], hint: HeaderHint
) -> Table:
    records = _records(sample, max(_HEADER_SCAN_ROWS, hint.row or 0))
    at, delimiter = _find_header(str(path), records, hint)
    try:
        frame = pl.read_csv(
            source,
            separator=delimiter,
            infer_schema=False,
            has_header=True,
            quote_char='"',
            raise_if_empty=True,
            # By line, not by record: polars passes over empty lines at the top of its own accord
            # when it counts records, and the rows above the header are not read as CSV anyway.
            skip_lines=at + sum(r.count("\n") for r in records[:at]),
        )
    except pl.exceptions.NoDataError as exc:
        raise InputError(str(path), "the file is empty") from exc
    except pl.exceptions.PolarsError as exc:
        reason = _polars_reason(exc)
        if "utf-8" in reason.lower() and encoding == "utf-8" and isinstance(source, Path):
            raise _NotUtf8Error from exc
        text = source.getvalue().decode("utf-8") if isinstance(source, io.BytesIO) else _lossy(source)
        row, located = _locate(text, delimiter, at)
        raise InputError(str(path), located or f"cannot be read as CSV: {reason}", row=row) from exc
    names, renamed = _name_headers(str(path), _raw_names(frame.columns), row=at + 1)
    frame = frame.rename(dict(zip(frame.columns, names, strict=True))).with_row_index(ROW, offset=at + 2)
    if at:
        notices.append(_title_notice(str(path), at))
    return Table(
        path, "csv", frame, "", encoding=encoding, delimiter=delimiter, notices=[*notices, *renamed], header_row=at + 1
    )


def _lossy(path: Path) -> str:
    return path.read_bytes().decode("utf-8", errors="replace")


def _polars_reason(exc: Exception) -> str:
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if "more fields than defined" in first:
        return "a row has more fields than the header (a stray delimiter or an unterminated quote?)"
    if "invalid utf-8" in first.lower():
        return "not valid UTF-8"
    return first[:300]


def _locate(text: str, delimiter: str, at: int = 0) -> tuple[int | None, str]:
    """The row (as a spreadsheet counts records) where ``text`` stops being a
    table, and why; ``(None, "")`` when Python's csv module finds nothing wrong.
    The header is row ``at + 1``: the rows above it are not the table's."""
    previous_limit = csv.field_size_limit(sys.maxsize)  # a 10 MB cell is data, not an error here
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter, strict=True)
    row, line, width = 0, 1, 0
    name = _DELIMITER_NAMES.get(delimiter, repr(delimiter))
    try:
        for row, record in enumerate(reader, start=1):
            if row <= at:
                pass
            elif row == at + 1:
                width = len(record)
            elif len(record) > width:
                return row, (
                    f"{len(record)} cells where the header has {width} (a stray {name}, or a quote that is not closed?)"
                )
            line = reader.line_num + 1
    except csv.Error as exc:
        if "end of data" in str(exc):
            return row + 1, f"a quoted cell opened on line {line} is never closed (an unterminated quote)"
        return row + 1, f"malformed quoting on line {reader.line_num}: {exc}"
    finally:
        csv.field_size_limit(previous_limit)
    return None, ""


# -- Excel -------------------------------------------------------------------------


def _read_xlsx(path: Path, sheet: str | None, limits: WorkbookLimits | None, hint: HeaderHint) -> Table:
    import fastexcel

    # Before the Excel reader sees it: a zip bomb, or a grid of billions of cells, would abort the
    # process (a Rust backtrace, no message) after taking gigabytes of memory.
    scan = scan_workbook(path, limits)
    if scan.problem is not None:
        raise InputError(str(path), scan.problem)
    try:
        reader = fastexcel.read_excel(str(path))
        names = list(reader.sheet_names)
        if not names:
            raise InputError(str(path), "the workbook has no sheets")
        if sheet is not None and sheet not in names:
            raise InputError(str(path), f"no sheet {sheet!r}; sheets: {', '.join(names)}")
        chosen = sheet if sheet is not None else names[0]
        # No header row and no skipped rows: the grid starts at the sheet's row 1,
        # so row numbers stay the sheet's even when the table starts lower down.
        grid = reader.load_sheet(chosen, header_row=None, skip_rows=0, dtypes="string").to_polars()
    except InputError:
        raise
    except Exception as exc:  # fastexcel raises its own CalamineError family
        first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
        raise InputError(
            str(path), f"cannot be read as an Excel workbook (damaged, truncated or not a workbook): {first}"
        ) from exc
    frame, notices, header_row = _sheet_table(path, grid.select(pl.all().cast(pl.String)), hint)
    _refuse_long_cells(path, chosen, frame)
    if sheet is None and len(names) > 1:
        others = RULES["other-sheets"]
        notices.append(Notice(others.code, others.text(sheet=chosen, others=", ".join(names[1:])), str(path)))
    return Table(path, "xlsx", frame, "", sheet=chosen, notices=notices, header_row=header_row)


def _refuse_long_cells(path: Path, sheet: str, frame: pl.DataFrame) -> None:
    """Refuse a sheet with a cell (or header) longer than Excel allows: Excel cannot have written it."""
    for name in frame.columns:
        if len(name) > EXCEL_MAX_CELL_CHARS:
            raise InputError(str(path), f"sheet {sheet!r}: a header holds {len(name):,} characters, {_OVER_EXCEL}")
    cells = [c for c in frame.columns if c != ROW]
    longest = frame.select(pl.col(cells).str.len_chars().max().fill_null(0))
    over = [c for c in cells if longest[c][0] > EXCEL_MAX_CELL_CHARS]
    if over:
        row = frame.filter(pl.col(over[0]).str.len_chars() > EXCEL_MAX_CELL_CHARS)[ROW][0]
        raise InputError(
            str(path),
            f"sheet {sheet!r}: a cell holds {longest[over[0]][0]:,} characters, {_OVER_EXCEL}",
            row=int(row),
            column=over[0],
        )


_OVER_EXCEL = f"over Excel's limit of {EXCEL_MAX_CELL_CHARS:,} (a crafted or damaged workbook)"


def _sheet_table(path: Path, grid: pl.DataFrame, hint: HeaderHint) -> tuple[pl.DataFrame, list[Notice], int]:
    """The header row (:func:`_find_header`) and the rows below it as data; the notices it earns; the header's row."""
    if not grid.width or not grid.height:
        raise InputError(str(path), "the sheet is empty: no header row")
    top = [[cell or "" for cell in row] for row in grid.head(max(_HEADER_SCAN_ROWS, hint.row or 0)).rows()]
    if hint.row is not None and hint.row > grid.height:
        raise InputError(str(path), f"--header-row {hint.row}: the sheet has {grid.height} rows")
    index, _ = _find_header(str(path), top, hint)
    names, notices = _name_headers(str(path), list(grid.row(index)), row=index + 1)
    if index:
        notices.insert(0, _title_notice(str(path), index))
    frame = grid.slice(index + 1).rename(dict(zip(grid.columns, names, strict=True)))
    return frame.with_row_index(ROW, offset=index + 2), notices, index + 1


# -- headers -------------------------------------------------------------------------


def _find_header(file: str, records: list[str] | list[list[str]], hint: HeaderHint) -> tuple[int, str]:
    """The header's index among a file's first ``records`` (0-based; rows above it are skipped) and
    the delimiter that splits it (``","`` for a workbook's rows, given as lists of cells).

    A CSV's records are lines of text: each is split by every candidate delimiter, and the one that
    names the most known columns (else gives the most cells) splits the header. See :class:`HeaderHint`.
    """
    if hint.row is not None:
        if hint.row < 1:
            raise InputError(file, f"--header-row {hint.row}: rows are numbered from 1")
        if hint.row > len(records):
            raise InputError(file, f"--header-row {hint.row}: the file's first rows hold {len(records)} rows")
        chosen = records[hint.row - 1]
        return hint.row - 1, sniff_delimiter(chosen) if isinstance(chosen, str) else ","
    first: int | None = None
    for i, record in enumerate(records[:_HEADER_SCAN_ROWS]):
        if _BLANK_RECORD.fullmatch(record) if isinstance(record, str) else all(not c.strip() for c in record):
            continue  # a blank row, or bare separators
        splits = [(d, _split(record, d)) for d in DELIMITERS] if isinstance(record, str) else [(",", record)]
        if first is None:
            first = i
        if hint.known is None:
            break
        known = hint.known
        score, _, delimiter = max(
            (sum(1 for c in cells if c.strip() and known(c)), len(cells), d) for d, cells in splits
        )
        if score >= _HEADER_MIN_KNOWN:
            return i, delimiter
    if first is None:
        raise InputError(file, "the file is empty: no header row")
    chosen = records[first]
    return first, sniff_delimiter(chosen) if isinstance(chosen, str) else ","


def _name_headers(file: str, cells: list[str | None], *, row: int) -> tuple[list[str], list[Notice]]:
    """Unique column names for a header row's ``cells``: a blank cell, or one repeating an earlier
    cell (ignoring surrounding spaces), is named ``column_N`` (N: its 1-based position), with one
    ``header-renamed`` notice naming each. A header row with no name at all is refused."""
    if not cells or all(c is None or not c.strip() for c in cells):
        raise InputError(file, "the header row is empty", row=row)
    names: list[str] = []
    seen: set[str] = set()
    taken = {c for c in cells if c is not None}
    renamed: list[str] = []
    for position, cell in enumerate(cells, start=1):
        text = cell if cell is not None else ""
        if text.strip() and text.strip() not in seen:
            seen.add(text.strip())
            names.append(text)
            continue
        name = f"column_{position}"
        while name in taken or name in names:
            name += "_"
        why = f"repeats {text.strip()!r}" if text.strip() else "blank"
        renamed.append(f"{name} ({column_letters(position)}, {why})")
        names.append(name)
    notices = []
    if renamed:
        rule = RULES["header-renamed"]
        notices.append(Notice(rule.code, rule.text(renamed=", ".join(renamed)), file, row=row))
    return names, notices


def _title_notice(file: str, skipped: int) -> Notice:
    rule = RULES["title-rows"]
    return Notice(rule.code, rule.text(row=skipped + 1, skipped=skipped), file, row=skipped + 1)


_BLANK_RECORD = re.compile(r'[\s,;|"]*')  # a record of nothing but separators, quotes and spaces
_POLARS_DUPLICATE = re.compile(r"^(.*)_duplicated_\d+$")


def _raw_names(columns: list[str]) -> list[str | None]:
    """A header's cells as the file wrote them, from the names polars gave them (``a_duplicated_0``
    for a second ``a``, ``_duplicated_0`` for a second blank)."""
    return [m.group(1) if (m := _POLARS_DUPLICATE.match(c)) else c for c in columns]


def _split(line: str, delimiter: str) -> list[str]:
    """One record of CSV text split into its cells (a damaged one by the delimiter alone)."""
    try:
        return next(csv.reader(io.StringIO(line, newline=""), delimiter=delimiter), [])
    except csv.Error:
        return line.split(delimiter)


def _records(sample: str, limit: int = _HEADER_SCAN_ROWS) -> list[str]:
    """The whole records at the start of ``sample`` (a line break inside quotes is no record's end);
    the last, perhaps cut short by the sample's end, is kept."""
    records: list[str] = []
    start, in_quotes = 0, False
    for i, ch in enumerate(sample):
        if ch == '"':
            in_quotes = not in_quotes
        elif ch == "\n" and not in_quotes:
            records.append(sample[start:i].removesuffix("\r"))
            start = i + 1
            if len(records) >= limit:
                return records
    if sample[start:].strip("\r\n"):
        records.append(sample[start:])
    return records
