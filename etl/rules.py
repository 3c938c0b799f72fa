"""The catalogue of row outcomes' codes: each stable, kebab-case, explained, worded once.

Each code a report can hold is one :class:`Rule`: what it means (``title``),
what to do about it (``fix``) and the message a row carries (``template``,
with named placeholders, and any ``variants``: other wordings of the same
outcome). Code that rejects, warns about or fails a row builds the row's code
and message through its entry, ``RULES["max-items"]``: :meth:`Rule.text` for
one message (a notice, a load result), :meth:`Rule.message` for a column of
them (a polars expression over the rows). ``clinik-etl explain`` and
``report.html`` read the same entries, so a message's wording and its
explanation live here and nowhere else.

Rejections (``reject``) come from validation; warnings (``warning``) leave the
row valid; a domain rule (not one of the API's hard limits) has a default ``severity``,
``error`` (the row is rejected), ``warning`` (the row goes through, flagged) or ``off``, which a
profile's ``[rules]`` section changes (:func:`parse_severities`); ``load`` codes explain rows that
failed or were not sent. API error
codes (``api``: ``VALIDATION_ERROR``, ``RATE_LIMITED`` ...) are the API's own
and pass through unchanged, with the API's message; they are listed so that
``clinik-etl explain`` can say what to do about them too.
"""

from __future__ import annotations

import string
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Literal

import polars as pl

__all__ = [
    "API_RULES",
    "PLACEHOLDERS",
    "REDACTION_MARKERS",
    "RULES",
    "RULE_ALIASES",
    "SEVERITIES",
    "Rule",
    "catalogue",
    "explain",
    "format_text",
    "parse_severities",
    "severity_of",
]

Kind = Literal["reject", "warning", "load", "api"]
Severity = Literal["error", "warning", "off"]

#: What a profile's ``[rules]`` section may set a domain rule to.
SEVERITIES: tuple[Severity, ...] = ("error", "warning", "off")

#: Cell values that stand for "no value": a cell holding one (any case, spaces trimmed) is read as
#: empty, so no length, format or conflict rule fires on it, and a field that is required reports
#: ``required``. The redaction markers among them report ``redacted`` instead (:data:`REDACTION_MARKERS`).
#: A field whose own values include one of these words keeps it (a sex of ``UNK`` is "unknown"), and
#: a name column keeps ``Na`` and ``Nil`` (family names).
PLACEHOLDERS: tuple[str, ...] = (
    "redacted", "[redacted]", "unk", "unknown", "n/a", "na", "n.a.", "null", "none", "nil", "-", "--", "?", "#n/a",
)

#: Placeholders that say a value exists but was withheld (a redacted CVRS extract): a field a
#: payload needs gives the code ``redacted`` rather than ``required``.
REDACTION_MARKERS: tuple[str, ...] = ("redacted", "[redacted]")

#: Other names a profile's ``[rules]`` section may use for a code.
RULE_ALIASES: dict[str, str] = {"expired-lot": "expiration-before-occurrence"}

_FORMATTER = string.Formatter()


def format_text(template: str, *values: str | pl.Expr) -> pl.Expr:
    """``template`` with each ``{}`` replaced by a value (a column name or an expression), as
    :func:`polars.format` does (a row where a value is null has a null text).

    Built with :func:`polars.concat_str`: ``polars.format`` panics on a string column of several
    chunks that a filter has cut (polars 2.1; met on a real Synthea export read whole).
    """
    pieces = template.split("{}")
    if len(pieces) != len(values) + 1:
        raise ValueError(f"{template!r} has {len(pieces) - 1} places for {len(values)} values")
    parts: list[pl.Expr] = []
    for piece, value in zip(pieces, values, strict=False):
        parts += [pl.lit(piece), pl.col(value) if isinstance(value, str) else value]
    return pl.concat_str([*parts, pl.lit(pieces[-1])])


