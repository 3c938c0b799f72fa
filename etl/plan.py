"""The plan stage: every run planned in batches, a file of any size in bounded memory.

``clinik-etl validate`` reads each input a batch of rows at a time
(:func:`etl.readers.read_batches`), validates the batch with what the earlier
batches taught (:class:`etl.validate.Carry`: the record ids seen, each
patient's first details), plans its keys (no JSON bodies: nothing is sent)
and writes its report rows to disk before reading the next batch. What stays
in memory grows with the number of distinct keys, not with the file:

- the keys rows can refer to (patients, practitioners, encounters ... planned
  so far), for the kinds some input refers to;
- the keys of rejected rows of those kinds (a child of one is
  ``parent-rejected``);
- for a kind that several inputs hold, the first file and row of each key
  (a later file's copy is ``skipped``);
- the references nothing explains yet. A reference may point forward (a row
  naming a patient that a later row describes), so these wait for the end of
  their stage, when every file of it has been read, and only then become
  ``unresolved-reference`` or ``parent-rejected`` rejections.

Every run takes this plan (validate, a dry run, a load, Redox): a file that
fits one batch is one batch, and the batch size never changes the report
(tests/golden, and a property test over batch sizes). A documents file is
validated whole: a document's sections are one create and may be anywhere in
the file.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import functools
import os
import shutil
import time
from collections import Counter, deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO, Literal, TypeVar

import polars as pl

from etl.clinikapi import ClinikApi
from etl.dedupe import DoseCheck
from etl.destination import Destination, Lookup, PayloadColumns
from etl.errors import ApiError, InputError, UsageError
from etl.files import (
    guard_formulas,
    private_dir,
    private_file,
    publish_file,
    scratch_dir,
    unguard_formulas,
    write_csv,
)
from etl.keyindex import KeyIndex
from etl.mapping import (
    SKIP,
    Mapped,
    Profile,
    SideFile,
    apply_profile,
    default_profile,
    key_field,
    known_header,
    load_profile,
    routed_kinds,
    side_file,
)
from etl.progress import Progress
from etl.readers import (
    REJECTS_BOOKKEEPING,
    ROW,
    Batches,
    HeaderHint,
    is_own_rejects,
    read_batches,
    read_table,
)
from etl.redaction import left_out, redact, redact_bodies
from etl.report import (
    PROBLEM_STATES,
    ROW_COLUMNS,
    SAMPLE_PER_GROUP,
    InputFacts,
    NotCarried,
    NoticeFacts,
    NotImported,
    RowWarnings,
    RunFacts,
    RunReport,
    Summary,
    count_states,
    new_run_id,
    report_output,
    report_path,
    write_summary,
)
from etl.report_html import TALLY_KEYS, tally_of, write_html
from etl.rules import RULES, format_text
from etl.settings import Settings
from etl.transform import Planned, not_carried, plan, references
from etl.validate import Carry, Validation, precheck, prepare, validate, warm_up
from schemas.canonical import KIND_SPECS, fields_of

if TYPE_CHECKING:
    from etl.load.state import StateStore

__all__ = [
    "Run",
    "base_rows",
    "created_in_store",
    "header_hint",
    "planned_in_batches",
    "read_crosswalk",
    "redact",
    "reject_document_siblings",
    "rejects_frame",
    "run_profile",
    "validate_in_batches",
]

_ALIASES = {"kind": pl.String, "value": pl.String, "alias": pl.String}
_KIND_KEY = {"kind": pl.String, "source_key": pl.String}
_PENDING = [ROW, "source_file", "row_kind", "source_key", "row_key", "field", "column", "kind", "value", "key"]


_Item = TypeVar("_Item")


@dataclass
class _Input:
    """One input file on its way through the batches."""

    order: int  # position among the inputs (command-line order; a file's routed kinds follow it)
    batches: Batches
    mapped: Mapped  # the profile applied to the header: no rows
    carry: Carry = field(default_factory=Carry)
    rows: int = 0
    parts: list[Path] = field(default_factory=list)  # report rows, a file per batch
    reject_parts: list[Path] = field(default_factory=list)
    reject_spans: dict[Path, tuple[int, int]] = field(default_factory=dict)  # a part's rejects.csv lines (_LinesFile)
    on_disk: set[Path] = field(default_factory=set)  # parts written as IPC (_batch: the ones read back)
    # code -> (count, first rows, first distinct cells: column and value)
    warnings: dict[str, tuple[int, list[int], list[dict[str, str | None]]]] = field(default_factory=dict)
    held: list[pl.DataFrame] = field(default_factory=list)  # source cells of rows that may still be rejected
    looked_up: dict[str, dict[str, str]] = field(default_factory=dict)  # field -> value -> what a side file says

    @property
    def file(self) -> str:
        return str(self.mapped.table.path)

    @property
    def kind(self) -> str:
        return self.mapped.kind

    def frames(self) -> Iterator[pl.DataFrame]:
        if self.kind == "document":  # a document's sections may be anywhere in the file
            yield pl.concat(list(self.batches.batches))
        else:
            yield from self.batches.batches

    def prepared(self, today: dt.date) -> Iterator[tuple[Mapped, pl.DataFrame]]:
        """Each batch mapped and prepared, the next one read and prepared on a second thread meanwhile.

        Reading, preparing and the rules that read one row alone (:func:`precheck`) need nothing
        from earlier batches, so they overlap with the checks that do (polars lets go of the GIL);
        one batch ahead at most, so memory stays bounded.
        """

        def ready(frame: pl.DataFrame) -> tuple[Mapped, pl.DataFrame]:
            mapped = self.mapped.with_rows(frame)
            if self.looked_up:  # an id another file of the export explains (an organization's name)
                mapped = replace(mapped, frame=mapped.frame.with_columns(
                    pl.col(name).replace(values) for name, values in self.looked_up.items()
                ))
            prepared = prepare(mapped, today=today)
            return mapped, precheck(prepared, self.kind, today=today, severity=mapped.profile.rules)

        # Three stages, each on its own thread: reading (a third of what preparing costs), preparing, and
        # the caller's checks; on one thread with preparing, the batches after a read waited for both.
        yield from _ahead(map(ready, _ahead(self.frames(), "read")), "prepare")


def _ahead(items: Iterator[_Item], name: str) -> Iterator[_Item]:
    """``items``, each next one made on a thread of its own (``name``) while the caller works on the last:
    one ahead at most, so memory stays bounded."""
    with ThreadPoolExecutor(1, thread_name_prefix=name) as pool:
        coming = pool.submit(next, items, None)
        while (item := coming.result()) is not None:
            coming = pool.submit(next, items, None)
            yield item


@dataclass
class _Written:
    """A batch's report rows already written as ``rows.csv`` lines (no header), with what the summary needs
    of them."""

    span: tuple[int, int]  # where its lines are in the writer's lines file (_RowsWriter.lines): start, end
    counts: pl.DataFrame  # kind, state, len
    problems: pl.DataFrame  # the first rows in a problem state of each (state, code, column): _sampled
    tally: pl.DataFrame  # how many there are of each (tally_of)


def _rows_csv(rows: pl.DataFrame, lines: _LinesFile) -> _Written:
    """Append a batch's ``rows.csv`` lines to ``lines``."""
    rows = rows.rename({"patient_key": "patient_id"}).select(ROW_COLUMNS)
    span = lines.append(functools.partial(rows.pipe(guard_formulas).write_csv, include_header=False))
    problems = rows.filter(pl.col("state").is_in(PROBLEM_STATES))
    return _Written(span, rows.group_by("kind", "state").len(), _sampled(problems), tally_of(problems))


def _sampled(problems: pl.DataFrame) -> pl.DataFrame:
    """The first :data:`SAMPLE_PER_GROUP` rows of each (file, state, code, column), in order.

    What the summary, the CLI and report.html list; a file whose every row is rejected is then
    held in memory as a few hundred rows per reason, not as itself.
    """
    return problems.filter(pl.int_range(pl.len()).over(TALLY_KEYS) < SAMPLE_PER_GROUP)


