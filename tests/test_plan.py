"""Validation in batches: the report does not depend on how the rows are cut, in bounded memory."""

from __future__ import annotations

import csv
import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, BinaryIO

import polars as pl
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from etl import plan as plan_module
from etl import readers
from etl.errors import InputError
from etl.mapping import apply_profile, default_profile
from etl.pipeline import load_files, validate_files
from etl.readers import ROW, read_batches, read_table
from etl.report import read_rows
from etl.settings import Settings
from etl.validate import _spellings, _temporal_columns
from schemas.canonical import field_map

from .conftest import SAMPLE
from .golden import expected, normalised, run

CLINIC = ["registry.csv", "providers.csv", "visits.csv", "documents.csv", "tasks.csv"]
@pytest.mark.parametrize("batch_rows", [37, 100_000])
@pytest.mark.parametrize("mode", ["validate", "dry-run"])
def test_a_csv_read_a_chunk_at_a_time_writes_the_golden_report(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mode: str, batch_rows: int
) -> None:
    monkeypatch.setattr(readers, "STREAM_FROM_BYTES", 0)  # every CSV read a chunk at a time, as a large one is
    run(mode, "clinic", tmp_path, batch_rows=batch_rows)
    assert normalised(tmp_path) == expected(mode, "clinic")
    assert not list((tmp_path / "report").glob(".batches*"))  # the batches' scratch files are gone


def _payloads(folder: Path) -> list[str]:
    return sorted((folder / "payloads.ndjson").read_text(encoding="utf-8").splitlines())


def test_a_row_rejected_at_the_end_of_its_stage_has_no_line_in_the_plan(tmp_path: Path) -> None:
    settings = Settings(dry_run=True, state=tmp_path / "a.sqlite", report_dir=tmp_path / "a", batch_rows=37)
    report = load_files([SAMPLE / n for n in CLINIC], settings)
    assert not settings.state.exists()  # a dry run creates no state store
    assert (report.summary["command"], report.summary["dry_run"]) == ("load", True)
    rows = read_rows(tmp_path / "a" / "rows.csv")
    late = rows.filter((pl.col("state") == "rejected") & pl.col("source_key").is_not_null())
    assert late.height > 0  # the clinic files plant references to nothing
    planned = {(json.loads(line)["kind"], json.loads(line)["source_key"]) for line in _payloads(tmp_path / "a")}
    assert not {(k, key) for k, key in late.select("kind", "source_key").iter_rows()} & planned


def _write(path: Path, header: list[str], rows: list[list[str]]) -> Path:
    with path.open("w", newline="", encoding="utf-8") as fh:
        out = csv.writer(fh)
        out.writerow(header)
        out.writerows(rows)
    return path


REGISTRY = ["Record ID", "Patient ID", "First Name", "Last Name", "DOB", "Sex", "CVX", "Admin Date"]


def test_rules_that_compare_rows_see_across_batch_boundaries(tmp_path: Path) -> None:
    registry = _write(
        tmp_path / "registry.csv",
        REGISTRY,
        [
            ["R1", "P1", "Ann", "Lee", "1980-01-02", "F", "08", "2021-03-04"],  # row 2: batch 1
            ["R2", "P9", "", "", "", "", "20", "2021-03-05"],  # row 3: names P9, described at row 6
            ["R3", "P2", "Bo", "Ray", "1975-05-06", "M", "21", "2021-03-06"],  # row 4: batch 2
            ["R1", "P3", "Cy", "Fox", "1990-07-08", "M", "08", "2021-03-07"],  # row 5: R1 again
            ["R5", "P1", "Ann", "Lea", "1980-01-02", "F", "08", "2021-03-08"],  # row 6: P1 with another name
            ["R6", "P9", "Di", "Orr", "2001-09-10", "F", "03", "2021-03-09"],  # row 7: batch 3, describes P9
            ["R7", "P8", "", "", "", "", "03", "2021-03-10"],  # row 8: P8 is described nowhere
        ],
    )
    report = validate_files([registry], Settings(report_dir=tmp_path / "r", batch_rows=2))
    codes = {(r["source_row"], r["error_code"]) for r in report.problems.iter_rows(named=True)}
    assert codes == {(5, "duplicate-key"), (6, "patient-conflict"), (8, "unresolved-reference")}
    one = validate_files([registry], Settings(report_dir=tmp_path / "w"))  # one batch
    assert report.rows.equals(one.rows)


