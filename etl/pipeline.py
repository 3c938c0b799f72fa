"""The pipeline: read → map → validate → transform → load → report.

:func:`validate_files` and :func:`load_files` are the library's entry points;
the CLI is a thin layer over them and a notebook can call them the same way::

    from etl import Settings, load_files
    report = load_files(["sample_data/registry.csv"], Settings(dry_run=True))
    report.summary["states"]
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import secrets
import signal
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

import polars as pl

from etl.errors import InputError, NoAnswerError, UsageError
from etl.files import private_dir, private_text, unguard_formulas, write_csv
from etl.mapping import Mapped, Profile, apply_profile, default_profile, key_field, load_profile
from etl.progress import LoadEstimate, Progress, as_progress
from etl.readers import ROW, Notice, read_table
from etl.redaction import redact, redact_bodies
from etl.report import ROW_COLUMNS, RunReport, count_states, report_folder, report_output, write_report
from etl.settings import NO_ANSWER_LIMIT, Settings
from etl.transform import Planned, plan, readable_refs, references
from etl.validate import Validation, validate
from schemas.canonical import KIND_SPECS
from schemas.limits import ROUTES

if TYPE_CHECKING:  # the loader and its HTTP client are imported when something is sent: validate needs neither
    import httpx

    from etl.load.client import ApiClient
    from etl.load.loader import Loader, LoadOptions, Result, Send
    from etl.load.state import StateStore
    from etl.load.throttle import Throttle

__all__ = ["Prepared", "load_files", "prepare_files", "validate_files"]

ProgressLike = Progress | Callable[[str, int], None]  # a Progress, or the loader's older (stage, n) callback

PATIENT_ROUTE = ROUTES["PatientCreate"]
PRACTITIONER_ROUTE = ROUTES["PractitionerCreate"]
IMMUNIZATION_ROUTE = ROUTES["ImmunizationCreate"]


@dataclass
class Prepared:
    """One input file taken through read, map, validate and transform."""

    mapped: Mapped
    validation: Validation
    planned: Planned

    @property
    def file(self) -> str:
        """The input path as given."""
        return str(self.mapped.table.path)


def _new_run_id() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ") + "-" + secrets.token_hex(3)


def run_profile(settings: Settings) -> Profile:
    """The profile a run maps its inputs with (``--profile``, narrowed by ``--kind``)."""
    profile = load_profile(settings.profile) if settings.profile else default_profile()
    if settings.kind is not None:
        if settings.kind not in KIND_SPECS:
            raise UsageError(f"unknown --kind {settings.kind!r}; kinds: {', '.join(KIND_SPECS)}")
        profile = replace(profile, kind=settings.kind)
    return profile


def prepare_files(
    paths: Sequence[str | Path], settings: Settings, timings: dict[str, float], progress: Progress | None = None
) -> list[Prepared]:
    """Read, map, validate and transform every input (no network), parents' files first."""
    profile = run_profile(settings)
    out = []
    show = progress or Progress()
    for path in paths:
        t0 = time.perf_counter()
        show.start("read")
        table = read_table(path, sheet=settings.sheet, limits=settings.workbook_limits)
        mapped = apply_profile(table, profile)
        height = mapped.frame.height
        show.advance("read", height)
        show.start("validate", height)
        t1 = time.perf_counter()
        validation = validate(mapped)
        t2 = time.perf_counter()
        show.advance("validate", height)
        show.start("transform", validation.valid.height)
        planned = plan(mapped, validation.valid)
        t3 = time.perf_counter()
        show.advance("transform", validation.valid.height)
        timings["read"] = timings.get("read", 0.0) + t1 - t0
        timings["validate"] = timings.get("validate", 0.0) + t2 - t1
        timings["transform"] = timings.get("transform", 0.0) + t3 - t2
        if settings.redact:
            redact(mapped, validation)
        out.append(Prepared(mapped, validation, planned))
    show.finish("read")
    return sorted(out, key=lambda p: KIND_SPECS[p.mapped.kind].stage)


def _quoted(value: pl.Expr, limit: int = 100) -> pl.Expr:
    """A cell's value as a message quotes it: cut to ``limit`` characters."""
    cut = value.str.slice(0, limit - 1) + pl.lit("…")
    return pl.when(value.str.len_chars() > limit).then(cut).otherwise(value).fill_null("")


def _base_rows(p: Prepared) -> pl.DataFrame:
    """Every input row of one file, with rejected ones already in their final state."""
    mapped = p.mapped
    sources = pl.DataFrame(
        {"field": list(mapped.sources), "source_field": list(mapped.sources.values())},
        schema={"field": pl.String, "source_field": pl.String},
    )
    reasons = (
        p.validation.rejects.join(sources, on="field", how="left")
        .with_columns(pl.col("source_field").fill_null(pl.col("field")).alias("column"))
        .group_by(ROW, maintain_order=True)
        .agg(
            pl.col("code").first().alias("error_code"),
            pl.col("column").first().alias("field"),
            # A cell may be megabytes long: the message quotes its start only.
            pl.format("{} {} ({}): {}", "column", "code", _quoted(pl.col("value")), "message")
            .str.join("; ")
            .alias("message"),
        )
    )
    planned = p.planned.rows.select(ROW, "source_key", pl.col("patient_key"))
    key = key_field(mapped.kind)
    return (
        mapped.frame.select(ROW, pl.col(key).str.strip_chars().alias("row_key"))
        .join(reasons, on=ROW, how="left")
        .join(planned, on=ROW, how="left")
        .select(
            pl.lit(p.file).alias("source_file"),
            pl.col(ROW).alias("source_row"),
            pl.lit(mapped.kind).alias("kind"),
            "source_key",
            pl.when(pl.col("error_code").is_not_null())
            .then(pl.lit("rejected"))
            .otherwise(pl.lit("planned"))
            .alias("state"),
            pl.lit(None, dtype=pl.String).alias("resource_id"),
            pl.col("patient_key"),
            "error_code",
            "field",
            "message",
            "row_key",
        )
    )


