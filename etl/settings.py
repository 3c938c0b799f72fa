"""Settings of a run: one object with named defaults, filled by the CLI or a notebook.

Environment variables (``CLINIK_ETL_`` prefix, e.g. ``CLINIK_ETL_RATE=5``)
set defaults; the API key comes only from ``CLINIKAPI_SECRET_KEY`` or a key
file, never from a command-line flag, and is held as a ``SecretStr`` so it
never shows in a repr, a log line or a traceback. The Redox bearer token
likewise comes only from ``REDOX_API_TOKEN`` or a token file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import AliasChoices, Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from etl.errors import UsageError
from schemas.limits import BULK_OPERATIONS_PER_HOUR

#: Rows ``validate`` checks at a time by default.
BATCH_ROWS = 75_000

__all__ = ["BATCH_ROWS", "DEFAULT_REDOX_STATE", "DEFAULT_STATE", "Settings", "read_key_file"]

DEFAULT_STATE = Path(".clinik-etl/state.sqlite")
#: A Redox load's default state store: a store is bound to one target.
DEFAULT_REDOX_STATE = Path(".clinik-etl/redox-state.sqlite")
_URL_SEGMENT = r"^[A-Za-z0-9._~-]+$"


class Settings(BaseSettings):
    """Everything a validate or load run needs besides its input files."""

    model_config = SettingsConfigDict(env_prefix="CLINIK_ETL_", extra="forbid", populate_by_name=True)

    api_key: SecretStr | None = Field(
        default=None, validation_alias=AliasChoices("CLINIKAPI_SECRET_KEY", "api_key"), repr=False
    )
    base_url: str | None = None  # None: the embedded sandbox
    live: bool = False  # a clk_live_ key needs this opt-in
    profile: str | None = None  # a file, or a built-in profile's name
    kind: str | None = None  # None: each file's kind from the profile or its headers
    crosswalk: Path | None = None  # kind, source_id, clinikapi_id
    sheet: str | None = None
    dry_run: bool = False
    update: bool = False  # PATCH rows that changed since an earlier run created them
    redact: bool = False  # a shareable report: no names, birth dates or contact details
    rate: float | None = Field(default=None, gt=0)  # requests/s; None: from the server's headers
    concurrency: int = Field(default=8, ge=1, le=64)
    timeout: float = Field(default=30.0, gt=0)
    consistency_window: float = Field(default=10.0, ge=0)
    state: Path = DEFAULT_STATE
    report_dir: Path | None = None  # None: reports/<run id>; "{run_id}" in it is replaced by the run's id
    # Rows validated at a time: bounds the memory a file takes (75,000 keep 5,000,000 registry rows under 1 GiB).
    batch_rows: int = Field(default=BATCH_ROWS, ge=1)
    # Deprecated and ignored (a one-line warning when set): every run is planned and sent in batches.
    # Kept so that old commands (--stream/--no-stream) and job files ("stream") still run.
    stream: bool | None = None
    wait: bool = False  # another run holds the state store: wait for it (else stop at once)
    # request: a POST per create; bulk: NDJSON imports (etl.load.bulk); auto: bulk when the window cannot hold the plan
    mode: Literal["request", "bulk", "auto"] = "request"
    bulk_per_hour: int = Field(default=BULK_OPERATIONS_PER_HOUR, ge=1)  # the plan's bulk imports an hour
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

    @field_validator("base_url", "redox_base_url")
    @classmethod
    def _strip_slash(cls, value: str | None) -> str | None:
        return value.rstrip("/") if value else value


def read_key_file(path: Path) -> SecretStr:
    """The API key from a file's first line."""
    try:
        key = path.read_text(encoding="utf-8").strip().splitlines()[0].strip()
    except (OSError, IndexError) as exc:
        raise UsageError(f"cannot read an API key from {path}") from exc
    return SecretStr(key)
