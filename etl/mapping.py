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

    [rules]                          # a domain rule's severity: "error", "warning" or "off"
    expired-lot = "error"

The built-in default profile (``auto`` only) accepts the obvious header names:
a header matches a canonical field when, ignoring case, spaces, underscores,
hyphens and punctuation, it equals the field's name or one of its aliases.
"""

from __future__ import annotations

import json
import re
import tomllib
from dataclasses import dataclass, field, replace
from importlib import resources
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import polars as pl
import yaml

from etl.errors import InputError, ProfileError
from etl.readers import ROW, Notice, Table
from etl.rules import RULES, Severity, parse_severities
from schemas.canonical import DEFAULTS, KIND_SPECS, LIST_SEPARATOR, field_map, fields_of

__all__ = [
    "Mapped",
    "Profile",
    "apply_profile",
    "builtin_profiles",
    "default_profile",
    "detect_kind",
    "key_field",
    "load_profile",
    "normalise_header",
]


@dataclass(frozen=True)
class Profile:
    """How one registry's layout maps to canonical fields.

    ``kind`` None means "tell from the headers". ``kinds`` holds per-kind
    sections of a multi-file layout (Synthea's patients, providers,
    encounters and immunizations); :meth:`for_kind` picks one.
    """

    name: str = "default"
    kind: str | None = None
    columns: dict[str, str] = field(default_factory=dict)
    defaults: dict[str, str] = field(default_factory=dict)
    values: dict[str, dict[str, str]] = field(default_factory=dict)
    redacted: tuple[str, ...] = ()
    timezone: str = "UTC"
    auto: bool = True
    list_separator: str = LIST_SEPARATOR
    kinds: dict[str, Profile] = field(default_factory=dict)
    rules: dict[str, Severity] = field(default_factory=dict)  # code -> severity, from [rules]
    placeholders: tuple[str, ...] = ()  # more words that mean "no value" (see etl.rules.PLACEHOLDERS)

    def for_kind(self, kind: str) -> Profile:
        """This profile narrowed to one kind, with the kind's built-in defaults underneath."""
        base = self.kinds.get(kind)
        columns = {**self.columns, **(base.columns if base else {})}
        defaults = {**DEFAULTS.get(kind, {}), **self.defaults, **(base.defaults if base else {})}
        values = {**self.values, **(base.values if base else {})}
        fields = field_map(kind)
        return replace(
            self,
            kind=kind,
            columns={h: c for h, c in columns.items() if c in fields},
            defaults={k: v for k, v in defaults.items() if k in fields},
            values={k: v for k, v in values.items() if k in fields},
            rules={**self.rules, **(base.rules if base else {})},
            kinds={},
        )


@dataclass
class Mapped:
    """A table renamed to canonical fields, all text, plus ``__row``."""

    table: Table
    profile: Profile
    frame: pl.DataFrame
    sources: dict[str, str]  # canonical field -> source header it came from
    unmapped: list[str]
    select: list[pl.Expr] = field(default_factory=list)  # source frame -> ``frame``

    def with_rows(self, rows: pl.DataFrame) -> Mapped:
        """The same mapping over other rows of the same file (a batch): the profile is applied once."""
        return replace(self, table=replace(self.table, frame=rows), frame=rows.select(self.select))

    @property
    def kind(self) -> str:
        """The kind of row this table holds."""
        assert self.profile.kind is not None
        return self.profile.kind

    @property
    def keyed_by_record(self) -> bool:
        """Whether rows are keyed by a source id (else by content hash)."""
        return key_field(self.kind) in self.sources

    def source_column(self, canonical: str) -> str:
        """The source header a canonical field came from (itself when absent)."""
        return self.sources.get(canonical, canonical)


_PUNCT = re.compile(r"[\s_\-.()/#:]+")
_NUMBERED = re.compile(r"^(.*?)(\d+)$")
_BUILTIN = resources.files("etl").joinpath("profiles")
_UNMAPPED_NAMED = 20  # columns an unmapped-columns notice names; the rest are counted
_KNOWN = {
    "name",
    "kind",
    "columns",
    "defaults",
    "values",
    "timezone",
    "auto",
    "list_separator",
    "redacted",
    "kinds",
    "description",
    "rules",
    "placeholders",
}


def key_field(kind: str) -> str:
    """The canonical field whose value keys a row of ``kind`` (its :attr:`schemas.canonical.Kind.key`)."""
    spec = KIND_SPECS.get(kind)
    return spec.key if spec is not None else "record_id"


def normalise_header(header: str) -> str:
    """``"Lot Number"``, ``"lot_number"`` and ``"LOT-NUMBER"`` all become ``"lotnumber"``."""
    return _PUNCT.sub("", header.strip().lower())


def default_profile(kind: str | None = None) -> Profile:
    """The built-in profile: match headers by name."""
    return Profile(name="default", kind=kind)


def builtin_profiles() -> dict[str, str]:
    """Name -> one-line description of each built-in profile."""
    out = {"default": "match the usual header names of every kind (no file needed)"}
    for entry in sorted(_BUILTIN.iterdir(), key=lambda e: e.name):
        if entry.name.endswith(".toml"):
            raw = tomllib.loads(entry.read_text(encoding="utf-8"))
            out[entry.name.removesuffix(".toml")] = str(raw.get("description", ""))
    return out


