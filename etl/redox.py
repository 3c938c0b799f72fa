"""Redox as a destination: each valid vaccine row as a FHIR R4 message bundle
for Redox's ``Immunization/$write``.

The rows take the one plan of every run (:mod:`etl.plan`: read → map →
validate, a batch at a time) and are sent a part at a time as a ClinikAPI
load's are (:mod:`etl.send`); only the transform, the check, the send
and the target differ (:class:`RedoxBundles`, the plan's destination)::

    valid frame ─ plan_bundles ─► one Bundle (type message) per row, as JSON text:
                                  MessageHeader, Immunization, Patient
                                  (and a Practitioner when the row names a performer)
                ─ check_bundles ► parsed with fhir.resources (R4B: the package's
                                  nearest to R4), one bundle per distinct shape
                                  (bundle_shape); a failure is a ``fhir-invalid``
                                  rejection naming the FHIR path
                ─ Loader + RedoxClient ─► POST {base}/fhir/R4/{slug}/{env}/Immunization/$write

Bundles are built as polars structs encoded with ``struct.json_encode``, one
resource at a time (the entries differ in shape, so a list cannot hold them),
then joined as text. Every id is derived from a key: the bundle, its header
and its Immunization from the row key, the Patient from the source patient
id, a Practitioner from the performer id. A re-run therefore builds the same
bundles but for ``timestamp`` (and ``body_hash`` leaves the timestamp out).

The state store keeps Redox sends under their own kind
(:data:`KIND`) and, by default, in its own file
(:data:`etl.settings.DEFAULT_REDOX_STATE`), since a store is bound to one
target. Redox has no search: a send without an answer stays ``unknown``.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import polars as pl
from pydantic import ValidationError

from etl.destination import Destination, OnResponse, Target
from etl.errors import UsageError
from etl.files import private_dir
from etl.load.client import check_target_url, mask
from etl.load.redox import RedoxClient
from etl.mapping import Mapped
from etl.plan import validate_in_batches
from etl.readers import ROW
from etl.redaction import masked
from etl.report import RunFacts, RunReport
from etl.rules import RULES
from etl.send import load_in_batches
from etl.settings import DEFAULT_REDOX_STATE, DEFAULT_STATE, Settings
from etl.transform import Planned, json_body, obj, one_of, sha256_hex, source_keys
from schemas.codes import CVX_OID, CVX_SYSTEM, NCI_OID, ROUTE_SYSTEM, SITE_SYSTEM, displays, table

if TYPE_CHECKING:
    import httpx

    from etl.load.loader import Client, Loader

__all__ = [
    "EVENT_CODE",
    "EVENT_SYSTEM",
    "KIND",
    "RedoxBundles",
    "bundle_shape",
    "check_bundle",
    "check_bundles",
    "load_redox",
    "plan_bundles",
    "redox_state_path",
    "redox_target",
    "write_route",
]

#: The state-store kind of a Redox send: never confused with a ClinikAPI immunization.
KIND = "redox-immunization"
EVENT_SYSTEM = "urn:redox:event-type"
EVENT_CODE = "Immunization-New"
MVX_OID = "urn:oid:2.16.840.1.113883.12.227"
IDENTIFIER_TYPE_SYSTEM = "http://terminology.hl7.org/CodeSystem/v2-0203"
PRACTITIONER_SYSTEM = "urn:clinik-etl:practitioner"
#: Rows whose bundles are built and checked at a time (bounds a Redox plan's memory within a batch).
BUNDLE_SLICE = 20_000
#: The destination slug in the path when the embedded sandbox is the target.
SANDBOX_SLUG = "sandbox"

c = pl.col
_NCI = {row["code"]: row["nci_code"] for row in table("route") if row.get("nci_code")}
_MVX = {spelling.lower(): code for code, name in displays("mvx").items() for spelling in (code, name)}


def write_route(slug: str, environment: str) -> str:
    """The ``$write`` path under a Redox base URL."""
    return f"/fhir/R4/{slug}/{environment}/Immunization/$write"


def redox_state_path(settings: Settings) -> Path:
    """The state store of a Redox load: its own file unless ``--state`` names one."""
    return DEFAULT_REDOX_STATE if settings.state == DEFAULT_STATE else settings.state


# --- the bundle, one resource at a time ---------------------------------------------


def _fhir_id(prefix: str, key: pl.Expr) -> pl.Expr:
    """A FHIR id (``[A-Za-z0-9-.]{1,64}``) derived from any key: 128 bits of its SHA-256."""
    return pl.lit(prefix) + sha256_hex(key).str.slice(0, 32)


def _text(value: pl.Expr | str | None) -> pl.Expr:
    return pl.lit(value, dtype=pl.String) if value is None or isinstance(value, str) else value


def _coding(system: pl.Expr | str, code: pl.Expr, display: pl.Expr | None = None) -> pl.Expr:
    """A Coding, or null without a code (a system alone says nothing)."""
    fields = [_text(system).alias("system"), code.alias("code"), _text(display).alias("display")]
    return pl.when(code.is_not_null()).then(pl.struct(fields))


def _texts(list_column: str) -> pl.Expr:
    """A list of strings as CodeableConcepts with text only."""
    return c(list_column).list.eval(pl.struct(pl.element().alias("text")))


def _coded(column: str, system: str, nci: bool = False) -> pl.Expr:
    """A route or site: a coding when the code table knows it (NCI with Redox's OID for a route that has one),
    else the spelling as text."""
    value = c(column)
    display = value.replace_strict(displays(column), default=None, return_dtype=pl.String)
    coding = _coding(system, pl.when(display.is_not_null()).then(value), display)
    if nci:
        code = value.replace_strict(_NCI, default=None, return_dtype=pl.String)
        coding = pl.when(code.is_not_null()).then(_coding(NCI_OID, code, display)).otherwise(coding)
    return obj(coding=one_of(coding), text=pl.when(display.is_null()).then(value))


def _vaccine() -> pl.Expr:
    system = c("vaccine_system").fill_null(CVX_SYSTEM)
    cvx = system == CVX_SYSTEM
    display = pl.when(cvx).then(c("vaccine_code").replace_strict(displays("cvx"), default=None, return_dtype=pl.String))
    # Redox writes CVX by its OID; another system passes through as the profile named it.
    coding = _coding(pl.when(cvx).then(pl.lit(CVX_OID)).otherwise(system), c("vaccine_code"), display)
    return obj(coding=one_of(coding), text=c("vaccine_display"))


def _manufacturer() -> pl.Expr:
    written = c("manufacturer")
    mvx = written.str.to_lowercase().replace_strict(_MVX, default=None, return_dtype=pl.String)
    name = mvx.replace_strict(displays("mvx"), default=None, return_dtype=pl.String)
    identifier = pl.when(mvx.is_not_null()).then(pl.struct(system=pl.lit(MVX_OID), value=mvx))
    return obj(display=pl.coalesce(name, written), identifier=identifier)


def _ids() -> dict[str, pl.Expr]:
    key = c("source_key")
    return {
        "bundle": _fhir_id("bundle-", key),
        "header": _fhir_id("msg-", key),
        "immunization": _fhir_id("imm-", key),
        "patient": _fhir_id("pat-", c("patient_id")),
        "practitioner": _fhir_id("prac-", c("performer_id")),
    }


def _header(settings: Settings, ids: dict[str, pl.Expr]) -> pl.Expr:
    return pl.struct(
        resourceType=pl.lit("MessageHeader"),
        id=ids["header"],
        eventCoding=pl.struct(system=pl.lit(EVENT_SYSTEM), code=pl.lit(EVENT_CODE)),
        source=pl.struct(name=_text(settings.redox_source_name), endpoint=pl.lit(settings.redox_source_endpoint)),
        focus=pl.concat_list(pl.struct(reference=pl.lit("Immunization/") + ids["immunization"])),
    )


def _immunization(settings: Settings, ids: dict[str, pl.Expr]) -> pl.Expr:
    performer = pl.when(c("performer_id").is_not_null()).then(
        obj(
            function=obj(text=c("performer_function")),
            actor=pl.struct(reference=pl.lit("Practitioner/") + ids["practitioner"]),
        )
    )
    # FHIR requires a dose number in protocolApplied: without one the series is left out.
    protocol = pl.when(c("dose_number__int").is_not_null()).then(
        obj(
            series=c("protocol_series"),
            targetDisease=_texts("target_diseases__list"),
            doseNumberPositiveInt=c("dose_number__int"),
            seriesDosesPositiveInt=c("series_doses__int"),
        )
    )
    return pl.struct(
        resourceType=pl.lit("Immunization"),
        id=ids["immunization"],
        identifier=pl.concat_list(pl.struct(system=pl.lit(settings.redox_identifier_system), value=c("source_key"))),
        status=c("status"),
        statusReason=obj(text=c("status_reason")),
        vaccineCode=_vaccine(),
        patient=pl.struct(reference=pl.lit("Patient/") + ids["patient"]),
        occurrenceDateTime=c("occurrence__out"),
        recorded=c("recorded__out"),
        primarySource=c("primary_source__bool"),
        manufacturer=_manufacturer(),
        lotNumber=c("lot_number"),
        expirationDate=c("expiration_date__out"),
        site=_coded("site", SITE_SYSTEM),
        route=_coded("route", ROUTE_SYSTEM, nci=True),
        doseQuantity=obj(value=c("dose_value__num"), unit=c("dose_unit")),
        performer=one_of(performer),
        note=one_of(obj(text=c("note"))),
        reasonCode=_texts("reason_codes__list"),
        isSubpotent=c("is_subpotent__bool"),
        reaction=one_of(obj(date=c("reaction_date__out"), reported=c("reaction_reported__bool"))),
        protocolApplied=one_of(protocol),
    )


def _patient(settings: Settings, ids: dict[str, pl.Expr]) -> pl.Expr:
    mrn = pl.struct(
        type=pl.struct(coding=pl.concat_list(pl.struct(system=pl.lit(IDENTIFIER_TYPE_SYSTEM), code=pl.lit("MR")))),
        system=pl.lit(settings.redox_mrn_system),
        value=c("patient_id"),
    )
    phone = pl.when(c("patient_phone").is_not_null()).then(pl.struct(system=pl.lit("phone"), value=c("patient_phone")))
    email = pl.when(c("patient_email").is_not_null()).then(pl.struct(system=pl.lit("email"), value=c("patient_email")))
    telecom = pl.concat_list(phone, email).list.drop_nulls()
    return pl.struct(
        resourceType=pl.lit("Patient"),
        id=ids["patient"],
        identifier=pl.concat_list(mrn),
        name=one_of(obj(family=c("patient_last_name"), given=one_of(c("patient_first_name")))),
        telecom=pl.when(telecom.list.len() > 0).then(telecom),
        gender=c("patient_gender"),
        birthDate=c("patient_birth_date__out"),
        address=one_of(
            obj(
                line=one_of(c("patient_address_line")),
                city=c("patient_city"),
                state=c("patient_state"),
                postalCode=c("patient_postal_code"),
                country=c("patient_country"),
            )
        ),
    )


def _practitioner(ids: dict[str, pl.Expr]) -> pl.Expr:
    return pl.when(c("performer_id").is_not_null()).then(
        pl.struct(
            resourceType=pl.lit("Practitioner"),
            id=ids["practitioner"],
            identifier=pl.concat_list(pl.struct(system=pl.lit(PRACTITIONER_SYSTEM), value=c("performer_id"))),
        )
    )


def _entry(resource: pl.Expr) -> pl.Expr:
    return pl.concat_str([pl.lit('{"resource":'), json_body(resource), pl.lit("}")])


def plan_bundles(mapped: Mapped, valid: pl.DataFrame, settings: Settings, timestamp: str) -> pl.DataFrame:
    """One message bundle per valid immunization row: ``__row, source_key, bundle_id, body, body_hash``.

    ``body_hash`` covers everything but ``timestamp``, so an unchanged row hashes the same on every run.
    """
    if mapped.kind != "immunization":
        raise UsageError(f"--target redox sends immunization rows; {mapped.table.path} holds {mapped.kind} rows")
    ids = _ids()
    practitioner = _practitioner(ids)
    entries = pl.concat_str(
        [
            _entry(_header(settings, ids)),
            pl.lit(","),
            _entry(_immunization(settings, ids)),
            pl.lit(","),
            _entry(_patient(settings, ids)),
            pl.when(practitioner.is_not_null()).then(pl.lit(",") + _entry(practitioner)).otherwise(pl.lit("")),
        ]
    )
    head = json_body(
        pl.struct(resourceType=pl.lit("Bundle"), id=ids["bundle"], type=pl.lit("message"), timestamp=pl.lit(timestamp))
    )
    return (
        valid.with_columns(source_keys(mapped).alias("source_key"))
        .select(
            pl.col(ROW),
            "source_key",
            ids["bundle"].alias("bundle_id"),
            entries.alias("entries"),
            head.alias("head"),
        )
        .select(
            ROW,
            "source_key",
            "bundle_id",
            pl.concat_str([pl.col("head").str.strip_suffix("}"), pl.lit(',"entry":['), "entries", pl.lit("]}")]).alias(
                "body"
            ),
            sha256_hex(pl.concat_str(["bundle_id", "entries"], separator="\x1f")).alias("body_hash"),
        )
    )


# --- FHIR validation: per bundle -----------------------------------------------------


def _fhir_path(loc: Sequence[int | str]) -> str:
    path = ""
    for part in loc:
        path += f"[{part}]" if isinstance(part, int) else (f".{part}" if path else str(part))
    return path


def check_bundle(body: str) -> tuple[str, str] | None:
    """Parse one bundle with ``fhir.resources``: None when it is valid FHIR, else (path, reason).

    ``fhir.resources`` 8 has no R4 package: its top level is R5 and ``R4B``
    is the release nearest R4 (Bundle, MessageHeader, Immunization and
    Patient are the same in both), so R4B is what a bundle must satisfy.
    """
    from fhir.resources.R4B.bundle import Bundle

    try:
        Bundle.model_validate_json(body)
    except ValidationError as exc:
        # include_input=False: the offending value may be PHI; the path and the rule are enough.
        errors = exc.errors(include_input=False, include_url=False)
        paths = [_fhir_path(e["loc"]) for e in errors]
        reason = "; ".join(f"{p}: {e['msg']}" for p, e in zip(paths, errors, strict=True))
        return paths[0], mask(reason)
    return None


def bundle_shape(body: pl.Expr) -> pl.Expr:
    """What a bundle's validity depends on, beyond the values the row checks already vouch for: its
    JSON with every non-empty string value written ``"s"`` and every run of digits from 1 to 9 as
    ``1`` (so the fields present, the array lengths, empty strings, zero and negative numbers stay)."""
    strings = body.str.replace_all(r'"(?:[^"\\]|\\.)+"([,}\]])', '"s"${1}')
    return strings.str.replace_all(r"[1-9][0-9]*", "1")


def check_bundles(bodies: pl.Series) -> pl.DataFrame:
    """The bundles of ``bodies`` that are not valid FHIR: ``index`` (their position), ``fhir_path``, ``fhir_reason``.

    Parsing a bundle with ``fhir.resources`` costs about 330 us, so one bundle of each distinct
    :func:`bundle_shape` is parsed, not every one: the bundles are built by the same expressions
    from rows already validated. When that one fails, every bundle of its shape is parsed, so a
    row is rejected only for its own bundle's fault.
    """
    frame = pl.DataFrame({"body": bodies}).with_row_index("index").with_columns(
        bundle_shape(pl.col("body")).alias("shape")
    )
    samples = frame.unique("shape", keep="first", maintain_order=True)
    broken = [shape for shape, body in samples.select("shape", "body").iter_rows() if check_bundle(body) is not None]
    suspects = frame.filter(pl.col("shape").is_in(broken)) if broken else frame.clear()
    found = [(i, *v) for i, body in suspects.select("index", "body").iter_rows()
             if (v := check_bundle(body)) is not None]
    return pl.DataFrame(found, schema={"index": pl.UInt32, "fhir_path": pl.String, "fhir_reason": pl.String},
                        orient="row")


# --- the run -----------------------------------------------------------------------


def _destination(settings: Settings) -> tuple[str, str]:
    """(destination slug, environment flag) of the ``$write`` path."""
    slug = settings.redox_destination_slug
    if slug is None:
        if settings.redox_base_url:
            raise UsageError("set CLINIK_ETL_REDOX_DESTINATION_SLUG: the Redox destination to write to")
        slug = SANDBOX_SLUG
    return slug, settings.redox_environment


def _check_redox_target(settings: Settings) -> None:
    """The Redox base URL by the one rule for targets, and Redox's production environment only with ``live``."""
    if settings.redox_base_url:
        check_target_url(settings.redox_base_url, "--redox-base-url")
    if settings.redox_environment.lower() == "production" and not settings.live:
        raise UsageError("the Redox production environment holds real patient data: pass --live to confirm")


@contextlib.contextmanager
def redox_target(settings: Settings, state_path: Path, route: str) -> Iterator[Target]:
    """The Redox target (its bearer token as the key); the embedded sandbox without ``redox_base_url``."""
    token = settings.redox_token.get_secret_value() if settings.redox_token is not None else None
    url = settings.redox_base_url
    if url:
        if not token:
            raise UsageError(f"set REDOX_API_TOKEN (or --redox-token-file) to load into {url}")
        _check_redox_target(settings)
        yield Target(url, token, f"redox:{url}{route}", url + route)
        return
    from etl.sandbox import SandboxConfig, SandboxServer
    from etl.sandbox.redox import new_redox_token

    db = state_path.with_name(state_path.stem + ".sandbox.sqlite")
    private_dir(db.parent)
    token = token or new_redox_token()
    with SandboxServer(SandboxConfig(db_path=str(db), redox_tokens=(token,))) as server:
        yield Target(server.base_url, token, f"embedded-redox-sandbox:{db.resolve()}", "embedded sandbox" + route)


class RedoxBundles(Destination):
    """Redox as the destination of the one plan (:mod:`etl.plan`): each planned immunization row
    is a message bundle (:func:`plan_bundles`), checked as FHIR (:func:`check_bundles`), sent to
    ``route``. The bundle carries its patient and performer, so no reference waits for another row."""

    name = "Redox"
    resolves_references = False
    builds_bodies = False
    can_search = False  # a send without an answer stays unknown
    has_bulk = False

    def __init__(self, settings: Settings, route: str) -> None:
        self.settings, self.write_route = settings, route
        self.stamp = dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
        self.fhir_seconds = 0.0

    def check(self, mapped: Mapped) -> None:
        if mapped.kind != "immunization":
            raise UsageError(f"--target redox sends immunization rows; {mapped.table.path} holds {mapped.kind} rows")

    def plan_batch(
        self, mapped: Mapped, valid: pl.DataFrame, planned: Planned, rows: pl.DataFrame
    ) -> tuple[pl.DataFrame, list[tuple[str, pl.DataFrame]]]:
        """The planned rows' bundles, :data:`BUNDLE_SLICE` rows at a time (a bundle is ~2 KB of text,
        and building one holds its entries twice); a row whose bundle is not FHIR is rejected."""
        live = rows.filter(pl.col("state") == "planned").select(pl.col("source_row").alias(ROW))
        failures, creates = [], []
        for start in range(0, valid.height, BUNDLE_SLICE):
            part = valid.slice(start, BUNDLE_SLICE).join(live, on=ROW, how="semi")
            if part.is_empty():
                continue
            bundles = plan_bundles(mapped, part, self.settings, self.stamp)
            t0 = time.perf_counter()
            bad = check_bundles(bundles.get_column("body"))
            self.fhir_seconds += time.perf_counter() - t0
            rows_bad = bundles.get_column(ROW).gather(bad.get_column("index"))
            failures.append(bad.drop("index").with_columns(rows_bad.alias("source_row")))
            good = bundles.filter(~pl.col(ROW).is_in(rows_bad.implode())) if bad.height else bundles
            if self.settings.dry_run and self.settings.redact:
                # payloads.ndjson shows bundles built from masked values; the real ones were checked above.
                shown = plan_bundles(mapped, masked(part), self.settings, self.stamp)
                good = good.drop("body").join(shown.select(ROW, "body"), on=ROW, how="left", maintain_order="left")
            creates.append((KIND, good.unique("source_key", keep="first", maintain_order=True).select(
                "source_key", ROW, "body", "body_hash", pl.lit(None, dtype=pl.String).alias("source_file"))))
        if failures and (bad := pl.concat(failures)).height:
            hit, invalid = pl.col("fhir_path").is_not_null(), RULES["fhir-invalid"]
            rows = (
                rows.join(bad, on="source_row", how="left", maintain_order="left")
                .with_columns(
                    pl.when(hit).then(pl.lit("rejected")).otherwise(pl.col("state")).alias("state"),
                    pl.when(hit).then(pl.lit(invalid.code)).otherwise(pl.col("error_code")).alias("error_code"),
                    pl.when(hit).then(pl.col("fhir_path")).otherwise(pl.col("field")).alias("field"),
                    pl.when(hit).then(invalid.message(reason=pl.col("fhir_reason"))).otherwise(pl.col("message"))
                    .alias("message"),
                )
                .drop("fhir_path", "fhir_reason")
            )
        return rows, creates

    def stage(self, kind: str) -> int:
        return 0  # one kind, one stage

    def route(self, kind: str) -> str:
        return self.write_route

    def requests_planned(self, counts: dict[str, int]) -> Any:
        return sum(counts.values())

    def timings(self) -> dict[str, float]:
        return {"fhir": self.fhir_seconds}

    def report_kind(self, kind: str) -> str:
        return "immunization" if kind == KIND else kind  # kept under KIND, reported as the rows' kind

    def dry_run_target(self, settings: Settings) -> str:
        return (settings.redox_base_url or "embedded sandbox") + self.write_route

    def state_path(self, settings: Settings) -> Path:
        return redox_state_path(settings)

    def open(self, settings: Settings) -> contextlib.AbstractContextManager[Target]:
        return redox_target(settings, self.state_path(settings), self.write_route)

    def opened_url(self, settings: Settings) -> str | None:
        return settings.redox_base_url

    def client(
        self, http: httpx.AsyncClient, key: str, *, on_response: OnResponse | None = None,
        protocols: Counter[str] | None = None,
    ) -> Client:
        return RedoxClient(http, key, on_response=on_response)

    def load_extra(self, loader: Loader, table: pl.DataFrame, protocols: Counter[str]) -> RunFacts:
        return RunFacts()

    def run_facts(self) -> RunFacts:
        """Every Redox run's summary names the destination and its ``$write`` route."""
        return RunFacts(destination={"type": "redox", "route": self.write_route})


def load_redox(
    paths: Sequence[str | Path], settings: Settings, *, progress: Any = None, job: str | None = None
) -> RunReport:
    """Send every valid immunization row to Redox as a message bundle (or plan it, with ``dry_run``).

    The run is the one plan (:mod:`etl.plan`), a batch at a time in bounded memory, then the
    sends a part at a time, as a ClinikAPI load (:func:`etl.send.load_in_batches`). Redox has no
    bulk endpoint (:attr:`RedoxBundles.has_bulk`): ``--mode bulk`` is refused.
    """
    from etl.progress import as_progress

    RedoxBundles.check_mode(settings)  # first: no bulk endpoint (has_bulk)
    show = as_progress(progress)
    if settings.redox_base_url:  # before anything: a dry run's report names the URL too
        check_target_url(settings.redox_base_url, "--redox-base-url")
    slug, environment = _destination(settings)
    bundles = RedoxBundles(settings, write_route(slug, environment))
    if settings.dry_run:
        return validate_in_batches(paths, settings, show, payloads=True, destination=bundles)
    return load_in_batches(paths, settings, show, destination=bundles, job=job)
