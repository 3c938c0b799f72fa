"""The ClinikAPI client: the one place where httpx and HTTP meet the loader.

A create has exactly one of four answers (:class:`Created`, :class:`Refused`,
:class:`RetryLater`, :class:`Unknown`); no httpx exception leaves this module.
What is safe to retry is decided here, in :func:`exchange`, which the other
clients (bulk imports, Redox) call too:

- a connection that could not be opened never carried the request: retry;
- a 429 was not processed. ``RATE_LIMITED`` (the per-minute ceiling): wait as
  told (``Retry-After``), then retry. A quota 429 (``MONTHLY_QUOTA_EXCEEDED``,
  ``SANDBOX_QUOTA_EXCEEDED``: the month's allowance is used up, errors.mdx
  "Monthly Quotas & Overage" of the public docs ``clinikapi/docs``) is a
  :class:`Refused` with that code: no wait of seconds helps, so the loader stops
  (:func:`quota_problem` reads what the API said about it). The official SDK
  (``clinikapi/sdk`` src/errors.ts) turns every 429 into ``RATE_LIMITED`` and
  retries it; we read the body's ``code`` instead;
- a timeout, a 5xx, or a connection lost after sending may have been
  written: the outcome is :class:`Unknown` and the request is NOT re-sent.

Diagnostics from the API can echo PHI; :func:`mask` removes e-mails, phone
numbers, SSNs and dates before anything is stored or printed. The API key is
sent in a header and appears nowhere else.

Where requests may go is decided here too, before any connection, by
:func:`check_target_url` (ClinikAPI and Redox alike): https anywhere, plain
http only to a loopback address, never a URL carrying user info.
"""

from __future__ import annotations

import asyncio
import ipaddress
import math
import re
import socket
import ssl
from collections import Counter
from collections.abc import Awaitable, Mapping
from dataclasses import dataclass
from typing import Any

import httpx

from etl.errors import LookupFailed, QuotaExceededError, UsageError
from etl.rules import RULES
from etl.settings import Settings, secret_problem
from schemas.limits import API_KEY_PATTERN, RATE_WINDOW_SECONDS

__all__ = [
    "QUOTA_CODES",
    "ApiClient",
    "Created",
    "Outcome",
    "Refused",
    "RetryLater",
    "Unknown",
    "check_target",
    "check_target_url",
    "exchange",
    "idle_client",
    "is_loopback_host",
    "mask",
    "quota_problem",
    "retry_after",
    "server_wait",
]

_MASKS = (
    # Keys first, so that no other pattern can take part of one and leave the rest readable.
    (re.compile(API_KEY_PATTERN), "[key]"),
    (re.compile(r"[\w.+-]+@[\w-]+(\.[\w-]+)+"), "[email]"),
    (re.compile(r"\b\d{3}-\d{2}-\d{4}\b"), "[ssn]"),
    (re.compile(r"\d{4}-\d{2}-\d{2}(T[\d:.]+(Z|[+-]\d{2}:?\d{2})?)?"), "[date]"),
    # A phone number stands alone: digits glued to a word (``pat_0000000000000000``, a key, a hex id)
    # are an identifier, which a user needs to find the row, not PHI.
    (re.compile(r"(?<!\w)\+?\(?\d[\d\s().-]{7,}\d(?!\w)"), "[phone]"),
)
_MAX_DIAGNOSTICS = 500


def mask(text: str) -> str:
    """Mask PHI and keys in API diagnostics, and cap their length."""
    for pattern, replacement in _MASKS:
        text = pattern.sub(replacement, text)
    return text[:_MAX_DIAGNOSTICS]


#: A host as httpx holds it (IDNA-encoded): a DNS name, an IPv4 address, or an IPv6 one with its zone.
_HOST = re.compile(rb"[A-Za-z0-9._-]+|[0-9A-Fa-f:.]+(%[A-Za-z0-9._~-]+)?")


