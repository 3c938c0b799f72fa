"""The pipeline's entry points: read → map → validate → transform → load → report.

:func:`validate_files` and :func:`load_files` are the library's entry points;
the CLI is a thin layer over them and a notebook can call them the same way::

    from etl import Settings, load_files
    report = load_files(["sample_data/registry.csv"], Settings(dry_run=True))
    report.summary["states"]

Every run takes one road, a batch of ``settings.batch_rows`` rows at a time
(a file that fits one batch is one batch): the plan is :mod:`etl.plan`,
the sends to ClinikAPI :mod:`etl.send`, to Redox :mod:`etl.redox`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

import polars as pl

from etl.errors import UsageError
from etl.files import private_text, write_csv
from etl.progress import Progress, as_progress
from etl.report import ReconcileSummary, RunReport, new_run_id, report_folder, report_output, report_path
from etl.settings import Settings
from schemas.canonical import KIND_SPECS

if TYPE_CHECKING:  # the loader and its HTTP client are imported when something is sent: validate needs neither
    from etl.load.loader import Result, Send
    from etl.matching import Matcher

__all__ = ["STREAM_DEPRECATED", "load_files", "preview_matcher", "reconcile_state", "validate_files"]

ProgressLike = Progress | Callable[[str, int], None]  # a Progress, or the loader's older (stage, n) callback

#: The one-line warning of a run given ``--stream``/``--no-stream`` (or a job's ``stream``): both are no-ops.
STREAM_DEPRECATED = (
    "warning: --stream/--no-stream (a job's 'stream') is deprecated and ignored: every run is planned "
    "and sent in batches (--batch-rows)"
)


def validate_files(
    paths: Sequence[str | Path],
    settings: Settings | None = None,
    *,
    progress: ProgressLike | None = None,
    state: str | Path | None = None,
) -> RunReport:
    """Validate inputs without sending anything; write the report.

    Inputs are read and checked a batch of ``settings.batch_rows`` rows at a time (``etl.plan``),
    so a file of any size is validated in bounded memory. ``state``: an earlier load's state store
    (``validate --state``); a reference to a resource it records as created resolves, as in a load
    with that store, so a staged migration's later files validate alone. Nothing is recorded in it.
    """
    from etl.plan import validate_in_batches

    if state is None:
        return validate_in_batches(paths, settings or Settings(), as_progress(progress))
    from etl.load.state import StateStore

    with StateStore.existing(state) as store:
        return validate_in_batches(paths, settings or Settings(), as_progress(progress), state=store)


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
    settings = settings or Settings()
    if settings.target == "clinikapi" and settings.base_url:
        from etl.load.client import check_target_url

        check_target_url(settings.base_url)  # before anything: a dry run's report names the URL too
    if settings.stream is not None:
        print(STREAM_DEPRECATED, file=sys.stderr)
    shown = as_progress(progress)
    if settings.target == "redox":
        from etl.redox import load_redox  # FHIR message bundles to Redox's Immunization/$write

        return load_redox(paths, settings, progress=shown, job=job)
    if settings.dry_run:
        # The plan is made a batch at a time in bounded memory, like validate; the state store, if
        # any, explains references to what earlier runs created.
        from etl.clinikapi import existing_state
        from etl.plan import validate_in_batches

        with existing_state(settings) as state:
            return validate_in_batches(paths, settings, shown, payloads=True, state=state,
                                       matcher=preview_matcher(settings, shown))
    from etl.send import load_in_batches

    return load_in_batches(paths, settings, shown, job=job)


def preview_matcher(settings: Settings, progress: Progress) -> Matcher | None:
    """A dry run with ``--base-url`` previews matching (reads only) when it has the API key; else it says why not."""
    from etl.load.client import check_target
    from etl.matching import Matcher

    if not settings.base_url or (settings.match == "off" and not settings.dedupe_doses):
        return None
    if settings.api_key is None:
        progress.note("matching not previewed: set CLINIKAPI_SECRET_KEY (or --api-key-file) to read the target")
        return None
    key = settings.api_key.get_secret_value()
    check_target(settings.base_url, key, live=settings.live)
    return Matcher(settings.base_url, key, settings, progress)


def reconcile_state(settings: Settings, *, verify: bool = False) -> RunReport:
    """Resolve every row a state store holds in doubt; with ``verify``, read back every created id.

    Writes ``summary.json`` and ``reconcile.csv`` (kind, source_key, before, state, resource_id,
    message) to the report folder.
    """
    from etl.clinikapi import kind_route, open_target
    from etl.errors import LookupFailed
    from etl.load.client import ApiClient, http_client
    from etl.load.loader import Loader, LoadOptions, Send
    from etl.load.state import StateStore
    from etl.load.throttle import Throttle

    run_id = new_run_id()
    bound = StateStore.existing(settings.state)
    target = bound.target
    bound.close()
    folder = report_path(settings.report_dir, run_id)
    if target.startswith("embedded-sandbox:"):
        if settings.base_url:
            raise UsageError(f"{settings.state} records loads into the embedded sandbox, not {settings.base_url}")
    elif not settings.base_url:
        settings = settings.model_copy(update={"base_url": target})
    rows: list[dict[str, Any]] = []
    # The report folder first: one that cannot take the report stops the run before anything is sent.
    with report_folder(folder), open_target(settings) as (base_url, key, _), StateStore(
        settings.state, target=target
    ) as state:
        state.start_run(run_id, "reconcile")
        items: list[Send] = []
        for kind in state.kinds():
            if kind not in KIND_SPECS:
                continue  # Redox has no search: its unknowns stay unknown
            doubtful = state.in_state(kind, "pending", "unknown")
            bodies = state.bodies(kind, [r.source_key for r in doubtful])
            route = kind_route(kind)
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
                        route = kind_route(kind)
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
        summary = ReconcileSummary(run_id=run_id, command="reconcile", target=target, in_doubt=in_doubt, states=counts,
                                   verified=checked if verify else None, unresponsive=unresponsive,
                                   report_dir=str(folder))
        state.finish_run(run_id, {"states": counts})
    frame = pl.DataFrame(rows, schema={"kind": pl.String, "source_key": pl.String, "before": pl.String,
                                       "state": pl.String, "resource_id": pl.String, "message": pl.String})
    with report_output(folder):
        write_csv(frame, folder / "reconcile.csv")
        with private_text(folder / "summary.json") as fh:
            json.dump(summary.to_json(), fh, indent=2)
            fh.write("\n")
    # RunReport.rows_total reads the summary: a reconcile's rows are reconcile.csv's (not in its summary.json).
    return RunReport(run_id, frame, {**summary.to_json(), "rows_total": frame.height}, folder)
