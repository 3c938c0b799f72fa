"""The state store: what was sent, what came back, and the crosswalk.

One SQLite file per target. A row's intent (``pending``) is committed before
its request is sent and its outcome after, so a run killed at any point leaves
every row either untouched, ``pending`` (sent or not: look it up before
re-sending), ``created`` (with the id the API returned), ``failed`` (the API
said no: safe to send again after a fix) or ``unknown`` (sent, no answer).

Rows of kind ``patient`` are the crosswalk: source patient id -> ClinikAPI id.
The API key is never written here.

The file holds PHI while a row is in doubt (the request body is kept for
``reconcile``), so it is opened only if it is safely this user's (see
:mod:`etl.files`): never through a symbolic link, tightened to 0600 (with a
warning) when its mode lets others in, refused when another user owns it.

Its layout is stamped in SQLite's ``PRAGMA user_version``
(:data:`LAYOUT_VERSION`). A store from before the stamp (user_version 0, its
``meta`` table saying version 1) is recognised by its tables, migrated in
place and stamped; a newer layout, or a SQLite file that is not a state store,
is refused with :class:`~etl.errors.StateError` rather than adopted.

An index of what a re-import reads of every record (``records_kept``: :meth:`StateStore.stored` reads a
kind whole from it) is made on open when the file lacks it, once; it changes no table, so it is not a
layout of its own and an earlier release still reads the file.
"""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import polars as pl

from etl.errors import StateError
from etl.files import check_private_file, create_private_file, private_dir

