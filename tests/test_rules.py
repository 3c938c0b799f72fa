"""The catalogue of codes: every code the tool emits is an entry, every entry is used, each wording
builds the same text as a string and as a column, and `clinik-etl explain` reads the entries."""

from __future__ import annotations

import ast
import datetime as dt
import re
import string
from pathlib import Path

import polars as pl
import pytest
from click.testing import CliRunner

from etl.cli import main
from etl.report_html import render_html
from etl.rules import RULES, Rule, catalogue, explain

from .conftest import ROOT

CODE = re.compile(r"^[a-z]+(-[a-z]+)*$|^[A-Z]+(_[A-Z]+)*$")  # kebab-case ("max-length"), or the API's own
# Where a code is emitted or compared: a literal code passed to one of these is written outside the catalogue.
EMITTERS = {"lit", "Notice", "Result", "ApiError", "_Rule", "_warning_rows", "failure"}


def _modules() -> list[Path]:
    """The code that can put a code in a report: etl/, but the catalogue and the sandbox (the API's side)."""
    etl = ROOT / "etl"
    return [p for p in sorted(etl.rglob("*.py")) if p.name != "rules.py" and "sandbox" not in p.relative_to(ROOT).parts]


def _callee(call: ast.Call) -> str:
    func = call.func
    return func.id if isinstance(func, ast.Name) else func.attr if isinstance(func, ast.Attribute) else ""


def _codes_in(tree: ast.AST) -> tuple[set[str], list[ast.Constant]]:
    """(the codes a module looks up as ``RULES["..."]``, the literals where it writes one of ours bare)."""
    looked_up: set[str] = set()
    bare: list[ast.Constant] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Subscript) and isinstance(node.value, ast.Name) and node.value.id == "RULES":
            assert isinstance(node.slice, ast.Constant), f"line {node.lineno}: RULES[...] takes a literal"
            looked_up.add(str(node.slice.value))
            continue
        if isinstance(node, ast.Call) and _callee(node) in EMITTERS:
            values = [*node.args, *(k.value for k in node.keywords)]
        elif isinstance(node, ast.Call):
            values = [k.value for k in node.keywords if k.arg == "error_code"]
        elif isinstance(node, ast.Compare):
            values = [node.left, *node.comparators]
        else:
            continue
        bare += [
            v
            for v in values
            if isinstance(v, ast.Constant) and v.value in RULES and RULES[str(v.value)].kind != "api"
        ]
    return looked_up, bare


def _scan() -> tuple[set[str], list[str]]:
    """What :func:`_codes_in` finds in every module that can put a code in a report."""
    looked_up: set[str] = set()
    bare: list[str] = []
    for path in _modules():
        mine, literals = _codes_in(ast.parse(path.read_text(encoding="utf-8")))
        looked_up |= mine
        bare += [f"{path.relative_to(ROOT)}:{v.lineno}: {v.value!r}" for v in literals]
    return looked_up, bare


def test_every_code_used_is_an_entry_and_every_entry_is_used() -> None:
    looked_up, bare = _scan()
    # The scan must see the codes it is meant to see, or this test proves nothing.
    assert {"required", "max-items", "date-format", "parent-rejected", "not-sent", "encoding-fallback"} <= looked_up
    assert sorted(looked_up - set(RULES)) == []
    # The API's codes come from the API, with its message: nothing here emits them.
    ours = {code for code, rule in RULES.items() if rule.kind != "api"}
    assert sorted(ours - looked_up) == [], "catalogue entries no code raises"
    assert bare == [], "write RULES[code] (its .code, .text(), .message()) instead of the literal"


def test_the_scan_finds_a_bare_code() -> None:
    """What the scan flags, on a module written the old way (so that the test above can fail)."""
    source = (
        'pl.lit("max-items").alias("code")\n'
        'Result("failed", error_code="not-sent")\n'
        'x = c == "enum"\n'
        'y = Result("failed", error_code="RATE_LIMITED")\n'  # the API's own: not ours to word
        'z = profile.get("redacted")\n'  # a word that happens to be a code, not used as one
        'pl.lit(RULES["required"].code)\n'
    )
    looked_up, bare = _codes_in(ast.parse(source))
    assert looked_up == {"required"}
    assert sorted((v.lineno, v.value) for v in bare) == [(1, "max-items"), (2, "not-sent"), (3, "enum")]


