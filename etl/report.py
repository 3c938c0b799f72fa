"""The reconciliation report: every input row in exactly one final state.

A report folder holds:

- ``summary.json``: run id, inputs (path, sha256, rows), target, dry-run
  flag, ``rows_total``, ``states`` (count per final state, summing to
  ``rows_total``), the same per kind, the patients created or reused,
  timings and the achieved request rate; built as a :class:`Summary`
  (:class:`ReconcileSummary` for ``reconcile``), whose fields are its keys,
  in order;
- ``rows.csv``: one line per input row (``source_file, source_row, kind,
  source_key, state, resource_id, patient_id, error_code, field, message``);
- ``rejects.csv``: the rejected rows with their original columns and the
  reasons, so a user can fix just those rows and import them again;
- ``payloads.ndjson`` in a dry run: one line per request it would send;
- ``report.html``: the same as one self-contained page, with charts
  (``etl.report_html``).

Reports hold PHI: a folder the tool creates is readable by its owner only, a
folder given as a symbolic link is refused, and every file is created afresh,
owner-only, never through a link (``etl.files``); cells and headers that a
spreadsheet would run as a formula are guarded with a ``'``.
A folder or file that cannot be written (read-only, a full disk) is an
:class:`~etl.errors.OutputError` naming it (:func:`report_output`).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import secrets
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal, Self

import polars as pl
from pydantic import BaseModel, ConfigDict

from etl.errors import OutputError
from etl.files import private_dir, private_text, unguard_formulas, write_csv
from etl.report_html import tally_of, write_html

__all__ = [
    "FINAL_STATES",
    "NOT_CARRIED_REASONS",
    "PROBLEM_STATES",
    "ROW_COLUMNS",
    "InputFacts",
    "NotCarried",
    "NotImported",
    "NoticeFacts",
    "ReconcileSummary",
    "RowWarnings",
    "RunFacts",
    "RunReport",
    "Summary",
    "new_run_id",
    "read_rows",
    "report_folder",
    "report_output",
    "report_path",
    "write_report",
]

FINAL_STATES = (
    "created", "skipped", "rejected", "failed", "unknown", "planned", "changed", "updated",
    "matched", "needs-review", "exists",  # matching what the target holds (etl.matching, etl.dedupe)
)
ROW_COLUMNS = (
    "source_file",
    "source_row",
    "kind",
    "source_key",
    "state",
    "resource_id",
    "patient_id",
    "error_code",
    "field",
    "message",
)


#: States a report lists row by row in its page and summary: the rows that need someone's attention.
PROBLEM_STATES = ("rejected", "failed", "unknown")


# --- summary.json, typed -------------------------------------------------------------------------
# Its keys are a public interface: a field is added, never renamed or removed, and the fields are
# declared in the order the file lists them. A field a run does not set is left out of the file
# (a validate has no "requests", only a Redox run a "destination"): see :meth:`Summary.to_json`.


class _Facts(BaseModel):
    model_config = ConfigDict(extra="forbid")

    def to_json(self) -> dict[str, Any]:
        """The JSON object, in field order, with only the fields that were set (``None`` included when set)."""
        return self.model_dump(mode="json", exclude_unset=True)


class InputFacts(_Facts):
    """What a summary says about one input file."""

    path: str
    sha256: str
    format: str
    encoding: str | None
    delimiter: str | None
    sheet: str | None
    kind: str
    profile: str
    rows: int
    columns_mapped: dict[str, str]


class NoticeFacts(_Facts):
    """A reader or mapping warning about a whole file (``unmapped-columns``, ``encoding-fallback`` ...)."""

    file: str
    code: str
    message: str


class RowWarnings(_Facts):
    """A warning's rows in one file (``unknown-cvx`` ...): how many, and the first row numbers."""

    file: str
    code: str
    rows: list[int]
    count: int
    #: The first distinct cells it was raised on: ``{"column": <source column>, "value": <cell as written>}``
    #: (a ``--redact`` report's redacted fields masked, as in its rows).
    examples: list[dict[str, str | None]] = []


