"""Validation: the planted bad rows of the sample, and each rule on its own."""

from __future__ import annotations

import datetime as dt
import re
from pathlib import Path
from typing import Any

import polars as pl
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from etl.mapping import apply_profile, default_profile
from etl.readers import ROW, Table, read_table
from etl.rules import RULES
from etl.validate import Validation, _items, _tidy_lists, prepare, validate

from .conftest import SAMPLE

TODAY = dt.date(2026, 11, 22)


def _validate(path: Path) -> Validation:
    return validate(apply_profile(read_table(path), default_profile()), today=TODAY)


@pytest.mark.parametrize("name", ["registry.csv", "registry.xlsx"])
def test_exactly_the_planted_rows_are_rejected_with_code_column_and_value(name: str) -> None:
    result = _validate(SAMPLE / name)
    planted = pl.read_csv(SAMPLE / "planted.csv", infer_schema=False)
    # A domain rule that only warns by default (an expired lot) flags its planted rows, not rejects them.
    warning_codes = [code for code, rule in RULES.items() if rule.severity == "warning"]
    warned = planted.filter(pl.col("code").is_in(warning_codes))
    assert warned.height > 0
    planted = planted.filter(~pl.col("code").is_in(warning_codes))
    sources = result.mapped.sources
    got = result.rejects.with_columns(pl.col("field").replace_strict(sources, default=pl.col("field")).alias("column"))
    assert sorted(got.get_column(ROW).unique().to_list()) == sorted(int(r) for r in planted["source_row"])
    flagged = set(zip(result.warnings[ROW].to_list(), result.warnings["code"].to_list(), strict=True))
    assert {(int(r), c) for r, c in zip(warned["source_row"], warned["code"], strict=True)} <= flagged
    for row in planted.iter_rows(named=True):
        mine = got.filter(pl.col(ROW) == int(row["source_row"]))
        assert (row["code"], row["column"]) in set(zip(mine["code"], mine["column"], strict=True)), row
        assert mine.height == 1, mine.to_dicts()
        if name.endswith(".csv"):
            assert (mine["value"][0] or "") == (row["value"] or ""), row


def test_planted_real_codes_missing_from_the_old_table_are_accepted() -> None:
    # planted_warnings.csv holds real CVX codes (213, 300) the toolkit's first, short table lacked;
    # the full CDC table has them, so they pass with no flag.
    result = _validate(SAMPLE / "registry.csv")
    planted = [int(r) for r in pl.read_csv(SAMPLE / "planted_warnings.csv", infer_schema=False)["source_row"]]
    assert planted
    flagged = set(result.warnings[ROW].to_list()) | set(result.rejects[ROW].to_list())
    assert flagged.isdisjoint(planted)


HEADER = "Record ID,Patient ID,First Name,Last Name,DOB,CVX,Admin Date"
GOOD = "R1,P1,Ann,Lee,2015-03-04,08,2021-03-04"


def _one(tmp_path: Path, extra_header: str = "", extra: str = "", rows: list[str] | None = None) -> Validation:
    path = tmp_path / "one.csv"
    header = HEADER + ("," + extra_header if extra_header else "")
    body = rows if rows is not None else [GOOD + ("," + extra if extra_header else "")]
    path.write_text("\n".join([header, *body]) + "\n", encoding="utf-8")
    return _validate(path)


@pytest.mark.parametrize(
    ("header", "value", "code"),
    [
        ("Lot Number", "L" * 100, None),
        ("Lot Number", "L" * 101, "max-length"),
        ("Status", "not done", None),
        ("Status", "given", None),
        ("Status", "pending", "enum"),
        ("Sex", "F", None),
        ("Sex", "X", "enum"),
        ("Phone", "1" * 20, None),
        ("Phone", "1" * 21, "max-length"),
        ("Email", "a@b.example", None),
        ("Email", "nope", "email-format"),
        ("Dose Amount", "0.5", None),
        ("Dose Amount", "nan", "number-format"),
        ("Dose Amount", "-0.5", "minimum"),
        ("Dose Amount", "0", "minimum"),
        ("Dose Amount", "0.05", None),
        ("Dose Number", "-1", "minimum"),
        ("Series Doses", "-3", "minimum"),
        ("Dose Number", "2", None),
        ("Dose Number", "2.5", "integer-format"),
        ("Target Disease", ";".join(["d"] * 10), None),
        ("Target Disease", ";".join(["d"] * 11), "max-items"),
        ("Target Disease", "x" * 200, None),
        ("Target Disease", "x" * 201, "max-length"),
        ("Expiration Date", "2021-03-04", None),
        ("Expiration Date", "2021-03-03", None),  # an expired lot: a warning by default
        ("Expiration Date", "03/31/2022", None),
        ("Expiration Date", "31/03/2022", "date-format"),
        ("Notes", "n" * 5000, None),
        ("Notes", "n" * 5001, "max-length"),
        ("Performer Function", "f" * 201, "max-length"),
        ("Status Reason", "s" * 501, "max-length"),
    ],
)
def test_single_rule(tmp_path: Path, header: str, value: str, code: str | None) -> None:
    result = _one(tmp_path, header, f'"{value}"')
    assert result.rejects["code"].to_list() == ([code] if code else [])


