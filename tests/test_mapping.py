"""Mapping profiles (etl.mapping): header matching, renames, defaults, kinds and profile files."""

from __future__ import annotations

from pathlib import Path

import polars as pl
import pytest

from etl.errors import InputError, ProfileError
from etl.mapping import (
    Profile,
    apply_profile,
    builtin_profiles,
    default_profile,
    detect_kind,
    key_field,
    load_profile,
    normalise_header,
)
from etl.readers import ROW, Table, read_table
from etl.validate import prepare
from schemas.canonical import DEFAULTS, field_map

from .conftest import SAMPLE, SAMPLE_KINDS

REGISTRY_HEADER = "Record ID,Patient ID,First Name,Last Name,DOB,Sex,Admin Date,CVX,Lot Number"


def table(tmp_path: Path, text: str, name: str = "in.csv") -> Table:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return read_table(path)


def column(frame: pl.DataFrame, name: str) -> list[str | None]:
    return frame.get_column(name).to_list()


@pytest.mark.parametrize("header", ["Lot Number", "lot_number", "LOT-NUMBER", " Lot.Number ", "lot (number)"])
def test_normalise_header_ignores_case_spacing_and_punctuation(header: str) -> None:
    assert normalise_header(header) == "lotnumber"


def test_normalise_header_keeps_letters_and_digits_apart() -> None:
    assert normalise_header("Lot Numbers") != normalise_header("Lot Number")
    assert normalise_header("Diagnosis #2") == "diagnosis2"


@pytest.mark.parametrize(
    ("kind", "field"),
    [
        ("patient", "patient_id"),
        ("practitioner", "practitioner_id"),
        ("document", "document_id"),
        ("immunization", "record_id"),
        ("encounter", "record_id"),
        ("task", "record_id"),
    ],
)
def test_key_field_names_the_field_that_keys_a_row(kind: str, field: str) -> None:
    assert key_field(kind) == field
    assert field in field_map(kind)  # a real field of the kind, not a made-up name


def test_the_default_profile_matches_headers_by_name_and_alias(tmp_path: Path) -> None:
    t = table(
        tmp_path,
        REGISTRY_HEADER + ",Favourite Colour\n"
        "R1,P1,Ann,Lee,2015-03-04,F,2021-01-02,08,LOT1,blue\n"
        "R2,P2,Bo,Ray,2014-01-01,M,2021-01-03,10,LOT2,red\n",
    )
    mapped = apply_profile(t, default_profile())
    assert mapped.kind == "immunization"
    assert mapped.sources["patient_birth_date"] == "DOB"
    assert mapped.sources["patient_gender"] == "Sex"
    assert mapped.sources["vaccine_code"] == "CVX"
    assert mapped.sources["occurrence"] == "Admin Date"
    # The frame has every canonical field of the kind, in order, after the row number; all text.
    assert mapped.frame.columns == [ROW, *field_map("immunization")]
    assert all(dtype == pl.String for name, dtype in mapped.frame.schema.items() if name != ROW)
    assert column(mapped.frame, "vaccine_code") == ["08", "10"]
    assert column(mapped.frame, "lot_number") == ["LOT1", "LOT2"]
    assert column(mapped.frame, ROW) == column(t.frame, ROW)
    # Absent fields are null columns; the unmatched header is reported, not silently dropped.
    assert column(mapped.frame, "note") == [None, None]
    assert mapped.unmapped == ["Favourite Colour"]
    [notice] = [n for n in t.notices if n.code == "unmapped-columns"]
    assert "Favourite Colour" in notice.message and notice.file == str(t.path)


def test_profile_columns_rename_and_win_over_a_name_match(tmp_path: Path) -> None:
    t = table(
        tmp_path,
        "Vax Event,Pt MRN,Given,Family,Shot,Code,When\nE1,M1,Ann,Lee,08,99,2021-01-02\n",
    )
    profile = Profile(
        name="county",
        kind="immunization",
        columns={
            "Vax Event": "record_id",
            "Pt MRN": "patient_id",
            "Given": "patient_first_name",
            "Family": "patient_last_name",
            "Shot": "vaccine_code",
            "When": "occurrence",
        },
    )
    mapped = apply_profile(t, profile)
    assert mapped.sources["vaccine_code"] == "Shot"
    assert column(mapped.frame, "vaccine_code") == ["08"]  # not "Code", which only matches by name
    assert column(mapped.frame, "record_id") == ["E1"]
    assert column(mapped.frame, "patient_id") == ["M1"]
    assert "Code" in mapped.unmapped
    assert mapped.source_column("patient_id") == "Pt MRN"
    assert mapped.source_column("note") == "note"  # absent: its own name


