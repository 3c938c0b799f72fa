"""429s by kind, against the real sandbox over sockets: the monthly quota and the sandbox allowance stop a
load at once (exit 5) and a later run finishes once the quota resets; ``RATE_LIMITED`` is waited out within
the run's retry budget; the documented rolling per-organisation window.

The docs (``clinikapi/docs`` errors.mdx): ``RATE_LIMITED`` is about speed (per minute), the quotas about
volume (per month); "check the error ``code`` to tell them apart".
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
from contextlib import closing
from pathlib import Path
from typing import Any

import httpx
import polars as pl
import pytest

from etl.errors import ExitCode
from etl.load.client import ApiClient, quota_problem
from etl.load.loader import Loader, LoadOptions, Send
from etl.load.state import StateStore
from etl.load.throttle import Throttle
from etl.sandbox import SandboxConfig, SandboxServer
from etl.sandbox.quota import Pool

from .conftest import SAMPLE

KEY = "clk_test_quota0123456789abcdef"
OTHER = "clk_test_quotaother0123456789"


def _get(server: SandboxServer, key: str = KEY) -> httpx.Response:
    return httpx.get(server.base_url + "/v1/patients", headers={"x-api-key": key}, timeout=10)


def _held(db: Path, route: str) -> list[dict[str, Any]]:
    with closing(sqlite3.connect(db)) as conn:
        return [json.loads(b) for (b,) in conn.execute("SELECT body FROM resources WHERE route = ?", (route,))]


def test_the_monthly_quota_answers_its_code_and_headers_then_resets() -> None:
    with SandboxServer(SandboxConfig(api_keys={KEY: "*", OTHER: "*"}, quota=3, quota_window=3600)) as server:
        clock = [1_000_000.0]
        server.sandbox.quotas.quota = Pool(3, 3600.0, clock=lambda: clock[0])
        answers = [_get(server, KEY), _get(server, OTHER), _get(server, KEY)]  # one pool for every key
        assert [a.status_code for a in answers] == [200, 200, 200]
        assert [a.headers["x-quota-used"] for a in answers] == ["1", "2", "3"]
        assert answers[-1].headers["x-quota-remaining"] == "0"
        assert answers[0].headers["x-quota-limit"] == "3" and answers[0].headers["x-quota-billable"] == "true"
        assert answers[0].headers["x-quota-reset"] == "1970-01-12T14:46:40Z"  # the pool's start + 3600 s
        refused = _get(server, OTHER)
        assert refused.status_code == 429
        assert refused.json()["code"] == "MONTHLY_QUOTA_EXCEEDED"
        assert refused.headers["x-quota-used"] == "3"  # a refused request does not count
        problem = quota_problem(refused)
        assert problem is not None and problem.exit_code == ExitCode.QUOTA
        assert "monthly request quota" in problem.message and "3 of 3" in problem.message
        assert "1970-01-12T14:46:40Z" in problem.message
        clock[0] += 3600  # the period ends
        assert _get(server).status_code == 200


def test_the_sandbox_allowance_is_its_own_pool_and_test_traffic_is_not_billed() -> None:
    with SandboxServer(SandboxConfig(api_keys={KEY: "*"}, quota=100, sandbox_quota=2)) as server:
        first, second, third = (_get(server) for _ in range(3))
    assert (first.status_code, second.status_code) == (200, 200)
    assert second.headers["x-sandbox-used"] == "2" and second.headers["x-sandbox-remaining"] == "0"
    assert second.headers["x-quota-billable"] == "false" and second.headers["x-quota-used"] == "0"
    assert third.status_code == 429 and third.json()["code"] == "SANDBOX_QUOTA_EXCEEDED"
    problem = quota_problem(third)
    assert problem is not None and "sandbox (test-key) allowance" in problem.message
    assert "resets on the 1st of the month" not in problem.message  # X-Quota-Reset says when


def test_a_rate_limit_429_is_not_a_quota_and_a_hostile_reset_is_not_repeated() -> None:
    limited = httpx.Response(429, json={"code": "RATE_LIMITED"}, headers={"retry-after": "2"})
    assert quota_problem(limited) is None
    hostile = httpx.Response(429, json={"code": "MONTHLY_QUOTA_EXCEEDED"},
                             headers={"x-quota-reset": "soon; clk_test_leak", "x-quota-limit": "x"})
    problem = quota_problem(hostile)
    assert problem is not None and "clk_test_leak" not in problem.message
    assert "resets on the 1st of the month (UTC)" in problem.message


def test_the_rolling_window_counts_every_key_together_and_frees_up_as_it_rolls() -> None:
    config = SandboxConfig(api_keys={KEY: "*", OTHER: "*"}, rate_limit=3, window=1.0, rolling=True)
    with SandboxServer(config) as server:
        assert [_get(server, k).status_code for k in (KEY, OTHER, KEY)] == [200, 200, 200]
        refused = _get(server, OTHER)
        assert refused.status_code == 429 and refused.json()["code"] == "RATE_LIMITED"
        assert refused.headers["retry-after"] == "1"
        deadline = 50
        while _get(server, KEY).status_code == 429 and deadline:  # the oldest request leaves the window
            deadline -= 1
            asyncio.run(asyncio.sleep(0.1))
        assert deadline, "the rolling window never let a request through"


def _load(server: SandboxServer, tmp: Path, run: int) -> Any:
    from etl.pipeline import load_files
    from etl.settings import Settings

    settings = Settings(base_url=server.base_url, api_key=KEY, consistency_window=0, state=tmp / "state.sqlite",
                        report_dir=tmp / f"run{run}")
    return load_files([SAMPLE / "registry.csv"], settings)


def test_a_quota_stops_the_load_at_once_with_exit_5_and_later_runs_finish_the_rest(tmp_path: Path) -> None:
    db = tmp_path / "sandbox.sqlite"
    with SandboxServer(SandboxConfig(api_keys={KEY: "*"}, db_path=str(db), quota=120)) as server:
        clock = [0.0]
        server.sandbox.quotas.quota = Pool(120, 3600.0, clock=lambda: clock[0])
        report = _load(server, tmp_path, 0)
        assert report.exit_code() == ExitCode.QUOTA
        summary = report.summary
        assert "monthly request quota is used up" in summary["quota_exceeded"]
        assert "120 of 120" in summary["quota_exceeded"]
        # Stopped at the first refusal, not once per row: only the requests already in flight met it too.
        from etl.settings import Settings

        assert summary["requests"] <= 120 + Settings.model_fields["concurrency"].default
        assert len(_held(db, "/v1/patients")) + len(_held(db, "/v1/immunizations")) <= 120
        rows = report.rows
        unsent = rows.filter(pl.col("error_code") == "not-sent")
        assert unsent.height > 0
        assert set(rows.get_column("state")) <= {"created", "rejected", "failed"}  # nothing left in doubt
        for run in range(1, 12):  # each month, the same command sends what fits
            clock[0] += 3600
            report = _load(server, tmp_path, run)
            if report.exit_code() != ExitCode.QUOTA:
                break
        assert report.exit_code() == ExitCode.REJECTED  # only the planted bad rows are left out
        immunizations = _held(db, "/v1/immunizations")
        assert len(immunizations) == 534  # every valid row, none twice
        assert len(_held(db, "/v1/patients")) == 160


def test_rate_limited_is_retried_within_one_budget_for_the_whole_run(tmp_path: Path) -> None:
    patients = [Send("patient", "/v1/patients", f"P{i}", f'{{"firstName":"A{i}","lastName":"Budget"}}', f"h{i}")
                for i in range(12)]

    async def go(server: SandboxServer, state: StateStore, budget: int) -> tuple[dict[str, Any], Loader]:
        async with httpx.AsyncClient(base_url=server.base_url, timeout=10) as http:
            throttle = Throttle(1000.0)
            loader = Loader(ApiClient(http, KEY), state, throttle,
                            LoadOptions(rate=1000.0, consistency_window=0, retry_budget=budget), "r")
            _, results = await loader.run(patients, [])
            return results, loader

    # 2 requests a second for 12 creates from 8 workers: 429s are certain; a budget of 3 is soon spent.
    config = SandboxConfig(api_keys={KEY: "*"}, rate_limit=2, window=1.0)
    with SandboxServer(config) as server, StateStore(tmp_path / "s.sqlite", target="t") as state:
        results, loader = asyncio.run(go(server, state, 3))
        assert loader.retries == 3 and loader.budget_spent is not None
        states = {r.state for r in results.values()}
        assert "unknown" not in states
        unsent = [r for r in results.values() if r.error_code == "not-sent"]
        assert unsent and all("retry budget" in (r.message or "") for r in unsent)
        created = sum(r.state == "created" for r in results.values())
        results, loader = asyncio.run(go(server, state, 1000))  # a later run sends the rest, nothing twice
        assert {r.state for r in results.values()} == {"created", "skipped"}
        assert sum(r.state == "skipped" for r in results.values()) == created
        from etl.sandbox.store import Store

        assert Store.search(server.sandbox.store, "/v1/patients", {}, limit=1).total == 12


@pytest.mark.parametrize("code", ["MONTHLY_QUOTA_EXCEEDED", "SANDBOX_QUOTA_EXCEEDED"])
def test_the_cli_exits_5_naming_the_quota(tmp_path: Path, code: str) -> None:
    from click.testing import CliRunner

    from etl.cli import main

    extra = {"quota": 30} if code == "MONTHLY_QUOTA_EXCEEDED" else {"sandbox_quota": 30}
    with SandboxServer(SandboxConfig(api_keys={KEY: "*"}, **extra)) as server:
        result = CliRunner().invoke(
            main,
            ["load", str(SAMPLE / "registry.csv"), "--base-url", server.base_url, "--state",
             str(tmp_path / "s.sqlite"), "--report-dir", str(tmp_path / "r"), "--consistency-window", "0"],
            env={"CLINIKAPI_SECRET_KEY": KEY},
        )
    assert result.exit_code == ExitCode.QUOTA, result.output
    assert KEY not in result.output
    summary = json.loads((tmp_path / "r" / "summary.json").read_text("utf-8"))
    assert code in summary["aborted"]
    assert ("monthly request quota" if code == "MONTHLY_QUOTA_EXCEEDED" else "sandbox") in summary["quota_exceeded"]


def _load_bulk(server: SandboxServer, tmp: Path, run: int) -> Any:
    from etl.pipeline import load_files
    from etl.settings import Settings

    settings = Settings(base_url=server.base_url, api_key=KEY, consistency_window=0, state=tmp / "state.sqlite",
                        report_dir=tmp / f"run{run}", mode="bulk")
    return load_files([SAMPLE / "registry.csv"], settings)


@pytest.mark.parametrize(("quota", "met_at"), [(2, "the poll of the patients' job"), (3, "the immunizations' import")])
def test_a_quota_stops_a_bulk_load_too_and_later_runs_finish_it_without_importing_twice(
    tmp_path: Path, quota: int, met_at: str
) -> None:
    # The run first reads the target's patients (matching: one request). Two requests a month: then the patients'
    # import, whose poll is refused. Three: the import and its poll, then the immunizations' import is refused.
    # Either way the run stops at once, with exit 5, as a run of single requests does.
    db = tmp_path / "sandbox.sqlite"
    config = SandboxConfig(api_keys={KEY: "*"}, db_path=str(db), quota=quota, responses="simple",
                           bulk_operations_per_hour=100)
    with SandboxServer(config) as server:
        clock = [0.0]
        server.sandbox.quotas.quota = Pool(quota, 3600.0, clock=lambda: clock[0])
        report = _load_bulk(server, tmp_path, 0)
        assert report.exit_code() == ExitCode.QUOTA, report.summary
        summary = report.summary
        assert "monthly request quota is used up" in summary["quota_exceeded"]
        assert summary["matching_requests"] + summary["requests"] == quota + 1  # the refused one, nothing after it
        assert len(summary["bulk_jobs"]) == 1  # the patients' import
        assert len(_held(db, "/v1/patients")) == 160  # imported, whether or not its job could be read
        rows = report.rows
        assert "MONTHLY_QUOTA_EXCEEDED" not in set(rows.get_column("error_code").drop_nulls())  # not a row's fault
        valid = rows.filter(pl.col("state") != "rejected")
        assert set(valid.get_column("error_code")) == {"not-sent"}
        assert all("monthly request quota" in m for m in valid.get_column("message"))
        for run in range(1, 12):  # each month, the same command goes on where the last one stopped
            clock[0] += 3600
            report = _load_bulk(server, tmp_path, run)
            if report.exit_code() != ExitCode.QUOTA:
                break
        assert report.exit_code() == ExitCode.REJECTED  # only the planted bad rows are left out
        assert len(_held(db, "/v1/immunizations")) == 534  # every valid row, none twice
        assert len(_held(db, "/v1/patients")) == 160  # the open job was polled, not imported again
