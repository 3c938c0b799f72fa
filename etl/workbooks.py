"""Workbook limits: what an ``.xlsx`` may hold before it is handed to the Excel reader.

An ``.xlsx`` is a ZIP of XML parts, and a few kilobytes of ZIP can inflate to gigabytes (a
"zip bomb"), or describe a grid of billions of cells with two cells at opposite corners, which the
Excel reader would allocate whole. Either one used to end a run in an abort with a Rust backtrace
and gigabytes of memory. :func:`scan_workbook` reads every part once, inflating it a megabyte at a
time with its own byte counter, and stops at the first limit a part breaks:

- the bytes all parts declare, then the bytes they inflate to, together
  (:attr:`WorkbookLimits.max_bytes`); a part that inflates past its declared size is refused
  there, so a forged header cannot make the scan read more than the ZIP declares;
- a part's compression ratio once it inflates past 64 MiB (:attr:`WorkbookLimits.max_ratio`);
- the cells of a sheet, counted as elements, and the grid the reader would allocate for them,
  rows times columns as the cells' references say (:attr:`WorkbookLimits.max_cells`); the
  strings of the shared-string table count against the same limit;
- a run of more than 512 KiB of XML without markup: no cell Excel can write comes near that
  (:data:`EXCEL_MAX_CELL_CHARS` characters, at most 7 bytes each in its XML).

A part is scanned as XML when it starts as XML, whatever its name. The defaults are well above a
1,000,000-row, 50-column sheet (50,000,000 cells, 2.4 to 2.6 GB of XML). Memory stays at a few
megabytes whatever the workbook holds; the scan costs about as much CPU as the Excel reader's own
pass over the XML.
"""

from __future__ import annotations

import functools
import re
import struct
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

__all__ = [
    "EXCEL_MAX_CELL_CHARS",
    "WORKBOOK_MAX_BYTES",
    "WORKBOOK_MAX_CELLS",
    "WORKBOOK_MAX_RATIO",
    "WorkbookLimits",
    "WorkbookScan",
    "column_letters",
    "scan_workbook",
]

#: Excel's own limit on the characters of one cell.
EXCEL_MAX_CELL_CHARS = 32_767
#: Default cap on the bytes a workbook's parts inflate to, together (8 GiB).
WORKBOOK_MAX_BYTES = 8 * 1024**3
#: Default cap on the cells of a sheet, and on the rows x columns of the grid they span.
WORKBOOK_MAX_CELLS = 100_000_000
#: Default cap on a large part's compression ratio: a sheet's XML deflates 10:1 to 30:1 (the most
#: uniform sheets, every cell alike), a zip bomb about 1,000:1.
WORKBOOK_MAX_RATIO = 100

_LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
_CHUNK = 1 << 20  # bytes inflated at a time
_RATIO_FROM = 64 * 1024 * 1024  # small parts may compress as well as they like
_RUN_BLOCK = 512 * 1024  # a run this long without '<' may be refused; twice this always is
_LOCAL_HEADER = struct.Struct("<4s22xHH")  # signature, (22 bytes), name length, extra length
_WHITESPACE = bytes.maketrans(b"\t\r\n", b"   ")
_LOOSE_ROW = re.compile(rb'<row(?:>|/| (?!r="))')
_REFERENCE = re.compile(rb"""r=["']([A-Z]*)0*([0-9]*)""")
_ANY_REFERENCE = re.compile(rb"""\sr *= *["'] *([A-Z]*)0*([0-9]+)""")


@dataclass(frozen=True)
class WorkbookLimits:
    """The limits an ``.xlsx`` must keep to be read (settings ``xlsx_max_bytes``, ``xlsx_max_cells``,
    ``xlsx_max_ratio``)."""

    max_bytes: int = WORKBOOK_MAX_BYTES
    max_cells: int = WORKBOOK_MAX_CELLS
    max_ratio: int = WORKBOOK_MAX_RATIO