def _rejects_file(p: Prepared, rows: pl.DataFrame) -> pl.DataFrame:
    """The rejected rows as they were in the source, with the reasons appended."""
    return rejects_frame(p.file, p.mapped.table.frame, rows)


def rejects_frame(file: str, source: pl.DataFrame, rows: pl.DataFrame) -> pl.DataFrame:
    """The rows of ``rows`` rejected in ``file``, with their ``source`` cells and the reasons appended."""
    reasons = rows.filter((pl.col("source_file") == file) & (pl.col("state") == "rejected")).select(
        pl.col("source_row").alias(ROW), pl.col("message").alias("reasons")
    )
    columns = [c for c in source.columns if c != ROW]
    if reasons.is_empty():  # the usual batch: no join with every source row
        source = source.clear()
    return (
        source.join(reasons, on=ROW, how="inner")
        .sort(ROW)
        .select(pl.lit(file).alias("source_file"), pl.col(ROW).alias("source_row"), *columns, "reasons")
    )


def _dedupe_across_files(rows: pl.DataFrame) -> pl.DataFrame:
    """A planned key seen in an earlier file of the same run is skipped, not sent twice."""
    # Rows of one file may share a key on purpose (a document's sections, a patient on several rows).
    first = pl.col("source_file") == pl.col("source_file").first().over("kind", "source_key")
    dup = (pl.col("state") == "planned") & pl.col("source_key").is_not_null() & ~first
    where = pl.format("same record as {} row {}", pl.col("source_file").first(), pl.col("source_row").first())
    return rows.with_columns(
        pl.when(dup).then(pl.lit("skipped")).otherwise(pl.col("state")).alias("state"),
        pl.when(dup).then(where.over("kind", "source_key")).otherwise(pl.col("message")).alias("message"),
    )


def input_facts(mapped: Mapped, rows: int) -> dict[str, Any]:
    """What a summary says about one input file."""
    table = mapped.table
    return {
        "path": str(table.path),
        "sha256": table.sha256,
        "format": table.format,
        "encoding": table.encoding,
        "delimiter": table.delimiter,
        "sheet": table.sheet,
        "kind": mapped.kind,
        "profile": mapped.profile.name,
        "rows": rows,
        "columns_mapped": mapped.sources,
    }


def notice_facts(mapped: Mapped) -> list[dict[str, Any]]:
    """A file's reader and mapping notices, as a summary lists them."""
    return [{"file": n.file, "code": n.code, "message": n.message} for n in mapped.table.notices]


def warning_facts(file: str, warnings: pl.DataFrame) -> list[dict[str, Any]]:
    """Row warnings grouped by code: the first 20 rows and the count."""
    return [
        {"file": file, "code": str(code), "rows": frame.get_column(ROW).to_list()[:20], "count": frame.height}
        for (code,), frame in warnings.group_by("code", maintain_order=True)
    ]


def summary_of(
    run_id: str,
    *,
    command: str,
    inputs: list[dict[str, Any]],
    warnings: list[dict[str, Any]],
    counts: pl.DataFrame,
    target: str,
    settings: Settings,
    timings: dict[str, float],
    extra: dict[str, Any],
) -> dict[str, Any]:
    """A run's ``summary.json``; ``counts`` holds ``kind, state, len`` of the report's rows."""
    states, per_kind = count_states(counts)
    return {
        "run_id": run_id,
        "command": command,
        "dry_run": settings.dry_run,
        "target": target,
        "inputs": inputs,
        "rows_total": sum(states.values()),
        "states": states,
        "kinds": per_kind,
        "warnings": warnings,
        "timings": {k: round(v, 4) for k, v in timings.items()},
        **{k: v for k, v in extra.items() if k != "load"},
    }


def _summary(
    run_id: str,
    prepared: list[Prepared],
    rows: pl.DataFrame,
    target: str,
    settings: Settings,
    timings: dict[str, float],
    extra: dict[str, Any],
) -> dict[str, Any]:
    warnings = [w for p in prepared for w in notice_facts(p.mapped)]
    warnings += [w for p in prepared for w in warning_facts(p.file, p.validation.warnings)]
    return summary_of(
        run_id,
        command="load" if extra.get("load") else "validate",
        inputs=[input_facts(p.mapped, p.mapped.frame.height) for p in prepared],
        warnings=warnings,
        counts=rows.group_by("kind", "state").len(),
        target=target,
        settings=settings,
        timings=timings,
        extra=extra,
    )


def _report_dir(settings: Settings, run_id: str) -> Path:
    # "{run_id}" lets a scheduled job give each run its own folder under one root.
    if settings.report_dir is None:
        return Path("reports") / run_id
    return Path(str(settings.report_dir).replace("{run_id}", run_id))


def validate_files(
    paths: Sequence[str | Path], settings: Settings | None = None, *, progress: ProgressLike | None = None
) -> RunReport:
    """Validate inputs without sending anything; write the report.

    Inputs are read and checked a batch of ``settings.batch_rows`` rows at a time (``etl.batches``),
    so a file of any size is validated in bounded memory; the report is the one a whole-file
    validation writes (:func:`validate_whole`).
    """
    from etl.batches import validate_in_batches

    return validate_in_batches(paths, settings or Settings(), as_progress(progress))


