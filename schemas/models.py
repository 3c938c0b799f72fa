"""Pydantic payload models built from the limit table.

``model_for("ImmunizationCreate")`` is a pydantic v2 model whose fields,
constraints and required-ness all come from :mod:`schemas.limits`; nothing is
restated here. The sandbox validates request bodies with these models, and the
tests check that every body the toolkit plans passes them.

Models forbid unknown fields: a misspelt key is a bug in a transformer, and a
sandbox that accepted it would hide the bug until the real API dropped the data.
"""

from __future__ import annotations

from functools import cache
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, ValidationError, create_model

from schemas.limits import CREATE_SCHEMAS, FORMAT_PATTERNS, REQUIRED_STRING_MIN_LENGTH, Spec

__all__ = ["ValidationError", "model_for", "validation_issues"]

_CONFIG = ConfigDict(extra="forbid", strict=True)


def _annotation(spec: Spec, name: str) -> Any:
    if spec.type == "string":
        if spec.enum:
            return Literal[spec.enum]
        return Annotated[
            str,
            Field(
                max_length=spec.max_length,
                min_length=REQUIRED_STRING_MIN_LENGTH if spec.required else None,
                pattern=FORMAT_PATTERNS[spec.format] if spec.format else None,
            ),
        ]
    if spec.type == "integer":
        return Annotated[StrictInt, Field(le=spec.maximum, ge=spec.minimum, gt=spec.exclusive_minimum)]
    if spec.type == "number":
        return Annotated[StrictInt | StrictFloat, Field(le=spec.maximum, ge=spec.minimum, gt=spec.exclusive_minimum)]
    if spec.type == "boolean":
        return StrictBool
    if spec.type == "object":
        return _object_model(spec, name)
    if spec.type == "string-or-coding":
        coding = _object_model(spec, name)
        return Annotated[str, Field(max_length=spec.max_length)] | coding
    if spec.type == "array":
        assert spec.items is not None
        item = _annotation(spec.items, name + "Item")
        return Annotated[list[item], Field(min_length=spec.min_items, max_length=spec.max_items)]  # type: ignore[valid-type]
    raise AssertionError(spec.type)


def _object_model(spec: Spec, name: str) -> type[BaseModel]:
    fields: dict[str, Any] = {}
    for prop, child in spec.properties.items():
        annotation = _annotation(child, name + prop[:1].upper() + prop[1:])
        if child.required:
            fields[prop] = (annotation, ...)
        else:
            # A default of None that is never validated: an absent field is fine,
            # an explicit null is refused, as the API types these as non-null.
            fields[prop] = (annotation, None)
    return create_model(name, __config__=_CONFIG, **fields)


@cache
def model_for(schema: str) -> type[BaseModel]:
    """The pydantic model of one create schema, e.g. ``"PatientCreate"``."""
    return _object_model(CREATE_SCHEMAS[schema], schema)


def validation_issues(error: ValidationError) -> list[dict[str, str]]:
    """A pydantic error as ClinikAPI's ``issues``: ``field.path: message``.

    The message never echoes the offending value, which may be PHI.
    """
    issues = []
    for err in error.errors(include_url=False, include_input=False):
        path = ".".join(str(p) for p in err["loc"] if not _is_union_tag(p))
        message = "Required" if err["type"] == "missing" else err["msg"]
        issue = {"severity": "error", "code": "invalid", "diagnostics": f"{path}: {message}"}
        if issue not in issues:
            issues.append(issue)
    return issues


def _is_union_tag(part: str | int) -> bool:
    """pydantic names the arm of a union in ``loc``; the API's paths do not."""
    return isinstance(part, str) and (part[:1].isupper() or "-" in part or part in {"int", "float", "str", "bool"})
