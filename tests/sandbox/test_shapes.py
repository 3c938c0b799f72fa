"""The sandbox's fidelity to the API's sources: answer shapes (fhir and simple), documented error codes,
format checks, search parameters as the OpenAPI file lists them, PATCH, ``active`` and the routes it does
not imitate. Each test names the source it checks against."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from etl.sandbox import SandboxConfig, SandboxServer
from etl.sandbox.store import FILTERS, PAGING, SORTABLE

KEY = "clk_test_" + "b2" * 16


@pytest.fixture(scope="module", params=["fhir", "simple"])
def shaped(request: pytest.FixtureRequest) -> Iterator[tuple[str, httpx.Client]]:
    with (
        SandboxServer(SandboxConfig(api_keys={KEY: "*"}, responses=request.param)) as server,
        httpx.Client(base_url=server.base_url, headers={"x-api-key": KEY}, timeout=10) as client,
    ):
        yield request.param, client


@pytest.fixture(scope="module")
def client() -> Iterator[httpx.Client]:
    with (
        SandboxServer(SandboxConfig(api_keys={KEY: "*"})) as server,
        httpx.Client(base_url=server.base_url, headers={"x-api-key": KEY}, timeout=10) as c,
    ):
        yield c


def post(client: httpx.Client, route: str, body: dict[str, Any]) -> dict[str, Any]:
    response = client.post(route, json=body)
    assert response.status_code == 201, response.text
    data: dict[str, Any] = response.json()["data"]
    return data


def problem(response: httpx.Response) -> tuple[int, str, list[str]]:
    body = response.json()
    assert body["requestId"].startswith("req_")
    return response.status_code, body["code"], [i["diagnostics"] for i in body["issues"]]


def test_the_default_shape_is_fhir() -> None:
    assert SandboxConfig().responses == "fhir"


def test_each_kind_round_trips_in_each_shape(shaped: tuple[str, httpx.Client]) -> None:
    shape, client = shaped
    pat = post(client, "/v1/patients", {"firstName": "Ana", "lastName": "Lima", "birthDate": "1990-04-01"})
    prac = post(client, "/v1/practitioners", {"firstName": "Rui", "lastName": "Costa", "npi": "1234567890",
                                              "specialty": "Pediatrics"})
    enc = post(client, "/v1/encounters", {"status": "finished", "class": "AMB", "patientId": pat["id"],
                                          "practitionerId": prac["id"], "lengthMinutes": 15,
                                          "period": {"start": "2024-01-10T09:00:00Z"}})
    imm = post(client, "/v1/immunizations", {"status": "completed", "vaccineCode": "208", "patientId": pat["id"],
                                             "encounterId": enc["id"], "performer": [{"actorId": prac["id"]}],
                                             "protocolApplied": [{"doseNumber": 2}], "note": "no reaction"})
    coded = post(client, "/v1/immunizations", {"status": "completed", "patientId": pat["id"], "vaccineCode": {
        "system": "http://hl7.org/fhir/sid/cvx", "code": "141", "display": "Influenza"}})
    doc = post(client, "/v1/documents", {"status": "final", "type": "visit note", "patientId": pat["id"],
                                         "practitionerId": prac["id"], "title": "Visit",
                                         "sections": [{"title": "S", "text": "a < b"}]})
    task = post(client, "/v1/tasks", {"status": "requested", "intent": "order", "patientId": pat["id"],
                                      "code": "recall", "ownerId": prac["id"]})
    # docs: ids as the examples show them (pt_abc123, prac_..., enc_..., imm_..., doc_..., task_...).
    for resource, prefix in ((pat, "pt_"), (prac, "prac_"), (enc, "enc_"), (imm, "imm_"), (doc, "doc_"),
                             (task, "task_")):
        assert resource["id"].startswith(prefix)
        route = {"pt_": "patients", "prac_": "practitioners", "enc_": "encounters", "imm_": "immunizations",
                 "doc_": "documents", "task_": "tasks"}[prefix]
        assert client.get(f"/v1/{route}/{resource['id']}").json()["data"] == resource  # read answers as create
    found = client.get("/v1/immunizations", params={"patientId": pat["id"]}).json()["data"]["data"]
    assert {r["id"] for r in found} == {imm["id"], coded["id"]}
    assert next(r for r in found if r["id"] == imm["id"]) == imm  # search answers as read
    if shape == "simple":
        assert imm["patientId"] == pat["id"] and imm["vaccineCode"] == "208"
        assert pat["firstName"] == "Ana" and "fullName" not in pat
        return
    # sdk src/types/requests.ts PatientSummary: no resourceType, fullName, active.
    assert "resourceType" not in pat and pat["fullName"] == "Ana Lima" and pat["active"] is True
    assert pat["birthDate"] == "1990-04-01"
    # sdk src/types/resources.ts: FHIR R4 resources with References and CodeableConcepts.
    assert prac["resourceType"] == "Practitioner" and prac["name"] == [{"family": "Costa", "given": ["Rui"]}]
    assert prac["identifier"][0]["value"] == "1234567890" and prac["active"] is True
    assert enc["subject"] == {"reference": f"Patient/{pat['id']}"} and enc["class"]["code"] == "AMB"
    assert enc["participant"] == [{"individual": {"reference": f"Practitioner/{prac['id']}"}}]
    assert enc["length"]["value"] == 15 and "patientId" not in enc
    assert imm["patient"] == {"reference": f"Patient/{pat['id']}"} and "patientId" not in imm
    assert imm["vaccineCode"] == {"text": "208"}
    assert imm["encounter"] == {"reference": f"Encounter/{enc['id']}"}
    assert imm["performer"] == [{"actor": {"reference": f"Practitioner/{prac['id']}"}}]
    assert imm["protocolApplied"] == [{"doseNumberPositiveInt": 2}] and imm["note"] == [{"text": "no reaction"}]
    assert coded["vaccineCode"] == {"coding": [{"system": "http://hl7.org/fhir/sid/cvx", "code": "141",
                                                "display": "Influenza"}], "text": "Influenza"}
    assert doc["resourceType"] == "Composition" and doc["author"] == [{"reference": f"Practitioner/{prac['id']}"}]
    assert doc["section"][0]["text"]["div"].endswith(">a &lt; b</div>") and doc["date"]
    assert task["for"] == {"reference": f"Patient/{pat['id']}"} and task["code"] == {"text": "recall"}
    # The vaccineCode filter reads the stored code, whatever the answer shape.
    by_code = client.get("/v1/immunizations", params={"patientId": pat["id"], "vaccineCode": "141"}).json()
    assert [r["id"] for r in by_code["data"]["data"]] == [coded["id"]]


@pytest.mark.parametrize("header", ["X-HTTP-Method-Override", "X-HTTP-Method", "X-Method-Override"])
def test_method_override_headers_are_refused(client: httpx.Client, header: str) -> None:
    # docs errors.mdx, "Method Override Is Not Supported": 400 METHOD_OVERRIDE_REJECTED whatever the value.
    response = client.post("/v1/patients", json={"firstName": "A", "lastName": "B"}, headers={header: "POST"})
    assert problem(response)[:2] == (400, "METHOD_OVERRIDE_REJECTED")
    assert client.get("/v1/patients", headers={header: "DELETE"}).status_code == 400


def test_error_bodies_carry_issues_for_the_docs_and_issue_for_the_sdk(client: httpx.Client) -> None:
    response = client.post("/v1/patients", json={"firstName": "A"})
    body = response.json()
    assert set(body) == {"error", "message", "code", "requestId", "issues", "issue"}  # docs errors.mdx (+ SDK)
    assert body["issues"] == body["issue"] == [{"severity": "error", "code": "invalid",
                                                "diagnostics": "lastName: Required"}]
    assert response.headers["x-request-id"] == body["requestId"]
    assert response.headers["x-timestamp"]  # sdk src/index.ts extractMeta reads it


@pytest.mark.parametrize(
    ("route", "body", "field"),
    [
        ("/v1/patients", {"firstName": "A", "lastName": "B", "email": "not-an-address"}, "email"),
        ("/v1/patients", {"firstName": "A", "lastName": "B", "photo": {"url": "no scheme here"}}, "photo.url"),
        ("/v1/patients", {"firstName": "", "lastName": "B"}, "firstName"),
        ("/v1/tasks", {"status": "requested", "intent": "order", "authoredOn": "2024-01-02"}, "authoredOn"),
        ("/v1/tasks", {"status": "requested", "intent": "order", "authoredOn": "2024-01-02T10:00"}, "authoredOn"),
    ],
)
def test_documented_formats_and_non_empty_required_strings(
    client: httpx.Client, route: str, body: dict[str, Any], field: str
) -> None:
    # OpenAPI: format email / uri / date-time; an empty required string is refused like an absent one.
    status, code, issues = problem(client.post(route, json=body))
    assert (status, code) == (422, "VALIDATION_ERROR")
    assert issues[0].startswith(f"{field}: ")


@pytest.mark.parametrize(
    ("route", "body"),
    [
        ("/v1/patients", {"firstName": "A", "lastName": "B", "email": "a.b@example.org",
                          "photo": {"url": "https://example.org/a.png"}}),
        ("/v1/tasks", {"status": "requested", "intent": "order", "authoredOn": "2024-01-02T10:00:00-05:00"}),
        ("/v1/tasks", {"status": "requested", "intent": "order", "authoredOn": "2024-01-02T10:00:00.5Z"}),
    ],
)
def test_well_formed_values_pass(client: httpx.Client, route: str, body: dict[str, Any]) -> None:
    post(client, route, body)


def test_search_parameters_are_exactly_the_openapi_ones(openapi: dict[str, Any]) -> None:
    for route, filters in FILTERS.items():
        params = {p.get("name") or p["$ref"].rsplit("/", 1)[-1] for p in openapi["paths"][route]["get"]["parameters"]}
        named = {openapi["components"]["parameters"][p]["name"] if p.startswith("Query") else p for p in params}
        assert named == {*filters, *PAGING, *(("sort",) if route in SORTABLE else ())}, route


def test_unknown_and_malformed_search_parameters_are_400(client: httpx.Client) -> None:
    cases = [
        ("/v1/immunizations", {"sort": "occurrenceDateTime"}, "sort: unknown search parameter"),  # not listed there
        ("/v1/encounters", {"practitionerId": "prac_1"}, "practitionerId: unknown search parameter"),
        ("/v1/encounters", {"sort": "-nonsense"}, "sort: not a field"),
        ("/v1/encounters", {"dateFrom": "2024-1-2"}, "dateFrom: must be a date"),
        ("/v1/patients", {"active": "yes"}, "active: must be true or false"),
    ]
    for route, params, start in cases:
        status, code, issues = problem(client.get(route, params=params))
        assert (status, code) == (400, "VALIDATION_ERROR")
        assert issues[0].startswith(start), issues


def test_encounters_filter_by_date_and_sort_both_ways_across_pages(client: httpx.Client) -> None:
    pat = post(client, "/v1/patients", {"firstName": "Sol", "lastName": "Sorted"})["id"]
    days = ["2024-05-03", "2024-05-01", "2024-05-04", "2024-05-02"]
    for day in days:
        post(client, "/v1/encounters", {"status": "finished", "class": "AMB", "patientId": pat,
                                        "period": {"start": f"{day}T08:00:00Z"}})

    def starts(**params: Any) -> list[str]:
        out, cursor = [], None
        while True:
            query = {"patientId": pat, "count": 3, **params, **({"cursor": cursor} if cursor else {})}
            page = client.get("/v1/encounters", params=query).json()["data"]
            out += [r["period"]["start"][:10] for r in page["data"]]
            if not page["hasMore"]:
                return out
            cursor = page["cursor"]

    assert starts(sort="date") == sorted(days)
    assert starts(sort="-period.start") == sorted(days, reverse=True)
    assert starts() == days  # creation order without sort
    assert starts(dateFrom="2024-05-02", dateTo="2024-05-03") == ["2024-05-03", "2024-05-02"]


def test_active_is_patched_and_filtered(shaped: tuple[str, httpx.Client]) -> None:
    # sdk PatientUpdateRequest.active; OpenAPI searchPatients ``active``.
    _, client = shaped
    token = f"Act{id(client)}"
    kept = post(client, "/v1/patients", {"firstName": "Kept", "lastName": token})
    gone = post(client, "/v1/patients", {"firstName": "Gone", "lastName": token})
    response = client.patch(f"/v1/patients/{gone['id']}", json={"active": False})
    assert response.status_code == 200 and response.json()["data"]["active"] is False

    def ids(active: str) -> set[str]:
        page = client.get("/v1/patients", params={"name": token, "active": active}).json()["data"]
        return {r["id"] for r in page["data"]}

    assert ids("true") == {kept["id"]} and ids("false") == {gone["id"]}
    imm_patch = client.patch(f"/v1/patients/{kept['id']}", json={"active": "no"})
    assert problem(imm_patch)[:2] == (422, "VALIDATION_ERROR")


def test_patch_takes_an_object_under_either_content_type_and_refuses_operations(client: httpx.Client) -> None:
    pat = post(client, "/v1/patients", {"firstName": "Pat", "lastName": "Ched"})
    url = f"/v1/patients/{pat['id']}"
    for content_type in ("application/json", "application/json-patch+json"):  # OpenAPI; the SDK
        response = client.patch(url, content=b'{"phone": "555-0100"}', headers={"content-type": content_type})
        assert response.status_code == 200 and response.json()["data"]["phone"] == "555-0100"
    ops = b'[{"op": "replace", "path": "/phone", "value": "1"}]'
    response = client.patch(url, content=ops, headers={"content-type": "application/json-patch+json"})
    assert problem(response)[:2] == (422, "VALIDATION_ERROR")
    imm_active = client.patch(url.replace("patients", "immunizations"), json={"active": True})
    assert imm_active.status_code == 404


@pytest.mark.parametrize(
    ("method", "path"),
    [("GET", "/v1/fhir/Patient"), ("POST", "/v1/fhir/Patient"), ("GET", "/v1/fhir/Patient/pt_1"),
     ("POST", "/v1/bulk/export")],
)
def test_routes_not_imitated_are_501_with_an_error_body(client: httpx.Client, method: str, path: str) -> None:
    status, code, _ = problem(client.request(method, path, json={}))
    assert (status, code) == (501, "NOT_IMPLEMENTED")
    # Still behind the key, like every /v1 route.
    assert client.request(method, path, headers={"x-api-key": ""}).status_code == 401


def test_a_read_with_include_is_501_and_with_another_parameter_400(client: httpx.Client) -> None:
    pat = post(client, "/v1/patients", {"firstName": "In", "lastName": "Clude"})["id"]
    # sdk patients.read(id, {include}) sends _revinclude: the API answers a Bundle found by search.
    response = client.get(f"/v1/patients/{pat}", params={"_revinclude": "Encounter:subject"})
    assert problem(response)[:2] == (501, "NOT_IMPLEMENTED")
    assert problem(client.get(f"/v1/patients/{pat}", params={"foo": "1"}))[:2] == (400, "VALIDATION_ERROR")
    assert client.get(f"/v1/patients/{pat}").status_code == 200
