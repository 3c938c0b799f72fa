"""The whole pipeline against a real sandbox: reconcile, re-run, dry run, parity."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import polars as pl

from etl.pipeline import load_files, validate_files
from etl.report import FINAL_STATES
from etl.settings import Settings
from schemas.models import model_for

from .conftest import SAMPLE

SCHEMA_OF_PATH = {"/v1/patients": "PatientCreate", "/v1/immunizations": "ImmunizationCreate"}


def _settings(tmp_path: Path, server: Any | None = None, **kw: Any) -> Settings:
    extra: dict[str, Any] = {}
    if server is not None:
        extra = {"base_url": server.base_url, "api_key": server.api_key, "consistency_window": 0}
    return Settings(state=tmp_path / "state.sqlite", report_dir=tmp_path / "report", **extra, **kw)


def _payloads(folder: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (folder / "payloads.ndjson").read_text(encoding="utf-8").splitlines()]


def count(server: Any, route: str) -> int:
    response = httpx.get(server.base_url + route, params={"count": 1}, headers={"x-api-key": server.api_key})
    response.raise_for_status()
    return int(response.json()["data"]["total"])


def _reconciles(summary: dict[str, Any]) -> None:
    assert set(summary["states"]) == set(FINAL_STATES)
    assert sum(summary["states"].values()) == summary["rows_total"]
    for per_kind in summary["kinds"].values():
        assert set(per_kind) == set(FINAL_STATES)


def test_dry_run_bodies_satisfy_the_payload_models(tmp_path: Path) -> None:
    report = load_files([SAMPLE / "registry.csv"], _settings(tmp_path, dry_run=True))
    _reconciles(report.summary)
    lines = _payloads(tmp_path / "report")
    planned = report.states["planned"]
    assert sum(1 for line in lines if line["kind"] == "immunization") == planned
    assert {line["method"] for line in lines} == {"POST"}
    for line in lines:
        model_for(SCHEMA_OF_PATH[line["path"]]).model_validate(line["body"])
        assert isinstance(line["source_row"], int) and line["source_row"] >= 2


def test_dry_run_bodies_satisfy_the_published_schemas(tmp_path: Path, openapi: dict[str, Any]) -> None:
    import jsonschema

    load_files([SAMPLE / "registry.csv"], _settings(tmp_path, dry_run=True))
    validators = {
        path: jsonschema.Draft202012Validator({"$ref": f"#/components/schemas/{name}", **openapi})
        for path, name in SCHEMA_OF_PATH.items()
    }
    lines = _payloads(tmp_path / "report")
    errors = [
        (line["source_row"], e.message) for line in lines for e in validators[line["path"]].iter_errors(line["body"])
    ]
    assert errors == []
    assert len(lines) > 500


def test_csv_and_excel_copies_produce_identical_payloads(tmp_path: Path) -> None:
    load_files([SAMPLE / "registry.csv"], _settings(tmp_path / "csv", dry_run=True))
    load_files([SAMPLE / "registry.xlsx"], _settings(tmp_path / "xlsx", dry_run=True))
    csv_lines = [{k: v for k, v in line.items()} for line in _payloads(tmp_path / "csv" / "report")]
    xlsx_lines = _payloads(tmp_path / "xlsx" / "report")
    assert csv_lines == xlsx_lines


def test_load_reconciles_and_a_rerun_sends_nothing(tmp_path: Path, sandbox: Any) -> None:
    settings = _settings(tmp_path, sandbox)
    first = load_files([SAMPLE / "registry.csv"], settings)
    _reconciles(first.summary)
    created = first.states["created"]
    assert created == first.rows_total - first.states["rejected"]
    assert count(sandbox, "/v1/immunizations") == created
    assert count(sandbox, "/v1/patients") == first.summary["patients"]["created"]
    rows = first.rows.filter(pl.col("state") == "created")
    assert rows["resource_id"].str.starts_with("imm_").all()
    assert rows["patient_id"].str.starts_with("pt_").all()

    again = load_files([SAMPLE / "registry.csv"], settings.model_copy(update={"report_dir": tmp_path / "again"}))
    assert again.states["created"] == 0
    assert again.states["skipped"] == created
    assert again.summary["requests"] == 0
    assert count(sandbox, "/v1/immunizations") == created
    same_ids = first.rows.join(again.rows, on=["source_row"]).filter(pl.col("state") == "created")
    assert (same_ids["resource_id"] == same_ids["resource_id_right"]).all()


def test_every_row_a_dry_run_plans_is_accepted_by_the_real_import(tmp_path: Path, sandbox: Any) -> None:
    dry = load_files([SAMPLE / "registry.csv"], _settings(tmp_path / "dry", dry_run=True))
    real = load_files([SAMPLE / "registry.csv"], _settings(tmp_path / "real", sandbox))
    planned = set(dry.rows.filter(pl.col("state") == "planned")["source_row"].to_list())
    created = set(real.rows.filter(pl.col("state") == "created")["source_row"].to_list())
    assert planned == created


def test_validate_exit_state_and_rejects_file(tmp_path: Path) -> None:
    report = validate_files([SAMPLE / "registry.csv"], _settings(tmp_path))
    _reconciles(report.summary)
    rejects = pl.read_csv(tmp_path / "report" / "rejects.csv", infer_schema=False)
    original = pl.read_csv(SAMPLE / "registry.csv", infer_schema=False)
    assert rejects.height == report.states["rejected"]
    assert set(original.columns) <= set(rejects.columns)
    assert rejects["reasons"].str.len_chars().min() > 0
    assert report.exit_code() == 1


def test_unresolved_references_are_rejected_and_refusals_fail_with_the_api_code(tmp_path: Path, sandbox: Any) -> None:
    path = tmp_path / "refs.csv"
    path.write_text(
        "Record ID,Patient ID,First Name,Last Name,CVX,Admin Date,Performer\n"
        "R1,P1,Ann,Lee,08,2021-03-04,DR-NOBODY\n"
        "R2,P1,Ann,Lee,20,2021-03-04,\n"
        "R3,P1,Ann,Lee,21,2021-03-04,DR-GONE\n",
        encoding="utf-8",
    )
    crosswalk = tmp_path / "crosswalk.csv"
    crosswalk.write_text("kind,source_id,clinikapi_id\npractitioner,DR-GONE,prac_deleted0000\n", encoding="utf-8")
    report = load_files([path], _settings(tmp_path, sandbox, crosswalk=crosswalk))
    by_key = {r["source_key"] or r["message"]: r for r in report.rows.iter_rows(named=True)}
    rejected = report.rows.filter(pl.col("state") == "rejected").row(0, named=True)
    assert (rejected["source_row"], rejected["error_code"], rejected["field"]) == (
        2,
        "unresolved-reference",
        "Performer",
    )
    assert "DR-NOBODY" in rejected["message"]
    assert by_key["R2"]["state"] == "created"
    # The crosswalk vouches for an id the API no longer has: the API refuses, the row fails with its code.
    assert by_key["R3"]["state"] == "failed"
    assert by_key["R3"]["error_code"] == "VALIDATION_ERROR"
    assert "performer" in by_key["R3"]["field"]
    assert by_key["R3"]["message"].startswith("HTTP 422")
    assert report.exit_code() == 3


def test_redact_leaves_names_birth_dates_and_contacts_out_of_the_report(tmp_path: Path) -> None:
    sample = pl.read_csv(SAMPLE / "registry.csv", infer_schema=False)
    planted = pl.read_csv(SAMPLE / "planted.csv", infer_schema=False)
    rejected_rows = [int(r) - 2 for r in planted["source_row"]]
    phi = {v for c in ("First Name", "Last Name", "DOB", "Phone", "Email", "Street")
           for v in sample[c].gather(rejected_rows).drop_nulls().to_list() if len(v) > 3}
    plain = validate_files([SAMPLE / "registry.csv"], _settings(tmp_path / "plain"))
    redacted = validate_files([SAMPLE / "registry.csv"], _settings(tmp_path / "redacted", redact=True))
    assert plain.states == redacted.states

    def leaked(folder: Path) -> set[str]:
        text = "".join(p.read_text("utf-8") for p in folder.rglob("*") if p.is_file())
        return {v for v in phi if v in text}

    assert leaked(tmp_path / "plain" / "report")  # the check can see PHI when it is there
    assert leaked(tmp_path / "redacted" / "report") == set()
