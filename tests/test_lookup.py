"""Lookups match on key fields read from either answer shape (etl.load.lookup), never on an echo of the body."""

from __future__ import annotations

from typing import Any

import pytest

from etl.load.lookup import KEY_FIELDS, key_fields, matches, normal_code, normal_instant, reference_id
from etl.sandbox.shapes import SHAPES, render

PAT = "pt_0123456789abcdef"
PRAC = "prac_0123456789abcdef"
ENC = "enc_0123456789abcdef"
BODIES: dict[str, tuple[str, dict[str, Any]]] = {
    "patient": ("Patient", {"firstName": "Ana", "lastName": "Lima", "birthDate": "1990-04-01", "gender": "female"}),
    "practitioner": ("Practitioner", {"firstName": "Rui", "lastName": "Costa", "npi": "1234567890",
                                      "prefix": ["Dr."]}),
    "encounter": ("Encounter", {"status": "finished", "class": "AMB", "patientId": PAT,
                                "period": {"start": "2024-01-10T09:00:00-05:00"}}),
    "immunization": ("Immunization", {"status": "completed", "patientId": PAT, "lotNumber": "EW0182",
                                      "vaccineCode": {"system": "http://hl7.org/fhir/sid/cvx", "code": "208"},
                                      "occurrenceDateTime": "2024-03-15T10:30:00Z",
                                      "protocolApplied": [{"doseNumber": 2}]}),
    "document": ("Composition", {"status": "final", "type": "visit note", "patientId": PAT, "practitionerId": PRAC,
                                 "title": "Visit", "date": "2024-03-15T10:30:00Z",
                                 "sections": [{"title": "S", "text": "t"}]}),
    "task": ("Task", {"status": "requested", "intent": "order", "patientId": PAT, "code": "recall",
                      "authoredOn": "2024-03-15T10:30:00Z"}),
}


def stored(kind: str, **changes: Any) -> dict[str, Any]:
    resource_type, body = BODIES[kind]
    return {"resourceType": resource_type, "id": "x_1", **body, **changes,
            "meta": {"versionId": "1", "lastUpdated": "2024-03-15T10:30:01.000Z"}}


def test_every_kind_has_key_fields() -> None:
    assert set(KEY_FIELDS) == set(BODIES)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("kind", list(BODIES))
def test_a_resource_matches_its_body_in_either_shape(kind: str, shape: str) -> None:
    _, body = BODIES[kind]
    answer = render(stored(kind), shape)
    assert key_fields(kind, answer) == key_fields(kind, body)
    assert matches(kind, answer, body)


# One key field changed: a different resource, in either shape.
OTHERS = [
    ("patient", {"birthDate": "1990-04-02"}),
    ("patient", {"lastName": "Lim"}),
    ("practitioner", {"npi": "1234567891"}),
    ("encounter", {"patientId": "pt_other"}),
    ("encounter", {"period": {"start": "2024-01-10T09:00:00Z"}}),  # a different instant, same wall clock
    ("immunization", {"patientId": "pt_other"}),
    ("immunization", {"vaccineCode": "207"}),
    ("immunization", {"occurrenceDateTime": "2024-03-16T10:30:00Z"}),
    ("immunization", {"protocolApplied": [{"doseNumber": 3}]}),
    ("immunization", {"lotNumber": "EW0183"}),
    ("document", {"practitionerId": "prac_other"}),
    ("task", {"code": "other"}),
]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize(("kind", "changes"), OTHERS)
def test_a_different_resource_does_not_match(kind: str, changes: dict[str, Any], shape: str) -> None:
    _, body = BODIES[kind]
    assert not matches(kind, render(stored(kind, **changes), shape), body)


def test_what_the_api_adds_or_reshapes_beyond_the_key_fields_is_ignored() -> None:
    _, body = BODIES["immunization"]
    answer = render(stored("immunization"), "fhir")
    answer.update(site={"coding": [{"code": "LA"}]}, extension=[{"url": "x"}], note=[{"text": "reshaped"}])
    assert matches("immunization", answer, {**body, "site": "Left deltoid", "note": "as sent"})


def test_a_patient_summary_with_only_a_full_name_matches() -> None:
    summary = {"id": PAT, "fullName": "Ana  LIMA", "birthDate": "1990-04-01", "gender": "female"}
    assert matches("patient", summary, BODIES["patient"][1])
    fhir_patient = {"resourceType": "Patient", "id": PAT, "name": [{"family": "Lima", "given": ["Ana"]}],
                    "birthDate": "1990-04-01", "gender": "female"}
    assert matches("patient", fhir_patient, BODIES["patient"][1])


def test_a_candidate_lacking_an_identifying_field_does_not_match_one_lacking_a_detail_does() -> None:
    _, body = BODIES["immunization"]
    answer = render(stored("immunization"), "fhir")
    del answer["lotNumber"]  # a detail the API may leave out of its answer
    assert matches("immunization", answer, body)
    for identifying in ("patient", "vaccineCode", "occurrenceDateTime"):
        assert not matches("immunization", {k: v for k, v in answer.items() if k != identifying}, body)
    assert not matches("immunization", None, body)


def test_a_patient_summary_whose_full_name_adds_a_middle_name_matches_on_its_parts() -> None:
    summary = {"id": PAT, "fullName": "Ana Maria Lima", "firstName": "Ana", "lastName": "Lima",
               "middleName": "Maria", "birthDate": "1990-04-01"}
    assert matches("patient", summary, BODIES["patient"][1])


def test_normalisers() -> None:
    assert reference_id({"reference": "Patient/pt_1"}) == reference_id("pt_1") == "pt_1"
    assert reference_id({"display": "x"}) is None
    assert normal_code({"coding": [{"system": "s", "code": "208"}], "text": "COVID"}) == "208"
    assert normal_code({"system": "s", "code": "208"}) == normal_code(" 208 ") == "208"
    assert normal_code({"text": "MMR"}) == normal_code("mmr") == "mmr"
    assert normal_instant("2024-03-15T05:30:00-05:00") == normal_instant("2024-03-15T10:30:00Z")
    assert normal_instant("2024-03-15T10:30:00.000Z") == normal_instant("2024-03-15T10:30:00+00:00")
    assert normal_instant("2024-03-15") == "2024-03-15" != normal_instant("2024-03-15T00:00:00Z")
    assert normal_instant("not a date, kept") == "not a date, kept"
