"""Progress of a run: what each stage has done, how fast, and how long is left.

The pipeline reports to a :class:`Progress`; what is shown is the caller's
choice. The base class shows nothing (``--quiet``, a notebook);
:class:`NotesProgress` prints only notes, as plain lines (stderr that is not a
terminal: cron, CI, a pipe); :class:`RichProgress` draws live bars on a
terminal. :func:`open_progress` picks one the way the CLI does.

The protocol is four calls::

    progress.start("validate", 560)   # a stage begins (or grows by 560 more units)
    progress.advance("validate", 560) # units done
    progress.finish("read")           # no more units: the count is final
    progress.note("waiting 8 s for search to show earlier sends")

plus :meth:`Progress.pace`, which gives load stages the rate the throttle
allows, so that an ETA holds on a rate-limited plan rather than extrapolating
from the first fast burst. Stages are ``read``, ``validate``, ``transform``
and, for the load, one per kind sent (``patient``, ``immunization`` ...).

The loader's older callback, ``(stage, n)`` with ``n == 0`` meaning "a note",
still works: a :class:`Progress` is such a callable, and :func:`as_progress`
wraps a plain function.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Mapping
from types import TracebackType
from typing import IO, Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, ProgressColumn, Task, TextColumn
from rich.progress import Progress as _Bars
from rich.text import Text

from etl.rules import RULES

__all__ = [
    "PREPARE_STAGES",
    "LoadEstimate",
    "NotesProgress",
    "Progress",
    "RichProgress",
    "as_progress",
    "describe_duration",
    "estimate_note",
    "open_progress",
    "run_notes",
]

PREPARE_STAGES = ("read", "validate", "transform")
WARNING_EXAMPLES = 3  # rows named per warning code at the end of a run
LONG_LOAD = 60.0  # seconds: a load expected to take longer than this is announced up front

Pace = Callable[[], float | None]


class Progress:
    """Receives a run's progress and shows nothing; subclasses show it."""

    def start(self, stage: str, total: int | None = None) -> None:
        """A stage begins with ``total`` units (None: not known yet); if it has begun, it grows by ``total``."""

    def advance(self, stage: str, n: int = 1) -> None:
        """``n`` more units of ``stage`` are done."""

    def finish(self, stage: str) -> None:
        """``stage`` has no more units: what it has done is its total."""

    def note(self, message: str) -> None:
        """Something a person watching should read (a wait, an estimate)."""

    def pace(self, rate: Pace) -> None:
        """The requests per second the throttle allows from now on, read at each refresh (load ETAs)."""

    def close(self) -> None:
        """Stop drawing; what was drawn stays on the screen."""

    def __call__(self, stage: str, n: int) -> None:
        """The loader's callback form: ``(kind, n)`` advances, ``(message, 0)`` is a note."""
        if n:
            self.advance(stage, n)
        else:
            self.note(stage)

    def __enter__(self) -> Progress:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


class _Callback(Progress):
    """A plain ``(stage, n)`` function behind the :class:`Progress` interface."""

    def __init__(self, callback: Callable[[str, int], None]) -> None:
        self.callback = callback

    def advance(self, stage: str, n: int = 1) -> None:
        self.callback(stage, n)

    def note(self, message: str) -> None:
        self.callback(message, 0)


def as_progress(progress: Progress | Callable[[str, int], None] | None) -> Progress:
    """A :class:`Progress` for whatever the caller passed (None: one that shows nothing)."""
    if progress is None:
        return Progress()
    if isinstance(progress, Progress):
        return progress
    return _Callback(progress)


class NotesProgress(Progress):
    """Prints notes as plain lines and nothing else: for logs, where bars would be noise."""

    def __init__(self, stream: IO[str] | None = None) -> None:
        self.stream = stream

    def note(self, message: str) -> None:
        stream = self.stream or sys.stderr
        print(f"clinik-etl: {message}", file=stream, flush=True)


def describe_duration(seconds: float) -> str:
    """``"42 s"``, ``"3 min 20 s"``, ``"1 h 23 min"``: a duration as a person says it."""
    seconds = max(0.0, seconds)
    if seconds < 1:
        return "<1 s"
    if seconds < 60:
        return f"{seconds:.0f} s"
    minutes, secs = divmod(round(seconds), 60)
    if minutes < 60:
        return f"{minutes} min {secs} s" if secs and minutes < 10 else f"{minutes} min"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes} min" if minutes else f"{hours} h"


