"""Issue 14's first must-show, as one test: a registry export saved from Excel as CSV validates with the
built-in default profile and no options.

The fixture ``hazards/excel_saved_registry.csv`` is written here (no copied data), modelled on what Excel
writes when a registry's weekly export is saved as "CSV (semicolon delimited)" on a Windows machine set to a
European locale: Windows-1252 with accented names (``Muñoz``), ``;`` and CRLF, every row padded to the sheet's
width, two title rows and a blank row above the header, US dates (M/D/YYYY), decimal commas in the dose amount
(``0,5``), a few two-digit years (birth and administration), two patient ids Excel turned into scientific
notation (``3.64992E+12``: two different people), three genuinely bad rows (no vaccine code, CVX ``XXX``, a dose
before birth) and a trailing block of rows of bare separators.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import polars as pl
from click.testing import CliRunner

from etl.cli import main

EXPORT = Path(__file__).resolve().parent / "fixtures" / "hazards" / "excel_saved_registry.csv"
HEADER_LINE = 4  # two title rows and a blank row above it
#: The three genuinely bad rows (spreadsheet line numbers) and the code each must be rejected with.
BAD = {18: "required", 19: "unknown-cvx", 20: "occurrence-before-birth"}
TWO_DIGIT_YEAR = re.compile(r"^\d{1,2}/\d{1,2}/\d{2}$")
SCIENTIFIC = re.compile(r"^\d+(\.\d+)?E\+\d+$")
ISO_DATE = re.compile(r'"(\d{4})-\d{2}-\d{2}')


def _lines() -> list[list[str]]:
    """The fixture's cells by spreadsheet line (1-based: index 0 is line 1); no quoting in it."""
    return [line.split(";") for line in EXPORT.read_bytes().decode("cp1252").split("\r\n")[:-1]]


def _data() -> dict[int, dict[str, str]]:
    """Each data line's cells by header name, keyed by its line number."""
    lines = _lines()
    header = lines[HEADER_LINE - 1]
    return {
        number: dict(zip(header, cells, strict=True))
        for number, cells in enumerate(lines, start=1)
        if number > HEADER_LINE and any(c.strip() for c in cells)
    }


def _run(tmp_path: Path, *args: str) -> tuple[int, dict[str, Any], pl.DataFrame, Path]:
    folder = tmp_path / args[0]
    result = CliRunner().invoke(main, [*args, str(EXPORT), "--report-dir", str(folder)])
    assert result.exception is None or isinstance(result.exception, SystemExit), result.output
    summary = json.loads((folder / "summary.json").read_text(encoding="utf-8"))
    rows = pl.read_csv(folder / "rows.csv", infer_schema=False)
    return result.exit_code, summary, rows, folder


def test_the_fixture_carries_every_hazard() -> None:
    """The hazards are in the bytes, so the test below can fail."""
    raw = EXPORT.read_bytes()
    text = raw.decode("cp1252")
    assert "Muñoz" in text and "Muñoz".encode("cp1252") in raw and "Muñoz".encode() not in raw
    assert raw.count(b"\r\n") == raw.count(b"\n")
    lines = _lines()
    assert lines[0][0] and lines[1][0] and not "".join(lines[2])  # two title rows, then a blank row
    assert lines[HEADER_LINE - 1][:2] == ["Record ID", "Patient ID"]
    assert len({len(cells) for cells in lines}) == 1  # padded to the sheet's width
    assert all(not "".join(cells).strip() for cells in lines[-4:])  # trailing rows of bare separators
    data = _data()
    assert all(re.fullmatch(r"\d{1,2}/\d{1,2}/\d{2}(\d{2})?", r["Admin Date"]) for r in data.values())
    assert all(re.fullmatch(r"\d,\d", r["Dose Amount"]) for r in data.values())
    assert sum(bool(TWO_DIGIT_YEAR.match(r["Birth Date"])) for r in data.values()) >= 2
    assert sum(bool(TWO_DIGIT_YEAR.match(r["Admin Date"])) for r in data.values()) >= 2
    scientific = [r for r in data.values() if SCIENTIFIC.match(r["Patient ID"])]
    assert len(scientific) == 2 and scientific[0]["First Name"] != scientific[1]["First Name"]