def validate_whole(
    paths: Sequence[str | Path], settings: Settings | None = None, *, progress: ProgressLike | None = None
) -> RunReport:
    """Validate inputs held whole in memory (the reference :func:`validate_files` is checked against)."""
    settings = settings or Settings()
    run_id, timings = _new_run_id(), dict[str, float]()
    t0 = time.perf_counter()
    prepared = prepare_files(paths, settings, timings, as_progress(progress))
    rows = pl.concat([_base_rows(p) for p in prepared]).pipe(_dedupe_across_files)
    rows = _resolve_references(prepared, rows, read_crosswalk(settings.crosswalk), None, None)
    timings["total"] = time.perf_counter() - t0
    report = RunReport(
        run_id,
        rows.rename({"patient_key": "patient_id"}).select(ROW_COLUMNS),
        _summary(run_id, prepared, rows, "none (validate)", settings, timings, {}),
    )
    write_report(report, _report_dir(settings, run_id), rejects={p.file: _rejects_file(p, rows) for p in prepared})
    return report


def _sandbox_db(settings: Settings) -> Path:
    return settings.state.with_name(settings.state.stem + ".sandbox.sqlite")


def _identity(settings: Settings) -> str:
    """What a state store is bound to: the base URL, or the embedded sandbox's database."""
    return settings.base_url or f"embedded-sandbox:{_sandbox_db(settings).resolve()}"


@contextlib.contextmanager
def _existing_state(settings: Settings) -> Iterator[StateStore | None]:
    """The state store, read for what is already loaded, only if it exists (a dry run creates nothing)."""
    from etl.load.state import StateStore

    if not settings.state.is_file():
        yield None
        return
    with StateStore(settings.state, target=_identity(settings)) as state:
        yield state


@contextlib.contextmanager
def _target(settings: Settings) -> Iterator[tuple[str, str, str]]:
    """(base URL, API key, state-store identity) of the run's target; the embedded sandbox if none."""
    from etl.load.client import check_target

    if settings.base_url:
        if settings.api_key is None:
            raise UsageError("set CLINIKAPI_SECRET_KEY (or --api-key-file) to load into " + settings.base_url)
        key = settings.api_key.get_secret_value()
        check_target(settings.base_url, key, live=settings.live)
        yield settings.base_url, key, settings.base_url
        return
    from etl.sandbox import SandboxConfig, SandboxServer

    db = _sandbox_db(settings)
    private_dir(db.parent)
    with SandboxServer(SandboxConfig(db_path=str(db))) as server:
        yield server.base_url, server.api_key, _identity(settings)


def load_files(
    paths: Sequence[str | Path],
    settings: Settings | None = None,
    *,
    progress: ProgressLike | None = None,
    job: str | None = None,
) -> RunReport:
    """Import inputs into the target (or plan it, with ``dry_run``); write the report.

    ``job``: the name of the job file this load runs for; the state store's history records the
    run as that job's ``run`` from its start, so even a run killed outright is told apart.
    """
    from etl.load.lock import state_lock

    settings = settings or Settings()
    if settings.target == "clinikapi" and settings.base_url:
        from etl.load.client import check_target_url

        check_target_url(settings.base_url)  # before anything: a dry run's report names the URL too
    if settings.target == "redox":
        from etl.redox import load_redox  # FHIR message bundles to Redox's Immunization/$write

        return load_redox(paths, settings, progress=progress, job=job)
    progress = as_progress(progress)
    if settings.dry_run and settings.stream is not False:
        # The plan is made a batch at a time in bounded memory, like validate (the report and
        # payloads.ndjson are the ones a whole-file plan writes); the state store, if any, explains
        # references to what earlier runs created.
        from etl.batches import validate_in_batches

        with _existing_state(settings) as state:
            return validate_in_batches(paths, settings, progress, payloads=True, state=state)
    from etl.streaming import load_in_batches, streams

    if streams(paths, settings):
        return load_in_batches(paths, settings, progress, job=job)
    run_id, timings = _new_run_id(), dict[str, float]()
    t0 = time.perf_counter()
    prepared = prepare_files(paths, settings, timings, progress)
    rows = pl.concat([_base_rows(p) for p in prepared]).pipe(_dedupe_across_files)
    folder = _report_dir(settings, run_id)
    extra: dict[str, Any] = {"load": True}
    if settings.dry_run:
        with _existing_state(settings) as state:
            rows = _resolve_references(prepared, rows, read_crosswalk(settings.crosswalk), state, None)
        extra["requests_planned"] = _dry_run(prepared, rows, folder, redacted=settings.redact)
        target = settings.base_url or "embedded sandbox"
    else:
        # One load per state store at a time: two would both send what neither has recorded yet.
        # The report folder first: one that cannot take the report stops the run before anything is sent.
        with state_lock(settings.state, wait=settings.wait, on_wait=progress.note), report_folder(folder), _target(
            settings
        ) as (base_url, key, identity):
            target = base_url if settings.base_url else "embedded sandbox"
            rows, load_extra = _load(
                prepared, rows, base_url, key, identity, settings, run_id, progress, timings, job
            )
            extra.update(load_extra)
    timings["total"] = time.perf_counter() - t0
    crosswalk = extra.pop("_crosswalk", None)
    disappeared = extra.pop("_disappeared", None)
    summary = _summary(run_id, prepared, rows, target, settings, timings, extra)
    report = RunReport(run_id, rows.rename({"patient_key": "patient_id"}).select(ROW_COLUMNS), summary)
    write_report(report, folder, rejects={p.file: _rejects_file(p, rows) for p in prepared})
    if crosswalk is not None:
        write_csv(crosswalk.sort("kind", "source_key"), folder / "crosswalk.csv")
    if disappeared is not None and disappeared.height:
        write_csv(disappeared, folder / "disappeared.csv")
    return report


