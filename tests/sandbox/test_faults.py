"""Sandbox faults over real sockets: 5xx without a write, writes whose answer
is dropped or late, seeded repeatability, and search lag."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import httpx
import pytest
from click.testing import CliRunner

from etl.cli import main
from etl.errors import UsageError
from etl.load.client import ApiClient, Created, Unknown
from etl.sandbox import SandboxConfig, SandboxServer
from etl.sandbox.faults import FAULT_STATUSES, FaultPlan, LaggingStore
from etl.sandbox.server import announce

KEY = "clk_test_" + "f0" * 16
PATIENT = {"firstName": "Ana", "lastName": "Lima", "birthDate": "2015-03-04"}


@contextmanager
def faulty(timeout: float | httpx.Timeout = 10.0, **options: Any) -> Iterator[tuple[SandboxServer, httpx.Client]]:
    """A sandbox of its own with these fault settings, and a client of it."""
    with (
        SandboxServer(SandboxConfig(api_keys={KEY: "*"}, **options)) as server,
        httpx.Client(base_url=server.base_url, headers={"x-api-key": KEY}, timeout=timeout) as client,
    ):
        yield server, client


def stored(server: SandboxServer, route: str = "/v1/patients") -> int:
    """How many resources the store holds, search lag or not (read past the index)."""
    from etl.sandbox.store import Store

    return Store.search(server.sandbox.store, route, {}, limit=1).total


def searched(client: httpx.Client, route: str = "/v1/patients", **params: str) -> list[dict[str, Any]]:
    response = client.get(route, params={"count": 100, **params})
    assert response.status_code == 200, response.text
    found: list[dict[str, Any]] = response.json()["data"]["data"]
    return found


def test_fail_answers_5xx_and_writes_nothing() -> None:
    with faulty(fail_rate=1.0, seed=3) as (server, client):
        statuses = [client.post("/v1/patients", json=PATIENT).status_code for _ in range(12)]
        assert set(statuses) <= set(FAULT_STATUSES)
        assert len(set(statuses)) > 1  # the three statuses are drawn, not one fixed
        assert stored(server) == 0
        assert searched(client) == []  # reads are never faulted
        assert server.sandbox.faults.injected == {"fail": 12}
        bad = client.post("/v1/patients", json=PATIENT)
        assert bad.headers["x-request-id"].startswith("req_")  # the gate's headers still come
        if bad.status_code == 500:
            assert bad.json()["code"] == "INTERNAL_ERROR"


def test_refused_requests_are_not_faulted() -> None:
    with faulty(fail_rate=1.0) as (server, client):
        response = client.post("/v1/patients", json=PATIENT, headers={"x-api-key": "clk_test_nobody123"})
        assert response.status_code == 401
        assert server.sandbox.faults.injected.total() == 0


def test_drop_commits_then_cuts_the_connection_without_an_answer() -> None:
    with faulty(drop_rate=1.0) as (server, client):
        with pytest.raises(httpx.RemoteProtocolError, match="without sending a response"):
            client.post("/v1/patients", json=PATIENT)
        assert stored(server) == 1  # written all the same
        [found] = searched(client)
        assert client.get(f"/v1/patients/{found['id']}").status_code == 200
        # The server keeps serving after the cut.
        with pytest.raises(httpx.RemoteProtocolError):
            client.post("/v1/patients", json=PATIENT)
        assert stored(server) == 2


def test_the_client_calls_a_dropped_or_5xx_create_unknown() -> None:
    async def go(server: SandboxServer) -> list[Any]:
        async with httpx.AsyncClient(base_url=server.base_url, timeout=10) as http:
            api = ApiClient(http, KEY)
            return [await api.create("/v1/patients", b'{"firstName":"A","lastName":"B"}') for _ in range(3)]

    with faulty(drop_rate=1.0) as (server, _):
        outcomes = asyncio.run(go(server))
        assert all(isinstance(o, Unknown) and "connection lost" in o.reason for o in outcomes), outcomes
        assert stored(server) == 3
    with faulty(fail_rate=1.0) as (server, _):
        outcomes = asyncio.run(go(server))
        assert all(isinstance(o, Unknown) and o.status in FAULT_STATUSES for o in outcomes), outcomes
        assert stored(server) == 0


def test_slow_commits_and_answers_after_the_client_gave_up() -> None:
    with faulty(timeout=0.3, slow_rate=1.0, slow_seconds=30.0) as (server, client):
        with pytest.raises(httpx.ReadTimeout):
            client.post("/v1/patients", json=PATIENT)
        assert stored(server) == 1
        assert len(searched(client)) == 1  # GETs are not slowed


def test_a_patient_client_gets_the_late_answer() -> None:
    with faulty(timeout=20.0, slow_rate=1.0, slow_seconds=0.2) as (server, client):
        response = client.post("/v1/patients", json=PATIENT)
        assert response.status_code == 201
        assert response.json()["data"]["id"].startswith("pt_")
        assert stored(server) == 1


def _outcomes(seed: int, n: int = 24) -> list[str]:
    """What each of ``n`` sequential creates met, under a mixed plan."""
    seen = []
    # A short read timeout: each slow answer costs the test that long.
    timeout = httpx.Timeout(10.0, read=0.5)
    with faulty(timeout, fail_rate=0.2, drop_rate=0.2, slow_rate=0.1, slow_seconds=30.0, seed=seed) as (_, client):
        for _ in range(n):
            try:
                seen.append(str(client.post("/v1/patients", json=PATIENT).status_code))
            except httpx.RemoteProtocolError:
                seen.append("dropped")
            except httpx.ReadTimeout:
                seen.append("late")
    return seen


def test_a_seed_repeats_the_same_faults_in_the_same_order() -> None:
    # Seeds 2 and 19 each deal exactly one slow answer in 24 draws: a fast test.
    first = _outcomes(seed=2)
    assert _outcomes(seed=2) == first
    assert {"201", "dropped", "late"} <= set(first)
    assert set(first) & {"500", "502", "503"}
    assert _outcomes(seed=19) != first


def test_plan_draws_are_seeded_and_in_proportion() -> None:
    def kinds(plan: FaultPlan) -> list[str | None]:
        return [f.kind if f else None for f in (plan.draw() for _ in range(2000))]

    a = kinds(FaultPlan(fail_rate=0.05, drop_rate=0.05, slow_rate=0.03, seed=5))
    assert a == kinds(FaultPlan(fail_rate=0.05, drop_rate=0.05, slow_rate=0.03, seed=5))
    assert 50 < a.count("fail") < 150 and 50 < a.count("drop") < 150 and 20 < a.count("slow") < 100
    assert FaultPlan(seed=None).seed is not None  # a fresh seed is kept, to repeat the run
    assert not FaultPlan().active and FaultPlan().draw() is None


@pytest.mark.parametrize(
    "options",
    [
        {"fail_rate": -0.1},
        {"drop_rate": 1.5},
        {"fail_rate": 0.6, "slow_rate": 0.6},
        {"slow_seconds": 0},
        {"search_lag": -1},
    ],
)
def test_config_refuses_impossible_faults(options: dict[str, float]) -> None:
    with pytest.raises(UsageError):
        SandboxConfig(**options)  # type: ignore[arg-type]


def test_cli_refuses_a_rate_above_one() -> None:
    result = CliRunner().invoke(main, ["sandbox", "--fail-rate", "2"])
    assert result.exit_code == 2
    assert "--fail-rate" in result.output


def test_announce_names_the_faults_and_seed(capsys: pytest.CaptureFixture[str]) -> None:
    with SandboxServer(SandboxConfig(drop_rate=0.25, seed=42, search_lag=3)) as server:
        announce(server)
    printed = capsys.readouterr().out
    assert "drop 25.0%" in printed and "seed 42" in printed and "after 3 s" in printed


def test_search_lag_hides_new_resources_from_search_not_from_reads() -> None:
    with faulty(search_lag=60.0) as (server, client):
        created = client.post("/v1/patients", json=PATIENT)
        assert created.status_code == 201
        rid = created.json()["data"]["id"]
        assert client.get(f"/v1/patients/{rid}").status_code == 200
        assert searched(client, name="Lima") == []
        response = client.get("/v1/patients", params={"count": 100})
        assert response.json()["data"]["total"] == 0
        assert stored(server) == 1


def test_search_shows_a_resource_once_the_lag_is_over() -> None:
    with faulty(search_lag=0.2) as (_, client):
        rid = client.post("/v1/patients", json=PATIENT).json()["data"]["id"]
        deadline = time.monotonic() + 30
        while not searched(client):
            assert time.monotonic() < deadline, "the resource never appeared in search"
            time.sleep(0.05)
        assert [p["id"] for p in searched(client)] == [rid]


def test_lagging_store_counts_from_each_write(tmp_path: Any) -> None:
    now = [100.0]
    store = LaggingStore(None, 10.0, clock=lambda: now[0])
    try:
        store.insert("/v1/patients", {"id": "pat_a", "lastName": "A"})
        now[0] += 5
        store.insert_many("/v1/patients", [{"id": "pat_b", "lastName": "B"}, {"id": "pat_c", "lastName": "C"}])
        assert store.search("/v1/patients", {}).items == []
        assert store.get("/v1/patients", "pat_a") is not None
        now[0] += 5
        assert [r["id"] for r in store.search("/v1/patients", {}).items] == ["pat_a"]
        assert store.search("/v1/patients", {}).total == 1
        now[0] += 5
        assert [r["id"] for r in store.search("/v1/patients", {}).items] == ["pat_a", "pat_b", "pat_c"]
        assert store.search("/v1/immunizations", {}).items == []
    finally:
        store.close()


def test_bulk_imports_lag_too() -> None:
    with faulty(search_lag=60.0, responses="simple") as (server, client):  # simple: the job names its ids
        response = client.post(
            "/v1/bulk/import", json={"resourceType": "Patient", "data": '{"firstName":"A","lastName":"B"}\n'}
        )
        assert response.status_code == 202
        job_id = response.json()["data"]["jobId"]
        deadline = time.monotonic() + 30
        while (job := client.get(f"/v1/bulk/jobs/{job_id}").json()["data"])["status"] != "completed":
            assert time.monotonic() < deadline
            time.sleep(0.02)
        [rid] = job["resourceIds"]
        assert client.get(f"/v1/patients/{rid}").status_code == 200
        assert searched(client) == []
        assert stored(server) == 1


def test_created_outcome_still_reported_without_faults() -> None:
    async def go(server: SandboxServer) -> Any:
        async with httpx.AsyncClient(base_url=server.base_url, timeout=10) as http:
            return await ApiClient(http, KEY).create("/v1/patients", b'{"firstName":"A","lastName":"B"}')

    with faulty() as (server, _):
        assert isinstance(asyncio.run(go(server)), Created)
        assert server.sandbox.faults.injected.total() == 0
