"""Built-in value maps for common code systems, named from a profile's ``[values.<field>]``.

A registry writes a patient's sex as ``M``/``F``/``1``/``2``, a route as HL7 table 0162's ``IM``
or NCI Thesaurus' ``C28161``, a site as HL7 table 0163's ``LD`` or a SNOMED CT code, a visit's
class as Synthea's ``wellness``. A profile names the map it needs instead of listing every
spelling::

    [values.route]
    map = "hl7-route"

Each map takes a source value (trimmed, any case) to the value the toolkit sends (its route and
site codes are :mod:`schemas.codes`' own, its encounter classes EncounterCreate's). A value a map
does not list is left as written (or becomes the ``default`` the profile gives), so the usual
validation still sees it.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType

__all__ = ["CODE_MAPS", "code_map"]

_SEX = {
    # HL7 v2 table 0001 (AdministrativeSex) and FHIR's administrative-gender.
    "m": "male",
    "male": "male",
    "f": "female",
    "female": "female",
    "u": "unknown",
    "unk": "unknown",
    "unknown": "unknown",
    "o": "other",
    "other": "other",
    "a": "other",  # HL7 v2 "ambiguous"
    "n": "unknown",  # HL7 v2 "not applicable"
    "x": "other",
    # ISO/IEC 5218: 0 not known, 1 male, 2 female, 9 not applicable.
    "0": "unknown",
    "1": "male",
    "2": "female",
    "9": "unknown",
    "man": "male",
    "woman": "female",
}

_HL7_ROUTE = {
    # HL7 v2 table 0162 (Route of Administration), as CDC's IIS guide uses it.
    "im": "IM",
    "sc": "SQ",
    "sq": "SQ",
    "id": "IDINJ",
    "po": "PO",
    "in": "NASINHLC",
    "ns": "NASINHLC",
    "na": "NASINHLC",
    "iv": "IVINJ",
    "td": "TRNSDERM",
    # HL7 v3 RouteOfAdministration: the codes the toolkit sends.
    "idinj": "IDINJ",
    "nasinhlc": "NASINHLC",
    "ivinj": "IVINJ",
    "trnsderm": "TRNSDERM",
}

_NCIT_ROUTE = {
    "c28161": "IM",
    "c38299": "SQ",
    "c38238": "IDINJ",
    "c38284": "NASINHLC",
    "c38288": "PO",
    "c38276": "IVINJ",
    "c38305": "TRNSDERM",
}

_SNOMED_ROUTE = {
    "78421000": "IM",  # intramuscular route
    "34206005": "SQ",  # subcutaneous route
    "372464004": "IDINJ",  # intradermal route
    "46713006": "NASINHLC",  # nasal route
    "26643006": "PO",  # oral route
    "47625008": "IVINJ",  # intravenous route
    "45890007": "TRNSDERM",  # transdermal route
}

_HL7_SITE = {
    # HL7 v2 table 0163 (Body Site): the codes the toolkit sends, and common spellings of them.
    "la": "LA",
    "ra": "RA",
    "ld": "LD",
    "rd": "RD",
    "lt": "LT",
    "rt": "RT",
    "lvl": "LVL",
    "rvl": "RVL",
    "lg": "LG",
    "rg": "RG",
    "left upper arm": "LA",
    "right upper arm": "RA",
    "left arm": "LA",
    "right arm": "RA",
    "left deltoid": "LD",
    "right deltoid": "RD",
    "left thigh": "LT",
    "right thigh": "RT",
}

_SNOMED_SITE = {
    "368208006": "LA",  # left upper arm structure
    "368209003": "RA",  # right upper arm structure
}

_ENCOUNTER_CLASS = {
    # Synthea's ENCOUNTERCLASS vocabulary, and HL7 v3 ActCode's own codes.
    "ambulatory": "AMB",
    "wellness": "AMB",
    "outpatient": "AMB",
    "urgentcare": "EMER",
    "urgent care": "EMER",
    "emergency": "EMER",
    "inpatient": "IMP",
    # A skilled nursing facility stay is inpatient care (v3 ActCode NONAC, "inpatient non-acute", is a kind of IMP).
    "snf": "IMP",
    # Hospice care is mostly given where the patient lives: the API's nearest class is home health.
    "hospice": "HH",
    "home": "HH",
    "virtual": "VR",
    "amb": "AMB",
    "imp": "IMP",
    "acute": "IMP",
    "nonac": "IMP",
    "emer": "EMER",
    "hh": "HH",
    "vr": "VR",
}


def _frozen(*parts: Mapping[str, str]) -> Mapping[str, str]:
    merged: dict[str, str] = {}
    for part in parts:
        merged.update(part)
    return MappingProxyType(merged)


#: Map name -> {source value, lower case -> value sent}.
CODE_MAPS: Mapping[str, Mapping[str, str]] = MappingProxyType(
    {
        "sex": _frozen(_SEX),
        "hl7-route": _frozen(_HL7_ROUTE),
        "ncit-route": _frozen(_NCIT_ROUTE),
        "snomed-route": _frozen(_SNOMED_ROUTE),
        "route": _frozen(_HL7_ROUTE, _NCIT_ROUTE, _SNOMED_ROUTE),
        "hl7-site": _frozen(_HL7_SITE),
        "snomed-site": _frozen(_SNOMED_SITE),
        "site": _frozen(_HL7_SITE, _SNOMED_SITE),
        "encounter-class": _frozen(_ENCOUNTER_CLASS),
    }
)


def code_map(name: str) -> Mapping[str, str]:
    """The built-in map ``name``; a ``KeyError`` naming the known ones otherwise."""
    try:
        return CODE_MAPS[name]
    except KeyError:
        raise KeyError(f"no built-in map {name!r}; built-in maps: {', '.join(CODE_MAPS)}") from None
