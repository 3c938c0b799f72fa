"""Nothing lost, nothing sent twice: SIGKILL at ten points of a load (six of
them under each of six fault mixes, four under one mix each), then resume
until done; the sandbox must hold exactly one Immunization per valid row and
one Patient per distinct patient.

Each case runs a real sandbox in-process (with faults dealt by a fixed seed)
and ``python -m etl.cli load`` in a child process (forked with the toolkit
already imported: ``tests.cli_process``), killed with SIGKILL once the
sandbox holds N patients (in the patient phase) or N immunizations (in the
row phase). The same command is then run again until every valid row is
``created`` or ``skipped`` (a few runs at most: faults keep dealing on
resumed runs too), and the sandbox's own database is read to compare what it
holds with what the report says, id by id.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sqlite3
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import polars as pl
import pytest

from etl.load.client import ApiClient
from etl.load.loader import Loader, LoadOptions, Result, Send
from etl.load.state import Record, StateStore
from etl.load.throttle import Throttle
from etl.sandbox import SandboxConfig, SandboxServer

from .cli_process import CliProcess
from .conftest import ROOT, SAMPLE, head_records

KEY = "clk_test_resilience0123456789"
# The matrix loads the sample registry's first 140 records (tests/golden/validate/registry/rows.csv, rows 2-141:
# 6 of the planted bad rows, 134 valid rows, 84 patients).
HEAD_ROWS = 140
VALID_ROWS = 134
PATIENTS = 84  # distinct patients among the valid rows
MAX_RESUMES = 6
SEED = 20_261_122


@dataclass(frozen=True)
class Mix:
    """A fault mix: the sandbox's settings and the load options it calls for."""

    sandbox: dict[str, Any] = field(default_factory=dict)
    options: tuple[str, ...] = ("--consistency-window", "0")


MIXES = {
    "none": Mix(),
    "fail5": Mix({"fail_rate": 0.05}),
    "drop5": Mix({"drop_rate": 0.05}),
    # The same against the echo shape (the others run against the default, FHIR-shaped answers).
    "drop5-simple": Mix({"drop_rate": 0.05, "responses": "simple"}),
    # Slow answers come after 3 s; the client gives up after 0.5 s.
    "slow3": Mix({"slow_rate": 0.03, "slow_seconds": 3.0}, ("--consistency-window", "0", "--timeout", "0.5")),
    # Search shows a create 0.5 s late; the loader waits 1 s before it trusts a lookup.
    "lag": Mix({"search_lag": 0.5}, ("--consistency-window", "1.0")),
}
# In each phase: at its first create, about a third and three quarters through (each stays reachable when 5% of
# creates fail). A case costs ~5 s of a loaded 2-core machine whatever the file's size (two forked loads, the faults'
# waits): ten points, over the first 280 records, made the matrix a quarter of the whole suite.
KILL_POINTS = [("/v1/patients", n) for n in (1, 30, 60)] + [("/v1/immunizations", n) for n in (1, 50, 100)]
# Points between those, each under one fault mix rather than all six.
BETWEEN = [
    ("fail5", "/v1/patients", 15),
    ("drop5", "/v1/patients", 45),
    ("drop5-simple", "/v1/immunizations", 25),
    ("slow3", "/v1/immunizations", 75),
]
CASES = [(mix, route, at) for mix in MIXES for route, at in KILL_POINTS] + BETWEEN


