"""The loader over real sockets: unknown outcomes, 429s, crashes, and the key."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import polars as pl
import pytest

from etl.load.client import ApiClient, mask
from etl.load.loader import Loader, LoadOptions, Send
from etl.load.state import StateStore
from etl.load.throttle import Throttle
from etl.sandbox import SandboxConfig, SandboxServer

from .conftest import ROOT, SAMPLE
from .test_pipeline import count

PATIENT = Send("patient", "/v1/patients", "P1", '{"firstName":"Ann","lastName":"Lee","birthDate":"2015-03-04"}', "h1")
DOSE = Send(
    "immunization",
    "/v1/immunizations",
    "R1",
    '{"status":"completed","vaccineCode":{"code":"08"},"occurrenceDateTime":"2021-03-04"}',
    "h2",
    "P1",
)


class LoseAnswers(httpx.AsyncBaseTransport):
    """Sends over a real socket, lets the server commit, then loses the first ``n`` POST answers."""

    def __init__(self, n: int) -> None:
        self.inner = httpx.AsyncHTTPTransport()
        self.n = n

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        response = await self.inner.handle_async_request(request)
        if request.method == "POST" and self.n > 0:
            self.n -= 1
            await response.aread()
            await response.aclose()
            raise httpx.ReadTimeout("the answer was lost", request=request)
        return response

    async def aclose(self) -> None:
        await self.inner.aclose()


def _run(
    server: Any,
    state: StateStore,
    http_timeout: httpx.Timeout,
    run_id: str,
    patients: list[Send],
    rows: list[Send],
    rate: float = 1000.0,
    transport: httpx.AsyncBaseTransport | None = None,
) -> tuple[dict[str, Any], dict[str, Any], Loader]:
    async def go() -> tuple[dict[str, Any], dict[str, Any], Loader]:
        async with httpx.AsyncClient(base_url=server.base_url, timeout=http_timeout, transport=transport) as http:
            throttle = Throttle(rate)
            loader = Loader(
                ApiClient(http, server.api_key, on_response=throttle.observe),
                state,
                throttle,
                LoadOptions(rate=rate, consistency_window=0),
                run_id,
            )
            row_results, patient_results = await loader.run(patients, rows)
            return row_results, patient_results, loader

    return asyncio.run(go())


def test_a_timeout_is_unknown_never_resent_and_resolved_by_lookup(tmp_path: Path, sandbox: Any) -> None:
    state = StateStore(tmp_path / "s.sqlite", target="t")
    # The sandbox commits the patient, but its answer is lost: the loader cannot know.
    rows, patients, _ = _run(sandbox, state, httpx.Timeout(5.0), "run1", [PATIENT], [DOSE], transport=LoseAnswers(1))
    assert patients["P1"].state == "unknown"
    assert rows["R1"].state == "failed" and rows["R1"].error_code == "patient-unknown"
    assert [r.state for r in state.in_state("patient", "unknown")] == ["unknown"]
    assert count(sandbox, "/v1/patients") == 1  # it was written after all

    rows, patients, _ = _run(sandbox, state, httpx.Timeout(5.0), "run2", [PATIENT], [DOSE])
    assert patients["P1"].state == "skipped" and patients["P1"].resource_id.startswith("pat_")
    assert rows["R1"].state == "created"
    assert count(sandbox, "/v1/patients") == 1  # found, not sent again
    assert count(sandbox, "/v1/immunizations") == 1
    state.close()


def test_an_absent_unknown_is_sent_again(tmp_path: Path, sandbox: Any) -> None:
    state = StateStore(tmp_path / "s.sqlite", target="t")
    state.mark_pending("patient", [("P1", "h1")], "crashed-run")  # intent recorded, request never left
    rows, patients, _ = _run(sandbox, state, httpx.Timeout(5.0), "run2", [PATIENT], [DOSE])
    assert patients["P1"].state == "created"
    assert rows["R1"].state == "created"
    assert count(sandbox, "/v1/patients") == 1
    state.close()


def test_429_is_waited_out_and_retried(tmp_path: Path) -> None:
    config = SandboxConfig(rate_limit=4, window=1.0)
    with SandboxServer(config) as server, StateStore(tmp_path / "s.sqlite", target="t") as state:
        patients = [
            Send("patient", "/v1/patients", f"P{i}", f'{{"firstName":"A{i}","lastName":"B"}}', f"h{i}")
            for i in range(10)
        ]
        doses = [
            Send(
                "immunization",
                "/v1/immunizations",
                f"R{i}",
                '{"status":"completed","vaccineCode":"08"}',
                f"d{i}",
                f"P{i}",
            )
            for i in range(10)
        ]
        rows, results, loader = _run(server, state, httpx.Timeout(5.0), "r", patients, doses, rate=1000.0)
        assert {r.state for r in [*results.values(), *rows.values()]} == {"created"}
        assert loader.stats.retries_429 > 0
        time.sleep(1.1)
        assert count(server, "/v1/patients") == 10
        time.sleep(1.1)
        assert count(server, "/v1/immunizations") == 10


def test_throttle_holds_a_burst_then_paces() -> None:
    now = [0.0]
    slept: list[float] = []

    async def fake_sleep(seconds: float) -> None:
        slept.append(seconds)
        now[0] += seconds

    async def go() -> None:
        throttle = Throttle(10.0, burst=5, clock=lambda: now[0], sleep=fake_sleep)
        for _ in range(5):
            await throttle.acquire()
        assert slept == []
        for _ in range(10):
            await throttle.acquire()
        assert now[0] == pytest.approx(1.0)  # ten more at 10/s take one second of (fake) time
        throttle.observe({"x-ratelimit-remaining": "0", "x-ratelimit-reset": "30"})
        await throttle.acquire()
        assert now[0] >= 31.0

    asyncio.run(go())


def test_throttle_rate_follows_the_server_headers() -> None:
    throttle = Throttle()
    throttle.observe({"x-ratelimit-limit": "500", "x-ratelimit-remaining": "360", "x-ratelimit-reset": "3600"})
    assert throttle.rate == pytest.approx(0.1)
    fixed = Throttle(5.0)
    fixed.observe({"x-ratelimit-remaining": "360", "x-ratelimit-reset": "3600"})
    assert fixed.rate == 5.0


def test_mask_removes_phi_and_keys() -> None:
    text = "email: ann@example.org phone (617) 555-0143 dob 2015-03-04 ssn 101-01-0001 key clk_test_abc123"
    masked = mask(text)
    for secret in ("ann@example.org", "555-0143", "2015-03-04", "101-01-0001", "clk_test_abc123"):
        assert secret not in masked


def _cli(*args: str, key: str, timeout: float = 120) -> subprocess.Popen[str]:
    env = {**os.environ, "CLINIKAPI_SECRET_KEY": key}
    return subprocess.Popen(
        [sys.executable, "-m", "etl.cli", *args],
        cwd=ROOT,
        env=env,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )


@pytest.mark.slow
@pytest.mark.parametrize(("route", "at"), [("/v1/patients", 60), ("/v1/immunizations", 250)])
def test_sigkill_halfway_then_resume_ends_with_the_uninterrupted_count(tmp_path: Path, route: str, at: int) -> None:
    key = "clk_test_killtest0123456789"
    with SandboxServer(SandboxConfig(api_keys={key: "*"})) as server:
        common = ["--base-url", server.base_url, "--state", str(tmp_path / "state.sqlite"), "--consistency-window", "0"]
        proc = _cli(
            "load", str(SAMPLE / "registry.csv"), *common, "--rate", "60", "--report-dir", str(tmp_path / "r1"), key=key
        )
        deadline = time.monotonic() + 90
        while count(server, route) < at:
            assert proc.poll() is None, "the load finished before it could be killed"
            assert time.monotonic() < deadline
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.communicate()
        assert proc.returncode == -signal.SIGKILL
        assert not (tmp_path / "r1" / "summary.json").exists()

        resumed = _cli("load", str(SAMPLE / "registry.csv"), *common, "--report-dir", str(tmp_path / "r2"), key=key)
        _, errors = resumed.communicate(timeout=120)
        assert resumed.returncode == 1, errors  # 1: some rows were rejected, none failed
        rows = pl.read_csv(tmp_path / "r2" / "rows.csv", infer_schema=False)
        valid = rows.filter(pl.col("state") != "rejected").height
        assert rows.filter(pl.col("state").is_in(["created", "skipped"])).height == valid
        assert count(server, "/v1/immunizations") == valid
        assert count(server, "/v1/patients") == rows.filter(pl.col("state") != "rejected")["patient_id"].n_unique()
        assert rows.filter(pl.col("state") != "rejected")["resource_id"].n_unique() == valid


@pytest.mark.slow
def test_the_api_key_appears_in_no_file_and_no_output(tmp_path: Path) -> None:
    marker = "clk_test_LEAKMARKER9f3a7c"
    seen: list[str] = []
    with SandboxServer(SandboxConfig(api_keys={marker: "*"})) as server:
        runs = [
            ("load", str(SAMPLE / "registry.csv"), "--base-url", server.base_url),
            ("load", str(SAMPLE / "registry.csv"), "--base-url", server.base_url, "--dry-run"),
            ("--debug", "load", str(SAMPLE / "registry.csv"), "--base-url", server.base_url),
        ]
        for i, args in enumerate(runs):
            proc = _cli(
                *args,
                "--state",
                str(tmp_path / "state.sqlite"),
                "--report-dir",
                str(tmp_path / f"r{i}"),
                "--consistency-window",
                "0",
                key=marker,
            )
            output, err = proc.communicate(timeout=120)
            assert proc.returncode in (0, 1), err
            seen += [output, err]
    # A refused key: its message must not echo it either.
    wrong = "clk_test_WRONGMARKER77aa"
    with SandboxServer(SandboxConfig()) as server:
        proc = _cli(
            "load",
            str(SAMPLE / "registry.csv"),
            "--base-url",
            server.base_url,
            "--state",
            str(tmp_path / "other.sqlite"),
            "--report-dir",
            str(tmp_path / "r_wrong"),
            key=wrong,
        )
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 4, out + err
        assert "INVALID_KEY" in out + err
        seen += [out, err]
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert len(files) >= 10
    for path in files:
        data = path.read_bytes()
        assert marker.encode() not in data and wrong.encode() not in data, path
    for text in seen:
        assert marker not in text and wrong not in text


def test_live_key_needs_opt_in_and_https(tmp_path: Path) -> None:
    live = "clk_live_" + "x" * 20
    proc = _cli(
        "load",
        str(SAMPLE / "registry.csv"),
        "--base-url",
        "https://api.example.invalid",
        "--state",
        str(tmp_path / "s.sqlite"),
        key=live,
    )
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 2 and "--live" in err and live not in err
    proc = _cli(
        "load",
        str(SAMPLE / "registry.csv"),
        "--base-url",
        "http://api.example.invalid",
        "--live",
        "--state",
        str(tmp_path / "s.sqlite"),
        key=live,
    )
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 2 and "loopback" in err
