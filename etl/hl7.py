"""HL7 v2 VXU messages (v2.5.1, the CDC immunization guide) read as a table of doses.

A file is HL7 when, after any byte-order mark and blank lines, it starts with ``MSH|``, ``FHS|`` or
``BHS|`` (:func:`is_hl7`); the CSV/Excel readers hand it here. Each message's encoding characters
(MSH-1, MSH-2) are read by python-hl7 (``hl7``), which also decodes escape sequences (``\\F\\
\\S\\ \\T\\ \\R\\ \\E\\``, ``\\Xhh..\\``); fields are split into repetitions, components and
subcomponents with those characters when they are read (a full parse of every segment cost
milliseconds a message). Segments may end in CR, LF or CRLF; a file may hold many messages, bare or
inside ``FHS/BHS ... BTS/FTS`` batch wrappers (those carry no doses and are skipped).

Every RXA segment is one row, whose ``__row`` is the line the RXA segment is on, so a report
sends a reader to it. The row carries its message's PID, the ORC that orders it (just before it)
and the RXR and OBX segments after it (up to the next ORC or RXA). The columns are named by field
position (``PID-5.1``, ``RXA-5``, ``OBX-5 30973-2``: the OBX whose OBX-3 is that LOINC code),
listed in :data:`COLUMNS`; the built-in ``hl7`` profile (``etl/profiles/hl7.toml``) maps them to
canonical fields, and a user's profile can map any of them otherwise. docs/hl7.md has the table.

Values are text as for CSV, with HL7's dates (``YYYYMMDD``, ``YYYYMMDDHHMM[SS][+ZZZZ]``) written
as ISO dates and date-times so the usual checks read them; a partial or malformed date is left as
written, so validation flags it with what the file holds.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import hl7
import polars as pl

from etl.errors import InputError

__all__ = [
    "ACTION_COLUMN",
    "COLUMNS",
    "DATETIME_COLUMNS",
    "DATE_COLUMNS",
    "OBSERVATIONS",
    "STATE_COLUMNS",
    "SUPERSEDED_COLUMN",
    "Parsed",
    "amends",
    "deleted",
    "is_hl7",
    "parse_hl7",
    "superseded",
]

_START = re.compile(rb"^(?:\xef\xbb\xbf)?\s*(?:MSH|FHS|BHS)\|")
_LINES = re.compile(r"\r\n|\r|\n")
_WRAPPERS = frozenset({"FHS", "FTS", "BHS", "BTS"})

#: LOINC codes of the OBX observations a dose carries, by the column that holds their value (OBX-5).
OBSERVATIONS = {
    "30973-2": "dose number in series",
    "64994-7": "vaccine funding program eligibility",
    "30963-3": "vaccine funding source",
    "69764-9": "VIS document type",
    "30956-7": "vaccine type (VIS)",
    "29768-9": "VIS publication date",
    "29769-7": "VIS presentation date",
}

#: Every column an HL7 table has, in order (``__row`` aside), with what each holds.
COLUMNS: dict[str, str] = {
    "MSH-10": "message control id",
    "PID-3": "patient identifier: the PID-3 repetition whose type (PID-3.5) is MR, else the first not SS",
    "PID-3.4": "assigning authority of that identifier",
    "PID-5.1": "family name",
    "PID-5.2": "given name",
    "PID-5.3": "middle name or initial",
    "PID-7": "date of birth",
    "PID-8": "administrative sex",
    "PID-10": "race (code, HL70005 / CDCREC)",
    "PID-11.1": "street address",
    "PID-11.3": "city",
    "PID-11.4": "state",
    "PID-11.5": "ZIP or postal code",
    "PID-11.6": "country",
    "PID-13": "phone: area code and local number (PID-13.6, PID-13.7), else PID-13.1",
    "PID-22": "ethnic group (code, HL70189 / CDCREC)",
    "ORC-3": "filler order number: the record id of the dose",
    "ORC-12": "ordering provider (id)",
    "RXA-3": "date/time the administration started",
    "RXA-5": "vaccine: the CVX code (the RXA-5 triplet whose coding system is CVX, else RXA-5.1)",
    "RXA-5.2": "vaccine: the CVX code's text",
    "RXA-5 NDC": "vaccine: the NDC code, when RXA-5 has one",
    "RXA-6": "administered amount (999, the guide's 'amount unknown', reads as empty)",
    "RXA-7": "administered units",
    "RXA-9": "administration notes: NIP001 code (00 new record, 01-08 historical)",
    "RXA-10": "administering provider's NPI (RXA-10.1 when its type or authority says NPI)",
    "RXA-10.1": "administering provider's id, whatever its type",
    "RXA-10 name": "administering provider's name (given then family)",
    "RXA-11": "administered-at location (facility, RXA-11.4)",
    "RXA-15": "lot number (the first)",
    "RXA-16": "expiration date (the first)",
    "RXA-17": "manufacturer (MVX code)",
    "RXA-18": "refusal reason (code)",
    "RXA-18.2": "refusal reason (text, else its code)",
    "RXA-20": "completion status (CP, PA, RE, NA)",
    "RXA-21": "action code (A add, U update, D delete)",
    "RXA-22": "system entry date/time",
    "RXR-1": "route (NCIT or HL70162 code)",
    "RXR-2": "site (HL70163 code)",
    **{f"OBX-5 {code}": what for code, what in OBSERVATIONS.items()},
    "ORC-3 superseded at": "the line of a later RXA in the file, for the same ORC-3, that updates or deletes this dose",
}

#: Columns that hold an HL7 date, and a date-time.
DATE_COLUMNS = ("PID-7", "RXA-16", "OBX-5 29768-9", "OBX-5 29769-7")
DATETIME_COLUMNS = ("RXA-3", "RXA-22")

_DATE = r"^(\d{4})(\d{2})(\d{2})$"
_DATE_AND_TIME = r"^(\d{4})(\d{2})(\d{2})(?:\d{2}(?:\d{2}(?:\d{2}(?:\.\d{1,4})?)?)?)?(?:[+-]\d{4})?$"
_DATETIME = r"^(\d{4})(\d{2})(\d{2})(\d{2})(\d{2})(\d{2})?(?:\.\d{1,4})?$"
_DATETIME_TZ = r"^(\d{4})(\d{2})(\d{2})(\d{2})(\d{2})(\d{2})?(?:\.\d{1,4})?([+-]\d{2})(\d{2})$"


#: The column of a dose's action code (A add, U update, D delete).
ACTION_COLUMN = "RXA-21"
#: The column that says a later message of the file updates or deletes a dose.
SUPERSEDED_COLUMN = "ORC-3 superseded at"
#: Columns that decide a row's state rather than feed a field: never "not imported".
STATE_COLUMNS = (ACTION_COLUMN, SUPERSEDED_COLUMN)


def _action() -> pl.Expr:
    return pl.col(ACTION_COLUMN).str.strip_chars().str.to_uppercase()


def deleted() -> pl.Expr:
    """Whether a row of an HL7 table is a dose its sender deleted (``RXA-21`` is ``D``)."""
    return (_action() == "D").fill_null(False)


def amends() -> pl.Expr:
    """Whether a row of an HL7 table updates or deletes a dose (``RXA-21`` is ``U`` or ``D``): the same
    record id may come before it in the file, and that is no duplicate."""
    return _action().is_in(["U", "D"]).fill_null(False)


def superseded() -> pl.Expr:
    """Whether a later row of the same HL7 file updates or deletes this row's dose."""
    return pl.col(SUPERSEDED_COLUMN).is_not_null()


