"""What a run writes cannot be turned against its user (issue 17, the output files).

- a report folder given as a symbolic link is refused; a folder that exists keeps its mode;
- a file is never written through a link planted under its name;
- no CSV cell or header the tool writes starts as a formula, and the tool reads its own files back
  unchanged;
- ``--redact`` leaves no name, contact or free text in anything the run writes.
"""

from __future__ import annotations

import csv
import json
import os
import sqlite3
import stat
from pathlib import Path

import polars as pl
import pytest
from click.testing import CliRunner, Result
from hypothesis import given, settings
from hypothesis import strategies as st

from etl.cli import main
from etl.errors import OutputError, UnsafeFileError
from etl.files import (
    FORMULA_STARTS,
    guard_formulas,
    guarded,
    private_dir,
    private_file,
    publish_file,
    unguard_formulas,
    unguarded,
    write_csv,
)
from etl.load.lock import state_lock
from etl.load.state import StateStore
from etl.plan import read_crosswalk
from etl.readers import read_table

from .conftest import SAMPLE

#: Every file name a report folder may get.
REPORT_FILES = (
    "rows.csv",
    "rejects.csv",
    "summary.json",
    "report.html",
    "payloads.ndjson",
    "crosswalk.csv",
    "disappeared.csv",
    "reconcile.csv",
)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.lstat().st_mode)


def _cli(*args: str) -> Result:
    """The CLI's outcome; ``--state`` is dropped from a command that has none (validate)."""
    argv = list(args)
    if argv[0] == "validate" and "--state" in argv:
        at = argv.index("--state")
        del argv[at : at + 2]
    result = CliRunner().invoke(main, argv)
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    return result


# --- folders ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "command",
    [["validate"], ["load", "--dry-run"], ["load"], ["load", "--mode", "bulk"], ["load", "--target", "redox"],
     ["load", "--target", "redox", "--dry-run"]],
    ids=["validate", "dry-run", "load", "load-bulk", "redox", "redox-dry-run"],
)
def test_a_report_folder_that_is_a_symlink_is_refused(tmp_path: Path, command: list[str]) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    elsewhere.chmod(0o755)
    link = tmp_path / "link"
    link.symlink_to(elsewhere, target_is_directory=True)
    result = _cli(*command, str(SAMPLE / "registry.csv"), "--report-dir", str(link), "--state",
                  str(tmp_path / "s.sqlite"))
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and str(link) in lines[0] and "symbolic link" in lines[0], result.output
    assert list(elsewhere.iterdir()) == [] and _mode(elsewhere) == 0o755
    # Refused before anything was sent: no outcome is left without a report.
    for store in tmp_path.glob("*.sqlite"):
        with sqlite3.connect(store) as db:
            tables = {name for (name,) in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
            assert "records" not in tables or db.execute("SELECT count(*) FROM records").fetchone() == (0,)


def test_private_dir_refuses_a_link_and_leaves_existing_folders_alone(tmp_path: Path, open_umask: None) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o1777)
    made = private_dir(shared / "a" / "b")
    assert _mode(shared) == 0o1777  # the sticky bit stays
    assert _mode(shared / "a") == 0o700 and _mode(made) == 0o700
    assert private_dir(shared) == shared and _mode(shared) == 0o1777
    (tmp_path / "to-shared").symlink_to(shared, target_is_directory=True)
    with pytest.raises(OutputError, match="symbolic link"):
        private_dir(tmp_path / "to-shared")
    # A state store's folder is one of these too: never reached through a link.
    with pytest.raises(OutputError, match="symbolic link"):
        StateStore(tmp_path / "to-shared" / "state.sqlite", target="https://api.example.test")
    assert not (shared / "state.sqlite").exists()


@pytest.mark.parametrize("command", [["validate"], ["load", "--dry-run"]], ids=["validate", "dry-run"])
def test_an_existing_report_folder_keeps_its_mode(tmp_path: Path, open_umask: None, command: list[str]) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o1777)
    result = _cli(*command, str(SAMPLE / "registry.csv"), "--report-dir", str(shared), "--state",
                  str(tmp_path / "s.sqlite"))
    assert result.exit_code == 1, result.output  # the planted rows are rejected
    assert _mode(shared) == 0o1777
    written = [p for p in shared.iterdir()]
    assert {"rows.csv", "rejects.csv", "summary.json", "report.html"} <= {p.name for p in written}
    assert all(_mode(p) == 0o600 for p in written), [(p.name, oct(_mode(p))) for p in written]
    # A folder of its own under it ({run_id}) is made owner-only.
    result = _cli(*command, str(SAMPLE / "registry.csv"), "--report-dir", str(shared / "{run_id}"), "--state",
                  str(tmp_path / "s.sqlite"))
    [own] = [p for p in shared.iterdir() if p.is_dir()]
    assert _mode(own) == 0o700 and _mode(shared) == 0o1777


