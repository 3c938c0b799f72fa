"""A ``rejects.csv`` the tool wrote, validated again while its rows are still rejected, gives a
``rejects.csv`` of the same shape (no traceback): its own ``source_file``, ``source_row`` and ``reasons``
give way to the new ones, and the original columns in between come through unchanged."""

from __future__ import annotations

from pathlib import Path

import polars as pl
from click.testing import CliRunner

from etl.cli import main

from .conftest import SAMPLE

BOOKKEEPING = ["source_file", "source_row", "reasons"]


def _validate(path: Path, folder: Path) -> tuple[int, pl.DataFrame, pl.DataFrame]:
    result = CliRunner().invoke(main, ["validate", "-q", str(path), "--report-dir", str(folder)])
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    assert "Traceback" not in result.output
    rejects = pl.read_csv(folder / "rejects.csv", infer_schema=False)
    rows = pl.read_csv(folder / "rows.csv", infer_schema=False)
    return result.exit_code, rejects, rows


def test_the_rejects_of_the_registry_validated_again_give_rejects_of_the_same_shape(tmp_path: Path) -> None:
    _, first, _ = _validate(SAMPLE / "registry.csv", tmp_path / "first")
    assert first.height > 0
    again = tmp_path / "first" / "rejects.csv"
    code, second, rows = _validate(again, tmp_path / "second")
    assert code == 1
    assert rows.height == first.height  # every row of the rejects file has its one final state
    assert second.columns == first.columns  # same shape: no column twice, none renamed
    assert set(second["source_file"]) == {str(again)}
    # Each row still rejected points at its line in the file validated (header on line 1)...
    rejected = rows.filter(pl.col("state") == "rejected")
    assert second["source_row"].to_list() == rejected["source_row"].to_list()
    # ...and carries the original columns exactly as they were in the first rejects.csv.
    data = [c for c in first.columns if c not in BOOKKEEPING]
    lines = [int(r) - 2 for r in second["source_row"]]
    assert second.select(data).equals(first.select(data)[lines])
    assert second["reasons"].to_list() == rejected["message"].to_list()
    # And again: a fixed point, so the file can be fixed and re-imported as often as needed.
    _, third, _ = _validate(tmp_path / "second" / "rejects.csv", tmp_path / "third")
    assert third.select(data).equals(second.select(data))


def test_another_files_column_named_like_the_bookkeeping_is_kept(tmp_path: Path) -> None:
    path = tmp_path / "doses.csv"
    path.write_text("Record ID,Patient ID,CVX,Admin Date,reasons\nR1,P1,XXX,2024-01-01,asked by parent\n", "utf-8")
    code, rejects, _ = _validate(path, tmp_path / "report")
    assert code == 1
    assert rejects.columns == [
        "source_file",
        "source_row",
        "Record ID",
        "Patient ID",
        "CVX",
        "Admin Date",
        "reasons (source)",
        "reasons",
    ]
    assert rejects.row(0, named=True)["reasons (source)"] == "asked by parent"
    assert "unknown-cvx" in rejects.row(0, named=True)["reasons"]


def test_a_fixed_rejects_csv_sends_none_of_its_bookkeeping(tmp_path: Path) -> None:
    # A newcomer fixed a rejects.csv and loaded it: its "reasons" column was matched to reason_codes by name, and
    # each dose was created with the tool's own error text as its reasonCode.
    import json

    fixed = tmp_path / "rejects.csv"
    fixed.write_text(
        "source_file,source_row,Record ID,Patient ID,First Name,Last Name,DOB,CVX,Admin Date,reasons\n"
        "/data/week1.csv,7,R7,P7,Ann,Lee,2015-03-04,08,2024-01-05,CVX required (): a value is required\n",
        encoding="utf-8",
    )
    report = tmp_path / "dry"
    result = CliRunner().invoke(main, ["load", "--dry-run", "-q", str(fixed), "--report-dir", str(report),
                                       "--state", str(tmp_path / "s.sqlite")])
    assert result.exit_code == 0, result.output
    bodies = [json.loads(line)["body"] for line in (report / "payloads.ndjson").read_text("utf-8").splitlines()]
    dose = next(b for b in bodies if "vaccineCode" in b)
    assert "a value is required" not in json.dumps(dose) and "reasonCode" not in dose
    summary = json.loads((report / "summary.json").read_text("utf-8"))
    mapped = set(summary["inputs"][0]["columns_mapped"].values())
    assert mapped.isdisjoint(BOOKKEEPING)
    # Neither mapped nor "not carried": the new report's own source_file, source_row and reasons replace them.
    assert all(c["column"] not in BOOKKEEPING for cs in summary["not_carried"].values() for c in cs)
