"""The limit table against the published OpenAPI description, and the models built from it."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from schemas.limits import CREATE_SCHEMAS, Spec, spec_at, walk
from schemas.models import model_for, validation_issues

# Limits the OpenAPI file does not carry but the API documents in prose.
PROSE_ONLY = {("EncounterCreate", "class", "enum")}


def _resolve(node: dict[str, Any], doc: dict[str, Any]) -> dict[str, Any]:
    while "$ref" in node:
        name = node["$ref"].rsplit("/", 1)[-1]
        node = doc["components"]["schemas"][name]
    return node


def _compare(schema: str, path: str, spec: Spec, node: dict[str, Any], doc: dict[str, Any], diffs: list[str]) -> None:
    node = _resolve(node, doc)
    if "oneOf" in node:
        assert spec.type == "string-or-coding", f"{schema}.{path}: oneOf in the spec"
        string = next(n for n in node["oneOf"] if n.get("type") == "string")
        coding = next(n for n in node["oneOf"] if n.get("type") == "object")
        if string.get("maxLength") != spec.max_length:
            diffs.append(f"{schema}.{path}: maxLength {string.get('maxLength')} != {spec.max_length}")
        _compare_object(schema, path, spec, coding, doc, diffs)
        return
    expected_type = node.get("type")
    if expected_type != spec.type:
        diffs.append(f"{schema}.{path}: type {expected_type} != {spec.type}")
    for key, ours in (
        ("maxLength", spec.max_length),
        ("maxItems", spec.max_items),
        ("minItems", spec.min_items),
        ("maximum", spec.maximum),
        ("format", spec.format),
    ):
        if node.get(key) != ours:
            diffs.append(f"{schema}.{path}: {key} {node.get(key)} != {ours}")
    published_enum = tuple(node["enum"]) if "enum" in node else None
    if published_enum != spec.enum and (schema, path, "enum") not in PROSE_ONLY:
        diffs.append(f"{schema}.{path}: enum {published_enum} != {spec.enum}")
    if expected_type == "object":
        _compare_object(schema, path, spec, node, doc, diffs)
    if expected_type == "array":
        assert spec.items is not None
        _compare(schema, path + "[]", spec.items, node["items"], doc, diffs)


def _compare_object(
    schema: str, path: str, spec: Spec, node: dict[str, Any], doc: dict[str, Any], diffs: list[str]
) -> None:
    props = node.get("properties", {})
    if set(props) != set(spec.properties):
        diffs.append(f"{schema}.{path}: properties differ: {sorted(set(props) ^ set(spec.properties))}")
    required = set(node.get("required", []))
    ours = {k for k, v in spec.properties.items() if v.required}
    if required != ours:
        diffs.append(f"{schema}.{path}: required {sorted(required)} != {sorted(ours)}")
    for name in set(props) & set(spec.properties):
        _compare(schema, f"{path}.{name}".lstrip("."), spec.properties[name], props[name], doc, diffs)


@pytest.mark.parametrize("schema", sorted(CREATE_SCHEMAS))
def test_limit_table_matches_openapi(schema: str, openapi: dict[str, Any]) -> None:
    diffs: list[str] = []
    _compare_object(schema, "", CREATE_SCHEMAS[schema], openapi["components"]["schemas"][schema], openapi, diffs)
    assert diffs == []


def test_prose_only_limits_are_really_absent_from_openapi(openapi: dict[str, Any]) -> None:
    for schema, path, key in PROSE_ONLY:
        assert key not in openapi["components"]["schemas"][schema]["properties"][path]


def test_spec_at_and_walk_agree() -> None:
    paths = dict(walk(CREATE_SCHEMAS["ImmunizationCreate"]))
    assert paths["protocolApplied[].targetDisease[]"] is spec_at(
        "ImmunizationCreate", "protocolApplied[].targetDisease[]"
    )
    assert spec_at("ImmunizationCreate", "lotNumber").max_length == 100
    assert spec_at("DocumentCreate", "sections").min_items == 1


# Every string limit of every schema: a value at the limit passes the model, one past it fails naming the field.
STRING_LIMITS = [
    (schema, path, spec.max_length)
    for schema, root in CREATE_SCHEMAS.items()
    for path, spec in walk(root)
    if spec.type == "string" and spec.max_length and "[]" not in path and "." not in path
]


def _minimal(schema: str) -> dict[str, Any]:
    root = CREATE_SCHEMAS[schema]
    body: dict[str, Any] = {}
    for name, spec in root.properties.items():
        if spec.required:
            if spec.enum:
                body[name] = spec.enum[0]
            elif spec.type == "array":
                body[name] = [{"title": "t", "text": "x"}]
            else:
                body[name] = "x"
    return body


@pytest.mark.parametrize(("schema", "path", "limit"), STRING_LIMITS)
def test_model_enforces_max_length(schema: str, path: str, limit: int) -> None:
    model = model_for(schema)
    model.model_validate({**_minimal(schema), path: "a" * limit})
    with pytest.raises(ValidationError) as info:
        model.model_validate({**_minimal(schema), path: "a" * (limit + 1)})
    assert validation_issues(info.value)[0]["diagnostics"].startswith(f"{path}:")


def test_model_refuses_null_and_unknown_fields() -> None:
    model = model_for("ImmunizationCreate")
    base = {"status": "completed", "vaccineCode": "08", "patientId": "p"}
    model.model_validate(base)
    for bad in ({"lotNumber": None}, {"lotnumber": "x"}, {"status": "done"}, {"doseQuantity": {"value": "1"}}):
        with pytest.raises(ValidationError):
            model.model_validate({**base, **bad})
