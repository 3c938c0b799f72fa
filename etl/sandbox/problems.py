"""The sandbox's error answers and the request id they carry, shared by the app and its fault injection.

An error answer has the API's documented error body (``error``, ``message``, ``code``,
``requestId``, ``issues``): see ``../shared/reference/CLINIKAPI.md`` ("Errors").
"""

from __future__ import annotations

import secrets
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Final

from starlette.responses import JSONResponse
from starlette.types import Scope

__all__ = ["REQUEST_ID", "TITLES", "ApiProblemError", "issue", "now_iso", "request_id"]

#: Where the gate leaves each request's id in the ASGI scope.
REQUEST_ID: Final = "clinik.request_id"

#: The ``error`` title of each status the sandbox answers with.
TITLES: Final = {
    400: "Bad Request",
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not Found",
    405: "Method Not Allowed",
    413: "Payload Too Large",
    422: "Validation Error",
    429: "Too Many Requests",
    500: "Internal Server Error",
    501: "Not Implemented",
}


def now_iso() -> str:
    """The current UTC time as ISO 8601 with milliseconds and ``Z``."""
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def issue(diagnostics: str) -> dict[str, str]:
    """One entry of an error's ``issues``."""
    return {"severity": "error", "code": "invalid", "diagnostics": diagnostics}


class ApiProblemError(Exception):
    """An error answer: raised by handlers, rendered as the API's error body."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        issues: Sequence[Mapping[str, str]] = (),
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.issues = list(issues)
        self.headers = dict(headers or {})

    def response(self, request_id: str) -> JSONResponse:
        """The error body and headers."""
        body = {
            "error": TITLES.get(self.status, "Error"),
            "message": self.message,
            "code": self.code,
            "requestId": request_id,
            "issues": self.issues,
            # The SDK reads FHIR OperationOutcome's ``issue`` (sdk src/errors.ts, parseErrorResponse) where
            # the docs show ``issues`` (errors.mdx): the sources disagree, so both carry the same list.
            "issue": self.issues,
        }
        return JSONResponse(body, status_code=self.status, headers=self.headers)


def request_id(scope: Scope) -> str:
    """The id the gate gave this request (a fresh one if it gave none)."""
    rid = scope.get(REQUEST_ID)
    return rid if isinstance(rid, str) else "req_" + secrets.token_hex(8)
