"""Faults on demand: the sandbox misbehaving the way a real API over a real
network does, reproducibly.

Three request faults, each a share of the writes (``POST`` and ``PATCH``)
that pass the key, rate and scope checks of the gate:

``fail``  answer 500, 502 or 503 **without** writing;
``drop``  write (the create commits), then close the connection before any
          answer, so the client sees the server disconnect;
``slow``  write at once, then hold the answer for ``slow_seconds`` (longer
          than the client's timeout): the write happened, the answer is late,
          and nobody is left to read it.

Reads (``GET``) and deletes are never faulted, so a client can always look up
what it did. Whether a write is faulted is drawn from one
``random.Random(seed)``, two numbers per write in arrival order, so a seeded
sandbox faults the same way for the same sequence of requests.

A fourth fault is not a request's: **search lag**. With ``search_lag`` the
resources a create or a bulk job writes appear in search only that many
seconds later, as with the real API's eventually consistent index; reading by
id stays immediately consistent (:class:`LaggingStore`).

The request faults live in :class:`FaultGate`, an ASGI middleware that
``build_app`` places right inside ``ApiGate``, so refused requests (401, 429,
403) are answered as usual and faulted answers still carry the gate's
headers.
"""

from __future__ import annotations

import asyncio
import random
import secrets
import threading
import time
from collections import Counter
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Final, Literal

from starlette.responses import PlainTextResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from etl.errors import UsageError
from etl.sandbox.problems import ApiProblemError, request_id
from etl.sandbox.store import Page, Store

__all__ = ["FAULT_STATUSES", "Fault", "FaultGate", "FaultPlan", "LaggingStore", "check_fault_settings"]

#: The statuses a ``fail`` fault answers with, drawn evenly.
FAULT_STATUSES: Final = (500, 502, 503)
#: The methods a fault may hit: writes only.
FAULTY_METHODS: Final = frozenset({"POST", "PATCH"})

FaultKind = Literal["fail", "drop", "slow"]


def check_fault_settings(
    *, fail_rate: float, drop_rate: float, slow_rate: float, slow_seconds: float, search_lag: float
) -> None:
    """Raise :class:`UsageError` unless the fault settings make sense together."""
    rates = {"fail_rate": fail_rate, "drop_rate": drop_rate, "slow_rate": slow_rate}
    for name, rate in rates.items():
        if not 0.0 <= rate <= 1.0:
            raise UsageError(f"{name} must be a share of requests between 0 and 1, not {rate}")
    if sum(rates.values()) > 1.0:
        raise UsageError("fail_rate, drop_rate and slow_rate together must not exceed 1")
    if not slow_seconds > 0:
        raise UsageError("slow_seconds must be a positive number of seconds")
    if not search_lag >= 0:
        raise UsageError("search_lag must be zero or a positive number of seconds")


@dataclass(frozen=True)
class Fault:
    """What to do to one request; ``status`` only for ``fail``."""

    kind: FaultKind
    status: int | None = None


class FaultPlan:
    """Which write gets which fault: seeded draws in arrival order.

    ``seed=None`` picks a fresh seed, kept in :attr:`seed` so that a run worth
    repeating can be repeated. :attr:`injected` counts the faults dealt so far
    by kind (``fail``, ``drop``, ``slow``).
    """

    def __init__(
        self,
        fail_rate: float = 0.0,
        drop_rate: float = 0.0,
        slow_rate: float = 0.0,
        slow_seconds: float = 35.0,
        seed: int | None = None,
    ) -> None:
        check_fault_settings(
            fail_rate=fail_rate, drop_rate=drop_rate, slow_rate=slow_rate, slow_seconds=slow_seconds, search_lag=0.0
        )
        self.fail_rate = fail_rate
        self.drop_rate = drop_rate
        self.slow_rate = slow_rate
        self.slow_seconds = slow_seconds
        self.seed = secrets.randbits(32) if seed is None else seed
        self.injected: Counter[str] = Counter()
        self._rng = random.Random(self.seed)
        # One event loop draws today, but bulk or a second loop must not
        # interleave two requests' draws.
        self._lock = threading.Lock()

    @classmethod
    def from_config(cls, config: Any) -> FaultPlan:
        """The plan a ``SandboxConfig`` asks for."""
        return cls(config.fail_rate, config.drop_rate, config.slow_rate, config.slow_seconds, config.seed)

    @property
    def active(self) -> bool:
        """Whether any request fault can happen."""
        return self.fail_rate + self.drop_rate + self.slow_rate > 0

    def draw(self) -> Fault | None:
        """The fault for the next write, if any (always two draws, so the
        sequence does not depend on which faults came before)."""
        with self._lock:
            u = self._rng.random()
            pick = self._rng.randrange(len(FAULT_STATUSES))
            fault: Fault | None = None
            if u < self.fail_rate:
                fault = Fault("fail", FAULT_STATUSES[pick])
            elif u < self.fail_rate + self.drop_rate:
                fault = Fault("drop")
            elif u < self.fail_rate + self.drop_rate + self.slow_rate:
                fault = Fault("slow")
            if fault is not None:
                self.injected[fault.kind] += 1
            return fault

    def describe(self) -> str:
        """One line for an operator: the rates and the seed."""
        shares = (("fail", self.fail_rate), ("drop", self.drop_rate), ("slow", self.slow_rate))
        parts = [f"{name} {rate:.1%}" for name, rate in shares if rate]
        if self.slow_rate:
            parts.append(f"slow answers after {self.slow_seconds:g} s")
        return f"faults: {', '.join(parts) or 'none'} (seed {self.seed})"


