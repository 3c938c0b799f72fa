"""Nothing dropped unsaid (issue 14): every mapped field reaches a payload or is named as not carried;
every source column no payload carries is listed in full (summary.json, the terminal, report.html);
warnings reach the terminal; a performer named without an NPI is linked by name, or the run says it cannot.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import polars as pl
import pytest
from click.testing import CliRunner

from etl import transform
from etl.cli import main
from etl.mapping import Profile, apply_profile
from etl.pipeline import load_files, validate_files
from etl.progress import run_notes
from etl.readers import ROW, read_table
from etl.settings import Settings
from etl.transform import COMPANIONS, NOT_SENT, not_carried, plan
from etl.validate import validate
from schemas.canonical import DEFAULTS, KIND_SPECS, CanonicalField, field_map
from schemas.codes import displays

from .test_pipeline import count

# --- every mapped field reaches a payload -------------------------------------------------------

#: Values a field takes in the row that sets it (the others are found from the field's type).
_VALUE = {
    "vaccine_code": "08",
    "vaccine_system": "http://example.org/codes",
    "manufacturer": "PFR",
    "route": next(iter(displays("route"))),
    "site": next(iter(displays("site"))),
    "npi": "1234567893",
    "performer_npi": "1234567893",
    "patient_email": "ann@example.org",
    "practitioner_email": "jo@example.org",
    "patient_birth_date": "2000-01-02",
    "patient_postal_code": "02134",
    "practitioner_postal_code": "02134",
    "expiration_date": "2030-01-01",
    "reaction_date": "2021-06-02",
    "inputs": "kind=a;other=b",
    "outputs": "kind=a",
    "performer_name": "Jane Roe",
    "practitioner_name": "Other Person",
}
#: Every row of a kind has these (so that it is valid, and a field that needs another shows).
_BASE: dict[str, dict[str, str]] = {
    "patient": {"patient_first_name": "Ann", "patient_last_name": "Lee"},
    "practitioner": {"practitioner_name": "Base Person"},
    "immunization": {"vaccine_code": "03", "occurrence": "2021-06-01T10:00:00Z", "patient_first_name": "Ann",
                     "patient_last_name": "Lee"},
    "encounter": {"encounter_class": "AMB"},
    "document": {"practitioner_id": "DR1", "document_type": "letter", "title": "T", "section_title": "S",
                 "section_text": "text"},
    "task": {},
}
#: A field the API takes only beside another (COMPANIONS): the other is set in both rows compared.
_COMPANION_VALUE = {"performer_id": "PR1", "attester_mode": "legal", "relates_to_code": "replaces"}
_WITH = {
    name: {needs[0]: _COMPANION_VALUE[needs[0]]}
    for fields in COMPANIONS.values()
    for name, needs in fields.items()
}


def _value(f: CanonicalField, i: int) -> str:
    if f.name in _VALUE:
        return _VALUE[f.name]
    if f.enum:
        return f.enum[-1]
    return {
        "date": "2020-01-02",
        "datetime": "2020-01-02T03:04:05Z",
        "integer": "2",
        "number": "0.5",
        "boolean": "true",
        "list": "a;b",
    }.get(f.value, f"v{i}")


def _rows(kind: str, setting: bool) -> list[dict[str, str]]:
    """A row per field of ``kind``: with the field set (``setting``) or left to the base."""
    fields = KIND_SPECS[kind].fields
    rows = []
    for i, f in enumerate(fields):
        row = {g.name: "" for g in fields}
        row.update(_BASE[kind])
        if "patient_id" in row:
            row["patient_id"] = f"P{i}"
        if "document_id" in row:
            row["document_id"] = f"D{i}"
        if kind == "practitioner":  # a row per practitioner: each keyed by its own id (never one natural key)
            row["practitioner_id"] = f"DR{i}"
        if "record_id" in row:  # a file with a record-id column keys every row by it (an empty one is rejected)
            row["record_id"] = f"R{i}"
        row.update(_WITH.get(f.name, {}))
        if setting:
            keyed = f.name in ("patient_id", "document_id", "practitioner_id", "record_id")
            row[f.name] = f"Q{i}" if keyed else _value(f, i)
        rows.append(row)
    return rows


def _outcomes(tmp_path: Path, kind: str, setting: bool) -> list[tuple[Any, ...]]:
    """What each row plans: its key, its body and the bodies (patient, practitioner) it describes."""
    path = tmp_path / f"{kind}-{setting}.csv"
    names = [f.name for f in KIND_SPECS[kind].fields]
    with path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, names)
        writer.writeheader()
        writer.writerows(_rows(kind, setting))
    profile = Profile(name="every-field", kind=kind, columns={n: n for n in names}, auto=False)
    mapped = apply_profile(read_table(path), profile)
    validation = validate(mapped)
    assert validation.rejects.is_empty(), validation.rejects.to_dicts()
    planned = plan(mapped, validation.valid)
    out = []
    for row in range(2, len(names) + 2):
        mine = planned.rows.filter(pl.col(ROW) == row)
        out.append((
            mine.get_column("source_key").to_list(),
            mine.get_column("body").to_list(),
            planned.patients.filter(pl.col(ROW) == row).get_column("body").to_list(),
            planned.practitioners.filter(pl.col(ROW) == row).get_column("body").to_list(),
        ))
    return out


def uncarried(tmp_path: Path, kind: str) -> set[str]:
    """The fields of ``kind`` whose value changes nothing a load would send (nor the row's key)."""
    with_field, without = _outcomes(tmp_path, kind, True), _outcomes(tmp_path, kind, False)
    fields = KIND_SPECS[kind].fields
    return {f.name for f, a, b in zip(fields, with_field, without, strict=True) if a == b}


@pytest.mark.parametrize("kind", sorted(KIND_SPECS))
def test_every_field_a_profile_can_map_reaches_a_payload_or_is_named_not_sent(tmp_path: Path, kind: str) -> None:
    assert uncarried(tmp_path, kind) == set(NOT_SENT.get(kind, {}))


def test_a_field_left_out_of_a_body_is_caught(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The check above can fail: a planner that forgets a field (as marital status was) is found."""
    forgetful = transform.obj(firstName=pl.col("patient_first_name"), lastName=pl.col("patient_last_name"))
    monkeypatch.setitem(transform.BODY_PLANNERS, "patient", lambda: forgetful)
    assert "patient_marital_status" in uncarried(tmp_path, "patient")
    assert "patient_first_name" not in uncarried(tmp_path, "patient")


def test_not_sent_names_only_real_fields() -> None:
    for kind, fields in NOT_SENT.items():
        assert set(fields) <= set(field_map(kind)), kind
        assert all(why for why in fields.values())


def test_a_mapped_field_with_no_api_place_is_named_not_carried(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "p.csv"
    path.write_text("id,first_name,last_name,marital_status,shoe_size\nP1,Ann,Lee,M,38\n", encoding="utf-8")
    mapped = apply_profile(read_table(path), Profile(kind="patient"))
    assert not_carried(mapped) == [("shoe_size", "unmapped")]
    monkeypatch.setitem(NOT_SENT, "patient", {"patient_marital_status": "no field"})
    assert not_carried(mapped) == [("marital_status", "no API field"), ("shoe_size", "unmapped")]


def test_a_field_without_the_companion_the_api_needs_is_named_not_carried(tmp_path: Path) -> None:
    path = tmp_path / "docs.csv"
    path.write_text("document_id,patient_id,author,type,title,heading,text,attested_by,replaces_document\n"
                    "D1,P1,DR1,letter,T,S,body,DR2,doc_9\n", encoding="utf-8")
    mapped = apply_profile(read_table(path), Profile(kind="document"))
    assert not_carried(mapped) == [("attested_by", "needs attester_mode"),
                                   ("replaces_document", "needs relates_to_code")]
    path.write_text("document_id,patient_id,author,type,title,heading,text,attested_by,attester_mode\n"
                    "D1,P1,DR1,letter,T,S,body,DR2,legal\n", encoding="utf-8")
    assert not_carried(apply_profile(read_table(path), Profile(kind="document"))) == []


def test_defaults_of_a_kind_are_fields_of_it() -> None:
    # _rows leaves a defaulted field blank in the base row: the default must be a field of the kind.
    for kind, defaults in DEFAULTS.items():
        assert set(defaults) <= set(field_map(kind))


# --- not carried, in full --------------------------------------------------------------------------

WIDE = "patient_id,first_name,last_name," + ",".join(f"extra_{n}" for n in range(30)) + "\n"


def _wide(tmp_path: Path) -> Path:
    path = tmp_path / "wide.csv"
    path.write_text(WIDE + "P1,Ann,Lee," + ",".join(str(n) for n in range(30)) + "\n", encoding="utf-8")
    return path


def test_every_column_not_carried_is_in_the_summary_in_full(tmp_path: Path) -> None:
    path = _wide(tmp_path)
    report = validate_files([path], Settings(report_dir=tmp_path / "r", kind="patient"))
    columns = report.summary["not_carried"][str(path)]
    assert [c["column"] for c in columns] == [f"extra_{n}" for n in range(30)]  # no "and 10 more"
    assert {c["reason"] for c in columns} == {"unmapped"}
    assert json.loads((tmp_path / "r" / "summary.json").read_text())["not_carried"] == report.summary["not_carried"]
    page = (tmp_path / "r" / "report.html").read_text(encoding="utf-8")
    assert "<h2 id=\"not-carried\">Not carried</h2>" in page
    assert all(f"extra_{n}" in page for n in range(30))


def test_the_terminal_names_every_column_not_carried_and_the_warnings(tmp_path: Path) -> None:
    path = _wide(tmp_path)
    shots = tmp_path / "shots.csv"
    shots.write_text(
        "record_id,patient_id,first_name,last_name,cvx,administration_date,vaccinator,lot_note\n"
        + "".join(f"R{n},P{n},Ann,Lee,169,2024-03-01,Smith,x\n" for n in range(5)),
        encoding="utf-8",
    )
    for args, folder in ((["validate"], "v"), (["load", "--dry-run", "--state", str(tmp_path / "s.sqlite")], "d")):
        result = CliRunner().invoke(main, [*args, "--report-dir", str(tmp_path / folder), str(shots)])
        assert result.exit_code == 0, result.output
        out = result.output
        assert "warnings by code:" in out
        # CVX 169 is a Non-US code in CDC's table: a warning on every row.
        assert "code-status" in out and "shots.csv:2, shots.csv:3, shots.csv:4 ..." in out
        assert "performer-unlinked" in out
        assert f"{shots} (unmapped): lot_note" in out
    result = CliRunner().invoke(main, ["validate", "--kind", "patient", "--report-dir", str(tmp_path / "w"),
                                       str(path)])
    assert result.exit_code == 0, result.output
    assert f"{path} (unmapped): " + ", ".join(f"extra_{n}" for n in range(30)) in result.output.replace("\n", "")


def test_run_notes_count_warnings_per_code_across_files() -> None:
    summary = {
        "warnings": [
            {"file": "a/x.csv", "code": "unknown-cvx", "rows": [2, 9], "count": 2},
            {"file": "b/y.csv", "code": "unknown-cvx", "rows": [4, 5, 6], "count": 7},
            {"file": "b/y.csv", "code": "unmapped-columns", "message": "not imported: Q"},
            {"file": "b/y.csv", "code": "encoding-fallback", "message": "read as Windows-1252"},
        ],
        "not_carried": {"b/y.csv": [{"column": "Q", "reason": "unmapped"}]},
        "not_imported": [{"file": "c/payers.csv", "name": "Synthea payers", "rows": 3, "reason": "no resource"}],
    }
    lines = run_notes(summary)
    assert lines[0] == "warnings by code:"
    assert any(line.split() == ["unknown-cvx", "9", "rows", "x.csv:2,", "x.csv:9,", "y.csv:4", "..."]
               for line in lines)
    assert any("encoding-fallback" in line and "Windows-1252" in line for line in lines)
    assert not any("unmapped-columns" in line for line in lines)  # the columns are named in full instead
    assert "not imported: c/payers.csv (Synthea payers, 3 rows): no resource" in lines
    assert "  b/y.csv (unmapped): Q" in lines
    assert run_notes({"warnings": [], "not_carried": {}, "not_imported": []}) == []


# --- a performer named without an NPI ---------------------------------------------------------------

SHOTS = (
    "Record ID,Patient ID,First Name,Last Name,Admin Date,CVX,Vaccinator,Vaccinator NPI\n"
    "R1,P1,Ann,Lee,2021-01-02,08,Jane Q. Doe,\n"
    "R2,P1,Ann,Lee,2021-02-02,08,jane q  doe,\n"
    "R3,P2,Bob,Ray,2021-03-02,10,Smith,\n"
    "R4,P2,Bob,Ray,2021-03-04,10,Mark Twain,\n"
    "R5,P2,Bob,Ray,2021-03-05,10,Al Capone,1234567893\n"
)
PROVIDERS = "Provider ID,Name,Specialty\nD1,Mark Twain,Family Medicine\n"


def _get(server: Any, route: str) -> list[dict[str, Any]]:
    import httpx

    response = httpx.get(server.base_url + route, params={"count": 100}, headers={"x-api-key": server.api_key})
    response.raise_for_status()
    return list(response.json()["data"]["data"])


def test_a_performer_named_without_an_npi_is_linked_by_name(tmp_path: Path, simple_sandbox: Any) -> None:
    sandbox = simple_sandbox
    shots, providers = tmp_path / "shots.csv", tmp_path / "providers.csv"
    shots.write_text(SHOTS, encoding="utf-8")
    providers.write_text(PROVIDERS, encoding="utf-8")
    settings = Settings(state=tmp_path / "s.sqlite", report_dir=tmp_path / "r", base_url=sandbox.base_url,
                        api_key=sandbox.api_key, consistency_window=0)
    report = load_files([shots, providers], settings)
    assert report.states["created"] == 6 and report.states["rejected"] == 0
    people = {(p["firstName"], p["lastName"]): p for p in _get(sandbox, "/v1/practitioners")}
    # Jane Doe twice, spelt two ways: one practitioner; Mark Twain is the providers file's; Smith: none.
    assert sorted(people) == [("Al", "Capone"), ("Jane Q.", "Doe"), ("Mark", "Twain")]
    assert people[("Mark", "Twain")].get("specialty") == "Family Medicine"
    by_record = {
        r["source_key"]: r["resource_id"] for r in report.rows.filter(pl.col("kind") == "immunization").to_dicts()
    }
    actor = {}
    for record, resource in by_record.items():
        body = _get_one(sandbox, f"/v1/immunizations/{resource}")
        performers = body.get("performer") or []
        actor[record] = performers[0]["actorId"] if performers else None
    ids = {name: p["id"] for name, p in people.items()}
    assert actor == {"R1": ids[("Jane Q.", "Doe")], "R2": ids[("Jane Q.", "Doe")], "R3": None,
                     "R4": ids[("Mark", "Twain")], "R5": ids[("Al", "Capone")]}
    warned = {w["code"]: w for w in report.summary["warnings"] if "rows" in w}
    assert warned["performer-unlinked"]["rows"] == [4] and warned["performer-unlinked"]["count"] == 1
    assert count(sandbox, "/v1/practitioners") == 3
    again = load_files([shots, providers], settings.model_copy(update={"report_dir": tmp_path / "r2"}))
    assert again.states["created"] == 0 and count(sandbox, "/v1/practitioners") == 3  # nothing posted twice


def _get_one(server: Any, route: str) -> dict[str, Any]:
    import httpx

    response = httpx.get(server.base_url + route, headers={"x-api-key": server.api_key})
    response.raise_for_status()
    return dict(response.json()["data"])


def test_a_warning_quotes_the_cells_it_was_raised_on_and_a_redacted_report_masks_them(tmp_path: Path) -> None:
    # A newcomer saw "unmapped-code 3 rows 2, 3, 5" and had to guess which site words were meant.
    import json

    shots = tmp_path / "shots.csv"
    shots.write_text(
        "Record ID,Patient ID,First Name,Last Name,DOB,CVX,Admin Date,Site\n"
        "R1,P1,Ann,Lee,2/14/15,08,2024-03-01,Left Buttock\n"
        "R2,P2,Bo,Ray,2015-01-02,08,2024-03-01,Nasal\n"
        "R3,P3,Cy,Day,2015-01-02,08,2024-03-01,Left Buttock\n",
        encoding="utf-8",
    )
    result = CliRunner().invoke(main, ["validate", "--report-dir", str(tmp_path / "r"), str(shots)])
    assert result.exit_code == 0, result.output
    (line,) = [x for x in result.output.splitlines() if "unmapped-code" in x]
    assert line.endswith('; Site "Left Buttock", Site "Nasal"')  # each cell once, as written
    summary = json.loads((tmp_path / "r" / "summary.json").read_text("utf-8"))
    found = {w["code"]: w for w in summary["warnings"] if "count" in w}
    assert found["unmapped-code"]["examples"] == [{"column": "Site", "value": "Left Buttock"},
                                                  {"column": "Site", "value": "Nasal"}]
    assert found["two-digit-year"]["examples"] == [{"column": "DOB", "value": "2/14/15"}]
    redacted = CliRunner().invoke(main, ["validate", "--redact", "--report-dir", str(tmp_path / "x"), str(shots)])
    assert "2/14/15" not in redacted.output
    hidden = json.loads((tmp_path / "x" / "summary.json").read_text("utf-8"))
    assert {w["code"]: w for w in hidden["warnings"] if "count" in w}["two-digit-year"]["examples"] == [
        {"column": "DOB", "value": "[redacted]"}
    ]
