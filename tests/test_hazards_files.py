"""File-shape hazards of real exports: title rows above the header, blank rows and rows of bare
separators, blank or repeated header cells, Windows-1252 with ``;``; and staged migrations
(``validate --state``, a load's own ``crosswalk.csv`` as ``--crosswalk``).

The fixture ``hazards/registry_excel_export.csv`` is written here, modelled on a registry export
saved from Excel as CSV (Windows-1252, ``;``, CRLF, every row padded to the sheet's width): two title
rows and a row of bare separators above the header on row 4, a blank header cell (column L),
US dates, a row of separators between data rows (row 8) and a trailing block of them (rows 12-15).
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

import httpx
import polars as pl
import pytest
import xlsxwriter
from click.testing import CliRunner

from etl.cli import main
from etl.errors import InputError, ProfileError
from etl.mapping import default_profile, known_header, load_profile
from etl.pipeline import load_files, validate_files
from etl.plan import read_crosswalk
from etl.readers import ROW, HeaderHint, read_batches, read_table
from etl.settings import Settings

from .conftest import SAMPLE

HAZARDS = Path(__file__).resolve().parent / "fixtures" / "hazards"
EXPORT = HAZARDS / "registry_excel_export.csv"
#: The spreadsheet rows of the fixture's data: 5-7, then 9-11 (row 8 and rows 12-15 hold only ';').
DATA_ROWS = [5, 6, 7, 9, 10, 11]
BLANK_ROWS = 5
KNOWN = HeaderHint(known=known_header(default_profile()))


def _validate(tmp_path: Path, *args: str, name: str = "report") -> tuple[int, str, dict[str, Any], pl.DataFrame]:
    folder = tmp_path / name
    result = CliRunner().invoke(main, ["validate", *args, "--report-dir", str(folder)])
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    if not (folder / "summary.json").is_file():
        return result.exit_code, result.output, {}, pl.DataFrame()
    summary = json.loads((folder / "summary.json").read_text(encoding="utf-8"))
    rows = pl.read_csv(folder / "rows.csv", infer_schema=False)
    return result.exit_code, result.output, summary, rows


def _warning(summary: dict[str, Any], code: str) -> str:
    found = [w["message"] for w in summary["warnings"] if w["code"] == code]
    assert found, f"no {code} warning in {summary['warnings']}"
    return str(found[0])


# --- the Excel-saved registry export --------------------------------------------------------------


def test_the_fixture_is_what_it_says() -> None:
    """The hazards are in the bytes, so the tests below can fail: not UTF-8, ';' and CRLF, a header on row 4."""
    data = EXPORT.read_bytes()
    with pytest.raises(UnicodeDecodeError):
        data.decode("utf-8")
    assert data.count(b"\r\n") == data.count(b"\n") == 15
    lines = data.decode("cp1252").splitlines()
    assert lines[3].startswith("Record ID;Patient ID") and ";;Status" in lines[3]
    assert lines[2] == lines[7] == lines[11] == ";" * 12
    assert lines[-1].strip(" ;") == "" and lines[-2].strip(" ;") == ""


def test_title_rows_are_passed_over_and_rows_keep_their_spreadsheet_numbers() -> None:
    table = read_table(EXPORT, header=KNOWN)
    assert (table.encoding, table.delimiter) == ("cp1252", ";")
    assert table.columns[:4] == ["Record ID", "Patient ID", "First Name", "Last Name"]
    assert table.frame.get_column(ROW).to_list() == DATA_ROWS
    assert table.frame.get_column("First Name").to_list() == ["José", "Zoë", "Chloé", "Åsa", "Ángel", "Renée"]
    assert table.frame.get_column("Last Name")[2] == "D'Aubigné; née Roy"  # a quoted ';'
    assert table.blank_rows == BLANK_ROWS
    codes = [n.code for n in table.notices]
    assert codes == ["encoding-fallback", "title-rows", "header-renamed"]
    assert "row 4" in table.notices[1].message and "3 row(s)" in table.notices[1].message


def test_the_export_validates_with_no_profile_and_no_options(tmp_path: Path) -> None:
    code, output, summary, rows = _validate(tmp_path, str(EXPORT))
    assert code == 0, output
    assert f"blank rows skipped: {BLANK_ROWS}" in output
    # Every data row has its line, numbered as the spreadsheet shows it; no blank row has one.
    assert rows.get_column("source_row").cast(pl.Int64).to_list() == DATA_ROWS
    assert set(rows.get_column("state")) == {"planned"}
    assert summary["rows_total"] == len(DATA_ROWS) and summary["blank_rows"] == BLANK_ROWS
    # Reconciliation: the rows below the header are the report's rows and the blank rows.
    below = EXPORT.read_bytes().decode("cp1252").splitlines()[4:]
    assert len(below) == summary["rows_total"] + summary["blank_rows"]
    assert sum(summary["states"].values()) == summary["rows_total"] == summary["inputs"][0]["rows"]
    assert "header found on row 4" in _warning(summary, "title-rows")
    assert "column_12 (L, blank)" in _warning(summary, "header-renamed")
    assert "column_12" in _warning(summary, "unmapped-columns")


def test_a_dry_run_of_the_export_sends_its_dates_as_read_month_first(tmp_path: Path) -> None:
    report = load_files([EXPORT], Settings(dry_run=True, report_dir=tmp_path / "r", state=tmp_path / "s.sqlite"))
    assert report.summary["blank_rows"] == BLANK_ROWS and report.states["planned"] == len(DATA_ROWS)
    lines = [json.loads(x) for x in (tmp_path / "r" / "payloads.ndjson").read_text(encoding="utf-8").splitlines()]
    patients = {line["body"]["firstName"]: line["body"] for line in lines if line["kind"] == "patient"}
    assert patients["José"]["birthDate"] == "2016-04-12"
    assert patients["Renée"]["lastName"] == "Lefèvre"
    assert {line["source_row"] for line in lines if line["kind"] == "immunization"} == set(DATA_ROWS)


def test_a_scanned_csv_finds_the_same_header_and_blank_rows(tmp_path: Path) -> None:
    """The batch reader of large UTF-8 files takes its own road: the same rows, numbers and counts."""
    path = tmp_path / "export-utf8.csv"
    path.write_bytes(EXPORT.read_bytes().decode("cp1252").encode("utf-8"))
    batches = read_batches(path, rows=2, stream_from=0, header=KNOWN)
    frame = pl.concat(list(batches.batches))
    whole = read_table(path, header=KNOWN)
    assert batches.table.columns == whole.columns
    assert frame.equals(whole.frame)
    assert batches.table.blank_rows == whole.blank_rows == BLANK_ROWS
    assert [n.code for n in batches.table.notices] == ["title-rows", "header-renamed"]


# --- --header-row and the profile's header_row -----------------------------------------------------

# A legend row that names two known columns sits above the real header: found first, it is the wrong one.
LEGEND = (
    "Patient ID;Admin Date;(legend: dates are MM/DD/YYYY);;;;;;\n"
    "Record ID;Patient ID;First Name;Last Name;DOB;Sex;Admin Date;CVX;Status\n"
    "VX-1;P-1;Ann;Lee;03/04/2015;F;03/04/2021;08;completed\n"
    ";;;;;;;;\n"
    "VX-2;P-2;Bo;Ng;05/06/2016;M;03/05/2021;20;completed\n"
)


def test_header_row_overrides_the_header_found(tmp_path: Path) -> None:
    path = tmp_path / "legend.csv"
    path.write_text(LEGEND, encoding="utf-8")
    assert read_table(path, header=KNOWN).columns[:3] == ["Patient ID", "Admin Date", "(legend: dates are MM/DD/YYYY)"]
    code, output, _, _ = _validate(tmp_path, str(path), name="found")
    assert code == 2 and "no column for required" in output  # the legend taken for the header
    code, output, summary, rows = _validate(tmp_path, str(path), "--header-row", "2", name="told")
    assert code == 0, output
    assert rows.get_column("source_row").cast(pl.Int64).to_list() == [3, 5]
    assert summary["blank_rows"] == 1
    assert "header found on row 2" in _warning(summary, "title-rows")


def test_a_profile_names_the_header_row(tmp_path: Path) -> None:
    path = tmp_path / "legend.csv"
    path.write_text(LEGEND, encoding="utf-8")
    profile = tmp_path / "legend.toml"
    profile.write_text('name = "legend"\nkind = "immunization"\nheader_row = 2\n', encoding="utf-8")
    assert load_profile(profile).header_row == 2
    code, output, _, rows = _validate(tmp_path, str(path), "--profile", str(profile))
    assert code == 0, output
    assert rows.get_column("source_row").cast(pl.Int64).to_list() == [3, 5]
    # --header-row wins over the profile's key.
    code, output, _, _ = _validate(tmp_path, str(path), "--profile", str(profile), "--header-row", "1", name="cli")
    assert code == 2 and "no column for required" in output


@pytest.mark.parametrize("value", ["0", "true", '"2"', "-1"])
def test_a_profile_header_row_is_a_row_number(tmp_path: Path, value: str) -> None:
    profile = tmp_path / "p.toml"
    profile.write_text(f"header_row = {value}\n", encoding="utf-8")
    with pytest.raises(ProfileError, match="header_row is a row number from 1"):
        load_profile(profile)


def test_a_header_row_past_the_file_is_an_input_error(tmp_path: Path) -> None:
    path = tmp_path / "short.csv"
    path.write_text("Record ID,CVX\nR1,08\n", encoding="utf-8")
    with pytest.raises(InputError, match="--header-row 9") as caught:
        read_table(path, header=HeaderHint(row=9))
    assert str(path) in str(caught.value)
    code, output, _, _ = _validate(tmp_path, str(path), "--header-row", "0")
    assert code == 2 and "Traceback" not in output


def test_profile_init_skips_title_rows(tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["profile", "init", str(EXPORT)])
    assert result.exit_code == 0, result.output
    assert '"Admin Date" = "occurrence"' in result.output
    assert "Riverside" not in result.output
    told = CliRunner().invoke(main, ["profile", "init", str(EXPORT), "--header-row", "1"])
    assert told.exit_code == 0 and "Riverside" in told.output


# --- blank rows -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "blank",
    ["", ",,,,,,,,", " , ,\t,,,,,,", "   "],
    ids=["empty", "separators", "spaces-and-separators", "spaces"],
)
def test_blank_rows_anywhere_are_counted_never_rejected(tmp_path: Path, blank: str) -> None:
    header = "Record ID,Patient ID,First Name,Last Name,DOB,Sex,Admin Date,CVX,Status"
    rows = [
        "VX-1,P-1,Ann,Lee,2015-03-04,F,2021-03-04,08,completed",
        "VX-2,P-2,Bo,Ng,2016-05-06,M,2021-03-05,20,completed",
    ]
    path = tmp_path / "blanks.csv"
    path.write_text("\n".join([header, blank, rows[0], blank, blank, rows[1], blank]) + "\n", encoding="utf-8")
    code, output, summary, report = _validate(tmp_path, str(path))
    assert code == 0, output
    assert report.get_column("source_row").cast(pl.Int64).to_list() == [3, 6]
    assert summary["rows_total"] == 2 and summary["blank_rows"] == 4
    assert summary["states"]["rejected"] == 0


def test_blank_rows_sum_over_files(tmp_path: Path) -> None:
    other = tmp_path / "other.csv"
    other.write_text("Record ID,Patient ID,First Name,Last Name,DOB,Sex,Admin Date,CVX,Status\n,,,,,,,,\n\n")
    report = validate_files([EXPORT, other], Settings(report_dir=tmp_path / "r"))
    assert report.summary["blank_rows"] == BLANK_ROWS + 2
    assert report.summary["rows_total"] == len(DATA_ROWS)


# --- blank and repeated header cells ---------------------------------------------------------------


def test_blank_and_repeated_header_cells_are_named_by_position(tmp_path: Path) -> None:
    path = tmp_path / "headers.csv"
    path.write_text("Record ID,,CVX, CVX ,,Status\nR1,a,08,09,b,completed\n", encoding="utf-8")
    table = read_table(path)
    assert table.columns == ["Record ID", "column_2", "CVX", "column_4", "column_5", "Status"]
    assert table.frame.get_column("CVX").to_list() == ["08"]  # the first keeps its name
    assert table.frame.get_column("column_4").to_list() == ["09"]
    [notice] = table.notices
    assert notice.code == "header-renamed" and notice.row == 1
    assert notice.message == (
        "header cell(s) renamed: column_2 (B, blank), column_4 (D, repeats 'CVX'), column_5 (E, blank)"
    )


def test_a_column_n_the_file_already_has_is_not_taken_twice(tmp_path: Path) -> None:
    path = tmp_path / "taken.csv"
    path.write_text("column_2,\nx,y\n", encoding="utf-8")
    assert read_table(path).columns == ["column_2", "column_2_"]


def test_a_header_row_with_no_name_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "nameless.csv"
    path.write_text("Title only\n,,\n", encoding="utf-8")
    with pytest.raises(InputError, match="the header row is empty"):
        read_table(path, header=HeaderHint(row=2))


def _title_workbook(path: Path) -> None:
    book = xlsxwriter.Workbook(path)
    sheet = book.add_worksheet("Export")
    sheet.write(0, 0, "Riverside County Immunization Registry")
    sheet.write(1, 0, "Exported 03/18/2024")
    header = ["Record ID", "Patient ID", "First Name", "Last Name", "DOB", "", "Admin Date", "CVX", "CVX", "Status"]
    sheet.write_row(3, 0, header)
    sheet.write_row(4, 0, ["VX-1", "P-1", "Ann", "Lee", "2015-03-04", "x", "2021-03-04", "08", "99", "completed"])
    sheet.write_row(5, 0, ["", " "])  # a row of blanks
    sheet.write_row(6, 0, ["VX-2", "P-2", "Bo", "Ng", "2016-05-06", "", "2021-03-05", "20", "", "completed"])
    book.close()


def test_a_workbook_is_read_the_same_way(tmp_path: Path) -> None:
    path = tmp_path / "export.xlsx"
    _title_workbook(path)
    table = read_table(path, header=KNOWN)
    assert table.columns[5] == "column_6" and table.columns[8] == "column_9"
    assert table.frame.get_column(ROW).to_list() == [5, 7]
    assert table.frame.get_column("CVX").to_list() == ["08", "20"]
    assert table.blank_rows == 1
    assert [n.code for n in table.notices] == ["title-rows", "header-renamed"]
    code, output, summary, rows = _validate(tmp_path, str(path))
    assert code == 0, output
    assert rows.get_column("source_row").cast(pl.Int64).to_list() == [5, 7]
    assert summary["blank_rows"] == 1
    assert "column_6 (F, blank), column_9 (I, repeats 'CVX')" in _warning(summary, "header-renamed")


# --- staged migrations: validate --state, and a load's crosswalk.csv --------------------------------

SYNTHEA = SAMPLE / "synthea"


@pytest.fixture(scope="module")
def first_stage(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Stage one of a migration: Synthea's patients, providers and encounters loaded into a sandbox."""
    from etl.sandbox import SandboxConfig, SandboxServer

    folder = tmp_path_factory.mktemp("stage1")
    with SandboxServer(SandboxConfig()) as server:
        settings = Settings(profile="synthea", state=folder / "state.sqlite", report_dir=folder / "report",
                            base_url=server.base_url, api_key=server.api_key, consistency_window=0)
        report = load_files([SYNTHEA / n for n in ("patients.csv", "providers.csv", "encounters.csv")], settings)
    assert report.states["created"] > 0 and not report.states["rejected"]
    return folder


