"""Telling whether a resource found by search is the one a create body asked for, whatever shape it came back in.

When a create's outcome is unknown (a timeout, a 5xx, a lost answer), the loader searches for it and must
recognise it among the results. The API may not echo the create body: the official SDK describes FHIR R4
resources coming back (``Immunization.patient`` a Reference, ``vaccineCode`` a CodeableConcept, ``Encounter``'s
patient in ``subject``, a Task's in ``for``) and patients as a ``PatientSummary`` with ``fullName``; the sandbox
answers in either shape (``etl.sandbox.shapes``). So a candidate is compared with the body on a few
**key fields** per kind (:data:`KEY_FIELDS`), each read from either shape and normalised:

* a reference: ``patientId`` or ``patient.reference`` / ``subject.reference`` / ``for.reference``
  (``"Patient/<id>"``), as the bare id;
* a code: a string, a ``{system, code, display}`` object or a CodeableConcept (``coding[0].code``, else its
  ``text``), as the code (or text) folded to lower case;
* a date or date-time: ``YYYY-MM-DD`` stays a day; a date-time with an offset becomes the UTC instant
  (``2024-03-15T05:30:00-05:00`` equals ``2024-03-15T10:30:00Z``), one without stays as written;
* a name: ``firstName``/``lastName``, or FHIR ``name[0].given[0]``/``family``, or only ``fullName``, folded.

A key field both carry must be equal; an identifying one (:data:`IDENTITY`: the patient, the vaccine, the
date...) that the body has and the candidate lacks rules the candidate out; a key field the body lacks is not
compared. Everything else the API may reshape, add or drop is ignored: matching "every field echoed back"
would never match a reshaped answer, and a row whose create timed out would be judged absent and sent twice.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import Any, Final

__all__ = [
    "IDENTITY",
    "KEY_FIELDS",
    "as_simple",
    "key_fields",
    "matches",
    "normal_code",
    "normal_instant",
    "reference_id",
]

Reader = Callable[[Mapping[str, Any]], object]


def reference_id(value: object) -> str | None:
    """The id a reference names: a bare id, or a FHIR Reference ``{"reference": "Type/<id>"}``."""
    if isinstance(value, Mapping):
        value = value.get("reference")
    if not isinstance(value, str) or not value:
        return None
    return value.rsplit("/", 1)[-1]


def normal_code(value: object) -> str | None:
    """A code from a string, a ``{system, code, display}`` object or a CodeableConcept, folded to lower case."""
    if isinstance(value, Mapping):
        codings = value.get("coding")
        if isinstance(codings, list) and codings and isinstance(codings[0], Mapping):
            value = codings[0].get("code") or value.get("text")
        elif "code" in value:
            value = value.get("code")
        else:
            value = value.get("text")
    return value.strip().casefold() if isinstance(value, str) and value.strip() else None


def normal_instant(value: object) -> str | None:
    """A date stays ``YYYY-MM-DD``; a date-time with an offset becomes its UTC instant; one without stays."""
    if not isinstance(value, str) or not value:
        return None
    text = value.strip()
    if len(text) <= 10:
        return text
    try:
        moment = datetime.fromisoformat(text.replace("z", "Z"))
    except ValueError:
        return text
    if moment.tzinfo is None:
        return moment.isoformat()
    return moment.astimezone(UTC).isoformat()


def _fold(value: object) -> str | None:
    return value.strip().casefold() if isinstance(value, str) and value.strip() else None


def _first(resource: Mapping[str, Any], *paths: str) -> object:
    for path in paths:
        value: object = resource
        for part in path.split("."):
            if isinstance(value, list):
                value = value[0] if value else None
            value = value.get(part) if isinstance(value, Mapping) else None
        if value is not None:
            return value
    return None


def _patient_of(*fhir: str) -> Reader:
    return lambda r: reference_id(_first(r, "patientId", *fhir))


def _given(r: Mapping[str, Any]) -> object:
    if "firstName" in r:
        return _fold(r["firstName"])
    given = _first(r, "name.given")
    return _fold(given[0] if isinstance(given, list) and given else given)


def _family(r: Mapping[str, Any]) -> object:
    return _fold(_first(r, "lastName", "name.family"))


def _full_name(r: Mapping[str, Any]) -> object:
    # The name parts when there are any (a PatientSummary has them too: its fullName may add a middle name
    # or a prefix); fullName only when they are all the answer has.
    given, family = _given(r), _family(r)
    if given or family:
        return " ".join(" ".join(str(p).split()) for p in (given, family) if p)
    if isinstance(r.get("fullName"), str) and r["fullName"].strip():
        return " ".join(r["fullName"].casefold().split())
    return None


def _npi(r: Mapping[str, Any]) -> object:
    if "npi" in r:
        return r["npi"]
    for ident in r.get("identifier") or []:
        if isinstance(ident, Mapping) and str(ident.get("system", "")).endswith("us-npi"):
            return ident.get("value")
    return None


def _text(*paths: str) -> Reader:
    # A string field that FHIR may turn into a CodeableConcept ({"text": ...}) or keep.
    return lambda r: normal_code(_first(r, *paths))


def _dose_number(r: Mapping[str, Any]) -> object:
    return _first(r, "protocolApplied.doseNumber", "protocolApplied.doseNumberPositiveInt")


def _author(r: Mapping[str, Any]) -> object:
    author = _first(r, "practitionerId", "author")
    return reference_id(author[0] if isinstance(author, list) and author else author)


#: Kind -> key field -> how to read it, normalised, from either shape. The fields a lookup compares.
KEY_FIELDS: Final[Mapping[str, Mapping[str, Reader]]] = {
    "patient": {
        "fullName": _full_name,
        "birthDate": lambda r: normal_instant(r.get("birthDate")),
        "gender": lambda r: _fold(r.get("gender")),
    },
    "practitioner": {"fullName": _full_name, "npi": _npi},
    "encounter": {
        "patient": _patient_of("subject"),
        "status": lambda r: _fold(r.get("status")),
        "class": _text("class"),
        "start": lambda r: normal_instant(_first(r, "period.start")),
    },
    "immunization": {
        "patient": _patient_of("patient"),
        "status": lambda r: _fold(r.get("status")),
        "vaccine": lambda r: normal_code(r.get("vaccineCode")),
        "occurrence": lambda r: normal_instant(r.get("occurrenceDateTime")),
        "lot": lambda r: _fold(r.get("lotNumber")),
        "dose": _dose_number,
    },
    "document": {
        "patient": _patient_of("subject"),
        "author": _author,
        "status": lambda r: _fold(r.get("status")),
        "type": _text("type"),
        "title": lambda r: _fold(r.get("title")),
        "date": lambda r: normal_instant(r.get("date")),
    },
    "task": {
        "patient": _patient_of("for"),
        "status": lambda r: _fold(r.get("status")),
        "intent": lambda r: _fold(r.get("intent")),
        "code": _text("code"),
        "description": lambda r: _fold(r.get("description")),
        "authoredOn": lambda r: normal_instant(r.get("authoredOn")),
    },
}


#: Kind -> the key fields that identify the resource: a candidate without one of them (that the body has) is
#: ruled out. The others are compared only when the candidate carries them too, so an API that leaves a
#: detail out of its answer (a lot number, a gender) does not make a created row look absent and be sent twice.
IDENTITY: Final[Mapping[str, frozenset[str]]] = {
    "patient": frozenset({"fullName", "birthDate"}),
    "practitioner": frozenset({"fullName", "npi"}),
    "encounter": frozenset({"patient", "start"}),
    "immunization": frozenset({"patient", "vaccine", "occurrence"}),
    "document": frozenset({"patient", "title"}),
    "task": frozenset({"patient", "intent"}),
}


def key_fields(kind: str, resource: Mapping[str, Any]) -> dict[str, object]:
    """The normalised key fields of ``resource`` (a create body, or a resource in either answer shape) that it
    carries."""
    readers = KEY_FIELDS.get(kind, {"patient": _patient_of("patient", "subject", "for")})
    out: dict[str, object] = {}
    for name, read in readers.items():
        value = read(resource)
        if value is not None:
            out[name] = value
    return out


def matches(kind: str, candidate: object, body: Mapping[str, Any]) -> bool:
    """Whether a search result ``candidate`` can be the resource the create ``body`` made: every identifying key
    field (:data:`IDENTITY`) the body carries is in the candidate, and every key field both carry is equal once
    normalised. (The caller still makes sure one resource is not claimed by two rows.)"""
    if not isinstance(candidate, Mapping):
        return False
    wanted = key_fields(kind, body)
    got = key_fields(kind, candidate)
    identity = IDENTITY.get(kind, frozenset({"patient"}))
    return all(got[name] == value if name in got else name not in identity for name, value in wanted.items())


def _telecom(r: Mapping[str, Any], system: str) -> object:
    for point in r.get("telecom") or []:
        if isinstance(point, Mapping) and point.get("system") == system:
            return point.get("value")
    return None


def as_simple(kind: str, resource: Mapping[str, Any]) -> dict[str, Any]:
    """The fields matching compares (:mod:`etl.matching`), read from either answer shape into the simple one.

    A patient: ``id``, ``firstName``, ``lastName``, ``birthDate``, ``gender``, ``phone``, ``email`` and
    ``address.postalCode`` (a FHIR Patient's ``name``, ``telecom`` and ``address`` list too); a
    practitioner: ``id`` and ``npi`` (or its ``us-npi`` identifier); an immunization: ``id``,
    ``patientId`` (or ``patient.reference``), ``occurrenceDateTime`` and ``vaccineCode.code`` (a
    string, a coding or a CodeableConcept). Fields an answer leaves out are None.
    """
    out: dict[str, Any] = {"id": resource.get("id")}
    if kind == "patient":
        given = resource.get("firstName")
        if given is None:
            parts = _first(resource, "name.given")
            given = parts[0] if isinstance(parts, list) and parts else parts
        address = resource.get("address")
        if isinstance(address, list):
            address = address[0] if address else None
        postal = address.get("postalCode") if isinstance(address, Mapping) else None
        out |= {
            "firstName": given,
            "lastName": _first(resource, "lastName", "name.family"),
            "birthDate": resource.get("birthDate"),
            "gender": resource.get("gender"),
            "phone": resource.get("phone") if "phone" in resource else _telecom(resource, "phone"),
            "email": resource.get("email") if "email" in resource else _telecom(resource, "email"),
            "address": {"postalCode": postal},
        }
    elif kind == "practitioner":
        out["npi"] = _npi(resource)
    elif kind == "immunization":
        code = resource.get("vaccineCode")
        if isinstance(code, Mapping):
            codings = code.get("coding")
            code = codings[0].get("code") if isinstance(codings, list) and codings and isinstance(
                codings[0], Mapping) else code.get("code")
        out |= {
            "patientId": _patient_of("patient")(resource),
            "occurrenceDateTime": resource.get("occurrenceDateTime"),
            "vaccineCode": {"code": code if isinstance(code, str) else None},
        }
    return out