def _sends(prepared: list[Prepared], rows: pl.DataFrame) -> list[list[Send]]:
    """The creates to make, by stage, one per (kind, key), in input order."""
    from etl.load.loader import Send

    live = rows.filter(pl.col("state") == "planned").select("kind", "source_key").unique()
    live_keys = {(k, v) for k, v in live.iter_rows()}
    stages: dict[int, dict[tuple[str, str], Send]] = {}
    for p in prepared:
        kind = p.mapped.kind
        route = ROUTES[KIND_SPECS[kind].schema]
        stage = stages.setdefault(KIND_SPECS[kind].stage, {})
        name = Path(p.file).name
        for r in p.planned.rows.filter(pl.col("body").is_not_null()).iter_rows(named=True):
            if (kind, r["source_key"]) in live_keys:
                send = Send(kind, route, r["source_key"], r["body"], r["body_hash"], source_file=name)
                stage.setdefault((kind, r["source_key"]), send)
        patient_stage = stages.setdefault(KIND_SPECS["patient"].stage, {})
        for r in p.planned.patients.iter_rows(named=True):
            patient_stage.setdefault(("patient", r["patient_key"]), Send("patient", PATIENT_ROUTE, r["patient_key"],
                                                                          r["body"], r["body_hash"]))
        for r in p.planned.practitioners.iter_rows(named=True):
            key = r["practitioner_key"]
            patient_stage.setdefault(("practitioner", key), Send("practitioner", PRACTITIONER_ROUTE, key, r["body"],
                                                                 r["body_hash"]))
    return [list(stages[k].values()) for k in sorted(stages)]


def _aliases(prepared: list[Prepared]) -> dict[tuple[str, str], str]:
    return {
        (p.mapped.kind, a): k for p in prepared for a, k in p.planned.aliases.iter_rows() if a != k
    }


def read_crosswalk(path: Path | None) -> dict[tuple[str, str], str]:
    """A crosswalk file: ``kind, source_id, clinikapi_id`` per line (CSV with a header).

    A run's own ``crosswalk.csv`` (``kind, source_key, resource_id``) is read too. Either way the
    ``'`` the tool puts before a formula character (:func:`etl.files.guard_formulas`) is taken off.
    """
    if path is None:
        return {}
    table = read_table(path)
    frame = unguard_formulas(table.frame)
    if {"kind", "source_key", "resource_id"} <= set(frame.columns) and "source_id" not in frame.columns:
        frame = frame.rename({"source_key": "source_id", "resource_id": "clinikapi_id"})
    wanted = {"kind", "source_id", "clinikapi_id"}
    if not wanted <= set(frame.columns):
        raise InputError(str(path), f"a crosswalk needs the columns {', '.join(sorted(wanted))}", row=1)
    bad = frame.filter(~pl.col("kind").is_in(list(KIND_SPECS)))
    if bad.height:
        raise InputError(str(path), f"unknown kind {bad['kind'][0]!r}", row=int(bad[ROW][0]), column="kind")
    return {(k, s): c for k, s, c in frame.select("kind", "source_id", "clinikapi_id").drop_nulls().iter_rows()}


def _resolve_references(
    prepared: list[Prepared],
    rows: pl.DataFrame,
    known: dict[tuple[str, str], str],
    state: StateStore | None,
    exists: Callable[[str, str], bool] | None,
) -> pl.DataFrame:
    """Reject rows whose references cannot be resolved, stage by stage, parents before children.

    A reference resolves to a row planned in this run, a resource an earlier run created (the state
    store), the user's crosswalk, or (in a real run) an existing ClinikAPI id. ``known`` gains the
    ids found outside the run. Membership is decided by joins; only the references nothing in the
    run explains are looked up, once per distinct value.
    """
    pair = {"kind": pl.String, "key": pl.String}
    aliases = pl.DataFrame([{"kind": k, "value": r, "alias": key} for (k, r), key in _aliases(prepared).items()],
                           schema={"kind": pl.String, "value": pl.String, "alias": pl.String})
    for stage in sorted({KIND_SPECS[p.mapped.kind].stage for p in prepared}):
        planned = rows.filter(pl.col("state") == "planned")
        derived = [pl.DataFrame({"kind": "practitioner", "key": p.planned.practitioners["practitioner_key"]},
                                schema=pair) for p in prepared]
        # A file's derived patients exist when any of its rows is still planned.
        derived += [pl.DataFrame({"kind": "patient", "key": p.planned.patients["patient_key"]}, schema=pair)
                    for p in prepared if planned.filter(pl.col("source_file") == p.file).height]
        available = pl.concat([planned.select("kind", pl.col("source_key").alias("key")), *derived]).unique()
        rejected = rows.filter(pl.col("state") == "rejected").select("kind", pl.col("row_key").alias("key"))
        known_frame = pl.DataFrame([{"kind": k, "key": v} for k, v in known], schema=pair)
        parts = []
        for p in prepared:
            if KIND_SPECS[p.mapped.kind].stage != stage:
                continue
            live = planned.filter(pl.col("source_file") == p.file).select(pl.col("source_row").alias(ROW))
            parts.append(
                references(p.mapped, p.validation.valid)
                .join(live, on=ROW, how="semi")
                .with_columns(
                    pl.lit(p.file).alias("source_file"),
                    pl.col("field").replace_strict(p.mapped.sources, default=pl.col("field")).alias("column"),
                )
            )
        if not parts:
            continue
        refs = (
            pl.concat(parts)
            .join(aliases, on=["kind", "value"], how="left")
            .with_columns(pl.coalesce("alias", "value").alias("key"))
            .join(available, on=["kind", "key"], how="anti")
            .join(known_frame.rename({"key": "value"}), on=["kind", "value"], how="anti")
        )
        if state is not None and refs.height:
            refs = refs.join(created_in_store(state, refs), on=["kind", "key"], how="anti")
        is_rejected = pl.concat([refs.join(rejected, on=["kind", "key"], how="semi"),
                                 refs.join(rejected.rename({"key": "value"}), on=["kind", "value"], how="semi")])
        rest = refs.join(is_rejected.select(ROW, "source_file", "field").unique(), on=[ROW, "source_file", "field"],
                         how="anti")
        if exists is not None:
            for kind, value in rest.select("kind", "value").unique().iter_rows():
                if exists(kind, value):
                    known[(kind, value)] = value
            found = pl.DataFrame([{"kind": k, "key": v} for k, v in known], schema=pair).rename({"key": "value"})
            rest = rest.join(found, on=["kind", "value"], how="anti")
        failures = pl.concat([
            is_rejected.with_columns(
                pl.lit("parent-rejected").alias("code"),
                pl.format("{} ({}): the {} row it names was rejected", "column", "value", "kind").alias("message"),
            ),
            rest.with_columns(
                pl.lit("unresolved-reference").alias("code"),
                pl.format("{} ({}): no {} with this id in the inputs, the crosswalk or the target",
                          "column", "value", "kind").alias("message"),
            ),
        ])
        if failures.height:
            first = (
                failures.sort("source_file", ROW, "field", "code", maintain_order=True)
                .group_by("source_file", ROW, maintain_order=True)
                .first()
                .select("source_file", pl.col(ROW).alias("source_row"), "code",
                        pl.col("column").alias("field_ref"), pl.col("message").alias("message_ref"))
            )
            rows = (
                rows.join(first, on=["source_file", "source_row"], how="left")
                .with_columns(
                    pl.when(pl.col("code").is_not_null()).then(pl.lit("rejected")).otherwise(pl.col("state"))
                    .alias("state"),
                    pl.coalesce("code", "error_code").alias("error_code"),
                    pl.coalesce("field_ref", "field").alias("field"),
                    pl.coalesce("message_ref", "message").alias("message"),
                )
                .drop("code", "field_ref", "message_ref")
            )
            rows = _reject_document_siblings(rows)
    return rows


