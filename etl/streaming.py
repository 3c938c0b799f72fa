"""A load in bounded memory: planned in batches, sent a part at a time, reported from disk.

Every ClinikAPI load takes this road (``load_files``; a file that fits one batch is one
batch). The run is the batched plan (``etl.batches``) with its creates planned as it goes, then
the sends:

1. **Plan.** Each batch is validated and planned; its report rows and its creates (JSON bodies)
   go to disk. A reference that the run, the crosswalk and the state store cannot explain waits
   for the end of its stage; then the target is asked about it (``GET /v1/<kind>/<id>``), once
   per distinct value.
2. **Send.** Stage by stage, the creates are read back :data:`SEND_PART` at a time and given to
   the loader (:meth:`etl.load.loader.Loader.run_part`). Each part's results go to disk; the
   loader keeps only those that did not create (a child names them in its failure), and reads a
   created parent's id back from the state store.
3. **Report.** Each batch's report rows take their creates' outcomes (a join with the results),
   and the report is written from the parts, as validate's is.

What stays in memory grows with the number of distinct keys (see ``etl.batches``) and the
results table (about 100 bytes a create), not with the file. The golden reports
(``tests/golden``) prove the batch size never changes the outcome.

The load's shared parts live here too, public for :mod:`etl.redox` and ``reconcile_state``:
the target (:func:`open_target`), the loader (:func:`new_loader`), the results table and how report
rows take it (:func:`results_table`, :func:`with_outcomes`), the summary's extras.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import quote

import polars as pl

from etl.batches import Run, planned_in_batches
from etl.errors import LookupFailed, NoAnswerError, UsageError
from etl.files import private_dir, write_csv
from etl.progress import LoadEstimate, Progress
from etl.report import RunFacts, RunReport, new_run_id, report_folder, report_path
from etl.settings import NO_ANSWER_LIMIT, Settings
from schemas.canonical import KIND_SPECS
from schemas.limits import ROUTES

if TYPE_CHECKING:
    import httpx

    from etl.load.client import ApiClient
    from etl.load.loader import Loader, LoadOptions, Result, Send
    from etl.load.state import StateStore
    from etl.load.throttle import Throttle

__all__ = [
    "GONE",
    "SEND_PART",
    "apply_outcomes",
    "creates_in_parts",
    "crosswalk_of",
    "disappeared_from",
    "existing_state",
    "load_extra",
    "load_in_batches",
    "loader_stats",
    "new_loader",
    "open_target",
    "outcome_patients",
    "results_table",
    "sandbox_db",
    "sends_of",
    "stop_on_signals",
    "target_has",
    "target_identity",
    "unsent_count",
    "with_outcomes",
]
# Creates given to the loader at a time: a multiple of a bulk import's 10,000 records, so parts
# do not cut bulk batches short.
SEND_PART = 100_000


def load_in_batches(
    paths: Sequence[str | Path],
    settings: Settings,
    progress: Progress,
    *,
    job: str | None = None,
) -> RunReport:
    """Import inputs in bounded memory, a batch at a time; write the report."""
    from etl.load.lock import state_lock
    from etl.load.state import StateStore

    run_id = new_run_id()
    # The report folder first, under the lock: one that cannot take the report stops the run before the
    # sandbox or the state store is opened, and long before anything is sent.
    with state_lock(settings.state, wait=settings.wait, on_wait=progress.note), report_folder(
        report_path(settings.report_dir, run_id)
    ), open_target(settings) as (base_url, key, identity), StateStore(settings.state, target=identity) as state:
        target = base_url if settings.base_url else "embedded sandbox"
        lookup = _Lookup(base_url, key, settings)
        with planned_in_batches(
            paths, settings, progress, payloads=True, state=state, lookup=lookup, rows_csv=False, run_id=run_id
        ) as run:
            state.start_run(run_id, "run" if job else "load", job=job)  # once planned
            t0 = time.perf_counter()
            results, facts = asyncio.run(_send(run, base_url, key, state, settings, progress, lookup))
            run.timings["load"] = time.perf_counter() - t0
            apply_outcomes(run, results)
            disappeared = _disappeared(run, state)
            facts.disappeared = disappeared.height
            report = run.write(facts, command="load", target=target)
            # Written even when empty.
            write_csv(crosswalk_of(results).sort("kind", "source_key"), run.folder / "crosswalk.csv")
            if disappeared.height:
                write_csv(disappeared, run.folder / "disappeared.csv")
            state.finish_run(run_id, {"states": report.states})
    return report


class _Lookup:
    """Asks the target which of some (kind, id) pairs it holds (between batches: no loop is running)."""

    def __init__(self, base_url: str, key: str, settings: Settings) -> None:
        self.base_url, self.key, self.settings = base_url, key, settings
        self.requests = 0
        self.protocols: Counter[str] = Counter()
        self.answers: dict[tuple[str, str], bool] = {}  # each pair is asked once a run

    def __call__(self, pairs: list[tuple[str, str]]) -> set[tuple[str, str]]:
        from etl.load.client import ApiClient, http_client

        async def ask(new: list[tuple[str, str]]) -> None:
            async with http_client(self.base_url, self.settings) as http:
                client = ApiClient(http, self.key)
                client.protocols = self.protocols
                try:
                    for kind, value in new:
                        self.answers[(kind, value)] = await target_has(
                            client, kind, value, no_answer_limit=self.settings.no_answer_limit
                        )
                finally:
                    self.requests += client.requests

        new = [pair for pair in dict.fromkeys(pairs) if pair not in self.answers]
        if new:
            asyncio.run(ask(new))
        return {pair for pair in pairs if self.answers[pair]}


async def _send(
    run: Run, base_url: str, key: str, state: StateStore, settings: Settings, progress: Progress, lookup: _Lookup
) -> tuple[pl.DataFrame, RunFacts]:
    """Send the planned creates stage by stage, a part at a time; the results table and the summary's extras."""
    from etl.load.client import ApiClient, http_client
    from etl.load.loader import LoadOptions
    from etl.load.throttle import Throttle

    throttle = Throttle(settings.rate)
    estimate = LoadEstimate(progress, settings.rate)
    progress.pace(lambda: throttle.rate)
    window = settings.consistency_window if settings.base_url else 0.0
    options = LoadOptions(
        settings.rate, settings.concurrency, window, update=settings.update, no_answer_limit=settings.no_answer_limit
    )
    protocols = lookup.protocols  # the lookups made while planning count too
    parts: list[Path] = []
    async with http_client(base_url, settings) as http:
        client = ApiClient(http, key, on_response=estimate.chain(throttle.observe))
        client.protocols = protocols
        unsent = _unsent(run, state)
        estimate.plan(unsent)
        loader = await new_loader(settings, http, key, client, state, throttle, options, run.run_id, progress,
                                        unsent)
        aliases = {(k, v): a for k, v, a in run.keys.aliases.iter_rows() if v != a}
        await loader.begin(aliases=aliases, known_ids=run.keys.known)
        try:
            with stop_on_signals(loader):
                for frame in creates_in_parts(run):
                    results = await loader.run_part(sends_of(frame))
                    parts.append(run.work / f"results-{len(parts):06d}.ipc")
                    results_table(results).write_ipc(parts[-1])
        finally:
            loader.end()
            loader.stats.requests += lookup.requests
    table = pl.concat([pl.read_ipc(p) for p in parts]) if parts else results_table({})
    return table, load_extra(loader, table, protocols)


