"""``clinik-etl doctor`` against the real sandbox over sockets: a healthy target and its plan, a wrong key,
a silent target, a used-up quota, the search-lag probe and the estimate for files. The key never appears."""

from __future__ import annotations

import json
import socket
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result

from etl.cli import main
from etl.errors import ExitCode
from etl.sandbox import SandboxConfig, SandboxServer
from etl.sandbox.store import Store

from .conftest import SAMPLE

KEY = "clk_test_doctor0123456789abcdef"
WRONG = "clk_test_wrong0123456789abcdef"


def _doctor(*args: str, key: str = KEY) -> Result:
    return CliRunner().invoke(main, ["doctor", *args], env={"CLINIKAPI_SECRET_KEY": key})


def _json(result: Result) -> dict[str, Any]:
    found: dict[str, Any] = json.loads(result.output)
    return found


def test_a_healthy_sandbox_exits_0_and_reports_its_plan() -> None:
    config = SandboxConfig(api_keys={KEY: "*"}, rate_limit=500, window=3600, quota=1000)
    with SandboxServer(config) as server:
        result = _doctor("--base-url", server.base_url)
        as_json = _doctor("--base-url", server.base_url, "--json")
    assert result.exit_code == ExitCode.OK, result.output
    assert "500 requests per 3600 s" in result.output
    assert "of 1000 requests left" in result.output
    assert "the key may write" in result.output
    assert KEY not in result.output and KEY not in as_json.output
    plan = _json(as_json)["plan"]
    assert (plan["rate_limit"], plan["window_seconds"]) == (500, 3600)
    assert plan["monthly_quota"]["limit"] == 1000


def test_a_wrong_key_exits_4_and_is_not_printed() -> None:
    with SandboxServer(SandboxConfig(api_keys={KEY: "*"})) as server:
        result = _doctor("--base-url", server.base_url, key=WRONG)
    assert result.exit_code == ExitCode.API, result.output
    assert "INVALID_KEY" in result.output
    assert WRONG not in result.output and KEY not in result.output


def test_a_read_only_key_exits_4_naming_the_scope() -> None:
    with SandboxServer(SandboxConfig(api_keys={KEY: "read"})) as server:
        result = _doctor("--base-url", server.base_url)
    assert result.exit_code == ExitCode.API, result.output
    assert "may not write" in result.output


def test_a_silent_target_exits_2() -> None:
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    result = _doctor("--base-url", f"http://127.0.0.1:{port}")
    assert result.exit_code == ExitCode.USAGE, result.output
    assert "no answer" in result.output


def test_a_used_up_quota_exits_5() -> None:
    with SandboxServer(SandboxConfig(api_keys={KEY: "*"}, quota=1)) as server:
        result = _doctor("--base-url", server.base_url)
    assert result.exit_code == ExitCode.QUOTA, result.output
    assert "monthly request quota is used up" in result.output


def test_the_probe_measures_the_search_lag_and_leaves_nothing_behind() -> None:
    with SandboxServer(SandboxConfig(api_keys={KEY: "*"}, search_lag=0.5)) as server:
        result = _doctor("--base-url", server.base_url, "--probe", "--json")
        left = Store.search(server.sandbox.store, "/v1/patients", {}, limit=1).total
    assert result.exit_code == ExitCode.OK, result.output
    found = _json(result)
    assert found["plan"]["search_lag_seconds"] >= 0.5  # search showed it no sooner than the sandbox's lag
    assert found["plan"]["responses"]
    assert left == 0  # the probe's patient was deleted


def test_the_probe_is_for_test_keys_only() -> None:
    live = "clk_live_" + "doctor0123456789abcdef"
    result = _doctor("--base-url", "https://clinik.invalid", "--live", "--probe", key=live)
    assert result.exit_code == ExitCode.USAGE
    assert "test keys" in result.output and live not in result.output


@pytest.mark.parametrize("rate_limit", [500])
def test_files_are_counted_and_timed_on_the_plan(tmp_path: Path, rate_limit: int) -> None:
    config = SandboxConfig(api_keys={KEY: "*"}, rate_limit=rate_limit, window=3600, quota=300)
    with SandboxServer(config) as server:
        result = CliRunner().invoke(
            main, ["doctor", "--base-url", server.base_url, "--json", str(SAMPLE / "registry.csv")],
            env={"CLINIKAPI_SECRET_KEY": KEY, "CLINIK_ETL_STATE": str(tmp_path / "state.sqlite")},
        )
    assert result.exit_code == ExitCode.OK, result.output
    plan = _json(result)["plan"]
    assert plan["requests_needed"] == 534 + 160  # an immunization per valid row, a patient per distinct patient
    assert plan["estimated_seconds"] == -(-plan["requests_needed"] * 3600 // rate_limit)
    texts = " ".join(c["text"] for c in _json(result)["checks"])
    assert "a load would stop with exit 5" in texts  # 300 left cannot cover them
