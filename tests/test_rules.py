"""Every code a run can put in a report is explained, and `clinik-etl explain` says so."""

from __future__ import annotations

import ast
import re

from click.testing import CliRunner

from etl.cli import main
from etl.rules import RULES, explain

from .conftest import ROOT

CODE = re.compile(r"^[a-z]+(-[a-z]+)*$")  # stable kebab-case: "enum", "max-length"


def _text(node: ast.AST | None) -> str | None:
    return node.value if isinstance(node, ast.Constant) and isinstance(node.value, str) else None


def _argument(call: ast.Call, index: int, name: str) -> str | None:
    if len(call.args) > index:
        return _text(call.args[index])
    return next((_text(k.value) for k in call.keywords if k.arg == name), None)


def _callee(call: ast.Call) -> str:
    func = call.func
    return func.id if isinstance(func, ast.Name) else func.attr if isinstance(func, ast.Attribute) else ""


def codes_in(module: str) -> set[str]:
    """The codes a module can emit, read from its source.

    ``_Rule(field, CODE, ...)``, ``_warning_rows(frame, when, field, CODE, ...)``,
    ``pl.lit(CODE).alias("code")``, ``Result(..., error_code=CODE)``,
    ``{"code": CODE}``, ``Notice(CODE, ...)``, and every kebab-case ``*-format``
    literal (the parse-failure codes are picked from a table by value type).
    """
    tree = ast.parse((ROOT / module).read_text(encoding="utf-8"))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            callee = _callee(node)
            if callee == "_Rule":
                found.add(_argument(node, 1, "code") or "")
            elif callee == "_warning_rows":
                found.add(_argument(node, 3, "code") or "")
            elif callee == "Notice":
                found.add(_argument(node, 0, "code") or "")
            elif callee == "Result":
                found.add(_argument(node, 3, "error_code") or "")
            elif callee == "alias" and _argument(node, 0, "name") == "code":
                inner = node.func.value if isinstance(node.func, ast.Attribute) else None
                if isinstance(inner, ast.Call) and _callee(inner) == "lit":
                    found.add(_argument(inner, 0, "value") or "")
        elif isinstance(node, ast.Dict):
            for key, value in zip(node.keys, node.values, strict=True):
                if _text(key) in ("code", "error_code"):
                    found.add(_text(value) or "")
        elif (text := _text(node)) and text.endswith("-format") and CODE.match(text):
            found.add(text)
    return {c for c in found if CODE.match(c)}


def test_every_validation_code_is_explained() -> None:
    codes = codes_in("etl/validate.py")
    # The walk must see the codes it is meant to see, or this test proves nothing.
    assert {"required", "max-length", "enum", "date-format", "integer-format", "duplicate-key"} <= codes
    assert len(codes) >= 12
    assert sorted(codes - set(RULES)) == []


def test_every_load_and_reader_code_is_explained() -> None:
    codes = set().union(*(codes_in(m) for m in ("etl/load/loader.py", "etl/batches.py", "etl/readers.py")))
    assert "not-sent" in codes and "unknown-outcome" in codes
    assert sorted(codes - set(RULES)) == []


def test_explain_a_code() -> None:
    runner = CliRunner()
    result = runner.invoke(main, ["explain", "max-length"])
    assert result.exit_code == 0
    rule = RULES["max-length"]
    assert result.output.splitlines() == [f"max-length (reject): {rule.title}.", f"fix: {rule.fix}."]
    assert runner.invoke(main, ["explain", "Validation_Error"]).output.startswith("VALIDATION_ERROR (api)")


def test_explain_lists_every_code() -> None:
    result = CliRunner().invoke(main, ["explain"])
    assert result.exit_code == 0
    for code in RULES:
        assert code in result.output


def test_an_unknown_code_exits_2_with_a_suggestion() -> None:
    result = CliRunner().invoke(main, ["explain", "max-lenght"])
    assert result.exit_code == 2
    assert "unknown code 'max-lenght'" in result.output
    assert "Did you mean max-length?" in result.output and "`clinik-etl explain` lists every code" in result.output
    assert explain("max-lenght") is None