def _per_second(rate: float) -> str:
    return f"{rate:.2f}" if rate < 10 else f"{rate:,.0f}"


def estimate_note(requests: int, rate: float, *, limit: int | None = None, window: float | None = None) -> str:
    """``"692 requests at ~0.14/s (500 per 3600 s): about 1 h 23 min"``."""
    why = f" ({limit} per {window:g} s)" if limit is not None and window is not None else " (--rate)"
    return f"{requests} requests at ~{_per_second(rate)}/s{why}: about {describe_duration(requests / rate)}"


class LoadEstimate:
    """Announces once, before the bulk of a load, how long it will take when that is long.

    Two things are needed: how many requests the load will send
    (:meth:`plan`) and how fast it may send them, which is the fixed
    ``--rate`` or else the plan's limit, read from the first response's
    ``X-RateLimit-*`` headers (:meth:`observe`, chained into the client's
    response hook with :meth:`chain`). Whichever comes last announces.
    """

    def __init__(self, progress: Progress, rate: float | None = None, *, long: float = LONG_LOAD) -> None:
        self.progress = progress
        self.long = long
        self.requests: int | None = None
        self.announced = False
        # (requests per second, plan limit, window seconds); the limit and window only when read from headers
        self._pace: tuple[float, int | None, float | None] | None = (rate, None, None) if rate else None
        self._fixed = rate is not None

    def plan(self, requests: int) -> None:
        """The load will send about ``requests`` requests."""
        self.requests = requests
        self._maybe_announce()

    def observe(self, headers: Mapping[str, str]) -> None:
        """Read the plan's limit from a response's headers (until the estimate is announced)."""
        if self.announced or self._fixed:
            return
        try:
            limit = int(headers["x-ratelimit-limit"])
            remaining = int(headers["x-ratelimit-remaining"])
            reset = float(headers["x-ratelimit-reset"])
        except (KeyError, ValueError):
            return
        if reset > 0:
            # The throttle spreads what is left of the window over what is left of its time.
            self._pace = (max(remaining, 1) / reset, limit, reset)
            self._maybe_announce()

    def _maybe_announce(self) -> None:
        if self.announced or self.requests is None or self._pace is None:
            return
        self.announced = True
        rate, limit, window = self._pace
        if self.requests and self.requests / rate > self.long:
            self.progress.note(estimate_note(self.requests, rate, limit=limit, window=window))

    def chain(self, first: Callable[[Mapping[str, str]], None]) -> Callable[[Mapping[str, str]], None]:
        """A response hook that calls ``first`` (the throttle's) and then :meth:`observe`."""

        def hook(headers: Mapping[str, str]) -> None:
            first(headers)
            self.observe(headers)

        return hook


# --- the live display ----------------------------------------------------------


class _RateColumn(ProgressColumn):
    """Units per second: over the recent window while running, overall once done."""

    def render(self, task: Task) -> Text:
        if task.finished:
            took = task.finished_time or 0.0
            speed = task.completed / took if took > 0 else None
        else:
            speed = task.speed
        return Text(f"{_per_second(speed)}/s" if speed else "", style="progress.data.speed")


class _EtaColumn(ProgressColumn):
    """Time left at the slower of the observed rate and the rate the throttle allows."""

    def render(self, task: Task) -> Text:
        if task.finished:
            return Text(f"done in {describe_duration(task.finished_time or task.elapsed or 0.0)}", style="green")
        if task.total is None or task.remaining is None:
            return Text("")
        pace: Pace | None = task.fields.get("pace")
        allowed = pace() if pace is not None else None
        rates = [r for r in (task.speed, allowed) if r]
        if not rates:
            return Text("ETA …", style="progress.remaining")
        return Text(f"ETA {describe_duration(task.remaining / min(rates))}", style="progress.remaining")


