"""Matching what the target holds before creating (etl.matching), over real sockets to real sandboxes."""

from __future__ import annotations

import json
import os
import stat
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import polars as pl
import pytest
from click.testing import CliRunner
from pydantic import SecretStr

from etl.cli import main
from etl.errors import ExitCode, InputError
from etl.load.lookup import as_simple
from etl.matching import NAME_SIMILARITY, match_patients, people, read_decisions
from etl.pipeline import load_files
from etl.report import FINAL_STATES, read_rows
from etl.sandbox import SandboxConfig, SandboxServer
from etl.settings import Settings

from .conftest import SAMPLE

REGISTRY = SAMPLE / "registry.csv"
HEADER = "Record ID,Patient ID,First Name,Last Name,DOB,Sex,Phone,Email,ZIP,CVX,Admin Date,Lot Number\n"


def everything(server: Any, route: str) -> list[dict[str, Any]]:
    """Every resource of a route, page by page."""
    found: list[dict[str, Any]] = []
    cursor = None
    while True:
        params: dict[str, Any] = {"count": 100, **({"cursor": cursor} if cursor else {})}
        page = httpx.get(server.base_url + route, params=params, headers={"x-api-key": server.api_key}).json()["data"]
        found += page["data"]
        cursor = page.get("cursor")
        if not page.get("hasMore"):
            return found


def post(server: Any, route: str, body: dict[str, Any]) -> str:
    response = httpx.post(server.base_url + route, json=body, headers={"x-api-key": server.api_key})
    response.raise_for_status()
    return str(response.json()["data"]["id"])


def _person(p: dict[str, Any]) -> tuple[str, str, str]:
    """A patient as a person tells it: names folded as matching folds them, and the birth date."""
    frame = _people({k: v for k, v in p.items() if k in _BASE})
    return frame["n_first"][0], frame["n_last"][0], frame["n_birth"][0]


def tenant_contents(server: Any) -> tuple[Counter[tuple[str, str, str]], Counter[tuple[Any, ...]]]:
    """What a tenant holds, without ids: its patients (as people) and doses (person, vaccine, day)."""
    # Read from either answer shape (the sandbox answers FHIR-shaped resources by default).
    patients = {p["id"]: _person(as_simple("patient", p)) for p in everything(server, "/v1/patients")}
    doses = Counter(
        (patients[d["patientId"]], d["vaccineCode"]["code"], d["occurrenceDateTime"][:10])
        for d in (as_simple("immunization", r) for r in everything(server, "/v1/immunizations"))
    )
    return Counter(patients.values()), doses


def _settings(server: Any, tmp: Path, name: str, **extra: Any) -> Settings:
    return Settings(base_url=server.base_url, api_key=server.api_key, consistency_window=0,
                    state=tmp / f"{name}.sqlite", report_dir=tmp / name, **extra)


@pytest.fixture()
def tenant_with_existing_data(tmp_path: Path) -> Iterator[tuple[Any, Any]]:
    """A sandbox that holds 40 of the sample registry's patients and 10 of its doses, as someone else
    entered them (their own ids, last names in capitals, phones as bare digits, e-mails in capitals,
    no lot numbers), and the contents of a tenant that was empty before the same load (for comparing).

    The 40 and the 10 are taken from what a load of the registry into an empty sandbox created, so
    they are valid patients and doses of the file."""
    # The empty tenant echoes create bodies (responses="simple"): its patients and doses are copied as
    # bodies into the tenant, which answers as the default (FHIR-shaped) sandbox does.
    with SandboxServer(SandboxConfig(responses="simple")) as empty:
        load_files([REGISTRY], _settings(empty, tmp_path, "empty"))
        expected = tenant_contents(empty)
        patients = everything(empty, "/v1/patients")[:40]
        mine = {p["id"] for p in patients}
        doses = [d for d in everything(empty, "/v1/immunizations") if d["patientId"] in mine][:10]
    assert len(patients) == 40 and len(doses) == 10
    with SandboxServer(SandboxConfig()) as tenant:
        ids = {}
        for p in patients:
            body = {k: v for k, v in p.items() if k in ("firstName", "lastName", "birthDate", "gender", "email",
                                                         "phone", "address")}
            body["lastName"] = body["lastName"].upper()
            if "phone" in body:
                body["phone"] = "".join(c for c in body["phone"] if c.isdigit())
            if "email" in body:
                body["email"] = body["email"].upper()
            ids[p["id"]] = post(tenant, "/v1/patients", body)
        for d in doses:
            post(tenant, "/v1/immunizations", {"patientId": ids[d["patientId"]], "status": d["status"],
                                               "vaccineCode": d["vaccineCode"],
                                               "occurrenceDateTime": d["occurrenceDateTime"]})
        yield tenant, expected