def _reject_document_siblings(rows: pl.DataFrame) -> pl.DataFrame:
    """A document is one create: when one of its rows is rejected, so are the others."""
    doc = pl.col("kind") == "document"
    bad = rows.filter(doc & (pl.col("state") == "rejected")).select("source_file", "row_key").unique()
    sibling = rows.join(bad.with_columns(pl.lit(True).alias("__bad")), on=["source_file", "row_key"], how="left")
    hit = doc & pl.col("__bad").fill_null(False) & (pl.col("state") == "planned")
    return sibling.with_columns(
        pl.when(hit).then(pl.lit("rejected")).otherwise(pl.col("state")).alias("state"),
        pl.when(hit).then(pl.lit("document-rejected")).otherwise(pl.col("error_code")).alias("error_code"),
        pl.when(hit).then(pl.lit("another row of this document is rejected")).otherwise(pl.col("message"))
        .alias("message"),
    ).drop("__bad")


@contextlib.contextmanager
def _stop_on_signals(loader: Loader) -> Iterator[None]:
    """SIGINT/SIGTERM stop taking new rows; what is in flight finishes and is recorded."""
    loop = asyncio.get_running_loop()
    signals = (signal.SIGINT, signal.SIGTERM)
    installed = []
    for sig in signals:
        try:
            loop.add_signal_handler(sig, loader.stop)
            installed.append(sig)
        except (NotImplementedError, RuntimeError, ValueError):  # not the main thread, or no signals here
            pass
    try:
        yield
    finally:
        for sig in installed:
            loop.remove_signal_handler(sig)


def _dry_run(prepared: list[Prepared], rows: pl.DataFrame, folder: Path, *, redacted: bool = False) -> dict[str, int]:
    """Write ``payloads.ndjson`` (one line per request a load would send; with ``redacted``, bodies redacted)."""
    private_dir(folder)
    if redacted:
        body = redact_bodies(pl.col("body"))
        prepared = [
            replace(p, planned=replace(
                p.planned,
                rows=p.planned.rows.with_columns(body),
                patients=p.planned.patients.with_columns(body),
                practitioners=p.planned.practitioners.with_columns(body),
            ))
            for p in prepared
        ]
    first_row: dict[tuple[str, str], int] = {}
    for p in prepared:
        for key, row in p.planned.rows.select("source_key", ROW).iter_rows():
            first_row.setdefault((p.mapped.kind, key), row)
        for key, row in p.planned.patients.select("patient_key", ROW).iter_rows():
            first_row.setdefault(("patient", key), row)
        for key, row in p.planned.practitioners.select("practitioner_key", ROW).iter_rows():
            first_row.setdefault(("practitioner", key), row)
    counts: dict[str, int] = {}
    with private_text(folder / "payloads.ndjson") as fh:
        for stage in _sends(prepared, rows):
            for s in stage:
                fh.write(payload_line(s.kind, s.source_key, first_row[(s.kind, s.source_key)], s.body))
                counts[s.kind] = counts.get(s.kind, 0) + 1
    return counts


def payload_line(kind: str, source_key: str, source_row: int, body: str) -> str:
    """One line of ``payloads.ndjson``: the request a load would send for a planned create."""
    head = json.dumps(
        {"method": "POST", "path": ROUTES[KIND_SPECS[kind].schema], "source_row": source_row, "kind": kind,
         "source_key": source_key},
        ensure_ascii=False,
    )
    # The body is JSON already: spliced in, not parsed and re-encoded (that was ~40% of a dry run).
    return f'{head[:-1]}, "body": {readable_refs(body)}}}\n'