class _RowsWriter:
    """Writes each batch's rows.csv lines on a thread while the next batch is checked.

    One batch in flight at most, so memory stays bounded. The lines go to one file (:attr:`lines`, the
    header first), in the order they are written, and each part's place there is kept: when every part
    was written once, in order, the file is ``rows.csv`` as it is (renamed into the report, nothing
    copied); otherwise the report copies the parts' spans in order (:meth:`_LinesFile.publish`). A part
    that the end of a stage rewrites (late rejections) is written again, after the others. The batches'
    ``rejects.csv`` lines go to a second such file (:attr:`rejects`).
    """

    def __init__(self, enabled: bool, work: Path, *, parts_read: bool = True) -> None:
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="rows-csv")
        self.parts_read = parts_read  # whether the run reads every part back (a load, matching): each is kept as IPC
        self._last: Future[_Written | None] | None = None
        self.written: dict[Path, Future[_Written]] = {}
        self.enabled = enabled  # not when a load will change the rows: they are written once, at the end
        self.lines = _LinesFile(work / "rows.csv.lines", _ROWS_HEADER)
        self.rejects = _LinesFile(work / "rejects.csv.lines")  # the batches' rejects.csv lines (_write_rejects_part)

    def submit(
        self, part: Path, rows: pl.DataFrame, then: Callable[[], object] | None = None, *, ipc: bool = True,
        csv: bool | None = None,
    ) -> None:
        """Write a batch's report rows (IPC; not with ``ipc=False``, a part already written), then ``then`` (its
        rejects), then its rows.csv lines (``csv``: whether or not the batches' are, a load's once its
        outcomes are in), on the thread; a failure of the batch before is raised here."""
        self.flush()  # one at a time
        csv = self.enabled if csv is None else csv

        def write() -> _Written | None:
            if ipc:
                rows.write_ipc(part)
            if then is not None:
                then()
            return _rows_csv(rows, self.lines) if csv else None

        self._last = self._pool.submit(write)
        if csv:
            self.written[part] = self._last  # type: ignore[assignment]

    def flush(self) -> None:
        """Wait for the batch in flight (its parts are read after this)."""
        if self._last is not None:
            self._last.result()

    def forget(self, part: Path) -> None:
        """The part changed after it was written."""
        future = self.written.pop(part, None)
        if future is not None:
            future.result()

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        self.lines.close()
        self.rejects.close()


class _LinesFile:
    """A report file's lines, appended as the batches are written (on the rows writer's thread), each batch's
    span kept; in a scratch folder of the run's own, where nothing can have been planted.

    The report then takes the file as it is when it holds the spans it wants, in order, after the header it
    wants (renamed into place: nothing copied), or copies the spans in order after that header (:meth:`publish`).
    """

    def __init__(self, path: Path, header: bytes | None = None) -> None:
        self.path = path
        self.header = header  # None: the first append's (_LinesFile.append)
        self._out: BinaryIO | None = None

    def append(self, write: Callable[[BinaryIO], object], header: bytes | None = None) -> tuple[int, int]:
        """Append what ``write`` writes to the file; its span. ``header``: what the file starts with when this makes
        it (when it was not given at first)."""
        if self._out is None:
            self._out = self.path.open("xb")
            self.header = self.header if self.header is not None else header or b""
            self._out.write(self.header)
        start = self._out.tell()
        write(self._out)
        return start, self._out.tell()

    def publish(self, header: bytes, parts: list[tuple[int, int] | Callable[[BinaryIO], object]], path: Path) -> None:
        """Write ``path``: ``header``, then each of ``parts`` in order, a span of this file or a writer of its own."""
        size = 0
        if self._out is not None:
            size = self._out.tell()
            self._out.close()
            self._out = None
        spans = [p for p in parts if isinstance(p, tuple)]
        if size and self.header == header and len(spans) == len(parts):
            ends = [len(header), *(end for _, end in spans)]
            if all(start == end for (start, _), end in zip(spans, ends, strict=False)) and ends[-1] == size:
                publish_file(self.path, path)  # every part once, in order: the file is the report's
                return
        with private_file(path) as out, contextlib.ExitStack() as stack:
            out.write(header)
            source = stack.enter_context(self.path.open("rb")) if spans else None
            for part in parts:
                if isinstance(part, tuple):
                    assert source is not None
                    _append_file(source, out, *part)
                else:
                    part(out)

    def close(self) -> None:
        """Let go of the file, unpublished (a run that stopped): what it holds no longer matters, and a disk that
        filled up is reported where the run stopped, not here."""
        if self._out is not None:
            out, self._out = self._out, None
            with contextlib.suppress(OSError):
                out.close()


_ROWS_HEADER = (",".join(ROW_COLUMNS) + "\n").encode()
_EXAMPLES = 3  # cells a warning's summary quotes (RowWarnings.examples)
_PAYLOAD_WORKERS = 2  # parts of payloads.ndjson built at once
_HELD_BYTES = 48 * 1024 * 1024  # creates' parts kept in memory, not written, at most (_Payloads)
_AT = "__at"  # a create's position in its part


def _lines_of(part: Path) -> Path:
    """Where a part's ``payloads.ndjson`` lines are (a dry run's :attr:`_Payloads.lines`)."""
    return part.with_suffix(".ndjson")


def _append_file(source: BinaryIO, out: BinaryIO, start: int = 0, end: int | None = None) -> None:
    """Append ``source`` (its bytes from ``start`` to ``end``, the whole of it by default) to ``out``: copied by
    the kernel where it can (no pass through a buffer of this process: half the copying of hundreds of
    megabytes), else read and written."""
    out.flush()
    end = os.fstat(source.fileno()).st_size if end is None else end
    at = start
    try:
        while at < end:
            done = os.copy_file_range(source.fileno(), out.fileno(), end - at, at)
            if done == 0:
                break
            at += done
    except OSError:  # not a file the kernel copies into (another file system, a pipe ...): the usual way
        pass
    if at < end:
        source.seek(at)
        while at < end and (chunk := source.read(min(1 << 20, end - at))):
            out.write(chunk)
            at += len(chunk)


def _copy_lines(
    lines: Path, kept: pl.Series, total: int, out: BinaryIO, remover: ThreadPoolExecutor | None = None
) -> Future[None] | None:
    """Append the ``kept`` lines (their positions) of a file of ``total`` ``payloads.ndjson`` lines to ``out``,
    in order: the file as it is when every line is kept (the usual case: nothing withdrawn from it). The file
    is removed once appended: the scratch folder and the report then hold each line once, not twice (670 MB
    for a 1,000,000-row registry), and the system reuses its pages for the lines appended next.

    ``remover``: a thread that removes it (the future of that), while the next file is appended. Removed at
    once, a file just appended took ext4 as long as appending it, sometimes four times as long (0.6-2.6 s of a
    1,000,000-row dry run's end, with nothing else to do)."""
    try:
        _copy_kept_lines(lines, kept, total, out)
    except BaseException:
        lines.unlink(missing_ok=True)
        raise
    if remover is None:
        lines.unlink(missing_ok=True)
        return None
    return remover.submit(lines.unlink, missing_ok=True)


def _copy_kept_lines(lines: Path, kept: pl.Series, total: int, out: BinaryIO) -> None:
    if kept.len() == total:
        with lines.open("rb") as fh:
            _append_file(fh, out)
        return
    if kept.is_empty():
        return
    # Some lines withdrawn: the file read back as one text column, a line a row. A line is JSON (no raw control
    # character: each is escaped), so no separator nor quote splits it; the count is checked all the same.
    text = pl.read_csv(lines, has_header=False, separator="\x1f", quote_char=None, schema={"line": pl.String})
    if text.height != total:
        raise ValueError(f"{lines}: {text.height} lines for {total} creates")
    text.select(pl.col("line").gather(kept.sort())).write_csv(
        out, include_header=False, quote_style="never", line_terminator="\n"
    )