def test_a_tenant_holding_40_patients_and_10_doses_ends_holding_each_once(
    tmp_path: Path, tenant_with_existing_data: tuple[Any, Any]
) -> None:
    tenant, (patients, doses) = tenant_with_existing_data
    report = load_files([REGISTRY], _settings(tenant, tmp_path, "load"))
    held_patients, held_doses = tenant_contents(tenant)
    assert held_patients == patients and held_doses == doses  # exactly what a load into an empty tenant gives
    assert max(held_patients.values()) == 1
    states = {k: v for k, v in report.states.items() if v}
    assert states == {"created": 534 - 10, "exists": 10, "rejected": 26}
    assert report.summary["matching"]["matched"] == 40
    assert report.summary["patients"] == {"created": 120}
    assert report.summary["matching_requests"] > 0
    rows = report.rows
    exists = rows.filter(pl.col("state") == "exists")
    assert exists["resource_id"].str.starts_with("imm_").all()
    # A row of a matched patient names the tenant's patient.
    tenant_ids = {p["id"] for p in everything(tenant, "/v1/patients")}
    assert set(exists["patient_id"]) <= tenant_ids
    again = load_files([REGISTRY], _settings(tenant, tmp_path, "load") .model_copy(
        update={"report_dir": tmp_path / "again"}))
    assert {k: v for k, v in again.states.items() if v} == {"skipped": 524, "exists": 10, "rejected": 26}
    assert tenant_contents(tenant) == (patients, doses)


def _registry(path: Path, *rows: str) -> Path:
    path.write_text(HEADER + "".join(r + "\n" for r in rows), encoding="utf-8")
    return path


def _tenant_patient(server: Any, **extra: str) -> str:
    return post(server, "/v1/patients", {"firstName": "Dorothy", "lastName": "Mitchell", "birthDate": "2016-06-05",
                                         "gender": "female", "phone": "(212) 555-0196", **extra})


def test_a_typo_in_a_last_name_goes_to_review_never_linked_never_created(tmp_path: Path, sandbox: Any) -> None:
    tenant_id = _tenant_patient(sandbox)
    data = _registry(tmp_path / "typo.csv", "R1,P1,Dorothy,Mitchel,2016-06-05,F,,,,08,2021-03-04,A1")
    report = load_files([data], _settings(sandbox, tmp_path, "r"))
    assert report.rows["state"].to_list() == ["needs-review"]
    assert report.exit_code() == ExitCode.REJECTED
    assert len(everything(sandbox, "/v1/patients")) == 1 and everything(sandbox, "/v1/immunizations") == []
    review = pl.read_csv(tmp_path / "r" / "review.csv", infer_schema=False)
    assert review.row(0, named=True) | {"scores": None} == {
        "kind": "patient", "source_key": "P1", "source_file": str(data), "source_row": "2",
        "first_name": "Dorothy", "last_name": "Mitchel", "birth_date": "2016-06-05", "candidate_ids": tenant_id,
        "scores": None, "rules": "similar-name", "candidate_names": "Dorothy Mitchell",
        "candidate_birth_dates": "2016-06-05", "decision": "",
    }
    assert NAME_SIMILARITY <= float(review["scores"][0]) < 100
    assert stat.S_IMODE(os.stat(tmp_path / "r" / "review.csv").st_mode) == 0o600


def test_a_swapped_day_and_month_goes_to_review_when_a_phone_supports_it(tmp_path: Path, sandbox: Any) -> None:
    tenant_id = _tenant_patient(sandbox)
    data = _registry(tmp_path / "swap.csv", "R1,P1,Dorothy,Mitchell,2016-05-06,F,212-555-0196,,,08,2021-03-04,A1")
    report = load_files([data], _settings(sandbox, tmp_path, "r"))
    assert report.rows["state"].to_list() == ["needs-review"]
    review = pl.read_csv(tmp_path / "r" / "review.csv", infer_schema=False)
    assert review["candidate_ids"].to_list() == [tenant_id]
    assert review["rules"].to_list() == ["day-month-swapped"]
    assert len(everything(sandbox, "/v1/patients")) == 1
    # Without a phone, e-mail or ZIP in common, a swapped date is another person: created.
    other = _registry(tmp_path / "other.csv", "R1,P1,Dorothy,Mitchell,2016-05-06,F,(617) 555-0100,,,08,2021-03-04,A1")
    report = load_files([other], _settings(sandbox, tmp_path, "r2"))
    assert report.rows["state"].to_list() == ["created"]
    assert len(everything(sandbox, "/v1/patients")) == 2


