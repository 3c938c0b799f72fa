"""Canonical fields: the toolkit's own column names for each kind of input row.

A mapping profile renames a registry's headers to these names; validation and
transformation work only with them. Each field names the create-body path it
feeds (``target``), so its limits (max length, enum, array sizes, maximum) are
looked up in :mod:`schemas.limits` and never restated here.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

from schemas.limits import Spec, spec_at

ValueType = Literal["text", "date", "datetime", "integer", "number", "boolean", "list"]
Normaliser = Literal["lower", "status", "gender", "cvx", "route", "site"]

#: The toolkit's own limit on source identifiers: they become crosswalk keys
#: and, in a dry run, placeholders in a ``patientId`` (at most 128 characters).
SOURCE_ID_MAX_LENGTH = 100

#: Separator of list cells (target diseases, reason codes).
LIST_SEPARATOR = ";"


@dataclass(frozen=True)
class CanonicalField:
    """One column of a canonical frame."""

    name: str
    value: ValueType = "text"
    target: str | None = None  # "ImmunizationCreate:lotNumber"; None = not sent as is
    required: bool = False
    aliases: tuple[str, ...] = ()
    normaliser: Normaliser | None = None
    own_max_length: int | None = None  # a toolkit limit, for fields with no target
    description: str = ""

    @property
    def spec(self) -> Spec | None:
        """The limit-table entry this field feeds, if any."""
        if self.target is None:
            return None
        schema, path = self.target.split(":")
        return spec_at(schema, path)

    @property
    def max_length(self) -> int | None:
        """Maximum length of the cell (of each item, for a list)."""
        spec = self.spec
        if spec is not None and spec.type == "array":
            spec = spec.items
        if spec is not None and spec.max_length is not None:
            return spec.max_length
        return self.own_max_length

    @property
    def max_items(self) -> int | None:
        """Maximum number of items of a list cell."""
        spec = self.spec
        return spec.max_items if spec is not None and spec.type == "array" else None

    @property
    def enum(self) -> tuple[str, ...] | None:
        """Allowed values, after normalisation."""
        spec = self.spec
        return spec.enum if spec is not None else None

    @property
    def maximum(self) -> float | None:
        """Largest allowed number."""
        spec = self.spec
        return spec.maximum if spec is not None else None


def F(name: str, value: ValueType = "text", target: str | None = None, *aliases: str, **kw: object) -> CanonicalField:  # noqa: N802
    """Short constructor that keeps the tables below one line a field."""
    return CanonicalField(name, value, target, aliases=aliases, **kw)  # type: ignore[arg-type]


IMM = "ImmunizationCreate:"
PAT = "PatientCreate:"

#: The patient demographics that may ride along on any row that names a patient.
PATIENT_FIELDS: tuple[CanonicalField, ...] = (
    F(
        "patient_id",
        "text",
        None,
        "patient_source_id",
        "recip_id",
        "mrn",
        "patient_mrn",
        "patient_number",
        required=True,
        own_max_length=SOURCE_ID_MAX_LENGTH,
        description="the patient's id in the source system",
    ),
    F(
        "patient_first_name",
        "text",
        PAT + "firstName",
        "first_name",
        "recip_first_name",
        "given_name",
        "first",
        required=True,
    ),
    F(
        "patient_last_name",
        "text",
        PAT + "lastName",
        "last_name",
        "recip_last_name",
        "family_name",
        "surname",
        "last",
        required=True,
    ),
    F("patient_birth_date", "date", PAT + "birthDate", "birth_date", "dob", "date_of_birth", "recip_dob", "birthdate"),
    F("patient_gender", "text", PAT + "gender", "gender", "sex", "recip_sex", normaliser="gender"),
    F("patient_phone", "text", PAT + "phone", "phone", "phone_number", "telephone"),
    F("patient_email", "text", PAT + "email", "email", "email_address"),
    F(
        "patient_address_line",
        "text",
        PAT + "address.line[]",
        "address",
        "address_line",
        "street",
        "recip_address_street",
    ),
    F("patient_city", "text", PAT + "address.city", "city", "recip_address_city"),
    F("patient_state", "text", PAT + "address.state", "state", "recip_address_state"),
    F("patient_postal_code", "text", PAT + "address.postalCode", "zip", "zip_code", "postal_code", "recip_address_zip"),
    F("patient_country", "text", PAT + "address.country", "country"),
)

IMMUNIZATION_FIELDS: tuple[CanonicalField, ...] = (
    F(
        "record_id",
        "text",
        None,
        "source_record_id",
        "immunization_id",
        "vax_event_id",
        "event_id",
        "vaccination_id",
        "id",
        own_max_length=SOURCE_ID_MAX_LENGTH,
        description="the vaccination record's id in the source system; the row key when present",
    ),
    *PATIENT_FIELDS,
    F("status", "text", IMM + "status", "immunization_status", "vaccination_status", normaliser="status"),
    F(
        "vaccine_code",
        "text",
        IMM + "vaccineCode",
        "cvx",
        "cvx_code",
        "vaccine_cvx",
        "code",
        required=True,
        normaliser="cvx",
    ),
    F("vaccine_system", "text", None, "vaccine_code_system", "code_system"),
    F("vaccine_display", "text", None, "vaccine_name", "vaccine_description", "description", "vaccine"),
    F(
        "occurrence",
        "datetime",
        IMM + "occurrenceDateTime",
        "occurrence_date_time",
        "administration_date",
        "admin_date",
        "date_administered",
        "vaccination_date",
        "date",
        required=True,
    ),
    F("recorded", "datetime", IMM + "recorded", "recorded_date", "entry_date"),
    F("primary_source", "boolean", IMM + "primarySource"),
    F("manufacturer", "text", IMM + "manufacturer", "mvx", "manufacturer_name", "mfr"),
    F("lot_number", "text", IMM + "lotNumber", "lot", "lot_no", "lot_num"),
    F(
        "expiration_date",
        "date",
        IMM + "expirationDate",
        "expiry_date",
        "expiration",
        "vax_expiration",
        "lot_expiration",
    ),
    F("site", "text", IMM + "site", "body_site", "vax_admin_site", "admin_site", "injection_site", normaliser="site"),
    F("route", "text", IMM + "route", "vax_route", "admin_route", "route_of_administration", normaliser="route"),
    F("dose_value", "number", IMM + "doseQuantity.value", "dose_quantity", "dose_amount", "dose"),
    F("dose_unit", "text", IMM + "doseQuantity.unit", "dose_units", "unit"),
    F(
        "performer_id",
        "text",
        IMM + "performer[].actorId",
        "performer",
        "performer_actor_id",
        "administered_by",
        "provider_id",
    ),
    F("performer_function", "text", IMM + "performer[].function", "performer_role"),
    F("encounter_id", "text", IMM + "encounterId", "visit_id"),
    F("note", "text", IMM + "note", "notes", "comment", "comments"),
    F("reason_codes", "list", IMM + "reasonCode", "reason_code", "reasons", "reason"),
    F("status_reason", "text", IMM + "statusReason", "refusal_reason"),
    F("is_subpotent", "boolean", IMM + "isSubpotent", "subpotent"),
    F("reaction_date", "date", IMM + "reaction[].date"),
    F("reaction_reported", "boolean", IMM + "reaction[].reported"),
    F("protocol_series", "text", IMM + "protocolApplied[].series", "series", "series_name"),
    F("dose_number", "integer", IMM + "protocolApplied[].doseNumber", "dose_num", "dose_no", "dose_sequence"),
    F("series_doses", "integer", IMM + "protocolApplied[].seriesDoses", "doses_in_series", "series_dose_count"),
    F("target_diseases", "list", IMM + "protocolApplied[].targetDisease", "target_disease", "disease", "diseases"),
)

#: Kind -> its canonical fields. Later kinds (encounters, documents, tasks,
#: practitioners) add their tables here.
KINDS: Mapping[str, tuple[CanonicalField, ...]] = {
    "immunization": IMMUNIZATION_FIELDS,
}

#: Values a profile may leave out: they fill empty cells and absent columns.
DEFAULTS: Mapping[str, Mapping[str, str]] = {
    "immunization": {"status": "completed", "vaccine_system": "http://hl7.org/fhir/sid/cvx"},
}


def fields_of(kind: str) -> tuple[CanonicalField, ...]:
    """The canonical fields of ``kind``."""
    return KINDS[kind]


def field_map(kind: str) -> dict[str, CanonicalField]:
    """Canonical field name -> field, for ``kind``."""
    return {f.name: f for f in KINDS[kind]}
