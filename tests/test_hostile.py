"""Hostile and broken input: every file either reads as a table or is refused
with one line naming it (and the row where one is to blame), exit code 2;
never a traceback. Then property-based: generated CSV files and registry
values never make the reader or validation raise anything else, and every
row is accounted for."""

from __future__ import annotations

import codecs
import csv
import gzip
import io
import json
import os
import random
import tempfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import polars as pl
import pytest
import xlsxwriter
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from etl.cli import main
from etl.errors import InputError
from etl.mapping import apply_profile, default_profile
from etl.pipeline import validate_files
from etl.readers import DELIMITERS, ROW, Table, read_table
from etl.settings import Settings
from etl.validate import validate

from .conftest import SAMPLE

HEADER = ["Record ID", "Patient ID", "First Name", "Last Name", "DOB", "Sex", "Admin Date", "CVX", "Status"]
ANN = ["VX-1", "P-1", "Ann", "Lee", "2015-03-04", "F", "2021-03-04", "08", "completed"]
JOSE = ["VX-2", "P-2", "José", "Núñez", "2014-01-02", "M", "2021-03-05", "20", "completed"]
RAND = random.Random(4)  # the "random" garbage is the same on every run


def line(cells: list[str], sep: str = ",") -> str:
    return sep.join(cells)


def text_file(*rows: list[str], eol: str = "\n") -> str:
    return "".join(line(r) + eol for r in rows)


def _workbook(path: Path, build: Callable[[xlsxwriter.Workbook], None]) -> None:
    book = xlsxwriter.Workbook(str(path))
    build(book)
    book.close()


def _registry_sheet(book: xlsxwriter.Workbook, name: str = "Vax") -> xlsxwriter.worksheet.Worksheet:
    sheet = book.add_worksheet(name)
    for i, row in enumerate([HEADER, ANN, JOSE]):
        sheet.write_row(i, 0, row)
    return sheet


def _xlsx_bytes(build: Callable[[xlsxwriter.Workbook], None]) -> bytes:
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "w.xlsx"
        _workbook(path, build)
        return path.read_bytes()


def _merged(book: xlsxwriter.Workbook) -> None:
    sheet = _registry_sheet(book)
    sheet.merge_range(1, 8, 2, 8, "completed")  # Status merged down two rows
    sheet.merge_range(3, 0, 3, 3, "VX-3 merged across")


def _sheets(book: xlsxwriter.Workbook) -> None:
    _registry_sheet(book, "Vax")
    _registry_sheet(book, "Vax 2020")
    book.add_worksheet("Notes").write_row(0, 0, ["free text"])


def _formulas(book: xlsxwriter.Workbook) -> None:
    sheet = _registry_sheet(book)
    sheet.write_formula(1, 7, '=TEXT(8,"00")', None, "08")  # the cached result is what is read
    sheet.write_formula(2, 2, '="Jo"&"sé"', None, "José")
    sheet.write_formula(3, 0, "=1+1", None, 2)


def _header_lower_down(book: xlsxwriter.Workbook) -> None:
    sheet = book.add_worksheet("Vax")  # rows 1-3 and column A left blank
    for i, row in enumerate([HEADER, ANN, JOSE]):
        sheet.write_row(3 + i, 1, row)


def _xlsx_duplicate_headers(book: xlsxwriter.Workbook) -> None:
    sheet = book.add_worksheet("Vax")  # CVX again, and a blank header cell: named column_N, with a warning
    for i, row in enumerate([[*HEADER, "CVX", ""], [*ANN, "08", "x"], [*JOSE, "08", "y"]]):
        sheet.write_row(i, 0, row)


@dataclass(frozen=True)
class Case:
    """One hostile file: its name, its bytes, the exit code it earns and what the output must say."""

    name: str
    content: bytes | Callable[[], bytes]
    code: int
    says: tuple[str, ...] = ()
    rows: int | None = None  # for a readable file: how many rows the report accounts for

    def data(self) -> bytes:
        return self.content() if callable(self.content) else self.content


