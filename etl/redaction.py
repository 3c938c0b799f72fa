"""What ``--redact`` leaves out of a report, so that it can be shared.

A redacted report holds no value of a field in :data:`schemas.canonical.REDACTED_FIELDS`: the
fields that name or reach a person (``PHI_FIELDS``: names, birth dates, contact details) and those
whose limits make them free text (``FREE_TEXT_FIELDS``: notes, reasons, descriptions, a document's
title and text), which may name anyone. Nor does it hold a column the profile did not map: what it
holds is unknown. So:

- messages (``rows.csv``, ``report.html``) quote :data:`MASK` instead of such a value;
- ``rejects.csv`` leaves those source columns out (:func:`left_out`);
- a dry run's ``payloads.ndjson`` shows :data:`MASK` in their place in each body
  (:func:`redact_bodies` for ClinikAPI bodies, :func:`masked` for the frame Redox bundles are
  built from). What a real load sends is never redacted.

Ids, codes and row numbers stay, so a colleague can still find the row.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import polars as pl

from schemas.canonical import KIND_SPECS, REDACTED_FIELDS

if TYPE_CHECKING:
    from etl.mapping import Mapped
    from etl.validate import Validation

__all__ = ["MASK", "left_out", "masked", "redact", "redact_bodies"]

#: What a redacted value reads as.
MASK = "[redacted]"


def _body_keys() -> list[str]:
    """The create-body keys that redacted fields feed (the last step of their target paths)."""
    keys = {
        f.target.split(":")[1].split(".")[-1].removesuffix("[]")
        for fields in (k.fields for k in KIND_SPECS.values())
        for f in fields
        if f.name in REDACTED_FIELDS and f.target
    }
    return sorted(keys)


_STRING = r'"(?:[^"\\]|\\.)*"'
# A key's value in compact JSON: a string, or an array of strings. Inside a JSON string every quote is
# escaped, so `"key":` can only match a real key, never text inside a value.
_BODY_VALUES = rf'"({"|".join(_body_keys())})":\s*(?:{_STRING}|\[\s*(?:{_STRING}\s*,?\s*)*\])'


def left_out(mapped: Mapped) -> list[str]:
    """The source columns a redacted report leaves out: those of redacted fields, and the unmapped ones."""
    redacted = {source for canonical, source in mapped.sources.items() if canonical in REDACTED_FIELDS}
    unmapped = set(mapped.unmapped)
    return [c for c in mapped.table.columns if c in redacted or c in unmapped]


def redact(mapped: Mapped, validation: Validation) -> None:
    """Leave redacted values out of everything the report shows of ``mapped`` (``--redact``).

    Rejections and warnings quote :data:`MASK` instead of the value; the source frame loses the
    columns of :func:`left_out`, so ``rejects.csv`` never has them.
    """
    hidden = pl.col("field").is_in(list(REDACTED_FIELDS)) & pl.col("value").is_not_null()
    mask = pl.when(hidden).then(pl.lit(MASK)).otherwise(pl.col("value")).alias("value")
    validation.rejects = validation.rejects.with_columns(mask)
    validation.warnings = validation.warnings.with_columns(mask)
    mapped.table.frame = mapped.table.frame.drop(left_out(mapped))


def redact_bodies(body: pl.Expr) -> pl.Expr:
    """ClinikAPI create bodies (JSON text) with each redacted field's value shown as :data:`MASK`."""
    return body.str.replace_all(_BODY_VALUES, f'"${{1}}":"{MASK}"')


def masked(frame: pl.DataFrame) -> pl.DataFrame:
    """A validated frame with the values of redacted fields (and their parsed forms) masked.

    Text reads :data:`MASK`, a list's items each read it, anything else (a parsed date) is left empty.
    """
    columns = []
    for name, dtype in frame.schema.items():
        if name.split("__")[0] not in REDACTED_FIELDS:
            continue
        col = pl.col(name)
        if dtype == pl.String:
            columns.append(pl.when(col.is_not_null()).then(pl.lit(MASK)).alias(name))
        elif dtype == pl.List(pl.String):
            columns.append(col.list.eval(pl.lit(MASK)).alias(name))
        else:
            columns.append(pl.lit(None, dtype=dtype).alias(name))
    return frame.with_columns(columns)