@dataclass
class Parsed:
    """An HL7 file as a frame of text (one row per RXA) and what the reader noticed."""

    frame: pl.DataFrame
    encoding: str
    messages: int
    empty_messages: list[int] = field(default_factory=list)  # lines of MSH segments that hold no RXA
    bad_byte: int | None = None  # where the text stopped being UTF-8 (then it was read as cp1252)


def is_hl7(head: bytes) -> bool:
    """Whether a file's first bytes are an HL7 v2 message or batch (``MSH|``, ``FHS|``, ``BHS|``)."""
    return _START.match(head) is not None


def parse_hl7(data: bytes, path: str, *, row_column: str) -> Parsed:
    """Every RXA segment of the HL7 file ``data`` as one row of :data:`COLUMNS`, numbered in ``row_column``.

    Raises :class:`InputError` (naming ``path`` and the line) for a file that is not HL7 v2 text.
    """
    encoding, bad_byte = "utf-8", None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        encoding, bad_byte, text = "cp1252", exc.start, data.decode("cp1252", errors="replace")
    text = text.removeprefix("\ufeff")
    if "\x00" in text:
        raise InputError(path, "this looks like a binary file, not HL7 text (it holds NUL bytes)")
    columns: dict[str, list[str | None]] = {name: [] for name in (row_column, *COLUMNS)}
    messages, empty = 0, []
    for start, segments in _messages(path, text):
        messages += 1
        rows = list(_doses(path, start, segments))
        if not rows:
            empty.append(start)
        for row in rows:
            for name, values in columns.items():
                values.append(row.get("__line" if name == row_column else name) or None)
    if not messages:
        raise InputError(path, "holds no HL7 message (no MSH segment)")
    frame = pl.DataFrame(columns, schema=dict.fromkeys(columns, pl.String))
    frame = frame.with_columns(pl.col(row_column).cast(pl.UInt32), *_iso_dates())
    # The latest version of a dose wins: a row is superseded when the next row with its ORC-3 amends it.
    later = pl.col(row_column).shift(-1).over("ORC-3")
    amended = pl.col(ACTION_COLUMN).shift(-1).over("ORC-3").str.strip_chars().str.to_uppercase().is_in(["U", "D"])
    frame = frame.with_columns(
        pl.when(pl.col("ORC-3").is_not_null() & amended.fill_null(False))
        .then(later.cast(pl.String))
        .alias(SUPERSEDED_COLUMN)
    )
    return Parsed(frame, encoding, messages, empty, bad_byte)


