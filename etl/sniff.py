"""What a column's values look like: the evidence ``clinik-etl profile init`` writes beside each guess.

:func:`sniff` looks at a column's sample values (whole-column polars expressions, no loop over
rows) and returns each :class:`Shape` they fit: dates and their pattern, Excel serials, CVX and
NDC codes, NPIs (10 digits, Luhn check digit), sex, route, site and encounter-class codes, small
counts, decimal commas, short code lists. Each shape carries how many samples fit it and a few of
them, so the profile can show its evidence.
"""

from __future__ import annotations

from dataclasses import dataclass

import polars as pl

from etl.codemaps import CODE_MAPS
from schemas.canonical import ENCOUNTER_CLASS_WORDS
from schemas.codes import displays, spellings

__all__ = ["DATE_PATTERNS", "READ_WITHOUT_PATTERN", "Shape", "sniff"]

#: Date and date-time patterns tried on a column, most usual first.
DATE_PATTERNS = (
    "%Y-%m-%d",
    "%m/%d/%Y",
    "%d/%m/%Y",
    "%Y%m%d",
    "%m%d%Y",
    "%Y%m%dT%H%M%S",
    "%Y-%m-%d %H:%M",
    "%Y-%m-%d %H:%M:%S",
    "%Y-%m-%dT%H:%M:%S",
    "%m/%d/%Y %H:%M",
    "%d.%m.%Y",
    "%m-%d-%Y",
)

#: Patterns the validator reads with no ``[parse]`` line (etl.validate's usual spellings).
READ_WITHOUT_PATTERN = frozenset({"%Y-%m-%d", "%m/%d/%Y", "%Y%m%d", "%Y-%m-%d %H:%M:%S", "%Y-%m-%dT%H:%M:%S"})

_FIT = 0.9  # share of the samples a shape must fit
_NDC = r"^(\d{4}-\d{4}-\d{2}|\d{5}-\d{3}-\d{2}|\d{5}-\d{4}-\d{1,2}|\d{11})$"
_SAMPLES = 3  # values quoted as evidence


@dataclass(frozen=True)
class Shape:
    """One shape a column's values fit: ``kind`` (``date``, ``cvx``, ``npi`` ...), its ``detail``
    (a date pattern, a built-in map's name), how many samples fit of how many, and a few of them."""

    kind: str
    detail: str
    fit: int
    of: int
    samples: tuple[str, ...]

    @property
    def evidence(self) -> str:
        """``3/3 values, e.g. "06102024", "06112024"``."""
        quoted = ", ".join(f'"{s}"' for s in self.samples)
        return f"{self.fit}/{self.of} values" + (f", e.g. {quoted}" if quoted else "")


def _luhn_npi(s: pl.Expr) -> pl.Expr:
    """Whether a 10-digit text is an NPI: its last digit is the Luhn check digit with the 80840 prefix."""
    digit = [s.str.slice(i, 1).cast(pl.Int32, strict=False) for i in range(10)]
    doubled = [pl.when(d * 2 > 9).then(d * 2 - 9).otherwise(d * 2) for d in digit[0:9:2]]
    total = pl.sum_horizontal(*doubled, *digit[1:9:2]) + 24  # 24: the prefix 80840's share
    return ((10 - total % 10) % 10) == digit[9]


def sniff(values: pl.Series, *, datelike: bool = False) -> list[Shape]:
    """The shapes the non-blank ``values`` fit, best first per kind (``datelike``: the header names a date,
    so 5-digit numbers may be Excel serials rather than ZIP codes)."""
    s = values.cast(pl.String).str.strip_chars()
    s = s.filter(s.str.len_bytes() > 0)
    n = s.len()
    if n == 0:
        return []
    frame = pl.DataFrame({"v": s})
    v = pl.col("v")
    shapes: list[Shape] = []

    def add(kind: str, detail: str, ok: pl.Expr, *, share: float = _FIT) -> bool:
        hits = frame.filter(ok.fill_null(False)).get_column("v")
        if hits.len() < max(1, share * n):
            return False
        samples = tuple(hits.unique(maintain_order=True).head(_SAMPLES).to_list())
        shapes.append(Shape(kind, detail, hits.len(), n, samples))
        return True

    for pattern in DATE_PATTERNS:
        parsed = v.str.strptime(pl.Datetime("us"), pattern, strict=False, exact=True)
        add("date", pattern, parsed.dt.year().is_between(1900, 2100))
    if datelike:
        serial = v.cast(pl.Float64, strict=False)
        add("excel-serial", "", v.str.contains(r"^\d{5}(\.\d+)?$") & serial.is_between(10_000, 73_000))
    add("cvx", "", v.str.contains(r"^\d{1,3}$") & v.str.zfill(2).is_in(list(displays("cvx"))), share=0.8)
    add("npi", "", v.str.contains(r"^\d{10}$") & _luhn_npi(v))
    add("ndc", "", v.str.contains(_NDC))
    low = v.str.to_lowercase()
    distinct = s.n_unique()
    if distinct <= 12:
        if s.str.contains(r"[A-Za-z]").any():  # 1 and 2 alone are as likely dose numbers as sexes
            add("sex", "sex", low.is_in(list(CODE_MAPS["sex"])))
        add("route", "route", low.is_in([*CODE_MAPS["route"], *spellings("route")]))
        add("site", "site", low.is_in([*CODE_MAPS["site"], *spellings("site")]))
        classes = [*CODE_MAPS["encounter-class"], *ENCOUNTER_CLASS_WORDS]
        add("encounter-class", "encounter-class", low.is_in(classes))
    counts = v.cast(pl.Int64, strict=False)
    whole = add("count", "", v.str.contains(r"^\d{1,2}$") & counts.is_between(0, 20), share=1.0)
    if whole and frame.select(counts.max()).item() < 2:  # 1s alone may as well be 1 mL
        shapes.pop()
    if s.str.contains(r"^[+-]?\d*,\d+$").any() and not s.str.contains(r"\.").any():
        add("decimal-comma", "", v.str.contains(r"^[+-]?\d*,\d+$|^[+-]?\d+$"))
    add("number", "", v.str.contains(r"^[+-]?(\d+([.,]\d+)?|[.,]\d+)$"))
    add("last-first", "", v.str.contains(r"^[^,\d]+,\s*[^,\d]+$"))
    if distinct <= 12 and n >= 2 * distinct:
        listed = tuple(s.unique(maintain_order=True).sort().to_list())
        shapes.append(Shape("codes", "", n, n, listed))
    return shapes
