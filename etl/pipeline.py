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
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import polars as pl

from etl.errors import UsageError
from etl.load.client import ApiClient, check_target
from etl.load.loader import Loader, LoadOptions, Result, Send, with_patient
from etl.load.state import StateStore
from etl.load.throttle import Throttle
from etl.mapping import Mapped, apply_profile, default_profile, load_profile
from etl.readers import ROW, Notice, read_table
from etl.report import ROW_COLUMNS, RunReport, count_states, write_report
from etl.settings import Settings
from etl.transform import Planned, plan_immunizations
from etl.validate import Validation, validate
from schemas.limits import ROUTES

__all__ = ["Prepared", "load_files", "prepare_files", "validate_files"]

Progress = Callable[[str, int], None]

PATIENT_ROUTE = ROUTES["PatientCreate"]
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


def prepare_files(paths: Sequence[str | Path], settings: Settings, timings: dict[str, float]) -> list[Prepared]:
    """Read, map, validate and transform every input (no network)."""
    profile = load_profile(settings.profile) if settings.profile else default_profile()
    out = []
    for path in paths:
        t0 = time.perf_counter()
        table = read_table(path, sheet=settings.sheet)
        mapped = apply_profile(table, profile)
        t1 = time.perf_counter()
        validation = validate(mapped)
        t2 = time.perf_counter()
        planned = plan_immunizations(mapped, validation.valid)
        t3 = time.perf_counter()
        timings["read"] = timings.get("read", 0.0) + t1 - t0
        timings["validate"] = timings.get("validate", 0.0) + t2 - t1
        timings["transform"] = timings.get("transform", 0.0) + t3 - t2
        out.append(Prepared(mapped, validation, planned))
    return out


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
            pl.format("{} {} ({}): {}", "column", "code", pl.col("value").fill_null(""), "message")
            .str.join("; ")
            .alias("message"),
        )
    )
    planned = p.planned.rows.select(ROW, "source_key", pl.col("patient_key"))
    return (
        mapped.frame.select(ROW)
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
        )
    )


def _rejects_file(p: Prepared) -> pl.DataFrame:
    """The rejected rows as they were in the source, with the reasons appended."""
    table = p.mapped.table
    reasons = (
        _base_rows(p)
        .filter(pl.col("state") == "rejected")
        .select(pl.col("source_row").alias(ROW), pl.col("message").alias("reasons"))
    )
    return (
        table.frame.join(reasons, on=ROW, how="inner")
        .sort(ROW)
        .select(pl.lit(p.file).alias("source_file"), pl.col(ROW).alias("source_row"), *table.columns, "reasons")
    )


def _dedupe_across_files(rows: pl.DataFrame) -> pl.DataFrame:
    """A planned key seen in an earlier file of the same run is skipped, not sent twice."""
    first = pl.int_range(pl.len()).over("kind", "source_key") == 0
    dup = (pl.col("state") == "planned") & pl.col("source_key").is_not_null() & ~first
    where = pl.format("same record as {} row {}", pl.col("source_file").first(), pl.col("source_row").first())
    return rows.with_columns(
        pl.when(dup).then(pl.lit("skipped")).otherwise(pl.col("state")).alias("state"),
        pl.when(dup).then(where.over("kind", "source_key")).otherwise(pl.col("message")).alias("message"),
    )


def _summary(
    run_id: str,
    prepared: list[Prepared],
    rows: pl.DataFrame,
    target: str,
    settings: Settings,
    timings: dict[str, float],
    extra: dict[str, Any],
) -> dict[str, Any]:
    states, per_kind = count_states(rows)
    warnings: list[dict[str, Any]] = [
        {"file": n.file, "code": n.code, "message": n.message} for p in prepared for n in p.mapped.table.notices
    ]
    for p in prepared:
        w = p.validation.warnings
        for (code,), frame in w.group_by("code"):
            warnings.append(
                {"file": p.file, "code": str(code), "rows": frame.get_column(ROW).to_list()[:20], "count": frame.height}
            )
    return {
        "run_id": run_id,
        "command": "load" if extra.get("load") else "validate",
        "dry_run": settings.dry_run,
        "target": target,
        "inputs": [
            {
                "path": p.file,
                "sha256": p.mapped.table.sha256,
                "format": p.mapped.table.format,
                "encoding": p.mapped.table.encoding,
                "delimiter": p.mapped.table.delimiter,
                "sheet": p.mapped.table.sheet,
                "kind": p.mapped.kind,
                "profile": p.mapped.profile.name,
                "rows": p.mapped.frame.height,
                "columns_mapped": p.mapped.sources,
            }
            for p in prepared
        ],
        "rows_total": rows.height,
        "states": states,
        "kinds": per_kind,
        "warnings": warnings,
        "timings": {k: round(v, 4) for k, v in timings.items()},
        **{k: v for k, v in extra.items() if k != "load"},
    }


