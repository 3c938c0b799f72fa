"""Redox as a second destination: message bundles, the sandbox's $write route, and the token."""

from __future__ import annotations

import copy
import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import polars as pl
import pytest

from etl.pipeline import load_files
from etl.redox import check_bundle, write_route
from etl.sandbox import SandboxConfig, SandboxServer
from etl.sandbox.redox import bundle_problems, receipts
from etl.settings import Settings

from .conftest import ROOT, SAMPLE

SEED = ROOT.parent / "shared" / "seeds" / "001_32163195ba60e8cf.txt"
TOKEN = "rdx_test_fixture0123456789"
ROUTE = write_route("clinic-dest", "development")
FHIR_JSON = {"content-type": "application/fhir+json"}


def _auth(token: str = TOKEN) -> dict[str, str]:
    return {"authorization": f"Bearer {token}", **FHIR_JSON}


@pytest.fixture(scope="module")
def redox() -> Iterator[SandboxServer]:
    """One sandbox for the route tests that do not count what it stores."""
    with SandboxServer(SandboxConfig(redox_tokens=(TOKEN,), rate_limit=10_000)) as server:
        yield server


def _seed_bundle() -> dict[str, Any]:
    """The example bundle of the Redox seed, read from its cURL example (numbered lines)."""
    if not SEED.is_file():
        pytest.skip(f"{SEED} is absent")
    text = SEED.read_text(encoding="utf-8")
    example = text[text.index("cURL request example") : text.index("Request Body Schema")]
    code = "\n".join(line for line in example.splitlines() if not re.fullmatch(r"\d+", line.strip()))
    data = code[code.index("--data '") + len("--data '") : code.rindex("'")]
    bundle = json.loads(data)
    assert isinstance(bundle, dict)
    return bundle


def _settings(tmp_path: Path, server: SandboxServer | None = None, **kw: Any) -> Settings:
    extra: dict[str, Any] = {}
    if server is not None:
        extra = {"redox_base_url": server.base_url, "redox_token": TOKEN, "redox_destination_slug": "clinic-dest"}
    values = {"target": "redox", "state": tmp_path / "state.sqlite", "report_dir": tmp_path / "report", **extra, **kw}
    return Settings(**values)


def _payloads(folder: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (folder / "payloads.ndjson").read_text(encoding="utf-8").splitlines()]


def _first_rows(tmp_path: Path, n: int, name: str = "few.csv") -> Path:
    lines = (SAMPLE / "registry.csv").read_text(encoding="utf-8").splitlines()
    path = tmp_path / name
    path.write_text("\n".join(lines[: n + 1]) + "\n", encoding="utf-8")
    return path


# -- the sandbox route ---------------------------------------------------------------


def test_the_seed_bundle_is_refused_for_its_dangling_reference_and_accepted_once_it_agrees(
    redox: SandboxServer,
) -> None:
    seed = _seed_bundle()
    assert check_bundle(json.dumps(seed)) is None  # valid FHIR: only the bundle's own references are wrong
    before = receipts(redox.sandbox.store)

    refused = httpx.post(redox.base_url + ROUTE, json=seed, headers=_auth())
    assert refused.status_code == 422
    issues = refused.json()["issue"]
    assert [i["diagnostics"] for i in issues] == [
        "entry[1].resource.patient.reference: Patient/RedoxPatientExampleTimothy does not resolve inside the bundle"
    ]
    assert issues[0]["expression"] == ["entry[1].resource.patient.reference"]

    fixed = copy.deepcopy(seed)
    patient_id = fixed["entry"][2]["resource"]["id"]
    fixed["entry"][1]["resource"]["patient"]["reference"] = f"Patient/{patient_id}"
    accepted = httpx.post(redox.base_url + ROUTE, content=json.dumps(fixed), headers=_auth())
    assert accepted.status_code == 200, accepted.text
    ack = accepted.json()
    assert ack["resourceType"] == "OperationOutcome" and ack["id"].startswith("ack-")
    assert accepted.headers["content-type"].startswith("application/fhir+json")
    assert {"x-request-id", "x-ratelimit-limit", "x-ratelimit-remaining", "x-ratelimit-reset"} <= set(accepted.headers)
    assert receipts(redox.sandbox.store) == before + 1


