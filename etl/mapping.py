"""Mapping profiles: which source header feeds which canonical field.

A profile is a TOML or YAML file::

    name = "county-registry"
    kind = "immunization"
    timezone = "America/Chicago"     # for date-times written without an offset
    auto = true                      # also match the remaining headers by name
    header_row = 3                   # the header's row (default: found, below any title rows)

    [columns]                        # source header = canonical field
    "Vax Event" = "record_id"
    "Pt MRN" = "patient_id"

    [defaults]                       # fills empty cells and absent columns
    status = "completed"

    [parse.occurrence]               # how a column's values are written (dates, numbers)
    format = "%m%d%Y"

    [expressions.patient_last_name]  # a field built from other columns
    split = "Patient Name"
    separator = ","
    part = 1

    [values.route]                   # a built-in map of codes, and the value of any other
    map = "hl7-route"

    [[skip]]                         # rows left out, each reported as skipped (code ``filtered``)
    column = "Action"
    values = ["D"]

    [rules]                          # a domain rule's severity: "error", "warning" or "off"
    expired-lot = "error"

Every key, with an example, is in ``docs/profiles.md``.

The built-in default profile (``auto`` only) accepts the obvious header names:
a header matches a canonical field when, ignoring case, spaces, underscores,
hyphens and punctuation, it equals the field's name or one of its aliases.
"""

from __future__ import annotations

import fnmatch
import json
import re
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from importlib import resources
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import polars as pl

from etl.codemaps import CODE_MAPS
from etl.errors import InputError, ProfileError
from etl.hl7 import STATE_COLUMNS
from etl.readers import ROW, Notice, Table, own_bookkeeping
from etl.rules import RULES, Severity, parse_severities
from schemas.canonical import DEFAULTS, KIND_SPECS, LIST_SEPARATOR, field_map, fields_of

__all__ = [
    "SKIP",
    "SYNTHEA_SIDE_FILES",
    "ColumnParse",
    "Expression",
    "Mapped",
    "Profile",
    "RowFilter",
    "SideFile",
    "apply_profile",
    "builtin_profiles",
    "default_profile",
    "detect_kind",
    "for_hl7",
    "key_field",
    "kinds_named",
    "known_header",
    "load_profile",
    "normalise_header",
    "profile_format",
    "routed_kinds",
    "side_file",
    "starter_profile",
]


#: The column of a mapped frame that holds why a row is left out (a profile's ``[[skip]]``), or null.
SKIP = "__skip"


@dataclass(frozen=True)
class ColumnParse:
    """How one field's values are written in the source (a profile's ``[parse.<field>]``).

    The validator parses with these before its usual spellings, so the value it checks and sends
    is the canonical ISO date (or plain number) and every limit applies as usual.
    """

    formats: tuple[str, ...] = ()  # strftime patterns: "%m%d%Y", "%Y%m%dT%H%M%S", "%Y-%m-%d %H:%M"
    timezone: str | None = None  # of local date-times in this column (else the profile's)
    excel_serial: bool = False  # a number such as 45458 is an Excel date serial
    decimal_comma: bool | None = None  # "0,5" is 0.5 (None: as the profile says)


@dataclass(frozen=True)
class Expression:
    """A field built from source columns (a profile's ``[expressions.<field>]``): one of join, split, constant."""

    join: tuple[str, ...] = ()
    split: str | None = None
    part: int = 1  # of a split: 1 is the first part, -1 the last
    separator: str = " "
    constant: str | None = None

    @property
    def columns(self) -> tuple[str, ...]:
        """The source columns it reads."""
        return self.join or ((self.split,) if self.split is not None else ())