def _report_dir(settings: Settings, run_id: str) -> Path:
    return settings.report_dir or Path("reports") / run_id


def validate_files(paths: Sequence[str | Path], settings: Settings | None = None) -> RunReport:
    """Validate inputs without sending anything; write the report."""
    settings = settings or Settings()
    run_id, timings = _new_run_id(), dict[str, float]()
    t0 = time.perf_counter()
    prepared = prepare_files(paths, settings, timings)
    rows = pl.concat([_base_rows(p) for p in prepared]).pipe(_dedupe_across_files)
    timings["total"] = time.perf_counter() - t0
    report = RunReport(
        run_id,
        rows.rename({"patient_key": "patient_id"}).select(ROW_COLUMNS),
        _summary(run_id, prepared, rows, "none (validate)", settings, timings, {}),
    )
    write_report(report, _report_dir(settings, run_id), rejects={p.file: _rejects_file(p) for p in prepared})
    return report


@contextlib.contextmanager
def _target(settings: Settings) -> Iterator[tuple[str, str, str]]:
    """(base URL, API key, state-store identity) of the run's target; the embedded sandbox if none."""
    if settings.base_url:
        if settings.api_key is None:
            raise UsageError("set CLINIKAPI_SECRET_KEY (or --api-key-file) to load into " + settings.base_url)
        key = settings.api_key.get_secret_value()
        check_target(settings.base_url, key, live=settings.live)
        yield settings.base_url, key, settings.base_url
        return
    from etl.sandbox import SandboxConfig, SandboxServer

    db = settings.state.with_name(settings.state.stem + ".sandbox.sqlite")
    db.parent.mkdir(parents=True, exist_ok=True)
    with SandboxServer(SandboxConfig(db_path=str(db))) as server:
        yield server.base_url, server.api_key, f"embedded-sandbox:{db.resolve()}"


def load_files(
    paths: Sequence[str | Path], settings: Settings | None = None, *, progress: Progress | None = None
) -> RunReport:
    """Import inputs into the target (or plan it, with ``dry_run``); write the report."""
    settings = settings or Settings()
    run_id, timings = _new_run_id(), dict[str, float]()
    t0 = time.perf_counter()
    prepared = prepare_files(paths, settings, timings)
    rows = pl.concat([_base_rows(p) for p in prepared]).pipe(_dedupe_across_files)
    folder = _report_dir(settings, run_id)
    extra: dict[str, Any] = {"load": True}
    if settings.dry_run:
        rows, extra["patients"] = _dry_run(prepared, rows, folder, settings)
        target = settings.base_url or "embedded sandbox"
    else:
        with _target(settings) as (base_url, key, identity):
            target = base_url if settings.base_url else "embedded sandbox"
            rows, load_extra = _load(prepared, rows, base_url, key, identity, settings, run_id, progress, timings)
            extra.update(load_extra)
    timings["total"] = time.perf_counter() - t0
    summary = _summary(run_id, prepared, rows, target, settings, timings, extra)
    report = RunReport(run_id, rows.rename({"patient_key": "patient_id"}).select(ROW_COLUMNS), summary)
    write_report(report, folder, rejects={p.file: _rejects_file(p) for p in prepared})
    return report


def _planned_sends(prepared: list[Prepared], rows: pl.DataFrame) -> tuple[list[Send], list[Send]]:
    """(patients, immunization rows) to send, in input order, one per key."""
    patients: dict[str, Send] = {}
    sends: list[Send] = []
    planned_keys = set(rows.filter(pl.col("state") == "planned").get_column("source_key").to_list())
    for p in prepared:
        for r in p.planned.patients.iter_rows(named=True):
            patients.setdefault(
                r["patient_key"], Send("patient", PATIENT_ROUTE, r["patient_key"], r["body"], r["body_hash"])
            )
        for r in p.planned.rows.iter_rows(named=True):
            if r["source_key"] in planned_keys:
                planned_keys.discard(r["source_key"])
                sends.append(
                    Send(
                        p.mapped.kind, IMMUNIZATION_ROUTE, r["source_key"], r["body"], r["body_hash"], r["patient_key"]
                    )
                )
    return list(patients.values()), sends


