"""Transformers (etl.transform): create bodies, row keys and references for each kind."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import polars as pl
import pytest

from etl.mapping import Mapped, Profile, apply_profile, default_profile
from etl.readers import ROW, read_table
from etl.transform import (
    REF_PATTERN,
    Planned,
    fill_refs,
    json_body,
    obj,
    one_of,
    plan,
    readable_refs,
    references,
)
from etl.validate import validate
from schemas.codes import CVX_SYSTEM, displays
from schemas.limits import spec_at
from schemas.models import model_for

from .conftest import SAMPLE, SAMPLE_KINDS

SCHEMA = {
    "patient": "PatientCreate",
    "practitioner": "PractitionerCreate",
    "encounter": "EncounterCreate",
    "immunization": "ImmunizationCreate",
    "document": "DocumentCreate",
    "task": "TaskCreate",
}


def planned(
    tmp_path: Path, text: str, profile: Profile | None = None, *, bodies: bool = True
) -> tuple[Mapped, Planned]:
    path = tmp_path / "in.csv"
    path.write_text(text, encoding="utf-8")
    mapped = apply_profile(read_table(path), profile or default_profile())
    validation = validate(mapped)
    assert validation.rejects.is_empty(), validation.rejects.to_dicts()
    return mapped, plan(mapped, validation.valid, bodies=bodies)


def bodies(frame: pl.DataFrame) -> list[dict[str, Any] | None]:
    return [None if b is None else json.loads(b) for b in frame.get_column("body").to_list()]


def placeholder(kind: str, source_id: str) -> str:
    return f"@@{kind}:{source_id.encode().hex()}@@"


def sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


REGISTRY = (
    "Record ID,Patient ID,First Name,Last Name,DOB,Sex,Admin Date,CVX,Lot Number,Dose Amount,Dose Unit,"
    "Dose Number,Target Disease,Notes\n"
    "R1,P1,Ann,Lee,2015-03-04,F,2021-01-02,08,LOT1,0.5,mL,1,Hepatitis B,\n"
    "R2,P1,Ann,Lee,2015-03-04,F,2021-02-02,08,LOT2,,,2,Hepatitis B;Other,second dose\n"
    "R3,P2,,,,,2021-03-02,10,,,,,,\n"
)


def test_an_immunization_body_has_the_row_values_and_no_nulls(tmp_path: Path) -> None:
    _, p = planned(tmp_path, REGISTRY)
    assert p.kind == "immunization"
    assert p.rows.get_column("source_key").to_list() == ["R1", "R2", "R3"]
    assert p.rows.get_column("patient_key").to_list() == ["P1", "P1", "P2"]
    first, second, third = bodies(p.rows)
    assert first == {
        "patientId": placeholder("patient", "P1"),
        "status": "completed",  # the kind's default
        "vaccineCode": {"system": CVX_SYSTEM, "code": "08", "display": displays("cvx")["08"]},  # from the CVX table
        "occurrenceDateTime": "2021-01-02",
        "lotNumber": "LOT1",
        "doseQuantity": {"value": 0.5, "unit": "mL"},
        "protocolApplied": [{"doseNumber": 1, "targetDisease": ["Hepatitis B"]}],
    }
    assert "doseQuantity" not in second  # every member null: the object is left out, not sent as null
    assert second["note"] == "second dose"
    assert second["protocolApplied"][0]["targetDisease"] == ["Hepatitis B", "Other"]
    assert third["patientId"] == placeholder("patient", "P2") and "lotNumber" not in third
    for body in p.rows.get_column("body"):
        assert "null" not in body
        model_for("ImmunizationCreate").model_validate_json(fill_refs(body, lambda k, v: f"x_{v}")[0])


def test_body_hash_is_the_sha256_of_the_body(tmp_path: Path) -> None:
    _, p = planned(tmp_path, REGISTRY)
    for frame in (p.rows, p.patients):
        for body, digest in frame.select("body", "body_hash").iter_rows():
            assert digest == sha256(body)
    assert p.rows.get_column("body_hash").n_unique() == 3


def test_rows_that_describe_a_patient_create_it_once(tmp_path: Path) -> None:
    _, p = planned(tmp_path, REGISTRY)
    # P1 is described twice: one body, from its first row; P2 is only named, so it is not created here.
    assert p.patients.get_column("patient_key").to_list() == ["P1"]
    assert p.patients.get_column(ROW).to_list() == [2]
    [patient] = bodies(p.patients)
    assert patient == {"firstName": "Ann", "lastName": "Lee", "gender": "female", "birthDate": "2015-03-04"}
    model_for("PatientCreate").model_validate(patient)


def test_a_performer_named_by_npi_becomes_a_practitioner_and_a_reference(tmp_path: Path) -> None:
    _, p = planned(
        tmp_path,
        "Record ID,Patient ID,CVX,Admin Date,Vaccinator NPI,Vaccinator\n"
        "R1,P1,08,2021-01-02,1234567893,Maria de la Cruz\n"
        "R2,P2,08,2021-01-03,1234567893,Maria de la Cruz\n"
        "R3,P3,08,2021-01-04,,\n",
    )
    assert p.practitioners.get_column("practitioner_key").to_list() == ["npi:1234567893"]
    [body] = bodies(p.practitioners)
    assert body is not None and body["npi"] == "1234567893" and body["lastName"]
    first, _, third = bodies(p.rows)
    assert first["performer"] == [{"actorId": placeholder("practitioner", "npi:1234567893")}]
    assert "performer" not in third


def test_rows_without_an_id_are_keyed_by_their_natural_key(tmp_path: Path) -> None:
    _, p = planned(
        tmp_path,
        "Patient ID,CVX,Admin Date,Lot Number\nP1,08,2021-01-02,A1\nP1,08,2021-01-02,A2\nP1,08,2021-01-03,A1\n",
    )
    keys = p.rows.get_column("source_key").to_list()
    assert all(k.startswith("natural:") and len(k) == len("natural:") + 64 for k in keys)
    assert keys[0] == keys[1] != keys[2]  # patient, vaccine and day make the key; a lot number does not
    _, again = planned(tmp_path, "Patient ID,CVX,Admin Date\nP1,08,2021-01-03\n")
    assert again.rows.get_column("source_key").to_list() == [keys[2]]  # stable from run to run


def test_bodies_false_plans_keys_only(tmp_path: Path) -> None:
    _, with_bodies = planned(tmp_path, REGISTRY)
    _, keys_only = planned(tmp_path, REGISTRY, bodies=False)
    assert keys_only.rows.get_column("source_key").to_list() == with_bodies.rows.get_column("source_key").to_list()
    assert keys_only.rows.get_column("body").null_count() == keys_only.rows.height
    assert keys_only.patients.get_column("patient_key").to_list() == ["P1"]


def test_practitioners_are_keyed_by_npi_with_their_own_id_as_an_alias(tmp_path: Path) -> None:
    _, p = planned(
        tmp_path,
        "Provider ID,NPI,First Name,Last Name,Prefix,Suffix\n"
        "PRV-1,1234567893,Amara,Okonkwo,Dr.,MD;FAAP\n"
        "PRV-1,1234567893,Amara,Okonkwo,Dr.,MD;FAAP\n"
        "PRV-2,,Bo,Ray,,\n",
    )
    assert p.rows.get_column("source_key").to_list() == ["npi:1234567893", "npi:1234567893", "PRV-2"]
    first, repeat, other = bodies(p.rows)
    assert first == {
        "firstName": "Amara",
        "lastName": "Okonkwo",
        "prefix": ["Dr."],
        "suffix": ["MD", "FAAP"],
        "npi": "1234567893",
    }
    assert repeat is None  # the same clinician twice is created once, by the first row
    assert other == {"firstName": "Bo", "lastName": "Ray"}
    aliases = dict(p.aliases.select("ref", "source_key").iter_rows())
    # ... and by full name, for a performer named without an NPI (tests/test_carry.py)
    assert aliases == {
        "PRV-1": "npi:1234567893", "PRV-2": "PRV-2", "name:amara okonkwo": "npi:1234567893", "name:bo ray": "PRV-2"
    }


def test_an_encounter_body_carries_refs_period_and_diagnoses(tmp_path: Path) -> None:
    _, p = planned(
        tmp_path,
        "Visit ID,Patient ID,Provider ID,Status,Visit Type,Start,End,Diagnosis 1,Diagnosis 2,Participants\n"
        "V1,P1,PRV-1,finished,ambulatory,2021-01-02T10:00:00Z,2021-01-02T10:45:00Z,Z00.129,Z23,PRV-2;PRV-3\n",
    )
    [body] = bodies(p.rows)
    assert body is not None
    assert body["class"] == "AMB"
    assert body["patientId"] == placeholder("patient", "P1")
    assert body["practitionerId"] == placeholder("practitioner", "PRV-1")
    assert body["participants"] == [
        {"practitionerId": placeholder("practitioner", "PRV-2")},
        {"practitionerId": placeholder("practitioner", "PRV-3")},
    ]
    assert body["period"] == {"start": "2021-01-02T10:00:00Z", "end": "2021-01-02T10:45:00Z"}
    assert body["lengthMinutes"] == 45  # from the period when the file leaves it out
    assert body["diagnosis"] == [{"condition": "Z00.129"}, {"condition": "Z23"}]
    assert p.rows.get_column("patient_key").to_list() == ["P1"]


def test_a_document_is_one_body_with_its_sections_in_row_order(tmp_path: Path) -> None:
    _, p = planned(
        tmp_path,
        "Document ID,Patient ID,Author ID,Status,Type,Title,Section Title,Section Text\n"
        "D1,P1,PRV-1,final,letter,Visit,First,one\n"
        "D2,P2,PRV-1,final,letter,Other,Only,alone\n"
        'D1,P1,PRV-1,final,letter,Visit,Second,"two, with a comma"\n',
    )
    assert p.rows.get_column("source_key").to_list() == ["D1", "D2", "D1"]
    d1, d2, d1_again = bodies(p.rows)
    assert d1 is not None and d2 is not None
    assert d1_again is None  # the document is sent with its first row
    assert [s["title"] for s in d1["sections"]] == ["First", "Second"]
    assert d1["sections"][1]["text"] == "two, with a comma"
    assert d1["practitionerId"] == placeholder("practitioner", "PRV-1")
    assert [s["title"] for s in d2["sections"]] == ["Only"]
    model_for("DocumentCreate").model_validate_json(fill_refs(json.dumps(d1), lambda k, v: "x")[0])


def test_a_task_turns_pairs_into_inputs(tmp_path: Path) -> None:
    _, p = planned(
        tmp_path,
        "Task ID,Patient ID,Status,Intent,Input,Owner ID,Focus\n"
        "T1,P1,requested,order,reminder-type=phone; channel = sms,PRV-1,R9\n",
    )
    [body] = bodies(p.rows)
    assert body is not None
    assert body["input"] == [
        {"type": "reminder-type", "valueString": "phone"},
        {"type": "channel", "valueString": "sms"},
    ]
    assert body["ownerId"] == placeholder("practitioner", "PRV-1")
    assert body["focusId"] == placeholder("immunization", "R9")
    assert body["patientId"] == placeholder("patient", "P1")


def test_references_lists_every_ref_a_row_makes(tmp_path: Path) -> None:
    mapped, _ = planned(
        tmp_path,
        "Visit ID,Patient ID,Provider ID,Status,Visit Type,Participants\n"
        "V1,P1,PRV-1,finished,AMB,PRV-2;PRV-3\nV2,P2,,finished,AMB,\n",
        default_profile("encounter"),
    )
    valid = validate(mapped).valid
    refs = references(mapped, valid).sort(ROW, "field", "value")
    assert refs.columns == [ROW, "field", "kind", "value"]
    assert refs.select("field", "kind", "value").rows() == [
        ("participant_ids", "practitioner", "PRV-2"),
        ("participant_ids", "practitioner", "PRV-3"),
        ("patient_id", "patient", "P1"),
        ("practitioner_id", "practitioner", "PRV-1"),
        ("patient_id", "patient", "P2"),
    ]


def test_fill_refs_swaps_placeholders_and_reports_what_is_missing() -> None:
    body = json.dumps(
        {"patientId": placeholder("patient", 'P"1'), "performer": [{"actorId": placeholder("practitioner", "D1")}]}
    )
    known = {("patient", 'P"1'): 'pat_"x'}
    filled, missing = fill_refs(body, lambda kind, key: known.get((kind, key)))
    assert json.loads(filled)["patientId"] == 'pat_"x'  # a source id with a quote survives both ways
    assert missing == [("practitioner", "D1")]
    assert REF_PATTERN.search(filled) is not None  # the missing one is left for a later run
    done, none_missing = fill_refs(body, lambda kind, key: f"{kind}_id")
    assert none_missing == [] and REF_PATTERN.search(done) is None
    assert json.loads(done)["performer"][0]["actorId"] == "practitioner_id"


def test_readable_refs_shows_the_source_ids_within_the_apis_length() -> None:
    body = json.dumps({"patientId": placeholder("patient", "P-1"), "encounterId": placeholder("encounter", "E" * 300)})
    shown = json.loads(readable_refs(body))
    assert shown["patientId"] == "patient:P-1"
    limit = spec_at("ImmunizationCreate", "encounterId").max_length
    assert limit is not None
    assert shown["encounterId"] == ("encounter:" + "E" * 300)[:128] and len(shown["encounterId"]) <= limit


def test_a_value_at_its_limit_is_sent_whole(tmp_path: Path) -> None:
    limit = spec_at("ImmunizationCreate", "lotNumber").max_length
    assert limit is not None
    lot = "L" * limit
    _, p = planned(tmp_path, f"Record ID,Patient ID,CVX,Admin Date,Lot Number\nR1,P1,08,2021-01-02,{lot}\n")
    [body] = bodies(p.rows)
    assert body is not None and body["lotNumber"] == lot  # never cut to fit


def test_obj_one_of_and_json_body_drop_what_is_absent() -> None:
    frame = pl.DataFrame({"a": ["x", None, None], "b": [1, 2, None], "c": ['say "null"', None, None]})
    encoded = frame.select(
        json_body(obj(a=pl.col("a"), inner=obj(b=pl.col("b")), list=one_of(pl.col("c")))).alias("j")
    ).get_column("j")
    assert [json.loads(j) if j is not None else None for j in encoded] == [
        {"a": "x", "inner": {"b": 1}, "list": ['say "null"']},
        {"inner": {"b": 2}},
        None,  # every member null: no object at all
    ]


@pytest.mark.parametrize(
    ("name", "kind"),
    SAMPLE_KINDS,
)
def test_every_sample_body_passes_the_payload_model(name: str, kind: str) -> None:
    mapped = apply_profile(read_table(SAMPLE / name), default_profile())
    p = plan(mapped, validate(mapped).valid)
    assert p.kind == kind
    model = model_for(SCHEMA[kind])
    sent = [b for b in p.rows.get_column("body").to_list() if b is not None]
    assert sent
    for body in sent:
        model.model_validate_json(fill_refs(body, lambda k, v: f"{k[:3]}_{len(v)}")[0])
    for body in p.patients.get_column("body").to_list():
        model_for("PatientCreate").model_validate_json(body)


def test_body_hashes_of_many_rows_hashed_in_parts_are_each_bodys_sha256() -> None:
    """A long column of bodies is hashed a part per thread at once (etl.transform._in_parts): each row still
    gets its own body's SHA-256, in order."""
    from etl.transform import _hashed

    bodies = [f'{{"n":{i},"note":"é {i % 7}"}}' if i % 11 else None for i in range(10_000)]
    hashed = _hashed(pl.DataFrame({"body": bodies}, schema={"body": pl.String}), True)
    assert hashed.get_column("body_hash").n_chunks() == 1
    assert hashed.get_column("body_hash").to_list() == [
        hashlib.sha256(b.encode()).hexdigest() if b is not None else None for b in bodies
    ]