def test_a_rejection_decided_at_the_end_reaches_the_rows_that_name_it(tmp_path: Path) -> None:
    """A visit naming an unknown patient is rejected once every file is read; a task naming that visit follows."""
    visits = _write(
        tmp_path / "visits.csv",
        ["Visit ID", "Patient ID", "Status", "Visit Type", "Start"],
        [
            ["V1", "P1", "finished", "ambulatory", "2021-03-04T10:00:00"],
            ["V2", "P404", "finished", "ambulatory", "2021-03-04T11:00:00"],
        ],
    )
    registry = _write(
        tmp_path / "registry.csv", REGISTRY, [["R1", "P1", "Ann", "Lee", "1980-01-02", "F", "08", "2021-03-04"]]
    )
    tasks = _write(
        tmp_path / "tasks.csv",
        ["Task ID", "Patient ID", "Visit ID", "Status", "Intent"],
        [["T1", "P1", "V1", "requested", "order"], ["T2", "P1", "V2", "requested", "order"]],
    )
    paths = [tasks, registry, visits]
    report = validate_files(paths, Settings(report_dir=tmp_path / "r", batch_rows=1))
    problems = {
        (Path(r["source_file"]).name, r["source_row"]): r["error_code"] for r in report.problems.iter_rows(named=True)
    }
    assert problems == {("visits.csv", 3): "unresolved-reference", ("tasks.csv", 3): "parent-rejected"}
    one = validate_files(paths, Settings(report_dir=tmp_path / "w"))  # one batch a file
    assert report.rows.equals(one.rows)
    assert (tmp_path / "r" / "rejects.csv").read_text() == (tmp_path / "w" / "rejects.csv").read_text()


def _read_all(path: Path, rows: int) -> tuple[list[str], pl.DataFrame]:
    batches = read_batches(path, rows=rows, stream_from=0)
    frames = list(batches.batches)
    assert all(f.height <= rows for f in frames)
    return batches.table.columns, pl.concat(frames)


@pytest.mark.parametrize("name", ["registry.csv", "visits.csv", "documents.csv", "cvrs/cvrs_extract.tsv"])
def test_a_scanned_csv_reads_as_a_whole_read_does(name: str) -> None:
    columns, frame = _read_all(SAMPLE / name, rows=13)
    whole = read_table(SAMPLE / name)
    assert columns == whole.columns
    assert frame.equals(whole.frame)


def test_a_scanned_csv_keeps_bom_quoted_newlines_and_zeros(tmp_path: Path) -> None:
    path = tmp_path / "bom.csv"
    path.write_bytes('\ufeffRecord ID,CVX,Note\nR1,08,"two\nlines"\nR2,02134,x\n'.encode())
    columns, frame = _read_all(path, rows=1)
    assert columns == ["Record ID", "CVX", "Note"]
    assert frame.to_dicts() == [
        {ROW: 2, "Record ID": "R1", "CVX": "08", "Note": "two\nlines"},
        {ROW: 3, "Record ID": "R2", "CVX": "02134", "Note": "x"},
    ]


def test_batches_say_how_many_rows_they_hold() -> None:
    """A whole read counts its rows; a CSV read in chunks estimates them from its first rows' length (what a load
    tells the state store it will ask about: StateStore.read_ahead)."""
    whole = read_table(SAMPLE / "registry.csv").frame.height
    assert read_batches(SAMPLE / "registry.csv", rows=13).rows == whole
    estimate = read_batches(SAMPLE / "registry.csv", rows=13, stream_from=0).rows
    assert 0.5 * whole <= estimate <= 2 * whole