def _wide() -> bytes:
    extra = [f"extra_{i}" for i in range(30_000)]
    return text_file(HEADER + extra, ANN + ["x"] * 30_000).encode()


def _big_cell() -> bytes:
    return text_file(HEADER, [*ANN[:2], "A" * 10_000_000, *ANN[3:]], JOSE).encode()


def _late_bad_utf8() -> bytes:
    # Valid UTF-8 well past the sniffed 64 KB, then one cp1252 row.
    rows = [[f"VX-{i}", *ANN[1:]] for i in range(3, 3000)]
    return text_file(HEADER, *rows).encode() + text_file(JOSE).encode("cp1252")


def _truncated_xlsx() -> bytes:
    whole = _xlsx_bytes(_registry_sheet)
    return whole[: len(whole) // 2]


def _zip_of_csvs() -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("registry.csv", text_file(HEADER, ANN))
    return buffer.getvalue()


CASES = [
    Case("empty.csv", b"", 2, ("empty",)),
    Case("blank.csv", b"  \r\n\n \t\n", 2, ("empty",)),
    Case("bom-only.csv", codecs.BOM_UTF8, 2, ("empty",)),
    Case("header-only.csv", text_file(HEADER).encode(), 0, rows=0),
    # A repeated header keeps the first; the later one is named column_N, with a warning.
    Case("duplicate-headers.csv", text_file(["CVX", *HEADER], ["08", *ANN]).encode(), 0, rows=1),
    Case("ragged-long.csv", text_file(HEADER, ANN, [*JOSE, "stray"]).encode(), 2, ("row 3", "10 cells", "has 9")),
    Case("ragged-short.csv", text_file(HEADER, ANN, JOSE[:7]).encode(), 1, rows=2),
    Case(
        "unterminated-quote.csv",
        (text_file(HEADER, ANN) + 'VX-2,P-2,"José,Núñez,2014-01-02,M,2021-03-05,20,completed\n' + line(ANN)).encode(),
        2,
        ("row 3", "never closed"),
    ),
    Case("binary.bin.csv", bytes(RAND.randrange(256) for _ in range(4096)), 2, ("binary",)),
    Case(
        "binary-no-nul.csv",
        bytes(RAND.choice([*range(1, 9), *range(14, 32), *range(128, 256)]) for _ in range(4096)),
        2,
        ("binary",),
    ),
    Case("utf16-bom.csv", text_file(HEADER, JOSE).encode("utf-16"), 0, rows=1),
    Case("utf16-no-bom.csv", text_file(HEADER, JOSE).encode("utf-16-le"), 0, rows=1),
    Case("cp1252.csv", text_file(HEADER, JOSE).encode("cp1252"), 0, rows=1),
    Case("late-bad-utf8.csv", _late_bad_utf8, 0, rows=2998),
    Case("crlf-lf-cr.csv", (line(HEADER) + "\r\n" + line(ANN) + "\n" + line(JOSE) + "\r").encode(), 0, rows=2),
    Case("cr-only.csv", text_file(HEADER, ANN, JOSE, eol="\r").encode(), 0, rows=2),
    Case("10mb-cell.csv", _big_cell, 1, rows=2),
    Case("30000-columns.csv", _wide, 0, rows=1),
    Case("gzip.csv", gzip.compress(text_file(HEADER, ANN).encode()), 2, ("gzip",)),
    Case("pdf.csv", b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n1 0 obj\n", 2, ("PDF",)),
    Case("zip-of-csv.csv", _zip_of_csvs, 2, ("ZIP archive", "registry.csv")),
    Case("workbook-named.csv", lambda: _xlsx_bytes(_registry_sheet), 0, rows=2),
    Case("text-named.xlsx", text_file(HEADER, ANN).encode(), 2, ("not an Excel workbook",)),
    Case("empty.xlsx", b"", 2, ("empty",)),
    Case("truncated.xlsx", _truncated_xlsx, 2, ("damaged",)),
    Case(
        "password.xlsx",
        b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1" + bytes(RAND.randrange(256) for _ in range(4096)),
        2,
        ("password-protected",),
    ),
    Case("legacy.xls", b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1" + b"\x00" * 512, 2, ("legacy .xls",)),
    Case("merged.xlsx", lambda: _xlsx_bytes(_merged), 1, rows=3),
    Case("sheets.xlsx", lambda: _xlsx_bytes(_sheets), 0, rows=2),
    Case("formulas.xlsx", lambda: _xlsx_bytes(_formulas), 1, rows=3),
    Case("header-lower-down.xlsx", lambda: _xlsx_bytes(_header_lower_down), 0, rows=2),
    Case("duplicate-headers.xlsx", lambda: _xlsx_bytes(_xlsx_duplicate_headers), 0, rows=2),
    Case("empty-sheet.xlsx", lambda: _xlsx_bytes(lambda book: book.add_worksheet("Vax")), 2, ("empty",)),
]


def _validate(path: Path, tmp_path: Path) -> tuple[int, str]:
    result = CliRunner().invoke(main, ["validate", str(path), "--report-dir", str(tmp_path / "report")])
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    return result.exit_code, result.output


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_hostile_file_is_read_or_refused_in_one_line(tmp_path: Path, case: Case) -> None:
    path = tmp_path / case.name
    path.write_bytes(case.data())
    code, output = _validate(path, tmp_path)
    assert "Traceback" not in output
    assert code == case.code, output
    for needle in case.says:
        assert needle in output, output
    if code == 2:
        assert str(path) in output
        assert len([ln for ln in output.splitlines() if ln.startswith("error:")]) == 1, output
    if case.rows is not None:
        summary = json.loads((tmp_path / "report" / "summary.json").read_text(encoding="utf-8"))
        assert summary["rows_total"] == case.rows
        assert sum(summary["states"].values()) == case.rows
        # A 10 MB cell stays in rejects.csv (to fix and re-import) but is not quoted whole elsewhere.
        assert (tmp_path / "report" / "rows.csv").stat().st_size < 1_000_000


@pytest.mark.parametrize(
    ("make", "says"),
    [
        (lambda p: p.mkdir(), "is a folder"),
        (lambda p: None, "no such file"),
        (lambda p: os.mkfifo(p), "not a regular file"),
    ],
    ids=["folder", "missing", "fifo"],
)
def test_a_path_that_is_no_file_is_refused(tmp_path: Path, make: Callable[[Path], None], says: str) -> None:
    path = tmp_path / "input.csv"
    make(path)
    code, output = _validate(path, tmp_path)
    assert code == 2 and says in output and "Traceback" not in output


def _read(tmp_path: Path, name: str, data: bytes) -> Table:
    path = tmp_path / name
    path.write_bytes(data)
    return read_table(path)


def test_encodings_read_the_same_text(tmp_path: Path) -> None:
    content = text_file(HEADER, JOSE)
    for name, data, notice in [
        ("utf8.csv", content.encode(), None),
        ("bom.csv", codecs.BOM_UTF8 + content.encode(), None),
        ("u16.csv", content.encode("utf-16"), None),
        ("u16le.csv", content.encode("utf-16-le"), "encoding-guessed"),
        ("u16be.csv", content.encode("utf-16-be"), "encoding-guessed"),
        ("cp1252.csv", content.encode("cp1252"), "encoding-fallback"),
    ]:
        table = _read(tmp_path, name, data)
        assert table.columns == HEADER, name
        assert table.frame.row(0)[1:] == tuple(JOSE), name
        assert [n.code for n in table.notices] == ([notice] if notice else []), name


def test_bad_bytes_late_in_a_file_fall_back_to_cp1252_and_say_where(tmp_path: Path) -> None:
    table = _read(tmp_path, "late.csv", _late_bad_utf8())
    [notice] = table.notices
    assert notice.code == "encoding-fallback" and "line 2999" in notice.message  # the header, 2997 rows, then it
    assert table.frame.get_column("First Name").to_list()[-1] == "José"


def test_line_endings_of_every_kind_are_line_breaks_and_rows_keep_their_numbers(tmp_path: Path) -> None:
    data = line(HEADER) + "\r\n" + line(ANN) + "\n" + '"a\r\nb",' + line(JOSE[1:]) + "\r" + line(ANN) + "\r\n"
    table = _read(tmp_path, "mixed.csv", data.encode())
    assert table.frame.height == 3
    assert table.frame.get_column(ROW).to_list() == [2, 3, 4]
    assert table.frame.get_column("Record ID").to_list() == ["VX-1", "a\nb", "VX-1"]
    assert [n.code for n in table.notices] == ["line-endings"]
    plain = _read(tmp_path, "crlf.csv", text_file(HEADER, ANN, eol="\r\n").encode())
    assert plain.notices == [] and plain.frame.height == 1


def test_a_big_cell_and_many_columns_are_data(tmp_path: Path) -> None:
    big = _read(tmp_path, "big.csv", _big_cell())
    assert len(big.frame.get_column("First Name")[0]) == 10_000_000
    wide = _read(tmp_path, "wide.csv", _wide())
    assert len(wide.columns) == 30_009 and wide.frame.height == 1


def test_unmapped_columns_are_named_up_to_twenty_then_counted(tmp_path: Path) -> None:
    wide = _read(tmp_path, "wide.csv", _wide())
    mapped = apply_profile(wide, default_profile())
    assert len(mapped.unmapped) == 30_000  # all of them, for a caller that wants the list
    [notice] = [n for n in wide.notices if n.code == "unmapped-columns"]
    assert notice.message == "not imported: " + ", ".join(f"extra_{i}" for i in range(20)) + " and 29980 more"
    few = _read(tmp_path, "few.csv", text_file([*HEADER, "Shoe Size", "Clinic"], [*ANN, "x", "y"]).encode())
    apply_profile(few, default_profile())
    assert [n.message for n in few.notices if n.code == "unmapped-columns"] == ["not imported: Shoe Size, Clinic"]


def test_formulas_stay_text_and_are_neutralised_in_reports(tmp_path: Path) -> None:
    rows = [
        ["=1+1", "P-1", '=HYPERLINK("http://x")', "Lee", "2015-03-04", "F", "2021-03-04", "08", "completed"],
        ["VX-9", "@SUM(A1)", "+1", "-1", "not a date", "F", "2021-03-04", "08", "completed"],
    ]
    path = tmp_path / "formulas.csv"
    with path.open("w", encoding="utf-8", newline="") as fh:
        csv.writer(fh).writerows([HEADER, *rows])
    assert read_table(path).frame.get_column("Record ID").to_list() == ["=1+1", "VX-9"]
    code, output = _validate(path, tmp_path)
    assert code == 1, output
    report = tmp_path / "report"
    reported = pl.read_csv(report / "rows.csv", infer_schema=False)
    assert reported.get_column("source_key").to_list()[0] == "'=1+1"
    rejects = pl.read_csv(report / "rejects.csv", infer_schema=False).row(0, named=True)
    assert (rejects["Patient ID"], rejects["First Name"], rejects["Last Name"]) == ("'@SUM(A1)", "'+1", "'-1")


def test_excel_reads_cached_formula_results_merged_cells_and_its_own_row_numbers(tmp_path: Path) -> None:
    formulas = _read(tmp_path, "f.xlsx", _xlsx_bytes(_formulas))
    assert formulas.frame.get_column("CVX").to_list()[0] == "08"
    assert formulas.frame.get_column("First Name").to_list()[1] == "José"
    merged = _read(tmp_path, "m.xlsx", _xlsx_bytes(_merged))
    # A merged range holds its value in its first cell; the cells it covers read empty.
    assert merged.frame.row(2, named=True) | {ROW: 0} == {ROW: 0, "Record ID": "VX-3 merged across"} | {
        name: None for name in HEADER[1:]
    }
    lower = _read(tmp_path, "l.xlsx", _xlsx_bytes(_header_lower_down))
    assert lower.columns == HEADER
    assert lower.frame.get_column(ROW).to_list() == [5, 6]  # the header is on the sheet's row 4
    sheets = _read(tmp_path, "s.xlsx", _xlsx_bytes(_sheets))
    assert sheets.sheet == "Vax" and [n.code for n in sheets.notices] == ["other-sheets"]
    assert read_table(tmp_path / "s.xlsx", sheet="Vax 2020").frame.height == 2


def test_a_workbook_named_csv_is_read_as_one_and_says_so(tmp_path: Path) -> None:
    table = _read(tmp_path, "export.csv", _xlsx_bytes(_registry_sheet))
    assert table.format == "xlsx" and table.frame.height == 2
    assert [n.code for n in table.notices] == ["format-mismatch"]


# -- property-based ------------------------------------------------------------------

SPECIALS = ['"', '""', ",", ";", "\t", "|", "\n", "\r\n", "\r", "=1+1", "é", "Ω", "\u2028", "\ufeff", " ", "漢字", "\\"]
CELLS = st.lists(st.one_of(st.text(max_size=8), st.sampled_from(SPECIALS)), max_size=4).map("".join)
HEADERS = st.lists(st.text(alphabet="abcdefghijklmnopqrstuvwxyz_ ", min_size=1, max_size=10), min_size=1, max_size=6)


@st.composite
def csv_files(draw: st.DrawFn) -> bytes:
    """CSV bytes of every shape: delimiters, quoting, encodings, line endings, and some damage."""
    delimiter = draw(st.sampled_from(DELIMITERS))
    width = draw(st.integers(1, 6))
    header = draw(st.lists(CELLS, min_size=width, max_size=width))
    rows = draw(st.lists(st.lists(CELLS, min_size=0, max_size=width + 1), max_size=8))
    quoting = draw(st.sampled_from([csv.QUOTE_MINIMAL, csv.QUOTE_ALL, None]))
    eol = draw(st.sampled_from(["\n", "\r\n", "\r"]))
    if quoting is None:  # cells joined as they are: stray quotes, delimiters and newlines break rows
        text = "".join(delimiter.join(r) + eol for r in [header, *rows])
    else:
        buffer = io.StringIO()
        csv.writer(buffer, delimiter=delimiter, quoting=quoting, lineterminator=eol).writerows([header, *rows])
        text = buffer.getvalue()
    encoding = draw(st.sampled_from(["utf-8", "utf-8-sig", "cp1252", "utf-16"]))
    data = text.encode(encoding, errors="replace")
    if draw(st.booleans()):  # damage: cut it short, or splice in random bytes
        at = draw(st.integers(0, len(data)))
        data = data[:at] + draw(st.binary(max_size=16)) if draw(st.booleans()) else data[:at]
    return data


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=csv_files())
def test_any_csv_reads_as_a_table_or_is_an_input_error(data: bytes) -> None:
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "generated.csv"
        path.write_bytes(data)
        try:
            table = read_table(path)
        except InputError as exc:
            assert str(path) in str(exc)
            return
        # Row numbers as a spreadsheet shows them: rising, below the header; blank rows leave gaps.
        numbers = table.frame.get_column(ROW).to_list()
        assert numbers == sorted(set(numbers)) and all(n >= 2 for n in numbers)
        assert all(dtype == pl.String for name, dtype in table.frame.schema.items() if name != ROW)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    # Two columns at least: a lone column has no delimiter to sniff.
    header=st.lists(st.text(alphabet="abcdefghij", min_size=1, max_size=6), min_size=2, max_size=5, unique=True),
    data=st.data(),
)
def test_well_formed_utf8_csv_round_trips_every_cell(header: list[str], data: st.DataObject) -> None:
    # Any text but control characters (a sign of a binary file) other than tab and newline.
    chars = st.characters(exclude_categories=("Cs", "Cc"), include_characters="\n\t")
    cell = st.text(chars, max_size=12)
    rows = data.draw(st.lists(st.lists(cell, min_size=len(header), max_size=len(header)), min_size=1, max_size=6))
    delimiter = data.draw(st.sampled_from(DELIMITERS))
    eol = data.draw(st.sampled_from(["\n", "\r\n"]))
    buffer = io.StringIO()
    csv.writer(buffer, delimiter=delimiter, lineterminator=eol).writerows([header, *rows])
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "clean.csv"
        path.write_bytes(buffer.getvalue().encode())
        table = read_table(path)
    assert table.columns == header and table.delimiter == delimiter
    read_back = [list(r) for r in table.frame.drop(ROW).rows()]
    # An empty cell reads as null: no value; a row of empty cells is a blank row, left out and counted.
    kept = [[c if c != "" else None for c in r] for r in rows if any(c.strip() for c in r)]
    assert read_back == kept
    assert table.blank_rows == len(rows) - len(kept)


def _sample_values() -> dict[str, list[str]]:
    with (SAMPLE / "registry.csv").open(encoding="utf-8", newline="") as fh:
        records = list(csv.DictReader(fh))
    return {name: sorted({r[name] for r in records[:80]}) for name in records[0]}


SAMPLE_VALUES = _sample_values()
JUNK = st.one_of(
    # Control characters other than tab and line breaks make the file binary: the reader's business.
    st.text(st.characters(exclude_categories=("Cs", "Cc"), include_characters="\t\r\n"), max_size=40),
    st.sampled_from(["", " ", "=1+1", "2021-02-30", "13/45/2021", "-1", "1e309", "NaN", "null", "x" * 300, "08.0"]),
)


@st.composite
def registry_rows(draw: st.DrawFn) -> list[dict[str, str]]:
    """Rows of the sample's layout: each cell a real value from the sample, or junk."""
    cells = {
        name: st.one_of(st.sampled_from(values), JUNK) if values else JUNK for name, values in SAMPLE_VALUES.items()
    }
    return [{name: draw(cell) for name, cell in cells.items()} for _ in range(draw(st.integers(1, 12)))]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(rows=registry_rows(), encoding=st.sampled_from(["utf-8", "utf-8-sig", "cp1252"]))
def test_validation_never_raises_and_accounts_for_every_row(rows: list[dict[str, str]], encoding: str) -> None:
    buffer = io.StringIO()
    # \r\n as the terminator: a cell holding either \r or \n is quoted.
    writer = csv.DictWriter(buffer, fieldnames=list(SAMPLE_VALUES), lineterminator="\r\n")
    writer.writeheader()
    writer.writerows(rows)
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "registry.csv"
        path.write_bytes(buffer.getvalue().encode(encoding, errors="replace"))
        table = read_table(path)
    mapped = apply_profile(table, default_profile())
    result = validate(mapped)
    every = set(mapped.frame.get_column(ROW).to_list())
    valid = set(result.valid.get_column(ROW).to_list())
    rejected = set(result.rejects.get_column(ROW).to_list())
    assert len(every) == len(rows)
    assert valid | rejected == every and not valid & rejected
    assert result.rejects.get_column("code").null_count() == 0


def test_a_whole_number_too_large_for_64_bits_is_a_rejected_cell(tmp_path: Path) -> None:
    """Found by the property test above: 19 digits overflowed the cast and raised."""
    path = tmp_path / "big-number.csv"
    path.write_text(
        "Record ID,Patient ID,First Name,Last Name,DOB,CVX,Admin Date,Dose Number,Series Doses\n"
        "R1,P1,Ann,Lee,1980-01-02,08,2021-03-04,1,9223372036854775808\n"  # 2**63
        "R2,P1,Ann,Lee,1980-01-02,08,2021-03-05,1,9223372036854775807\n"  # 2**63 - 1: an integer, read exactly
    )
    report = validate_files([path], Settings(report_dir=tmp_path / "r"))
    (row,) = report.problems.iter_rows(named=True)
    assert (row["source_row"], row["error_code"], row["field"]) == (2, "integer-format", "Series Doses")
    assert report.states["planned"] == 1