def load_profile(name_or_path: str | Path) -> Profile:
    """A built-in profile by name (``cvrs``, ``synthea``, ``clinikapi``) or a TOML/YAML file."""
    text_name = str(name_or_path)
    if text_name == "default":
        return default_profile()
    builtin = _BUILTIN.joinpath(f"{text_name}.toml")
    if "/" not in text_name and "." not in text_name and builtin.is_file():
        return _parse_profile(tomllib.loads(builtin.read_text(encoding="utf-8")), text_name)
    path = Path(name_or_path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        known = ", ".join(builtin_profiles())
        raise ProfileError(f"{path}: cannot read profile ({exc.strerror}); built-in profiles: {known}") from exc
    try:
        raw: Any = yaml.safe_load(text) if path.suffix.lower() in {".yaml", ".yml"} else tomllib.loads(text)
    except (tomllib.TOMLDecodeError, yaml.YAMLError) as exc:
        raise ProfileError(f"{path}: not valid {path.suffix.lstrip('.').upper() or 'TOML'}: {exc}") from exc
    except RecursionError:
        # Both parsers recurse into nested values: a hostile file runs them out of stack.
        raise ProfileError(f"{path}: not a usable profile: its values are nested too deeply to read") from None
    return _parse_profile(raw, str(path), default_name=path.stem)


def _parse_profile(raw: Any, where: str, default_name: str | None = None, kind: str | None = None) -> Profile:
    if not isinstance(raw, dict):
        raise ProfileError(f"{where}: a profile is a table of settings")
    if unknown := sorted(set(raw) - _KNOWN):
        raise ProfileError(f"{where}: unknown setting(s) {', '.join(unknown)}; known: {', '.join(sorted(_KNOWN))}")
    kind = str(raw["kind"]) if "kind" in raw else kind
    if kind is not None and kind not in KIND_SPECS:
        raise ProfileError(f"{where}: unknown kind {kind!r}; kinds: {', '.join(KIND_SPECS)}")
    names = set(field_map(kind)) if kind else {f.name for k in KIND_SPECS.values() for f in k.fields}
    columns = {str(k): str(v) for k, v in (raw.get("columns") or {}).items()}
    defaults = {str(k): str(v) for k, v in (raw.get("defaults") or {}).items()}
    values = {str(k): {str(a): str(b) for a, b in v.items()} for k, v in (raw.get("values") or {}).items()}
    for section, used in (("columns", columns.values()), ("defaults", defaults), ("values", values)):
        if bad := sorted(set(used) - names):
            raise ProfileError(
                f"{where}: [{section}] names unknown field(s) {', '.join(bad)}"
                + (f" for kind {kind!r}" if kind else "")
            )
    timezone = str(raw.get("timezone", "UTC"))
    try:
        ZoneInfo(timezone)
    except (ZoneInfoNotFoundError, ValueError) as exc:
        raise ProfileError(f"{where}: unknown timezone {timezone!r}") from exc
    kinds = {
        str(k): _parse_profile(v, f"{where} [kinds.{k}]", kind=str(k)) for k, v in (raw.get("kinds") or {}).items()
    }
    try:
        rules = parse_severities(raw.get("rules") or {})
    except ValueError as exc:
        raise ProfileError(f"{where}: {exc}") from None
    return Profile(
        name=str(raw.get("name", default_name or "profile")),
        kind=kind,
        columns=columns,
        defaults=defaults,
        values=values,
        redacted=tuple(str(v) for v in raw.get("redacted", ())),
        timezone=timezone,
        auto=bool(raw.get("auto", True)),
        list_separator=str(raw.get("list_separator", LIST_SEPARATOR)),
        kinds=kinds,
        rules=rules,
        placeholders=tuple(str(v) for v in raw.get("placeholders", ())),
    )


def match_headers(headers: list[str], profile: Profile, kind: str) -> dict[str, str]:
    """Canonical field -> source header, by the profile's columns then by name."""
    fields = field_map(kind)
    sources: dict[str, str] = {}
    narrowed = profile.for_kind(kind)
    for header, canonical in narrowed.columns.items():
        if header in headers:
            sources.setdefault(canonical, header)
    if profile.auto:
        lookup: dict[str, str] = {}
        for f in fields.values():
            for name in (f.name, *f.aliases):
                lookup.setdefault(normalise_header(name), f.name)
        if profile.name == "clinikapi":
            # The ClinikAPI layout names columns after the body's own fields.
            for f in fields.values():
                if f.target:
                    lookup.setdefault(normalise_header(f.target.split(":")[1].replace("[]", "")), f.name)
        for header in headers:
            match = lookup.get(normalise_header(header))
            if match and match not in sources and header not in sources.values():
                sources[match] = header
    return sources


def numbered_columns(headers: list[str], kind: str, taken: set[str]) -> dict[str, list[str]]:
    """List fields spread over numbered columns (``Diagnosis 1``, ``Diagnosis 2`` ...)."""
    lookup = {normalise_header(n): f.name for f in fields_of(kind) if f.value == "list" for n in (f.name, *f.aliases)}
    found: dict[str, list[str]] = {}
    for header in headers:
        m = _NUMBERED.match(normalise_header(header))
        if header not in taken and m and m.group(1) in lookup:
            found.setdefault(lookup[m.group(1)], []).append(header)
    return found


def detect_kind(table: Table, profile: Profile) -> str:
    """The kind of rows a table holds: the profile's, or the best match of the headers."""
    if profile.kind is not None:
        return profile.kind
    candidates = list(profile.kinds) or list(KIND_SPECS)
    scores: dict[str, int] = {}
    for kind in candidates:
        sources = match_headers(table.columns, profile, kind)
        numbered = numbered_columns(table.columns, kind, set(sources.values()))
        scores[kind] = sum(1 for f in KIND_SPECS[kind].distinctive if f in sources or f in numbered)
    best = max(scores.values())
    winners = [k for k, v in scores.items() if v == best]
    if best == 0 or len(winners) > 1:
        tried = ", ".join(f"{k} {v}" for k, v in sorted(scores.items(), key=lambda kv: -kv[1]))
        raise InputError(
            str(table.path),
            f"cannot tell what kind of rows this file holds (matching headers: {tried}); "
            "pass --kind or name it in the profile",
            row=1,
        )
    return winners[0]


def apply_profile(table: Table, profile: Profile, kind: str | None = None) -> Mapped:
    """Rename a table's columns to canonical fields; absent fields become null columns."""
    kind = kind or detect_kind(table, profile)
    narrowed = profile.for_kind(kind)
    fields = field_map(kind)
    sources = match_headers(table.columns, profile, kind)
    numbered = numbered_columns(table.columns, kind, set(sources.values()))
    missing = [
        f.name
        for f in fields.values()
        if f.required
        and f.name not in sources
        and f.name not in narrowed.defaults
        and f.name not in numbered
        and not (kind == "practitioner" and f.name.startswith("practitioner_") and "practitioner_name" in sources)
    ]
    if missing:
        wanted = "; ".join(f"{m} (e.g. {', '.join(fields[m].aliases[:3]) or m})" for m in missing)
        raise InputError(
            str(table.path),
            f"no column for required {kind} field(s) {wanted}; name them in a profile's [columns] (see --profile)",
            row=1,
        )

    def column(name: str) -> pl.Expr:
        if name in sources:
            return pl.col(sources[name])
        if name in numbered:
            return pl.concat_str(
                [pl.col(h) for h in numbered[name]], separator=narrowed.list_separator, ignore_nulls=True
            )
        return pl.lit(None, dtype=pl.String)

    select = [pl.col(ROW), *[column(name).alias(name) for name in fields]]
    frame = table.frame.select(select)
    for name, headers in numbered.items():
        sources.setdefault(name, headers[0])
    used = set(sources.values()) | {h for hs in numbered.values() for h in hs}
    unmapped = [c for c in table.columns if c not in used]
    if unmapped:
        table.notices.append(Notice(RULES["unmapped-columns"].code, _not_imported(unmapped), str(table.path), row=1))
    return Mapped(table, narrowed, frame, sources, unmapped, select)


def _not_imported(columns: list[str]) -> str:
    """The unmapped-columns message: a file may have thousands of columns, the summary names a few."""
    named = ", ".join(columns[:_UNMAPPED_NAMED])
    more = len(columns) - _UNMAPPED_NAMED
    rule = RULES["unmapped-columns"]
    return rule.text("more", columns=named, more=more) if more > 0 else rule.text(columns=named)


def starter_profile(table: Table, kind: str | None = None) -> str:
    """A TOML profile for an unknown layout: every header matched to a field, or marked as unmatched."""
    profile = default_profile()
    try:
        kind = kind or detect_kind(table, profile)
    except InputError:
        kind = kind or "immunization"
    sources = match_headers(table.columns, profile, kind)
    numbered = numbered_columns(table.columns, kind, set(sources.values()))
    by_header = {h: c for c, h in sources.items()} | {h: c for c, hs in numbered.items() for h in hs}
    fields = field_map(kind)
    lines = [
        f"# Starter profile for {table.path.name}, written by `clinik-etl profile init`.",
        "# Check each line; map the columns marked UNMATCHED to a field of this kind, or leave them out.",
        f'name = "{table.path.stem}"',
        f'kind = "{kind}"',
        "",
        "[columns]",
    ]
    for header in table.columns:
        quoted = json.dumps(header, ensure_ascii=False)
        if header in by_header:
            lines.append(f'{quoted} = "{by_header[header]}"')
        else:
            lines.append(f"# {quoted} = ?   # UNMATCHED")
    missing = [
        f.name
        for f in fields.values()
        if f.required and f.name not in sources and f.name not in numbered and f.name not in DEFAULTS.get(kind, {})
    ]
    if missing:
        lines += ["", f"# Required and not found: {', '.join(missing)}"]
    lines += ["", f"# Fields of {kind}: " + ", ".join(fields), ""]
    return "\n".join(lines)
