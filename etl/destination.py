"""The Destination interface: what differs from one target of a run to another.

Every run is one plan (:mod:`etl.plan`: read → map → validate → plan, a batch at a
time) and, for a load, one send loop (:mod:`etl.send`: the creates a part at a time
through the :class:`~etl.load.loader.Loader`, the state store, the report). What differs per
target is a :class:`Destination`, in the spirit of dlt's destination clients:

- **planning**: which inputs it takes (:meth:`~Destination.check`), what a batch's planned rows
  become (:meth:`~Destination.plan_batch`: JSON bodies, bundles ...), the stage of a kind, the
  route a create goes to (:meth:`~Destination.route`) and a dry run's line
  (:meth:`~Destination.payload_line`);
- **the target**: its state store (:meth:`~Destination.state_path`), opening it (a URL, or an
  embedded sandbox) with what binds a state store to it (:meth:`~Destination.open`, a
  :class:`Target`), the client the loader sends with (:meth:`~Destination.client`), the lookup of
  references nothing in the run explains (:meth:`~Destination.lookup`), the loader itself
  (:meth:`~Destination.new_loader`: per request, or bulk) and what the summary adds
  (:meth:`~Destination.load_extra`);
- **capabilities**: :attr:`~Destination.can_search` (an unknown outcome can be looked up, so the
  loader waits the search's consistency window; without search it stays ``unknown``),
  :attr:`~Destination.has_bulk` (``--mode bulk`` is refused by reading it),
  :attr:`~Destination.resolves_references` (references between rows must resolve in the run).

The implementations: ClinikAPI (:class:`etl.clinikapi.ClinikApi`, the default) and Redox
(:class:`etl.redox.RedoxBundles`). Adding a destination is one new module with a subclass;
nothing in the plan, the loader, the state store or the report changes (tests/test_destination.py
adds one in the test suite alone).
"""

from __future__ import annotations

import abc
import contextlib
import json
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, NamedTuple

import polars as pl

from etl.errors import UsageError
from etl.mapping import Mapped
from etl.progress import Progress
from etl.report import RunFacts
from etl.settings import Settings
from etl.transform import Planned
from schemas.canonical import KIND_SPECS

if TYPE_CHECKING:
    import httpx

    from etl.load.loader import Client, Loader, LoadOptions
    from etl.load.state import StateStore
    from etl.load.throttle import Throttle

__all__ = [
    "Destination", "Lookup", "OnResponse", "PayloadColumns", "Target", "loader_stats", "request_head", "request_line",
    "write_lines",
]

#: Which (kind, id) pairs the target holds, of those asked (a reference nothing in the run explains).
Lookup = Callable[[list[tuple[str, str]]], set[tuple[str, str]]]
#: Called with each response's headers (the throttle, the load estimate).
OnResponse = Callable[[Mapping[str, str]], None]


@dataclass(frozen=True)
class Target:
    """An opened target: where to send, with what key, and what binds a state store to it."""

    base_url: str
    key: str  # the API key or bearer token: never written anywhere
    identity: str  # a state store is bound to this (the URL, or the embedded sandbox's database)
    name: str  # what the report's ``target`` says


def request_head(method: str, path: str, kind: str, source_key: str, source_row: int) -> str:
    """A :func:`request_line` up to its body: the line is this, a space, the body and ``}\\n``."""
    head = json.dumps(
        {"method": method, "path": path, "source_row": source_row, "kind": kind, "source_key": source_key},
        ensure_ascii=False,
    )
    return f'{head[:-1]}, "body":'


def request_line(method: str, path: str, kind: str, source_key: str, source_row: int, body: str) -> str:
    """One line of a dry run's ``payloads.ndjson``: ``body`` is JSON text already, spliced in as it is."""
    return f"{request_head(method, path, kind, source_key, source_row)} {body}}}\n"


def write_lines(columns: pl.DataFrame, fh: BinaryIO | Path, *, separator: str = " ", end: str = "}\n") -> None:
    """Write each row of ``columns`` (text) to ``fh`` as its values joined by ``separator`` and ended by ``end``,
    as UTF-8, verbatim (nothing quoted or escaped): polars writes them from its own buffers, with no Python
    string a line. A row ``head, body`` of :func:`request_head` and a body is its :func:`request_line`.
    ``fh`` a path: a new file, written by polars alone (no Python call, so no wait for the GIL, as it writes)."""
    columns.write_csv(fh, include_header=False, quote_style="never", separator=separator, line_terminator=end)


