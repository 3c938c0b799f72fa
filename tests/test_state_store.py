"""State stores keep working across versions: an older layout is migrated in place, a newer or an
unknown one is refused, and what is not a state store of ours is never adopted."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import sqlite3
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner

from etl.cli import main
from etl.errors import ExitCode, StateError
from etl.load.state import LAYOUT_VERSION, StateStore

FIXTURE = Path(__file__).parent / "fixtures" / "state_layout1"


def _copy_fixture(folder: Path) -> tuple[Path, Path]:
    """The layout-1 store and its input, copied into ``folder``, bound to the embedded sandbox beside the copy."""
    folder.mkdir()
    data = folder / "registry.csv"
    state = folder / "state.sqlite"
    shutil.copyfile(FIXTURE / "registry.csv", data)
    shutil.copyfile(FIXTURE / "state.sqlite", state)
    os.chmod(state, 0o600)
    # The one value that depends on where the store lies: the embedded sandbox's database beside it.
    with contextlib.closing(sqlite3.connect(state)) as db, db:
        db.execute(
            "UPDATE meta SET value = ? WHERE key = 'target'",
            (f"embedded-sandbox:{(folder / 'state.sandbox.sqlite').resolve()}",),
        )
    return data, state


def _user_version(path: Path) -> int:
    with contextlib.closing(sqlite3.connect(path)) as db:
        return int(db.execute("PRAGMA user_version").fetchone()[0])


def test_the_fixture_is_a_store_of_the_first_layout() -> None:
    # Guards the test below: it must start from a store that was never stamped.
    assert _user_version(FIXTURE / "state.sqlite") == 0
    with contextlib.closing(sqlite3.connect(FIXTURE / "state.sqlite")) as db:
        assert dict(db.execute("SELECT key, value FROM meta"))["version"] == "1"
        assert db.execute("SELECT count(*) FROM records WHERE state = 'created'").fetchone()[0] == 9


def test_a_store_written_before_layouts_were_stamped_is_migrated_and_everything_is_skipped(tmp_path: Path) -> None:
    data, state = _copy_fixture(tmp_path / "job")
    report = tmp_path / "report"
    result = CliRunner().invoke(
        main, ["load", str(data), "--state", str(state), "--report-dir", str(report), "--json"]
    )
    assert result.exit_code == ExitCode.OK, result.output
    summary = json.loads((report / "summary.json").read_text(encoding="utf-8"))
    assert summary["rows_total"] == 5
    assert {k: v for k, v in summary["states"].items() if v} == {"skipped": 5}
    assert summary["creates_sent"] == 0
    assert _user_version(state) == LAYOUT_VERSION
    with contextlib.closing(sqlite3.connect(state)) as db:
        assert dict(db.execute("SELECT key, value FROM meta"))["version"] == str(LAYOUT_VERSION)
        assert db.execute("SELECT count(*) FROM runs").fetchone()[0] == 2  # the fixture's run and this one
        assert db.execute("SELECT count(*) FROM aliases").fetchone()[0] == 0  # layout 2's table, added empty


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_a_new_store_is_stamped_with_the_layout(tmp_path: Path) -> None:
    path = tmp_path / "new.sqlite"
    StateStore(path, target="t").close()
    assert _user_version(path) == LAYOUT_VERSION
    with StateStore(path, target="t") as again:  # and read back as it is
        assert again.target == "t"


def test_a_store_from_before_the_later_columns_is_migrated_in_place(tmp_path: Path) -> None:
    path = tmp_path / "old.sqlite"
    # The first release's tables: no body or source_file per record, no job per run.
    with contextlib.closing(sqlite3.connect(path)) as db, db:
        db.executescript(
            "CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);"
            "INSERT INTO meta VALUES ('target', 't'), ('version', '1');"
            "CREATE TABLE records (kind TEXT NOT NULL, source_key TEXT NOT NULL, state TEXT NOT NULL,"
            " resource_id TEXT, body_hash TEXT, http_status INTEGER, error_code TEXT, message TEXT,"
            " attempts INTEGER NOT NULL DEFAULT 0, run_id TEXT, sent_at REAL, updated_at REAL NOT NULL,"
            " PRIMARY KEY (kind, source_key));"
            "INSERT INTO records VALUES ('patient', 'P-1', 'created', 'pat_1', 'h', 201, NULL, NULL, 1, 'r', 1, 1);"
        )
    os.chmod(path, 0o600)
    with StateStore(path, target="t") as store:
        assert store.get("patient", ["P-1"])["P-1"].resource_id == "pat_1"
        store.start_run("r2", "run", job="weekly")  # the runs table, and its job column, are there now
        store.mark_pending("immunization", [("VX-1", "h", "{}")], "r2", source_file="a.csv")
        assert store.bodies("immunization", ["VX-1"]) == {"VX-1": "{}"}
        assert [r["job"] for r in store.runs()] == ["weekly"]
    assert _user_version(path) == LAYOUT_VERSION


def test_a_stamped_layout_1_store_gains_the_aliases_table_and_keeps_its_records(tmp_path: Path) -> None:
    assert LAYOUT_VERSION == 2  # what this test migrates to: revisit it when the layout moves on
    path = tmp_path / "layout1.sqlite"
    with StateStore(path, target="t") as store:
        store.mark_pending("practitioner", [("npi:2362604516", "h")], "r1")
    # As layout 1 wrote it: stamped 1, no aliases table.
    with contextlib.closing(sqlite3.connect(path)) as db, db:
        db.execute("DROP TABLE aliases")
        db.execute("UPDATE meta SET value = '1' WHERE key = 'version'")
        db.execute("PRAGMA user_version = 1")
    with StateStore.existing(path) as store:
        assert list(store.get("practitioner", ["npi:2362604516"])) == ["npi:2362604516"]
        assert store.aliases("practitioner", ["PRV-1"]) == {}
        store.add_aliases([("practitioner", "PRV-1", "npi:2362604516")])
        store.add_aliases([("practitioner", "PRV-1", "npi:1245319599")])  # the latest run's word wins
        assert store.aliases("practitioner", ["PRV-1", "PRV-9"]) == {"PRV-1": "npi:1245319599"}
        assert store.aliases("patient", ["PRV-1"]) == {}
    assert _user_version(path) == LAYOUT_VERSION
    with contextlib.closing(sqlite3.connect(path)) as db:
        assert dict(db.execute("SELECT key, value FROM meta"))["version"] == str(LAYOUT_VERSION)


def test_a_store_of_a_newer_layout_is_refused_and_left_as_it_is(tmp_path: Path) -> None:
    path = tmp_path / "newer.sqlite"
    StateStore(path, target="t").close()
    with contextlib.closing(sqlite3.connect(path)) as db:
        db.execute(f"PRAGMA user_version = {LAYOUT_VERSION + 1}")
    before = _sha(path)
    newer = rf"^{re.escape(str(path))}: written by a newer clinik-etl \(state-store layout {LAYOUT_VERSION + 1};"
    with pytest.raises(StateError, match=newer):
        StateStore(path, target="t")
    result = CliRunner().invoke(main, ["history", "--state", str(path)])
    assert result.exit_code == ExitCode.USAGE
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1
    assert "newer clinik-etl" in result.stderr
    assert _sha(path) == before and _user_version(path) == LAYOUT_VERSION + 1


def test_an_unstamped_store_of_an_unknown_layout_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "odd.sqlite"
    StateStore(path, target="t").close()
    with contextlib.closing(sqlite3.connect(path)) as db, db:
        db.execute("PRAGMA user_version = 0")
        db.execute("UPDATE meta SET value = '7' WHERE key = 'version'")
    with pytest.raises(StateError, match="unknown layout"):
        StateStore(path, target="t")


@pytest.mark.parametrize("opener", [lambda p: StateStore(p, target="t"), StateStore.existing])
def test_a_sqlite_file_that_is_not_a_state_store_is_refused_untouched(
    tmp_path: Path, opener: Callable[[Path], StateStore]
) -> None:
    path = tmp_path / "clinic.sqlite"
    with contextlib.closing(sqlite3.connect(path)) as db, db:
        db.execute("CREATE TABLE patients (name TEXT, birth_date TEXT)")
        db.execute("INSERT INTO patients VALUES ('Ada Lovelace', '1815-12-10')")
    os.chmod(path, 0o600)
    before = _sha(path)
    not_ours = rf"^{re.escape(str(path))}: a SQLite file that is not a clinik-etl state store"
    with pytest.raises(StateError, match=not_ours):
        opener(path)
    assert _sha(path) == before
    with contextlib.closing(sqlite3.connect(path)) as db:
        assert [r[0] for r in db.execute("SELECT name FROM sqlite_master")] == ["patients"]


def test_a_file_that_is_not_sqlite_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "notes.sqlite"
    path.write_text("not a database, but long enough to have a header of sorts\n" * 20, encoding="utf-8")
    os.chmod(path, 0o600)
    with pytest.raises(StateError, match=rf"^{re.escape(str(path))}: not a usable state store"):
        StateStore(path, target="t")


def test_a_state_store_held_in_a_transaction_by_another_process_is_refused_when_opened(tmp_path: Path) -> None:
    path = tmp_path / "held.sqlite"
    StateStore(path, target="t").close()
    with _held(path), pytest.raises(StateError, match=rf"^{re.escape(str(path))}: it is locked by another process"):
        StateStore(path, target="t")
    StateStore(path, target="t").close()  # usable again once let go


@contextlib.contextmanager
def _held(path: Path) -> Iterator[None]:
    """Another process holding ``path`` in an EXCLUSIVE transaction until the block ends."""
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLD, str(path)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "holding\n"
        yield
    finally:
        assert holder.stdin is not None and holder.stdout is not None
        holder.stdin.close()
        holder.wait(timeout=30)
        holder.stdout.close()


_HOLD = """
import sqlite3, sys
db = sqlite3.connect(sys.argv[1], isolation_level=None)
db.execute("BEGIN EXCLUSIVE")
print("holding", flush=True)
sys.stdin.read()
"""


def test_a_store_that_holds_the_bulk_ledger_is_still_a_store(tmp_path: Path) -> None:
    path = tmp_path / "s.sqlite"
    StateStore(path, target="t").close()
    with contextlib.closing(sqlite3.connect(path)) as db:
        db.execute("CREATE TABLE bulk_batches (batch_id TEXT PRIMARY KEY)")  # the bulk loader's ledger
    StateStore(path, target="t").close()
    with contextlib.closing(sqlite3.connect(path)) as db:
        db.execute("CREATE TABLE extra (x)")
    its = r"not a clinik-etl state store \(its tables: aliases, bulk_batches, extra, meta"
    with pytest.raises(StateError, match=its):
        StateStore(path, target="t")
