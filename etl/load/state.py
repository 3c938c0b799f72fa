"""The state store: what was sent, what came back, and the crosswalk.

One SQLite file per target. A row's intent (``pending``) is committed before
its request is sent and its outcome after, so a run killed at any point leaves
every row either untouched, ``pending`` (sent or not: look it up before
re-sending), ``created`` (with the id the API returned), ``failed`` (the API
said no: safe to send again after a fix) or ``unknown`` (sent, no answer).

Rows of kind ``patient`` are the crosswalk: source patient id -> ClinikAPI id.
The API key is never written here.
"""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from etl.errors import StateError
from etl.files import private_dir

__all__ = ["Record", "StateStore", "StoredState"]

StoredState = Literal["pending", "created", "failed", "unknown"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS records (
    kind TEXT NOT NULL,
    source_key TEXT NOT NULL,
    state TEXT NOT NULL CHECK (state IN ('pending', 'created', 'failed', 'unknown')),
    resource_id TEXT,
    body_hash TEXT,
    http_status INTEGER,
    error_code TEXT,
    message TEXT,
    attempts INTEGER NOT NULL DEFAULT 0,
    run_id TEXT,
    sent_at REAL,
    updated_at REAL NOT NULL,
    body TEXT,
    source_file TEXT,
    PRIMARY KEY (kind, source_key)
);
CREATE INDEX IF NOT EXISTS records_by_resource ON records (resource_id);
CREATE TABLE IF NOT EXISTS runs (
    run_id TEXT PRIMARY KEY,
    started_at REAL NOT NULL,
    finished_at REAL,
    command TEXT NOT NULL,
    summary TEXT,
    job TEXT
);
"""
_VERSION = "1"
_CHUNK = 500  # SQLite's bound-parameter limit is far above this


@dataclass(frozen=True)
class Record:
    """One stored row."""

    kind: str
    source_key: str
    state: StoredState
    resource_id: str | None = None
    body_hash: str | None = None
    http_status: int | None = None
    error_code: str | None = None
    message: str | None = None
    attempts: int = 0
    sent_at: float | None = None  # when the intent was recorded, before the throttle let it out
    updated_at: float | None = None  # when the state last changed (an outcome: after its request left)


class StateStore:
    """A SQLite state store bound to one target."""

    def __init__(self, path: str | Path, *, target: str) -> None:
        self.path = Path(path)
        private_dir(self.path.parent)
        if self.path.is_symlink():  # sqlite would follow it wherever it points
            raise StateError(f"{self.path}: is a symbolic link; give the state store itself")
        if not self.path.exists():
            # It holds PHI-adjacent ids and messages: owner-only from the first byte.
            os.close(os.open(self.path, os.O_CREAT | os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600))
        try:
            self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            self._db.execute("PRAGMA journal_mode=WAL")
            # WAL + NORMAL survives a killed process (not a power cut) and keeps commits cheap.
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.execute("PRAGMA busy_timeout=5000")
            self._db.executescript(_SCHEMA)
            # Columns added since the first release: a store written by an older version gains them.
            for table, added in (("records", ("body", "source_file")), ("runs", ("job",))):
                columns = {row[1] for row in self._db.execute(f"PRAGMA table_info({table})")}
                for column in added:
                    if column not in columns:
                        self._db.execute(f"ALTER TABLE {table} ADD COLUMN {column} TEXT")
        except sqlite3.DatabaseError as exc:
            raise StateError(f"{self.path}: not a usable state store ({exc})") from exc
        self._bind(target)

    def _bind(self, target: str) -> None:
        stored = dict(self._db.execute("SELECT key, value FROM meta").fetchall())
        if not stored:
            with self.transaction():
                self._db.executemany(
                    "INSERT INTO meta (key, value) VALUES (?, ?)", [("target", target), ("version", _VERSION)]
                )
        elif stored.get("target") != target:
            raise StateError(
                f"{self.path} records loads into {stored.get('target')!r}, not {target!r}; "
                "use another --state file for another target"
            )

    @classmethod
    def existing(cls, path: str | Path) -> StateStore:
        """Open a store that a load already created, bound to its own target (for ``history``)."""
        path = Path(path)
        if not path.is_file():
            raise StateError(f"{path}: no state store here (a load creates it; see --state)")
        try:
            with contextlib.closing(sqlite3.connect(path)) as db:
                row = db.execute("SELECT value FROM meta WHERE key = 'target'").fetchone()
        except sqlite3.DatabaseError as exc:
            raise StateError(f"{path}: not a usable state store ({exc})") from exc
        if row is None:
            raise StateError(f"{path}: a state store that no load has used yet")
        return cls(path, target=str(row[0]))

    @property
    def target(self) -> str:
        """The target this store is bound to."""
        row = self._db.execute("SELECT value FROM meta WHERE key = 'target'").fetchone()
        return str(row[0])

    def close(self) -> None:
        """Close the database."""
        self._db.close()

    def __enter__(self) -> StateStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    class _Tx:
        def __init__(self, db: sqlite3.Connection) -> None:
            self.db = db

        def __enter__(self) -> None:
            self.db.execute("BEGIN IMMEDIATE")

        def __exit__(self, exc_type: object, *rest: object) -> None:
            self.db.execute("ROLLBACK" if exc_type else "COMMIT")

    def transaction(self) -> StateStore._Tx:
        """A write transaction: ``with store.transaction(): ...``."""
        return StateStore._Tx(self._db)

    # --- reads ---------------------------------------------------------------

    def get(self, kind: str, keys: Sequence[str]) -> dict[str, Record]:
        """Stored records of ``kind`` for these source keys."""
        out: dict[str, Record] = {}
        for chunk in _chunks(keys):
            marks = ",".join("?" * len(chunk))
            cur = self._db.execute(
                "SELECT kind, source_key, state, resource_id, body_hash, http_status, error_code, message,"
                f" attempts, sent_at, updated_at FROM records WHERE kind = ? AND source_key IN ({marks})",
                [kind, *chunk],
            )
            for row in cur:
                out[row[1]] = Record(*row)
        return out

    def in_state(self, kind: str, *states: StoredState) -> list[Record]:
        """Every record of ``kind`` in one of ``states``."""
        marks = ",".join("?" * len(states))
        cur = self._db.execute(
            "SELECT kind, source_key, state, resource_id, body_hash, http_status, error_code, message,"
            f" attempts, sent_at, updated_at FROM records WHERE kind = ? AND state IN ({marks}) ORDER BY rowid",
            [kind, *states],
        )
        return [Record(*row) for row in cur]

    def claimed_ids(self, ids: Iterable[str]) -> set[str]:
        """Which of these resource ids some record already owns."""
        found: set[str] = set()
        for chunk in _chunks(list(ids)):
            marks = ",".join("?" * len(chunk))
            cur = self._db.execute(f"SELECT resource_id FROM records WHERE resource_id IN ({marks})", chunk)
            found.update(r[0] for r in cur)
        return found

    def counts(self) -> dict[str, dict[str, int]]:
        """Kind -> stored state -> count."""
        out: dict[str, dict[str, int]] = {}
        for kind, state, n in self._db.execute("SELECT kind, state, count(*) FROM records GROUP BY kind, state"):
            out.setdefault(kind, {})[state] = n
        return out

    # --- writes --------------------------------------------------------------

    def mark_pending(
        self, kind: str, items: Iterable[tuple[str, str] | tuple[str, str, str]], run_id: str,
        source_file: str | None = None,
    ) -> None:
        """Record the intent to send (source_key, body_hash[, body]) in one transaction.

        The body is kept only while the outcome is in doubt, so ``reconcile`` can look the row
        up (and re-send it when it is certainly absent) without the input files.
        """
        now = time.time()
        rows = []
        for item in items:
            key, body_hash = item[0], item[1]
            body = item[2] if len(item) > 2 else None
            rows.append((kind, key, body_hash, run_id, now, now, body, source_file))
        with self.transaction():
            self._db.executemany(
                "INSERT INTO records (kind, source_key, state, body_hash, attempts, run_id, sent_at, updated_at,"
                " body, source_file) VALUES (?, ?, 'pending', ?, 1, ?, ?, ?, ?, ?)"
                " ON CONFLICT (kind, source_key) DO UPDATE SET state = 'pending', body_hash = excluded.body_hash,"
                " attempts = records.attempts + 1, run_id = excluded.run_id, sent_at = excluded.sent_at,"
                " resource_id = NULL, http_status = NULL, error_code = NULL, message = NULL,"
                " updated_at = excluded.updated_at, body = excluded.body,"
                " source_file = COALESCE(excluded.source_file, records.source_file)",
                rows,
            )

    def bodies(self, kind: str, keys: Sequence[str]) -> dict[str, str]:
        """The bodies kept for rows in doubt."""
        out: dict[str, str] = {}
        for chunk in _chunks(keys):
            marks = ",".join("?" * len(chunk))
            cur = self._db.execute(
                f"SELECT source_key, body FROM records WHERE kind = ? AND body IS NOT NULL AND source_key IN ({marks})",
                [kind, *chunk],
            )
            out.update(dict(cur.fetchall()))
        return out

    def kinds(self) -> list[str]:
        """Every kind with stored records."""
        return [r[0] for r in self._db.execute("SELECT DISTINCT kind FROM records ORDER BY kind")]

    def created_from(self, kind: str, source_file: str, size: int = 50_000) -> Iterator[list[tuple[str, str]]]:
        """(source key, resource id) of what was created from a file of this name, ``size`` at a time."""
        cur = self._db.execute(
            "SELECT source_key, resource_id FROM records WHERE kind = ? AND source_file = ? AND state = 'created'",
            (kind, source_file),
        )
        while part := cur.fetchmany(size):
            yield part

    def set_hash(self, kind: str, items: Iterable[tuple[str, str]]) -> None:
        """Record the body hash of rows updated in place (``--update``)."""
        with self.transaction():
            self._db.executemany(
                "UPDATE records SET body_hash = ?, updated_at = ? WHERE kind = ? AND source_key = ?",
                [(h, time.time(), kind, k) for k, h in items],
            )

    def record_outcomes(self, records: Iterable[Record]) -> None:
        """Store outcomes, in one transaction."""
        now = time.time()
        with self.transaction():
            self._db.executemany(
                "UPDATE records SET state = ?, resource_id = ?, http_status = ?, error_code = ?, message = ?,"
                " updated_at = ?, body = CASE WHEN ? = 'unknown' THEN body END WHERE kind = ? AND source_key = ?",
                [
                    (r.state, r.resource_id, r.http_status, r.error_code, r.message, now, r.state, r.kind, r.source_key)
                    for r in records
                ],
            )

    def start_run(self, run_id: str, command: str, *, job: str | None = None) -> None:
        """Note the start of a run: its command (``load``, ``reconcile``, ``run``) and, for ``run``, the job's name."""
        with self.transaction():
            self._db.execute(
                "INSERT INTO runs (run_id, started_at, command, job) VALUES (?, ?, ?, ?)",
                (run_id, time.time(), command, job),
            )

    def finish_run(self, run_id: str, summary: dict[str, object]) -> None:
        """Note the end of a run with its summary counts."""
        with self.transaction():
            self._db.execute(
                "UPDATE runs SET finished_at = ?, summary = ? WHERE run_id = ?",
                (time.time(), json.dumps(summary), run_id),
            )

    def runs(self) -> list[dict[str, object]]:
        """Past runs, oldest first."""
        cur = self._db.execute(
            "SELECT run_id, started_at, finished_at, command, job, summary FROM runs ORDER BY rowid"
        )
        return [
            {
                "run_id": r[0],
                "started_at": r[1],
                "finished_at": r[2],
                "command": r[3],
                "job": r[4],
                "summary": json.loads(r[5]) if r[5] else None,
            }
            for r in cur
        ]


def _chunks(items: Sequence[str]) -> Iterator[Sequence[str]]:
    for i in range(0, len(items), _CHUNK):
        yield items[i : i + _CHUNK]
