"""Readers: delimiters, encodings, quoted newlines, Excel, and clear errors."""

from __future__ import annotations

import codecs
import datetime as dt
from pathlib import Path

import polars as pl
import pytest
import xlsxwriter
from hypothesis import given, settings
from hypothesis import strategies as st

from etl import readers
from etl.errors import InputError
from etl.mapping import default_profile, known_header
from etl.readers import ROW, HeaderHint, read_batches, read_table, sniff_delimiter

ROWS = 'id,zip,cvx,note\nr1,02134,08,"two\nlines"\nr2,10003,8,plain\n'


@pytest.mark.parametrize("delimiter", [",", ";", "\t", "|"])
def test_delimiters_are_sniffed(tmp_path: Path, delimiter: str) -> None:
    path = tmp_path / "f.csv"
    path.write_text(ROWS.replace(",", delimiter), encoding="utf-8")
    table = read_table(path)
    assert table.delimiter == delimiter
    assert table.columns == ["id", "zip", "cvx", "note"]
    assert table.frame.get_column("note").to_list() == ["two\nlines", "plain"]


def test_text_keeps_leading_zeros_and_rows_are_spreadsheet_numbers(tmp_path: Path) -> None:
    path = tmp_path / "f.csv"
    path.write_text(ROWS, encoding="utf-8")
    frame = read_table(path).frame
    assert frame.get_column("zip").to_list() == ["02134", "10003"]
    assert frame.get_column("cvx").to_list() == ["08", "8"]
    assert frame.get_column(ROW).to_list() == [2, 3]  # header is row 1


def test_bom_and_cp1252_fallback(tmp_path: Path) -> None:
    bom = tmp_path / "bom.csv"
    bom.write_bytes(codecs.BOM_UTF8 + "name\nZoë\n".encode())
    table = read_table(bom)
    assert table.columns == ["name"] and table.notices == []
    legacy = tmp_path / "legacy.csv"
    legacy.write_bytes("name;city\nJosé;Málaga\n".encode("cp1252"))
    table = read_table(legacy)
    assert table.encoding == "cp1252"
    assert table.frame.get_column("name").to_list() == ["José"]
    assert [n.code for n in table.notices] == ["encoding-fallback"]


def test_utf16_with_bom(tmp_path: Path) -> None:
    path = tmp_path / "u16.csv"
    path.write_bytes("a,b\n1,é\n".encode("utf-16"))
    assert read_table(path).frame.get_column("b").to_list() == ["é"]


@pytest.mark.parametrize(
    ("content", "needle"),
    [
        (b"", "empty"),
        (b"   \n", "empty"),
        (b"a,b\n1,2,3\n", "row 2: 3 cells where the header has 2"),
        (b"\x00\x01\x02garbage", "binary"),
    ],
)
def test_unreadable_csv_is_a_clear_input_error(tmp_path: Path, content: bytes, needle: str) -> None:
    path = tmp_path / "bad.csv"
    path.write_bytes(content)
    with pytest.raises(InputError) as info:
        read_table(path)
    assert needle in str(info.value)
    assert str(path) in str(info.value)


def test_sniff_ignores_delimiters_inside_quotes() -> None:
    assert sniff_delimiter('"a;b;c",d\n1,2\n') == ","


def _workbook(path: Path) -> None:
    wb = xlsxwriter.Workbook(path)
    ws = wb.add_worksheet("Vax")
    ws.write_row(0, 0, ["id", "cvx", "zip", "date"])
    ws.write_string(1, 0, "r1")
    ws.write_number(1, 1, 8)
    ws.write_string(1, 2, "02134")
    ws.write_datetime(1, 3, dt.datetime(2021, 3, 4), wb.add_format({"num_format": "yyyy-mm-dd"}))
    ws.write_row(2, 0, ["r2", "20", "10003", "2021-02-30"])
    wb.add_worksheet("Other").write_row(0, 0, ["x"])
    wb.close()


def test_xlsx_first_sheet_as_text(tmp_path: Path) -> None:
    path = tmp_path / "f.xlsx"
    _workbook(path)
    table = read_table(path)
    assert table.format == "xlsx" and table.sheet == "Vax"
    assert table.frame.get_column("cvx").to_list() == ["8", "20"]
    assert table.frame.get_column("zip").to_list() == ["02134", "10003"]
    assert table.frame.get_column("date").to_list()[1] == "2021-02-30"
    assert [n.code for n in table.notices] == ["other-sheets"]
    assert read_table(path, sheet="Other").columns == ["x"]
    with pytest.raises(InputError, match="no sheet 'Nope'"):
        read_table(path, sheet="Nope")


