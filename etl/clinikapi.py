"""ClinikAPI as a destination (:class:`ClinikApi`, the default of every run).

What is ClinikAPI's own, behind the :class:`etl.destination.Destination` interface:

- a kind's creates go to its route (:data:`schemas.limits.ROUTES` by the kind's create schema),
  as the JSON bodies the transform builds (:func:`etl.transform.plan`), parents' stages first;
- the target is ``--base-url`` with the API key, or an embedded sandbox on loopback whose database
  sits beside the state store (:func:`sandbox_db`); a state store is bound to
  :func:`target_identity`;
- the client is :class:`etl.load.client.ApiClient`; a reference nothing in the run explains is
  looked up with ``GET /v1/<kind>/<id>`` (:class:`TargetLookup`, :func:`target_has`);
- it can search (an unknown outcome is looked up after the consistency window) and has a bulk
  import (``--mode bulk``/``auto``: :mod:`etl.load.bulk`);
- a load's summary counts creates per kind, its HTTP versions and its mode, and writes
  ``crosswalk.csv`` (and ``disappeared.csv``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import quote

import polars as pl

from etl.destination import Destination, Lookup, OnResponse, PayloadColumns, Target, request_head
from etl.errors import LookupFailed, NoAnswerError, UsageError
from etl.files import private_dir
from etl.mapping import Mapped
from etl.progress import Progress
from etl.readers import ROW
from etl.report import RunFacts
from etl.settings import NO_ANSWER_LIMIT, Settings
from etl.transform import Planned, readable_refs, readable_refs_column
from schemas.canonical import KIND_SPECS
from schemas.limits import ROUTES

if TYPE_CHECKING:
    import httpx

    from etl.load.client import ApiClient
    from etl.load.loader import Client, Loader, LoadOptions
    from etl.load.state import StateStore
    from etl.load.throttle import Throttle

__all__ = [
    "ClinikApi",
    "TargetLookup",
    "existing_state",
    "kind_route",
    "open_target",
    "sandbox_db",
    "target_has",
    "target_identity",
]


def kind_route(kind: str) -> str:
    """The ClinikAPI route of a kind's creates."""
    return ROUTES[KIND_SPECS[kind].schema]


def sandbox_db(settings: Settings) -> Path:
    """The embedded sandbox's database: beside the state store."""
    return settings.state.with_name(settings.state.stem + ".sandbox.sqlite")


def target_identity(settings: Settings) -> str:
    """What a state store is bound to: the base URL, or the embedded sandbox's database."""
    return settings.base_url or f"embedded-sandbox:{sandbox_db(settings).resolve()}"


@contextlib.contextmanager
def existing_state(settings: Settings) -> Iterator[StateStore | None]:
    """The state store, read for what is already loaded, only if it exists (a dry run creates nothing)."""
    from etl.load.state import StateStore

    if not settings.state.is_file():
        yield None
        return
    with StateStore(settings.state, target=target_identity(settings)) as state:
        yield state


@contextlib.contextmanager
def open_target(settings: Settings) -> Iterator[tuple[str, str, str]]:
    """(base URL, API key, state-store identity) of the run's target; the embedded sandbox if none."""
    from etl.load.client import check_target

    if settings.base_url:
        if settings.api_key is None:
            raise UsageError("set CLINIKAPI_SECRET_KEY (or --api-key-file) to load into " + settings.base_url)
        key = settings.api_key.get_secret_value()
        check_target(settings.base_url, key, live=settings.live)
        yield settings.base_url, key, settings.base_url
        return
    from etl.sandbox import SandboxConfig, SandboxServer

    db = sandbox_db(settings)
    private_dir(db.parent)
    with SandboxServer(SandboxConfig(db_path=str(db), responses=settings.sandbox_responses)) as server:
        yield server.base_url, server.api_key, target_identity(settings)


async def target_has(client: ApiClient, kind: str, value: str, *, no_answer_limit: int = NO_ANSWER_LIMIT) -> bool:
    """Whether the target holds a ``kind`` with this ClinikAPI id (a reference nothing in the run explains).

    These lookups come before any create: once ``no_answer_limit`` requests in a row got no answer at all,
    :class:`~etl.errors.NoAnswerError` ends the run (nothing was sent) rather than wait on a silent target
    for every reference.
    """
    try:
        return await client.get(f"{kind_route(kind)}/{quote(value, safe='')}") is not None
    except LookupFailed:
        if client.silent >= no_answer_limit:
            raise NoAnswerError(
                f"the target did not answer {client.silent} requests in a row (timeouts, connections lost or "
                "refused) while looking up references; nothing was sent"
            ) from None
        return False