def _iso_dates() -> list[pl.Expr]:
    """HL7 dates and date-times written as ISO; anything else left as written."""
    out = []
    for name in DATE_COLUMNS:
        c = pl.col(name)
        # A date may be sent as a date-time (a birth "20180417000000-0500"): the day is the date.
        out.append(
            pl.when(c.str.contains(_DATE_AND_TIME))
            .then(c.str.replace(_DATE_AND_TIME, "$1-$2-$3"))
            .otherwise(c)
            .alias(name)
        )
    for name in DATETIME_COLUMNS:
        c = pl.col(name)
        seconds = c.str.replace(_DATETIME, "$6")
        naive = c.str.replace(_DATETIME, "$1-$2-${3}T$4:$5:") + pl.when(seconds == "").then(pl.lit("00")).otherwise(
            seconds
        )
        tz_seconds = c.str.replace(_DATETIME_TZ, "$6")
        aware = (
            c.str.replace(_DATETIME_TZ, "$1-$2-${3}T$4:$5:")
            + pl.when(tz_seconds == "").then(pl.lit("00")).otherwise(tz_seconds)
            + c.str.replace(_DATETIME_TZ, "$7:$8")
        )
        out.append(
            pl.when(c.str.contains(_DATE))
            .then(c.str.replace(_DATE, "$1-$2-$3"))
            .when(c.str.contains(_DATETIME))
            .then(naive)
            .when(c.str.contains(_DATETIME_TZ))
            .then(aware)
            .otherwise(c)
            .alias(name)
        )
    return out