class _Payloads:
    """A dry run's ``payloads.ndjson``, planned a batch at a time.

    Each batch's creates (its rows' bodies, and the patients and practitioners its rows describe)
    go to a part on disk, by stage; a key already planned by an earlier batch is not planned again
    (the first row wins). Rows that the end of a stage rejects are
    withdrawn, and their lines left out when the parts are joined, stage by stage, at the end.
    A batch's creates are kept on a worker thread, in batch order, while the next batch is validated.

    A dry run whose creates nothing else reads (no matching: ``matched``) writes each part's
    ``payloads.ndjson`` lines on that worker thread, while the next batch is validated
    (:meth:`Destination.payload_columns`, to a file beside the part, which keeps only ``kind, source_key``:
    what a withdrawal names), so the end appends those files, stage by stage.
    """

    def __init__(
        self, work: Path, destination: Destination, *, dry_run: bool = False, matched: bool = False,
        redacted: bool = False, earlier: bool = False,
    ) -> None:
        self.work = work
        self.destination = destination
        # A dry run over an earlier run's state store (``earlier``) previews what a load would skip or find
        # changed (:func:`_created_earlier`): its bodies are hashed, and planned as a load's are.
        self.earlier = earlier
        # What the batches' plan (etl.transform.plan) builds: a dry run hashes no body (only a load's state
        # store compares hashes), and its bodies show their references readable, as its lines do, unless
        # matching reads their placeholders (``matched``).
        self.hashes = not dry_run or earlier
        self.readable = dry_run and not matched and not earlier and destination.shows_readable_refs
        self.lines = dry_run and not matched  # each part's lines written as it is kept (_lines_of)
        self.redacted = redacted  # the lines' bodies redacted (--redact)
        self.lines_in: dict[Path, int] = {}  # a part (with lines) -> how many lines its file of lines holds
        self.parts: dict[int, list[Path]] = {}
        # Parts kept in memory, not written, while they hold at most _HELD_BYTES in all (a run of a batch or
        # two, a weekly re-import: read back at once); the rest are written (memory stays bounded).
        self.held: dict[Path, pl.DataFrame] = {}
        self._held_bytes = 0
        self.planned: dict[str, KeyIndex] = {}
        self.withdrawn: list[pl.DataFrame] = []
        self._pool: ThreadPoolExecutor | None = None
        self._adding: deque[Future[None]] = deque()

    def add(self, x: _Input, n: int, creates: list[tuple[str, pl.DataFrame]]) -> None:
        """A batch's creates (:meth:`Destination.plan_batch`), a frame per kind: kept by one worker thread
        (so in order) while the next batch is validated, one batch at a time (memory stays bounded)."""
        while self._adding:
            self._adding.popleft().result()
        if self._pool is None:
            self._pool = ThreadPoolExecutor(1, thread_name_prefix="payload-parts")
        self._adding.append(self._pool.submit(self._add, x.order, n, creates))

    def _settled(self) -> None:
        """Every batch added is kept (an error keeping one is raised here: a full disk names the report folder)."""
        with report_output(self.work.parent):  # the parts are kept under the report folder
            while self._adding:
                self._adding.popleft().result()
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None

    def _add(self, order: int, n: int, creates: list[tuple[str, pl.DataFrame]]) -> None:
        for i, (kind, frame) in enumerate(creates):
            index = self.planned.setdefault(kind, KeyIndex())
            # One create per key, even when two rows of a batch share it (a natural key): the first row's.
            # (The frame is copied, bodies and all, only when a key repeats or was planned before.)
            if frame.get_column("source_key").is_duplicated().any():
                frame = frame.unique("source_key", keep="first", maintain_order=True)
            found = index.insert(frame.select(pl.col("source_key").alias("key"))).get_column("found")
            fresh = frame.filter(~found) if found.any() else frame
            if fresh.height:
                stage = self.destination.stage(kind)
                part = self.work / f"payloads-{stage}-{order:04d}-{n:06d}-{i}.ipc"
                frame = fresh.with_columns(pl.lit(kind).alias("kind"))
                if self.lines:  # its lines beside it, as payloads.ndjson has them; the part: what a withdrawal names
                    self._write_lines(part, frame)
                    frame = frame.select("kind", "source_key")
                size = int(frame.estimated_size())
                if self._held_bytes + size <= _HELD_BYTES:
                    self.held[part] = frame
                    self._held_bytes += size
                else:
                    frame.write_ipc(part)
                self.parts.setdefault(stage, []).append(part)

    def _write_lines(self, part: Path, frame: pl.DataFrame) -> None:
        """A part's creates as their ``payloads.ndjson`` lines, in order, in a file beside it (:func:`_lines_of`)."""
        self._text(frame, redacted=self.redacted).write(_lines_of(part))  # (in the run's private scratch folder)
        self.lines_in[part] = frame.height

    def _text(self, creates: pl.DataFrame, *, redacted: bool) -> PayloadColumns:
        """Creates as their ``payloads.ndjson`` lines (bodies ``redacted`` or not)."""
        if redacted:
            creates = creates.with_columns(redact_bodies(pl.col("body")))
        return self.destination.payload_columns(creates.select("kind", "source_key", ROW, "body"))

    def withdraw(self, kind: str, keys: pl.Series) -> None:
        self.withdrawn.append(pl.DataFrame({"kind": kind, "source_key": keys}, schema=_KIND_KEY))

    def stages(self) -> Iterator[tuple[int, Iterator[pl.DataFrame]]]:
        """Each stage, in order, with its creates a part at a time (kind, source_key, __row, body,
        body_hash, source_file; with :attr:`lines`, kind and source_key only: the lines are in a file beside),
        those withdrawn left out."""
        for stage, parts in self._stages():
            yield stage, (frame for _, frame in parts)

    def _stages(self, *, positions: bool = False) -> Iterator[tuple[int, Iterator[tuple[Path, pl.DataFrame]]]]:
        """:meth:`stages`, each part with its path (``positions``: and each create's position in it, ``_AT``)."""
        self._settled()
        withdrawn = pl.concat(self.withdrawn) if self.withdrawn else pl.DataFrame(schema=_KIND_KEY)

        def parts(stage: int) -> Iterator[tuple[Path, pl.DataFrame]]:
            for part in self.parts[stage]:
                frame = self.held[part] if part in self.held else pl.read_ipc(part)
                frame = frame.with_row_index(_AT) if positions else frame
                # (nothing withdrawn, the usual case: the part as it is, its bodies not copied by a join)
                yield part, frame.join(withdrawn, on=["kind", "source_key"], how="anti") if withdrawn.height else frame

        for stage in sorted(self.parts):
            yield stage, parts(stage)

    def write(self, path: Path, *, redacted: bool = False) -> dict[str, int]:
        """``payloads.ndjson``, stage by stage (bodies ``redacted`` or not); the number of creates per kind."""
        counts: dict[str, int] = {}
        text = functools.partial(self._text, redacted=redacted)
        if self.lines:  # the parts' lines are written already (as the batches went): copied, stage by stage
            if redacted != self.redacted:
                raise ValueError("the lines were built redacted" if self.redacted else "the lines were built plain")
            removed: list[Future[None] | None] = []
            with private_file(path) as fh, ThreadPoolExecutor(1, thread_name_prefix="scratch-removal") as remover:
                try:
                    for _, stored in self._stages(positions=True):
                        for part, keys in stored:
                            for kind, n in keys.group_by("kind", maintain_order=True).len().iter_rows():
                                counts[kind] = counts.get(kind, 0) + n
                            removed.append(
                                _copy_lines(_lines_of(part), keys.get_column(_AT), self.lines_in[part], fh, remover)
                            )
                finally:
                    for done in removed:  # every file appended is gone (a failure to remove one is raised here)
                        if done is not None:
                            done.result()
            return counts
        # The lines of a part are built at once (Destination.payload_columns), two parts at a time on
        # worker threads (polars lets go of the GIL), and written by polars in order as they are ready.
        with private_file(path) as fh, ThreadPoolExecutor(_PAYLOAD_WORKERS, thread_name_prefix="payloads") as pool:
            ready: deque[Future[PayloadColumns]] = deque()
            for _, parts in self.stages():
                for lines in parts:
                    for kind, n in lines.group_by("kind", maintain_order=True).len().iter_rows():
                        counts[kind] = counts.get(kind, 0) + n
                    ready.append(pool.submit(text, lines))
                    if len(ready) > _PAYLOAD_WORKERS:  # at most this many parts held beside the one written
                        ready.popleft().result().write(fh)
            while ready:
                ready.popleft().result().write(fh)
        return counts


@dataclass
class _Keys:
    """What later rows need to know about earlier ones (see the module's notes)."""

    referenced: frozenset[str]  # kinds some input refers to
    shared: frozenset[str]  # kinds more than one input holds
    available: dict[str, KeyIndex] = field(default_factory=dict)
    tentative: dict[str, KeyIndex] = field(default_factory=dict)  # planned, but may yet be rejected
    rejected: dict[str, KeyIndex] = field(default_factory=dict)
    firsts: dict[str, KeyIndex] = field(default_factory=dict)  # kind -> source_key: first_file, first_row
    aliases: pl.DataFrame = field(default_factory=lambda: pl.DataFrame(schema=_ALIASES))
    payloads: _Payloads | None = None  # a dry run's or a load's creates, planned as the batches go
    known: dict[tuple[str, str], str] = field(default_factory=dict)  # (kind, reference) -> id, from outside the run
    state: StateStore | None = None  # a reference to what an earlier run created is explained
    lookup: Lookup | None = None  # a real load: which (kind, id) the target has, for what nothing else explains
    resolves: bool = True  # references must resolve in the run (not for Redox: see Destination)
    doses: DoseCheck = field(default_factory=DoseCheck)  # the doses the run's rows hold so far


    def _add(self, store: dict[str, KeyIndex], kind: str, keys: pl.Series) -> None:
        if kind in self.referenced:
            store.setdefault(kind, KeyIndex()).add_keys(keys)

    def add_available(self, kind: str, keys: pl.Series) -> None:
        self._add(self.available, kind, keys)

    def add_tentative(self, kind: str, keys: pl.Series) -> None:
        self._add(self.tentative, kind, keys)

    def add_rejected(self, kind: str, keys: pl.Series) -> None:
        self._add(self.rejected, kind, keys)

    def withdraw(self, kind: str, keys: pl.Series) -> None:
        """Keys whose rows were rejected after they were planned."""
        if kind in self.available:
            self.available[kind].remove(keys)
        self.add_rejected(kind, keys)
        if self.payloads is not None:
            self.payloads.withdraw(kind, keys)

    @staticmethod
    def has(store: dict[str, KeyIndex], refs: pl.DataFrame, column: str) -> pl.Series:
        """Whether each reference's ``column`` is in the store under the reference's kind."""
        found = pl.Series("found", [False] * refs.height, dtype=pl.Boolean)
        if refs.is_empty():
            return found
        for kind, index in store.items():
            mine = (refs.get_column("kind") == kind).fill_null(False)
            if mine.any():
                found = found | (mine & index.contains(refs.get_column(column)))
        return found


