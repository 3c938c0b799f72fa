"""Bulk mode: creates sent as NDJSON imports (``POST /v1/bulk/import``), polled to the end, resumable.

A :class:`BulkLoader` is a :class:`~etl.load.loader.Loader` whose sending step
builds batches instead of requests; everything around it is shared: stages run
in order (patients and practitioners, then encounters, then the rest), a row
already created is skipped, references are filled (``Loader.resolve``) before a
batch is built, and a row whose parent failed is never sent.

For each batch of at most ``BULK_MAX_RECORDS`` rows of one kind:

1. its rows are marked ``pending`` (with their filled bodies) and the batch is
   written to the ``bulk_batches`` table of the state store's file, before the
   import leaves;
2. the job id the API answers is written to the batch;
3. the job is polled with backoff until ``completed`` or ``failed``; each
   ``errors`` entry (``"line N: ..."``) fails row N of the batch with
   ``BULK_RECORD_ERROR``; each id of ``resourceIds`` (one per line, an
   extension of the sandbox's ``simple`` answers) is recorded as that row's
   created id;
4. the documented job record names no ids (OpenAPI ``getBulkJobStatus``, docs
   guides/bulk-operations.mdx), so once a kind's batches are done, each line
   the job imported without an id is looked up like an unknown outcome, after
   the search consistency window (:meth:`Loader._resolve`, matching on key
   fields in either answer shape: :mod:`etl.load.lookup`): found, it is
   ``created`` with that id; not found yet, it stays ``unknown`` and is never
   sent again on a guess (``reconcile`` or the next run looks again).

On resume, a batch whose job id is known is polled again rather than
resubmitted; a batch without one (the run died between marking and the
answer) leaves its rows ``pending``, which the loader settles by lookup as it
does for a single request. At most ``operations_per_hour`` imports start in an
hour (counted from the table); when the next would exceed it, the rest of the
run is not sent and says when to re-run.

A quota 429 (``MONTHLY_QUOTA_EXCEEDED``, ``SANDBOX_QUOTA_EXCEEDED``: errors.mdx) stops the run as it
stops a run of single requests (exit 5, ``quota_exceeded``). A refused import leaves its rows
``not-sent``, for the same command once the quota resets. A job that could not be polled stays open,
its rows pending, and the next run polls it. The rest is not sent.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import sqlite3
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import httpx

from etl.errors import AuthError, BulkRefused, LookupFailed, QuotaExceededError
from etl.load.client import RetryLater, Unknown, exchange, mask, quota_problem, refusal, server_wait
from etl.load.loader import Client, Loader, LoadOptions, Result, Send, failure
from etl.load.state import Record, StateStore, StoredState
from etl.load.throttle import Throttle
from etl.progress import Progress
from etl.rules import RULES
from schemas.canonical import KIND_SPECS
from schemas.limits import BULK_MAX_RECORDS, BULK_OPERATIONS_PER_HOUR, RESOURCE_TYPES

__all__ = [
    "BULK_RECORD_ERROR", "BulkClient", "BulkLoader", "BulkOptions", "choose_mode", "open_batches", "remaining_requests",
]

BULK_RECORD_ERROR = RULES["BULK_RECORD_ERROR"].code
_HOUR = 3600.0
_LINE = re.compile(r"^line (\d+): (.*)$", re.S)
_FINAL = frozenset({"completed", "failed"})
_STORED: dict[str, StoredState] = {"created": "created", "unknown": "unknown"}
_SCHEMA = """
CREATE TABLE IF NOT EXISTS bulk_batches (
    batch_id TEXT PRIMARY KEY,
    kind TEXT NOT NULL,
    run_id TEXT NOT NULL,
    job_id TEXT,
    keys TEXT NOT NULL,
    submitted_at REAL NOT NULL,
    finished_at REAL
);
"""


@dataclass(frozen=True)
class BulkOptions:
    """How bulk mode batches and waits."""

    operations_per_hour: int = BULK_OPERATIONS_PER_HOUR
    batch_records: int = BULK_MAX_RECORDS
    poll_first: float = 0.1  # seconds before the first poll; doubles up to poll_max
    poll_max: float = 2.0
    job_timeout: float = 3600.0  # a job not final by then leaves its rows pending, to be polled on resume


class BulkClient:
    """The two bulk routes over a caller-provided ``httpx.AsyncClient``."""

    def __init__(self, http: httpx.AsyncClient, api_key: str, *, on_response: Any = None) -> None:
        self._http = http
        self._headers = {"x-api-key": api_key, "accept": "application/json"}
        self._on_response = on_response
        self.requests = 0

    def _observe(self, response: httpx.Response) -> None:
        self.requests += 1
        if self._on_response is not None:
            self._on_response(response.headers)

    async def submit(self, resource_type: str, data: str) -> str | None:
        """Start an import; its job id, or None when the answer was lost (the job may exist)."""
        body = json.dumps({"resourceType": resource_type, "data": data}).encode()
        response = await exchange(
            self._http.post(
                "/v1/bulk/import", content=body, headers={**self._headers, "content-type": "application/json"}
            )
        )
        if isinstance(response, RetryLater):
            raise BulkRefused(0, "NOT_SENT", response.reason)  # never sent: the rows may go again
        if isinstance(response, Unknown):
            self.requests += 1  # sent, never answered
            return None  # sent: the job may exist
        self._observe(response)
        if response.status_code == 202:
            try:
                return str(response.json()["data"]["jobId"])
            except (ValueError, KeyError, TypeError):
                return None
        if response.status_code >= 500:
            return None
        quota = quota_problem(response)
        if quota is not None:  # no wait of seconds helps: the run stops (BulkLoader._send_batch)
            raise quota
        refused = refusal(response)  # the API's diagnostics, masked for PHI like every other refusal
        retry = response.headers.get("retry-after")
        raise BulkRefused(response.status_code, refused.code, refused.message, server_wait(retry) if retry else None)

    async def job(self, job_id: str) -> dict[str, Any] | None:
        """A job's record, or None when the API does not know it; ``LookupFailed`` when it cannot answer."""
        for attempt in range(5):
            response = await exchange(self._http.get(f"/v1/bulk/jobs/{job_id}", headers=self._headers))
            if not isinstance(response, httpx.Response):
                if isinstance(response, Unknown):
                    self.requests += 1  # sent, never answered
                await asyncio.sleep(0.5 * 2**attempt)  # a read: safe to repeat, whatever became of it
                continue
            self._observe(response)
            if response.status_code == 200:
                data = response.json()["data"]
                return data if isinstance(data, dict) else None
            if response.status_code == 404:
                return None
            quota = quota_problem(response)
            if quota is not None:  # the job cannot be read before the quota resets: the next run polls it
                raise quota
            if response.status_code == 429 or response.status_code >= 500:
                await asyncio.sleep(server_wait(response.headers.get("retry-after"), 0.5 * 2**attempt))
                continue
            raise LookupFailed(f"GET /v1/bulk/jobs/{job_id}: HTTP {response.status_code}")
        raise LookupFailed(f"GET /v1/bulk/jobs/{job_id}: no answer")


