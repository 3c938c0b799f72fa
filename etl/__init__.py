"""clinik-etl: import vaccine-registry exports and visit logs into ClinikAPI.

The public API is small: settings in, a :class:`RunReport` out::

    from etl import Settings, load_files
    report = load_files(["registry.csv"], Settings(dry_run=True))
"""

from etl import _allocator  # noqa: F401  (first: it sets polars' allocator up before polars is imported)
from etl.errors import (
    ApiError,
    AuthError,
    EtlError,
    ExitCode,
    InputError,
    NoAnswerError,
    OutputError,
    ProfileError,
    StateError,
    UsageError,
)
from etl.mapping import Profile, load_profile
from etl.pipeline import load_files, validate_files
from etl.readers import read_table
from etl.report import FINAL_STATES, RunReport
from etl.settings import Settings

__all__ = [
    "FINAL_STATES",
    "ApiError",
    "AuthError",
    "EtlError",
    "ExitCode",
    "InputError",
    "NoAnswerError",
    "OutputError",
    "Profile",
    "ProfileError",
    "RunReport",
    "Settings",
    "StateError",
    "UsageError",
    "load_files",
    "load_profile",
    "read_table",
    "validate_files",
]
