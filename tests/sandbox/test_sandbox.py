"""The sandbox over real sockets: a SandboxServer per module (or per test when
a test needs its own limits or an empty store) and httpx clients."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import threading
import time
from collections.abc import Iterator, MutableMapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest

from etl.errors import UsageError
from etl.sandbox import SandboxConfig, SandboxServer, create_app, serve_forever
from etl.sandbox.store import Store
from schemas.limits import MAX_BODY_BYTES

KEY = "clk_test_" + "a1" * 16
READ_KEY = "clk_test_reader0123456789"
WRITE_KEY = "clk_test_writer0123456789"
UNKNOWN_KEY = "clk_test_unknown0123456789"


@pytest.fixture(scope="module")
def server() -> Iterator[SandboxServer]:
    # The echo shape: these tests compare answers with what was sent (tests/sandbox/test_shapes.py: fhir).
    config = SandboxConfig(api_keys={KEY: "*", READ_KEY: "read", WRITE_KEY: "write"}, responses="simple")
    with SandboxServer(config) as running:
        yield running


@pytest.fixture
def client(server: SandboxServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.base_url, headers={"x-api-key": KEY}, timeout=10) as c:
        yield c


@contextmanager
def fresh(**options: Any) -> Iterator[httpx.Client]:
    """A client of a server of its own, with an empty store."""
    with (
        SandboxServer(SandboxConfig(**options)) as running,
        httpx.Client(base_url=running.base_url, headers={"x-api-key": running.api_key}, timeout=10) as c,
    ):
        yield c


def create(client: httpx.Client, route: str, body: dict[str, Any]) -> dict[str, Any]:
    response = client.post(route, json=body)
    assert response.status_code == 201, response.text
    resource: dict[str, Any] = response.json()["data"]
    return resource


def patient(client: httpx.Client, **fields: Any) -> dict[str, Any]:
    return create(client, "/v1/patients", {"firstName": "Ana", "lastName": "Lima", **fields})


def practitioner(client: httpx.Client) -> dict[str, Any]:
    return create(client, "/v1/practitioners", {"firstName": "Rui", "lastName": "Costa", "npi": "1234567890"})


def diagnostics(response: httpx.Response) -> list[str]:
    return [i["diagnostics"] for i in response.json()["issues"]]


def error_code(response: httpx.Response) -> str:
    body = response.json()
    assert set(body) == {"error", "message", "code", "requestId", "issues", "issue"}
    assert body["issue"] == body["issues"]  # docs errors.mdx says issues, the SDK (src/errors.ts) reads issue
    assert body["requestId"].startswith("req_")
    code: str = body["code"]
    return code


def page(client: httpx.Client, route: str, **params: Any) -> dict[str, Any]:
    response = client.get(route, params=params)
    assert response.status_code == 200, response.text
    data: dict[str, Any] = response.json()["data"]
    return data


# -- system routes and auth ---------------------------------------------------


def test_health_and_metadata_need_no_key(server: SandboxServer) -> None:
    with httpx.Client(base_url=server.base_url) as anonymous:
        health = anonymous.get("/health")
        metadata = anonymous.get("/v1/metadata")
    assert health.status_code == 200
    assert health.json()["status"] == "ok"
    assert metadata.status_code == 200
    statement = metadata.json()
    assert statement["resourceType"] == "CapabilityStatement"
    types = {r["type"] for r in statement["rest"][0]["resource"]}
    assert {"Patient", "Immunization", "Composition", "Task"} <= types


@pytest.mark.parametrize(
    ("headers", "code"),
    [
        ({}, "UNAUTHORIZED"),
        ({"x-api-key": "sk_live_not-a-clinik-key"}, "INVALID_KEY_FORMAT"),
        ({"x-api-key": UNKNOWN_KEY}, "INVALID_KEY"),
    ],
)
def test_bad_keys_are_401_and_never_echoed(
    server: SandboxServer, headers: dict[str, str], code: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    with httpx.Client(base_url=server.base_url, headers=headers) as c:
        response = c.post("/v1/patients", json={"firstName": "A", "lastName": "B"})
    assert response.status_code == 401
    assert error_code(response) == code
    for key in headers.values():
        assert key not in response.text
        assert key not in str(response.headers)
        assert key not in caplog.text


def test_scopes(server: SandboxServer, client: httpx.Client) -> None:
    existing = patient(client)["id"]
    with (
        httpx.Client(base_url=server.base_url, headers={"x-api-key": READ_KEY}) as reader,
        httpx.Client(base_url=server.base_url, headers={"x-api-key": WRITE_KEY}) as writer,
    ):
        refused = reader.post("/v1/patients", json={"firstName": "A", "lastName": "B"})
        assert refused.status_code == 403
        assert error_code(refused) == "INSUFFICIENT_SCOPE"
        assert refused.headers["X-RateLimit-Limit"]  # an authenticated request: counted
        assert reader.delete(f"/v1/patients/{existing}").status_code == 403
        assert reader.get(f"/v1/patients/{existing}").status_code == 200

        assert writer.get(f"/v1/patients/{existing}").status_code == 403
        assert writer.post("/v1/patients", json={"firstName": "A", "lastName": "B"}).status_code == 201


def test_config_checks_and_hides_keys() -> None:
    with pytest.raises(UsageError):
        SandboxConfig(api_keys={"not-a-key": "*"})
    with pytest.raises(UsageError):
        SandboxConfig(api_keys={KEY: "admin"})
    with pytest.raises(UsageError):
        SandboxConfig(rate_limit=0)
    config = SandboxConfig()
    assert config.api_key.startswith("clk_test_")
    assert len(config.api_key) == len("clk_test_") + 32
    assert config.api_key not in repr(config)
    assert SandboxConfig().api_key != config.api_key


def test_non_loopback_host_is_refused() -> None:
    with pytest.raises(UsageError):
        SandboxServer(host="0.0.0.0")
    SandboxServer(host="0.0.0.0", allow_remote=True)


# -- create, validate, read -----------------------------------------------------


def test_create_returns_201_with_envelope(client: httpx.Client) -> None:
    sent = {"firstName": "Ana", "lastName": "Lima", "birthDate": "1990-04-01", "gender": "female"}
    response = client.post("/v1/patients", json=sent)
    assert response.status_code == 201
    body = response.json()
    resource, meta = body["data"], body["meta"]
    assert resource["id"].startswith("pt_") and len(resource["id"]) == len("pt_") + 16
    assert resource["resourceType"] == "Patient"
    assert resource["meta"]["versionId"] == "1"
    assert {k: v for k, v in resource.items() if k not in ("id", "resourceType", "meta")} == sent
    assert meta["status"] == 201
    assert meta["requestId"].startswith("req_")
    assert meta["rateLimitRemaining"] == int(response.headers["X-RateLimit-Remaining"])
    assert client.get(f"/v1/patients/{resource['id']}").json()["data"] == resource


def test_every_kind_gets_its_prefix_and_type(client: httpx.Client) -> None:
    pat, prac = patient(client)["id"], practitioner(client)["id"]
    assert prac.startswith("prac_")
    enc = create(
        client, "/v1/encounters", {"status": "finished", "class": "AMB", "patientId": pat, "practitionerId": prac}
    )
    imm = create(
        client,
        "/v1/immunizations",
        {
            "status": "completed",
            "vaccineCode": "208",
            "patientId": pat,
            "encounterId": enc["id"],
            "performer": [{"actorId": prac}],
        },
    )
    doc = create(
        client,
        "/v1/documents",
        {
            "status": "final",
            "type": "note",
            "patientId": pat,
            "practitionerId": prac,
            "title": "Visit",
            "sections": [{"title": "Summary", "text": "ok"}],
        },
    )
    task = create(client, "/v1/tasks", {"status": "requested", "intent": "order", "patientId": pat})
    assert [(r["id"][: r["id"].index("_") + 1], r["resourceType"]) for r in (enc, imm, doc, task)] == [
        ("enc_", "Encounter"),
        ("imm_", "Immunization"),
        ("doc_", "Composition"),
        ("task_", "Task"),
    ]


def test_too_long_lot_number_is_422_naming_the_field(client: httpx.Client) -> None:
    pat = patient(client)["id"]
    body = {"status": "completed", "vaccineCode": "208", "patientId": pat, "lotNumber": "L" * 101}
    response = client.post("/v1/immunizations", json=body)
    assert response.status_code == 422
    assert error_code(response) == "VALIDATION_ERROR"
    assert diagnostics(response) == ["lotNumber: String should have at most 100 characters"]
    assert page(client, "/v1/immunizations", patientId=pat)["total"] == 0


def test_a_negative_dose_amount_is_422_naming_the_field(client: httpx.Client) -> None:
    pat = patient(client)["id"]
    body = {"status": "completed", "vaccineCode": "208", "patientId": pat, "doseQuantity": {"value": -0.5}}
    response = client.post("/v1/immunizations", json=body)
    assert response.status_code == 422
    assert diagnostics(response) == ["doseQuantity.value: Input should be greater than 0"]
    assert page(client, "/v1/immunizations", patientId=pat)["total"] == 0
    body["doseQuantity"] = {"value": 0.5, "unit": "mL"}
    create(client, "/v1/immunizations", body)


def test_missing_first_name_is_422(client: httpx.Client) -> None:
    response = client.post("/v1/patients", json={"lastName": "Lima"})
    assert response.status_code == 422
    assert diagnostics(response) == ["firstName: Required"]


def test_dangling_references_are_422(client: httpx.Client) -> None:
    response = client.post(
        "/v1/immunizations", json={"status": "completed", "vaccineCode": "208", "patientId": "pat_0"}
    )
    assert response.status_code == 422
    assert diagnostics(response) == ["patientId: Patient pat_0 not found"]

    pat = patient(client)["id"]
    body = {"status": "completed", "vaccineCode": "208", "patientId": pat, "performer": [{"actorId": "prac_0"}]}
    response = client.post("/v1/immunizations", json=body)
    assert diagnostics(response) == ["performer.0.actorId: Practitioner prac_0 not found"]
    # A practitioner's id does not stand for a patient.
    body = {"status": "completed", "vaccineCode": "208", "patientId": practitioner(client)["id"]}
    assert client.post("/v1/immunizations", json=body).status_code == 422


@pytest.mark.parametrize("raw", [b'{"firstName": "Ana",', b"", b'{"firstName": NaN}'])
def test_malformed_body_is_400_invalid_json(client: httpx.Client, raw: bytes) -> None:
    # docs errors.mdx: INVALID_JSON, "Request body was not valid JSON".
    response = client.post("/v1/patients", content=raw, headers={"content-type": "application/json"})
    assert response.status_code == 400
    assert error_code(response) == "INVALID_JSON"


def test_json_that_is_not_an_object_fails_validation(client: httpx.Client) -> None:
    response = client.post("/v1/patients", content=b'["firstName"]', headers={"content-type": "application/json"})
    assert response.status_code == 422
    assert error_code(response) == "VALIDATION_ERROR"
    assert diagnostics(response) == ["Request body must be a JSON object"]


def test_oversized_body_is_413(client: httpx.Client) -> None:
    response = client.post("/v1/patients", json={"firstName": "A" * MAX_BODY_BYTES, "lastName": "B"})
    assert response.status_code == 413
    assert error_code(response) == "PAYLOAD_TOO_LARGE"


def test_read_404_and_unknown_routes(client: httpx.Client) -> None:
    missing = client.get("/v1/patients/pat_0000000000000000")
    assert missing.status_code == 404
    assert error_code(missing) == "NOT_FOUND"
    assert "X-RateLimit-Remaining" in missing.headers
    assert error_code(client.get("/v1/nowhere")) == "NOT_FOUND"
    assert client.put("/v1/patients").status_code == 405


# -- update and delete ----------------------------------------------------------


def test_patch_merges_validates_and_versions(client: httpx.Client) -> None:
    original = patient(client, phone="555-0100", email="ana@example.org")
    url = f"/v1/patients/{original['id']}"
    patch = {"phone": "555-0199", "email": None, "id": "pat_other", "resourceType": "Task"}
    response = client.patch(url, content=json.dumps(patch), headers={"content-type": "application/json-patch+json"})
    assert response.status_code == 200, response.text
    updated = response.json()["data"]
    assert updated["id"] == original["id"] and updated["resourceType"] == "Patient"
    assert updated["phone"] == "555-0199" and updated["firstName"] == "Ana"
    assert "email" not in updated
    assert updated["meta"]["versionId"] == "2"
    assert client.get(url).json()["data"] == updated

    invalid = client.patch(url, json={"gender": "robot"})
    assert invalid.status_code == 422
    assert diagnostics(invalid)[0].startswith("gender: ")
    assert client.get(url).json()["data"]["meta"]["versionId"] == "2"
    assert client.patch("/v1/patients/pat_0", json={"phone": "1"}).status_code == 404


def test_delete(client: httpx.Client) -> None:
    url = f"/v1/patients/{patient(client)['id']}"
    response = client.delete(url)
    assert response.status_code == 204
    assert response.content == b""
    assert client.get(url).status_code == 404
    assert client.delete(url).status_code == 404


# -- search -------------------------------------------------------------------


def test_pagination() -> None:
    with fresh() as client:
        created = [patient(client, lastName=f"P{i:03}")["id"] for i in range(25)]
        seen: list[str] = []
        params: dict[str, Any] = {"count": 10}
        pages = []
        while True:
            result = page(client, "/v1/patients", **params)
            pages.append(result)
            seen += [r["id"] for r in result["data"]]
            if not result["hasMore"]:
                break
            params["cursor"] = result["cursor"]
        assert [len(p["data"]) for p in pages] == [10, 10, 5]
        assert [p["hasMore"] for p in pages] == [True, True, False]
        assert all(p["total"] == 25 for p in pages)
        assert pages[-1]["cursor"] is None
        assert seen == created  # creation order, nothing twice or missed
        assert len(page(client, "/v1/patients")["data"]) == 20  # the default count
        exact = page(client, "/v1/patients", count=25)  # a page that ends exactly at the last match
        assert (len(exact["data"]), exact["hasMore"], exact["cursor"]) == (25, False, None)

        for i in range(80):
            patient(client, lastName=f"Q{i:03}")
        clamped = page(client, "/v1/patients", count=500)
        assert len(clamped["data"]) == 100 and clamped["hasMore"] and clamped["total"] == 105
        assert len(page(client, "/v1/patients", count=0)["data"]) == 1

        bad_cursor = client.get("/v1/patients", params={"cursor": "not-ours"})
        assert bad_cursor.status_code == 400
        assert client.get("/v1/patients", params={"count": "many"}).status_code == 400


def test_patient_filters(client: httpx.Client) -> None:
    token = f"Zed{time.monotonic_ns()}"
    ana = patient(client, firstName="Ánna", lastName=token, birthDate="1980-01-02", gender="female")
    patient(client, firstName="Bob", lastName=token, birthDate="1975-05-06", gender="male")

    def ids(**params: Any) -> list[str]:
        return [r["id"] for r in page(client, "/v1/patients", **params)["data"]]

    assert len(ids(name=token.lower())) == 2
    assert ids(name=f"ánna {token}".upper(), birthDate="1980-01-02") == [ana["id"]]
    assert ids(name=f"NNA {token}", gender="female") == [ana["id"]]
    # An unknown parameter is refused, never ignored (a typo'd filter would match everything).
    response = client.get("/v1/patients", params={"name": token, "lastName": token})
    assert response.status_code == 400 and error_code(response) == "VALIDATION_ERROR"
    assert diagnostics(response)[0].startswith("lastName: unknown search parameter")
    assert len(ids(name=token, gender="male")) == 1
    assert ids(name=token, birthDate="1980-01-03") == []


def test_immunization_filters(client: httpx.Client) -> None:
    pat = patient(client)["id"]
    base = {"status": "completed", "patientId": pat}
    first = create(
        client, "/v1/immunizations", {**base, "vaccineCode": "208", "occurrenceDateTime": "2024-01-10T09:00:00Z"}
    )
    coded = {"system": "http://hl7.org/fhir/sid/cvx", "code": "141", "display": "Influenza"}
    second = create(client, "/v1/immunizations", {**base, "vaccineCode": coded, "occurrenceDateTime": "2024-02-01"})
    third = create(
        client,
        "/v1/immunizations",
        {**base, "status": "not-done", "vaccineCode": "208", "occurrenceDateTime": "2024-03-05T23:59:00-05:00"},
    )
    create(client, "/v1/immunizations", {**base, "patientId": patient(client)["id"], "vaccineCode": "208"})

    def ids(**params: Any) -> list[str]:
        return [r["id"] for r in page(client, "/v1/immunizations", patientId=pat, **params)["data"]]

    assert ids() == [first["id"], second["id"], third["id"]]
    assert ids(vaccineCode="208") == [first["id"], third["id"]]
    assert ids(vaccineCode="141") == [second["id"]]
    assert ids(status="not-done") == [third["id"]]
    assert ids(dateFrom="2024-02-01") == [second["id"], third["id"]]
    assert ids(dateTo="2024-02-01") == [first["id"], second["id"]]
    assert ids(dateFrom="2024-01-11", dateTo="2024-03-05") == [second["id"], third["id"]]
    assert client.get("/v1/immunizations", params={"dateFrom": "01/02/2024"}).status_code == 400


# -- rate limit ---------------------------------------------------------------


def test_rate_limit_window() -> None:
    with fresh(rate_limit=5, window=2) as client:
        first = client.post("/v1/patients", json={"firstName": "Ana", "lastName": "Lima"})
        remaining = [int(first.headers["X-RateLimit-Remaining"])]
        for _ in range(4):
            response = client.get("/v1/patients/pat_0")  # a 404 counts as well
            remaining.append(int(response.headers["X-RateLimit-Remaining"]))
        assert remaining == [4, 3, 2, 1, 0]
        assert first.headers["X-RateLimit-Limit"] == "5"
        assert 1 <= int(first.headers["X-RateLimit-Reset"]) <= 2
        assert first.json()["meta"]["rateLimitTotal"] == 5

        refused = client.post("/v1/patients", json={"firstName": "Blocked", "lastName": "Request"})
        assert refused.status_code == 429
        assert error_code(refused) == "RATE_LIMITED"
        retry_after = int(refused.headers["Retry-After"])
        assert 1 <= retry_after <= 2
        assert refused.headers["X-RateLimit-Remaining"] == "0"

        time.sleep(retry_after)
        after = page(client, "/v1/patients", name="blocked")
        assert after["total"] == 0  # the refused create was not processed
        assert page(client, "/v1/patients")["total"] == 1
        assert client.get("/health").status_code == 200  # not counted
        again = client.get("/v1/patients")
        assert again.status_code == 200
        assert again.headers["X-RateLimit-Remaining"] == "2"


# -- persistence and the server -----------------------------------------------


def test_data_survives_a_restart(tmp_path: Path) -> None:
    db = str(tmp_path / "sandbox.sqlite")
    with fresh(db_path=db) as client:
        saved = patient(client)
    with fresh(db_path=db) as client:
        assert client.get(f"/v1/patients/{saved['id']}").json()["data"] == saved
        assert page(client, "/v1/patients")["total"] == 1


def test_unusable_database_is_a_usage_error(tmp_path: Path) -> None:
    not_a_db = tmp_path / "notes.txt"
    not_a_db.write_text("not a database, just text that SQLite must refuse to open" * 100)
    for path in (tmp_path / "missing-dir" / "x.sqlite", not_a_db):
        server = SandboxServer(SandboxConfig(db_path=str(path)))
        with pytest.raises(UsageError):
            server.start()
        with pytest.raises(RuntimeError):
            server.base_url  # noqa: B018 - nothing is left running


def test_private_store_is_deleted_on_close() -> None:
    store = Store()
    path = Path(store.path)
    assert path.exists()
    store.close()
    assert not path.exists() and not path.parent.exists()


def test_create_app_closes_its_store_at_shutdown() -> None:
    app = create_app(SandboxConfig())
    path = Path(app.state.sandbox.store.path)

    async def lifespan() -> None:
        messages = iter([{"type": "lifespan.startup"}, {"type": "lifespan.shutdown"}])

        async def receive() -> dict[str, Any]:
            return next(messages)

        async def send(message: MutableMapping[str, Any]) -> None:
            assert not message["type"].endswith(".failed"), message

        await app({"type": "lifespan", "asgi": {"version": "3.0"}, "state": {}}, receive, send)

    asyncio.run(lifespan())  # what a server with lifespan="on" does around serving
    assert not path.exists()


def test_a_stop_finishes_the_answer_in_flight_closes_idle_connections_and_takes_nothing_new() -> None:
    # The sandbox's server stops without uvicorn's fixed waits (etl.sandbox.server._Server), and keeps its grace:
    # an answer being made is sent whole, an idle keep-alive connection is closed, and no new one is taken.
    running = SandboxServer(SandboxConfig(api_keys={KEY: "*"}, slow_rate=1.0, slow_seconds=0.5, seed=1)).start()
    url, answers = running.base_url, list[int]()

    def post() -> None:
        with httpx.Client(base_url=url, headers={"x-api-key": KEY}, timeout=10) as c:
            answers.append(c.post("/v1/patients", json={"firstName": "Ana", "lastName": "Lima"}).status_code)

    idle = httpx.Client(base_url=url, timeout=10)
    try:
        assert idle.get("/health").status_code == 200  # its connection stays open (keep-alive)
        sender = threading.Thread(target=post)
        sender.start()
        deadline = time.monotonic() + 10
        # A slow write is stored at once, its answer held: it is in flight once the store holds it.
        while Store.search(running.sandbox.store, "/v1/patients", {}, limit=1).total == 0:
            assert time.monotonic() < deadline and sender.is_alive(), "the write never arrived"
            time.sleep(0.01)
        running.stop()
        sender.join(10)
        assert answers == [201]
        with pytest.raises(httpx.ConnectError):  # the idle connection was closed, and nothing listens
            idle.get("/health")
    finally:
        idle.close()
        running.stop()


def test_serve_forever_stops_on_sigterm() -> None:
    seen: list[int] = []

    def ready(running: SandboxServer) -> None:
        seen.append(httpx.get(running.base_url + "/health").status_code)
        signal.raise_signal(signal.SIGTERM)

    previous = signal.getsignal(signal.SIGTERM)
    serve_forever(SandboxConfig(), ready=ready)
    assert seen == [200]
    assert signal.getsignal(signal.SIGTERM) == previous


def test_serve_forever_announces_url_and_key_then_stops_on_sigint(capsys: pytest.CaptureFixture[str]) -> None:
    config = SandboxConfig()
    interrupt = threading.Timer(0.3, os.kill, (os.getpid(), signal.SIGINT))
    interrupt.start()
    try:
        serve_forever(config)  # returns instead of raising KeyboardInterrupt
    finally:
        interrupt.cancel()
        interrupt.join()
    out = capsys.readouterr().out
    assert "http://127.0.0.1:" in out
    assert config.api_key in out


# -- bulk import --------------------------------------------------------------


def wait_for_job(client: httpx.Client, job_id: str) -> dict[str, Any]:
    deadline = time.monotonic() + 10
    while True:
        job = page(client, f"/v1/bulk/jobs/{job_id}")
        if job["status"] in ("completed", "failed") or time.monotonic() > deadline:
            return job
        time.sleep(0.02)


@pytest.mark.parametrize("shape", ["fhir", "simple"])
def test_bulk_import(shape: str) -> None:
    with fresh(rate_limit=1000, responses=shape) as client:
        pat = patient(client)["id"]
        lines = [
            json.dumps({"status": "completed", "vaccineCode": "208", "patientId": pat}),
            json.dumps({"status": "completed", "vaccineCode": "208", "patientId": pat, "lotNumber": "L" * 101}),
            "{not json",
            json.dumps({"status": "completed", "vaccineCode": "208", "patientId": "pat_0"}),
            json.dumps({"status": "completed", "vaccineCode": {"code": "141"}, "patientId": pat}),
        ]
        response = client.post(
            "/v1/bulk/import", json={"resourceType": "Immunization", "data": "\n".join(lines) + "\n"}
        )
        assert response.status_code == 202, response.text
        accepted = response.json()
        assert accepted["data"]["status"] == "pending"
        # The request and each of its five records count against the plan.
        assert accepted["meta"]["rateLimitRemaining"] == 1000 - 2 - 5

        job = wait_for_job(client, accepted["data"]["jobId"])
        assert job["status"] == "completed"
        assert job["type"] == "import"
        assert (job["totalRecords"], job["processedRecords"]) == (5, 5)
        assert job["errors"] == [
            "line 2: lotNumber: String should have at most 100 characters",
            "line 3: record is not valid JSON",
            "line 4: patientId: Patient pat_0 not found",
        ]
        assert page(client, "/v1/immunizations", patientId=pat)["total"] == 2
        if shape == "fhir":
            # The documented record (OpenAPI getBulkJobStatus): no ids, no resourceType.
            assert set(job) == {"id", "type", "status", "totalRecords", "processedRecords", "errors"}
            return
        ids = job["resourceIds"]  # the simple shape's extension
        assert [i is None for i in ids] == [False, True, True, True, False]
        assert client.get(f"/v1/immunizations/{ids[4]}").json()["data"]["vaccineCode"] == {"code": "141"}
        assert client.get("/v1/bulk/jobs/job_0").status_code == 404


def test_bulk_limits() -> None:
    with fresh() as client:
        too_many = client.post("/v1/bulk/import", json={"resourceType": "Patient", "data": "{}\n" * 10_001})
        assert too_many.status_code == 422
        assert "data: at most 10000 records" in diagnostics(too_many)[0]
        unknown = client.post("/v1/bulk/import", json={"resourceType": "Spaceship", "data": "{}"})
        assert unknown.status_code == 422
        assert diagnostics(unknown)[0].startswith("resourceType: ")

        line = json.dumps({"firstName": "Ana", "lastName": "Lima"})
        for _ in range(5):
            assert client.post("/v1/bulk/import", json={"resourceType": "Patient", "data": line}).status_code == 202
        sixth = client.post("/v1/bulk/import", json={"resourceType": "Patient", "data": line})
        assert sixth.status_code == 429
        assert error_code(sixth) == "RATE_LIMITED"
        assert int(sixth.headers["Retry-After"]) > 3000