def test_every_entry_is_well_formed() -> None:
    for code, rule in RULES.items():
        assert rule.code == code and CODE.match(code), code
        assert rule.title and rule.fix, code
        assert (rule.kind == "api") == code.isupper() or code.startswith("BULK_"), code
        if rule.kind != "api":
            assert rule.template, f"{code} has no message"
        for variant in ("", *rule.variants):
            names = rule.placeholders(variant)
            assert all(n.isidentifier() for n in names), (code, variant, names)


def test_a_code_written_twice_is_refused() -> None:
    once = Rule("enum", "reject", "a", "b", "one of {allowed}")
    with pytest.raises(ValueError, match="'enum' has two catalogue entries"):
        catalogue([once, Rule("enum", "reject", "c", "d")])
    assert catalogue([once]) == {"enum": once}


def test_text_puts_the_values_into_the_wording() -> None:
    assert RULES["max-length"].text(limit=64) == "at most 64 characters"
    assert RULES["max-length"].text("item", limit=64) == "each item at most 64 characters"
    assert RULES["maximum"].text(limit=10.0) == "at most 10"  # {limit:g}
    assert RULES["minimum"].text("exclusive", limit=0.5) == "above 0.5"
    assert RULES["future-date"].text(today=dt.date(2024, 3, 31)) == "not after 2024-03-31"
    assert RULES["parent-unknown"].text(kind="patient", reference="P1") == (
        "the patient 'P1' has an unknown outcome; re-run to resolve it"
    )
    assert RULES["not-sent"].text("interrupted") == "run interrupted before sending"
    assert RULES["unknown-cvx"].placeholders() == ()
    assert RULES["parent-failed"].placeholders() == ("kind", "reference", "code", "reason")


def test_a_missing_value_or_variant_is_an_error() -> None:
    with pytest.raises(KeyError, match="limit"):
        RULES["max-length"].text()
    with pytest.raises(KeyError, match="max-length has no message variant 'items'"):
        RULES["max-length"].text("items", limit=3)
    with pytest.raises(ValueError, match="plain value"):
        RULES["maximum"].message(limit=pl.col("n"))  # {limit:g} cannot format a column


def test_message_builds_per_row_what_text_builds_for_one() -> None:
    """For every wording of every entry: a column per placeholder gives each row the text of its values."""
    for code, rule in RULES.items():
        for variant in ("", *rule.variants):
            names = rule.placeholders(variant)
            # A value with braces in it stays as it is; a placeholder with a format takes a plain number.
            formatted = {f for _, f, spec, conv in string.Formatter().parse(rule.template_of(variant)) if spec or conv}
            frame = pl.DataFrame({n: [f"{n}-a", f"{n}-b {{x}}"] for n in names} or {"_": [0, 1]})
            columns = {n: 7.5 if n in formatted else pl.col(n) for n in names}
            built = frame.with_columns(rule.message(variant, **columns).alias("m")).get_column("m").to_list()
            for i, row in enumerate(frame.iter_rows(named=True)):
                plain = {n: (row[n] if isinstance(columns[n], pl.Expr) else columns[n]) for n in names}
                assert built[i] == rule.text(variant, **plain), (code, variant)


def test_message_of_a_null_value_is_null_and_types_become_text() -> None:
    frame = pl.DataFrame({"column": ["patient_id", None], "n": [3, 4]}, schema={"column": pl.String, "n": pl.UInt32})
    out = frame.select(
        RULES["parent-rejected"].message(column=pl.col("column"), value="P9", kind="patient").alias("a"),
        RULES["max-items"].message("document", sections=pl.col("n"), limit=50).alias("b"),
    )
    assert out.get_column("a").to_list() == ["patient_id (P9): the patient row it names was rejected", None]
    assert out.get_column("b").to_list() == [
        "the document has 3 sections; at most 50",
        "the document has 4 sections; at most 50",
    ]