@dataclass
class WorkbookScan:
    """What :func:`scan_workbook` read: the bytes it inflated, the largest sheet it saw, and the
    first limit broken (``problem``, ``None`` when the workbook may be read)."""

    inflated: int = 0
    cells: int = 0  # of the sheet with the most cells
    grid: int = 0  # rows x columns of the largest grid, an upper bound
    problem: str | None = None


class _RefusedError(Exception):
    """A limit is broken: the message says which."""


def scan_workbook(path: Path, limits: WorkbookLimits | None = None) -> WorkbookScan:
    """Read every part of the ``.xlsx`` at ``path`` once, stopping at the first limit it breaks.

    A damaged or encrypted ZIP, and a part that inflates to another size than its header declares,
    are problems too. Reads at most :attr:`~WorkbookLimits.max_bytes` (and a megabyte) of XML.
    """
    limits = limits or WorkbookLimits()
    scan = WorkbookScan()
    try:
        with zipfile.ZipFile(path) as archive, path.open("rb") as fh:
            parts = [info for info in archive.infolist() if not info.is_dir()]
            declared = sum(info.file_size for info in parts)
            if declared > limits.max_bytes:
                raise _RefusedError(
                    f"its parts declare {declared:,} bytes uncompressed, over the {limits.max_bytes:,}-byte limit"
                    f"{_RAISE_BYTES}"
                )
            size = path.stat().st_size
            for info in parts:
                _scan_part(fh, size, info, limits, scan)
    except _RefusedError as exc:
        scan.problem = f"{exc}"
    except (zipfile.BadZipFile, zipfile.LargeZipFile, zlib.error, struct.error, EOFError, ValueError) as exc:
        scan.problem = f"is a damaged ZIP, not a readable workbook ({_first_line(exc)})"
    return scan


_RAISE_BYTES = " (a zip bomb? if not, raise CLINIK_ETL_XLSX_MAX_BYTES)"
_RAISE_CELLS = " (a crafted workbook? if not, raise CLINIK_ETL_XLSX_MAX_CELLS)"


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:200] if text else type(exc).__name__


def _scan_part(fh: BinaryIO, size: int, info: zipfile.ZipInfo, limits: WorkbookLimits, scan: WorkbookScan) -> None:
    name = info.filename
    if info.flag_bits & 0x1:
        raise _RefusedError(f"part {name!r} is encrypted: remove the workbook's password, or save it as CSV")
    if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
        method = info.compress_type
        raise _RefusedError(f"part {name!r} uses ZIP compression method {method}, which Excel does not write")
    fh.seek(info.header_offset)
    signature, name_length, extra_length = _LOCAL_HEADER.unpack(fh.read(_LOCAL_HEADER.size))
    if signature != b"PK\x03\x04":
        raise zipfile.BadZipFile(f"no local header for part {name!r}")
    fh.seek(name_length + extra_length, 1)
    left = min(info.compress_size, max(0, size - fh.tell()))
    xml: _XmlScan | None = None
    first = True
    inflater = zlib.decompressobj(-zlib.MAX_WBITS) if info.compress_type == zipfile.ZIP_DEFLATED else None
    produced, fed = 0, 0
    while left > 0 and not (inflater is not None and inflater.eof):
        raw = fh.read(min(_CHUNK, left))
        if not raw:
            break
        left -= len(raw)
        fed += len(raw)
        data = raw
        while data:
            out = inflater.decompress(data, _CHUNK) if inflater is not None else data
            data = inflater.unconsumed_tail if inflater is not None else b""
            consumed = fed - len(data)
            produced += len(out)
            scan.inflated += len(out)
            if produced > info.file_size:  # a forged header: the declared sizes are not to be trusted
                declared = f"the {info.file_size:,} bytes its header declares"
                raise zipfile.BadZipFile(f"part {name!r} inflates past {declared}")
            if scan.inflated > limits.max_bytes:
                raise _RefusedError(
                    f"part {name!r} inflates past the {limits.max_bytes:,}-byte limit (read {scan.inflated:,} bytes)"
                    f"{_RAISE_BYTES}"
                )
            if produced > _RATIO_FROM and produced > limits.max_ratio * consumed:
                raise _RefusedError(
                    f"part {name!r} inflates over {limits.max_ratio}:1 ({produced:,} bytes from {consumed:,}): "
                    "a zip bomb? if not, raise CLINIK_ETL_XLSX_MAX_RATIO"
                )
            if first and (head := out.lstrip(b"\xef\xbb\xbf \t\r\n")):
                # Told by content, not by name: the workbook's relationships may point at any part.
                first = False
                if head.startswith(b"<"):
                    xml = _XmlScan(name, limits, scan)
            if xml is not None and out:
                xml.feed(out)
            if inflater is not None and inflater.eof:
                break
    if inflater is not None and not inflater.eof:
        raise zipfile.BadZipFile(f"part {name!r} is truncated")
    if produced != info.file_size:
        raise zipfile.BadZipFile(f"part {name!r} inflates to {produced:,} bytes, its header says {info.file_size:,}")
    if xml is not None:
        xml.close()