def is_loopback_host(host: str) -> bool:
    """Whether ``host`` (a URL's host, IPv6 without brackets) certainly means this machine.

    An IP literal in 127.0.0.0/8, ``::1`` or an IPv4-mapped ``::ffff:127.x.y.z``; or exactly ``localhost``
    (any case, one optional trailing dot), resolved here and accepted only if every address it has is
    loopback. A name that merely starts like one (``127.0.0.1.nip.io``, ``localhost.example``) is a
    DNS name like any other, and DNS may point it anywhere.
    """
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        if host.lower() not in ("localhost", "localhost."):
            return False
        try:
            infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
        except (OSError, UnicodeError):
            return False
        return bool(infos) and all(is_loopback_host(str(info[4][0]).split("%", 1)[0]) for info in infos)
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address.is_loopback


def check_target_url(url: str, option: str = "--base-url") -> None:
    """Refuse a target URL that requests must not go to; ``option`` names the setting in the message.

    The one rule for ClinikAPI and Redox alike, applied before any connection: an ``http`` or
    ``https`` URL with a host; no user info (``user:key@host``: a key never travels, nor is it stored,
    in a URL), no query or fragment; plain ``http`` only to a loopback address
    (:func:`is_loopback_host`), since the key and patient data would cross any network in clear.
    URLs are parsed by httpx, which the requests go through. The message never repeats the URL's user info.
    """
    try:
        parts = httpx.URL(url)
    except (httpx.InvalidURL, TypeError, ValueError):
        raise UsageError(f"{option} is not a valid URL") from None
    if not _HOST.fullmatch(parts.raw_host) or not 0 < (parts.port or 443) < 65536:
        raise UsageError(f"{option} is not a valid URL (no such host name or port)")
    if parts.userinfo:
        raise UsageError(
            f"{option} must not hold a user name or key (user:key@host): the API key is read only from its "
            "environment variable or key file"
        )
    if parts.scheme not in ("http", "https") or not parts.host:
        raise UsageError(f"{option} must be an https:// URL with a host (http:// only for loopback)")
    if parts.query or parts.fragment:
        raise UsageError(f"{option} must not have a query (?...) or a fragment (#...)")
    if parts.scheme == "http" and not is_loopback_host(parts.host):
        raise UsageError(
            f"{option}: plain http:// is allowed only to a loopback address (127.0.0.0/8, ::1, or localhost "
            f"resolving to them), not {parts.host!r}; use https:// (the key and PHI would travel in clear)"
        )


def check_target(base_url: str, api_key: str, *, live: bool) -> None:
    """Refuse what :func:`check_target_url` refuses, a key of the wrong shape, and a live key without opt-in."""
    check_target_url(base_url)
    problem = secret_problem(api_key)
    if problem is not None:
        raise UsageError(problem)
    if api_key.startswith("clk_live_") and not live:
        raise UsageError("this is a live key (clk_live_): real patient data. Pass --live to confirm")


@dataclass(frozen=True)
class Created:
    """201: the resource exists with this id."""

    resource_id: str
    status: int = 201


@dataclass(frozen=True)
class Refused:
    """A 4xx answer: nothing was written."""

    status: int
    code: str
    message: str
    field: str | None = None


@dataclass(frozen=True)
class RetryLater:
    """Not processed: try again after ``seconds`` (429, or a connection never opened: ``status`` None)."""

    seconds: float
    reason: str
    status: int | None = None


@dataclass(frozen=True)
class Unknown:
    """Sent, but whether it was written cannot be told from the answer (``status`` None: there was none)."""

    reason: str
    status: int | None = None


Outcome = Created | Refused | RetryLater | Unknown


#: Why a connection was refused before anything was sent: retrying cannot help, so a load stops.
UNTRUSTED = RULES["untrusted-certificate"].text()