#: Why a source column reaches no payload: no profile field takes it; the field it feeds has no place in
#: the API's bodies; its whole file is not imported (:class:`NotImported`); or ``needs <field>``: the
#: API takes it only beside a field the file does not give (``etl.transform.COMPANIONS``).
NOT_CARRIED_REASONS = ("unmapped", "no API field", "file not imported", "needs")


class NotCarried(_Facts):
    """A source column that no payload carries, and why (one of :data:`NOT_CARRIED_REASONS`; ``needs``
    is followed by the field(s) it needs)."""

    column: str
    reason: str


class NotImported(_Facts):
    """An input file whose rows are not imported (a Synthea ``payers.csv``), or only looked up in
    (``organizations.csv``): ``rows`` counts them, so every row of every file is accounted for."""

    file: str
    name: str
    rows: int
    reason: str


class RunFacts(_Facts):
    """What a kind of run adds to its summary: a dry run its ``requests_planned``, a load what it sent.

    Every field is optional; only those set appear in ``summary.json``, in this order.
    """

    destination: dict[str, str] | None = None  # Redox: {"type": "redox", "route": ...}
    patients: dict[str, int] | None = None  # a load: patients per outcome
    resources: dict[str, dict[str, int]] | None = None  # a load: creates per kind and outcome
    requests: int | None = None
    responses_429: int | None = None
    achieved_rate: float | None = None
    aborted: str | None = None  # why the run stopped (a refusal that stops every send)
    unresponsive: str | None = None  # the run stopped: the target answered nothing for too long
    http_versions: dict[str, int] | None = None
    creates_sent: int | None = None
    interrupted: bool | None = None
    mode: Literal["request", "bulk"] | None = None
    bulk_jobs: list[str] | None = None
    bulk_limit: str | None = None
    disappeared: int | None = None  # rows an earlier load created that this copy of the file no longer has
    requests_planned: dict[str, int] | int | None = None  # a dry run: creates per kind (Redox: bundles)
    quota_exceeded: str | None = None  # a quota 429 stopped the run (exit 5): which quota, when it resets
    retries: int | None = None  # retries spent of the run's budget (429 RATE_LIMITED, connections never opened)
    search_lag_seconds: float | None = None  # measured: how long search took to show one of the run's creates
    settle_rounds: int | None = None  # rounds of lookup and re-send the run's unknown outcomes took
    settle_problem: str | None = None  # why unknown outcomes were left unknown (no safe wait for search)
    matching_requests: int | None = None  # reads made to match patients, practitioners and doses (etl.matching)
    matching: dict[str, Any] | None = None  # what matching found: mode, matched, needs-review, exists ...

    def updated(self, other: RunFacts) -> Self:
        """These facts with those ``other`` sets."""
        return self.model_copy(update={name: getattr(other, name) for name in other.model_fields_set})


class Summary(RunFacts):
    """``summary.json`` of a validate, dry run or load (see the module's notes and the README)."""

    run_id: str
    command: Literal["validate", "load"]
    dry_run: bool
    target: str
    inputs: list[InputFacts]
    rows_total: int
    # Blank rows (empty, or bare separators) the inputs held below their headers: no line in rows.csv,
    # so the inputs' rows are rows_total + blank_rows.
    blank_rows: int | None = None
    states: dict[str, int]  # every final state, summing to rows_total
    kinds: dict[str, dict[str, int]]
    warnings: list[NoticeFacts | RowWarnings]
    timings: dict[str, float]
    batch_rows: int
    report_dir: str | None = None  # set once the report folder is known
    not_carried: dict[str, list[NotCarried]] | None = None  # file -> its columns no payload carries, in full
    not_imported: list[NotImported] | None = None  # files read but not imported (side files of an export)

    # The run's own facts first, then what its kind adds (RunFacts), then batch_rows and report_dir.
    _ORDER: ClassVar[tuple[str, ...]] = (
        "run_id", "command", "dry_run", "target", "inputs", "rows_total", "blank_rows", "states", "kinds", "warnings",
        "timings",
        *RunFacts.model_fields, "batch_rows", "report_dir", "not_carried", "not_imported",
    )

    def to_json(self) -> dict[str, Any]:
        dumped = super().to_json()
        return {name: dumped[name] for name in self._ORDER if name in dumped}


