"""The loader: send planned creates once each, throttled, resumable.

Order of work for one run, stage by stage (patients, then the rows that refer to them):

1. **Send** what the state store does not hold as created, each with its parents' ClinikAPI ids filled in.
2. **Settle** the stage's doubt before the next stage starts: rows whose send had no known outcome in this run
   (a timeout, 5xx or lost connection) and rows an earlier run left ``pending`` (killed mid-send) or ``unknown``.
   In at most ``settle_rounds`` rounds (default 6): wait until search can be trusted to show them, look each
   one up by its content; found: it was created (the id is recorded); certainly absent: it is sent again, and
   its outcome joins the next round if it is unknown again; lookup impossible: it stays unknown, never re-sent.
   So children are sent once their parent settled, in the same run.

How long search needs to show a create is **measured**, not trusted (the docs: search is eventually
consistent, "commonly ~10s"): once a run meets doubt, search is polled (backing off, at most ``lag_limit``
seconds) until it shows one of the run's own creates, and each round waits, after the latest doubtful send, at
least 1.5 x the lag observed, never less than ``consistency_window`` (a floor). With no create of its own to
watch, a run uses the largest lag an earlier run on the same state store measured, else ``lag_limit`` (for
what an earlier run left in doubt with nothing measured: the consistency window, as ``reconcile`` does). When
search never shows the run's own create within ``lag_limit`` (or cannot be searched), no wait is safe: the
doubtful rows stay ``unknown`` and :attr:`Loader.settle_problem` says why; nothing is re-sent on a guess.

Answers that say "not processed" are retried within a **budget per run** (``retry_budget``, default 200, and
at most ``max_retries`` per row): a 429 ``RATE_LIMITED`` after its ``Retry-After``, a connection that never
opened after a second. Once the budget is spent the run stops; the rows not yet sent are ``not-sent``. A quota
429 (``MONTHLY_QUOTA_EXCEEDED``, ``SANDBOX_QUOTA_EXCEEDED``) stops the run at once (:attr:`Loader.aborted` is
an ``etl.errors.QuotaExceededError``, exit 5): the rows not yet sent are ``not-sent``, and the same command sends
them once the quota resets.

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
from typing import Any, ClassVar, Literal, Protocol

from etl.errors import ApiError, AuthError, LookupFailed, QuotaExceededError
from etl.load.client import QUOTA_CODES, UNTRUSTED, Created, Outcome, Refused, RetryLater, Unknown
from etl.load.lookup import matches
from etl.load.reimport import CHANGED_SINCE, CREATED_EARLIER, created_unchanged
from etl.load.state import Record, StateStore
from etl.load.throttle import Throttle
from etl.progress import Progress, as_progress
from etl.rules import RULES, Rule
from etl.settings import MAX_SEARCH_LAG, NO_ANSWER_LIMIT, RETRY_BUDGET, SETTLE_ROUNDS
from etl.transform import fill_refs

__all__ = ["CREATED_EARLIER", "LoadOptions", "Loader", "Result", "Send", "created_unchanged", "failure"]

#: An updated row's message: what the PATCH did, and what it did not (the API's update is partial: OpenAPI
#: "Partial ... fields to update"; no field is documented as cleared by one).
UPDATED = "patched to the file's values; a field the file no longer gives keeps its earlier value"

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
#: A round waits this many times the search lag observed (one create's lag says little of the next one's).
LAG_MARGIN = 1.5
_PROBE_FIRST_POLL = 0.25  # seconds; then a quarter of the time waited so far


@dataclass(frozen=True)
class LoadOptions:
    """How hard and how carefully to send."""

    rate: float | None = None  # requests per second; None: paced by the server's headers
    concurrency: int = 8
    consistency_window: float = 10.0  # seconds before a search can be trusted to show a create
    max_retries: int = 8  # for answers that say "not processed, try later"
    update: bool = False  # PATCH rows that changed since they were created (else report them as changed)
    no_answer_limit: int = NO_ANSWER_LIMIT  # requests in a row without any answer before the run stops
    retry_budget: int = RETRY_BUDGET  # retries in all per run ("not processed, try later" answers)
    settle_rounds: int = SETTLE_ROUNDS  # rounds of lookup and re-send for unknown outcomes, per stage
    lag_limit: float = MAX_SEARCH_LAG  # longest wait for search to show one of the run's own creates


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

    #: Whether a stage's unknown outcomes are settled in the run (:meth:`_settle`); a loader whose sends are
    #: not one request per row (bulk jobs) settles its own way and leaves this off.
    settles_in_run: ClassVar[bool] = True

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
        self.retries = 0  # retries spent (of options.retry_budget)
        self.budget_spent: str | None = None  # why the run stopped: the retry budget is spent
        self.search_lag: float | None = None  # seconds search took to show one of this run's creates
        self.settle_problem: str | None = None  # why unknown outcomes could not be settled (no safe wait)
        self.settle_rounds = 0  # the most rounds a stage needed to settle its doubt
        self._outcomes: list[Record] = []
        self._need_lag = False  # doubt met: measure the search lag on the next create
        self._own_doubt = False  # a send of this run had an unknown outcome
        self._last_created: tuple[Send, bytes, str, float] | None = None  # a create to watch in search
        self._probe: asyncio.Task[None] | None = None
        self._earlier_lag = _earlier_lag(state)

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
        if self._probe is not None and not self._probe.done():
            self._probe.cancel()  # no doubt was left to settle with it
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
        doubtful: list[Send] = []  # left in doubt by an earlier run: settled with this run's doubt
        for kind, group in by_kind.items():
            stored = self.state.get(kind, [i.source_key for i in group])
            for item in group:
                rec = stored.get(item.source_key)
                if rec is not None and rec.state in ("pending", "unknown"):
                    doubtful.append(item)
                    self._need_lag = True
                    self._results[(kind, item.source_key)] = failure(
                        "unknown", RULES["unknown-outcome"], reason=rec.message or "left in doubt by an earlier run"
                    )
                    continue
                if rec is not None and rec.state == "created":
                    if rec.body_hash and rec.body_hash != item.body_hash and rec.resource_id:
                        changed.append((item, rec.resource_id))
                    else:
                        self._results[(kind, item.source_key)] = Result(
                            "skipped", rec.resource_id, message=CREATED_EARLIER
                        )
                    continue
                to_send.append(item)
        if doubtful and not self.settles_in_run:
            # Settled once, before anything is sent (after the consistency window): found, skipped;
            # certainly absent, sent with the rest of the stage; else left unknown.
            to_send.extend(await self._settle_before(doubtful))
            doubtful = []
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
        await self._settle(doubtful, ready)
        for item, resource_id in changed:
            self._results[(item.kind, item.source_key)] = await self._update(item, resource_id)

    async def _update(self, item: Send, resource_id: str) -> Result:
        """A row that changed since it was created: reported, or patched with ``update``."""
        if not self.options.update or self.stopping or self.unresponsive:
            return Result("changed", resource_id, message=CHANGED_SINCE)
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
            return Result("updated", resource_id, outcome.status, message=UPDATED)
        if isinstance(outcome, Refused):
            return Result("failed", resource_id, outcome.status, outcome.code, outcome.field, outcome.message)
        return failure("failed", RULES["not-updated"], resource_id=resource_id, reason=getattr(outcome, "reason", ""))

    def _not_sent(self) -> Result:
        """The result of a row never sent because the run stopped (a refusal, silence, a signal)."""
        why = self.aborted or self.unresponsive or self.budget_spent
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

    async def _resolve(
        self, items: Sequence[Send], stored: dict[str, Record], lag: float | None = None
    ) -> dict[str, Result]:
        """Look up rows whose earlier send has no known outcome, ``lag`` seconds (default: the consistency
        window) after the latest of those sends."""
        if not items:
            return {}
        newest = max(_last_possible_send(stored[i.source_key]) for i in items)
        wait = newest + (self.options.consistency_window if lag is None else lag) - time.time()
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
            except QuotaExceededError as exc:
                self._quota(exc)
                results[item.source_key] = failure(
                    "unknown", RULES["unknown-outcome"], "not-looked-up", why=exc
                )
                continue
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
                if self.stopping or self.unresponsive or self.aborted or self.budget_spent:
                    # The rest was never marked pending, let alone sent.
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
                if self.aborted is not None or self.stopping or self.unresponsive is not None or self.budget_spent:
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
            if self.budget_spent is not None or self.aborted is not None:
                return self._not_sent()  # not processed: safe to send next time
            if self.retries >= self.options.retry_budget:
                self.budget_spent = (
                    f"the run's retry budget ({self.options.retry_budget} retries of requests the API did not "
                    f"process: 429 RATE_LIMITED, connections never opened) is spent; the rest was not sent. "
                    f"Run the same command again later"
                )
                self.progress.note(f"stopping: {self.budget_spent}")
                return self._not_sent()
            self.retries += 1
            if outcome.reason == "RATE_LIMITED":
                self.stats.retries_429 += 1
                self.throttle.pause(outcome.seconds)
            else:
                await asyncio.sleep(outcome.seconds)
                if self.unresponsive is not None:  # fell silent meanwhile: this one never left either
                    return self._not_sent()
        if isinstance(outcome, Created):
            self._watch(item, body, outcome.resource_id)
            return Result("created", outcome.resource_id, outcome.status)
        if isinstance(outcome, Refused):
            if outcome.status == 429 and outcome.code in QUOTA_CODES:
                self._quota(QuotaExceededError(outcome.status, outcome.code, outcome.message))
                return self._not_sent()  # refused, not written: the same command sends it once the quota resets
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
        self._need_lag = self._own_doubt = True
        return failure("unknown", RULES["unknown-outcome"], http_status=outcome.status, reason=outcome.reason)

    def _quota(self, exc: QuotaExceededError) -> None:
        """A quota is used up: stop the run (nothing more is sent; what is in flight finishes)."""
        if self.aborted is None:
            self.aborted = exc
            self.progress.note(f"stopping: {exc.message}")

    # --- settling doubt in the run ---------------------------------------------

    async def _settle(self, earlier: Sequence[Send], sent: Sequence[Send]) -> None:
        """Settle a stage's doubt: ``earlier`` rows an earlier run left in doubt, and those of ``sent`` whose
        outcome is unknown. Each round waits for search (:meth:`_safe_lag`), looks them up, and re-sends the
        certainly absent; at most ``settle_rounds`` rounds."""
        if not self.settles_in_run:
            return
        doubt = [*earlier, *(i for i in sent if self._results[(i.kind, i.source_key)].state == "unknown")]
        mine = {(i.kind, i.source_key) for i in sent}  # created by this run when found
        rounds = 0
        while doubt and rounds < self.options.settle_rounds:
            if self.stopping or self.aborted is not None or self.unresponsive or self.budget_spent:
                break
            lag = await self._safe_lag()
            if lag is None:
                break
            rounds += 1
            self.progress.note(f"settling {len(doubt)} unknown outcomes (round {rounds}): search shows a create "
                               f"within {lag:.1f} s")
            absent: list[Send] = []
            still: list[Send] = []
            by_kind: dict[str, list[Send]] = {}
            for item in doubt:
                by_kind.setdefault(item.kind, []).append(item)
            for kind, group in by_kind.items():
                stored = self.state.get(kind, [i.source_key for i in group])
                resolved = await self._resolve(group, stored, lag)
                for item in group:
                    result = resolved[item.source_key]
                    pair = (kind, item.source_key)
                    if result.state == "failed":  # certainly absent: sent again
                        absent.append(item)
                    elif result.state == "unknown":
                        still.append(item)
                        self._results[pair] = result
                    elif pair in mine:
                        self._results[pair] = Result(
                            "created", result.resource_id, message="found by lookup after an unknown outcome"
                        )
                    else:
                        self._results[pair] = result
            ready: list[Send] = []
            for item in absent:
                _, missing = self._fill(item)
                if missing:
                    self._results[(item.kind, item.source_key)] = self._blocked(missing[0])
                elif self.stopping or self.aborted is not None or self.unresponsive or self.budget_spent:
                    self._results[(item.kind, item.source_key)] = self._not_sent()
                else:
                    ready.append(item)
            self._results.update(await self._send_all(ready, lambda i: self._fill(i)[0]))
            mine.update((i.kind, i.source_key) for i in ready)
            doubt = [*still, *(i for i in ready if self._results[(i.kind, i.source_key)].state == "unknown")]
        self.settle_rounds = max(self.settle_rounds, rounds)

    async def _settle_before(self, earlier: Sequence[Send]) -> list[Send]:
        """Look up what an earlier run left in doubt; the certainly absent, to be sent."""
        absent: list[Send] = []
        by_kind: dict[str, list[Send]] = {}
        for item in earlier:
            by_kind.setdefault(item.kind, []).append(item)
        for kind, group in by_kind.items():
            stored = self.state.get(kind, [i.source_key for i in group])
            resolved = await self._resolve(group, stored)
            for item in group:
                if resolved[item.source_key].state == "failed":
                    absent.append(item)
                else:
                    self._results[(kind, item.source_key)] = resolved[item.source_key]
        return absent

    async def _safe_lag(self) -> float | None:
        """Seconds after a send when search can be trusted to show it; None when no wait is safe."""
        if self.search_lag is None and self.settle_problem is None:
            if self._probe is None and self._last_created is not None:
                self._start_probe()
            if self._probe is not None:
                await self._probe
        floor = self.options.consistency_window
        if self.settle_problem is not None:
            return None
        if self.search_lag is not None:
            return max(floor, self.search_lag * LAG_MARGIN)
        if self._earlier_lag is not None:  # nothing of this run's own to watch: what an earlier run measured
            return max(floor, self._earlier_lag * LAG_MARGIN)
        # Nothing measured, ever: the bound for this run's own doubt; the window for an earlier run's
        # (its sends are usually long past, and a resumed run of nothing but doubt has no create to watch).
        return max(floor, self.options.lag_limit) if self._own_doubt else floor

    def _watch(self, item: Send, body: bytes, resource_id: str) -> None:
        """A create of this run: the one whose appearance in search measures the lag, once doubt is met."""
        if self._probe is not None or self.search_lag is not None:
            return
        self._last_created = (item, body, resource_id, time.monotonic())
        if self._need_lag:
            self._start_probe()

    def _start_probe(self) -> None:
        """Start watching the latest create in search (when a narrow search can show it)."""
        assert self._last_created is not None
        item, body, resource_id, created = self._last_created
        self._last_created = None
        try:
            params = _probe_params(item.kind, json.loads(body))
        except ValueError:
            params = None
        if params is not None:
            self._probe = asyncio.create_task(self._measure(item, params, resource_id, created))

    async def _measure(self, item: Send, params: dict[str, str], resource_id: str, created: float) -> None:
        """Poll search until it shows ``resource_id`` (created at ``created``): the search lag, or a problem."""
        deadline = created + self.options.lag_limit
        while True:
            try:
                found = await self.client.search(item.route, params)
            except QuotaExceededError as exc:
                self._quota(exc)
                self.settle_problem = f"search lag not measured: {exc.message}"
                return
            except LookupFailed as exc:
                self.settle_problem = f"search lag not measured: {exc}; unknown outcomes are left unknown"
                self.progress.note(self.settle_problem)
                return
            now = time.monotonic()
            if any(str(c.get("id")) == resource_id for c in found if isinstance(c, dict)):
                self.search_lag = round(now - created, 3)
                return
            if now >= deadline:
                self.settle_problem = (
                    f"search did not show this run's own create within {self.options.lag_limit:g} s: no wait is "
                    "safe, so unknown outcomes are left unknown (never re-sent on a guess); run the same command "
                    "again, or `clinik-etl reconcile`, once search catches up"
                )
                self.progress.note(f"stopping the lookups: {self.settle_problem}")
                return
            await asyncio.sleep(min(max(_PROBE_FIRST_POLL, (now - created) / 4), max(deadline - now, 0.01)))

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


def _probe_params(kind: str, body: dict[str, Any]) -> dict[str, str] | None:
    """A narrow search that shows a create of ``kind`` made from ``body`` (its id is then looked for among the
    results, whatever their shape); None when there is none."""
    if isinstance(body.get("patientId"), str):
        return {"patientId": body["patientId"]}
    if kind == "patient" and isinstance(body.get("lastName"), str):
        return {"name": body["lastName"], **({"birthDate": body["birthDate"]} if isinstance(body.get("birthDate"), str)
                                             else {})}
    if isinstance(body.get("npi"), str):
        return {"npi": body["npi"]}
    return None


def _earlier_lag(state: StateStore) -> float | None:
    """The largest search lag an earlier load on this state store measured (``search_lag_seconds``), if any."""
    lags = [
        float(lag)
        for run in state.runs()
        if isinstance(summary := run.get("summary"), dict)
        and isinstance(lag := summary.get("search_lag_seconds"), int | float)
    ]
    return max(lags) if lags else None