def _messages(path: str, text: str) -> Iterator[tuple[int, list[tuple[int, str]]]]:
    """Each message: the line of its MSH, and its segments as (line, text); batch wrappers left out."""
    current: list[tuple[int, str]] = []
    for number, line in enumerate(_LINES.split(text), start=1):
        segment = line.strip("\x0b\x1c \t")  # MLLP framing bytes and stray spaces
        if not segment:
            continue
        kind = segment[:3]
        if kind in _WRAPPERS:
            if current:
                yield current[0][0], current
                current = []
            continue
        if kind == "MSH":
            if current:
                yield current[0][0], current
            current = [(number, segment)]
        elif not current:
            raise InputError(path, f"segment {kind!r} comes before any MSH segment", row=number)
        else:
            current.append((number, segment))
    if current:
        yield current[0][0], current


def _doses(path: str, start: int, segments: list[tuple[int, str]]) -> Iterator[dict[str, str]]:
    """The rows of one message: one per RXA."""
    try:
        # The MSH alone: python-hl7 reads its encoding characters; each segment is then split lazily
        # with them (a full parse of every segment cost milliseconds a message).
        msh = segments[0][1]
        header = _header(msh[: msh.find(msh[3], 4) + 1] if msh.find(msh[3], 4) > 0 else msh)
        separators = str(header.separators)
        escape = str(header.esc)
        if len(separators) < 5 or not escape or len(set(separators[1:] + escape)) < 5:
            raise ValueError(f"its separators {segments[0][1][3:8]!r} are not five distinct characters")
    except Exception as exc:  # python-hl7 raises plain exceptions on a broken MSH
        raise InputError(path, f"not a readable HL7 message header (MSH): {exc}", row=start) from exc
    parsed = [_Segment(text, separators, escape, header) for _, text in segments]
    common: dict[str, str] = {"MSH-10": _get(parsed[0], 10)}
    order: dict[str, str] = {}
    dose: dict[str, str] | None = None
    for (line, _), segment in zip(segments, parsed, strict=True):
        kind = segment.kind
        if kind == "PID":
            common.update(_pid(segment))
        elif kind == "ORC":
            if dose is not None:
                yield dose
                dose = None
            order = {"ORC-3": _get(segment, 3), "ORC-12": _get(segment, 12)}
        elif kind == "RXA":
            if dose is not None:
                yield dose
            dose = {**common, **order, **_rxa(segment), "__line": str(line)}
            order = {}  # an ORC orders the one RXA after it; a second RXA without its own has no ORC-3
        elif kind == "RXR" and dose is not None:
            dose.setdefault("RXR-1", _get(segment, 1))
            dose.setdefault("RXR-2", _get(segment, 2))
        elif kind == "OBX" and dose is not None:
            code = _get(segment, 3)
            if code in OBSERVATIONS:
                dose.setdefault(f"OBX-5 {code}", _get(segment, 5))
    if dose is not None:
        yield dose


def _pid(segment: _Segment) -> dict[str, str]:
    ids = _repetitions(segment, 3)
    # The medical record number; else the first id that is not a social security number (never read).
    types = {r: _get(segment, 3, r, 5).upper() for r in ids}
    mr = next((r for r, t in types.items() if t == "MR"), next((r for r, t in types.items() if t != "SS"), 0))
    area, local = _get(segment, 13, 1, 6), _get(segment, 13, 1, 7)
    phone = f"{area}{local}" if local else _get(segment, 13, 1, 1)
    return {
        "PID-3": _get(segment, 3, mr, 1) if mr else "",
        "PID-3.4": _get(segment, 3, mr, 4) if mr else "",
        "PID-5.1": _get(segment, 5, 1, 1),
        "PID-5.2": _get(segment, 5, 1, 2),
        "PID-5.3": _get(segment, 5, 1, 3),
        "PID-7": _get(segment, 7),
        "PID-8": _get(segment, 8),
        "PID-10": _get(segment, 10),
        "PID-11.1": _get(segment, 11, 1, 1),
        "PID-11.3": _get(segment, 11, 1, 3),
        "PID-11.4": _get(segment, 11, 1, 4),
        "PID-11.5": _get(segment, 11, 1, 5),
        "PID-11.6": _get(segment, 11, 1, 6),
        "PID-13": phone,
        "PID-22": _get(segment, 22),
    }