# -- the middleware --------------------------------------------------------------


async def _drain(receive: Receive) -> None:
    """Read the request body to its end (or to a disconnect) and drop it."""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect" or not message.get("more_body", False):
            return


async def _until_disconnect(receive: Receive) -> None:
    """Wait for the client to go away (after the handler read the body,
    ``receive`` has nothing else left to say)."""
    while (await receive())["type"] != "http.disconnect":
        pass


def _transport(receive: Receive) -> asyncio.BaseTransport | None:
    # ASGI has no "drop this connection" message. uvicorn's ``receive`` is a
    # bound method of its request cycle, which holds the connection's
    # transport; with another server, None and the fallback below.
    transport = getattr(getattr(receive, "__self__", None), "transport", None)
    return transport if isinstance(transport, asyncio.BaseTransport) else None


class FaultGate:
    """ASGI middleware that deals :class:`FaultPlan` faults to writes.

    It must sit inside ``ApiGate``: only admitted requests reach it.
    """

    def __init__(self, app: ASGIApp, plan: FaultPlan) -> None:
        self.app = app
        self.plan = plan

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        fault = None
        if scope["type"] == "http" and scope["method"] in FAULTY_METHODS and self.plan.active:
            fault = self.plan.draw()
        if fault is None:
            await self.app(scope, receive, send)
        elif fault.kind == "fail":
            await self._fail(scope, receive, send, fault.status or 500)
        elif fault.kind == "drop":
            await self._drop(scope, receive, send)
        else:
            await self._slow(scope, receive, send)

    async def _fail(self, scope: Scope, receive: Receive, send: Send, status: int) -> None:
        # Nothing reaches the handler, so nothing is written.
        await _drain(receive)
        if status == 500:
            problem = ApiProblemError(500, "INTERNAL_ERROR", "The sandbox failed to handle the request (injected)")
            await problem.response(request_id(scope))(scope, receive, send)
            return
        # 502 and 503 come from the gateway in front of an API, not the API:
        # plain text, not the error envelope.
        title = "Bad Gateway" if status == 502 else "Service Unavailable"
        await PlainTextResponse(f"{status} {title}", status_code=status)(scope, receive, send)

    async def _drop(self, scope: Scope, receive: Receive, send: Send) -> None:
        answer: list[Message] = []

        async def swallow(message: Message) -> None:
            answer.append(message)

        await self.app(scope, receive, swallow)  # the write commits here
        transport = _transport(receive)
        if transport is not None:
            transport.close()  # nothing was written to it: the client reads EOF, no status line
            await _until_disconnect(receive)
            return
        # Fallback: the status line, then the connection ends mid-answer.
        await send(answer[0])
        raise ConnectionAbortedError("injected fault: connection dropped after the status line")

    async def _slow(self, scope: Scope, receive: Receive, send: Send) -> None:
        answer: list[Message] = []

        async def hold(message: Message) -> None:
            answer.append(message)

        await self.app(scope, receive, hold)  # the write commits now; the answer waits
        try:
            async with asyncio.timeout(self.plan.slow_seconds):
                await _until_disconnect(receive)
            return  # the client gave up first: the answer goes nowhere
        except TimeoutError:
            pass
        for message in answer:
            await send(message)


# -- search lag --------------------------------------------------------------------


class LaggingStore(Store):
    """A :class:`Store` whose search shows a new resource only ``lag``
    seconds after it was written; :meth:`get` shows it at once.

    What is still hidden is kept in memory, so a restarted sandbox shows
    everything: the lag is a property of a running index, not of the data.
    """

    def __init__(self, path: str | None, lag: float, clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__(path)
        self.lag = lag
        self._clock = clock
        # route -> id -> when it becomes visible; insertion order is
        # visibility order, since the lag is the same for every resource.
        self._fresh: dict[str, dict[str, float]] = {}
        self._fresh_lock = threading.Lock()

    def insert_many(self, route: str, resources: Iterable[Mapping[str, Any]]) -> None:
        """Store new resources, hidden from search for ``lag`` seconds."""
        resources = list(resources)
        # Noted before the commit: a search racing the insert must not see it early.
        visible = self._clock() + self.lag
        with self._fresh_lock:
            fresh = self._fresh.setdefault(route, {})
            for resource in resources:
                fresh[str(resource["id"])] = visible
        super().insert_many(route, resources)

    def hidden(self, route: str) -> set[str]:
        """The ids of ``route`` that search does not show yet."""
        now = self._clock()
        with self._fresh_lock:
            fresh = self._fresh.get(route, {})
            while fresh:
                oldest = next(iter(fresh))
                if fresh[oldest] > now:
                    break
                del fresh[oldest]
            return set(fresh)

    def search(
        self, route: str, params: Mapping[str, str], *, after: int = 0, limit: int = 20, hidden: Collection[str] = ()
    ) -> Page:
        """As :meth:`Store.search`, without the resources still in the lag."""
        return super().search(route, params, after=after, limit=limit, hidden={*hidden, *self.hidden(route)})
