"""Code tables: CDC's CVX table and the MVX codes shipped as package data with their source, a
refresh command from CDC's own downloads, unknown codes rejected, ZIP codes checked."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import polars as pl
import pytest

from etl.mapping import apply_profile, default_profile, load_profile
from etl.readers import ROW, read_table
from etl.rules import RULES
from etl.validate import validate
from schemas import refresh_codes
from schemas.codes import WARNED_STATUSES, displays, names, source, statuses, table

TODAY = dt.date(2026, 11, 22)


def test_the_cvx_table_is_cdcs_whole_table_with_its_source_and_statuses() -> None:
    assert "cdc.gov" in source("cvx") and "2025-10-31" in source("cvx")
    cvx = statuses("cvx")
    assert len(cvx) > 250  # the whole table, not a sample
    assert {"Active", "Inactive", "Non-US"} <= set(cvx.values())
    assert cvx["08"] == "Active" and cvx["170"] == "Non-US"
    assert all(row["code"] and row["display"] for row in table("cvx"))


def test_the_mvx_table_says_where_it_came_from_and_keeps_the_names_registries_write() -> None:
    assert "0227" in source("mvx")
    assert {"PFR", "MOD", "MSD", "SKB", "PMC", "SEQ", "JSN", "NVX"} <= set(displays("mvx"))
    assert {"Merck", "Merck & Co., Inc.", "sanofi pasteur"} <= names("mvx")


def test_pyproject_ships_the_tables() -> None:
    text = (Path(__file__).resolve().parents[1] / "pyproject.toml").read_text(encoding="utf-8")
    assert 'schemas = ["data/*.csv"]' in text


def _one(tmp_path: Path, header: str, value: str) -> pl.DataFrame:
    path = tmp_path / "one.csv"
    path.write_text(f"Record ID,Patient ID,First Name,Last Name,Admin Date,CVX,{header}\n"
                    f"R1,P1,Ann,Lee,2024-01-01,08,{value}\n", "utf-8")
    result = validate(apply_profile(read_table(path), default_profile()), today=TODAY)
    return pl.concat([result.rejects.with_columns(pl.lit("reject").alias("as")),
                      result.warnings.with_columns(pl.lit("warning").alias("as"))])


@pytest.mark.parametrize(
    ("header", "value", "outcome"),
    [
        ("Vaccine Code System", "http://hl7.org/fhir/sid/cvx", None),
        ("Manufacturer", "AAAA", ("reject", "unknown-mvx")),
        ("Manufacturer", "PFR", None),
        ("Manufacturer", "Merck", None),
        ("Manufacturer", "Acme Biologicals", None),  # a name, not a code: sent as written
        ("ZIP", "02134", None),
        ("ZIP", "02134-1234", None),
        ("ZIP", "48504-", ("reject", "zip-format")),
        ("ZIP", "4850", ("reject", "zip-format")),  # no state: the lost zero is not certain
        ("ZIP", "ABC12", ("reject", "zip-format")),
    ],
)
def test_single_code(tmp_path: Path, header: str, value: str, outcome: tuple[str, str] | None) -> None:
    got = _one(tmp_path, header, value)
    assert got.select("as", "code").rows() == ([outcome] if outcome else [])


@pytest.mark.parametrize(
    ("cvx", "outcome"),
    [
        ("XXX", ("reject", "unknown-cvx")),
        ("9999", ("reject", "unknown-cvx")),
        ("207", None),  # Inactive: CDC keeps it for historical doses
        ("170", ("warning", "code-status")),  # Non-US
        ("8", ("warning", "leading-zero-restored")),
    ],
)
def test_cvx_codes_against_the_table(tmp_path: Path, cvx: str, outcome: tuple[str, str] | None) -> None:
    path = tmp_path / "cvx.csv"
    path.write_text(f"Record ID,Patient ID,Admin Date,CVX\nR1,P1,2024-01-01,{cvx}\n", encoding="utf-8")
    result = validate(apply_profile(read_table(path), default_profile()), today=TODAY)
    got = [("reject", c) for c in result.rejects["code"]] + [("warning", c) for c in result.warnings["code"]]
    assert got == ([outcome] if outcome else [])


def test_a_code_of_another_system_is_not_checked_against_cvx(tmp_path: Path) -> None:
    path = tmp_path / "ndc.csv"
    path.write_text("Record ID,Patient ID,Admin Date,Code,Code System\nR1,P1,2024-01-01,59267-1000-01,"
                    "http://hl7.org/fhir/sid/ndc\n", encoding="utf-8")
    result = validate(apply_profile(read_table(path), default_profile()), today=TODAY)
    assert result.rejects.is_empty() and result.warnings.is_empty()


def test_a_non_us_postal_code_is_not_a_zip(tmp_path: Path) -> None:
    path = tmp_path / "abroad.csv"
    path.write_text("Record ID,Patient ID,First Name,Last Name,Admin Date,CVX,ZIP,Country\n"
                    "R1,P1,Ann,Lee,2024-01-01,08,SW1A 1AA,GB\nR2,P2,Bo,Ray,2024-01-01,08,SW1A 1AA,US\n", "utf-8")
    result = validate(apply_profile(read_table(path), default_profile()), today=TODAY)
    assert result.rejects.select(ROW, "code").rows() == [(3, "zip-format")]


def test_a_postal_code_without_a_country_is_read_as_a_zip_and_the_message_says_so(tmp_path: Path) -> None:
    # A newcomer's UK upload (no country column): every row rejected with a message about US ZIP codes only.
    path = tmp_path / "abroad.csv"
    path.write_text("Record ID,Patient ID,First Name,Last Name,Admin Date,CVX,Postcode\n"
                    "R1,P1,Ann,Lee,2024-01-01,08,LS6 2QT\n", "utf-8")
    result = validate(apply_profile(read_table(path), default_profile()), today=TODAY)
    assert result.rejects.select("code", "message").rows() == [
        ("zip-format", "a ZIP code such as 02134 or 02134-1234 (a row without a country is read as a US address)")
    ]
    assert "[defaults] patient_country" in RULES["zip-format"].fix
    profile = tmp_path / "abroad.toml"
    profile.write_text('name = "abroad"\n[defaults]\npatient_country = "GB"\n', "utf-8")
    assert validate(apply_profile(read_table(path), load_profile(profile)), today=TODAY).rejects.is_empty()


# CDC's download formats, a few lines written here in their shape (code|...|status|...).
CDC_CVX = (
    "08 |Hep B, adolescent or pediatric|hepatitis B vaccine, pediatric or pediatric/adolescent dosage||Active|8|0|"
    "2020/06/02\n170|DTAP/IPV/HIB - non-US|non-US diphtheria ... (DTaP-Hib-IPV)||Non-US|150|0|2011/07/18\n"
)
CDC_MVX = (
    "MSD|Merck and Co., Inc.||Active|2012/10/18\nAB|Abbott Laboratories|includes Ross Products|Inactive|2017/11/16\n"
)


def test_refresh_converts_cdcs_download(tmp_path: Path) -> None:
    text = refresh_codes.convert("cvx", CDC_CVX, source="test", today=dt.date(2026, 1, 2))
    lines = text.splitlines()
    assert lines[0] == "# source: test; retrieved 2026-01-02"
    assert lines[1:] == [
        "code,display,status",
        '08,"hepatitis B vaccine, pediatric or pediatric/adolescent dosage",Active',
        "170,non-US diphtheria ... (DTaP-Hib-IPV),Non-US",
    ]


def test_refresh_command_writes_the_table_and_refuses_a_wrong_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    download = tmp_path / "mvx.txt"
    download.write_bytes(CDC_MVX.encode("cp1252"))
    out = tmp_path / "mvx.csv"
    assert refresh_codes.main(["mvx", str(download), "--output", str(out)]) == 0
    written = out.read_text(encoding="utf-8").splitlines()
    assert written[0].startswith("# source: https://www2a.cdc.gov/") and written[1] == "code,display,status"
    assert written[2:] == ['MSD,"Merck and Co., Inc.",Active', "AB,Abbott Laboratories,Inactive"]
    wrong = tmp_path / "wrong.txt"
    wrong.write_text("just some text\n", encoding="utf-8")
    assert refresh_codes.main(["cvx", str(wrong), "--output", str(tmp_path / "x.csv")]) == 2
    assert "line 1: not a CVX row" in capsys.readouterr().err
    assert not (tmp_path / "x.csv").exists()


def test_warned_statuses_exist_in_the_table() -> None:
    assert set(WARNED_STATUSES) & set(statuses("cvx").values())