class ReconcileSummary(_Facts):
    """``summary.json`` of ``clinik-etl reconcile``."""

    run_id: str
    command: Literal["reconcile"]
    target: str
    in_doubt: int
    states: dict[str, int]
    verified: dict[str, int] | None
    unresponsive: str | None
    report_dir: str


@dataclass
class RunReport:
    """What a validate or load run did, row by row.

    ``held`` is the row table when the run kept it in memory; a run in batches leaves it out
    (it may have millions of lines) and :attr:`rows` reads ``rows.csv`` back on demand.

    ``summary`` is ``summary.json`` as a plain dict (:meth:`Summary.to_json`): the runs build the typed
    :class:`Summary`, and this is its JSON form, so what a notebook reads (``report.summary["states"]``)
    is exactly what the file holds, and ``json.dumps``, ``.get`` and ``in`` work on it as on any dict.
    """

    run_id: str
    held: pl.DataFrame | None  # ROW_COLUMNS, one line per input row
    summary: dict[str, Any]
    folder: Path | None = None
    warnings: list[str] = field(default_factory=list)
    held_problems: pl.DataFrame | None = None  # the rows in PROBLEM_STATES, when ``held`` is left out
    held_tally: pl.DataFrame | None = None  # their counts (tally_of), when held_problems is a sample

    @property
    def rows(self) -> pl.DataFrame:
        """One line per input row (ROW_COLUMNS)."""
        if self.held is None:
            if self.folder is None:
                raise ValueError("this report's rows were not kept and it has no folder to read them from")
            self.held = read_rows(self.folder / "rows.csv")
        return self.held

    @property
    def problems(self) -> pl.DataFrame:
        """The rejected, failed and unknown rows (ROW_COLUMNS), in file order."""
        if self.held is None and self.held_problems is not None:
            return self.held_problems
        return self.rows.filter(pl.col("state").is_in(PROBLEM_STATES))

    @property
    def tally(self) -> pl.DataFrame:
        """How many problem rows there are per file, state, code and column (``TALLY_KEYS`` and ``rows``).

        A run in batches keeps only the first rows of each such group in :attr:`problems` (so a file
        where every row is rejected still takes bounded memory); the tally counts them all.
        """
        if self.held_tally is not None:
            return self.held_tally
        return tally_of(self.problems)

    @property
    def rows_total(self) -> int:
        """How many input rows the run accounted for."""
        return int(self.summary["rows_total"])

    @property
    def states(self) -> dict[str, int]:
        """Final state -> row count."""
        return dict(self.summary["states"])

    def exit_code(self) -> int:
        """The CLI exit code this run earns (see ``etl.errors.ExitCode``)."""
        from etl.errors import ExitCode

        if self.summary.get("interrupted"):
            return ExitCode.INTERRUPTED
        if self.summary.get("quota_exceeded"):
            return ExitCode.QUOTA
        if self.summary.get("aborted"):
            return ExitCode.API
        states = self.states
        if states.get("failed") or states.get("unknown"):
            return ExitCode.FAILED
        if states.get("rejected") or states.get("needs-review"):  # a person must look at them either way
            return ExitCode.REJECTED
        return ExitCode.OK