def validate_in_batches(
    paths: Sequence[str | Path],
    settings: Settings,
    progress: Progress,
    *,
    batch_rows: int | None = None,
    payloads: bool = False,
    state: StateStore | None = None,
    destination: Destination | None = None,
    matcher: Callable[[Run], None] | None = None,
) -> RunReport:
    """Validate inputs a batch at a time; write the report (the entry point is ``validate_files``).

    ``payloads``: plan the creates too and write ``payloads.ndjson``, a dry run's report
    (``load_files`` with ``dry_run``); ``state``: the state store, whose created keys
    explain references.
    """
    with planned_in_batches(
        paths, settings, progress, batch_rows=batch_rows, payloads=payloads, state=state, destination=destination,
        matcher=matcher, dry_run=payloads,
    ) as run:
        if run.keys.payloads is not None:
            with report_output(run.folder):
                counts = run.keys.payloads.write(run.folder / "payloads.ndjson", redacted=settings.redact)
            planner = run.keys.payloads.destination
            run.timings.update(planner.timings())
            planned = planner.run_facts().updated(RunFacts(requests_planned=planner.requests_planned(counts)))
            return run.write(planned, command="load", target=planner.dry_run_target(settings))
        return run.write(RunFacts(), command="validate", target="none (validate)")


@dataclass
class Run:
    """A run planned in batches (:func:`planned_in_batches`): its report rows are on disk, a part per batch."""

    run_id: str
    t0: float
    timings: dict[str, float]
    settings: Settings
    inputs: list[_Input]
    keys: _Keys
    folder: Path
    work: Path
    writer: _RowsWriter
    sides: list[_Side] = field(default_factory=list)  # files read but not imported
    facts: RunFacts = field(default_factory=RunFacts)  # what a step between plan and send adds (matching)
    halt: ApiError | None = None  # a refusal met before sending (matching's reads hit a quota): nothing is sent

    def add_facts(self, facts: RunFacts) -> None:
        """Facts for the summary from a step of the run (``etl.matching``)."""
        self.facts = self.facts.updated(facts)

    @property
    def parts(self) -> Iterator[Path]:
        """The report rows' parts (IPC), in input order."""
        return (p for x in self.inputs for p in x.parts)

    def link_duplicates(self) -> None:
        """After a load: a dose given twice in the run's files (``exists``, :class:`etl.dedupe.DoseCheck`)
        shows the id its first row's dose has."""
        dups = self.keys.doses.duplicates()
        if dups.is_empty():
            return
        wanted = dups.select(pl.col("first_file").alias("source_file"), pl.col("first_row").alias("source_row"))
        firsts = (
            pl.scan_ipc(list(self.parts))
            .select("source_file", pl.col("source_row").cast(pl.UInt32), "resource_id")
            .join(wanted.unique().lazy(), on=["source_file", "source_row"], how="semi")
            .collect()
        )
        link = dups.join(
            firsts.rename({"source_file": "first_file", "source_row": "first_row", "resource_id": "first_id"}),
            on=["first_file", "first_row"], how="inner",
        ).select("source_file", "source_row", "first_id")
        for part in list(self.parts):
            rows = pl.read_ipc(part)
            if not rows.join(link, on=["source_file", "source_row"], how="semi").height:
                continue
            mine = pl.col("state") == "exists"
            rows = rows.join(link, on=["source_file", "source_row"], how="left", maintain_order="left").with_columns(
                pl.when(mine).then(pl.coalesce("resource_id", "first_id")).otherwise(pl.col("resource_id"))
                .alias("resource_id")
            ).drop("first_id")
            self.rewrite(part, rows)

    def rewrite(self, part: Path, rows: pl.DataFrame) -> None:
        """A part's rows changed (a load's outcomes): its IPC copy written again, and its rows.csv lines on the
        writer's thread while the run goes on (the report waits for them)."""
        self.writer.forget(part)
        rows.write_ipc(part)  # here: the run reads the parts next
        self.writer.submit(part, rows, ipc=False, csv=True)

    def write(self, facts: RunFacts, *, command: Literal["validate", "load"], target: str) -> RunReport:
        """The report, from the parts; ``facts``: what this kind of run adds to its summary."""
        self.timings["total"] = time.perf_counter() - self.t0
        facts = self.facts.updated(facts)
        with report_output(self.folder):
            return _write(self.run_id, self.inputs, self.folder, self.settings, self.timings, self.writer, facts,
                          command=command, target=target, sides=self.sides)


@contextlib.contextmanager
def planned_in_batches(
    paths: Sequence[str | Path],
    settings: Settings,
    progress: Progress,
    *,
    batch_rows: int | None = None,
    payloads: bool = False,
    state: StateStore | None = None,
    lookup: Lookup | None = None,
    rows_csv: bool = True,
    run_id: str | None = None,
    destination: Destination | None = None,
    matcher: Callable[[Run], None] | None = None,
    dry_run: bool = False,
) -> Iterator[Run]:
    """Validate and plan inputs a batch at a time; the run, its parts on disk until the block ends.

    ``lookup``: which (kind, id) pairs the target holds, asked at the end of a stage about the
    references nothing else explains (a real load). ``rows_csv``: write each batch's rows.csv
    lines as it goes (not when a load will change them). ``destination``: where the creates go
    (ClinikAPI by default), asked to refuse the inputs it cannot take before a row is read.
    ``matcher``: called with the planned run before it is handed over (:class:`etl.matching.Matcher`:
    what the target holds already is linked, sent to review or left out of the creates). ``dry_run``: the
    creates (``payloads``) are for a dry run's ``payloads.ndjson``, never sent (no body hashes, readable
    references: :class:`_Payloads`).
    """
    destination = destination or ClinikApi()
    run_id, timings = run_id or new_run_id(), dict[str, float]()
    t0 = time.perf_counter()
    profile = run_profile(settings)
    rows_per_batch = batch_rows or settings.batch_rows_for(creates=payloads)
    settings = settings.model_copy(update={"batch_rows": rows_per_batch})  # what the summary says it took
    inputs: list[_Input] = []
    sides: list[_Side] = []
    hint = header_hint(settings, profile)
    for path in paths:
        batches = read_batches(
            path, sheet=settings.sheet, rows=rows_per_batch, limits=settings.workbook_limits, header=hint
        )
        side = side_file(batches.table, profile)
        if side is not None:
            sides.append(_read_side(batches, side))
            continue
        mapped = apply_profile(batches.table, profile)
        inputs.append(_Input(len(inputs), batches, mapped))
        destination.check(mapped)
        for kind in routed_kinds(mapped):
            # A profile's [[route]] sends some of the file's rows to another kind: the file is read
            # once more for them, and each input keeps only its own rows (each row ends in one of them).
            again = read_batches(
                path, sheet=settings.sheet, rows=rows_per_batch, limits=settings.workbook_limits, header=hint
            )
            inputs.append(_Input(len(inputs), again, apply_profile(again.table, profile, kind)))
            destination.check(inputs[-1].mapped)
    for x in inputs:
        for found in sides:
            if found.side.kind == x.kind and found.side.field is not None and found.values:
                x.looked_up.setdefault(found.side.field, {}).update(found.values)
    inputs.sort(key=lambda x: KIND_SPECS[x.kind].stage)
    known = read_crosswalk(settings.crosswalk)
    keys = _Keys(
        referenced=frozenset(f.ref for x in inputs for f in fields_of(x.kind) if f.ref),
        shared=frozenset(k for k, n in Counter(x.kind for x in inputs).items() if n > 1),
        known=known,
        state=state,
        lookup=lookup,
    )
    known_frame = pl.DataFrame(list(known), schema={"kind": pl.String, "value": pl.String}, orient="row")
    folder = report_path(settings.report_dir, run_id)
    private_dir(folder)
    work = scratch_dir(folder, ".batches-")  # made afresh: nothing planted in an earlier run's can be followed
    # A validation or a dry run without matching reads a part back only when its stage's end may change it.
    writer = _RowsWriter(rows_csv, work, parts_read=not rows_csv or matcher is not None or (payloads and not dry_run))
    keys.payloads = _Payloads(
        work, destination, dry_run=dry_run, matched=matcher is not None, redacted=settings.redact,
        earlier=dry_run and state is not None,
    ) if payloads else None
    keys.resolves = destination.resolves_references
    today = dt.date.today()  # one date for every batch, though the run may pass midnight
    warm_up()
    if state is not None and payloads and not dry_run:
        # What a load asks of the store (a re-import: every record it made), read while the batches are.
        kinds = [*(x.kind for x in inputs), *sorted(keys.referenced)]
        state.read_ahead(kinds, asked=sum(x.batches.rows for x in inputs))
    try:
        pending: list[pl.DataFrame] = []
        progress.start("read")
        for x in inputs:
            for n, (mapped, prepared) in enumerate(x.prepared(today)):
                progress.advance("read", prepared.height)
                progress.start("validate", prepared.height)
                with report_output(folder):  # each batch's rows are kept under the report folder until the end
                    unexplained = _batch(
                        x, n, mapped, prepared, keys, known_frame, settings, work, timings, writer, today, progress
                    )
                if unexplained is not None:
                    pending.append(unexplained)
            if x.kind in keys.shared:
                with report_output(folder):
                    writer.flush()
                _remember_firsts(x, keys)
        with report_output(folder):
            writer.flush()  # every part is on disk before a stage's end reads them
        progress.finish("read")
        unexplained = pl.concat(pending) if pending else None
        for stage in sorted({KIND_SPECS[x.kind].stage for x in inputs}):
            members = [x for x in inputs if KIND_SPECS[x.kind].stage == stage]
            if unexplained is not None:
                mine = pl.col("source_file").is_in([x.file for x in members])
                here = unexplained.filter(mine & pl.col("row_kind").is_in([x.kind for x in members]))
                _settle(members, here, keys, work, writer)
        progress.finish("validate")
        run = Run(run_id, t0, timings, settings, inputs, keys, folder, work, writer, sides)
        if matcher is not None:
            with report_output(folder):
                matcher(run)
        yield run
    finally:
        writer.close()
        shutil.rmtree(work, ignore_errors=True)