def _load(
    prepared: list[Prepared],
    rows: pl.DataFrame,
    base_url: str,
    key: str,
    identity: str,
    settings: Settings,
    run_id: str,
    progress: Progress,
    timings: dict[str, float],
    job: str | None = None,
) -> tuple[pl.DataFrame, dict[str, Any]]:
    from etl.load.client import ApiClient, http_client
    from etl.load.loader import LoadOptions
    from etl.load.state import StateStore
    from etl.load.throttle import Throttle

    t0 = time.perf_counter()
    known = read_crosswalk(settings.crosswalk)
    with StateStore(settings.state, target=identity) as state:
        state.start_run(run_id, "run" if job else "load", job=job)
        throttle = Throttle(settings.rate)
        estimate = LoadEstimate(progress, settings.rate)
        progress.pace(lambda: throttle.rate)
        window = settings.consistency_window if settings.base_url else 0.0
        options = LoadOptions(settings.rate, settings.concurrency, window, update=settings.update,
                              no_answer_limit=settings.no_answer_limit)

        protocols: Counter[str] = Counter()

        async def go() -> tuple[pl.DataFrame, dict[tuple[str, str], Result], Loader]:
            async with http_client(base_url, settings) as http:
                client = ApiClient(http, key, on_response=estimate.chain(throttle.observe))
                client.protocols = protocols

                pending: list[tuple[str, str]] = []
                checked: dict[tuple[str, str], bool] = {}

                def exists(kind: str, value: str) -> bool:
                    if (kind, value) not in checked:
                        pending.append((kind, value))
                        checked[(kind, value)] = False
                    return checked[(kind, value)]

                # First pass finds the references nothing in the run explains; look those up, then decide.
                _resolve_references(prepared, rows, dict(known), state, exists)
                for kind, value in pending:
                    checked[(kind, value)] = await target_has(
                        client, kind, value, no_answer_limit=settings.no_answer_limit
                    )
                resolved = _resolve_references(prepared, rows, known, state, lambda k, v: checked.get((k, v), False))
                stages = _sends(prepared, resolved)
                unsent = _unsent(state, stages)
                estimate.plan(unsent)
                loader = await _loader(settings, http, key, client, state, throttle, options, run_id, progress, unsent)
                with _stop_on_signals(loader):
                    results = await loader.run_stages(stages, aliases=_aliases(prepared), known_ids=known)
                return resolved, results, loader

        rows, results, loader = asyncio.run(go())
        timings["load"] = time.perf_counter() - t0
        table = results_table(results)
        out = with_outcomes(rows, table, outcome_patients(table))
        extra = load_extra(loader, table, protocols)
        disappeared = _disappeared(prepared, rows, state)
        extra["_disappeared"] = disappeared
        extra["disappeared"] = disappeared.height
        counts, _ = count_states(out)
        state.finish_run(run_id, {"states": counts})
    return out, extra


async def target_has(client: ApiClient, kind: str, value: str, *, no_answer_limit: int = NO_ANSWER_LIMIT) -> bool:
    """Whether the target holds a ``kind`` with this ClinikAPI id (a reference nothing in the run explains).

    These lookups come before any create: once ``no_answer_limit`` requests in a row got no answer at all,
    :class:`~etl.errors.NoAnswerError` ends the run (nothing was sent) rather than wait on a silent target
    for every reference.
    """
    from etl.errors import LookupFailed

    route = ROUTES[KIND_SPECS[kind].schema]
    try:
        return await client.get(f"{route}/{quote(value, safe='')}") is not None
    except LookupFailed:
        if client.silent >= no_answer_limit:
            raise NoAnswerError(
                f"the target did not answer {client.silent} requests in a row (timeouts, connections lost or "
                "refused) while looking up references; nothing was sent"
            ) from None
        return False


_RESULTS = {"kind": pl.String, "source_key": pl.String, "r_state": pl.String, "r_id": pl.String,
            "r_status": pl.Int64, "r_code": pl.String, "r_field": pl.String, "r_message": pl.String}


def results_table(results: dict[tuple[str, str], Result]) -> pl.DataFrame:
    """The loader's results, a line per (kind, source_key)."""
    return pl.DataFrame(
        [(k, sk, r.state, r.resource_id, r.http_status, r.error_code, r.field, r.message)
         for (k, sk), r in results.items()],
        schema=_RESULTS,
        orient="row",
    )


def outcome_patients(table: pl.DataFrame) -> pl.DataFrame:
    """The ClinikAPI id of each patient key the load created or found."""
    return table.filter(pl.col("kind") == "patient").select(
        pl.col("source_key").alias("patient_key"), pl.col("r_id").alias("patient_id")
    )


def with_outcomes(rows: pl.DataFrame, table: pl.DataFrame, patients: pl.DataFrame) -> pl.DataFrame:
    """Report rows with the load's outcomes: a planned row takes its create's (failed when it has none)."""
    planned = pl.col("state") == "planned"
    return (
        rows.join(table, on=["kind", "source_key"], how="left", maintain_order="left")
        .join(patients, on="patient_key", how="left", maintain_order="left")
        .with_columns(
            pl.when(planned).then(pl.col("r_state").fill_null("failed")).otherwise(pl.col("state")).alias("state"),
            pl.when(planned).then(pl.col("r_id")).otherwise(pl.col("resource_id")).alias("resource_id"),
            pl.when(planned).then(pl.col("r_code")).otherwise(pl.col("error_code")).alias("error_code"),
            pl.when(planned).then(pl.col("r_field")).otherwise(pl.col("field")).alias("field"),
            pl.when(planned)
            .then(
                pl.when(pl.col("r_status").is_not_null() & (pl.col("r_state") != "created"))
                .then(pl.format("HTTP {}: {}", "r_status", pl.col("r_message").fill_null("")))
                .otherwise(pl.col("r_message"))
            )
            .otherwise(pl.col("message"))
            .alias("message"),
            pl.coalesce("patient_id", "patient_key").alias("patient_key"),
        )
        .select(rows.columns)
    )


