"""The ``clinik-etl`` command: options in, one library call, a summary out.

Library errors become a one-line message and a documented exit code here;
a traceback appears only with ``--debug``.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click
from pydantic import ValidationError
from rich.console import Console
from rich.table import Table as RichTable

from etl.errors import EtlError, ExitCode
from etl.report import FINAL_STATES, RunReport
from etl.settings import DEFAULT_STATE, Settings, read_key_file

F = TypeVar("F", bound=Callable[..., Any])

EXIT_CODES_HELP = """\b
Exit codes:
  0  every row created, skipped or planned (validate: every row valid)
  1  some rows were rejected by validation
  2  usage error, unreadable input, unusable profile or state store
  3  some rows failed at the API or have an unknown outcome
  4  the API refused the run (bad key or scope); nothing more was sent
"""

err = Console(stderr=True, highlight=False)
out = Console(highlight=False)


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
            err.print(f"[bold red]error:[/] {exc}", markup=True, soft_wrap=True)
            sys.exit(exc.exit_code)
        except ValidationError as exc:
            if debug:
                raise
            problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors(include_input=False))
            err.print(f"[bold red]error:[/] invalid setting: {problems}", markup=True, soft_wrap=True)
            sys.exit(ExitCode.USAGE)

    return wrapper  # type: ignore[return-value]


def input_options(func: F) -> F:
    """Options shared by every command that reads input files."""
    func = click.option("--sheet", metavar="NAME", help="Excel sheet to read (default: the first).")(func)
    func = click.option(
        "--profile",
        type=click.Path(dir_okay=False, path_type=Path),
        help="Mapping profile (TOML or YAML) naming which source column feeds which field. "
        "Default: match the usual header names.",
    )(func)
    func = click.option(
        "--report-dir",
        type=click.Path(file_okay=False, path_type=Path),
        help="Folder for the report (default: reports/<run id>).",
    )(func)
    return func


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
@handle_errors
def validate(files: tuple[Path, ...], profile: Path | None, sheet: str | None, report_dir: Path | None) -> None:
    """Check FILES against every documented limit; send nothing.

    Writes summary.json, rows.csv and rejects.csv to the report folder.
    """
    from etl.pipeline import validate_files

    settings = Settings(profile=profile, sheet=sheet, report_dir=report_dir)
    report = validate_files(list(files), settings)
    print_summary(report)
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
@click.option("--live", is_flag=True, help="Allow a live (clk_live_) key: real patient data.")
@click.option("--dry-run", is_flag=True, help="Send nothing; write payloads.ndjson with every request planned.")
@click.option("--rate", type=float, help="Requests per second. Default: paced by the server's rate-limit headers.")
@click.option("--concurrency", type=int, default=8, show_default=True, help="Requests in flight at once.")
@click.option("--timeout", type=float, default=30.0, show_default=True, help="Seconds to wait for an answer.")
@click.option(
    "--consistency-window",
    type=float,
    default=10.0,
    show_default=True,
    help="Seconds before search reliably shows a create (used to resolve unknown outcomes).",
)
@click.option(
    "--state",
    type=click.Path(dir_okay=False, path_type=Path),
    default=DEFAULT_STATE,
    show_default=True,
    help="State store (SQLite): what was sent and the ids that came back. Reuse it to resume.",
)
@handle_errors
def load(
    files: tuple[Path, ...],
    profile: Path | None,
    sheet: str | None,
    report_dir: Path | None,
    base_url: str | None,
    api_key_file: Path | None,
    live: bool,
    dry_run: bool,
    rate: float | None,
    concurrency: int,
    timeout: float,
    consistency_window: float,
    state: Path,
) -> None:
    """Import FILES into ClinikAPI (by default the embedded sandbox).

    Every valid row becomes a Patient (created once per patient id) and an
    Immunization; re-running with the same --state sends nothing twice and
    resumes a run that was killed.
    """
    from etl.pipeline import load_files

    values: dict[str, Any] = dict(
        profile=profile,
        sheet=sheet,
        report_dir=report_dir,
        base_url=base_url,
        live=live,
        dry_run=dry_run,
        rate=rate,
        concurrency=concurrency,
        timeout=timeout,
        consistency_window=consistency_window,
        state=state,
    )
    if api_key_file is not None:
        values["api_key"] = read_key_file(api_key_file)
    settings = Settings(**values)
    report = load_files(list(files), settings, progress=None)
    print_summary(report)
    sys.exit(report.exit_code())


@main.command()
@click.option("--host", default="127.0.0.1", show_default=True, help="Interface to listen on (loopback only).")
@click.option("--port", type=int, default=8787, show_default=True, help="Port to listen on (0: any free port).")
@click.option("--db", type=click.Path(dir_okay=False, path_type=Path), help="SQLite file (default: temporary).")
@click.option("--rate-limit", type=int, help="Requests allowed per window per key (default: unlimited).")
@click.option("--window", type=float, default=3600.0, show_default=True, help="Rate-limit window in seconds.")
@handle_errors
def sandbox(host: str, port: int, db: Path | None, rate_limit: int | None, window: float) -> None:
    """Run a local ClinikAPI sandbox until interrupted.

    It prints its base URL and a generated clk_test_ key to use with
    `load --base-url`.
    """
    from etl.sandbox import SandboxConfig
    from etl.sandbox.server import serve_forever

    config = SandboxConfig(db_path=str(db) if db else None, rate_limit=rate_limit, window=window)
    serve_forever(config, host, port)


def print_summary(report: RunReport, stream: Console | None = None) -> None:
    """The short human summary printed at the end of a run."""
    console = stream or out
    s = report.summary
    title = f"clinik-etl {s['command']}{' (dry run)' if s.get('dry_run') else ''}"
    table = RichTable(title=title, title_justify="left")
    table.add_column("state")
    table.add_column("rows", justify="right")
    for state in FINAL_STATES:
        if s["states"].get(state):
            table.add_row(state, str(s["states"][state]))
    table.add_row("[bold]total[/]", f"[bold]{s['rows_total']}[/]")
    console.print(table)
    if s.get("patients"):
        console.print("patients: " + ", ".join(f"{k} {v}" for k, v in s["patients"].items()))
    if s.get("achieved_rate"):
        console.print(f"requests: {s.get('requests')} at {s['achieved_rate']}/s, 429s: {s.get('responses_429', 0)}")
    if s.get("aborted"):
        console.print(f"[red]stopped early:[/] {s['aborted']}")
    rejected = report.rows.filter(report.rows["state"] == "rejected")
    if rejected.height:
        console.print("rejects by code:")
        for code, frame in sorted(rejected.group_by("error_code"), key=lambda kv: str(kv[0][0])):
            rows = ", ".join(str(r) for r in frame["source_row"].head(5).to_list())
            more = " ..." if frame.height > 5 else ""
            console.print(f"  {code[0]:<30} {frame.height:>4}  rows {rows}{more}")
    counts = ", ".join(f"{v} {k}" for k, v in s["states"].items() if v)
    console.print(f"run {s['run_id']}: {s['rows_total']} rows ({counts})")
    console.print(f"report: {s.get('report_dir')}")


if __name__ == "__main__":  # pragma: no cover
    main()
