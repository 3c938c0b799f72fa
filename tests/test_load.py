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

from etl.errors import BulkRefused
from etl.load.bulk import BulkClient, remaining_requests
from etl.load.client import ApiClient, RetryLater, Unknown, exchange, mask
from etl.load.loader import Loader, LoadOptions, Send
from etl.load.redox import RedoxClient
from etl.load.state import StateStore
from etl.load.throttle import Throttle
from etl.sandbox import SandboxConfig, SandboxServer
from etl.sandbox.store import Store

from .cli_process import CliProcess
from .conftest import ROOT, SAMPLE
from .test_pipeline import count

PATIENT = Send("patient", "/v1/patients", "P1", '{"firstName":"Ann","lastName":"Lee","birthDate":"2015-03-04"}', "h1")


def patient_ref(key: str) -> str:
    """The placeholder a planned body carries for a patient's ClinikAPI id."""
    return f'"@@patient:{key.encode().hex()}@@"'


DOSE = Send(
    "immunization",
    "/v1/immunizations",
    "R1",
    '{"patientId":' + patient_ref("P1") + ',"status":"completed","vaccineCode":{"code":"08"},'
    '"occurrenceDateTime":"2021-03-04"}',
    "h2",
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


class Broken(httpx.AsyncBaseTransport):
    """Every request fails with one transport error, as httpx would raise it."""

    def __init__(self, error: type[httpx.TransportError]) -> None:
        self.error = error

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        raise self.error("injected", request=request)


NOT_SENT = (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout)
MAYBE_SENT = (httpx.ReadTimeout, httpx.WriteTimeout, httpx.ReadError, httpx.WriteError, httpx.RemoteProtocolError)


@pytest.mark.parametrize("error", NOT_SENT + MAYBE_SENT)
def test_every_client_reads_a_transport_error_the_one_way(error: type[httpx.TransportError]) -> None:
    async def go() -> None:
        async with httpx.AsyncClient(base_url="http://127.0.0.1:9", transport=Broken(error)) as http:
            outcome = await exchange(http.get("/v1/patients"))
            assert isinstance(outcome, RetryLater if error in NOT_SENT else Unknown)
            assert error.__name__ in outcome.reason
            assert await ApiClient(http, "k").create("/v1/patients", b"{}") == outcome
            assert await RedoxClient(http, "t").create("/fhir/R4/x/development/Immunization/$write", b"{}") == outcome
            # A bulk import never sent is refused (its rows may go again); one maybe sent has no job id.
            bulk = BulkClient(http, "k")
            if isinstance(outcome, RetryLater):
                with pytest.raises(BulkRefused) as refused:
                    await bulk.submit("Patient", "{}")
                got = refused.value
                assert (got.status, got.code, got.message) == (0, "NOT_SENT", outcome.reason)
            else:
                assert await bulk.submit("Patient", "{}") is None
            assert await remaining_requests(http, "k") is None
            patched = await ApiClient(http, "k").patch("/v1/patients", "pat_1", b"{}")
            assert isinstance(patched, RetryLater | Unknown) and type(patched) is type(outcome)
            assert outcome.reason in patched.reason

    asyncio.run(go())


def _run(
    server: Any,
    state: StateStore,
    http_timeout: httpx.Timeout,
    run_id: str,
    patients: list[Send],
    rows: list[Send],
    rate: float = 1000.0,
    transport: httpx.AsyncBaseTransport | None = None,
    settle_rounds: int = LoadOptions.settle_rounds,
) -> tuple[dict[str, Any], dict[str, Any], Loader]:
    async def go() -> tuple[dict[str, Any], dict[str, Any], Loader]:
        async with httpx.AsyncClient(base_url=server.base_url, timeout=http_timeout, transport=transport) as http:
            throttle = Throttle(rate)
            loader = Loader(
                ApiClient(http, server.api_key, on_response=throttle.observe),
                state,
                throttle,
                # Search in the sandbox shows a create at once: a short bound on the wait for it.
                LoadOptions(rate=rate, consistency_window=0, lag_limit=2.0, settle_rounds=settle_rounds),
                run_id,
            )
            row_results, patient_results = await loader.run(patients, rows)
            return row_results, patient_results, loader

    return asyncio.run(go())


def test_a_timeout_is_unknown_never_resent_and_resolved_by_lookup(tmp_path: Path, shaped_sandbox: Any) -> None:
    sandbox = shaped_sandbox
    state = StateStore(tmp_path / "s.sqlite", target="t")
    # The sandbox commits the patient, but its answer is lost: the loader cannot know.
    # It is settled in the same run: looked up once search can show it, found, never sent again.
    rows, patients, loader = _run(sandbox, state, httpx.Timeout(5.0), "run1", [PATIENT], [DOSE],
                                  transport=LoseAnswers(1))
    assert patients["P1"].state == "created" and patients["P1"].resource_id.startswith("pt_")
    assert patients["P1"].message == "found by lookup after an unknown outcome"
    assert rows["R1"].state == "created"  # the child waited for its parent to settle
    assert loader.settle_rounds == 1
    assert state.in_state("patient", "unknown") == []
    assert count(sandbox, "/v1/patients") == 1  # it was written after all, and once

    rows, patients, _ = _run(sandbox, state, httpx.Timeout(5.0), "run2", [PATIENT], [DOSE])
    assert patients["P1"].state == "skipped" and patients["P1"].resource_id.startswith("pt_")
    assert rows["R1"].state == "skipped"
    assert count(sandbox, "/v1/patients") == 1
    assert count(sandbox, "/v1/immunizations") == 1
    state.close()


def test_an_absent_unknown_is_sent_again(tmp_path: Path, shaped_sandbox: Any) -> None:
    sandbox = shaped_sandbox
    state = StateStore(tmp_path / "s.sqlite", target="t")
    state.mark_pending("patient", [("P1", "h1")], "crashed-run")  # intent recorded, request never left
    rows, patients, _ = _run(sandbox, state, httpx.Timeout(5.0), "run2", [PATIENT], [DOSE])
    assert patients["P1"].state == "created"
    assert rows["R1"].state == "created"
    assert count(sandbox, "/v1/patients") == 1
    state.close()


def test_429_is_waited_out_and_retried(tmp_path: Path) -> None:
    # 8 a second for 20 creates from 8 workers: the first window is overrun, so 429s are certain.
    config = SandboxConfig(rate_limit=8, window=1.0)
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
                '{"patientId":' + patient_ref(f"P{i}") + ',"status":"completed","vaccineCode":"08"}',
                f"d{i}",
            )
            for i in range(10)
        ]
        rows, results, loader = _run(server, state, httpx.Timeout(5.0), "r", patients, doses, rate=1000.0)
        assert {r.state for r in [*results.values(), *rows.values()]} == {"created"}
        assert loader.stats.retries_429 > 0
        # Counted in the sandbox's own store: a count over HTTP would wait out the rate limit too.
        assert Store.search(server.sandbox.store, "/v1/patients", {}, limit=1).total == 10
        assert Store.search(server.sandbox.store, "/v1/immunizations", {}, limit=1).total == 10


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
    assert throttle.rate == pytest.approx(360 / 3599.5)  # a whole-second Reset is taken as rounded up
    throttle.observe({"x-ratelimit-remaining": "30", "x-ratelimit-reset": "0.25"})
    assert throttle.rate == pytest.approx(120.0)  # a fractional Reset is taken as it is
    fixed = Throttle(5.0)
    fixed.observe({"x-ratelimit-remaining": "360", "x-ratelimit-reset": "3600"})
    assert fixed.rate == 5.0