def test_dates_and_domain_rules(tmp_path: Path) -> None:
    rows = [
        "R1,P1,Ann,Lee,2015-03-04,08,2026-11-22",  # today: fine
        "R2,P1,Ann,Lee,2015-03-04,08,2026-11-23",  # tomorrow
        "R3,P2,Bo,Ray,2015-03-04,08,2015-03-03",  # before birth
        "R4,P3,Cy,Day,2015-03-04,08,2021-03-04T10:30:00+02:00",  # offset: fine
        "R5,P4,Di,Eve,2015-03-04,,2021-03-04",  # no CVX
        "R1,P5,Ed,Fox,2015-03-04,08,2021-03-04",  # repeated record id
        "R6,P1,Ann,Lee,2015-03-05,08,2021-03-04",  # P1 with another birth date
    ]
    result = _one(tmp_path, rows=rows)
    got = {(r[ROW], r["code"], r["field"]) for r in result.rejects.iter_rows(named=True)}
    assert got == {
        (3, "future-date", "occurrence"),
        (4, "occurrence-before-birth", "occurrence"),
        (6, "required", "vaccine_code"),
        (7, "duplicate-key", "record_id"),
        (8, "patient-conflict", "patient_birth_date"),
    }
    out = result.prepared.filter(pl.col(ROW) == 5)["occurrence__out"][0]
    assert out == "2021-03-04T08:30:00Z"


def test_every_failure_of_a_row_is_collected(tmp_path: Path) -> None:
    result = _one(tmp_path, "Lot Number,Status,Sex", f"{'L' * 101},pending,Q")
    assert sorted(result.rejects["code"].to_list()) == ["enum", "enum", "max-length"]
    assert result.rejected_rows == 1


_CELL = st.text(alphabet=st.sampled_from(list("ab1; \t;;+-.0٣")), max_size=12).map(str.strip)


@settings(max_examples=150, deadline=None)
@given(cells=st.lists(st.one_of(st.none(), _CELL.filter(bool)), min_size=1, max_size=20))
def test_a_list_column_split_plainly_when_tidy_gives_the_items_the_careful_split_gives(cells: list[str | None]) -> None:
    frame = pl.DataFrame({"c": cells}, schema={"c": pl.String})
    careful = frame.select(_items(pl.col("c"), ";", tidy=False)).to_series().to_list()
    assert all(items is None or (items and all(i and i == i.strip() for i in items)) for items in careful)
    if _tidy_lists(frame, ["c"], ";")["c"]:
        assert frame.select(_items(pl.col("c"), ";", tidy=True)).to_series().to_list() == careful


_NUMBER = r"[+-]?\d{1,20}(\.0+)?"


#: What a cell is trimmed of: Unicode's White_Space (polars' strip_chars), not Python's str.strip, which also takes
#: the separators U+001C to U+001F ("0\x1f" is not a number).
_WHITE_SPACE = "".join(c for c in map(chr, range(0x3001)) if c.isspace() and c not in "\x1c\x1d\x1e\x1f")


# Each example is a column of cells, prepared twice (~50 ms a time): 80 of them are hundreds of cells.
@settings(max_examples=80, deadline=None)
@given(cells=st.lists(st.one_of(st.none(), st.text(max_size=22), st.from_regex(_NUMBER, fullmatch=True))))
def test_integer_cells_parse_exactly_when_they_are_plain_digits(cells: list[str | None]) -> None:
    columns = {"Patient ID": "P1", "CVX": "08", "Admin Date": "2024-01-02"}
    frame = pl.DataFrame({"Dose Number": cells}, schema={"Dose Number": pl.String})
    frame = frame.with_columns(pl.lit(v).alias(k) for k, v in columns.items()).with_row_index(ROW, offset=2)
    for excel in (False, True):
        plain = r"[+-]?\d+(\.0+)?" if excel else r"[+-]?\d+"

        def parsed(c: str | None, plain: str = plain) -> int | None:
            c = c.strip(_WHITE_SPACE) if c is not None else None  # cells are trimmed first
            if not c or not re.fullmatch(plain, c, re.ASCII):
                return None
            n = int(c.split(".")[0])
            return n if -(2**63) <= n < 2**63 else None

        table = Table(Path("t.xlsx" if excel else "t.csv"), "xlsx" if excel else "csv", frame, "")
        got = prepare(apply_profile(table, default_profile())).get_column("dose_number__int").to_list()
        assert got == [parsed(c) for c in cells]