class RichProgress(Progress):
    """Live bars on a terminal (stderr), one per stage; the final state stays on screen."""

    def __init__(self, console: Console | None = None) -> None:
        self.console = console or Console(stderr=True, highlight=False)
        self._bars = _Bars(
            TextColumn("{task.description:<18}"),
            BarColumn(bar_width=30),
            MofNCompleteColumn(),
            TextColumn("{task.fields[unit]}"),
            _RateColumn(),
            _EtaColumn(),
            console=self.console,
            refresh_per_second=8,
            speed_estimate_period=30.0,
        )
        self._tasks: dict[str, Any] = {}
        self._pace: Pace | None = None
        self._bars.start()

    @staticmethod
    def _label(stage: str) -> tuple[str, str]:
        if stage in PREPARE_STAGES:
            return stage, "rows"
        return f"load {stage}", "requests"

    def start(self, stage: str, total: int | None = None) -> None:
        task_id = self._tasks.get(stage)
        pace = None if stage in PREPARE_STAGES else self._pace
        if task_id is None:
            label, unit = self._label(stage)
            self._tasks[stage] = self._bars.add_task(label, total=total, unit=unit, pace=pace)
            return
        if total:
            task = self._task(stage)
            task.finished_time = None  # it had finished: more work arrived
            self._bars.update(task_id, total=(task.total or 0) + total)

    def _task(self, stage: str) -> Task:
        task_id = self._tasks[stage]
        return next(t for t in self._bars.tasks if t.id == task_id)

    def advance(self, stage: str, n: int = 1) -> None:
        if stage not in self._tasks:
            self.start(stage)
        self._bars.update(self._tasks[stage], advance=n)

    def finish(self, stage: str) -> None:
        if stage in self._tasks:
            task = self._task(stage)
            self._bars.update(self._tasks[stage], total=task.completed)

    def note(self, message: str) -> None:
        self._bars.console.print(message, markup=False, highlight=False)

    def pace(self, rate: Pace) -> None:
        self._pace = rate
        for stage, task_id in self._tasks.items():
            if stage not in PREPARE_STAGES:
                self._bars.update(task_id, pace=rate)

    def close(self) -> None:
        for stage in list(self._tasks):
            if self._task(stage).total is None:
                self.finish(stage)
        self._bars.stop()


def open_progress(quiet: bool = False, stream: IO[str] | None = None) -> Progress:
    """What the CLI shows: nothing when quiet, bars on a terminal, notes as lines otherwise."""
    stream = stream or sys.stderr
    if quiet:
        return Progress()
    if stream.isatty():
        return RichProgress(Console(file=stream, highlight=False))
    return NotesProgress(stream)


def run_notes(summary: Mapping[str, Any]) -> list[str]:
    """What the end of a run says besides its counts, as plain lines (a validate's, a load's summary):

    - each row warning code, how many rows carry it and the first few (``file:row``), and each other
      file notice (but ``unmapped-columns``: the columns are named in full below);
    - each file read but not imported (a Synthea ``payers.csv``), and why;
    - per file, every column that no payload carries, in full, grouped by reason.
    """
    lines: list[str] = []
    counts: dict[str, int] = {}
    first: dict[str, list[str]] = {}
    notices: list[str] = []
    cells: dict[str, list[str]] = {}
    for w in summary.get("warnings") or []:
        name = w["file"].replace("\\", "/").rsplit("/", 1)[-1]
        if "count" in w:
            counts[w["code"]] = counts.get(w["code"], 0) + int(w["count"])
            first.setdefault(w["code"], []).extend(f"{name}:{r}" for r in w["rows"])
            for cell in w.get("examples") or []:  # the cells it was raised on: column "value"
                said = f"{cell['column']} {json.dumps(cell['value'], ensure_ascii=False)}"
                if said not in cells.setdefault(w["code"], []):
                    cells[w["code"]].append(said)
        elif w["code"] != RULES["unmapped-columns"].code:
            notices.append(f"  {w['code']:<30} {name}: {w['message']}")
    if counts or notices:
        lines.append("warnings by code:")
        for code in sorted(counts):
            rows = first[code][:WARNING_EXAMPLES]
            more = " ..." if counts[code] > len(rows) else ""
            quoted = cells.get(code, [])[:WARNING_EXAMPLES]
            on = f"; {', '.join(quoted)}{' ...' if len(cells.get(code, [])) > len(quoted) else ''}" if quoted else ""
            lines.append(f"  {code:<30} {counts[code]:>4}  rows {', '.join(rows)}{more}{on}")
        lines += notices
    for x in summary.get("not_imported") or []:
        lines.append(f"not imported: {x['file']} ({x['name']}, {x['rows']} rows): {x['reason']}")
    carried = summary.get("not_carried") or {}
    if carried:
        lines.append("not carried (no payload holds these columns):")
        for file, columns in carried.items():
            by_reason: dict[str, list[str]] = {}
            for c in columns:
                by_reason.setdefault(c["reason"], []).append(c["column"])
            for reason, names in by_reason.items():
                lines.append(f"  {file} ({reason}): {', '.join(names)}")
    return lines