def test_mask_removes_phi_and_keys() -> None:
    text = "email: ann@example.org phone (617) 555-0143 dob 2015-03-04 ssn 101-01-0001 key clk_test_abc123"
    masked = mask(text)
    for secret in ("ann@example.org", "555-0143", "2015-03-04", "101-01-0001", "clk_test_abc123"):
        assert secret not in masked


@pytest.mark.parametrize(
    "phone", ["(303) 555-0142", "+1 303 555 0142", "+1 (303) 555-0142", "303-555-0142", "3035550142"]
)
def test_mask_takes_a_phone_number_whole(phone: str) -> None:
    assert mask(f"call {phone}.") == "call [phone]."
    assert mask(phone) == "[phone]"


def test_mask_keeps_the_ids_a_user_needs_to_find_the_row() -> None:
    text = "patientId: pat_0000000000000000 not found; immunization imm_12345678901234, job_9f3a0c21b7d84e65"
    assert mask(text) == text
    mixed = "pat_0000000000000000 belongs to (303) 555-0142"
    assert mask(mixed) == "pat_0000000000000000 belongs to [phone]"
    # A key made of digits and letters goes whole: no other pattern may take its digits and leave the rest.
    assert mask("key clk_test_0123456789abcdef rejected") == "key [key] rejected"


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