@pytest.mark.parametrize("long", [4_000, 9_000, 50_000])
def test_a_quoted_cell_longer_than_a_chunk_reads_as_a_whole_read_does(tmp_path: Path, long: int) -> None:
    """A chunk (4 KiB at least, a batch's bytes) that ends inside a quoted cell is read on, from the record's
    start, until a record ends: the cell, its line breaks and escaped quotes, and the rows around it intact."""
    cell = "".join(f'line {i}, a ""quoted"" word\n' for i in range(long // 30))
    lines = ["Record ID,CVX,Note"] + [f"R{i},08,short {i}" for i in range(2, 40)]
    lines += ["R40,08,\"" + cell.replace("\"\"", "\"\"") + "\""] + [f"R{i},08,x" for i in range(41, 60)]
    path = tmp_path / "long.csv"
    path.write_text("\r\n".join(lines) + "\r\n")
    columns, frame = _read_all(path, rows=3)
    whole = read_table(path)
    assert columns == whole.columns
    assert frame.equals(whole.frame)
    assert frame.height == 58
    assert frame.filter(pl.col("Record ID") == "R40").get_column("Note").to_list() == [cell.replace('""', '"')]


@pytest.mark.parametrize("end", ["\n\n", "\r\n\r\n\r\n", "\n" * 5000])
@pytest.mark.parametrize("rows", [1, 7, 1000, 2998])
def test_blank_lines_in_a_chunk_of_their_own_read_as_a_whole_read_does(tmp_path: Path, end: str, rows: int) -> None:
    """An export's last lines blank: where a chunk (about ``rows`` rows' bytes) holds nothing else, it gives no
    rows (it was refused as "cannot be read as CSV": polars finds no columns in blank lines)."""
    newline = "\r\n" if end.startswith("\r") else "\n"
    path = tmp_path / "blank-end.csv"
    path.write_text(newline.join(["Record ID,CVX,Note", *(f"R{i},08,n{i}" for i in range(2, 3000))]) + newline + end)
    columns, frame = _read_all(path, rows=rows)
    whole = read_table(path)
    assert columns == whole.columns
    assert frame.equals(whole.frame) and frame.height == 2998


def test_a_scanned_csv_broken_late_names_the_row(tmp_path: Path) -> None:
    lines = ["Record ID,CVX"] + [f"R{i},08" for i in range(2, 500)] + ["R500,08,extra,cells"]
    path = tmp_path / "ragged.csv"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(InputError) as caught:
        list(read_batches(path, rows=50, stream_from=0).batches)
    assert caught.value.row == 500  # the header is row 1; R2..R499 are rows 2..499
    assert "ragged.csv" in str(caught.value)


def test_a_repeated_header_is_named_column_n_before_any_batch(tmp_path: Path) -> None:
    path = tmp_path / "dup.csv"
    path.write_text("Record ID,CVX,CVX\nR1,08,09\n")
    batches = read_batches(path, rows=1, stream_from=0)
    assert batches.table.columns == ["Record ID", "CVX", "column_3"]
    assert [n.code for n in batches.table.notices] == ["header-renamed"]
    assert pl.concat(list(batches.batches)).get_column("CVX").to_list() == ["08"]


_DATES = st.one_of(
    st.dates().map(lambda d: d.isoformat()),
    st.datetimes().map(lambda d: d.isoformat(timespec="seconds")),
    st.dates().map(lambda d: f"{d.month}/{d.day}/{d.year}"),
    st.dates().map(lambda d: d.strftime("%Y%m%d")),
    st.sampled_from(["2021-02-30", "2021-3-4", "2021-03", "2021-03-04Z", "2021-03-04T10:00:00+02:00", "soon", ""]),
)


@settings(max_examples=150, deadline=None)
@given(values=st.lists(_DATES, min_size=1, max_size=12), field=st.sampled_from(["patient_birth_date", "occurrence"]))
def test_the_fast_date_paths_parse_as_the_full_one_does(values: list[str], field: str) -> None:
    f = field_map("immunization")[field]
    frame = pl.DataFrame({field: [v or None for v in values]}, schema={field: pl.String})
    spelling = _spellings(frame, [field], excel=False)[field]
    fast = frame.select(_temporal_columns(f, pl.col(field), False, "America/New_York", spelling))
    full = frame.select(_temporal_columns(f, pl.col(field), False, "America/New_York", "any"))
    assert fast.equals(full), spelling


def test_a_plain_date_column_takes_the_fast_path() -> None:
    frame = pl.DataFrame({"occurrence": ["2021-03-04", None, "2020-12-31"], "recorded": ["2021-03-04T10:00:00"] * 3})
    assert _spellings(frame, ["occurrence", "recorded"], excel=False) == {
        "occurrence": ("date", False), "recorded": ("iso", False)
    }
    assert _spellings(frame, ["occurrence"], excel=True) == {"occurrence": ("any", False)}


def test_a_date_column_with_a_few_odd_values_is_parsed_fast_and_its_misses_again() -> None:
    dates = ["2021-03-04"] * 80 + ["03/04/2021", "2021-03-04T10:00:00Z"]
    times = ["2021-03-04T10:00:00"] * 80 + ["2021-03-04", "garbage"]
    frame = pl.DataFrame({"occurrence": dates, "recorded": times})
    assert _spellings(frame, ["occurrence", "recorded"], excel=False) == {
        "occurrence": ("date", True), "recorded": ("iso", True)
    }
    many = pl.DataFrame({"occurrence": ["2021-03-04", "03/04/2021"] * 20})  # not a few: every spelling, every row
    assert _spellings(many, ["occurrence"], excel=False) == {"occurrence": ("any", False)}


_SPELLED = st.sampled_from([
    "2021-03-04", "2020-12-31", "2021-3-4", "03/04/2021", "20210304", "2021-03", "2021-02-30", "1/2/21",
    "2021-03-04T10:00:00", "2021-03-04 10:00:00.5", "2021-03-04T10:00", "2021-03-04T10:00:00Z",
    "2021-03-04T10:00:00+02:00", "44927", "not a date", " ", "",
])


@settings(max_examples=60, deadline=None)
@given(odd=st.lists(_SPELLED, min_size=1, max_size=6), plain=st.integers(0, 200), at=st.integers(0, 200),
       usual=st.sampled_from(["2021-06-07", "2021-06-07T08:30:00", "6/7/2021"]))
def test_parsing_the_misses_again_gives_what_trying_every_spelling_on_every_row_gives(
    odd: list[str], plain: int, at: int, usual: str
) -> None:
    """The retry (:func:`etl.validate._retried`) is an optimisation: the same companions as every
    spelling tried on every row, for date and date-time columns, wherever the odd values sit. So is
    parsing a column as plain dates first (``usual``: how the column's other values are written; a
    column written another way is parsed again)."""
    import etl.validate as validate

    values = [usual] * plain
    values[min(at, plain):min(at, plain)] = odd
    n = len(values)
    frame = pl.DataFrame({
        "record_id": [f"r{i}" for i in range(n)], "patient_id": ["p"] * n, "vaccine_code": ["08"] * n,
        "occurrence": values, "expiration_date": list(reversed(values)),
    })
    mapped = apply_profile(
        readers.Table(Path("x.csv"), "csv", frame.with_row_index(ROW, offset=2), "", encoding="utf-8", delimiter=","),
        default_profile(),
    )
    companions = [c for c in validate.prepare(mapped).columns if c.startswith(("occurrence__", "expiration_date__"))]
    fast = validate.prepare(mapped).select(companions)
    share = validate._RETRY_SHARE
    try:
        validate._RETRY_SHARE = 10**9  # no column is "mostly" one way: every spelling on every row
        slow = validate.prepare(mapped).select(companions)
    finally:
        validate._RETRY_SHARE = share
    assert fast.equals(slow, null_equal=True)


def test_the_profile_is_applied_once_and_reused_for_every_batch() -> None:
    batches = read_batches(SAMPLE / "registry.csv", rows=100)
    mapped = apply_profile(batches.table, default_profile())
    notices = len(mapped.table.notices)
    heights = [mapped.with_rows(frame).frame.height for frame in batches.batches]
    assert sum(heights) == read_table(SAMPLE / "registry.csv").frame.height
    assert len(mapped.table.notices) == notices


def test_the_cli_validates_in_the_batches_it_is_given(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from etl.cli import main

    out = tmp_path / "r"
    result = CliRunner().invoke(
        main, ["validate", str(SAMPLE / "registry.csv"), "--batch-rows", "50", "-q", "--report-dir", str(out)]
    )
    assert result.exit_code == 1, result.output  # the sample's planted rows are rejected
    summary = json.loads((out / "summary.json").read_text())
    assert summary["batch_rows"] == 50
    assert summary["states"]["rejected"] == 26
    bad = CliRunner().invoke(main, ["validate", str(SAMPLE / "registry.csv"), "--batch-rows", "0"])
    assert bad.exit_code == 2 and "batch-rows" in bad.output


def test_a_file_where_every_row_is_rejected_keeps_a_sample_in_memory_and_counts_them_all(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from click.testing import CliRunner

    from etl import plan as batches
    from etl.cli import main

    monkeypatch.setattr(batches, "SAMPLE_PER_GROUP", 20)
    rows = [[f"R{i}", f"P{i}", "Ann", "Lee", "1980-01-02", "F", "08", "last tuesday"] for i in range(500)]
    path = _write(tmp_path / "all-bad.csv", REGISTRY, rows)
    report = validate_files([path], Settings(report_dir=tmp_path / "r", batch_rows=100))
    assert report.states["rejected"] == 500
    assert report.problems.height == 20  # the first rows of the one reason, not all 500
    assert report.problems.get_column("source_row").to_list() == list(range(2, 22))
    assert report.tally.get_column("rows").sum() == 500
    assert "of 500 rejected rows" in (tmp_path / "r" / "report.html").read_text()
    assert read_rows(tmp_path / "r" / "rows.csv").filter(pl.col("state") == "rejected").height == 500
    out = CliRunner().invoke(main, ["validate", str(path), "--batch-rows", "100", "--report-dir", str(tmp_path / "c")])
    assert out.exit_code == 1
    (line,) = [x for x in out.output.splitlines() if "rows all-bad.csv:2, all-bad.csv:3, all-bad.csv:4 " in x]
    assert " 500 " in line and line.strip().endswith("...")


def test_a_load_or_a_dry_run_takes_fewer_rows_at_a_time_unless_told(tmp_path: Path) -> None:
    """A run that plans creates holds each batch's bodies too: its default batch is LOAD_BATCH_ROWS;
    a size given (here in the settings, as an option, the environment or a job file give it) wins."""
    from etl.settings import BATCH_ROWS, LOAD_BATCH_ROWS

    assert LOAD_BATCH_ROWS < BATCH_ROWS
    assert Settings().batch_rows_for(creates=False) == BATCH_ROWS
    assert Settings().batch_rows_for(creates=True) == LOAD_BATCH_ROWS
    assert Settings(batch_rows=BATCH_ROWS).batch_rows_for(creates=True) == BATCH_ROWS
    dry = load_files([SAMPLE / "registry.csv"], Settings(report_dir=tmp_path / "dry", dry_run=True))
    checked = validate_files([SAMPLE / "registry.csv"], Settings(report_dir=tmp_path / "v"))
    assert dry.summary["batch_rows"] == LOAD_BATCH_ROWS and checked.summary["batch_rows"] == BATCH_ROWS


def test_batches_are_read_one_ahead_on_a_thread_of_their_own_and_a_read_error_still_reaches_the_caller() -> None:
    """``_ahead``: the frames in order, the next one read on another thread while the caller holds
    the last (never more than one ahead, so memory stays bounded), and an error raised by reading is
    raised to the caller as it was."""
    import threading
    from collections.abc import Iterator

    from etl.plan import _ahead

    pulled: list[tuple[int, str]] = []

    def frames(fail_at: int | None = None) -> Iterator[pl.DataFrame]:
        for i in range(4):
            if i == fail_at:
                raise InputError("f.csv", "row 9: broken")
            pulled.append((i, threading.current_thread().name))
            yield pl.DataFrame({"i": [i]})

    seen = []
    for frame in _ahead(frames(), "read"):
        i = frame.item()
        seen.append(i)
        assert max(n for n, _ in pulled) <= i + 1  # one ahead at most
    assert seen == [0, 1, 2, 3]
    assert all(name.startswith("read") for _, name in pulled)
    with pytest.raises(InputError, match="row 9"):
        list(_ahead(frames(fail_at=2), "read"))


def test_a_part_appended_to_payloads_lands_after_what_was_written_before_it(tmp_path: Path) -> None:
    """``_append_file``: the kernel's copy where it can (a file), the usual read and write where it cannot
    (no file descriptor); either way the part lands after the bytes already written, still in a buffer,
    and what is written next lands after it."""
    import io

    from etl.plan import _append_file

    part = tmp_path / "part.ndjson"
    part.write_bytes(b"".join(b'{"n":%d}\n' % i for i in range(50_000)))
    into_file = tmp_path / "payloads.ndjson"
    with into_file.open("wb") as out, part.open("rb") as src:
        out.write(b"first\n")  # buffered, not yet on disk
        _append_file(src, out)
        out.write(b"last\n")
    memory = io.BytesIO()
    memory.write(b"first\n")
    with part.open("rb") as src:
        _append_file(src, memory)
    memory.write(b"last\n")
    expected = b"first\n" + part.read_bytes() + b"last\n"
    assert into_file.read_bytes() == expected
    assert memory.getvalue() == expected


@pytest.mark.parametrize("on_thread", [False, True])
@pytest.mark.parametrize("withdrawn", [False, True])
def test_a_parts_lines_are_removed_once_appended_to_payloads(tmp_path: Path, withdrawn: bool, on_thread: bool) -> None:
    """The scratch folder and the report hold each payloads.ndjson line once: a part's file of lines goes once
    its lines are appended, whether all of them are kept or some were withdrawn; at once, or on a thread of its
    own while the next part is appended (then once its future is done); and when appending it failed."""
    lines = tmp_path / "part.ndjson"
    lines.write_bytes(b"".join(b'{"n":%d}\n' % i for i in range(10)))
    kept = pl.Series([i for i in range(10) if not (withdrawn and i % 3 == 0)], dtype=pl.UInt32)
    with ThreadPoolExecutor(1) as remover, (tmp_path / "payloads.ndjson").open("wb") as out:
        removing = plan_module._copy_lines(lines, kept, 10, out, remover if on_thread else None)
        assert (removing is not None) == on_thread
        if removing is not None:
            removing.result()
    assert (tmp_path / "payloads.ndjson").read_bytes() == b"".join(b'{"n":%d}\n' % i for i in kept)
    assert not lines.exists()
    if withdrawn:  # a line short: the lines kept cannot be told, and appending them fails
        lines.write_bytes(b"".join(b'{"n":%d}\n' % i for i in range(9)))
        again = tmp_path / "again.ndjson"
        with ThreadPoolExecutor(1) as remover, again.open("wb") as out, pytest.raises(ValueError):
            plan_module._copy_lines(lines, kept, 10, out, remover if on_thread else None)
        assert not lines.exists()


@pytest.mark.parametrize("redact", [False, True])
def test_rejects_csv_from_the_batches_lines_equals_the_one_built_from_their_parts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, redact: bool
) -> None:
    """rejects.csv is the lines each batch wrote as it went (a file with no rows rejected at the end of its
    stage); it is byte for byte what building it from the batches' parts at the end gives."""
    rebuilt: list[int] = []
    real_rebuild = plan_module._rejects_in_row_order

    def counting(parts: list[Path], columns: list[str], out: BinaryIO) -> None:
        rebuilt.append(len(parts))
        real_rebuild(parts, columns, out)

    monkeypatch.setattr(plan_module, "_rejects_in_row_order", counting)
    registry = SAMPLE / "registry.csv"
    validate_files([registry], Settings(report_dir=tmp_path / "lines", batch_rows=97, redact=redact))
    assert rebuilt == []  # the batches' own lines were used
    real_part = plan_module._write_rejects_part

    def parts_only(x: Any, *args: Any) -> None:  # the batch's lines not kept: rejects.csv is built from the parts
        real_part(x, *args)
        x.reject_spans.clear()

    monkeypatch.setattr(plan_module, "_write_rejects_part", parts_only)
    validate_files([registry], Settings(report_dir=tmp_path / "parts", batch_rows=97, redact=redact))
    assert rebuilt and rebuilt[0] > 1
    built = (tmp_path / "parts" / "rejects.csv").read_bytes()
    assert built.count(b"\n") > 10  # the sample plants bad rows
    assert (tmp_path / "lines" / "rejects.csv").read_bytes() == built


def _report_rows(first: int, n: int, state: str = "planned") -> pl.DataFrame:
    text = {c: pl.String for c in ("source_file", "kind", "source_key", "state", "resource_id", "patient_key",
                                   "error_code", "field", "message")}
    return pl.DataFrame(
        {
            "source_file": ["f.csv"] * n, "source_row": list(range(first, first + n)), "kind": ["immunization"] * n,
            "source_key": [f"K{i}" for i in range(first, first + n)], "state": [state] * n, "resource_id": [None] * n,
            "patient_key": ["P1"] * n, "error_code": [None if state == "planned" else "required"] * n,
            "field": [None] * n, "message": [None if state == "planned" else "a, \"quoted\" reason"] * n,
        },
        schema={**text, "source_row": pl.Int64},
    )


def _expected_rows_csv(*frames: pl.DataFrame) -> bytes:
    from etl.report import ROW_COLUMNS

    whole = pl.concat(frames).rename({"patient_key": "patient_id"}).select(ROW_COLUMNS)
    return whole.write_csv().encode()


@pytest.mark.parametrize("rewritten", [False, True])
def test_rows_csv_is_the_writers_lines_file_when_every_part_went_once_in_order(tmp_path: Path, rewritten: bool) -> None:
    """The batches' rows.csv lines go to one file as they are written. Every part written once, in order: that
    file becomes rows.csv (renamed, nothing copied). A part written again later (rejected at its stage's end):
    rows.csv is the parts' latest lines in the report's order, copied from the file."""
    work, report = tmp_path / "work", tmp_path / "report"
    work.mkdir()
    report.mkdir()
    writer = plan_module._RowsWriter(True, work)
    lines = writer.lines.path
    a, b = work / "a.rows", work / "b.rows"
    writer.submit(a, _report_rows(2, 3))
    writer.submit(b, _report_rows(5, 40))
    final_a = _report_rows(2, 3)
    if rewritten:
        final_a = _report_rows(2, 3, state="rejected")
        writer.forget(a)
        writer.submit(a, final_a, ipc=False, csv=True)  # its new lines land after b's
    spans: list[Any] = [writer.written[p].result().span for p in (a, b)]
    writer.flush()
    writer.lines.publish(plan_module._ROWS_HEADER, spans, report / "rows.csv")
    writer.close()
    published = report / "rows.csv"
    assert published.read_bytes() == _expected_rows_csv(final_a, _report_rows(5, 40))
    assert oct(published.stat().st_mode & 0o777) == oct(0o600)
    assert lines.exists() is rewritten  # renamed when whole and in order; else copied from
    assert read_rows(published).get_column("state").to_list()[:3] == [final_a.get_column("state")[0]] * 3


def test_a_span_of_a_file_is_appended_by_the_kernel_or_by_reads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``_append_file`` with a span: the bytes from start to end, after what was written before; the same when the
    kernel cannot copy them (read and written instead)."""
    source = tmp_path / "lines"
    source.write_bytes(bytes(range(256)) * 8_000)  # 2 MB: more than one read
    for kernel in (True, False):
        if not kernel:
            def refuse(*_: Any) -> int:
                raise OSError("not here")

            monkeypatch.setattr(plan_module.os, "copy_file_range", refuse)
        out_path = tmp_path / f"out-{kernel}"
        with out_path.open("wb") as out, source.open("rb") as src:
            out.write(b"head")
            plan_module._append_file(src, out, 1_000, 1_500_000)
            out.write(b"tail")
        assert out_path.read_bytes() == b"head" + source.read_bytes()[1_000:1_500_000] + b"tail"


def test_a_validation_keeps_as_ipc_only_the_parts_its_stage_end_may_change(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A batch's report rows are written as IPC only when something reads them back: here, the batches whose
    references were not all explained (their stage's end may reject rows of them). The report is the same as
    when every part is kept (a load's way), late rejections included."""
    kept: list[tuple[str, bool]] = []
    real_submit = plan_module._RowsWriter.submit

    def spying(self: Any, part: Path, rows: pl.DataFrame, then: Any = None, *, ipc: bool = True,
               csv: bool | None = None) -> None:
        if csv is None:  # a batch's, not a rewrite
            kept.append((part.name, ipc))
        real_submit(self, part, rows, then, ipc=ipc, csv=csv)

    monkeypatch.setattr(plan_module._RowsWriter, "submit", spying)
    files = [SAMPLE / name for name in ("registry.csv", "providers.csv", "visits.csv", "documents.csv", "tasks.csv")]
    validate_files(files, Settings(report_dir=tmp_path / "few", batch_rows=37))
    assert any(ipc for _, ipc in kept) and not all(ipc for _, ipc in kept)
    monkeypatch.setattr(plan_module._RowsWriter, "__init__", _keeping_every_part(plan_module._RowsWriter.__init__))
    kept.clear()
    validate_files(files, Settings(report_dir=tmp_path / "all", batch_rows=37))
    assert kept and all(ipc for _, ipc in kept)
    late = read_rows(tmp_path / "few" / "rows.csv").filter(pl.col("error_code") == "unresolved-reference")
    assert late.height >= 2  # the sample's visits name patients no file has: rejected at their stage's end
    for name in ("rows.csv", "rejects.csv"):
        assert (tmp_path / "few" / name).read_bytes() == (tmp_path / "all" / name).read_bytes()


def _keeping_every_part(init: Any) -> Any:
    def keeping(self: Any, enabled: bool, work: Path, *, parts_read: bool = True) -> None:
        init(self, enabled, work, parts_read=True)

    return keeping