def _rxa(segment: _Segment) -> dict[str, str]:
    cvx, cvx_text = _coded(segment, 5, "CVX")
    ndc, _ = _coded(segment, 5, "NDC")
    if not cvx and not _get(segment, 5, 1, 3) and not _get(segment, 5, 1, 6):
        cvx, cvx_text = _get(segment, 5, 1, 1), _get(segment, 5, 1, 2)  # no coding system named: CVX, as the guide
    amount = _get(segment, 6)
    provider_id = _get(segment, 10, 1, 1)
    npi = any("NPI" in _get(segment, 10, 1, n).upper() for n in (9, 13))
    name = " ".join(p for p in (_get(segment, 10, 1, 3), _get(segment, 10, 1, 2)) if p)
    return {
        "RXA-3": _get(segment, 3),
        "RXA-5": cvx,
        "RXA-5.2": cvx_text,
        "RXA-5 NDC": ndc,
        "RXA-6": "" if amount == "999" else amount,
        "RXA-7": _get(segment, 7),
        "RXA-9": _get(segment, 9),
        "RXA-10": provider_id if npi else "",
        "RXA-10.1": provider_id,
        "RXA-10 name": name,
        "RXA-11": _get(segment, 11, 1, 4),
        "RXA-15": _get(segment, 15),
        "RXA-16": _get(segment, 16),
        "RXA-17": _get(segment, 17),
        "RXA-18": _get(segment, 18),
        "RXA-18.2": _get(segment, 18, 1, 2) or _get(segment, 18),
        "RXA-20": _get(segment, 20),
        "RXA-21": _get(segment, 21),
        "RXA-22": _get(segment, 22),
    }


def _coded(segment: _Segment, number: int, system: str) -> tuple[str, str]:
    """The (code, text) of a coded field's triplet (1-3 or its alternate 4-6) in ``system``, any repetition."""
    for rep in _repetitions(segment, number):
        for code, text, named in ((1, 2, 3), (4, 5, 6)):
            if _get(segment, number, rep, named).upper() == system:
                return _get(segment, number, rep, code), _get(segment, number, rep, text)
    return "", ""


@lru_cache(maxsize=64)
def _header(msh: str) -> Any:
    """The start of an MSH segment (up to MSH-2) parsed by python-hl7: the message's encoding characters,
    and what unescapes its values. Most files use one set, parsed once."""
    return hl7.parse(msh)


class _Segment:
    """One segment, split into fields; a field is split into repetitions, components and subcomponents
    when it is read, and its value unescaped by python-hl7 with the message's own characters."""

    __slots__ = ("escape", "fields", "header", "kind", "separators")

    def __init__(self, text: str, separators: str, escape: str, header: Any) -> None:
        self.separators, self.escape, self.header = separators, escape, header
        self.fields = text.split(separators[1])
        self.kind = self.fields[0]
        if self.kind == "MSH":  # MSH-1 is the field separator itself: MSH-2 is the first field after it
            self.fields.insert(1, separators[1])

    def field(self, number: int) -> str:
        return self.fields[number] if number < len(self.fields) else ""

    def repetitions(self, number: int) -> int:
        return len(self.field(number).split(self.separators[2]))

    def get(self, number: int, rep: int, component: int, sub: int) -> str:
        reps = self.field(number).split(self.separators[2])
        if rep > len(reps):
            return ""
        components = reps[rep - 1].split(self.separators[3])
        if component > len(components):
            return ""
        subs = components[component - 1].split(self.separators[4])
        if sub > len(subs):
            return ""
        value = subs[sub - 1]
        if self.escape in value:
            value = str(self.header.unescape(value))
        return value.strip()


def _repetitions(segment: _Segment, number: int) -> range:
    return range(1, segment.repetitions(number) + 1)


def _get(segment: _Segment, number: int, rep: int = 1, component: int = 1, sub: int = 1) -> str:
    """A field's value, unescaped, or ``""`` when the message does not reach it."""
    return segment.get(number, rep, component, sub)
