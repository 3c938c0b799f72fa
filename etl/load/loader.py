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

A target that does not answer at all (timeouts, connections lost or refused)
stops the run once ``no_answer_limit`` requests in a row went unanswered
(:attr:`Loader.unresponsive` says so): the rows whose request left stay
``unknown``, the rest are ``not-sent``, so a silent target costs a bounded
time (about ``no_answer_limit / concurrency`` timeouts), not one per row.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from etl.errors import ApiError, AuthError, LookupFailed
from etl.load.client import UNTRUSTED, Created, Outcome, Refused, RetryLater, Unknown
from etl.load.lookup import matches
from etl.load.state import Record, StateStore
from etl.load.throttle import Throttle
from etl.progress import Progress, as_progress
from etl.rules import RULES, Rule
from etl.settings import NO_ANSWER_LIMIT
from etl.transform import fill_refs

__all__ = ["LoadOptions", "Loader", "Result", "Send", "failure"]

ResultState = Literal["created", "skipped", "failed", "unknown", "changed", "updated"]


class Client(Protocol):
    """What the loader needs of a target's client: ``etl.load.client.ApiClient``, or ``etl.load.redox.RedoxClient``
    (whose ``search`` raises ``LookupFailed``: with no search, an unknown outcome stays unknown)."""

    requests: int  # requests sent, answered or not
    silent: int  # requests in a row that got no answer at all

    async def create(self, route: str, body: bytes) -> Outcome:
        """Send one create; one of the four outcomes."""
        ...

    async def search(self, route: str, params: Mapping[str, str | int]) -> list[dict[str, Any]]:
        """Every match of a search, or ``LookupFailed``."""
        ...

_FLUSH_EVERY = 32


@dataclass(frozen=True)
class LoadOptions:
    """How hard and how carefully to send."""

    rate: float | None = None  # requests per second; None: paced by the server's headers
    concurrency: int = 8
    consistency_window: float = 10.0  # seconds before a search can be trusted to show a create
    max_retries: int = 8  # for answers that say "not processed, try later"
    update: bool = False  # PATCH rows that changed since they were created (else report them as changed)
    no_answer_limit: int = NO_ANSWER_LIMIT  # requests in a row without any answer before the run stops


@dataclass(frozen=True)
class Send:
    """One create to make: ``body`` is JSON text whose references are placeholders filled at send time."""

    kind: str
    route: str
    source_key: str
    body: str
    body_hash: str
    patient_key: str | None = None
    source_file: str | None = None  # the input file's name, to tell later which rows left it


@dataclass(frozen=True)
class Result:
    """The final answer for one source key."""

    state: ResultState
    resource_id: str | None = None
    http_status: int | None = None
    error_code: str | None = None
    field: str | None = None
    message: str | None = None


def failure(
    state: ResultState,
    rule: Rule,
    variant: str = "",
    /,
    *,
    resource_id: str | None = None,
    http_status: int | None = None,
    field: str | None = None,
    **values: object,
) -> Result:
    """A row that was not created as planned, for the reason ``rule`` names (an entry of ``etl.rules.RULES``):
    its code, and its message in the rule's wording (``variant``) with ``values`` put in."""
    return Result(state, resource_id, http_status, rule.code, field, rule.text(variant, **values))


@dataclass
class LoadStats:
    """Counters for the report."""

    requests: int = 0
    creates: int = 0  # POSTs sent, whatever their answer
    retries_429: int = 0
    started: float = field(default_factory=time.monotonic)
    send_seconds: float = 0.0


