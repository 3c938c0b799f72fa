"""The Redox client: FHIR ``Immunization/$write`` over httpx, in the loader's terms.

It answers ``create(route, body)`` with the same four outcomes as
:class:`etl.load.client.ApiClient` and decides what is safe to retry by the
same rules: a connection never opened or a 429 is retried; a timeout, a 5xx
or a connection lost after sending is :class:`Unknown`. Redox has no search,
so :meth:`RedoxClient.search` raises ``LookupFailed``: an unknown outcome
stays unknown rather than being guessed absent and sent twice.

The bearer token travels in the ``Authorization`` header and nowhere else;
refusals are read from the ``OperationOutcome`` Redox answers with, and
masked like ClinikAPI's diagnostics.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from typing import Any

import httpx

from etl.errors import LookupFailed
from etl.load.client import (
    UNTRUSTED,
    Created,
    Outcome,
    Refused,
    RetryLater,
    Unknown,
    exchange,
    mask,
    retry_after,
)

__all__ = ["FHIR_JSON", "RedoxClient"]

FHIR_JSON = "application/fhir+json"


class RedoxClient:
    """Redox's FHIR API over a caller-provided ``httpx.AsyncClient``."""

    def __init__(
        self,
        http: httpx.AsyncClient,
        token: str,
        *,
        on_response: Callable[[Mapping[str, str]], None] | None = None,
    ) -> None:
        self._http = http
        self._headers = {"authorization": f"Bearer {token}", "content-type": FHIR_JSON, "accept": FHIR_JSON}
        self._on_response = on_response  # called with each response's headers (the throttle)
        self.requests = 0  # requests sent, answered or not
        self.silent = 0  # requests in a row that got no answer at all (timeouts, connections lost or refused)

    async def create(self, route: str, body: bytes) -> Outcome:
        """POST one message bundle; its acknowledgement's id (else the bundle's) on success."""
        response = await exchange(self._http.post(route, content=body, headers=self._headers))
        if not isinstance(response, httpx.Response):
            if isinstance(response, Unknown):
                self.requests += 1  # it left, and no answer came
            if response.reason != UNTRUSTED:
                self.silent += 1
            return response
        self.requests += 1
        self.silent = 0
        if self._on_response is not None:
            self._on_response(response.headers)
        status = response.status_code
        if 200 <= status < 300:
            return Created(_ack_id(response) or _bundle_id(body), status)
        if status == 429:
            return RetryLater(retry_after(response.headers), "RATE_LIMITED", 429)
        if status >= 500:
            return Unknown(f"server error {status}", status)
        return _refusal(response)

    async def search(self, route: str, params: Mapping[str, str | int]) -> list[dict[str, Any]]:
        """Redox offers no search to find what an unanswered ``$write`` did."""
        raise LookupFailed("Redox has no search: the outcome stays unknown (check with the destination)")


def _ack_id(response: httpx.Response) -> str | None:
    try:
        ack = response.json()
    except ValueError:
        return None
    ack_id = ack.get("id") if isinstance(ack, dict) else None
    return ack_id if isinstance(ack_id, str) and ack_id else None


def _bundle_id(body: bytes) -> str:
    # Only when the acknowledgement names nothing: the bundle's own id is deterministic.
    return str(json.loads(body).get("id", ""))


def _refusal(response: httpx.Response) -> Refused:
    """A 4xx answer, read from its ``OperationOutcome`` (code, FHIRPath, diagnostics)."""
    status = response.status_code
    try:
        body = response.json()
    except ValueError:
        return Refused(status, f"HTTP_{status}", mask(response.text[:200]))
    issues = body.get("issue") if isinstance(body, dict) else None
    issues = [i for i in issues or [] if isinstance(i, dict)]
    if not issues:
        return Refused(status, f"HTTP_{status}", mask(json.dumps(body)[:200]))
    first = issues[0]
    expression = first.get("expression")
    field = str(expression[0]) if isinstance(expression, list) and expression else None
    message = "; ".join(str(i.get("diagnostics") or i.get("code") or "") for i in issues)
    return Refused(status, str(first.get("code") or f"HTTP_{status}"), mask(message), field)