def _mutated(change: str) -> dict[str, Any]:
    bundle = _seed_bundle()
    bundle["entry"][1]["resource"]["patient"]["reference"] = "Patient/RedoxPatientExampleTimothyMinimal"
    entries = bundle["entry"]
    if change == "header-not-first":
        entries.append(entries.pop(0))
    elif change == "event":
        entries[0]["resource"]["eventCoding"]["code"] = "Immunization-Update"
    elif change == "endpoint":
        del entries[0]["resource"]["source"]["endpoint"]
    elif change == "no-immunization":
        del entries[1]
    elif change == "type":
        bundle["type"] = "collection"
    elif change == "performer":
        entries[1]["resource"]["performer"] = [{"actor": {"reference": "Practitioner/nobody"}}]
    return bundle


@pytest.mark.parametrize(
    ("change", "path"),
    [
        ("header-not-first", "entry[0].resource.resourceType"),
        ("event", "entry[0].resource.eventCoding.code"),
        ("endpoint", "entry[0].resource.source.endpoint"),
        ("no-immunization", "entry"),
        ("type", "type"),
        ("performer", "entry[1].resource.performer[0].actor.reference"),
    ],
)
def test_the_route_names_what_is_wrong_with_a_bundle(redox: SandboxServer, change: str, path: str) -> None:
    response = httpx.post(redox.base_url + ROUTE, json=_mutated(change), headers=_auth())
    assert response.status_code == 422
    assert path in [i["expression"][0] for i in response.json()["issue"]]


def test_the_route_wants_its_bearer_token_and_fhir_json(redox: SandboxServer) -> None:
    bundle = _mutated("none")
    url = redox.base_url + ROUTE
    missing = httpx.post(url, json=bundle, headers=FHIR_JSON)
    assert missing.status_code == 401 and missing.json()["issue"][0]["code"] == "login"
    wrong = httpx.post(url, json=bundle, headers=_auth("rdx_test_wrong"))
    assert wrong.status_code == 401 and "rdx_test_wrong" not in wrong.text
    # A ClinikAPI key is not a Redox token.
    clinik = httpx.post(url, json=bundle, headers={"x-api-key": redox.api_key, **FHIR_JSON})
    assert clinik.status_code == 401
    xml = httpx.post(url, content=b"<Bundle/>", headers={**_auth(), "content-type": "application/fhir+xml"})
    assert xml.status_code == 415
    broken = httpx.post(url, content=b"{not json", headers=_auth())
    assert broken.status_code == 400
    assert httpx.post(redox.base_url + "/fhir/R4/d/e/Patient/$write", json=bundle, headers=_auth()).status_code == 404
    # The ClinikAPI routes still answer as before.
    assert httpx.get(redox.base_url + "/v1/patients", headers={"x-api-key": redox.api_key}).status_code == 200


def test_the_route_is_rate_limited_like_the_others() -> None:
    with SandboxServer(SandboxConfig(redox_tokens=(TOKEN,), rate_limit=2, window=60)) as server:
        answers = [httpx.post(server.base_url + ROUTE, json=_mutated("none"), headers=_auth()) for _ in range(3)]
    assert [a.status_code for a in answers] == [200, 200, 429]
    assert answers[1].headers["x-ratelimit-remaining"] == "0"
    assert int(answers[2].headers["retry-after"]) >= 1
    assert answers[2].json()["issue"][0]["code"] == "throttled"


# -- the bundles --------------------------------------------------------------------