def test_auto_false_maps_only_the_profile_columns(tmp_path: Path) -> None:
    t = table(tmp_path, REGISTRY_HEADER + "\nR1,P1,Ann,Lee,2015-03-04,F,2021-01-02,08,LOT1\n")
    columns = {"Record ID": "record_id", "Patient ID": "patient_id", "CVX": "vaccine_code", "Admin Date": "occurrence"}
    mapped = apply_profile(t, Profile(kind="immunization", auto=False, columns=columns))
    assert set(mapped.sources) == set(columns.values())
    assert column(mapped.frame, "patient_first_name") == [None]  # "First Name" is an alias, but auto is off
    assert set(mapped.unmapped) == {"First Name", "Last Name", "DOB", "Sex", "Lot Number"}


def test_a_missing_required_column_is_one_line_naming_the_file_and_field(tmp_path: Path) -> None:
    t = table(tmp_path, "Record ID,Patient ID,Admin Date\nR1,P1,2021-01-02\n")
    with pytest.raises(InputError) as caught:
        apply_profile(t, default_profile("immunization"))
    message = str(caught.value)
    assert message.startswith(f"{t.path}, row 1: ")
    assert "vaccine_code" in message and "cvx" in message  # the field, and a header that would match it
    assert "\n" not in message


def test_a_profile_default_stands_in_for_a_required_column(tmp_path: Path) -> None:
    t = table(tmp_path, "Record ID,Patient ID,Admin Date\nR1,P1,2021-01-02\nR2,P2,2021-01-03\n")
    mapped = apply_profile(t, Profile(kind="immunization", defaults={"vaccine_code": "08"}))
    assert mapped.profile.defaults["vaccine_code"] == "08"
    assert mapped.profile.defaults["status"] == DEFAULTS["immunization"]["status"]  # the kind's own default kept
    assert column(prepare(mapped), "vaccine_code") == ["08", "08"]


def test_for_kind_layers_defaults_and_keeps_only_the_kinds_fields() -> None:
    profile = Profile(
        columns={"A": "record_id", "B": "npi"},
        defaults={"status": "entered-in-error"},
        kinds={"practitioner": Profile(kind="practitioner", columns={"C": "practitioner_first_name"})},
    )
    immunization = profile.for_kind("immunization")
    assert immunization.kind == "immunization"
    assert immunization.columns == {"A": "record_id"}  # npi is not an immunization field
    assert immunization.defaults["status"] == "entered-in-error"  # the profile's default beats the built-in one
    assert immunization.defaults["vaccine_system"] == DEFAULTS["immunization"]["vaccine_system"]
    assert immunization.kinds == {}
    practitioner = profile.for_kind("practitioner")
    assert practitioner.columns == {"B": "npi", "C": "practitioner_first_name"}
    assert "status" not in practitioner.defaults  # not a practitioner field


def test_numbered_columns_make_one_list_field(tmp_path: Path) -> None:
    t = table(
        tmp_path,
        "Visit ID,Patient ID,Status,Class,Diagnosis 1,Diagnosis 2,Diagnosis 3\n"
        "V1,P1,finished,AMB,Z00.129,Z23,\n"
        "V2,P2,finished,AMB,,J10,\n",
    )
    mapped = apply_profile(t, default_profile())
    assert mapped.kind == "encounter"
    assert column(mapped.frame, "diagnoses") == ["Z00.129;Z23", "J10"]  # blanks left out
    assert mapped.sources["diagnoses"] == "Diagnosis 1"
    assert mapped.unmapped == []


@pytest.mark.parametrize(
    ("name", "kind"),
    SAMPLE_KINDS,
)
def test_detect_kind_tells_the_samples_apart(name: str, kind: str) -> None:
    t = read_table(SAMPLE / name)
    assert detect_kind(t, default_profile()) == kind
    assert detect_kind(t, Profile(kind="task")) == "task"  # a profile's kind is not second-guessed


def test_detect_kind_refuses_to_guess(tmp_path: Path) -> None:
    t = table(tmp_path, "Colour,Size\nblue,3\n")
    with pytest.raises(InputError) as caught:
        detect_kind(t, default_profile())
    message = str(caught.value)
    assert "cannot tell what kind" in message and "--kind" in message and str(t.path) in message


def test_a_multi_kind_profile_picks_among_its_own_kinds() -> None:
    synthea = load_profile("synthea")
    assert synthea.kind is None and {"patient", "immunization"} <= set(synthea.kinds)
    assert detect_kind(read_table(SAMPLE / "synthea" / "patients.csv"), synthea) == "patient"
    immunizations = read_table(SAMPLE / "synthea" / "immunizations.csv")
    mapped = apply_profile(immunizations, synthea)
    assert mapped.kind == "immunization"
    assert mapped.sources["patient_id"] == "PATIENT" and mapped.sources["vaccine_code"] == "CODE"
    assert not mapped.keyed_by_record  # Synthea's immunizations carry no id of their own


