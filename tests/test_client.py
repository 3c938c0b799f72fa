"""The ClinikAPI client (etl.load.client) against the real sandbox over loopback sockets.

What a create's answer means (created, refused, retry later, unknown), that an
answer in doubt is never re-sent by the client, the server's Retry-After, GET's
own retries, and masking of what the API echoes back.
"""

from __future__ import annotations

import asyncio
import json
import socket
import sys
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, TypeVar

import httpx
import pytest

from etl.errors import LookupFailed
from etl.load.client import ApiClient, Created, Refused, RetryLater, Unknown
from etl.sandbox import SandboxConfig, SandboxServer
from etl.sandbox.faults import FAULT_STATUSES
from etl.sandbox.store import Store

KEY = "clk_test_" + "c1" * 16
PATIENT = {"firstName": "Ann", "lastName": "Lee", "birthDate": "2015-03-04"}
T = TypeVar("T")


def body(value: Mapping[str, Any]) -> bytes:
    return json.dumps(value).encode()


def stored(server: SandboxServer, route: str = "/v1/patients") -> int:
    """Resources in the sandbox's own store (not through the API: no rate limit, no faults)."""
    return Store.search(server.sandbox.store, route, {}, limit=1).total


def with_client(
    server_or_url: SandboxServer | str,
    go: Callable[[ApiClient], Awaitable[T]],
    *,
    key: str = KEY,
    timeout: float = 10.0,
    seen: list[Mapping[str, str]] | None = None,
) -> T:
    """Run ``go`` with an ApiClient of a fresh connection pool."""
    url = server_or_url if isinstance(server_or_url, str) else server_or_url.base_url

    async def main() -> T:
        async with httpx.AsyncClient(base_url=url, timeout=timeout) as http:
            client = ApiClient(http, key, on_response=None if seen is None else seen.append)
            return await go(client)

    return asyncio.run(main())


def sandbox(**options: Any) -> SandboxServer:
    return SandboxServer(SandboxConfig(api_keys={KEY: "*"}, **options))


def test_a_create_answers_the_new_id() -> None:
    seen: list[Mapping[str, str]] = []

    async def go(client: ApiClient) -> tuple[Any, Any]:
        created = await client.create("/v1/patients", body(PATIENT))
        assert isinstance(created, Created)
        return created, await client.get(f"/v1/patients/{created.resource_id}")

    with sandbox() as server:
        created, read = with_client(server, go, seen=seen)
        assert stored(server) == 1
    assert created.status == 201 and created.resource_id.startswith("pt_")
    assert read["id"] == created.resource_id and read["lastName"] == "Lee"
    # Every response's headers reach the throttle's hook, rate-limit numbers included.
    assert len(seen) == 2 and all("x-ratelimit-remaining" in headers for headers in seen)


def test_a_refusal_names_the_field_and_masks_what_the_api_echoes() -> None:
    # Built here, not written out: no live-shaped key stands in the repository.
    email, live_key = "ann.lee@example.org", "clk_live_" + "0123456789abcdef"

    async def go(client: ApiClient) -> list[Any]:
        dose = {"status": "completed", "vaccineCode": "08", "occurrenceDateTime": "2021-01-02"}
        return [
            await client.create("/v1/immunizations", body({**dose, "patientId": email})),
            await client.create("/v1/immunizations", body({**dose, "patientId": live_key})),
            await client.create("/v1/patients", body({**PATIENT, "gender": "robot"})),
        ]

    with sandbox() as server:
        by_email, by_key, bad_gender = with_client(server, go)
        assert stored(server, "/v1/immunizations") == 0
    assert isinstance(by_email, Refused) and isinstance(by_key, Refused) and isinstance(bad_gender, Refused)
    assert (by_email.status, by_email.code, by_email.field) == (422, "VALIDATION_ERROR", "patientId")
    # The sandbox echoes the reference it could not find; the client keeps neither PHI nor a key of it.
    assert email not in by_email.message and "[email]" in by_email.message
    assert live_key not in by_key.message and "[key]" in by_key.message
    assert bad_gender.field == "gender" and bad_gender.status == 422


