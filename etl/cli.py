"""The ``clinik-etl`` command: options in, one library call, a summary out.

Library errors become a one-line message and a documented exit code here;
a traceback appears only with ``--debug``.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import difflib
import functools
import gc
import json
import math
import sqlite3
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal, TypeVar

import click
from pydantic import ValidationError
from rich import box
from rich.console import Console
from rich.markup import escape
from rich.table import Table as RichTable

from etl.errors import EtlError, ExitCode, UsageError
from etl.progress import WARNING_EXAMPLES, describe_duration, open_progress
from etl.report import FINAL_STATES, RunReport
from etl.settings import (
    BATCH_ROWS,
    DEFAULT_STATE,
    LOAD_BATCH_ROWS,
    MAX_CONSISTENCY_WINDOW,
    MAX_NO_ANSWER_LIMIT,
    MAX_TIMEOUT,
    Settings,
    read_key_file,
)
from schemas.canonical import KIND_SPECS

F = TypeVar("F", bound=Callable[..., Any])

EXIT_CODES_HELP = """\b
Exit codes:
  0  every row created, skipped or planned (validate: every row valid)
  1  some rows were rejected by validation, or need a person's review (review.csv)
  2  usage error, unreadable input, unusable profile or state store
     (including one that another run is using), or the environment
     failing (a read-only report folder, a full disk, a port in use)
  3  some rows failed at the API or have an unknown outcome
  4  the API refused the run (bad key or scope); nothing more was sent
  5  a quota is used up (429 MONTHLY_QUOTA_EXCEEDED or SANDBOX_QUOTA_EXCEEDED):
     the run stopped at once, the rest is not-sent; run again once it resets
  130 interrupted (SIGINT/SIGTERM); state and report written: run again to resume
"""

err = Console(stderr=True, highlight=False)
out = Console(highlight=False)


def _default(setting: str) -> str:
    """A setting's default for a help text (a flag without a click default leaves the setting to the environment)."""
    return f"{Settings.model_fields[setting].default:g}"


class Seconds(click.FloatRange):
    """A duration in seconds within a finite range: ``nan`` and ``inf`` are refused (a wait that never ends)."""

    name = "seconds"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        seconds = super().convert(value, param, ctx)
        if not math.isfinite(seconds):
            self.fail(f"{value!r} is not a number of seconds.", param, ctx)
        return seconds