def test_a_state_store_or_its_lock_planted_as_a_link_is_refused(tmp_path: Path) -> None:
    victim = tmp_path / "victim.sqlite"
    victim.write_text("precious\n", encoding="utf-8")
    folder = tmp_path / "state"
    folder.mkdir()
    (folder / "s.sqlite").symlink_to(victim)
    result = _cli("load", str(SAMPLE / "tasks.csv"), "--state", str(folder / "s.sqlite"), "--report-dir",
                  str(tmp_path / "r"))
    assert result.exit_code == 2 and "symbolic link" in result.output, result.output
    assert len(result.output.strip().splitlines()) == 1
    (folder / "s.sqlite").unlink()
    (folder / "s.sqlite.lock").unlink(missing_ok=True)  # the refused load's own lock
    (folder / "s.sqlite.lock").symlink_to(victim)
    with pytest.raises(UnsafeFileError, match="lock"), state_lock(folder / "s.sqlite"):
        pass
    # The embedded sandbox's database beside it, too.
    for left in folder.iterdir():  # the lock, the first load's sandbox database
        left.unlink()
    (folder / "s.sandbox.sqlite").symlink_to(victim)
    result = _cli("load", str(SAMPLE / "tasks.csv"), "--state", str(folder / "s.sqlite"), "--report-dir",
                  str(tmp_path / "r"))
    assert result.exit_code == 2 and "symbolic link" in result.output, result.output
    assert victim.read_text(encoding="utf-8") == "precious\n"


# --- files -----------------------------------------------------------------------------------------


def _plant_links(folder: Path, victims: Path) -> dict[str, Path]:
    folder.mkdir(mode=0o700)
    victims.mkdir()
    planted = {}
    for name in REPORT_FILES:
        target = victims / name
        target.write_text("precious\n", encoding="utf-8")
        (folder / name).symlink_to(target)
        planted[name] = target
    return planted


def _registry(path: Path, rows: list[list[str]]) -> Path:
    header = ["Record ID", "Patient ID", "First Name", "Last Name", "DOB", "Sex", "Admin Date", "CVX", "Status"]
    with path.open("w", encoding="utf-8", newline="") as fh:
        csv.writer(fh).writerows([header, *rows])
    return path


def test_planted_links_are_replaced_never_written_through(tmp_path: Path) -> None:
    report = tmp_path / "report"
    planted = _plant_links(report, tmp_path / "victims")
    state = tmp_path / "state" / "s.sqlite"
    (tmp_path / "in").mkdir()
    first = _registry(tmp_path / "in" / "weekly.csv", [
        ["R1", "P1", "Ann", "Lee", "2015-03-04", "F", "2021-03-04", "08", "completed"],
        ["R2", "P1", "Ann", "Lee", "2015-03-04", "F", "2021-03-05", "20", "completed"],
        ["R3", "P2", "Bo", "Ray", "not a date", "M", "2021-03-06", "21", "completed"],
    ])
    runs = [
        ["validate", str(first)],
        ["load", "--dry-run", str(first)],
        ["load", str(first)],
        ["load", str(first)],
    ]
    for args in runs:
        result = _cli(*args, "--report-dir", str(report), "--state", str(state))
        assert result.exit_code == 1, (args, result.output)
    # A newer copy without R2: disappeared.csv; then a row left in doubt: reconcile.csv.
    _registry(first, [["R1", "P1", "Ann", "Lee", "2015-03-04", "F", "2021-03-04", "08", "completed"]])
    assert _cli("load", str(first), "--report-dir", str(report), "--state", str(state)).exit_code == 0
    store = StateStore.existing(state)
    body = '{"status":"completed","vaccineCode":"03","patientId":"pat_missing"}'
    store.mark_pending("immunization", [("R9", "h9", body)], "crashed")
    store.close()
    result = _cli("reconcile", "--state", str(state), "--report-dir", str(report), "--consistency-window", "0")
    assert result.exit_code in (0, 3), result.output
    for name, target in planted.items():
        assert target.read_text(encoding="utf-8") == "precious\n", name
        written = report / name
        assert not written.is_symlink() and written.is_file(), name
        assert _mode(written) == 0o600, (name, oct(_mode(written)))
    assert not [p for p in report.iterdir() if p.name.endswith(".tmp") or p.name.startswith(".batches")]