@dataclass(frozen=True)
class RowFilter:
    """Rows a source column picks: it holds one of ``values`` (any case) or matches ``pattern``.

    In ``[[skip]]`` they are left out (``reason`` says why); in ``[[route]]`` they hold ``kind``.
    """

    column: str
    values: tuple[str, ...] = ()
    pattern: str | None = None
    reason: str = ""
    kind: str | None = None  # [[route]]: the kind of the rows it picks

    def picks(self) -> pl.Expr:
        """Whether each row is picked (never null)."""
        low = pl.col(self.column).str.strip_chars().str.to_lowercase()
        hit = low.is_in([v.strip().lower() for v in self.values]) if self.values else pl.lit(False)
        if self.pattern is not None:
            hit = hit | pl.col(self.column).str.contains(self.pattern)
        return hit.fill_null(False)


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
    hl7_deletes: str = "skip"  # an HL7 dose whose RXA-21 is D: "skip" it, or "reject" it
    parse: dict[str, ColumnParse] = field(default_factory=dict)
    decimal_comma: bool | None = None  # None: told from a ";" file's values
    expressions: dict[str, Expression] = field(default_factory=dict)
    value_defaults: dict[str, str] = field(default_factory=dict)  # a mapped field's value for unlisted words
    skip: tuple[RowFilter, ...] = ()
    route: tuple[RowFilter, ...] = ()  # rows of a file that hold another kind than the profile's
    files: tuple[str, ...] = ()  # in a [kinds.X] section: file-name patterns of this kind
    sheets: tuple[str, ...] = ()  # in a [kinds.X] section: sheet-name patterns of this kind
    header_row: int | None = None  # 1-based; None: the first row naming known columns
    rules: dict[str, Severity] = field(default_factory=dict)  # code -> severity, from [rules]
    placeholders: tuple[str, ...] = ()  # more words that mean "no value" (see etl.rules.PLACEHOLDERS)

    def for_kind(self, kind: str) -> Profile:
        """This profile narrowed to one kind, with the kind's built-in defaults underneath."""
        base = self.kinds.get(kind)
        columns = {**self.columns, **(base.columns if base else {})}
        defaults = {**DEFAULTS.get(kind, {}), **self.defaults, **(base.defaults if base else {})}
        values = {**self.values, **(base.values if base else {})}
        fields = field_map(kind)

        def mine(top: dict[str, Any], section: dict[str, Any]) -> dict[str, Any]:
            return {k: v for k, v in {**top, **section}.items() if k in fields}

        return replace(
            self,
            kind=kind,
            columns={h: c for h, c in columns.items() if c in fields},
            defaults={k: v for k, v in defaults.items() if k in fields},
            values={k: v for k, v in values.items() if k in fields},
            rules={**self.rules, **(base.rules if base else {})},
            kinds={},
            parse=mine(self.parse, base.parse if base else {}),
            decimal_comma=base.decimal_comma if base and base.decimal_comma is not None else self.decimal_comma,
            expressions=mine(self.expressions, base.expressions if base else {}),
            value_defaults=mine(self.value_defaults, base.value_defaults if base else {}),
            skip=self.skip + (base.skip if base else ()),
            files=base.files if base else (),
            sheets=base.sheets if base else (),
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
    only: pl.Expr | None = None  # the rows of the file this kind takes (a profile's [[route]])

    def with_rows(self, rows: pl.DataFrame) -> Mapped:
        """The same mapping over other rows of the same file (a batch): the profile is applied once."""
        if self.only is not None:
            rows = rows.filter(self.only)
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
    "hl7_deletes",
    "parse",
    "decimal_comma",
    "expressions",
    "skip",
    "route",
    "files",
    "sheets",
    "header_row",
    "rules",
    "placeholders",
}
_HL7_DELETES = ("skip", "reject")
_PARSE_KEYS = {"format", "timezone", "excel_serial", "decimal_comma"}
_EXPRESSION_KEYS = {"join", "split", "part", "separator", "constant"}
_SKIP_KEYS = {"column", "values", "pattern", "reason"}
_ROUTE_KEYS = {"column", "values", "pattern", "kind"}
#: Keys of a ``[values.<field>]`` table that are settings, not source words.
_VALUE_SETTINGS = ("map", "default")


def key_field(kind: str) -> str:
    """The canonical field whose value keys a row of ``kind`` (its :attr:`schemas.canonical.Kind.key`)."""
    spec = KIND_SPECS.get(kind)
    return spec.key if spec is not None else "record_id"


#: A header's leading word that names the patient (``PERSON_FORENAME``, ``Client DOB``): what follows it names one of
#: the patient's details (:func:`match_headers`).
_SUBJECT_WORDS = r"(person|patient|client|recip|recipient|pt|member|child)"
_SUBJECT = re.compile(_SUBJECT_WORDS + r"[\s_\-.]+", re.IGNORECASE)


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
    import yaml  # here: importing PyYAML at every start cost a fiftieth of a second

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
    if kind is None and ("files" in raw or "sheets" in raw):
        raise ProfileError(f"{where}: files and sheets belong in a [kinds.<kind>] section")
    if kind is not None and "route" in raw:
        raise ProfileError(f"{where}: [[route]] belongs at the top of the profile, beside its kind")
    if "route" in raw and "kind" not in raw:
        raise ProfileError(f"{where}: [[route]] needs the profile's kind: the kind of the rows no route takes")
    kind = str(raw["kind"]) if "kind" in raw else kind
    if kind is not None and kind not in KIND_SPECS:
        raise ProfileError(f"{where}: unknown kind {kind!r}; kinds: {', '.join(KIND_SPECS)}")
    names = set(field_map(kind)) if kind else {f.name for k in KIND_SPECS.values() for f in k.fields}
    columns = {str(k): str(v) for k, v in _table(raw, "columns", where).items()}
    defaults = {str(k): str(v) for k, v in _table(raw, "defaults", where).items()}
    values: dict[str, dict[str, str]] = {}
    value_defaults: dict[str, str] = {}
    for name, words in _table(raw, "values", where).items():
        values[str(name)], default = _value_map(words, f"{where} [values.{name}]")
        if default is not None:
            value_defaults[str(name)] = default
    parse = {str(k): _column_parse(v, f"{where} [parse.{k}]") for k, v in _table(raw, "parse", where).items()}
    expressions = {
        str(k): _expression(v, f"{where} [expressions.{k}]") for k, v in _table(raw, "expressions", where).items()
    }
    sections = (
        ("columns", columns.values()),
        ("defaults", defaults),
        ("values", values),
        ("parse", parse),
        ("expressions", expressions),
    )
    for section, used in sections:
        if bad := sorted(set(used) - names):
            raise ProfileError(
                f"{where}: [{section}] names unknown field(s) {', '.join(bad)}"
                + (f" for kind {kind!r}" if kind else "")
            )
    timezone = _timezone(raw.get("timezone", "UTC"), where)
    kinds = {
        str(k): _parse_profile(v, f"{where} [kinds.{k}]", kind=str(k)) for k, v in _table(raw, "kinds", where).items()
    }
    deletes = str(raw.get("hl7_deletes", "skip"))
    if deletes not in _HL7_DELETES:
        raise ProfileError(f"{where}: hl7_deletes is {deletes!r}; one of {', '.join(_HL7_DELETES)}")
    skip, route = raw.get("skip", []), raw.get("route", [])
    if not isinstance(skip, list):
        raise ProfileError(f"{where}: skip is a list of [[skip]] tables (column, values or pattern, reason)")
    if not isinstance(route, list):
        raise ProfileError(f"{where}: route is a list of [[route]] tables (column, values or pattern, kind)")
    header_row = raw.get("header_row")
    if header_row is not None and (isinstance(header_row, bool) or not isinstance(header_row, int) or header_row < 1):
        raise ProfileError(f"{where}: header_row is a row number from 1, not {header_row!r}")
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
        hl7_deletes=deletes,
        parse=parse,
        decimal_comma=_flag(raw, "decimal_comma", where),
        expressions=expressions,
        value_defaults=value_defaults,
        skip=tuple(_row_filter(v, f"{where} [[skip]] {i + 1}") for i, v in enumerate(skip)),
        route=tuple(_row_filter(v, f"{where} [[route]] {i + 1}", _ROUTE_KEYS) for i, v in enumerate(route)),
        files=_patterns(raw, "files", where),
        sheets=_patterns(raw, "sheets", where),
        header_row=header_row,
        rules=rules,
        placeholders=tuple(str(v) for v in raw.get("placeholders", ())),
    )