def test_report_html_explains_the_codes_on_the_page() -> None:
    problems = pl.DataFrame(
        {
            "source_file": ["a.csv", "a.csv"],
            "source_row": [2, 3],
            "kind": ["immunization"] * 2,
            "source_key": [None, None],
            "state": ["rejected", "failed"],
            "resource_id": [None, None],
            "patient_id": [None, None],
            "error_code": ["max-length", "SOMETHING_NEW"],
            "field": ["lot_number", None],
            "message": ["lot_number max-length (x): at most 20 characters", "HTTP 418: no"],
        },
        schema_overrides={"source_row": pl.UInt32, "source_key": pl.String, "resource_id": pl.String,
                          "patient_id": pl.String},
    )
    summary = {"states": {"rejected": 1, "failed": 1}, "rows_total": 2,
               "warnings": [{"file": "a.csv", "code": "unknown-cvx", "rows": [4], "count": 1}]}
    page = render_html(summary, problems)
    section = page.split('<h2 id="codes">', 1)[1].split("</table>", 1)[0]
    for code in ("max-length", "unknown-cvx"):
        assert f"<td>{code}</td>" in section
        assert RULES[code].fix.replace("'", "&#x27;") in section
    assert "SOMETHING_NEW" not in section  # not in the catalogue: nothing to say about it
    assert '<h2 id="codes">' not in render_html({"states": {}}, problems.clear())


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


def test_a_run_words_its_messages_as_the_catalogue_does(tmp_path: Path) -> None:
    """The raise sites build their messages through the entries: change a template, and the report follows."""
    from etl.pipeline import validate_files
    from etl.settings import Settings
    from schemas.canonical import field_map

    limit = field_map("immunization")["lot_number"].max_length
    assert limit is not None
    source = tmp_path / "shots.csv"
    source.write_text(
        "record_id,patient_id,first_name,last_name,dob,cvx,administration_date,lot_number\n"
        f"R1,P1,Ann,Lee,2001-02-03,08,2024-03-01,{'L' * (limit + 1)}\n"
        "R2,P2,Bo,Ng,2002-02-03,08,2999-03-02,L2\n"
        "R1,P3,Cy,Ho,2003-02-03,08,2024-03-02,L3\n",
        encoding="utf-8",
    )
    report = validate_files([source], Settings(report_dir=tmp_path / "r"))
    messages = dict(zip(report.rows["error_code"], report.rows["message"], strict=True))
    assert messages["max-length"].endswith(": " + RULES["max-length"].text(limit=limit))
    assert messages["future-date"].endswith(": " + RULES["future-date"].text(today=dt.date.today()))
    assert messages["duplicate-key"].endswith(": " + RULES["duplicate-key"].text())


def test_format_text_reads_a_filtered_column_of_several_chunks() -> None:
    """Messages are built with polars.concat_str: polars.format panicked on a string column of several
    chunks cut by a filter (a real Synthea encounters.csv, read whole, with lengths left out)."""
    from etl.rules import format_text

    parts = [pl.DataFrame({"n": [str(i) for i in range(k, k + 50)], "keep": [i % 3 == 0 for i in range(50)]})
             for k in range(0, 200, 50)]
    frame = pl.concat(parts, rechunk=False).filter(pl.col("keep"))
    assert frame.get_column("n").n_chunks() > 1
    got = frame.select(format_text("{}, not {}", pl.col("n"), pl.lit("at most 7"))).to_series().to_list()
    assert got == [f"{n}, not at most 7" for n in frame.get_column("n").to_list()]
    with_null = pl.DataFrame({"a": ["x", None], "b": [1, 2]})
    assert with_null.select(format_text("{} ({})", "a", "b")).to_series().to_list() == ["x (1)", None]
    with pytest.raises(ValueError, match="places"):
        format_text("{} and {}", "a")
