"""Profile keys that replace pre-processing scripts (etl.mapping, etl.codemaps, the validator's parse hook):
parse formats, decimal commas, column expressions, value maps, [[skip]] filters, files/sheets -> kind."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import polars as pl
import pytest
from click.testing import CliRunner

from etl.cli import main
from etl.codemaps import CODE_MAPS, code_map
from etl.errors import InputError, ProfileError
from etl.mapping import SKIP, Profile, apply_profile, detect_kind, load_profile
from etl.readers import ROW, Table, read_table
from etl.validate import prepare, validate

FIXTURES = Path(__file__).parent / "fixtures" / "profiles"
TODAY = dt.date(2025, 1, 1)


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def profile(tmp_path: Path, text: str, name: str = "p.toml") -> Profile:
    return load_profile(write(tmp_path, name, text))


def table(tmp_path: Path, text: str, name: str = "in.csv") -> Table:
    return read_table(write(tmp_path, name, text))


IMM = 'kind = "immunization"\n'


def out(tmp_path: Path, csv: str, prof: str, name: str) -> list[str | None]:
    """The canonical text the validator sends for ``name``, row by row."""
    prepared = prepare(apply_profile(table(tmp_path, csv), profile(tmp_path, prof)))
    return prepared.get_column(name).to_list()


# --- parse formats ----------------------------------------------------------------------------------


def test_a_declared_date_pattern_gives_iso_dates_and_a_bad_value_is_still_a_date_format_reject(
    tmp_path: Path,
) -> None:
    csv = "patient_id,first_name,last_name,vaccine_code,Admin Date,DOB\n"
    csv += "P1,Ann,Lee,208,06102024,03141987\nP2,Bo,Li,208,13452024,11021979\n"
    prof = IMM + '[columns]\n"Admin Date" = "occurrence"\n"DOB" = "patient_birth_date"\n'
    prof += '[parse.occurrence]\nformat = "%m%d%Y"\n[parse.patient_birth_date]\nformat = "%m%d%Y"\n'
    mapped = apply_profile(table(tmp_path, csv), profile(tmp_path, prof))
    result = validate(mapped, today=TODAY)
    assert result.prepared.get_column("occurrence__out").to_list() == ["2024-06-10", None]
    assert result.prepared.get_column("patient_birth_date__out").to_list() == ["1987-03-14", "1979-11-02"]
    assert result.rejects.select(ROW, "code", "field", "value").rows() == [(3, "date-format", "occurrence", "13452024")]


def test_without_the_pattern_the_same_dates_are_refused(tmp_path: Path) -> None:
    csv = "patient_id,vaccine_code,Admin Date\nP1,208,06102024\n"
    mapped = apply_profile(table(tmp_path, csv), profile(tmp_path, IMM + '[columns]\n"Admin Date" = "occurrence"\n'))
    assert validate(mapped, today=TODAY).rejects.get_column("code").to_list() == ["date-format"]


@pytest.mark.parametrize(
    ("pattern", "value", "expected"),
    [
        ("%Y%m%dT%H%M%S", "20240610T183325", "2024-06-10T23:33:25Z"),  # Chicago, summer: UTC-5
        ("%Y-%m-%d %H:%M", "2024-02-14 10:30", "2024-02-14T16:30:00Z"),  # winter: UTC-6
        ("%d.%m.%Y %H:%M%z", "14.02.2024 10:30+0100", "2024-02-14T09:30:00Z"),  # its own offset wins
    ],
)
def test_date_time_patterns_use_the_profile_zone(tmp_path: Path, pattern: str, value: str, expected: str) -> None:
    csv = f"patient_id,vaccine_code,When\nP1,208,{value}\n"
    prof = IMM + 'timezone = "America/Chicago"\n[columns]\n"When" = "occurrence"\n'
    prof += f'[parse.occurrence]\nformat = "{pattern}"\n'
    assert out(tmp_path, csv, prof, "occurrence__out") == [expected]


def test_a_column_time_zone_wins_over_the_profile_one(tmp_path: Path) -> None:
    csv = "patient_id,vaccine_code,When,Entered\nP1,208,2024-02-14T10:30:00,2024-02-14T10:30:00\n"
    prof = IMM + 'timezone = "America/Chicago"\n[columns]\n"When" = "occurrence"\n"Entered" = "recorded"\n'
    prof += '[parse.recorded]\ntimezone = "Europe/Berlin"\n'
    prepared = prepare(apply_profile(table(tmp_path, csv), profile(tmp_path, prof)))
    assert prepared.row(0, named=True)["occurrence__out"] == "2024-02-14T16:30:00Z"
    assert prepared.row(0, named=True)["recorded__out"] == "2024-02-14T09:30:00Z"


def test_excel_serials_in_a_csv_are_dates_declared_or_repaired_with_a_warning(tmp_path: Path) -> None:
    csv = "patient_id,vaccine_code,When,Expiry\nP1,208,45453,45453\n"
    prof = IMM + '[columns]\n"When" = "occurrence"\n"Expiry" = "expiration_date"\n'
    prof += "[parse.occurrence]\nexcel_serial = true\n"
    mapped = apply_profile(table(tmp_path, csv), profile(tmp_path, prof))
    result = validate(mapped, today=TODAY)
    assert result.prepared.get_column("occurrence__out").to_list() == ["2024-06-10"]
    # An undeclared column's serials are repaired too (etl.validate), each with a warning on its row.
    assert result.rejects.is_empty()
    assert result.prepared.get_column("expiration_date__out").to_list() == ["2024-06-10"]
    # The declared column's serials are no hazard: the profile asked for them, so no warning on it.
    assert result.warnings.filter(pl.col("code") == "excel-serial-date").select("field", ROW).rows() == [
        ("expiration_date", 2)
    ]


# --- decimal commas ---------------------------------------------------------------------------------


def test_a_semicolon_file_with_decimal_commas_is_read_with_a_notice(tmp_path: Path) -> None:
    csv = "patient_id;vaccine_code;occurrence;Dose mL\nP1;208;2024-06-10;0,5\nP2;208;2024-06-10;1\n"
    mapped = apply_profile(table(tmp_path, csv), profile(tmp_path, IMM + '[columns]\n"Dose mL" = "dose_value"\n'))
    result = validate(mapped, today=TODAY)
    assert result.prepared.get_column("dose_value__num").to_list() == [0.5, 1.0]
    assert result.rejects.is_empty()
    notices = [n for n in mapped.table.notices if n.code == "decimal-comma"]
    assert [(n.column, n.row) for n in notices] == [("Dose mL", 1)]
    validate(mapped.with_rows(mapped.table.frame), today=TODAY)  # another batch: told once
    assert len([n for n in mapped.table.notices if n.code == "decimal-comma"]) == 1


def test_decimal_comma_false_turns_the_guess_off(tmp_path: Path) -> None:
    csv = "patient_id;vaccine_code;occurrence;dose_value\nP1;208;2024-06-10;0,5\n"
    mapped = apply_profile(table(tmp_path, csv), profile(tmp_path, IMM + "decimal_comma = false\n"))
    assert validate(mapped, today=TODAY).rejects.get_column("code").to_list() == ["number-format"]
    assert not [n for n in mapped.table.notices if n.code == "decimal-comma"]


def test_no_guess_in_a_comma_file_or_where_points_are_used(tmp_path: Path) -> None:
    points = "patient_id;vaccine_code;occurrence;dose_value\nP1;208;2024-06-10;0.5\nP2;208;2024-06-10;1,5\n"
    mapped = apply_profile(table(tmp_path, points), profile(tmp_path, IMM))
    assert validate(mapped, today=TODAY).rejects.select(ROW, "code").rows() == [(3, "number-format")]
    tabbed = "patient_id\tvaccine_code\toccurrence\tdose_value\nP1\t208\t2024-06-10\t0,5\n"
    mapped = apply_profile(table(tmp_path, tabbed, "t.tsv"), profile(tmp_path, IMM))
    assert validate(mapped, today=TODAY).rejects.get_column("code").to_list() == ["number-format"]
    declared = profile(tmp_path, IMM + "[parse.dose_value]\ndecimal_comma = true\n")
    assert prepare(apply_profile(table(tmp_path, tabbed, "t.tsv"), declared)).get_column("dose_value__num")[0] == 0.5


# --- column expressions -----------------------------------------------------------------------------


def test_join_split_and_constant_build_fields(tmp_path: Path) -> None:
    csv = (
        "patient_id,vaccine_code,occurrence,Name,Vacc First,Vacc Last,Extra\n"
        "P1,208,2024-06-10,\"Doe, Jane Q\",Ann,Lee,48504\n"
        "P2,208,2024-06-10,Roe,,Diaz,\n"
        "P3,208,2024-06-10,,,,\n"
    )
    prof = IMM + """
