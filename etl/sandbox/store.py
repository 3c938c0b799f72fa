"""SQLite persistence for the sandbox: resources as JSON, searched in SQL.

One table holds every resource as the JSON text the API answers with; a route
column says which collection it belongs to and ``seq`` gives creation order
(and the search cursor). Search filters are SQL predicates over
``json_extract``; the selective ones are backed by expression indexes so a
lookup among thousands of patients does not read them all.

Every write commits before the method returns: the sandbox answers a create
only once the resource would survive a crash of the sandbox, like the API.
A lock serialises access because the event loop and bulk-import threads
share one connection.
"""

from __future__ import annotations

import json
import re
import sqlite3
import sys
import tempfile
import threading
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from etl.errors import UsageError
from etl.files import check_private_file, create_private_file
from schemas.limits import CREATE_SCHEMAS, ROUTES, walk

__all__ = ["DATE_FIELDS", "FILTERS", "PAGING", "SORTABLE", "Page", "Store", "sort_column"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS resources (
    seq   INTEGER PRIMARY KEY AUTOINCREMENT,
    id    TEXT NOT NULL UNIQUE,
    route TEXT NOT NULL,
    body  TEXT NOT NULL,
    name  TEXT  -- "firstName lastName", case-folded, for the name filter
);
CREATE INDEX IF NOT EXISTS resources_route ON resources (route, seq);
CREATE INDEX IF NOT EXISTS resources_patient ON resources (route, json_extract(body, '$.patientId'), seq);
CREATE INDEX IF NOT EXISTS resources_birthdate ON resources (route, json_extract(body, '$.birthDate'), seq);
CREATE TABLE IF NOT EXISTS jobs (
    id   TEXT PRIMARY KEY,
    body TEXT NOT NULL
);
"""


def _eq(path: str) -> str:
    # The path is inlined, not bound, so that SQLite can match the
    # expression indexes above.
    return f"json_extract(body, '$.{path}') = ?"


# "firstName lastName" contains every substring of either name, so one
# partial match over the joined name covers all three cases the API documents.
# The column is folded in Python when written: SQLite's lower() knows only ASCII.
_NAME = "instr(name, clinik_fold(?)) > 0"
_VACCINE = (
    "(CASE json_type(body, '$.vaccineCode') WHEN 'text' THEN json_extract(body, '$.vaccineCode') "
    "ELSE json_extract(body, '$.vaccineCode.code') END) = ?"
)
# ``active`` is not in a create body: a resource is active until a PATCH says otherwise (the SDK's
# PatientSummary and FHIR Practitioner carry ``active``; PatientUpdateRequest and PractitionerUpdateRequest
# set it). The app turns the query's ``true``/``false`` into 1/0.
_ACTIVE = "coalesce(json_extract(body, '$.active'), 1) = CAST(? AS INTEGER)"


def _day(path: str) -> str:
    return f"substr(json_extract(body, '$.{path}'), 1, 10)"


def _dates(path: str) -> dict[str, str]:
    # dateFrom/dateTo (OpenAPI QueryDateFrom/QueryDateTo, ``format: date``): whole days, both ends included.
    return {"dateFrom": f"{_day(path)} >= ?", "dateTo": f"{_day(path)} <= ?"}


#: The field each route's ``dateFrom``/``dateTo`` and ``sort=date`` read (the OpenAPI file does not say
#: which: the resource's own clinical date).
DATE_FIELDS: Mapping[str, str] = {
    ROUTES["EncounterCreate"]: "period.start",
    ROUTES["ImmunizationCreate"]: "occurrenceDateTime",
    ROUTES["DocumentCreate"]: "date",
    ROUTES["TaskCreate"]: "authoredOn",
}

#: Route -> query parameter -> SQL predicate with one ``?`` for the value: exactly the search parameters
#: the OpenAPI file lists for the route (``paths./v1/<route>.get.parameters``), besides ``count``,
#: ``cursor`` and ``sort`` (:data:`SORTABLE`), which every search handles itself. A test checks this
#: table against the OpenAPI file; the app refuses any other parameter with 400.
FILTERS: Mapping[str, Mapping[str, str]] = {
    ROUTES["PatientCreate"]: {
        "name": _NAME,
        "birthDate": _eq("birthDate"),
        "gender": _eq("gender"),
        "email": _eq("email"),
        "phone": _eq("phone"),
        "active": _ACTIVE,
    },
    ROUTES["PractitionerCreate"]: {
        "name": _NAME,
        "npi": _eq("npi"),
        "specialty": _eq("specialty"),
        "active": _ACTIVE,
    },
    ROUTES["EncounterCreate"]: {
        "patientId": _eq("patientId"),
        "status": _eq("status"),
        **_dates(DATE_FIELDS[ROUTES["EncounterCreate"]]),
    },
    ROUTES["ImmunizationCreate"]: {
        "patientId": _eq("patientId"),
        "status": _eq("status"),
        "vaccineCode": _VACCINE,
        **_dates(DATE_FIELDS[ROUTES["ImmunizationCreate"]]),
    },
    ROUTES["DocumentCreate"]: {
        "patientId": _eq("patientId"),
        "status": _eq("status"),
        "type": _eq("type"),
        "practitionerId": _eq("practitionerId"),
        **_dates(DATE_FIELDS[ROUTES["DocumentCreate"]]),
    },
    ROUTES["TaskCreate"]: {
        "patientId": _eq("patientId"),
        "status": _eq("status"),
        "ownerId": _eq("ownerId"),
        "requesterId": _eq("requesterId"),
        "priority": _eq("priority"),
        "code": _eq("code"),
        **_dates(DATE_FIELDS[ROUTES["TaskCreate"]]),
    },
}

#: The routes whose search takes ``sort`` (OpenAPI ``QuerySort``: "Sort field (prefix with - for
#: descending)"): a create-body field (dotted for nested ones, e.g. ``period.start``), ``date`` (the route's
#: :data:`DATE_FIELDS`) or ``lastUpdated``.
SORTABLE: frozenset[str] = frozenset({ROUTES["EncounterCreate"], ROUTES["TaskCreate"]})
#: The parameters of every search: page size and cursor (OpenAPI QueryCount, QueryCursor).
PAGING: frozenset[str] = frozenset({"count", "cursor"})


def sort_column(route: str, field: str) -> str | None:
    """The SQL expression ``sort=field`` orders ``route`` by, or None if it names no field of the route."""
    if field == "date" and route in DATE_FIELDS:
        field = DATE_FIELDS[route]
    if field == "lastUpdated":
        return "json_extract(body, '$.meta.lastUpdated')"
    schema = next(name for name, r in ROUTES.items() if r == route)
    if not _PATH.fullmatch(field) or field not in {path for path, spec in walk(CREATE_SCHEMAS[schema])
                                                     if spec.type not in ("object", "array")}:
        return None
    return f"json_extract(body, '$.{field}')"


_PATH = re.compile(r"[A-Za-z]+(\.[A-Za-z]+)*")


@dataclass(frozen=True)
class Page:
    """One page of a search: the resources, the count of all matches, and
    the ``seq`` to continue after (None on the last page)."""

    items: list[dict[str, Any]]
    total: int
    next_after: int | None


def _fold(value: object) -> str | None:
    # SQLite's own lower() only folds ASCII; names are not all ASCII.
    return value.casefold() if isinstance(value, str) else None


def _dumps(value: Mapping[str, Any]) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def _name_key(resource: Mapping[str, Any]) -> str | None:
    first, last = resource.get("firstName"), resource.get("lastName")
    if not isinstance(first, str) and not isinstance(last, str):
        return None
    return _fold(f"{first if isinstance(first, str) else ''} {last if isinstance(last, str) else ''}")


class Store:
    """Resources and bulk jobs in one SQLite file.

    ``path=None`` uses a private temporary file that :meth:`close` deletes.
    """

    def __init__(self, path: str | None = None) -> None:
        self._tmpdir: tempfile.TemporaryDirectory[str] | None = None
        if path is None:
            self._tmpdir = tempfile.TemporaryDirectory(prefix="clinik-sandbox-")
            path = str(Path(self._tmpdir.name) / "sandbox.sqlite")
        self.path = path
        self._lock = threading.RLock()
        self._closed = False
        try:
            _create_private(path)
            # Autocommit: each statement is its own transaction unless we BEGIN.
            self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        except (sqlite3.Error, OSError) as exc:
            self._discard_tmpdir()
            raise UsageError(f"cannot open the sandbox database {path}: {exc}") from exc
        except BaseException:
            self._discard_tmpdir()
            raise
        try:
            self._db.execute("PRAGMA journal_mode=WAL")
            # NORMAL in WAL mode survives a crash of the process, which is what
            # a sandbox needs, without an fsync per request.
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.execute("PRAGMA busy_timeout=5000")
            self._db.create_function("clinik_fold", 1, _fold, deterministic=True)
            self._db.executescript(_SCHEMA)
        except sqlite3.Error as exc:
            self.close()
            raise UsageError(f"cannot use {path} as the sandbox database: {exc}") from exc

    def close(self) -> None:
        """Close the connection; delete the file if it was a temporary one."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._db.close()
            self._discard_tmpdir()

    def _discard_tmpdir(self) -> None:
        if self._tmpdir is not None:
            self._tmpdir.cleanup()
            self._tmpdir = None

    # -- resources ---------------------------------------------------------

    def insert(self, route: str, resource: Mapping[str, Any]) -> None:
        """Store a new resource (which carries its ``id``)."""
        self.insert_many(route, [resource])

    def insert_many(self, route: str, resources: Iterable[Mapping[str, Any]]) -> None:
        """Store new resources in one transaction."""
        rows = [(r["id"], route, _dumps(r), _name_key(r)) for r in resources]
        if not rows:
            return
        with self._lock:
            self._db.execute("BEGIN")
            try:
                self._db.executemany("INSERT INTO resources (id, route, body, name) VALUES (?, ?, ?, ?)", rows)
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def get(self, route: str, rid: str) -> dict[str, Any] | None:
        """The resource with this id in this route, or None."""
        with self._lock:
            row = self._db.execute("SELECT body FROM resources WHERE id = ? AND route = ?", (rid, route)).fetchone()
        return None if row is None else _loads(row[0])

    def exists(self, route: str, rid: str) -> bool:
        """Whether the route holds a resource with this id."""
        with self._lock:
            row = self._db.execute("SELECT 1 FROM resources WHERE id = ? AND route = ?", (rid, route)).fetchone()
        return row is not None

    def replace(self, route: str, resource: Mapping[str, Any]) -> bool:
        """Overwrite a stored resource; False when it does not exist."""
        with self._lock:
            cur = self._db.execute(
                "UPDATE resources SET body = ?, name = ? WHERE id = ? AND route = ?",
                (_dumps(resource), _name_key(resource), resource["id"], route),
            )
        return cur.rowcount > 0

    def delete(self, route: str, rid: str) -> bool:
        """Remove a resource; False when it does not exist."""
        with self._lock:
            cur = self._db.execute("DELETE FROM resources WHERE id = ? AND route = ?", (rid, route))
        return cur.rowcount > 0

    def search(
        self, route: str, params: Mapping[str, str], *, after: int = 0, limit: int = 20, hidden: Collection[str] = ()
    ) -> Page:
        """Resources of ``route`` matching the known filters in ``params``
        (others are ignored), in creation order, ``limit`` of them after ``seq``,
        leaving out the ids in ``hidden``.

        With ``params["sort"]`` (a :func:`sort_column` field, ``-`` first for
        descending), they come in that order (creation order among equals) and
        ``after`` is an offset: the number of matches already shown."""
        known = FILTERS.get(route, {})
        where = ["route = ?", *(known[name] for name in params if name in known)]
        args: list[object] = [route, *(value for name, value in params.items() if name in known)]
        sort = params.get("sort")
        order = None
        if sort:
            column = sort_column(route, sort.removeprefix("-"))
            if column is None:
                raise ValueError(f"cannot sort {route} by {sort!r}")
            order = f"{column} {'DESC' if sort.startswith('-') else 'ASC'}, seq"
        if hidden:
            # One JSON array, not a placeholder per id: no bound-parameter limit.
            where.append("id NOT IN (SELECT value FROM json_each(?))")
            args.append(json.dumps(sorted(hidden)))
        clause = " AND ".join(where)
        with self._lock:
            (total,) = self._db.execute(f"SELECT count(*) FROM resources WHERE {clause}", args).fetchone()  # noqa: S608
            if order is None:
                rows = self._db.execute(
                    f"SELECT seq, body FROM resources WHERE {clause} AND seq > ? ORDER BY seq LIMIT ?",  # noqa: S608
                    [*args, after, limit + 1],
                ).fetchall()
            else:
                rows = self._db.execute(
                    f"SELECT seq, body FROM resources WHERE {clause} ORDER BY {order} LIMIT ? OFFSET ?",  # noqa: S608
                    [*args, limit + 1, after],
                ).fetchall()
        more = len(rows) > limit
        rows = rows[:limit]
        if not more:
            return Page(items=[_loads(body) for _, body in rows], total=total, next_after=None)
        return Page(items=[_loads(body) for _, body in rows], total=total,
                    next_after=rows[-1][0] if order is None else after + limit)

    # -- bulk jobs ---------------------------------------------------------

    def put_job(self, job: Mapping[str, Any]) -> None:
        """Create or overwrite a bulk job's record."""
        with self._lock:
            self._db.execute("INSERT OR REPLACE INTO jobs (id, body) VALUES (?, ?)", (job["id"], _dumps(job)))

    def get_job(self, job_id: str) -> dict[str, Any] | None:
        """A bulk job's record, or None."""
        with self._lock:
            row = self._db.execute("SELECT body FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return None if row is None else _loads(row[0])


def _create_private(path: str) -> None:
    """Create the database file owner-only (0600) if it is new: it holds
    PHI-shaped data, and SQLite would create it 0644 (its WAL files follow
    the database file's mode). An existing one, and its WAL files, must be
    safely this user's: never a symbolic link; a loose mode is tightened."""
    if path == ":memory:" or path.startswith("file:"):
        return
    create_private_file(Path(path))
    for suffix, what in (("", "sandbox database"), ("-wal", "sandbox database's WAL file"),
                         ("-shm", "sandbox database's shared-memory file")):
        if note := check_private_file(Path(path + suffix), what):
            print(f"warning: {note}", file=sys.stderr, flush=True)


def _loads(text: str) -> dict[str, Any]:
    value = json.loads(text)
    assert isinstance(value, dict)
    return value