def test_a_second_run_into_the_same_folder_replaces_the_first_runs_files(tmp_path: Path) -> None:
    report = tmp_path / "report"
    runs = []
    for _ in range(2):
        result = _cli("validate", str(SAMPLE / "tasks.csv"), "--report-dir", str(report))
        assert result.exit_code in (0, 1), result.output
        summary = json.loads((report / "summary.json").read_text("utf-8"))
        runs.append((summary["run_id"], pl.read_csv(report / "rows.csv").height, summary["rows_total"]))
    assert runs[0][0] != runs[1][0]  # the second run's summary, not the first's
    assert runs[0][1:] == runs[1][1:] and runs[1][1] == runs[1][2]
    assert sorted(p.name for p in report.iterdir()) == ["rejects.csv", "report.html", "rows.csv", "summary.json"]


def test_a_private_file_is_whole_or_not_there(tmp_path: Path) -> None:
    path = tmp_path / "rows.csv"
    path.write_text("old\n", encoding="utf-8")
    with pytest.raises(RuntimeError), private_file(path) as fh:
        fh.write(b"half a fi")
        raise RuntimeError("the disk is full")
    assert path.read_text(encoding="utf-8") == "old\n"  # left as it was
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rows.csv"]  # no temporary file left behind
    (tmp_path / "a-folder").mkdir()
    with pytest.raises(OutputError, match="a-folder"), private_file(tmp_path / "a-folder") as fh:
        fh.write(b"x")
    previous = os.umask(0o277)
    try:
        write_csv(pl.DataFrame({"a": ["1"]}), path)
    finally:
        os.umask(previous)
    assert _mode(path) == 0o600 and path.read_text(encoding="utf-8") == "a\n1\n"


def test_a_finished_scratch_file_is_moved_into_place_owner_only_replacing_a_planted_link(tmp_path: Path) -> None:
    """``publish_file`` (rows.csv written as the batches went): moved, not copied, onto its name; a link planted
    there is replaced and its target untouched; the file is owner-only whatever the umask made it."""
    report, scratch = tmp_path / "report", tmp_path / "report" / ".batches-x"
    planted = _plant_links(report, tmp_path / "victims")
    scratch.mkdir()
    lines = scratch / "rows.csv.lines"
    previous = os.umask(0o022)
    try:
        lines.write_bytes(b"source_file\nf.csv\n")
    finally:
        os.umask(previous)
    inode = lines.stat().st_ino
    publish_file(lines, report / "rows.csv")
    published = report / "rows.csv"
    assert not published.is_symlink() and published.read_bytes() == b"source_file\nf.csv\n"
    assert published.stat().st_ino == inode and not lines.exists()  # moved, nothing copied
    assert _mode(published) == 0o600
    assert planted["rows.csv"].read_text(encoding="utf-8") == "precious\n"
    with pytest.raises(OutputError, match="cannot be written"):
        publish_file(scratch / "gone", report / "rows.csv")


# --- formulas --------------------------------------------------------------------------------------

TRICKY = ["=1+1", "@SUM(A1)", "-5", "+1", "\tx", "\rx", "\uff1dSUM(A1)", "\uff20x", "'=x", "''-1", "'plain", "plain",
          "a=b", "", "-", "'"]


def test_guarding_is_undone_exactly_and_leaves_numbers_alone() -> None:
    frame = pl.DataFrame({"=cmd": TRICKY, "n": [-0.5] * len(TRICKY)})
    guarded_frame = guard_formulas(frame)
    assert guarded_frame.columns == ["'=cmd", "n"]
    assert guarded_frame["n"].to_list() == [-0.5] * len(TRICKY)  # a number column is not text
    assert not [v for v in guarded_frame["'=cmd"].to_list() if v.startswith(FORMULA_STARTS)]
    assert guarded_frame["'=cmd"].to_list()[:3] == ["'=1+1", "'@SUM(A1)", "'-5"]
    assert unguard_formulas(guarded_frame).equals(frame)
    assert [unguarded(guarded(v)) for v in TRICKY] == TRICKY
    assert guard_formulas(frame.lazy()).collect().equals(guarded_frame)


