"""Identity without a record id: each kind's natural key (etl.dedupe.NATURAL_KEYS)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import polars as pl
import pytest

from etl.dedupe import NATURAL_KEYS, natural_key
from etl.pipeline import load_files, validate_files
from etl.settings import Settings
from schemas.canonical import KIND_SPECS, fields_of

from .test_pipeline import count

HEADER = "Patient ID,First Name,Last Name,DOB,CVX,Admin Date,Lot Number\n"
WEEK1 = ["P1,Ann,Lee,2015-03-04,08,2021-03-04,A1", "P1,Ann,Lee,2015-03-04,20,2021-03-05,B1",
         "P2,Bo,Ray,2014-01-02,21,2021-03-06,C1"]


def _settings(server: Any, tmp: Path, name: str, **extra: Any) -> Settings:
    return Settings(base_url=server.base_url, api_key=server.api_key, consistency_window=0,
                    state=tmp / "s.sqlite", report_dir=tmp / name, **extra)


def _export(path: Path, rows: list[str]) -> Path:
    path.parent.mkdir(exist_ok=True)
    path.write_text(HEADER + "".join(r + "\n" for r in rows), encoding="utf-8")
    return path


def test_every_kind_has_a_natural_key_of_its_own_fields() -> None:
    for kind in KIND_SPECS:
        assert kind in NATURAL_KEYS
        names = {f.name for f in fields_of(kind)}
        assert {f.removesuffix("__date") for f in NATURAL_KEYS[kind]} <= names, kind


def test_a_re_import_with_one_lot_corrected_is_changed_not_a_second_immunization(tmp_path: Path, sandbox: Any) -> None:
    first = load_files([_export(tmp_path / "w1" / "export.csv", WEEK1)], _settings(sandbox, tmp_path, "r1"))
    assert first.states["created"] == 3
    assert first.rows["source_key"].str.starts_with("natural:").all()
    corrected = [*WEEK1[:1], WEEK1[1].replace("B1", "B2"), *WEEK1[2:]]
    week2 = _export(tmp_path / "w2" / "export.csv", corrected)
    second = load_files([week2], _settings(sandbox, tmp_path, "r2"))
    assert second.rows["state"].to_list() == ["skipped", "changed", "skipped"]
    assert count(sandbox, "/v1/immunizations") == 3
    assert second.summary.get("disappeared", 0) == 0
    third = load_files([week2], _settings(sandbox, tmp_path, "r3", update=True))
    assert third.rows["state"].to_list() == ["skipped", "updated", "skipped"]
    rid = third.rows["resource_id"][1]
    body = httpx.get(f"{sandbox.base_url}/v1/immunizations/{rid}", headers={"x-api-key": sandbox.api_key}).json()
    assert body["data"]["lotNumber"] == "B2"
    assert count(sandbox, "/v1/immunizations") == 3 and count(sandbox, "/v1/patients") == 2


def test_a_natural_key_holds_no_name_or_date(tmp_path: Path) -> None:
    report = validate_files([_export(tmp_path / "export.csv", WEEK1)],
                            Settings(report_dir=tmp_path / "r", state=tmp_path / "s.sqlite"))
    text = (tmp_path / "r" / "rows.csv").read_text(encoding="utf-8")
    assert "2021-03-04" not in text and "Lee" not in text
    assert report.rows["source_key"].n_unique() == 3


@pytest.mark.parametrize("kind", sorted(NATURAL_KEYS))
def test_a_natural_key_needs_every_field_it_names(kind: str) -> None:
    fields = list(NATURAL_KEYS[kind])
    assert natural_key(kind, fields) is not None
    assert natural_key(kind, fields[1:]) is None  # a file lacking one: keyed by its whole content instead


def test_names_are_compared_folded_in_a_patient_s_natural_key() -> None:
    frame = pl.DataFrame({"patient_first_name": ["José", "JOSE"], "patient_last_name": ["O'Brien", "obrien"],
                          "patient_birth_date__date": ["1980-01-02", "1980-01-02"]})
    key = natural_key("patient", frame.columns)
    assert key is not None
    assert frame.select(key).to_series().n_unique() == 1