def test_a_later_file_alone_has_unresolved_references(tmp_path: Path) -> None:
    """What --state and --crosswalk fix: without them the encounters are nowhere to be found."""
    code, _, _, rows = _validate(tmp_path, str(SYNTHEA / "immunizations.csv"), "--profile", "synthea")
    assert code == 1
    assert set(rows.get_column("error_code")) == {"unresolved-reference"}


def test_validate_with_state_resolves_what_an_earlier_load_created(tmp_path: Path, first_stage: Path) -> None:
    state = first_stage / "state.sqlite"
    code, output, summary, rows = _validate(
        tmp_path, str(SYNTHEA / "immunizations.csv"), "--profile", "synthea", "--state", str(state)
    )
    assert code == 0, output
    assert set(rows.get_column("state")) == {"planned"} and rows.height == summary["rows_total"] > 0
    history = CliRunner().invoke(main, ["history", "--state", str(state), "--json"])
    assert [r["command"] for r in json.loads(history.output)["runs"]] == ["load"]  # validate records no run


def test_validate_with_a_missing_state_store_is_a_usage_error(tmp_path: Path) -> None:
    missing = tmp_path / "nope.sqlite"
    code, output, _, _ = _validate(tmp_path, str(EXPORT), "--state", str(missing))
    assert code == 2 and "no state store here" in output and "Traceback" not in output
    assert not missing.exists()