@dataclass(frozen=True)
class Rule:
    """One code: what it means, what to do about it, and how a row's message says it.

    ``template`` (and each of ``variants``) is :meth:`str.format` text whose placeholders are named,
    ``"at most {limit} characters"``; a code without a fixed wording (an API's own) has none.
    """

    code: str
    kind: Kind
    title: str
    fix: str
    template: str = ""
    variants: Mapping[str, str] = field(default_factory=dict)
    #: A domain rule's default severity; None for a rule no profile may change (the API's limits).
    severity: Severity | None = None

    @property
    def default_kind(self) -> str:
        """What the rule does to a row unless a profile says otherwise: a domain rule's, by its default severity
        (``expiration-before-occurrence``, of a reject kind, only warns by default)."""
        if self.severity is None:
            return self.kind
        return "reject" if self.severity == "error" else self.severity

    @property
    def shown_kind(self) -> str:
        """:attr:`default_kind` as ``explain CODE`` and ``report.html`` show it (``warning by default``)."""
        return self.kind if self.severity is None else f"{self.default_kind} by default"

    def template_of(self, variant: str = "") -> str:
        """The wording of ``variant`` (``""``: the usual one)."""
        if not variant:
            return self.template
        try:
            return self.variants[variant]
        except KeyError:
            raise KeyError(f"{self.code} has no message variant {variant!r}") from None

    def placeholders(self, variant: str = "") -> tuple[str, ...]:
        """The names a wording needs, in order of first use."""
        names = (name for _, name, _, _ in _FORMATTER.parse(self.template_of(variant)) if name is not None)
        return tuple(dict.fromkeys(names))

    def text(self, variant: str = "", /, **values: object) -> str:
        """One row's message: the wording with ``values`` put in."""
        return self.template_of(variant).format(**values)

    def message(self, variant: str = "", /, **values: pl.Expr | object) -> pl.Expr:
        """The message of every row, as an expression: a value may be a column (an expression), or one
        value for all rows. As :func:`polars.format`, a row where a column is null has a null message.

        A column's value is put in as its text: a format spec (``{limit:g}``) or conversion
        (``{reference!r}``) needs a plain value.
        """
        parts: list[pl.Expr] = []
        literal: list[str] = []
        for text, name, spec, conversion in _FORMATTER.parse(self.template_of(variant)):
            literal.append(text)
            if name is None:
                continue
            value = values[name]
            if isinstance(value, pl.Expr):
                if spec or conversion:
                    raise ValueError(f"{self.code}: {{{name}}} has a format; give it a plain value, not a column")
                parts += [pl.lit("".join(literal)), value]
                literal = []
            else:
                literal.append(_FORMATTER.format_field(_FORMATTER.convert_field(value, conversion), spec or ""))
        if not parts:
            return pl.lit("".join(literal), dtype=pl.String)
        parts.append(pl.lit("".join(literal)))
        return pl.concat_str(parts)


API_RULES = (
    Rule(
        "VALIDATION_ERROR",
        "api",
        "the API refused the body (422); the field is in the row's message",
        "correct that field in the source; if the file passed `validate`, report it: a limit is missing here",
    ),
    Rule("BAD_REQUEST", "api", "the API could not read the request (400)", "report it: the toolkit sent it"),
    Rule(
        "RATE_LIMITED",
        "api",
        "the plan's request limit was reached (429) and retries ran out",
        "re-run later (nothing is sent twice), or lower --rate",
    ),
    Rule(
        "UNAUTHORIZED",
        "api",
        "no usable API key (401); the run stopped",
        "set CLINIKAPI_SECRET_KEY or --api-key-file",
    ),
    Rule("INVALID_KEY_FORMAT", "api", "the key is not a clk_ key (401)", "copy the whole key from the dashboard"),
    Rule("INVALID_KEY", "api", "the API does not know this key (401)", "check the key and the --base-url"),
    Rule("KEY_REVOKED", "api", "the key was revoked (401)", "create a new key"),
    Rule("KEY_EXPIRED", "api", "the key has expired (401)", "create a new key"),
    Rule("INSUFFICIENT_SCOPE", "api", "the key may not write (403)", "use a key with write scope"),
    Rule(
        "NOT_FOUND",
        "api",
        "a referenced resource does not exist for this key (404)",
        "check the reference (e.g. a practitioner id) or load it first",
    ),
    Rule("INTERNAL_ERROR", "api", "the API failed (500)", "re-run: the row is looked up before it is re-sent"),
)


def catalogue(rules: Iterable[Rule]) -> dict[str, Rule]:
    """The entries by code; a code written twice is a mistake (the second would silently win)."""
    found: dict[str, Rule] = {}
    for rule in rules:
        if rule.code in found:
            raise ValueError(f"the code {rule.code!r} has two catalogue entries")
        found[rule.code] = rule
    return found


