"""The send stage: a load in bounded memory, planned in batches, sent a part at a time, reported from disk.

Every load takes this road, whatever its destination (:class:`etl.destination.Destination`:
ClinikAPI by default, Redox with ``--target redox``; a file that fits one batch is one
batch). The run is the batched plan (``etl.plan``) with its creates planned as it goes, then
the sends:

1. **Plan.** Each batch is validated and planned; its report rows and its creates (JSON bodies)
   go to disk. A reference that the run, the crosswalk and the state store cannot explain waits
   for the end of its stage; then the target is asked about it (``GET /v1/<kind>/<id>``), once
   per distinct value.
2. **Send.** Stage by stage, the creates are read back :data:`SEND_PART` at a time. Those an
   earlier run created and that have not changed are skipped in set operations (a join with the
   state store: :func:`etl.load.reimport.skipped_and_unsent`, before any client is opened; a weekly
   re-import of an unchanged export sends, and builds, nothing a row, and opens no HTTP client); the
   rest are given to the loader
   (:meth:`etl.load.loader.Loader.run_part`). Each part's results go to disk; the
   loader keeps only those that did not create (a child names them in its failure), and reads a
   created parent's id back from the state store.
3. **Report.** Each batch's report rows take their creates' outcomes (a join with the results),
   and the report is written from the parts, as validate's is.

What stays in memory grows with the number of distinct keys (see ``etl.plan``) and the
results table (about 100 bytes a create), not with the file. The golden reports
(``tests/golden``) prove the batch size never changes the outcome.

What differs per destination (routes, target, client, lookups, bulk, the summary's extras) is
asked of the destination; the send loop, the state store, the report, progress and signals are
the same for all. The results table and how report rows take it (:func:`results_table`,
:func:`with_outcomes`) are public for ``reconcile_state`` and the tests.
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

import polars as pl

from etl.clinikapi import ClinikApi
from etl.destination import Destination, Lookup, Target, loader_stats
from etl.files import write_csv
from etl.plan import Run, planned_in_batches
from etl.progress import LoadEstimate, Progress
from etl.report import RunFacts, RunReport, new_run_id, report_folder, report_path
from etl.rules import format_text
from etl.settings import Settings

if TYPE_CHECKING:
    from etl.load.loader import Loader, Result, Send
    from etl.load.state import StateStore

__all__ = [
    "GONE",
    "SEND_PART",
    "apply_outcomes",
    "creates_in_parts",
    "disappeared_from",
    "load_in_batches",
    "matcher_for",
    "outcome_patients",
    "results_table",
    "sends_of",
    "skipped_table",
    "stop_on_signals",
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
    destination: Destination | None = None,
    job: str | None = None,
) -> RunReport:
    """Import inputs into ``destination`` (ClinikAPI by default) in bounded memory, a batch at a time;
    write the report (the destination adds its own facts to the summary: :meth:`Destination.run_facts`)."""
    from etl.load.lock import state_lock
    from etl.load.state import StateStore

    destination = destination or ClinikApi()
    destination.check_mode(settings)
    state_path = destination.state_path(settings)
    run_id = new_run_id()
    # The report folder first, under the lock: one that cannot take the report stops the run before the
    # sandbox or the state store is opened, and long before anything is sent.
    with state_lock(state_path, wait=settings.wait, on_wait=progress.note), report_folder(
        report_path(settings.report_dir, run_id)
    ), destination.open(settings) as target, StateStore(state_path, target=target.identity) as state:
        lookup = destination.lookup(target, settings)
        with planned_in_batches(
            paths, settings, progress, payloads=True, state=state, lookup=lookup, rows_csv=False, run_id=run_id,
            destination=destination, matcher=matcher_for(destination, target, settings, progress),
        ) as run:
            state.start_run(run_id, "run" if job else "load", job=job)  # once planned
            t0 = time.perf_counter()
            results, loader, protocols = asyncio.run(_send(run, destination, target, state, settings, progress,
                                                           lookup))
            run.timings["load"] = time.perf_counter() - t0
            run.timings.update(destination.timings())
            # The results are kept under the state store's kinds; the report's rows under their own.
            kinds = results.get_column("kind").replace_strict(
                {k: destination.report_kind(k) for k in results.get_column("kind").unique()},
                return_dtype=pl.String,
            )
            apply_outcomes(run, results.with_columns(kinds.alias("kind")))
            run.link_duplicates()  # a dose given twice in the files shows its first row's id
            facts = destination.run_facts().updated(loader_stats(loader)).updated(
                destination.load_extra(loader, results, protocols)
            )
            disappeared = _disappeared(run, state) if destination.tracks_disappeared else None
            if disappeared is not None:
                facts.disappeared = disappeared.height
            report = run.write(facts, command="load", target=target.name)
            for name, frame in destination.extra_files(results).items():  # written even when empty
                write_csv(frame, run.folder / name)
            if disappeared is not None and disappeared.height:
                write_csv(disappeared, run.folder / "disappeared.csv")
            lag = {"search_lag_seconds": loader.search_lag} if loader.search_lag is not None else {}
            state.finish_run(run_id, {"states": report.states, **lag})  # a later run's lag when it has none
    return report


def matcher_for(
    destination: Destination, target: Target, settings: Settings, progress: Progress
) -> Callable[[Run], None] | None:
    """What matches a load's creates against the target (:class:`etl.matching.Matcher`), when it can search;
    a destination without search gets the in-file dose check only, and the run says so."""
    from etl.matching import Matcher

    if not destination.can_search:
        if not settings.dedupe_doses:
            return None
        progress.note(f"{destination.name} has no search: doses are de-duplicated within the run's files only, "
                      "and patients are not matched against the target")
        said = {"mode": "off (no search)", "dedupe_doses": "within the run's files only (no search)"}
        return lambda run: run.add_facts(RunFacts(matching=said))
    if settings.match == "off" and not settings.dedupe_doses:
        return None
    return Matcher(target.base_url, target.key, settings, progress)


async def _send(
    run: Run, destination: Destination, target: Target, state: StateStore, settings: Settings, progress: Progress,
    lookup: Lookup | None,
) -> tuple[pl.DataFrame, Loader, Counter[str]]:
    """Send the planned creates stage by stage, a part at a time; the results table, the loader, and the HTTP
    versions of the responses.

    What an earlier run created and that has not changed is found first, for every part, in set
    operations (:func:`etl.load.reimport.skipped_and_unsent`); the loader gets the rest. A load left with
    nothing to send (a weekly re-import of an unchanged export: every row skipped), nothing halted and no
    bulk import of an earlier run to poll opens no HTTP client: its loader is built over one that sends
    nothing (:func:`etl.load.client.idle_client`)."""
    from etl.load.bulk import open_batches
    from etl.load.client import http_client, idle_client
    from etl.load.reimport import skipped_and_unsent
    from etl.load.throttle import Throttle

    throttle = Throttle(settings.rate)
    estimate = LoadEstimate(progress, settings.rate)
    progress.pace(lambda: throttle.rate)
    options = destination.load_options(settings)
    protocols = destination.protocols(lookup)  # the lookups made while planning count too
    # Each part's creates an earlier run made, unchanged (kept in memory: the results table is, at the end).
    skips: list[pl.DataFrame] = []
    kinds: dict[str, None] = {}
    unsent = left = 0
    for frame in creates_in_parts(run):
        kinds.update(dict.fromkeys(frame.get_column("kind").unique(maintain_order=True)))
        earlier, n = skipped_and_unsent(state, frame)
        unsent += n
        left += frame.height - earlier.height
        skips.append(earlier)
    estimate.plan(unsent)
    idle = not left and run.halt is None and not open_batches(state)
    sent: list[Path | None] = [None] * len(skips)  # a part's results from the loader
    async with idle_client(target.base_url) if idle else http_client(target.base_url, settings) as http:
        client = destination.client(http, target.key, on_response=estimate.chain(throttle.observe),
                                    protocols=protocols)
        loader = await destination.new_loader(settings, http, target, client, state, throttle, options, run.run_id,
                                              progress, unsent)
        if run.halt is not None:  # refused before anything was sent (a quota met while matching)
            loader.aborted = run.halt
        if destination.resolves_references:
            aliases = {(k, v): a for k, v, a in run.keys.aliases.iter_rows() if v != a}
            # Kept for later stages (a practitioner keyed by NPI, named by its provider id); a name is not kept.
            state.add_aliases((k, v, a) for (k, v), a in aliases.items() if not v.startswith("name:"))
            await loader.begin(aliases=aliases, known_ids=run.keys.known)
        else:  # nothing refers to another create
            await loader.begin()
        try:
            with stop_on_signals(loader):
                for index, frame in enumerate(() if idle else creates_in_parts(run)):
                    rest = frame.join(skips[index].select("kind", "source_key"), on=["kind", "source_key"],
                                      how="anti", maintain_order="left")
                    if rest.height:
                        results = await loader.run_part(sends_of(rest, destination.route))
                        sent[index] = run.work / f"results-{index:06d}.ipc"
                        results_table(results).write_ipc(sent[index])
        finally:
            loader.end()
            loader.stats.requests += destination.lookup_requests(lookup)
    for kind in kinds:
        progress.finish(kind)
    # A part's skipped results, then the loader's, part by part (as they were planned).
    table = pl.concat([results_table({}), *(
        frame for earlier, results in zip(skips, sent, strict=True)
        for frame in (skipped_table(earlier), pl.read_ipc(results) if results else None) if frame is not None
    )])
    return table, loader, protocols


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


def sends_of(frame: pl.DataFrame, route: Callable[[str], str]) -> list[Send]:
    """A part of planned creates (:func:`creates_in_parts`) as the loader's sends; ``route``: the path of
    a kind's creates (:meth:`etl.destination.Destination.route`)."""
    from etl.load.loader import Send

    return [
        Send(kind, route(kind), key, body, body_hash, source_file=file)
        for kind, key, body, body_hash, file in frame.select(
            "kind", "source_key", "body", "body_hash", "source_file"
        ).iter_rows()
    ]


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