[expressions.patient_last_name]
split = "Name"
separator = ","
[expressions.patient_first_name]
split = "Name"
separator = ","
part = -1
[expressions.performer_name]
join = ["Vacc First", "Vacc Last"]
[expressions.dose_unit]
constant = "mL"
"""
    mapped = apply_profile(table(tmp_path, csv), profile(tmp_path, prof))
    frame = mapped.frame
    assert frame.get_column("patient_last_name").to_list() == ["Doe", "Roe", None]
    assert frame.get_column("patient_first_name").to_list() == ["Jane Q", "Roe", None]
    assert frame.get_column("performer_name").to_list() == ["Ann Lee", "Diaz", None]
    assert frame.get_column("dose_unit").to_list() == ["mL"] * 3
    assert mapped.sources["performer_name"] == "Vacc First"
    assert "Name" not in mapped.unmapped and "Vacc Last" not in mapped.unmapped and "Extra" in mapped.unmapped


def test_an_expression_stands_in_for_a_required_column(tmp_path: Path) -> None:
    csv = "Patient,vaccine_code,occurrence\nP1,208,2024-06-10\n"
    prof = IMM + '[expressions.patient_id]\njoin = ["Patient"]\n'
    assert apply_profile(table(tmp_path, csv), profile(tmp_path, prof)).frame.get_column("patient_id")[0] == "P1"


def test_an_expression_naming_a_missing_column_is_one_line(tmp_path: Path) -> None:
    csv = "patient_id,vaccine_code,occurrence\nP1,208,2024-06-10\n"
    prof = profile(tmp_path, IMM + '[expressions.performer_name]\njoin = ["First", "Last"]\n')
    with pytest.raises(InputError, match=r"\[expressions.performer_name\] reads column 'First'"):
        apply_profile(table(tmp_path, csv), prof)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('[expressions.note]\njoin = ["a"]\nconstant = "x"\n', "exactly one of join, split or constant"),
        ('[expressions.note]\nsplit = "a"\npart = 0\n', "part is a whole number"),
        ('[expressions.note]\nsplit = "a"\nseperator = ","\n', "unknown setting"),
        ('[expressions.nosuch]\nconstant = "x"\n', "unknown field"),
        ('[parse.occurrence]\nformat = "MMDDYYYY"\n', "no % directive"),
        ('[parse.occurrence]\ntimezone = "Mars/Base"\n', "unknown timezone"),
        ("decimal_comma = 1\n", "true or false"),
        ('[values.route]\nmap = "nosuch"\n', "no built-in map 'nosuch'"),
        ('[[skip]]\ncolumn = "Action"\n', "a column and its values"),
        ('[[skip]]\ncolumn = "Action"\npattern = "("\n', "not a regular expression"),
        ('files = ["*.csv"]\n', "belong in a [kinds.<kind>] section"),
    ],
)
def test_a_bad_new_key_is_a_profile_error_naming_the_file(tmp_path: Path, text: str, expected: str) -> None:
    with pytest.raises(ProfileError, match=r"p\.toml") as caught:
        profile(tmp_path, IMM + text)
    assert expected in str(caught.value)


# --- value maps -------------------------------------------------------------------------------------


def test_built_in_maps_turn_code_systems_into_what_is_sent(tmp_path: Path) -> None:
    csv = (
        "patient_id,patient_first_name,patient_last_name,vaccine_code,occurrence,Sex,Route,Site\n"
        "P1,A,B,208,2024-06-10,1,C28161,LD\n"
        "P2,A,B,208,2024-06-10,2,SC,368208006\n"
        "P3,A,B,208,2024-06-10,M,78421000,rt\n"
        "P4,A,B,208,2024-06-10,U,IN,Left Thigh\n"
    )
    prof = IMM + '[columns]\n"Sex" = "patient_gender"\n"Route" = "route"\n"Site" = "site"\n'
    prof += '[values.patient_gender]\nmap = "sex"\n[values.route]\nmap = "route"\n[values.site]\nmap = "site"\n'
    result = validate(apply_profile(table(tmp_path, csv), profile(tmp_path, prof)), today=TODAY)
    got = result.prepared.select("patient_gender", "route", "site").rows()
    assert got == [("male", "IM", "LD"), ("female", "SQ", "LA"), ("male", "IM", "RT"), ("unknown", "NASINHLC", "LT")]
    assert result.rejects.is_empty() and result.warnings.is_empty()


def test_without_the_map_numeric_sex_codes_are_rejected(tmp_path: Path) -> None:
    csv = "patient_id,patient_first_name,patient_last_name,vaccine_code,occurrence,Sex\nP1,A,B,208,2024-06-10,1\n"
    result = validate(apply_profile(table(tmp_path, csv), profile(tmp_path, IMM)), today=TODAY)
    assert result.rejects.select("field", "code").rows() == [("patient_gender", "enum")]


def test_a_value_map_default_replaces_unlisted_words_and_keeps_blanks(tmp_path: Path) -> None:
    csv = "patient_id,vaccine_code,occurrence,Refused\n"
    csv += "P1,208,2024-06-10,Y\nP2,208,2024-06-10,maybe\nP3,208,2024-06-10,\n"
    prof = IMM + '[columns]\n"Refused" = "status"\n[values.status]\ny = "not-done"\ndefault = "completed"\n'
    prepared = prepare(apply_profile(table(tmp_path, csv), profile(tmp_path, prof)))
    # The blank gets the kind's built-in default (completed); "maybe" the map's.
    assert prepared.get_column("status").to_list() == ["not-done", "completed", "completed"]


def test_the_encounter_class_map_covers_synthea_vocabulary(tmp_path: Path) -> None:
    classes = ["ambulatory", "emergency", "inpatient", "wellness", "urgentcare", "outpatient", "home", "hospice",
               "snf", "virtual"]
    rows = "".join(f"E{i},P1,{c},2024-06-10T10:00:00Z\n" for i, c in enumerate(classes))
    csv = "record_id,patient_id,encounter_class,period_start\n" + rows
    prof = 'kind = "encounter"\n[values.encounter_class]\nmap = "encounter-class"\n'
    result = validate(apply_profile(table(tmp_path, csv), profile(tmp_path, prof)), today=TODAY)
    assert result.rejects.is_empty()
    assert dict(zip(classes, result.prepared.get_column("encounter_class").to_list(), strict=True)) == {
        "ambulatory": "AMB", "emergency": "EMER", "inpatient": "IMP", "wellness": "AMB", "urgentcare": "EMER",
        "outpatient": "AMB", "home": "HH", "hospice": "HH", "snf": "IMP", "virtual": "VR",
    }


def test_every_built_in_map_sends_only_values_the_api_takes() -> None:
    from schemas.canonical import field_map

    fields = field_map("immunization") | field_map("encounter")
    targets = {"sex": "patient_gender", "route": "route", "site": "site", "encounter-class": "encounter_class"}
    from schemas.codes import displays

    for name, words in CODE_MAPS.items():
        family = next(k for k in targets if name.endswith(k))
        f = fields[targets[family]]
        allowed = set(f.enum or displays(family))
        assert set(words.values()) <= allowed, name
    with pytest.raises(KeyError, match="built-in maps: sex"):
        code_map("nosuch")


# --- row filters ------------------------------------------------------------------------------------


def test_skipped_rows_are_reported_skipped_and_never_checked(tmp_path: Path) -> None:
    csv = (
        "record_id,patient_id,first_name,last_name,vaccine_code,occurrence,Action\n"
        "E1,P1,Ann,Lee,208,2024-06-10,A\n"
        "E2,P2,Bo,Li,,not a date,d\n"  # deleted: its bad cells do not matter
        "E2,P2,Bo,Li,208,2024-06-11,A\n"  # the same event id again, after its deletion: not a duplicate
        "E3,P3,Cy,Ma,208,2024-06-12,TEST\n"
    )
    prof = write(tmp_path, "p.toml", IMM + '[[skip]]\ncolumn = "Action"\nvalues = ["D"]\nreason = "deleted"\n'
                 '[[skip]]\ncolumn = "Action"\npattern = "^TEST"\n')
    data = write(tmp_path, "in.csv", csv)
    result = CliRunner().invoke(main, ["validate", str(data), "--profile", str(prof), "--report-dir",
                                       str(tmp_path / "r")])
    assert result.exit_code == 0, result.output
    rows = pl.read_csv(tmp_path / "r" / "rows.csv", infer_schema=False)
    assert rows.select("source_row", "state", "error_code", "message").rows() == [
        ("2", "planned", None, None),
        ("3", "skipped", "filtered", "deleted"),
        ("4", "planned", None, None),
        ("5", "skipped", "filtered", "Action is like /^TEST/"),
    ]
    summary = json.loads((tmp_path / "r" / "summary.json").read_text("utf-8"))
    assert summary["states"]["skipped"] == 2 and summary["rows_total"] == 4


def test_the_skip_column_is_a_reason_or_null(tmp_path: Path) -> None:
    csv = "patient_id,vaccine_code,occurrence,Flag\nP1,208,2024-06-10,D\nP2,208,2024-06-10,\n"
    prof = profile(tmp_path, IMM + '[[skip]]\ncolumn = "Flag"\nvalues = ["D", "X"]\n')
    mapped = apply_profile(table(tmp_path, csv), prof)
    assert mapped.frame.get_column(SKIP).to_list() == ["Flag is D or X", None]
    assert "Flag" not in mapped.unmapped


# --- files and sheets choose a kind -----------------------------------------------------------------

MULTI = """
[kinds.practitioner]
files = ["providers*.csv"]
[kinds.practitioner.columns]
"Who" = "practitioner_name"
"Id" = "practitioner_id"
[kinds.patient]
files = ["people-*.csv"]
sheets = ["Patients"]
[kinds.patient.columns]
"Id" = "patient_id"
"Who" = "patient_first_name"
"""


def test_a_file_name_pattern_chooses_the_kind(tmp_path: Path) -> None:
    prof = profile(tmp_path, MULTI)
    text = "Id,Who,Surname\n1,Ann,Lee\n"
    assert detect_kind(table(tmp_path, text, "Providers-2024.csv"), prof) == "practitioner"
    assert detect_kind(table(tmp_path, text, "people-2024.csv"), prof) == "patient"
    mapped = apply_profile(table(tmp_path, text, "providers.csv"), prof)
    assert mapped.kind == "practitioner" and mapped.frame.get_column("practitioner_name")[0] == "Ann"


def test_a_sheet_name_pattern_chooses_the_kind(tmp_path: Path) -> None:
    import xlsxwriter

    book = xlsxwriter.Workbook(str(tmp_path / "book.xlsx"))
    sheet = book.add_worksheet("Patients")
    for r, row in enumerate((["Id", "Who", "last_name"], ["1", "Ann", "Lee"])):
        sheet.write_row(r, 0, row)
    book.close()
    assert detect_kind(read_table(tmp_path / "book.xlsx"), profile(tmp_path, MULTI)) == "patient"


def test_two_matching_patterns_are_an_error(tmp_path: Path) -> None:
    prof = profile(tmp_path, MULTI.replace('"people-*.csv"', '"*.csv"'))
    with pytest.raises(InputError, match="practitioner and patient both match"):
        detect_kind(table(tmp_path, "Id,Who\n1,Ann\n", "providers.csv"), prof)


# --- the fixture, TOML and YAML ---------------------------------------------------------------------


def test_the_county_export_needs_no_script(tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["load", "--dry-run", str(FIXTURES / "county-export.csv"), "--profile",
                                       str(FIXTURES / "county-export.toml"), "--report-dir", str(tmp_path / "r")])
    assert result.exit_code == 1, result.output  # its two bad rows
    rows = pl.read_csv(tmp_path / "r" / "rows.csv", infer_schema=False)
    by_state = dict(rows.group_by("state").len().rows())
    assert by_state == {"planned": 6, "rejected": 2, "skipped": 2}
    assert rows.filter(pl.col("state") == "rejected").select("source_row", "error_code").rows() == [
        ("9", "date-format"), ("10", "required")
    ]
    bodies = [json.loads(line)["body"] for line in (tmp_path / "r" / "payloads.ndjson").read_text().splitlines()]
    shots = [b for b in bodies if "vaccineCode" in b]
    first = shots[0]
    assert first["occurrenceDateTime"] == "2024-06-10"
    assert first["recorded"] == "2024-06-10T23:33:25Z"
    assert first["doseQuantity"] == {"value": 0.3, "unit": "mL"}
    assert first["route"] == "IM" and first["site"] == "LD"
    assert first["protocolApplied"][0]["doseNumber"] == 1
    people = [b for b in bodies if "birthDate" in b]
    assert people[0] == {"firstName": "Maria", "lastName": "Garcia", "gender": "female", "birthDate": "1987-03-14"}
    assert {b["gender"] for b in people} == {"female", "male"}


def test_yaml_reads_the_new_keys_as_toml_does(tmp_path: Path) -> None:
    yaml_text = """
