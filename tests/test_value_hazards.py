"""Value hazards of real exports: two-digit years, ids in scientific notation, lost leading zeros,
Excel serial numbers in text dates, placeholders, derived values beyond their limit, future visits,
and the CVRS must-show (a clean redacted extract flags nothing but redaction; each planted defect is
flagged on its row). Fixtures: tests/fixtures/hazards/values_*."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import polars as pl
import pytest

from etl.mapping import apply_profile, default_profile, load_profile
from etl.readers import ROW, read_table
from etl.transform import plan
from etl.validate import Validation, prepare, validate

from .conftest import ROOT

HAZARDS = ROOT / "tests" / "fixtures" / "hazards"
TODAY = dt.date(2026, 11, 22)


def _validate(path: Path, profile: str | None = None) -> Validation:
    chosen = load_profile(profile) if profile else default_profile()
    return validate(apply_profile(read_table(path), chosen), today=TODAY)


def _codes(frame: pl.DataFrame) -> dict[int, set[str]]:
    out: dict[int, set[str]] = {}
    for row in frame.iter_rows(named=True):
        out.setdefault(row[ROW], set()).add(row["code"])
    return out


@pytest.fixture(scope="module")
def registry() -> Validation:
    return _validate(HAZARDS / "values_registry.csv")


def _prepared(registry: Validation, row: int) -> dict[str, object]:
    return registry.prepared.filter(pl.col(ROW) == row).row(0, named=True)


def test_every_hazard_row_is_rejected_with_its_own_code_or_warned(registry: Validation) -> None:
    rejects, warnings = _codes(registry.rejects), _codes(registry.warnings)
    assert rejects == {
        5: {"scientific-notation-id"},  # 3.64992E+12
        7: {"zip-format"},  # 9372 in CA: no certain repair
        8: {"zip-format"},  # 48504-
        11: {"required"},  # first name UNK: a placeholder, and the name is needed
        12: {"unknown-cvx"},  # XXX
        13: {"unknown-mvx"},  # AAAA
        14: {"scientific-notation-id"},  # 1.2e+05
        16: {"date-format"},  # 2024 alone: a year, not a serial
    }
    assert warnings == {
        3: {"two-digit-year"},
        4: {"two-digit-year"},
        6: {"leading-zero-restored"},
        9: {"excel-serial-date"},
        15: {"leading-zero-restored"},
        18: {"code-status"},  # CVX 170 is Non-US
        19: {"expiration-before-occurrence"},  # an expired lot warns by default
    }
    # No row is both (the hazard rows carry exactly one outcome each), and the clean rows carry none.
    assert {2, 10, 17}.isdisjoint(rejects.keys() | warnings.keys())


def test_two_digit_years_never_become_year_00xx(registry: Validation) -> None:
    row = _prepared(registry, 3)  # DOB 2/14/24, admin 3/1/25
    assert row["patient_birth_date__out"] == "2024-02-14"
    assert row["occurrence__out"] == "2025-03-01"  # nearest the column's other years (2024)
    assert _prepared(registry, 4)["patient_birth_date__out"] == "1930-01-01"  # 2030 would be in the future
    years = registry.prepared.select(pl.col("patient_birth_date__date").dt.year().min()).item()
    assert years >= 1900
    messages = registry.warnings.filter(pl.col(ROW) == 3).get_column("message").to_list()
    assert sorted(messages) == ["two-digit year read as 2024", "two-digit year read as 2025"]


def test_a_birth_year_after_every_reading_is_its_own_reject(tmp_path: Path) -> None:
    path = tmp_path / "old.csv"
    path.write_text(
        "Record ID,Patient ID,First Name,Last Name,DOB,CVX,Admin Date\nR1,P1,Ann,Lee,6/1/25,08,1920-01-02\n",
        encoding="utf-8",
    )
    result = _validate(path)
    assert result.rejects.select("code", "field").rows() == [("ambiguous-year", "patient_birth_date")]


def test_event_years_follow_the_files_other_dates(tmp_path: Path) -> None:
    path = tmp_path / "events.csv"
    rows = ["R1,P1,Ann,Lee,1990-01-01,08,1998-05-01", "R2,P1,Ann,Lee,1990-01-01,08,1999-05-01",
            "R3,P1,Ann,Lee,1990-01-01,08,5/6/97"]
    path.write_text("Record ID,Patient ID,First Name,Last Name,DOB,CVX,Admin Date\n" + "\n".join(rows) + "\n", "utf-8")
    result = _validate(path)
    assert result.rejects.is_empty()
    assert result.prepared.filter(pl.col(ROW) == 4)["occurrence__out"].item() == "1997-05-06"


def test_leading_zeros_restored_where_certain(registry: Validation) -> None:
    row = _prepared(registry, 6)
    assert (row["vaccine_code"], row["patient_postal_code"]) == ("08", "02134")
    assert _prepared(registry, 15)["patient_postal_code"] == "00936"  # Puerto Rico: two zeros
    warned = registry.warnings.filter(pl.col(ROW) == 6).select("field", "message").rows()
    assert sorted(warned) == [
        ("patient_postal_code", "leading zero restored: 02134"),
        ("vaccine_code", "leading zero restored: 08"),
    ]


def test_excel_serials_in_a_text_date_are_read_in_the_1900_system(registry: Validation) -> None:
    assert _prepared(registry, 9)["occurrence__out"] == "2024-01-30"  # 45321
    (message,) = registry.warnings.filter(pl.col(ROW) == 9)["message"].to_list()
    assert message == "Excel serial number read as 2024-01-30"


def test_placeholders_are_absent_not_data(registry: Validation) -> None:
    row = _prepared(registry, 10)
    assert [row[n] for n in ("patient_email", "patient_address_line", "lot_number", "dose_number")] == [None] * 4
    assert row["expiration_date__date"] is None
    # P-100's later row has a redacted e-mail: no conflict with the first row's address.
    assert 17 not in _codes(registry.rejects)


def test_a_redacted_name_a_payload_needs_gives_the_single_code_redacted(tmp_path: Path) -> None:
    path = tmp_path / "red.csv"
    path.write_text(
        "Record ID,Patient ID,First Name,Last Name,DOB,State,CVX,Admin Date\n"
        "R1,P1,REDACTED,Lee,1980-01-01,Redacted,08,2024-01-01\n"
        "R2,P2,Ann,Lee,,,08,2024-01-01\n",  # no patient details: no name needed
        encoding="utf-8",
    )
    result = _validate(path)
    assert result.rejects.select(ROW, "code", "field").rows() == [(2, "redacted", "patient_first_name")]


@pytest.mark.parametrize("value", ["UNK", "unk", "N/A", "NULL", "none", "-", "?", "Redacted"])
def test_each_documented_placeholder_reads_as_empty(tmp_path: Path, value: str) -> None:
    path = tmp_path / "one.csv"
    path.write_text(
        f"Record ID,Patient ID,CVX,Admin Date,Lot Number,Dose Number\nR1,P1,08,2024-01-01,{value},{value}\n", "utf-8"
    )
    result = _validate(path)
    assert result.rejects.is_empty() and result.warnings.is_empty()
    assert result.prepared.select("lot_number", "dose_number__int").row(0) == (None, None)


def test_sex_unk_stays_unknown_not_absent(tmp_path: Path) -> None:
    path = tmp_path / "sex.csv"
    path.write_text("Record ID,Patient ID,First Name,Last Name,Sex,CVX,Admin Date\nR1,P1,A,B,UNK,08,2024-01-01\n",
                    encoding="utf-8")
    assert _validate(path).prepared["patient_gender"].to_list() == ["unknown"]


def test_a_derived_value_beyond_its_limit_is_left_out_not_rejected() -> None:
    result = _validate(HAZARDS / "values_visits.csv")
    rejects = _codes(result.rejects)
    assert rejects == {4: {"future-date"}, 6: {"maximum"}}  # a finished visit tomorrow; a length the source wrote
    dropped = result.warnings.filter(pl.col("code") == "derived-dropped")
    assert dropped.select(ROW, "field", "message").rows() == [
        (2, "length_minutes", "lengthMinutes derived from other columns is 27360, not at most 10080; left out")
    ]
    planned = plan(result.mapped, result.valid)
    bodies = {r[ROW]: json.loads(r["body"]) for r in planned.rows.iter_rows(named=True) if r["body"]}
    assert bodies[2]["period"] == {"start": "2024-03-01T08:00:00Z", "end": "2024-03-20T08:00:00Z"}
    assert "lengthMinutes" not in bodies[2]
    assert bodies[3]["lengthMinutes"] == 30  # a short visit keeps its derived length
    assert 5 in bodies  # a planned visit may start tomorrow


def test_cvrs_clean_redacted_extract_flags_nothing_but_redaction() -> None:
    result = _validate(HAZARDS / "values_cvrs_clean.tsv", "cvrs")
    assert result.warnings.is_empty(), result.warnings.to_dicts()
    assert set(result.rejects["code"].to_list()) == {"redacted"}
    assert result.rejects.select(ROW).n_unique() == result.prepared.height
    # CVRS's own value sets pass: dose number UNK and INV, sex UNK / U, refusal UNK, manufacturer UNK.
    assert result.prepared.filter(pl.col(ROW).is_in([4, 5]))["dose_number__int"].to_list() == [None, None]


def test_cvrs_every_planted_defect_is_flagged_on_its_row() -> None:
    result = _validate(HAZARDS / "values_cvrs_planted.tsv", "cvrs")
    flagged = {row: codes for row, codes in _codes(result.rejects).items()}
    for row, codes in _codes(result.warnings).items():
        flagged.setdefault(row, set()).update(codes)
    assert flagged == {
        3: {"date-format"},
        4: {"unknown-cvx"},
        5: {"unknown-mvx"},
        6: {"zip-format"},
        7: {"enum"},  # sex X
        8: {"occurrence-before-birth"},
        9: {"future-date"},
        10: {"duplicate-key"},
        11: {"required"},
        12: {"required"},
        13: {"required"},
        14: {"expiration-before-occurrence"},  # a warning: the dose was given
    }


def test_prepare_without_today_uses_the_date_now(tmp_path: Path) -> None:
    path = tmp_path / "now.csv"
    path.write_text("Record ID,Patient ID,CVX,Admin Date,DOB\nR1,P1,08,2020-01-01,1/2/03\n", encoding="utf-8")
    prepared = prepare(apply_profile(read_table(path), default_profile()))
    assert prepared["patient_birth_date__out"].to_list() == ["2003-01-02"]


def test_a_derived_reference_beyond_its_limit_is_left_out_with_a_warning(tmp_path: Path) -> None:
    # performer_id is derived as "npi:<NPI>" when only the NPI is given; an NPI cell that long is
    # rejected for itself (max-length), and the derived reference is not what rejects the row.
    path = tmp_path / "npi.csv"
    path.write_text(f"Record ID,Patient ID,CVX,Admin Date,Vaccinator NPI\nR1,P1,08,2024-01-01,{'1' * 130}\n", "utf-8")
    result = _validate(path)
    assert result.rejects.select("code", "field").rows() == [("max-length", "performer_npi")]
    assert result.warnings.select("code", "field").rows() == [("derived-dropped", "performer_id")]
    assert result.prepared["performer_id"].to_list() == [None]


def test_a_family_name_that_is_also_a_placeholder_is_kept(tmp_path: Path) -> None:
    path = tmp_path / "na.csv"
    path.write_text("Record ID,Patient ID,First Name,Last Name,DOB,CVX,Admin Date,Lot Number\n"
                    "R1,P1,Min,Na,1980-01-01,08,2024-01-01,NA\n", encoding="utf-8")
    result = _validate(path)
    assert result.rejects.is_empty()
    assert result.prepared.select("patient_last_name", "lot_number").row(0) == ("Na", None)


def test_a_zip_plus_four_written_as_nine_digits_is_hyphenated_not_rejected(tmp_path: Path) -> None:
    """Synthea's providers.csv (and registries) write a ZIP+4 as nine digits: the same code as
    ``02134-1234``. Eight digits is no ZIP spelling, and stays a zip-format reject."""
    path = tmp_path / "zips.csv"
    path.write_text(
        "Record ID,Patient ID,First Name,Last Name,State,ZIP,CVX,Admin Date\n"
        "R1,P1,A,B,MA,021341234,08,2024-01-01\n"
        "R2,P2,C,D,MI,485041234,08,2024-01-01\n"
        "R3,P3,E,F,MI,48504123,08,2024-01-01\n"
        "R4,P4,G,H,MI,48504,08,2024-01-01\n",
        encoding="utf-8",
    )
    result = _validate(path)
    zips = result.prepared.sort(ROW).get_column("patient_postal_code").to_list()
    assert zips == ["02134-1234", "48504-1234", "48504123", "48504"]
    assert _codes(result.rejects) == {4: {"zip-format"}}