@pytest.fixture(scope="module")
def registry_part(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The sample registry's first ``HEAD_ROWS`` records."""
    return head_records(SAMPLE / "registry.csv", HEAD_ROWS, tmp_path_factory.mktemp("part") / "registry.csv")


def _held(db: Path, route: str) -> dict[str, dict[str, Any]]:
    """What the sandbox's database holds for a route (past any search lag): id -> resource."""
    with contextlib.closing(sqlite3.connect(db)) as conn:
        rows = conn.execute("SELECT id, body FROM resources WHERE route = ?", (route,)).fetchall()
    return {rid: json.loads(body) for rid, body in rows}


def _count(server: SandboxServer, route: str) -> int:
    from etl.sandbox.store import Store

    # The base class's search: a count that no search lag hides.
    return Store.search(server.sandbox.store, route, {}, limit=1).total


def _load(server: SandboxServer, tmp: Path, run: int, mix: Mix, source: Path) -> CliProcess:
    args = [
        "load",
        str(source),
        "--base-url",
        server.base_url,
        "--state",
        str(tmp / "state.sqlite"),
        "--report-dir",
        str(tmp / f"run{run}"),
        *mix.options,
    ]
    env = {**os.environ, "CLINIKAPI_SECRET_KEY": KEY}
    return CliProcess(args, env=env, cwd=ROOT, capture=False)


def _kill_at(server: SandboxServer, proc: CliProcess, route: str, n: int) -> int:
    """SIGKILL the load once the sandbox holds ``n`` resources of ``route``; the count then."""
    deadline = time.monotonic() + 120
    try:
        while (held := _count(server, route)) < n:
            if proc.poll() is not None:
                pytest.fail(f"the load ended (exit {proc.returncode}) before {route} reached {n}: {held}")
            assert time.monotonic() < deadline, "the load made no progress"
            time.sleep(0.002)
        proc.send_signal(signal.SIGKILL)
    finally:
        _, errors = proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL, errors
    return held


@pytest.mark.slow
@pytest.mark.parametrize(("mix_name", "route", "at"), CASES, ids=[f"{m}-{r.split('/')[-1]}{n}" for m, r, n in CASES])
def test_kill_resume_under_faults_holds_exactly_one_of_each(
    tmp_path: Path, registry_part: Path, mix_name: str, route: str, at: int
) -> None:
    mix = MIXES[mix_name]
    db = tmp_path / "sandbox.sqlite"
    config = SandboxConfig(api_keys={KEY: "*"}, db_path=str(db), seed=SEED + at, **mix.sandbox)
    with SandboxServer(config) as server:
        killed_at = _kill_at(server, _load(server, tmp_path, 0, mix, registry_part), route, at)
        assert not (tmp_path / "run0" / "summary.json").exists()

        for run in range(1, MAX_RESUMES + 1):
            proc = _load(server, tmp_path, run, mix, registry_part)
            _, errors = proc.communicate(timeout=180)
            assert "Traceback" not in errors, errors
            # 1: the planted rows were rejected and every other row is in; 3: some are still in doubt.
            assert proc.returncode in (1, 3), errors
            if proc.returncode == 1:
                break
        rows = pl.read_csv(tmp_path / f"run{run}" / "rows.csv", infer_schema=False)
        faults = dict(server.sandbox.faults.injected)

    valid = rows.filter(pl.col("state") != "rejected")
    stuck = valid.filter(~pl.col("state").is_in(["created", "skipped"]))
    assert stuck.height == 0, f"after {run} resumes: {stuck.select('state', 'error_code', 'message').head(5)}"
    assert valid.height == VALID_ROWS

    immunizations = _held(db, "/v1/immunizations")
    patients = _held(db, "/v1/patients")
    row_ids = valid.get_column("resource_id").to_list()
    patient_ids = set(valid.get_column("patient_id").to_list())
    duplicates = len(set(immunizations) - set(row_ids)) + len(set(patients) - patient_ids)
    missing = len(set(row_ids) - set(immunizations)) + len(patient_ids - set(patients))
    print(
        f"\n{mix_name} kill at {route} {at} (held {killed_at}): {run} resumes, faults {faults},"
        f" duplicates {duplicates}, missing {missing}"
    )
    assert len(set(row_ids)) == VALID_ROWS  # no two rows share a resource
    assert set(immunizations) == set(row_ids)  # nothing extra (no duplicate), nothing missing
    assert len(patient_ids) == PATIENTS
    assert set(patients) == patient_ids
    by_row = dict(zip(row_ids, valid.get_column("patient_id").to_list(), strict=True))
    assert all(imm["patientId"] == by_row[rid] for rid, imm in immunizations.items())


# -- the loader's doubt, pinned down (fast, in-process) ------------------------------

LAG = 0.5
WINDOW = 1.0
ANN = '{"firstName":"Ann","lastName":"Lee","birthDate":"2015-03-04"}'


def _patient(key: str, body: str = ANN) -> Send:
    return Send("patient", "/v1/patients", key, body, "h-" + key)


def _resume(server: SandboxServer, state: StateStore, patients: list[Send]) -> dict[str, Result]:
    """One loader run over ``patients`` with the lag mix's consistency window."""

    async def go() -> dict[str, Result]:
        async with httpx.AsyncClient(base_url=server.base_url, timeout=10) as http:
            throttle = Throttle(1000.0)
            client = ApiClient(http, KEY, on_response=throttle.observe)
            options = LoadOptions(rate=1000.0, consistency_window=WINDOW)
            _, results = await Loader(client, state, throttle, options, "resume").run(patients, [])
            return results

    return asyncio.run(go())


def _post(server: SandboxServer, body: str) -> str:
    with httpx.Client(base_url=server.base_url, headers={"x-api-key": KEY}, timeout=10) as client:
        response = client.post("/v1/patients", content=body, headers={"content-type": "application/json"})
    assert response.status_code == 201, response.text
    return str(response.json()["data"]["id"])


@pytest.mark.parametrize("shape", ["fhir", "simple"])
@pytest.mark.parametrize("left", ["pending", "unknown"])
def test_a_paced_send_is_given_the_full_window_before_lookup(tmp_path: Path, left: str, shape: str) -> None:
    """A chunk's intent is recorded before the throttle lets its requests out, so a
    request may leave long after its ``sent_at``; killed right after it did (pending),
    or timed out (unknown), it must still be found, not sent again."""
    config = SandboxConfig(api_keys={KEY: "*"}, search_lag=LAG, responses=shape)
    with SandboxServer(config) as server, StateStore(tmp_path / "s.sqlite", target="t") as state:
        state.mark_pending("patient", [("P1", "h-P1")], "paced-run")
        with state.transaction():  # the chunk was marked a minute before the throttle sent P1
            state._db.execute("UPDATE records SET sent_at = sent_at - 60")
        _post(server, ANN)  # ... which it did just now
        if left == "unknown":
            state.record_outcomes([Record("patient", "P1", "unknown", message="no answer in time")])
        results = _resume(server, state, [_patient("P1")])
        assert results["P1"].state == "skipped", results["P1"]
        assert _count(server, "/v1/patients") == 1


@pytest.mark.parametrize("shape", ["fhir", "simple"])
def test_two_doubtful_rows_never_claim_the_same_resource(tmp_path: Path, shape: str) -> None:
    """Two rows with the same content, both in doubt, only one of them created:
    one lookup finds it, the other must not claim it too."""
    with SandboxServer(SandboxConfig(api_keys={KEY: "*"}, responses=shape)) as server:
        with StateStore(tmp_path / "s.sqlite", target="t") as state:
            state.mark_pending("patient", [("P1", "h-P1"), ("P2", "h-P2")], "killed-run")
            first = _post(server, ANN)
            with state.transaction():
                state._db.execute("UPDATE records SET sent_at = sent_at - 60")
            results = _resume(server, state, [_patient("P1"), _patient("P2")])
        ids = [results["P1"].resource_id, results["P2"].resource_id]
        assert first in ids
        assert len(set(ids)) == 2, results
        assert _count(server, "/v1/patients") == 2
