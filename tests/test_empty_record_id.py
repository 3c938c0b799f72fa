"""In a file with a record-id column, rows are keyed by it (README, "Identity without a record id": only a
file with no record-id column is keyed by natural key). A row whose record-id cell is empty is rejected
as ``required`` on that column: keyed any other way, it would be created a second time once its id is
filled in. Proven through a real load into the sandbox."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import polars as pl

from etl.pipeline import load_files

from .test_pipeline import _settings, count

DOSES = (
    "Record ID,Patient ID,First Name,Last Name,DOB,CVX,Admin Date\n"
    "R1,P1,Ann,Lee,2015-03-04,08,2021-03-04\n"
    ",P1,Ann,Lee,2015-03-04,08,2021-04-04\n"
    '" ",P1,Ann,Lee,2015-03-04,08,2021-04-05\n'
    "R4,P1,Ann,Lee,2015-03-04,08,2021-05-04\n"
)


def test_an_empty_record_id_is_rejected_as_required_and_never_sent(tmp_path: Path, sandbox: Any) -> None:
    path = tmp_path / "doses.csv"
    path.write_text(DOSES, "utf-8")
    report = load_files([path], _settings(tmp_path, sandbox))
    rows = report.rows.sort("source_row")
    assert rows.height == 4  # every row one final state
    by_row = {int(r["source_row"]): r for r in rows.iter_rows(named=True)}
    for number in (3, 4):
        assert by_row[number]["state"] == "rejected"
        assert (by_row[number]["error_code"], by_row[number]["field"]) == ("required", "Record ID")
        assert by_row[number]["message"]
    assert [by_row[n]["state"] for n in (2, 5)] == ["created", "created"]
    assert count(sandbox, "/v1/immunizations") == 2
    assert report.summary["states"]["failed"] == 0


def test_a_patient_file_with_an_empty_patient_id_is_rejected_as_required(tmp_path: Path, sandbox: Any) -> None:
    path = tmp_path / "patients.csv"
    path.write_text("Patient ID,First Name,Last Name,DOB\nP1,Ann,Lee,2015-03-04\n,Bob,Ray,2011-01-02\n", "utf-8")
    report = load_files([path], _settings(tmp_path, sandbox, kind="patient"))
    rows = report.rows.sort("source_row")
    assert rows.select("state", "error_code").rows() == [("created", None), ("rejected", "required")]
    assert rows.filter(pl.col("state") == "rejected")["field"].to_list() == ["Patient ID"]
    assert count(sandbox, "/v1/patients") == 1


def test_a_practitioner_without_its_id_is_still_keyed_by_its_npi(tmp_path: Path, sandbox: Any) -> None:
    path = tmp_path / "providers.csv"
    path.write_text("Provider ID,NPI,First Name,Last Name\nD1,1234567893,Ann,Lee\n,1245319599,Bob,Ray\n", "utf-8")
    report = load_files([path], _settings(tmp_path, sandbox, kind="practitioner"))
    assert report.rows["state"].to_list() == ["created", "created"]