@dataclass
class _Side:
    """A side file of an export (:class:`etl.mapping.SideFile`), read but not imported."""

    file: str
    columns: list[str]
    side: SideFile
    rows: int
    values: dict[str, str]  # a lookup table's key -> value


def _read_side(batches: Batches, side: SideFile) -> _Side:
    """Count a side file's rows, a batch at a time; keep a lookup table's pairs."""
    table = batches.table
    by_name = {c.strip().lower(): c for c in table.columns}
    key = by_name.get((side.key or "").lower())
    value = by_name.get((side.value or "").lower())
    rows, values = 0, dict[str, str]()
    for frame in batches.batches:
        rows += frame.height
        if key is not None and value is not None:
            pairs = frame.select(key, value).drop_nulls()
            values.update(zip(pairs.get_column(key).to_list(), pairs.get_column(value).to_list(), strict=True))
    return _Side(str(table.path), table.columns, side, rows, values)


def _not_carried(inputs: list[_Input], sides: list[_Side]) -> dict[str, list[NotCarried]]:
    """Every file's columns that no payload carries, in full (summary.json's ``not_carried``)."""
    out: dict[str, list[NotCarried]] = {}
    for x in sorted(inputs, key=lambda x: x.order):
        gone = [NotCarried(column=c, reason=why) for c, why in not_carried(x.mapped)]
        if gone:
            out[x.file] = gone
    for found in sides:
        used = {found.side.key, found.side.value} if found.values else set()
        why = "no API field" if used else "file not imported"
        gone = [NotCarried(column=c, reason=why) for c in found.columns if c not in used]
        if gone:
            out[found.file] = gone
    return out


def _batch(
    x: _Input,
    n: int,
    mapped: Mapped,
    prepared: pl.DataFrame,
    keys: _Keys,
    known: pl.DataFrame,
    settings: Settings,
    work: Path,
    timings: dict[str, float],
    writer: _RowsWriter,
    today: dt.date,
    progress: Progress,
) -> pl.DataFrame | None:
    """Validate, plan and report one batch; return its references that nothing explains yet (None: a
    destination whose references need not resolve)."""
    t0 = time.perf_counter()
    validation = validate(mapped, carry=x.carry, prepared=prepared, today=today)
    t1 = time.perf_counter()
    progress.advance("validate", prepared.height)
    progress.start("transform", validation.valid.height)
    payloads = keys.payloads
    planned = plan(mapped, validation.valid, bodies=payloads is not None and payloads.destination.builds_bodies,
                   hashes=payloads is not None and payloads.hashes, readable=payloads is not None and payloads.readable)
    if planned.practitioners.height and keys.aliases.height:
        # A performer named without an NPI whom a providers file of the run has (by name) is that
        # practitioner: the row refers to it through the alias, and nothing is created from the row.
        named = keys.aliases.filter(pl.col("kind") == "practitioner").select(pl.col("value").alias("practitioner_key"))
        planned.practitioners = planned.practitioners.join(named, on="practitioner_key", how="anti")
    progress.advance("transform", validation.valid.height)
    timings["validate"] = timings.get("validate", 0.0) + t1 - t0
    timings["transform"] = timings.get("transform", 0.0) + time.perf_counter() - t1
    if settings.redact:
        redact(mapped, validation)
    rows = _skip_seen(base_rows(mapped, validation, planned), keys.firsts.get(x.kind))
    if x.kind == "immunization" and settings.dedupe_doses:  # the same dose twice in the run's files
        rows = keys.doses.mark(rows, validation.valid, x.file)
    if payloads is not None:
        rows, creates = payloads.destination.plan_batch(mapped, validation.valid, planned, rows)
        if payloads.earlier and keys.state is not None:  # a dry run: what a load would skip, or find changed
            rows, creates = _created_earlier(keys.state, x.kind, rows, creates, update=settings.update)
        payloads.add(x, n, creates)
    x.rows += prepared.height
    for (code,), found in validation.warnings.group_by("code", maintain_order=True):
        count, first, examples = x.warnings.get(str(code), (0, [], []))
        if len(examples) < _EXAMPLES:  # the first distinct cells (source column and value) it was raised on
            cells = found.select(pl.col("field").replace(mapped.sources).alias("column"), "value").unique(
                maintain_order=True).head(_EXAMPLES).to_dicts()
            examples = [*examples, *(c for c in cells if c not in examples)][:_EXAMPLES]
        x.warnings[str(code)] = (count + found.height, (first + found.get_column(ROW).to_list())[:20], examples)

    planned_rows = rows.filter(pl.col("state") == "planned")
    keys.add_available(x.kind, planned_rows.get_column("source_key"))
    keys.add_rejected(x.kind, rows.filter(pl.col("state") == "rejected").get_column("row_key"))
    if planned_rows.height:  # rows that describe a patient or a performer create them
        keys.add_available("patient", planned.patients.get_column("patient_key"))
        keys.add_available("practitioner", planned.practitioners.get_column("practitioner_key"))
    if planned.aliases.height:
        found_aliases = planned.aliases.select(
            pl.lit(x.kind).alias("kind"), pl.col("ref").alias("value"), pl.col("source_key").alias("alias")
        )
        keys.aliases = pl.concat([keys.aliases, found_aliases]).unique(maintain_order=True)

    unexplained = _unexplained(x, mapped, validation, planned, planned_rows, keys, known) if keys.resolves else None
    part = work / f"{x.order:04d}-{n:06d}"
    x.parts.append(part.with_suffix(".rows"))
    # The batch's files are written on the writer's thread while the next batch is checked.
    then = None
    if rows.select((pl.col("state") == "rejected").any()).item():
        x.reject_parts.append(part.with_suffix(".rejects"))
        then = functools.partial(
            _write_rejects_part, x, mapped.table.frame, rows, x.reject_parts[-1],
            _rejects_csv_columns(x, redacted=settings.redact), writer.rejects,
        )
    # Its rows as IPC too when something reads them back: a load or matching; another file of the kind (the
    # keys it planned first); its stage's end, which may reject the rows it could not explain yet.
    kept = writer.parts_read or x.kind in keys.shared or (unexplained is not None and unexplained.height > 0)
    if kept:
        x.on_disk.add(x.parts[-1])
    writer.submit(x.parts[-1], rows, then, ipc=kept)
    return unexplained


def _created_earlier(
    state: StateStore, kind: str, rows: pl.DataFrame, creates: list[tuple[str, pl.DataFrame]], *, update: bool
) -> tuple[pl.DataFrame, list[tuple[str, pl.DataFrame]]]:
    """A dry run's batch as a load would send it over ``state``: the creates an earlier run made are left out.

    As the loader decides (``etl.load.loader.Loader._run_stage``): stored as created and unchanged since (the
    same body hash, or none to compare, or no id to update), a row is ``skipped`` with its id; changed, it is
    ``changed`` (a load reports it, or patches it with ``--update``: a PATCH, not among the dry run's POST
    lines). A record an earlier run left in doubt stays planned: a load looks it up first.
    """
    from etl.load.reimport import CHANGED_SINCE, CREATED_EARLIER, created_earlier

    kept: list[tuple[str, pl.DataFrame]] = []
    mine = pl.DataFrame(schema={"source_key": pl.String, "earlier_id": pl.String, "earlier_changed": pl.Boolean})
    for made, frame in creates:
        found = created_earlier(state, made, frame.select("source_key", "body_hash")) if frame.height else None
        if found is None or found.is_empty():
            kept.append((made, frame))
            continue
        kept.append((made, frame.join(found.select("source_key"), on="source_key", how="anti", maintain_order="left")))
        if made == kind:
            found = found.select("source_key", pl.col("resource_id").alias("earlier_id"),
                                 pl.col("changed").alias("earlier_changed"))
            mine = pl.concat([mine, found])
    if mine.is_empty():
        return rows, kept
    changed = (  # a load with --update patches it: a PATCH, which a dry run does not list
        CHANGED_SINCE.replace("--update patches", "a load with --update patches") + " (not in payloads.ndjson)"
        if update else CHANGED_SINCE
    )
    hit = (pl.col("state") == "planned") & pl.col("earlier_id").is_not_null()
    rows = (
        rows.join(mine.unique("source_key", keep="first"), on="source_key", how="left", maintain_order="left")
        .with_columns(
            pl.when(hit).then(pl.when(pl.col("earlier_changed")).then(pl.lit("changed")).otherwise(pl.lit("skipped")))
            .otherwise(pl.col("state")).alias("state"),
            pl.when(hit).then(pl.col("earlier_id")).otherwise(pl.col("resource_id")).alias("resource_id"),
            pl.when(hit).then(pl.when(pl.col("earlier_changed")).then(pl.lit(changed)).otherwise(pl.lit(CREATED_EARLIER)))
            .otherwise(pl.col("message")).alias("message"),
        )
        .drop("earlier_id", "earlier_changed")
    )
    return rows, kept


