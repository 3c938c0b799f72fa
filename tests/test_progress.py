"""Progress: per-stage counts, the up-front estimate, and what the CLI shows where."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import httpx
from click.testing import CliRunner
from rich.console import Console

from etl.cli import main
from etl.pipeline import load_files
from etl.progress import (
    LoadEstimate,
    NotesProgress,
    Progress,
    RichProgress,
    as_progress,
    describe_duration,
    estimate_note,
    open_progress,
)
from etl.sandbox import SandboxConfig, SandboxServer
from etl.settings import Settings

from .conftest import SAMPLE


class Recorder(Progress):
    """Keeps every call, to check what a run reported."""

    def __init__(self) -> None:
        self.totals: dict[str, int] = {}
        self.done: dict[str, int] = {}
        self.finished: list[str] = []
        self.notes: list[str] = []
        self.paced: list[float | None] = []

    def start(self, stage: str, total: int | None = None) -> None:
        self.totals[stage] = self.totals.get(stage, 0) + (total or 0)

    def advance(self, stage: str, n: int = 1) -> None:
        self.done[stage] = self.done.get(stage, 0) + n

    def finish(self, stage: str) -> None:
        self.finished.append(stage)

    def note(self, message: str) -> None:
        self.notes.append(message)

    def pace(self, rate: Any) -> None:
        self.paced.append(rate())


def test_durations_read_as_a_person_says_them() -> None:
    assert describe_duration(0.2) == "<1 s"
    assert describe_duration(42) == "42 s"
    assert describe_duration(200) == "3 min 20 s"
    assert describe_duration(45 * 60) == "45 min"
    assert describe_duration(4982) == "1 h 23 min"
    assert describe_duration(7200) == "2 h"


def test_the_estimate_names_requests_rate_plan_and_time() -> None:
    assert estimate_note(692, 500 / 3600, limit=500, window=3600) == (
        "692 requests at ~0.14/s (500 per 3600 s): about 1 h 23 min"
    )
    assert estimate_note(600, 0.5) == "600 requests at ~0.50/s (--rate): about 20 min"


def test_a_long_load_is_announced_once_from_the_first_rate_limit_headers() -> None:
    config = SandboxConfig(rate_limit=1000, window=3600)
    with SandboxServer(config) as server, httpx.Client(base_url=server.base_url) as http:
        headers = http.get("/v1/patients", headers={"x-api-key": server.api_key}).headers
    seen = Recorder()
    estimate = LoadEstimate(seen)
    estimate.observe(headers)
    assert seen.notes == []  # not before it knows how many requests
    estimate.plan(692)
    assert len(seen.notes) == 1
    assert seen.notes[0].startswith("692 requests at ~0.28/s (1000 per 3600 s): about 41 min")
    estimate.observe(headers)
    assert len(seen.notes) == 1

    short = Recorder()
    quick = LoadEstimate(short)
    quick.plan(10)
    quick.observe(headers)  # 10 requests at 0.28/s: 36 s, not worth a word
    assert short.notes == []

    fixed = Recorder()
    LoadEstimate(fixed, rate=2.0).plan(500)
    assert fixed.notes == ["500 requests at ~2.00/s (--rate): about 4 min 10 s"]


def test_every_stage_reports_its_counts(tmp_path: Path, sandbox: Any) -> None:
    seen = Recorder()
    settings = Settings(
        base_url=sandbox.base_url,
        api_key=sandbox.api_key,
        consistency_window=0,
        state=tmp_path / "state.sqlite",
        report_dir=tmp_path / "report",
    )
    report = load_files([SAMPLE / "registry.csv"], settings, progress=seen)
    rows, valid = report.rows_total, report.rows_total - report.states["rejected"]
    assert seen.done["read"] == seen.done["validate"] == rows
    assert seen.totals["validate"] == rows
    assert seen.totals["transform"] == seen.done["transform"]
    assert seen.done["transform"] >= valid
    assert "read" in seen.finished
    assert seen.totals["patient"] == seen.done["patient"] == report.summary["patients"]["created"]
    assert seen.totals["immunization"] == seen.done["immunization"] == report.states["created"]
    assert seen.paced and seen.paced[0] is not None and seen.paced[0] > 0
    assert seen.notes == []  # an unlimited sandbox makes no load long

    again = Recorder()
    load_files([SAMPLE / "registry.csv"], settings.model_copy(update={"report_dir": tmp_path / "r2"}), progress=again)
    assert "immunization" not in again.totals  # nothing left to send, so no load stage at all


def test_a_plain_callback_still_works() -> None:
    calls: list[tuple[str, int]] = []
    progress = as_progress(lambda stage, n: calls.append((stage, n)))
    progress.start("immunization", 3)
    progress.advance("immunization", 1)
    progress("immunization", 1)
    progress("waiting 3 s", 0)
    assert calls == [("immunization", 1), ("immunization", 1), ("waiting 3 s", 0)]


def test_live_bars_leave_their_final_state_on_screen(tmp_path: Path, sandbox: Any) -> None:
    screen = io.StringIO()
    console = Console(file=screen, force_terminal=True, width=120, color_system=None)
    settings = Settings(
        base_url=sandbox.base_url,
        api_key=sandbox.api_key,
        consistency_window=0,
        state=tmp_path / "state.sqlite",
        report_dir=tmp_path / "report",
    )
    with RichProgress(console) as progress:
        load_files([SAMPLE / "registry.csv"], settings, progress=progress)
        progress.note("a note above the bars")
    text = screen.getvalue()
    for line in ("read", "validate", "transform", "load patient", "load immunization", "a note above the bars"):
        assert line in text
    assert "534/534" in text and "done in" in text


def test_what_the_cli_shows_depends_on_the_terminal() -> None:
    assert type(open_progress(quiet=True)) is Progress
    assert isinstance(open_progress(stream=io.StringIO()), NotesProgress)

    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    live = open_progress(stream=Tty())
    try:
        assert isinstance(live, RichProgress)
    finally:
        live.close()
    lines = io.StringIO()
    notes = NotesProgress(lines)
    notes.advance("immunization", 5)  # bars would be noise in a log
    notes.note("692 requests at ~0.14/s")
    assert lines.getvalue() == "clinik-etl: 692 requests at ~0.14/s\n"


def test_quiet_prints_nothing_and_json_prints_only_the_summary(tmp_path: Path) -> None:
    runner = CliRunner()
    quiet = runner.invoke(main, ["validate", str(SAMPLE / "registry.csv"), "-q", "--report-dir", str(tmp_path / "q")])
    assert quiet.exit_code == 1
    assert quiet.output == ""
    result = runner.invoke(
        main, ["load", "--dry-run", str(SAMPLE / "registry.csv"), "--json", "--report-dir", str(tmp_path / "j")]
    )
    assert result.exit_code == 1
    summary = json.loads(result.stdout)
    assert summary == json.loads((tmp_path / "j" / "summary.json").read_text(encoding="utf-8"))
    assert summary["states"]["rejected"] == 26 and summary["dry_run"] is True
    for command in ("validate", "load"):
        text = runner.invoke(main, [command, "--help"]).output
        assert "-q, --quiet" in text and "--json" in text
