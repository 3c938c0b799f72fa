"""Validation: every documented limit and the registry's domain rules, per row.

Two steps, both whole-frame polars expressions:

1. :func:`prepare` trims cells, applies the profile's defaults, normalises
   codes (gender, status, CVX, route, site) and parses typed values into
   companion columns (``occurrence__date``, ``dose_number__int`` ...).
2. :func:`check` runs a pandera schema (polars backend, ``lazy=True``) whose
   checks are built from :mod:`schemas.limits` through the canonical fields,
   so every failure of every row is collected, each named by a stable code.

Failures become rows of a rejects frame (``__row, code, field, value,
message``); rows without any are valid.
"""

from __future__ import annotations

import datetime as dt
import functools
import re
import zlib
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Literal

import polars as pl
import polars.selectors as cs

from etl import lazy_numpy
from etl.files import first_byte_in
from etl.hl7 import ACTION_COLUMN, SUPERSEDED_COLUMN, amends, deleted, superseded
from etl.keyindex import KeyIndex
from etl.mapping import SKIP, ColumnParse, Mapped, key_field
from etl.readers import ROW, Notice
from etl.rules import PLACEHOLDERS, REDACTION_MARKERS, RULES, Rule, explain, format_text, severity_of
from schemas.canonical import ENCOUNTER_CLASS_WORDS, CanonicalField, field_map, fields_of
from schemas.codes import CVX_SYSTEM, WARNED_STATUSES, displays, names, spellings, statuses
from schemas.limits import FORMAT_PATTERNS, spec_at

if TYPE_CHECKING:  # pandera is imported when a batch has a failing row: a clean file never waits for it
    import pandera.polars as pa
    from pandera.api.polars.types import PolarsData

__all__ = ["REJECT_SCHEMA", "Carry", "Validation", "check", "name_key", "prepare", "validate", "warm_up"]

#: Columns of every rejects / warnings frame.
REJECT_SCHEMA = {ROW: pl.UInt32, "code": pl.String, "field": pl.String, "value": pl.String, "message": pl.String}

_DT = pl.Datetime("us")
_EMAIL = FORMAT_PATTERNS["email"]
_TRUE = ("true", "yes", "y", "1", "t")
_FALSE = ("false", "no", "n", "0", "f")
_GENDER = {"m": "male", "f": "female", "u": "unknown", "o": "other", "unk": "unknown"}
_STATUS = {"complete": "completed", "given": "completed", "administered": "completed", "not-given": "not-done"}
_EXCEL_EPOCH = dt.datetime(1899, 12, 30)


@dataclass
class Validation:
    """The outcome of validating one mapped table."""

    mapped: Mapped
    prepared: pl.DataFrame  # every row, normalised and parsed
    rejects: pl.DataFrame  # one row per failure (a row may fail several rules)
    warnings: pl.DataFrame  # same shape; the row stays valid

    _valid: tuple[pl.DataFrame, pl.DataFrame, pl.DataFrame] | None = field(
        default=None, init=False, repr=False, compare=False
    )

    @property
    def valid(self) -> pl.DataFrame:
        """Prepared rows with no rejection (kept until ``prepared`` or ``rejects`` is replaced: a batch's
        steps each read it, and filtering the wide frame again for each would copy it each time)."""
        if self.rejects.is_empty():
            return self.prepared
        kept = self._valid
        if kept is not None and kept[0] is self.prepared and kept[1] is self.rejects:
            return kept[2]
        valid = self.prepared.filter(~pl.col(ROW).is_in(self.rejects.get_column(ROW).unique().implode()))
        self._valid = (self.prepared, self.rejects, valid)
        return valid

    @property
    def rejected_rows(self) -> int:
        """How many rows have at least one rejection."""
        return self.rejects.get_column(ROW).n_unique()


@dataclass
class Carry:
    """What the rules that compare rows learn from one batch of a file and the later batches need.

    A file validated in batches is checked as if whole: a record id is a duplicate when any earlier
    batch had it, and a patient's details are compared with the first row that described the patient,
    whichever batch it was in. Patient details are kept as 64-bit hashes, so the memory this takes
    grows with the number of patients, not with the size of their rows.
    """

    record_ids: KeyIndex = field(default_factory=KeyIndex)
    patients: KeyIndex | None = None  # patient id -> one hash per compared detail


def validate(
    mapped: Mapped, *, today: dt.date | None = None, carry: Carry | None = None, prepared: pl.DataFrame | None = None
) -> Validation:
    """Prepare and check a mapped table (or one batch of it, with the ``carry`` of the batches before).

    ``prepared`` is ``prepare(mapped)`` when the caller has it already (it needs no carry, so batches
    prepare ahead on another thread).
    """
    today = today or dt.date.today()
    severity = mapped.profile.rules
    prepared = prepare(mapped, today=today) if prepared is None else prepared
    if SKIP in prepared.columns:  # rows a profile's [[skip]] leaves out are not checked, nor compared with others
        prepared = prepared.filter(pl.col(SKIP).is_null())
    prepared = _compared_across_rows(prepared, mapped.kind, carry or Carry())
    rejects = check(prepared, mapped.kind, today=today, severity=severity)
    prepared = prepared.drop(cs.starts_with(_LOCAL_FLAG))  # precheck's outcomes, read by check
    if mapped.kind == "document":
        rejects = _document_groups(prepared, rejects)
    rejects = with_source_values(rejects, mapped)
    if mapped.table.format == "hl7":
        rejects = _amended_in_source(mapped, rejects)
    warnings = with_source_values(_warnings(prepared, mapped.kind, today, severity), mapped)
    return Validation(mapped, prepared, rejects, warnings)


def _amended_in_source(mapped: Mapped, rejects: pl.DataFrame) -> pl.DataFrame:
    """An HL7 table's rejects, with what its action codes (RXA-21, :mod:`etl.hl7`) say first.

    A dose the sender deleted (``D``), or that a later message of the file updates or deletes, comes
    first among its row's outcomes: the report skips it (a deleted one is rejected instead when the
    profile's ``hl7_deletes`` says so), whatever else it holds. An update or delete repeats the
    record id of the dose it amends: that is not a duplicate. A dose without a record id (ORC-3) is
    rejected as ``required``.
    """
    frame = mapped.table.frame
    outcomes = []
    later = superseded()
    for rule, which in ((RULES["deleted-in-source"], deleted()), (RULES["superseded-in-source"], later)):
        outcomes.append(
            frame.filter(which).select(
                pl.col(ROW).cast(pl.UInt32),
                pl.lit(rule.code).alias("code"),
                pl.lit(ACTION_COLUMN).alias("field"),
                pl.col(ACTION_COLUMN).alias("value"),
                (rule.message(line=pl.col(SUPERSEDED_COLUMN)) if which is later else pl.lit(rule.text())).alias(
                    "message"
                ),
            )
        )
    if mapped.keyed_by_record:
        # A dose is keyed by its ORC-3; one without (no ORC, or an empty ORC-3) could not be told
        # apart from a re-sent copy, so it is rejected rather than sent unkeyed.
        required = RULES["required"]
        outcomes.append(
            mapped.frame.filter(pl.col("record_id").str.strip_chars().fill_null("") == "").select(
                pl.col(ROW).cast(pl.UInt32),
                pl.lit(required.code).alias("code"),
                pl.lit("record_id").alias("field"),
                pl.lit(None, dtype=pl.String).alias("value"),
                pl.lit(required.text()).alias("message"),
            )
        )
    amending = frame.filter(amends()).get_column(ROW).cast(pl.UInt32).implode()
    not_duplicates = (pl.col("code") == RULES["duplicate-key"].code) & pl.col(ROW).is_in(amending)
    return pl.concat([*outcomes, rejects.filter(~not_duplicates)]).unique([ROW, "code", "field"], maintain_order=True)


# --- step 1: prepare ---------------------------------------------------------


def _blank_to_null(e: pl.Expr) -> pl.Expr:
    """A trimmed cell, or null when it is empty."""
    return pl.when(e.str.len_bytes() > 0).then(e)


def _normalise(f: CanonicalField, e: pl.Expr, values: Mapping[str, str] | None = None) -> pl.Expr:
    if values:
        # The profile's own words for this field win over the built-in spellings; a word mapped to "" is no
        # value (the field is left out, as for an empty cell), not an empty text.
        lowered = {k.strip().lower(): (v if v.strip() else None) for k, v in values.items()}
        e = e.str.to_lowercase().replace_strict(lowered, default=e, return_dtype=pl.String)
    if f.normaliser is None:
        return e
    low = e.str.to_lowercase()
    if f.normaliser == "lower":
        return low
    if f.normaliser == "upper":
        return e.str.to_uppercase()
    if f.normaliser == "encounter_class":
        words = {**ENCOUNTER_CLASS_WORDS, **{k.lower(): v for k, v in (values or {}).items()}}
        return low.str.replace_all(r"[\s_-]+", " ").replace_strict(words, default=e, return_dtype=pl.String)
    if f.normaliser == "mvx":
        mvx = displays("mvx")
        return e.str.to_uppercase().replace_strict(mvx, default=e, return_dtype=pl.String)
    if f.normaliser == "gender":
        return low.replace(_GENDER)
    if f.normaliser == "status":
        return low.str.replace_all(r"[\s_]+", "-").replace(_STATUS)
    if f.normaliser == "cvx":
        # Excel stores CVX 08 as the number 8; some exports write 8.0.
        digits = e.str.replace(r"^(\d+)\.0+$", "$1")
        return pl.when(digits.str.contains(r"^\d+$")).then(digits.str.zfill(2)).otherwise(e)
    table = spellings(f.normaliser)  # route / site: one spelling per code, else as written
    return low.str.replace_all(r"\s+", " ").replace_strict(table, default=e, return_dtype=pl.String)