def test_every_dry_run_bundle_is_valid_fhir_and_resolves_inside_itself(tmp_path: Path) -> None:
    from fhir.resources.R4B.bundle import Bundle

    report = load_files([SAMPLE / "registry.csv"], _settings(tmp_path, dry_run=True))
    assert report.states["planned"] == 534 and report.states["rejected"] == 26
    lines = _payloads(tmp_path / "report")
    assert len(lines) == 534
    assert {(line["method"], line["path"]) for line in lines} == {("POST", write_route("sandbox", "development"))}
    for line in lines:
        Bundle.model_validate(line["body"])  # raises on anything that is not FHIR
        assert bundle_problems(line["body"]) == []
        assert isinstance(line["source_row"], int) and line["source_row"] >= 2

    first = lines[0]["body"]
    types = [e["resource"]["resourceType"] for e in first["entry"]]
    assert types == ["MessageHeader", "Immunization", "Patient"]
    header, immunization, patient = (e["resource"] for e in first["entry"])
    assert header["eventCoding"] == {"system": "urn:redox:event-type", "code": "Immunization-New"}
    assert header["source"]["endpoint"] == "clinik-etl"
    assert immunization["patient"]["reference"] == f"Patient/{patient['id']}"
    assert immunization["identifier"] == [{"system": "urn:clinik-etl:immunization", "value": "VX-000001"}]
    assert immunization["vaccineCode"]["coding"][0]["system"] == "urn:oid:2.16.840.1.113883.6.59"
    assert immunization["route"]["coding"] == [
        {"system": "urn:oid:2.16.840.1.113883.3.26.1.1", "code": "C28161", "display": "Intramuscular"}
    ]
    assert immunization["site"]["coding"][0]["system"] == "http://terminology.hl7.org/CodeSystem/v2-0163"
    assert patient["identifier"][0]["system"] == "urn:clinik-etl:mrn"
    assert patient["identifier"][0]["value"] == "P-10002"

    # A second run builds the same bundles, timestamp aside.
    load_files([SAMPLE / "registry.csv"], _settings(tmp_path, dry_run=True, report_dir=tmp_path / "again"))
    again = _payloads(tmp_path / "again")
    for line in (*lines, *again):
        del line["body"]["timestamp"]
    assert again == lines


def test_a_bundle_that_is_not_fhir_is_rejected_with_its_path(tmp_path: Path) -> None:
    path = tmp_path / "doses.csv"
    path.write_text(
        "Record ID,Patient ID,First Name,Last Name,CVX,Admin Date,Dose Number\n"
        "R1,P1,Ann,Lee,08,2021-03-04,1\n"
        "R2,P1,Ann,Lee,08,2021-04-04,0\n",
        encoding="utf-8",
    )
    report = load_files([path], _settings(tmp_path, dry_run=True))
    bad = report.rows.filter(pl.col("state") == "rejected").row(0, named=True)
    assert (bad["source_row"], bad["error_code"]) == (3, "fhir-invalid")
    assert bad["field"] == "entry[1].resource.protocolApplied[0].doseNumberPositiveInt"
    assert bad["field"] in bad["message"]
    assert [line["source_key"] for line in _payloads(tmp_path / "report")] == ["R1"]
    rejects = pl.read_csv(tmp_path / "report" / "rejects.csv", infer_schema=False)
    assert rejects["Record ID"].to_list() == ["R2"] and "doseNumberPositiveInt" in rejects["reasons"][0]


