"""Every sample group's report is its golden one (tests/golden/), whatever the batch size."""

from __future__ import annotations

import io
import tempfile
from pathlib import Path

import polars as pl
import pytest
from hypothesis import HealthCheck, Phase, example, given, settings
from hypothesis import strategies as st

from etl.pipeline import load_files
from etl.settings import Settings

from .golden import CASES, GROUPS, MODES, expected, normalised, run


def _diff(got: dict[str, str], want: dict[str, str]) -> list[str]:
    """The files that differ (names), with the first differing line of each."""
    out = []
    for name in sorted(set(got) | set(want)):
        a, b = got.get(name, "").splitlines(), want.get(name, "").splitlines()
        if a != b:
            first = next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))
            out.append(f"{name} line {first + 1}: {a[first] if first < len(a) else '<end>'!r} "
                       f"!= {b[first] if first < len(b) else '<end>'!r}")
    return out


@pytest.mark.parametrize(("mode", "group"), CASES, ids=[f"{m}-{g}" for m, g in CASES])
def test_a_report_is_its_golden_one(tmp_path: Path, mode: str, group: str) -> None:
    run(mode, group, tmp_path)
    want = expected(mode, group)
    assert "rows.csv" in want and "summary.json" in want
    assert not _diff(normalised(tmp_path), want)


# A run of the clinic files in batches of one row takes ~40 s here: few examples, and no shrinking
# (each example would be re-run dozens of times); a failure prints its mode, group and batch size.
@settings(max_examples=5, deadline=None, suppress_health_check=[HealthCheck.too_slow],
          phases=[Phase.explicit, Phase.reuse, Phase.generate])
@given(
    mode=st.sampled_from(["validate", "dry-run", "redox-dry-run"]),
    group=st.sampled_from(MODES["validate"]),
    # Batches of 1 and 2 rows run as explicit examples on the small CVRS file: on the 560-row registry they
    # took minutes on a loaded 2-core machine (a batch's fixed cost, times 560).
    batch_rows=st.one_of(st.sampled_from([5, 37, 1_000_000]), st.integers(5, 60)),
)
# A row failing two rules on one cell listed them in an order that depended on the batch's size.
@example(mode="validate", group="cvrs", batch_rows=1)
@example(mode="dry-run", group="cvrs", batch_rows=2)
def test_the_batch_size_never_changes_a_report(mode: str, group: str, batch_rows: int) -> None:
    if group not in MODES[mode]:
        group = MODES[mode][0]
    if group != "cvrs":
        # At most about fifty batches on the 560-row registry and the 900 clinic rows: a batch's fixed cost made
        # batches of 5 rows there take ~40 s. Batches of fewer rows run on the CVRS files (35 rows in all).
        batch_rows = max(batch_rows, 19)
    with tempfile.TemporaryDirectory() as tmp:
        run(mode, group, Path(tmp), batch_rows=batch_rows)
        assert not _diff(normalised(Path(tmp)), expected(mode, group))


# Batches of 37 rows on the whole clinic group (references between files, patients created in one batch and
# referenced in later ones) and the registry: the reports are the golden ones.
@pytest.mark.parametrize("mode", ["load", "redox-load"])
def test_the_batch_size_never_changes_a_load(tmp_path: Path, mode: str) -> None:
    group = "clinic" if mode == "load" else "registry"
    run(mode, group, tmp_path, batch_rows=37)
    assert not _diff(normalised(tmp_path), expected(mode, group))


# Batches of one row: each batch has a fixed cost (~0.15-0.4 s on a loaded 2-core machine), so one-row batches
# over the 900 clinic rows or the 560 registry rows took 2-4 minutes. The same hazard on smaller files: the CVRS
# group against its golden report, ...
@pytest.mark.parametrize("mode", ["load", "redox-load"])
def test_batches_of_one_row_load_what_the_golden_report_holds(tmp_path: Path, mode: str) -> None:
    run(mode, "cvrs", tmp_path, batch_rows=1)
    assert not _diff(normalised(tmp_path), expected(mode, "cvrs"))


def _clinic_subset(folder: Path, rows: int) -> list[Path]:
    """The first ``rows`` data lines of each clinic file (the providers all: the visits refer to them)."""
    folder.mkdir()
    paths = []
    for path in GROUPS["clinic"][0]:
        lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
        keep = lines if path.name == "providers.csv" else lines[: rows + 1]
        (folder / path.name).write_text("".join(keep), encoding="utf-8")
        paths.append(folder / path.name)
    return paths


# ... and the clinic files cut to their first rows (references across files and batches, rows left without
# their parent), loaded in batches of one row and in one batch: the same report.
def test_batches_of_one_row_load_the_clinic_files_as_one_batch_does(tmp_path: Path) -> None:
    paths = _clinic_subset(tmp_path / "subset", 25)
    reports = {}
    for batch_rows in (1, 1_000_000):
        folder = tmp_path / f"batches-of-{batch_rows}"
        load_files(paths, Settings(report_dir=folder / "report", state=folder / "state.sqlite", batch_rows=batch_rows))
        reports[batch_rows] = normalised(folder)
    rows = pl.read_csv(io.StringIO(reports[1]["rows.csv"]), infer_schema=False)
    created = rows.filter(pl.col("state") == "created")
    # Not a vacuous comparison: rows of several kinds created (the children after their parents), others refused.
    assert set(created.get_column("kind")) == {"practitioner", "immunization", "encounter", "document", "task"}
    assert rows.filter(pl.col("state") == "rejected").height > 0
    assert not _diff(reports[1], reports[1_000_000])