def _normalised(
    frame: pl.DataFrame, fields: list[CanonicalField], values: Mapping[str, Mapping[str, str]]
) -> pl.DataFrame:
    """``frame`` with each of ``fields`` normalised (:func:`_normalise`).

    Coded columns (route, site, status, vaccine code ...) hold a few distinct values in many rows:
    each distinct value is normalised once and the rows are mapped to the outcome, which is cheaper
    than lower-casing and rewriting every cell. A column of mostly distinct values is normalised whole.
    """
    if not fields:
        return frame
    distinct = frame.select(pl.col(f.name).drop_nulls().unique().implode() for f in fields).row(0, named=True)
    mapped: list[pl.Expr] = []
    for f in fields:
        e = _normalise(f, pl.col(f.name), values.get(f.name))
        few = distinct[f.name]
        if len(few) * 4 > frame.height:
            mapped.append(e.alias(f.name))
            continue
        outcome = pl.DataFrame({f.name: few}, schema={f.name: pl.String}).select(e).to_series()
        if outcome.equals(pl.Series(f.name, few, dtype=pl.String)):  # written the normal way already
            continue
        mapped.append(
            pl.col(f.name).replace_strict(few, outcome, default=None, return_dtype=pl.String).alias(f.name)
        )
    return frame.with_columns(mapped) if mapped else frame


def _declared(s: pl.Expr, formats: tuple[str, ...], aware: bool) -> list[pl.Expr]:
    """A profile's own patterns for a column (``[parse.<field>] format``): the ones with an offset
    (``%z``) give UTC, the others a naive local date-time."""
    out = []
    for fmt in formats:
        if ("%z" in fmt or "%:z" in fmt) != aware:
            continue
        dtype = pl.Datetime("us", "UTC") if aware else _DT
        parsed = s.str.strptime(dtype, fmt, strict=False, exact=True)
        out.append(parsed.dt.replace_time_zone(None) if aware else parsed)
    return out


def _parse_naive(s: pl.Expr, excel: bool, formats: tuple[str, ...] = ()) -> pl.Expr:
    """A naive local date-time from the profile's patterns for the column, then the usual spellings, or null."""
    forms = [
        *_declared(s, formats, aware=False),
        s.str.strptime(_DT, "%Y-%m-%d", strict=False, exact=True),
        s.str.strptime(_DT, "%Y-%m-%d %H:%M:%S%.f", strict=False, exact=True),
        s.str.strptime(_DT, "%Y-%m-%dT%H:%M:%S%.f", strict=False, exact=True),
        s.str.strptime(_DT, "%Y-%m-%dT%H:%M", strict=False, exact=True),
        s.str.strptime(_DT, "%m/%d/%Y", strict=False, exact=True),
        s.str.strptime(_DT, "%Y%m%d", strict=False, exact=True),
    ]
    if excel:
        # A date typed as a number in Excel arrives as its serial (days since 1899-12-30).
        serial = pl.when(s.str.contains(r"^\d{1,7}(\.\d+)?$")).then(s.cast(pl.Float64, strict=False))
        in_range = (serial >= 1) & (serial < 2958466)
        millis = (serial * 86_400_000).round(0).cast(pl.Int64)
        forms.append(pl.when(in_range).then(pl.lit(_EXCEL_EPOCH) + pl.duration(milliseconds=millis)))
    return pl.coalesce(forms)


def _parse_aware(s: pl.Expr, formats: tuple[str, ...] = ()) -> pl.Expr:
    """A UTC date-time from a spelling with an offset or Z, or null."""
    usual = (
        s.str.replace(r"[zZ]$", "+00:00")
        .str.strptime(pl.Datetime("us", "UTC"), "%Y-%m-%dT%H:%M:%S%.f%#z", strict=False, exact=True)
        .dt.replace_time_zone(None)
    )
    return pl.coalesce(*_declared(s, formats, aware=True), usual)


def _iso_naive(s: pl.Expr) -> pl.Expr:
    """The ISO spellings most exports use: the first forms :func:`_parse_naive` tries."""
    return pl.coalesce(
        s.str.strptime(_DT, "%Y-%m-%d", strict=False, exact=True),
        s.str.strptime(_DT, "%Y-%m-%dT%H:%M:%S%.f", strict=False, exact=True),
        s.str.strptime(_DT, "%Y-%m-%d %H:%M:%S%.f", strict=False, exact=True),
    )


Spelling = Literal["date", "iso", "any"]


