"""No one let in: what a load leaves on disk is readable by its owner only,
even under a umask that would let everyone in."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner

from etl.cli import main
from etl.sandbox.store import Store

from .conftest import SAMPLE


@pytest.fixture()
def open_umask() -> Iterator[None]:
    """umask 000 for the test: any file not created owner-only on purpose would be 0666."""
    previous = os.umask(0)
    try:
        yield
    finally:
        os.umask(previous)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.mark.slow
def test_report_and_state_are_owner_only_after_a_load(tmp_path: Path, open_umask: None) -> None:
    state = tmp_path / "state" / "state.sqlite"
    report = tmp_path / "report"
    result = CliRunner().invoke(
        main, ["load", str(SAMPLE / "registry.csv"), "--state", str(state), "--report-dir", str(report)]
    )
    assert result.exit_code == 1, result.output  # the planted rows are rejected; the rest went in
    assert _mode(report) == 0o700
    written = sorted(p.name for p in report.iterdir())
    assert {"summary.json", "rows.csv", "rejects.csv"} <= set(written)
    for path in report.iterdir():
        assert _mode(path) == 0o600, (path.name, oct(_mode(path)))
    # The state store, and the embedded sandbox's database beside it, hold PHI-adjacent data.
    stores = [p for p in state.parent.iterdir() if p.name.endswith((".sqlite", "-wal", "-shm"))]
    assert state in stores and len(stores) >= 2
    for path in stores:
        assert _mode(path) == 0o600, (path.name, oct(_mode(path)))


def test_a_sandbox_database_is_created_owner_only(tmp_path: Path, open_umask: None) -> None:
    path = tmp_path / "sandbox.sqlite"
    store = Store(str(path))
    try:
        store.insert("/v1/patients", {"id": "pat_1", "firstName": "A", "lastName": "B"})
        assert _mode(path) == 0o600
        assert all(_mode(p) == 0o600 for p in tmp_path.iterdir())  # the WAL files follow the database
    finally:
        store.close()