def creates_in_parts(run: Run) -> Iterator[pl.DataFrame]:
    """The planned creates, stage by stage, :data:`SEND_PART` at a time (a part never spans two stages)."""
    assert run.keys.payloads is not None
    for _, frames in run.keys.payloads.stages():
        held: list[pl.DataFrame] = []
        size = 0
        for frame in frames:
            held.append(frame)
            size += frame.height
            while size >= SEND_PART:
                whole = pl.concat(held)
                yield whole.head(SEND_PART)
                rest = whole.slice(SEND_PART)
                held, size = [rest], rest.height
        if size:
            yield pl.concat(held)


def sends_of(frame: pl.DataFrame, route: Callable[[str], str] | None = None) -> list[Send]:
    """A part of planned creates (:func:`creates_in_parts`) as the loader's sends; ``route``: the path of
    a kind's creates (by default its ClinikAPI route)."""
    from etl.load.loader import Send

    route = route or (lambda kind: ROUTES[KIND_SPECS[kind].schema])
    return [
        Send(kind, route(kind), key, body, body_hash, source_file=file)
        for kind, key, body, body_hash, file in frame.select(
            "kind", "source_key", "body", "body_hash", "source_file"
        ).iter_rows()
    ]


def _unsent(run: Run, state: StateStore) -> int:
    """About how many creates the load will send: those the state store does not hold as created."""
    return sum(
        unsent_count(state, str(kind), mine.get_column("source_key").to_list())
        for frame in creates_in_parts(run)
        for (kind,), mine in frame.group_by("kind")
    )


