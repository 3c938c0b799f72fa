"""`clinik-etl profile init`: a commented profile from a file's headers and values (etl.mapping.starter_profile,
etl.sniff), written in the format its --output suffix names, never over a file without --force."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import polars as pl
import pytest
import yaml
from click.testing import CliRunner

from etl.cli import main
from etl.mapping import default_profile, load_profile, match_headers, starter_profile
from etl.readers import read_table
from etl.sniff import sniff

FIXTURES = Path(__file__).parent / "fixtures" / "profiles"
COUNTY = FIXTURES / "county-export.csv"


def init(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(main, ["profile", "init", *args])
    return result.exit_code, result.output


def line_of(text: str, header: str) -> str:
    return next(line for line in text.splitlines() if f'"{header}"' in line and not line.startswith("["))


def test_each_guess_carries_its_evidence_and_confidence() -> None:
    text = starter_profile(read_table(COUNTY))
    birth = line_of(text, "Birth Date")
    assert birth.startswith('"Birth Date" = "patient_birth_date"  # high: header name;')
    assert '"03141987"' in birth and "read as %m%d%Y" in birth
    assert re.search(r'"Vaccinator NPI" = "performer_npi"  # high: .*10 digits with a valid check digit', text)
    assert re.search(r'"Vaccine CVX" = "vaccine_code"  # high: .*in the CVX table', text)
    assert re.search(r'"Dose mL" = "dose_value"  # medium: .*decimal comma', text)
    assert re.search(r'"Entered" = "recorded"  # low: ', text)
    assert line_of(text, "Action").startswith('# "Action" = ?  # not mapped: values: A, D, U')
    profile = tomllib.loads(text)
    assert profile["parse"]["patient_birth_date"] == {"format": "%m%d%Y"}
    assert profile["parse"]["recorded"] == {"format": "%Y%m%dT%H%M%S"}
    assert profile["parse"]["dose_value"] == {"decimal_comma": True}
    assert profile["values"]["patient_gender"] == {"map": "sex"}
    assert profile["values"]["route"] == {"map": "route"}
    assert profile["expressions"]["patient_last_name"] == {"split": "Client Name", "separator": ",", "part": 1}


def test_the_written_profile_validates_the_file_it_came_from(tmp_path: Path) -> None:
    target = tmp_path / "county.toml"
    assert init(str(COUNTY), "--output", str(target))[0] == 0
    result = CliRunner().invoke(
        main, ["validate", str(COUNTY), "--profile", str(target), "--report-dir", str(tmp_path / "r")]
    )
    assert result.exit_code == 1, result.output  # the file's own bad rows
    rows = pl.read_csv(tmp_path / "r" / "rows.csv", infer_schema=False)
    rejected = rows.filter(pl.col("state") == "rejected").select("source_row", "error_code").rows()
    # Its three bad rows only (the unfiltered action-D row among them): no clean row is refused.
    assert rejected == [("9", "date-format"), ("10", "required"), ("11", "required")]


def test_a_dose_count_is_never_an_amount(tmp_path: Path) -> None:
    data = tmp_path / "doses.csv"
    data.write_text("patient_id,cvx,date,Dose #,Dose\nP1,208,2024-06-10,1,2\nP2,208,2024-06-10,2,3\n", "utf-8")
    table = read_table(data)
    assert match_headers(table.columns, default_profile(), "immunization")["dose_number"] == "Dose #"
    profile = tomllib.loads(starter_profile(table))
    columns = profile["columns"]
    assert columns["Dose #"] == "dose_number"
    assert "dose_value" not in columns.values()  # "Dose" holds counts too: left out, not an amount
    assert re.search(r'# "Dose" = \?  # not mapped: a count, not an amount in mL', starter_profile(table))


@pytest.mark.parametrize("suffix", [".yaml", ".yml"])
def test_output_writes_yaml_for_a_yaml_suffix(tmp_path: Path, suffix: str) -> None:
    target = tmp_path / f"county{suffix}"
    code, _ = init(str(COUNTY), "--output", str(target))
    assert code == 0
    text = target.read_text("utf-8")
    assert isinstance(yaml.safe_load(text), dict)
    with pytest.raises(tomllib.TOMLDecodeError):
        tomllib.loads(text)
    toml_target = tmp_path / "county.toml"
    assert init(str(COUNTY), "--output", str(toml_target))[0] == 0
    assert load_profile(target) == load_profile(toml_target)


def test_an_unknown_suffix_is_refused_with_exit_2(tmp_path: Path) -> None:
    code, output = init(str(COUNTY), "--output", str(tmp_path / "county.txt"))
    assert code == 2
    assert "ends in .toml, .yaml or .yml" in output
    assert not (tmp_path / "county.txt").exists()


def test_an_existing_file_is_kept_without_force(tmp_path: Path) -> None:
    target = tmp_path / "mine.toml"
    target.write_text("# hand-edited\n", "utf-8")
    code, output = init(str(COUNTY), "--output", str(target))
    assert code == 2 and "pass --force" in output
    assert target.read_text("utf-8") == "# hand-edited\n"
    assert init(str(COUNTY), "--output", str(target), "--force")[0] == 0
    assert 'name = "county-export"' in target.read_text("utf-8")


def test_sniff_tells_shapes_apart() -> None:
    def kinds(values: list[str], **kw: bool) -> dict[str, str]:
        return {s.kind: s.detail for s in sniff(pl.Series(values), **kw)}

    assert kinds(["1234567893", "1987654328"])["npi"] == ""
    assert "npi" not in kinds(["1234567890", "1987654321"])  # wrong check digits
    assert "ndc" in kinds(["49281-0418-10", "00006-4047-41"])
    assert "cvx" in kinds(["208", "08", "141"])
    patterns = [s.detail for s in sniff(pl.Series(["03/04/2024", "05/06/2024"])) if s.kind == "date"]
    assert patterns == ["%m/%d/%Y", "%d/%m/%Y"]
    assert [s.detail for s in sniff(pl.Series(["03/14/2024"])) if s.kind == "date"] == ["%m/%d/%Y"]
    assert "excel-serial" in kinds(["45453", "45454"], datelike=True)
    assert "excel-serial" not in kinds(["48504", "48505"])  # ZIP codes, unless the header names a date
    assert kinds(["M", "F", "U", "1"])["sex"] == "sex"
    assert "sex" not in kinds(["1", "2", "1"])  # as likely dose numbers
    assert "count" in kinds(["1", "2", "3"]) and "count" not in kinds(["1", "1"])


def test_ambiguous_day_and_month_are_low_confidence(tmp_path: Path) -> None:
    data = tmp_path / "amb.csv"
    data.write_text("patient_id,cvx,Admin Date\nP1,208,03/04/2024\nP2,208,05/06/2024\n", "utf-8")
    line = line_of(starter_profile(read_table(data)), "Admin Date")
    assert line.startswith('"Admin Date" = "occurrence"  # low:') and "cannot be told apart" in line


def test_an_hl7_files_state_columns_are_the_tools_own_not_unmapped() -> None:
    """RXA-21 and what it implies (etl.hl7 STATE_COLUMNS) decide a row's state whatever the profile says."""
    from etl.hl7 import STATE_COLUMNS

    path = Path(__file__).parent / "fixtures" / "hl7" / "actions.hl7"
    table = read_table(path)
    assert set(STATE_COLUMNS) <= set(table.columns)  # the reader does add them: this test can fail
    text = starter_profile(table)
    assert not [line for line in text.splitlines() if any(f'"{c}"' in line for c in STATE_COLUMNS)]
    assert '"RXA-5" = "vaccine_code"' in text  # the real segments are still there
    assert '# "RXA-11" = ?  # not mapped' in text  # and so are the ones it cannot place


