"""Every documented limit, table-driven: at the limit a row passes, one past it is rejected.

The cases are generated from the canonical fields and the limit table, so a
field or limit added later is covered without touching this file.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any

import pytest

from etl.mapping import Profile, apply_profile
from etl.readers import read_table
from etl.rules import severity_of
from etl.validate import validate
from schemas.canonical import KIND_SPECS, CanonicalField
from schemas.limits import CREATE_SCHEMAS, walk
from schemas.models import ValidationError, model_for, validation_issues

MINIMAL: dict[str, dict[str, str]] = {
    "patient": {"patient_id": "P1", "patient_first_name": "Ann", "patient_last_name": "Lee"},
    "practitioner": {"practitioner_id": "D1", "practitioner_first_name": "Bo", "practitioner_last_name": "Ray"},
    "encounter": {"record_id": "E1", "patient_id": "P1", "status": "finished", "encounter_class": "AMB"},
    "immunization": {
        "record_id": "R1",
        "patient_id": "P1",
        "patient_first_name": "Ann",
        "patient_last_name": "Lee",
        "vaccine_code": "08",
        "occurrence": "2021-01-01",
    },
    "document": {
        "document_id": "D1",
        "patient_id": "P1",
        "practitioner_id": "D1",
        "status": "final",
        "document_type": "letter",
        "title": "T",
        "section_title": "S",
        "section_text": "x",
    },
    "task": {"record_id": "T1", "status": "requested", "intent": "order"},
}


def _cases() -> list[Any]:
    cases = []
    for kind, spec in KIND_SPECS.items():
        for f in spec.fields:
            if f.value in ("date", "datetime"):
                continue  # parsed dates are written as at most 20 characters, far below any limit
            cases += [pytest.param(kind, f, *case, id=f"{kind}.{f.name}.{case[0]}") for case in _limits(f)]
    return cases


def _limits(f: CanonicalField) -> list[tuple[str, str, str]]:
    """(code, value at the limit, value past it)."""
    out = []
    if f.enum:
        out.append(("enum", f.enum[-1], "zzz-not-allowed"))
    if f.value == "list":
        if f.max_items is not None:
            out.append(("max-items", ";".join(["x"] * f.max_items), ";".join(["x"] * (f.max_items + 1))))
        if f.max_length is not None:
            out.append(("max-length", "a" * f.max_length, "a" * (f.max_length + 1)))
    elif f.max_length is not None and not f.enum:
        out.append(("max-length", "a" * f.max_length, "a" * (f.max_length + 1)))
    if f.maximum is not None:
        out.append(("maximum", str(int(f.maximum)), str(int(f.maximum) + 1)))
    if f.minimum is not None:
        out.append(("minimum", str(int(f.minimum)), str(int(f.minimum) - 1)))
    if f.exclusive_minimum is not None:
        out.append(("minimum", f"{f.exclusive_minimum + 0.001:g}", f"{f.exclusive_minimum:g}"))
    return out


def _run(tmp_path: Path, kind: str, field: str, value: str) -> list[tuple[str, str]]:
    row = {**MINIMAL[kind], field: value}
    path = tmp_path / f"{kind}.csv"
    headers = list(row)
    path.write_text(",".join(headers) + "\n" + ",".join(f'"{row[h]}"' for h in headers) + "\n", encoding="utf-8")
    mapped = apply_profile(read_table(path), Profile(kind=kind))
    result = validate(mapped, today=dt.date(2026, 11, 22))
    return list(zip(result.rejects["code"].to_list(), result.rejects["field"].to_list(), strict=True))


@pytest.mark.parametrize(("kind", "field", "code", "at", "past"), _cases())
def test_at_the_limit_passes_and_past_it_is_rejected(
    tmp_path: Path, kind: str, field: CanonicalField, code: str, at: str, past: str
) -> None:
    # At the limit no limit fires; a domain rule may (a 20-character vaccine code is no CVX code).
    assert [(c, f) for c, f in _run(tmp_path, kind, field.name, at) if severity_of(c) is None] == []
    assert (code, field.name) in _run(tmp_path, kind, field.name, past)


def test_every_kind_has_cases() -> None:
    kinds = {c.values[0] for c in _cases()}
    assert kinds == set(KIND_SPECS)
    assert len(_cases()) > 60


# The same at the level of the payload models: every limit of every create schema, including
# fields no canonical column feeds (arrays of objects, nested objects).
def _model_cases() -> list[Any]:
    cases = []
    for schema, root in CREATE_SCHEMAS.items():
        for path, spec in walk(root):
            if "[]" in path.rstrip("[]") or path.count(".") > 0:
                continue
            if spec.type == "array" and (spec.max_items or spec.min_items):
                cases.append(pytest.param(schema, path, spec, "items", id=f"{schema}.{path}.items"))
            if spec.type == "integer" and spec.maximum is not None:
                cases.append(pytest.param(schema, path, spec, "maximum", id=f"{schema}.{path}.maximum"))
            if spec.type == "integer" and spec.minimum is not None:
                cases.append(pytest.param(schema, path, spec, "minimum", id=f"{schema}.{path}.minimum"))
            if spec.type == "string" and spec.enum:
                cases.append(pytest.param(schema, path, spec, "enum", id=f"{schema}.{path}.enum"))
    return cases


def _item(spec: Any) -> Any:
    assert spec.items is not None
    item = spec.items
    if item.type == "string":
        return "x"
    return {k: (v.enum[0] if v.enum else "x") for k, v in item.properties.items() if v.required}


def _base(schema: str) -> dict[str, Any]:
    body: dict[str, Any] = {}
    for name, spec in CREATE_SCHEMAS[schema].properties.items():
        if spec.required:
            body[name] = spec.enum[0] if spec.enum else ([{"title": "t", "text": "x"}] if spec.type == "array" else "x")
    return body


@pytest.mark.parametrize(("schema", "path", "spec", "bound"), _model_cases())
def test_payload_models_enforce_every_array_size_maximum_minimum_and_enum(
    schema: str, path: str, spec: Any, bound: str
) -> None:
    model = model_for(schema)
    if spec.type == "array":
        at, past = [_item(spec)] * (spec.max_items or 1), [_item(spec)] * ((spec.max_items or 0) + 1)
        if spec.max_items is None:  # only a minimum (sections: 1..)
            at, past = [_item(spec)], []
    elif bound == "minimum":
        at, past = int(spec.minimum), int(spec.minimum) - 1
    elif spec.type == "integer":
        at, past = int(spec.maximum), int(spec.maximum) + 1
    else:
        at, past = spec.enum[-1], "zzz"
    model.model_validate({**_base(schema), path: at})
    with pytest.raises(ValidationError) as info:
        model.model_validate({**_base(schema), path: past})
    assert validation_issues(info.value)[0]["diagnostics"].startswith(f"{path}:")
