"""Bulk mode (etl.load.bulk) against the real sandbox, reconciled row by row."""

from __future__ import annotations

import asyncio
import contextlib
import json
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import httpx
import polars as pl
import pytest

from bench.generate import GHOST_ID, Generated, generate
from etl.errors import LookupFailed
from etl.load.bulk import BULK_RECORD_ERROR, BulkClient, BulkLoader, BulkOptions, choose_mode, line_results
from etl.load.client import ApiClient
from etl.load.loader import LoadOptions, Result, Send
from etl.load.state import StateStore
from etl.load.throttle import Throttle
from etl.pipeline import load_files
from etl.sandbox import SandboxConfig, SandboxServer
from etl.settings import Settings
from schemas.limits import BULK_MAX_RECORDS


@pytest.fixture(params=["fhir", "simple"])
def roomy(request: pytest.FixtureRequest) -> Iterator[SandboxServer]:
    """A sandbox that allows more than the documented 5 bulk imports an hour, in each answer shape: under
    fhir a job names no ids (as documented) and each line is settled by lookup; simple names them."""
    with SandboxServer(SandboxConfig(bulk_operations_per_hour=100, responses=request.param)) as server:
        yield server


@pytest.fixture()
def roomy_simple() -> Iterator[SandboxServer]:
    """As ``roomy``, answering simple only: its jobs name each line's id (100,000 lookups would be slow)."""
    with SandboxServer(SandboxConfig(bulk_operations_per_hour=100, responses="simple")) as server:
        yield server


def _settings(server: SandboxServer, tmp_path: Path, g: Generated, **extra: object) -> Settings:
    return Settings(base_url=server.base_url, api_key=server.api_key, state=tmp_path / "state.sqlite",
                    report_dir=tmp_path / "report-{run_id}", crosswalk=g.crosswalk, **{"mode": "bulk", **extra})


def _jobs(server: SandboxServer) -> int:
    with contextlib.closing(sqlite3.connect(server.sandbox.store.path)) as db:
        return int(db.execute("SELECT count(*) FROM jobs").fetchone()[0])


# 25,000 rows (they were 100,000: the same jobs split at the same limit, a quarter of the time).
def test_25k_rows_in_bulk_reconcile_row_by_row(roomy_simple: SandboxServer, tmp_path: Path) -> None:
    roomy = roomy_simple
    g = generate(tmp_path / "registry.csv", 25_000, ghosts=7)
    report = load_files([g.path], _settings(roomy, tmp_path, g, bulk_per_hour=100))
    rows = report.rows
    s = report.summary
    assert s["mode"] == "bulk" and s["rows_total"] == 25_000 == rows.height
    assert sum(s["states"].values()) == s["rows_total"]
    assert s["states"]["created"] == 25_000 - 7 and s["states"]["failed"] == 7
    # 25,000 immunizations and ~8,000 patients: 3 + 1 jobs of at most BULK_MAX_RECORDS (10,000) lines.
    assert BULK_MAX_RECORDS == 10_000
    assert len(s["bulk_jobs"]) == 4
    failed = rows.filter(pl.col("state") == "failed")
    assert sorted(failed["source_row"].to_list()) == list(g.ghost_rows)
    assert set(failed["error_code"]) == {BULK_RECORD_ERROR}
    assert all(GHOST_ID in m for m in failed["message"])
    created = rows.filter(pl.col("state") == "created")
    ids = created["resource_id"].to_list()
    assert len(set(ids)) == len(ids) and all(i.startswith("imm_") for i in ids)
    store = roomy.sandbox.store
    for resource_id in ids[:: 251]:  # a spread of them, read back from the sandbox's own store
        assert store.exists("/v1/immunizations", resource_id)
    # A re-run sends nothing: every created row is skipped from the state store.
    again = load_files([g.path], _settings(roomy, tmp_path, g, bulk_per_hour=100))
    assert again.summary["states"]["skipped"] == 25_000 - 7
    assert len(again.summary["bulk_jobs"]) == 1  # only the 7 refused rows are tried again


def test_hourly_limit_stops_and_a_later_run_resumes(tmp_path: Path) -> None:
    g = generate(tmp_path / "registry.csv", 900, ghosts=0)
    # A job's lines are settled by lookup (FHIR answers name no ids); this sandbox's search has no lag, so
    # no consistency window is waited (the default 10 s cost 10 s a run here).
    with SandboxServer(SandboxConfig()) as server:  # the documented 5 an hour
        first = load_files([g.path], _settings(server, tmp_path, g, bulk_per_hour=1, consistency_window=0))
        assert first.summary["bulk_limit"] and "re-run after" in first.summary["bulk_limit"]
        assert len(first.summary["bulk_jobs"]) == 1  # the patients' import; the immunizations wait
        assert first.summary["states"]["failed"] == 900
        assert set(first.rows["error_code"]) == {"not-sent"}
        second = load_files([g.path], _settings(server, tmp_path, g, bulk_per_hour=2, consistency_window=0))
        assert second.summary["states"]["created"] == 900
        assert len(second.summary["bulk_jobs"]) == 1  # patients came from the state store, not a new import
        assert _jobs(server) == 2


