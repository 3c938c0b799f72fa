"""Redox's FHIR ``Immunization/$write`` in the sandbox: a second destination on loopback.

``POST /fhir/R4/{destinationSlug}/{environmentFlag}/Immunization/$write`` takes
a FHIR R4 message bundle, the way Redox does, with its own authentication
(``Authorization: Bearer <token>``, checked against
``SandboxConfig.redox_tokens``) and its own error shape (an
``OperationOutcome``). The request path, outside in::

    RedoxGate   FHIR paths only: request id, bearer token, rate limit
                (the sandbox's window, per token), response headers,
                and a FHIR 500 for anything unexpected
    FaultGate   the sandbox's injected faults, as for ClinikAPI writes
    RedoxWrite  route, media type, size, bundle structure; store; acknowledge

``build_app`` puts :class:`RedoxGate` in front of ClinikAPI's gate, which
would refuse a request without an ``x-api-key``; every other path passes
through untouched.

The structure check (:func:`bundle_problems`) is what a generator most often
gets wrong: the ``MessageHeader`` first with its event and source endpoint,
an ``Immunization`` and its ``Patient`` present, and every ``reference``
inside the bundle resolving to an entry. Accepted bundles are kept in the
sandbox store under :data:`RECEIPTS` (one receipt per accepted request, so a
bundle sent twice is counted twice).
"""

from __future__ import annotations

import json
import logging
import re
import secrets
from collections.abc import Iterator, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any, Final, NamedTuple, Protocol

from starlette.datastructures import MutableHeaders
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from etl.errors import UsageError
from etl.sandbox.faults import FaultGate, FaultPlan
from etl.sandbox.store import Store
from schemas.limits import MAX_BODY_BYTES

__all__ = [
    "EVENT_CODE",
    "EVENT_SYSTEM",
    "FHIR_PREFIX",
    "RECEIPTS",
    "Problem",
    "RedoxGate",
    "RedoxHost",
    "bundle_problems",
    "check_redox_tokens",
    "new_redox_token",
    "outcome",
    "receipts",
]


class _Quota(Protocol):
    @property
    def exceeded(self) -> bool: ...
    @property
    def reset(self) -> int: ...
    def headers(self) -> dict[str, str]: ...


class _Limiter(Protocol):
    def hit(self, key: str, cost: int = 1) -> _Quota: ...


class _Config(Protocol):
    @property
    def redox_tokens(self) -> tuple[str, ...]: ...


class RedoxHost(Protocol):
    """What the Redox route uses of the sandbox it is part of (``etl.sandbox.app.Sandbox``)."""

    @property
    def config(self) -> _Config: ...
    @property
    def store(self) -> Store: ...
    @property
    def faults(self) -> FaultPlan: ...
    @property
    def limiter(self) -> _Limiter: ...

_log = logging.getLogger(__name__)

FHIR_PREFIX: Final = "/fhir/R4/"
EVENT_SYSTEM: Final = "urn:redox:event-type"
EVENT_CODE: Final = "Immunization-New"
#: The store "route" receipts live under; no ClinikAPI route looks like it.
RECEIPTS: Final = "redox:Immunization/$write"

_WRITE: Final = re.compile(r"/fhir/R4/(?P<slug>[^/]+)/(?P<env>[^/]+)/Immunization/\$write")
_TOKEN: Final = re.compile(r"[A-Za-z0-9._~+/=-]+")  # RFC 6750's b64token
_MEDIA: Final = frozenset({"application/fhir+json", "application/json"})
_RELATIVE: Final = re.compile(r"(?P<type>[A-Z][A-Za-z]+)/(?P<id>[A-Za-z0-9\-.]{1,64})")
_FHIR_JSON: Final = "application/fhir+json"


def new_redox_token() -> str:
    """A fresh sandbox bearer token."""
    return "rdx_test_" + secrets.token_hex(16)


def check_redox_tokens(tokens: Sequence[str]) -> None:
    """Raise :class:`UsageError` unless there is a token and each can travel in a bearer header."""
    if not tokens:
        raise UsageError("the sandbox needs at least one Redox token")
    for token in tokens:
        if not isinstance(token, str) or not _TOKEN.fullmatch(token):
            raise UsageError("Redox tokens must be letters, digits and ._~+/=- only")


# -- the structure check ----------------------------------------------------------


class Problem(NamedTuple):
    """One thing wrong with a bundle: where (a path such as
    ``entry[1].resource.patient.reference``), a FHIR issue type, and what."""

    path: str
    code: str
    message: str

    def __str__(self) -> str:
        return f"{self.path}: {self.message}"