def _dry_run(
    prepared: list[Prepared], rows: pl.DataFrame, folder: Path, settings: Settings
) -> tuple[pl.DataFrame, dict[str, int]]:
    """Write ``payloads.ndjson`` (one line per request a load would send)."""
    from etl.report import _private_dir, _private_file

    _private_dir(folder)
    patients, sends = _planned_sends(prepared, rows)
    first_row = {r["patient_key"]: r[ROW] for p in prepared for r in p.planned.patients.iter_rows(named=True)}
    rows_by_key = {(r["source_key"]): r[ROW] for p in prepared for r in p.planned.rows.iter_rows(named=True)}
    with _private_file(folder / "payloads.ndjson").open("w", encoding="utf-8") as fh:
        needed = {s.patient_key for s in sends}
        for p in patients:
            if p.source_key in needed:
                line = {
                    "method": "POST",
                    "path": p.route,
                    "source_row": first_row[p.source_key],
                    "kind": "patient",
                    "source_key": p.source_key,
                    "body": json.loads(p.body),
                }
                fh.write(json.dumps(line, ensure_ascii=False) + "\n")
        for s in sends:
            body = with_patient(s.body, f"patient:{s.patient_key}")
            line = {
                "method": "POST",
                "path": s.route,
                "source_row": rows_by_key[s.source_key],
                "kind": s.kind,
                "source_key": s.source_key,
                "body": json.loads(body),
                "refs": {"patientId": {"kind": "patient", "source_key": s.patient_key}},
            }
            fh.write(json.dumps(line, ensure_ascii=False) + "\n")
    return rows, {"planned": len({s.patient_key for s in sends})}


def _load(
    prepared: list[Prepared],
    rows: pl.DataFrame,
    base_url: str,
    key: str,
    identity: str,
    settings: Settings,
    run_id: str,
    progress: Progress | None,
    timings: dict[str, float],
) -> tuple[pl.DataFrame, dict[str, Any]]:
    patients, sends = _planned_sends(prepared, rows)
    t0 = time.perf_counter()
    with StateStore(settings.state, target=identity) as state:
        state.start_run(run_id, "load")
        throttle = Throttle(settings.rate)
        options = LoadOptions(
            settings.rate, settings.concurrency, settings.consistency_window if settings.base_url else 0.0
        )

        async def go() -> tuple[dict[str, Result], dict[str, Result], Loader]:
            limits = httpx.Limits(max_connections=settings.concurrency, max_keepalive_connections=settings.concurrency)
            async with httpx.AsyncClient(base_url=base_url, timeout=settings.timeout, limits=limits) as http:
                client = ApiClient(http, key, on_response=throttle.observe)
                loader = Loader(client, state, throttle, options, run_id, progress=progress)
                row_results, patient_results = await loader.run(patients, sends)
                return row_results, patient_results, loader

        row_results, patient_results, loader = asyncio.run(go())
        timings["load"] = time.perf_counter() - t0
        results = pl.DataFrame(
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
                for k, r in row_results.items()
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
        crosswalk = pl.DataFrame(
            [{"patient_key": k, "patient_id": r.resource_id} for k, r in patient_results.items() if r.resource_id],
            schema={"patient_key": pl.String, "patient_id": pl.String},
        )
        planned = pl.col("state") == "planned"
        out = (
            rows.join(results, on="source_key", how="left")
            .join(crosswalk, on="patient_key", how="left")
            .with_columns(
                pl.when(planned).then(pl.col("r_state").fill_null("failed")).otherwise(pl.col("state")).alias("state"),
                pl.when(planned).then(pl.col("r_id")).otherwise(pl.col("resource_id")).alias("resource_id"),
                pl.when(planned).then(pl.col("r_code")).otherwise(pl.col("error_code")).alias("error_code"),
                pl.when(planned).then(pl.col("r_field")).otherwise(pl.col("field")).alias("field"),
                pl.when(planned)
                .then(
                    pl.when(pl.col("r_status").is_not_null())
                    .then(pl.format("HTTP {}: {}", "r_status", pl.col("r_message").fill_null("")))
                    .otherwise(pl.col("r_message"))
                )
                .otherwise(pl.col("message"))
                .alias("message"),
            )
            .with_columns(
                pl.when(pl.col("state").is_in(["rejected"]))
                .then(pl.col("patient_key"))
                .otherwise(pl.col("patient_id").fill_null(pl.col("patient_key")))
                .alias("patient_key")
            )
            .select(rows.columns)
        )
        patient_states: dict[str, int] = {}
        for r in patient_results.values():
            patient_states[r.state] = patient_states.get(r.state, 0) + 1
        extra = {
            "patients": patient_states,
            "requests": loader.stats.requests,
            "responses_429": loader.stats.retries_429,
            "achieved_rate": round(loader.stats.requests / loader.stats.send_seconds, 2)
            if loader.stats.send_seconds
            else None,
            "aborted": str(loader.aborted) if loader.aborted else None,
        }
        counts, _ = count_states(out)
        state.finish_run(run_id, {"states": counts})
    return out, extra


def notices(prepared: list[Prepared]) -> list[Notice]:
    """Every reader and mapping notice."""
    return [n for p in prepared for n in p.mapped.table.notices]