def test_not_really_xlsx(tmp_path: Path) -> None:
    path = tmp_path / "fake.xlsx"
    path.write_text("a,b\n1,2\n")
    with pytest.raises(InputError, match="not an Excel workbook"):
        read_table(path)


# --- the header row: title rows above it, blank rows below it -----------------------------------

KNOWN = HeaderHint(known=known_header(default_profile()))


def test_title_rows_of_any_shape_are_passed_over(tmp_path: Path) -> None:
    """A quoted title spanning two lines, then one with a comma, above a ';' header: the header's
    delimiter is the one that splits it into known columns, and rows keep the spreadsheet's numbers."""
    path = tmp_path / "titled.csv"
    path.write_text(
        '"Registry export\nweek 11";;\nWeekly export, 03/18/2024\nRecord ID;Patient ID;CVX\nR1;P1;08\n;;\nR2;P2;20\n',
        encoding="utf-8",
    )
    for hint in (KNOWN, HeaderHint(row=3)):
        table = read_table(path, header=hint)
        assert (table.delimiter, table.columns) == (";", ["Record ID", "Patient ID", "CVX"])
        assert table.frame.get_column(ROW).to_list() == [4, 6]
        assert table.frame.get_column("CVX").to_list() == ["08", "20"]
        assert table.blank_rows == 1
        assert [n.code for n in table.notices] == ["title-rows"]


def test_without_a_hint_the_first_row_that_is_not_blank_is_the_header(tmp_path: Path) -> None:
    path = tmp_path / "late.csv"
    path.write_text("\n,,\nid,cvx,zip\nr1,08,02134\n", encoding="utf-8")
    table = read_table(path)
    assert table.columns == ["id", "cvx", "zip"]
    assert table.frame.get_column(ROW).to_list() == [4]
    assert table.frame.get_column("zip").to_list() == ["02134"]


def test_a_workbook_header_row_is_the_sheet_row(tmp_path: Path) -> None:
    path = tmp_path / "titled.xlsx"
    book = xlsxwriter.Workbook(path)
    sheet = book.add_worksheet("Vax")
    sheet.write(0, 0, "Patient ID and CVX by clinic")  # a title naming columns in words, in one cell
    sheet.write_row(2, 0, ["Record ID", "Patient ID", "CVX"])
    sheet.write_row(3, 0, ["R1", "P1", "08"])
    book.close()
    for hint in (KNOWN, HeaderHint(row=3)):
        table = read_table(path, header=hint)
        assert table.columns == ["Record ID", "Patient ID", "CVX"]
        assert table.frame.get_column(ROW).to_list() == [4]
    with pytest.raises(InputError, match="--header-row 9: the sheet has 4 rows"):
        read_table(path, header=HeaderHint(row=9))


@pytest.mark.parametrize(
    ("data", "bare"),
    [
        (b"a,b\n1,2\n", False),
        (b"a,b\r\n1,2\r\n", False),
        (b"a,b\r\n1,2\r3,4\n", True),
        (b"a,b\n1,2\r", True),
        (b"", False),
    ],
)
def test_a_lone_carriage_return_is_found_and_a_file_without_any_is_not_read_to_look(
    tmp_path: Path, data: bytes, bare: bool
) -> None:
    path = tmp_path / "x.csv"
    path.write_bytes(data)
    assert readers._has_bare_cr(path) is bare


def test_a_streamed_file_with_lone_carriage_returns_reads_as_the_whole_file_does(tmp_path: Path) -> None:
    path = tmp_path / "mac.csv"
    path.write_bytes(b"id,name\r" + b"".join(b"%d,n%d\r" % (i, i) for i in range(50)) + b"50,last\n")
    whole = read_table(path).frame.drop(ROW)
    batches = read_batches(path, rows=7, stream_from=1)
    streamed = pl.concat(list(batches.batches)).drop(ROW)
    assert streamed.equals(whole) and streamed.height == 51