def _unexplained(
    x: _Input,
    mapped: Mapped,
    validation: Validation,
    planned: Planned,
    planned_rows: pl.DataFrame,
    keys: _Keys,
    known: pl.DataFrame,
) -> pl.DataFrame:
    """A batch's references that nothing explains yet (they wait for the end of their stage)."""
    live = planned_rows.select(pl.col("source_row").alias(ROW), "source_key", "row_key")
    unexplained = references(mapped, validation.valid)
    if keys.aliases.is_empty():  # no other ids yet (most runs): a reference's key is its value
        unexplained = unexplained.with_columns(pl.col("value").alias("key"))
    else:
        unexplained = (
            unexplained.join(keys.aliases, on=["kind", "value"], how="left")
            .with_columns(pl.coalesce("alias", "value").alias("key"))
            .drop("alias")
        )
    if planned_rows.height:
        # Most references name what this very batch describes (a registry row's own patient and
        # performer): settled by a join with the batch, before any lookup in everything seen so far
        # (and before the rest is dressed for the report, so that work is done for the few left).
        here = pl.concat(
            [
                planned.patients.select(pl.lit("patient").alias("kind"), pl.col("patient_key").alias("key")),
                planned.practitioners.select(
                    pl.lit("practitioner").alias("kind"), pl.col("practitioner_key").alias("key")
                ),
            ]
        )
        unexplained = unexplained.join(here, on=["kind", "key"], how="anti")
    unexplained = unexplained.join(live, on=ROW, how="inner").with_columns(
        pl.lit(x.file).alias("source_file"),
        pl.lit(x.kind).alias("row_kind"),
        pl.col("field").replace_strict(mapped.sources, default=pl.col("field")).alias("column"),
    )
    # A reference waits for the end when nothing explains it yet, or when what explains it is a row
    # that itself waits (it may still be rejected, and then this row is parent-rejected).
    waits = ~keys.has(keys.available, unexplained, "key") | keys.has(keys.tentative, unexplained, "key")
    unexplained = unexplained.filter(waits).join(known, on=["kind", "value"], how="anti").select(_PENDING)
    if keys.state is not None and unexplained.height:
        unexplained = unexplained.join(created_in_store(keys.state, unexplained), on=["kind", "key"],
                                       how="anti")
        unexplained = _by_stored_aliases(keys, keys.state, unexplained)
    keys.add_tentative(x.kind, unexplained.get_column("source_key"))
    if unexplained.height or x.kind == "document":
        held = mapped.table.frame if x.kind == "document" else mapped.table.frame.join(unexplained, on=ROW, how="semi")
        x.held.append(held)

    return unexplained


def _by_stored_aliases(keys: _Keys, state: StateStore, unexplained: pl.DataFrame) -> pl.DataFrame:
    """``unexplained`` without the references an earlier run's aliases explain (a practitioner it keyed by
    NPI, named here by its provider id: :meth:`StateStore.aliases`). The aliases found join the run's own,
    so the loader fills those references in with the id created then."""
    bare = unexplained.filter(pl.col("key") == pl.col("value"))
    found = [
        (str(kind), ref, key)
        for (kind,), mine in bare.group_by("kind")
        for ref, key in state.aliases(str(kind), mine.get_column("value").unique().to_list()).items()
    ]
    if not found:
        return unexplained
    stored = pl.DataFrame(found, schema=_ALIASES, orient="row")
    keys.aliases = pl.concat([keys.aliases, stored]).unique(maintain_order=True)
    rekeyed = (
        unexplained.join(stored, on=["kind", "value"], how="left")
        .with_columns(pl.coalesce("alias", "key").alias("key"))
        .select(_PENDING)
    )
    return rekeyed.join(created_in_store(state, rekeyed), on=["kind", "key"], how="anti")


def _skip_seen(rows: pl.DataFrame, firsts: KeyIndex | None) -> pl.DataFrame:
    """A key an earlier file of the run planned is skipped here, naming where it was first seen."""
    if firsts is None or not len(firsts):
        return rows
    seen = pl.concat([rows, firsts.lookup(rows.get_column("source_key")).drop("found")], how="horizontal")
    dup = (pl.col("state") == "planned") & pl.col("first_file").is_not_null()
    where = format_text("same record as {} row {}", "first_file", "first_row")
    return seen.with_columns(
        pl.when(dup).then(pl.lit("skipped")).otherwise(pl.col("state")).alias("state"),
        pl.when(dup).then(where).otherwise(pl.col("message")).alias("message"),
    ).drop("first_file", "first_row")


def _remember_firsts(x: _Input, keys: _Keys) -> None:
    """After a file of a kind another input holds too: where each of its planned keys was first."""
    mine = (
        pl.scan_ipc(x.parts)
        .filter((pl.col("state") == "planned") & pl.col("source_key").is_not_null())
        .filter(pl.col("source_key").is_first_distinct())
        .select(pl.col("source_key").alias("key"), pl.col("source_file").alias("first_file"),
                pl.col("source_row").alias("first_row"))
        .collect()
    )
    firsts = keys.firsts.setdefault(x.kind, KeyIndex({"first_file": pl.String(), "first_row": pl.UInt32()}))
    firsts.add(mine)  # an earlier file's first sighting wins


def _settle(members: list[_Input], pending: pl.DataFrame, keys: _Keys, work: Path, writer: _RowsWriter) -> None:
    """Once every file is read, stage by stage: the references still unexplained become rejections."""
    refs = pending.filter(~keys.has(keys.available, pending, "key"))
    if refs.is_empty():
        for x in members:
            x.held.clear()
        return
    parent_rejected = keys.has(keys.rejected, refs, "key") | keys.has(keys.rejected, refs, "value")
    is_rejected, rest = refs.filter(parent_rejected), refs.filter(~parent_rejected)
    if keys.lookup is not None and rest.height:
        found = keys.lookup(rest.select("kind", "value").unique(maintain_order=True).rows())
        keys.known.update({pair: pair[1] for pair in found})
        there = pl.DataFrame(list(found), schema={"kind": pl.String, "value": pl.String}, orient="row")
        rest = rest.join(there, on=["kind", "value"], how="anti")
    named = {"column": pl.col("column"), "value": pl.col("value"), "kind": pl.col("kind")}
    failures = pl.concat(
        [
            frame.with_columns(pl.lit(rule.code).alias("code"), rule.message(**named).alias("message"))
            for rule, frame in ((RULES["parent-rejected"], is_rejected), (RULES["unresolved-reference"], rest))
        ]
    )
    first = (
        failures.sort("source_file", ROW, "field", "code", maintain_order=True)
        .group_by("source_file", ROW, maintain_order=True)
        .first()
        .select(
            "source_file",
            pl.col(ROW).alias("source_row"),
            "code",
            pl.col("column").alias("field_ref"),
            pl.col("message").alias("message_ref"),
            "row_kind",
        )
    )
    for x in members:
        mine = first.filter((pl.col("source_file") == x.file) & (pl.col("row_kind") == x.kind)).drop("row_kind")
        if mine.height:
            _reject_late(x, mine, keys, work, writer)
        x.held.clear()


def _reject_late(x: _Input, failures: pl.DataFrame, keys: _Keys, work: Path, writer: _RowsWriter) -> None:
    """Rewrite a file's report rows with the rejections its stage's end decided."""
    late: list[pl.DataFrame] = []
    for part in x.parts:
        if part not in x.on_disk:  # a batch whose every reference was explained: nothing of it is rejected late
            continue
        rows = pl.read_ipc(part)
        before = rows.get_column("state")
        rows = (
            rows.join(failures, on=["source_file", "source_row"], how="left", maintain_order="left")
            .with_columns(
                pl.when(pl.col("code").is_not_null())
                .then(pl.lit("rejected"))
                .otherwise(pl.col("state"))
                .alias("state"),
                pl.coalesce("code", "error_code").alias("error_code"),
                pl.coalesce("field_ref", "field").alias("field"),
                pl.coalesce("message_ref", "message").alias("message"),
            )
            .drop("code", "field_ref", "message_ref")
        )
        if x.kind == "document":
            rows = reject_document_siblings(rows)
        changed = rows.filter((pl.col("state") == "rejected") & (before != "rejected"))
        if changed.height:
            writer.forget(part)
            rows.write_ipc(part)
            late.append(changed)
    if not late:
        return
    changed = pl.concat(late)
    keys.withdraw(x.kind, changed.get_column("source_key"))
    source = pl.concat(x.held, how="diagonal_relaxed").unique(ROW, keep="first", maintain_order=True)
    rejects = rejects_frame(x.file, source, changed)
    part = work / f"{x.order:04d}-late"
    x.reject_parts.append(part.with_suffix(".rejects"))
    rejects.write_ipc(x.reject_parts[-1])


