"""Every seed resource and the references between them, across files and layouts."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import polars as pl
import pytest

from etl.pipeline import load_files, validate_files
from etl.rules import RULES
from etl.settings import Settings
from schemas.limits import ROUTES
from schemas.models import model_for

from .conftest import SAMPLE
from .test_pipeline import count

CLINIC_FILES = [SAMPLE / n for n in ("registry.csv", "providers.csv", "visits.csv", "documents.csv", "tasks.csv")]
SYNTHEA = [SAMPLE / "synthea" / n for n in ("patients.csv", "providers.csv", "encounters.csv", "immunizations.csv")]
SCHEMA_OF_ROUTE = {route: schema for schema, route in ROUTES.items()}


def _settings(tmp_path: Path, server: Any | None = None, **kw: Any) -> Settings:
    extra: dict[str, Any] = {}
    if server is not None:
        extra = {"base_url": server.base_url, "api_key": server.api_key, "consistency_window": 0}
    return Settings(state=tmp_path / "state.sqlite", report_dir=tmp_path / "report", **extra, **kw)


def _stored(server: Any, path: str) -> Any:
    """What the sandbox holds at ``/v1/<route>/<id>``: the create body as sent, whatever shape it answers in."""
    route, rid = path.rsplit("/", 1)
    return server.sandbox.store.get(route, rid)


def _get(server: Any, path: str, **params: Any) -> Any:
    response = httpx.get(server.base_url + path, params=params, headers={"x-api-key": server.api_key})
    response.raise_for_status()
    return response.json()["data"]


def test_exactly_the_planted_rows_of_every_clinic_file_are_rejected(tmp_path: Path) -> None:
    report = validate_files(CLINIC_FILES, Settings(report_dir=tmp_path / "r"))
    planted = pl.concat(
        [
            pl.read_csv(SAMPLE / "planted.csv", infer_schema=False).with_columns(
                pl.lit("registry.csv").alias("source_file")
            ),
            pl.read_csv(SAMPLE / "planted_more.csv", infer_schema=False),
        ],
        how="diagonal",
    )
    # A domain rule that only warns by default (an expired lot) leaves its planted rows valid.
    warning_codes = [code for code, rule in RULES.items() if rule.severity == "warning"]
    assert planted.filter(pl.col("code").is_in(warning_codes)).height > 0
    planted = planted.filter(~pl.col("code").is_in(warning_codes))
    got = report.rows.filter(pl.col("state") == "rejected").with_columns(
        pl.col("source_file").str.split("/").list.last()
    )
    expected = {(r["source_file"], int(r["source_row"])) for r in planted.iter_rows(named=True)}
    assert {(r["source_file"], r["source_row"]) for r in got.iter_rows(named=True)} == expected
    codes = {(r["source_file"], r["source_row"]): (r["error_code"], r["field"]) for r in got.iter_rows(named=True)}
    for r in planted.iter_rows(named=True):
        if r["source_file"] == "registry.csv":
            continue  # checked with their values in tests/test_validate.py
        assert codes[(r["source_file"], int(r["source_row"]))] == (r["code"], r["column"]), r


def test_dry_run_bodies_of_all_six_routes_satisfy_the_published_schemas(
    tmp_path: Path, openapi: dict[str, Any]
) -> None:
    import jsonschema

    load_files([*CLINIC_FILES, *SYNTHEA[:1]], _settings(tmp_path, dry_run=True))
    lines = [json.loads(x) for x in (tmp_path / "report" / "payloads.ndjson").read_text("utf-8").splitlines()]
    assert {line["path"] for line in lines} == set(ROUTES.values())
    for line in lines:
        schema = SCHEMA_OF_ROUTE[line["path"]]
        model_for(schema).model_validate(line["body"])
        validator = jsonschema.Draft202012Validator({"$ref": f"#/components/schemas/{schema}", **openapi})
        assert [e.message for e in validator.iter_errors(line["body"])] == [], line


def test_clinic_files_load_with_every_reference_resolved(tmp_path: Path, sandbox: Any) -> None:
    dry = load_files(CLINIC_FILES, _settings(tmp_path / "dry", dry_run=True))
    report = load_files(CLINIC_FILES, _settings(tmp_path, sandbox))
    assert sum(report.states.values()) == report.rows_total
    planned = dry.rows.filter(pl.col("state") == "planned").select("source_file", "source_row")
    created = report.rows.filter(pl.col("state") == "created").select("source_file", "source_row")
    assert planned.sort(pl.all()).equals(created.sort(pl.all()))
    kinds = report.summary["resources"]
    for kind, route in (
        ("encounter", "/v1/encounters"),
        ("document", "/v1/documents"),
        ("task", "/v1/tasks"),
        ("practitioner", "/v1/practitioners"),
        ("immunization", "/v1/immunizations"),
    ):
        assert count(sandbox, route) == kinds[kind]["created"] > 0, kind
    # A document is one create for all its section rows.
    docs = report.rows.filter((pl.col("kind") == "document") & (pl.col("state") == "created"))
    assert docs["resource_id"].n_unique() == count(sandbox, "/v1/documents") < docs.height
    again = load_files(CLINIC_FILES, _settings(tmp_path, sandbox).model_copy(update={"report_dir": tmp_path / "b"}))
    assert again.states["created"] == 0 and again.summary["creates_sent"] == 0
    assert again.states["skipped"] == report.states["created"]


def test_synthea_export_loads_with_references_from_the_crosswalk(tmp_path: Path, sandbox: Any) -> None:
    report = load_files(SYNTHEA, _settings(tmp_path, sandbox, profile="synthea"))
    assert report.states["rejected"] == report.states["failed"] == 0
    crosswalk = pl.read_csv(tmp_path / "report" / "crosswalk.csv", infer_schema=False)
    ids = {(k, s): r for k, s, r in crosswalk.iter_rows()}
    source = pl.read_csv(SAMPLE / "synthea" / "immunizations.csv", infer_schema=False)
    rows = report.rows.filter(pl.col("kind") == "immunization").sort("source_row")
    assert rows.height == source.height
    for src, row in zip(source.iter_rows(named=True), rows.iter_rows(named=True), strict=True):
        stored = _stored(sandbox, f"/v1/immunizations/{row['resource_id']}")
        assert stored["patientId"] == ids[("patient", src["PATIENT"])]
        assert stored["encounterId"] == ids[("encounter", src["ENCOUNTER"])]
    encounters = pl.read_csv(SAMPLE / "synthea" / "encounters.csv", infer_schema=False)
    for src in encounters.head(5).iter_rows(named=True):
        stored = _stored(sandbox, f"/v1/encounters/{ids[('encounter', src['Id'])]}")
        assert stored["practitionerId"] == ids[("practitioner", src["PROVIDER"])]
        assert stored["class"] in {"AMB", "IMP", "EMER", "HH", "VR"}
        assert stored["lengthMinutes"] >= 0


def test_cvrs_extract_validates_and_loads(tmp_path: Path, sandbox: Any) -> None:
    path = SAMPLE / "cvrs" / "cvrs_extract.tsv"
    checked = validate_files([path], _settings(tmp_path / "v", profile="cvrs"))
    assert checked.summary["inputs"][0]["delimiter"] == "\t"
    assert checked.states["rejected"] == 0
    report = load_files([path], _settings(tmp_path, sandbox, profile="cvrs"))
    assert report.states["created"] == checked.rows_total == count(sandbox, "/v1/immunizations")
    refused = _get(sandbox, "/v1/immunizations", status="not-done")["data"]
    assert len(refused) == 1  # vax_refusal YES


def test_a_redacted_cvrs_extract_is_rejected_with_a_clear_code(tmp_path: Path) -> None:
    report = validate_files([SAMPLE / "cvrs" / "cvrs_redacted.tsv"], _settings(tmp_path, profile="cvrs"))
    rejected = report.rows.filter(pl.col("state") == "rejected")
    assert rejected.height == report.rows_total > 0
    assert set(rejected["error_code"].to_list()) == {"redacted"}


def test_unknown_layout_gets_a_starter_profile(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from etl.cli import main

    target = tmp_path / "p.toml"
    result = CliRunner().invoke(main, ["profile", "init", str(SAMPLE / "visits.csv"), "--output", str(target)])
    assert result.exit_code == 0, result.output
    text = target.read_text("utf-8")
    assert 'kind = "encounter"' in text and '"Visit Type" = "encounter_class"' in text
    result = CliRunner().invoke(
        main, ["validate", str(SAMPLE / "visits.csv"), "--profile", str(target), "--report-dir", str(tmp_path / "r")]
    )
    assert result.exit_code in (0, 1), result.output


@pytest.mark.parametrize("name", ["cvrs", "synthea", "clinikapi", "default"])
def test_builtin_profiles_load(name: str) -> None:
    from etl.mapping import builtin_profiles, load_profile

    assert name in builtin_profiles()
    assert load_profile(name).name == name


def test_practitioners_from_performer_columns_are_created_once_and_shared_by_npi(tmp_path: Path, sandbox: Any) -> None:
    providers = tmp_path / "providers.csv"
    providers.write_text("Provider ID,NPI,First Name,Last Name\nPRV-1,1234567890,Jane,Doe\n", encoding="utf-8")
    registry = tmp_path / "registry.csv"
    registry.write_text(
        "Record ID,Patient ID,First Name,Last Name,CVX,Admin Date,Vaccinator NPI,Vaccinator Name,Performer\n"
        "R1,P1,Ann,Lee,08,2021-03-04,1234567890,Jane Q. Doe,\n"
        "R2,P1,Ann,Lee,20,2021-03-05,,,PRV-1\n"
        "R3,P2,Bo,Ray,21,2021-03-06,9999999999,Sam Roe,\n"
        "R4,P2,Bo,Ray,03,2021-03-07,9999999999,Sam Roe,\n",
        encoding="utf-8",
    )
    report = load_files([registry, providers], _settings(tmp_path, sandbox))
    assert report.states["created"] == 5
    assert count(sandbox, "/v1/practitioners") == 2  # Jane Doe once (NPI shared with the providers file), Sam Roe once
    actors = {}
    for row in report.rows.filter(pl.col("kind") == "immunization").iter_rows(named=True):
        dose = _stored(sandbox, f"/v1/immunizations/{row['resource_id']}")
        actors[row["source_key"]] = dose["performer"][0]["actorId"]
    assert actors["R1"] == actors["R2"] != actors["R3"] == actors["R4"]
    assert _stored(sandbox, f"/v1/practitioners/{actors['R3']}")["lastName"] == "Roe"
    # As the API answers it (FHIR by default): the same practitioner, its family name.
    assert _get(sandbox, f"/v1/practitioners/{actors['R3']}")["name"][0]["family"] == "Roe"
