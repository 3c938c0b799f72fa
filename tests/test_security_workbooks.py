"""Hostile workbooks: zip bombs, forged ZIP headers, grids of billions of cells, overlong cells.

Each is refused before the Excel reader sees it, in one line naming the file, with exit code 2;
how early a check stopped is told by the bytes it inflated (never by a clock). The workbooks are
written here by hand (a ZIP of XML parts), so that a header can lie and a part can inflate to
gigabytes from a few megabytes: a deflate block compressed once is repeated, each copy closed by
a full flush, which makes it a stream of its own that inflates the same every time.
"""

from __future__ import annotations

import os
import struct
import subprocess
import sys
import zipfile
import zlib
from collections.abc import Iterator
from pathlib import Path

import fastexcel
import pytest
import xlsxwriter
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from etl.cli import main
from etl.errors import InputError
from etl.readers import read_batches, read_table
from etl.settings import Settings
from etl.workbooks import (
    EXCEL_MAX_CELL_CHARS,
    WORKBOOK_MAX_BYTES,
    WORKBOOK_MAX_CELLS,
    WorkbookLimits,
    scan_workbook,
)

MiB = 1024 * 1024
NS = 'xmlns="http://schemas.openxmlformats.org/spreadsheetml/2006/main"'
RELS_NS = 'xmlns="http://schemas.openxmlformats.org/package/2006/relationships"'
DOC_TYPE = "http://schemas.openxmlformats.org/officeDocument/2006/relationships"
CONTENT_TYPES = (
    '<?xml version="1.0" encoding="UTF-8"?><Types xmlns="http://schemas.openxmlformats.org/package/2006/content-types">'
    '<Default Extension="rels" ContentType="application/vnd.openxmlformats-package.relationships+xml"/>'
    '<Default Extension="xml" ContentType="application/xml"/>'
    '<Override PartName="/xl/workbook.xml" '
    'ContentType="application/vnd.openxmlformats-officedocument.spreadsheetml.sheet.main+xml"/>'
    '<Override PartName="/xl/worksheets/sheet1.xml" '
    'ContentType="application/vnd.openxmlformats-officedocument.spreadsheetml.worksheet+xml"/></Types>'
)
PACKAGE_RELS = (
    f'<?xml version="1.0" encoding="UTF-8"?><Relationships {RELS_NS}>'
    f'<Relationship Id="rId1" Type="{DOC_TYPE}/officeDocument" Target="xl/workbook.xml"/></Relationships>'
)
WORKBOOK = (
    f'<?xml version="1.0" encoding="UTF-8"?><workbook {NS} xmlns:r="{DOC_TYPE}">'
    '<sheets><sheet name="Vax" sheetId="1" r:id="rId1"/></sheets></workbook>'
)
WORKBOOK_RELS = (
    f'<?xml version="1.0" encoding="UTF-8"?><Relationships {RELS_NS}>'
    f'<Relationship Id="rId1" Type="{DOC_TYPE}/worksheet" Target="worksheets/sheet1.xml"/></Relationships>'
)
SHEET_HEAD = f'<?xml version="1.0" encoding="UTF-8"?><worksheet {NS}><sheetData>'.encode()
SHEET_TAIL = b"</sheetData></worksheet>"


def cell(ref: str, text: str) -> str:
    return f'<c r="{ref}" t="inlineStr"><is><t>{text}</t></is></c>'


def row(number: int, *cells: str) -> str:
    return f'<row r="{number}">{"".join(cells)}</row>'


HEADER_ROW = row(1, cell("A1", "Record ID"), cell("B1", "Patient ID"))


class Part:
    """A ZIP member: ``head``, then ``block`` ``repeat`` times, then ``tail``, deflated; ``declared``
    overrides the uncompressed size its headers state."""

    def __init__(
        self, head: bytes, block: bytes = b"", repeat: int = 0, tail: bytes = b"", declared: int | None = None
    ) -> None:
        self.head, self.block, self.repeat, self.tail, self.declared = head, block, repeat, tail, declared

    @property
    def size(self) -> int:
        return len(self.head) + len(self.block) * self.repeat + len(self.tail)

    def deflated(self) -> Iterator[bytes]:
        compressor = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
        yield compressor.compress(self.head) + compressor.flush(zlib.Z_FULL_FLUSH)
        if self.repeat:
            # After a full flush the compressor starts afresh: the same block deflates to the same bytes.
            once = compressor.compress(self.block) + compressor.flush(zlib.Z_FULL_FLUSH)
            for _ in range(self.repeat):
                yield once
        yield compressor.compress(self.tail) + compressor.flush(zlib.Z_FINISH)

    def crc(self) -> int:
        if self.repeat * len(self.block) > 64 * MiB:
            return 0  # a bomb's checksum is not worth computing: no reader gets that far
        return zlib.crc32(self.head + self.block * self.repeat + self.tail)