RULES: dict[str, Rule] = catalogue(
    (
        # --- validation: the row is rejected ----------------------------------------------------
        Rule(
            "required",
            "reject",
            "a required value is empty",
            "fill the cell, or set a default in the profile",
            "a value is required",
            {"with-patient": "required when the row names a patient's details"},
        ),
        Rule(
            "max-length",
            "reject",
            "longer than the API allows",
            "shorten the value to the documented maximum",
            "at most {limit} characters",
            {"item": "each item at most {limit} characters"},
        ),
        Rule(
            "enum",
            "reject",
            "not one of the allowed values",
            "use one of the values listed in the message",
            "one of {allowed}",
        ),
        Rule(
            "date-format",
            "reject",
            "not a date the toolkit can read",
            "write dates as YYYY-MM-DD (or YYYY-MM-DDTHH:MM:SS with an offset)",
            "a date such as 2024-03-31",
        ),
        Rule("number-format", "reject", "not a number", "write a plain decimal number such as 0.5", "a number"),
        Rule("integer-format", "reject", "not a whole number", "write a whole number such as 2", "a whole number"),
        Rule("boolean-format", "reject", "not true or false", "write true/false, yes/no or 1/0", "true or false"),
        Rule(
            "email-format",
            "reject",
            "not an e-mail address",
            "correct the address or leave the cell empty",
            "an e-mail address",
        ),
        Rule(
            "max-items",
            "reject",
            "too many items in a list cell",
            "keep at most the documented number of ';'-separated items",
            "at most {limit} items",
            {"document": "the document has {sections} sections; at most {limit}"},
        ),
        Rule("maximum", "reject", "above the documented maximum", "correct the number", "at most {limit:g}"),
        Rule(
            "minimum",
            "reject",
            "below the smallest allowed number (a negative dose, say)",
            "correct the number",
            "at least {limit:g}",
            {"exclusive": "above {limit:g}"},
        ),
        Rule(
            "future-date",
            "reject",
            "a date in the future (a dose, a birth, a record, an encounter's start)",
            "correct the date; a dose cannot be given tomorrow",
            "not after {today}",
            severity="error",
        ),
        Rule(
            "expiration-before-occurrence",
            "reject",
            "the lot expired before the dose was given (a warning by default: the dose was given and must be on "
            "record; `expired-lot = \"error\"` in a profile's [rules] rejects it)",
            "check the expiration and administration dates",
            "not before the administration date",
            severity="warning",
        ),
        Rule(
            "dose-number-above-series",
            "reject",
            "dose number above the doses in the series",
            "check the dose number and the series doses",
            "not above the series doses",
            severity="error",
        ),
        Rule(
            "occurrence-before-birth",
            "reject",
            "the dose was given before the patient was born",
            "check the administration date and the date of birth",
            "not before the patient's birth date",
            severity="error",
        ),
        Rule(
            "end-before-start",
            "reject",
            "an end before its start (an encounter's period, a task's window)",
            "check the start and end date-times",
            "not before the start",
            severity="error",
        ),
        Rule(
            "duplicate-key",
            "reject",
            "the same record id appears earlier in the input",
            "remove the repeated row or give it its own record id",
            "appears earlier in the file",
        ),
        Rule(
            "patient-conflict",
            "reject",
            "the same patient id appears earlier with different demographics",
            "make the patient's name, birth date and contact details agree on every row",
            "differs from this patient's earlier row",
        ),
        Rule(
            "redacted",
            "reject",
            "the cell holds a redaction marker, not a value",
            "get an export with this column unredacted, or stop mapping the column in the profile",
            "withheld in a redacted extract",
        ),
        Rule(
            "unknown-cvx",
            "reject",
            "a CVX code CDC's CVX table does not list (the table ships with the toolkit: `schemas/data/cvx.csv`)",
            "correct the code; if CDC added it since, refresh the table "
            "(`python -m schemas.refresh_codes cvx cvx.txt`)",
            "not in the CVX table",
            severity="error",
        ),
        Rule(
            "unknown-mvx",
            "reject",
            "a manufacturer written as a code (2 to 4 capitals) that the MVX table does not list",
            "correct the code, or write the manufacturer's name; refresh the table from CDC's mvx.txt "
            "(`python -m schemas.refresh_codes mvx mvx.txt`) if the code is new",
            "not in the MVX table",
            severity="error",
        ),
        Rule(
            "zip-format",
            "reject",
            "not a US ZIP code: 5 digits or ZIP+4 (`02134`, `02134-1234`)",
            "correct the ZIP code; a non-US postal code needs the row's country, or a profile's "
            "`[defaults] patient_country` for a whole file from abroad",
            "a ZIP code such as 02134 or 02134-1234 (a row without a country is read as a US address)",
            severity="error",
        ),
        Rule(
            "scientific-notation-id",
            "reject",
            "an id in scientific notation (`3.64992E+12`): a spreadsheet turned it into a number and its last "
            "digits are lost, so two people could be merged",
            "export the column as text (in Excel: format the column as Text before saving) and re-run",
            "an id in scientific notation; its true digits are lost",
        ),
        Rule(
            "ambiguous-year",
            "reject",
            "a two-digit year with no plausible reading (before 1900)",
            "write the year with four digits",
            "two-digit year with no plausible century",
        ),
        Rule(
            "document-rejected",
            "reject",
            "another row of the same document was rejected, so the whole document is",
            "fix the rejected row with the same document id and re-run",
            "another row of this document is rejected (row {row})",
            {"sibling": "another row of this document is rejected"},
        ),
        # --- the plan: references between rows ---------------------------------------------------
        Rule(
            "parent-rejected",
            "reject",
            "the row it refers to (patient, practitioner, encounter) was rejected",
            "fix the referenced row first; this one goes through with it",
            "{column} ({value}): the {kind} row it names was rejected",
        ),
        Rule(
            "unresolved-reference",
            "reject",
            "refers to an id found nowhere: not in the inputs, the crosswalk, the state store or the target",
            "include the referenced rows in the run, or map the id with --crosswalk",
            "{column} ({value}): no {kind} with this id in the inputs, the crosswalk or the target",
            # The loader's last check, when a reference has no id at send time.
            {"at-send": "no id for {kind} {reference!r}"},
        ),
        Rule(
            "fhir-invalid",
            "reject",
            "the row's Redox message bundle is not valid FHIR R4 (the field names the FHIR path)",
            "correct the source value that feeds that path (a dose number of 0, say) and re-run",
            "{reason}",  # the FHIR check's own words
        ),
        # --- reading and mapping: the row stays valid --------------------------------------------
        Rule(
            "code-status",
            "warning",
            "a CVX code CDC marks as not in US use (`Non-US`, `Never Active` or `Pending`); `Inactive` codes, "
            "which CDC keeps for historical doses, pass silently",
            "nothing if the dose was given abroad; else check the code",
            "CVX {code} is {status} in CDC's table",
            severity="warning",
        ),
        Rule(
            "two-digit-year",
            "warning",
            "a date written with a two-digit year (`2/14/24`); the century was chosen: a birth year is the latest "
            "one not in the future and not after the row's event date, any other year the one nearest the "
            "file's other dates",
            "check the year; write four digits to be sure",
            "two-digit year read as {year}",
            severity="warning",
        ),
        Rule(
            "excel-serial-date",
            "warning",
            "a date written as an Excel serial number (`45321`) in a text file; read in Excel's 1900 system "
            "(serials from 1920 to 2099 only)",
            "check the date; format the column as a date before saving",
            "Excel serial number read as {date}",
            severity="warning",
        ),
        Rule(
            "leading-zero-restored",
            "warning",
            "a code that lost its leading zero in a spreadsheet (CVX `8` for `08`, ZIP `2134` in a state whose "
            "ZIP codes start with 0); the zero was put back",
            "nothing; format the column as text before saving to keep the zeros",
            "leading zero restored: {value}",
            severity="warning",
        ),
        Rule(
            "derived-dropped",
            "warning",
            "a value the toolkit derives from other columns (lengthMinutes from an encounter's period) would break "
            "the API's limit, so it is left out of the payload; the row is sent without it",
            "nothing: the values it came from are sent (a long stay keeps its period)",
            "{target} derived from other columns is {why}; left out",
        ),
        Rule(
            "unmapped-code",
            "warning",
            "a route or site spelling the toolkit does not know",
            "it is sent as written; use a standard code to normalise it",
            "not a known {field} spelling; sent as written",
        ),
        Rule(
            "encoding-fallback",
            "warning",
            "the file is not UTF-8 and was read as Windows-1252",
            "save the file as UTF-8 to be sure accents are right",
            "not valid UTF-8 (line {line}, byte {offset}); read as Windows-1252 (cp1252): check accented characters",
        ),
        Rule(
            "other-sheets",
            "warning",
            "the workbook has more sheets than the one read",
            "use --sheet NAME",
            "read sheet {sheet!r}; not read: {others}",
        ),
        Rule(
            "encoding-guessed",
            "warning",
            "the file is UTF-16 without a byte-order mark, recognised by its zero bytes",
            "check accented characters; save the file as UTF-8 to be sure",
            "no byte-order mark; read as {encoding}",
        ),
        Rule(
            "line-endings",
            "warning",
            "some lines end in a lone carriage return (old Mac files, or mixed endings); each was read as a line break",
            "nothing, if the row count is right; else save the file with one kind of line ending",
            "lone \\r line endings, each read as a line break",
        ),
        Rule(
            "title-rows",
            "warning",
            "rows above the header (a title, notes, blank lines) were not read",
            "nothing, if the header was found on the right row; else pass --header-row N (or a profile's header_row)",
            "header found on row {row}; the {skipped} row(s) above it were not read",
        ),
        Rule(
            "header-renamed",
            "warning",
            "a header cell was blank, or repeated an earlier one, and was named column_N (N: its position)",
            "name the column in the file, or map column_N in a profile's [columns]; its data is not imported otherwise",
            "header cell(s) renamed: {renamed}",
        ),
        Rule(
            "format-mismatch",
            "warning",
            "the file's name says CSV but it is an Excel workbook; it was read as a workbook",
            "give the file the .xlsx extension",
            "{named} but is an Excel workbook: read as one",
        ),
        Rule(
            "decimal-comma",
            "warning",
            "a ';'-delimited file writes this number column with a decimal comma (0,5), so it is read as 0.5",
            "nothing, if that is right; otherwise set decimal_comma = false in the profile",
            "{column}: decimal commas read as points (0,5 is 0.5)",
        ),
        Rule(
            "filtered",
            "load",
            "the profile's [[skip]] filter leaves the row out (an action flag, a record type ...); it is not sent",
            "nothing, if the filter is right; otherwise change the profile's [[skip]]",
            "{reason}",
        ),
        Rule(
            "performer-unlinked",
            "warning",
            "the performer is named without an NPI or id, by one name only: no practitioner can be linked or created",
            "give the performer's NPI, id or full name (a practitioner needs a first and a last name)",
            "performer named by one name only, without an NPI or id: not linked to a practitioner",
        ),
        Rule(
            "unmapped-columns",
            "warning",
            "some columns are not imported",
            "map them in a profile if they matter",
            "not imported: {columns}",
            {"more": "not imported: {columns} and {more} more"},
        ),
        Rule(
            "message-without-dose",
            "warning",
            "some HL7 messages hold no RXA segment (no dose): they give no row",
            "nothing, if they are acknowledgements or queries; else check the sending system's export",
            "{count} HL7 message(s) hold no RXA segment, so no row: the message(s) at line(s) {lines}",
        ),
        Rule(
            "deleted-in-source",
            "load",
            "the sender deleted this dose (HL7 RXA-21 = D): it is not sent",
            "nothing, if the dose was never loaded; else remove it in the target by hand "
            "(a profile's hl7_deletes = \"reject\" makes such rows rejected instead)",
            "RXA-21 = D: the sending system deleted this dose; not sent",
        ),
        Rule(
            "superseded-in-source",
            "load",
            "a later message of the same HL7 file updates or deletes this dose (same ORC-3): the later one counts",
            "nothing: the latest version of the dose is the one sent (or skipped, if deleted)",
            "the message at line {line} updates or deletes this dose (same ORC-3); not sent",
        ),
        # --- the load: the row failed or was not sent --------------------------------------------
        Rule(
            "parent-failed",
            "load",
            "the row it refers to could not be created at the API",
            "see that row's error (same id) in rows.csv; fix it and re-run",
            "{kind} {reference!r} not created ({code}: {reason})",
        ),
        Rule(
            "parent-unknown",
            "load",
            "the row it refers to has an unknown outcome",
            "re-run: unknown outcomes are resolved before anything is sent",
            "the {kind} {reference!r} has an unknown outcome; re-run to resolve it",
        ),
        Rule(
            "unknown-outcome",
            "load",
            "sent, but no answer came back (timeout, 5xx, dropped connection)",
            "re-run or run `clinik-etl reconcile`: the row is looked up before anything is re-sent",
            "{reason}",  # what the client saw: "timeout", "HTTP 502" ...
            {
                "not-looked-up": "not looked up: run stopped: {why}",
                "answer-lost": "the import's answer was lost",
                "no-ids": "imported by bulk job {job}, which returns no ids",
                "unknown-job": "bulk job {job} is unknown to the API",
            },
        ),
        Rule(
            "not-sent",
            "load",
            "not sent because the run stopped early",
            "fix the cause and re-run",
            "run stopped: {why}",
            {
                "interrupted": "run interrupted before sending",
                "bulk-interrupted": "run interrupted",
                "bulk-limit": "{why}",  # the bulk loader's note on the hourly limit says it all
            },
        ),
        Rule(
            "untrusted-certificate",
            "load",
            "the target's TLS certificate did not verify, so nothing was sent and the run stopped",
            "check --base-url; for a private CA, set SSL_CERT_FILE to its bundle (verification stays on)",
            "the target's TLS certificate is not trusted (certificates are always verified: for a private CA, "
            "set SSL_CERT_FILE to its bundle)",
        ),
        Rule(
            "not-updated",
            "load",
            "the row changed since it was created, and the update (--update) could not be made",
            "see the message; fix the cause and re-run with --update",
            "{reason}",  # what the client saw
            {"cannot": "this target cannot update", "no-id": "no id for {kind} {reference!r}"},
        ),
        Rule(
            "BULK_RECORD_ERROR",
            "load",
            "a bulk import (--mode bulk) refused this row's line; the message is the API's, such as "
            "`patientId: Patient pat_... not found`",
            "correct the row (or the crosswalk id it names) and re-run: only refused rows are sent again",
            "{reason}",  # the import's errors for the line, joined by "; "
            {"no-reason": "refused by the import, no reason given"},
        ),
        Rule(
            "BULK_JOB_FAILED",
            "load",
            "the bulk job stopped before it reached this row",
            "re-run: the row was not imported and is sent again",
            "bulk job {job}: {reason}",
        ),
        Rule(
            "bulk-pending",
            "load",
            "the row's bulk job had not finished (or could not be read) when the run ended",
            "re-run with the same --state: the job is polled, not submitted again",
            "bulk job {job}: {reason}; re-run to poll it",
            {"running": "bulk job {job} still running; re-run to poll it"},
        ),
        # The API's own codes, as rows.csv shows them for failed rows.
        *API_RULES,
    )
)