SCHOOL = FIXTURES / "school-flu-upload.csv"  # a school flu upload's layout (NHS England's template), own values


def test_a_uk_upload_layout_is_drafted_by_its_words_not_guessed_into_ids() -> None:
    # A newcomer's draft of such a file mapped DATE_OF_VACCINATION to record_id ("looks like an id") and the batch
    # expiry date to occurrence, and left the person's names, postcode, batch and site unmapped.
    text = starter_profile(read_table(SCHOOL))
    mapped = tomllib.loads(text)["columns"]
    assert mapped == {
        "PERSON_FORENAME": "patient_first_name",
        "PERSON_SURNAME": "patient_last_name",
        "PERSON_DOB": "patient_birth_date",
        "PERSON_GENDER_CODE": "patient_gender",
        "PERSON_POSTCODE": "patient_postal_code",
        "DATE_OF_VACCINATION": "occurrence",
        "BATCH_NUMBER": "lot_number",
        "BATCH_EXPIRY_DATE": "expiration_date",
        "ANATOMICAL_SITE": "site",
        "REASON_NOT_VACCINATED": "status_reason",
        "LOCAL_PATIENT_ID": "patient_id",
    }
    # The vaccinator's forename is no patient's; a yes/no "vaccinated" column is the status, not a filter.
    assert line_of(text, "PERFORMING_PROFESSIONAL_FORENAME").startswith("# ")
    assert 'map it to status, [values.status] yes = "completed", no = "not-done"' in line_of(text, "VACCINATED")
    assert "[[skip]]" not in line_of(text, "VACCINATED")


@pytest.mark.parametrize(
    ("header", "field"),
    [
        ("PERSON_FORENAME", "patient_first_name"),
        ("Client DOB", "patient_birth_date"),
        ("patient-postcode", "patient_postal_code"),
        ("PERSON_ID", None),  # "id" alone names the row's record, not a detail of the person
        ("Child Lot", None),  # a lot is the dose's, whoever it was given to
        ("Vaccination ID", "record_id"),
    ],
)
def test_a_header_naming_the_patient_first_maps_only_to_the_patients_details(header: str, field: str | None) -> None:
    sources = match_headers([header], default_profile(), "immunization")
    assert {h: f for f, h in sources.items()}.get(header) == field