kind: immunization
decimal_comma: true
parse:
  occurrence: {format: "%m%d%Y", timezone: America/Chicago}
expressions:
  patient_last_name: {split: Name, separator: ",", part: 1}
values:
  route: {map: hl7-route, default: IM}
skip:
  - {column: Action, values: [D]}
"""
    toml_text = """
kind = "immunization"
decimal_comma = true
[parse.occurrence]
format = "%m%d%Y"
timezone = "America/Chicago"
[expressions.patient_last_name]
split = "Name"
separator = ","
part = 1
[values.route]
map = "hl7-route"
default = "IM"
[[skip]]
column = "Action"
values = ["D"]
"""
    from_yaml, from_toml = profile(tmp_path, yaml_text, "p.yaml"), profile(tmp_path, toml_text, "p.toml")
    assert from_yaml == from_toml
    assert from_toml.value_defaults == {"route": "IM"} and from_toml.values["route"]["sc"] == "SQ"


def test_a_value_map_default_applies_to_an_expression_too(tmp_path: Path) -> None:
    csv = "patient_id,vaccine_code,occurrence,Flags\nP1,208,2024-06-10,X|Y\nP2,208,2024-06-10,Z|N\n"
    prof = IMM + '[expressions.status]\nsplit = "Flags"\nseparator = "|"\npart = 2\n'
    prof += '[values.status]\ny = "not-done"\ndefault = "completed"\n'
    prepared = prepare(apply_profile(table(tmp_path, csv), profile(tmp_path, prof)))
    assert prepared.get_column("status").to_list() == ["not-done", "completed"]


def test_a_real_load_leaves_skipped_rows_skipped_and_sends_nothing_twice(tmp_path: Path) -> None:
    """Into the embedded sandbox (a real server on loopback): the skipped rows are never sent, on any run."""
    args = ["load", str(FIXTURES / "county-export.csv"), "--profile", str(FIXTURES / "county-export.toml"),
            "--state", str(tmp_path / "state.sqlite"), "-q"]
    for run in ("first", "again"):
        result = CliRunner().invoke(main, [*args, "--report-dir", str(tmp_path / run)])
        assert result.exit_code == 1, result.output  # the two bad rows
        rows = pl.read_csv(tmp_path / run / "rows.csv", infer_schema=False)
        filtered = rows.filter(pl.col("error_code") == "filtered")
        assert filtered.select("source_row", "state", "resource_id").rows() == [
            ("6", "skipped", None), ("11", "skipped", None)
        ]
        states = dict(rows.group_by("state").len().rows())
        # Run again, the created rows are skipped as created already (with their ids): nothing is sent twice.
        assert states == ({"created": 6, "skipped": 2, "rejected": 2} if run == "first"
                          else {"skipped": 8, "rejected": 2})
        summary = json.loads((tmp_path / run / "summary.json").read_text("utf-8"))
        assert summary["rows_total"] == 10 and sum(summary["states"].values()) == 10


ROUTED_CSV = (
    "Type,record_id,patient_id,first_name,last_name,cvx,date,class,start\n"
    "SHOT,I1,P1,Ann,Lee,208,2024-06-10,,\n"
    "VISIT,V1,P1,Ann,Lee,,,ambulatory,2024-06-10T09:00:00Z\n"
    "shot,I2,P2,Bo,Li,141,2024-06-11,,\n"
    "VISIT,V2,P2,Bo,Li,,,bogus,2024-06-11T09:00:00Z\n"
    "DEL,I3,P3,Cy,Ma,,,,\n"
)
ROUTED = """kind = "immunization"
[[route]]
column = "Type"
values = ["VISIT"]
kind = "encounter"
[[skip]]
column = "Type"
values = ["DEL"]
[kinds.encounter.columns]
"class" = "encounter_class"
"start" = "period_start"
"""


def test_route_sends_rows_to_another_kind_and_each_row_ends_once(tmp_path: Path) -> None:
    data, prof = write(tmp_path, "mixed.csv", ROUTED_CSV), write(tmp_path, "p.toml", ROUTED)
    result = CliRunner().invoke(main, ["load", "--dry-run", str(data), "--profile", str(prof), "--report-dir",
                                       str(tmp_path / "r")])
    assert result.exit_code == 1, result.output  # V2's class
    rows = pl.read_csv(tmp_path / "r" / "rows.csv", infer_schema=False).sort(pl.col("source_row").cast(int))
    assert rows.select("source_row", "kind", "state", "error_code").rows() == [
        ("2", "immunization", "planned", None),
        ("3", "encounter", "planned", None),
        ("4", "immunization", "planned", None),
        ("5", "encounter", "rejected", "enum"),
        ("6", "immunization", "skipped", "filtered"),
    ]
    summary = json.loads((tmp_path / "r" / "summary.json").read_text("utf-8"))
    assert summary["rows_total"] == 5
    assert [(i["kind"], i["rows"]) for i in summary["inputs"]] == [("encounter", 2), ("immunization", 3)]
    paths = [json.loads(line)["path"] for line in (tmp_path / "r" / "payloads.ndjson").read_text().splitlines()]
    assert paths.count("/v1/encounters") == 1 and paths.count("/v1/immunizations") == 2


def test_a_route_needs_the_profiles_kind_and_a_known_kind(tmp_path: Path) -> None:
    with pytest.raises(ProfileError, match="needs the profile's kind"):
        profile(tmp_path, '[[route]]\ncolumn = "T"\nvalues = ["V"]\nkind = "encounter"\n')
    with pytest.raises(ProfileError, match="kind is one of"):
        profile(tmp_path, IMM + '[[route]]\ncolumn = "T"\nvalues = ["V"]\nkind = "visit"\n')
    with pytest.raises(ProfileError, match="belongs at the top"):
        profile(tmp_path, IMM + '[kinds.encounter]\n[[kinds.encounter.route]]\ncolumn = "T"\nvalues = ["V"]\n'
                'kind = "encounter"\n')


def test_a_word_mapped_to_nothing_leaves_the_field_out(tmp_path: Path) -> None:
    # A newcomer mapped "Nasal" = "" for a site column: the body carried "site": "" and the row still warned
    # unmapped-code. An empty mapping is no value: no site, no warning.
    import json

    from click.testing import CliRunner

    from etl.cli import main

    path = tmp_path / "doses.csv"
    path.write_text("Record ID,Patient ID,First Name,Last Name,CVX,Admin Date,Site\n"
                    "R1,P1,Ann,Lee,149,2024-10-08,Nasal\nR2,P2,Bo,Ray,171,2024-10-08,Left Upper Arm\n", "utf-8")
    profile = tmp_path / "p.toml"
    profile.write_text('name = "p"\n[values.site]\nmap = "site"\nNasal = ""\n', "utf-8")
    result = CliRunner().invoke(main, ["load", "--dry-run", "-q", "--profile", str(profile), str(path),
                                       "--report-dir", str(tmp_path / "r"), "--state", str(tmp_path / "s.sqlite")])
    assert result.exit_code == 0, result.output
    doses = {line["source_key"]: line["body"] for line in map(json.loads, (tmp_path / "r" / "payloads.ndjson")
                                                             .read_text("utf-8").splitlines())
             if line["kind"] == "immunization"}
    assert "site" not in doses["R1"] and doses["R2"]["site"] == "LA"
    summary = json.loads((tmp_path / "r" / "summary.json").read_text("utf-8"))
    assert not [w for w in summary["warnings"] if w.get("code") == "unmapped-code"]
