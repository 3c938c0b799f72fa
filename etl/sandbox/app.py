"""The sandbox's HTTP app: ClinikAPI's contract served from a SQLite store.

The request path, outside in::

    ServerErrorMiddleware (starlette's, never reached in practice)
    ApiGate        every request passes here before and after its handler:
                   request id, key, rate limit, scope, response headers, and
                   a JSON 500 for anything a handler did not expect
    ExceptionMiddleware   ApiProblemError / HTTPException -> the API's error body
    Router -> ResourceApi / BulkApi handlers -> Store

Fault injection (5xx, dropped connections, late answers) is
:class:`etl.sandbox.faults.FaultGate`, placed right inside :class:`ApiGate`
in :func:`build_app`: it sees every admitted request and acts before or
after the handler. Search lag is :class:`etl.sandbox.faults.LaggingStore`.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import math
import re
import secrets
import threading
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Final

from pydantic import ValidationError
from starlette.applications import Starlette
from starlette.datastructures import MutableHeaders
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Lifespan, Message, Receive, Scope, Send

from etl.errors import UsageError
from etl.sandbox.faults import FaultGate, FaultPlan, LaggingStore, check_fault_settings
from etl.sandbox.problems import REQUEST_ID, ApiProblemError, issue, now_iso, request_id
from etl.sandbox.quota import QuotaGate, Quotas, RollingWindow, check_quota_settings
from etl.sandbox.redox import RedoxGate, check_redox_tokens, new_redox_token
from etl.sandbox.shapes import SHAPES, Shape, render
from etl.sandbox.store import FILTERS, PAGING, SORTABLE, Store, sort_column
from schemas.limits import (
    API_KEY_PATTERN,
    BULK_MAX_DATA_BYTES,
    BULK_MAX_RECORDS,
    BULK_OPERATIONS_PER_HOUR,
    MAX_BODY_BYTES,
    PAGE_SIZE_MAX,
    RESOURCE_TYPES,
    ROUTES,
)
from schemas.models import model_for, validation_issues

__all__ = ["ApiProblemError", "Sandbox", "SandboxConfig", "build_app", "create_app"]

_log = logging.getLogger(__name__)

KEY_FORMAT: Final = re.compile(API_KEY_PATTERN)
KEY_SCOPES: Final = frozenset({"*", "read", "write"})
#: What the rate-limit headers announce when the sandbox does not limit.
NOMINAL_LIMIT: Final = 10_000_000
_READ_METHODS: Final = frozenset({"GET", "HEAD", "OPTIONS"})
_PUBLIC_PATHS: Final = frozenset({"/health", "/v1/metadata"})
_BULK_WINDOW: Final = 3600.0
# docs errors.mdx: requests carrying any of these are refused (METHOD_OVERRIDE_REJECTED).
_OVERRIDE_HEADERS: Final = (b"x-http-method-override", b"x-http-method", b"x-method-override")

# Per-request values the gate leaves in the ASGI scope for the handlers.
_QUOTA: Final = "clinik.quota"
_API_KEY: Final = "clinik.api_key"


# -- settings ----------------------------------------------------------------


def new_test_key() -> str:
    """A fresh sandbox key: ``clk_test_`` and 32 random hex characters."""
    return "clk_test_" + secrets.token_hex(16)


def _one_fresh_key() -> Mapping[str, str]:
    return {new_test_key(): "*"}


@dataclass(frozen=True)
class SandboxConfig:
    """How a sandbox behaves.

    ``db_path=None`` keeps resources in a private temporary SQLite file that
    is deleted when the sandbox closes. ``api_keys`` maps each accepted key to
    its scope (``"*"``, ``"read"`` or ``"write"``); the default is one fresh
    ``clk_test_`` key with every scope. ``rate_limit`` requests are allowed
    per key per ``window`` seconds; None means unlimited (the rate-limit
    headers are still sent, announcing :data:`NOMINAL_LIMIT`).

    Faults (see :mod:`etl.sandbox.faults`): ``fail_rate``, ``drop_rate`` and
    ``slow_rate`` are shares of admitted writes answered 5xx without writing,
    written then cut off without an answer, and written then answered after
    ``slow_seconds``; ``seed`` makes the draws repeatable (None: a fresh one);
    ``search_lag`` hides new resources from search for that many seconds.

    ``responses`` is the shape of what create, read, update and search answer
    (:mod:`etl.sandbox.shapes`): ``"fhir"`` (the default) as the official
    SDK's types describe, ``"simple"`` the create body echoed.
    """

    db_path: str | None = None
    # repr=False: a logged or printed config must not show the keys.
    api_keys: Mapping[str, str] = field(default_factory=_one_fresh_key, repr=False)
    rate_limit: int | None = None
    window: float = 3600.0
    fail_rate: float = 0.0
    drop_rate: float = 0.0
    slow_rate: float = 0.0
    slow_seconds: float = 35.0  # past the client's usual 30 s timeout
    seed: int | None = None
    search_lag: float = 0.0
    # Bulk imports allowed per key an hour: the documented 5; benchmarks and scale tests raise it.
    bulk_operations_per_hour: int = BULK_OPERATIONS_PER_HOUR
    # Bearer tokens of the Redox route (etl.sandbox.redox); default: one fresh token.
    redox_tokens: tuple[str, ...] = field(default_factory=lambda: (new_redox_token(),), repr=False)
    responses: Shape = "fhir"
    # Quotas and the documented rolling window (etl.sandbox.quota): the monthly quota (429 MONTHLY_QUOTA_EXCEEDED),
    # its period (None: the calendar month, UTC), the test-key allowance (429 SANDBOX_QUOTA_EXCEEDED), and
    # rate_limit counted for every key together over a rolling window.
    quota: int | None = None
    quota_window: float | None = None
    sandbox_quota: int | None = None
    rolling: bool = False

    def __post_init__(self) -> None:
        if self.responses not in SHAPES:
            raise UsageError(f"responses must be one of {', '.join(SHAPES)}, not {self.responses!r}")
        if not self.api_keys:
            raise UsageError("the sandbox needs at least one API key")
        for key, scope in self.api_keys.items():
            if not KEY_FORMAT.fullmatch(key):
                raise UsageError("sandbox API keys must look like clk_test_<token>")
            if scope not in KEY_SCOPES:
                raise UsageError(f"an API key's scope must be one of {sorted(KEY_SCOPES)}, not {scope!r}")
        if self.rate_limit is not None and self.rate_limit < 1:
            raise UsageError("rate_limit must be at least 1, or None for no limit")
        if not self.window > 0:
            raise UsageError("window must be a positive number of seconds")
        check_fault_settings(
            fail_rate=self.fail_rate,
            drop_rate=self.drop_rate,
            slow_rate=self.slow_rate,
            slow_seconds=self.slow_seconds,
            search_lag=self.search_lag,
        )
        # A frozen config should not change through the caller's dict.
        object.__setattr__(self, "api_keys", MappingProxyType(dict(self.api_keys)))
        object.__setattr__(self, "redox_tokens", tuple(self.redox_tokens))
        check_redox_tokens(self.redox_tokens)
        check_quota_settings(quota=self.quota, quota_window=self.quota_window, sandbox_quota=self.sandbox_quota)

    @property
    def api_key(self) -> str:
        """The first configured key: the one a caller usually wants."""
        return next(iter(self.api_keys))


@dataclass(frozen=True)
class ResourceKind:
    """One resource collection the sandbox serves."""

    schema: str
    route: str
    resource_type: str
    prefix: str


# The prefix of the ids the sandbox draws, by create schema (the resource types: schemas.limits), as the
# docs' examples show them (clinikapi/docs: "pt_abc123" in guides/immunizations.mdx and ~300 more,
# "prac_def456", "enc_xyz789", "imm_", "doc_", "task_"); the SDK's ApiResponse example too ("pt_abc123").
_PREFIXES: Final = {
    "PatientCreate": "pt_",
    "PractitionerCreate": "prac_",
    "EncounterCreate": "enc_",
    "ImmunizationCreate": "imm_",
    "DocumentCreate": "doc_",
    "TaskCreate": "task_",
}
KINDS: Final = tuple(
    ResourceKind(schema, route, RESOURCE_TYPES[schema],
                 _PREFIXES.get(schema, RESOURCE_TYPES[schema].lower() + "_"))
    for schema, route in ROUTES.items()
)
_BY_SCHEMA: Final = {kind.schema: kind for kind in KINDS}
# The kinds with ``active`` (sdk src/types/requests.ts: PatientSummary, PatientUpdateRequest,
# PractitionerUpdateRequest; src/types/resources.ts: Practitioner.active; OpenAPI: their search's ``active``).
_HAS_ACTIVE: Final = frozenset({"PatientCreate", "PractitionerCreate"})
_BY_TYPE: Final = {kind.resource_type: kind for kind in KINDS}

#: Reference fields checked on create and update: field -> the kind it names.
_REFERENCES: Final = {
    "patientId": _BY_SCHEMA["PatientCreate"],
    "practitionerId": _BY_SCHEMA["PractitionerCreate"],
    "encounterId": _BY_SCHEMA["EncounterCreate"],
}


# -- rate limits ---------------------------------------------------------------


@dataclass(frozen=True)
class Quota:
    """Where one key stands in its current window."""

    limit: int
    remaining: int
    reset: int  # whole seconds until the window resets, at least 1
    exceeded: bool

    def headers(self) -> dict[str, str]:
        """The ``X-RateLimit-*`` response headers."""
        return {
            "X-RateLimit-Limit": str(self.limit),
            "X-RateLimit-Remaining": str(self.remaining),
            "X-RateLimit-Reset": str(self.reset),
        }

    def meta(self) -> dict[str, int]:
        """The same numbers as the envelope's ``meta`` fields."""
        return {"rateLimitTotal": self.limit, "rateLimitRemaining": self.remaining, "rateLimitReset": self.reset}


