"""The loader: send planned creates once each, throttled, resumable.

Order of work for one run:

1. **Resolve** rows left ``pending`` (a run was killed mid-send) or
   ``unknown`` (a timeout, 5xx or lost connection): after the API's search
   consistency window, look each one up by its content. Found: it was created
   (the id is recorded). Certainly absent: it is sent again. Lookup impossible:
   it stays unknown and is not sent.
2. **Patients** that the rows to send need and the crosswalk lacks.
3. **Rows**, each with its patient's ClinikAPI id filled in.

Each send records its intent (``pending``) in the state store before the
request leaves and its outcome after, in small batched transactions.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from etl.errors import AuthError
from etl.load.client import ApiClient, Created, LookupFailed, Outcome, Refused, RetryLater, Unknown
from etl.load.state import Record, StateStore
from etl.load.throttle import Throttle

__all__ = ["LoadOptions", "Loader", "Result", "Send"]

ResultState = Literal["created", "skipped", "failed", "unknown"]
_FLUSH_EVERY = 32


@dataclass(frozen=True)
class LoadOptions:
    """How hard and how carefully to send."""

    rate: float | None = None  # requests per second; None: paced by the server's headers
    concurrency: int = 8
    consistency_window: float = 10.0  # seconds before a search can be trusted to show a create
    max_retries: int = 8  # for answers that say "not processed, try later"


@dataclass(frozen=True)
class Send:
    """One create to make: ``body`` is JSON text without the late-bound ``patientId``."""

    kind: str
    route: str
    source_key: str
    body: str
    body_hash: str
    patient_key: str | None = None


@dataclass(frozen=True)
class Result:
    """The final answer for one source key."""

    state: ResultState
    resource_id: str | None = None
    http_status: int | None = None
    error_code: str | None = None
    field: str | None = None
    message: str | None = None


@dataclass
class LoadStats:
    """Counters for the report."""

    requests: int = 0
    retries_429: int = 0
    started: float = field(default_factory=time.monotonic)
    send_seconds: float = 0.0


class Loader:
    """Sends patients and rows through one client, throttle and state store."""

    def __init__(
        self,
        client: ApiClient,
        state: StateStore,
        throttle: Throttle,
        options: LoadOptions,
        run_id: str,
        *,
        progress: Callable[[str, int], None] | None = None,
    ) -> None:
        self.client = client
        self.state = state
        self.throttle = throttle
        self.options = options
        self.run_id = run_id
        self.progress = progress or (lambda stage, n: None)
        self.stats = LoadStats()
        self.aborted: AuthError | None = None
        self._outcomes: list[Record] = []

    # --- the run -------------------------------------------------------------

    async def run(self, patients: Sequence[Send], rows: Sequence[Send]) -> tuple[dict[str, Result], dict[str, Result]]:
        """Load ``rows`` and the ``patients`` they need; return results by source key."""
        patient_by_key = {p.source_key: p for p in patients}
        kind = rows[0].kind if rows else "immunization"
        stored_rows = self.state.get(kind, [r.source_key for r in rows])
        stored_patients = self.state.get("patient", list(patient_by_key))

        # 1. resolve what an earlier run left in doubt, patients first (rows need their ids)
        patient_results = await self._resolve(
            [patient_by_key[k] for k, rec in stored_patients.items() if rec.state in ("pending", "unknown")],
            stored_patients,
        )
        row_results: dict[str, Result] = {}
        doubtful = [r for r in rows if stored_rows.get(r.source_key, _NONE).state in ("pending", "unknown")]
        crosswalk = self._crosswalk(stored_patients, patient_results)
        row_results.update(await self._resolve(doubtful, stored_rows, crosswalk))

        to_send: list[Send] = []
        for r in rows:
            rec = stored_rows.get(r.source_key)
            if r.source_key in row_results:
                if row_results[r.source_key].state != "failed":  # found, or still unknown
                    continue
            elif rec is not None and rec.state == "created":
                row_results[r.source_key] = Result("skipped", rec.resource_id, message="created by an earlier run")
                continue
            to_send.append(r)

        # 2. patients the rows need
        needed = {r.patient_key for r in to_send if r.patient_key is not None}
        new_patients = [
            patient_by_key[k]
            for k in patient_by_key
            if k in needed and k not in crosswalk and patient_results.get(k, _UNRESOLVED).state != "unknown"
        ]
        patient_results.update(await self._send_all(new_patients, lambda p: p.body))
        crosswalk = self._crosswalk(stored_patients, patient_results)
        for key, rec in stored_patients.items():
            if rec.state == "created" and key not in patient_results:
                patient_results[key] = Result("skipped", rec.resource_id)

        # 3. rows, with their patient's id
        ready: list[Send] = []
        for r in to_send:
            pid = crosswalk.get(r.patient_key) if r.patient_key is not None else None
            if r.patient_key is not None and pid is None:
                row_results[r.source_key] = self._blocked_by_patient(patient_results.get(r.patient_key))
            else:
                ready.append(r)
        row_results.update(await self._send_all(ready, lambda r: with_patient(r.body, crosswalk.get(r.patient_key))))
        self.stats.requests = self.client.requests
        return row_results, patient_results

    @staticmethod
    def _crosswalk(stored: dict[str, Record], results: dict[str, Result]) -> dict[str | None, str]:
        walk: dict[str | None, str] = {
            k: r.resource_id for k, r in stored.items() if r.state == "created" and r.resource_id
        }
        walk.update(
            {k: r.resource_id for k, r in results.items() if r.resource_id and r.state in ("created", "skipped")}
        )
        return walk

    def _blocked_by_patient(self, patient: Result | None) -> Result:
        if self.aborted is not None:
            return Result("failed", error_code="not-sent", message=f"run stopped: {self.aborted}")
        if patient is not None and patient.state == "unknown":
            return Result("failed", error_code="patient-unknown", message="the patient's create has an unknown outcome")
        detail = f"{patient.error_code}: {patient.message}" if patient is not None else "no patient"
        return Result(
            "failed",
            http_status=patient.http_status if patient else None,
            error_code="patient-failed",
            field=patient.field if patient else None,
            message=f"patient not created ({detail})",
        )

    # --- resolving doubt -----------------------------------------------------

    async def _resolve(
        self, items: Sequence[Send], stored: dict[str, Record], crosswalk: dict[str | None, str] | None = None
    ) -> dict[str, Result]:
        """Look up rows whose earlier send has no known outcome."""
        if not items:
            return {}
        newest = max(stored[i.source_key].sent_at or 0.0 for i in items)
        wait = newest + self.options.consistency_window - time.time()
        if wait > 0:
            self.progress(f"waiting {wait:.0f} s for search to show earlier sends", 0)
            await asyncio.sleep(wait)
        results: dict[str, Result] = {}
        found: list[Record] = []
        for item in items:
            body = json.loads(
                with_patient(item.body, crosswalk.get(item.patient_key)) if crosswalk is not None else item.body
            )
            try:
                resource_id = await self._find(item, body)
            except LookupFailed as exc:
                results[item.source_key] = Result("unknown", error_code="unknown-outcome", message=str(exc))
                continue
            if resource_id is not None:
                results[item.source_key] = Result(
                    "skipped", resource_id, message="found by lookup after an unknown outcome"
                )
                found.append(Record(item.kind, item.source_key, "created", resource_id))
            else:
                results[item.source_key] = Result("failed", message="certainly absent: to be sent")
        if found:
            self.state.record_outcomes(found)
        return results

    async def _find(self, item: Send, body: dict[str, Any]) -> str | None:
        if item.kind == "patient":
            params: dict[str, str | int] = {"name": body["lastName"]}
            if "birthDate" in body:
                params["birthDate"] = body["birthDate"]
        elif item.kind == "immunization":
            if "patientId" not in body:
                return None  # its patient was never created, so neither was it
            params = {"patientId": body["patientId"]}
            code = body["vaccineCode"]
            params["vaccineCode"] = code["code"] if isinstance(code, dict) else code
            if "occurrenceDateTime" in body:
                day = body["occurrenceDateTime"][:10]
                params.update(dateFrom=day, dateTo=day)
        else:
            return None
        candidates = [c for c in await self.client.search(item.route, params) if _contains(c, body)]
        claimed = self.state.claimed_ids(str(c["id"]) for c in candidates)
        for candidate in candidates:
            if str(candidate["id"]) not in claimed:
                return str(candidate["id"])
        return None

    # --- sending -------------------------------------------------------------

    async def _send_all(self, items: Sequence[Send], body_of: Callable[[Send], str | None]) -> dict[str, Result]:
        results: dict[str, Result] = {}
        if not items:
            return results
        window = max(self.options.concurrency * 4, 16)
        queue: asyncio.Queue[Send | None] = asyncio.Queue(maxsize=window)

        async def produce() -> None:
            for start in range(0, len(items), window):
                chunk = items[start : start + window]
                self.state.mark_pending(chunk[0].kind, [(i.source_key, i.body_hash) for i in chunk], self.run_id)
                for item in chunk:
                    await queue.put(item)
            for _ in range(self.options.concurrency):
                await queue.put(None)

        async def work() -> None:
            while (item := await queue.get()) is not None:
                body = body_of(item)
                if self.aborted is not None:
                    result = Result("failed", error_code="not-sent", message=f"run stopped: {self.aborted}")
                else:
                    assert body is not None
                    result = await self._send_one(item, body.encode())
                results[item.source_key] = result
                self._note(item, result)
                self.progress(item.kind, 1)

        started = time.monotonic()
        await asyncio.gather(produce(), *(work() for _ in range(self.options.concurrency)))
        self.stats.send_seconds += time.monotonic() - started
        self._flush()
        return results

    async def _send_one(self, item: Send, body: bytes) -> Result:
        outcome: Outcome = Unknown("not sent")
        for _ in range(self.options.max_retries + 1):
            await self.throttle.acquire()
            outcome = await self.client.create(item.route, body)
            if not isinstance(outcome, RetryLater):
                break
            if outcome.reason == "RATE_LIMITED":
                self.stats.retries_429 += 1
                self.throttle.pause(outcome.seconds)
            else:
                await asyncio.sleep(outcome.seconds)
        if isinstance(outcome, Created):
            return Result("created", outcome.resource_id, outcome.status)
        if isinstance(outcome, Refused):
            if outcome.status in (401, 403) and self.aborted is None:
                self.aborted = AuthError(outcome.status, outcome.code, outcome.message)
            return Result("failed", None, outcome.status, outcome.code, outcome.field, outcome.message)
        if isinstance(outcome, RetryLater):
            return Result(
                "failed",
                None,
                429 if outcome.reason == "RATE_LIMITED" else None,
                outcome.reason,
                message=f"gave up after {self.options.max_retries} retries",
            )
        return Result("unknown", None, outcome.status, "unknown-outcome", message=outcome.reason)

    def _note(self, item: Send, result: Result) -> None:
        stored = "failed" if result.state == "failed" else result.state
        assert stored in ("created", "failed", "unknown")
        self._outcomes.append(
            Record(
                item.kind,
                item.source_key,
                stored,
                result.resource_id,
                item.body_hash,
                result.http_status,
                result.error_code,
                result.message,
            )
        )
        if len(self._outcomes) >= _FLUSH_EVERY:
            self._flush()

    def _flush(self) -> None:
        if self._outcomes:
            self.state.record_outcomes(self._outcomes)
            self._outcomes = []


_NONE = Record("", "", "failed")
_UNRESOLVED = Result("failed")


def with_patient(body: str, patient_id: str | None) -> str:
    """Put ``patientId`` first in a JSON body (cheaper than decoding it)."""
    if patient_id is None:
        return body
    return '{"patientId":' + json.dumps(patient_id) + ("," + body[1:] if body != "{}" else "}")


def _contains(resource: Any, wanted: Any) -> bool:
    """Whether ``resource`` holds every value of ``wanted`` (a create body)."""
    if isinstance(wanted, dict):
        return isinstance(resource, dict) and all(
            k in resource and _contains(resource[k], v) for k, v in wanted.items()
        )
    if isinstance(wanted, list):
        return (
            isinstance(resource, list)
            and len(resource) == len(wanted)
            and all(_contains(a, b) for a, b in zip(resource, wanted, strict=True))
        )
    return bool(resource == wanted)


def sends(kind: str, route: str, frame_rows: Iterable[dict[str, Any]]) -> list[Send]:
    """Sends from planned frame rows (``source_key``/``patient_key``, ``body``, ``body_hash``)."""
    return [
        Send(
            kind,
            route,
            str(r.get("source_key", r.get("patient_key"))),
            r["body"],
            r["body_hash"],
            r.get("patient_key") if "source_key" in r else None,
        )
        for r in frame_rows
    ]