def skipped_table(earlier: pl.DataFrame) -> pl.DataFrame:
    """Results (as :func:`results_table`'s) of the creates an earlier run made that have not changed
    (``kind, source_key, resource_id``: :func:`etl.load.reimport.created_unchanged`): skipped, with their ids."""
    from etl.load.reimport import CREATED_EARLIER

    return earlier.select(
        "kind", "source_key", pl.lit("skipped").alias("r_state"), pl.col("resource_id").alias("r_id"),
        pl.lit(None, dtype=pl.Int64).alias("r_status"), pl.lit(None, dtype=pl.String).alias("r_code"),
        pl.lit(None, dtype=pl.String).alias("r_field"), pl.lit(CREATED_EARLIER).alias("r_message"),
    ).cast(_RESULTS)  # type: ignore[arg-type]


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
                pl.when(pl.col("r_status").is_not_null() & ~pl.col("r_state").is_in(["created", "updated"]))
                .then(format_text("HTTP {}: {}", "r_status", pl.col("r_message").fill_null("")))
                .otherwise(pl.col("r_message"))
            )
            .otherwise(pl.col("message"))
            .alias("message"),
            pl.coalesce("patient_id", "patient_key").alias("patient_key"),
        )
        .select(rows.columns)
    )


GONE = {"source_file": pl.String, "kind": pl.String, "source_key": pl.String, "resource_id": pl.String}