def test_an_exact_match_is_linked_and_its_dose_created_for_the_tenant_patient(tmp_path: Path, sandbox: Any) -> None:
    tenant_id = _tenant_patient(sandbox)
    data = _registry(tmp_path / "same.csv", "R1,P1,DOROTHY,mitchell,2016-06-05,F,,,,08,2021-03-04,A1")
    report = load_files([data], _settings(sandbox, tmp_path, "r"))
    assert report.rows["state"].to_list() == ["created"]
    assert report.rows["patient_id"].to_list() == [tenant_id]
    assert report.summary["matching"]["matched"] == 1
    assert [as_simple("immunization", d)["patientId"] for d in everything(sandbox, "/v1/immunizations")] == [tenant_id]
    assert len(everything(sandbox, "/v1/patients")) == 1
    # A patients file's own row is `matched`.
    patients = tmp_path / "patients.csv"
    patients.write_text("Patient ID,First Name,Last Name,Birth Date,Gender\nP9,Dorothy,Mitchell,2016-06-05,F\n",
                        encoding="utf-8")
    report = load_files([patients], _settings(sandbox, tmp_path, "p"))
    assert report.rows.select("state", "resource_id").row(0) == ("matched", tenant_id)
    assert report.exit_code() == ExitCode.OK


def test_match_off_and_exact_leave_probable_ones_alone(tmp_path: Path, sandbox: Any) -> None:
    _tenant_patient(sandbox)
    data = _registry(tmp_path / "typo.csv", "R1,P1,Dorothy,Mitchel,2016-06-05,F,,,,08,2021-03-04,A1")
    report = load_files([data], _settings(sandbox, tmp_path, "r", match="exact"))
    assert report.rows["state"].to_list() == ["created"]
    assert not (tmp_path / "r" / "review.csv").exists()


def test_accept_review_applies_a_person_s_decisions(tmp_path: Path, sandbox: Any) -> None:
    tenant_id = _tenant_patient(sandbox)
    _tenant_patient(sandbox, firstName="Walter", lastName="Novak", birthDate="2014-06-21", gender="male")
    data = _registry(
        tmp_path / "typos.csv",
        "R1,P1,Dorothy,Mitchel,2016-06-05,F,,,,08,2021-03-04,A1",
        "R2,P2,Walter,Novack,2014-06-21,M,,,,10,2021-03-04,B1",
        "R3,P3,Ann,Lee,2010-01-02,F,,,,10,2021-03-04,C1",
    )
    first = load_files([data], _settings(sandbox, tmp_path, "r1"))
    assert first.rows["state"].to_list() == ["needs-review", "needs-review", "created"]
    review = pl.read_csv(tmp_path / "r1" / "review.csv", infer_schema=False)
    decided = review.with_columns(
        pl.when(pl.col("source_key") == "P1").then(pl.lit(f"link {tenant_id}")).otherwise(pl.lit("create"))
        .alias("decision")
    )
    decided.write_csv(tmp_path / "decided.csv")
    second = load_files([data], _settings(sandbox, tmp_path, "r1").model_copy(
        update={"report_dir": tmp_path / "r2", "accept_review": tmp_path / "decided.csv"}))
    by_key = {r["source_key"]: r for r in second.rows.iter_rows(named=True)}
    assert by_key["R1"]["state"] == "created" and by_key["R1"]["patient_id"] == tenant_id
    assert by_key["R2"]["state"] == "created" and by_key["R2"]["patient_id"] != tenant_id
    assert by_key["R3"]["state"] == "skipped"
    assert len(everything(sandbox, "/v1/patients")) == 4  # two in the tenant, Ann Lee, Walter Novack
    assert second.exit_code() == ExitCode.OK


def test_a_skip_decision_leaves_the_patient_and_its_rows_skipped(tmp_path: Path, sandbox: Any) -> None:
    _tenant_patient(sandbox)
    data = _registry(tmp_path / "typo.csv", "R1,P1,Dorothy,Mitchel,2016-06-05,F,,,,08,2021-03-04,A1")
    decided = tmp_path / "decided.csv"
    decided.write_text("kind,source_key,decision\npatient,P1,skip\n", encoding="utf-8")
    report = load_files([data], _settings(sandbox, tmp_path, "r", accept_review=decided))
    assert report.rows["state"].to_list() == ["skipped"]
    assert len(everything(sandbox, "/v1/patients")) == 1 and everything(sandbox, "/v1/immunizations") == []


