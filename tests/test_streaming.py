"""A load in batches (etl.streaming) ends where a whole-file load ends, in bounded memory."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import httpx
import polars as pl
import pytest

from etl import streaming
from etl.load.client import ApiClient
from etl.load.loader import Loader, LoadOptions, Send
from etl.load.state import StateStore
from etl.load.throttle import Throttle
from etl.pipeline import load_files
from etl.sandbox import SandboxConfig, SandboxServer
from etl.settings import Settings

from .conftest import SAMPLE
from .test_batches import GROUPS, _payloads, _report
from .test_load import patient_ref
from .test_pipeline import count


def _comparable(rows: pl.DataFrame) -> pl.DataFrame:
    """Report rows with the ids each sandbox chose reduced to whether there is one (and its prefix)."""
    return rows.with_columns(pl.col("resource_id").is_not_null(), pl.col("patient_id").str.slice(0, 4))


@pytest.mark.parametrize(("name", "paths", "profile"), GROUPS, ids=[g[0] for g in GROUPS])
def test_a_load_in_batches_ends_where_a_whole_file_load_ends(
    tmp_path: Path, name: str, paths: list[Path], profile: str | None
) -> None:
    reports, summaries = {}, {}
    for how in ("whole", "batched"):  # each into its own embedded sandbox (the one beside its state store)
        settings = Settings(profile=profile, state=tmp_path / how / "state.sqlite", report_dir=tmp_path / how / "r",
                            stream=how == "batched", batch_rows=37)
        report = load_files(paths, settings)
        reports[how], summaries[how] = _report(tmp_path / how / "r"), report.summary
    whole, batched = reports["whole"], reports["batched"]
    assert whole["states"]["created"] > 0 and whole["states"]["rejected"] > 0
    assert summaries["batched"]["batch_rows"] == 37 and "batch_rows" not in summaries["whole"]  # two roads taken
    assert _comparable(batched["rows"]).equals(_comparable(whole["rows"]))
    assert batched["rejects"] == whole["rejects"]
    assert (batched["states"], batched["kinds"], batched["warnings"]) == (
        whole["states"], whole["kinds"], whole["warnings"]
    )
    for key in ("resources", "patients", "creates_sent", "requests", "mode", "disappeared", "interrupted"):
        assert summaries["batched"][key] == summaries["whole"][key], key
    # Every created row names the id its sandbox holds, and crosswalk.csv lists exactly those.
    rows = batched["rows"].filter(pl.col("state") == "created")
    crosswalk = pl.read_csv(tmp_path / "batched" / "r" / "crosswalk.csv", infer_schema=False)
    assert set(rows["resource_id"]) <= set(crosswalk["resource_id"])
    assert crosswalk.height == sum(n for k in summaries["batched"]["resources"].values() for n in [k.get("created", 0)])
    assert not list((tmp_path / "batched" / "r").glob(".batches*"))


def test_a_second_load_in_batches_sends_nothing(tmp_path: Path, sandbox: Any) -> None:
    base = {"base_url": sandbox.base_url, "api_key": sandbox.api_key, "consistency_window": 0,
            "state": tmp_path / "s.sqlite", "stream": True, "batch_rows": 50}
    paths = [SAMPLE / "registry.csv", SAMPLE / "providers.csv", SAMPLE / "visits.csv"]
    first = load_files(paths, Settings(**base, report_dir=tmp_path / "r1"))
    created = first.states["created"]
    assert created > 0 and count(sandbox, "/v1/immunizations") > 0
    before = {route: count(sandbox, route) for route in ("/v1/patients", "/v1/immunizations", "/v1/encounters")}
    again = load_files(paths, Settings(**base, report_dir=tmp_path / "r2"))
    assert again.summary["creates_sent"] == 0
    assert again.states["skipped"] == created and again.states.get("created", 0) == 0
    assert {route: count(sandbox, route) for route in before} == before
    ids = lambda r: r.rows.filter(pl.col("state") != "rejected")["resource_id"].to_list()  # noqa: E731
    assert ids(again) == ids(first)  # each row names the resource the first run made


def test_a_reference_to_an_id_the_target_holds_is_looked_up_while_planning(tmp_path: Path, sandbox: Any) -> None:
    made = httpx.post(f"{sandbox.base_url}/v1/patients", headers={"x-api-key": sandbox.api_key},
                      json={"firstName": "Ann", "lastName": "Lee", "birthDate": "1980-01-02", "gender": "female"})
    patient_id = made.json()["data"]["id"]
    visits = tmp_path / "visits.csv"
    visits.write_text(
        "Visit ID,Patient ID,Status,Visit Type,Start\n"
        f"V1,{patient_id},finished,ambulatory,2024-01-02T09:00:00\n"
        "V2,pat_nobodyhasthisid,finished,ambulatory,2024-01-03T09:00:00\n",
        encoding="utf-8",
    )
    report = load_files([visits], Settings(base_url=sandbox.base_url, api_key=sandbox.api_key, consistency_window=0,
                                           state=tmp_path / "s.sqlite", report_dir=tmp_path / "r", stream=True))
    by_key = {r["source_key"]: r for r in report.rows.iter_rows(named=True)}
    assert by_key["V1"]["state"] == "created" and by_key["V1"]["patient_id"] == patient_id
    assert by_key["V2"]["state"] == "rejected" and by_key["V2"]["error_code"] == "unresolved-reference"
    assert report.summary["requests"] == 3  # two lookups while planning, one create


def test_a_dry_run_against_a_state_store_plans_what_a_whole_file_dry_run_plans(tmp_path: Path) -> None:
    state = tmp_path / "s.sqlite"
    load_files([SAMPLE / "registry.csv", SAMPLE / "providers.csv"], Settings(state=state, report_dir=tmp_path / "r0"))
    children = [SAMPLE / n for n in ("visits.csv", "documents.csv", "tasks.csv")]  # they name loaded patients
    batched = load_files(children, Settings(dry_run=True, state=state, report_dir=tmp_path / "a", batch_rows=37))
    whole = load_files(children, Settings(dry_run=True, state=state, report_dir=tmp_path / "b", stream=False))
    assert batched.summary["batch_rows"] == 37 and "batch_rows" not in whole.summary
    assert _payloads(tmp_path / "a") == _payloads(tmp_path / "b")
    expected, got = _report(tmp_path / "b"), _report(tmp_path / "a")
    assert got["rows"].equals(expected["rows"]) and got["states"] == expected["states"]
    # The references to patients the first load created resolve: fewer rejections than with no store.
    alone = load_files(children, Settings(dry_run=True, state=tmp_path / "none.sqlite", report_dir=tmp_path / "c"))
    assert got["states"]["rejected"] < alone.states["rejected"]
    assert got["states"]["planned"] > alone.states["planned"]


def test_a_later_part_finds_an_earlier_parts_parent_in_the_state_store(tmp_path: Path) -> None:
    """The loader keeps only the results that did not create; a child sent in a later part still
    gets its created parent's id (from the state store) or its failed parent's reason."""
    key = "clk_test_parts0123456789"
    with SandboxServer(SandboxConfig(api_keys={key: "*"})) as server:

        async def go() -> tuple[dict[Any, Any], dict[Any, Any], Loader]:
            async with httpx.AsyncClient(base_url=server.base_url) as http:
                state = StateStore(tmp_path / "s.sqlite", target=server.base_url)
                loader = Loader(ApiClient(http, key), state, Throttle(None), LoadOptions(consistency_window=0), "run")
                await loader.begin()
                good = Send("patient", "/v1/patients", "P1",
                            json.dumps({"firstName": "Ann", "lastName": "Lee", "gender": "female"}), "h1")
                bad = Send("patient", "/v1/patients", "P2", json.dumps({"firstName": "Bo"}), "h2")  # no lastName
                parents = await loader.run_part([good, bad])
                assert ("patient", "P1") not in loader._results  # created: read back from the store
                dose = '{"patientId":%s,"status":"completed","vaccineCode":"08","occurrenceDateTime":"2021-03-04"}'
                children = await loader.run_part([
                    Send("immunization", "/v1/immunizations", "R1", dose % patient_ref("P1"), "h3"),
                    Send("immunization", "/v1/immunizations", "R2", dose % patient_ref("P2"), "h4"),
                ])
                loader.end()
                state.close()
                return parents, children, loader

        parents, children, loader = asyncio.run(go())
        assert parents[("patient", "P1")].state == "created"
        p2 = parents[("patient", "P2")]
        assert (p2.state, p2.error_code) == ("failed", "VALIDATION_ERROR")
        r1, r2 = children[("immunization", "R1")], children[("immunization", "R2")]
        assert r1.state == "created"
        made = httpx.get(f"{server.base_url}/v1/immunizations/{r1.resource_id}", headers={"x-api-key": key}).json()
        assert made["data"]["patientId"] == parents[("patient", "P1")].resource_id
        assert (r2.state, r2.error_code) == ("failed", "parent-failed")
        assert count(server, "/v1/immunizations") == 1
        assert loader.stats.requests == 3


def test_a_load_goes_in_batches_when_its_inputs_are_large(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    paths = [SAMPLE / "registry.csv"]
    size = (SAMPLE / "registry.csv").stat().st_size
    monkeypatch.setattr(streaming, "STREAM_BYTES", size - 1)
    assert streaming.streams(paths, Settings())
    assert not streaming.streams(paths, Settings(stream=False))
    monkeypatch.setattr(streaming, "STREAM_BYTES", size)
    assert not streaming.streams(paths, Settings())
    assert streaming.streams(paths, Settings(stream=True))
    monkeypatch.setattr(streaming, "STREAM_BYTES", 0)
    report = load_files(paths, Settings(state=tmp_path / "s.sqlite", report_dir=tmp_path / "r", batch_rows=100))
    assert report.summary["batch_rows"] == 100 and report.states["created"] > 0
