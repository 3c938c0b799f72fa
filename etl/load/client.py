"""The ClinikAPI client: the one place where httpx and HTTP meet the loader.

A create has exactly one of four answers (:class:`Created`, :class:`Refused`,
:class:`RetryLater`, :class:`Unknown`); no httpx exception leaves this module.
What is safe to retry is decided here, in :func:`exchange`, which the other
clients (bulk imports, Redox) call too:

- a connection that could not be opened never carried the request: retry;
- a 429 was not processed: wait as told, then retry;
- a timeout, a 5xx, or a connection lost after sending may have been
  written: the outcome is :class:`Unknown` and the request is NOT re-sent.

Diagnostics from the API can echo PHI; :func:`mask` removes e-mails, phone
numbers, SSNs and dates before anything is stored or printed. The API key is
sent in a header and appears nowhere else.
"""

from __future__ import annotations

import asyncio
import re
import ssl
from collections import Counter
from collections.abc import Awaitable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import httpx

from etl.errors import UsageError

if TYPE_CHECKING:
    from etl.settings import Settings

__all__ = [
    "ApiClient",
    "Created",
    "Outcome",
    "Refused",
    "RetryLater",
    "Unknown",
    "check_target",
    "exchange",
    "mask",
]

_MASKS = (
    # Keys first, so that no other pattern can take part of one and leave the rest readable.
    (re.compile(r"clk_(live|test)_[A-Za-z0-9]+"), "[key]"),
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


def check_target(base_url: str, api_key: str, *, live: bool) -> None:
    """Refuse a live key without opt-in, and plain http:// off loopback."""
    parts = urlsplit(base_url)
    if parts.scheme not in {"http", "https"} or not parts.hostname:
        raise UsageError(f"--base-url must be an http(s) URL, not {base_url!r}")
    loopback = parts.hostname in {"localhost", "::1"} or parts.hostname.startswith("127.")
    if parts.scheme == "http" and not loopback:
        raise UsageError(
            "plain http:// is allowed only for loopback; use https:// (keys and PHI would travel in clear)"
        )
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
    """Not processed: try again after ``seconds`` (429, or a connection never opened)."""

    seconds: float
    reason: str


@dataclass(frozen=True)
class Unknown:
    """Sent, but whether it was written cannot be told from the answer."""

    reason: str
    status: int | None = None


Outcome = Created | Refused | RetryLater | Unknown


#: Why a connection was refused before anything was sent: retrying cannot help, so a load stops.
UNTRUSTED = (
    "the target's TLS certificate is not trusted (certificates are always verified: for a private CA, "
    "set SSL_CERT_FILE to its bundle)"
)


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


class ApiClient:
    """ClinikAPI over a caller-provided ``httpx.AsyncClient``."""

    def __init__(self, http: httpx.AsyncClient, api_key: str, *, on_response: Any = None) -> None:
        self._http = http
        self._headers = {"x-api-key": api_key, "accept": "application/json"}
        self._on_response = on_response  # called with each response's headers (the throttle)
        self.requests = 0
        self.protocols: Counter[str] = Counter()  # responses per HTTP version ("HTTP/2" where TLS offered it)

    def _observe(self, response: httpx.Response) -> None:
        self.requests += 1
        self.protocols[response.http_version] += 1
        if self._on_response is not None:
            self._on_response(response.headers)

    async def create(self, route: str, body: bytes) -> Outcome:
        """POST one create body (already JSON)."""
        response = await exchange(
            self._http.post(route, content=body, headers={**self._headers, "content-type": "application/json"})
        )
        if not isinstance(response, httpx.Response):
            return response
        self._observe(response)
        status = response.status_code
        if status == 201 or status == 200:
            try:
                return Created(str(response.json()["data"]["id"]), status)
            except (ValueError, KeyError, TypeError):
                return Unknown("a success without a readable id", status)
        if status == 429:
            return RetryLater(_retry_after(response.headers), "RATE_LIMITED")
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
        if isinstance(response, Unknown):
            # A patch applied twice gives the same resource: unlike a create, it is safe to repeat later.
            return Unknown(f"update not confirmed: {response.reason}")
        if isinstance(response, RetryLater):
            return response
        self._observe(response)
        if response.status_code == 200:
            return Created(resource_id, 200)
        if response.status_code == 429:
            return RetryLater(_retry_after(response.headers), "RATE_LIMITED")
        if response.status_code >= 500:
            return Unknown(f"server error {response.status_code}", response.status_code)
        return refusal(response)

    async def get(self, path: str, params: Mapping[str, str | int] | None = None, *, attempts: int = 4) -> Any:
        """GET a resource or a page; safe to retry, so it does. Returns ``data``."""
        delay = 0.5
        last = ""
        for _ in range(attempts):
            try:
                response = await self._http.get(path, params=dict(params or {}), headers=self._headers)
            except httpx.TransportError as exc:
                last = type(exc).__name__
            else:
                self._observe(response)
                if response.status_code == 200:
                    return response.json()["data"]
                if response.status_code == 404:
                    return None
                if response.status_code == 429:
                    await asyncio.sleep(_retry_after(response.headers))
                    continue
                if response.status_code < 500:
                    refused = refusal(response)
                    raise LookupFailed(f"GET {path}: HTTP {refused.status} {refused.code}")
                last = f"HTTP {response.status_code}"
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


class LookupFailed(Exception):  # noqa: N818 - internal signal, caught by the loader
    """A read or search could not be completed; the caller keeps the row unknown."""


def _retry_after(headers: Mapping[str, str]) -> float:
    for name in ("retry-after", "x-ratelimit-reset"):
        try:
            return max(float(headers[name]), 0.05)
        except (KeyError, ValueError):
            continue
    return 1.0


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
