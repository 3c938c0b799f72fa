"""A load in batches (etl.send): sent a part at a time, in bounded memory (its reports: tests/golden)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import httpx
import polars as pl
import pytest
from click.testing import CliRunner

from etl.cli import main
from etl.errors import ExitCode
from etl.load.client import ApiClient
from etl.load.loader import Loader, LoadOptions, Send
from etl.load.lookup import reference_id
from etl.load.state import Record, StateStore
from etl.load.throttle import Throttle
from etl.pipeline import STREAM_DEPRECATED, load_files
from etl.report import read_rows
from etl.sandbox import SandboxConfig, SandboxServer
from etl.settings import Settings

from .conftest import SAMPLE
from .test_load import patient_ref
from .test_pipeline import count
from .test_plan import _payloads


def test_a_second_load_in_batches_sends_nothing(tmp_path: Path, sandbox: Any) -> None:
    base = {"base_url": sandbox.base_url, "api_key": sandbox.api_key, "consistency_window": 0,
            "state": tmp_path / "s.sqlite", "batch_rows": 50}
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


def test_a_re_import_reads_the_state_store_a_set_at_a_time(tmp_path: Path, sandbox: Any,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """A weekly re-import: every row an earlier run created is skipped from set reads of the state store
    (no record read a row at a time, no request); only a row that changed reaches the loader."""
    base = {"base_url": sandbox.base_url, "api_key": sandbox.api_key, "consistency_window": 0,
            "state": tmp_path / "s.sqlite", "batch_rows": 100}
    registry = tmp_path / "registry.csv"
    text = (SAMPLE / "registry.csv").read_text(encoding="utf-8")
    registry.write_text(text, encoding="utf-8")
    paths = [registry]  # (the sample's visits name patients nobody has: looked up again each run)
    first = load_files(paths, Settings(**base, report_dir=tmp_path / "r1"))
    created = first.states["created"]
    assert created > 500
    # One dose's lot number corrected since: that row changed, the rest did not.
    registry.write_text(text.replace(",JS4841AA,", ",JS4841AB,", 1), encoding="utf-8")
    asked: list[tuple[str, str]] = []
    reads: list[int] = []
    get, stored = StateStore.get, StateStore.stored

    def counted_get(self: StateStore, kind: str, keys: Any) -> Any:
        asked.extend((kind, k) for k in keys)
        return get(self, kind, keys)

    def counted_stored(self: StateStore, kind: str, keys: pl.Series, **kw: Any) -> pl.DataFrame:
        reads.append(len(keys))
        return stored(self, kind, keys, **kw)

    monkeypatch.setattr(StateStore, "get", counted_get)
    monkeypatch.setattr(StateStore, "stored", counted_stored)
    before = count(sandbox, "/v1/immunizations")
    again = load_files(paths, Settings(**base, report_dir=tmp_path / "r2"))
    assert (again.summary["requests"], again.summary["matching_requests"], again.summary["creates_sent"]) == (0, 0, 0)
    assert count(sandbox, "/v1/immunizations") == before
    assert again.states["changed"] == 1 and again.states["skipped"] == created - 1
    changed = again.rows.filter(pl.col("state") == "changed")
    assert changed["source_key"].to_list() == ["VX-000001"]
    assert asked == [("immunization", "VX-000001")]  # the changed row alone was read as a record
    batches, kinds = -(-again.rows_total // 100), 2  # patients and immunizations
    # A set read per kind: matching's, one per batch; the skip, which counts what is left to send too.
    assert len(reads) <= (batches + 1) * kinds
    assert sum(reads) >= 2 * created  # each create was asked about in them: nothing skipped unread
    ids = lambda r: r.rows.filter(pl.col("state") != "rejected")["resource_id"].to_list()  # noqa: E731
    assert ids(again) == ids(first)
    crosswalk = lambda folder: pl.read_csv(tmp_path / folder / "crosswalk.csv", infer_schema=False)  # noqa: E731
    assert crosswalk("r2").equals(crosswalk("r1"))  # the skipped rows' ids (patients too), and the changed one's


def test_created_unchanged_is_what_the_loader_skips(tmp_path: Path) -> None:
    from etl.load.loader import created_unchanged

    with StateStore(tmp_path / "s.sqlite", target="https://api.example.test") as state:
        state.mark_pending("patient", [(k, "h") for k in ("same", "moved", "no-id", "pending", "unknown", "failed")],
                           "run1")
        state.mark_pending("patient", [("no-hash", "")], "run1")
        state.mark_pending("immunization", [("same", "h")], "run1")
        state.record_outcomes([
            *(Record("patient", k, "created", resource_id=f"pat_{k}") for k in ("same", "moved", "no-hash")),
            Record("patient", "no-id", "created"),
            Record("patient", "unknown", "unknown"), Record("patient", "failed", "failed", http_status=422),
            Record("immunization", "same", "created", resource_id="imm_1"),
        ])
        creates = pl.DataFrame(
            [("patient", k, "h2" if k in ("moved", "no-id", "no-hash") else "h")
             for k in ("same", "moved", "no-id", "no-hash", "pending", "unknown", "failed", "new")]
            + [("immunization", "same", "h"), ("immunization", "other", "h")],
            schema={"kind": pl.String, "source_key": pl.String, "body_hash": pl.String}, orient="row",
        )
        got = created_unchanged(state, creates).sort("kind", "source_key").rows()
    # "moved": created, then changed (its hash differs): the loader reports it (or patches it with --update).
    # "no-id" and "no-hash": nothing to patch or nothing to compare: skipped, as the loader does.
    assert got == [("immunization", "same", "imm_1"), ("patient", "no-hash", "pat_no-hash"), ("patient", "no-id", None),
                   ("patient", "same", "pat_same")]


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
                                           state=tmp_path / "s.sqlite", report_dir=tmp_path / "r"))
    by_key = {r["source_key"]: r for r in report.rows.iter_rows(named=True)}
    assert by_key["V1"]["state"] == "created" and by_key["V1"]["patient_id"] == patient_id
    assert by_key["V2"]["state"] == "rejected" and by_key["V2"]["error_code"] == "unresolved-reference"
    assert report.summary["requests"] == 3  # two lookups while planning, one create


def test_a_dry_run_against_a_state_store_explains_references_to_what_it_created(tmp_path: Path) -> None:
    state = tmp_path / "s.sqlite"
    load_files([SAMPLE / "registry.csv", SAMPLE / "providers.csv"], Settings(state=state, report_dir=tmp_path / "r0"))
    children = [SAMPLE / n for n in ("visits.csv", "documents.csv", "tasks.csv")]  # they name loaded patients
    got = load_files(children, Settings(dry_run=True, state=state, report_dir=tmp_path / "a", batch_rows=37))
    load_files(children, Settings(dry_run=True, state=state, report_dir=tmp_path / "b"))  # one batch a file
    assert got.summary["batch_rows"] == 37
    assert _payloads(tmp_path / "a") == _payloads(tmp_path / "b")
    assert read_rows(tmp_path / "a" / "rows.csv").equals(read_rows(tmp_path / "b" / "rows.csv"))
    # The references to patients the first load created resolve: fewer rejections than with no store.
    alone = load_files(children, Settings(dry_run=True, state=tmp_path / "none.sqlite", report_dir=tmp_path / "c"))
    assert got.states["rejected"] < alone.states["rejected"]
    assert got.states["planned"] > alone.states["planned"]


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
        # patientId (simple answers) or patient.reference (FHIR answers, the default)
        assert reference_id(made["data"].get("patientId") or made["data"]["patient"]) == parents[
            ("patient", "P1")].resource_id
        assert (r2.state, r2.error_code) == ("failed", "parent-failed")
        assert count(server, "/v1/immunizations") == 1
        assert loader.stats.requests == 3


@pytest.mark.parametrize("flag", ["--stream", "--no-stream"])
def test_the_stream_flags_are_accepted_no_ops_with_a_warning(tmp_path: Path, flag: str) -> None:
    args = ["load", str(SAMPLE / "registry.csv"), "--dry-run", flag, "--batch-rows", "100",
            "--state", str(tmp_path / "s.sqlite"), "--report-dir", str(tmp_path / "r"), "-q"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == ExitCode.REJECTED, result.output
    assert STREAM_DEPRECATED in result.stderr
    summary = json.loads((tmp_path / "r" / "summary.json").read_text())
    assert summary["batch_rows"] == 100  # planned in batches all the same


def test_a_load_without_the_stream_flag_says_nothing_of_it(tmp_path: Path) -> None:
    args = ["load", str(SAMPLE / "registry.csv"), "--dry-run", "--state", str(tmp_path / "s.sqlite"),
            "--report-dir", str(tmp_path / "r"), "-q"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == ExitCode.REJECTED, result.output
    assert "deprecated" not in result.stderr