def test_the_queries_a_batch_runs_do_not_grow_with_its_share_of_failing_rows(monkeypatch: pytest.MonkeyPatch) -> None:
    """Rejected rows cost what valid rows cost: the checks and the source values of the failures are
    a fixed number of polars queries per batch, whether one row fails or every row fails each rule
    it can (not a query per rule, per failing row or per failure)."""
    from etl import validate as module

    table = read_table(SAMPLE / "registry.csv")
    mapped = apply_profile(table, default_profile())
    broken = mapped.with_rows(
        table.frame.with_columns(
            pl.lit("x" * 300).alias(c) for c in table.frame.columns if c != ROW and c not in ("Record ID", "Patient ID")
        )
    )
    queries = {"n": 0}
    collect, eager = pl.LazyFrame.collect, pl.LazyFrame._collect_eager

    def counting(original: Any) -> Any:
        def counted(self: pl.LazyFrame, *args: Any, **kwargs: Any) -> Any:
            queries["n"] += 1
            return original(self, *args, **kwargs)

        return counted

    def run(m: object) -> tuple[int, int]:
        today = dt.date(2026, 12, 1)
        prepared = module._compared_across_rows(prepare(m, today=today), "immunization", module.Carry())  # type: ignore[arg-type]
        queries["n"] = 0
        monkeypatch.setattr(pl.LazyFrame, "collect", counting(collect))
        monkeypatch.setattr(pl.LazyFrame, "_collect_eager", counting(eager))  # an eager frame's methods run here
        rejects = module.with_source_values(module.check(prepared, "immunization", today=today), m)  # type: ignore[arg-type]
        monkeypatch.setattr(pl.LazyFrame, "collect", collect)
        monkeypatch.setattr(pl.LazyFrame, "_collect_eager", eager)
        return queries["n"], rejects.height

    few, few_rejects = run(mapped)
    every, every_rejects = run(broken)
    assert every_rejects > 10 * few_rejects and every_rejects > 5 * broken.frame.height
    assert every == few


def test_failures_unpivoted_a_slice_at_a_time_are_the_same_failures(monkeypatch: pytest.MonkeyPatch) -> None:
    """check lists a batch's failures from its rules' outcomes unpivoted (a line per row and rule), a slice of
    rows at a time so a batch whose every row fails stays bounded: the slices change nothing, order included."""
    from etl import validate as module

    table = read_table(SAMPLE / "registry.csv")
    broken = apply_profile(table, default_profile()).with_rows(
        table.frame.with_columns(pl.when(pl.col(ROW) % 3 == 0).then(pl.lit("x" * 300)).otherwise(pl.col(c)).alias(c)
                                 for c in ("First Name", "DOB", "Admin Date", "CVX", "Route", "Dose Number"))
    )
    prepared = module._compared_across_rows(prepare(broken, today=TODAY), "immunization", module.Carry())
    whole = module.check(prepared, "immunization", today=TODAY)
    monkeypatch.setattr(module, "_LONG", 700)  # ten rows' rules at a time
    sliced = module.check(prepared, "immunization", today=TODAY)
    assert whole.height > 3 * broken.frame.height // 3 and len(set(whole.get_column(ROW).to_list())) > 150
    assert sliced.equals(whole)
    assert whole.equals(whole.sort(ROW, "field", maintain_order=True))  # by row and column


def test_validating_calls_no_deprecated_polars_api() -> None:
    """polars warns of a deprecated call from its own (Rust) code, where the test run's "error" filter does
    not reach, at every batch, and the call changes meaning in a later release: recorded, there are none."""
    import warnings

    mapped = apply_profile(read_table(SAMPLE / "registry.csv"), default_profile())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        validate(mapped, today=TODAY)
    assert [str(w.message) for w in caught] == []


