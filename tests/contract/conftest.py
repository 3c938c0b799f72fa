"""The target of the contract tests: the embedded sandbox (both answer shapes) by default, or the ClinikAPI
test tenant that ``CLINIK_ETL_CONTRACT_URL`` and ``CLINIK_ETL_CONTRACT_KEY`` name.

A live key (``clk_live_``) is refused: these tests create and delete resources, and must never touch real
patients' data. ``CLINIK_ETL_CONTRACT_SEARCH_WAIT`` (seconds, default 30) bounds how long a check waits for
search to show a new resource (the API's search is eventually consistent: docs data-consistency.mdx).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import pytest

URL_VARIABLE = "CLINIK_ETL_CONTRACT_URL"
KEY_VARIABLE = "CLINIK_ETL_CONTRACT_KEY"
WAIT_VARIABLE = "CLINIK_ETL_CONTRACT_SEARCH_WAIT"


@dataclass(frozen=True)
class Target:
    """Where the checks run: a base URL, its key, and whether it is the embedded sandbox."""

    name: str
    base_url: str
    key: str
    embedded: bool
    search_wait: float

    def client(self, key: str | None = None) -> httpx.Client:
        """An HTTP client of the target, sending ``key`` (the target's by default; "" for none)."""
        headers = {"x-api-key": self.key if key is None else key} if key != "" else {}
        return httpx.Client(base_url=self.base_url, headers=headers, timeout=30)


def _remote() -> tuple[str, str] | None:
    url, key = os.environ.get(URL_VARIABLE), os.environ.get(KEY_VARIABLE)
    if not url:
        return None
    if not key:
        pytest.fail(f"{URL_VARIABLE} is set but {KEY_VARIABLE} is not: the contract tests need a test key")
    if not key.startswith("clk_test_"):
        # Never a live key: the checks create resources. The message never shows the key.
        pytest.fail(f"{KEY_VARIABLE} must be a clk_test_ key: the contract tests never run against live data")
    return url.rstrip("/"), key


def _targets() -> list[str]:
    return ["remote"] if os.environ.get(URL_VARIABLE) else ["sandbox-fhir", "sandbox-simple"]


@pytest.fixture(scope="module", params=_targets())
def target(request: pytest.FixtureRequest) -> Iterator[Target]:
    wait = float(os.environ.get(WAIT_VARIABLE, "30"))
    remote = _remote()
    if remote is not None:
        yield Target("remote", remote[0], remote[1], embedded=False, search_wait=wait)
        return
    from etl.sandbox import SandboxConfig, SandboxServer

    shape = request.param.removeprefix("sandbox-")
    with SandboxServer(SandboxConfig(responses=shape)) as server:
        yield Target(request.param, server.base_url, server.api_key, embedded=True, search_wait=wait)