def test_a_loads_crosswalk_csv_is_a_crosswalk(tmp_path: Path, first_stage: Path) -> None:
    crosswalk = first_stage / "report" / "crosswalk.csv"
    with crosswalk.open(encoding="utf-8", newline="") as fh:
        written = {(r["kind"], r["source_key"]): r["resource_id"] for r in csv.DictReader(fh)}
    assert {k for k, _ in written} == {"patient", "practitioner", "encounter"}
    assert read_crosswalk(crosswalk) == written
    code, output, _, rows = _validate(
        tmp_path, str(SYNTHEA / "immunizations.csv"), "--profile", "synthea", "--crosswalk", str(crosswalk)
    )
    assert code == 0, output
    assert set(rows.get_column("state")) == {"planned"}


def test_the_documented_crosswalk_format_still_reads(tmp_path: Path) -> None:
    path = tmp_path / "mine.csv"
    buffer = io.StringIO()
    csv.writer(buffer).writerows([["kind", "source_id", "clinikapi_id"], ["encounter", "E-1", "enc_1"]])
    path.write_text(buffer.getvalue(), encoding="utf-8")
    assert read_crosswalk(path) == {("encounter", "E-1"): "enc_1"}


def _stage(tmp_path: Path, sandbox: Any) -> tuple[Path, Path]:
    """Stage one: a patient and two providers (PRV-1 with an NPI, PRV-2 without) loaded; stage two's visits
    name them by provider id. The state store and the visits file."""
    patients, providers, visits = (tmp_path / n for n in ("patients.csv", "providers.csv", "visits.csv"))
    patients.write_text("Patient ID,First Name,Last Name,DOB,Sex\nP-1,Ann,Lee,2015-03-04,F\n", encoding="utf-8")
    providers.write_text(
        "Provider ID,NPI,First Name,Last Name\nPRV-1,2362604516,Amara,Okonkwo\nPRV-2,,Daniel,Whitfield\n",
        encoding="utf-8",
    )
    visits.write_text(
        "Visit ID,Patient ID,Provider ID,Status,Visit Type,Start,End\n"
        "V-1,P-1,PRV-2,finished,wellness,2019-02-12T11:15:00,2019-02-12T11:45:00\n"
        "V-2,P-1,PRV-1,finished,wellness,2019-02-13T11:15:00,2019-02-13T11:45:00\n",
        encoding="utf-8",
    )
    state = tmp_path / "state.sqlite"
    settings = Settings(state=state, report_dir=tmp_path / "stage1", base_url=sandbox.base_url,
                        api_key=sandbox.api_key, consistency_window=0)
    assert load_files([patients, providers], settings).states["created"] == 3
    return state, visits


