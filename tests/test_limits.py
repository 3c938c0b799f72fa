"""The limit table against the published OpenAPI description, and the models built from it."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from schemas.limits import CREATE_SCHEMAS, OUR_LIMITS, Spec, spec_at, walk
from schemas.models import model_for, validation_issues


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
        ("minimum", spec.minimum),
        ("exclusiveMinimum", spec.exclusive_minimum),
        ("format", spec.format),
    ):
        if node.get(key) != ours and (schema, path, key) not in OUR_LIMITS:
            diffs.append(f"{schema}.{path}: {key} {node.get(key)} != {ours}")
    published_enum = tuple(node["enum"]) if "enum" in node else None
    if published_enum != spec.enum and (schema, path, "enum") not in OUR_LIMITS:
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


def _node_at(openapi: dict[str, Any], schema: str, path: str) -> dict[str, Any]:
    node = _resolve(openapi["components"]["schemas"][schema], openapi)
    for part in path.split("."):
        node = _resolve(node["properties"][part.rstrip("[]")], openapi)
        for _ in range(part.count("[]")):
            node = _resolve(node["items"], openapi)
    return node


def test_our_limits_are_really_absent_from_openapi_and_in_the_table(openapi: dict[str, Any]) -> None:
    attribute = {"enum": "enum", "minimum": "minimum", "exclusiveMinimum": "exclusive_minimum"}
    for schema, path, key in OUR_LIMITS:
        assert key not in _node_at(openapi, schema, path), (schema, path, key)
        assert getattr(spec_at(schema, path), attribute[key]) is not None, (schema, path, key)


def test_every_lower_bound_is_ours() -> None:
    # A minimum in the table that OUR_LIMITS does not name would be compared with the OpenAPI file
    # and fail there; this names the rule: every lower bound is one of ours, stated in one place.
    bounds = {
        (schema, path, key)
        for schema, root in CREATE_SCHEMAS.items()
        for path, spec in walk(root)
        for key, value in (("minimum", spec.minimum), ("exclusiveMinimum", spec.exclusive_minimum))
        if value is not None
    }
    assert bounds == {limit for limit in OUR_LIMITS if limit[2] != "enum"}


def test_a_dose_amount_must_be_above_zero_and_counts_not_negative() -> None:
    model = model_for("ImmunizationCreate")
    base = {"status": "completed", "vaccineCode": "08", "patientId": "p"}
    model.model_validate({**base, "doseQuantity": {"value": 0.5, "unit": "mL"}})
    model.model_validate({**base, "protocolApplied": [{"doseNumber": 0, "seriesDoses": 0}]})
    for bad, where in (
        ({"doseQuantity": {"value": -0.5}}, "doseQuantity.value"),
        ({"doseQuantity": {"value": 0}}, "doseQuantity.value"),
        ({"protocolApplied": [{"doseNumber": -1}]}, "protocolApplied.0.doseNumber"),
        ({"protocolApplied": [{"seriesDoses": -2}]}, "protocolApplied.0.seriesDoses"),
    ):
        with pytest.raises(ValidationError) as info:
            model.model_validate({**base, **bad})
        assert validation_issues(info.value)[0]["diagnostics"].startswith(f"{where}:")
    encounter = model_for("EncounterCreate")
    visit = {"status": "finished", "class": "AMB", "patientId": "p"}
    encounter.model_validate({**visit, "lengthMinutes": 0})
    with pytest.raises(ValidationError):
        encounter.model_validate({**visit, "lengthMinutes": -5})


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
