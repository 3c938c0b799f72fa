"""The catalogue of row outcomes' codes: each stable, kebab-case, explained.

Rejections (``reject``) come from validation; warnings (``warning``) leave the
row valid; ``load`` codes explain rows that failed or were not sent. API error
codes (``api``: ``VALIDATION_ERROR``, ``RATE_LIMITED`` ...) are the API's own
and pass through unchanged; they are listed so that ``clinik-etl explain``
can say what to do about them too.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class Rule:
    """One code: what it means and what to do about it."""

    code: str
    kind: Literal["reject", "warning", "load", "api"]
    title: str
    fix: str


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


RULES: dict[str, Rule] = {
    r.code: r
    for r in (
        Rule("required", "reject", "a required value is empty", "fill the cell, or set a default in the profile"),
        Rule("max-length", "reject", "longer than the API allows", "shorten the value to the documented maximum"),
        Rule("enum", "reject", "not one of the allowed values", "use one of the values listed in the message"),
        Rule(
            "date-format",
            "reject",
            "not a date the toolkit can read",
            "write dates as YYYY-MM-DD (or YYYY-MM-DDTHH:MM:SS with an offset)",
        ),
        Rule("number-format", "reject", "not a number", "write a plain decimal number such as 0.5"),
        Rule("integer-format", "reject", "not a whole number", "write a whole number such as 2"),
        Rule("boolean-format", "reject", "not true or false", "write true/false, yes/no or 1/0"),
        Rule("email-format", "reject", "not an e-mail address", "correct the address or leave the cell empty"),
        Rule(
            "max-items",
            "reject",
            "too many items in a list cell",
            "keep at most the documented number of ';'-separated items",
        ),
        Rule("maximum", "reject", "above the documented maximum", "correct the number"),
        Rule("minimum", "reject", "below the smallest allowed number (a negative dose, say)", "correct the number"),
        Rule("future-date", "reject", "a date in the future", "correct the date; a dose cannot be given tomorrow"),
        Rule(
            "expiration-before-occurrence",
            "reject",
            "the lot expired before the dose was given",
            "check the expiration and administration dates",
        ),
        Rule(
            "dose-number-above-series",
            "reject",
            "dose number above the doses in the series",
            "check the dose number and the series doses",
        ),
        Rule(
            "occurrence-before-birth",
            "reject",
            "the dose was given before the patient was born",
            "check the administration date and the date of birth",
        ),
        Rule(
            "duplicate-key",
            "reject",
            "the same record id appears earlier in the input",
            "remove the repeated row or give it its own record id",
        ),
        Rule(
            "patient-conflict",
            "reject",
            "the same patient id appears earlier with different demographics",
            "make the patient's name, birth date and contact details agree on every row",
        ),
        Rule(
            "unknown-cvx",
            "warning",
            "a CVX code the toolkit's table does not list",
            "check the code; it is sent as written",
        ),
        Rule(
            "unmapped-code",
            "warning",
            "a route or site spelling the toolkit does not know",
            "it is sent as written; use a standard code to normalise it",
        ),
        Rule(
            "encoding-fallback",
            "warning",
            "the file is not UTF-8 and was read as Windows-1252",
            "save the file as UTF-8 to be sure accents are right",
        ),
        Rule("other-sheets", "warning", "the workbook has more sheets than the one read", "use --sheet NAME"),
        Rule(
            "encoding-guessed",
            "warning",
            "the file is UTF-16 without a byte-order mark, recognised by its zero bytes",
            "check accented characters; save the file as UTF-8 to be sure",
        ),
        Rule(
            "line-endings",
            "warning",
            "some lines end in a lone carriage return (old Mac files, or mixed endings); each was read as a line break",
            "nothing, if the row count is right; else save the file with one kind of line ending",
        ),
        Rule(
            "format-mismatch",
            "warning",
            "the file's name says CSV but it is an Excel workbook; it was read as a workbook",
            "give the file the .xlsx extension",
        ),
        Rule("unmapped-columns", "warning", "some columns are not imported", "map them in a profile if they matter"),
        Rule(
            "parent-failed",
            "load",
            "a resource the row refers to (its patient, visit, practitioner) could not be created",
            "see the parent row's error; fix it and re-run",
        ),
        Rule(
            "parent-unknown",
            "load",
            "a resource the row refers to has an unknown outcome",
            "re-run: the loader resolves unknown outcomes before sending",
        ),
        Rule(
            "unresolved-reference",
            "reject",
            "a reference (patient, visit, practitioner ...) matches nothing",
            "load the parent's file in the same run, pass --crosswalk, or use an existing ClinikAPI id",
        ),
        Rule(
            "parent-rejected",
            "reject",
            "the row refers to a row that was rejected",
            "fix the parent row (see its reasons) and import both again",
        ),
        Rule(
            "document-rejected",
            "reject",
            "another row (section) of the same document is rejected",
            "fix the document's rejected row; a document is sent whole or not at all",
        ),
        Rule(
            "end-before-start",
            "reject",
            "a period ends before it starts",
            "check the start and end date-times",
        ),
        Rule(
            "redacted",
            "reject",
            "the value is withheld in a redacted extract",
            "load the identified extract; a patient cannot be created without a name",
        ),
        Rule(
            "unknown-outcome",
            "load",
            "sent, but no answer came back (timeout, 5xx, dropped connection)",
            "re-run or run `clinik-etl reconcile`: the row is looked up before anything is re-sent",
        ),
        Rule("not-sent", "load", "not sent because the run stopped early", "fix the cause and re-run"),
        Rule(
            "untrusted-certificate",
            "load",
            "the target's TLS certificate did not verify, so nothing was sent and the run stopped",
            "check --base-url; for a private CA, set SSL_CERT_FILE to its bundle (verification stays on)",
        ),
        Rule(
            "BULK_RECORD_ERROR",
            "load",
            "a bulk import (--mode bulk) refused this row's line; the message is the API's, such as "
            "`patientId: Patient pat_... not found`",
            "correct the row (or the crosswalk id it names) and re-run: only refused rows are sent again",
        ),
        Rule(
            "BULK_JOB_FAILED",
            "load",
            "the bulk job stopped before it reached this row",
            "re-run: the row was not imported and is sent again",
        ),
        Rule(
            "bulk-pending",
            "load",
            "the row's bulk job had not finished (or could not be read) when the run ended",
            "re-run with the same --state: the job is polled, not submitted again",
        ),
        Rule(
            "fhir-invalid",
            "reject",
            "the row's Redox message bundle is not valid FHIR R4 (the field names the FHIR path)",
            "correct the source value that feeds that path (a dose number of 0, say) and re-run",
        ),
        Rule(
            "redacted",
            "reject",
            "the cell holds a redaction marker, not a value",
            "get an export with this column unredacted, or stop mapping the column in the profile",
        ),
        Rule(
            "end-before-start",
            "reject",
            "an end before its start (an encounter's period, a task's window)",
            "check the start and end date-times",
        ),
        Rule(
            "document-rejected",
            "reject",
            "another row of the same document was rejected, so the whole document is",
            "fix the rejected row with the same document id and re-run",
        ),
        Rule(
            "parent-rejected",
            "reject",
            "the row it refers to (patient, practitioner, encounter) was rejected",
            "fix the referenced row first; this one goes through with it",
        ),
        Rule(
            "unresolved-reference",
            "reject",
            "refers to an id found nowhere: not in the inputs, the crosswalk, the state store or the target",
            "include the referenced rows in the run, or map the id with --crosswalk",
        ),
        Rule(
            "parent-failed",
            "load",
            "the row it refers to could not be created at the API",
            "see that row's error (same id) in rows.csv; fix it and re-run",
        ),
        Rule(
            "parent-unknown",
            "load",
            "the row it refers to has an unknown outcome",
            "re-run: unknown outcomes are resolved before anything is sent",
        ),
        Rule(
            "not-updated",
            "load",
            "the row changed since it was created, and the update (--update) could not be made",
            "see the message; fix the cause and re-run with --update",
        ),
        # The API's own codes, as rows.csv shows them for failed rows.
        *API_RULES,
    )
}


def explain(code: str) -> Rule | None:
    """The rule behind a code, if the toolkit defines it."""
    return RULES.get(code)