_CELL_STARTS = st.sampled_from(["", "'", "''", *FORMULA_STARTS, "a", "\u00e9", "\uff1e", "\uffe0", " "])


@settings(max_examples=150, deadline=None)
@given(st.lists(st.lists(st.one_of(st.none(), st.tuples(_CELL_STARTS, st.text(max_size=4)).map("".join)),
                         min_size=3, max_size=3), min_size=0, max_size=12))
def test_a_frame_is_guarded_cell_by_cell_whichever_columns_hold_a_formula(rows: list[list[str | None]]) -> None:
    # An in-memory frame skips the columns whose cells cannot start a formula (by their first byte): each
    # cell is still guarded as guarded() says, like the lazy frame's, and unguarding gives the frame back.
    frame = pl.DataFrame(rows, schema=["a", "b", "c"], orient="row")
    out = guard_formulas(frame)
    for name in frame.columns:
        assert out[name].to_list() == [None if v is None else guarded(v) for v in frame[name].to_list()]
    assert out.equals(guard_formulas(frame.lazy()).collect())
    assert unguard_formulas(out).equals(frame)
    back = [None if v is None else unguarded(v) for v in frame["a"].to_list()]
    assert unguard_formulas(frame)["a"].to_list() == back


def _formula_cells(folder: Path) -> list[tuple[str, str]]:
    found = []
    for path in sorted(folder.glob("*.csv")):
        with path.open(encoding="utf-8", newline="") as fh:
            found += [(path.name, cell) for row in csv.reader(fh) for cell in row if cell.startswith(FORMULA_STARTS)]
    return found


HOSTILE_HEADER = ["Record ID", "Patient ID", "First Name", "Last Name", "DOB", "Sex", "Admin Date", "CVX", "Status",
                  "=1+1"]
HOSTILE = [
    ["@SUM(A1)", "-5", "Ann", "Lee", "2015-03-04", "F", "2021-03-04", "08", "completed", "+cmd"],
    ["-0.5", "=HYPERLINK(\"http://x\")", "+1", "-1", "not a date", "F", "2021-03-04", "08", "completed", "@x"],
    ["\uff1dR3", "+P3", "Bo", "=Ray", "2015-03-04", "M", "2021-03-05", "20", "completed", "\uff0d2"],
]


def _hostile(path: Path, rows: list[list[str]] = HOSTILE) -> Path:
    with path.open("w", encoding="utf-8", newline="") as fh:
        csv.writer(fh).writerows([HOSTILE_HEADER, *rows])
    return path


@pytest.mark.parametrize("batch_rows", ["1", "75000"])
def test_no_csv_the_tool_writes_holds_a_formula_and_its_own_files_read_back(tmp_path: Path, batch_rows: str) -> None:
    (tmp_path / "in").mkdir()
    source = _hostile(tmp_path / "in" / "hostile.csv")
    state = str(tmp_path / "s.sqlite")
    checked = []
    cut = ["--batch-rows", batch_rows]
    for name, args in [("v", ["validate", *cut]), ("d", ["load", "--dry-run", *cut]), ("l", ["load", *cut])]:
        result = _cli(*args, str(source), "--report-dir", str(tmp_path / name), "--state", state)
        assert result.exit_code == 1, result.output  # the second row is rejected
        assert _formula_cells(tmp_path / name) == [], name
        checked += [p.name for p in (tmp_path / name).glob("*.csv")]
    # What the tool wrote was guarded: the check above sees the cells.
    rejects = pl.read_csv(tmp_path / "v" / "rejects.csv", infer_schema=False)
    assert rejects.columns[-2] == "'=1+1" and rejects["Patient ID"].to_list() == ["'=HYPERLINK(\"http://x\")"]
    # crosswalk.csv reads back as the ids it holds, guard removed.
    crosswalk = read_crosswalk(tmp_path / "l" / "crosswalk.csv")
    assert {("immunization", "@SUM(A1)"), ("patient", "-5"), ("immunization", "\uff1dR3"),
            ("patient", "+P3")} <= set(crosswalk)
    # A newer copy of the file without @SUM(A1): disappeared.csv, guarded too.
    _hostile(source, HOSTILE[1:])
    result = _cli("load", *cut, str(source), "--report-dir", str(tmp_path / "again"), "--state", state)
    assert result.exit_code == 1, result.output
    assert pl.read_csv(tmp_path / "again" / "disappeared.csv", infer_schema=False)["source_key"].to_list() == [
        "'@SUM(A1)"
    ]
    assert _formula_cells(tmp_path / "again") == []
    # A row left in doubt under a hostile key: reconcile.csv.
    store = StateStore.existing(Path(state))
    body = '{"status":"completed","vaccineCode":"03","patientId":"pat_missing"}'
    store.mark_pending("immunization", [("=cmd|' /C calc'!A0", "h9", body)], "crashed")
    store.close()
    result = _cli("reconcile", "--state", state, "--report-dir", str(tmp_path / "rec"), "--consistency-window", "0")
    assert result.exit_code in (0, 3), result.output
    assert pl.read_csv(tmp_path / "rec" / "reconcile.csv", infer_schema=False)["source_key"].to_list() == [
        "'=cmd|' /C calc'!A0"
    ]
    assert _formula_cells(tmp_path / "rec") == []
    assert {"rows.csv", "rejects.csv", "crosswalk.csv"} <= set(checked)


