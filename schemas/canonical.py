"""Canonical fields: the toolkit's own column names for each kind of input row.

A mapping profile renames a registry's headers to these names; validation and
transformation work only with them. Each field names the create-body path it
feeds (``target``), so its limits (max length, enum, array sizes, maximum, minimum) are
looked up in :mod:`schemas.limits` and never restated here.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

from schemas.limits import Spec, spec_at

ValueType = Literal["text", "date", "datetime", "integer", "number", "boolean", "list"]
Normaliser = Literal["lower", "upper", "status", "gender", "cvx", "route", "site", "mvx", "encounter_class"]
RefKind = Literal["patient", "practitioner", "encounter", "immunization", "document", "task"]

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
    ref: RefKind | None = None  # holds a source id (or ClinikAPI id) of another kind's resource
    required_with: tuple[str, ...] = ()  # required when any of these fields has a value

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

    @property
    def minimum(self) -> float | None:
        """Smallest allowed number."""
        spec = self.spec
        return spec.minimum if spec is not None else None

    @property
    def exclusive_minimum(self) -> float | None:
        """The number an allowed one must be above."""
        spec = self.spec
        return spec.exclusive_minimum if spec is not None else None


def F(name: str, value: ValueType = "text", target: str | None = None, *aliases: str, **kw: object) -> CanonicalField:  # noqa: N802
    """Short constructor that keeps the tables below one line a field."""
    return CanonicalField(name, value, target, aliases=aliases, **kw)  # type: ignore[arg-type]


def R(name: str, kind: RefKind, target: str | None, *aliases: str, **kw: object) -> CanonicalField:  # noqa: N802
    """A reference field: a source id resolved to a ClinikAPI id at load time."""
    return CanonicalField(name, "text", target, aliases=aliases, ref=kind, own_max_length=SOURCE_ID_MAX_LENGTH, **kw)  # type: ignore[arg-type]


IMM = "ImmunizationCreate:"
PAT = "PatientCreate:"
PRA = "PractitionerCreate:"
ENC = "EncounterCreate:"
DOC = "DocumentCreate:"
TSK = "TaskCreate:"

_DEMOGRAPHICS = (
    "patient_birth_date",
    "patient_gender",
    "patient_phone",
    "patient_email",
    "patient_address_line",
    "patient_city",
    "patient_state",
    "patient_postal_code",
)

#: The patient demographics that may ride along on a row that names a patient.
#: When a row carries any of them, it must name the patient fully (first and last name).
PATIENT_DEMOGRAPHICS: tuple[CanonicalField, ...] = (
    F(
        "patient_first_name",
        "text",
        PAT + "firstName",
        "first_name",
        "recip_first_name",
        "given_name",
        "first",
        "given",
        "forename",
        required_with=_DEMOGRAPHICS,
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
        "family",
        required_with=_DEMOGRAPHICS,
    ),
    F("patient_birth_date", "date", PAT + "birthDate", "birth_date", "dob", "date_of_birth", "recip_dob", "birthdate"),
    F("patient_gender", "text", PAT + "gender", "gender", "sex", "recip_sex", "gender_code", "sex_code",
      normaliser="gender"),
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
    F("patient_postal_code", "text", PAT + "address.postalCode", "zip", "zip_code", "postal_code", "recip_address_zip",
      "postcode"),
    F("patient_country", "text", PAT + "address.country", "country"),
)

_PATIENT_REF = R(
    "patient_id",
    "patient",
    None,
    "patient_source_id",
    "recip_id",
    "mrn",
    "patient_mrn",
    "patient_number",
    "patient",
    required=True,
    description="the patient's id in the source system",
)

PATIENT_FIELDS: tuple[CanonicalField, ...] = (
    F(
        "patient_id",
        "text",
        None,
        "patient_source_id",
        "mrn",
        "patient_mrn",
        "patient_number",
        "id",
        required=True,
        own_max_length=SOURCE_ID_MAX_LENGTH,
        description="the patient's id in the source system",
    ),
    *(
        CanonicalField(
            **{**f.__dict__, "required": f.name in ("patient_first_name", "patient_last_name"), "required_with": ()}
        )
        for f in PATIENT_DEMOGRAPHICS
    ),
    F("patient_marital_status", "text", PAT + "maritalStatus", "marital_status", "marital"),
)

PRACTITIONER_FIELDS: tuple[CanonicalField, ...] = (
    F(
        "practitioner_id",
        "text",
        None,
        "provider_id",
        "id",
        "prescriber_id",
        own_max_length=SOURCE_ID_MAX_LENGTH,
        description="the practitioner's id in the source system",
    ),
    F("npi", "text", PRA + "npi", "national_provider_identifier", "provider_npi"),
    F(
        "practitioner_name",
        "text",
        None,
        "name",
        "provider_name",
        "full_name",
        description="a full name, split into first and last when those are absent",
    ),
    F("practitioner_first_name", "text", PRA + "firstName", "first_name", "given_name", "first", required=True),
    F("practitioner_last_name", "text", PRA + "lastName", "last_name", "family_name", "surname", "last", required=True),
    F("practitioner_prefix", "list", PRA + "prefix", "prefix", "title"),
    F("practitioner_suffix", "list", PRA + "suffix", "suffix", "credentials"),
    F("practitioner_gender", "text", PRA + "gender", "gender", "sex", normaliser="gender"),
    F("practitioner_email", "text", PRA + "email", "email"),
    F("practitioner_phone", "text", PRA + "phone", "phone", "telephone"),
    F("specialty", "text", PRA + "specialty", "speciality", "specialization"),
    F("practitioner_address_line", "text", PRA + "address.line[]", "address", "street"),
    F("practitioner_city", "text", PRA + "address.city", "city"),
    F("practitioner_state", "text", PRA + "address.state", "state"),
    F("practitioner_postal_code", "text", PRA + "address.postalCode", "zip", "postal_code"),
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
    _PATIENT_REF,
    *PATIENT_DEMOGRAPHICS,
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
    F("manufacturer", "text", IMM + "manufacturer", "mvx", "manufacturer_name", "mfr", normaliser="mvx"),
    F("lot_number", "text", IMM + "lotNumber", "lot", "lot_no", "lot_num", "batch", "batch_number", "batch_no"),
    F(
        "expiration_date",
        "date",
        IMM + "expirationDate",
        "expiry_date",
        "expiration",
        "vax_expiration",
        "lot_expiration",
    ),
    F("site", "text", IMM + "site", "body_site", "vax_admin_site", "admin_site", "injection_site", "anatomical_site",
      normaliser="site"),
    F("route", "text", IMM + "route", "vax_route", "admin_route", "route_of_administration", normaliser="route"),
    F("dose_value", "number", IMM + "doseQuantity.value", "dose_quantity", "dose_amount", "dose"),
    F("dose_unit", "text", IMM + "doseQuantity.unit", "dose_units", "unit"),
    R(
        "performer_id",
        "practitioner",
        IMM + "performer[].actorId",
        "performer",
        "performer_actor_id",
        "administered_by",
        "provider_id",
        "provider",
    ),
    F("performer_function", "text", IMM + "performer[].function", "performer_role"),
    F("performer_npi", "text", PRA + "npi", "vaccinator_npi", "administered_by_npi", "provider_npi",
      description="the performer's NPI: the practitioner is created from the row when no providers file has it"),
    F("performer_name", "text", None, "vaccinator", "vaccinator_name", "administered_by_name", "provider_name",
      description="the performer's full name, for a practitioner created from the row"),
    R("encounter_id", "encounter", IMM + "encounterId", "visit_id", "encounter"),
    F("note", "text", IMM + "note", "notes", "comment", "comments"),
    F("reason_codes", "list", IMM + "reasonCode", "reason_code", "reasons", "reason"),
    F("status_reason", "text", IMM + "statusReason", "refusal_reason", "reason_not_given", "reason_not_vaccinated"),
    F("is_subpotent", "boolean", IMM + "isSubpotent", "subpotent"),
    F("reaction_date", "date", IMM + "reaction[].date"),
    F("reaction_reported", "boolean", IMM + "reaction[].reported"),
    F("protocol_series", "text", IMM + "protocolApplied[].series", "series", "series_name"),
    F("dose_number", "integer", IMM + "protocolApplied[].doseNumber", "dose_num", "dose_no", "dose_sequence"),
    F("series_doses", "integer", IMM + "protocolApplied[].seriesDoses", "doses_in_series", "series_dose_count"),
    F("target_diseases", "list", IMM + "protocolApplied[].targetDisease", "target_disease", "disease", "diseases"),
)

ENCOUNTER_FIELDS: tuple[CanonicalField, ...] = (
    F(
        "record_id",
        "text",
        None,
        "encounter_id",
        "visit_id",
        "id",
        own_max_length=SOURCE_ID_MAX_LENGTH,
        description="the visit's id in the source system; the row key when present",
    ),
    _PATIENT_REF,
    F("status", "text", ENC + "status", "encounter_status", "visit_status", normaliser="status", required=True),
    F(
        "encounter_class",
        "text",
        ENC + "class",
        "class",
        "encounterclass",
        "visit_class",
        "visit_type",
        "setting",
        normaliser="encounter_class",
        required=True,
    ),
    R(
        "practitioner_id",
        "practitioner",
        ENC + "practitionerId",
        "provider",
        "provider_id",
        "practitioner",
        "attending",
    ),
    F(
        "participant_ids",
        "list",
        None,
        "participants",
        "participant",
        "other_providers",
        ref="practitioner",
        description="';'-separated practitioner ids, sent as participants",
    ),
    F("encounter_type", "text", ENC + "type", "type", "encounter_type", "visit_reason_type", "description"),
    F("service_type", "text", ENC + "serviceType", "service"),
    F("priority", "text", ENC + "priority"),
    F(
        "reason",
        "text",
        ENC + "reasonCode",
        "reason_code",
        "reasondescription",
        "reason_description",
        "chief_complaint",
    ),
    F("period_start", "datetime", ENC + "period.start", "start", "start_time", "admit_time", "check_in", "visit_start"),
    F(
        "period_end",
        "datetime",
        ENC + "period.end",
        "stop",
        "end",
        "end_time",
        "discharge_time",
        "check_out",
        "visit_end",
    ),
    F("length_minutes", "integer", ENC + "lengthMinutes", "length", "duration", "duration_minutes", "minutes"),
    F("location", "text", ENC + "location", "room", "clinic"),
    F("service_provider", "text", ENC + "serviceProvider", "organization", "facility", "service_provider_name"),
    F(
        "diagnoses",
        "list",
        ENC + "diagnosis",
        "diagnosis",
        "diagnosis_codes",
        "dx",
        "diagnoses_codes",
        description="';'-separated condition codes, or numbered columns diagnosis_1, diagnosis_2 ...",
    ),
)

DOCUMENT_FIELDS: tuple[CanonicalField, ...] = (
    F(
        "document_id",
        "text",
        None,
        "document_key",
        "doc_id",
        "letter_id",
        "document",
        required=True,
        own_max_length=SOURCE_ID_MAX_LENGTH,
        description="groups the section rows of one document",
    ),
    _PATIENT_REF,
    R(
        "practitioner_id",
        "practitioner",
        DOC + "practitionerId",
        "author",
        "author_id",
        "provider",
        "provider_id",
        required=True,
    ),
    R("encounter_id", "encounter", DOC + "encounterId", "visit_id", "encounter"),
    F("status", "text", DOC + "status", "document_status", normaliser="status", required=True),
    F("document_type", "text", DOC + "type", "type", "doc_type", required=True),
    F("title", "text", DOC + "title", "document_title", "subject", required=True),
    F("date", "datetime", DOC + "date", "document_date", "written", "created"),
    F("confidentiality", "text", DOC + "confidentiality", normaliser="upper"),
    F("category", "list", DOC + "category", "categories"),
    F("attester_mode", "text", DOC + "attester[].mode", normaliser="lower"),
    F("attester_time", "datetime", DOC + "attester[].time", "attested_at"),
    R("attester_id", "practitioner", DOC + "attester[].partyId", "attester", "attested_by"),
    F("relates_to_code", "text", DOC + "relatesTo[].code", normaliser="lower"),
    F("relates_to_target", "text", DOC + "relatesTo[].targetId", "replaces_document"),
    F("event_code", "text", DOC + "event[].code[].code", "event"),
    F("event_start", "datetime", DOC + "event[].period.start"),
    F("event_end", "datetime", DOC + "event[].period.end"),
    F("section_title", "text", DOC + "sections[].title", "heading", required=True),
    F("section_text", "text", DOC + "sections[].text", "text", "body", "content", required=True),
    F("section_code", "text", DOC + "sections[].code"),
    F("section_mode", "text", DOC + "sections[].mode", normaliser="lower"),
    R("section_author_id", "practitioner", DOC + "sections[].authorId", "section_author"),
)

TASK_FIELDS: tuple[CanonicalField, ...] = (
    F(
        "record_id",
        "text",
        None,
        "task_id",
        "id",
        own_max_length=SOURCE_ID_MAX_LENGTH,
        description="the task's id in the source system; the row key when present",
    ),
    F("status", "text", TSK + "status", "task_status", normaliser="status", required=True),
    F("intent", "text", TSK + "intent", normaliser="lower", required=True),
    F("priority", "text", TSK + "priority", normaliser="lower"),
    F("status_reason", "text", TSK + "statusReason"),
    F("business_status", "text", TSK + "businessStatus"),
    F("task_code", "text", TSK + "code", "code", "task_type"),
    F("description", "text", TSK + "description", "task", "summary"),
    R("focus_id", "immunization", TSK + "focusId", "focus", "about"),
    R("patient_id", "patient", TSK + "patientId", "patient_source_id", "mrn", "patient", "for"),
    R("encounter_id", "encounter", TSK + "encounterId", "visit_id", "encounter"),
    F("execution_start", "datetime", TSK + "executionPeriod.start", "start", "due_start"),
    F("execution_end", "datetime", TSK + "executionPeriod.end", "end", "due", "due_date"),
    F("authored_on", "datetime", TSK + "authoredOn", "authored", "created"),
    R("requester_id", "practitioner", TSK + "requesterId", "requester", "requested_by"),
    R("owner_id", "practitioner", TSK + "ownerId", "owner", "assigned_to"),
    F("reason", "text", TSK + "reasonCode", "reason_code"),
    F("note", "text", TSK + "note", "notes", "comment"),
    F("based_on", "list", TSK + "basedOn"),
    F("part_of", "list", TSK + "partOf"),
    F("inputs", "list", TSK + "input", "input", description="';'-separated type=value pairs"),
    F("outputs", "list", TSK + "output", "output", description="';'-separated type=value pairs"),
    F("restriction_repetitions", "integer", TSK + "restriction.repetitions", "repetitions"),
    F("restriction_start", "datetime", TSK + "restriction.period.start"),
    F("restriction_end", "datetime", TSK + "restriction.period.end"),
    F("restriction_recipients", "list", TSK + "restriction.recipientIds", "recipients"),
)


@dataclass(frozen=True)
class Kind:
    """One kind of input row: its fields, its create route, and when it loads."""

    name: str
    schema: str  # the create-body schema it becomes
    fields: tuple[CanonicalField, ...]
    stage: int  # load order: parents first
    distinctive: tuple[str, ...]  # fields whose headers tell this kind apart
    key: str = "record_id"  # the field whose value keys a row (its source key)


KIND_SPECS: Mapping[str, Kind] = {
    k.name: k
    for k in (
        Kind("patient", "PatientCreate", PATIENT_FIELDS, 0, ("patient_first_name", "patient_marital_status"),
             key="patient_id"),
        Kind("practitioner", "PractitionerCreate", PRACTITIONER_FIELDS, 0,
             ("npi", "specialty", "practitioner_name", "practitioner_id"), key="practitioner_id"),
        Kind(
            "encounter",
            "EncounterCreate",
            ENCOUNTER_FIELDS,
            1,
            ("encounter_class", "period_start", "period_end", "diagnoses", "length_minutes"),
        ),
        Kind(
            "immunization",
            "ImmunizationCreate",
            IMMUNIZATION_FIELDS,
            2,
            ("vaccine_code", "lot_number", "dose_number", "occurrence"),
        ),
        Kind("document", "DocumentCreate", DOCUMENT_FIELDS, 2, ("document_id", "section_text", "section_title"),
             key="document_id"),
        Kind("task", "TaskCreate", TASK_FIELDS, 2, ("intent", "owner_id", "requester_id", "execution_end")),
    )
}

#: Kind -> its canonical fields.
KINDS: Mapping[str, tuple[CanonicalField, ...]] = {name: k.fields for name, k in KIND_SPECS.items()}

#: Words registries use for a visit's class, mapped to EncounterCreate's codes.
ENCOUNTER_CLASS_WORDS: Mapping[str, str] = {
    "amb": "AMB",
    "ambulatory": "AMB",
    "outpatient": "AMB",
    "wellness": "AMB",
    "office": "AMB",
    "clinic": "AMB",
    "office visit": "AMB",
    "well child": "AMB",
    "imp": "IMP",
    "inpatient": "IMP",
    "hospital": "IMP",
    "admission": "IMP",
    "emer": "EMER",
    "emergency": "EMER",
    "er": "EMER",
    "ed": "EMER",
    "urgent care": "EMER",
    "urgentcare": "EMER",
    "hh": "HH",
    "home health": "HH",
    "home": "HH",
    "home visit": "HH",
    "vr": "VR",
    "virtual": "VR",
    "telehealth": "VR",
    "telemedicine": "VR",
    "video": "VR",
    # Care settings with no class of their own, as Synthea's FHIR export codes them.
    "hospice": "HH",
    "snf": "IMP",
    "skilled nursing": "IMP",
    "skilled nursing facility": "IMP",
}

#: Values a profile may leave out: they fill empty cells and absent columns.
DEFAULTS: Mapping[str, Mapping[str, str]] = {
    "immunization": {"status": "completed", "vaccine_system": "http://hl7.org/fhir/sid/cvx"},
    "encounter": {"status": "finished"},
    "document": {"status": "final"},
    "task": {"status": "requested", "intent": "order"},
}


#: Fields that name or reach a person: a ``--redact`` report leaves their values out.
PHI_FIELDS = frozenset(
    {
        "patient_first_name", "patient_last_name", "patient_birth_date", "patient_phone", "patient_email",
        "patient_address_line", "patient_city", "patient_postal_code", "patient_marital_status",
        "practitioner_name", "practitioner_email", "practitioner_phone", "practitioner_address_line",
        "practitioner_postal_code", "performer_name", "note",
    }
)


#: A text field whose documented limit is at least this many characters is prose (a note, a reason,
#: a description, a document's text), which may name anyone; shorter ones hold codes and names.
FREE_TEXT_MIN_LENGTH = 500


def _free_text(f: CanonicalField) -> bool:
    prose = f.value in ("text", "list") and f.enum is None and f.normaliser is None and f.ref is None
    return prose and (f.max_length or 0) >= FREE_TEXT_MIN_LENGTH


#: Fields that may hold free text, by their limits (:data:`FREE_TEXT_MIN_LENGTH`): a ``--redact``
#: report leaves their values out too.
FREE_TEXT_FIELDS = frozenset(f.name for fields in KINDS.values() for f in fields if _free_text(f))

#: Everything a ``--redact`` report leaves out: :data:`PHI_FIELDS` and :data:`FREE_TEXT_FIELDS`.
REDACTED_FIELDS = PHI_FIELDS | FREE_TEXT_FIELDS


def fields_of(kind: str) -> tuple[CanonicalField, ...]:
    """The canonical fields of ``kind``."""
    return KIND_SPECS[kind].fields


def field_map(kind: str) -> dict[str, CanonicalField]:
    """Canonical field name -> field, for ``kind``."""
    return {f.name: f for f in KIND_SPECS[kind].fields}