def test_validate_with_state_resolves_patients_and_practitioners_keyed_by_id(tmp_path: Path, sandbox: Any) -> None:
    state, visits = _stage(tmp_path, sandbox)
    alone = validate_files([visits], Settings(report_dir=tmp_path / "alone"))
    assert alone.rows.get_column("error_code").to_list() == ["unresolved-reference"] * 2  # the patient: nowhere
    report = validate_files([visits], Settings(report_dir=tmp_path / "staged"), state=state)
    first = report.rows.filter(pl.col("source_key") == "V-1")
    assert first.get_column("state").to_list() == ["planned"]


def test_a_later_stage_finds_a_practitioner_keyed_by_npi_by_its_provider_id(tmp_path: Path, sandbox: Any) -> None:
    """The provider id -> npi:<NPI> alias is kept in the state store (layout 2): a later stage's reference by
    provider id resolves, in validate --state and in a load, to the practitioner stage one created."""
    state, visits = _stage(tmp_path, sandbox)
    report = validate_files([visits], Settings(report_dir=tmp_path / "staged"), state=state)
    assert report.rows.get_column("state").to_list() == ["planned", "planned"]
    stage1 = pl.read_csv(tmp_path / "stage1" / "crosswalk.csv", infer_schema=False)
    created = dict(zip(stage1["source_key"], stage1["resource_id"], strict=True))
    assert "npi:2362604516" in created and "PRV-1" not in created  # keyed by NPI: the alias is what finds it
    settings = Settings(state=state, report_dir=tmp_path / "stage2", base_url=sandbox.base_url,
                        api_key=sandbox.api_key, consistency_window=0)
    loaded = load_files([visits], settings)
    assert loaded.rows.get_column("state").to_list() == ["created", "created"]
    for row in loaded.rows.iter_rows(named=True):
        sent = httpx.get(f"{sandbox.base_url}/v1/encounters/{row['resource_id']}",
                         headers={"x-api-key": sandbox.api_key}).json()
        wanted = created["npi:2362604516" if row["source_key"] == "V-2" else "PRV-2"]
        assert wanted in json.dumps(sent)  # the practitioner stage one created, not a new one