def test_keyed_by_record_follows_the_key_column(tmp_path: Path) -> None:
    with_id = table(tmp_path, REGISTRY_HEADER + "\nR1,P1,Ann,Lee,2015-03-04,F,2021-01-02,08,L\n", "a.csv")
    without = table(tmp_path, "Patient ID,CVX,Admin Date\nP1,08,2021-01-02\n", "b.csv")
    assert apply_profile(with_id, default_profile()).keyed_by_record
    assert not apply_profile(without, default_profile("immunization")).keyed_by_record


def test_with_rows_maps_another_batch_the_same_way(tmp_path: Path) -> None:
    t = table(
        tmp_path,
        "Vax Event,Patient ID,CVX,Admin Date\nE1,P1,08,2021-01-02\nE2,P2,10,2021-01-03\nE3,P3,20,2021-01-04\n",
    )
    mapped = apply_profile(t, Profile(kind="immunization", columns={"Vax Event": "record_id"}))
    batch = mapped.with_rows(t.frame.slice(1, 2))
    assert batch.frame.columns == mapped.frame.columns
    assert column(batch.frame, "record_id") == ["E2", "E3"]
    assert column(batch.frame, "vaccine_code") == ["10", "20"]
    assert batch.sources == mapped.sources and batch.profile == mapped.profile
    assert mapped.frame.height == 3  # the original is untouched


def test_builtin_profiles_are_listed_with_descriptions() -> None:
    profiles = builtin_profiles()
    assert {"default", "cvrs", "synthea", "clinikapi"} <= set(profiles)
    assert all(description for description in profiles.values())
    assert load_profile("default") == default_profile()


def test_the_cvrs_profile_maps_its_columns_and_values() -> None:
    cvrs = load_profile("cvrs")
    assert cvrs.name == "cvrs" and cvrs.kind == "immunization"
    assert cvrs.columns["vax_event_id"] == "record_id" and cvrs.columns["recip_id"] == "patient_id"
    assert cvrs.values["status"]["yes"] == "not-done"
    assert cvrs.redacted == ("Redacted",)
    mapped = apply_profile(read_table(SAMPLE / "cvrs" / "cvrs_extract.tsv"), cvrs)
    assert mapped.sources["record_id"] == "vax_event_id" and mapped.keyed_by_record


def test_toml_and_yaml_profiles_read_alike(tmp_path: Path) -> None:
    toml = tmp_path / "county.toml"
    toml.write_text(
        'kind = "immunization"\ntimezone = "America/Chicago"\nauto = false\n'
        '[columns]\n"Vax Event" = "record_id"\n"Pt MRN" = "patient_id"\n'
        '[defaults]\nstatus = "completed"\n',
        encoding="utf-8",
    )
    yaml = tmp_path / "county.yaml"
    yaml.write_text(
        "kind: immunization\ntimezone: America/Chicago\nauto: false\n"
        "columns:\n  Vax Event: record_id\n  Pt MRN: patient_id\n"
        "defaults:\n  status: completed\n",
        encoding="utf-8",
    )
    from_toml, from_yaml = load_profile(toml), load_profile(yaml)
    assert from_toml == from_yaml
    assert from_toml.name == "county"  # the file's stem when the profile has no name
    assert from_toml.timezone == "America/Chicago" and from_toml.auto is False
    assert from_toml.columns == {"Vax Event": "record_id", "Pt MRN": "patient_id"}


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('colour = "blue"\n', "unknown setting(s) colour"),
        ('kind = "vaccine"\n', "unknown kind 'vaccine'"),
        ('kind = "immunization"\n[columns]\n"X" = "npi"\n', "[columns] names unknown field(s) npi for kind"),
        ('[defaults]\nnot_a_field = "x"\n', "[defaults] names unknown field(s) not_a_field"),
        ('timezone = "Mars/Olympus"\n', "unknown timezone 'Mars/Olympus'"),
        ("kind = \n", "not valid TOML"),
        ('[kinds.patient]\nkind = "patient"\n[kinds.patient.columns]\n"X" = "vaccine_code"\n', "[kinds.patient]"),
    ],
)
def test_a_bad_profile_is_one_line_naming_the_file(tmp_path: Path, text: str, expected: str) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(ProfileError) as caught:
        load_profile(path)
    message = str(caught.value)
    assert message.startswith(str(path)) and expected in message and "\n" not in message


def test_an_unreadable_profile_lists_the_builtin_ones(tmp_path: Path) -> None:
    with pytest.raises(ProfileError) as caught:
        load_profile(tmp_path / "nowhere.toml")
    message = str(caught.value)
    assert "cannot read profile" in message and "cvrs" in message and "synthea" in message