class _XmlScan:
    """Counts and bounds of one XML part, fed a chunk at a time.

    Each chunk is cut just before its last ``<``: what follows (an unfinished tag, or text) is
    carried into the next, so every tag is seen whole, once.
    """

    def __init__(self, name: str, limits: WorkbookLimits, scan: WorkbookScan) -> None:
        self.name, self.limits, self.scan = name, limits, scan
        self.carry = b""
        self.sheet = False  # cells are counted from the part's <sheetData> on
        self.cells = self.strings = 0
        self.loose_cells = self.loose_rows = 0  # without a plain r="..." reference: placed one after another
        self.column, self.row = 0, 0  # the largest column seen; the row bound (see _round_up)

    def feed(self, data: bytes) -> None:
        last = data.rfind(b"<")
        if last < 0:
            self.carry += data
            if len(self.carry) > 2 * _RUN_BLOCK:
                self._refuse_run()
            return
        segment, self.carry = self.carry + data[:last], data[last:]
        self._segment(segment)

    def close(self) -> None:
        self._segment(self.carry)
        self.carry = b""

    def _refuse_run(self) -> None:
        raise _RefusedError(
            f"part {self.name!r} holds a value over {_RUN_BLOCK:,} bytes long, far past Excel's "
            f"{EXCEL_MAX_CELL_CHARS:,} characters a cell (a crafted or damaged workbook)"
        )

    def _segment(self, segment: bytes) -> None:
        # Whole tags and the text between them: a stretch without '<' as long as a block is refused.
        for start in range(0, len(segment), _RUN_BLOCK):
            if segment.find(b"<", start, start + _RUN_BLOCK) < 0 and len(segment) - start >= _RUN_BLOCK:
                self._refuse_run()
        # Tabs and line breaks between a tag's name and its attributes are rare: spaces, when there are any.
        text = segment.translate(_WHITESPACE) if any(c in segment for c in (b"\t", b"\r", b"\n")) else segment
        if not self.sheet:
            self.strings += text.count(b"<si") + text.count(b":si")
            if self.strings > self.limits.max_cells:
                raise _RefusedError(f"part {self.name!r} holds over {self.limits.max_cells:,} strings{_RAISE_CELLS}")
            at = text.find(b"sheetData")
            if at < 0:
                return
            self.sheet, text = True, text[at:]
        # The usual sheet: every cell <c r="A1" ...> and every row <row r="1" ...>. Anything else
        # (no reference, attributes in another order, a namespace prefix) is counted as loose.
        plain = text.count(b'<c r="')
        cells = text.count(b"<c")  # cells, and in a rich-text cell <color .../>: an upper bound
        if cells > plain:  # some are not plain: count exactly
            cells = text.count(b"<c ") + text.count(b"<c>") + text.count(b"<c/")
        rows = loose_rows = 0
        if _LOOSE_ROW.search(text):
            rows = text.count(b"<row ") + text.count(b"<row>") + text.count(b"<row/")
            loose_rows = rows - text.count(b'<row r="')
        if b":c" in text or b":row" in text:  # elements with a namespace prefix (<x:c ...>)
            cells += text.count(b":c ") + text.count(b":c>") + text.count(b":c/")
            plain += text.count(b':c r="')
            loose_rows += text.count(b":row ") + text.count(b":row>") + text.count(b":row/")
            loose_rows -= text.count(b':row r="')
        self.cells += cells
        self.loose_cells += max(0, cells - plain)
        self.loose_rows += max(0, loose_rows)
        self._references(text)
        if cells > plain or loose_rows > 0:
            # Attributes in another order, quoted or spaced otherwise: every reference, the slow way.
            for letters, digits in _ANY_REFERENCE.findall(text):
                self.column = max(self.column, _column_number(letters))
                self.row = max(self.row, _round_up(int(digits)))
        # A cell or row without a plain reference is placed after the one before it: count each as
        # widening (or lengthening) the grid, an upper bound of what the reader allocates.
        grid = (self.row + self.loose_rows) * (self.column + self.loose_cells)
        self.scan.cells = max(self.scan.cells, self.cells)
        self.scan.grid = max(self.scan.grid, grid)
        if self.cells > self.limits.max_cells:
            raise _RefusedError(f"a sheet ({self.name!r}) holds over {self.limits.max_cells:,} cells{_RAISE_CELLS}")
        if grid > self.limits.max_cells:
            raise _RefusedError(
                f"a sheet ({self.name!r}) spans a grid of over {self.limits.max_cells:,} cells "
                f"(rows x columns){_RAISE_CELLS}"
            )

    def _references(self, text: bytes) -> None:
        """Raise the largest column and the row bound to what the references in ``text`` say.

        A search for a reference beyond the largest so far is one scan in C; it finds something
        only when a bound grows, which happens a few hundred times in a whole sheet.
        """
        for quote in ('"', "'") if b"'" in text else ('"',):
            pos = 0
            while match := _beyond(self.column, self.row, quote).search(text, pos):
                # The reference whole: one past the column may be past the row too.
                whole = _REFERENCE.match(text, match.start())
                assert whole is not None  # what _beyond matched starts as a reference
                letters, digits = whole.groups()
                self.column = max(self.column, _column_number(letters))
                self.row = max(self.row, _round_up(int(digits or b"0")))
                pos = match.start() + 1