def test_a_wrong_key_is_refused_without_being_repeated() -> None:
    wrong = "clk_test_" + "9" * 32

    async def go(client: ApiClient) -> Any:
        return await client.create("/v1/patients", body(PATIENT))

    with sandbox() as server:
        refused = with_client(server, go, key=wrong)
        assert stored(server) == 0
    assert isinstance(refused, Refused) and (refused.status, refused.code) == (401, "INVALID_KEY")
    assert wrong not in repr(refused)


def test_a_429_is_retry_later_after_the_servers_wait_and_nothing_is_written() -> None:
    seen: list[Mapping[str, str]] = []

    async def go(client: ApiClient) -> list[Any]:
        return [await client.create("/v1/patients", body(PATIENT)) for _ in range(2)]

    with sandbox(rate_limit=1, window=600.0) as server:
        first, second = with_client(server, go, seen=seen)
        assert stored(server) == 1
    assert isinstance(first, Created)
    assert isinstance(second, RetryLater) and second.reason == "RATE_LIMITED"
    # The wait is the server's own Retry-After (seconds left in its window), not a guess.
    assert second.seconds == float(seen[-1]["retry-after"])
    assert 1.0 <= second.seconds <= 600.0


def test_a_5xx_is_unknown_and_the_client_does_not_send_it_again() -> None:
    async def go(client: ApiClient) -> Any:
        return await client.create("/v1/patients", body(PATIENT))

    with sandbox(fail_rate=1.0, seed=7) as server:
        outcome = with_client(server, go)
        # One request reached the server: the client did not repeat it on its own.
        assert server.sandbox.faults.injected == {"fail": 1}
        assert stored(server) == 0
    assert isinstance(outcome, Unknown)
    assert outcome.status in FAULT_STATUSES and str(outcome.status) in outcome.reason


def test_a_lost_answer_is_unknown_though_the_create_was_written() -> None:
    async def go(client: ApiClient) -> Any:
        return await client.create("/v1/patients", body(PATIENT))

    with sandbox(drop_rate=1.0) as server:
        outcome = with_client(server, go)
        assert server.sandbox.faults.injected == {"drop": 1}
        assert stored(server) == 1  # written: a blind retry would have made a second patient
    assert isinstance(outcome, Unknown) and outcome.status is None
    assert outcome.reason.startswith("connection lost after sending")


def test_an_answer_later_than_the_timeout_is_unknown() -> None:
    async def go(client: ApiClient) -> Any:
        return await client.create("/v1/patients", body(PATIENT))

    with sandbox(slow_rate=1.0, slow_seconds=30.0) as server:
        outcome = with_client(server, go, timeout=0.5)
        assert server.sandbox.faults.injected == {"slow": 1}
        assert stored(server) == 1
    assert isinstance(outcome, Unknown) and outcome.reason.startswith("no answer in time")


