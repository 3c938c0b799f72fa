"""What the sandbox answers with: the create body echoed (``simple``) or the shapes the SDK describes (``fhir``).

The store keeps every resource as its create body plus ``resourceType``, ``id``, ``meta`` (and ``active`` for
patients and practitioners); this module renders that record for an answer. Sources disagree on what the
real API returns, so the sandbox offers both and the loader's lookups (:mod:`etl.load.lookup`) read either:

* ``fhir`` (the default), as the official SDK's types describe the answers of create, read, update and search
  (``clinikapi/sdk``, ``src/index.ts`` and ``src/types/*.ts``):

  - a patient is a ``PatientSummary`` (``src/types/requests.ts``: "The simplified patient shape the API returns
    from `create`, `update`, `search`, and `read` without `include`... NOT a FHIR `Patient`... use
    `fullName`"): the simplified fields plus ``id``, ``fullName`` and ``active``;
  - a practitioner, encounter, immunization, document (``Composition``) and task are FHIR R4 resources
    (``src/index.ts`` types each ``create``/``read``/``search`` answer as ``Practitioner``, ``Encounter``,
    ``Immunization``, ``Composition``, ``Task``; ``src/types/resources.ts`` gives their fields): references are
    ``{"reference": "Patient/<id>"}``, codes are CodeableConcepts, ``Encounter.class`` a Coding, notes
    Annotations, and so on.

* ``simple``: the create body as sent plus ``resourceType``, ``id`` and ``meta`` (the shape of the OpenAPI file's
  create schemas; the sandbox's only shape before).

What the simplified create body carries that the FHIR resource has no element for (a practitioner's
``specialty``) is kept as an extension under :data:`EXTENSION_BASE`, so nothing sent is lost.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Final, Literal

__all__ = ["EXTENSION_BASE", "SHAPES", "Shape", "render"]

Shape = Literal["fhir", "simple"]
#: The answer shapes, the default first.
SHAPES: Final[tuple[Shape, ...]] = ("fhir", "simple")
#: Where the sandbox's extensions live (``Extension.url``); not a real ClinikAPI URL.
EXTENSION_BASE: Final = "urn:clinik-etl:sandbox:"
# A US NPI as a FHIR identifier system (HL7's registered URI for it).
_NPI_SYSTEM: Final = "http://hl7.org/fhir/sid/us-npi"
# Encounter.class is a Coding from HL7 v3 ActCode (FHIR R4, Encounter.class binding).
_ACT_CODE: Final = "http://terminology.hl7.org/CodeSystem/v3-ActCode"

Json = dict[str, Any]


def _ref(resource_type: str, rid: Any) -> Json:
    return {"reference": f"{resource_type}/{rid}"}


def _concept(value: Any) -> Json:
    """A CodeableConcept from the simplified API's string (its text) or ``{system, code, display}``."""
    if isinstance(value, Mapping):
        coding = {k: value[k] for k in ("system", "code", "display") if k in value}
        concept: Json = {"coding": [coding]}
        if "display" in value:
            concept["text"] = value["display"]
        return concept
    return {"text": value}


def _put(out: Json, name: str, value: Any) -> None:
    if value is not None:
        out[name] = value


def _base(record: Mapping[str, Any]) -> Json:
    return {"resourceType": record["resourceType"], "id": record["id"], "meta": record.get("meta", {})}


def _telecom(record: Mapping[str, Any]) -> list[Json] | None:
    out = [{"system": system, "value": record[system]} for system in ("phone", "email") if system in record]
    return out or None


def _address(value: Any) -> list[Json] | None:
    return [dict(value)] if isinstance(value, Mapping) else None


def _photo(value: Any) -> list[Json] | None:
    return [dict(value)] if isinstance(value, Mapping) else None


def _name(record: Mapping[str, Any]) -> list[Json]:
    name: Json = {"family": record.get("lastName"), "given": [record["firstName"]] if "firstName" in record else []}
    for part in ("prefix", "suffix"):
        if record.get(part):
            name[part] = list(record[part])
    return [{k: v for k, v in name.items() if v is not None}]


def _patient(record: Mapping[str, Any]) -> Json:
    # PatientSummary (sdk src/types/requests.ts): simplified fields, ``fullName``, ``active``; no resourceType.
    first, last = record.get("firstName", ""), record.get("lastName", "")
    out: Json = {"id": record["id"], "fullName": " ".join(p for p in (first, last) if p), "firstName": first,
                 "lastName": last, "active": record.get("active", True)}
    for name, value in record.items():
        if name not in out and name not in ("resourceType", "meta", "id"):
            out[name] = value
    return out