def _untrusted(exc: BaseException) -> bool:
    """Whether a connection failed on certificate verification (the cause httpx wraps)."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, ssl.SSLCertVerificationError) or "CERTIFICATE_VERIFY_FAILED" in str(seen):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


async def exchange(request: Awaitable[httpx.Response]) -> httpx.Response | RetryLater | Unknown:
    """Await one request: its response, or what a transport error means for it.

    This is the one place where httpx's transport errors are translated. A
    connection that could not be opened (or no free one in the pool) never
    carried the request: :class:`RetryLater`. Anything after that (no answer
    in time, a connection lost) may have been processed: :class:`Unknown`.
    """
    try:
        return await request
    except httpx.ConnectError as exc:
        if _untrusted(exc):
            return RetryLater(0.0, UNTRUSTED)
        return RetryLater(1.0, f"could not connect: {type(exc).__name__}")
    except (httpx.ConnectTimeout, httpx.PoolTimeout) as exc:
        return RetryLater(1.0, f"could not connect: {type(exc).__name__}")
    except httpx.TimeoutException as exc:
        return Unknown(f"no answer in time ({type(exc).__name__})")
    except httpx.TransportError as exc:
        return Unknown(f"connection lost after sending ({type(exc).__name__})")


def http_client(base_url: str, settings: Settings) -> httpx.AsyncClient:
    """The connection pool a load sends through: one connection per concurrent request, kept alive.

    HTTP/2 is offered during the TLS handshake and used when the server takes it (its requests then
    share one connection); plain-HTTP targets, such as the sandbox on loopback, speak HTTP/1.1.
    Certificates are always verified; ``SSL_CERT_FILE`` names a private CA's bundle.
    """
    limits = httpx.Limits(max_connections=settings.concurrency, max_keepalive_connections=settings.concurrency)
    return httpx.AsyncClient(base_url=base_url, timeout=settings.timeout, limits=limits, http2=True)


class _NoRequests(httpx.AsyncBaseTransport):
    """A transport that sends nothing: every request is a programming error."""

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        raise RuntimeError(f"{request.method} {request.url.path}: a load with nothing to send made a request")


def idle_client(base_url: str) -> httpx.AsyncClient:
    """The client of a load with nothing to send (a re-import of an unchanged export): its loader is built over it,
    but it opens no connection pool, TLS context or HTTP/2 machinery, and a request through it raises
    ``RuntimeError`` (a target that must not be asked is not asked)."""
    return httpx.AsyncClient(base_url=base_url, transport=_NoRequests())


class ApiClient:
    """ClinikAPI over a caller-provided ``httpx.AsyncClient``."""

    def __init__(self, http: httpx.AsyncClient, api_key: str, *, on_response: Any = None) -> None:
        self._http = http
        self._headers = {"x-api-key": api_key, "accept": "application/json"}
        self._on_response = on_response  # called with each response's headers (the throttle)
        self.requests = 0  # requests sent, answered or not
        self.silent = 0  # requests in a row that got no answer at all (timeouts, connections lost or refused)
        self.protocols: Counter[str] = Counter()  # responses per HTTP version ("HTTP/2" where TLS offered it)

    def _observe(self, response: httpx.Response) -> None:
        self.requests += 1
        self.silent = 0
        self.protocols[response.http_version] += 1
        if self._on_response is not None:
            self._on_response(response.headers)

    def _unanswered(self, outcome: RetryLater | Unknown) -> None:
        """A request without any answer: counted if it left (:class:`Unknown`), and in :attr:`silent` either way."""
        if isinstance(outcome, Unknown):
            self.requests += 1
        if outcome.reason != UNTRUSTED:
            self.silent += 1

    async def create(self, route: str, body: bytes) -> Outcome:
        """POST one create body (already JSON)."""
        response = await exchange(
            self._http.post(route, content=body, headers={**self._headers, "content-type": "application/json"})
        )
        if not isinstance(response, httpx.Response):
            self._unanswered(response)
            return response
        self._observe(response)
        status = response.status_code
        if status == 201 or status == 200:
            try:
                return Created(str(response.json()["data"]["id"]), status)
            except (ValueError, KeyError, TypeError):
                return Unknown("a success without a readable id", status)
        if status == 429:
            return _too_many(response)
        if status >= 500:
            return Unknown(f"server error {status}", status)
        return refusal(response)

    async def patch(self, route: str, resource_id: str, body: bytes) -> Outcome:
        """PATCH a created resource with a new body (a re-import's ``--update``)."""
        response = await exchange(
            self._http.patch(
                f"{route}/{resource_id}", content=body, headers={**self._headers, "content-type": "application/json"}
            )
        )
        if not isinstance(response, httpx.Response):
            self._unanswered(response)
        if isinstance(response, Unknown):
            # A patch applied twice gives the same resource: unlike a create, it is safe to repeat later.
            return Unknown(f"update not confirmed: {response.reason}")
        if isinstance(response, RetryLater):
            return response
        self._observe(response)
        if response.status_code == 200:
            return Created(resource_id, 200)
        if response.status_code == 429:
            return _too_many(response)
        if response.status_code >= 500:
            return Unknown(f"server error {response.status_code}", response.status_code)
        return refusal(response)

    async def get(self, path: str, params: Mapping[str, str | int] | None = None, *, attempts: int = 4) -> Any:
        """GET a resource or a page; safe to retry, so it does. Returns ``data``."""
        delay = 0.5
        last = ""
        for attempt in range(1, attempts + 1):
            try:
                response = await self._http.get(path, params=dict(params or {}), headers=self._headers)
            except httpx.TransportError as exc:
                last = type(exc).__name__
                never_sent = isinstance(exc, httpx.ConnectError | httpx.ConnectTimeout | httpx.PoolTimeout)
                self._unanswered(RetryLater(0.0, last) if never_sent else Unknown(last))
            else:
                self._observe(response)
                if response.status_code == 200:
                    return response.json()["data"]
                if response.status_code == 404:
                    return None
                if response.status_code == 429:
                    quota = quota_problem(response)
                    if quota is not None:  # no wait of seconds helps: the caller stops the run
                        raise quota
                    last = "HTTP 429 RATE_LIMITED"  # what the last attempt met, if none is left
                    if attempt < attempts:  # no wait after the last attempt: nothing follows it
                        await asyncio.sleep(retry_after(response.headers))
                    continue
                if response.status_code < 500:
                    refused = refusal(response)
                    raise LookupFailed(f"GET {path}: HTTP {refused.status} {refused.code}")
                last = f"HTTP {response.status_code}"
            if attempt < attempts:
                await asyncio.sleep(delay)
                delay *= 2
        raise LookupFailed(f"GET {path}: {last}")

    async def search(self, route: str, params: Mapping[str, str | int]) -> list[dict[str, Any]]:
        """Every match of a search, following the cursor."""
        found: list[dict[str, Any]] = []
        cursor: str | None = None
        while True:
            query = {**params, "count": 100, **({"cursor": cursor} if cursor else {})}
            page = await self.get(route, query)
            if not page:
                return found
            found.extend(page.get("data", []))
            cursor = page.get("cursor")
            if not page.get("hasMore") or not cursor:
                return found


def server_wait(value: str | None, default: float = 1.0) -> float:
    """The seconds a server asks to wait (``Retry-After``, ``X-RateLimit-Reset``), made safe to sleep on.

    At least 0.05 s and at most :data:`schemas.limits.RATE_WINDOW_SECONDS` (the API's rate-limit window:
    no honest wait is longer); ``default`` when the value is missing, not a number, ``nan`` or ``inf``
    (a hostile or broken server must not stall a run for ever).
    """
    try:
        seconds = float(value) if value is not None else default
    except ValueError:
        seconds = default
    if not math.isfinite(seconds):
        seconds = default
    return min(max(seconds, 0.05), RATE_WINDOW_SECONDS)


def retry_after(headers: Mapping[str, str]) -> float:
    """How long a 429 (or a 5xx that says so) asks to wait: ``Retry-After``, else ``X-RateLimit-Reset``, else 1 s."""
    for name in ("retry-after", "x-ratelimit-reset"):
        if name in headers:
            return server_wait(headers[name])
    return 1.0


#: The codes of a 429 that waiting seconds cannot cure: a month's allowance is used up (errors.mdx, clinikapi/docs).
QUOTA_CODES = frozenset({"MONTHLY_QUOTA_EXCEEDED", "SANDBOX_QUOTA_EXCEEDED"})

#: What each quota is called in a message, and the headers that describe it (errors.mdx).
_QUOTAS = {
    "MONTHLY_QUOTA_EXCEEDED": ("the plan's monthly request quota", "x-quota-limit", "x-quota-used"),
    "SANDBOX_QUOTA_EXCEEDED": ("the monthly sandbox (test-key) allowance", "x-sandbox-limit", "x-sandbox-used"),
}


def _code_of(response: httpx.Response) -> str | None:
    try:
        body = response.json()
    except ValueError:
        return None
    code = body.get("code") if isinstance(body, dict) else None
    return code if isinstance(code, str) else None


def quota_problem(response: httpx.Response) -> QuotaExceededError | None:
    """A 429 whose ``code`` says a quota is used up, as a :class:`QuotaExceededError` naming the quota, its size
    (``X-Quota-Limit`` / ``X-Sandbox-Limit``) and when it resets (``X-Quota-Reset``, an ISO time; the docs:
    the 1st of the month, UTC, when not said); None for any other answer (``RATE_LIMITED`` included)."""
    if response.status_code != 429:
        return None
    code = _code_of(response)
    if code not in QUOTA_CODES:
        return None
    name, limit_header, used_header = _QUOTAS[code]
    headers = response.headers
    limit = _header_int(headers.get(limit_header))
    used = _header_int(headers.get(used_header))
    size = f" ({used if used is not None else '?'} of {limit} requests used)" if limit is not None else ""
    reset = _header_time(headers.get("x-quota-reset"))
    when = f"resets at {reset}" if reset else "resets on the 1st of the month (UTC)"
    message = (
        f"{name} is used up{size}; it {when}. Nothing more was sent: run the same command again after "
        "that (or raise the plan) to send the rest"
    )
    return QuotaExceededError(429, code, message, reset)


def _header_int(value: str | None) -> int | None:
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None


_ISO_TIME = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}(:\d{2}(\.\d+)?)?(Z|[+-]\d{2}:?\d{2})?")