def _table(raw: dict[str, Any], key: str, where: str) -> dict[str, Any]:
    value = raw.get(key) or {}
    if not isinstance(value, dict):
        raise ProfileError(f"{where}: {key} is a table ([{key}] ...)")
    return value


def _timezone(value: Any, where: str) -> str:
    timezone = str(value)
    try:
        ZoneInfo(timezone)
    except (ZoneInfoNotFoundError, ValueError) as exc:
        raise ProfileError(f"{where}: unknown timezone {timezone!r}") from exc
    return timezone


def _flag(raw: dict[str, Any], key: str, where: str) -> bool | None:
    value = raw.get(key)
    if value is None or isinstance(value, bool):
        return value
    raise ProfileError(f"{where}: {key} is true or false, not {value!r}")


def _strings(value: Any, key: str, where: str) -> tuple[str, ...]:
    if isinstance(value, str):
        return (value,)
    if isinstance(value, list) and value and all(isinstance(v, str | int) for v in value):
        return tuple(str(v) for v in value)
    raise ProfileError(f"{where}: {key} is a text or a list of texts, not {value!r}")


def _patterns(raw: dict[str, Any], key: str, where: str) -> tuple[str, ...]:
    return _strings(raw[key], key, where) if key in raw else ()


def _unknown_keys(raw: Any, known: set[str], where: str) -> dict[str, Any]:
    if not isinstance(raw, dict):
        raise ProfileError(f"{where}: a table of settings ({', '.join(sorted(known))}), not {raw!r}")
    if unknown := sorted(set(raw) - known):
        raise ProfileError(f"{where}: unknown setting(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    return raw


def _column_parse(raw: Any, where: str) -> ColumnParse:
    raw = _unknown_keys(raw, _PARSE_KEYS, where)
    formats = _patterns(raw, "format", where)
    for fmt in formats:
        if "%" not in fmt:
            raise ProfileError(f"{where}: format {fmt!r} has no % directive (e.g. %m%d%Y, %Y-%m-%d %H:%M)")
    return ColumnParse(
        formats=formats,
        timezone=_timezone(raw["timezone"], where) if "timezone" in raw else None,
        excel_serial=bool(_flag(raw, "excel_serial", where)),
        decimal_comma=_flag(raw, "decimal_comma", where),
    )


def _expression(raw: Any, where: str) -> Expression:
    raw = _unknown_keys(raw, _EXPRESSION_KEYS, where)
    chosen = [k for k in ("join", "split", "constant") if k in raw]
    if len(chosen) != 1:
        raise ProfileError(f"{where}: give exactly one of join, split or constant")
    part = raw.get("part", 1)
    if not isinstance(part, int) or isinstance(part, bool) or part == 0:
        raise ProfileError(f"{where}: part is a whole number, 1 for the first part or -1 for the last, not {part!r}")
    separator = raw.get("separator", " ")
    if not isinstance(separator, str) or (separator == "" and "split" in raw):
        raise ProfileError(f"{where}: separator is a text, not {separator!r}")
    if "join" in raw:
        return Expression(join=_strings(raw["join"], "join", where), separator=separator)
    if "split" in raw:
        return Expression(split=str(raw["split"]), separator=separator, part=part)
    return Expression(constant=str(raw["constant"]))


def _value_map(raw: Any, where: str) -> tuple[dict[str, str], str | None]:
    """A ``[values.<field>]`` table: (source word -> value, with any built-in map's underneath; the default)."""
    if not isinstance(raw, dict):
        raise ProfileError(f"{where}: a table of source value = value sent")
    words: dict[str, str] = {}
    if "map" in raw:
        name = str(raw["map"])
        if name not in CODE_MAPS:
            raise ProfileError(f"{where}: no built-in map {name!r}; built-in maps: {', '.join(CODE_MAPS)}")
        words.update(CODE_MAPS[name])
    words.update({str(a): str(b) for a, b in raw.items() if a not in _VALUE_SETTINGS})
    default = raw.get("default")
    return words, None if default is None else str(default)


def _row_filter(raw: Any, where: str, known: set[str] = _SKIP_KEYS) -> RowFilter:
    raw = _unknown_keys(raw, known, where)
    if "column" not in raw or ("values" not in raw and "pattern" not in raw):
        raise ProfileError(f"{where}: name a column and its values (or a pattern)")
    if "kind" in known and str(raw.get("kind")) not in KIND_SPECS:
        raise ProfileError(f"{where}: kind is one of {', '.join(KIND_SPECS)}, not {raw.get('kind')!r}")
    pattern = raw.get("pattern")
    if pattern is not None:
        try:
            re.compile(str(pattern))
        except re.error as exc:
            raise ProfileError(f"{where}: pattern {pattern!r} is not a regular expression: {exc}") from None
    return RowFilter(
        column=str(raw["column"]),
        values=_strings(raw["values"], "values", where) if "values" in raw else (),
        pattern=None if pattern is None else str(pattern),
        reason=str(raw.get("reason", "")),
        kind=str(raw["kind"]) if "kind" in raw else None,
    )


def known_header(profile: Profile) -> Callable[[str], bool]:
    """Whether a header cell names a column this profile knows: a source column of its ``[columns]``
    (of any kind), or a field's name or alias of its kinds (every kind when it names none).

    What a reader looks for to tell the header from title rows above it (:class:`etl.readers.HeaderHint`).
    """
    kinds = [profile.kind] if profile.kind else list(profile.kinds) or list(KIND_SPECS)
    names = {normalise_header(n) for k in kinds for f in fields_of(k) for n in (f.name, *f.aliases)}
    names |= {normalise_header(h) for p in (profile, *profile.kinds.values()) for h in p.columns}
    if profile.name == "clinikapi":  # as match_headers: columns named after the body's own fields
        names |= {normalise_header(f.target.split(":")[1].replace("[]", "")) for k in kinds for f in fields_of(k)
                  if f.target}
    names.discard("")
    return lambda header: normalise_header(header) in names


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
        bookkeeping = own_bookkeeping(headers)  # never matched by name: the new report replaces them
        for header in (h for h in headers if h not in bookkeeping):
            match = lookup.get(normalise_header(header))
            if match is None and (subject := _SUBJECT.match(header)):
                # "PERSON_FORENAME", "Patient DOB": the patient's own detail, by the name after the subject.
                found = lookup.get(normalise_header(header[subject.end():]))
                match = found if found is not None and found.startswith("patient_") else None
            if "#" in header:
                # "Dose #" counts doses: it is a number of, never an amount (mL).
                match = lookup.get(normalise_header(header.replace("#", " number")), match)
                if match and fields[match].value == "number":
                    match = None
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
    """The kind of rows a table holds: the profile's, or the best match of the headers (HL7: immunizations)."""
    if profile.kind is not None:
        return profile.kind
    if table.format == "hl7":
        return "immunization"  # one row per RXA segment: a dose
    if named := kinds_named(table, profile):
        if len(named) > 1:
            raise InputError(
                str(table.path),
                f"the profile's files/sheets patterns of {' and '.join(named)} both match; make them narrower",
            )
        return named[0]
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


def kinds_named(table: Table, profile: Profile) -> list[str]:
    """The kinds whose ``files`` pattern matches the file's name, or ``sheets`` pattern its sheet (any case)."""

    def matches(name: str | None, patterns: tuple[str, ...]) -> bool:
        return name is not None and any(fnmatch.fnmatchcase(name.lower(), p.lower()) for p in patterns)

    return [
        kind
        for kind, section in profile.kinds.items()
        if matches(table.path.name, section.files) or matches(table.sheet, section.sheets)
    ]


def apply_profile(table: Table, profile: Profile, kind: str | None = None) -> Mapped:
    """Rename a table's columns to canonical fields; absent fields become null columns.

    An HL7 table is mapped by the built-in ``hl7`` profile under ``profile`` (:func:`for_hl7`).
    The profile's expressions build their fields from source columns, its value maps' defaults
    replace the words they do not list, and its ``[[skip]]`` filters fill :data:`SKIP`: all of it
    polars expressions, run on every batch by :meth:`Mapped.with_rows`.
    """
    if table.format == "hl7":
        profile = for_hl7(profile)
    kind = kind or detect_kind(table, profile)
    narrowed = profile.for_kind(kind)
    fields = field_map(kind)
    sources = match_headers(table.columns, profile, kind)
    _check_columns(table, narrowed)
    for name, expression in narrowed.expressions.items():
        sources.pop(name, None)
        if expression.columns:
            sources[name] = expression.columns[0]
    numbered = numbered_columns(table.columns, kind, set(sources.values()))
    missing = [
        f.name
        for f in fields.values()
        if f.required
        and f.name not in sources
        and f.name not in narrowed.expressions
        and f.name not in narrowed.defaults
        and f.name not in numbered
        and not (kind == "practitioner" and f.name.startswith("practitioner_") and "practitioner_name" in sources)
    ]
    if missing:
        wanted = "; ".join(f"{m} (e.g. {', '.join(fields[m].aliases[:3]) or m})" for m in missing)
        raise InputError(
            str(table.path),
            f"no column for required {kind} field(s) {wanted}; name them in a profile's [columns] (see --profile; "
            f"`clinik-etl profile init {table.path.name}` drafts one from this file)",
            row=table.header_row,
        )

    def column(name: str) -> pl.Expr:
        if name in narrowed.value_defaults and (name in sources or name in narrowed.expressions):
            return _with_default(source(name), narrowed.values.get(name, {}), narrowed.value_defaults[name])
        return source(name)

    def source(name: str) -> pl.Expr:
        if name in narrowed.expressions:
            return _expression_of(narrowed.expressions[name])
        if name in sources:
            return pl.col(sources[name])
        if name in numbered:
            return pl.concat_str(
                [pl.col(h) for h in numbered[name]], separator=narrowed.list_separator, ignore_nulls=True
            )
        return pl.lit(None, dtype=pl.String)

    select = [pl.col(ROW), *[column(name).alias(name) for name in fields]]
    if narrowed.skip:
        select.append(_skipped(narrowed.skip).alias(SKIP))
    frame = table.frame.select(select)
    for name, headers in numbered.items():
        sources.setdefault(name, headers[0])
    used = set(sources.values()) | {h for hs in numbered.values() for h in hs}
    if table.format == "hl7":
        used |= set(STATE_COLUMNS)  # RXA-21 and what it implies decide a row's state (etl.validate)
    # An own rejects.csv's bookkeeping: replaced by this run's report, neither a field nor an unmapped column.
    used |= own_bookkeeping(table.columns) - set(sources.values())
    used |= {c for e in narrowed.expressions.values() for c in e.columns} | {f.column for f in narrowed.skip}
    used |= {f.column for f in narrowed.route}
    unmapped = [c for c in table.columns if c not in used]
    if unmapped:
        table.notices.append(Notice(RULES["unmapped-columns"].code, _not_imported(unmapped), str(table.path), row=1))
    only = _routed_to(profile.route, kind, profile.kind or kind) if profile.route else None
    return Mapped(table, narrowed, frame, sources, unmapped, select, only)


def _check_columns(table: Table, profile: Profile) -> None:
    """Each column an expression or a filter reads is in the file: a one-line error otherwise."""
    named = [(f"[expressions.{n}]", c) for n, e in profile.expressions.items() for c in e.columns]
    named += [("[[skip]]", f.column) for f in profile.skip] + [("[[route]]", f.column) for f in profile.route]
    for section, column in named:
        if column not in table.columns:
            raise InputError(
                str(table.path),
                f"the profile's {section} reads column {column!r}, which the file does not have; "
                f"its columns: {', '.join(table.columns[:_UNMAPPED_NAMED])}",
                row=1,
            )


def _cell(header: str) -> pl.Expr:
    """A source cell, trimmed; null when blank."""
    trimmed = pl.col(header).str.strip_chars()
    return pl.when(trimmed.str.len_bytes() > 0).then(trimmed)


def _expression_of(expression: Expression) -> pl.Expr:
    if expression.constant is not None:
        return pl.lit(expression.constant, dtype=pl.String)
    if expression.split is not None:
        parts = _cell(expression.split).str.split(expression.separator)
        index = expression.part - 1 if expression.part > 0 else expression.part
        return _blank(parts.list.get(index, null_on_oob=True).str.strip_chars())
    joined = pl.concat_str([_cell(h) for h in expression.join], separator=expression.separator, ignore_nulls=True)
    return _blank(joined)


def _blank(e: pl.Expr) -> pl.Expr:
    return pl.when(e.str.len_bytes() > 0).then(e)


def _with_default(e: pl.Expr, words: dict[str, str], default: str) -> pl.Expr:
    """A cell the value map does not list (trimmed, any case) becomes ``default``; a blank stays blank."""
    listed = {w.strip().lower() for w in words} | {v.strip().lower() for v in words.values()}
    low = e.str.strip_chars().str.to_lowercase()
    return pl.when(low.str.len_bytes() == 0).then(e).when(low.is_in(sorted(listed))).then(e).otherwise(pl.lit(default))


def _skipped(filters: tuple[RowFilter, ...]) -> pl.Expr:
    """Why a row is left out (the first filter that takes it), or null."""
    reasons = []
    for f in filters:
        why = f.reason or f"{f.column} is " + " or ".join(f.values or (f"like /{f.pattern}/",))
        reasons.append(pl.when(f.picks()).then(pl.lit(why)))
    return pl.coalesce(reasons)


def routed_kinds(mapped: Mapped) -> list[str]:
    """The other kinds a profile's ``[[route]]`` sends some of this file's rows to, in the profile's order."""
    if mapped.only is None:
        return []
    return list(dict.fromkeys(r.kind for r in mapped.profile.route if r.kind and r.kind != mapped.kind))


def _routed_to(routes: tuple[RowFilter, ...], kind: str, base: str) -> pl.Expr:
    """Whether a row belongs to ``kind``: the first route that picks it says, else it is ``base``'s."""
    to = pl.coalesce([pl.when(r.picks()).then(pl.lit(r.kind)) for r in routes])
    return to.fill_null(pl.lit(base)) == kind


def for_hl7(profile: Profile) -> Profile:
    """The profile an HL7 table is mapped with: the built-in ``hl7`` profile, with ``profile`` over it.

    The default profile gives the built-in one as it is. Another profile's ``[columns]`` (HL7 field
    positions such as ``"RXA-5"`` or ``"PID-5.1"``, as :data:`etl.hl7.COLUMNS` names them) take the
    fields they name from the built-in mapping; its ``[values]``, ``[defaults]``, ``redacted``
    markers, ``timezone`` and ``hl7_deletes`` are added to or replace the built-in ones.
    """
    base = load_profile("hl7")
    if replace(profile, kind=None) == default_profile():
        return replace(base, kind=profile.kind or base.kind)
    if profile.name == base.name:
        return profile
    named = set(profile.columns.values()) | {c for k in profile.kinds.values() for c in k.columns.values()}
    return replace(
        profile,
        kind=profile.kind or base.kind,
        columns={**{h: c for h, c in base.columns.items() if c not in named}, **profile.columns},
        values={**base.values, **profile.values},
        defaults={**base.defaults, **profile.defaults},
        redacted=tuple(dict.fromkeys((*base.redacted, *profile.redacted))),
    )


def _not_imported(columns: list[str]) -> str:
    """The unmapped-columns message: a file may have thousands of columns, the summary names a few."""
    named = ", ".join(columns[:_UNMAPPED_NAMED])
    more = len(columns) - _UNMAPPED_NAMED
    rule = RULES["unmapped-columns"]
    return rule.text("more", columns=named, more=more) if more > 0 else rule.text(columns=named)


_COUNTED = re.compile(r"#|\b(number|num|no|count|seq|sequence)\b", re.IGNORECASE)
_AMOUNT = re.compile(r"\b(ml|amount|volume|quantity|qty)\b", re.IGNORECASE)
_DATELIKE = re.compile(r"date|dob|birth|time|when|admin|start|stop|end|expir|entered|recorded", re.IGNORECASE)
_PATIENT_ID = re.compile(_SUBJECT_WORDS + r".*(id|no|num|number|mrn)\b", re.IGNORECASE)  # the subject's id
_EVENT_ID = re.compile(r"(event|record|vax|vaccination|visit|encounter).*\b(id|no|num|number)$", re.IGNORECASE)
_YES_NO = {"yes", "no", "y", "n", "true", "false"}  # a flag column's values (profile init's status hint)
#: Words of a date column's header, and the date field each names (in this order: ``Batch Expiry Date`` is an
#: expiration date, not the dose's). A date column whose header names none gets the first date field not mapped.
_DATE_WORDS = (
    (re.compile(r"expir|use.?by|best.?before", re.IGNORECASE), "expiration_date"),
    (re.compile(r"birth|dob", re.IGNORECASE), "patient_birth_date"),
    (re.compile(r"reaction", re.IGNORECASE), "reaction_date"),
    (re.compile(r"record|enter", re.IGNORECASE), "recorded"),
    (re.compile(r"admin|vacc|vax|given|occur|service|immuni|dose|shot", re.IGNORECASE), "occurrence"),
)
_NAME = re.compile(r"name", re.IGNORECASE)
_SNIFF_ROWS = 1000  # rows whose values profile init looks at
_FORMATS = (".toml", ".yaml", ".yml")


@dataclass
class _Guess:
    """profile init's reading of one source column."""

    header: str
    canonical: str | None = None
    confidence: str = "high"  # high: the header names the field; medium: the values alone; low: a hint
    why: list[str] = field(default_factory=list)
    parse: dict[str, str | bool] = field(default_factory=dict)
    map: str | None = None
    expressions: dict[str, dict[str, str | int]] = field(default_factory=dict)  # field -> [expressions.<field>]


def starter_profile(table: Table, kind: str | None = None, fmt: str = "toml") -> str:
    """A commented profile (``fmt`` ``toml`` or ``yaml``) for an unknown layout, from its headers and values.

    Each column gets a guess with its evidence (sample values, how many fit) and a confidence;
    columns it cannot place are written as comments. A count (``Dose #``) is never mapped to an
    amount (``dose_value``, mL).
    """
    from etl.sniff import READ_WITHOUT_PATTERN, Shape, sniff

    profile = for_hl7(default_profile()) if table.format == "hl7" else default_profile()
    told = "given with --kind" if kind else "told from the headers"
    try:
        kind = kind or detect_kind(table, profile)
    except InputError:
        kind, told = "immunization", "the headers did not tell: check it"
    sources = match_headers(table.columns, profile, kind)
    numbered = numbered_columns(table.columns, kind, set(sources.values()))
    by_header = {h: c for c, h in sources.items()} | {h: c for c, hs in numbered.items() for h in hs}
    fields = field_map(kind)
    sample = table.frame.head(_SNIFF_ROWS)
    guesses: list[_Guess] = []
    taken = set(by_header.values())

    def first(shapes: list[Shape], kind_: str) -> Shape | None:
        return next((sh for sh in shapes if sh.kind == kind_), None)

    # An HL7 table's state columns (the action code and what it implies) are the tool's own: read by
    # etl.validate whatever the profile says, so neither a field to map nor an unmapped column.
    internal = set(STATE_COLUMNS) if table.format == "hl7" else set()
    internal |= own_bookkeeping(table.columns)  # an own rejects.csv's: what its run said, replaced by the next
    for header in [c for c in table.columns if c not in internal]:
        matched = by_header.get(header)
        guess = _Guess(header, matched, why=["header name"] if matched else [])
        shapes = sniff(sample.get_column(header), datelike=bool(_DATELIKE.search(header)) or (
            matched is not None and fields[matched].value in ("date", "datetime")))
        dates = [sh for sh in shapes if sh.kind == "date"]
        target = fields.get(matched) if matched else None
        count = first(shapes, "count")
        if matched == "dose_number" and count:
            guess.why.append(f"{count.evidence}, whole numbers")
        if matched in ("npi", "performer_npi") and (npi := first(shapes, "npi")):
            guess.why.append(f"{npi.evidence}, 10 digits with a valid check digit")
        if matched == "dose_value" and (_COUNTED.search(header) or (count and not _AMOUNT.search(header))):
            # A count of doses is not an amount in mL.
            evidence = f"{count.evidence}, whole numbers" if count else "the header counts"
            guess.canonical = "dose_number" if "dose_number" in fields and "dose_number" not in taken else None
            guess.confidence, guess.why = "medium", [f"a count, not an amount in mL ({evidence})"]
        elif matched is None:
            _guess_from_values(guess, shapes, fields, taken, header)
        if guess.canonical:
            taken.add(guess.canonical)
            target = fields[guess.canonical]
        if target is not None and target.value in ("date", "datetime"):
            if dates:
                best = dates[0]
                guess.why.append(f"{best.evidence} read as {best.detail}")
                if len(dates) > 1 and {d.detail for d in dates} >= {"%m/%d/%Y", "%d/%m/%Y"}:
                    guess.confidence = "low"
                    guess.why.append("month and day cannot be told apart in these values: check the pattern")
                if best.detail not in READ_WITHOUT_PATTERN:
                    guess.parse["format"] = best.detail
            elif serial := first(shapes, "excel-serial"):
                guess.parse["excel_serial"] = True
                guess.why.append(f"{serial.evidence}: Excel date serials")
        if target is not None and target.value == "number" and (comma := first(shapes, "decimal-comma")):
            guess.parse["decimal_comma"] = True
            guess.why.append(f"{comma.evidence} with a decimal comma")
        if target is not None and target.normaliser in ("gender", "route", "site", "encounter_class"):
            wanted = {"gender": "sex"}.get(target.normaliser, target.normaliser.replace("_", "-"))
            if (found := first(shapes, wanted)) is not None:
                guess.map = found.detail
                guess.why.append(f"{found.evidence}: built-in map {found.detail!r}")
        if target is not None and target.normaliser == "cvx" and (cvx := first(shapes, "cvx")):
            guess.why.append(f"{cvx.evidence} in the CVX table")
        if guess.canonical is None and (codes := first(shapes, "codes")):
            flags = all(len(c) <= 3 and c.isalpha() for c in codes.samples)
            listed = ", ".join(codes.samples) if max(len(c) for c in codes.samples) <= 20 else None
            said = f"values: {listed}" if listed else f"{len(codes.samples)} distinct values in {codes.of} rows"
            if {c.lower() for c in codes.samples} <= _YES_NO and fields.get("status") and "status" not in taken:
                # "Vaccinated: Yes/no": whether the dose was given, which a skip filter would leave out of the creates.
                said += ' (given or not? map it to status, [values.status] yes = "completed", no = "not-done")'
            elif flags:
                said += " (flags: a [[skip]] filter?)"
            guess.why.append(said)
        elif guess.canonical is None and shapes and not guess.expressions:
            guess.why.append(f"{shapes[0].kind}: {shapes[0].evidence}")
        guesses.append(guess)
    return _render(table, kind, told, guesses, fields, fmt)


def _guess_from_values(guess: _Guess, shapes: list[Any], fields: dict[str, Any], taken: set[str], header: str) -> None:
    """A field for a column whose header names none, from the shape of its values (medium confidence)."""
    by_kind = {sh.kind: sh for sh in shapes}
    options = [
        ("cvx", "vaccine_code", "CVX codes"),
        ("npi", "performer_npi" if "performer_npi" in fields else "npi", "NPIs (10 digits, check digit right)"),
        ("sex", "patient_gender" if "patient_gender" in fields else "practitioner_gender", "sex codes"),
        ("route", "route", "route codes"),
        ("site", "site", "body-site codes"),
        ("encounter-class", "encounter_class", "encounter classes"),
    ]
    for shape_kind, name, what in options:
        if shape_kind in by_kind and name in fields and name not in taken:
            guess.canonical, guess.confidence = name, "medium"
            guess.why.append(f"{by_kind[shape_kind].evidence}: {what}")
            return
    if "last-first" in by_kind and _NAME.search(header):
        last, first_ = ("patient_last_name", "patient_first_name")
        if {last, first_} <= fields.keys() and not {last, first_} & taken:
            guess.expressions = {
                last: {"split": header, "separator": ",", "part": 1},
                first_: {"split": header, "separator": ",", "part": -1},
            }
            taken.update((last, first_))
            guess.why.append(f'{by_kind["last-first"].evidence}: "Last, First" names, split in [expressions] below')
            return
    if "number" in by_kind and _AMOUNT.search(header) and "dose_value" in fields and "dose_value" not in taken:
        guess.canonical, guess.confidence = "dose_value", "medium"
        guess.why.append(f"{by_kind['number'].evidence}: numbers, and the header names an amount")
        return
    for pattern, name in ((_PATIENT_ID, "patient_id"), (_EVENT_ID, "record_id")):
        if "date" in by_kind:  # dates are no one's id (DATE_OF_VACCINATION)
            break
        if pattern.search(header) and name in fields and name not in taken:
            guess.canonical, guess.confidence = name, "low"
            guess.why.append("the header looks like an id of this kind")
            return
    if "ndc" in by_kind:
        guess.why.append(f"{by_kind['ndc'].evidence}: NDC codes (no field carries them; map the CVX column)")
        return
    if "date" in by_kind and _DATELIKE.search(header):
        date_fields = [f for f, spec in fields.items() if spec.value in ("date", "datetime") and f not in taken]
        named = next((f for words, f in _DATE_WORDS if words.search(header) and f in date_fields), None)
        if named is not None:
            guess.canonical, guess.confidence = named, "low"  # a hint: a word of the header
            guess.why.append(f"dates, and the header's words suggest {named}")
        elif date_fields:
            guess.canonical, guess.confidence = date_fields[0], "low"
            guess.why.append(f"dates, and {date_fields[0]} is the first date field not yet mapped")


def _render(table: Table, kind: str, told: str, guesses: list[_Guess], fields: dict[str, Any], fmt: str) -> str:
    yaml_out = fmt in ("yaml", "yml")
    q = json.dumps  # a JSON string is a valid TOML basic string and a valid YAML double-quoted scalar

    def comment(g: _Guess) -> str:
        said = "; ".join(g.why) if g.why else "no evidence"
        return f"  # {g.confidence}: {said}" if g.canonical else f"  # not mapped: {said}"

    lines = [
        f"# Starter profile for {table.path.name}, written by `clinik-etl profile init` from its headers",
        f"# and the values of its first {min(table.frame.height, _SNIFF_ROWS)} rows. Beside each guess: how sure "
        "(high: the header names",
        "# the field; medium: the values alone; low: a hint) and the evidence. Check each line; docs/profiles.md",
        "# explains every key.",
    ]
    if yaml_out:
        lines += [f"name: {q(table.path.stem)}", f"kind: {kind}  # {told}", "", "columns:"]
    else:
        lines += [f"name = {q(table.path.stem)}", f'kind = "{kind}"  # {told}', "", "[columns]"]
    for g in guesses:
        indent = "  " if yaml_out else ""
        sep = ": " if yaml_out else " = "
        if g.canonical:
            lines.append(f"{indent}{q(g.header)}{sep}{q(g.canonical)}{comment(g)}")
        elif g.expressions:
            lines.append(f"{indent}# {q(g.header)}: see [expressions]  # medium: {'; '.join(g.why)}")
        else:
            lines.append(f"{indent}# {q(g.header)}{sep}?{comment(g)}")
    made = [(name, g.header, settings) for g in guesses for name, settings in g.expressions.items()]
    if made:
        lines += ["", "expressions:"] if yaml_out else [""]
        for name, header, built in made:
            lines.append(f"  {name}:  # from {q(header)}" if yaml_out else f"[expressions.{name}]  # from {q(header)}")
            for key, value in built.items():
                shown = str(value) if isinstance(value, int) else q(value)
                lines.append(f"    {key}: {shown}" if yaml_out else f"{key} = {shown}")
    parsed = [g for g in guesses if g.canonical and g.parse]
    mapped = [g for g in guesses if g.canonical and g.map]
    for section, chosen in (("parse", parsed), ("values", mapped)):
        if not chosen:
            continue
        lines += ["", f"{section}:"] if yaml_out else [""]
        for g in chosen:
            settings: dict[str, str | bool] = dict(g.parse) if section == "parse" else {"map": str(g.map)}
            if yaml_out:
                lines.append(f"  {g.canonical}:  # from {q(g.header)}")
            else:
                lines.append(f"[{section}.{g.canonical}]  # from {q(g.header)}")
            for key, value in settings.items():
                shown = ("true" if value else "false") if isinstance(value, bool) else q(value)
                lines.append(f"  {key}: {shown}" if not yaml_out else f"    {key}: {shown}")
                if not yaml_out:
                    lines[-1] = f"{key} = {shown}"
    found = {g.canonical for g in guesses if g.canonical} | {n for g in guesses for n in g.expressions}
    missing = [
        f.name for f in fields.values() if f.required and f.name not in found and f.name not in DEFAULTS.get(kind, {})
    ]
    if missing:
        lines += ["", f"# Required and not found: {', '.join(missing)}"]
    lines += ["", f"# Fields of {kind}: " + ", ".join(fields), ""]
    return "\n".join(lines)


def profile_format(path: Path) -> str:
    """The profile format a file name asks for (``toml`` or ``yaml``); a ProfileError for any other suffix."""
    suffix = path.suffix.lower()
    if suffix not in _FORMATS:
        raise ProfileError(f"{path}: a profile file ends in .toml, .yaml or .yml, not {suffix or 'no suffix'!r}")
    return suffix.lstrip(".").replace("yml", "yaml")


# --- files of a multi-file export that hold no rows to import -------------------------------------


@dataclass(frozen=True)
class SideFile:
    """A file of a multi-file export (Synthea's) that holds no rows to import.

    Either a table other files' values are looked up in (``organizations.csv``: an encounter's
    ``ORGANIZATION`` id becomes that organization's ``NAME``, sent as ``serviceProvider``), or a
    file ClinikAPI has no resource for (``payers.csv``, ``conditions.csv`` ...), named as not imported.
    """

    name: str  # "Synthea organizations"
    reason: str  # why its rows are not imported, for the summary and the terminal
    headers: frozenset[str] = frozenset()  # headers that tell it apart whatever its file name
    key: str | None = None  # the column other files refer to a row by
    value: str | None = None  # the column whose value replaces that reference
    kind: str | None = None  # the kind whose rows refer to it ...
    field: str | None = None  # ... in this canonical field


def _synthea_files() -> dict[str, SideFile]:
    files = {
        "organizations": SideFile(
            "Synthea organizations",
            "a lookup table: each encounter's ORGANIZATION id is sent as that organization's NAME (serviceProvider)",
            frozenset({"id", "name", "revenue", "utilization"}),
            key="Id",
            value="NAME",
            kind="encounter",
            field="service_provider",
        ),
        "payers": SideFile(
            "Synthea payers", "no ClinikAPI resource holds payers", frozenset({"id", "name", "state_headquartered"})
        ),
    }
    for stem in (
        "allergies", "careplans", "claims", "claims_transactions", "conditions", "devices", "imaging_studies",
        "medications", "observations", "payer_transitions", "procedures", "supplies",
    ):
        what = stem.replace("_", " ")
        files[stem] = SideFile(f"Synthea {what}", f"this toolkit imports no {what}")
    return files


#: Synthea's CSV files that hold no rows to import, by file name (without ``.csv``).
SYNTHEA_SIDE_FILES: dict[str, SideFile] = _synthea_files()


def side_file(table: Table, profile: Profile) -> SideFile | None:
    """The side file ``table`` is, or None for a file of rows to import.

    Synthea's organizations and payers are told by their headers (they would otherwise read as
    practitioners: both have ``Id``, ``NAME`` and an address; ``REVENUE`` and ``UTILIZATION``,
    ``STATE_HEADQUARTERED`` are theirs in every Synthea version); with the ``synthea`` profile, its
    other files that no kind imports are told by their names. A profile that names a kind for
    every file (``--kind``) reads every file as that kind.
    """
    if profile.kind is not None:
        return None
    headers = {h.strip().lower() for h in table.columns}
    for side in SYNTHEA_SIDE_FILES.values():
        if side.headers and side.headers <= headers:
            return side
    if profile.name == "synthea":
        return SYNTHEA_SIDE_FILES.get(table.path.stem.lower())
    return None