class TargetLookup:
    """Asks the target which of some (kind, id) pairs it holds (between batches: no loop is running)."""

    def __init__(self, base_url: str, key: str, settings: Settings) -> None:
        self.base_url, self.key, self.settings = base_url, key, settings
        self.requests = 0
        self.protocols: Counter[str] = Counter()
        self.answers: dict[tuple[str, str], bool] = {}  # each pair is asked once a run

    def __call__(self, pairs: list[tuple[str, str]]) -> set[tuple[str, str]]:
        from etl.load.client import ApiClient, http_client

        async def ask(new: list[tuple[str, str]]) -> None:
            async with http_client(self.base_url, self.settings) as http:
                client = ApiClient(http, self.key)
                client.protocols = self.protocols
                try:
                    for kind, value in new:
                        self.answers[(kind, value)] = await target_has(
                            client, kind, value, no_answer_limit=self.settings.no_answer_limit
                        )
                finally:
                    self.requests += client.requests

        new = [pair for pair in dict.fromkeys(pairs) if pair not in self.answers]
        if new:
            asyncio.run(ask(new))
        return {pair for pair in pairs if self.answers[pair]}


class ClinikApi(Destination):
    """ClinikAPI: a create per planned row (and per patient and practitioner the rows describe), to its
    kind's route; references between rows resolve in the run, through the crosswalk, the state store
    or a lookup on the target."""

    name = "ClinikAPI"
    resolves_references = True
    builds_bodies = True
    shows_readable_refs = True
    can_search = True
    has_bulk = True

    def plan_batch(
        self, mapped: Mapped, valid: pl.DataFrame, planned: Planned, rows: pl.DataFrame
    ) -> tuple[pl.DataFrame, list[tuple[str, pl.DataFrame]]]:
        live = rows.filter(pl.col("state") == "planned").get_column("source_key")
        none = pl.lit(None, dtype=pl.String).alias("source_file")
        # The planned rows that send a body (a null key sends nothing): filtered, bodies copied, only when
        # some do not.
        sends = (pl.col("body").is_not_null() & pl.col("source_key").is_in(live.implode())).fill_null(False)
        kept = planned.rows.select(sends.alias("sends")).get_column("sends")
        own = planned.rows if kept.all() else planned.rows.filter(kept)
        creates = [  # a patients file's own rows and the patients a registry row describes: both "patient"
            (
                mapped.kind,
                own.select("source_key", ROW, "body", "body_hash",
                           pl.lit(Path(str(mapped.table.path)).name).alias("source_file")),
            ),
            ("patient", planned.patients.select(pl.col("patient_key").alias("source_key"), ROW, "body", "body_hash",
                                                none)),
            ("practitioner", planned.practitioners.select(pl.col("practitioner_key").alias("source_key"), ROW, "body",
                                                          "body_hash", none)),
        ]
        return rows, creates

    def route(self, kind: str) -> str:
        return kind_route(kind)

    def payload_line(self, kind: str, source_key: str, source_row: int, body: str) -> str:
        # The body is JSON already: spliced in, not parsed and re-encoded (that was ~40% of a dry run).
        return super().payload_line(kind, source_key, source_row, readable_refs(body))

    def payload_lines(self, lines: pl.DataFrame) -> pl.Series:
        # payload_line of every row as polars expressions: the same text, without a Python call a line.
        columns = self._line_columns(lines)
        return columns.select(pl.col("head") + pl.lit(" ") + pl.col("body") + pl.lit("}\n")).to_series()

    def payload_columns(self, lines: pl.DataFrame) -> PayloadColumns:
        # The heads and the bodies written side by side: no line is built, in polars or in Python.
        return PayloadColumns(self._line_columns(lines))

    def _line_columns(self, lines: pl.DataFrame) -> pl.DataFrame:
        """Each line's :func:`~etl.destination.request_head` and its body with readable references."""
        kind, key, row, body = lines.columns
        heads = {k: json.dumps({"method": "POST", "path": self.route(k)}, ensure_ascii=False)[:-1]
                 for k in lines.get_column(kind).unique().to_list()}
        kinds = {k: json.dumps(k, ensure_ascii=False) for k in heads}
        # json.dumps(ensure_ascii=False) escapes only '"', backslash and control characters (those: below).
        source_key = pl.col(key)
        escaped = source_key.str.replace_all("\\", "\\\\", literal=True).str.replace_all('"', '\\"', literal=True)
        quoted = pl.when(source_key.str.contains(r'["\\]')).then(escaped).otherwise(source_key)
        head = lines.select(  # one concatenation: each head written once
            pl.concat_str([
                pl.col(kind).replace_strict(heads, return_dtype=pl.String),
                pl.lit(', "source_row": '), pl.col(row).cast(pl.String),
                pl.lit(', "kind": '), pl.col(kind).replace_strict(kinds, return_dtype=pl.String),
                pl.lit(', "source_key": "'), quoted, pl.lit('", "body":'),
            ])
        ).to_series()
        odd = lines.with_row_index("i").filter(pl.col(key).str.contains(r"[\x00-\x1f]"))
        if odd.height:  # a key with a control character: JSON's own escapes, line by line (rare)
            head = head.scatter(
                odd.get_column("i"), [request_head("POST", self.route(k), k, s, r) for _, k, s, r, _ in odd.iter_rows()]
            )
        return pl.DataFrame({"head": head, "body": readable_refs_column(lines.get_column(body))})

    @contextlib.contextmanager
    def _opened(self, settings: Settings) -> Iterator[Target]:
        with open_target(settings) as (base_url, key, identity):
            yield Target(base_url, key, identity, base_url if settings.base_url else "embedded sandbox")

    def open(self, settings: Settings) -> contextlib.AbstractContextManager[Target]:
        return self._opened(settings)

    def client(
        self, http: httpx.AsyncClient, key: str, *, on_response: OnResponse | None = None,
        protocols: Counter[str] | None = None,
    ) -> Client:
        from etl.load.client import ApiClient

        client = ApiClient(http, key, on_response=on_response)
        if protocols is not None:
            client.protocols = protocols
        return client

    def lookup(self, target: Target, settings: Settings) -> Lookup | None:
        return TargetLookup(target.base_url, target.key, settings)

    def lookup_requests(self, lookup: Lookup | None) -> int:
        return lookup.requests if isinstance(lookup, TargetLookup) else 0

    def protocols(self, lookup: Lookup | None) -> Counter[str]:
        return lookup.protocols if isinstance(lookup, TargetLookup) else Counter()

    async def new_loader(
        self, settings: Settings, http: httpx.AsyncClient, target: Target, client: Client, state: StateStore,
        throttle: Throttle, options: LoadOptions, run_id: str, progress: Progress, unsent: int,
    ) -> Loader:
        """A per-request loader, or a bulk one (``--mode bulk``, or ``auto`` when the window cannot hold the plan)."""
        from etl.load.bulk import BulkClient, BulkLoader, BulkOptions, choose_mode, remaining_requests
        from etl.load.loader import Loader

        # Nothing to send (a re-import of an unchanged export): no need to ask how much the window holds.
        remaining = await remaining_requests(http, target.key) if settings.mode == "auto" and unsent else None
        if choose_mode(settings.mode, unsent, remaining) == "request":
            return Loader(client, state, throttle, options, run_id, progress=progress)
        if settings.mode == "auto":
            progress.note(f"{unsent} creates planned, {remaining} requests left in the window: bulk mode")
        bulk = BulkClient(http, target.key, on_response=throttle.observe)
        return BulkLoader(client, bulk, state, throttle, options, run_id, progress=progress,
                          bulk_options=BulkOptions(operations_per_hour=settings.bulk_per_hour))

    def load_extra(self, loader: Loader, table: pl.DataFrame, protocols: Counter[str]) -> RunFacts:
        per_kind: dict[str, dict[str, int]] = {}
        for kind, state, n in table.group_by("kind", "r_state", maintain_order=True).len().iter_rows():
            per_kind.setdefault(kind, {})[state] = n
        jobs = getattr(loader, "jobs", None)
        mode = (
            RunFacts(mode="request") if jobs is None
            else RunFacts(mode="bulk", bulk_jobs=list(jobs), bulk_limit=getattr(loader, "limit_note", None))
        )
        return RunFacts(
            patients=per_kind.get("patient", {}),
            resources=per_kind,
            http_versions=dict(protocols),
            creates_sent=loader.stats.creates,
            interrupted=loader.stopping,
        ).updated(mode)

    def extra_files(self, table: pl.DataFrame) -> dict[str, pl.DataFrame]:
        """``crosswalk.csv``: the ids the load learnt (written even when empty)."""
        crosswalk = table.filter(pl.col("r_id").is_not_null()).select(
            "kind", "source_key", pl.col("r_id").alias("resource_id")
        )
        return {"crosswalk.csv": crosswalk.sort("kind", "source_key")}

    @property
    def tracks_disappeared(self) -> bool:
        return True
