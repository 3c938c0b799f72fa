"""The catalogue of row outcomes' codes: each stable, kebab-case, explained.

Rejections (``reject``) come from validation; warnings (``warning``) leave the
row valid; ``load`` codes explain rows that failed or were not sent. API error
codes (``VALIDATION_ERROR``, ``RATE_LIMITED`` ...) are the API's own and pass
through unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class Rule:
    """One code: what it means and what to do about it."""

    code: str
    kind: Literal["reject", "warning", "load"]
    title: str
    fix: str


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
        Rule("unmapped-columns", "warning", "some columns are not imported", "map them in a profile if they matter"),
        Rule(
            "patient-failed",
            "load",
            "the row's patient could not be created",
            "see the patient's error for the same patient id; fix it and re-run",
        ),
        Rule(
            "patient-unknown",
            "load",
            "the row's patient create has an unknown outcome",
            "re-run: the loader resolves unknown outcomes before sending",
        ),
        Rule(
            "unknown-outcome",
            "load",
            "sent, but no answer came back (timeout, 5xx, dropped connection)",
            "re-run or run `clinik-etl reconcile`: the row is looked up before anything is re-sent",
        ),
        Rule("not-sent", "load", "not sent because the run stopped early", "fix the cause and re-run"),
    )
}


def explain(code: str) -> Rule | None:
    """The rule behind a code, if the toolkit defines it."""
    return RULES.get(code)