def _column_number(letters: bytes) -> int:
    number = 0
    for letter in letters:
        number = number * 26 + letter - 64
    return number


def column_letters(number: int) -> str:
    """A spreadsheet's letters for a 1-based column number: 1 is A, 27 is AA."""
    letters = ""
    while number > 0:
        number, rest = divmod(number - 1, 26)
        letters = chr(65 + rest) + letters
    return letters


def _round_up(row: int) -> int:
    """``row`` rounded up to two significant digits (``1,000,001`` -> ``1,099,999``), at most 10% more,
    so the row bound grows a few hundred times in a sheet, not once a row."""
    if row < 100:
        return row
    step = int(10 ** (len(str(row)) - 2))
    return (row // step + 1) * step - 1


def _greater(value: str, alphabet: str) -> str:
    """A regex of the strings over ``alphabet`` of ``value``'s length that sort after it."""
    options = []
    for i, char in enumerate(value):
        above = alphabet[alphabet.index(char) + 1 :]  # a contiguous range of the alphabet
        if above:
            rest = f"[{alphabet[0]}-{alphabet[-1]}]{{{len(value) - i - 1}}}" if i < len(value) - 1 else ""
            options.append(f"{re.escape(value[:i])}[{above[0]}-{above[-1]}]{rest}")
    return "|".join(options)


@functools.lru_cache(maxsize=64)
def _beyond(column: int, row: int, quote: str) -> re.Pattern[bytes]:
    """A reference (``r="AB12"``, or a row's ``r="12"``) past ``column`` (group 1: its letters) or
    past ``row`` (group 2: the row)."""
    letters, digits = column_letters(column), str(row)
    columns = f"[A-Z]{{{len(letters) + 1},}}" + ("|" + _greater(letters, _LETTERS) if letters else "")
    rows = f"[1-9][0-9]{{{len(digits)},}}|" + _greater(digits, "0123456789")
    return re.compile(f"r={quote}(?:({columns})[0-9]|[A-Z]*0*({rows}){quote})".encode())
