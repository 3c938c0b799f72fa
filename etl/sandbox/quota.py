"""The sandbox's 429s other than a short rate limit: monthly quotas, and the rolling per-organisation window.

What the sandbox imitates, from the public docs (``clinikapi/docs``, ``errors.mdx``, "Rate Limits" and
"Monthly Quotas & Overage"):

- **The monthly quota** (``quota``): one request pool per organisation, every key drawing from it; on the
  Sandbox (free) plan every request counts (1,000 a month). Past it: ``429`` with code
  ``MONTHLY_QUOTA_EXCEEDED`` (overage billing off, the default, and always on the Sandbox plan) and the
  documented body ``{"error": "Quota exceeded", "message": ..., "code": ...}``. Every authenticated
  response carries ``X-Quota-Limit``, ``X-Quota-Used``, ``X-Quota-Remaining``, ``X-Quota-Billable`` and
  ``X-Quota-Reset`` (an ISO timestamp). The pool resets on the 1st of each month (UTC); ``quota_window``
  seconds replace the month for tests (windows then start when the sandbox does).
- **The sandbox allowance** (``sandbox_quota``): a paid plan's separate monthly pool for test keys (every
  sandbox key is a ``clk_test_`` key). Past it: ``429 SANDBOX_QUOTA_EXCEEDED``; responses carry
  ``X-Sandbox-Limit``, ``X-Sandbox-Used`` and ``X-Sandbox-Remaining``. On such a plan test traffic is not
  billable: with both pools set, requests draw from the sandbox pool and ``X-Quota-Billable`` is ``false``.
- **The rate limit as documented** (``rolling``): a per-minute ceiling that is rolling and "shared across
  every key in the organization"; past it, ``429 RATE_LIMITED`` with ``Retry-After``. The sandbox's older
  fixed window per key (``etl.sandbox.app.FixedWindow``) stays the default; :class:`RollingWindow` is the
  documented one, over ``window`` seconds (the docs: 60).

The official SDK (``clinikapi/sdk``, ``src/errors.ts``) maps every 429 to ``RATE_LIMITED`` and retries it;
the docs tell the kinds apart by ``code``, and so does the loader (``etl.load.client``).

A request refused by a quota does not count against it (the pool stays at its limit). Requests refused
before this gate (a bad key, the rate limit, a scope) are not counted either: :class:`QuotaGate` sits right
inside ``ApiGate``, so it sees only admitted requests, and outside the fault injection, so a faulted write
(5xx, dropped, late) has counted, as a real one would.
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final, Generic, TypeVar

from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from etl.errors import UsageError
from etl.sandbox.problems import ApiProblemError, request_id

__all__ = ["Pool", "QuotaGate", "Quotas", "RollingWindow", "Standing", "check_quota_settings"]

_UNMETERED: Final = frozenset({"/health", "/v1/metadata"})


def check_quota_settings(*, quota: int | None, quota_window: float | None, sandbox_quota: int | None) -> None:
    """Raise :class:`UsageError` unless the quota settings make sense."""
    for name, value in (("quota", quota), ("sandbox_quota", sandbox_quota)):
        if value is not None and value < 1:
            raise UsageError(f"{name} must be at least 1 request, or None for no quota")
    if quota_window is not None and not (math.isfinite(quota_window) and quota_window > 0):
        raise UsageError("quota_window must be a positive number of seconds, or None for a calendar month")


def _month_end(now: float) -> float:
    """The 1st of the next month, 00:00 UTC, after ``now`` (epoch seconds)."""
    day = datetime.fromtimestamp(now, UTC)
    year, month = (day.year + 1, 1) if day.month == 12 else (day.year, day.month + 1)
    return datetime(year, month, 1, tzinfo=UTC).timestamp()


def _iso(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


@dataclass(frozen=True)
class Standing:
    """Where a pool stands after a request: its size, what is used, and when it resets (epoch seconds)."""

    limit: int
    used: int
    resets: float
    exceeded: bool

    @property
    def remaining(self) -> int:
        """Requests left before the limit."""
        return max(0, self.limit - self.used)

    @property
    def reset_iso(self) -> str:
        """When the pool resets, as the ``X-Quota-Reset`` header says it: ISO 8601, UTC."""
        return _iso(self.resets)


class Pool:
    """A request pool of ``limit`` per period: a calendar month (UTC) when ``window`` is None, else ``window``
    seconds from ``start`` (the sandbox's start). ``clock`` gives epoch seconds."""

    def __init__(self, limit: int, window: float | None, clock: Callable[[], float] = time.time) -> None:
        self.limit = limit
        self.window = window
        self._clock = clock
        self._start = clock()
        self._resets = self._period_end(self._start)
        self._used = 0
        self._lock = threading.Lock()

    def _period_end(self, now: float) -> float:
        if self.window is None:
            return _month_end(now)
        periods = math.floor((now - self._start) / self.window) + 1
        return self._start + periods * self.window

    def standing(self) -> Standing:
        """Where the pool stands, counting nothing."""
        with self._lock:
            now = self._clock()
            if now >= self._resets:
                self._used, self._resets = 0, self._period_end(now)
            return Standing(self.limit, self._used, self._resets, self._used >= self.limit)

    def take(self) -> Standing:
        """Count one request, unless the pool is used up (then it is refused, and not counted)."""
        with self._lock:
            now = self._clock()
            if now >= self._resets:
                self._used, self._resets = 0, self._period_end(now)
            exceeded = self._used >= self.limit
            if not exceeded:
                self._used += 1
            return Standing(self.limit, self._used, self._resets, exceeded)


class Quotas:
    """The monthly quota and the sandbox allowance a sandbox enforces (either may be None: not enforced)."""

    def __init__(self, quota: Pool | None, sandbox: Pool | None) -> None:
        self.quota = quota
        self.sandbox = sandbox

    @classmethod
    def from_config(cls, config: Any) -> Quotas:
        """The pools a ``SandboxConfig`` asks for."""
        window = config.quota_window
        return cls(
            Pool(config.quota, window) if config.quota is not None else None,
            Pool(config.sandbox_quota, window) if config.sandbox_quota is not None else None,
        )

    @property
    def active(self) -> bool:
        """Whether any pool is enforced."""
        return self.quota is not None or self.sandbox is not None

    def admit(self) -> tuple[dict[str, str], ApiProblemError | None]:
        """Count one admitted request: the headers every answer carries, and the 429 if a pool is used up."""
        headers: dict[str, str] = {}
        problem: ApiProblemError | None = None
        if self.sandbox is not None:
            allowance = self.sandbox.take()
            headers.update({
                "X-Sandbox-Limit": str(allowance.limit),
                "X-Sandbox-Used": str(allowance.used),
                "X-Sandbox-Remaining": str(allowance.remaining),
            })
            if allowance.exceeded:
                problem = ApiProblemError(
                    429, "SANDBOX_QUOTA_EXCEEDED",
                    f"Monthly sandbox request allowance reached ({allowance.limit:,} test requests). "
                    f"It resets at {allowance.reset_iso}.",
                )
        if self.quota is not None:
            billable = self.sandbox is None  # a paid plan's test traffic is metered in its own pool, not billed
            pool = self.quota.take() if billable and problem is None else self.quota.standing()
            headers.update({
                "X-Quota-Limit": str(pool.limit),
                "X-Quota-Used": str(pool.used),
                "X-Quota-Remaining": str(pool.remaining),
                "X-Quota-Billable": "true" if billable else "false",
                "X-Quota-Reset": pool.reset_iso,
            })
            if billable and pool.exceeded and problem is None:
                problem = ApiProblemError(
                    429, "MONTHLY_QUOTA_EXCEEDED",
                    f"Monthly request quota reached ({pool.limit:,} included requests). Enable overage billing "
                    "or upgrade your plan to keep serving traffic.",
                )
        if problem is not None:
            problem.headers.update(headers)
        return headers, problem


class QuotaGate:
    """ASGI middleware: counts admitted API requests against the quotas, refuses past them, adds the headers.

    ``build_app`` places it right inside ``ApiGate`` (see the module's notes).
    """

    def __init__(self, app: ASGIApp, quotas: Quotas) -> None:
        self.app = app
        self.quotas = quotas

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self.quotas.active or scope["path"] in _UNMETERED:
            await self.app(scope, receive, send)
            return
        headers, problem = self.quotas.admit()
        if problem is not None:
            await problem.response(request_id(scope))(scope, receive, send)
            return

        async def with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                MutableHeaders(scope=message).update(headers)
            await send(message)

        await self.app(scope, receive, with_headers)


Q = TypeVar("Q")


class RollingWindow(Generic[Q]):
    """The documented rate limit: ``limit`` requests over any rolling ``window`` seconds, counted for the whole
    organisation (every key together). Same interface as ``FixedWindow``: :meth:`hit` returns what ``make``
    builds from (limit, remaining, reset seconds, exceeded). A refused request is not counted, so a client that
    waits as told (``Retry-After``) gets through."""

    def __init__(
        self, limit: int, window: float, make: Callable[[int, int, int, bool], Q],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.limit = limit
        self.window = window
        self._make = make
        self._clock = clock
        self._hits: deque[tuple[float, int]] = deque()
        self._used = 0
        self._lock = threading.Lock()

    def hit(self, key: str, cost: int = 1) -> Q:
        """Count ``cost`` requests (``key`` is ignored: the window is the organisation's)."""
        with self._lock:
            now = self._clock()
            while self._hits and self._hits[0][0] <= now - self.window:
                self._used -= self._hits.popleft()[1]
            exceeded = self._used + cost > self.limit
            if not exceeded:
                self._hits.append((now, cost))
                self._used += cost
            reset = self._free_after(now, cost) if exceeded else self._oldest_leaves(now)
            return self._make(self.limit, max(0, self.limit - self._used), reset, exceeded)

    def _oldest_leaves(self, now: float) -> int:
        """Whole seconds (at least 1) until the oldest counted request leaves the window."""
        return max(1, math.ceil(self._hits[0][0] + self.window - now)) if self._hits else max(1, math.ceil(self.window))

    def _free_after(self, now: float, cost: int) -> int:
        """Whole seconds (at least 1) until ``cost`` more requests fit in the window."""
        need = self._used + cost - self.limit
        for stamp, n in self._hits:
            need -= n
            if need <= 0:
                return max(1, math.ceil(stamp + self.window - now))
        return max(1, math.ceil(self.window))