def disappeared_from(state: StateStore, file: str, kind: str, rows: pl.LazyFrame) -> pl.DataFrame:
    """What an earlier run created from a file named as ``file`` that its report ``rows`` (``row_key``,
    ``source_key``) no longer hold; the state store leaves out what they hold (an unchanged file: all of
    it) and hands the rest over a part at a time (a first load's own creates are there too: millions)."""
    name = Path(file).name
    gone = [pl.DataFrame(schema=GONE)]
    keys = rows.select("row_key", "source_key").collect(engine="in-memory")  # eager: a third of a lazy explode
    both = pl.concat([keys.get_column("row_key"), keys.get_column("source_key")]).alias("source_key")
    present = both.drop_nulls().unique().to_frame()
    for part in state.created_from(kind, name, besides=present.get_column("source_key")):
        earlier = pl.DataFrame(part, schema={"source_key": pl.String, "resource_id": pl.String}, orient="row")
        gone.append(  # compared again: the store leaves out all but the rare key it cannot compare
            earlier.join(present, on="source_key", how="anti", maintain_order="left").select(
                pl.lit(name).alias("source_file"), pl.lit(kind).alias("kind"), "source_key", "resource_id"
            )
        )
    return pl.concat(gone)


def unsent_count(state: StateStore, kind: str, keys: pl.Series | list[str]) -> int:
    """How many of a kind's keys the state store does not hold as created (a load will send them)."""
    keys = keys if isinstance(keys, pl.Series) else pl.Series(keys, dtype=pl.String)
    return keys.len() - state.stored(kind, keys, states=("created",), columns=()).height


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
