"""Exceptions that end a run, and the exit codes the CLI maps them to.

Bad data is never an exception: a rejected row is an entry in the report.
Exceptions are for what stops a run altogether::

    EtlError                     (exit 2 unless a subclass says otherwise)
    ├── UsageError               bad options or settings
    ├── InputError               a file that cannot be read as a table
    │                            (file, row and column when known)
    ├── ProfileError             a mapping profile that cannot be used
    ├── StateError               a state store that cannot be used (locked,
    │                            another target's, corrupt, another version's)
    ├── UnsafeFileError          a file for PHI that is not safely this user's
    │                            (a symlink, not a regular file, another owner's)
    ├── NoAnswerError            the target answered nothing before anything
    │                            was sent (timeouts, connections lost or refused)
    ├── OutputError              a report folder or file that cannot be written
    │                            (a symbolic link, a read-only folder, a full disk)
    ├── ApiError                 the API refused the whole run (exit 4)
    │   ├── AuthError            401/403: a bad key or scope
    │   └── QuotaExceededError        429 MONTHLY_QUOTA_EXCEEDED or
    │                            SANDBOX_QUOTA_EXCEEDED: a month's allowance
    │                            is used up (exit 5)
    └── LoadSignal               an answer the loader settles row by row; it
        │                        never ends a run by itself
        ├── LookupFailed         a read or search could not be completed: the
        │                        row stays unknown (transient)
        └── BulkRefused          the API refused a bulk import: its rows fail
                                 with its status and code

Each carries a ``retryable`` flag: True when the failure is transient (the
same command, unchanged, may succeed later: a target that did not answer, a
429, a 5xx), False when it is terminal (something must change first: an
option, a file, a key). The CLI says so on the error's line. httpx's own
exceptions are translated in ``etl.load.client`` only, and never leave it.
"""

from __future__ import annotations

from dataclasses import dataclass


class ExitCode:
    """The CLI's documented exit codes."""

    OK = 0  # every row created, skipped or planned
    REJECTED = 1  # some rows were rejected by validation (the rest went through)
    USAGE = 2  # bad options, unreadable input, unusable profile or state
    FAILED = 3  # some rows failed at the API or have an unknown outcome
    API = 4  # the API refused the run (bad key, scope): nothing more was sent
    QUOTA = 5  # a quota is used up (monthly, or the sandbox allowance): the run stopped, the rest was not sent
    INTERRUPTED = 130  # stopped by SIGINT/SIGTERM; state and report were written


class EtlError(Exception):
    """Base of every exception the toolkit raises on purpose."""

    exit_code: int = ExitCode.USAGE
    #: Transient (True) or terminal (False): see the module's docstring.
    retryable: bool = False


class UsageError(EtlError):
    """Options or settings that cannot work together."""


@dataclass
class InputError(EtlError):
    """A file that cannot be read as a table, with where the problem is."""

    path: str
    message: str
    row: int | None = None
    column: str | None = None

    def __str__(self) -> str:
        where = self.path
        if self.row is not None:
            where += f", row {self.row}"
        if self.column is not None:
            where += f", column {self.column!r}"
        return f"{where}: {self.message}"


class ProfileError(EtlError):
    """A mapping profile that cannot be used."""


class StateError(EtlError):
    """A state store that cannot be used for this run."""


class UnsafeFileError(EtlError):
    """A file that holds PHI (a state store, its lock, a sandbox database) and is not safely this user's:
    a symbolic link, not a regular file, or another user's. Refused, never adopted."""


class NoAnswerError(EtlError):
    """The target answered nothing (timeouts, connections lost or refused) before the run sent anything.

    Retryable: the same run may succeed once the target answers. A target that falls silent during a
    load does not raise this: the load stops and reports (``unresponsive`` in the summary).
    """

    retryable = True


@dataclass
class OutputError(EtlError):
    """A folder or file the run would write that cannot be written safely, and why."""

    path: str
    message: str

    def __str__(self) -> str:
        return f"{self.path}: {self.message}"


@dataclass
class ApiError(EtlError):
    """The API refused the run as a whole; diagnostics already masked."""

    status: int
    code: str
    message: str

    exit_code = ExitCode.API

    def __str__(self) -> str:
        return f"HTTP {self.status} {self.code}: {self.message}"


class AuthError(ApiError):
    """401 or 403: the key is missing, malformed, revoked or lacks the scope."""


class QuotaExceededError(ApiError):
    """429 with a quota code (``MONTHLY_QUOTA_EXCEEDED``, ``SANDBOX_QUOTA_EXCEEDED``): the plan's allowance for
    the period is used up. Waiting seconds cannot help, so a load stops at once: the rows not yet sent are
    ``not-sent``, and the same command finishes them once the quota resets (``resets``: when, if the API said).
    The message names the quota and when it resets; it never holds a key."""

    exit_code = ExitCode.QUOTA
    retryable = True

    def __init__(self, status: int, code: str, message: str, resets: str | None = None) -> None:
        super().__init__(status, code, message)
        self.resets = resets


class LoadSignal(EtlError):  # noqa: N818 - a signal the loader settles, not an error that ends a run
    """An answer from the load's HTTP layer that the loader settles row by row (never a run's end)."""


class LookupFailed(LoadSignal):
    """A read or search could not be completed; the caller keeps the row unknown."""

    retryable = True


class BulkRefused(LoadSignal):
    """The API refused an import: ``status`` 0 when it was never sent; ``retry_after`` is set for a 429."""

    def __init__(self, status: int, code: str, message: str, retry_after: float | None = None) -> None:
        super().__init__(f"HTTP {status} {code}: {message}")
        self.status, self.code, self.message, self.retry_after = status, code, message, retry_after

    @property
    def retryable(self) -> bool:  # type: ignore[override]
        """Never sent, rate-limited or a server failure: the same import may go through later."""
        return self.status == 0 or self.status == 429 or self.status >= 500