def read_rows(path: Path) -> pl.DataFrame:
    """A report's ``rows.csv`` read back, typed and valued as before it was written (formula guard removed)."""
    return (
        pl.read_csv(path, infer_schema=False)
        .pipe(unguard_formulas)
        .with_columns(pl.col("source_row").cast(pl.UInt32))
    )


@contextlib.contextmanager
def report_output(folder: Path) -> Iterator[None]:
    """Writing into the report ``folder``: an OSError (a read-only folder, a full disk) becomes an
    :class:`~etl.errors.OutputError` that names the folder, or the file when the system said which."""
    try:
        yield
    except OSError as exc:
        where = f"{exc.filename}: " if exc.filename is not None else ""
        raise OutputError(
            str(folder),
            f"cannot write the report: {where}{exc.strerror or exc} (give --report-dir a writable folder with room)",
        ) from exc


@contextlib.contextmanager
def report_folder(folder: Path) -> Iterator[Path]:
    """Make the report folder before a run sends anything, so that one that cannot be written stops the run
    first (an :class:`~etl.errors.OutputError`); if the run fails before writing into it, it is removed again."""
    existed = folder.is_dir()
    with report_output(folder):
        private_dir(folder)
    try:
        yield folder
    except BaseException:
        if not existed:
            with contextlib.suppress(OSError):
                folder.rmdir()  # only if still empty
        raise


def write_report(
    report: RunReport,
    folder: Path,
    *,
    rejects: Mapping[str, pl.DataFrame] | None = None,
) -> Path:
    """Write ``summary.json``, ``rows.csv`` and ``rejects.csv`` into ``folder``."""
    private_dir(folder)
    report.folder = folder
    with report_output(folder):
        write_csv(report.rows.select(ROW_COLUMNS), folder / "rows.csv")
        frames = [f for f in (rejects or {}).values() if f.height]
        if frames:
            combined = pl.concat(frames, how="diagonal_relaxed")
        else:
            combined = pl.DataFrame(schema={"source_file": pl.String, "source_row": pl.UInt32, "reasons": pl.String})
        write_csv(combined, folder / "rejects.csv")
        report.summary["report_dir"] = str(folder)
        write_summary(report.summary, folder)
        write_html(report.summary, report.problems, folder / "report.html", report.tally)
    return folder


#: Problem rows kept per (file, state, code, column) by a run in batches: enough for every listing.
SAMPLE_PER_GROUP = 200


def write_summary(summary: dict[str, Any], folder: Path) -> Path:
    """``summary.json``, owner-only."""
    path = folder / "summary.json"
    with report_output(folder), private_text(path) as fh:
        json.dump(summary, fh, indent=2, sort_keys=False)
        fh.write("\n")
    return path


def count_states(rows: pl.DataFrame) -> tuple[dict[str, int], dict[str, dict[str, int]]]:
    """(state -> count, kind -> state -> count), with every final state present.

    ``rows`` is a report's rows, or their counts already (``kind, state, len``).
    """
    overall = {s: 0 for s in FINAL_STATES}
    per_kind: dict[str, dict[str, int]] = {}
    counts = rows if "len" in rows.columns else rows.group_by("kind", "state").len()
    for kind, state, n in counts.group_by("kind", "state").agg(pl.sum("len")).sort("kind", "state").iter_rows():
        overall[state] += n
        per_kind.setdefault(kind, {s: 0 for s in FINAL_STATES})[state] = n
    return overall, per_kind


def new_run_id() -> str:
    """A run's id: its UTC start time and six random hex digits (``20250102T030405Z-a1b2c3``)."""
    return dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ") + "-" + secrets.token_hex(3)


def report_path(report_dir: Path | None, run_id: str) -> Path:
    """A run's report folder: ``reports/<run id>`` by default; ``{run_id}`` in ``report_dir`` is replaced
    (a scheduled job gives each run its own folder under one root)."""
    if report_dir is None:
        return Path("reports") / run_id
    return Path(str(report_dir).replace("{run_id}", run_id))