def test_a_broken_bundle_shape_is_caught_though_one_bundle_a_shape_is_parsed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every bundle here has the same shape; the shape itself is broken (a MessageHeader without its
    eventCoding), so every row is rejected, each naming the path, though few bundles are parsed."""
    from etl import redox

    parsed: list[str] = []
    real_check, real_plan = redox.check_bundle, redox.plan_bundles

    def counting(body: str) -> tuple[str, str] | None:
        parsed.append(body)
        return real_check(body)

    def broken(*args: Any) -> pl.DataFrame:  # every header loses its eventCoding
        return real_plan(*args).with_columns(pl.col("body").str.replace(r'"eventCoding":\{[^}]*\},', ""))

    monkeypatch.setattr(redox, "check_bundle", counting)
    report = load_files([SAMPLE / "registry.csv"], _settings(tmp_path, dry_run=True, batch_rows=100_000))
    assert report.states["planned"] == 534 and len(parsed) < 50  # a bundle per shape, not per row
    parsed.clear()
    monkeypatch.setattr(redox, "plan_bundles", broken)
    report = load_files([SAMPLE / "registry.csv"], _settings(tmp_path, dry_run=True, report_dir=tmp_path / "b"))
    assert report.states["planned"] == 0 and report.states["rejected"] == 560
    fhir = report.rows.filter(pl.col("error_code") == "fhir-invalid")
    assert fhir.height == 534 and set(fhir["field"]) == {"entry[0].resource"}
    assert fhir["message"].str.contains("eventCoding").all()
    assert _payloads(tmp_path / "b") == []


def test_a_shape_check_rejects_only_the_bundles_that_are_wrong() -> None:
    from etl.redox import bundle_shape, check_bundles

    good = json.dumps({"resourceType": "Bundle", "type": "message", "timestamp": "2024-01-02T03:04:05Z"},
                      separators=(",", ":"))
    bad = good.replace("2024-01-02T03:04:05Z", "not a time")
    assert pl.select(bundle_shape(pl.lit(good))).item() == pl.select(bundle_shape(pl.lit(bad))).item()
    found = check_bundles(pl.Series([bad, good, bad]))  # the shape's first bundle fails: each one is parsed
    assert found["index"].to_list() == [0, 2] and set(found["fhir_path"]) == {"timestamp"}
    assert check_bundles(pl.Series([good, bad])).is_empty()  # a shape's first passing stands for the rest


def test_redox_refuses_bulk_mode_with_exit_2(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from etl.cli import main

    result = CliRunner().invoke(main, ["load", str(SAMPLE / "registry.csv"), "--target", "redox", "--mode", "bulk",
                                       "--dry-run", "--report-dir", str(tmp_path / "r")])
    assert result.exit_code == 2
    assert "Redox has no bulk endpoint" in result.output
    assert "Traceback" not in result.output and not (tmp_path / "r").exists()


def test_a_redox_load_in_batches_sends_each_bundle_once_and_created_rows_carry_no_message(tmp_path: Path) -> None:
    with SandboxServer(SandboxConfig(redox_tokens=(TOKEN,))) as server:
        settings = _settings(tmp_path, server, batch_rows=50)
        report = load_files([SAMPLE / "registry.csv"], settings)
        assert (report.states["created"], report.states["rejected"]) == (534, 26)
        assert receipts(server.sandbox.store) == 534 and report.summary["batch_rows"] == 50
        created = report.rows.filter(pl.col("state") == "created")
        assert created["message"].is_null().all() and created["error_code"].is_null().all()


# -- the load -----------------------------------------------------------------------


def test_the_sample_loads_into_the_redox_sandbox_and_a_rerun_sends_nothing(tmp_path: Path) -> None:
    with SandboxServer(SandboxConfig(redox_tokens=(TOKEN,))) as server:
        settings = _settings(tmp_path, server)
        first = load_files([SAMPLE / "registry.csv"], settings)
        states = first.summary["states"]
        assert sum(states.values()) == first.rows_total == 560
        assert (states["created"], states["rejected"]) == (534, 26)
        assert receipts(server.sandbox.store) == 534
        assert first.summary["requests"] == 534 and first.exit_code() == 1
        rows = pl.read_csv(tmp_path / "report" / "rows.csv", infer_schema=False)
        created = rows.filter(pl.col("state") == "created")
        assert created.height == 534 and created["resource_id"].str.starts_with("ack-").all()
        # Each created row records the acknowledgement of its own bundle (sends overlap, so match by content).
        stored = server.sandbox.store.search("redox:Immunization/$write", {}, limit=1000).items
        assert {r["destination"] for r in stored} == {"clinic-dest"}
        ack_of = {
            next(e["resource"] for e in r["bundle"]["entry"] if e["resource"]["resourceType"] == "Immunization")[
                "identifier"
            ][0]["value"]: r["id"]
            for r in stored
        }
        assert dict(created.select("source_key", "resource_id").iter_rows()) == ack_of

        again = load_files([SAMPLE / "registry.csv"], settings.model_copy(update={"report_dir": tmp_path / "again"}))
        assert (again.states["skipped"], again.states["rejected"], again.states["created"]) == (534, 26, 0)
        assert again.summary["requests"] == 0
        assert receipts(server.sandbox.store) == 534


def test_clinikapi_and_redox_loads_of_one_file_keep_apart(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    few = _first_rows(tmp_path, 4)  # the fifth (spreadsheet row 6) is a planted bad row
    clinik = load_files([few], Settings(report_dir=tmp_path / "c"))
    redox = load_files([few], Settings(target="redox", report_dir=tmp_path / "r"))
    assert clinik.states["created"] == redox.states["created"] == 4
    # Each its own default state store, bound to its own target; the Redox sends under their own kind.
    assert (tmp_path / ".clinik-etl" / "state.sqlite").is_file()
    assert (tmp_path / ".clinik-etl" / "redox-state.sqlite").is_file()
    again = load_files([few], Settings(target="redox", report_dir=tmp_path / "r2"))
    assert again.states["skipped"] == 4


def test_an_unanswered_write_stays_unknown_and_is_never_sent_again(tmp_path: Path) -> None:
    few = _first_rows(tmp_path, 3)
    # Every write is committed, then the connection is cut before any answer.
    with SandboxServer(SandboxConfig(redox_tokens=(TOKEN,), drop_rate=1.0, seed=7)) as server:
        settings = _settings(tmp_path, server, timeout=5.0)
        first = load_files([few], settings)
        assert first.states["unknown"] == 3 and receipts(server.sandbox.store) == 3
        again = load_files([few], settings.model_copy(update={"report_dir": tmp_path / "again"}))
        assert again.states["unknown"] == 3
        assert again.summary["requests"] == 0
        assert receipts(server.sandbox.store) == 3  # no search to ask, so nothing was re-sent blindly
        assert "no search" in again.rows["message"][0]


def _cli(*args: str, env: dict[str, str]) -> tuple[int, str]:
    proc = subprocess.run(
        [sys.executable, "-m", "etl.cli", *args],
        cwd=ROOT,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    return proc.returncode, proc.stdout + proc.stderr


@pytest.mark.slow
def test_the_token_appears_in_no_file_and_no_output(tmp_path: Path) -> None:
    marker = "rdx_test_LEAKMARKER5e1d0b"
    secret = tmp_path / "secret"
    secret.mkdir()
    token_file = secret / "token"
    token_file.write_text(marker + "\n", encoding="utf-8")
    out = tmp_path / "out"
    few = _first_rows(out.parent, 20, "twenty.csv")
    seen: list[str] = []
    slug = {"CLINIK_ETL_REDOX_DESTINATION_SLUG": "clinic-dest"}
    env = {"REDOX_API_TOKEN": marker, **slug}
    db = out / "sandbox.sqlite"
    out.mkdir()
    with SandboxServer(SandboxConfig(db_path=str(db), redox_tokens=(marker,))) as server:
        common = ["load", str(few), "--target", "redox", "--redox-base-url", server.base_url]
        runs = [
            ([*common, "--state", str(out / "s.sqlite")], env),
            ([*common, "--state", str(out / "s.sqlite"), "--dry-run"], env),
            (["--debug", *common, "--state", str(out / "s.sqlite"), "--redox-token-file", str(token_file)], slug),
            # The embedded sandbox, given the same token.
            (["load", str(few), "--target", "redox", "--state", str(out / "e.sqlite")], env),
        ]
        for i, (args, extra_env) in enumerate(runs):
            rc, text = _cli(*args, "--report-dir", str(out / f"r{i}"), env=extra_env)
            assert rc == 1, text  # 1: the planted bad row 6 is rejected; the others went through
            seen.append(text)
    # A refused token: the run stops (exit 4) without echoing it.
    with SandboxServer(SandboxConfig(db_path=str(out / "other.sqlite"))) as server:
        rc, text = _cli(
            "load", str(few), "--target", "redox", "--redox-base-url", server.base_url,
            "--state", str(out / "w.sqlite"), "--report-dir", str(out / "rw"), env=env,
        )  # fmt: skip
        assert rc == 4, text
        seen.append(text)
    files = [p for p in out.rglob("*") if p.is_file()]
    assert len(files) >= 15
    for path in files:
        assert marker.encode() not in path.read_bytes(), path
    for text in seen:
        assert marker not in text
    settings = Settings(target="redox", redox_token=marker)
    assert marker not in repr(settings) and marker not in repr(SandboxConfig(redox_tokens=(marker,)))