def test_an_excel_saved_export_validates_with_the_default_profile_and_no_options(tmp_path: Path) -> None:
    data = _data()
    scientific = {n for n, r in data.items() if SCIENTIFIC.match(r["Patient ID"])}
    two_digit = {n for n, r in data.items() if any(TWO_DIGIT_YEAR.match(r[c]) for c in ("Birth Date", "Admin Date"))}
    clean = set(data) - scientific - set(BAD)

    code, summary, rows, _ = _run(tmp_path, "validate")
    assert code == 1
    assert summary["rows_total"] == len(data) and rows.height == len(data)  # every data row, once
    assert summary["blank_rows"] == 4  # the trailing separators: skipped, counted, never rejected
    states = dict(zip(rows["source_row"].cast(int), rows["state"], strict=True))
    codes = dict(zip(rows["source_row"].cast(int), rows["error_code"], strict=True))
    # Exactly the three bad rows, and the ids Excel mangled (with their own code), are rejected.
    assert {n for n, s in states.items() if s == "rejected"} == set(BAD) | scientific
    assert {n: codes[n] for n in BAD} == BAD
    assert {codes[n] for n in scientific} == {"scientific-notation-id"}
    assert {states[n] for n in clean} == {"planned"}
    # Every hazard is said: file-wide ones once, the row-level ones on their rows.
    warnings = {w["code"]: w for w in summary["warnings"]}
    assert {"encoding-fallback", "title-rows", "decimal-comma", "two-digit-year"} <= warnings.keys()
    assert "Dose Amount" in warnings["decimal-comma"]["message"]
    assert set(warnings["two-digit-year"]["rows"]) == two_digit


def test_a_dry_run_of_it_holds_the_values_meant_and_no_date_before_1900(tmp_path: Path) -> None:
    _, _, rows, folder = _run(tmp_path, "load", "--dry-run")
    payloads = [json.loads(line) for line in (folder / "payloads.ndjson").read_text(encoding="utf-8").splitlines()]
    assert payloads
    text = json.dumps([p["body"] for p in payloads], ensure_ascii=False)
    years = [int(y) for y in ISO_DATE.findall(text)]
    assert years and min(years) >= 1900
    data = _data()
    planned = set(rows.filter(pl.col("state") == "planned")["source_row"].cast(int))
    shots = {p["source_row"]: p["body"] for p in payloads if p["kind"] == "immunization"}
    people = {p["source_row"]: p["body"] for p in payloads if p["kind"] == "patient"}
    assert set(shots) == planned
    for number in planned:
        month, day, year = data[number]["Admin Date"].split("/")
        assert shots[number]["occurrenceDateTime"][:10].endswith(f"-{int(month):02}-{int(day):02}")
        assert shots[number]["doseQuantity"]["value"] == float(data[number]["Dose Amount"].replace(",", "."))
        if len(year) == 2:  # an event year: the one nearest the file's other dates (all 2024)
            assert shots[number]["occurrenceDateTime"].startswith("2024-")
    # A two-digit birth year: the latest year neither in the future nor after the dose.
    by_key = {b["lastName"]: b for b in people.values()}
    for number, r in data.items():
        if number in planned and TWO_DIGIT_YEAR.match(r["Birth Date"]):
            born = by_key[r["Last Name"]]["birthDate"]
            assert born[2:4] == r["Birth Date"][-2:] and born <= shots[number]["occurrenceDateTime"][:10]
            assert int(born[:4]) > int(shots[number]["occurrenceDateTime"][:4]) - 100
    assert "Muñoz" in text