def _forked_cli(*args: str, key: str) -> CliProcess:
    """The same command in a child forked with the toolkit already imported (tests.cli_process): for the
    tests about killing and interrupting a load, not about what a fresh interpreter prints."""
    return CliProcess(args, env={**os.environ, "CLINIKAPI_SECRET_KEY": key}, cwd=ROOT)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("route", "at", "small_batches"),
    # On conftest's registry_head (the sample's first 280 rows: 115 patients, 267 valid rows), about halfway.
    [("/v1/patients", 40, False), ("/v1/immunizations", 125, False), ("/v1/immunizations", 125, True)],
    ids=["patients", "immunizations", "immunizations-in-batches-of-50"],
)
def test_sigkill_halfway_then_resume_ends_with_the_uninterrupted_count(
    tmp_path: Path, registry_head: Path, route: str, at: int, small_batches: bool
) -> None:
    key = "clk_test_killtest0123456789"
    with SandboxServer(SandboxConfig(api_keys={key: "*"})) as server:
        common = ["--base-url", server.base_url, "--state", str(tmp_path / "state.sqlite"), "--consistency-window", "0"]
        if small_batches:  # planned in batches of 50 rows, sent a part at a time
            common += ["--batch-rows", "50"]
        proc = _forked_cli(
            "load", str(registry_head), *common, "--rate=200", "--report-dir", str(tmp_path / "r1"), key=key
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

        resumed = _forked_cli("load", str(registry_head), *common, "--report-dir", str(tmp_path / "r2"),
                              key=key)
        _, errors = resumed.communicate(timeout=120)
        assert resumed.returncode == 1, errors  # 1: some rows were rejected, none failed
        rows = pl.read_csv(tmp_path / "r2" / "rows.csv", infer_schema=False)
        valid = rows.filter(pl.col("state") != "rejected").height
        assert rows.filter(pl.col("state").is_in(["created", "skipped"])).height == valid
        assert count(server, "/v1/immunizations") == valid
        assert count(server, "/v1/patients") == rows.filter(pl.col("state") != "rejected")["patient_id"].n_unique()
        assert rows.filter(pl.col("state") != "rejected")["resource_id"].n_unique() == valid


@pytest.mark.slow
def test_the_api_key_appears_in_no_file_and_no_output(tmp_path: Path, registry_head: Path) -> None:
    # The sample registry's first 280 rows (conftest's registry_head): every kind of output, half the sends.
    marker = "clk_test_LEAKMARKER9f3a7c"
    seen: list[str] = []
    with SandboxServer(SandboxConfig(api_keys={marker: "*"})) as server:
        runs = [
            ("load", str(registry_head), "--base-url", server.base_url),
            ("load", str(registry_head), "--base-url", server.base_url, "--dry-run"),
            ("--debug", "load", str(registry_head), "--base-url", server.base_url),
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
            str(registry_head),
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


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_sigint_stops_cleanly_writes_the_report_and_resume_completes(tmp_path: Path, sig: int) -> None:
    key = "clk_test_interrupt0123456789"
    with SandboxServer(SandboxConfig(api_keys={key: "*"})) as server:
        common = ["--base-url", server.base_url, "--state", str(tmp_path / "s.sqlite"), "--consistency-window", "0"]
        proc = _forked_cli("load", str(SAMPLE / "registry.csv"), *common, "--rate=200", "--report-dir",
                           str(tmp_path / "r1"), key=key)
        deadline = time.monotonic() + 60
        while count(server, "/v1/immunizations") < 40:
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 130, err
        assert "Run the same command again" in out
        summary = (tmp_path / "r1" / "summary.json").read_text("utf-8")
        assert '"interrupted": true' in summary
        with StateStore(tmp_path / "s.sqlite", target=server.base_url) as state:
            assert state.in_state("immunization", "pending", "unknown") == []
            assert state.in_state("patient", "pending", "unknown") == []
        rows = pl.read_csv(tmp_path / "r1" / "rows.csv", infer_schema=False)
        assert rows.height == 560
        created_first = rows.filter(pl.col("state") == "created").height
        assert created_first == count(server, "/v1/immunizations") < 534
        resumed = _forked_cli("load", str(SAMPLE / "registry.csv"), *common, "--report-dir", str(tmp_path / "r2"),
                              key=key)
        resumed.communicate(timeout=120)
        assert resumed.returncode == 1
        assert count(server, "/v1/immunizations") == 534


def test_reconcile_settles_unknowns_without_the_input_files(tmp_path: Path) -> None:
    from etl.pipeline import reconcile_state
    from etl.settings import Settings

    key = "clk_test_reconcile0123456789"
    with SandboxServer(SandboxConfig(api_keys={key: "*"})) as server:
        state = StateStore(tmp_path / "s.sqlite", target=server.base_url)
        # run 1 loses the answer of the patient and does not settle it (no rounds): it is left unknown
        second = Send("immunization", "/v1/immunizations", "R2",
                      '{"patientId":' + patient_ref("P1") + ',"status":"completed","vaccineCode":"20"}', "h3")
        _, patients, _ = _run(server, state, httpx.Timeout(5.0), "run1", [PATIENT], [DOSE, second],
                              transport=LoseAnswers(1), settle_rounds=0)
        assert patients["P1"].state == "unknown"
        # A crashed run left R9 pending with its body kept but never sent.
        state.mark_pending("immunization", [("R9", "h9", '{"status":"completed","vaccineCode":"03",'
                                             '"patientId":"pat_missing"}')], "crashed")
        state.close()
        settings = Settings(state=tmp_path / "s.sqlite", api_key=key, consistency_window=0,
                            report_dir=tmp_path / "rec")
        report = reconcile_state(settings, verify=True)
        states = report.summary["states"]
        assert states.get("created") == 1  # the patient: found by lookup, not sent again
        assert states.get("failed") == 1  # R9: certainly absent, sent again, refused (its patient does not exist)
        assert count(server, "/v1/patients") == 1
        assert report.summary["verified"] == {"confirmed": 1}
        recon = pl.read_csv(tmp_path / "rec" / "reconcile.csv", infer_schema=False)
        assert set(recon["source_key"]) == {"P1", "R9"}
        again = reconcile_state(settings.model_copy(update={"report_dir": tmp_path / "rec2"}))
        assert again.summary["in_doubt"] == 0


@pytest.mark.parametrize("batch_rows", [100_000, 1], ids=["one-batch", "batches-of-one"])
def test_a_newer_copy_skips_unchanged_reports_changed_and_lists_what_left(
    tmp_path: Path, sandbox: Any, batch_rows: int
) -> None:
    from etl.pipeline import load_files
    from etl.settings import Settings

    week1 = tmp_path / "w1" / "weekly.csv"
    week2 = tmp_path / "w2" / "weekly.csv"
    week1.parent.mkdir()
    week2.parent.mkdir()
    header = "Record ID,Patient ID,First Name,Last Name,CVX,Admin Date,Lot Number\n"
    week1.write_text(header + "R1,P1,Ann,Lee,08,2021-03-04,A1\nR2,P1,Ann,Lee,20,2021-03-05,B1\n"
                     "R3,P2,Bo,Ray,21,2021-03-06,C1\n", encoding="utf-8")
    week2.write_text(header + "R1,P1,Ann,Lee,08,2021-03-04,A1\nR2,P1,Ann,Lee,20,2021-03-05,B2\n"
                     "R4,P2,Bo,Ray,03,2021-04-01,D1\n", encoding="utf-8")
    base = {"base_url": sandbox.base_url, "api_key": sandbox.api_key, "consistency_window": 0,
            "state": tmp_path / "s.sqlite", "batch_rows": batch_rows}
    first = load_files([week1], Settings(**base, report_dir=tmp_path / "r1"))
    assert first.states["created"] == 3
    second = load_files([week2], Settings(**base, report_dir=tmp_path / "r2"))
    by_key = {r["source_key"]: r["state"] for r in second.rows.iter_rows(named=True)}
    assert by_key == {"R1": "skipped", "R2": "changed", "R4": "created"}
    assert second.summary["disappeared"] == 1
    gone = pl.read_csv(tmp_path / "r2" / "disappeared.csv", infer_schema=False)
    assert gone["source_key"].to_list() == ["R3"]
    assert count(sandbox, "/v1/immunizations") == 4  # R3 is listed, never deleted
    lot = lambda rid: httpx.get(f"{sandbox.base_url}/v1/immunizations/{rid}",  # noqa: E731
                                headers={"x-api-key": sandbox.api_key}).json()["data"]["lotNumber"]
    r2_id = next(r["resource_id"] for r in second.rows.iter_rows(named=True) if r["source_key"] == "R2")
    assert lot(r2_id) == "B1"
    third = load_files([week2], Settings(**base, report_dir=tmp_path / "r3", update=True))
    assert {r["source_key"]: r["state"] for r in third.rows.iter_rows(named=True)}["R2"] == "updated"
    assert lot(r2_id) == "B2"
    fourth = load_files([week2], Settings(**base, report_dir=tmp_path / "r4"))
    assert set(fourth.rows["state"]) == {"skipped"}


@pytest.mark.parametrize("batch_rows", [100_000, 1], ids=["one-batch", "batches-of-one"])
def test_a_patient_whose_details_changed_still_takes_its_new_rows(
    tmp_path: Path, sandbox: Any, batch_rows: int
) -> None:
    """A weekly file where a patient's phone changed: the patient is reported changed, and the
    new immunizations are created for it (its id is known), not failed as if it were missing."""
    from etl.pipeline import load_files
    from etl.settings import Settings

    header = "Record ID,Patient ID,First Name,Last Name,Phone,CVX,Admin Date\n"
    week1, week2 = tmp_path / "w1.csv", tmp_path / "w2.csv"
    week1.write_text(header + "R1,P1,Ann,Lee,(303) 555-0101,08,2021-03-04\n", encoding="utf-8")
    week2.write_text(header + "R1,P1,Ann,Lee,(303) 555-0199,08,2021-03-04\n"
                     "R2,P1,Ann,Lee,(303) 555-0199,20,2021-04-04\n", encoding="utf-8")
    base = {"base_url": sandbox.base_url, "api_key": sandbox.api_key, "consistency_window": 0,
            "state": tmp_path / "s.sqlite", "batch_rows": batch_rows}
    first = load_files([week1], Settings(**base, report_dir=tmp_path / "r1"))
    patient_id = first.rows["patient_id"][0]
    second = load_files([week2], Settings(**base, report_dir=tmp_path / "r2"))
    assert second.summary["patients"] == {"changed": 1}
    by_key = {r["source_key"]: r for r in second.rows.iter_rows(named=True)}
    assert by_key["R2"]["state"] == "created", by_key["R2"]
    assert by_key["R2"]["patient_id"] == patient_id
    assert count(sandbox, "/v1/patients") == 1 and count(sandbox, "/v1/immunizations") == 2