def test_a_report_read_back_from_rows_csv_holds_the_values_themselves(tmp_path: Path) -> None:
    from etl.pipeline import validate_files
    from etl.settings import Settings

    source = _hostile(tmp_path / "hostile.csv")
    batched = validate_files([source], Settings(report_dir=tmp_path / "batched", batch_rows=1))
    whole = validate_files([source], Settings(report_dir=tmp_path / "whole"))  # one batch
    assert batched.held is None  # rows.csv is read back
    assert batched.rows.equals(whole.rows)
    assert "@SUM(A1)" in batched.rows["source_key"].to_list()


def test_a_rejects_file_imported_again_reads_as_the_source_did(tmp_path: Path) -> None:
    source = _hostile(tmp_path / "hostile.csv")
    assert _cli("validate", str(source), "--report-dir", str(tmp_path / "r")).exit_code == 1
    again = read_table(tmp_path / "r" / "rejects.csv").frame
    assert again.columns[1:] == ["source_file", "source_row", *HOSTILE_HEADER, "reasons"]
    assert again.row(0)[3:-1] == tuple(HOSTILE[1])  # every cell as it was in the source
    # A header edited by hand onto another's unguarded name: read as written, not refused.
    edited = tmp_path / "edited.csv"
    edited.write_text("source_file,source_row,'=a,=a,reasons\nx,2,'-1,'-1,bad\n", encoding="utf-8")
    assert read_table(edited).columns == ["source_file", "source_row", "'=a", "=a", "reasons"]
    # A plain input with the same quote-led cells is read as written: only the tool's own files are unguarded.
    plain = tmp_path / "plain.csv"
    plain.write_text("Record ID,Notes\n'=x,'-1\n", encoding="utf-8")
    assert read_table(plain).frame.row(0)[1:] == ("'=x", "'-1")


# --- redaction -------------------------------------------------------------------------------------

#: Names, a phone number and an address planted in every kind of cell a report could show.
SECRETS = ("Persephone", "Ravensworth", "Wilhelmina Fairweather", "Bartholomew", "617-555-0199", "Ottoline",
           "Quillfeather", "Thistledown Lane", "Zebulon")