def _spellings(
    frame: pl.DataFrame, names: list[str], excel: bool, plain: Mapping[str, int] | None = None
) -> dict[str, tuple[Spelling, bool]]:
    """How each date column is written, in one pass over the frame, and whether to retry its misses.

    ``date``: every value is a plain ``YYYY-MM-DD`` date; ``iso``: ISO dates or local date-times;
    ``any``: anything else, so every spelling :func:`_parse_naive` and :func:`_parse_aware` know
    is tried. Trying them all on a million rows is most of the time validation takes, and a
    registry export nearly always writes its dates one ISO way. The flag says the column is
    *mostly* written the first way, and the few values it misses (a typo, a US date in an ISO
    column) are to be parsed again every way (:func:`_retried`). ``plain``: each column's values that are not
    a plain date, when the caller counted them (:func:`_plain_misses`).
    """
    if excel or not names:
        return {n: ("any", False) for n in names}

    def misses(parsed: pl.Expr, name: str) -> pl.Expr:
        return (pl.col(name).is_not_null() & parsed.is_null()).sum()

    # Plain dates first: the ISO date-time spellings are tried only on columns where that fails.
    few = max(1, frame.height // _RETRY_SHARE)
    if plain is None:
        plain = frame.select(misses(_plain_date(pl.col(n)), n).alias(n) for n in names).row(0, named=True)
    others = [n for n in names if plain[n] >= few]
    iso = frame.select(misses(_iso_naive(pl.col(n)), n).alias(n) for n in others).row(0, named=True) if others else {}
    out: dict[str, tuple[Spelling, bool]] = {}
    for n in names:
        if plain[n] < few:
            out[n] = ("date", plain[n] > 0)
        else:
            out[n] = ("iso", iso[n] > 0) if iso[n] < few else ("any", False)
    return out


#: A column parsed one way, its misses again every way, when fewer than one value in this many missed.
_RETRY_SHARE = 20


def _plain_misses(prepared: pl.DataFrame, names: list[str]) -> dict[str, int]:
    """Each date column's values that its ``__date`` companion, parsed as a plain date (the ``date`` spelling),
    left unparsed: what :func:`_spellings` counts first, read off the parse the batch made anyway."""
    missed = [(pl.col(n).is_not_null() & pl.col(f"{n}__date").is_null()).sum().alias(n) for n in names]
    return prepared.select(missed).row(0, named=True) if names else {}


def _plain_date(s: pl.Expr) -> pl.Expr:
    """A ``YYYY-MM-DD`` date exactly as written (so writing it back out gives the same text), or null."""
    return pl.when(s.str.len_bytes() == 10).then(s.str.to_date("%Y-%m-%d", strict=False))


def _temporal_columns(
    f: CanonicalField, s: pl.Expr, excel: bool, tz: str, spelling: Spelling = "any", formats: tuple[str, ...] = ()
) -> list[pl.Expr]:
    """Parsed companions of a date or date-time column, for a column written as ``spelling``
    (``formats``: the profile's own patterns for it, tried first)."""
    if spelling == "date":
        date = _plain_date(s)
        cols = [date.alias(f"{f.name}__date")]
        if f.value == "datetime":  # a date alone is midnight where the profile's zone says
            local = date.cast(_DT).dt.replace_time_zone(tz, ambiguous="earliest", non_existent="null")
            cols.append(local.dt.convert_time_zone("UTC").dt.replace_time_zone(None).alias(f"{f.name}__instant"))
        return [*cols, s.alias(f"{f.name}__out")]
    only_iso = spelling == "iso"
    if only_iso:
        naive, aware = _iso_naive(s), pl.lit(None, dtype=_DT)
    else:
        naive, aware = _parse_naive(s, excel, formats), _parse_aware(s, formats)
    date = pl.coalesce(aware.dt.date(), naive.dt.date())
    if f.value == "date":
        out = date.dt.strftime("%Y-%m-%d")
        if only_iso:
            return [date.alias(f"{f.name}__date"), out.alias(f"{f.name}__out")]
        # A year and month alone (CVRS allows it for birth dates) is a valid FHIR date: keep it as written,
        # and compare with the first of the month.
        partial = s.str.contains(r"^\d{4}-(0[1-9]|1[0-2])$")
        date = pl.coalesce(date, pl.when(partial).then((s + "-01").str.to_date("%Y-%m-%d", strict=False)))
        out = pl.when(partial).then(s).otherwise(date.dt.strftime("%Y-%m-%d"))
        return [date.alias(f"{f.name}__date"), out.alias(f"{f.name}__out")]
    # A date with no time of day stays a date (FHIR allows it, and an Excel
    # date cell reads as midnight); a local time gets the profile's zone.
    local = naive.dt.replace_time_zone(tz, ambiguous="earliest", non_existent="null")
    utc = pl.coalesce(aware, local.dt.convert_time_zone("UTC").dt.replace_time_zone(None))
    midnight = naive.dt.time() == dt.time(0)
    out = (
        pl.when(aware.is_null() & midnight)
        .then(naive.dt.strftime("%Y-%m-%d"))
        .otherwise(utc.dt.strftime("%Y-%m-%dT%H:%M:%SZ"))
    )
    cols = [date.alias(f"{f.name}__date"), utc.alias(f"{f.name}__instant")]
    return [*cols, out.alias(f"{f.name}__out")]


def prepare(mapped: Mapped, *, today: dt.date | None = None) -> pl.DataFrame:
    """Trim, default, normalise and parse every canonical column, whole frame at once.

    ``today`` (default: the date now) bounds a two-digit birth year (:func:`_two_digit_years`).
    """
    profile, excel = mapped.profile, mapped.table.format == "xlsx"
    today = today or dt.date.today()
    fields = fields_of(mapped.kind)
    # Stripped once, then blanks made null: one expression doing both strips every cell twice.
    skip = [pl.col(SKIP)] if SKIP in mapped.frame.columns else []
    trimmed = mapped.frame.select(
        pl.col(ROW), *[pl.col(f.name).str.strip_chars() for f in fields], *skip
    ).with_columns(_blank_to_null(pl.col(f.name)).alias(f.name) for f in fields)
    trimmed = _placeholders_absent(trimmed, fields, profile.redacted, profile.placeholders)
    trimmed = _lost_leading_zeros(trimmed, mapped.kind, excel).pipe(_zip_plus_four, mapped.kind)
    if not excel:  # a column declared `excel_serial = true` is read as serials below: a repair it asked for
        undeclared = tuple(f for f in fields if not profile.parse.get(f.name, ColumnParse()).excel_serial)
        trimmed = _serial_dates(trimmed, undeclared)
    trimmed = _two_digit_years(trimmed, mapped.kind, today)
    defaulted = trimmed.with_columns(
        pl.col(name).fill_null(pl.lit(value)) for name, value in profile.defaults.items() if name in trimmed.columns
    )
    normalised = _normalised(defaulted, [f for f in fields if f.normaliser or f.name in profile.values], profile.values)
    normalised = normalised.pipe(_derive, mapped.kind).pipe(_scientific_ids, _id_fields(fields))
    typed: list[pl.Expr] = []
    temporal = [f.name for f in fields if f.value in ("date", "datetime")]
    parse = profile.parse
    declared = [n for n in temporal if n in parse and (parse[n].formats or parse[n].excel_serial)]
    # A CSV's date columns are parsed as plain dates, as nearly every export writes them; a column that turns out
    # to be written otherwise is parsed again, as _spellings says, below. (Counting each column's plain dates
    # first was a parse of its own: a tenth of what preparing a batch cost.)
    guessed = [] if excel else [n for n in temporal if n not in declared]
    spellings: dict[str, tuple[Spelling, bool]] = dict.fromkeys(temporal, ("any", False))
    spellings.update(dict.fromkeys(guessed, ("date", False)))  # a declared pattern is tried before the usual ones
    commas = _decimal_commas(mapped, normalised, [f.name for f in fields if f.value == "number"])
    tidy = _tidy_lists(normalised, [f.name for f in fields if f.value == "list"], profile.list_separator)
    # A column of ISO dates with a few odd ones (a realistic export: a typo, a US date) is parsed the
    # ISO way whole, and every spelling is tried on the rows that missed only (trying them all on
    # every row is most of what a batch costs). Both give the same value where the ISO way parses.
    retried: list[tuple[CanonicalField, str]] = []

    def zone(f: CanonicalField) -> str:
        return parse.get(f.name, ColumnParse()).timezone or profile.timezone

    def temporal_columns(f: CanonicalField, spelling: Spelling) -> list[pl.Expr]:
        own = parse.get(f.name, ColumnParse())
        return _temporal_columns(f, pl.col(f.name), excel or own.excel_serial, zone(f), spelling, own.formats)

    for f in fields:
        s = pl.col(f.name)
        if f.value in ("date", "datetime"):
            typed += temporal_columns(f, spellings[f.name][0])
        elif f.value == "integer":
            # polars' own parse takes exactly [+-]digits (no spaces, separators or other scripts).
            whole = s.cast(pl.Int64, strict=False)
            if excel:  # a number cell: 3 reads as 3.0
                point = pl.when(s.str.contains(r"^[+-]?\d+\.0+$")).then(s.str.replace(r"\.0+$", ""))
                whole = pl.coalesce(whole, point.cast(pl.Int64, strict=False))
            typed.append(whole.alias(f"{f.name}__int"))
        elif f.value == "number":
            if f.name in commas:  # "0,5" is 0.5: the decimal comma of a European export
                s = s.str.replace(r"^([+-]?\d*),(\d+)$", "$1.$2")
            num = s.cast(pl.Float64, strict=False)
            typed.append(pl.when(num.is_finite()).then(num).alias(f"{f.name}__num"))
        elif f.value == "boolean":
            low = s.str.to_lowercase()
            typed.append(
                pl.when(low.is_in(_TRUE)).then(True).when(low.is_in(_FALSE)).then(False).alias(f"{f.name}__bool")
            )
        elif f.value == "list":
            typed.append(_items(s, profile.list_separator, tidy[f.name]).alias(f"{f.name}__list"))
    # Lazy, so what a date's companions share (its parse) is evaluated once: the eager engine leaves
    # common subexpressions alone. A batch's queries run on the in-memory engine: polars' default
    # (streaming) engine costs three times as much per query at this size, and cuts its output into
    # chunks that every later step pays to join again.
    prepared = normalised.lazy().with_columns(typed).collect(engine="in-memory")
    if guessed:
        by_name = field_map(mapped.kind)
        found = _spellings(normalised, guessed, excel, plain=_plain_misses(prepared, guessed))
        retried += [(by_name[n], zone(by_name[n])) for n in guessed if found[n][1]]
        again = [by_name[n] for n in guessed if found[n][0] != "date"]  # written another way: parsed again
        if again:
            prepared = prepared.lazy().with_columns(
                c for f in again for c in temporal_columns(f, found[f.name][0])
            ).collect(engine="in-memory")
    prepared = _retried(prepared, retried)
    if mapped.kind == "encounter":
        # lengthMinutes from the period when the source leaves it out.
        minutes = (pl.col("period_end__instant") - pl.col("period_start__instant")).dt.total_minutes()
        prepared = prepared.with_columns(
            _derived(field_map("encounter")["length_minutes"], pl.col("length_minutes__int"), minutes)
        )
    if mapped.keyed_by_record and mapped.kind != "practitioner":  # a practitioner falls back on its NPI
        # Rows of a file with a record-id column are keyed by it: a row without one is rejected as
        # `required` (keyed otherwise, it would be created again once its id is filled in).
        prepared = prepared.with_columns(pl.lit(True).alias(f"{key_field(mapped.kind)}{_KEYED}"))
    demographics = _demographics(field_map(mapped.kind))
    if demographics:
        # What the patient-conflict rule compares, hashed here (ahead, on the read-ahead thread).
        prepared = prepared.with_columns(_compared(f).hash().alias(f"__hash_{f.name}") for f in demographics)
    return prepared.with_columns(_batch_firsts(prepared.columns, demographics))


_FIRST_RECORD = "__batch_first_record"  # the batch's first row of its record id
_FIRST_PATIENT = "__batch_first_patient"  # the batch's first row of its patient, among rows with details to compare


def _batch_firsts(columns: list[str], demographics: list[CanonicalField]) -> list[pl.Expr]:
    """Which rows are the batch's first of their record id and of their patient (rows a profile skips left
    out): what the checks against the batches before (:func:`_compared_across_rows`) start from, flagged
    by :func:`prepare`, ahead on its thread, rather than on the thread that checks the batches in turn."""
    kept = pl.col(SKIP).is_null() if SKIP in columns else pl.lit(True)
    flags = []
    if "record_id" in columns:
        flags.append((pl.when(kept).then(pl.col("record_id")).is_first_distinct() & kept).alias(_FIRST_RECORD))
    if demographics:
        has = kept & pl.col("patient_id").is_not_null() & _carries_details(demographics)
        flags.append((pl.when(has).then(pl.col("patient_id")).is_first_distinct() & has).alias(_FIRST_PATIENT))
    return flags


def _retried(prepared: pl.DataFrame, retried: list[tuple[CanonicalField, str]]) -> pl.DataFrame:
    """``prepared`` with the date columns parsed the ISO way (``retried``: each field and its zone) parsed
    again, every spelling tried, on the rows where the ISO way left a value unparsed."""
    if not retried:
        return prepared
    missed = prepared.select(
        pl.any_horizontal(pl.col(f.name).is_not_null() & pl.col(f"{f.name}__date").is_null() for f, _ in retried)
    ).to_series()
    at = missed.arg_true()  # the rows' positions: their parses go back where they came from
    if at.is_empty():
        return prepared
    again = (
        prepared.select(f.name for f, _ in retried)  # the few columns read, not the wide batch, filtered
        .filter(missed)
        .lazy()  # lazy: each spelling is tried once for the three companions that read it
        .select(c for f, tz in retried for c in _temporal_columns(f, pl.col(f.name), False, tz, "any"))
        .collect(engine="in-memory")
    )
    return prepared.with_columns(prepared.get_column(c).scatter(at, again.get_column(c)) for c in again.columns)


#: The companion column (``record_id__keyed``) that says a file's rows are keyed by this field: required.
_KEYED = "__keyed"

_DECIMAL_COMMA = r"^[+-]?\d*,\d+$"


def _decimal_commas(mapped: Mapped, frame: pl.DataFrame, names: list[str]) -> set[str]:
    """The number columns whose comma is a decimal point.

    A column the profile declares (``decimal_comma``, per column in ``[parse.<field>]`` or for the
    whole file), and, when the profile says nothing, a column of a ``;``-delimited file whose values
    have a comma and never a point (``0,5``), told once in the file's notices.
    """
    profile, out, guess = mapped.profile, set(), []
    for name in names:
        own = profile.parse.get(name, ColumnParse()).decimal_comma
        declared = own if own is not None else profile.decimal_comma
        if declared:
            out.add(name)
        elif declared is None and mapped.table.delimiter == ";":
            guess.append(name)
    if guess:
        found = frame.select(
            (pl.col(n).str.contains(_DECIMAL_COMMA).any() & ~pl.col(n).str.contains(r"\.").any()).alias(n)
            for n in guess
        ).row(0, named=True)
        for name in (n for n in guess if found[n]):
            out.add(name)
            rule, column = RULES["decimal-comma"], mapped.source_column(name)
            if not any(n.code == rule.code and n.column == column for n in mapped.table.notices):
                mapped.table.notices.append(Notice(rule.code, rule.text(column=column), str(mapped.table.path),
                                                   row=1, column=column))
    return out


# --- value hazards: placeholders, lost zeros, serial numbers, two-digit years ---------------


@functools.lru_cache(maxsize=64)
def _word_series(words: tuple[str, ...]) -> pl.Series:
    """:func:`_case_variants` of ``words`` as what ``is_in`` takes, made once: a Python list is made a series
    at every call (every column of every batch). One list of them (``implode``): ``is_in`` with a plain
    series of the column's type is deprecated, and warns at every call."""
    return pl.Series(_case_variants(words), dtype=pl.String).implode()


def _case_variants(words: Iterable[str]) -> list[str]:
    """Each word as exports write it (``unk``, ``UNK``, ``Unk``): compared exactly, no cell is lower-cased."""
    return sorted({v for w in words for v in (w.lower(), w.upper(), w.capitalize(), w.title())})


def _placeholders_absent(
    frame: pl.DataFrame, fields: tuple[CanonicalField, ...], redacted: Iterable[str], extra: Iterable[str] = ()
) -> pl.DataFrame:
    """Placeholder cells (:data:`etl.rules.PLACEHOLDERS`, and the profile's own) made empty.

    A cell holding a redaction marker (:data:`etl.rules.REDACTION_MARKERS`, and the profile's
    ``redacted``) also sets ``<field>__redacted``, so a field a payload needs reports ``redacted``.
    A field whose own values include such a word (sex ``UNK`` is "unknown") keeps it.
    """
    markers = _word_series((*REDACTION_MARKERS, *redacted))
    every = _word_series((*PLACEHOLDERS, *redacted, *extra))
    # "Na" and "Nil" are family names too: in a name column only the other words are placeholders.
    in_names = _word_series((*(w for w in PLACEHOLDERS if w not in _NAMES_TOO), *redacted, *extra))
    words = {f.name: in_names if f.name.endswith("_name") else every for f in fields if f.normaliser != "gender"}
    if not words:
        return frame
    found = frame.select(pl.col(n).is_in(w).any().alias(n) for n, w in words.items()).row(0, named=True)
    hit = [n for n in words if found[n]]
    if not hit:
        return frame
    withheld = frame.select(pl.col(n).is_in(markers).any().alias(n) for n in hit).row(0, named=True)
    return frame.with_columns(
        *[pl.col(n).is_in(markers).fill_null(False).alias(f"{n}__redacted") for n in hit if withheld[n]],
        *[pl.col(n).is_in(words[n]).fill_null(False).alias(f"{n}__placeholder") for n in hit],
        *[pl.when(~pl.col(n).is_in(words[n])).then(pl.col(n)).alias(n) for n in hit],
    )


_NAMES_TOO = ("na", "nil")


#: States whose ZIP codes start with zeros: how many (Puerto Rico and the Virgin Islands: 006xx-009xx).
_ZERO_ZIP_STATES = {
    **dict.fromkeys(("CT", "MA", "ME", "NH", "NJ", "RI", "VT", "AE"), 1),
    **dict.fromkeys(("connecticut", "massachusetts", "maine", "new hampshire", "new jersey", "rhode island"), 1),
    "vermont": 1,
    **dict.fromkeys(("PR", "VI", "puerto rico", "virgin islands"), 2),
}
_ZIP = r"^\d{5}(-\d{4})?$"
_US = ("us", "usa", "u.s.", "u.s.a.", "united states", "united states of america")


def _lost_leading_zeros(frame: pl.DataFrame, kind: str, excel: bool) -> pl.DataFrame:
    """CVX codes and ZIP codes that a spreadsheet turned into numbers, their zeros put back where certain.

    A one-digit CVX code (``8``) is padded (the normaliser does it) and, in a text file, flagged in
    ``vaccine_code__zero`` (a workbook's number cell is read as the number it is). A ZIP code of 4
    (3) digits in a state whose codes start with 0 (00) is padded and flagged in ``<zip>__zero``;
    elsewhere it is left for the ZIP rule to reject.
    """
    fields = field_map(kind)
    added: list[pl.Expr] = []
    zips = [p for p in ("patient", "practitioner") if f"{p}_postal_code" in fields and f"{p}_state" in fields]
    # First a look at lengths only (cheap): a one-digit code (or 8.0), a ZIP of 3, 4, 8 or 9 characters.
    short = (pl.col("vaccine_code").str.len_bytes() == 1) | pl.col("vaccine_code").str.contains(".", literal=True)
    probes = ([short.any().alias("vaccine_code")] if "vaccine_code" in fields and not excel else []) + [
        pl.col(f"{p}_postal_code").str.len_bytes().is_in([3, 4, 8, 9]).any().alias(p) for p in zips
    ]
    if not probes:
        return frame
    seen = frame.select(probes).row(0, named=True)
    if seen.get("vaccine_code"):
        code = pl.col("vaccine_code")
        padded = code.str.replace(r"^(\d)(\.0+)?$", "0$1")
        lost = code.str.contains(r"^\d(\.0+)?$") & padded.is_in(list(displays("cvx")))
        added.append(pl.when(lost.fill_null(False)).then(padded).alias("vaccine_code__zero"))
    for prefix in (p for p in zips if seen[p]):
        name, state = f"{prefix}_postal_code", f"{prefix}_state"
        zip_ = pl.col(name)
        zeros = (
            pl.col(state)
            .str.to_uppercase()
            .replace_strict({k.upper(): v for k, v in _ZERO_ZIP_STATES.items()}, default=None, return_dtype=pl.Int64)
        )
        digits = zip_.str.extract(r"^(\d{3,4})(-\d{4})?$", 1)
        lost = (digits.str.len_bytes() + zeros) == 5
        fixed = pl.when(zeros == 2).then("00" + zip_).otherwise("0" + zip_)
        added.append(pl.when(lost.fill_null(False)).then(fixed).alias(f"{name}__zero"))
    if not added:
        return frame
    flagged = frame.with_columns(added)
    zero_columns = [c for c in flagged.columns if c.endswith("__zero")]
    if not flagged.select(pl.any_horizontal(pl.col(c).is_not_null().any() for c in zero_columns)).item():
        return frame
    return flagged.with_columns(
        pl.coalesce(pl.col(c), pl.col(c.removesuffix("__zero"))).alias(c.removesuffix("__zero")) for c in zero_columns
    )


def _zip_plus_four(frame: pl.DataFrame, kind: str) -> pl.DataFrame:
    """A ZIP+4 written as nine digits (``021341234``: Synthea's providers, many registries) in its
    documented spelling, ``02134-1234``: the same code, not a format error."""
    names = [n for n in ("patient_postal_code", "practitioner_postal_code") if n in field_map(kind)]
    if not names:
        return frame
    seen = frame.select((pl.col(n).str.len_bytes() == 9).any().alias(n) for n in names).row(0, named=True)
    return frame.with_columns(pl.col(n).str.replace(r"^(\d{5})(\d{4})$", "$1-$2") for n in names if seen[n])


def _any_match(frame: pl.DataFrame, names: list[str], pattern: str, lengths: tuple[int, int]) -> dict[str, bool]:
    """Whether any cell of each column matches ``pattern``, its ``\\d`` taken as ASCII digits, which only texts of
    ``lengths`` bytes (from, to) can.

    The pattern is searched for in those cells only (a cell's length is read from its header, and a date column
    seldom holds a cell of such a length): a fifth of what searching every cell costs. Other scripts' digits
    are left out, as polars' number parse leaves them: such a cell was never rewritten as a serial or a year."""
    lo, hi = lengths
    ascii_pattern = f"(?-u){pattern}"
    return frame.select(
        pl.col(n).filter(pl.col(n).str.len_bytes().is_between(lo, hi)).str.contains(ascii_pattern).any().alias(n)
        for n in names
    ).row(0, named=True)


#: Excel serial numbers read in a text file's date column: 1920-01-01 (7306) to 2099-12-31 (73050).
#: Below, a 4-digit number is more likely a year than a date; a serial is never more than 5 digits.
SERIAL_RANGE = (7306, 73050)


def _serial_dates(frame: pl.DataFrame, fields: tuple[CanonicalField, ...]) -> pl.DataFrame:
    """Excel serial numbers in a text file's date columns, rewritten as ISO dates and flagged in ``<field>__serial``."""
    names = [f.name for f in fields if f.value in ("date", "datetime")]
    if not names:
        return frame
    shaped, _ = _SERIAL_SHAPE
    found = _any_match(frame, names, *_SERIAL_SHAPE)
    hit = [n for n in names if found[n]]
    if not hit:
        return frame
    low, high = SERIAL_RANGE

    def iso(n: str) -> pl.Expr:
        serial = pl.when(pl.col(n).str.contains(shaped)).then(pl.col(n).cast(pl.Int64, strict=False))
        days = pl.when((serial >= low) & (serial <= high)).then(serial)
        return (pl.lit(_EXCEL_EPOCH.date()) + pl.duration(days=days)).dt.strftime("%Y-%m-%d")

    return frame.with_columns(iso(n).alias(f"{n}__serial") for n in hit).with_columns(
        pl.coalesce(pl.col(f"{n}__serial"), pl.col(n)).alias(n) for n in hit
    )


_TWO_DIGIT_YEAR = r"^(\d{1,2})[/-](\d{1,2})[/-](\d{2})$"
#: What an Excel serial and a two-digit year look like: the pattern, and the lengths (in bytes) it can match.
_SERIAL_SHAPE = (r"^\d{4,5}$", (4, 5))
_TWO_DIGIT_SHAPE = (_TWO_DIGIT_YEAR, (6, 8))
_BIRTH = "patient_birth_date"


def _two_digit_years(frame: pl.DataFrame, kind: str, today: dt.date) -> pl.DataFrame:
    """US dates with a two-digit year (``2/14/24``) given their century, never year 0024.

    A birth year is the latest that is neither after ``today`` nor after the row's event date
    (the dose's date); any other date's year is the one nearest the median year of the column's
    four-digit dates (today's year when it has none). ``<field>__yy`` holds the year chosen, for the
    warning; a birth date with no reading from 1900 on is left unread, ``<field>__yy`` -1.
    """
    fields = field_map(kind)
    names = [n for n, f in fields.items() if f.value in ("date", "datetime")]
    if not names:
        return frame
    found = _any_match(frame, names, *_TWO_DIGIT_SHAPE)
    hit = [n for n in names if found[n]]
    if not hit:
        return frame
    events = [n for n in hit if n != _BIRTH]
    medians = frame.select(
        pl.col(n).str.extract(r"(?:^|\D)((?:19|20)\d{2})(?:\D|$)", 1).cast(pl.Int32).median().alias(n)
        for n in events
    ).row(0, named=True) if events else {}

    def parts(n: str) -> tuple[pl.Expr, pl.Expr, pl.Expr]:
        return tuple(pl.col(n).str.extract(_TWO_DIGIT_YEAR, i) for i in (1, 2, 3))  # type: ignore[return-value]

    def rewritten(n: str, year: pl.Expr) -> pl.Expr:
        month, day, _ = parts(n)
        return pl.when(year > 0).then(format_text("{}/{}/{}", month, day, year)).otherwise(pl.col(n))

    out = frame
    for n in events:
        yy = parts(n)[2].cast(pl.Int32)
        centre = medians[n] if medians[n] is not None else today.year
        late, early = yy + 2000, yy + 1900
        year = pl.when((late - centre).abs() <= (early - centre).abs()).then(late).otherwise(early)
        out = out.with_columns(year.alias(f"{n}__yy")).with_columns(rewritten(n, pl.col(f"{n}__yy")).alias(n))
    if _BIRTH in hit:
        month, day, yy_text = parts(_BIRTH)
        yy = yy_text.cast(pl.Int32)
        limit = pl.lit(today)
        if "occurrence" in fields:
            event = _parse_naive(pl.col("occurrence"), False).dt.date()
            limit = pl.min_horizontal(limit, event)
        limit = pl.min_horizontal(limit, pl.lit(today))

        def on(year: pl.Expr) -> pl.Expr:
            text = format_text("{}-{}-{}", year, month.str.zfill(2), day.str.zfill(2))
            return text.str.to_date("%Y-%m-%d", strict=False)

        late = yy + 2000
        year = (
            pl.when(on(late) <= limit).then(late)
            .when(on(late - 100) <= limit).then(late - 100)
            .when(yy.is_not_null()).then(-1)
        )
        out = out.with_columns(year.alias(f"{_BIRTH}__yy")).with_columns(
            pl.when(pl.col(f"{_BIRTH}__yy") == -1)
            .then(pl.lit(None, dtype=pl.String))
            .otherwise(rewritten(_BIRTH, pl.col(f"{_BIRTH}__yy")))
            .alias(_BIRTH)
        )
    return out


def _limit_ok(f: CanonicalField, value: pl.Expr) -> pl.Expr:
    """Whether ``value`` keeps the limits ``f``'s target has in :mod:`schemas.limits` (true where null)."""
    ok = pl.lit(True)
    if f.value in ("integer", "number"):
        if f.maximum is not None:
            ok = ok & (value <= f.maximum)
        if f.minimum is not None:
            ok = ok & (value >= f.minimum)
        if f.exclusive_minimum is not None:
            ok = ok & (value > f.exclusive_minimum)
    elif f.max_length is not None:
        ok = ok & (value.str.len_chars() <= f.max_length)
    return value.is_null() | ok


def _derived(f: CanonicalField, given: pl.Expr, derived: pl.Expr) -> list[pl.Expr]:
    """``given`` filled with ``derived`` where it is empty, unless the derived value breaks ``f``'s limit:
    then it is left out, and ``<f>__dropped`` holds the derived value for the warning. A value the
    source wrote is never replaced, and a limit it breaks is the source's to fix.
    """
    companion = {"integer": "__int", "number": "__num"}.get(f.value, "")
    name = f.name + companion
    keep = given.is_not_null() | _limit_ok(f, derived)
    return [
        pl.when(keep).then(given.fill_null(derived)).alias(name),
        pl.when(~keep).then(derived.cast(pl.String)).alias(f"{f.name}__dropped"),
    ]


def _tidy_lists(frame: pl.DataFrame, names: list[str], separator: str) -> dict[str, bool]:
    """Whether each list column splits cleanly: no blank item, no space beside a separator."""
    if not names:
        return {}
    sep = re.escape(separator)
    untidy = rf"\s{sep}|{sep}\s|{sep}{sep}|^{sep}|{sep}$"
    found = frame.select(pl.col(n).str.contains(untidy).any().alias(n) for n in names).row(0, named=True)
    return {n: not found[n] for n in names}


def _items(s: pl.Expr, separator: str, tidy: bool) -> pl.Expr:
    """A list cell's items, trimmed, blanks dropped; null when none is left."""
    if tidy:  # a plain split gives the same items, without an expression per item
        return s.str.split(separator)
    trimmed = pl.element().str.strip_chars()
    items = s.str.split(separator).list.eval(trimmed.filter(trimmed.str.len_bytes() > 0))
    return pl.when(items.list.len() > 0).then(items)


def _derive(frame: pl.DataFrame, kind: str) -> pl.DataFrame:
    """Fill canonical fields that other columns imply."""
    if kind == "practitioner":
        first, last = split_name(pl.col("practitioner_name"))
        return frame.with_columns(
            pl.col("practitioner_first_name").fill_null(first),
            pl.col("practitioner_last_name").fill_null(last),
        )
    if kind == "immunization":
        # A performer named only by NPI is the practitioner keyed by that NPI (from a providers
        # file, or created from this row's performer columns); one named only by a full name is the
        # practitioner of that name (from a providers file, or created from the name).
        # A derived reference that breaks performer_id's limit is left out with a warning (_derived).
        first, _ = split_name(pl.col("performer_name"))
        by_name = pl.when(first.is_not_null()).then(name_key(pl.col("performer_name")))
        performer = field_map(kind)["performer_id"]
        derived = pl.coalesce(pl.lit("npi:") + pl.col("performer_npi"), by_name)
        return frame.with_columns(_derived(performer, pl.col("performer_id"), derived))
    return frame


def name_key(full: pl.Expr) -> pl.Expr:
    """``"name:jane q doe"`` from ``"Jane Q. Doe"``: how a practitioner known only by name is keyed
    (case, dots, commas and repeated spaces aside), so rows naming the same person link to one."""
    tidy = full.str.to_lowercase().str.replace_all(r"[.,]", " ").str.replace_all(r"\s+", " ").str.strip_chars()
    return pl.when(tidy.str.len_bytes() > 0).then(pl.lit("name:") + tidy)


def split_name(full: pl.Expr) -> tuple[pl.Expr, pl.Expr]:
    """("Jane Q.", "Doe") from "Jane Q. Doe": the last word is the family name."""
    parts = full.str.strip_chars().str.split(" ")
    first = parts.list.slice(0, parts.list.len() - 1).list.join(" ")
    return pl.when(parts.list.len() > 1).then(first), parts.list.last()


# --- step 2: check -----------------------------------------------------------


@dataclass(frozen=True)
class _Rule:
    field: str
    code: str
    passes: pl.Expr  # true where the row satisfies the rule
    message: str
    row_message: pl.Expr | None = None  # a warning's wording per row, when it names the row's values
    # A length limit of the rule's column (or of its items, parts of its cells): every row passes when no cell of
    # the column is longer than this many bytes, since a text has never more characters than bytes
    # (see _bounds_kept).
    bound: int | None = None


def _check(field: str, rule: Rule, passes: pl.Expr, variant: str = "", /, **values: object) -> _Rule:
    """A check of ``field``: its code and its message (with this field's limits put in) are ``rule``'s."""
    return _Rule(field, rule.code, passes, rule.text(variant, **values))


# Each parsed value type: the companion column the parse fills, and the code of a cell it cannot parse.
_PARSED = {
    "date": ("__date", RULES["date-format"]),
    "datetime": ("__date", RULES["date-format"]),
    "integer": ("__int", RULES["integer-format"]),
    "number": ("__num", RULES["number-format"]),
    "boolean": ("__bool", RULES["boolean-format"]),
}


def _rules(
    kind: str,
    today: dt.date,
    columns: Iterable[str] = (),
    severity: Mapping[str, str] | None = None,
    level: Literal["error", "warning"] = "error",
) -> list[_Rule]:
    """The rules of ``kind`` at ``level`` under a profile's ``severity`` overrides (``[rules]``).

    ``columns`` are the prepared frame's: a hazard rule is there only when its hazard was found
    (the companion column it reads, ``__yy``, ``__zero`` ..., exists).
    """
    return list(_chosen(kind, today, frozenset(columns), tuple(sorted((severity or {}).items())), level))


@functools.lru_cache(maxsize=64)
def _chosen(
    kind: str, today: dt.date, columns: frozenset[str], severity: tuple[tuple[str, str], ...], level: str
) -> tuple[_Rule, ...]:
    """:func:`_rules`, built once per kind, date, columns and severities (every batch of a file asks the same)."""
    chosen: list[_Rule] = []
    for rule in _all_rules(kind, today, columns):
        own = severity_of(rule.code, dict(severity))
        if own is None:  # a fixed rule: its kind says
            entry = explain(rule.code)
            own = "error" if entry is not None and entry.kind == "reject" else "warning"
        if own == level:
            chosen.append(rule)
    return tuple(chosen)


#: Encounter statuses whose start may be in the future.
_NOT_YET = ("planned", "cancelled", "entered-in-error")

_SCIENTIFIC = r"^[+-]?\d+([.,]\d+)?[eE][+-]?\d+$"
_SCIENTIFIC_FLAG = "__scientific"  # a column of ids, where each is in scientific notation (_scientific_ids)
#: The first bytes a number in scientific notation can start with: a sign, an ASCII digit, or the lead byte of
#: another script's digit (polars' ``\d`` takes every script's).
_SCIENTIFIC_STARTS = pl.Series([*b"+-0123456789", *range(0xC0, 0x100)], dtype=pl.UInt8).implode()


def _id_fields(fields: Iterable[CanonicalField]) -> list[str]:
    """The fields holding ids (their own or another resource's), which a spreadsheet may have written as numbers."""
    return [f.name for f in fields if f.value == "text" and (f.ref is not None or f.name.endswith("_id"))]


def _scientific_ids(frame: pl.DataFrame, names: list[str]) -> pl.DataFrame:
    """``<field>__scientific`` for each id column holding an id in scientific notation (``3.64992E+12``): whether
    each row's is.

    Only a column with a cell that starts as a number can hold one (a cell's first byte is a quarter of the
    pattern's search), so a usual export's ids (``P-10002``) are not searched; the column (and the rule reading
    it) is there only when one was found."""
    names = [n for n in names if n in frame.columns]
    if not names:
        return frame
    maybe = frame.select(
        first_byte_in(pl.col(n), _SCIENTIFIC_STARTS).any().alias(n) for n in names
    ).row(0, named=True)
    hit = [n for n in names if maybe[n]]
    if not hit:
        return frame
    flags = frame.select(
        pl.col(n).str.contains(_SCIENTIFIC).fill_null(False).alias(f"{n}{_SCIENTIFIC_FLAG}") for n in hit
    )
    found = [flags.get_column(c) for c in flags.columns if flags.get_column(c).any()]
    return frame.hstack(found) if found else frame


def _all_rules(kind: str, today: dt.date, columns: frozenset[str]) -> list[_Rule]:
    fields = field_map(kind)
    rules: list[_Rule] = []
    for f in fields.values():
        c = pl.col(f.name)
        absent = c.is_null()
        missing = absent
        if f"{f.name}__redacted" in columns:
            # A value withheld by a redacted extract: not data, and not "missing" either. Only a field a
            # payload needs says so; any other is left out like an empty cell.
            withheld = pl.col(f"{f.name}__redacted")
            missing = absent & ~withheld
            if f.required:
                rules.append(_check(f.name, RULES["redacted"], ~withheld))
            elif f.required_with:
                others = pl.any_horizontal(pl.col(o).is_not_null() for o in f.required_with if o in fields)
                rules.append(_check(f.name, RULES["redacted"], ~withheld | ~others))
        if f.required or f"{f.name}{_KEYED}" in columns:
            rules.append(_check(f.name, RULES["required"], ~missing))
        elif f.required_with:
            others = pl.any_horizontal(pl.col(o).is_not_null() for o in f.required_with if o in fields)
            rules.append(
                _check(f.name, RULES["required"], ~missing | ~others, "with-patient")
            )
        if f"{f.name}{_SCIENTIFIC_FLAG}" in columns:  # an id column holding one (_scientific_ids)
            lost = pl.col(f"{f.name}{_SCIENTIFIC_FLAG}")
            rules.append(_check(f.name, RULES["scientific-notation-id"], absent | ~lost))
        if f.value == "list":
            items = pl.col(f"{f.name}__list")
            if f.max_items is not None:
                rules.append(
                    _check(
                        f.name,
                        RULES["max-items"],
                        items.is_null() | (items.list.len() <= f.max_items),
                        limit=f.max_items,
                    )
                )
            if f.max_length is not None:
                longest = items.list.eval(pl.element().str.len_chars()).list.max()
                item_length = _check(
                    f.name, RULES["max-length"], items.is_null() | (longest <= f.max_length), "item", limit=f.max_length
                )
                rules.append(replace(item_length, bound=f.max_length))  # an item: a trimmed part of its cell
        elif f.max_length is not None:
            length = absent | (c.str.len_chars() <= f.max_length)
            rules.append(replace(_check(f.name, RULES["max-length"], length, limit=f.max_length), bound=f.max_length))
        if f.enum:
            rules.append(_check(f.name, RULES["enum"], absent | c.is_in(f.enum), allowed=", ".join(f.enum)))
        spec = f.spec
        if spec is not None and spec.format == "email":
            rules.append(_check(f.name, RULES["email-format"], absent | c.str.contains(_EMAIL)))
        parsed, unparsed = _PARSED.get(f.value, ("", None))
        if unparsed is not None:
            rules.append(_check(f.name, unparsed, absent | pl.col(f.name + parsed).is_not_null()))
        if f"{f.name}__yy" in columns:
            rules.append(_check(f.name, RULES["ambiguous-year"], pl.col(f"{f.name}__yy").fill_null(0) != -1))
        if f.maximum is not None and parsed in ("__int", "__num"):
            value = pl.col(f.name + parsed)
            rules.append(_check(f.name, RULES["maximum"], value.is_null() | (value <= f.maximum), limit=f.maximum))
        if f.minimum is not None and parsed in ("__int", "__num"):
            value = pl.col(f.name + parsed)
            rules.append(_check(f.name, RULES["minimum"], value.is_null() | (value >= f.minimum), limit=f.minimum))
        if f.exclusive_minimum is not None and parsed in ("__int", "__num"):
            value, floor = pl.col(f.name + parsed), f.exclusive_minimum
            rules.append(_check(f.name, RULES["minimum"], value.is_null() | (value > floor), "exclusive", limit=floor))
    rules += _domain_rules(kind, fields, today, columns)
    rules += _code_rules(fields)
    rules += _hazard_warnings(fields, columns)
    return rules


def _code_rules(fields: Mapping[str, CanonicalField]) -> list[_Rule]:
    """Codes checked against their tables (CVX, MVX) and ZIP codes against their format."""
    rules: list[_Rule] = []
    if "vaccine_code" in fields:
        code = pl.col("vaccine_code")
        system = pl.col("vaccine_system") if "vaccine_system" in fields else pl.lit(None, dtype=pl.String)
        is_cvx = system.fill_null(CVX_SYSTEM) == CVX_SYSTEM
        known = code.is_in(list(displays("cvx")))
        rules.append(_check("vaccine_code", RULES["unknown-cvx"], code.is_null() | ~is_cvx | known))
        cvx_status = statuses("cvx")
        warned = [c for c, st in cvx_status.items() if st in WARNED_STATUSES]
        status = code.replace_strict(cvx_status, default=None, return_dtype=pl.String)
        rules.append(
            _Rule(
                "vaccine_code",
                RULES["code-status"].code,
                code.is_null() | ~is_cvx | ~code.is_in(warned),
                RULES["code-status"].title,
                RULES["code-status"].message(code=code, status=status),
            )
        )
    if "manufacturer" in fields:
        # A manufacturer written as a code must be one; a name (Merck, "Sanofi Pasteur") is sent as written.
        maker = pl.col("manufacturer")
        code_shaped = maker.str.contains(r"^[A-Z]{2,4}$")
        known = maker.is_in(list(names("mvx")))
        rules.append(_check("manufacturer", RULES["unknown-mvx"], maker.is_null() | ~code_shaped | known))
    for prefix in ("patient", "practitioner"):
        name = f"{prefix}_postal_code"
        if name not in fields:
            continue
        zip_ = pl.col(name)
        country = f"{prefix}_country"
        if country in fields:
            us = pl.col(country).is_null() | pl.col(country).str.to_lowercase().is_in(_US)
        else:
            us = pl.lit(True)
        rules.append(_check(name, RULES["zip-format"], zip_.is_null() | ~us | zip_.str.contains(_ZIP)))
    return rules


def _hazard_warnings(fields: Mapping[str, CanonicalField], columns: frozenset[str]) -> list[_Rule]:
    """The warnings of values repaired or left out in :func:`prepare`, each where its companion column exists."""
    rules: list[_Rule] = []

    def flagged(name: str, suffix: str, rule: Rule, **values: pl.Expr) -> None:
        flag = f"{name}__{suffix}"
        if flag in columns:
            rules.append(_Rule(name, rule.code, pl.col(flag).is_null(), rule.title, rule.message(**values)))

    for name, f in fields.items():
        if f.value in ("date", "datetime"):
            yy = pl.col(f"{name}__yy")
            if f"{name}__yy" in columns:
                two = RULES["two-digit-year"]
                rules.append(_Rule(name, two.code, yy.is_null() | (yy == -1), two.title, two.message(year=yy)))
            flagged(name, "serial", RULES["excel-serial-date"], date=pl.col(f"{name}__serial"))
        flagged(name, "zero", RULES["leading-zero-restored"], value=pl.col(f"{name}__zero"))
        if f"{name}__dropped" in columns:
            limit = RULES["maximum"].text(limit=f.maximum) if f.maximum is not None else (
                RULES["max-length"].text(limit=f.max_length) if f.max_length is not None else "out of its limits"
            )
            target = (f.target or name).split(":")[-1]
            why = format_text("{}, not {}", pl.col(f"{name}__dropped"), pl.lit(limit))
            dropped = RULES["derived-dropped"]
            rules.append(
                _Rule(name, dropped.code, pl.col(f"{name}__dropped").is_null(), dropped.title,
                      dropped.message(target=target, why=why))
            )
    return rules


def _domain_rules(
    kind: str, fields: dict[str, CanonicalField], today: dt.date, columns: frozenset[str] = frozenset()
) -> list[_Rule]:
    rules: list[_Rule] = []

    def date(name: str) -> pl.Expr:
        return pl.col(f"{name}__date")

    def ok_unless(expr: pl.Expr) -> pl.Expr:
        return expr.fill_null(False).not_()

    for name in ("occurrence", "patient_birth_date", "recorded"):
        if name in fields:
            rules.append(_check(name, RULES["future-date"], ok_unless(date(name) > pl.lit(today)), today=today))
    if kind == "encounter":
        # A visit that has not happened yet is fine while it is planned (or was called off).
        happened = ~pl.col("status").is_in(_NOT_YET).fill_null(False)
        future = date("period_start") > pl.lit(today)
        rules.append(_check("period_start", RULES["future-date"], ok_unless(future & happened), today=today))
    if {"occurrence", "expiration_date"} <= fields.keys():
        rules.append(
            _check(
                "expiration_date",
                RULES["expiration-before-occurrence"],
                ok_unless(date("expiration_date") < date("occurrence")),
            )
        )
    if {"occurrence", "patient_birth_date"} <= fields.keys():
        rules.append(
            _check(
                "occurrence",
                RULES["occurrence-before-birth"],
                ok_unless(date("occurrence") < date("patient_birth_date")),
            )
        )
    if {"dose_number", "series_doses"} <= fields.keys():
        rules.append(
            _check(
                "dose_number",
                RULES["dose-number-above-series"],
                ok_unless(pl.col("dose_number__int") > pl.col("series_doses__int")),
            )
        )
    for start, end in (
        ("period_start", "period_end"),
        ("execution_start", "execution_end"),
        ("restriction_start", "restriction_end"),
        ("event_start", "event_end"),
    ):
        if {start, end} <= fields.keys():
            rules.append(
                _check(
                    end, RULES["end-before-start"], ok_unless(pl.col(f"{end}__instant") < pl.col(f"{start}__instant"))
                )
            )
    if "record_id" in fields:
        rules.append(
            _check("record_id", RULES["duplicate-key"], ~pl.col("__seen_before").fill_null(False)),
        )
    demographics = _demographics(fields)
    if demographics:
        # Rows that only name a patient (no details) cannot conflict with the ones that describe it.
        carries = _carries_details(demographics)
        # An id in scientific notation names no one for sure (3.64992E+12 stands for many people): its rows
        # are rejected for that, with their own code, and never compared as one patient.
        flag = f"patient_id{_SCIENTIFIC_FLAG}"
        lost_id = pl.col(flag) if flag in columns else pl.lit(False)
        for f in demographics:
            same = pl.col(f"__hash_{f.name}").eq_missing(pl.col(f"__first_{f.name}"))
            if f"{f.name}__placeholder" in columns:  # "N/A" says nothing, so it cannot disagree
                same = same | pl.col(f"{f.name}__placeholder")
            rules.append(
                _check(f.name, RULES["patient-conflict"], pl.col("patient_id").is_null() | lost_id | ~carries | same)
            )
    return rules


def _demographics(fields: Mapping[str, CanonicalField]) -> list[CanonicalField]:
    """The patient details rows are compared on (none for a kind without a patient id)."""
    if "patient_id" not in fields:
        return []
    return [f for f in fields.values() if f.name.startswith("patient_") and f.name != "patient_id"]


def _carries_details(demographics: list[CanonicalField]) -> pl.Expr:
    return pl.any_horizontal(pl.col(f.name).is_not_null() for f in demographics)


def _compared(f: CanonicalField) -> pl.Expr:
    """A patient detail as rows are compared on it: dates as written out, so 3/31/2024 equals 2024-03-31."""
    return pl.col(f"{f.name}__out") if f.value in ("date", "datetime") else pl.col(f.name)


def _compared_across_rows(prepared: pl.DataFrame, kind: str, carry: Carry) -> pl.DataFrame:
    """Add what the cross-row rules read (``__seen_before``, ``__first_<detail>``) and update ``carry``.

    Joins and first-distinct flags over the whole batch, not a window per rule: one pass each.
    """
    fields = field_map(kind)
    demographics = _demographics(fields)
    # A frame that did not come from prepare (which flags them ahead) has its first rows flagged here.
    flags = [e for e in _batch_firsts(prepared.columns, demographics) if e.meta.output_name() not in prepared.columns]
    prepared = prepared.with_columns(flags) if flags else prepared
    if "record_id" in fields:
        ids, first = prepared.get_column("record_id"), prepared.get_column(_FIRST_RECORD)
        earlier = carry.record_ids.insert(ids.alias("key").to_frame(), first=first).get_column("found")
        prepared = prepared.with_columns((ids.is_not_null() & (~first | earlier)).alias("__seen_before"))
    if demographics:
        names = [f"__first_{f.name}" for f in demographics]
        if carry.patients is None:
            carry.patients = KeyIndex(dict.fromkeys(names, pl.UInt64()))
        here = (
            prepared.lazy()
            .filter(pl.col(_FIRST_PATIENT))
            .select(
                pl.col("patient_id").alias("key"),
                *[pl.col(f"__hash_{f.name}").alias(n) for f, n in zip(demographics, names, strict=True)],
            )
            .collect(engine="in-memory")
        )
        before = carry.patients.insert(here, first=pl.repeat(True, here.height, dtype=pl.Boolean, eager=True))
        found = before.get_column("found")
        firsts = here.with_columns(
            pl.when(found).then(before.get_column(n)).otherwise(pl.col(n)).alias(n) for n in names
        ).rename({"key": "patient_id"})
        # Joined on the one column and set beside the rest: a join of the whole batch would copy every column.
        found_firsts = prepared.select("patient_id").join(firsts, on="patient_id", how="left", maintain_order="left")
        prepared = prepared.hstack(found_firsts.drop("patient_id").get_columns())
    return prepared


_FLAG = "flag"  # the statistic of a check naming the column that holds its outcome


def _pandera_check(code: str, flag: str) -> pa.Check:
    import pandera.polars as pa

    def run(data: PolarsData, flag: str = flag) -> pl.LazyFrame:
        return data.lazyframe.select(pl.col(flag))

    return pa.Check(run, name=code, statistics={_FLAG: flag})


def warm_up() -> None:
    """Import pandera (the checks' declaration) and numpy (the key indexes'), a tenth of a second each,
    on a thread of their own while the first batch is read, rather than when first needed; numpy.ma
    too, which polars imports at the first series it makes from numpy (a key index's: 70 ms of the
    first batch's checks)."""
    import importlib
    import threading

    def imports() -> None:
        lazy_numpy.load()
        for name in ("numpy.ma", "pandera.polars"):
            importlib.import_module(name)

    threading.Thread(target=imports, daemon=True).start()


def schema_for(kind: str, rules: list[_Rule]) -> pa.DataFrameSchema:
    """The pandera schema of a prepared frame whose rule outcomes are the columns ``__ok_<i>``."""
    import pandera.polars as pa

    checks: dict[str, list[pa.Check]] = {f.name: [] for f in fields_of(kind)}
    for i, rule in enumerate(rules):
        checks[rule.field].append(_pandera_check(rule.code, f"__ok_{i}"))
    columns = {name: pa.Column(pl.String, nullable=True, checks=cs) for name, cs in checks.items()}
    return pa.DataFrameSchema(columns, strict=False)


_DECLARED: dict[tuple[str, tuple[tuple[str, str], ...]], list[tuple[str, str, str]]] = {}


def _declared_checks(kind: str, rules: list[_Rule]) -> list[tuple[str, str, str]]:
    """(column, check name, outcome column) of each check :func:`schema_for` declares, in its order.

    The same rules (by column and code) declare the same checks: built once per kind and rule set,
    not once per batch.
    """
    key = (kind, tuple((r.field, r.code) for r in rules))
    if key not in _DECLARED:
        _DECLARED[key] = [
            (name, declared_check.name, declared_check.statistics[_FLAG])
            for name, column in schema_for(kind, rules).columns.items()
            for declared_check in column.checks
        ]
    return _DECLARED[key]


_CROSS_ROW = ("__seen_before", "__first_")  # what the rules comparing rows read (see _compared_across_rows)
LOCAL_OK = "__local_ok"


def _compares_rows(rule: _Rule) -> bool:
    return any(name.startswith(_CROSS_ROW) for name in rule.passes.meta.root_names())


def precheck(
    prepared: pl.DataFrame, kind: str, *, today: dt.date, severity: Mapping[str, str] | None = None
) -> pl.DataFrame:
    """``prepared`` with :data:`LOCAL_OK`: whether the row passes every rule that reads the row alone.

    Those rules need nothing from other batches, so the batches evaluate them on the thread that
    reads and prepares ahead; :func:`check` then evaluates only the rules that compare rows.
    """
    rules = _rules(kind, today, prepared.columns, severity)
    named = _flags_of(kind, today, prepared.columns, severity)
    local = [rules[i] for i in named]
    kept = {id(r) for r in _bounds_kept(prepared, local)}  # the others pass on every row of the batch
    # Each rule's outcome kept as a column (a bit a row): check reads the failing rows' outcomes from them.
    flags = [(r.passes.fill_null(False) if id(r) in kept else pl.lit(True)).alias(named[i]) for i, r in
             zip(named, local, strict=True)]
    ok = pl.all_horizontal(named.values()) if named else pl.lit(True)
    return prepared.with_columns(flags).with_columns(ok.alias(LOCAL_OK))


_LOCAL_FLAG = "__local_flag:"  # a single-row rule's outcome, as precheck leaves it (_local_flags)


def _flags_of(kind: str, today: dt.date, columns: Iterable[str], severity: Mapping[str, str] | None) -> dict[int, str]:
    """:func:`_local_flags` of :func:`_rules`, worked out once per kind, date, columns and severities."""
    return _local_flags_cached(kind, today, frozenset(columns), tuple(sorted((severity or {}).items())))


@functools.lru_cache(maxsize=64)
def _local_flags_cached(
    kind: str, today: dt.date, columns: frozenset[str], severity: tuple[tuple[str, str], ...]
) -> dict[int, str]:
    return _local_flags(list(_chosen(kind, today, columns, severity, "error")))


def _local_flags(rules: list[_Rule]) -> dict[int, str]:
    """The column that holds each single-row rule's outcome after :func:`precheck`, by the rule's position in
    ``rules``: named by its field, code and message (and how many such rules came before it), so that
    :func:`check`, whose rule list has the rules comparing rows too, finds it."""
    seen: Counter[tuple[str, str, str]] = Counter()
    out: dict[int, str] = {}
    for i, r in enumerate(rules):
        if _compares_rows(r):
            continue
        key = (r.field, r.code, r.message)
        out[i] = f"{_LOCAL_FLAG}{r.field}:{r.code}:{zlib.crc32(r.message.encode()):08x}:{seen[key]}"
        seen[key] += 1
    return out


def _bounds_kept(prepared: pl.DataFrame, rules: list[_Rule]) -> list[_Rule]:
    """``rules`` without the length limits (:attr:`_Rule.bound`) that no cell of ``prepared`` can break: their
    column's longest cell, counted in bytes, is within the limit (or the column is empty).

    A batch of a usual export keeps every limit, and counting each cell's characters for them was over a third of
    what the single-row rules cost; a cell's byte length is read from its header. A row that fails another rule is
    checked again by every rule (:func:`check`), so its messages are the same."""
    bounded = sorted({r.field for r in rules if r.bound is not None and r.field in prepared.columns})
    if not bounded:
        return rules
    widest = prepared.select(pl.col(c).str.len_bytes().max() for c in bounded).row(0, named=True)

    def kept(rule: _Rule) -> bool:
        if rule.bound is None or rule.field not in widest:
            return True
        width = widest[rule.field]
        return width is not None and width > rule.bound  # None: every cell of the column is empty

    return [r for r in rules if kept(r)]


def check(
    prepared: pl.DataFrame, kind: str, *, today: dt.date, severity: Mapping[str, str] | None = None
) -> pl.DataFrame:
    """Every rule failure of every row, as a rejects frame.

    Every rule is one polars expression; all of them are evaluated in a single pass over the
    frame. The rows that failed at least one then go through the checks the pandera schema
    (:func:`schema_for`) declares, each failure named by its column and code: the rules are
    evaluated on them in one query, and the declared checks read the outcomes in a second, however
    many rows fail.
    A frame that went through :func:`precheck` has its single-row rules' outcome already.
    """
    rules = _rules(kind, today, prepared.columns, severity)
    flags = [f"__ok_{i}" for i in range(len(rules))]
    passes = [r.passes.fill_null(False) for r in rules]
    if LOCAL_OK in prepared.columns:
        across = [p for p, r in zip(passes, rules, strict=True) if _compares_rows(r)]
        every = pl.all_horizontal(pl.col(LOCAL_OK), *across)
    else:
        every = pl.all_horizontal(passes)
    if not rules:
        return pl.DataFrame(schema=REJECT_SCHEMA)
    # Lazy, so the rules' shared parts (the patient-conflict rules' conditions) are evaluated once:
    # the eager engine leaves common subexpressions alone (four times the cost here).
    fails = prepared.lazy().select(~every).collect(engine="in-memory").to_series()
    if not fails.any():
        return pl.DataFrame(schema=REJECT_SCHEMA)
    # A single-row rule's outcome is read from the column precheck left (a frame that went through it); the
    # others are evaluated on the failing rows. Only the columns that takes are taken along: filtering the
    # whole wide batch would copy it.
    named = _flags_of(kind, today, prepared.columns, severity)
    done = {i: name for i, name in named.items() if name in prepared.columns}
    outcome = [pl.col(done[i]) if i in done else p for i, p in enumerate(passes)]
    read = {ROW, *(name for e in outcome for name in e.meta.root_names())}
    failing = prepared.select(c for c in prepared.columns if c in read).filter(fails)
    # The schema declares the checks; they run here as polars queries over the failing rows (two
    # collects), not as pandera's collect per check: a batch's cost does not grow with its rules.
    outcomes = (  # every rule's outcome on the failing rows, evaluated once and read by every check below
        failing.lazy()
        .select(pl.col(ROW).cast(pl.UInt32), *(e.alias(flag) for e, flag in zip(outcome, flags, strict=True)))
        .collect(engine="in-memory")
    )
    # A line per failed check (unpivoted, the passed ones dropped), named by its check, in one query however
    # many checks there are; at most _LONG lines at a time (a batch whose every row fails makes rules x rows).
    # Sorted as pandera lists them: by row and column, a cell's failures in the schema's order.
    texts = _check_texts(kind, rules).lazy()
    step = max(1, _LONG // max(1, len(flags)))
    failed = pl.concat(
        [
            outcomes.slice(at, step).unpivot(index=ROW, on=flags, variable_name=_FLAG_NAME, value_name="passed")
            .filter(~pl.col("passed"))
            .lazy()
            .join(texts, on=_FLAG_NAME, how="inner")
            .collect(engine="in-memory")
            for at in range(0, outcomes.height, step)
        ]
    )
    return (
        failed.pipe(_conflicts_only_where_cell_valid)
        .sort(ROW, "field", _CHECK)
        .select(list(REJECT_SCHEMA))
    )


_CHECK = "__check"  # a declared check's position (_declared_checks)
_FLAG_NAME = "__flag"  # the rule outcome a check reads
_LONG = 1_000_000  # lines of (row, check) unpivoted at a time
_TEXTS: dict[tuple[str, tuple[tuple[str, str, str], ...]], pl.DataFrame] = {}


def _check_texts(kind: str, rules: list[_Rule]) -> pl.DataFrame:
    """Each declared check's (:func:`_declared_checks`) outcome column, position, code, column and message (a
    column's first rule of a code words its failures); built once per kind and rule set (messages and all: one
    names today's date)."""
    key = (kind, tuple((r.field, r.code, r.message) for r in rules))
    if key not in _TEXTS:
        declared = _declared_checks(kind, rules)
        texts: dict[tuple[str, str], str] = {}
        for r in rules:
            texts.setdefault((r.field, r.code), r.message)
        _TEXTS[key] = pl.DataFrame(
            [(flag, i, code, column, None, texts.get((column, code)))
             for i, (column, code, flag) in enumerate(declared)],
            schema={_FLAG_NAME: pl.String, _CHECK: pl.UInt32, "code": pl.String, "field": pl.String,
                    "value": pl.String, "message": pl.String},
            orient="row",
        )
    return _TEXTS[key]


def _conflicts_only_where_cell_valid(failures: pl.DataFrame) -> pl.DataFrame:
    """A cell that breaks its own rule also differs from the patient's other rows; report the rule only."""
    conflict = pl.col("code") == RULES["patient-conflict"].code
    own = failures.filter(~conflict).select(ROW, "field").unique()
    conflicts = failures.filter(conflict).join(own, on=[ROW, "field"], how="anti")
    return pl.concat([failures.filter(~conflict), conflicts])


def with_source_values(failures: pl.DataFrame, mapped: Mapped) -> pl.DataFrame:
    """Fill ``value`` with each failing cell as written in the source file.

    The failures are joined with the source rows on the row number alone, and each takes the cell of
    its own column: no reshaping of the source cells into a line per cell, which cost a batch whose
    every row fails several times what a clean one costs.
    """
    if failures.is_empty():
        return failures
    wanted = set(failures.get_column("field").unique().to_list())
    named = [c for c in mapped.frame.columns if c != ROW and c in wanted]
    cells = mapped.frame.select(ROW, *(pl.col(c).alias(f"__cell_{i}") for i, c in enumerate(named)))
    cell = pl.coalesce(pl.when(pl.col("field") == c).then(pl.col(f"__cell_{i}")) for i, c in enumerate(named))
    return (  # eager: polars' default (streaming) engine takes three times as long over this join
        failures.join(cells, on=ROW, how="left", maintain_order="left")
        .with_columns((cell if named else pl.lit(None)).cast(pl.String).alias("value"))
        .select(list(REJECT_SCHEMA))
    )


def _document_groups(prepared: pl.DataFrame, rejects: pl.DataFrame) -> pl.DataFrame:
    """A document is one create: 1 to 50 sections, and one bad section rejects all its rows."""
    most = spec_at("DocumentCreate", "sections").max_items or 50
    sizes = prepared.group_by("document_id").agg(pl.len().alias("sections"))
    too_many = (
        prepared.join(sizes, on="document_id")
        .filter(pl.col("document_id").is_not_null() & (pl.col("sections") > most))
        .select(
            pl.col(ROW),
            pl.lit(RULES["max-items"].code).alias("code"),
            pl.lit("section_title").alias("field"),
            pl.lit(None, dtype=pl.String).alias("value"),
            RULES["max-items"].message("document", sections=pl.col("sections"), limit=most).alias("message"),
        )
    )
    rejects = pl.concat([rejects, too_many])
    bad_docs = (
        prepared.join(rejects.select(ROW).unique(), on=ROW, how="semi")
        .filter(pl.col("document_id").is_not_null())
        .group_by("document_id")
        .agg(pl.col(ROW).min().alias("first_bad"))
    )
    siblings = (
        prepared.join(bad_docs, on="document_id")
        .join(rejects.select(ROW).unique(), on=ROW, how="anti")
        .select(
            pl.col(ROW),
            pl.lit(RULES["document-rejected"].code).alias("code"),
            pl.lit("document_id").alias("field"),
            pl.lit(None, dtype=pl.String).alias("value"),
            RULES["document-rejected"].message(row=pl.col("first_bad")).alias("message"),
        )
    )
    return pl.concat([rejects, siblings]).sort(ROW, "field")


def _warnings(
    prepared: pl.DataFrame, kind: str, today: dt.date, severity: Mapping[str, str] | None = None
) -> pl.DataFrame:
    fields = field_map(kind)
    # One lazy query, one collect: each part reads only the columns its rule does.
    parts: list[pl.LazyFrame] = []
    lazy = prepared.lazy()
    for rule in _rules(kind, today, prepared.columns, severity, "warning"):
        message = pl.coalesce(rule.row_message, pl.lit(rule.message)) if rule.row_message is not None else None
        parts.append(
            lazy.filter(~rule.passes.fill_null(False)).select(
                pl.col(ROW),
                pl.lit(rule.code).alias("code"),
                pl.lit(rule.field).alias("field"),
                pl.lit(None, dtype=pl.String).alias("value"),
                (message if message is not None else pl.lit(rule.message)).alias("message"),
            )
        )
    if "performer_name" in fields:
        first, _ = split_name(pl.col("performer_name"))
        unlinked = (
            pl.col("performer_name").is_not_null()
            & pl.col("performer_id").is_null()
            & pl.col("performer_npi").is_null()
            & first.is_null()
        )
        parts.append(_warning_rows(lazy, unlinked, "performer_name", RULES["performer-unlinked"]))
    for name in ("route", "site"):
        if name in fields:
            known = pl.col(name).is_in(list(displays(name)))
            parts.append(
                _warning_rows(
                    lazy,
                    pl.col(name).is_not_null() & ~known,
                    name,
                    RULES["unmapped-code"],
                    field=name,
                )
            )
    return pl.concat(parts).collect(engine="in-memory") if parts else pl.DataFrame(schema=REJECT_SCHEMA)


def _warning_rows(prepared: pl.LazyFrame, when: pl.Expr, field: str, rule: Rule, /, **values: object) -> pl.LazyFrame:
    return prepared.filter(when).select(
        pl.col(ROW),
        pl.lit(rule.code).alias("code"),
        pl.lit(field).alias("field"),
        pl.lit(None, dtype=pl.String).alias("value"),
        rule.message(**values).alias("message"),
    )
