"""The documented limits of ClinikAPI's create bodies, written once.

Every other place that needs a limit derives it from :data:`CREATE_SCHEMAS`:
the pandera checks (``schemas.frames``), the pydantic payload models
(``schemas.models``) that the sandbox validates request bodies with, and the
test that cross-checks this table against the published OpenAPI description.

A :class:`Spec` describes one JSON value: its type, whether it is required in
its parent object, and the limits the API documents for it. Objects carry
their properties, arrays their item spec.

A few limits are ours, where the OpenAPI file is silent (:data:`OUR_LIMITS`):
the class codes the prose of the docs names, and the lower bounds of amounts
and counts that cannot be negative (a dose amount is above 0; a visit's
length, a dose number, a series' doses, a rank and a repetition count are at
least 0).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Literal

JsonType = Literal["string", "integer", "number", "boolean", "object", "array", "string-or-coding"]


@dataclass(frozen=True)
class Spec:
    """One JSON value of a create body and its documented limits."""

    type: JsonType
    required: bool = False
    max_length: int | None = None
    enum: tuple[str, ...] | None = None
    min_items: int | None = None
    max_items: int | None = None
    maximum: float | None = None
    minimum: float | None = None
    exclusive_minimum: float | None = None  # the value must be above it
    format: Literal["date-time", "email", "uri"] | None = None
    properties: Mapping[str, Spec] = field(default_factory=dict)
    items: Spec | None = None


def S(  # noqa: N802 - short constructors keep the table readable
    max_length: int | None = None,
    *,
    required: bool = False,
    enum: tuple[str, ...] | None = None,
    format: Literal["date-time", "email", "uri"] | None = None,
) -> Spec:
    """A string."""
    return Spec("string", required=required, max_length=max_length, enum=enum, format=format)


def I(maximum: float | None = None, *, minimum: float | None = None, required: bool = False) -> Spec:  # noqa: E743, N802
    """An integer."""
    return Spec("integer", required=required, maximum=maximum, minimum=minimum)


def N(*, exclusive_minimum: float | None = None) -> Spec:  # noqa: N802
    """A number."""
    return Spec("number", exclusive_minimum=exclusive_minimum)


def B() -> Spec:  # noqa: N802
    """A boolean."""
    return Spec("boolean")


def O(**properties: Spec) -> Spec:  # noqa: E743, N802
    """An object with these properties (never itself required in these schemas)."""
    return Spec("object", properties=properties)


def A(items: Spec, *, max_items: int | None = None, min_items: int | None = None, required: bool = False) -> Spec:  # noqa: N802
    """An array of ``items``."""
    return Spec("array", required=required, items=items, max_items=max_items, min_items=min_items)


GENDERS = ("male", "female", "other", "unknown")
ENCOUNTER_CLASSES = ("AMB", "IMP", "EMER", "HH", "VR")

_ADDRESS = O(line=A(S()), city=S(), state=S(), postalCode=S(), country=S())
_PERIOD = O(start=S(), end=S())
_PERIOD_DT = O(start=S(format="date-time"), end=S(format="date-time"))
_TASK_IO = O(type=S(required=True), valueString=S(), valueBoolean=B(), valueInteger=I())

PATIENT = O(
    firstName=S(100, required=True),
    lastName=S(100, required=True),
    email=S(format="email"),
    phone=S(20),
    gender=S(enum=GENDERS),
    birthDate=S(),
    address=_ADDRESS,
    maritalStatus=S(50),
    photo=O(url=S(format="uri"), data=S(), contentType=S()),
    contact=A(
        O(
            relationship=S(),
            firstName=S(),
            lastName=S(),
            phone=S(),
            email=S(format="email"),
            address=_ADDRESS,
        ),
        max_items=10,
    ),
    languages=A(O(language=S(required=True), preferred=B()), max_items=20),
    generalPractitionerId=S(),
)

PRACTITIONER = O(
    firstName=S(100, required=True),
    lastName=S(100, required=True),
    prefix=A(S()),
    suffix=A(S()),
    email=S(format="email"),
    phone=S(20),
    gender=S(enum=GENDERS),
    birthDate=S(),
    npi=S(20),
    specialty=S(200),
    qualifications=A(
        O(name=S(200, required=True), issuer=S(200), period=_PERIOD, identifier=S(100)),
        max_items=20,
    ),
    languages=A(S()),
    address=_ADDRESS,
    photo=O(url=S(format="uri"), data=S(), contentType=S(100)),
)

ENCOUNTER = O(
    status=S(
        required=True,
        enum=("planned", "arrived", "triaged", "in-progress", "onleave", "finished", "cancelled"),
    ),
    # The OpenAPI file types `class` as a plain string; the prose of the docs
    # names the five codes, and the API refuses others, so the enum is ours.
    **{"class": S(required=True, enum=ENCOUNTER_CLASSES)},
    patientId=S(required=True),
    practitionerId=S(),
    participants=A(O(practitionerId=S(required=True), role=S())),
    type=S(200),
    serviceType=S(200),
    priority=S(50),
    reasonCode=S(500),
    period=_PERIOD_DT,
    lengthMinutes=I(10080, minimum=0),
    location=S(200),
    serviceProvider=S(200),
    diagnosis=A(O(condition=S(), use=S(), rank=I(minimum=0)), max_items=20),
    appointmentId=S(),
    basedOnId=S(),
    partOfId=S(),
    hospitalization=O(
        admitSource=S(),
        dischargeDisposition=S(),
        reAdmission=S(),
        dietPreference=A(S()),
        specialArrangement=A(S()),
        destination=S(),
        origin=S(),
    ),
)

IMMUNIZATION = O(
    status=S(required=True, enum=("completed", "not-done")),
    vaccineCode=Spec(
        "string-or-coding",
        required=True,
        max_length=500,
        properties={"system": S(), "code": S(), "display": S()},
    ),
    patientId=S(128, required=True),
    encounterId=S(128),
    occurrenceDateTime=S(50),
    recorded=S(50),
    primarySource=B(),
    manufacturer=S(500),
    lotNumber=S(100),
    expirationDate=S(50),
    site=S(200),
    route=S(200),
    doseQuantity=O(value=N(exclusive_minimum=0), unit=S(50)),
    performer=A(O(function=S(200), actorId=S(128, required=True)), max_items=10),
    note=S(5000),
    reasonCode=A(S(500), max_items=10),
    statusReason=S(500),
    isSubpotent=B(),
    reaction=A(O(date=S(), reported=B()), max_items=10),
    protocolApplied=A(
        O(
            series=S(200),
            doseNumber=I(minimum=0),
            seriesDoses=I(minimum=0),
            targetDisease=A(S(200), max_items=10),
        ),
        max_items=10,
    ),
)

DOCUMENT = O(
    status=S(required=True, enum=("preliminary", "final", "amended")),
    type=S(100, required=True),
    category=A(S(200)),
    patientId=S(required=True),
    encounterId=S(),
    practitionerId=S(required=True),
    title=S(500, required=True),
    date=S(format="date-time"),
    confidentiality=S(enum=("N", "R", "V")),
    attester=A(
        O(
            mode=S(required=True, enum=("personal", "professional", "legal", "official")),
            time=S(format="date-time"),
            partyId=S(),
        )
    ),
    custodianId=S(),
    relatesTo=A(
        O(
            code=S(required=True, enum=("replaces", "transforms", "signs", "appends")),
            targetId=S(required=True),
        )
    ),
    event=A(
        O(
            code=A(O(system=S(), code=S(), display=S())),
            period=_PERIOD,
            detailIds=A(S()),
        )
    ),
    sections=A(
        O(
            title=S(200, required=True),
            code=S(),
            text=S(50000, required=True),
            resourceIds=A(S()),
            authorId=S(),
            mode=S(enum=("working", "snapshot", "changes")),
            sections=A(O(title=S(), code=S(), text=S())),
        ),
        min_items=1,
        max_items=50,
        required=True,
    ),
)

TASK = O(
    status=S(
        required=True,
        enum=(
            "draft",
            "requested",
            "received",
            "accepted",
            "rejected",
            "ready",
            "cancelled",
            "in-progress",
            "on-hold",
            "failed",
            "completed",
        ),
    ),
    intent=S(
        required=True,
        enum=(
            "unknown",
            "proposal",
            "plan",
            "order",
            "original-order",
            "reflex-order",
            "filler-order",
            "instance-order",
            "option",
        ),
    ),
    statusReason=S(500),
    businessStatus=S(200),
    priority=S(enum=("routine", "urgent", "asap", "stat")),
    code=S(200),
    description=S(2000),
    focusId=S(),
    patientId=S(),
    encounterId=S(),
    executionPeriod=_PERIOD_DT,
    authoredOn=S(format="date-time"),
    requesterId=S(),
    ownerId=S(),
    reasonCode=S(500),
    note=S(2000),
    basedOn=A(S()),
    partOf=A(S()),
    input=A(_TASK_IO),
    output=A(_TASK_IO),
    restriction=O(repetitions=I(minimum=0), period=_PERIOD, recipientIds=A(S())),
)

#: Create-body schema name -> its spec, for the six resources an import writes.
CREATE_SCHEMAS: Mapping[str, Spec] = {
    "PatientCreate": PATIENT,
    "PractitionerCreate": PRACTITIONER,
    "EncounterCreate": ENCOUNTER,
    "ImmunizationCreate": IMMUNIZATION,
    "DocumentCreate": DOCUMENT,
    "TaskCreate": TASK,
}

#: Limits the OpenAPI file does not carry, as (schema, path, OpenAPI keyword): the API documents
#: them in prose, or the value cannot mean anything below them.
OUR_LIMITS: frozenset[tuple[str, str, str]] = frozenset(
    {
        ("EncounterCreate", "class", "enum"),
        ("EncounterCreate", "lengthMinutes", "minimum"),
        ("EncounterCreate", "diagnosis[].rank", "minimum"),
        ("ImmunizationCreate", "doseQuantity.value", "exclusiveMinimum"),
        ("ImmunizationCreate", "protocolApplied[].doseNumber", "minimum"),
        ("ImmunizationCreate", "protocolApplied[].seriesDoses", "minimum"),
        ("TaskCreate", "restriction.repetitions", "minimum"),
    }
)

#: Create-body schema name -> the route it is posted to.
ROUTES: Mapping[str, str] = {
    "PatientCreate": "/v1/patients",
    "PractitionerCreate": "/v1/practitioners",
    "EncounterCreate": "/v1/encounters",
    "ImmunizationCreate": "/v1/immunizations",
    "DocumentCreate": "/v1/documents",
    "TaskCreate": "/v1/tasks",
}

#: Create-body schema name -> the FHIR resource type it is (a bulk import names it; the sandbox
#: serves it; a document is a Composition).
RESOURCE_TYPES: Mapping[str, str] = {
    "PatientCreate": "Patient",
    "PractitionerCreate": "Practitioner",
    "EncounterCreate": "Encounter",
    "ImmunizationCreate": "Immunization",
    "DocumentCreate": "Composition",
    "TaskCreate": "Task",
}

#: Limits of the transport rather than of one field.
MAX_BODY_BYTES = 1024 * 1024  # the SDK refuses larger bodies before sending
PAGE_SIZE_MAX = 100  # search `count` is clamped to this
BULK_MAX_RECORDS = 10_000
BULK_MAX_DATA_BYTES = 100 * 1024 * 1024
BULK_OPERATIONS_PER_HOUR = 5
#: The rate-limit window the API documents (seconds): no server-announced wait is longer.
RATE_WINDOW_SECONDS = 3600.0

#: The shape of a ClinikAPI key: ``clk_live_`` (production, real patient data) or ``clk_test_``, then a
#: token. The docs show ``clk_live_<...>`` and say the API refuses any key of another shape (401
#: ``INVALID_KEY_FORMAT``); neither they nor the official SDK (which only requires a non-empty key) say
#: which characters follow the prefix. So the rest is any HTTP ``token68`` (RFC 7235: letters, digits and
#: ``- . _ ~ + /``, then ``=`` padding), what a header value can carry, not only letters and digits: a
#: real key with a ``-`` or ``_`` in it is not refused here on a guess. The sandbox admits, the settings
#: check and the diagnostics masks find keys by this one pattern.
API_KEY_PATTERN = r"clk_(live|test)_[A-Za-z0-9._~+/-]+=*"


#: The string formats the OpenAPI file names (``format: email | uri | date-time`` on create-body fields),
#: as the one pattern each that checks them: the sandbox's payload models (``schemas.models``) and the
#: validation of input rows (``etl.validate``) both use these. ``date-time`` is RFC 3339's (JSON Schema's
#: meaning of the keyword): a full date, ``T``, a time with seconds, and ``Z`` or an offset. ``uri`` is an
#: absolute URI (a scheme, ``:``, then no space).
FORMAT_PATTERNS: Mapping[str, str] = {
    "email": r"^[^@\s]+@[^@\s]+\.[^@\s]+$",
    "uri": r"^[A-Za-z][A-Za-z0-9+.-]*:[^\s]+$",
    "date-time": r"^\d{4}-\d{2}-\d{2}[Tt]\d{2}:\d{2}:\d{2}(\.\d+)?([Zz]|[+-]\d{2}:\d{2})$",
}

#: The shortest a required string may be. The OpenAPI file gives no ``minLength``, but the API validates
#: bodies with Zod (``errors.mdx``: "422 - request body failed Zod validation") and an empty required
#: string names nothing (a patient whose ``lastName`` is ``""``): the sandbox refuses it with 422 like an
#: absent one, and validation already treats an empty cell as absent.
REQUIRED_STRING_MIN_LENGTH = 1


def spec_at(schema: str, path: str) -> Spec:
    """The spec at a dotted path, ``[]`` stepping into array items.

    >>> spec_at("ImmunizationCreate", "protocolApplied[].targetDisease[]").max_length
    200
    """
    spec = CREATE_SCHEMAS[schema]
    for part in path.split("."):
        name, arrays = part.rstrip("[]"), part.count("[]")
        spec = spec.properties[name]
        for _ in range(arrays):
            assert spec.items is not None, f"{path}: {name} is not an array"
            spec = spec.items
    return spec


def walk(spec: Spec, prefix: str = "") -> Iterator[tuple[str, Spec]]:
    """Every (dotted path, spec) below ``spec``, arrays written as ``name[]``."""
    for name, child in spec.properties.items():
        path = f"{prefix}{name}"
        yield path, child
        if child.type == "object":
            yield from walk(child, path + ".")
        item, item_path = child.items, path
        while item is not None:
            item_path += "[]"
            yield item_path, item
            if item.type == "object":
                yield from walk(item, item_path + ".")
            item = item.items