def apply_outcomes(run: Run, table: pl.DataFrame) -> None:
    """Each part's report rows with their creates' outcomes."""
    patients = outcome_patients(table)
    for part in list(run.parts):
        rows = pl.read_ipc(part)
        # The part's own results first (a semi join hashes the part, not the whole table): a third
        # less memory at 1,000,000 rows than joining with everything, and quicker.
        mine = table.join(rows.select("kind", "source_key"), on=["kind", "source_key"], how="semi")
        theirs = patients.join(rows.select("patient_key"), on="patient_key", how="semi")
        run.rewrite(part, with_outcomes(rows, mine, theirs))


def _disappeared(run: Run, state: StateStore) -> pl.DataFrame:
    """Rows an earlier run created from a file of the same name that this copy no longer has (never deleted)."""
    found = (disappeared_from(state, x.file, x.kind, pl.scan_ipc(x.parts)) for x in run.inputs if x.parts)
    return pl.concat([pl.DataFrame(schema=GONE), *found])


def sandbox_db(settings: Settings) -> Path:
    return settings.state.with_name(settings.state.stem + ".sandbox.sqlite")


def target_identity(settings: Settings) -> str:
    """What a state store is bound to: the base URL, or the embedded sandbox's database."""
    return settings.base_url or f"embedded-sandbox:{sandbox_db(settings).resolve()}"


@contextlib.contextmanager
def existing_state(settings: Settings) -> Iterator[StateStore | None]:
    """The state store, read for what is already loaded, only if it exists (a dry run creates nothing)."""
    from etl.load.state import StateStore

    if not settings.state.is_file():
        yield None
        return
    with StateStore(settings.state, target=target_identity(settings)) as state:
        yield state


@contextlib.contextmanager
def open_target(settings: Settings) -> Iterator[tuple[str, str, str]]:
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

    db = sandbox_db(settings)
    private_dir(db.parent)
    with SandboxServer(SandboxConfig(db_path=str(db))) as server:
        yield server.base_url, server.api_key, target_identity(settings)


async def target_has(client: ApiClient, kind: str, value: str, *, no_answer_limit: int = NO_ANSWER_LIMIT) -> bool:
    """Whether the target holds a ``kind`` with this ClinikAPI id (a reference nothing in the run explains).

    These lookups come before any create: once ``no_answer_limit`` requests in a row got no answer at all,
    :class:`~etl.errors.NoAnswerError` ends the run (nothing was sent) rather than wait on a silent target
    for every reference.
    """
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


def load_extra(loader: Loader, table: pl.DataFrame, protocols: Counter[str]) -> RunFacts:
    """What a ClinikAPI load adds to the summary, from its loader and its results table."""
    per_kind: dict[str, dict[str, int]] = {}
    for kind, state, n in table.group_by("kind", "r_state", maintain_order=True).len().iter_rows():
        per_kind.setdefault(kind, {})[state] = n
    facts = RunFacts(
        patients=per_kind.get("patient", {}),
        resources=per_kind,
        http_versions=dict(protocols),
        creates_sent=loader.stats.creates,
        interrupted=loader.stopping,
    )
    return facts.updated(loader_stats(loader)).updated(_bulk_extra(loader))


def crosswalk_of(table: pl.DataFrame) -> pl.DataFrame:
    """The ids a load learnt (``kind, source_key, resource_id``), from its results table: crosswalk.csv."""
    return table.filter(pl.col("r_id").is_not_null()).select("kind", "source_key", pl.col("r_id").alias("resource_id"))


def loader_stats(loader: Loader) -> RunFacts:
    """What any load's summary says of its sending: requests, 429s, the rate achieved, an abort."""
    return RunFacts(
        requests=loader.stats.requests,
        responses_429=loader.stats.retries_429,
        achieved_rate=round(loader.stats.requests / loader.stats.send_seconds, 2)
        if loader.stats.send_seconds
        else None,
        aborted=str(loader.aborted) if loader.aborted else None,
        unresponsive=loader.unresponsive,  # the run stopped: the target answered nothing for too long
    )


async def new_loader(
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


def _bulk_extra(loader: Loader) -> RunFacts:
    """The summary's ``mode`` (and, in bulk mode, its jobs and any hourly-limit stop)."""
    jobs = getattr(loader, "jobs", None)
    if jobs is None:
        return RunFacts(mode="request")
    return RunFacts(mode="bulk", bulk_jobs=list(jobs), bulk_limit=getattr(loader, "limit_note", None))


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


@contextlib.contextmanager
def stop_on_signals(loader: Loader) -> Iterator[None]:
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