def _header_time(value: str | None) -> str | None:
    """An ISO timestamp from a header, or None when it is not one (a hostile header is not repeated)."""
    return value if value is not None and _ISO_TIME.fullmatch(value.strip()) else None


def _too_many(response: httpx.Response) -> Outcome:
    """A 429: a quota's is :class:`Refused` with its code (the run stops); ``RATE_LIMITED`` (or a 429 that says
    nothing) is :class:`RetryLater` after ``Retry-After``."""
    quota = quota_problem(response)
    if quota is not None:
        return Refused(429, quota.code, quota.message)
    return RetryLater(retry_after(response.headers), "RATE_LIMITED", 429)


def refusal(response: httpx.Response) -> Refused:
    """A 4xx as a :class:`Refused`: the API's code, its diagnostics masked (:func:`mask`), the field named."""
    try:
        body = response.json()
    except ValueError:
        return Refused(response.status_code, f"HTTP_{response.status_code}", mask(response.text[:200]))
    code = str(body.get("code") or f"HTTP_{response.status_code}")
    issues = body.get("issues") or []
    diagnostics = [str(i.get("diagnostics", "")) for i in issues if isinstance(i, dict)]
    field = diagnostics[0].split(":", 1)[0].strip() if diagnostics and ":" in diagnostics[0] else None
    message = "; ".join(diagnostics) or str(body.get("message") or body.get("error") or "")
    return Refused(response.status_code, code, mask(message), field)