def test_an_open_job_is_polled_on_resume_not_resubmitted(roomy: SandboxServer, tmp_path: Path) -> None:
    class Blind(BulkClient):
        """Submits, then cannot read any job: as if the run died right after the 202."""

        async def job(self, job_id: str) -> dict[str, object] | None:
            raise LookupFailed("no answer")

    sends = [Send("patient", "/v1/patients", f"P-{i}", f'{{"firstName":"A","lastName":"B{i}"}}', f"h{i}")
             for i in range(50)]

    async def run(bulk_type: type[BulkClient], run_id: str) -> dict[tuple[str, str], Result]:
        async with httpx.AsyncClient(base_url=roomy.base_url) as http:
            with StateStore(tmp_path / "s.sqlite", target=roomy.base_url) as state:
                loader = BulkLoader(ApiClient(http, roomy.api_key), bulk_type(http, roomy.api_key), state,
                                    Throttle(), LoadOptions(consistency_window=0), run_id,
                                    bulk_options=BulkOptions(poll_first=0.01))
                return dict(await loader.run_stages([sends]))

    first = asyncio.run(run(Blind, "run1"))
    assert {r.error_code for r in first.values()} == {"bulk-pending"}
    with StateStore(tmp_path / "s.sqlite", target=roomy.base_url) as state:
        assert state.counts() == {"patient": {"pending": 50}}
    second = asyncio.run(run(BulkClient, "run2"))
    assert _jobs(roomy) == 1, "the open job was resubmitted"
    assert {r.state for r in second.values()} == {"skipped"}  # settled from the job, then skipped as created
    with contextlib.closing(sqlite3.connect(roomy.sandbox.store.path)) as db:
        body = db.execute("SELECT body FROM jobs").fetchone()[0]
    job_ids = json.loads(body)["resourceIds"]
    with StateStore(tmp_path / "s.sqlite", target=roomy.base_url) as state:
        stored = state.get("patient", [s.source_key for s in sends])
    assert [stored[s.source_key].resource_id for s in sends] == job_ids


def test_a_job_without_ids_is_settled_line_by_line_by_lookup(roomy: SandboxServer, tmp_path: Path) -> None:
    g = generate(tmp_path / "registry.csv", 300, ghosts=3)
    report = load_files([g.path], _settings(roomy, tmp_path, g, consistency_window=0))
    s = report.summary
    assert s["mode"] == "bulk" and s["states"]["created"] == 297 and s["states"]["failed"] == 3
    assert s["states"].get("unknown", 0) == 0
    created = report.rows.filter(pl.col("state") == "created")
    ids = created["resource_id"].to_list()
    assert len(set(ids)) == len(ids) == 297  # each line its own resource: none claimed twice
    store = roomy.sandbox.store
    assert store.search("/v1/immunizations", {}, limit=1).total == 297  # and nothing sent twice
    for row in created.filter(pl.col("kind") == "immunization").head(20).iter_rows(named=True):
        assert store.exists("/v1/immunizations", row["resource_id"])
    again = load_files([g.path], _settings(roomy, tmp_path, g, consistency_window=0))
    assert again.summary["states"]["skipped"] == 297
    assert store.search("/v1/immunizations", {}, limit=1).total == 297


def test_line_results_map_errors_and_ids_to_lines() -> None:
    job = {"id": "job_1", "status": "completed", "processedRecords": 3,
           "errors": ["line 2: patientId: Patient pat_x not found"], "resourceIds": ["imm_a", None, "imm_c"]}
    out = line_results(job, 3)
    assert [r.state for r in out] == ["created", "failed", "created"]
    assert out[1].error_code == BULK_RECORD_ERROR and out[1].field == "patientId"
    assert out[0].resource_id == "imm_a"
    # Without the resourceIds extension a line with no error was imported, but its id is unknown.
    out = line_results({**job, "resourceIds": None}, 3)
    assert [r.state for r in out] == ["unknown", "failed", "unknown"]


def test_auto_mode_takes_bulk_only_when_the_window_cannot_hold_the_plan() -> None:
    assert choose_mode("auto", 1000, 999) == "bulk"
    assert choose_mode("auto", 1000, 1000) == "request"
    assert choose_mode("auto", 1000, None) == "request"
    assert choose_mode("bulk", 1, 10) == "bulk" and choose_mode("request", 10, 1) == "request"


def test_auto_mode_goes_bulk_against_a_window_too_small_for_the_plan(tmp_path: Path) -> None:
    g = generate(tmp_path / "registry.csv", 60)  # ~80 creates (patients and immunizations)
    # 30 requests per 2 s: per request that is 3 windows; one import per kind instead. Its records still
    # count against the window (as documented), so the polls wait out a 429 or two: the load still completes.
    with SandboxServer(SandboxConfig(rate_limit=30, window=2.0)) as server:
        report = load_files([g.path], _settings(server, tmp_path, g, mode="auto", consistency_window=0))
    assert report.summary["mode"] == "bulk"
    assert len(report.summary["bulk_jobs"]) == 2
    assert report.summary["states"]["created"] == 60


def test_auto_mode_stays_per_request_when_the_window_holds_the_plan(sandbox: SandboxServer, tmp_path: Path) -> None:
    g = generate(tmp_path / "registry.csv", 30)
    report = load_files([g.path], _settings(sandbox, tmp_path, g, mode="auto"))
    assert report.summary["mode"] == "request" and report.summary["states"]["created"] == 30


def test_a_jobs_errors_are_masked_for_phi_before_they_reach_the_report() -> None:
    job = {"id": "job_1", "status": "failed", "processedRecords": 1, "resourceIds": None,
           "errors": ["line 1: email: jane.doe@example.org is taken by patient born 1980-02-03",
                      "worker crashed on 555-867-5309"]}
    out = line_results(job, 2)
    assert out[0].error_code == BULK_RECORD_ERROR and out[1].error_code == "BULK_JOB_FAILED"
    text = " ".join(r.message or "" for r in out)
    for phi in ("jane.doe@example.org", "1980-02-03", "555-867-5309"):
        assert phi not in text