def write_zip(path: Path, parts: dict[str, Part], *, flags: int = 0, method: int = 8) -> Path:
    """A ZIP written member by member (no ZIP64: every size below 4 GiB)."""
    central = []
    with path.open("wb") as out:
        for name, part in parts.items():
            raw = name.encode()
            offset = out.tell()
            crc, size = part.crc(), part.size if part.declared is None else part.declared
            out.write(struct.pack("<4s5H3I2H", b"PK\x03\x04", 20, flags, method, 0, 0, crc, 0, size, len(raw), 0))
            out.write(raw)
            start = out.tell()
            for piece in part.deflated():
                out.write(piece)
            compressed = out.tell() - start
            out.seek(offset + 18)
            out.write(struct.pack("<I", compressed))
            out.seek(0, os.SEEK_END)
            central.append(
                struct.pack(
                    "<4s6H3I5H2I",
                    b"PK\x01\x02",
                    20,
                    20,
                    flags,
                    method,
                    0,
                    0,
                    crc,
                    compressed,
                    size,
                    len(raw),
                    0,
                    0,
                    0,
                    0,
                    0,
                    offset,
                )
                + raw
            )
        directory = out.tell()
        for entry in central:
            out.write(entry)
        size = out.tell() - directory
        out.write(struct.pack("<4s4H2IH", b"PK\x05\x06", 0, 0, len(central), len(central), size, directory, 0))
    return path


def workbook(path: Path, sheet: Part, *, part: str = "sheet1.xml", **options: int) -> Path:
    """A one-sheet workbook around ``sheet`` (the sheet part's XML), stored as ``xl/worksheets/<part>``."""
    parts = {
        "[Content_Types].xml": Part(CONTENT_TYPES.encode()),
        "_rels/.rels": Part(PACKAGE_RELS.encode()),
        "xl/workbook.xml": Part(WORKBOOK.encode()),
        "xl/_rels/workbook.xml.rels": Part(WORKBOOK_RELS.replace("sheet1.xml", part).encode()),
        f"xl/worksheets/{part}": sheet,
    }
    return write_zip(path, parts, **options)


def sheet(rows: str) -> Part:
    return Part(SHEET_HEAD + rows.encode() + SHEET_TAIL)


def validate(path: Path, tmp_path: Path, env: dict[str, str] | None = None) -> tuple[int, str]:
    result = CliRunner(env=env).invoke(main, ["validate", str(path), "--report-dir", str(tmp_path / "report")])
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    return result.exit_code, result.output