def test_a_streamed_chunks_bytes_are_let_go_once_parsed(tmp_path: Path) -> None:
    """While a batch is out (the reader waits at it), the reader holds parsed rows only: neither the bytes
    it read nor their records' copy, which held two chunks' worth of memory per batch in flight."""
    path = tmp_path / "long.csv"
    path.write_bytes(b"id,name\n" + b"".join(b"%d,n%d\n" % (i, i) for i in range(2000)))
    chunks = readers._chunked(path, ["id", "name"], len(b"id,name\n"), ",", rows=300, chunk_bytes=3000)
    batches = [next(chunks)]
    assert chunks.gi_frame is not None
    held = {name for name, value in chunks.gi_frame.f_locals.items() if isinstance(value, bytes | bytearray)}
    assert held == set()
    batches += list(chunks)
    assert pl.concat(batches).get_column("id").to_list() == [str(i) for i in range(2000)]


def test_lone_carriage_returns_past_the_head_of_a_streamed_file_are_read_as_the_whole_file_reads_them(
    tmp_path: Path,
) -> None:
    """A large file is not searched for lone ``\\r`` before it is streamed: the chunk that holds one reads
    its line breaks as the whole file's reading does, and the table carries the same notice."""
    path = tmp_path / "mixed.csv"
    first = b"".join(b'%d,"n %d",ok\r\n' % (i, i) for i in range(readers._SNIFF_BYTES // 12))
    later = b"".join(b"%d,n%d,x\r" % (i, i) for i in range(5)) + b'99,"two\r\nlines",end\r\n'
    path.write_bytes(b"id,name,note\r\n" + first + later + first[:200])
    whole = read_table(path)
    batches = read_batches(path, rows=1000, stream_from=1)
    streamed = pl.concat(list(batches.batches))
    assert streamed.drop(ROW).equals(whole.frame.drop(ROW))
    assert streamed.get_column(ROW).to_list() == whole.frame.get_column(ROW).to_list()
    codes = {n.code for n in whole.notices}
    assert "line-endings" in codes
    assert {n.code for n in batches.table.notices} == codes


@settings(max_examples=300, deadline=None)
@given(
    data=st.lists(st.sampled_from([b"a", b'"', b"\r", b"\n", b","]), max_size=64).map(b"".join),
    scan_from=st.sampled_from([0, 1, 8, 1 << 16]),
    numpy_loaded=st.booleans(),
)
def test_a_chunk_scanned_by_numpy_gives_what_bytes_and_re_give(data: bytes, scan_from: int, numpy_loaded: bool) -> None:
    """A long span of a chunk is scanned by numpy (it lets go of the GIL): the same record ends and lone ``\\r``
    as ``bytes.count`` and the regex find, whatever the bytes, at any length from which numpy takes over; and
    the same before numpy is imported (the first chunk does not wait for it)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(readers, "_SCAN_FROM", scan_from)
        mp.setattr(readers, "loaded", lambda: numpy_loaded)
        for start, end in ((0, len(data)), (len(data) // 3, len(data) - 1)):
            assert readers._count(data, readers._QUOTE, start, end) == data.count(b'"', start, end)
        assert readers._lone_cr(data) is (readers._BARE_CR.search(data) is not None)
        quotes, expected = 0, -1  # the last line break after an even number of quotes, counted from the start
        for at, byte in enumerate(data):
            quotes += byte == readers._QUOTE
            if byte == readers._LF and quotes % 2 == 0:
                expected = at + 1
        assert readers._record_end(data) == expected


def test_a_streamed_file_of_several_batches_starts_with_a_smaller_one(tmp_path: Path) -> None:
    """The checks of a long file start after a quarter of a batch was read and prepared, not a whole one; the
    rows, their numbers and every later batch are as they would be otherwise. A file of a few batches is cut
    as before."""
    path = tmp_path / "long.csv"
    path.write_bytes(b"id,name\n" + b"".join(b"%d,n%d\n" % (i, i) for i in range(2000)))
    heights = [f.height for f in read_batches(path, rows=400, stream_from=1).batches]
    assert heights[0] == 100 and all(h <= 400 for h in heights) and sum(heights) == 2000
    assert heights[1:-1] == [400] * (len(heights) - 2)
    frames = list(read_batches(path, rows=400, stream_from=1).batches)
    assert pl.concat(frames).get_column(ROW).to_list() == list(range(2, 2002))
    assert pl.concat(frames).drop(ROW).equals(read_table(path).frame.drop(ROW))
    assert [f.height for f in read_batches(path, rows=700, stream_from=1).batches] == [700, 700, 600]
