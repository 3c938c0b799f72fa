"""Doses given twice (etl.dedupe): in the run's files, and against the patient's chart."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import polars as pl
import pytest

from etl.dedupe import VACCINE_GROUPS, DoseCheck, dose_identities
from etl.pipeline import load_files, validate_files
from etl.settings import Settings
from schemas.codes import displays

from .test_pipeline import count

HEADER = "Record ID,Patient ID,First Name,Last Name,DOB,CVX,Admin Date,Lot Number\n"


def _file(path: Path, *rows: str) -> Path:
    path.write_text(HEADER + "".join(r + "\n" for r in rows), encoding="utf-8")
    return path


def _settings(server: Any, tmp: Path, name: str, **extra: Any) -> Settings:
    return Settings(base_url=server.base_url, api_key=server.api_key, consistency_window=0,
                    state=tmp / "s.sqlite", report_dir=tmp / name, **extra)


def test_the_same_dose_twice_in_one_export_is_created_once(tmp_path: Path, sandbox: Any) -> None:
    # 08 and 43 are both hepatitis B vaccines: one vaccine group, the same day, the same patient.
    data = _file(tmp_path / "twice.csv", "R1,P1,Ann,Lee,2015-03-04,08,2021-03-04,A1",
                 "R2,P1,Ann,Lee,2015-03-04,43,2021-03-04,A2", "R3,P1,Ann,Lee,2015-03-04,43,2021-03-05,A3",
                 "R4,P1,Ann,Lee,2015-03-04,20,2021-03-04,A4")
    report = load_files([data], _settings(sandbox, tmp_path, "r"))
    by_key = {r["source_key"]: r for r in report.rows.iter_rows(named=True)}
    assert {k: r["state"] for k, r in by_key.items()} == {"R1": "created", "R2": "exists", "R3": "created",
                                                          "R4": "created"}
    assert f"{data} row 2" in by_key["R2"]["message"]
    assert by_key["R2"]["resource_id"] == by_key["R1"]["resource_id"] is not None  # the first row's dose
    assert count(sandbox, "/v1/immunizations") == 3
    assert report.exit_code() == 0


def test_the_same_dose_in_two_files_of_a_run_is_caught_and_validate_says_so_too(tmp_path: Path) -> None:
    a = _file(tmp_path / "a.csv", "R1,P1,Ann,Lee,2015-03-04,08,2021-03-04,A1")
    b = _file(tmp_path / "b.csv", "R9,P1,Ann,Lee,2015-03-04,08,2021-03-04,A1")
    report = validate_files([a, b], Settings(report_dir=tmp_path / "r", state=tmp_path / "s.sqlite"))
    assert report.rows["state"].to_list() == ["planned", "exists"]
    assert f"{a} row 2" in report.rows["message"][1]


def test_a_dose_an_earlier_run_put_in_the_chart_exists_under_another_record_id(tmp_path: Path, sandbox: Any) -> None:
    first = load_files([_file(tmp_path / "w1.csv", "R1,P1,Ann,Lee,2015-03-04,08,2021-03-04,A1")],
                       _settings(sandbox, tmp_path, "r1"))
    again = _file(tmp_path / "w2.csv", "X7,P1,Ann,Lee,2015-03-04,45,2021-03-04,A1",
                  "X8,P1,Ann,Lee,2015-03-04,21,2021-03-04,B1")
    report = load_files([again], _settings(sandbox, tmp_path, "r2"))
    states = report.rows.select("source_key", "state", "resource_id").rows()
    assert states[0] == ("X7", "exists", first.rows["resource_id"][0])  # the chart's: exists, with its id
    assert states[1][:2] == ("X8", "created")
    assert count(sandbox, "/v1/immunizations") == 2
    # The state store's own rows stay skipped, and are never matched against the chart.
    third = load_files([tmp_path / "w1.csv", again], _settings(sandbox, tmp_path, "r3"))
    assert third.rows["state"].to_list() == ["skipped", "exists", "skipped"]


def test_no_dedupe_doses_creates_each_row(tmp_path: Path, sandbox: Any) -> None:
    data = _file(tmp_path / "twice.csv", "R1,P1,Ann,Lee,2015-03-04,08,2021-03-04,A1",
                 "R2,P1,Ann,Lee,2015-03-04,43,2021-03-04,A2")
    report = load_files([data], _settings(sandbox, tmp_path, "r", dedupe_doses=False))
    assert report.rows["state"].to_list() == ["created", "created"]
    assert count(sandbox, "/v1/immunizations") == 2


def test_a_destination_without_search_checks_the_files_only_and_says_so(tmp_path: Path) -> None:
    data = _file(tmp_path / "twice.csv", "R1,P1,Ann,Lee,2015-03-04,08,2021-03-04,A1",
                 "R2,P1,Ann,Lee,2015-03-04,08,2021-03-04,A1")
    notes: list[str] = []
    report = load_files([data], Settings(target="redox", report_dir=tmp_path / "r", state=tmp_path / "s.sqlite"),
                        progress=lambda message, n: notes.append(message))
    assert report.rows["state"].to_list() == ["created", "exists"]
    assert any("no search" in n and "within the run's files only" in n for n in notes)
    assert report.summary["matching"]["dedupe_doses"] == "within the run's files only (no search)"


def test_every_group_s_codes_are_cvx_codes() -> None:
    known = set(displays("cvx"))
    listed = set(VACCINE_GROUPS)
    assert listed & known, "the table and the CVX code set share codes"
    sample = pl.read_csv(Path(__file__).parents[1] / "sample_data" / "registry.csv", infer_schema=False)
    assert set(sample["CVX"].drop_nulls()) <= listed  # every vaccine of the sample has its group


@pytest.mark.parametrize(("a", "b", "same"), [("08", "43", True), ("110", "10", True), ("110", "03", False),
                                              ("999", "999", True), ("999", "998", False)])
def test_doses_share_an_identity_by_vaccine_group(a: str, b: str, same: bool) -> None:
    frame = pl.DataFrame({"p": ["P1", "P1"], "cvx": [a, b], "day": ["2021-03-04", "2021-03-04"], "n": [1, 2]})
    ids = dose_identities(frame, "p", "cvx", "day")
    shared = ids.group_by("identity").agg(pl.col("n").n_unique()).filter(pl.col("n") > 1)
    assert (shared.height > 0) is same


def test_a_dose_check_remembers_the_first_row_across_batches() -> None:
    check = DoseCheck()
    valid = pl.DataFrame({"__row": [2, 3], "patient_id": ["P1", "P1"], "vaccine_code": ["08", "08"],
                          "occurrence__date": ["2021-03-04", "2021-03-04"]},
                         schema_overrides={"__row": pl.UInt32})
    rows = pl.DataFrame({"source_row": [2, 3], "state": ["planned", "planned"], "message": [None, None]},
                        schema_overrides={"source_row": pl.UInt32, "message": pl.String})
    first = check.mark(rows.head(1), valid.head(1), "a.csv")
    second = check.mark(rows.tail(1), valid.tail(1), "a.csv")
    assert first["state"].to_list() == ["planned"] and second["state"].to_list() == ["exists"]
    assert "a.csv row 2" in second["message"][0]