class PayloadColumns(NamedTuple):
    """A dry run's lines as text columns (:meth:`Destination.payload_columns`): each line is a row's values
    joined by ``separator`` and ended by ``end`` (:func:`write_lines`)."""

    columns: pl.DataFrame
    separator: str = " "
    end: str = "}\n"

    def write(self, fh: BinaryIO | Path) -> None:
        """The lines, to ``fh`` (UTF-8; a path: a new file, :func:`write_lines`)."""
        write_lines(self.columns, fh, separator=self.separator, end=self.end)


class Destination(abc.ABC):
    """Where a run's creates go. Subclasses: :class:`etl.clinikapi.ClinikApi`, :class:`etl.redox.RedoxBundles`.

    The plan (read, map, validate, key, de-duplicate), the send loop, the state store, the report,
    progress and signals are shared; a subclass says only what differs (see the module's notes).
    """

    #: The summary's and the messages' name of the destination.
    name = "destination"
    #: References between rows must resolve in the run (a child names a created parent).
    resolves_references = True
    #: The transform builds ClinikAPI JSON bodies for the planned rows (:func:`etl.transform.plan`).
    builds_bodies = True
    #: A dry run's lines show the bodies' references as :func:`etl.transform.readable_refs` does, so a dry run
    #: may plan its bodies so (:func:`etl.transform.plan`'s ``readable``) rather than replace placeholders.
    shows_readable_refs = False
    #: An unknown outcome can be looked up by search (else it stays ``unknown``, never blindly re-sent).
    can_search = False
    #: A bulk import exists (``--mode bulk``/``auto``); without it ``--mode bulk`` is refused.
    has_bulk = False

    # --- planning ---------------------------------------------------------------

    def check(self, mapped: Mapped) -> None:
        """Refuse an input this destination cannot take (a usage error), before any row is read."""
        return None

    @abc.abstractmethod
    def plan_batch(
        self, mapped: Mapped, valid: pl.DataFrame, planned: Planned, rows: pl.DataFrame
    ) -> tuple[pl.DataFrame, list[tuple[str, pl.DataFrame]]]:
        """A batch's report ``rows`` (a destination may reject more of them) and its creates: per kind,
        ``source_key, __row, body, body_hash, source_file`` of what its planned rows send."""

    def stage(self, kind: str) -> int:
        """When a kind's creates go: parents' stages before their children's."""
        return KIND_SPECS[kind].stage if kind in KIND_SPECS else 0

    @abc.abstractmethod
    def route(self, kind: str) -> str:
        """The path a create of ``kind`` is POSTed to."""

    def payload_line(self, kind: str, source_key: str, source_row: int, body: str) -> str:
        """One line of a dry run's ``payloads.ndjson``."""
        return request_line("POST", self.route(kind), kind, source_key, source_row, body)

    def payload_lines(self, lines: pl.DataFrame) -> pl.Series:
        """:meth:`payload_line` of every row of ``lines`` (kind, source_key, ``__row``, body), in order.

        A destination that can build them as polars expressions overrides this; by default, one call a line.
        """
        return pl.Series(
            [self.payload_line(k, key, row, body) for k, key, row, body in lines.iter_rows()], dtype=pl.String
        )

    def payload_columns(self, lines: pl.DataFrame) -> PayloadColumns:
        """:meth:`payload_lines` of ``lines`` as text columns that polars writes (:meth:`write_payload_lines`).

        By default the lines themselves; a destination whose lines are a head and the body
        (:func:`request_head`) overrides this to give the two columns, so that no line is built.
        """
        return PayloadColumns(self.payload_lines(lines).to_frame("line"), separator=",", end="")

    def write_payload_lines(self, lines: pl.DataFrame, fh: BinaryIO) -> None:
        """Write :meth:`payload_lines` of ``lines`` to ``fh`` (UTF-8), in order (:meth:`payload_columns`)."""
        self.payload_columns(lines).write(fh)

    def requests_planned(self, counts: dict[str, int]) -> Any:
        """The summary's ``requests_planned`` of a dry run: the creates per kind."""
        return counts

    def report_kind(self, kind: str) -> str:
        """The report rows' kind of a create kept under ``kind`` in the state store."""
        return kind

    def dry_run_target(self, settings: Settings) -> str:
        """The report's ``target`` of a dry run (nothing is opened)."""
        return settings.base_url or "embedded sandbox"

    def timings(self) -> dict[str, float]:
        """Seconds spent in this destination's own steps (the summary's ``timings``)."""
        return {}

    def run_facts(self) -> RunFacts:
        """What every run to this destination, a dry run or a load, adds to its summary."""
        return RunFacts()

    # --- the target -------------------------------------------------------------

    @classmethod
    def check_mode(cls, settings: Settings) -> None:
        """Refuse a ``--mode`` this destination cannot do, by its capabilities, before anything is opened."""
        if settings.mode == "bulk" and not cls.has_bulk:
            raise UsageError(
                f"--mode bulk: {cls.name} has no bulk endpoint; load into {cls.name} with --mode request "
                "(the default)"
            )

    def state_path(self, settings: Settings) -> Path:
        """The state store of a load into this destination."""
        return settings.state

    @abc.abstractmethod
    def open(self, settings: Settings) -> contextlib.AbstractContextManager[Target]:
        """Open the target (an embedded sandbox when no URL is set) for the run's length."""

    @abc.abstractmethod
    def client(
        self, http: httpx.AsyncClient, key: str, *, on_response: OnResponse | None = None,
        protocols: Counter[str] | None = None,
    ) -> Client:
        """The client the loader sends with, over the run's ``httpx.AsyncClient`` (``protocols``: where a
        client that can tell counts the HTTP versions of its responses)."""

    def lookup(self, target: Target, settings: Settings) -> Lookup | None:
        """Asks the target about references nothing in the run explains (None: it cannot)."""
        return None

    def lookup_requests(self, lookup: Lookup | None) -> int:
        """The requests a :meth:`lookup` made (the summary's ``requests`` counts them)."""
        return 0

    def protocols(self, lookup: Lookup | None) -> Counter[str]:
        """Where the HTTP versions the run's responses came in are counted (the lookups' first)."""
        return Counter()

    def load_options(self, settings: Settings) -> LoadOptions:
        """How the loader sends: with no search there is no consistency window to wait for, nor a search
        lag to measure (a run's own unknown outcomes stay unknown at once, not after ``lag_limit``)."""
        from etl.load.loader import LoadOptions
        from etl.settings import MAX_SEARCH_LAG

        window = settings.consistency_window if self.can_search and self.opened_url(settings) else 0.0
        return LoadOptions(settings.rate, settings.concurrency, window, update=settings.update,
                           no_answer_limit=settings.no_answer_limit,
                           lag_limit=MAX_SEARCH_LAG if self.can_search else 0.0)

    def opened_url(self, settings: Settings) -> str | None:
        """The target's URL when one is set (else the embedded sandbox is opened)."""
        return settings.base_url

    async def new_loader(
        self, settings: Settings, http: httpx.AsyncClient, target: Target, client: Client, state: StateStore,
        throttle: Throttle, options: LoadOptions, run_id: str, progress: Progress, unsent: int,
    ) -> Loader:
        """The loader (per request; a destination with bulk may choose a bulk one)."""
        from etl.load.loader import Loader

        return Loader(client, state, throttle, options, run_id, progress=progress)

    def load_extra(self, loader: Loader, table: pl.DataFrame, protocols: Counter[str]) -> RunFacts:
        """What a load adds to the summary (beyond :func:`loader_stats`), from the results ``table``."""
        return RunFacts()

    def extra_files(self, table: pl.DataFrame) -> dict[str, pl.DataFrame]:
        """Report files a load adds (name -> frame, written as CSV even when empty)."""
        return {}

    @property
    def tracks_disappeared(self) -> bool:
        """Whether a load lists what an earlier run created from a file that no longer holds it."""
        return False


def loader_stats(loader: Loader) -> RunFacts:
    """What any load's summary says of its sending: requests, 429s, the rate achieved, an abort."""
    from etl.errors import QuotaExceededError

    settled: dict[str, Any] = {  # set only when they say something: a plain run's summary is unchanged
        name: value
        for name, value in (
            ("quota_exceeded", loader.aborted.message if isinstance(loader.aborted, QuotaExceededError) else None),
            ("retries", loader.retries or None),
            ("search_lag_seconds", loader.search_lag),
            ("settle_rounds", loader.settle_rounds or None),
            ("settle_problem", loader.settle_problem),
        )
        if value is not None
    }
    return RunFacts(
        **settled,
        requests=loader.stats.requests,
        responses_429=loader.stats.retries_429,
        achieved_rate=round(loader.stats.requests / loader.stats.send_seconds, 2)
        if loader.stats.send_seconds
        else None,
        aborted=str(loader.aborted) if loader.aborted else None,
        unresponsive=loader.unresponsive,  # the run stopped: the target answered nothing for too long
    )

