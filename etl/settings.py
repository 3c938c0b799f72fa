"""Settings of a run: one object with named defaults, filled by the CLI or a notebook.

Environment variables (``CLINIK_ETL_`` prefix, e.g. ``CLINIK_ETL_RATE=5``)
set defaults; the API key comes only from ``CLINIKAPI_SECRET_KEY`` or a key
file, never from a command-line flag, and is held as a ``SecretStr`` so it
never shows in a repr, a log line or a traceback.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import AliasChoices, Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from etl.errors import UsageError

__all__ = ["DEFAULT_STATE", "Settings", "read_key_file"]

DEFAULT_STATE = Path(".clinik-etl/state.sqlite")


class Settings(BaseSettings):
    """Everything a validate or load run needs besides its input files."""

    model_config = SettingsConfigDict(env_prefix="CLINIK_ETL_", extra="forbid", populate_by_name=True)

    api_key: SecretStr | None = Field(
        default=None, validation_alias=AliasChoices("CLINIKAPI_SECRET_KEY", "api_key"), repr=False
    )
    base_url: str | None = None  # None: the embedded sandbox
    live: bool = False  # a clk_live_ key needs this opt-in
    profile: Path | None = None
    sheet: str | None = None
    dry_run: bool = False
    rate: float | None = Field(default=None, gt=0)  # requests/s; None: from the server's headers
    concurrency: int = Field(default=8, ge=1, le=64)
    timeout: float = Field(default=30.0, gt=0)
    consistency_window: float = Field(default=10.0, ge=0)
    state: Path = DEFAULT_STATE
    report_dir: Path | None = None  # None: reports/<timestamp>

    @field_validator("base_url")
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