def load_extra(loader: Loader, table: pl.DataFrame, protocols: Counter[str]) -> dict[str, Any]:
    """What a load adds to the summary (``_crosswalk``: the ids it learnt, for crosswalk.csv)."""
    per_kind: dict[str, dict[str, int]] = {}
    for kind, state, n in table.group_by("kind", "r_state", maintain_order=True).len().iter_rows():
        per_kind.setdefault(kind, {})[state] = n
    crosswalk = table.filter(pl.col("r_id").is_not_null()).select(
        "kind", "source_key", pl.col("r_id").alias("resource_id")
    )
    return {
        "patients": per_kind.get("patient", {}),
        "resources": per_kind,
        **loader_stats(loader),
        "http_versions": dict(protocols),
        "creates_sent": loader.stats.creates,
        "interrupted": loader.stopping,
        **_bulk_extra(loader),
        "_crosswalk": crosswalk,
    }


def loader_stats(loader: Loader) -> dict[str, Any]:
    """What any load's summary says of its sending: requests, 429s, the rate achieved, an abort."""
    return {
        "requests": loader.stats.requests,
        "responses_429": loader.stats.retries_429,
        "achieved_rate": round(loader.stats.requests / loader.stats.send_seconds, 2)
        if loader.stats.send_seconds
        else None,
        "aborted": str(loader.aborted) if loader.aborted else None,
        "unresponsive": loader.unresponsive,  # the run stopped: the target answered nothing for too long
    }


async def _loader(
    settings: Settings, http: httpx.AsyncClient, key: str, client: ApiClient, state: StateStore, throttle: Throttle,
    options: LoadOptions, run_id: str, progress: Progress, unsent: int,
) -> Loader:
    """A per-request loader, or a bulk one (``--mode bulk``, or ``auto`` when the window cannot hold the plan)."""
    from etl.load.bulk import BulkClient, BulkLoader, BulkOptions, choose_mode, remaining_requests
    from etl.load.loader import Loader

    remaining = await remaining_requests(http, key) if settings.mode == "auto" else None
    if choose_mode(settings.mode, unsent, remaining) == "request":
        return Loader(client, state, throttle, options, run_id, progress=progress)
    if settings.mode == "auto":
        progress.note(f"{unsent} creates planned, {remaining} requests left in the window: bulk mode")
    bulk = BulkClient(http, key, on_response=throttle.observe)
    return BulkLoader(client, bulk, state, throttle, options, run_id, progress=progress,
                      bulk_options=BulkOptions(operations_per_hour=settings.bulk_per_hour))


def _bulk_extra(loader: Loader) -> dict[str, Any]:
    """The summary's ``mode`` (and, in bulk mode, its jobs and any hourly-limit stop)."""
    jobs = getattr(loader, "jobs", None)
    if jobs is None:
        return {"mode": "request"}
    return {"mode": "bulk", "bulk_jobs": list(jobs), "bulk_limit": getattr(loader, "limit_note", None)}


def _disappeared(prepared: list[Prepared], rows: pl.DataFrame, state: StateStore) -> pl.DataFrame:
    """Rows an earlier run created from a file of the same name that this copy no longer has (never deleted)."""
    found = (
        disappeared_from(state, p.file, p.mapped.kind, rows.lazy().filter(pl.col("source_file") == p.file))
        for p in prepared
    )
    return pl.concat([pl.DataFrame(schema=GONE), *found])


GONE = {"source_file": pl.String, "kind": pl.String, "source_key": pl.String, "resource_id": pl.String}


def disappeared_from(state: StateStore, file: str, kind: str, rows: pl.LazyFrame) -> pl.DataFrame:
    """What an earlier run created from a file named as ``file`` that its report ``rows`` (``row_key``,
    ``source_key``) no longer hold; the state store is read a part at a time (a first load's own
    creates are there too: millions)."""
    name = Path(file).name
    gone = [pl.DataFrame(schema=GONE)]
    present: pl.DataFrame | None = None
    for part in state.created_from(kind, name):
        if present is None:
            present = (
                rows.select(pl.concat_list("row_key", "source_key").alias("source_key"))
                .explode("source_key")
                .drop_nulls()
                .unique()
                .collect()
            )
        earlier = pl.DataFrame(part, schema={"source_key": pl.String, "resource_id": pl.String}, orient="row")
        gone.append(
            earlier.join(present, on="source_key", how="anti", maintain_order="left").select(
                pl.lit(name).alias("source_file"), pl.lit(kind).alias("kind"), "source_key", "resource_id"
            )
        )
    return pl.concat(gone)


def unsent_count(state: StateStore, kind: str, keys: list[str]) -> int:
    """How many of a kind's keys the state store does not hold as created (a load will send them)."""
    stored = state.get(kind, keys)
    return sum(1 for k in keys if k not in stored or stored[k].state != "created")


def _unsent(state: StateStore, stages: Sequence[Sequence[Send]]) -> int:
    """About how many creates a load will send: those the state store does not hold as created."""
    keys: dict[str, list[str]] = {}
    for stage in stages:
        for send in stage:
            keys.setdefault(send.kind, []).append(send.source_key)
    return sum(unsent_count(state, kind, wanted) for kind, wanted in keys.items())