def _practitioner(r: Mapping[str, Any]) -> Json:
    out = _base(r)
    out["active"] = r.get("active", True)
    out["name"] = _name(r)
    _put(out, "identifier", [{"system": _NPI_SYSTEM, "value": r["npi"]}] if "npi" in r else None)
    _put(out, "telecom", _telecom(r))
    _put(out, "gender", r.get("gender"))
    _put(out, "birthDate", r.get("birthDate"))
    _put(out, "address", _address(r.get("address")))
    _put(out, "photo", _photo(r.get("photo")))
    if r.get("qualifications"):
        out["qualification"] = [
            {
                "code": {"text": q["name"]},
                **({"issuer": {"display": q["issuer"]}} if "issuer" in q else {}),
                **({"period": q["period"]} if "period" in q else {}),
                **({"identifier": [{"value": q["identifier"]}]} if "identifier" in q else {}),
            }
            for q in r["qualifications"]
        ]
    _put(out, "communication", [{"text": lang} for lang in r["languages"]] if r.get("languages") else None)
    if "specialty" in r:
        out["extension"] = [{"url": EXTENSION_BASE + "specialty", "valueString": r["specialty"]}]
    return out


def _encounter(r: Mapping[str, Any]) -> Json:
    out = _base(r)
    out["status"] = r["status"]
    out["class"] = {"system": _ACT_CODE, "code": r["class"]}
    out["subject"] = _ref("Patient", r["patientId"])
    participants = []
    if "practitionerId" in r:
        participants.append({"individual": _ref("Practitioner", r["practitionerId"])})
    for p in r.get("participants") or []:
        entry: Json = {"individual": _ref("Practitioner", p["practitionerId"])}
        if "role" in p:
            entry["type"] = [{"text": p["role"]}]
        participants.append(entry)
    _put(out, "participant", participants or None)
    _put(out, "type", [{"text": r["type"]}] if "type" in r else None)
    for name in ("serviceType", "priority"):
        _put(out, name, _concept(r[name]) if name in r else None)
    _put(out, "reasonCode", [{"text": r["reasonCode"]}] if "reasonCode" in r else None)
    _put(out, "period", r.get("period"))
    if "lengthMinutes" in r:
        out["length"] = {"value": r["lengthMinutes"], "unit": "min", "system": "http://unitsofmeasure.org",
                         "code": "min"}
    _put(out, "location", [{"location": {"display": r["location"]}}] if "location" in r else None)
    _put(out, "serviceProvider", {"display": r["serviceProvider"]} if "serviceProvider" in r else None)
    if r.get("diagnosis"):
        out["diagnosis"] = [
            {
                "condition": _ref("Condition", d.get("condition", "")),
                **({"use": {"text": d["use"]}} if "use" in d else {}),
                **({"rank": d["rank"]} if "rank" in d else {}),
            }
            for d in r["diagnosis"]
        ]
    _put(out, "appointment", [_ref("Appointment", r["appointmentId"])] if "appointmentId" in r else None)
    _put(out, "basedOn", [_ref("ServiceRequest", r["basedOnId"])] if "basedOnId" in r else None)
    _put(out, "partOf", _ref("Encounter", r["partOfId"]) if "partOfId" in r else None)
    if "hospitalization" in r:
        h = r["hospitalization"]
        hosp: Json = {}
        for name in ("admitSource", "dischargeDisposition", "reAdmission"):
            _put(hosp, name, {"text": h[name]} if name in h else None)
        for name in ("dietPreference", "specialArrangement"):
            _put(hosp, name, [{"text": v} for v in h[name]] if h.get(name) else None)
        for name in ("destination", "origin"):
            _put(hosp, name, {"display": h[name]} if name in h else None)
        out["hospitalization"] = hosp
    return out


def _immunization(r: Mapping[str, Any]) -> Json:
    out = _base(r)
    out["status"] = r["status"]
    out["vaccineCode"] = _concept(r["vaccineCode"])
    out["patient"] = _ref("Patient", r["patientId"])
    _put(out, "encounter", _ref("Encounter", r["encounterId"]) if "encounterId" in r else None)
    for name in ("occurrenceDateTime", "recorded", "primarySource", "lotNumber", "expirationDate", "isSubpotent"):
        _put(out, name, r.get(name))
    _put(out, "manufacturer", {"display": r["manufacturer"]} if "manufacturer" in r else None)
    for name in ("site", "route", "statusReason"):
        _put(out, name, {"text": r[name]} if name in r else None)
    _put(out, "doseQuantity", r.get("doseQuantity"))
    if r.get("performer"):
        out["performer"] = [
            {**({"function": {"text": p["function"]}} if "function" in p else {}),
             "actor": _ref("Practitioner", p["actorId"])}
            for p in r["performer"]
        ]
    _put(out, "note", [{"text": r["note"]}] if "note" in r else None)
    _put(out, "reasonCode", [{"text": c} for c in r["reasonCode"]] if r.get("reasonCode") else None)
    _put(out, "reaction", r.get("reaction"))
    if r.get("protocolApplied"):
        applied = []
        for p in r["protocolApplied"]:
            entry: Json = {}
            _put(entry, "series", p.get("series"))
            _put(entry, "doseNumberPositiveInt", p.get("doseNumber"))
            _put(entry, "seriesDosesPositiveInt", p.get("seriesDoses"))
            _put(entry, "targetDisease", [{"text": t} for t in p["targetDisease"]] if p.get("targetDisease") else None)
            applied.append(entry)
        out["protocolApplied"] = applied
    return out


