"""Mapping profiles: which source header feeds which canonical field.

A profile is a TOML or YAML file::

    name = "county-registry"
    kind = "immunization"
    timezone = "America/Chicago"     # for date-times written without an offset
    auto = true                      # also match the remaining headers by name

    [columns]                        # source header = canonical field
    "Vax Event" = "record_id"
    "Pt MRN" = "patient_id"

    [defaults]                       # fills empty cells and absent columns
    status = "completed"

The built-in default profile (``auto`` only) accepts the obvious header names:
a header matches a canonical field when, ignoring case, spaces, underscores,
hyphens and punctuation, it equals the field's name or one of its aliases.
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import polars as pl
import yaml

from etl.errors import InputError, ProfileError
from etl.readers import ROW, Notice, Table
from schemas.canonical import DEFAULTS, KINDS, LIST_SEPARATOR, field_map

__all__ = ["Mapped", "Profile", "apply_profile", "default_profile", "load_profile", "normalise_header"]


@dataclass(frozen=True)
class Profile:
    """How one registry's layout maps to canonical fields."""

    name: str = "default"
    kind: str = "immunization"
    columns: dict[str, str] = field(default_factory=dict)
    defaults: dict[str, str] = field(default_factory=dict)
    timezone: str = "UTC"
    auto: bool = True
    list_separator: str = LIST_SEPARATOR


@dataclass
class Mapped:
    """A table renamed to canonical fields, all text, plus ``__row``."""

    table: Table
    profile: Profile
    frame: pl.DataFrame
    sources: dict[str, str]  # canonical field -> source header it came from
    unmapped: list[str]

    @property
    def kind(self) -> str:
        """The kind of row this table holds."""
        return self.profile.kind

    @property
    def keyed_by_record(self) -> bool:
        """Whether rows are keyed by a source record id (else by content hash)."""
        return "record_id" in self.sources

    def source_column(self, canonical: str) -> str:
        """The source header a canonical field came from (itself when absent)."""
        return self.sources.get(canonical, canonical)


_PUNCT = re.compile(r"[\s_\-.()/#:]+")


def normalise_header(header: str) -> str:
    """``"Lot Number"``, ``"lot_number"`` and ``"LOT-NUMBER"`` all become ``"lotnumber"``."""
    return _PUNCT.sub("", header.strip().lower())


def default_profile(kind: str = "immunization") -> Profile:
    """The built-in profile: match headers by name, with the kind's defaults."""
    return Profile(name="default", kind=kind, defaults=dict(DEFAULTS.get(kind, {})))


def load_profile(path: str | Path) -> Profile:
    """Read a TOML or YAML profile, checking every field name it uses."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ProfileError(f"{path}: cannot read profile: {exc.strerror}") from exc
    try:
        raw: Any = yaml.safe_load(text) if path.suffix.lower() in {".yaml", ".yml"} else tomllib.loads(text)
    except (tomllib.TOMLDecodeError, yaml.YAMLError) as exc:
        raise ProfileError(f"{path}: not valid {path.suffix.lstrip('.').upper() or 'TOML'}: {exc}") from exc
    if not isinstance(raw, dict):
        raise ProfileError(f"{path}: a profile is a table of settings")
    known = {"name", "kind", "columns", "defaults", "timezone", "auto", "list_separator"}
    if unknown := sorted(set(raw) - known):
        raise ProfileError(f"{path}: unknown setting(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    kind = str(raw.get("kind", "immunization"))
    if kind not in KINDS:
        raise ProfileError(f"{path}: unknown kind {kind!r}; kinds: {', '.join(KINDS)}")
    fields = field_map(kind)
    columns = {str(k): str(v) for k, v in (raw.get("columns") or {}).items()}
    defaults = {**DEFAULTS.get(kind, {}), **{str(k): str(v) for k, v in (raw.get("defaults") or {}).items()}}
    for where, names in (("columns", columns.values()), ("defaults", defaults.keys())):
        if bad := sorted(set(names) - set(fields)):
            raise ProfileError(f"{path}: [{where}] names unknown field(s) {', '.join(bad)} for kind {kind!r}")
    timezone = str(raw.get("timezone", "UTC"))
    try:
        ZoneInfo(timezone)
    except (ZoneInfoNotFoundError, ValueError) as exc:
        raise ProfileError(f"{path}: unknown timezone {timezone!r}") from exc
    return Profile(
        name=str(raw.get("name", path.stem)),
        kind=kind,
        columns=columns,
        defaults=defaults,
        timezone=timezone,
        auto=bool(raw.get("auto", True)),
        list_separator=str(raw.get("list_separator", LIST_SEPARATOR)),
    )


def apply_profile(table: Table, profile: Profile) -> Mapped:
    """Rename a table's columns to canonical fields; absent fields become null columns."""
    fields = field_map(profile.kind)
    sources: dict[str, str] = {}
    for header, canonical in profile.columns.items():
        if header in table.columns:
            sources.setdefault(canonical, header)
    if profile.auto:
        lookup: dict[str, str] = {}
        for f in fields.values():
            for name in (f.name, *f.aliases):
                lookup.setdefault(normalise_header(name), f.name)
        for header in table.columns:
            match = lookup.get(normalise_header(header))
            if match and match not in sources and header not in sources.values():
                sources[match] = header
    missing = [
        f.name for f in fields.values() if f.required and f.name not in sources and f.name not in profile.defaults
    ]
    if missing:
        wanted = "; ".join(f"{m} (e.g. {', '.join(fields[m].aliases[:3]) or m})" for m in missing)
        raise InputError(
            str(table.path),
            f"no column for required field(s) {wanted}; name them in a profile's [columns] (see --profile)",
            row=1,
        )
    frame = table.frame.select(
        pl.col(ROW),
        *[(pl.col(sources[name]) if name in sources else pl.lit(None, dtype=pl.String)).alias(name) for name in fields],
    )
    used = set(sources.values())
    unmapped = [c for c in table.columns if c not in used]
    if unmapped:
        table.notices.append(Notice("unmapped-columns", f"not imported: {', '.join(unmapped)}", str(table.path), row=1))
    return Mapped(table, profile, frame, sources, unmapped)