def _references(node: Any, path: str) -> Iterator[tuple[str, str]]:
    """(path, reference) of every ``reference`` string under ``node``."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "reference" and isinstance(value, str):
                yield f"{path}.reference", value
            else:
                yield from _references(value, f"{path}.{key}")
    elif isinstance(node, list):
        for i, item in enumerate(node):
            yield from _references(item, f"{path}[{i}]")


def bundle_problems(bundle: Mapping[str, Any]) -> list[Problem]:
    """What keeps ``bundle`` from being a Redox ``Immunization-New`` message; empty when nothing."""
    problems: list[Problem] = []
    if bundle.get("resourceType") != "Bundle":
        problems.append(Problem("resourceType", "value", f"must be Bundle, not {bundle.get('resourceType')!r}"))
    if bundle.get("type") != "message":
        problems.append(Problem("type", "value", f"must be message, not {bundle.get('type')!r}"))
    entries = bundle.get("entry")
    if not isinstance(entries, list) or not entries:
        problems.append(Problem("entry", "required", "a message bundle needs its entries"))
        return problems

    resources: list[dict[str, Any] | None] = []
    for i, entry in enumerate(entries):
        resource = entry.get("resource") if isinstance(entry, dict) else None
        if isinstance(resource, dict) and isinstance(resource.get("resourceType"), str):
            resources.append(resource)
        else:
            resources.append(None)
            problems.append(Problem(f"entry[{i}].resource", "required", "every entry needs a resource"))

    problems += _header_problems(resources[0])
    immunizations = [i for i, r in enumerate(resources) if r is not None and r["resourceType"] == "Immunization"]
    if not immunizations:
        problems.append(Problem("entry", "required", "no Immunization entry"))
    for i in immunizations:
        resource = resources[i]
        assert resource is not None
        patient = resource.get("patient")
        if not (isinstance(patient, dict) and isinstance(patient.get("reference"), str)):
            problems.append(Problem(f"entry[{i}].resource.patient.reference", "required", "the Immunization's Patient"))
        elif not patient["reference"].startswith("Patient/"):
            problems.append(
                Problem(f"entry[{i}].resource.patient.reference", "value", f"{patient['reference']} is not a Patient")
            )

    # References resolve by fullUrl, or as Type/id against the entries
    # (Redox's examples carry no fullUrl), or as #id against `contained`.
    targets = {(r["resourceType"], r.get("id")) for r in resources if r is not None}
    full_urls = {e.get("fullUrl") for e in entries if isinstance(e, dict)} - {None}
    for i, resource in enumerate(resources):
        if resource is None:
            continue
        contained = {c.get("id") for c in resource.get("contained") or [] if isinstance(c, dict)}
        for path, ref in _references(resource, f"entry[{i}].resource"):
            match = _RELATIVE.fullmatch(ref)
            if ref in full_urls or (ref.startswith("#") and ref[1:] in contained):
                continue
            if match is None or (match["type"], match["id"]) not in targets:
                problems.append(Problem(path, "not-found", f"{ref} does not resolve inside the bundle"))
    return problems


def _header_problems(header: dict[str, Any] | None) -> list[Problem]:
    if header is None:
        return []
    if header["resourceType"] != "MessageHeader":
        return [Problem("entry[0].resource.resourceType", "value", "the first entry must be the MessageHeader")]
    problems = []
    at = "entry[0].resource"
    event = header.get("eventCoding")
    event = event if isinstance(event, dict) else {}
    if event.get("system") != EVENT_SYSTEM:
        problems.append(Problem(f"{at}.eventCoding.system", "value", f"must be {EVENT_SYSTEM}"))
    if event.get("code") != EVENT_CODE:
        problems.append(Problem(f"{at}.eventCoding.code", "value", f"must be {EVENT_CODE}"))
    source = header.get("source")
    endpoint = source.get("endpoint") if isinstance(source, dict) else None
    if not (isinstance(endpoint, str) and endpoint.strip()):
        problems.append(Problem(f"{at}.source.endpoint", "required", "where acknowledgements go"))
    return problems


# -- answers -------------------------------------------------------------------------


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def outcome(
    status: int,
    problems: Sequence[Problem],
    *,
    severity: str = "error",
    headers: Mapping[str, str] | None = None,
    outcome_id: str | None = None,
) -> JSONResponse:
    """An ``OperationOutcome`` answer with one issue per problem."""
    issues = [
        {
            "severity": severity,
            "code": p.code,
            "diagnostics": str(p) if p.path else p.message,
            **({"expression": [p.path]} if p.path else {}),
        }
        for p in problems
    ]
    body = {"resourceType": "OperationOutcome", "id": outcome_id or "oo-" + secrets.token_hex(8), "issue": issues}
    return JSONResponse(body, status_code=status, headers=dict(headers or {}), media_type=_FHIR_JSON)


def _refusal(status: int, code: str, message: str, headers: Mapping[str, str] | None = None) -> JSONResponse:
    return outcome(status, [Problem("", code, message)], headers=headers)


def receipts(store: Store) -> int:
    """How many bundles the sandbox has accepted (a bundle sent twice counts twice; with a
    search lag, those of the last ``search_lag`` seconds are not counted yet)."""
    return store.search(RECEIPTS, {}, limit=1).total


# -- the write -------------------------------------------------------------------------


class RedoxWrite:
    """The ``$write`` handler, as a bare ASGI app (the gate has admitted the request)."""

    def __init__(self, sandbox: RedoxHost) -> None:
        self.store = sandbox.store

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        request = Request(scope, receive)
        response = await self._answer(request)
        await response(scope, receive, send)

    async def _answer(self, request: Request) -> JSONResponse:
        route = _WRITE.fullmatch(request.url.path)
        if route is None:
            return _refusal(404, "not-found", f"No Redox route {request.url.path}: try .../Immunization/$write")
        if request.method != "POST":
            return _refusal(405, "not-supported", "Immunization/$write takes POST only")
        media = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if media not in _MEDIA:
            return _refusal(415, "not-supported", "send the bundle as application/fhir+json")
        chunks: list[bytes] = []
        size = 0
        # An oversized body is still read to its end, so the client gets the
        # 413 rather than a connection reset halfway through its upload.
        async for chunk in request.stream():
            size += len(chunk)
            if size <= MAX_BODY_BYTES:
                chunks.append(chunk)
        if size > MAX_BODY_BYTES:
            return _refusal(413, "too-costly", f"the bundle exceeds {MAX_BODY_BYTES} bytes")
        try:
            bundle = json.loads(b"".join(chunks), parse_constant=_refuse_constant)
        except ValueError:
            return _refusal(400, "structure", "the body is not JSON")
        if not isinstance(bundle, dict):
            return _refusal(400, "structure", "the body must be a JSON object (a Bundle)")
        problems = bundle_problems(bundle)
        if problems:
            return outcome(422, problems)
        ack = "ack-" + secrets.token_hex(8)
        receipt = {
            "id": ack,
            "destination": route["slug"],
            "environment": route["env"],
            "receivedAt": _now(),
            "bundle": bundle,
        }
        self.store.insert(RECEIPTS, receipt)
        accepted = Problem("", "informational", f"Bundle {bundle.get('id')} accepted for {route['slug']}")
        # The acknowledgement's id names the receipt; the loader records it.
        return outcome(200, [accepted], severity="information", outcome_id=ack)


class RedoxGate:
    """ASGI middleware: FHIR paths get Redox's gate, everything else passes through.

    Before: a request id, the bearer token (never echoed or logged), the
    token's rate-limit window. After: ``X-Request-Id`` and ``X-RateLimit-*``
    headers, and a FHIR 500 for anything the handler did not expect.
    """

    def __init__(self, app: ASGIApp, sandbox: RedoxHost) -> None:
        self.app = app
        self.sandbox = sandbox
        self.write = FaultGate(RedoxWrite(sandbox), plan=sandbox.faults)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not scope["path"].startswith(FHIR_PREFIX):
            await self.app(scope, receive, send)
            return
        request_id = "req_" + secrets.token_hex(8)
        quota_headers: dict[str, str] = {}
        started = False

        async def send_with_headers(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                headers = MutableHeaders(scope=message)
                headers["X-Request-Id"] = request_id
                headers.update(quota_headers)
            await send(message)

        try:
            token = _bearer(scope)
            if token is None:
                refusal = _refusal(
                    401, "login", "send Authorization: Bearer <token>", headers={"WWW-Authenticate": "Bearer"}
                )
            elif token not in self.sandbox.config.redox_tokens:
                refusal = _refusal(401, "security", "the bearer token is not valid", {"WWW-Authenticate": "Bearer"})
            else:
                quota = self.sandbox.limiter.hit("redox " + token)
                quota_headers.update(quota.headers())
                if not quota.exceeded:
                    await self.write(scope, receive, send_with_headers)
                    return
                retry = {"Retry-After": str(quota.reset)}
                refusal = _refusal(429, "throttled", "rate limit exceeded; retry after the window resets", retry)
            await refusal(scope, receive, send_with_headers)
        except Exception:
            _log.exception("sandbox: unhandled error in %s %s (%s)", scope["method"], scope["path"], request_id)
            if started:
                raise
            await _refusal(500, "exception", "the sandbox failed to handle the request")(
                scope, receive, send_with_headers
            )


def _refuse_constant(name: str) -> None:
    # NaN and Infinity are not JSON, though Python's parser takes them.
    raise ValueError(name)


def _bearer(scope: Scope) -> str | None:
    for key, value in scope["headers"]:
        if key == b"authorization":
            scheme, _, token = bytes(value).decode("latin-1").partition(" ")
            if scheme.lower() == "bearer" and token.strip():
                return token.strip()
    return None
