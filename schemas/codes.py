"""Code tables (CVX, MVX, route, body site) shipped as package data.

Registry exports spell the same route or site many ways (``IM``,
``Intramuscular``, ``C28161``); :func:`spellings` gives every known spelling,
lower-cased, mapped to the one code the toolkit sends.
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
    return tuple(csv.DictReader(text.splitlines()))


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