def _closed_port_url() -> str:
    """A loopback port with nothing listening: a real connect that is refused."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return f"http://127.0.0.1:{port}"


def test_a_connection_never_opened_is_retry_later() -> None:
    async def go(client: ApiClient) -> list[Any]:
        return [
            await client.create("/v1/patients", body(PATIENT)),
            await client.patch("/v1/patients", "pat_1", body(PATIENT)),
        ]

    created, patched = with_client(_closed_port_url(), go)
    for outcome in (created, patched):
        assert isinstance(outcome, RetryLater)  # nothing was sent: safe to send again
        assert outcome.reason == "could not connect: ConnectError" and outcome.seconds > 0


def test_a_patch_updates_in_place() -> None:
    async def go(client: ApiClient) -> list[Any]:
        created = await client.create("/v1/patients", body(PATIENT))
        assert isinstance(created, Created)
        patched = await client.patch("/v1/patients", created.resource_id, body({"lastName": "Lee-Smith"}))
        missing = await client.patch("/v1/patients", "pat_0000000000000000", body({"lastName": "X"}))
        return [created, patched, missing, await client.get(f"/v1/patients/{created.resource_id}")]

    with sandbox() as server:
        created, patched, missing, read = with_client(server, go)
        assert stored(server) == 1
        # A PatientSummary (the default fhir answers) carries no meta: the version is read from the store.
        assert server.sandbox.store.get("/v1/patients", created.resource_id)["meta"]["versionId"] == "2"
    assert patched == Created(created.resource_id, 200)
    assert read["lastName"] == "Lee-Smith"
    assert isinstance(missing, Refused) and missing.status == 404


def test_a_patch_whose_answer_is_lost_is_unknown() -> None:
    async def go(client: ApiClient) -> Any:
        return await client.patch("/v1/patients", resource_id, body({"lastName": "Lee-Smith"}))

    with sandbox(drop_rate=1.0) as server:
        with httpx.Client(base_url=server.base_url, headers={"x-api-key": KEY}) as plain:
            with pytest.raises(httpx.RemoteProtocolError):
                plain.post("/v1/patients", json=PATIENT)  # written, then cut off
            resource_id = plain.get("/v1/patients").json()["data"]["data"][0]["id"]
        outcome = with_client(server, go)
    assert isinstance(outcome, Unknown) and outcome.reason.startswith("update not confirmed: connection lost")


def test_get_returns_data_none_for_404_and_fails_on_other_refusals() -> None:
    async def go(client: ApiClient) -> Any:
        assert await client.get("/v1/patients/pat_0000000000000000") is None
        page = await client.get("/v1/patients", {"count": 5})
        with pytest.raises(LookupFailed, match="HTTP 400 VALIDATION_ERROR"):
            await client.get("/v1/immunizations", {"dateFrom": "yesterday"})
        return page

    with sandbox() as server:
        page = with_client(server, go)
    assert page["data"] == [] and page["hasMore"] is False


def test_get_waits_out_a_429_and_tries_again() -> None:
    async def go(client: ApiClient) -> tuple[Any, int]:
        created = await client.create("/v1/patients", body(PATIENT))  # uses the window's one request
        assert isinstance(created, Created)
        read = await client.get(f"/v1/patients/{created.resource_id}")
        return read, client.requests

    with sandbox(rate_limit=1, window=1.0) as server:
        read, requests = with_client(server, go)
    assert read["lastName"] == "Lee"
    assert requests == 3  # the create, the GET refused with 429, the same GET once the window reset


def test_a_get_refused_429_at_every_attempt_says_so_and_waits_only_between_attempts(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    waits: list[float] = []
    real_sleep = asyncio.sleep

    async def sleep(seconds: float) -> None:  # the client's waits, recorded, not slept (a minute each)
        if sys._getframe(1).f_globals.get("__name__") != "etl.load.client":  # the sandbox's own loop
            return await real_sleep(seconds)
        waits.append(seconds)
        await real_sleep(0)

    async def go(client: ApiClient) -> None:
        assert isinstance(await client.create("/v1/patients", body(PATIENT)), Created)  # the window's one request
        monkeypatch.setattr("etl.load.client.asyncio.sleep", sleep)
        await client.get("/v1/patients", attempts=2)

    with sandbox(rate_limit=1, window=60.0) as server, pytest.raises(LookupFailed) as failed:
        with_client(server, go)
    assert str(failed.value) == "GET /v1/patients: HTTP 429 RATE_LIMITED"  # it was "GET /v1/patients: "
    assert len(waits) == 1 and waits[0] > 1  # Retry-After before the second attempt; none after the last


def test_get_gives_up_after_its_attempts() -> None:
    async def go(client: ApiClient) -> None:
        await client.get("/v1/patients", attempts=1)

    with pytest.raises(LookupFailed, match="GET /v1/patients: ConnectError"):
        with_client(_closed_port_url(), go)


def test_search_follows_the_cursor_to_the_last_page() -> None:
    with sandbox() as server:
        with httpx.Client(base_url=server.base_url, headers={"x-api-key": KEY}) as plain:
            for i in range(105):
                gender = "female" if i % 5 else "male"
                assert plain.post("/v1/patients", json={**PATIENT, "firstName": f"A{i}", "gender": gender}).is_success

        async def go(client: ApiClient) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
            return await client.search("/v1/patients", {}), await client.search("/v1/patients", {"gender": "male"})

        everyone, men = with_client(server, go)
    assert len(everyone) == 105 and len({p["id"] for p in everyone}) == 105  # two pages of 100, no repeats
    assert [p["firstName"] for p in everyone[:3]] == ["A0", "A1", "A2"]  # in creation order
    assert len(men) == 21 and {p["gender"] for p in men} == {"male"}