__all__ = ["LAYOUT_VERSION", "Record", "StateStore", "StoredState", "store_files"]

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
CREATE TABLE IF NOT EXISTS aliases (
    kind TEXT NOT NULL,
    ref TEXT NOT NULL,
    source_key TEXT NOT NULL,
    PRIMARY KEY (kind, ref)
);
"""
# What a re-import reads of every record of a kind (StateStore.stored: _KEPT_COLUMNS), in an index of its own: read
# from the index alone, in key order, without visiting the records (whose kept bodies and messages make them wide).
# Not a layout change (no table changes; an older clinik-etl reads the file as before): made when missing, by any
# release that knows it, on open.
_KEPT_INDEX = (
    "CREATE INDEX IF NOT EXISTS records_kept ON records (kind, source_key, state, resource_id, body_hash, source_file)"
)
#: The layout this code reads and writes, stamped in the file's ``PRAGMA user_version``. Bump it, and teach
#: ``StateStore._migrate`` the step, whenever the tables change.
#: Layout 2 adds ``aliases``: the source ids a row is referred to by when it is keyed otherwise (a practitioner
#: keyed by its NPI, named by its provider id), so a later stage's references find it.
LAYOUT_VERSION = 2
_TABLES = frozenset({"meta", "records", "runs", "aliases"})
# The tables every layout has (a layout-1 store has no ``aliases`` until it is migrated).
_LAYOUT1_TABLES = frozenset({"meta", "records", "runs"})
# Kept in the store's file by other modules: the bulk loader's ledger of imports (etl.load.bulk).
_OTHER_TABLES = frozenset({"bulk_batches"})
# Columns added to layout 1 before layouts were stamped: a store written by an older release gains them.
_ADDED_COLUMNS = (("records", ("body", "source_file")), ("runs", ("job",)))
_CHUNK = 500  # SQLite's bound-parameter limit is far above this
# StateStore.stored reads every record of a kind, not key by key, when it holds at most this many per key asked;
# and keeps these columns of them until the next write.
_SCAN_SHARE = 2
_KEPT_COLUMNS = ("state", "resource_id", "body_hash", "source_file")
# The columns of a record that :meth:`StateStore.stored` reads, with their types in its frame.
_FRAME_COLUMNS: dict[str, pl.DataType] = {
    "state": pl.String(), "resource_id": pl.String(), "body_hash": pl.String(), "http_status": pl.Int64(),
    "error_code": pl.String(), "message": pl.String(), "attempts": pl.Int64(), "sent_at": pl.Float64(),
    "updated_at": pl.Float64(), "source_file": pl.String(),
}
_BUSY_MS = 5000  # how long to wait for another connection's write to end before calling the store locked


def store_files(path: Path) -> tuple[Path, ...]:
    """The files a state store at ``path`` lives in: the database and SQLite's WAL and shared-memory files."""
    return (path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm"))


def _warn(note: str) -> None:
    print(f"warning: {note}", file=sys.stderr, flush=True)


def _tables(db: sqlite3.Connection) -> set[str]:
    return {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
            if not r[0].startswith("sqlite_")}


def _check_ours(path: Path, db: sqlite3.Connection, tables: set[str], *, stamped: bool) -> None:
    """Refuse a SQLite file that is not a state store: other tables, or no ``meta`` table of ours.

    A store from before the layout stamp is recognised by its tables (some of ``meta``, ``records``
    and ``runs``, ``meta`` always) and by what ``meta`` says (version 1, when it says any).
    """
    if "meta" not in tables or tables - _TABLES - _OTHER_TABLES:
        raise _not_a_store(path, tables)
    columns = {row[1] for row in db.execute("PRAGMA table_info(meta)")}
    if columns != {"key", "value"}:
        raise _not_a_store(path, tables)
    if stamped:
        if lacks := _LAYOUT1_TABLES - tables:
            raise StateError(f"{path}: a damaged state store (it lacks the {', '.join(sorted(lacks))} "
                             "table); use another --state file")
        return
    stored = db.execute("SELECT value FROM meta WHERE key = 'version'").fetchone()
    if stored is not None and stored[0] != "1":
        raise StateError(
            f"{path}: a state store of an unknown layout (version {stored[0]!r}): "
            "use the clinik-etl that wrote it, or another --state file"
        )


def _newer(path: Path, version: int) -> StateError:
    return StateError(
        f"{path}: written by a newer clinik-etl (state-store layout {version}; this version reads layout "
        f"{LAYOUT_VERSION} and older): upgrade clinik-etl, or use another --state file"
    )


def _not_a_store(path: Path, tables: set[str]) -> StateError:
    return StateError(
        f"{path}: a SQLite file that is not a clinik-etl state store (its tables: {', '.join(sorted(tables))}); "
        "give --state a new file, or the one a load made"
    )


def _disk_full(path: Path) -> bool:
    try:
        return os.statvfs(path.parent).f_bavail == 0
    except OSError:
        return False


def _sqlite_problem(path: Path, exc: sqlite3.Error) -> StateError:
    """A one-line StateError naming the store, for an error SQLite raised while using it."""
    name = str(getattr(exc, "sqlite_errorname", ""))
    if name.startswith(("SQLITE_BUSY", "SQLITE_LOCKED")):
        why = (
            "it is locked by another process (a program holding it in a transaction); "
            "run again when that process has let go of it"
        )
    elif name.startswith("SQLITE_FULL") or (name.startswith("SQLITE_IOERR") and _disk_full(path)):
        # In WAL mode a full disk shows as an I/O error on the WAL file: the free space tells them apart.
        why = (
            "the disk is full; free some space and run again (each request was recorded before it was sent: "
            "a re-run looks up those in doubt)"
        )
    elif name.startswith("SQLITE_READONLY") or name == "SQLITE_CANTOPEN":
        why = f"cannot write to it ({exc}); check the file and its folder"
    elif name.startswith(("SQLITE_NOTADB", "SQLITE_CORRUPT")):
        why = f"not a usable state store ({exc})"
    else:
        why = f"the state store cannot be used ({exc})"
    return StateError(f"{path}: {why}")


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


def _read_whole(db: sqlite3.Connection, kind: str, asked: int) -> pl.DataFrame | None:
    """Every record of ``kind`` (``source_key`` and :data:`_KEPT_COLUMNS`), or None when the store holds more
    than :data:`_SCAN_SHARE` of them per key ``asked`` (looking those keys up is then cheaper)."""
    held = db.execute("SELECT count(*) FROM records WHERE kind = ?", (kind,)).fetchone()[0]
    if held > _SCAN_SHARE * asked:
        return None
    # A JSON array per column, built by SQLite from the covering index (_KEPT_INDEX) and split by polars: no
    # Python object a record (a tuple a record took about twice as long at 60,000 records).
    columns = ("source_key", *_KEPT_COLUMNS)
    if not held:  # (an empty array would explode to a line of nulls)
        return pl.DataFrame(schema={c: _FRAME_COLUMNS.get(c, pl.String()) for c in columns})
    arrays = db.execute(f"SELECT {', '.join(f'json_group_array({c})' for c in columns)} FROM records"
                        " WHERE kind = ?", (kind,)).fetchone()
    return pl.DataFrame(
        [pl.Series(c, [text]).str.json_decode(pl.List(pl.String)).explode().cast(_FRAME_COLUMNS.get(c, pl.String()))
         for c, text in zip(columns, arrays, strict=True)]
    )


class StateStore:
    """A SQLite state store bound to one target."""

    def __init__(self, path: str | Path, *, target: str, warn: Callable[[str], None] | None = None) -> None:
        """Open (or create) the store at ``path`` for loads into ``target``.

        ``warn`` is told of a file whose loose mode was tightened (default: a line on stderr).
        """
        self.path = Path(path)
        #: Writes to ``records`` through this store: what was read before it changed may be out of date.
        self.writes = 0
        self._kept: dict[str, pl.DataFrame] = {}  # whole kinds read by stored(), while nothing is written
        self._kept_at: tuple[int, int] | None = None
        self._ahead: Future[dict[str, pl.DataFrame]] | None = None  # whole kinds being read (read_ahead)
        self._ahead_at: tuple[int, int] | None = None
        private_dir(self.path.parent)
        # Owner-only from the first byte, and never through a symbolic link.
        create_private_file(self.path)
        for file, what in zip(store_files(self.path), ("state store", "state store's WAL file",
                                                         "state store's shared-memory file"), strict=True):
            if note := check_private_file(file, what):
                (warn or _warn)(note)
        try:
            self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        except sqlite3.Error as exc:
            raise _sqlite_problem(self.path, exc) from exc
        try:
            with self._errors():
                self._db.execute(f"PRAGMA busy_timeout={_BUSY_MS}")
                # A write transaction from the start: a store another process holds is found out here,
                # before anything is sent, and two processes never migrate one store at once. It comes
                # before the journal mode, which writes to the file: a file refused is left as it was.
                with self.transaction():
                    self._upgrade()
                    self._bind(target)
                self._db.execute("PRAGMA journal_mode=WAL")
                # WAL + NORMAL survives a killed process (not a power cut) and keeps commits cheap.
                self._db.execute("PRAGMA synchronous=NORMAL")
        except BaseException:
            self._db.close()
            raise

    @contextlib.contextmanager
    def _errors(self) -> Iterator[None]:
        """SQLite's errors as a one-line StateError naming this store."""
        try:
            yield
        except sqlite3.Error as exc:
            raise _sqlite_problem(self.path, exc) from exc

    def _upgrade(self) -> None:
        """Check the layout; create it in a new file, or migrate a store of an older layout in place."""
        version = int(self._db.execute("PRAGMA user_version").fetchone()[0])
        if version > LAYOUT_VERSION:
            raise _newer(self.path, version)
        tables = _tables(self._db)
        if version == 0 and not tables:
            self._create_tables()
            self._db.execute(f"PRAGMA user_version = {LAYOUT_VERSION}")
        else:
            _check_ours(self.path, self._db, tables, stamped=version > 0)
            if version < LAYOUT_VERSION:
                self._migrate()
        self._db.execute(_KEPT_INDEX)  # after a migration: its columns exist by then

    def _create_tables(self) -> None:
        # executescript would commit the transaction the store is opened in: one statement at a time.
        for statement in _SCHEMA.split(";"):
            if statement.strip():
                self._db.execute(statement)

    def _migrate(self) -> None:
        """Bring a store of an older layout to :data:`LAYOUT_VERSION`: one written before layouts were stamped
        (layout 1, unstamped) gains the columns added since; layout 1 gains the ``aliases`` table (layout 2)."""
        self._create_tables()  # the early releases made some tables only when first needed; layout 2's aliases
        for table, added in _ADDED_COLUMNS:
            columns = {row[1] for row in self._db.execute(f"PRAGMA table_info({table})")}
            for column in added:
                if column not in columns:
                    self._db.execute(f"ALTER TABLE {table} ADD COLUMN {column} TEXT")
        self._db.execute(
            "INSERT INTO meta (key, value) VALUES ('version', ?)"
            " ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            (str(LAYOUT_VERSION),),
        )
        self._db.execute(f"PRAGMA user_version = {LAYOUT_VERSION}")

    def _bind(self, target: str) -> None:
        stored = dict(self._db.execute("SELECT key, value FROM meta WHERE key = 'target'").fetchall())
        if not stored:
            self._db.executemany(
                "INSERT INTO meta (key, value) VALUES (?, ?) ON CONFLICT (key) DO NOTHING",
                [("target", target), ("version", str(LAYOUT_VERSION))],
            )
        elif stored.get("target") != target:
            raise StateError(
                f"{self.path} records loads into {stored.get('target')!r}, not {target!r}; "
                "use another --state file for another target"
            )

    @classmethod
    def existing(cls, path: str | Path, *, warn: Callable[[str], None] | None = None) -> StateStore:
        """Open a store that a load already created, bound to its own target (for ``history``)."""
        path = Path(path)
        # Checked before it is read: a link, a device or another user's file is refused unread.
        if note := check_private_file(path, "state store"):
            (warn or _warn)(note)
        if not path.is_file():
            raise StateError(f"{path}: no state store here (a load creates it; see --state)")
        try:
            with contextlib.closing(sqlite3.connect(path)) as db:
                tables = _tables(db)
                if not tables:
                    raise StateError(f"{path}: an empty file, not a state store (a load creates it; see --state)")
                version = int(db.execute("PRAGMA user_version").fetchone()[0])
                if version > LAYOUT_VERSION:
                    raise _newer(path, version)
                _check_ours(path, db, tables, stamped=version > 0)
                row = db.execute("SELECT value FROM meta WHERE key = 'target'").fetchone()
        except sqlite3.Error as exc:
            raise _sqlite_problem(path, exc) from exc
        if row is None:
            raise StateError(f"{path}: a state store that no load has used yet")
        return cls(path, target=str(row[0]), warn=warn)

    @property
    def target(self) -> str:
        """The target this store is bound to."""
        row = self._db.execute("SELECT value FROM meta WHERE key = 'target'").fetchone()
        return str(row[0])

    def close(self) -> None:
        """Close the database (a read ahead still going is waited for: it has its own connection)."""
        if self._ahead is not None:
            with contextlib.suppress(Exception):
                self._ahead.result()
            self._ahead = None
        self._db.close()

    def __enter__(self) -> StateStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    class _Tx:
        def __init__(self, db: sqlite3.Connection, path: Path) -> None:
            self.db = db
            self.path = path

        def __enter__(self) -> None:
            try:
                self.db.execute("BEGIN IMMEDIATE")
            except sqlite3.Error as exc:
                raise _sqlite_problem(self.path, exc) from exc

        def __exit__(self, exc_type: object, exc: BaseException | None, tb: object) -> None:
            try:
                self.db.execute("ROLLBACK" if exc_type else "COMMIT")
            except sqlite3.Error as failure:
                if self.db.in_transaction:
                    with contextlib.suppress(sqlite3.Error):
                        self.db.execute("ROLLBACK")
                if exc_type is None:
                    raise _sqlite_problem(self.path, failure) from failure
            if isinstance(exc, sqlite3.Error):  # a write in the block failed (a full disk): say which store
                raise _sqlite_problem(self.path, exc) from exc

    def transaction(self) -> StateStore._Tx:
        """A write transaction: ``with store.transaction(): ...``; SQLite's errors become a StateError."""
        return StateStore._Tx(self._db, self.path)

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

    def created_keys(self, kind: str, keys: Sequence[str]) -> set[str]:
        """Which of these source keys of ``kind`` are stored as created (the keys alone: no record is built)."""
        found = self.stored(kind, pl.Series(keys, dtype=pl.String), states=("created",), columns=())
        return set(found.get_column("source_key").to_list())

    def stored(
        self,
        kind: str,
        keys: pl.Series,
        *,
        states: Sequence[StoredState] | None = None,
        columns: Sequence[str] = ("state", "resource_id", "body_hash"),
    ) -> pl.DataFrame:
        """The records of ``kind`` among ``keys`` (those in one of ``states``, when given) as a frame:
        ``source_key`` and ``columns`` (of ``records``), a row per stored key, in no particular order.

        A set operation, whatever the number of keys: no :class:`Record` is built and no query is made per
        key. When the store holds not many more records of the kind than are asked for (a re-import), the
        kind is read whole, in order, and kept (its ``state``, ``resource_id``, ``body_hash`` and
        ``source_file``) until the store is next written to (by this store, or any other connection): a run
        that asks again (matching, then the count of what is left to send, then the skip of what was
        created, then what left the file: :meth:`created_from`; ``etl.send``) reads it once. Otherwise the
        keys go to SQLite in one statement, a JSON array its ``json_each`` reads.
        """
        unknown = [c for c in columns if c not in _FRAME_COLUMNS]
        if unknown:
            raise ValueError(f"not a column of a stored record: {', '.join(unknown)}")
        keys = keys.cast(pl.String).drop_nulls()
        schema: dict[str, pl.DataType] = {"source_key": pl.String(), **{c: _FRAME_COLUMNS[c] for c in columns}}
        kept = set(columns) <= set(_KEPT_COLUMNS)
        if kept and (whole := self._whole_kind(kind, keys.len())) is not None:
            if states is not None:
                whole = whole.filter(pl.col("state").is_in(list(states)))
            # (A semi join needs no unique keys.)
            return whole.join(keys.to_frame("source_key"), on="source_key", how="semi").select("source_key", *columns)
        select = ", ".join(("source_key", *columns))
        where = "kind = ?"
        params: list[object] = [kind]
        if states is not None:
            where += f" AND state IN ({','.join('?' * len(states))})"
            params += list(states)
        # SQLite's JSON reads text up to a NUL character: a key holding one (rare) is bound as a parameter.
        odd = keys.str.contains("\x00", literal=True)
        rows = self._db.execute(
            f"SELECT {select} FROM records WHERE {where} AND source_key IN (SELECT value FROM json_each(?))",
            [*params, json.dumps(keys.filter(~odd).to_list())],
        ).fetchall()
        for chunk in _chunks(keys.filter(odd).to_list()):
            marks = ",".join("?" * len(chunk))
            rows += self._db.execute(
                f"SELECT {select} FROM records WHERE {where} AND source_key IN ({marks})", [*params, *chunk]
            ).fetchall()
        return pl.DataFrame(rows, schema=schema, orient="row")

    def _whole_kind(self, kind: str, asked: int) -> pl.DataFrame | None:
        """Every record of ``kind`` (``source_key`` and :data:`_KEPT_COLUMNS`), read whole, when that beats
        looking ``asked`` keys up one by one (about twice as quick per record); kept until the next write."""
        if (kept := self._kept_kind(kind)) is not None:
            return kept
        whole = _read_whole(self._db, kind, asked)
        if whole is not None:
            self._kept[kind] = whole
        return whole

    def read_ahead(self, kinds: Iterable[str], asked: int) -> None:
        """Start reading these kinds whole, as :meth:`stored` would when asked about ``asked`` keys (at most) of
        each, on a thread of its own with a connection of its own: a re-import's first question about
        them (matching's, once every batch is planned) finds them read, as the input was read and
        checked meanwhile. A kind the store holds more than :data:`_SCAN_SHARE` records per key of is
        not read. What was written since the read began, here or by any other connection, is not
        trusted: :meth:`stored` reads again then.
        """
        if self._ahead is not None:
            return
        self._ahead_at = self._version()  # before the read: a write meanwhile makes it stale
        wanted = tuple(dict.fromkeys(kinds))
        path = self.path

        def read() -> dict[str, pl.DataFrame]:
            found: dict[str, pl.DataFrame] = {}
            with contextlib.closing(sqlite3.connect(path, isolation_level=None)) as db:
                db.execute(f"PRAGMA busy_timeout={_BUSY_MS}")
                db.execute("BEGIN")  # one snapshot for every kind
                for kind in wanted:
                    if (whole := _read_whole(db, kind, asked)) is not None:
                        found[kind] = whole
                db.execute("COMMIT")
            return found

        pool = ThreadPoolExecutor(1, thread_name_prefix="state-ahead")
        self._ahead = pool.submit(read)
        pool.shutdown(wait=False)

    def _version(self) -> tuple[int, int]:
        """What changes when ``records`` may have: this store's writes, and SQLite's count of other connections'."""
        return self.writes, int(self._db.execute("PRAGMA data_version").fetchone()[0])

    def _kept_kind(self, kind: str) -> pl.DataFrame | None:
        """The records of ``kind`` :meth:`_whole_kind` (or :meth:`read_ahead`) read, if nothing was written since."""
        version = self._version()
        if version != self._kept_at:  # written to since (here, or by another connection): read again
            self._kept.clear()
            self._kept_at = version
        if self._ahead is not None:
            ahead, self._ahead = self._ahead, None
            try:
                found = ahead.result()
            except Exception:
                found = {}
            if self._ahead_at == version:  # nothing written since it began
                self._kept.update(found)
        return self._kept.get(kind)

    def in_state(self, kind: str, *states: StoredState) -> list[Record]:
        """Every record of ``kind`` in one of ``states``."""
        marks = ",".join("?" * len(states))
        cur = self._db.execute(
            "SELECT kind, source_key, state, resource_id, body_hash, http_status, error_code, message,"
            f" attempts, sent_at, updated_at FROM records WHERE kind = ? AND state IN ({marks}) ORDER BY rowid",
            [kind, *states],
        )
        return [Record(*row) for row in cur]

    def aliases(self, kind: str, refs: Sequence[str]) -> dict[str, str]:
        """The source keys that rows of ``kind`` referred to by these ids were keyed by (:meth:`add_aliases`)."""
        out: dict[str, str] = {}
        for chunk in _chunks(refs):
            marks = ",".join("?" * len(chunk))
            cur = self._db.execute(
                f"SELECT ref, source_key FROM aliases WHERE kind = ? AND ref IN ({marks})", [kind, *chunk]
            )
            out.update(dict(cur.fetchall()))
        return out

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
        self.writes += 1
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

    def add_aliases(self, items: Iterable[tuple[str, str, str]]) -> None:
        """Keep (kind, reference, source key): a row keyed by ``source_key`` that other rows name ``reference``
        (a practitioner keyed ``npi:<NPI>``, named by its provider id). The latest run's word wins."""
        with self.transaction():
            self._db.executemany(
                "INSERT INTO aliases (kind, ref, source_key) VALUES (?, ?, ?)"
                " ON CONFLICT (kind, ref) DO UPDATE SET source_key = excluded.source_key",
                list(items),
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

    def created_from(
        self, kind: str, source_file: str, size: int = 50_000, *, besides: pl.Series | None = None
    ) -> Iterator[list[tuple[str, str]]]:
        """(source key, resource id) of what was created from a file of this name, ``size`` at a time.

        ``besides``: source keys to leave out (those the file still has), left out by SQLite (or from the
        kind :meth:`stored` read whole, when nothing was written since), so an unchanged file's records are
        not read back one by one. A key holding a NUL character (which SQLite's JSON cuts short) may not be
        left out: a caller that passes one compares again.
        """
        kept = self._kept_kind(kind)
        if kept is not None:  # the whole kind was read (a re-import): nothing more to read
            mine = kept.filter((pl.col("source_file") == source_file) & (pl.col("state") == "created"))
            if besides is not None:
                # (An anti join needs no unique keys.)
                present = besides.cast(pl.String).drop_nulls().to_frame("source_key")
                mine = mine.join(present, on="source_key", how="anti")
            for start in range(0, mine.height, size):
                yield mine.slice(start, size).select("source_key", "resource_id").rows()
            return
        sql = "SELECT source_key, resource_id FROM records WHERE kind = ? AND source_file = ? AND state = 'created'"
        params: list[object] = [kind, source_file]
        if besides is not None:
            plain = besides.cast(pl.String).drop_nulls()
            plain = plain.filter(~plain.str.contains("\x00", literal=True))
            sql += " AND source_key NOT IN (SELECT value FROM json_each(?))"
            params.append(json.dumps(plain.to_list()))
        cur = self._db.execute(sql, params)
        while part := cur.fetchmany(size):
            yield part

    def set_hash(self, kind: str, items: Iterable[tuple[str, str]]) -> None:
        """Record the body hash of rows updated in place (``--update``)."""
        self.writes += 1
        with self.transaction():
            self._db.executemany(
                "UPDATE records SET body_hash = ?, updated_at = ? WHERE kind = ? AND source_key = ?",
                [(h, time.time(), kind, k) for k, h in items],
            )

    def record_outcomes(self, records: Iterable[Record]) -> None:
        """Store outcomes, in one transaction."""
        now = time.time()
        self.writes += 1
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