def _write(
    run_id: str,
    inputs: list[_Input],
    folder: Path,
    settings: Settings,
    timings: dict[str, float],
    writer: _RowsWriter,
    facts: RunFacts,
    *,
    command: Literal["validate", "load"],
    target: str,
    sides: list[_Side] | None = None,
) -> RunReport:
    """rows.csv, rejects.csv, summary.json and report.html, from the batches' lines and what the writer kept of
    each part (a part whose lines were not written as it went is read back from its IPC copy)."""
    counts, tallies = [], []
    problems = pl.DataFrame(schema=dict.fromkeys(ROW_COLUMNS, pl.String))
    spans: list[tuple[int, int]] = []
    for part in (p for x in inputs for p in x.parts):
        if part not in writer.written:  # its lines were not written as it went (a load's), or it changed since
            writer.submit(part, pl.read_ipc(part), ipc=False, csv=True)
        written = writer.written[part].result()
        spans.append(written.span)
        counts.append(written.counts)
        tallies.append(written.tally)
        problems = _sampled(pl.concat([problems, written.problems], how="vertical_relaxed"))
    writer.flush()
    writer.lines.publish(_ROWS_HEADER, list(spans), folder / "rows.csv")
    _write_rejects(inputs, folder, writer.rejects, redacted=settings.redact)
    held = problems.with_columns(pl.col("source_row").cast(pl.UInt32))
    tally = (
        pl.concat(tallies).group_by(TALLY_KEYS, maintain_order=True).agg(pl.col("rows").sum())
        if tallies
        else tally_of(held)
    )
    counts_frame = (
        pl.concat(counts) if counts else pl.DataFrame(schema={"kind": pl.String, "state": pl.String, "len": pl.UInt32})
    )

    warnings: list[NoticeFacts | RowWarnings] = [w for x in inputs for w in notice_facts(x.mapped)]
    warnings += [
        RowWarnings(file=x.file, code=code, rows=first, count=count, examples=examples)
        for x in inputs
        for code, (count, first, examples) in x.warnings.items()
    ]
    summary = summary_of(
        run_id,
        command=command,
        blank_rows=sum(x.batches.table.blank_rows for x in inputs),
        inputs=[input_facts(x.mapped, x.rows) for x in inputs],
        warnings=warnings,
        counts=counts_frame,
        target=target,
        settings=settings,
        timings=timings,
        facts=facts,
    )
    summary.report_dir = str(folder)
    summary.not_carried = _not_carried(inputs, sides or [])
    summary.not_imported = [
        NotImported(file=s.file, name=s.side.name, rows=s.rows, reason=s.side.reason) for s in sides or []
    ]
    report = RunReport(run_id, None, summary.to_json(), folder, held_problems=held, held_tally=tally)
    write_summary(report.summary, folder)
    write_html(report.summary, held, folder / "report.html", tally)
    return report


def _write_rejects(inputs: list[_Input], folder: Path, lines: _LinesFile, *, redacted: bool = False) -> None:
    """rejects.csv: every input's rejected rows in row order, under the union of the inputs' columns
    (but those a ``redacted`` report leaves out)."""
    own = {x.order: _rejects_csv_columns(x, redacted=redacted) for x in inputs if x.reject_parts}
    columns: list[str] = []
    for names in own.values():
        columns += [name for name in names if name not in columns]
    path = folder / "rejects.csv"
    if not columns:
        write_csv(pl.DataFrame(schema={"source_file": pl.String, "source_row": pl.UInt32, "reasons": pl.String}), path)
        return
    parts: list[tuple[int, int] | Callable[[BinaryIO], object]] = []
    for x in inputs:
        if not x.reject_parts:
            continue
        if own[x.order] == columns and all(part in x.reject_spans for part in x.reject_parts):
            # The batches' lines, written as they went (the usual case: one file, no rows rejected late).
            parts += [x.reject_spans[part] for part in x.reject_parts]
        else:
            parts.append(functools.partial(_rejects_in_row_order, x.reject_parts, columns))
    lines.publish(_rejects_header(tuple(columns)), parts, path)


@functools.cache
def _rejects_header(columns: tuple[str, ...]) -> bytes:
    """``rejects.csv``'s first line, under ``columns``."""
    return pl.DataFrame(schema=dict.fromkeys(columns, pl.String)).pipe(guard_formulas).write_csv().encode()


def _rejects_in_row_order(parts: list[Path], columns: list[str], out: BinaryIO) -> None:
    """A file's rejected rows, from its reject parts (a stage's end rejected some): merged in row order."""
    for frame in _in_row_order(parts):
        missing = [pl.lit(None, dtype=pl.String).alias(c) for c in columns if c not in frame.columns]
        frame.with_columns(missing).select(columns).pipe(guard_formulas).write_csv(out, include_header=False)


def _rejects_csv_columns(x: _Input, *, redacted: bool) -> list[str]:
    """An input's ``rejects.csv`` columns, bookkeeping ones included (:func:`_rejects_columns`: its source
    columns' names there), those a ``redacted`` report leaves out left out."""
    gone = set(left_out(x.mapped)) if redacted else set()
    source = [n for c, n in _rejects_columns(x.batches.table.columns).items() if c not in gone]
    return ["source_file", "source_row", *source, "reasons"]


def _in_row_order(parts: list[Path]) -> Iterator[pl.DataFrame]:
    """A file's reject parts in row order, one at a time: the batches' parts are, and late ones merge in."""
    late = [p for p in parts if p.stem.endswith("-late")]
    ordinary = [p for p in parts if p not in late]
    extra = pl.concat([pl.read_ipc(p) for p in late], how="diagonal_relaxed").sort("source_row") if late else None
    for i, part in enumerate(ordinary):
        frame = pl.read_ipc(part)
        if extra is not None and extra.height:
            if i == len(ordinary) - 1:
                mine, extra = extra, extra.clear()
            elif frame.height:
                upto = frame.get_column("source_row").max()
                mine, extra = extra.filter(pl.col("source_row") <= upto), extra.filter(pl.col("source_row") > upto)
            else:
                mine = extra.clear()
            frame = pl.concat([frame, mine], how="diagonal_relaxed").sort("source_row")
        yield frame
    if extra is not None and extra.height:
        yield extra


# --- the rows of a batch, and what the report says of them --------------------------


def header_hint(settings: Settings, profile: Profile) -> HeaderHint:
    """Where a run's inputs have their header: ``--header-row``, else the profile's ``header_row``, else
    the first row naming a column the profile knows (:class:`etl.readers.HeaderHint`)."""
    return HeaderHint(row=settings.header_row or profile.header_row, known=known_header(profile))


def run_profile(settings: Settings) -> Profile:
    """The profile a run maps its inputs with (``--profile``, narrowed by ``--kind``)."""
    profile = load_profile(settings.profile) if settings.profile else default_profile()
    if settings.kind is not None:
        if settings.kind not in KIND_SPECS:
            raise UsageError(f"unknown --kind {settings.kind!r}; kinds: {', '.join(KIND_SPECS)}")
        profile = replace(profile, kind=settings.kind)
    return profile


def read_crosswalk(path: Path | None) -> dict[tuple[str, str], str]:
    """A crosswalk file: ``kind, source_id, clinikapi_id`` per line (CSV with a header).

    A run's own ``crosswalk.csv`` (``kind, source_key, resource_id``) is read too. Either way the
    ``'`` the tool puts before a formula character (:func:`etl.files.guard_formulas`) is taken off.
    """
    if path is None:
        return {}
    table = read_table(path)
    frame = unguard_formulas(table.frame)
    if {"kind", "source_key", "resource_id"} <= set(frame.columns) and "source_id" not in frame.columns:
        frame = frame.rename({"source_key": "source_id", "resource_id": "clinikapi_id"})
    wanted = {"kind", "source_id", "clinikapi_id"}
    if not wanted <= set(frame.columns):
        raise InputError(str(path), f"a crosswalk needs the columns {', '.join(sorted(wanted))}", row=1)
    bad = frame.filter(~pl.col("kind").is_in(list(KIND_SPECS)))
    if bad.height:
        raise InputError(str(path), f"unknown kind {bad['kind'][0]!r}", row=int(bad[ROW][0]), column="kind")
    return {(k, s): c for k, s, c in frame.select("kind", "source_id", "clinikapi_id").drop_nulls().iter_rows()}


def _quoted(value: pl.Expr, limit: int = 100) -> pl.Expr:
    """A cell's value as a message quotes it: cut to ``limit`` characters."""
    cut = value.str.slice(0, limit - 1) + pl.lit("…")
    return pl.when(value.str.len_chars() > limit).then(cut).otherwise(value).fill_null("")