def test_references_an_earlier_load_created_are_read_from_the_store_as_a_set(
    tmp_path: Path, sandbox: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A weekly file naming patients an earlier run created: the store is asked for a kind's keys at once
    (StateStore.stored: in a batch, and at its stage's end), never a record a key (StateStore.get)."""
    from etl.load.state import StateStore

    state, visits = _stage(tmp_path, sandbox)
    asked: list[tuple[str, int]] = []
    stored = StateStore.stored

    def counted(self: StateStore, kind: str, keys: pl.Series, **kwargs: Any) -> pl.DataFrame:
        asked.append((kind, keys.len()))
        return stored(self, kind, keys, **kwargs)

    def refused(*args: object, **kwargs: object) -> None:
        raise AssertionError("a record read a key at a time")

    monkeypatch.setattr(StateStore, "stored", counted)
    monkeypatch.setattr(StateStore, "get", refused)
    report = validate_files([visits], Settings(report_dir=tmp_path / "staged"), state=state)
    assert report.rows.filter(pl.col("source_key") == "V-1").get_column("state").to_list() == ["planned"]
    kinds = {kind for kind, _ in asked}
    assert kinds == {"patient", "practitioner"} and len(asked) <= 2 * len(kinds)  # a read a kind (and stage end)


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_a_header_without_required_columns_is_named_by_its_own_row(tmp_path: Path, stream: bool) -> None:
    """Title rows above the header: the error names the header's row (it said row 1), and how to draft a profile."""
    path = tmp_path / "titled.csv"
    path.write_text("County registry extract\nGenerated 2026-11-30\nRecord ID;CVX;Lot Number\nVX-1;08;A1\n",
                    encoding="utf-8")
    from etl.mapping import apply_profile, default_profile
    from etl.readers import read_batches

    table = read_batches(path, stream_from=0 if stream else None, header=KNOWN).table
    assert table.header_row == 3
    with pytest.raises(InputError) as raised:
        apply_profile(table, default_profile())
    assert raised.value.row == 3
    assert "no column for required immunization field(s)" in str(raised.value)
    assert "clinik-etl profile init titled.csv" in str(raised.value)


def test_a_sheet_header_below_title_rows_is_named_by_its_row(tmp_path: Path) -> None:
    path = tmp_path / "titled.xlsx"
    book = xlsxwriter.Workbook(str(path))
    sheet = book.add_worksheet()
    rows = [["Clinic log"], [], ["Record ID", "Patient ID", "Admin Date", "CVX"], ["R1", "P1", "2021-03-04", "08"]]
    for r, row in enumerate(rows):
        for c, value in enumerate(row):
            sheet.write_string(r, c, value)
    book.close()
    assert read_table(path, header=KNOWN).header_row == 3