def test_warming_up_imports_pandera_and_numpy_on_a_thread_of_their_own() -> None:
    """numpy.ma too: polars imports it at the first series it makes from numpy (70 ms of the first batch)."""
    import subprocess
    import sys

    code = (
        "import sys, time, threading\n"
        "from etl.validate import Carry, warm_up\n"
        "from etl.keyindex import KeyIndex\n"
        "from etl import lazy_numpy\n"
        "Carry(), KeyIndex()\n"
        "assert 'pandera.polars' not in sys.modules and 'numpy' not in sys.modules and not lazy_numpy.loaded()\n"
        "warm_up()\n"
        "print(threading.active_count() > 1)\n"
        "deadline = time.monotonic() + 60\n"
        "wanted = {'numpy', 'numpy.ma', 'pandera.polars'}\n"
        "while not (wanted <= set(sys.modules) and lazy_numpy.loaded()) and time.monotonic() < deadline:\n"
        "    time.sleep(0.05)\n"
        "print(wanted <= set(sys.modules), lazy_numpy.loaded())\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["True", "True", "True"]


def test_a_prepared_frame_without_the_first_row_flags_is_checked_the_same() -> None:
    """prepare flags each batch's first row of a record id and of a patient ahead, on its own thread; a
    prepared frame without those flags (one a caller made otherwise) gets them where the rows are compared."""
    mapped = apply_profile(read_table(SAMPLE / "registry.csv"), default_profile())
    prepared = prepare(mapped, today=TODAY)
    flags = [c for c in prepared.columns if c.startswith("__batch_first_")]
    assert len(flags) == 2
    with_flags = validate(mapped, prepared=prepared, today=TODAY).rejects
    without = validate(mapped, prepared=prepared.drop(flags), today=TODAY).rejects
    codes = set(with_flags.get_column("code").to_list())
    assert {RULES["duplicate-key"].code, RULES["patient-conflict"].code} <= codes  # the sample plants both
    assert without.equals(with_flags)


def _local_ok(tmp_path: Path, lots: list[str], diseases: list[str]) -> tuple[list[bool], list[bool], list[str]]:
    """precheck's single-row outcome of rows with these lot numbers and target diseases; the same outcome with every
    single-row rule evaluated (no length limit left out); and the codes of the length limits precheck kept."""
    from etl import validate as v

    path = tmp_path / "lengths.csv"
    rows = pl.DataFrame({
        "Record ID": [f"R{i}" for i in range(len(lots))], "Patient ID": [f"P{i}" for i in range(len(lots))],
        "First Name": "Ann", "Last Name": "Lee", "DOB": "2015-03-04", "CVX": "08", "Admin Date": "2021-03-04",
        "Lot Number": lots, "Target Disease": diseases,
    })
    rows.write_csv(path)
    prepared = prepare(apply_profile(read_table(path), default_profile()), today=TODAY)
    rules = [r for r in v._rules("immunization", TODAY, prepared.columns) if not v._compares_rows(r)]
    every = prepared.select(pl.all_horizontal(r.passes.fill_null(False) for r in rules)).to_series().to_list()
    got = v.precheck(prepared, "immunization", today=TODAY).get_column(v.LOCAL_OK).to_list()
    kept = [f"{r.field}:{r.code}" for r in v._bounds_kept(prepared, rules) if r.bound is not None]
    return got, every, kept


def test_length_limits_a_batch_cannot_break_are_left_out_of_its_precheck(tmp_path: Path) -> None:
    # Lot numbers hold 100 characters at most, a target disease 200 (schemas.limits).
    got, every, kept = _local_ok(tmp_path, ["L1", "L" * 100], ["Measles", "Measles;Mumps"])
    assert got == every == [True, True]
    assert kept == []  # every cell within its limit, counted in bytes: no character counted
    # 100 two-byte characters are 200 bytes but within the limit: the limit is kept, and the row passes it.
    got, every, kept = _local_ok(tmp_path, ["L1", "é" * 100], ["Measles", "Measles"])
    assert got == every == [True, True]
    assert kept == ["lot_number:max-length"]
    got, every, kept = _local_ok(tmp_path, ["L" * 101, "L1"], ["Measles", "ü" * 201])
    assert got == every == [False, False]
    assert sorted(kept) == ["lot_number:max-length", "target_diseases:max-length"]
    # and the rows' messages come from every rule
    path = tmp_path / "again.csv"
    path.write_text("Record ID,Patient ID,CVX,Admin Date,Lot Number\nR1,P1,08,2021-03-04," + "é" * 101 + "\n",
                    encoding="utf-8")
    assert _validate(path).rejects.select("code", "field").rows() == [("max-length", "lot_number")]


@settings(max_examples=40, deadline=None)
@given(
    lots=st.lists(st.text(alphabet="Lé€𝄞 ", min_size=0, max_size=103), min_size=1, max_size=6),
    disease=st.text(alphabet="Mü;", min_size=0, max_size=205),
)
def test_a_precheck_agrees_with_every_rule_whatever_the_lengths(
    tmp_path_factory: pytest.TempPathFactory, lots: list[str], disease: str
) -> None:
    got, every, _ = _local_ok(tmp_path_factory.mktemp("lengths"), lots, [disease] * len(lots))
    assert got == every


@settings(max_examples=200, deadline=None)
@given(st.lists(st.one_of(
    st.none(), st.text(alphabet="0123456789/-\u0662\u0663 .a", max_size=10),
    st.from_regex(r"\A[0-9\u0662]{4,5}\Z"), st.from_regex(r"\A[0-9]{1,2}[/-][0-9]{1,2}[/-][0-9\u0663]{2}\Z"),
), max_size=20))
def test_a_date_columns_hazard_search_finds_what_its_pattern_matches(cells: list[str | None]) -> None:
    # Serial numbers and two-digit years are sought only in cells of the lengths they can have: the answer is
    # the pattern's own (with ASCII digits, the only ones polars reads as a number).
    import etl.validate as v

    frame = pl.DataFrame({"d": cells}, schema={"d": pl.String})
    for pattern, lengths in (v._SERIAL_SHAPE, v._TWO_DIGIT_SHAPE):
        want = any(c is not None and re.search(pattern, c, re.ASCII) for c in cells)
        assert v._any_match(frame, ["d"], pattern, lengths)["d"] == want


def test_check_reads_the_outcomes_precheck_left_and_finds_what_every_rule_finds() -> None:
    """precheck keeps each single-row rule's outcome as a column, and check reads the failing rows' outcomes from
    them rather than evaluating those rules again: the rejects are those of a frame checked from scratch, and a
    rule whose column is missing is evaluated as before."""
    from etl import validate as v

    mapped = apply_profile(read_table(SAMPLE / "registry.csv"), default_profile())
    prepared = prepare(mapped, today=TODAY)
    checked = v.precheck(prepared, "immunization", today=TODAY)
    flags = [c for c in checked.columns if c.startswith(v._LOCAL_FLAG)]
    rules = v._rules("immunization", TODAY, prepared.columns)
    assert len(flags) == len([r for r in rules if not v._compares_rows(r)]) > 10
    scratch = validate(mapped, prepared=prepared, today=TODAY)
    ahead = validate(mapped, prepared=checked, today=TODAY)
    assert ahead.rejects.get_column("code").n_unique() >= 8  # the sample plants bad rows of many kinds
    assert ahead.rejects.equals(scratch.rejects)
    assert not [c for c in ahead.prepared.columns if c.startswith(v._LOCAL_FLAG)]  # read, then dropped
    failing = scratch.rejects.get_column("field").value_counts(sort=True).get_column("field").to_list()
    for field in failing[:3]:  # a flag gone (each of the commonest failures' fields): the rule is evaluated again
        gone = [c for c in flags if c.startswith(f"{v._LOCAL_FLAG}{field}:")]
        assert gone
        again = validate(mapped, prepared=checked.drop(gone), today=TODAY)
        assert again.rejects.equals(scratch.rejects)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.one_of(
    st.none(), st.text(alphabet="P-0123456789Ee+., \u0663", max_size=9),
    st.from_regex(r"\A[+-]?[0-9\u0663]{1,3}([.,][0-9]{1,3})?[eE][+-]?[0-9\u0663]{1,2}\Z"),
), max_size=12))
def test_ids_in_scientific_notation_are_flagged_where_the_pattern_matches(cells: list[str | None]) -> None:
    # Only a column with a cell that starts as a number is searched: each row's flag is the pattern's answer,
    # and a column with none has no flag (nor the rule that reads it).
    from etl import validate as v

    frame = pl.DataFrame({"patient_id": cells}, schema={"patient_id": pl.String})
    out = v._scientific_ids(frame, ["patient_id"])
    want = [c is not None and re.search(v._SCIENTIFIC, c) is not None for c in cells]
    if any(want):
        assert out.get_column("patient_id__scientific").to_list() == want
    else:
        assert out.columns == ["patient_id"]