def base_rows(mapped: Mapped, validation: Validation, planned: Planned) -> pl.DataFrame:
    """Every input row of a batch, with rejected ones already in their final state."""
    sources = pl.DataFrame(
        {"field": list(mapped.sources), "source_field": list(mapped.sources.values())},
        schema={"field": pl.String, "source_field": pl.String},
    )
    reasons = (
        validation.rejects.lazy()
        .join(sources.lazy(), on="field", how="left", maintain_order="left")  # a row's reasons in their order
        .with_columns(pl.col("source_field").fill_null(pl.col("field")).alias("column"))
        .group_by(ROW, maintain_order=True)
        .agg(
            pl.col("code").first().alias("error_code"),
            pl.col("column").first().alias("field"),
            # A cell may be megabytes long: the message quotes its start only.
            format_text("{} {} ({}): {}", "column", "code", _quoted(pl.col("value")), "message")
            .str.join("; ")
            .alias("message"),
        )
    )
    planned_rows = planned.rows.select(ROW, "source_key", pl.col("patient_key"))
    key = key_field(mapped.kind)
    # A row the profile's [[skip]] leaves out is skipped, code `filtered`, its reason the message.
    skip = pl.col(SKIP) if SKIP in mapped.frame.columns else pl.lit(None, dtype=pl.String)
    filtered = RULES["filtered"]
    return (  # eager: polars' default (streaming) engine takes twice as long over these joins
        mapped.frame.select(ROW, pl.col(key).str.strip_chars().alias("row_key"), skip.alias(SKIP))
        .join(reasons.collect(engine="in-memory"), on=ROW, how="left", maintain_order="left")
        .join(planned_rows, on=ROW, how="left", maintain_order="left")
        .select(
            pl.lit(str(mapped.table.path)).alias("source_file"),
            pl.col(ROW).alias("source_row"),
            pl.lit(mapped.kind).alias("kind"),
            "source_key",
            pl.when(
                ((pl.col("error_code") == RULES["deleted-in-source"].code) & (mapped.profile.hl7_deletes == "skip"))
                | (pl.col("error_code") == RULES["superseded-in-source"].code)
            )
            .then(pl.lit("skipped"))  # an HL7 dose its sender deleted or amended (etl.hl7): not sent, no error
            .when(pl.col("error_code").is_not_null())
            .then(pl.lit("rejected"))
            .when(pl.col(SKIP).is_not_null())
            .then(pl.lit("skipped"))
            .otherwise(pl.lit("planned"))
            .alias("state"),
            pl.lit(None, dtype=pl.String).alias("resource_id"),
            pl.col("patient_key"),
            pl.when(pl.col(SKIP).is_not_null()).then(pl.lit(filtered.code)).otherwise(pl.col("error_code"))
            .alias("error_code"),
            "field",
            pl.when(pl.col(SKIP).is_not_null()).then(filtered.message(reason=pl.col(SKIP))).otherwise(pl.col("message"))
            .alias("message"),
            "row_key",
        )
    )


def _write_rejects_part(
    x: _Input, source: pl.DataFrame, rows: pl.DataFrame, part: Path, columns: list[str], lines: _LinesFile
) -> None:
    """A batch's rejected rows: as IPC (a stage's end may reject more, merged in row order) and as their
    ``rejects.csv`` lines, under ``columns`` (:func:`_rejects_csv_columns`), appended to ``lines``, where the
    report takes them as they are (their span in ``x.reject_spans``)."""
    frame = rejects_frame(x.file, source, rows)
    frame.write_ipc(part)
    text = frame.select(columns).pipe(guard_formulas)
    x.reject_spans[part] = lines.append(
        functools.partial(text.write_csv, include_header=False), header=_rejects_header(tuple(columns))
    )


def rejects_frame(file: str, source: pl.DataFrame, rows: pl.DataFrame) -> pl.DataFrame:
    """The rows of ``rows`` rejected in ``file``, with their ``source`` cells and the reasons appended.

    A ``rejects.csv`` validated again gives a ``rejects.csv`` of the same shape: its own ``source_file``,
    ``source_row`` and ``reasons`` give way to the new ones (this file, its rows, today's reasons), so the
    original columns in between are fixed and imported again as often as needed. Any other file's column
    with one of those names is kept, as ``<name> (source)``.
    """
    reasons = rows.filter((pl.col("source_file") == file) & (pl.col("state") == "rejected")).select(
        pl.col("source_row").alias(ROW), pl.col("message").alias(_REASONS)
    )
    named = _rejects_columns([c for c in source.columns if c != ROW])
    # The rejected rows picked first, then joined with their reasons and their cells renamed (eager:
    # polars' streaming engine takes twice as long; a join with every source row, twice as long again).
    picked = source.filter(pl.col(ROW).is_in(reasons.get_column(ROW).implode()))
    return (
        picked.join(reasons, on=ROW, how="inner")
        .sort(ROW)
        .select(
            pl.lit(file).alias("source_file"),
            pl.col(ROW).alias("source_row"),
            *[pl.col(c).alias(n) for c, n in named.items()],
            pl.col(_REASONS).alias("reasons"),
        )
    )


_REASONS = "__reasons"  # a rejected row's reasons until they are appended (a source column may be "reasons")


def _rejects_columns(columns: list[str]) -> dict[str, str]:
    """A file's columns (in order) as ``rejects.csv`` names them, between its own ``source_file, source_row``
    and ``reasons``: an own ``rejects.csv``'s bookkeeping columns are left out (the new ones replace them);
    another file's column of one of those names is kept as ``<name> (source)``."""
    added = REJECTS_BOOKKEEPING
    if is_own_rejects(columns):
        return {c: c for c in columns if c not in added}
    return {c: f"{c} (source)" if c in added else c for c in columns}


def reject_document_siblings(rows: pl.DataFrame) -> pl.DataFrame:
    """A document is one create: when one of its rows is rejected, so are the others."""
    doc = pl.col("kind") == "document"
    bad = rows.filter(doc & (pl.col("state") == "rejected")).select("source_file", "row_key").unique()
    sibling = rows.join(bad.with_columns(pl.lit(True).alias("__bad")), on=["source_file", "row_key"], how="left")
    hit = doc & pl.col("__bad").fill_null(False) & (pl.col("state") == "planned")
    rule = RULES["document-rejected"]
    return sibling.with_columns(
        pl.when(hit).then(pl.lit("rejected")).otherwise(pl.col("state")).alias("state"),
        pl.when(hit).then(pl.lit(rule.code)).otherwise(pl.col("error_code")).alias("error_code"),
        pl.when(hit).then(rule.message("sibling")).otherwise(pl.col("message")).alias("message"),
    ).drop("__bad")


def created_in_store(state: StateStore, refs: pl.DataFrame) -> pl.DataFrame:
    """The (kind, key) pairs of ``refs`` that an earlier run created, by the state store."""
    found = [
        state.stored(str(kind), mine.get_column("key"), states=["created"], columns=())
        .select(pl.lit(str(kind)).alias("kind"), pl.col("source_key").alias("key"))
        for (kind,), mine in refs.group_by("kind")
    ]  # a set of keys a kind, one read each (not a record a key)
    return pl.concat(found) if found else pl.DataFrame(schema={"kind": pl.String, "key": pl.String})


def input_facts(mapped: Mapped, rows: int) -> InputFacts:
    """What a summary says about one input file."""
    table = mapped.table
    return InputFacts(
        path=str(table.path),
        sha256=table.sha256,
        format=table.format,
        encoding=table.encoding,
        delimiter=table.delimiter,
        sheet=table.sheet,
        kind=mapped.kind,
        profile=mapped.profile.name,
        rows=rows,
        columns_mapped=mapped.sources,
    )


def notice_facts(mapped: Mapped) -> list[NoticeFacts]:
    """A file's reader and mapping notices, as a summary lists them."""
    return [NoticeFacts(file=n.file, code=n.code, message=n.message) for n in mapped.table.notices]


def summary_of(
    run_id: str,
    *,
    command: Literal["validate", "load"],
    blank_rows: int = 0,
    inputs: list[InputFacts],
    warnings: list[NoticeFacts | RowWarnings],
    counts: pl.DataFrame,
    target: str,
    settings: Settings,
    timings: dict[str, float],
    facts: RunFacts,
) -> Summary:
    """A run's ``summary.json``; ``counts`` holds ``kind, state, len`` of the report's rows; ``blank_rows``:
    the blank rows the inputs held (no line in rows.csv: the inputs' rows are ``rows_total + blank_rows``)."""
    states, per_kind = count_states(counts)
    return Summary(
        run_id=run_id,
        command=command,
        dry_run=settings.dry_run,
        target=target,
        inputs=inputs,
        rows_total=sum(states.values()),
        blank_rows=blank_rows,
        states=states,
        kinds=per_kind,
        warnings=warnings,
        timings={k: round(v, 4) for k, v in timings.items()},
        batch_rows=settings.batch_rows,
    ).updated(facts)
