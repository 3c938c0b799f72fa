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