def handle_errors(func: F) -> F:
    """Turn toolkit errors into a message and an exit code, not a traceback."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        debug = bool(click.get_current_context().find_root().params.get("debug"))
        try:
            return func(*args, **kwargs)
        except EtlError as exc:
            if debug:
                raise
            later = " (transient: the same command may succeed later)" if exc.retryable else ""
            err.print(f"[bold red]error:[/] {escape(str(exc))}{later}", markup=True, soft_wrap=True)
            sys.exit(exc.exit_code)
        except ValidationError as exc:
            if debug:
                raise
            problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors(include_input=False))
            err.print(f"[bold red]error:[/] invalid setting: {problems}", markup=True, soft_wrap=True)
            sys.exit(ExitCode.USAGE)
        except (OSError, sqlite3.Error, RecursionError, MemoryError) as exc:
            # The last resort for the environment failing under a run (a full disk, a file that vanished):
            # where the library knows the file it names it; here one line says what the system said.
            if debug:
                raise
            err.print(f"[bold red]error:[/] {escape(environment_failure(exc))}", markup=True, soft_wrap=True)
            sys.exit(ExitCode.USAGE)

    return wrapper  # type: ignore[return-value]


def environment_failure(exc: BaseException) -> str:
    """One line for an operating-system, SQLite, recursion or memory failure that no library layer explained."""
    if isinstance(exc, OSError):
        files = " -> ".join(str(f) for f in (exc.filename, exc.filename2) if f is not None)
        text = f"{files}: {exc.strerror or exc}" if files else str(exc.strerror or exc)
    elif isinstance(exc, sqlite3.Error):
        text = f"SQLite: {exc}"
    elif isinstance(exc, RecursionError):
        text = "input nested too deeply to read"
    else:
        text = "out of memory; try a smaller --batch-rows"
    return " ".join(f"{text} ({type(exc).__name__}; --debug shows where)".split())


def input_options(func: F) -> F:
    """Options shared by every command that reads input files."""
    func = click.option("--sheet", metavar="NAME", help="Excel sheet to read (default: the first).")(func)
    func = click.option(
        "--redact",
        is_flag=True,
        help="Write a shareable report: no names, birth dates or contact details (payloads.ndjson excepted).",
    )(func)
    func = click.option(
        "--kind",
        type=click.Choice(sorted(KIND_SPECS)),
        help="What every FILE holds. Default: from the profile, or told from each file's headers.",
    )(func)
    func = click.option(
        "--crosswalk",
        type=click.Path(dir_okay=False, path_type=Path),
        help="CSV of kind,source_id,clinikapi_id: references to resources created outside this tool; or the "
        "crosswalk.csv of an earlier load's report.",
    )(func)
    func = header_row_option(func)
    func = click.option(
        "--profile",
        metavar="NAME|FILE",
        help="Mapping profile: a built-in name (see `clinik-etl profiles`) or a TOML/YAML file naming which "
        "source column feeds which field. Default: match the usual header names.",
    )(func)
    func = click.option(
        "--report-dir",
        type=click.Path(file_okay=False, path_type=Path),
        help="Folder for the report (default: reports/<run id>).",
    )(func)
    return func


def header_row_option(func: F) -> F:
    """``--header-row N``: the row that holds the header, for files with title rows above it."""
    return click.option(
        "--header-row",
        type=click.IntRange(min=1),
        metavar="N",
        help="The row holding the header (1 = the first line); rows above it are skipped. Default: the "
        "profile's header_row, else the first row naming known columns (title rows above it are skipped).",
    )(func)


def output_options(func: F) -> F:
    """``-q/--quiet`` and ``--json``: what a run prints, for people and for scripts."""
    func = click.option(
        "--json",
        "as_json",
        is_flag=True,
        help="Print the run's summary (summary.json) as JSON on stdout instead of the table.",
    )(func)
    func = click.option(
        "-q", "--quiet", is_flag=True, help="No progress and no summary: errors only; the exit code tells the outcome."
    )(func)
    return func


def show_result(report: RunReport, quiet: bool, as_json: bool) -> None:
    """The summary as JSON (``--json``), nothing (``--quiet``) or the human table.

    A run that stopped because the target did not answer says so in one line on stderr whatever the
    output mode (the table says it too).
    """
    if as_json:
        click.echo(json.dumps(report.summary, indent=2, ensure_ascii=False))
    elif not quiet:
        print_summary(report)
    if (quiet or as_json) and report.summary.get("unresponsive"):
        err.print(f"[bold red]error:[/] {escape(report.summary['unresponsive'])}", markup=True, soft_wrap=True)


@click.group(epilog=EXIT_CODES_HELP)
@click.version_option(package_name="clinik-etl")
@click.option("--debug", is_flag=True, help="Show tracebacks for errors.")
def main(debug: bool) -> None:
    """Import vaccine-registry exports and visit logs (CSV, Excel) into ClinikAPI.

    Nothing is lost (every row ends created, skipped, rejected, failed or
    unknown in the report), nothing is sent twice (a state store records every
    send), and the default target is an embedded local sandbox.
    """


@main.command(epilog=EXIT_CODES_HELP)
@click.argument("files", nargs=-1, required=True, type=click.Path(path_type=Path))
@input_options
@click.option(
    "--batch-rows",
    type=click.IntRange(min=1),
    default=BATCH_ROWS,
    show_default=True,
    help="Rows checked at a time. Memory grows with this, not with the file: any size validates.",
)
@click.option(
    "--state",
    type=click.Path(dir_okay=False, path_type=Path),
    help="An earlier load's state store: references to what it created resolve (a staged migration's later "
    "files). Default: none.",
)
@output_options
@handle_errors
def validate(
    files: tuple[Path, ...],
    profile: str | None,
    sheet: str | None,
    report_dir: Path | None,
    kind: str | None,
    crosswalk: Path | None,
    redact: bool,
    batch_rows: int,
    quiet: bool,
    as_json: bool,
    header_row: int | None = None,
    state: Path | None = None,
) -> None:
    """Check FILES against every documented limit; send nothing.

    Files are read and checked in batches, so a registry of millions of rows validates in bounded
    memory. Writes summary.json, rows.csv, rejects.csv and report.html to the report folder.
    """
    from etl.pipeline import validate_files

    settings = Settings(
        profile=profile,
        sheet=sheet,
        report_dir=report_dir,
        kind=kind,
        crosswalk=crosswalk,
        redact=redact,
        batch_rows=batch_rows,
        header_row=header_row,
    )
    with open_progress(quiet) as progress:
        report = validate_files(list(files), settings, progress=progress, state=state)
    show_result(report, quiet, as_json)
    sys.exit(ExitCode.REJECTED if report.states.get("rejected") else ExitCode.OK)


@main.command(epilog=EXIT_CODES_HELP)
@click.argument("files", nargs=-1, required=True, type=click.Path(path_type=Path))
@input_options
@click.option("--base-url", metavar="URL", help="ClinikAPI base URL. Default: an embedded sandbox started for the run.")
@click.option(
    "--api-key-file",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Read the API key from this file (else from CLINIKAPI_SECRET_KEY).",
)
@click.option(
    "--live", is_flag=True, help="Allow a live (clk_live_) key, or Redox's production environment: real patient data."
)
@click.option("--dry-run", is_flag=True, help="Send nothing; write payloads.ndjson with every request planned.")
@click.option("--update", is_flag=True,
              help="Patch rows that changed since an earlier run created them (default: report them as changed).")
@click.option("--rate", type=float, help="Requests per second. Default: paced by the server's rate-limit headers.")
@click.option(
    "--concurrency",
    type=click.IntRange(min=1, max=64),
    metavar="N",
    help=f"Requests in flight at once. Default {Settings.model_fields['concurrency'].default} "
    "(CLINIK_ETL_CONCURRENCY), at most 64.",
)
@click.option(
    "--timeout",
    type=Seconds(min=0, min_open=True, max=MAX_TIMEOUT),
    help=f"Seconds to wait for an answer. Default {_default('timeout')} (CLINIK_ETL_TIMEOUT), at most {MAX_TIMEOUT:g}.",
)
@click.option(
    "--no-answer-limit",
    type=click.IntRange(min=1, max=MAX_NO_ANSWER_LIMIT),
    metavar="N",
    help=f"Stop the load when this many requests in a row get no answer at all (timeouts, connections lost or "
    f"refused): rows already sent stay unknown (exit 3), the rest are not sent. A silent target thus costs "
    f"about LIMIT / concurrency x --timeout. Default {_default('no_answer_limit')} (CLINIK_ETL_NO_ANSWER_LIMIT), "
    f"at most {MAX_NO_ANSWER_LIMIT}.",
)
@click.option(
    "--mode",
    type=click.Choice(["request", "bulk", "auto"]),
    help="request: one POST per create (the default); bulk: NDJSON bulk imports (5 an hour); "
    "auto: bulk when the plan needs more requests than the rate-limit window has left.",
)
@click.option(
    "--consistency-window",
    type=Seconds(min=0, max=MAX_CONSISTENCY_WINDOW),
    help=f"Seconds before search reliably shows a create (used to resolve unknown outcomes): a floor, the run "
    f"waits at least the search lag it measures. "
    f"Default {_default('consistency_window')} (CLINIK_ETL_CONSISTENCY_WINDOW), at most {MAX_CONSISTENCY_WINDOW:g}.",
)
@click.option(
    "--state",
    type=click.Path(dir_okay=False, path_type=Path),
    help=f"State store (SQLite): what was sent and the ids that came back. Reuse it to resume. Default {DEFAULT_STATE} "
    "(CLINIK_ETL_STATE); with --target redox, .clinik-etl/redox-state.sqlite.",
)
@click.option(
    "--target",
    type=click.Choice(["clinikapi", "redox"]),
    help="Where rows go: clinikapi (the default), or redox: one FHIR R4 message bundle per row "
    "to Redox's Immunization/$write.",
)
@click.option(
    "--redox-base-url",
    metavar="URL",
    help="Redox API base URL (with --target redox). Default: an embedded sandbox started for the run.",
)
@click.option(
    "--redox-token-file",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Read the Redox bearer token from this file (else from REDOX_API_TOKEN).",
)
@click.option(
    "--stream/--no-stream",
    default=None,
    help="Deprecated, ignored (a warning says so): every run is planned and sent in batches of --batch-rows.",
)
@click.option(
    "--batch-rows",
    type=click.IntRange(min=1),
    help=f"Rows checked, planned and sent at a time (default {LOAD_BATCH_ROWS}); memory is bounded by it.",
)
@click.option(
    "--match",
    "match_mode",
    type=click.Choice(["off", "exact", "probable"]),
    help="Match patients (and practitioners, by NPI) the target already holds before creating: exact matches "
    "are linked (matched), probable ones go to review.csv (needs-review, exit 1); off creates every one. "
    "Default probable.",
)
@click.option(
    "--dedupe-doses/--no-dedupe-doses",
    default=None,
    help="A dose the patient's chart already holds, or an earlier row of the run (same patient, vaccine group, "
    "day), is 'exists', not created. Default on.",
)
@click.option(
    "--accept-review",
    type=click.Path(dir_okay=False, path_type=Path),
    help="A review.csv whose decision column a person filled in (link <id>, create or skip): applied to this load.",
)
@output_options
@handle_errors
def load(
    files: tuple[Path, ...],
    profile: str | None,
    sheet: str | None,
    report_dir: Path | None,
    kind: str | None,
    crosswalk: Path | None,
    redact: bool,
    base_url: str | None,
    api_key_file: Path | None,
    live: bool,
    dry_run: bool,
    update: bool,
    rate: float | None,
    concurrency: int | None,
    timeout: float | None,
    no_answer_limit: int | None,
    consistency_window: float | None,
    mode: str | None,
    state: Path | None,
    target: str | None,
    redox_base_url: str | None,
    redox_token_file: Path | None,
    stream: bool | None,
    batch_rows: int | None,
    match_mode: str | None,
    dedupe_doses: bool | None,
    accept_review: Path | None,
    quiet: bool,
    as_json: bool,
    header_row: int | None = None,
) -> None:
    """Import FILES into ClinikAPI (by default the embedded sandbox).

    Every valid row becomes a Patient (created once per patient id) and an
    Immunization; re-running with the same --state sends nothing twice and
    resumes a run that was killed. With --target redox each valid
    immunization row is a FHIR message bundle for Redox instead.

    Every run is planned and sent a batch at a time (--batch-rows), so a migration of millions
    of rows stays in bounded memory. Redox has no bulk endpoint: --mode bulk is refused there.
    """
    from etl.pipeline import load_files

    values: dict[str, Any] = dict(
        profile=profile,
        kind=kind,
        crosswalk=crosswalk,
        redact=redact,
        sheet=sheet,
        report_dir=report_dir,
        base_url=base_url,
        live=live,
        dry_run=dry_run,
        update=update,
        rate=rate,
        concurrency=concurrency,
        timeout=timeout,
        no_answer_limit=no_answer_limit,
        consistency_window=consistency_window,
        mode=mode,
        state=state,
        stream=stream,
        batch_rows=batch_rows,
        header_row=header_row,
        match=match_mode,
        dedupe_doses=dedupe_doses,
        accept_review=accept_review,
    )
    if api_key_file is not None:
        values["api_key"] = read_key_file(api_key_file)
    # Only when given: CLINIK_ETL_TARGET and CLINIK_ETL_REDOX_BASE_URL then still apply.
    values.update({k: v for k, v in (("target", target), ("redox_base_url", redox_base_url)) if v is not None})
    if redox_token_file is not None:
        values["redox_token"] = read_key_file(redox_token_file, token=True)
    # A flag not given leaves the setting to its CLINIK_ETL_* environment variable, then its default.
    settings = Settings(**{k: v for k, v in values.items() if v is not None})
    with open_progress(quiet) as progress:
        report = load_files(list(files), settings, progress=progress)
    show_result(report, quiet, as_json)
    sys.exit(report.exit_code())


@main.command()
@click.argument("files", nargs=-1, type=click.Path(path_type=Path))
@click.option("--base-url", metavar="URL", help="ClinikAPI base URL. Default: an embedded sandbox (a temporary one).")
@click.option("--api-key-file", type=click.Path(dir_okay=False, path_type=Path),
              help="Read the API key from this file (else from CLINIKAPI_SECRET_KEY).")
@click.option("--live", is_flag=True, help="Allow a live (clk_live_) key: real patient data.")
@click.option("--probe", is_flag=True,
              help="Create (then delete) one synthetic patient to measure the search lag (test keys only).")
@click.option("--profile", metavar="NAME|FILE", help="Mapping profile of FILES (as for load).")
@click.option("--kind", type=click.Choice(sorted(KIND_SPECS)), help="What every FILE holds (as for load).")
@click.option("--json", "as_json", is_flag=True, help="Print the findings as JSON on stdout.")
@handle_errors
def doctor(files: tuple[Path, ...], base_url: str | None, api_key_file: Path | None, live: bool, probe: bool,
           profile: str | None, kind: str | None, as_json: bool) -> None:
    """Check a target before a long migration: the key and its scope, the plan's rate limit and quota left,
    the response shape, clock skew and TLS; with FILES, the requests a load of them needs and how long it takes.

    Exit 0 healthy (warnings allowed), 2 unusable target, 4 key refused or without the scope, 5 quota used up.
    The key is never printed.
    """
    from etl.doctor import diagnose

    values: dict[str, Any] = {"base_url": base_url, "live": live, "profile": profile, "kind": kind}
    if api_key_file is not None:
        values["api_key"] = read_key_file(api_key_file)
    settings = Settings(**{k: v for k, v in values.items() if v is not None})
    found = diagnose(settings, list(files), probe=probe)
    if as_json:
        click.echo(json.dumps(found.to_json(), indent=2))
    else:
        marks = {"ok": "[green]ok  [/]", "warn": "[yellow]warn[/]", "fail": "[bold red]FAIL[/]", "info": "[dim]info[/]"}
        out.print(f"clinik-etl doctor: {escape(found.target)}", soft_wrap=True)
        for check in found.checks:
            out.print(f"  {marks[check.status]} {escape(check.name)}: {escape(check.text)}", soft_wrap=True)
    sys.exit(found.exit_code)


@main.command()
@click.option("--host", default="127.0.0.1", show_default=True, help="Interface to listen on (loopback only).")
@click.option("--port", type=int, default=8787, show_default=True, help="Port to listen on (0: any free port).")
@click.option("--db", type=click.Path(dir_okay=False, path_type=Path), help="SQLite file (default: temporary).")
@click.option("--rate-limit", type=int, help="Requests allowed per window per key (default: unlimited).")
@click.option(
    "--window", type=Seconds(min=0, min_open=True, max=86400), default=3600.0, show_default=True,
    help="Rate-limit window in seconds (at most a day).",
)
@click.option(
    "--fail-rate",
    type=click.FloatRange(0, 1),
    default=0.0,
    help="Share of writes answered 500, 502 or 503 without writing.",
)
@click.option(
    "--drop-rate",
    type=click.FloatRange(0, 1),
    default=0.0,
    help="Share of writes committed, then cut off before any answer.",
)
@click.option(
    "--slow-rate",
    type=click.FloatRange(0, 1),
    default=0.0,
    help="Share of writes committed, then answered only after --slow-seconds.",
)
@click.option(
    "--slow-seconds",
    type=Seconds(min=0, min_open=True, max=3600),
    default=35.0,
    show_default=True,
    help="How late a slow answer comes (longer than the client's timeout; at most 3600).",
)
@click.option("--seed", type=int, help="Seed for the fault draws, to repeat a run's faults (default: random).")
@click.option(
    "--search-lag",
    type=Seconds(min=0, max=3600),
    default=0.0,
    metavar="SECONDS",
    help="New resources appear in search only after this many seconds (read by id at once; at most 3600).",
)
@click.option(
    "--responses",
    type=click.Choice(["fhir", "simple"]),
    default="fhir",
    show_default=True,
    help="Shape of answers: fhir (as the official SDK's types describe) or simple (the create body echoed).",
)
@click.option("--quota", type=click.IntRange(min=1), metavar="N",
              help="Monthly request quota: past N requests, 429 MONTHLY_QUOTA_EXCEEDED (X-Quota-* headers).")
@click.option("--quota-window", type=Seconds(min=0, min_open=True), metavar="SECONDS",
              help="The quotas' period in seconds (default: the calendar month, UTC).")
@click.option("--sandbox-quota", type=click.IntRange(min=1), metavar="N",
              help="Monthly test-key allowance: past N requests, 429 SANDBOX_QUOTA_EXCEEDED (X-Sandbox-* headers).")
@click.option("--rolling", is_flag=True,
              help="Count --rate-limit for every key together over a rolling --window, as the API documents "
              "(per organisation, 60 s).")
@handle_errors
def sandbox(
    host: str,
    port: int,
    db: Path | None,
    rate_limit: int | None,
    window: float,
    fail_rate: float,
    drop_rate: float,
    slow_rate: float,
    slow_seconds: float,
    seed: int | None,
    search_lag: float,
    responses: Literal["fhir", "simple"],
    quota: int | None,
    quota_window: float | None,
    sandbox_quota: int | None,
    rolling: bool,
) -> None:
    """Run a local ClinikAPI sandbox until interrupted.

    It prints its base URL and a generated clk_test_ key to use with
    `load --base-url`. The fault options apply to writes (POST, PATCH) only:
    searches and reads always answer, so a client can look up what it sent.
    """
    from etl.sandbox import SandboxConfig
    from etl.sandbox.server import serve_forever

    config = SandboxConfig(
        db_path=str(db) if db else None,
        rate_limit=rate_limit,
        window=window,
        fail_rate=fail_rate,
        drop_rate=drop_rate,
        slow_rate=slow_rate,
        slow_seconds=slow_seconds,
        seed=seed,
        search_lag=search_lag,
        responses=responses,
        quota=quota,
        quota_window=quota_window,
        sandbox_quota=sandbox_quota,
        rolling=rolling,
    )
    serve_forever(config, host, port)


@main.command(epilog=EXIT_CODES_HELP)
@click.argument("job", type=click.Path(dir_okay=False, path_type=Path))
@click.option(
    "--wait",
    is_flag=True,
    help="If another run is using the job's state store, wait for it to finish instead of stopping with exit 2.",
)
@click.option("--dry-run", is_flag=True, help="Send nothing; write payloads.ndjson with every request planned.")
@click.option("--update", is_flag=True,
              help="Patch rows that changed since an earlier run created them (default: report them as changed).")
@output_options
@handle_errors
def run(job: Path, wait: bool, dry_run: bool, update: bool, quiet: bool, as_json: bool) -> None:
    """Run the import that a JOB file (TOML) describes: for cron and other schedulers.

    The job names its inputs (paths or globs, relative to the job file), the
    profile, the target, rate and concurrency, the state store and where
    reports go (one folder per run). Two runs of a job never overlap: the
    second stops at once with exit 2, or queues with --wait. See the README's
    "Scheduled imports" for the keys.
    """
    from etl.jobs import load_job, run_job

    spec = load_job(job)
    updates = {k: True for k, on in (("wait", wait), ("dry_run", dry_run), ("update", update)) if on}
    if updates:
        spec = dataclasses.replace(spec, settings=spec.settings.model_copy(update=updates))
    with open_progress(quiet) as progress:
        report = run_job(spec, progress=progress)
    show_result(report, quiet, as_json)
    sys.exit(report.exit_code())


@main.command()
@click.option(
    "--state",
    type=click.Path(dir_okay=False, path_type=Path),
    default=DEFAULT_STATE,
    show_default=True,
    help="State store whose runs to list.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the runs as JSON on stdout.")
@handle_errors
def history(state: Path, as_json: bool) -> None:
    """List the runs a state store has recorded, oldest first, with their counts.

    Each run says what started it: load, reconcile, or run and the job's
    name. A run marked "unfinished" was killed, or is still going. Dry runs
    record nothing, so they are not listed.
    """
    from etl.load.state import StateStore

    with StateStore.existing(state) as store:
        runs, target = store.runs(), store.target
    if as_json:
        click.echo(json.dumps({"state": str(state), "target": target, "runs": runs}, indent=2))
        return
    if not runs:
        out.print(f"{state}: no runs recorded (target {target})")
        return
    summaries = [r["summary"] if isinstance(r["summary"], dict) else {} for r in runs]
    # Only the states some run reached: the table must fit a terminal (cron mail, a pager).
    shown = [s for s in FINAL_STATES if any((m.get("states") or {}).get(s) for m in summaries)]
    table = RichTable(title=f"{state} (target {target})", title_justify="left", box=box.SIMPLE_HEAD)
    table.add_column("run", no_wrap=True)
    table.add_column("command", no_wrap=True)
    table.add_column("started", no_wrap=True)
    for name in ("took", *shown, "total"):
        table.add_column(name, justify="right", no_wrap=True)
    for r, summary in zip(runs, summaries, strict=True):
        started = float(str(r["started_at"]))
        finished = r["finished_at"]
        took = describe_duration(float(str(finished)) - started) if finished is not None else "[red]unfinished[/]"
        states: dict[str, int] = summary.get("states") or {}
        when = dt.datetime.fromtimestamp(started).astimezone().strftime("%Y-%m-%d %H:%M")
        counts = [str(states.get(s, 0)) if states else "" for s in shown]
        total = str(sum(states.values())) if states else ""
        command = " ".join(str(part) for part in (r["command"], r["job"]) if part)
        table.add_row(str(r["run_id"]), escape(command), when, took, *counts, total)
    # Piped (cron mail, a file), there is no terminal width to respect: never cut a run id.
    (out if out.is_terminal else Console(width=160, highlight=False)).print(table)


@main.command()
@click.argument("code", required=False)
@handle_errors
def explain(code: str | None) -> None:
    """Say what an error or warning CODE in a report means and how to fix it.

    With no CODE, list every code. The codes are those of rows.csv's
    error_code column and of the summary's "rejects by code".
    """
    from etl.rules import RULES
    from etl.rules import explain as find_rule

    if code is None:
        table = RichTable(
            title="clinik-etl codes (`clinik-etl explain CODE` for the fix)",
            title_justify="left",
            box=box.SIMPLE_HEAD,
        )
        for name in ("code", "kind", "meaning"):
            table.add_column(name)
        for rule in sorted(RULES.values(), key=lambda r: (_KIND_ORDER.index(r.default_kind), r.code)):
            table.add_row(rule.code, rule.default_kind, rule.title)
        out.print(table)
        return
    found = find_rule(code) or find_rule(code.lower()) or find_rule(code.upper())
    if found is None:
        close = difflib.get_close_matches(code, list(RULES), n=3)
        hint = f" Did you mean {' or '.join(close)}?" if close else ""
        raise UsageError(f"unknown code {code!r}.{hint} `clinik-etl explain` lists every code.")
    out.print(f"{found.code} ({found.shown_kind}): {found.title}.", soft_wrap=True, markup=False)
    out.print(f"fix: {found.fix}.", soft_wrap=True, markup=False)
    if found.severity is not None:
        out.print(
            f'severity: {found.severity} by default; a profile changes it: [rules] {found.code} = "error", '
            '"warning" or "off".',
            soft_wrap=True,
            markup=False,
        )


_KIND_ORDER = ("reject", "warning", "load", "api")


@main.command(epilog=EXIT_CODES_HELP)
@click.option("--state", type=click.Path(dir_okay=False, path_type=Path), default=DEFAULT_STATE, show_default=True,
              help="The state store of the load to reconcile.")
@click.option("--base-url", metavar="URL", help="ClinikAPI base URL (default: the one the state store records).")
@click.option("--api-key-file", type=click.Path(dir_okay=False, path_type=Path),
              help="Read the API key from this file (else from CLINIKAPI_SECRET_KEY).")
@click.option("--live", is_flag=True, help="Allow a live (clk_live_) key: real patient data.")
@click.option("--report-dir", type=click.Path(file_okay=False, path_type=Path),
              help="Folder for the report (default: reports/<run id>).")
@click.option("--consistency-window", type=Seconds(min=0, max=MAX_CONSISTENCY_WINDOW),
              help=f"Seconds before search reliably shows a create. Default {_default('consistency_window')} "
              f"(CLINIK_ETL_CONSISTENCY_WINDOW), at most {MAX_CONSISTENCY_WINDOW:g}.")
@click.option("--verify", is_flag=True, help="Also read back every created id and report the ones missing.")
@handle_errors
def reconcile(state: Path, base_url: str | None, api_key_file: Path | None, live: bool, report_dir: Path | None,
              consistency_window: float | None, verify: bool) -> None:
    """Settle rows whose outcome is unknown, without the input files.

    Each row in doubt (a timeout, a 5xx, a dropped connection, a killed run) is looked up after
    the search consistency window: found, it is recorded as created; certainly absent, it is sent
    again; otherwise it stays unknown.
    """
    from etl.pipeline import reconcile_state

    values: dict[str, Any] = dict(state=state, base_url=base_url, live=live, report_dir=report_dir,
                                  consistency_window=consistency_window)
    if api_key_file is not None:
        values["api_key"] = read_key_file(api_key_file)
    report = reconcile_state(Settings(**{k: v for k, v in values.items() if v is not None}), verify=verify)
    s = report.summary
    counts = ", ".join(f"{v} {k}" for k, v in sorted(s["states"].items())) or "nothing in doubt"
    out.print(f"reconcile {s['run_id']}: {counts}")
    if s.get("verified") is not None:
        out.print("verified: " + (", ".join(f"{v} {k}" for k, v in s["verified"].items()) or "nothing created yet"))
    if s.get("unresponsive"):
        err.print(f"[bold red]stopped early:[/] {escape(s['unresponsive'])}", soft_wrap=True)
    out.print(f"report: {s['report_dir']}")
    bad = s["states"].get("unknown", 0) + s["states"].get("failed", 0) + s["states"].get("missing", 0)
    bad += (s.get("verified") or {}).get("unchecked", 0)
    sys.exit(ExitCode.FAILED if bad else ExitCode.OK)

@main.command()
@handle_errors
def profiles() -> None:
    """List the built-in mapping profiles (use one with --profile NAME)."""
    from etl.mapping import builtin_profiles

    for name, description in builtin_profiles().items():
        click.echo(f"{name:<12} {description}")


@main.group()
def profile() -> None:
    """Work with mapping profiles."""


@profile.command("init")
@click.argument("file", type=click.Path(path_type=Path))
@click.option("--kind", type=click.Choice(sorted(KIND_SPECS)), help="The kind of rows (default: told from headers).")
@click.option("--output", type=click.Path(dir_okay=False, path_type=Path),
              help="Write the profile here (default: print it).")
@click.option("--sheet", metavar="NAME", help="Excel sheet to read (default: the first).")
@click.option("--force", is_flag=True, help="Overwrite the --output file if it exists.")
@header_row_option
@handle_errors
def profile_init(
    file: Path, kind: str | None, output: Path | None, sheet: str | None, force: bool, header_row: int | None = None
) -> None:
    """Write a starter profile for FILE's layout from its headers and values: each guess with its
    evidence and confidence, unmatched columns as comments. --output writes the format its suffix
    names (.toml, .yaml, .yml) and never overwrites a file without --force."""
    from etl.mapping import default_profile, known_header, profile_format, starter_profile
    from etl.readers import HeaderHint, read_table

    fmt = profile_format(output) if output is not None else "toml"
    if output is not None and output.exists() and not force:
        raise UsageError(f"{output} exists; pass --force to overwrite it")
    hint = HeaderHint(row=header_row, known=known_header(default_profile(kind)))
    table = read_table(file, sheet=sheet, limits=Settings(sheet=sheet).workbook_limits, header=hint)
    text = starter_profile(table, kind, fmt)
    if output is None:
        click.echo(text)
    else:
        with output.open("w" if force else "x", encoding="utf-8") as fh:
            fh.write(text)
        err.print(f"wrote {output}")


def print_summary(report: RunReport, stream: Console | None = None) -> None:
    """The short human summary printed at the end of a run."""
    console = stream or out
    # Each line whole, never wrapped at the terminal's (or a pipe's 80) columns mid-phrase: a script reads them.
    say = functools.partial(console.print, soft_wrap=True)
    s = report.summary
    title = f"clinik-etl {s['command']}{' (dry run)' if s.get('dry_run') else ''}"
    table = RichTable(title=title, title_justify="left")
    kinds = sorted(s.get("kinds", {}))
    shown = [state for state in FINAL_STATES if s["states"].get(state)]
    table.add_column("state")
    for kind in kinds if len(kinds) > 1 else []:
        table.add_column(kind, justify="right")
    table.add_column("rows", justify="right")
    for state in shown:
        per_kind = [str(s["kinds"][k].get(state, 0) or "") for k in kinds] if len(kinds) > 1 else []
        table.add_row(state, *per_kind, str(s["states"][state]))
    totals = [str(sum(s["kinds"][k].values())) for k in kinds] if len(kinds) > 1 else []
    table.add_row("[bold]total[/]", *totals, f"[bold]{s['rows_total']}[/]")
    console.print(table)
    if s.get("blank_rows"):
        say(f"blank rows skipped: {s['blank_rows']} (empty, or only separators: not in rows.csv)")
    if s.get("patients"):
        say("patients: " + ", ".join(f"{k} {v}" for k, v in s["patients"].items()))
    for kind, counts in (s.get("resources") or {}).items():
        # What the rows described besides themselves (a performer's practitioner): no row of the table counts it.
        if kind != "patient" and kind not in s.get("kinds", {}) and counts:
            say(f"{kind}s (from the rows' columns): " + ", ".join(f"{k} {v}" for k, v in counts.items()))
    if s.get("matching"):
        m = s["matching"]
        say(f"matching ({m.get('mode')}): {m.get('matched', 0)} matched, {m.get('needs-review', 0)} rows "
                      f"need review{' (review.csv)' if m.get('needs-review') else ''}, {m.get('exists', 0)} doses "
                      f"exist already; {s.get('matching_requests', 0)} requests")
    if s.get("achieved_rate"):
        say(f"requests: {s.get('requests')} at {s['achieved_rate']}/s, 429s: {s.get('responses_429', 0)}")
    for why in (s.get("aborted"), s.get("unresponsive")):
        if why:
            say(f"[red]stopped early:[/] {escape(why)}")
    if s.get("settle_problem"):
        say(f"[yellow]left in doubt:[/] {escape(s['settle_problem'])}")
    if s.get("settle_rounds"):
        say(f"unknown outcomes settled in {s['settle_rounds']} round(s) of lookups; search showed a create "
                      f"after {s.get('search_lag_seconds', '?')} s")
    if s.get("interrupted"):
        say("[yellow]interrupted:[/] rows in flight were finished and recorded; the state and this report "
                      "are written. Run the same command again to resume: nothing is sent twice.")
    import polars as pl

    tally = report.tally.filter(pl.col("state") == "rejected")
    if tally.height:
        # Counted from the tally; the row numbers are the first of each code (a run in batches
        # keeps only the first rows of each reason in memory).
        # Each row as file:row, as the warnings name theirs (run_notes), whatever the number of files.
        rejected = report.problems.filter(pl.col("state") == "rejected")
        say("rejects by code:")
        by_code = tally.group_by("error_code").agg(pl.col("rows").sum())
        for code, count in sorted(by_code.iter_rows(), key=lambda kv: str(kv[0])):
            first = rejected.filter(pl.col("error_code").eq_missing(code)).head(WARNING_EXAMPLES).iter_rows(named=True)
            rows = ", ".join(f"{Path(r['source_file']).name}:{r['source_row']}" for r in first)
            more = " ..." if count > WARNING_EXAMPLES else ""
            say(f"  {code:<30} {count:>4}  rows {rows}{more}")
    from etl.progress import run_notes

    for line in run_notes(s):
        say(line, markup=False, highlight=False)
    counts = ", ".join(f"{v} {k}" for k, v in s["states"].items() if v)
    say(f"run {s['run_id']}: {s['rows_total']} rows ({counts})")
    say(f"report: {s.get('report_dir')}")


def command_line() -> None:
    """The ``clinik-etl`` command: :func:`main`, with Python's cyclic garbage collector spared what it
    cannot free.

    The modules' objects (hundreds of thousands, imported before a command starts) and, once it ends,
    the run's are frozen (:func:`gc.freeze`): the collector no longer walks them, neither in the run's
    full collections nor in the ones the interpreter makes as it exits (on a 1,000,000-row validate,
    0.2 s after the report is written). The process ends right after: nothing frozen needs freeing
    but by the system. (A notebook or a test calling :func:`main` in a process that goes on is left
    alone.)
    """
    gc.freeze()
    try:
        main()
    finally:
        gc.freeze()


if __name__ == "__main__":  # pragma: no cover
    command_line()