def created_in_store(state: StateStore, refs: pl.DataFrame) -> pl.DataFrame:
    """The (kind, key) pairs of ``refs`` that an earlier run created, by the state store."""
    found: list[tuple[str, str]] = []
    for (kind,), mine in refs.group_by("kind"):
        wanted = mine.get_column("key").drop_nulls().unique().to_list()
        found += [(str(kind), k) for k, rec in state.get(str(kind), wanted).items() if rec.state == "created"]
    return pl.DataFrame(found, schema={"kind": pl.String, "key": pl.String}, orient="row")


def reconcile_state(settings: Settings, *, verify: bool = False) -> RunReport:
    """Resolve every row a state store holds in doubt; with ``verify``, read back every created id.

    Writes ``summary.json`` and ``reconcile.csv`` (kind, source_key, before, state, resource_id,
    message) to the report folder.
    """
    from etl.errors import LookupFailed
    from etl.load.client import ApiClient, http_client
    from etl.load.loader import Loader, LoadOptions, Send
    from etl.load.state import StateStore
    from etl.load.throttle import Throttle

    run_id = _new_run_id()
    bound = StateStore.existing(settings.state)
    target = bound.target
    bound.close()
    folder = private_dir(_report_dir(settings, run_id))  # refused now, not after settling, if it cannot be used
    if target.startswith("embedded-sandbox:"):
        if settings.base_url:
            raise UsageError(f"{settings.state} records loads into the embedded sandbox, not {settings.base_url}")
    elif not settings.base_url:
        settings = settings.model_copy(update={"base_url": target})
    rows: list[dict[str, Any]] = []
    extra: dict[str, Any] = {}
    # The report folder first: one that cannot take the report stops the run before anything is sent.
    with report_folder(folder), _target(settings) as (base_url, key, _), StateStore(
        settings.state, target=target
    ) as state:
        state.start_run(run_id, "reconcile")
        items: list[Send] = []
        for kind in state.kinds():
            if kind not in KIND_SPECS:
                continue  # Redox has no search: its unknowns stay unknown
            doubtful = state.in_state(kind, "pending", "unknown")
            bodies = state.bodies(kind, [r.source_key for r in doubtful])
            route = ROUTES[KIND_SPECS[kind].schema]
            for rec in doubtful:
                if rec.source_key in bodies:
                    items.append(Send(kind, route, rec.source_key, bodies[rec.source_key], rec.body_hash or ""))
                else:
                    rows.append({"kind": kind, "source_key": rec.source_key, "before": rec.state, "state": "unknown",
                                 "resource_id": None, "message": "no body kept for it: re-run the load instead"})
        without_body = len(rows)
        before = {(i.kind, i.source_key): state.get(i.kind, [i.source_key])[i.source_key].state for i in items}
        window = settings.consistency_window if settings.base_url else 0.0

        async def go() -> tuple[dict[tuple[str, str], Result], dict[str, int], str | None]:
            async with http_client(base_url, settings) as http:
                throttle = Throttle(settings.rate)
                client = ApiClient(http, key, on_response=throttle.observe)
                options = LoadOptions(settings.rate, settings.concurrency, window,
                                      no_answer_limit=settings.no_answer_limit)
                loader = Loader(client, state, throttle, options, run_id)
                results = await loader.reconcile(items)
                checked: dict[str, int] = {}
                if verify:
                    for kind in state.kinds():
                        if kind not in KIND_SPECS:
                            continue
                        route = ROUTES[KIND_SPECS[kind].schema]
                        for rec in state.in_state(kind, "created"):
                            found = None
                            if client.silent < settings.no_answer_limit:  # a silent target is asked no more
                                with contextlib.suppress(LookupFailed):
                                    found = await client.get(f"{route}/{quote(rec.resource_id or '', safe='')}")
                            if client.silent >= settings.no_answer_limit:
                                checked["unchecked"] = checked.get("unchecked", 0) + 1
                                continue
                            state_name = "confirmed" if found is not None else "missing"
                            checked[state_name] = checked.get(state_name, 0) + 1
                            if found is None:
                                rows.append({"kind": kind, "source_key": rec.source_key, "before": "created",
                                             "state": "missing", "resource_id": rec.resource_id,
                                             "message": "recorded as created, but the target does not have it"})
                why = loader.unresponsive
                if why is None and checked.get("unchecked"):
                    why = (f"no answer to {client.silent} requests in a row (timeouts, connections lost or "
                           "refused): verification stopped")
                return results, checked, why

        results, checked, unresponsive = asyncio.run(go())
        for (kind, key), result in results.items():
            rows.append({"kind": kind, "source_key": key, "before": before[(kind, key)],
                         "state": "created" if result.state == "skipped" else result.state,
                         "resource_id": result.resource_id, "message": result.message})
        counts: dict[str, int] = {}
        for row in rows:
            counts[row["state"]] = counts.get(row["state"], 0) + 1
        in_doubt = len(items) + without_body
        extra = {"run_id": run_id, "command": "reconcile", "target": target, "in_doubt": in_doubt,
                 "states": counts, "verified": checked if verify else None, "unresponsive": unresponsive}
        state.finish_run(run_id, {"states": counts})
    frame = pl.DataFrame(rows, schema={"kind": pl.String, "source_key": pl.String, "before": pl.String,
                                       "state": pl.String, "resource_id": pl.String, "message": pl.String})
    extra["report_dir"] = str(folder)
    with report_output(folder):
        write_csv(frame, folder / "reconcile.csv")
        with private_text(folder / "summary.json") as fh:
            json.dump(extra, fh, indent=2)
            fh.write("\n")
    extra["rows_total"] = frame.height
    return RunReport(run_id, frame, extra, folder)


def notices(prepared: list[Prepared]) -> list[Notice]:
    """Every reader and mapping notice."""
    return [n for p in prepared for n in p.mapped.table.notices]
