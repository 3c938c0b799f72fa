"""A load in bounded memory: planned in batches, sent a part at a time, reported from disk.

``pipeline.load_files`` takes this road for large inputs (``--stream``, by default when the
inputs exceed :data:`STREAM_BYTES`). The run is the batched validation (``etl.batches``) with its
creates planned as it goes, then the sends:

1. **Plan.** Each batch is validated and planned; its report rows and its creates (JSON bodies)
   go to disk. A reference that the run, the crosswalk and the state store cannot explain waits
   for the end of its stage; then the target is asked about it (``GET /v1/<kind>/<id>``), once
   per distinct value, as a whole-file load does.
2. **Send.** Stage by stage, the creates are read back :data:`SEND_PART` at a time and given to
   the loader (:meth:`etl.load.loader.Loader.run_part`). Each part's results go to disk; the
   loader keeps only those that did not create (a child names them in its failure), and reads a
   created parent's id back from the state store.
3. **Report.** Each batch's report rows take their creates' outcomes (a join with the results),
   and the report is written from the parts, as validate's is.

What stays in memory grows with the number of distinct keys (see ``etl.batches``) and the
results table (about 100 bytes a create), not with the file. The outcome is the report a
whole-file load writes: a test loads every sample both ways and compares them row by row.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import polars as pl

from etl import pipeline
from etl.batches import Run, planned_in_batches
from etl.files import write_csv
from etl.progress import LoadEstimate, Progress
from etl.report import RunReport
from etl.settings import Settings
from schemas.canonical import KIND_SPECS
from schemas.limits import ROUTES

if TYPE_CHECKING:
    from etl.load.loader import Send
    from etl.load.state import StateStore

__all__ = ["SEND_PART", "STREAM_BYTES", "load_in_batches", "streams"]

# Inputs larger than this together are loaded in batches (about 250,000 registry rows); a smaller
# load is planned whole, which is quicker, and holds a few hundred MB at most.
STREAM_BYTES = 64 * 2**20
# Creates given to the loader at a time: a multiple of a bulk import's 10,000 records, so parts
# do not cut bulk batches short.
SEND_PART = 100_000


def streams(paths: Sequence[str | Path], settings: Settings) -> bool:
    """Whether a load of ``paths`` goes in batches (``settings.stream``; None: by the inputs' size)."""
    if settings.stream is not None:
        return settings.stream
    size = 0
    for path in paths:
        try:
            size += Path(path).stat().st_size
        except OSError:
            return False  # the reader names the missing file
    return size > STREAM_BYTES


def load_in_batches(
    paths: Sequence[str | Path],
    settings: Settings,
    progress: Progress,
    *,
    job: str | None = None,
) -> RunReport:
    """Import inputs in bounded memory (``pipeline.load_files`` decides when); write the report."""
    from etl.load.lock import state_lock
    from etl.load.state import StateStore

    run_id = pipeline._new_run_id()
    with state_lock(settings.state, wait=settings.wait, on_wait=progress.note), pipeline._target(settings) as (
        base_url,
        key,
        identity,
    ), StateStore(settings.state, target=identity) as state:
        target = base_url if settings.base_url else "embedded sandbox"
        lookup = _Lookup(base_url, key, settings)
        with planned_in_batches(
            paths, settings, progress, payloads=True, state=state, lookup=lookup, rows_csv=False, run_id=run_id
        ) as run:
            state.start_run(run_id, "run" if job else "load", job=job)  # as a whole-file load: once planned
            t0 = time.perf_counter()
            results, extra = asyncio.run(_send(run, base_url, key, state, settings, progress, lookup))
            run.timings["load"] = time.perf_counter() - t0
            _apply(run, results)
            crosswalk = extra.pop("_crosswalk")
            disappeared = _disappeared(run, state)
            extra["disappeared"] = disappeared.height
            report = run.write({"load": True, **extra}, command="load", target=target)
            if crosswalk is not None:  # as a whole-file load: written even when empty
                write_csv(crosswalk.sort("kind", "source_key"), run.folder / "crosswalk.csv")
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
                        self.answers[(kind, value)] = await pipeline.target_has(
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
) -> tuple[pl.DataFrame, dict[str, Any]]:
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
        loader = await pipeline._loader(settings, http, key, client, state, throttle, options, run.run_id, progress,
                                        unsent)
        aliases = {(k, v): a for k, v, a in run.keys.aliases.iter_rows() if v != a}
        await loader.begin(aliases=aliases, known_ids=run.keys.known)
        try:
            with pipeline._stop_on_signals(loader):
                for frame in _creates(run):
                    results = await loader.run_part(_sends(frame))
                    parts.append(run.work / f"results-{len(parts):06d}.ipc")
                    pipeline.results_table(results).write_ipc(parts[-1])
        finally:
            loader.end()
            loader.stats.requests += lookup.requests
    table = pl.concat([pl.read_ipc(p) for p in parts]) if parts else pipeline.results_table({})
    return table, pipeline.load_extra(loader, table, protocols)


def _creates(run: Run) -> Iterator[pl.DataFrame]:
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


def _sends(frame: pl.DataFrame) -> list[Send]:
    from etl.load.loader import Send

    return [
        Send(kind, ROUTES[KIND_SPECS[kind].schema], key, body, body_hash, source_file=file)
        for kind, key, body, body_hash, file in frame.select(
            "kind", "source_key", "body", "body_hash", "source_file"
        ).iter_rows()
    ]


def _unsent(run: Run, state: StateStore) -> int:
    """About how many creates the load will send: those the state store does not hold as created."""
    return sum(
        pipeline.unsent_count(state, str(kind), mine.get_column("source_key").to_list())
        for frame in _creates(run)
        for (kind,), mine in frame.group_by("kind")
    )


def _apply(run: Run, table: pl.DataFrame) -> None:
    """Each part's report rows with their creates' outcomes."""
    patients = pipeline.outcome_patients(table)
    for part in list(run.parts):
        rows = pl.read_ipc(part)
        # The part's own results first (a semi join hashes the part, not the whole table): a third
        # less memory at 1,000,000 rows than joining with everything, and quicker.
        mine = table.join(rows.select("kind", "source_key"), on=["kind", "source_key"], how="semi")
        theirs = patients.join(rows.select("patient_key"), on="patient_key", how="semi")
        run.rewrite(part, pipeline.with_outcomes(rows, mine, theirs))


def _disappeared(run: Run, state: StateStore) -> pl.DataFrame:
    """Rows an earlier run created from a file of the same name that this copy no longer has (never deleted)."""
    found = (pipeline.disappeared_from(state, x.file, x.kind, pl.scan_ipc(x.parts)) for x in run.inputs if x.parts)
    return pl.concat([pl.DataFrame(schema=pipeline.GONE), *found])
