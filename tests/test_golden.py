"""Every sample group's report is its golden one (tests/golden/), whatever the batch size."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, Phase, example, given, settings
from hypothesis import strategies as st

from .golden import CASES, MODES, expected, normalised, run


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
    with tempfile.TemporaryDirectory() as tmp:
        run(mode, group, Path(tmp), batch_rows=batch_rows)
        assert not _diff(normalised(Path(tmp)), expected(mode, group))


@pytest.mark.parametrize("batch_rows", [1, 37])
@pytest.mark.parametrize("mode", ["load", "redox-load"])
def test_the_batch_size_never_changes_a_load(tmp_path: Path, mode: str, batch_rows: int) -> None:
    group = "clinic" if mode == "load" else "registry"
    run(mode, group, tmp_path, batch_rows=batch_rows)
    assert not _diff(normalised(tmp_path), expected(mode, group))
