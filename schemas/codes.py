"""Code tables (CVX, MVX, route, body site) shipped as package data.

Registry exports spell the same route or site many ways (``IM``,
``Intramuscular``, ``C28161``); :func:`spellings` gives every known spelling,
lower-cased, mapped to the one code the toolkit sends.

``cvx.csv`` is CDC's whole CVX table and ``mvx.csv`` the MVX codes (HL7 table 0227 and CDC's
current ones), each with its status; a line starting with ``#`` (the first one) names the
table's source and date. :mod:`schemas.refresh_codes` rewrites them from CDC's downloads.
"""

from __future__ import annotations

import csv
from functools import cache
from importlib import resources

CVX_SYSTEM = "http://hl7.org/fhir/sid/cvx"
CVX_OID = "urn:oid:2.16.840.1.113883.6.59"
NCI_OID = "urn:oid:2.16.840.1.113883.3.26.1.1"
ROUTE_SYSTEM = "http://terminology.hl7.org/CodeSystem/v3-RouteOfAdministration"
SITE_SYSTEM = "http://terminology.hl7.org/CodeSystem/v2-0163"


@cache
def table(name: str) -> tuple[dict[str, str], ...]:
    """Rows of ``schemas/data/<name>.csv``."""
    text = resources.files("schemas").joinpath("data", f"{name}.csv").read_text(encoding="utf-8")
    return tuple(csv.DictReader(line for line in text.splitlines() if not line.startswith("#")))


@cache
def source(name: str) -> str:
    """Where a table came from and when (its ``#`` line), or "" when it does not say."""
    text = resources.files("schemas").joinpath("data", f"{name}.csv").read_text(encoding="utf-8")
    first = text.split("\n", 1)[0]
    return first.removeprefix("#").strip() if first.startswith("#") else ""


@cache
def statuses(name: str) -> dict[str, str]:
    """Code -> the table's status (``Active``, ``Inactive``, ``Non-US`` ...), for ``cvx`` or ``mvx``;
    a code whose status the table does not give is left out."""
    return {row["code"]: row["status"] for row in table(name) if (row.get("status") or "").strip()}


#: CVX statuses that are accepted with a warning: a code for a vaccine not (or not yet) given in the
#: US. ``Inactive`` codes are accepted silently: CDC keeps them for historical doses.
WARNED_STATUSES = ("Non-US", "Never Active", "Pending")


@cache
def names(name: str) -> frozenset[str]:
    """Every code, display and alias of ``cvx`` or ``mvx``, as written: the values a column may hold."""
    out: set[str] = set()
    for row in table(name):
        out.update(v for v in (row["code"], row["display"], *(row.get("aliases") or "").split(";")) if v.strip())
    return frozenset(out)


@cache
def displays(name: str) -> dict[str, str]:
    """Code -> display, for ``cvx``, ``mvx``, ``route`` or ``site``."""
    return {row["code"]: row["display"] for row in table(name)}


@cache
def spellings(name: str) -> dict[str, str]:
    """Every known spelling (lower case) -> code, for ``route`` or ``site``."""
    out: dict[str, str] = {}
    for row in table(name):
        names = [row["code"], row["display"], row.get("nci_code") or "", *(row.get("aliases") or "").split(";")]
        for spelling in names:
            if spelling.strip():
                out.setdefault(spelling.strip().lower(), row["code"])
    return out