def test_a_bad_decision_names_its_row_and_column(tmp_path: Path) -> None:
    path = tmp_path / "decided.csv"
    path.write_text("kind,source_key,decision\npatient,P1,create\npatient,P2,merge please\n", encoding="utf-8")
    with pytest.raises(InputError) as caught:
        read_decisions(path)
    assert caught.value.row == 3 and caught.value.column == "decision"
    assert "merge please" in str(caught.value)


def test_a_redacted_review_shows_candidate_ids_and_scores_not_names(tmp_path: Path, sandbox: Any) -> None:
    tenant_id = _tenant_patient(sandbox)
    data = _registry(tmp_path / "typo.csv", "R1,P1,Dorothy,Mitchel,2016-06-05,F,,,,08,2021-03-04,=cmd")
    load_files([data], _settings(sandbox, tmp_path, "r", redact=True))
    text = (tmp_path / "r" / "review.csv").read_text(encoding="utf-8")
    assert tenant_id in text and "Mitchel" not in text and "Dorothy" not in text and "2016" not in text
    assert set(pl.read_csv(tmp_path / "r" / "review.csv").columns) >= {"candidate_ids", "scores", "decision"}


def test_a_dry_run_with_a_base_url_previews_matches_and_sends_nothing(tmp_path: Path, sandbox: Any) -> None:
    tenant_id = _tenant_patient(sandbox)
    data = _registry(tmp_path / "same.csv", "R1,P1,Dorothy,Mitchell,2016-06-05,F,,,,08,2021-03-04,A1",
                     "R2,P2,Dorothy,Mitchel,2016-06-05,F,,,,20,2021-03-04,A1")
    report = load_files([data], _settings(sandbox, tmp_path, "r", dry_run=True))
    assert report.rows["state"].to_list() == ["planned", "needs-review"]
    assert report.summary["matching"]["matched"] == 1 and report.summary["matching_requests"] > 0
    lines = [json.loads(line) for line in (tmp_path / "r" / "payloads.ndjson").read_text().splitlines()]
    assert [line["kind"] for line in lines] == ["immunization"]  # no patient create: it is linked
    assert len(everything(sandbox, "/v1/patients")) == 1 and everything(sandbox, "/v1/immunizations") == []
    assert tenant_id


def test_practitioners_are_matched_by_npi(tmp_path: Path, sandbox: Any) -> None:
    held = post(sandbox, "/v1/practitioners", {"firstName": "Amara", "lastName": "Okonkwo", "npi": "2362604516"})
    providers = tmp_path / "providers.csv"
    providers.write_text("Provider ID,NPI,First Name,Last Name\nPRV-101,2362604516,Amara,Okonkwo\n"
                         "PRV-102,1234567893,Ben,Cole\n", encoding="utf-8")
    report = load_files([providers], _settings(sandbox, tmp_path, "r"))
    assert report.rows.select("state", "resource_id").row(0) == ("matched", held)
    assert report.rows["state"][1] == "created"
    assert len(everything(sandbox, "/v1/practitioners")) == 2


def test_the_states_are_final_states_and_counted_in_the_report(tmp_path: Path, sandbox: Any) -> None:
    _tenant_patient(sandbox)
    data = _registry(tmp_path / "typo.csv", "R1,P1,Dorothy,Mitchel,2016-06-05,F,,,,08,2021-03-04,A1")
    result = CliRunner().invoke(main, ["load", str(data), "--base-url", sandbox.base_url, "--state",
                                       str(tmp_path / "s.sqlite"), "--report-dir", str(tmp_path / "r"),
                                       "--consistency-window", "0"],
                                env={"CLINIKAPI_SECRET_KEY": sandbox.api_key})
    assert result.exit_code == ExitCode.REJECTED, result.output
    assert "needs-review" in result.output and "review.csv" in result.output
    summary = json.loads((tmp_path / "r" / "summary.json").read_text())
    assert {"matched", "needs-review", "exists"} <= set(summary["states"]) == set(FINAL_STATES)
    assert summary["states"]["needs-review"] == 1
    assert 'id="count-needs-review">1<' in (tmp_path / "r" / "report.html").read_text()
    assert read_rows(tmp_path / "r" / "rows.csv")["state"].to_list() == ["needs-review"]


# --- the matching itself, on frames -----------------------------------------------------------------


_BASE: dict[str, Any] = {"firstName": None, "lastName": None, "birthDate": None, "gender": None, "phone": None,
                         "email": None, "address": {"postalCode": None}}