class Loader:
    """Sends patients and rows through one client, throttle and state store."""

    def __init__(
        self,
        client: Client,
        state: StateStore,
        throttle: Throttle,
        options: LoadOptions,
        run_id: str,
        *,
        progress: Progress | Callable[[str, int], None] | None = None,
    ) -> None:
        self.client = client
        self.state = state
        self.throttle = throttle
        self.options = options
        self.run_id = run_id
        self.progress = as_progress(progress)
        self.stats = LoadStats()
        self.aborted: ApiError | None = None  # a refusal of the whole run: bad key, untrusted certificate
        self.stopping = False  # set by stop(): send nothing new, finish what is in flight
        self.unresponsive: str | None = None  # why the run stopped: the target answered nothing for too long
        self._outcomes: list[Record] = []

    # --- the run -------------------------------------------------------------

    def stop(self) -> None:
        """Stop taking new rows (SIGINT/SIGTERM): requests in flight finish and are recorded."""
        self.stopping = True

    async def run(self, patients: Sequence[Send], rows: Sequence[Send]) -> tuple[dict[str, Result], dict[str, Result]]:
        """Load ``rows`` and the ``patients`` they name; results by source key (rows, patients)."""
        results = await self.run_stages([patients, rows])
        return (
            {k: r for (kind, k), r in results.items() if kind != "patient"},
            {k: r for (kind, k), r in results.items() if kind == "patient"},
        )

    async def run_stages(
        self,
        stages: Sequence[Sequence[Send]],
        *,
        aliases: Mapping[tuple[str, str], str] | None = None,
        known_ids: Mapping[tuple[str, str], str] | None = None,
    ) -> dict[tuple[str, str], Result]:
        """Load each stage after the one before, so every reference points at a created parent.

        ``aliases`` map (kind, reference) to the source key a row was created under (a practitioner
        referred to by its source id but keyed by its NPI); ``known_ids`` map (kind, reference) to
        ClinikAPI ids known from outside the run (a user's crosswalk, ids that already exist).
        """
        await self.begin(aliases=aliases, known_ids=known_ids)
        try:
            for stage in stages:
                await self._run_stage(stage)
        finally:
            self.end()
        return self._results

    async def begin(
        self,
        *,
        aliases: Mapping[tuple[str, str], str] | None = None,
        known_ids: Mapping[tuple[str, str], str] | None = None,
    ) -> None:
        """Get ready to load (:meth:`run_stages`, or :meth:`run_part` a part of a stage at a time)."""
        self._aliases = dict(aliases or {})
        self._known = dict(known_ids or {})
        self._results: dict[tuple[str, str], Result] = {}

    def end(self) -> None:
        """The load is over (even when it stopped early)."""
        self.stats.requests = self.client.requests

    async def run_part(self, items: Sequence[Send]) -> dict[tuple[str, str], Result]:
        """Load a part of a stage (between :meth:`begin` and :meth:`end`); its results.

        Every part of a stage goes before any part of the next. A load in parts (``etl.send``)
        keeps in memory only the results a later reference needs to explain itself (those that
        did not create); created ones are read back from the state store when a child needs the id.
        """
        await self._run_stage(items)
        mine = {(i.kind, i.source_key): self._results[(i.kind, i.source_key)] for i in items}
        for pair, result in mine.items():
            if result.state in ("created", "skipped"):
                del self._results[pair]
        return mine

    async def reconcile(self, items: Sequence[Send]) -> dict[tuple[str, str], Result]:
        """Settle rows left in doubt: found ones become created, certainly absent ones are sent again.

        ``items`` carry the bodies kept in the state store (references already filled in).
        """
        self._results = {}
        self._aliases, self._known = {}, {}
        by_kind: dict[str, list[Send]] = {}
        for item in items:
            by_kind.setdefault(item.kind, []).append(item)
        absent: list[Send] = []
        for kind, group in by_kind.items():
            stored = self.state.get(kind, [i.source_key for i in group])
            for key, result in (await self._resolve(group, stored)).items():
                if result.state == "failed":
                    absent.append(next(i for i in group if i.source_key == key))
                else:
                    self._results[(kind, key)] = result
        self._results.update(await self._send_all(absent, lambda i: i.body))
        self.stats.requests = self.client.requests
        return self._results

    def resolve(self, kind: str, reference: str) -> str | None:
        """The ClinikAPI id a reference stands for, if it is known yet."""
        key = self._aliases.get((kind, reference), reference)
        done = self._results.get((kind, key))
        if done is not None:
            # A changed or updated parent exists too: its children are sent with its id.
            return done.resource_id if done.state in ("created", "skipped", "changed", "updated") else None
        if (kind, reference) in self._known:
            return self._known[(kind, reference)]
        stored = self.state.get(kind, [key]).get(key)
        return stored.resource_id if stored is not None and stored.state == "created" else None

    def _fill(self, item: Send) -> tuple[str, list[tuple[str, str]]]:
        return fill_refs(item.body, self.resolve)

    async def _run_stage(self, items: Sequence[Send]) -> None:
        changed: list[tuple[Send, str]] = []
        by_kind: dict[str, list[Send]] = {}
        for item in items:
            by_kind.setdefault(item.kind, []).append(item)
        to_send: list[Send] = []
        for kind, group in by_kind.items():
            stored = self.state.get(kind, [i.source_key for i in group])
            in_doubt = ("pending", "unknown")
            doubtful = [i for i in group if i.source_key in stored and stored[i.source_key].state in in_doubt]
            resolved = await self._resolve(doubtful, stored)
            for item in group:
                rec = stored.get(item.source_key)
                if item.source_key in resolved:
                    result = resolved[item.source_key]
                    if result.state != "failed":  # found, or still unknown: never re-sent blindly
                        self._results[(kind, item.source_key)] = result
                        continue
                elif rec is not None and rec.state == "created":
                    if rec.body_hash and rec.body_hash != item.body_hash and rec.resource_id:
                        changed.append((item, rec.resource_id))
                    else:
                        self._results[(kind, item.source_key)] = Result(
                            "skipped", rec.resource_id, message="created by an earlier run"
                        )
                    continue
                to_send.append(item)
        ready: list[Send] = []
        for item in to_send:
            _, missing = self._fill(item)
            if self.stopping:
                self._results[(item.kind, item.source_key)] = self._not_sent()
            elif missing:  # a parent in doubt says so, even when the run has stopped
                self._results[(item.kind, item.source_key)] = self._blocked(missing[0])
            elif self.unresponsive:
                self._results[(item.kind, item.source_key)] = self._not_sent()
            else:
                ready.append(item)
        self._results.update(await self._send_all(ready, lambda i: self._fill(i)[0]))
        for item, resource_id in changed:
            self._results[(item.kind, item.source_key)] = await self._update(item, resource_id)

    async def _update(self, item: Send, resource_id: str) -> Result:
        """A row that changed since it was created: reported, or patched with ``update``."""
        if not self.options.update or self.stopping or self.unresponsive:
            return Result("changed", resource_id, message="differs from what was created; --update patches it")
        patch = getattr(self.client, "patch", None)
        body, missing = self._fill(item)
        if patch is None:
            return failure("failed", RULES["not-updated"], "cannot", resource_id=resource_id)
        if missing:
            kind, reference = missing[0]
            return failure(
                "failed", RULES["not-updated"], "no-id", resource_id=resource_id, kind=kind, reference=reference
            )
        await self.throttle.acquire()
        outcome = await patch(item.route, resource_id, body.encode())
        self._listen()
        if isinstance(outcome, Created):
            self.state.set_hash(item.kind, [(item.source_key, item.body_hash)])
            return Result("updated", resource_id, outcome.status)
        if isinstance(outcome, Refused):
            return Result("failed", resource_id, outcome.status, outcome.code, outcome.field, outcome.message)
        return failure("failed", RULES["not-updated"], resource_id=resource_id, reason=getattr(outcome, "reason", ""))

    def _not_sent(self) -> Result:
        """The result of a row never sent because the run stopped (a refusal, silence, a signal)."""
        why = self.aborted or self.unresponsive
        if why:
            return failure("failed", RULES["not-sent"], why=why)
        return failure("failed", RULES["not-sent"], "interrupted")

    def _listen(self) -> None:
        """Stop the run once the target has left ``no_answer_limit`` requests in a row without any answer."""
        silent = self.client.silent
        if self.unresponsive is None and silent >= self.options.no_answer_limit:
            self.unresponsive = (
                f"no answer to {silent} requests in a row (timeouts, connections lost or refused): "
                "the target is not answering. Rows sent are unknown (re-run, or reconcile, once it answers); "
                "the rest were not sent"
            )
            self.progress.note(f"stopping: {self.unresponsive}")

    def _blocked(self, missing: tuple[str, str]) -> Result:
        kind, reference = missing
        if self.aborted is not None:
            return self._not_sent()
        parent = self._results.get((kind, self._aliases.get((kind, reference), reference)))
        if parent is not None and parent.state == "unknown":
            return failure("failed", RULES["parent-unknown"], kind=kind, reference=reference)
        if self.unresponsive is not None:
            return self._not_sent()
        if parent is not None:
            return failure("failed", RULES["parent-failed"], http_status=parent.http_status, field=parent.field,
                           kind=kind, reference=reference, code=parent.error_code, reason=parent.message)
        return failure("failed", RULES["unresolved-reference"], "at-send", kind=kind, reference=reference)

    # --- resolving doubt -----------------------------------------------------

    async def _resolve(self, items: Sequence[Send], stored: dict[str, Record]) -> dict[str, Result]:
        """Look up rows whose earlier send has no known outcome."""
        if not items:
            return {}
        newest = max(_last_possible_send(stored[i.source_key]) for i in items)
        wait = newest + self.options.consistency_window - time.time()
        if wait > 0:
            self.progress(f"waiting {wait:.0f} s for search to show earlier sends", 0)
            await asyncio.sleep(wait)
        results: dict[str, Result] = {}
        found: list[Record] = []
        taken: set[str] = set()  # found in this loop, not yet recorded as claimed
        for item in items:
            if self.unresponsive is not None:
                results[item.source_key] = failure(
                    "unknown", RULES["unknown-outcome"], "not-looked-up", why=self.unresponsive
                )
                continue
            body_text, missing = self._fill(item)
            if missing:
                # Its parent was never created, so neither was it.
                results[item.source_key] = Result("failed", message="certainly absent: to be sent")
                continue
            try:
                resource_id = await self._find(item, json.loads(body_text), taken)
            except LookupFailed as exc:
                results[item.source_key] = failure("unknown", RULES["unknown-outcome"], reason=exc)
                self._listen()
                continue
            if resource_id is not None:
                results[item.source_key] = Result(
                    "skipped", resource_id, message="found by lookup after an unknown outcome"
                )
                found.append(Record(item.kind, item.source_key, "created", resource_id))
                taken.add(resource_id)
            else:
                results[item.source_key] = Result("failed", message="certainly absent: to be sent")
        if found:
            self.state.record_outcomes(found)
        return results

    async def _find(self, item: Send, body: dict[str, Any], taken: set[str]) -> str | None:
        params: dict[str, str | int] = {}
        if item.kind == "patient":
            params = {"name": body["lastName"], **({"birthDate": body["birthDate"]} if "birthDate" in body else {})}
        elif item.kind == "practitioner":
            params = {"npi": body["npi"]} if "npi" in body else {"name": body["lastName"]}
        elif item.kind == "immunization":
            code = body["vaccineCode"]
            params = {"patientId": body["patientId"], "vaccineCode": code["code"] if isinstance(code, dict) else code}
            if "occurrenceDateTime" in body:
                day = body["occurrenceDateTime"][:10]
                params.update(dateFrom=day, dateTo=day)
        elif "patientId" in body:
            params = {"patientId": body["patientId"]}
        candidates = [c for c in await self.client.search(item.route, params) if matches(item.kind, c, body)]
        claimed = taken | self.state.claimed_ids(str(c["id"]) for c in candidates)
        for candidate in candidates:
            if str(candidate["id"]) not in claimed:
                return str(candidate["id"])
        return None

    # --- sending -------------------------------------------------------------

    async def _send_all(
        self, items: Sequence[Send], body_of: Callable[[Send], str | None]
    ) -> dict[tuple[str, str], Result]:
        results: dict[tuple[str, str], Result] = {}
        if not items:
            return results
        for kind in dict.fromkeys(i.kind for i in items):
            self.progress.start(kind, sum(1 for i in items if i.kind == kind))
        window = max(self.options.concurrency * 4, 16)
        queue: asyncio.Queue[tuple[Send, str | None] | None] = asyncio.Queue(maxsize=window)

        async def produce() -> None:
            for start in range(0, len(items), window):
                if self.stopping or self.unresponsive:  # the rest was never marked pending, let alone sent
                    for item in items[start:]:
                        results[(item.kind, item.source_key)] = self._not_sent()
                    break
                chunk = items[start : start + window]
                bodies = {(i.kind, i.source_key): body_of(i) for i in chunk}
                for kind in {i.kind for i in chunk}:
                    for file in {i.source_file for i in chunk if i.kind == kind}:
                        self.state.mark_pending(
                            kind,
                            [(i.source_key, i.body_hash, bodies[(kind, i.source_key)] or "")
                             for i in chunk if i.kind == kind and i.source_file == file],
                            self.run_id,
                            source_file=file,
                        )
                for item in chunk:
                    await queue.put((item, bodies[(item.kind, item.source_key)]))
            for _ in range(self.options.concurrency):
                await queue.put(None)

        async def work() -> None:
            while (entry := await queue.get()) is not None:
                item, body = entry
                if self.aborted is not None or self.stopping or self.unresponsive is not None:
                    # Recorded as pending but never sent: certainly not created, safe to send next time.
                    result = self._not_sent()
                else:
                    assert body is not None
                    result = await self._send_one(item, body.encode())
                results[(item.kind, item.source_key)] = result
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
            self.stats.creates += 1
            outcome = await self.client.create(item.route, body)
            self._listen()
            if not isinstance(outcome, RetryLater):
                break
            if self.unresponsive is not None and outcome.status is None:
                # Every attempt failed to connect: never sent, safe to send next time.
                return self._not_sent()
            if outcome.reason == UNTRUSTED:  # every request would meet the same certificate
                if self.aborted is None:
                    self.aborted = ApiError(0, RULES["untrusted-certificate"].code, UNTRUSTED)
                return failure("failed", RULES["untrusted-certificate"])
            if outcome.reason == "RATE_LIMITED":
                self.stats.retries_429 += 1
                self.throttle.pause(outcome.seconds)
            else:
                await asyncio.sleep(outcome.seconds)
                if self.unresponsive is not None:  # fell silent meanwhile: this one never left either
                    return self._not_sent()
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
        return failure("unknown", RULES["unknown-outcome"], http_status=outcome.status, reason=outcome.reason)

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


def _last_possible_send(record: Record) -> float:
    """The latest moment the request behind a doubtful record can have left.

    ``sent_at`` is when the intent was recorded, a chunk at a time ahead of
    the throttle, so the request itself may have left much later. An
    ``unknown`` outcome was recorded after its request left; a ``pending``
    record's run may have sent it at any moment until it died, so: now.
    """
    if record.state == "pending":
        return time.time()
    return max(record.updated_at or 0.0, record.sent_at or 0.0)
