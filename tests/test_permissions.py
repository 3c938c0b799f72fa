"""No one let in: what a load leaves on disk is readable by its owner only,
even under a umask that would let everyone in."""

from __future__ import annotations

import os
import stat
from collections.abc import Callable
from pathlib import Path

import pytest
from click.testing import CliRunner

from etl.cli import main
from etl.errors import OutputError
from etl.files import private_dir
from etl.load.lock import state_lock
from etl.load.state import StateStore
from etl.redox import redox_target
from etl.sandbox.store import Store
from etl.settings import Settings

from .conftest import SAMPLE


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
    assert _mode(state.parent) == 0o700
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


def _open_store(state: Path) -> None:
    StateStore(state, target="https://api.example.test").close()


def _take_lock(state: Path) -> None:
    with state_lock(state):
        pass


def _start_redox_sandbox(state: Path) -> None:
    with redox_target(Settings(), state, "/fhir/R4/sandbox/development/Immunization/$write"):
        pass


@pytest.mark.parametrize("create", [_open_store, _take_lock, _start_redox_sandbox])
def test_the_folders_made_for_a_state_store_are_owner_only(
    tmp_path: Path, open_umask: None, create: Callable[[Path], None]
) -> None:
    shared = tmp_path / "shared"
    shared.mkdir(mode=0o755)
    create(shared / "stores" / "nightly" / "state.sqlite")
    assert _mode(shared / "stores") == 0o700 and _mode(shared / "stores" / "nightly") == 0o700
    assert _mode(shared) == 0o755  # a folder that was there already is not the tool's to change


def test_a_private_dir_is_owner_only_whatever_the_umask(tmp_path: Path) -> None:
    previous = os.umask(0o277)  # would leave even the owner without write and search
    try:
        made = private_dir(tmp_path / "a" / "b")
    finally:
        os.umask(previous)
    assert made == tmp_path / "a" / "b" and _mode(made) == 0o700 and _mode(tmp_path / "a") == 0o700
    assert private_dir(made) == made  # already there: nothing to do
    (tmp_path / "file").write_text("x", encoding="utf-8")
    with pytest.raises(OutputError, match="is a file, not a folder"):
        private_dir(tmp_path / "file")