class _Ledger:
    """The ``bulk_batches`` table, in the state store's file (its own connection: WAL allows both)."""

    def __init__(self, state: StateStore) -> None:
        self._db = sqlite3.connect(state.path, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA busy_timeout=5000")
        self._db.executescript(_SCHEMA)

    def close(self) -> None:
        self._db.close()

    def operations_since(self, since: float) -> tuple[int, float | None]:
        """Imports started since ``since`` and the oldest of them."""
        count, oldest = self._db.execute(
            "SELECT count(*), min(submitted_at) FROM bulk_batches WHERE submitted_at > ?", (since,)
        ).fetchone()
        return int(count), oldest

    def add(self, batch_id: str, kind: str, run_id: str, keys: Sequence[str]) -> None:
        self._db.execute(
            "INSERT INTO bulk_batches (batch_id, kind, run_id, keys, submitted_at) VALUES (?, ?, ?, ?, ?)",
            (batch_id, kind, run_id, json.dumps(list(keys)), time.time()),
        )

    def set_job(self, batch_id: str, job_id: str) -> None:
        self._db.execute("UPDATE bulk_batches SET job_id = ? WHERE batch_id = ?", (job_id, batch_id))

    def finish(self, batch_id: str) -> None:
        self._db.execute("UPDATE bulk_batches SET finished_at = ? WHERE batch_id = ?", (time.time(), batch_id))

    def open_batches(self) -> list[tuple[str, str, str | None, list[str]]]:
        """(batch id, kind, job id, keys in line order) of every batch not settled yet."""
        cur = self._db.execute(
            "SELECT batch_id, kind, job_id, keys FROM bulk_batches WHERE finished_at IS NULL ORDER BY rowid"
        )
        return [(b, k, j, json.loads(keys)) for b, k, j, keys in cur]


def open_batches(state: StateStore) -> int:
    """How many bulk imports an earlier run left unsettled in ``state``'s file: a :class:`BulkLoader` polls
    them before anything else (so a load with nothing new to send still needs its client). Read only:
    a store without the ledger (never loaded in bulk) has none."""
    with contextlib.closing(sqlite3.connect(state.path, check_same_thread=False)) as db:
        db.execute("PRAGMA busy_timeout=5000")
        if db.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'bulk_batches'").fetchone() is None:
            return 0
        return int(db.execute("SELECT count(*) FROM bulk_batches WHERE finished_at IS NULL").fetchone()[0])


def line_results(job: Mapping[str, Any], count: int) -> list[Result]:
    """One result per NDJSON line of a final job: created with its id, or failed with its errors."""
    errors: dict[int, list[str]] = {}
    general: list[str] = []
    for entry in job.get("errors") or []:
        m = _LINE.match(str(entry))
        if m:
            errors.setdefault(int(m.group(1)), []).append(mask(m.group(2)))  # a job's errors may quote PHI
        else:
            general.append(mask(str(entry)))
    ids = job.get("resourceIds")
    ids = ids if isinstance(ids, list) and len(ids) == count else None
    processed = int(job.get("processedRecords") or 0)
    out: list[Result] = []
    for index in range(count):
        line = index + 1
        if ids is not None and ids[index] is not None:
            out.append(Result("created", str(ids[index])))
        elif line in errors:
            first = errors[line][0]
            field = first.split(":", 1)[0].strip() if ":" in first else None
            out.append(failure("failed", RULES["BULK_RECORD_ERROR"], field=field, reason="; ".join(errors[line])))
        elif ids is None and job.get("status") == "completed":
            # Created, but this API names no ids: reconcile looks each one up.
            out.append(failure("unknown", RULES["unknown-outcome"], "no-ids", job=job.get("id")))
        elif job.get("status") == "completed" or line <= processed:
            out.append(failure("failed", RULES["BULK_RECORD_ERROR"], "no-reason"))
        else:
            why = "; ".join(general) or "the job ended before this line"
            out.append(failure("failed", RULES["BULK_JOB_FAILED"], job=job.get("id"), reason=why))
    return out


class BulkLoader(Loader):
    """A :class:`Loader` that sends each stage's creates as bulk imports."""

    settles_in_run = False  # a job's lines settle through its record and the next run, not in rounds

    def __init__(
        self,
        client: Client,
        bulk: BulkClient,
        state: StateStore,
        throttle: Throttle,
        options: LoadOptions,
        run_id: str,
        *,
        bulk_options: BulkOptions | None = None,
        progress: Progress | Callable[[str, int], None] | None = None,
    ) -> None:
        super().__init__(client, state, throttle, options, run_id, progress=progress)
        self.bulk = bulk
        self.bulk_options = bulk_options or BulkOptions()
        self.jobs: list[str] = []  # job ids this run submitted or polled
        self._look_up: list[Send] = []  # lines a completed job imported without naming their ids
        self.limit_note: str | None = None  # set when the hourly limit stopped the run
        self._batches = 0

    async def begin(
        self,
        *,
        aliases: Mapping[tuple[str, str], str] | None = None,
        known_ids: Mapping[tuple[str, str], str] | None = None,
    ) -> None:
        """Settle batches an earlier run left open, before anything new is sent."""
        await super().begin(aliases=aliases, known_ids=known_ids)
        self._ledger = _Ledger(self.state)
        try:
            await self._settle_open_batches()
        except BaseException:
            self._ledger.close()
            raise

    def end(self) -> None:
        self._ledger.close()
        super().end()
        self.stats.requests = self.client.requests + self.bulk.requests

    async def _settle_open_batches(self) -> None:
        for batch_id, kind, job_id, keys in self._ledger.open_batches():
            if job_id is None:
                # No answer was recorded: its rows stay pending and are looked up before any resend.
                self._ledger.finish(batch_id)
                continue
            self.progress.note(f"polling bulk job {job_id} of an earlier run ({len(keys)} {kind} rows)")
            try:
                job = await self._wait(job_id)
            except LookupFailed:
                continue  # still open: the next run polls it again
            except QuotaExceededError as exc:
                self._quota(exc)  # the rest stays open for the next run, and nothing new is sent
                return
            if job is None or job.get("status") not in _FINAL:
                if job is None:
                    self._ledger.finish(batch_id)  # the API forgot it: the rows are looked up instead
                continue
            stored = self.state.get(kind, keys)
            outcomes = [
                Record(kind, key, _STORED.get(r.state, "failed"), r.resource_id, stored[key].body_hash, None,
                       r.error_code, r.message)
                for key, r in zip(keys, line_results(job, len(keys)), strict=True)
                if key in stored and stored[key].state in ("pending", "unknown")
            ]
            self.state.record_outcomes(outcomes)
            self._ledger.finish(batch_id)

    async def _wait(self, job_id: str) -> dict[str, Any] | None:
        """Poll a job with backoff until it is final (or the timeout: then its last record)."""
        delay = self.bulk_options.poll_first
        deadline = time.monotonic() + self.bulk_options.job_timeout
        while True:
            job = await self.bulk.job(job_id)
            if job is None or job.get("status") in _FINAL or time.monotonic() > deadline:
                return job
            await asyncio.sleep(delay)
            delay = min(delay * 2, self.bulk_options.poll_max)

    def _room(self) -> bool:
        """Whether another import fits the hourly limit; if not, note when it will."""
        count, oldest = self._ledger.operations_since(time.time() - _HOUR)
        if count < self.bulk_options.operations_per_hour:
            return True
        at = time.strftime("%H:%M:%S", time.localtime((oldest or time.time()) + _HOUR))
        self.limit_note = (
            f"{self.bulk_options.operations_per_hour} bulk imports an hour already started: "
            f"the rest was not sent; re-run after {at} to resume, or use --mode request"
        )
        self.progress.note(self.limit_note)
        return False

    async def _send_all(
        self, items: Sequence[Send], body_of: Callable[[Send], str | None]
    ) -> dict[tuple[str, str], Result]:
        results: dict[tuple[str, str], Result] = {}
        by_kind: dict[str, list[Send]] = {}
        for item in items:
            by_kind.setdefault(item.kind, []).append(item)
        started = time.monotonic()
        for kind, group in by_kind.items():
            self.progress.start(kind, len(group))
            size = self.bulk_options.batch_records
            for start in range(0, len(group), size):
                batch = group[start : start + size]
                if self.stopping or self.aborted is not None or self.limit_note is not None or not self._room():
                    for item in batch:
                        results[(kind, item.source_key)] = self._not_sent_now()
                    continue
                results.update(await self._send_batch(kind, batch, body_of))
                self.progress(kind, len(batch))
            if self._look_up:
                looked, self._look_up = self._look_up, []
                results.update(await self._settle_by_lookup(kind, looked))
        self.stats.send_seconds += time.monotonic() - started
        return results

    async def _send_batch(
        self, kind: str, batch: Sequence[Send], body_of: Callable[[Send], str | None]
    ) -> dict[tuple[str, str], Result]:
        bodies = [body_of(i) or "" for i in batch]
        for file in dict.fromkeys(i.source_file for i in batch):
            self.state.mark_pending(
                kind, [(i.source_key, i.body_hash, b) for i, b in zip(batch, bodies, strict=True)
                       if i.source_file == file],
                self.run_id, source_file=file,
            )
        self._batches += 1
        batch_id = f"{self.run_id}-{self._batches}"
        self._ledger.add(batch_id, kind, self.run_id, [i.source_key for i in batch])
        resource_type = RESOURCE_TYPES[KIND_SPECS[kind].schema]
        # Bodies are compact JSON from polars' json_encode: one per line as they are.
        data = "\n".join(b.replace("\n", " ") for b in bodies)
        self.stats.creates += len(batch)
        try:
            job_id = await self.bulk.submit(resource_type, data)
        except QuotaExceededError as exc:
            self._ledger.finish(batch_id)  # refused, not imported: the same command sends it once the quota resets
            self._quota(exc)
            return self._record(batch, [self._not_sent()] * len(batch))
        except BulkRefused as refused:
            self._ledger.finish(batch_id)  # certainly not imported: the rows may be sent again
            if refused.status in (401, 403) and self.aborted is None:
                self.aborted = AuthError(refused.status, refused.code, refused.message)
            if refused.status == 429:
                self.stats.retries_429 += 1
                self.limit_note = f"the API refused the import: {refused.message}; re-run later to resume"
            failed = Result("failed", http_status=refused.status or None, error_code=refused.code,
                            message=refused.message)
            return self._record(batch, [failed] * len(batch))
        if job_id is None:
            unknown = failure("unknown", RULES["unknown-outcome"], "answer-lost")
            return self._record(batch, [unknown] * len(batch))
        self._ledger.set_job(batch_id, job_id)
        self.jobs.append(job_id)
        try:
            job = await self._wait(job_id)
        except (LookupFailed, QuotaExceededError) as exc:
            # The job exists but cannot be read now: the batch stays open, its rows pending, and the
            # next run polls the job instead of resubmitting. A quota also stops the run.
            if isinstance(exc, QuotaExceededError):
                self._quota(exc)
            reason = exc.message if isinstance(exc, QuotaExceededError) else exc
            return self._open(batch, failure("unknown", RULES["bulk-pending"], job=job_id, reason=reason))
        if job is not None and job.get("status") not in _FINAL:
            return self._open(batch, failure("unknown", RULES["bulk-pending"], "running", job=job_id))
        if job is None:
            self._ledger.finish(batch_id)  # the API does not know the job: the rows are looked up next time
            unknown = failure("unknown", RULES["unknown-outcome"], "unknown-job", job=job_id)
            return self._record(batch, [unknown] * len(batch))
        self._ledger.finish(batch_id)
        outcomes = line_results(job, len(batch))
        # line_results leaves "unknown" only the lines a completed job imported without naming an id.
        self._look_up.extend(item for item, r in zip(batch, outcomes, strict=True) if r.state == "unknown")
        return self._record(batch, outcomes)

    async def _settle_by_lookup(self, kind: str, items: Sequence[Send]) -> dict[tuple[str, str], Result]:
        """Find the lines a job imported without ids: created with the id found, else still unknown."""
        self.progress.note(f"looking up {len(items)} {kind} rows the bulk import created without naming their ids")
        settled = await self._resolve(items, self.state.get(kind, [i.source_key for i in items]))
        out: dict[tuple[str, str], Result] = {}
        for item in items:
            found = settled.get(item.source_key)
            if found is not None and found.state == "skipped" and found.resource_id is not None:
                out[(kind, item.source_key)] = Result("created", found.resource_id,
                                                      message="imported; its id found by lookup")
            elif found is not None and found.state == "unknown":
                out[(kind, item.source_key)] = found
            # Else the job says it imported the line and search does not show it (yet): the line keeps its
            # "unknown" result and is never re-sent on a guess.
        return out

    @staticmethod
    def _open(batch: Sequence[Send], result: Result) -> dict[tuple[str, str], Result]:
        """Results for the report only (``bulk-pending``): the state store keeps the rows pending under their
        open batch."""
        return {(i.kind, i.source_key): result for i in batch}

    def _not_sent_now(self) -> Result:
        """A batch the run stopped before: the hourly limit, a refusal, or a signal."""
        if self.limit_note:
            return failure("failed", RULES["not-sent"], "bulk-limit", why=self.limit_note)
        if self.aborted:
            return failure("failed", RULES["not-sent"], why=self.aborted)
        return failure("failed", RULES["not-sent"], "bulk-interrupted")

    def _record(self, batch: Sequence[Send], outcomes: Sequence[Result]) -> dict[tuple[str, str], Result]:
        for item, result in zip(batch, outcomes, strict=True):
            self._note(item, result)
        self._flush()
        return {(i.kind, i.source_key): r for i, r in zip(batch, outcomes, strict=True)}


async def remaining_requests(http: httpx.AsyncClient, api_key: str) -> int | None:
    """What the plan still allows in the current window (``X-RateLimit-Remaining`` of a one-item search)."""
    response = await exchange(
        http.get("/v1/patients", params={"count": 1}, headers={"x-api-key": api_key, "accept": "application/json"})
    )
    if isinstance(response, httpx.Response):
        with contextlib.suppress(KeyError, ValueError):
            return int(response.headers["x-ratelimit-remaining"])
    return None


def choose_mode(mode: str, planned: int, remaining: int | None) -> str:
    """``request`` or ``bulk``: ``auto`` takes bulk when the creates planned exceed what the window has left."""
    if mode != "auto":
        return mode
    return "bulk" if remaining is not None and planned > remaining else "request"
