"""Settings of a run: one object with named defaults, filled by the CLI or a notebook.

Environment variables (``CLINIK_ETL_`` prefix, e.g. ``CLINIK_ETL_RATE=5``)
set defaults; the API key comes only from ``CLINIKAPI_SECRET_KEY`` or a key
file, never from a command-line flag, and is held as a ``SecretStr`` so it
never shows in a repr, a log line or a traceback. The Redox bearer token
likewise comes only from ``REDOX_API_TOKEN`` or a token file.

Both are checked for shape when they are read (:func:`secret_problem`), before
anything is sent: printable ASCII with no space or control character, and for
the API key the documented ``clk_test_``/``clk_live_`` pattern. A message about
a bad key names where it came from, never the key. Every duration has a finite
upper bound (``MAX_*`` below); ``inf`` and ``nan`` are refused.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

from pydantic import AliasChoices, Field, SecretStr, ValidationInfo, field_validator
from pydantic_core import PydanticCustomError
from pydantic_settings import BaseSettings, SettingsConfigDict

from etl.errors import UsageError
from etl.workbooks import WORKBOOK_MAX_BYTES, WORKBOOK_MAX_CELLS, WORKBOOK_MAX_RATIO, WorkbookLimits
from schemas.limits import API_KEY_PATTERN, BULK_OPERATIONS_PER_HOUR

#: Rows ``validate`` checks at a time by default.
BATCH_ROWS = 75_000
#: Rows a load or a dry run plans at a time by default: each batch's creates (their bodies) are held
#: too, so fewer rows keep its peak where validate's is (a 1,000,000-row dry run: about 870 MiB, not 1 GiB).
LOAD_BATCH_ROWS = 50_000

#: Longest ``timeout``: seconds to wait for one answer.
MAX_TIMEOUT = 600.0
#: Longest ``consistency_window``: seconds to wait before trusting a search.
MAX_CONSISTENCY_WINDOW = 3600.0
#: Most ``no_answer_limit``: requests in a row without any answer before a load stops.
MAX_NO_ANSWER_LIMIT = 1000
#: Default ``no_answer_limit``: four rounds of the default concurrency (a brief outage of a few seconds is ridden out).
NO_ANSWER_LIMIT = 32
#: Retries a load may spend in all (429 ``RATE_LIMITED`` and connections never opened), whatever the number of
#: rows; once spent the run stops and the rows not yet sent are ``not-sent`` (each row still retries at most 8 times).
RETRY_BUDGET = 200
#: Rounds in which a load settles its unknown outcomes: wait for search, look each up, re-send the certainly absent.
SETTLE_ROUNDS = 6
#: Longest wait for search to show one of the run's own creates (the search-lag probe); past it no wait is safe.
MAX_SEARCH_LAG = 60.0

__all__ = [
    "BATCH_ROWS",
    "DEFAULT_REDOX_STATE",
    "DEFAULT_STATE",
    "MAX_CONSISTENCY_WINDOW",
    "MAX_NO_ANSWER_LIMIT",
    "MAX_SEARCH_LAG",
    "MAX_TIMEOUT",
    "NO_ANSWER_LIMIT",
    "RETRY_BUDGET",
    "SETTLE_ROUNDS",
    "Settings",
    "read_key_file",
    "secret_problem",
]

DEFAULT_STATE = Path(".clinik-etl/state.sqlite")
#: A Redox load's default state store: a store is bound to one target.
DEFAULT_REDOX_STATE = Path(".clinik-etl/redox-state.sqlite")
_URL_SEGMENT = r"^[A-Za-z0-9._~-]+$"


class Settings(BaseSettings):
    """Everything a validate or load run needs besides its input files."""

    # No inf/nan anywhere (a wait of inf never ends); no input echoed in an error (it may be a key).
    model_config = SettingsConfigDict(
        env_prefix="CLINIK_ETL_", extra="forbid", populate_by_name=True, allow_inf_nan=False,
        hide_input_in_errors=True,
    )

    api_key: SecretStr | None = Field(
        default=None, validation_alias=AliasChoices("CLINIKAPI_SECRET_KEY", "api_key"), repr=False
    )
    base_url: str | None = None  # None: the embedded sandbox
    live: bool = False  # a clk_live_ key needs this opt-in
    profile: str | None = None  # a file, or a built-in profile's name
    kind: str | None = None  # None: each file's kind from the profile or its headers
    crosswalk: Path | None = None  # kind, source_id, clinikapi_id
    sheet: str | None = None
    # The header's row, 1-based (rows above it are skipped); None: the profile's header_row, else the
    # first row naming known columns (etl.readers.HeaderHint).
    header_row: int | None = Field(default=None, ge=1)
    dry_run: bool = False
    update: bool = False  # PATCH rows that changed since an earlier run created them
    redact: bool = False  # a shareable report: no names, birth dates or contact details
    rate: float | None = Field(default=None, gt=0)  # requests/s; None: from the server's headers
    concurrency: int = Field(default=8, ge=1, le=64)
    timeout: float = Field(default=30.0, gt=0, le=MAX_TIMEOUT)  # seconds for one answer
    consistency_window: float = Field(default=10.0, ge=0, le=MAX_CONSISTENCY_WINDOW)  # seconds before search is trusted
    # Requests in a row that get no answer at all (timeouts, connections lost or refused) before a load stops:
    # the rows sent stay unknown, the rest are not sent. With ``timeout``, it bounds a run against a silent target.
    no_answer_limit: int = Field(default=NO_ANSWER_LIMIT, ge=1, le=MAX_NO_ANSWER_LIMIT)
    state: Path = DEFAULT_STATE
    report_dir: Path | None = None  # None: reports/<run id>; "{run_id}" in it is replaced by the run's id
    # Rows validated at a time: bounds the memory a batch takes (what grows beyond it is what the run remembers
    # of the ids, patients and doses seen: README, Performance).
    batch_rows: int = Field(default=BATCH_ROWS, ge=1)
    # Deprecated and ignored (a one-line warning when set): every run is planned and sent in batches.
    # Kept so that old commands (--stream/--no-stream) and job files ("stream") still run.
    stream: bool | None = None
    # What an .xlsx may hold before it is read (etl.workbooks): a zip bomb, or a grid of billions of
    # cells, stops the run with a message. Defaults well above a 1,000,000-row, 50-column sheet.
    xlsx_max_bytes: int = Field(default=WORKBOOK_MAX_BYTES, ge=1)  # all parts inflated, together
    xlsx_max_cells: int = Field(default=WORKBOOK_MAX_CELLS, ge=1)  # a sheet's cells, and rows x columns
    xlsx_max_ratio: int = Field(default=WORKBOOK_MAX_RATIO, ge=1)  # a part's compression ratio past 64 MiB
    wait: bool = False  # another run holds the state store: wait for it (else stop at once)
    # request: a POST per create; bulk: NDJSON imports (etl.load.bulk); auto: bulk when the window cannot hold the plan
    mode: Literal["request", "bulk", "auto"] = "request"
    bulk_per_hour: int = Field(default=BULK_OPERATIONS_PER_HOUR, ge=1)  # the plan's bulk imports an hour
    # The embedded sandbox's answer shape (etl.sandbox.shapes): fhir as the SDK describes, simple the body echoed.
    sandbox_responses: Literal["fhir", "simple"] = "fhir"
    # --- Redox (target="redox"): FHIR R4 Immunization/$write message bundles (etl.redox)
    target: Literal["clinikapi", "redox"] = "clinikapi"
    redox_base_url: str | None = None  # None: the embedded sandbox
    redox_token: SecretStr | None = Field(
        default=None, validation_alias=AliasChoices("REDOX_API_TOKEN", "redox_token"), repr=False
    )
    redox_destination_slug: str | None = Field(default=None, pattern=_URL_SEGMENT)  # required with redox_base_url
    redox_environment: str = Field(default="development", pattern=_URL_SEGMENT)
    redox_source_endpoint: str = Field(default="clinik-etl", min_length=1)  # MessageHeader.source.endpoint
    redox_source_name: str | None = "clinik-etl"
    redox_mrn_system: str = "urn:clinik-etl:mrn"  # Patient.identifier system of the source patient id
    redox_identifier_system: str = "urn:clinik-etl:immunization"  # Immunization.identifier system of the row key
    # --- matching what the target already holds (etl.matching, etl.dedupe)
    # off: create every patient; exact: link exact matches; probable: also send probable ones to review.csv
    match: Literal["off", "exact", "probable"] = "probable"
    dedupe_doses: bool = True  # a dose the chart (or an earlier row of the run) holds is `exists`, not created
    accept_review: Path | None = None  # a review.csv whose `decision` column a person filled in

    def batch_rows_for(self, *, creates: bool) -> int:
        """The rows a run takes at a time: ``batch_rows`` when it was given (an option, the environment, a
        job file), else :data:`LOAD_BATCH_ROWS` for a run that plans creates (a load, a dry run) and
        :data:`BATCH_ROWS` for one that only checks."""
        if "batch_rows" in self.model_fields_set or not creates:
            return self.batch_rows
        return LOAD_BATCH_ROWS

    @property
    def workbook_limits(self) -> WorkbookLimits:
        """The ``xlsx_max_*`` settings, as the readers take them."""
        return WorkbookLimits(self.xlsx_max_bytes, self.xlsx_max_cells, self.xlsx_max_ratio)

    @field_validator("base_url", "redox_base_url")
    @classmethod
    def _strip_slash(cls, value: str | None) -> str | None:
        return value.rstrip("/") if value else value

    @field_validator("api_key", "redox_token")
    @classmethod
    def _secret_shape(cls, value: SecretStr | None, info: ValidationInfo) -> SecretStr | None:
        if value is not None:
            problem = secret_problem(value.get_secret_value(), token=info.field_name == "redox_token")
            if problem is not None:
                # A custom error: the message alone, under the name of the variable it came from.
                raise PydanticCustomError("secret_shape", problem)
        return value


_API_KEY = re.compile(API_KEY_PATTERN)


def secret_problem(value: str, *, token: bool = False) -> str | None:
    """What is wrong with an API key (or, with ``token``, a Redox bearer token), or None.

    A key or token must be printable ASCII with no space or control character (a header cannot carry
    anything else); an API key must also have the documented shape (``clk_test_`` or ``clk_live_``,
    then a header token: :data:`schemas.limits.API_KEY_PATTERN`). The message describes the value, never quotes it.
    """
    what = "the Redox token" if token else "the API key"
    if not value:
        return f"{what} is empty"
    if not value.isascii():
        return f"{what} holds a non-ASCII character (a copy from a document or a chat?)"
    if any(ch.isspace() for ch in value):
        return f"{what} holds a space or a line break"
    if not value.isprintable():
        return f"{what} holds a control character"
    if not token and not _API_KEY.fullmatch(value):
        return (
            f"{what} is not a ClinikAPI key: keys are clk_test_ or clk_live_ followed by letters, digits "
            "and - . _ ~ + /"
        )
    return None


def read_key_file(path: Path, *, token: bool = False) -> SecretStr:
    """The API key (with ``token``: the Redox token) from a file's first line, checked by :func:`secret_problem`."""
    what = "a Redox token" if token else "an API key"
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise UsageError(f"{path}: {what} file must be plain ASCII text") from None
    except OSError as exc:
        raise UsageError(f"cannot read {what} from {path}: {exc.strerror or type(exc).__name__}") from None
    lines = text.strip().splitlines()
    key = lines[0].strip() if lines else ""
    if not key:
        raise UsageError(f"cannot read {what} from {path}: the file is empty")
    problem = secret_problem(key, token=token)
    if problem is not None:
        raise UsageError(f"{path}: {problem}")
    return SecretStr(key)