def _narrative(text: str) -> Json:
    from html import escape

    return {"status": "generated", "div": f'<div xmlns="http://www.w3.org/1999/xhtml">{escape(text)}</div>'}


def _section(s: Mapping[str, Any]) -> Json:
    out: Json = {}
    _put(out, "title", s.get("title"))
    _put(out, "code", {"text": s["code"]} if "code" in s else None)
    _put(out, "text", _narrative(s["text"]) if "text" in s else None)
    _put(out, "mode", s.get("mode"))
    _put(out, "author", [_ref("Practitioner", s["authorId"])] if "authorId" in s else None)
    _put(out, "entry", [{"reference": rid} for rid in s["resourceIds"]] if s.get("resourceIds") else None)
    _put(out, "section", [_section(sub) for sub in s["sections"]] if s.get("sections") else None)
    return out


def _document(r: Mapping[str, Any]) -> Json:
    out = _base(r)
    out["status"] = r["status"]
    out["type"] = {"text": r["type"]}
    _put(out, "category", [{"text": c} for c in r["category"]] if r.get("category") else None)
    out["subject"] = _ref("Patient", r["patientId"])
    _put(out, "encounter", _ref("Encounter", r["encounterId"]) if "encounterId" in r else None)
    # Composition.date is required (1..1) in FHIR; the create body may leave it out: the record's time then.
    out["date"] = r.get("date") or r.get("meta", {}).get("lastUpdated")
    out["author"] = [_ref("Practitioner", r["practitionerId"])]
    out["title"] = r["title"]
    _put(out, "confidentiality", r.get("confidentiality"))
    if r.get("attester"):
        out["attester"] = [
            {"mode": a["mode"], **({"time": a["time"]} if "time" in a else {}),
             **({"party": _ref("Practitioner", a["partyId"])} if "partyId" in a else {})}
            for a in r["attester"]
        ]
    _put(out, "custodian", _ref("Organization", r["custodianId"]) if "custodianId" in r else None)
    if r.get("relatesTo"):
        out["relatesTo"] = [{"code": x["code"], "targetReference": _ref("Composition", x["targetId"])}
                            for x in r["relatesTo"]]
    if r.get("event"):
        events = []
        for e in r["event"]:
            event: Json = {}
            _put(event, "code", [{"coding": [c]} for c in e["code"]] if e.get("code") else None)
            _put(event, "period", e.get("period"))
            _put(event, "detail", [{"reference": d} for d in e["detailIds"]] if e.get("detailIds") else None)
            events.append(event)
        out["event"] = events
    out["section"] = [_section(s) for s in r.get("sections") or []]
    return out


def _task_io(value: Mapping[str, Any]) -> Json:
    return {"type": {"text": value["type"]}, **{k: v for k, v in value.items() if k != "type"}}


def _task(r: Mapping[str, Any]) -> Json:
    out = _base(r)
    out["status"] = r["status"]
    out["intent"] = r["intent"]
    for name in ("statusReason", "businessStatus", "code", "reasonCode"):
        _put(out, name, {"text": r[name]} if name in r else None)
    for name in ("priority", "description", "executionPeriod", "authoredOn"):
        _put(out, name, r.get(name))
    _put(out, "focus", {"reference": r["focusId"]} if "focusId" in r else None)
    _put(out, "for", _ref("Patient", r["patientId"]) if "patientId" in r else None)
    _put(out, "encounter", _ref("Encounter", r["encounterId"]) if "encounterId" in r else None)
    _put(out, "requester", _ref("Practitioner", r["requesterId"]) if "requesterId" in r else None)
    _put(out, "owner", _ref("Practitioner", r["ownerId"]) if "ownerId" in r else None)
    _put(out, "note", [{"text": r["note"]}] if "note" in r else None)
    _put(out, "basedOn", [{"reference": x} for x in r["basedOn"]] if r.get("basedOn") else None)
    _put(out, "partOf", [_ref("Task", x) for x in r["partOf"]] if r.get("partOf") else None)
    _put(out, "input", [_task_io(x) for x in r["input"]] if r.get("input") else None)
    _put(out, "output", [_task_io(x) for x in r["output"]] if r.get("output") else None)
    if "restriction" in r:
        rest = r["restriction"]
        restriction: Json = {}
        _put(restriction, "repetitions", rest.get("repetitions"))
        _put(restriction, "period", rest.get("period"))
        _put(restriction, "recipient", [_ref("Practitioner", x) for x in rest["recipientIds"]]
             if rest.get("recipientIds") else None)
        out["restriction"] = restriction
    return out


_RENDER: Final[Mapping[str, Callable[[Mapping[str, Any]], Json]]] = {
    "Patient": _patient,
    "Practitioner": _practitioner,
    "Encounter": _encounter,
    "Immunization": _immunization,
    "Composition": _document,
    "Task": _task,
}


def render(record: Mapping[str, Any], shape: Shape) -> Json:
    """A stored resource as the sandbox answers it in this shape (the record itself for ``simple``)."""
    if shape == "simple":
        return dict(record)
    return _RENDER[str(record["resourceType"])](record)
