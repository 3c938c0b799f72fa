"""The reconciliation report (etl.report, and what etl.report_html adds beyond test_report_html)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import polars as pl
import pytest
from pydantic import ValidationError

from etl.errors import ExitCode
from etl.files import guard_formulas
from etl.report import (
    FINAL_STATES,
    PROBLEM_STATES,
    ROW_COLUMNS,
    ReconcileSummary,
    RunFacts,
    RunReport,
    Summary,
    count_states,
    read_rows,
    write_report,
)
from etl.report_html import render_html, tally_of, write_html

from .test_report_html import Page, parse


def rows_of(*lines: tuple[Any, ...]) -> pl.DataFrame:
    """Report rows from (file, row, kind, key, state[, code, field, message]) tuples."""
    full = [(f, str(r), k, key, s, *rest, *([None] * (5 - len(rest)))) for f, r, k, key, s, *rest in lines]
    frame = pl.DataFrame(full, schema=dict.fromkeys(ROW_COLUMNS, pl.String), orient="row")
    return frame.with_columns(pl.col("source_row").cast(pl.UInt32))


ROWS = rows_of(
    ("a.csv", 2, "immunization", "R1", "created", "imm_1", "pat_1"),
    ("a.csv", 3, "immunization", "R2", "rejected", None, None, "required", "CVX", "CVX is empty"),
    ("a.csv", 4, "immunization", "R3", "rejected", None, None, "date", "Admin Date", "not a date"),
    ("a.csv", 5, "immunization", "R4", "failed", None, None, "VALIDATION_ERROR", "lotNumber", "HTTP 422"),
    ("b.csv", 2, "patient", "P1", "created", "pat_1"),
    ("b.csv", 3, "patient", "P2", "unknown", None, None, "unknown-outcome", None, "no answer in time"),
    ("b.csv", 4, "patient", "P3", "skipped", "pat_3"),
)


def summary_for(rows: pl.DataFrame, **extra: Any) -> dict[str, Any]:
    states, kinds = count_states(rows)
    return {"run_id": "run-1", "command": "load", "rows_total": rows.height, "states": states, "kinds": kinds, **extra}


def test_count_states_counts_every_final_state_overall_and_per_kind() -> None:
    overall, per_kind = count_states(ROWS)
    assert list(overall) == list(FINAL_STATES)  # every state present, zeros included
    expected = {"created": 2, "rejected": 2, "failed": 1, "unknown": 1, "skipped": 1}
    assert overall == {**dict.fromkeys(FINAL_STATES, 0), **expected}
    assert sum(overall.values()) == ROWS.height  # every row in exactly one final state
    assert per_kind["immunization"]["rejected"] == 2 and per_kind["immunization"]["created"] == 1
    assert per_kind["patient"] == {**dict.fromkeys(FINAL_STATES, 0), "created": 1, "unknown": 1, "skipped": 1}


def test_count_states_takes_counts_of_batches_as_well_as_rows() -> None:
    # Both batches have a rejected immunization: two counts of one (kind, state) that must add up.
    first, second = ROWS.head(2), ROWS.tail(5)
    batch_counts = pl.concat([first.group_by("kind", "state").len(), second.group_by("kind", "state").len()])
    assert batch_counts.filter(kind="immunization", state="rejected").height == 2
    assert count_states(batch_counts) == count_states(ROWS)  # the same (kind, state) from two batches adds up


@pytest.mark.parametrize(
    ("states", "extra", "code"),
    [
        ({"created": 3}, {}, ExitCode.OK),
        ({"created": 3, "skipped": 1, "planned": 2}, {}, ExitCode.OK),
        ({"created": 3, "rejected": 1}, {}, ExitCode.REJECTED),
        ({"rejected": 1, "failed": 1}, {}, ExitCode.FAILED),
        ({"rejected": 1, "unknown": 1}, {}, ExitCode.FAILED),
        ({"failed": 1}, {"aborted": "HTTP 401 INVALID_KEY"}, ExitCode.API),
        ({"failed": 1}, {"aborted": "x", "interrupted": True}, ExitCode.INTERRUPTED),
    ],
)
def test_exit_code_follows_the_worst_state(states: dict[str, int], extra: dict[str, Any], code: int) -> None:
    summary = {"rows_total": sum(states.values()), "states": {**dict.fromkeys(FINAL_STATES, 0), **states}, **extra}
    assert RunReport("r", None, summary).exit_code() == code


def test_problems_and_tally() -> None:
    report = RunReport("r", ROWS, summary_for(ROWS))
    assert report.rows_total == 7 and report.states["rejected"] == 2
    problems = report.problems
    assert set(problems.get_column("state")) == set(PROBLEM_STATES)
    where = [("a.csv", 3), ("a.csv", 4), ("a.csv", 5), ("b.csv", 3)]
    assert problems.select("source_file", "source_row").rows() == where  # in file order
    tally = {(f, s, c): n for f, s, c, _, n in report.tally.iter_rows()}
    assert tally == {
        ("a.csv", "rejected", "required"): 1,
        ("a.csv", "rejected", "date"): 1,
        ("a.csv", "failed", "VALIDATION_ERROR"): 1,
        ("b.csv", "unknown", "unknown-outcome"): 1,
    }


def test_a_report_in_batches_keeps_its_sample_and_tally() -> None:
    sample = ROWS.filter(pl.col("state") == "rejected").head(1)
    counted = pl.DataFrame(
        {"source_file": ["a.csv"], "state": ["rejected"], "error_code": ["required"], "field": ["CVX"], "rows": [900]}
    )
    report = RunReport("r", None, summary_for(ROWS), held_problems=sample, held_tally=counted)
    assert report.problems.equals(sample)
    assert report.tally.equals(counted)
    with pytest.raises(ValueError, match="no folder"):
        _ = report.rows  # neither held nor written anywhere


def test_write_report_writes_rows_rejects_summary_and_page(tmp_path: Path) -> None:
    held = ROWS.with_columns(pl.lit("extra").alias("not_a_report_column"))
    report = RunReport("run-1", held, summary_for(ROWS, target="http://127.0.0.1:1"))
    rejects = {
        "a.csv": pl.DataFrame(
            {"source_file": ["a.csv", "a.csv"], "source_row": [3, 4], "CVX": ["", "08"], "reasons": ["r1", "r2"]}
        ),
        "b.csv": pl.DataFrame({"source_file": ["b.csv"], "source_row": [9], "MRN": ["M9"], "reasons": ["r3"]}),
        "c.csv": pl.DataFrame(schema={"source_file": pl.String, "source_row": pl.Int64, "reasons": pl.String}),
    }
    folder = write_report(report, tmp_path / "report", rejects=rejects)
    assert folder == tmp_path / "report" and report.folder == folder
    # rows.csv: the public columns only, one line per input row, read back as written.
    assert (folder / "rows.csv").read_text(encoding="utf-8").splitlines()[0] == ",".join(ROW_COLUMNS)
    assert read_rows(folder / "rows.csv").equals(ROWS)
    # rejects.csv: every file's rejects, their own columns side by side.
    back = pl.read_csv(folder / "rejects.csv", infer_schema=False)
    assert set(back.columns) == {"source_file", "source_row", "CVX", "MRN", "reasons"}
    assert back.select("source_file", "source_row", "reasons").rows() == [
        ("a.csv", "3", "r1"),
        ("a.csv", "4", "r2"),
        ("b.csv", "9", "r3"),
    ]
    summary = json.loads((folder / "summary.json").read_text(encoding="utf-8"))
    assert summary["report_dir"] == str(folder) and summary["states"] == report.states
    assert summary["rows_total"] == 7 and sum(summary["states"].values()) == 7
    page, _ = parse(folder / "report.html")
    assert page.by_id["rows-total"] == "7" and page.by_id["count-rejected"] == "2"
    assert page.rows_in["rejected-rows"] == 1 + 2 and page.rows_in["problem-rows"] == 1 + 2


def test_no_rejects_still_writes_a_rejects_file_with_its_header(tmp_path: Path) -> None:
    created = ROWS.filter(pl.col("state") == "created")
    write_report(RunReport("r", created, summary_for(created)), tmp_path / "r")
    assert (tmp_path / "r" / "rejects.csv").read_text(encoding="utf-8").strip() == "source_file,source_row,reasons"
    assert read_rows(tmp_path / "r" / "rows.csv").height == 2


def test_a_report_reads_its_rows_back_from_its_folder(tmp_path: Path) -> None:
    write_report(RunReport("r", ROWS, summary_for(ROWS)), tmp_path / "r")
    reopened = RunReport("r", None, summary_for(ROWS), folder=tmp_path / "r")
    assert reopened.rows.equals(ROWS)
    assert reopened.problems.height == 4


@pytest.mark.parametrize("lazy", [False, True])
def test_guard_formulas_quotes_what_a_spreadsheet_would_run(lazy: bool) -> None:
    cells = ["=SUM(A1)", "+1", "-2", "@cmd", "\tx", "\rx", "plain", "a=b", None]
    frame = pl.DataFrame({"text": cells, "number": [-1, 2, 3, 4, 5, 6, 7, 8, 9]})
    out = guard_formulas(frame.lazy()).collect() if lazy else guard_formulas(frame)
    assert out.get_column("text").to_list() == [
        "'=SUM(A1)", "'+1", "'-2", "'@cmd", "'\tx", "'\rx", "plain", "a=b", None
    ]
    assert out.get_column("number").to_list() == frame.get_column("number").to_list()  # numbers are not text


def test_rows_csv_neutralises_formulas_but_rows_stay_as_given(tmp_path: Path) -> None:
    risky = rows_of(("a.csv", 2, "immunization", "=HYPERLINK(1)", "rejected", None, None, "c", "f", "-bad"))
    report = RunReport("r", risky, summary_for(risky))
    write_report(report, tmp_path / "r")
    raw = pl.read_csv(tmp_path / "r" / "rows.csv", infer_schema=False)
    assert raw.get_column("source_key").to_list() == ["'=HYPERLINK(1)"]  # guarded on disk
    assert raw.get_column("message").to_list() == ["'-bad"]
    back = read_rows(tmp_path / "r" / "rows.csv")  # and unguarded when the tool reads it back
    assert back.get_column("source_key").to_list() == ["=HYPERLINK(1)"]
    assert back.get_column("message").to_list() == ["-bad"]
    assert report.held is not None and report.held.get_column("source_key").to_list() == ["=HYPERLINK(1)"]


def test_the_page_counts_from_the_tally_when_the_rows_are_a_sample(tmp_path: Path) -> None:
    sample = ROWS.filter(pl.col("state") == "rejected")
    counted = tally_of(sample).with_columns(pl.lit(450, dtype=pl.Int64).alias("rows"))
    summary = summary_for(ROWS)
    path = write_html(summary, sample, tmp_path / "report.html", counted)
    page, _ = parse(path)
    text = " ".join(page.text)
    assert "The first 2 of 900 rejected rows" in text
    assert "required: 450" in text and "date: 450" in text  # the bars' counts, from the tally
    assert page.rows_in["rejected-rows"] == 1 + 2  # only the sample is listed


def test_the_page_lists_inputs_kinds_and_warnings() -> None:
    sha = "ab" * 32
    summary = summary_for(
        ROWS,
        inputs=[{"path": "a.csv", "kind": "immunization", "rows": 4, "format": "csv", "sha256": sha}],
        patients={"created": 1, "reused": 2},
        warnings=[{"file": "a.csv", "code": "unknown-cvx", "count": 2, "rows": [7, 9]}],
    )
    page = Page()
    page.feed(render_html(summary, ROWS))
    text = " ".join(page.text)
    assert "a.csv" in text and sha[:16] in text and sha not in text  # the hash's start, not all of it
    assert "patients: created 1, reused 2" in text
    assert "unknown-cvx" in text and "rows 7, 9" in text
    assert "Per kind" in text and "immunization" in text and "patient" in text


# --- summary.json, typed (etl.report.Summary) ----------------------------------------------------

RUN_KEYS = ["run_id", "command", "dry_run", "target", "inputs", "rows_total", "states", "kinds", "warnings", "timings"]
SENT_KEYS = ["requests", "responses_429", "achieved_rate", "aborted", "unresponsive"]
LOAD_KEYS = ["patients", "resources", *SENT_KEYS, "http_versions", "creates_sent", "interrupted", "mode"]


def _summary(**facts: Any) -> Summary:
    base = Summary(run_id="r", command="load", dry_run=False, target="t", inputs=[], rows_total=0, states={},
                   kinds={}, warnings=[], timings={}, batch_rows=10)
    return base.updated(RunFacts(**facts))


@pytest.mark.parametrize(
    ("facts", "middle"),
    [
        ({}, []),  # validate
        ({"requests_planned": {"patient": 2}}, ["requests_planned"]),  # a dry run
        (
            {"patients": {}, "resources": {}, "requests": 3, "responses_429": 0, "achieved_rate": None,
             "aborted": None, "unresponsive": None, "http_versions": {}, "creates_sent": 3, "interrupted": False,
             "mode": "request", "disappeared": 0},
            [*LOAD_KEYS, "disappeared"],
        ),
        (
            {"patients": {}, "resources": {}, "requests": 3, "responses_429": 0, "achieved_rate": 1.0,
             "aborted": None, "unresponsive": None, "http_versions": {}, "creates_sent": 3, "interrupted": False,
             "mode": "bulk", "bulk_jobs": ["j1"], "bulk_limit": None, "disappeared": 0},
            [*LOAD_KEYS, "bulk_jobs", "bulk_limit", "disappeared"],
        ),
        ({"destination": {"type": "redox", "route": "/x"}, "requests_planned": 4}, ["destination", "requests_planned"]),
        (
            {"destination": {"type": "redox", "route": "/x"}, "requests": 1, "responses_429": 0,
             "achieved_rate": None, "aborted": None, "unresponsive": None},
            ["destination", *SENT_KEYS],
        ),
    ],
)
def test_summary_keys_appear_in_their_order_and_only_when_set(facts: dict[str, Any], middle: list[str]) -> None:
    # Set in a shuffled order: the file's order is the model's, not the order facts arrive in.
    summary = _summary(**dict(reversed(list(facts.items()))))
    summary.report_dir = "reports/r"
    dumped = summary.to_json()
    assert list(dumped) == [*RUN_KEYS, *middle, "batch_rows", "report_dir"]
    assert {k: dumped[k] for k in facts} == facts  # None kept where a fact was set to None


def test_run_facts_merge_and_refuse_unknown_keys() -> None:
    sent = RunFacts(requests=5, aborted=None)
    merged = RunFacts(mode="request").updated(sent)
    assert merged.to_json() == {"requests": 5, "aborted": None, "mode": "request"}
    with pytest.raises(ValidationError):
        RunFacts(**{"request": 5})  # a misspelt key is an error, not a new summary field
    with pytest.raises(ValidationError):
        RunFacts(mode="stream")  # type: ignore[arg-type]


def test_reconcile_summary_keys() -> None:
    summary = ReconcileSummary(run_id="r", command="reconcile", target="t", in_doubt=1, states={"created": 1},
                               verified=None, unresponsive=None, report_dir="reports/r")
    assert list(summary.to_json()) == ["run_id", "command", "target", "in_doubt", "states", "verified",
                                       "unresponsive", "report_dir"]


def test_summary_json_of_a_validate_and_a_dry_run(tmp_path: Path) -> None:
    """The real runs write the typed summary: its keys in order, its warnings in both shapes."""
    from etl.pipeline import load_files, validate_files
    from etl.settings import Settings

    source = tmp_path / "shots.csv"
    source.write_text(
        "record_id,patient_id,first_name,last_name,dob,cvx,administration_date,extra_column\n"
        "R1,P1,Ann,Lee,2001-02-03,170,2024-03-01,x\n"  # a Non-US CVX code: a row warning
        "R2,P2,Bo,Ng,2002-02-03,08,2024-03-02,y\n",
        encoding="utf-8",
    )
    validated = validate_files([source], Settings(report_dir=tmp_path / "v"))
    written = json.loads((tmp_path / "v" / "summary.json").read_text(encoding="utf-8"))
    # A run's summary says how many blank rows its inputs held (0 here), after rows_total.
    assert list(written) == [*RUN_KEYS[:6], "blank_rows", *RUN_KEYS[6:], "batch_rows", "report_dir", "not_carried",
                             "not_imported"]
    assert written["blank_rows"] == 0
    assert written == validated.summary
    assert written["not_carried"] == {str(source): [{"column": "extra_column", "reason": "unmapped"}]}
    assert written["not_imported"] == []
    by_code = {w["code"]: w for w in written["warnings"]}
    assert list(by_code["unmapped-columns"]) == ["file", "code", "message"]
    assert by_code["code-status"]["rows"] == [2] and by_code["code-status"]["count"] == 1
    assert list(written["inputs"][0]) == ["path", "sha256", "format", "encoding", "delimiter", "sheet", "kind",
                                          "profile", "rows", "columns_mapped"]
    dry = load_files([source], Settings(report_dir=tmp_path / "d", dry_run=True, state=tmp_path / "s.sqlite"))
    assert list(dry.summary) == [*RUN_KEYS[:6], "blank_rows", *RUN_KEYS[6:], "requests_planned", "batch_rows",
                                 "report_dir", "not_carried", "not_imported"]
    assert dry.summary["dry_run"] is True and sum(dry.summary["requests_planned"].values()) >= 2