@dataclass
class _Window:
    start: float
    used: int = 0


class FixedWindow:
    """A fixed-window counter per key: ``limit`` hits per ``window`` seconds,
    the window starting at a key's first hit after the previous one ended.
    ``limit=None`` never refuses and reports :data:`NOMINAL_LIMIT`."""

    def __init__(self, limit: int | None, window: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.limit = limit
        self.window = window
        self._clock = clock
        self._windows: dict[str, _Window] = {}
        self._lock = threading.Lock()

    def hit(self, key: str, cost: int = 1) -> Quota:
        """Count ``cost`` requests for ``key`` and say where it stands."""
        with self._lock:
            now = self._clock()
            win = self._windows.get(key)
            if win is None or now >= win.start + self.window:
                win = self._windows[key] = _Window(now)
            win.used += cost
            limit = NOMINAL_LIMIT if self.limit is None else self.limit
            return Quota(
                limit=limit,
                remaining=max(0, limit - win.used),
                reset=max(1, math.ceil(self.window - (now - win.start))),  # never more than the window
                exceeded=self.limit is not None and win.used > self.limit,
            )


# -- responses -----------------------------------------------------------------




def envelope(request: Request, data: Any, status: int = 200) -> JSONResponse:
    """A success answer: ``data`` plus ``meta`` with the rate-limit numbers."""
    meta: dict[str, Any] = {"requestId": request_id(request.scope), "timestamp": now_iso(), "status": status}
    quota = request.scope.get(_QUOTA)
    if isinstance(quota, Quota):
        meta.update(quota.meta())
    return JSONResponse({"data": data, "meta": meta}, status_code=status)


# -- the gate ------------------------------------------------------------------


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope["headers"]:
        if key == name:
            return bytes(value).decode("latin-1")
    return None


class ApiGate:
    """The one place every API request passes before and after its handler.

    Before: give it a request id, authenticate the key, count it against the
    key's window (every authenticated request counts, refused ones too), and
    refuse it past the limit or outside the key's scope. After: add the
    ``X-Request-Id`` and ``X-RateLimit-*`` headers, and turn an unexpected
    exception into a JSON 500. The key itself is never echoed or logged.
    """

    def __init__(self, app: ASGIApp, sandbox: Sandbox) -> None:
        self.app = app
        self.sandbox = sandbox

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = scope[REQUEST_ID] = "req_" + secrets.token_hex(8)
        started = False

        async def send_with_headers(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                headers = MutableHeaders(scope=message)
                headers["X-Request-Id"] = request_id
                # The SDK reads the processing time from X-Timestamp (sdk src/index.ts, extractMeta).
                headers["X-Timestamp"] = now_iso()
                quota = scope.get(_QUOTA)
                if isinstance(quota, Quota):
                    headers.update(quota.headers())
            await send(message)

        try:
            problem = None if scope["path"] in _PUBLIC_PATHS else self._admit(scope)
            if problem is not None:
                await problem.response(request_id)(scope, receive, send_with_headers)
                return
            await self.app(scope, receive, send_with_headers)
        except Exception:
            _log.exception("sandbox: unhandled error in %s %s (%s)", scope["method"], scope["path"], request_id)
            if started:
                raise
            internal = ApiProblemError(500, "INTERNAL_ERROR", "The sandbox failed to handle the request")
            await internal.response(request_id)(scope, receive, send_with_headers)

    def _admit(self, scope: Scope) -> ApiProblemError | None:
        key = _header(scope, b"x-api-key")
        if not key:
            return ApiProblemError(401, "UNAUTHORIZED", "Missing API key: send it in the x-api-key header")
        if not KEY_FORMAT.fullmatch(key):
            return ApiProblemError(
                401, "INVALID_KEY_FORMAT", "API key format is invalid: expected clk_live_... or clk_test_..."
            )
        key_scope = self.sandbox.config.api_keys.get(key)
        if key_scope is None:
            return ApiProblemError(401, "INVALID_KEY", "API key is not valid")
        quota = scope[_QUOTA] = self.sandbox.limiter.hit(key)
        scope[_API_KEY] = key
        override = next((name for name in _OVERRIDE_HEADERS if _header(scope, name) is not None), None)
        if override is not None:
            # docs errors.mdx, "Method Override Is Not Supported": 400 whatever the value.
            return ApiProblemError(
                400, "METHOD_OVERRIDE_REJECTED",
                f"The {override.decode()} header is not supported: send the HTTP method you mean",
            )
        if quota.exceeded:
            return ApiProblemError(
                429,
                "RATE_LIMITED",
                "Rate limit exceeded; retry after the window resets",
                headers={"Retry-After": str(quota.reset)},
            )
        reading = scope["method"] in _READ_METHODS
        if key_scope != "*" and (key_scope == "read") != reading:
            message = f"This API key's scope ({key_scope}) does not allow {scope['method']} requests"
            return ApiProblemError(403, "INSUFFICIENT_SCOPE", message)
        return None


# -- request bodies ------------------------------------------------------------


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, or 413 past ``limit`` bytes.

    An oversized body is still read to its end (and dropped) so the client
    gets the 413 rather than a connection reset halfway through its upload.
    """
    declared = request.headers.get("content-length", "")
    too_large = declared.isdigit() and int(declared) > limit
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        too_large = too_large or size > limit
        if not too_large:
            chunks.append(chunk)
    if too_large:
        raise ApiProblemError(413, "PAYLOAD_TOO_LARGE", f"Request body exceeds {limit} bytes")
    return b"".join(chunks)


def _refuse_constant(name: str) -> None:
    raise ValueError(name)


def parse_object(raw: bytes | str, what: str = "Request body") -> dict[str, Any]:
    """A JSON object: 400 ``INVALID_JSON`` if it is not JSON (docs errors.mdx: "Request body was not valid
    JSON"), 422 ``VALIDATION_ERROR`` if it is JSON but not an object (it fails the body's schema)."""
    try:
        # NaN and Infinity are not JSON; Python would accept them.
        value = json.loads(raw, parse_constant=_refuse_constant)
    except ValueError:
        raise ApiProblemError(400, "INVALID_JSON", f"{what} is not valid JSON") from None
    if not isinstance(value, dict):
        raise _invalid([issue(f"{what} must be a JSON object")])
    return value


def _invalid(issues: Sequence[Mapping[str, str]]) -> ApiProblemError:
    return ApiProblemError(422, "VALIDATION_ERROR", "Request body failed validation", issues)


def check_body(store: Store, kind: ResourceKind, body: Mapping[str, Any], raw: bytes | str | None = None) -> None:
    """Validate a create body (or a merged update) and the resources it names.

    Raises a 422 :class:`ApiProblemError` whose issues say which field is wrong.
    """
    try:
        model_for(kind.schema).model_validate_json(raw if raw is not None else json.dumps(body))
    except ValidationError as exc:
        raise _invalid(validation_issues(exc)) from None
    dangling = []
    for name, target in _REFERENCES.items():
        ref = body.get(name)
        if isinstance(ref, str) and not store.exists(target.route, ref):
            dangling.append(issue(f"{name}: {target.resource_type} {ref} not found"))
    practitioners = _BY_SCHEMA["PractitionerCreate"]
    for i, performer in enumerate(body.get("performer") or []):
        actor = performer.get("actorId") if isinstance(performer, dict) else None
        if isinstance(actor, str) and not store.exists(practitioners.route, actor):
            dangling.append(issue(f"performer.{i}.actorId: Practitioner {actor} not found"))
    if dangling:
        raise _invalid(dangling)


def stamp(kind: ResourceKind, body: Mapping[str, Any]) -> dict[str, Any]:
    """A new resource: the body as sent plus its id, type and version 1."""
    return {
        "resourceType": kind.resource_type,
        "id": kind.prefix + secrets.token_hex(8),
        **body,
        "meta": {"versionId": "1", "lastUpdated": now_iso()},
    }


# -- resource routes -----------------------------------------------------------

_DATE: Final = re.compile(r"\d{4}-\d{2}-\d{2}")
_CURSOR_PREFIX: Final = "seq:"


_OFFSET_PREFIX: Final = "off:"


def encode_cursor(after: int, *, sorted_: bool = False) -> str:
    """An opaque cursor for "the resources created after ``seq``" (or, for a
    sorted search, "after the first ``after`` matches")."""
    prefix = _OFFSET_PREFIX if sorted_ else _CURSOR_PREFIX
    return base64.urlsafe_b64encode(f"{prefix}{after}".encode()).decode().rstrip("=")


def decode_cursor(cursor: str | None, *, sorted_: bool = False) -> int:
    """The ``seq`` (or offset) a cursor continues after; 400 when it is not ours."""
    if cursor is None:
        return 0
    prefix = _OFFSET_PREFIX if sorted_ else _CURSOR_PREFIX
    try:
        text = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        if text.startswith(prefix):
            return int(text.removeprefix(prefix))
    except (binascii.Error, UnicodeDecodeError, ValueError):
        pass
    raise ApiProblemError(400, "BAD_REQUEST", "Invalid cursor: pass back the cursor of the previous page")


def _bad_query(name: str, message: str) -> ApiProblemError:
    # docs errors.mdx: 400 is "malformed JSON or invalid parameters"; of the documented codes,
    # VALIDATION_ERROR is the one for a request that fails validation. issues name the parameter.
    return ApiProblemError(400, "VALIDATION_ERROR", "Invalid query parameters", [issue(f"{name}: {message}")])


def search_params(route: str, query: Mapping[str, str]) -> dict[str, str]:
    """The filters (and ``sort``) of a search, checked; 400 ``VALIDATION_ERROR`` for anything else.

    Every parameter the OpenAPI file lists for the route is honoured (:data:`etl.sandbox.store.FILTERS`,
    ``sort`` where it lists ``QuerySort``); none is silently ignored: the docs say nowhere that unknown
    parameters are, and a typo'd filter that returned everything would look like a match.
    """
    known = FILTERS.get(route, {})
    params: dict[str, str] = {}
    for name, value in query.items():
        if name in PAGING:
            continue
        if name == "sort" and route in SORTABLE:
            if sort_column(route, value.removeprefix("-")) is None:
                raise _bad_query("sort", "not a field of this resource")
        elif name not in known:
            allowed = sorted({*known, *PAGING, *(("sort",) if route in SORTABLE else ())})
            raise _bad_query(name, f"unknown search parameter; this route takes {', '.join(allowed)}")
        elif name in ("dateFrom", "dateTo") and not _DATE.fullmatch(value):
            raise _bad_query(name, "must be a date as YYYY-MM-DD")
        elif name == "active":
            if value not in ("true", "false"):
                raise _bad_query(name, "must be true or false")
            value = "1" if value == "true" else "0"
        params[name] = value
    return params


def _page_size(raw: str | None) -> int:
    if raw is None:
        return 20
    try:
        count = int(raw)
    except ValueError:
        raise ApiProblemError(400, "BAD_REQUEST", "count must be an integer") from None
    return min(max(count, 1), PAGE_SIZE_MAX)


class ResourceApi:
    """Create, read, update, delete and search for one resource kind."""

    def __init__(self, sandbox: Sandbox, kind: ResourceKind) -> None:
        self.store = sandbox.store
        self.kind = kind
        self.shape = sandbox.config.responses

    def _answer(self, request: Request, resource: Mapping[str, Any], status: int = 200) -> JSONResponse:
        return envelope(request, render(resource, self.shape), status)

    def routes(self) -> list[Route]:
        """The five routes of this kind."""
        route = self.kind.route
        return [
            Route(route, self.create, methods=["POST"]),
            Route(route, self.search, methods=["GET"]),
            Route(route + "/{id}", self.read, methods=["GET"]),
            Route(route + "/{id}", self.update, methods=["PATCH"]),
            Route(route + "/{id}", self.delete, methods=["DELETE"]),
        ]

    def _not_found(self, rid: str) -> ApiProblemError:
        return ApiProblemError(404, "NOT_FOUND", f"{self.kind.resource_type} {rid} not found")

    async def create(self, request: Request) -> Response:
        """``POST``: validate, store and return the new resource (201)."""
        raw = await read_body(request, MAX_BODY_BYTES)
        body = parse_object(raw)
        check_body(self.store, self.kind, body, raw)
        resource = stamp(self.kind, body)
        self.store.insert(self.kind.route, resource)
        return self._answer(request, resource, 201)

    async def read(self, request: Request) -> Response:
        """``GET /{id}``. ``_revinclude`` / ``_include`` (OpenAPI readPatient; the SDK's ``read(id, {include})``)
        make the API answer a FHIR Bundle found by search: not imitated (501). Any other parameter: 400."""
        rid = request.path_params["id"]
        for name in request.query_params:
            if name in ("_revinclude", "_include"):
                raise ApiProblemError(501, "NOT_IMPLEMENTED", f"The sandbox does not imitate {name} on a read; "
                                      "read by id without it, or use a ClinikAPI test tenant")
            raise _bad_query(name, "a read by id takes no query parameters")
        resource = self.store.get(self.kind.route, rid)
        if resource is None:
            raise self._not_found(rid)
        return self._answer(request, resource)

    async def update(self, request: Request) -> Response:
        """``PATCH /{id}``: a shallow merge (a null removes the field, as in
        JSON Merge Patch); ``id``, ``resourceType`` and ``meta`` are kept.

        The OpenAPI file: ``application/json``, "Partial <resource> fields to
        update" (an object). The SDK sends the same object but labelled
        ``application/json-patch+json`` (sdk src/index.ts, ``request``): both
        are accepted. An RFC 6902 operation list belongs to ``/v1/fhir/*``
        (docs api-reference/fhir/patch.mdx) and is refused here with 422.
        ``active`` may be set on patients and practitioners (the SDK's
        PatientUpdateRequest and PractitionerUpdateRequest), not created.
        """
        rid = request.path_params["id"]
        patch = parse_object(await read_body(request, MAX_BODY_BYTES))
        stored = self.store.get(self.kind.route, rid)
        if stored is None:
            raise self._not_found(rid)
        fixed = ("id", "resourceType", "meta")
        fields = {k: v for k, v in stored.items() if k not in fixed}
        for name, value in patch.items():
            if name in fixed:
                continue
            if value is None:
                fields.pop(name, None)
            else:
                fields[name] = value
        active = fields.pop("active", None)
        if active is not None and (self.kind.schema not in _HAS_ACTIVE or not isinstance(active, bool)):
            has = self.kind.schema in _HAS_ACTIVE
            what = "Input should be a valid boolean" if has else "Extra inputs are not permitted"
            raise _invalid([issue(f"active: {what}")])
        check_body(self.store, self.kind, fields)
        if active is not None:
            fields["active"] = active
        version = int(stored.get("meta", {}).get("versionId", "1")) + 1
        resource = {
            "resourceType": stored["resourceType"],
            "id": stored["id"],
            **fields,
            "meta": {"versionId": str(version), "lastUpdated": now_iso()},
        }
        if not self.store.replace(self.kind.route, resource):
            raise self._not_found(rid)  # deleted meanwhile
        return self._answer(request, resource)

    async def delete(self, request: Request) -> Response:
        """``DELETE /{id}``: 204."""
        rid = request.path_params["id"]
        if not self.store.delete(self.kind.route, rid):
            raise self._not_found(rid)
        return Response(status_code=204)

    async def search(self, request: Request) -> Response:
        """``GET``: cursor-paginated search in creation order."""
        query = request.query_params
        count = _page_size(query.get("count"))
        filters = search_params(self.kind.route, query)
        sorted_ = "sort" in filters
        after = decode_cursor(query.get("cursor"), sorted_=sorted_)
        page = self.store.search(self.kind.route, filters, after=after, limit=count)
        cursor = None if page.next_after is None else encode_cursor(page.next_after, sorted_=sorted_)
        items = [render(item, self.shape) for item in page.items]
        return envelope(
            request, {"data": items, "total": page.total, "cursor": cursor, "hasMore": cursor is not None}
        )


# -- bulk import ---------------------------------------------------------------

_BULK_CHUNK: Final = 500
# ``data`` may be 100 MiB once decoded; JSON escaping makes the body larger.
_BULK_MAX_BODY: Final = 2 * BULK_MAX_DATA_BYTES


def _describe(problem: ApiProblemError) -> str:
    return "; ".join(i["diagnostics"] for i in problem.issues) or problem.message


class BulkJobs:
    """Bulk-import jobs, each processed in its own thread.

    A job's record (``GET /v1/bulk/jobs/{id}``) has the documented fields
    ``id``, ``type``, ``status``, ``totalRecords``, ``processedRecords`` and
    ``errors`` (``"line N: field: message"``) (OpenAPI ``getBulkJobStatus``;
    docs guides/bulk-operations.mdx). The store also keeps ``resourceType``
    and ``resourceIds`` (one entry per NDJSON line, the id the line's resource
    got or null when it was refused); only ``simple`` answers show them, as a
    sandbox extension (:func:`job_record`): the documented record names no
    ids, so a client settles each line by lookup.
    """

    def __init__(self, store: Store) -> None:
        self.store = store
        self._stopping = threading.Event()
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()

    def submit(self, kind: ResourceKind, lines: list[str]) -> str:
        """Record a pending job and start processing it."""
        job: dict[str, Any] = {
            "id": "job_" + secrets.token_hex(8),
            "type": "import",
            "status": "pending",
            "resourceType": kind.resource_type,
            "totalRecords": len(lines),
            "processedRecords": 0,
            "errors": [],
            "resourceIds": [None] * len(lines),
        }
        self.store.put_job(job)
        thread = threading.Thread(target=self._run, args=(job, kind, lines), name=f"bulk-{job['id']}", daemon=True)
        with self._lock:
            self._threads = [t for t in self._threads if t.is_alive()]
            self._threads.append(thread)
        thread.start()
        return str(job["id"])

    def close(self) -> None:
        """Stop unfinished jobs (they end as ``failed``) and wait for them."""
        self._stopping.set()
        with self._lock:
            threads, self._threads = self._threads, []
        for thread in threads:
            thread.join()

    def _run(self, job: dict[str, Any], kind: ResourceKind, lines: list[str]) -> None:
        job["status"] = "processing"
        self.store.put_job(job)
        try:
            for start in range(0, len(lines), _BULK_CHUNK):
                if self._stopping.is_set():
                    job["status"] = "failed"
                    job["errors"].append("the sandbox stopped before the job finished")
                    break
                self._process(job, kind, lines, start)
            else:
                job["status"] = "completed"
        except Exception:
            _log.exception("sandbox: bulk job %s failed", job["id"])
            job["status"] = "failed"
            job["errors"].append("internal error while processing the job")
        self.store.put_job(job)

    def _process(self, job: dict[str, Any], kind: ResourceKind, lines: list[str], start: int) -> None:
        created = []
        for index in range(start, min(start + _BULK_CHUNK, len(lines))):
            try:
                body = parse_object(lines[index], "record")
                check_body(self.store, kind, body, lines[index])
            except ApiProblemError as problem:
                job["errors"].append(f"line {index + 1}: {_describe(problem)}")
                continue
            resource = stamp(kind, body)
            created.append(resource)
            job["resourceIds"][index] = resource["id"]
        self.store.insert_many(kind.route, created)
        job["processedRecords"] = min(start + _BULK_CHUNK, len(lines))
        self.store.put_job(job)


def _ndjson_lines(data: str) -> list[str]:
    lines = [line.removesuffix("\r") for line in data.split("\n")]
    while lines and not lines[-1].strip():
        lines.pop()
    return lines


class BulkApi:
    """``POST /v1/bulk/import`` and ``GET /v1/bulk/jobs/{jobId}``."""

    def __init__(self, sandbox: Sandbox) -> None:
        self.sandbox = sandbox

    def routes(self) -> list[Route]:
        """The two bulk routes."""
        return [
            Route("/v1/bulk/import", self.start, methods=["POST"]),
            Route("/v1/bulk/jobs/{jobId}", self.status, methods=["GET"]),
        ]

    async def start(self, request: Request) -> Response:
        """Accept an NDJSON import (202); records count against the rate limit."""
        payload = parse_object(await read_body(request, _BULK_MAX_BODY))
        kind, lines = self._check(payload)
        key = request.scope[_API_KEY]
        allowance = self.sandbox.bulk_window.hit(key)
        if allowance.exceeded:
            raise ApiProblemError(
                429,
                "RATE_LIMITED",
                f"At most {self.sandbox.config.bulk_operations_per_hour} bulk operations an hour",
                headers={"Retry-After": str(allowance.reset)},
            )
        # The docs: each record still counts as one request against the plan.
        request.scope[_QUOTA] = self.sandbox.limiter.hit(key, cost=len(lines))
        job_id = self.sandbox.jobs.submit(kind, lines)
        return envelope(request, {"jobId": job_id, "status": "pending"}, 202)

    @staticmethod
    def _check(payload: Mapping[str, Any]) -> tuple[ResourceKind, list[str]]:
        problems = []
        rtype, data = payload.get("resourceType"), payload.get("data")
        kind = _BY_TYPE.get(rtype) if isinstance(rtype, str) else None
        if kind is None:
            problems.append(issue(f"resourceType: must be one of {', '.join(_BY_TYPE)}"))
        lines: list[str] = []
        if not isinstance(data, str):
            problems.append(issue("data: Required" if data is None else "data: Input should be a valid string"))
        elif len(data) > BULK_MAX_DATA_BYTES:
            problems.append(issue(f"data: at most {BULK_MAX_DATA_BYTES} characters"))
        else:
            lines = _ndjson_lines(data)
            if len(lines) > BULK_MAX_RECORDS:
                problems.append(issue(f"data: at most {BULK_MAX_RECORDS} records a batch, got {len(lines)}"))
        if problems or kind is None:
            raise _invalid(problems)
        return kind, lines

    async def status(self, request: Request) -> Response:
        """A job's progress and errors (and, in ``simple``, resource ids)."""
        job_id = request.path_params["jobId"]
        job = self.sandbox.store.get_job(job_id)
        if job is None:
            raise ApiProblemError(404, "NOT_FOUND", f"Bulk job {job_id} not found")
        return envelope(request, job_record(job, self.sandbox.config.responses))


#: The fields of a bulk job's record the OpenAPI file documents (``getBulkJobStatus``; ``downloadUrl`` is
#: for exports only, which the sandbox does not run).
JOB_FIELDS: Final = ("id", "type", "status", "totalRecords", "processedRecords", "errors")


def job_record(job: Mapping[str, Any], shape: Shape) -> dict[str, Any]:
    """A stored job as ``GET /v1/bulk/jobs/{id}`` answers it: the documented fields only (``fhir``), or
    with the sandbox's ``resourceType`` and ``resourceIds`` too (``simple``)."""
    if shape == "simple":
        return dict(job)
    return {name: job[name] for name in JOB_FIELDS if name in job}


#: Routes of the API the sandbox does not imitate: answered 501 with an error body rather than a bare 404,
#: so a client can tell "not imitated" from "no such resource" (docs api-reference/fhir/overview.mdx for
#: the passthrough; OpenAPI ``bulkExport``).
NOT_IMITATED: Final = (
    ("/v1/fhir", "the raw FHIR passthrough (/v1/fhir/*)"),
    ("/v1/fhir/{path:path}", "the raw FHIR passthrough (/v1/fhir/*)"),
    ("/v1/bulk/export", "bulk export"),
)


def _not_imitated(what: str) -> Callable[[Request], Any]:
    async def handler(request: Request) -> Response:
        raise ApiProblemError(501, "NOT_IMPLEMENTED", f"The sandbox does not imitate {what}; "
                              "use a ClinikAPI test tenant for it")
    return handler


# -- system routes -------------------------------------------------------------


async def health(request: Request) -> Response:
    """``GET /health`` (no key)."""
    return JSONResponse({"status": "ok", "timestamp": now_iso()})


async def metadata(request: Request) -> Response:
    """``GET /v1/metadata`` (no key): a FHIR R4 CapabilityStatement."""
    interactions = [{"code": c} for c in ("read", "update", "delete", "create", "search-type")]
    statement = {
        "resourceType": "CapabilityStatement",
        "status": "active",
        "date": now_iso(),
        "kind": "instance",
        "software": {"name": "clinik-etl sandbox"},
        "fhirVersion": "4.0.1",
        "format": ["json"],
        "rest": [
            {
                "mode": "server",
                "security": {"description": "API key in the x-api-key header"},
                "resource": [{"type": kind.resource_type, "interaction": interactions} for kind in KINDS],
            }
        ],
    }
    return JSONResponse(statement, media_type="application/fhir+json")


# -- assembly ------------------------------------------------------------------


class Sandbox:
    """One sandbox's state: settings, store, rate windows and bulk jobs."""

    def __init__(self, config: SandboxConfig) -> None:
        self.config = config
        self.store = LaggingStore(config.db_path, config.search_lag) if config.search_lag else Store(config.db_path)
        self.faults = FaultPlan.from_config(config)
        self.limiter: FixedWindow | RollingWindow[Quota] = (
            RollingWindow(config.rate_limit, config.window, Quota)
            if config.rolling and config.rate_limit is not None
            else FixedWindow(config.rate_limit, config.window)
        )
        self.quotas = Quotas.from_config(config)
        self.bulk_window = FixedWindow(config.bulk_operations_per_hour, _BULK_WINDOW)
        self.jobs = BulkJobs(self.store)

    def close(self) -> None:
        """Stop bulk jobs and close the store (idempotent)."""
        self.jobs.close()
        self.store.close()


async def _on_problem(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ApiProblemError)
    return exc.response(request_id(request.scope))


_HTTP_CODES: Final = {404: "NOT_FOUND", 405: "METHOD_NOT_ALLOWED"}


async def _on_http_error(request: Request, exc: Exception) -> Response:
    # Starlette's router raises these for unknown paths and methods.
    assert isinstance(exc, HTTPException)
    code = _HTTP_CODES.get(exc.status_code, "BAD_REQUEST" if exc.status_code < 500 else "INTERNAL_ERROR")
    message = f"No route for {request.method} {request.url.path}" if exc.status_code in _HTTP_CODES else exc.detail
    problem = ApiProblemError(exc.status_code, code, message, headers=exc.headers)
    return problem.response(request_id(request.scope))


def build_app(sandbox: Sandbox, lifespan: Lifespan[Starlette] | None = None) -> Starlette:
    """The app over an existing :class:`Sandbox`; the caller closes it."""
    routes: list[Route] = [
        Route("/health", health, methods=["GET"]),
        Route("/v1/metadata", metadata, methods=["GET"]),
        *(r for kind in KINDS for r in ResourceApi(sandbox, kind).routes()),
        *BulkApi(sandbox).routes(),
        *(Route(path, _not_imitated(what), methods=["GET", "POST", "PUT", "PATCH", "DELETE"])
          for path, what in NOT_IMITATED),
    ]
    app = Starlette(
        routes=routes,
        # RedoxGate first: its FHIR paths authenticate with a bearer token, not an x-api-key.
        middleware=[
            Middleware(RedoxGate, sandbox=sandbox),
            Middleware(ApiGate, sandbox=sandbox),
            Middleware(QuotaGate, quotas=sandbox.quotas),
            Middleware(FaultGate, plan=sandbox.faults),
        ],
        exception_handlers={ApiProblemError: _on_problem, HTTPException: _on_http_error},
        lifespan=lifespan,
    )
    app.state.sandbox = sandbox
    return app


def create_app(config: SandboxConfig | None = None) -> Starlette:
    """The sandbox as an ASGI app.

    The store is closed by the app's lifespan shutdown; under a server run
    with ``lifespan="off"``, call ``app.state.sandbox.close()`` instead.
    """
    sandbox = Sandbox(config or SandboxConfig())

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        try:
            yield
        finally:
            sandbox.close()

    return build_app(sandbox, lifespan)
