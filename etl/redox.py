"""Redox as a destination: each valid vaccine row as a FHIR R4 message bundle
for Redox's ``Immunization/$write``.

The rows come from the same read → map → validate stages as a ClinikAPI
load (:func:`etl.pipeline.prepare_files`); only the transform, the send and
the target differ::

    valid frame ─ plan_bundles ─► one Bundle (type message) per row, as JSON text:
                                  MessageHeader, Immunization, Patient
                                  (and a Practitioner when the row names a performer)
                ─ check_bundle ─► parsed with fhir.resources (R4B: the package's
                                  nearest to R4); a failure is a ``fhir-invalid``
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

import asyncio
import contextlib
import datetime as dt
import json
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import polars as pl
from pydantic import ValidationError

from etl.errors import UsageError
from etl.files import private_dir, private_text
from etl.load.client import check_target_url, http_client, mask
from etl.load.loader import Loader, LoadOptions, Result, Send
from etl.load.redox import RedoxClient
from etl.load.state import StateStore
from etl.load.throttle import Throttle
from etl.mapping import Mapped
from etl.readers import ROW
from etl.redaction import masked
from etl.report import ROW_COLUMNS, RunReport, count_states, report_folder, write_report
from etl.settings import DEFAULT_REDOX_STATE, DEFAULT_STATE, Settings
from etl.transform import json_body, obj, one_of, sha256_hex, source_keys
from schemas.codes import CVX_OID, CVX_SYSTEM, NCI_OID, ROUTE_SYSTEM, SITE_SYSTEM, displays, table

__all__ = [
    "EVENT_CODE",
    "EVENT_SYSTEM",
    "KIND",
    "check_bundle",
    "load_redox",
    "plan_bundles",
    "redox_state_path",
    "write_route",
]

#: The state-store kind of a Redox send: never confused with a ClinikAPI immunization.
KIND = "redox-immunization"
EVENT_SYSTEM = "urn:redox:event-type"
EVENT_CODE = "Immunization-New"
MVX_OID = "urn:oid:2.16.840.1.113883.12.227"
IDENTIFIER_TYPE_SYSTEM = "http://terminology.hl7.org/CodeSystem/v2-0203"
PRACTITIONER_SYSTEM = "urn:clinik-etl:practitioner"
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


def _check_all(rows: pl.DataFrame) -> pl.DataFrame:
    """Reject planned rows whose bundle is not valid FHIR, with the path in ``field`` and the reason."""
    rows = rows.with_row_index("__i")
    planned = rows.filter(pl.col("state") == "planned").select("__i", "body")
    found = [(i, *v) for i, body in planned.iter_rows() if (v := check_bundle(body)) is not None]
    bad = pl.DataFrame(found, schema={"__i": pl.UInt32, "fhir_path": pl.String, "fhir_reason": pl.String}, orient="row")
    hit = pl.col("fhir_path").is_not_null()
    return (
        rows.join(bad, on="__i", how="left")
        .with_columns(
            pl.when(hit).then(pl.lit("rejected")).otherwise(pl.col("state")).alias("state"),
            pl.when(hit).then(pl.lit("fhir-invalid")).otherwise(pl.col("error_code")).alias("error_code"),
            pl.when(hit).then(pl.col("fhir_path")).otherwise(pl.col("field")).alias("field"),
            pl.when(hit).then(pl.col("fhir_reason")).otherwise(pl.col("message")).alias("message"),
        )
        .drop("__i", "fhir_path", "fhir_reason")
    )


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
def _redox_target(settings: Settings, state_path: Path, route: str) -> Iterator[tuple[str, str, str]]:
    """(base URL, bearer token, state-store identity); the embedded sandbox without ``redox_base_url``."""
    token = settings.redox_token.get_secret_value() if settings.redox_token is not None else None
    url = settings.redox_base_url
    if url:
        if not token:
            raise UsageError(f"set REDOX_API_TOKEN (or --redox-token-file) to load into {url}")
        _check_redox_target(settings)
        yield url, token, f"redox:{url}{route}"
        return
    from etl.sandbox import SandboxConfig, SandboxServer
    from etl.sandbox.redox import new_redox_token

    db = state_path.with_name(state_path.stem + ".sandbox.sqlite")
    private_dir(db.parent)
    token = token or new_redox_token()
    with SandboxServer(SandboxConfig(db_path=str(db), redox_tokens=(token,))) as server:
        yield server.base_url, token, f"embedded-redox-sandbox:{db.resolve()}"


def load_redox(
    paths: Sequence[str | Path], settings: Settings, *, progress: Any = None, job: str | None = None
) -> RunReport:
    """Send every valid immunization row to Redox as a message bundle (or plan it, with ``dry_run``)."""
    from etl import pipeline
    from etl.load.lock import state_lock
    from etl.progress import as_progress

    show = as_progress(progress)
    run_id, timings = pipeline._new_run_id(), dict[str, float]()
    t0 = time.perf_counter()
    if settings.redox_base_url:  # before anything: a dry run's report names the URL too
        check_target_url(settings.redox_base_url, "--redox-base-url")
    slug, environment = _destination(settings)
    route = write_route(slug, environment)
    prepared = pipeline.prepare_files(paths, settings, timings, show)
    stamp = dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    t1 = time.perf_counter()
    parts, shown = [], []
    for p in prepared:
        bundles = plan_bundles(p.mapped, p.validation.valid, settings, stamp)
        parts.append(
            pipeline._base_rows(p).join(
                bundles.select(pl.col(ROW).alias("source_row"), "bundle_id", "body", "body_hash"),
                on="source_row",
                how="left",
            )
        )
        if settings.dry_run and settings.redact:  # payloads.ndjson shows bundles built from masked values
            shown.append(
                plan_bundles(p.mapped, masked(p.validation.valid), settings, stamp).select(
                    pl.lit(p.file).alias("source_file"), pl.col(ROW).alias("source_row"), "body"
                )
            )
    rows = pl.concat(parts).pipe(pipeline._dedupe_across_files)
    t2 = time.perf_counter()
    rows = _check_all(rows)
    timings["transform"] = timings.get("transform", 0.0) + t2 - t1
    timings["fhir"] = time.perf_counter() - t2
    folder = pipeline._report_dir(settings, run_id)
    extra: dict[str, Any] = {"load": True, "destination": {"type": "redox", "route": route}}
    state_path = redox_state_path(settings)
    if settings.dry_run:
        extra["requests_planned"] = _dry_run(_shown(rows, shown) if shown else rows, folder, route)
        target = (settings.redox_base_url or "embedded sandbox") + route
    else:
        with (
            state_lock(state_path, wait=settings.wait, on_wait=show.note),
            # The report folder first: one that cannot take the report stops the run before anything is sent.
            report_folder(folder),
            _redox_target(settings, state_path, route) as (base_url, token, identity),
        ):
            target = (base_url if settings.redox_base_url else "embedded sandbox") + route
            t3 = time.perf_counter()
            rows, sent = _send(rows, base_url, token, identity, state_path, route, settings, run_id, show, job)
            timings["load"] = time.perf_counter() - t3
            extra.update(sent)
    timings["total"] = time.perf_counter() - t0
    summary = pipeline._summary(run_id, prepared, rows, target, settings, timings, extra)
    report = RunReport(run_id, rows.rename({"patient_key": "patient_id"}).select(ROW_COLUMNS), summary)
    write_report(report, folder, rejects={p.file: pipeline._rejects_file(p, rows) for p in prepared})
    return report


def _shown(rows: pl.DataFrame, bodies: list[pl.DataFrame]) -> pl.DataFrame:
    """``rows`` with the bodies a redacted dry run shows (``source_file, source_row, body``) for their own."""
    shown = pl.concat(bodies).with_columns(pl.col("source_row").cast(rows.schema["source_row"]))
    return rows.drop("body").join(shown, on=["source_file", "source_row"], how="left").select(rows.columns)


def _planned(rows: pl.DataFrame) -> list[dict[str, Any]]:
    """The planned rows, one per key (rows of one file may share a content key), in input order."""
    return (
        rows.filter(pl.col("state") == "planned")
        .unique("source_key", keep="first", maintain_order=True)
        .select("source_row", "source_key", "body", "body_hash")
        .to_dicts()
    )


def _dry_run(rows: pl.DataFrame, folder: Path, route: str) -> int:
    """Write ``payloads.ndjson``: one line per bundle a load would send."""
    private_dir(folder)
    planned = _planned(rows)
    with private_text(folder / "payloads.ndjson") as fh:
        for r in planned:
            line = {
                "method": "POST",
                "path": route,
                "source_row": r["source_row"],
                "kind": KIND,
                "source_key": r["source_key"],
                "body": json.loads(r["body"]),
            }
            fh.write(json.dumps(line, ensure_ascii=False) + "\n")
    return len(planned)


def _send(
    rows: pl.DataFrame,
    base_url: str,
    token: str,
    identity: str,
    state_path: Path,
    route: str,
    settings: Settings,
    run_id: str,
    progress: Any,
    job: str | None = None,
) -> tuple[pl.DataFrame, dict[str, Any]]:
    sends = [Send(KIND, route, r["source_key"], r["body"], r["body_hash"]) for r in _planned(rows)]
    with StateStore(state_path, target=identity) as state:
        state.start_run(run_id, "run" if job else "load", job=job)
        throttle = Throttle(settings.rate)
        # No search to wait for: an unknown outcome cannot be looked up anyway.
        options = LoadOptions(
            settings.rate, settings.concurrency, consistency_window=0.0, no_answer_limit=settings.no_answer_limit
        )
        # The loader starts the KIND stage itself, with the number it really sends (not the skipped).

        async def go() -> tuple[dict[str, Result], Loader]:
            async with http_client(base_url, settings) as http:
                client = RedoxClient(http, token, on_response=throttle.observe)
                loader = Loader(client, state, throttle, options, run_id, progress=progress)
                results, _ = await loader.run([], sends)
                return results, loader

        results, loader = asyncio.run(go())
        progress.finish(KIND)
        out = _merge(rows, results)
        counts, _ = count_states(out)
        state.finish_run(run_id, {"states": counts})
    from etl.pipeline import loader_stats

    extra = loader_stats(loader)
    return out, extra


def _merge(rows: pl.DataFrame, results: dict[str, Result]) -> pl.DataFrame:
    """Each planned row takes its send's result (the ack id as ``resource_id``)."""
    table = pl.DataFrame(
        [
            {
                "source_key": k,
                "r_state": r.state,
                "r_id": r.resource_id,
                "r_status": r.http_status,
                "r_code": r.error_code,
                "r_field": r.field,
                "r_message": r.message,
            }
            for k, r in results.items()
        ],
        schema={
            "source_key": pl.String,
            "r_state": pl.String,
            "r_id": pl.String,
            "r_status": pl.Int64,
            "r_code": pl.String,
            "r_field": pl.String,
            "r_message": pl.String,
        },
    )
    planned = pl.col("state") == "planned"
    message = (
        pl.when(pl.col("r_status").is_not_null())
        .then(pl.format("HTTP {}: {}", "r_status", pl.col("r_message").fill_null("")))
        .otherwise(pl.col("r_message"))
    )
    return (
        rows.join(table, on="source_key", how="left")
        .with_columns(
            pl.when(planned).then(pl.col("r_state").fill_null("failed")).otherwise(pl.col("state")).alias("state"),
            pl.when(planned).then(pl.col("r_id")).otherwise(pl.col("resource_id")).alias("resource_id"),
            pl.when(planned).then(pl.col("r_code")).otherwise(pl.col("error_code")).alias("error_code"),
            pl.when(planned).then(pl.col("r_field")).otherwise(pl.col("field")).alias("field"),
            pl.when(planned).then(message).otherwise(pl.col("message")).alias("message"),
        )
        .select(rows.columns)
    )