def _redaction_inputs(folder: Path) -> list[str]:
    folder.mkdir()
    files = {
        "patients.csv": [
            ["Patient ID", "First Name", "Last Name", "DOB", "Sex", "Phone", "Street", "Caregiver"],
            ["P1", "Persephone", "Ravensworth", "2015-03-04", "F", "617-555-0199", "1 Thistledown Lane", "Ottoline"],
            ["P2", "Zebulon", "Quillfeather", "not a date", "M", "617-555-0199", "2 Thistledown Lane", "Ottoline"],
        ],
        "providers.csv": [
            ["Provider ID", "NPI", "First Name", "Last Name"],
            ["PRV-1", "1234567893", "Amara", "Okonkwo"],
        ],
        "registry.csv": [
            ["Record ID", "Patient ID", "First Name", "Last Name", "DOB", "Sex", "Admin Date", "CVX", "Status",
             "Notes", "Caregiver"],
            ["VX-1", "P1", "Persephone", "Ravensworth", "2015-03-04", "F", "2021-03-04", "08", "completed",
             "mother Wilhelmina Fairweather, call 617-555-0199", "Ottoline"],
            ["VX-2", "P2", "Zebulon", "Quillfeather", "2015-03-04", "M", "not a date", "08", "completed",
             "Bartholomew drove him in", "Ottoline"],
        ],
        "tasks.csv": [
            ["Task ID", "Patient ID", "Status", "Intent", "Description", "Note", "Caregiver"],
            ["T-1", "P1", "requested", "order", "Call Wilhelmina Fairweather on 617-555-0199", "Bartholomew",
             "Ottoline"],
            ["T-2", "P1", "no-such-status", "order", "Remind Persephone Ravensworth and Wilhelmina Fairweather",
             "ask Bartholomew", "Ottoline"],
        ],
        "documents.csv": [
            ["Document ID", "Patient ID", "Author ID", "Status", "Type", "Title", "Section Title", "Section Text"],
            ["DOC-1", "P1", "PRV-1", "final", "summary", "Letter for Persephone Ravensworth", "Visit",
             "Seen with Wilhelmina Fairweather (617-555-0199)."],
            ["DOC-2", "P1", "PRV-1", "no-such-status", "summary", "About Zebulon", "Visit",
             "Bartholomew Quillfeather, 2 Thistledown Lane"],
        ],
    }
    for name, rows in files.items():
        with (folder / name).open("w", encoding="utf-8", newline="") as fh:
            csv.writer(fh).writerows(rows)
    return [str(folder / name) for name in files]


def _leaked(folder: Path) -> set[str]:
    text = "".join(p.read_text("utf-8") for p in folder.rglob("*") if p.is_file())
    return {s for s in SECRETS if s in text}


@pytest.mark.parametrize(
    "command",
    [["validate"], ["load", "--dry-run"], ["load", "--dry-run", "--batch-rows", "1"]],
    ids=["validate", "dry-run", "dry-run-in-1-row-batches"],
)
def test_redact_leaves_no_name_or_free_text_in_any_output(tmp_path: Path, command: list[str]) -> None:
    inputs = _redaction_inputs(tmp_path / "in")
    state = str(tmp_path / "s.sqlite")
    plain = _cli(*command, *inputs, "--report-dir", str(tmp_path / "plain"), "--state", state)
    redacted = _cli(*command, *inputs, "--redact", "--report-dir", str(tmp_path / "redacted"), "--state", state)
    assert plain.exit_code == redacted.exit_code == 1, (plain.output, redacted.output)
    assert _leaked(tmp_path / "plain") == set(SECRETS)  # the check sees every secret when it is there
    assert _leaked(tmp_path / "redacted") == set(), sorted((tmp_path / "redacted").iterdir())
    assert all(s not in redacted.output for s in SECRETS)
    # The same rows, in the same states: only what they show changed.
    rows = {name: pl.read_csv(tmp_path / name / "rows.csv", infer_schema=False) for name in ("plain", "redacted")}
    assert rows["plain"].select("source_file", "source_row", "state", "error_code", "field").equals(
        rows["redacted"].select("source_file", "source_row", "state", "error_code", "field")
    )
    rejects = pl.read_csv(tmp_path / "redacted" / "rejects.csv", infer_schema=False)
    assert {"Patient ID", "Record ID", "Status"} <= set(rejects.columns)  # ids and codes stay
    assert not {"Notes", "Caregiver", "Description", "Section Text", "First Name"} & set(rejects.columns)
    if "--dry-run" in command:
        payloads = (tmp_path / "redacted" / "payloads.ndjson").read_text("utf-8")
        assert '"firstName":"[redacted]"' in payloads and '"source_key": "T-1"' in payloads


def test_redact_leaves_names_out_of_a_redox_dry_run(tmp_path: Path) -> None:
    inputs = _redaction_inputs(tmp_path / "in")
    registry = [i for i in inputs if i.endswith("registry.csv")]
    for name, extra in (("plain", []), ("redacted", ["--redact"])):
        result = _cli("load", "--target", "redox", "--dry-run", *registry, *extra, "--report-dir",
                      str(tmp_path / name))
        assert result.exit_code == 1, result.output
    assert {"Persephone", "Ravensworth", "Wilhelmina Fairweather"} <= _leaked(tmp_path / "plain")
    assert _leaked(tmp_path / "redacted") == set()
    bundle = (tmp_path / "redacted" / "payloads.ndjson").read_text("utf-8")
    assert '"[redacted]"' in bundle and '"VX-1"' in bundle  # the row can still be found