def assert_refused(code: int, output: str, path: Path, *needles: str) -> None:
    assert code == 2, output
    assert "Traceback" not in output
    errors = [line for line in output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and str(path) in errors[0], output
    for needle in needles:
        assert needle in output.replace("\n", " "), output


# -- the hand-written workbooks are real ones -------------------------------------------


def test_a_hand_written_workbook_reads_as_any_other(tmp_path: Path) -> None:
    path = workbook(tmp_path / "ok.xlsx", sheet(HEADER_ROW + row(2, cell("A2", "R1"), cell("B2", "P1"))))
    table = read_table(path)
    assert table.columns == ["Record ID", "Patient ID"]
    assert table.frame["Record ID"].to_list() == ["R1"]
    scan = scan_workbook(path)
    with zipfile.ZipFile(path) as archive:
        assert scan.inflated == sum(info.file_size for info in archive.infolist())
    assert (scan.problem, scan.cells, scan.grid) == (None, 4, 4)


# -- zip bombs ---------------------------------------------------------------------------


def bomb(path: Path, gigabytes: float, cell: bytes = b'<c r="A2" t="inlineStr"><is><t>x</t></is></c>') -> Path:
    """A sheet whose XML inflates to about ``gigabytes`` GB of ``cell``, a few MB on disk."""
    block = cell * (MiB // len(cell))  # deflated once, about 1 KB
    repeat = int(gigabytes * 1e9) // len(block)
    head = SHEET_HEAD + HEADER_ROW.encode() + b'<row r="2">'
    return workbook(path, Part(head, block, repeat, b"</row>" + SHEET_TAIL))


def test_a_zip_bomb_is_refused_by_its_compression_ratio_after_64_mib(tmp_path: Path) -> None:
    path = bomb(tmp_path / "bomb.xlsx", 3)
    assert path.stat().st_size < 10 * MiB
    scan = scan_workbook(path)
    assert scan.problem is not None and "inflates over 100:1" in scan.problem
    assert 64 * MiB < scan.inflated <= 66 * MiB  # 3 GB declared; the check stopped reading at 64 MiB
    code, output = validate(path, tmp_path)
    assert_refused(code, output, path, "zip bomb", "CLINIK_ETL_XLSX_MAX_RATIO")


def test_declared_sizes_over_the_limit_are_refused_before_inflating_anything(tmp_path: Path) -> None:
    path = bomb(tmp_path / "bomb.xlsx", 0.02)
    scan = scan_workbook(path, WorkbookLimits(max_bytes=10 * MiB))
    assert scan.problem is not None and "declare" in scan.problem
    assert scan.inflated == 0
    code, output = validate(path, tmp_path, env={"CLINIK_ETL_XLSX_MAX_BYTES": str(10 * MiB)})
    assert_refused(code, output, path, "over the 10,485,760-byte limit", "CLINIK_ETL_XLSX_MAX_BYTES")


def test_a_header_that_understates_a_part_stops_the_inflating_at_its_declared_size(tmp_path: Path) -> None:
    # The headers say 1 KB; the part inflates to 200 MB, at a ratio the ratio check lets through.
    block = os.urandom(512).hex().encode()  # hex text deflates about 2:1
    forged = Part(SHEET_HEAD, block, 200_000, SHEET_TAIL, declared=1000)
    path = workbook(tmp_path / "forged.xlsx", forged)
    scan = scan_workbook(path)
    assert scan.problem is not None and "damaged ZIP" in scan.problem and "declares" in scan.problem
    assert scan.inflated <= 1000 + 2 * MiB
    code, output = validate(path, tmp_path)
    assert_refused(code, output, path, "damaged ZIP")


@pytest.mark.slow
@pytest.mark.parametrize(
    ("env", "says"),
    [
        ({}, "inflates over 100:1"),
        # with the ratio check off, the cell limit stops 3 GB of 12-byte cells (at 120 MB with this one)
        ({"CLINIK_ETL_XLSX_MAX_RATIO": str(10**6), "CLINIK_ETL_XLSX_MAX_CELLS": str(10**7)}, "over 10,000,000 cells"),
    ],
    ids=["defaults", "ratio-off"],
)
def test_a_gigabyte_zip_bomb_stops_under_one_gib_of_memory_exit_2(
    tmp_path: Path, env: dict[str, str], says: str
) -> None:
    """The real case, in a process of its own, whose peak memory the kernel reports."""
    path = bomb(tmp_path / "bomb.xlsx", 3, b'<c r="A2"/>')
    process = subprocess.Popen(
        [sys.executable, "-m", "etl.cli", "validate", str(path), "--report-dir", str(tmp_path / "r")],
        env={**os.environ, **env},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    assert process.stderr is not None
    with process.stderr:
        output = process.stderr.read().decode()
    _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    assert_refused(process.returncode, output, path, says)
    assert usage.ru_maxrss * 1024 < 1024**3  # ru_maxrss is in KiB on Linux


# -- grids, cells and strings --------------------------------------------------------------


def test_two_cells_at_opposite_corners_are_refused_not_allocated(tmp_path: Path) -> None:
    # The Excel reader would allocate the 1,048,576 x 16,384 grid between them, and abort.
    corners = HEADER_ROW + row(1048576, cell("XFD1048576", "x"))
    path = workbook(tmp_path / "corners.xlsx", sheet(corners))
    assert path.stat().st_size < 4096
    code, output = validate(path, tmp_path)
    assert_refused(code, output, path, "spans a grid of over 100,000,000 cells", "CLINIK_ETL_XLSX_MAX_CELLS")


@pytest.mark.parametrize(
    ("refs", "grid"),
    [
        (["A1", "B1", "A2", "B2"], 2 * 2),
        (["AA3", "Z5", "B10", "A1"], 27 * 10),  # out of order: the largest column and row still count
        (["ZZ1", "AAA2", "ZY99"], 703 * 99),
        (["B7", "XFC3", "XFD1", "A0010"], 16384 * 10),  # leading zeros in the row
        (["C123456", "D99999"], 4 * 129_999),  # rows past 99 are rounded up: at most 10% more
    ],
)
def test_the_grid_bound_is_the_largest_column_times_the_largest_row(tmp_path: Path, refs: list[str], grid: int) -> None:
    cells = "".join(f'<c r="{ref}"><v>1</v></c>' for ref in refs)
    path = workbook(tmp_path / "refs.xlsx", sheet(row(1) + f'<row r="1">{cells}</row>'))
    scan = scan_workbook(path, WorkbookLimits(max_cells=10**12))
    assert (scan.problem, scan.grid) == (None, grid)


REFERENCE_FORMS = {
    "plain": '<c r="{ref}"><v>1</v></c>',
    "quoted": "<c r='{ref}'><v>1</v></c>",
    "spaced": '<c t="n" r = "{ref}"><v>1</v></c>',
    "none": "<c><v>1</v></c>",
}


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    rows=st.lists(
        st.tuples(
            st.integers(1, 300),  # the row's own number
            st.booleans(),  # whether the <row> says it
            st.lists(
                st.tuples(st.sampled_from(sorted(REFERENCE_FORMS)), st.integers(1, 800), st.integers(1, 300)),
                min_size=1,
                max_size=4,
            ),
        ),
        min_size=1,
        max_size=6,
    )
)
def test_the_grid_bound_is_never_below_what_the_reader_allocates(
    tmp_path: Path, rows: list[tuple[int, bool, list[tuple[str, int, int]]]]
) -> None:
    xml = ""
    for number, numbered, cells in rows:
        inner = "".join(REFERENCE_FORMS[form].format(ref=f"{_letters(column)}{at}") for form, column, at in cells)
        xml += (f'<row r="{number}">' if numbered else "<row>") + inner + "</row>"
    path = workbook(tmp_path / "random.xlsx", sheet(xml))
    scan = scan_workbook(path, WorkbookLimits(max_cells=10**12))
    assert scan.problem is None
    reader = fastexcel.read_excel(str(path))
    frame = reader.load_sheet(reader.sheet_names[0], header_row=None, skip_rows=0).to_polars()
    assert scan.grid >= frame.height * frame.width


def _letters(column: int) -> str:
    letters = ""
    while column:
        column, rest = divmod(column - 1, 26)
        letters = chr(65 + rest) + letters
    return letters


def test_a_sheet_part_is_told_by_its_content_not_its_name(tmp_path: Path) -> None:
    ok = workbook(tmp_path / "ok.xlsx", sheet(HEADER_ROW + row(2, cell("A2", "R1"))), part="data.bin")
    assert read_table(ok).frame["Record ID"].to_list() == ["R1"]  # the reader follows the relationship
    corners = sheet(HEADER_ROW + row(1048576, cell("XFD1048576", "x")))
    path = workbook(tmp_path / "corners.xlsx", corners, part="data.bin")
    code, output = validate(path, tmp_path)
    assert_refused(code, output, path, "spans a grid")


@pytest.mark.parametrize(
    "rows",
    [
        # a reference with its attributes in another order, single quotes and spaces around '='
        HEADER_ROW + "<row r='900000'><c t=\"inlineStr\" r = 'ZZ900000'><is><t>x</t></is></c></row>",
        # cells without a reference are placed one after another: 200 of them on row 1,000,000
        HEADER_ROW + row(1_000_000, *['<c t="inlineStr"><is><t>x</t></is></c>'] * 200),
        # a namespace prefix on every element
        HEADER_ROW + '<x:row r="1000000"><x:c r="CV1000000"><x:v>1</x:v></x:c></x:row>',
    ],
    ids=["odd-reference", "cells-without-reference", "prefixed"],
)
def test_a_grid_is_bounded_whatever_form_its_references_take(tmp_path: Path, rows: str) -> None:
    path = workbook(tmp_path / "grid.xlsx", sheet(rows))
    scan = scan_workbook(path)
    assert scan.problem is not None and "grid" in scan.problem, scan
    assert scan.grid > WORKBOOK_MAX_CELLS


def test_the_cell_limit_is_settable_and_counts_cells(tmp_path: Path) -> None:
    rows = HEADER_ROW + "".join(row(n, cell(f"A{n}", f"R{n}"), cell(f"B{n}", "P")) for n in range(2, 52))
    path = workbook(tmp_path / "cells.xlsx", sheet(rows))
    assert (scan_workbook(path).cells, scan_workbook(path).problem) == (102, None)
    assert read_table(path, limits=WorkbookLimits(max_cells=102)).frame.height == 50
    with pytest.raises(InputError, match="holds over 101 cells"):
        read_table(path, limits=WorkbookLimits(max_cells=101))
    code, output = validate(path, tmp_path, env={"CLINIK_ETL_XLSX_MAX_CELLS": "101"})
    assert_refused(code, output, path, "holds over 101 cells")


def test_settings_carry_the_limits_to_batched_reads(tmp_path: Path) -> None:
    rows = HEADER_ROW + "".join(row(n, cell(f"A{n}", f"R{n}"), cell(f"B{n}", "P")) for n in range(2, 12))
    path = workbook(tmp_path / "cells.xlsx", sheet(rows))
    settings = Settings(xlsx_max_cells=12)
    assert settings.workbook_limits == WorkbookLimits(WORKBOOK_MAX_BYTES, 12)
    with pytest.raises(InputError, match="holds over 12 cells"):
        read_batches(path, limits=settings.workbook_limits)
    assert sum(b.height for b in read_batches(path, limits=Settings().workbook_limits).batches) == 10


def test_a_shared_string_table_counts_against_the_cell_limit(tmp_path: Path) -> None:
    path = tmp_path / "strings.xlsx"
    book = xlsxwriter.Workbook(str(path))
    sheet_ = book.add_worksheet("Vax")
    sheet_.write_row(0, 0, ["Record ID", "Patient ID"])
    for n in range(1, 40):
        sheet_.write_row(n, 0, [f"R{n}", f"P{n}"])
    book.close()
    assert read_table(path).frame.height == 39
    with pytest.raises(InputError, match="strings"):
        # 80 distinct strings, 80 cells: the table is refused first, as it is read first
        read_table(path, limits=WorkbookLimits(max_cells=79))


def test_a_value_of_megabytes_without_markup_is_refused_after_a_megabyte(tmp_path: Path) -> None:
    blob = Part(
        SHEET_HEAD + HEADER_ROW.encode() + b'<row r="2"><c r="A2" t="inlineStr"><is><t>',
        b"A" * 4096,
        200_000,
        b"</t></is></c></row>" + SHEET_TAIL,
    )
    path = workbook(tmp_path / "blob.xlsx", blob)
    scan = scan_workbook(path)
    assert scan.problem is not None and "32,767 characters" in scan.problem
    assert scan.inflated <= 3 * MiB  # of 819 MB


@pytest.mark.parametrize("length", [EXCEL_MAX_CELL_CHARS, EXCEL_MAX_CELL_CHARS + 1, 100_000])
def test_a_cell_longer_than_excel_allows_refuses_the_file_naming_row_and_column(tmp_path: Path, length: int) -> None:
    rows = HEADER_ROW + row(2, cell("A2", "R1"), cell("B2", "P1")) + row(3, cell("A3", "R2"), cell("B3", "é" * length))
    path = workbook(tmp_path / "long.xlsx", sheet(rows))
    if length == EXCEL_MAX_CELL_CHARS:
        assert read_table(path).frame["Patient ID"].str.len_chars().max() == length
        return
    with pytest.raises(InputError) as info:
        read_table(path)
    assert (info.value.row, info.value.column) == (3, "Patient ID")
    assert f"a cell holds {length:,} characters, over Excel's limit of 32,767" in info.value.message
    code, output = validate(path, tmp_path)
    assert_refused(code, output, path, "row 3", "'Patient ID'", "sheet 'Vax'")


# -- ZIPs that are no workbook -------------------------------------------------------------


def test_an_encrypted_part_is_refused(tmp_path: Path) -> None:
    path = workbook(tmp_path / "encrypted.xlsx", sheet(HEADER_ROW), flags=0x1)
    code, output = validate(path, tmp_path)
    assert_refused(code, output, path, "encrypted")


def test_a_compression_excel_does_not_write_is_refused(tmp_path: Path) -> None:
    path = workbook(tmp_path / "bzip2.xlsx", sheet(HEADER_ROW), method=12)
    code, output = validate(path, tmp_path)
    assert_refused(code, output, path, "compression method 12")


@pytest.mark.parametrize("cut", [0.3, 0.6, 0.9])
def test_a_truncated_or_garbled_workbook_is_one_line_exit_2(tmp_path: Path, cut: float) -> None:
    whole = workbook(tmp_path / "whole.xlsx", sheet(HEADER_ROW + row(2, cell("A2", "R1")))).read_bytes()
    path = tmp_path / "broken.xlsx"
    at = int(len(whole) * cut)
    path.write_bytes(whole[:at] + bytes(b ^ 0x5A for b in whole[at : at + 64]) + whole[at + 64 :])
    code, output = validate(path, tmp_path)
    assert_refused(code, output, path)