def severity_of(code: str, overrides: Mapping[str, str] | None = None) -> Severity | None:
    """The severity of a domain rule under a profile's ``overrides`` (None: not a domain rule)."""
    rule = RULES[code]
    if rule.severity is None:
        return None
    chosen = (overrides or {}).get(code, rule.severity)
    return chosen if chosen in SEVERITIES else rule.severity


def parse_severities(raw: object) -> dict[str, Severity]:
    """A profile's ``[rules]`` table (code or alias -> ``error``/``warning``/``off``), by code.

    Raises ValueError naming the first entry that is not a domain rule or not a severity.
    """
    if not isinstance(raw, Mapping):
        raise ValueError("[rules] is a table of code = severity")
    out: dict[str, Severity] = {}
    changeable = sorted(code for code, rule in RULES.items() if rule.severity is not None)
    for name, value in raw.items():
        code = RULE_ALIASES.get(str(name), str(name))
        if code not in RULES or RULES[code].severity is None:
            raise ValueError(
                f"[rules] {name!r} is not a rule a profile can change; those are: {', '.join(changeable)}"
            )
        if value not in SEVERITIES:
            raise ValueError(f"[rules] {name} = {value!r}: a severity is one of {', '.join(SEVERITIES)}")
        out[code] = value
    return out


def explain(code: str) -> Rule | None:
    """The rule behind a code, if the toolkit defines it."""
    return RULES.get(code)
