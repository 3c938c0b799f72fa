"""Job files: a whole import described once, run by a scheduler as ``clinik-etl run JOB``.

A job file is TOML. Paths in it are relative to the job file, so the same
job runs the same way from cron (whose working directory is ``$HOME``) and
from a shell::

    name = "weekly-registry"
    inputs = ["exports/registry-*.csv"]   # paths or globs; every one must match
    profile = "county.toml"               # optional: the built-in header matching otherwise
    kind = "immunization"                 # optional: read every input as this kind
    base_url = "https://api.clinikapi.com"  # optional: the embedded sandbox otherwise
    api_key_file = "/etc/clinik-etl/key"  # optional: CLINIKAPI_SECRET_KEY otherwise
    rate = 0.5                            # optional: the server's rate-limit headers otherwise
    concurrency = 4
    state = "state/weekly.sqlite"         # default: .clinik-etl/<job file name>.sqlite
    reports = "reports/weekly"            # one folder per run: <reports>/<run id>
    wait = false                          # true: queue behind a run that holds the state store

Besides ``name``, ``inputs``, ``reports`` and ``api_key_file``, a job may set
any run setting (the fields of :class:`~etl.settings.Settings`, as the
``load`` options name them) except the key itself; :func:`job_keys` lists
them. Path settings are relative to the job file too.

:func:`load_job` reads and checks a job and builds the run's
:class:`~etl.settings.Settings`; :func:`run_job` makes the one library call
(:func:`etl.pipeline.load_files`). The API key never goes in a job file:
jobs are shared and committed, keys are not.
"""

from __future__ import annotations

import glob
import os
import tomllib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from etl.errors import UsageError
from etl.progress import Progress
from etl.report import RunReport
from etl.settings import Settings, read_key_file

__all__ = ["Job", "job_keys", "load_job", "run_job"]

_OWN_KEYS = ("name", "inputs", "reports", "api_key_file")
# Not settable from a job: secrets (any SecretStr setting) and report folders (from ``reports``).
_NOT_FROM_JOBS = ("api_key", "report_dir")
_KEY_NAMES = ("api_key", "key", "secret", "secret_key", "token", "clinikapi_secret_key", "redox_token")


@dataclass(frozen=True)
class Job:
    """A job file, checked: its inputs found and its settings built."""

    path: Path
    name: str
    inputs: tuple[Path, ...]
    settings: Settings


def job_keys() -> tuple[str, ...]:
    """Every key a job file may hold: its own, and every run setting but secrets and the report folder."""
    return (
        *_OWN_KEYS,
        *(
            name
            for name, info in Settings.model_fields.items()
            if name not in _NOT_FROM_JOBS and "SecretStr" not in str(info.annotation)
        ),
    )


def _is_path_setting(name: str) -> bool:
    # A profile is a file or a built-in name, so it may be typed as text; it is still a path here.
    return name == "profile" or "Path" in str(Settings.model_fields[name].annotation)


def _resolve(base: Path, value: object, key: str) -> Path:
    if not isinstance(value, str) or not value:
        raise UsageError(f"{key} must be a path (a non-empty string)")
    path = Path(value).expanduser()
    # normpath, not resolve(): keep the user's symlinks, drop the "dir/../" that reads badly in reports.
    return Path(os.path.normpath(path if path.is_absolute() else base / path))


def _inputs(job_path: Path, raw: object) -> tuple[Path, ...]:
    patterns = [raw] if isinstance(raw, str) else raw
    if not isinstance(patterns, list) or not patterns or not all(isinstance(p, str) and p for p in patterns):
        raise UsageError(f"{job_path}: inputs must be a path or glob, or a list of them")
    base = job_path.parent
    found: list[Path] = []
    for pattern in patterns:
        full = str(_resolve(base, pattern, "inputs"))
        if glob.has_magic(full):
            matches = sorted(Path(m) for m in glob.glob(full, recursive=True) if Path(m).is_file())
        else:
            matches = [Path(full)] if Path(full).is_file() else []
        if not matches:
            # A scheduled import whose export is missing must say so, not "succeed" with nothing.
            raise UsageError(f"{job_path}: no input file matches {pattern!r} (looked in {base})")
        found.extend(m for m in matches if m not in found)
    return tuple(found)


def load_job(path: str | Path) -> Job:
    """Read a job file, find its inputs and build its settings; a job that cannot run raises UsageError."""
    path = Path(path)
    try:
        raw: dict[str, Any] = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise UsageError(f"{path}: cannot read the job file: {exc.strerror}") from exc
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise UsageError(f"{path}: not valid TOML: {exc}") from exc
    except RecursionError:
        # tomllib parses nested arrays and tables by recursion: a hostile file runs it out of stack.
        raise UsageError(f"{path}: not a usable job file: its values are nested too deeply to read") from None
    if secret := sorted(k for k in raw if k.lower() in _KEY_NAMES):
        raise UsageError(
            f"{path}: {secret[0]} does not belong in a job file; use api_key_file or CLINIKAPI_SECRET_KEY"
        )
    known = job_keys()
    if unknown := sorted(set(raw) - set(known)):
        raise UsageError(f"{path}: unknown key(s) {', '.join(unknown)}; known: {', '.join(known)}")
    if "inputs" not in raw:
        raise UsageError(f"{path}: a job needs inputs (paths or globs, relative to the job file)")
    base = path.parent
    values: dict[str, Any] = {k: v for k, v in raw.items() if k not in _OWN_KEYS}
    for key, value in values.items():
        # A built-in profile is a bare name (``cvrs``); any other path is the job file's neighbour.
        builtin = key == "profile" and isinstance(value, str) and not any(c in value for c in "/.")
        if _is_path_setting(key) and not builtin:
            resolved = _resolve(base, value, key)
            values[key] = resolved if "Path" in str(Settings.model_fields[key].annotation) else str(resolved)
    values.setdefault("state", base / ".clinik-etl" / f"{path.stem}.sqlite")
    reports = _resolve(base, raw["reports"], "reports") if "reports" in raw else base / "reports" / path.stem
    values["report_dir"] = reports / "{run_id}"  # the pipeline fills in each run's id
    if "api_key_file" in raw:
        values["api_key"] = read_key_file(_resolve(base, raw["api_key_file"], "api_key_file"))
    try:
        settings = Settings(**values)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors(include_input=False))
        raise UsageError(f"{path}: {problems}") from None
    inputs = _inputs(path, raw["inputs"])
    return Job(path, str(raw.get("name") or path.stem), inputs, settings)


def run_job(job: Job, *, progress: Progress | Callable[[str, int], None] | None = None) -> RunReport:
    """Run a job: one :func:`etl.pipeline.load_files` call with the job's inputs and settings.

    The load records itself in the state store as ``run`` with the job's name from its start, so
    that ``history`` tells scheduled runs from loads by hand, even one killed outright.
    """
    from etl.pipeline import load_files

    return load_files(list(job.inputs), job.settings, progress=progress, job=job.name)
