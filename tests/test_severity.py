"""Rule severity: each domain rule has a default (error / warning / off) in the catalogue, and a
profile's [rules] section changes it; the API's hard limits cannot be changed."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import polars as pl
import pytest

from etl.errors import ProfileError
from etl.mapping import apply_profile, default_profile, load_profile
from etl.pipeline import validate_files
from etl.readers import ROW, read_table
from etl.rules import RULES, SEVERITIES, parse_severities, severity_of
from etl.settings import Settings
from etl.validate import Validation, validate

TODAY = dt.date(2026, 11, 22)
HEADER = "Record ID,Patient ID,First Name,Last Name,DOB,CVX,Admin Date,Expiration Date"
ROWS = [
    "R1,P1,Ann,Lee,2015-03-04,08,2024-03-04,2024-01-01",  # expired lot
    "R2,P2,Bo,Ray,2015-03-04,08,2026-12-24,",  # a dose given in the future
    "R3,P3,Cy,Day,2015-03-04,08,2024-03-04,2025-01-01",  # clean
]


def _file(tmp_path: Path) -> Path:
    path = tmp_path / "doses.csv"
    path.write_text("\n".join([HEADER, *ROWS]) + "\n", encoding="utf-8")
    return path


def _profile(tmp_path: Path, rules: str) -> Path:
    path = tmp_path / "p.toml"
    path.write_text(f'name = "p"\nkind = "immunization"\n\n[rules]\n{rules}\n', encoding="utf-8")
    return path


def _run(tmp_path: Path, rules: str | None) -> Validation:
    profile = load_profile(_profile(tmp_path, rules)) if rules is not None else default_profile()
    return validate(apply_profile(read_table(_file(tmp_path)), profile), today=TODAY)


def _outcomes(result: Validation) -> tuple[set[tuple[int, str]], set[tuple[int, str]]]:
    def pairs(frame: pl.DataFrame) -> set[tuple[int, str]]:
        return set(frame.select(ROW, "code").iter_rows())

    return pairs(result.rejects), pairs(result.warnings)


def test_defaults_an_expired_lot_warns_a_future_dose_is_rejected(tmp_path: Path) -> None:
    assert _outcomes(_run(tmp_path, None)) == ({(3, "future-date")}, {(2, "expiration-before-occurrence")})


@pytest.mark.parametrize(
    ("rules", "rejects", "warnings"),
    [
        ('expired-lot = "error"', {(2, "expiration-before-occurrence"), (3, "future-date")}, set()),
        ('expiration-before-occurrence = "off"', {(3, "future-date")}, set()),
        ('future-date = "warning"', set(), {(2, "expiration-before-occurrence"), (3, "future-date")}),
        ('future-date = "off"\nexpired-lot = "off"', set(), set()),
    ],
)
def test_a_profile_changes_a_rules_severity(
    tmp_path: Path, rules: str, rejects: set[tuple[int, str]], warnings: set[tuple[int, str]]
) -> None:
    assert _outcomes(_run(tmp_path, rules)) == (rejects, warnings)


def test_a_warning_rule_can_be_made_an_error(tmp_path: Path) -> None:
    path = tmp_path / "abroad.csv"
    path.write_text("Record ID,Patient ID,CVX,Admin Date\nR1,P1,170,2024-01-01\n", encoding="utf-8")
    plain = validate(apply_profile(read_table(path), default_profile()), today=TODAY)
    assert plain.rejects.is_empty() and plain.warnings["code"].to_list() == ["code-status"]
    strict = load_profile(_profile(tmp_path, 'code-status = "error"'))
    result = validate(apply_profile(read_table(path), strict), today=TODAY)
    assert result.rejects.select("code", "message").rows() == [("code-status", RULES["code-status"].title)]
    assert result.warnings.is_empty()


def test_a_run_applies_the_profiles_severity_in_every_batch(tmp_path: Path) -> None:
    # The run checks rows on a read-ahead thread (precheck) and again per batch: both must agree.
    _file(tmp_path)
    settings = Settings(report_dir=tmp_path / "r", profile=str(_profile(tmp_path, 'future-date = "off"')))
    report = validate_files([tmp_path / "doses.csv"], settings)
    assert report.rows.get_column("state").to_list() == ["planned"] * 3


@pytest.mark.parametrize(
    ("rules", "words"),
    [
        ('max-length = "off"', "not a rule a profile can change"),
        ('no-such-rule = "off"', "not a rule a profile can change"),
        ('future-date = "sometimes"', "a severity is one of error, warning, off"),
    ],
)
def test_a_bad_rules_entry_is_a_profile_error(tmp_path: Path, rules: str, words: str) -> None:
    with pytest.raises(ProfileError, match=words):
        load_profile(_profile(tmp_path, rules))


def test_every_domain_rule_has_a_documented_default() -> None:
    domain = {code: rule.severity for code, rule in RULES.items() if rule.severity is not None}
    assert domain["expiration-before-occurrence"] == "warning"
    assert domain["future-date"] == "error"
    assert set(domain.values()) <= set(SEVERITIES)
    # The API's hard limits are not domain rules.
    for code in ("required", "max-length", "enum", "maximum", "minimum", "max-items", "date-format"):
        assert severity_of(code) is None
    assert parse_severities({"expired-lot": "off"}) == {"expiration-before-occurrence": "off"}


def test_explain_says_a_rules_default_severity() -> None:
    from click.testing import CliRunner

    from etl.cli import main

    result = CliRunner().invoke(main, ["explain", "expiration-before-occurrence"])
    assert result.exit_code == 0
    assert 'severity: warning by default; a profile changes it: [rules] expiration-before-occurrence = "error"' in (
        result.output.replace("\n", " ")
    )
    fixed = CliRunner().invoke(main, ["explain", "max-length"])
    assert fixed.exit_code == 0 and "severity" not in fixed.output


def test_a_rule_that_only_warns_by_default_is_shown_as_a_warning_not_a_reject() -> None:
    # A newcomer read "expiration-before-occurrence (reject)" in explain and report.html, though it only warned.
    from click.testing import CliRunner

    from etl.cli import main
    from etl.report_html import render_html

    said = CliRunner().invoke(main, ["explain", "expiration-before-occurrence"]).output
    assert said.startswith("expiration-before-occurrence (warning by default): ")
    assert CliRunner().invoke(main, ["explain", "future-date"]).output.startswith("future-date (reject by default): ")
    assert CliRunner().invoke(main, ["explain", "max-length"]).output.startswith("max-length (reject): ")
    listed = CliRunner().invoke(main, ["explain"]).output
    assert any(line.split()[:2] == ["expiration-before-occurrence", "warning"] for line in listed.splitlines())
    summary = {"states": {"planned": 1}, "rows_total": 1,
               "warnings": [{"file": "a.csv", "code": "expiration-before-occurrence", "rows": [2], "count": 1}]}
    problems = pl.DataFrame(schema={"source_file": pl.String, "source_row": pl.UInt32, "kind": pl.String,
                                    "state": pl.String, "error_code": pl.String, "field": pl.String,
                                    "message": pl.String})
    page = render_html(summary, problems)
    assert "<td>expiration-before-occurrence</td><td>warning by default</td>" in page


def test_a_kinds_section_changes_severity_for_its_kind_only(tmp_path: Path) -> None:
    path = tmp_path / "multi.toml"
    path.write_text(
        '[rules]\nfuture-date = "warning"\n\n[kinds.immunization.rules]\nexpired-lot = "off"\n\n'
        '[kinds.encounter]\ncolumns = {}\n',
        encoding="utf-8",
    )
    profile = load_profile(path)
    assert profile.for_kind("immunization").rules == {
        "future-date": "warning",
        "expiration-before-occurrence": "off",
    }
    assert profile.for_kind("encounter").rules == {"future-date": "warning"}