def _people(*rows: dict[str, Any]) -> pl.DataFrame:
    schema = {k: pl.String for k in ("id", "source_key", *_BASE)} | {"address": pl.Struct({"postalCode": pl.String})}
    return people(pl.from_dicts([_BASE | r for r in rows], schema=schema))


def test_match_patients_decides_each_rule() -> None:
    tenant = _people(
        {"id": "a", "firstName": "José", "lastName": "O'Brien", "birthDate": "1980-03-04", "gender": "male"},
        {"id": "b", "firstName": "Ann", "lastName": "Lee", "birthDate": "1990-01-02", "gender": "female",
         "email": "ann@x.example"},
        {"id": "c", "firstName": "Bo", "lastName": "Ray", "birthDate": "2001-01-01"},
        {"id": "d", "firstName": "Bo", "lastName": "Ray", "birthDate": "2001-01-01"},
    )
    incoming = _people(
        {"source_key": "exact", "firstName": "jose", "lastName": "OBRIEN", "birthDate": "1980-03-04",
         "gender": "male"},
        {"source_key": "sex-differs", "firstName": "Jose", "lastName": "O'Brien", "birthDate": "1980-03-04",
         "gender": "female"},
        {"source_key": "swapped", "firstName": "Ann", "lastName": "Lee", "birthDate": "1990-02-01",
         "email": "ANN@x.example"},
        {"source_key": "swapped-alone", "firstName": "Ann", "lastName": "Lee", "birthDate": "1990-02-01"},
        {"source_key": "twice", "firstName": "Bo", "lastName": "Ray", "birthDate": "2001-01-01"},
        {"source_key": "new", "firstName": "Jan", "lastName": "Ek", "birthDate": "1980-03-04"},
    )
    outcome = {r["source_key"]: r for r in match_patients(incoming, tenant, "probable").iter_rows(named=True)}
    assert {k: (r["outcome"], r["resource_id"]) for k, r in outcome.items()} == {
        "exact": ("matched", "a"), "sex-differs": ("review", None), "swapped": ("review", None),
        "swapped-alone": ("create", None), "twice": ("review", None), "new": ("create", None),
    }
    assert outcome["twice"]["candidate_ids"] == "c;d" and outcome["twice"]["rules"] == "exact;exact"
    exact_only = match_patients(incoming, tenant, "exact")
    assert dict(exact_only.select("source_key", "outcome").iter_rows())["swapped"] == "create"


def test_the_match_bench_runs_on_a_small_tenant(capsys: pytest.CaptureFixture[str]) -> None:
    from bench.match import main as bench_match

    assert bench_match(["--rows", "300", "--existing", "200"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert sum(printed["outcomes"].values()) == 300
    assert printed["outcomes"].get("matched", 0) > 0 and printed["outcomes"].get("review", 0) > 0


def test_review_csv_is_formula_safe_and_read_back_as_written(tmp_path: Path, sandbox: Any) -> None:
    tenant_id = _tenant_patient(sandbox, firstName="@Dorothy")
    data = _registry(tmp_path / "typo.csv", "R1,P1,@Dorothy,Mitchel,2016-06-05,F,,,,08,2021-03-04,A1")
    report = load_files([data], _settings(sandbox, tmp_path, "r"))
    assert report.rows["state"].to_list() == ["needs-review"]
    review = pl.read_csv(tmp_path / "r" / "review.csv", infer_schema=False)
    assert review["first_name"].to_list() == ["'@Dorothy"]  # a spreadsheet shows it, never runs it
    assert review["candidate_names"].to_list() == ["'@Dorothy Mitchell"]
    decided = review.with_columns(pl.lit(f"link {tenant_id}").alias("decision"))
    decided.write_csv(tmp_path / "decided.csv")
    assert read_decisions(tmp_path / "decided.csv").rows() == [("patient", "P1", "link", tenant_id)]


def test_a_target_that_refuses_the_reads_is_not_matched_and_the_summary_says_why(
    tmp_path: Path, sandbox: Any
) -> None:
    from etl.sandbox.app import new_test_key

    data = _registry(tmp_path / "one.csv", "R1,P1,Dorothy,Mitchell,2016-06-05,F,,,,08,2021-03-04,A1")
    settings = _settings(sandbox, tmp_path, "r").model_copy(update={"api_key": SecretStr(new_test_key())})
    report = load_files([data], settings)
    assert report.exit_code() == ExitCode.API  # the sends meet the same refusal, as before matching
    assert "nothing was matched" in report.summary["matching"]["error"]
    assert sandbox.api_key not in json.dumps(report.summary) and everything(sandbox, "/v1/patients") == []
