"""Scheduled imports: job files, the state-store lock, `run` and `history`."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from etl.cli import main
from etl.errors import StateError, UsageError
from etl.jobs import job_keys, load_job
from etl.load.lock import lock_path, state_lock
from etl.sandbox import SandboxConfig, SandboxServer

from .conftest import REGISTRY_HEAD_PATIENTS, REGISTRY_HEAD_VALID, ROOT, SAMPLE
from .test_pipeline import count


def _job(folder: Path, text: str, name: str = "job.toml") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(text, encoding="utf-8")
    return path


def test_paths_in_a_job_are_relative_to_the_job_file(tmp_path: Path) -> None:
    exports = tmp_path / "jobs" / "exports"
    exports.mkdir(parents=True)
    for name in ("b-2026-11.csv", "a-2026-10.csv", "notes.txt"):
        (exports / name).write_text("x\n", encoding="utf-8")
    job = load_job(
        _job(
            tmp_path / "jobs",
            'inputs = ["exports/*.csv"]\nrate = 0.5\nconcurrency = 2\nstate = "state/w.sqlite"\n'
            'reports = "../out"\nprofile = "county.toml"\n',
        )
    )
    assert [p.name for p in job.inputs] == ["a-2026-10.csv", "b-2026-11.csv"]
    assert job.name == "job"
    assert job.settings.rate == 0.5 and job.settings.concurrency == 2
    assert job.settings.state == tmp_path / "jobs" / "state" / "w.sqlite"
    assert Path(str(job.settings.profile)) == tmp_path / "jobs" / "county.toml"
    assert load_job(_job(tmp_path / "jobs", 'inputs = "exports/*.csv"\nprofile = "cvrs"\n')).settings.profile in (
        "cvrs",
        Path("cvrs"),
    )  # a built-in profile's name stays a name
    assert job.settings.report_dir == tmp_path / "out" / "{run_id}"
    defaults = load_job(_job(tmp_path / "jobs", 'inputs = "exports/a-2026-10.csv"\n', "weekly.toml"))
    assert defaults.settings.state == tmp_path / "jobs" / ".clinik-etl" / "weekly.sqlite"
    assert defaults.settings.report_dir == tmp_path / "jobs" / "reports" / "weekly" / "{run_id}"
    assert defaults.settings.wait is False


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('inputs = ["missing-*.csv"]\n', "no input file matches 'missing-*.csv'"),
        ('inputs = ["x.csv"]\n', "no input file matches 'x.csv'"),
        ("rate = 1\n", "a job needs inputs"),
        ('inputs = ["ok.csv"]\nspeed = 3\n', "unknown key(s) speed"),
        ('inputs = ["ok.csv"]\napi_key = "clk_test_abc"\n', "api_key does not belong in a job file"),
        ('inputs = ["ok.csv"]\nconcurrency = 0\n', "concurrency"),
        ('inputs = ["ok.csv"\n', "not valid TOML"),
    ],
)
def test_a_job_that_cannot_run_says_why(tmp_path: Path, text: str, message: str) -> None:
    (tmp_path / "ok.csv").write_text("x\n", encoding="utf-8")
    with pytest.raises(UsageError) as info:
        load_job(_job(tmp_path, text))
    assert message in str(info.value)


def test_a_job_can_set_every_run_setting_but_secrets() -> None:
    keys = set(job_keys())
    assert {"inputs", "profile", "base_url", "rate", "concurrency", "state", "reports", "wait", "api_key_file"} <= keys
    assert "api_key" not in keys and "report_dir" not in keys


def test_the_shipped_demo_job_loads(tmp_path: Path) -> None:
    job = load_job(SAMPLE / "demo-job.toml")
    assert job.inputs == tuple(
        SAMPLE / n for n in ("registry.csv", "providers.csv", "visits.csv", "documents.csv", "tasks.csv")
    )
    assert job.settings.base_url is None  # the embedded sandbox: no key needed
    assert job.settings.state == ROOT / ".clinik-etl" / "demo-job.sqlite"


def test_the_lock_lets_one_run_in(tmp_path: Path) -> None:
    state = tmp_path / "s" / "state.sqlite"
    with state_lock(state) as path:
        assert path == lock_path(state) and path.name == "state.sqlite.lock"
        assert f"pid {os.getpid()}" in path.read_text(encoding="utf-8")
        with (
            pytest.raises(StateError, match=r"another clinik-etl run \(pid \d+, started .*\) is using"),
            state_lock(state),
        ):
            pass
    with state_lock(state):  # released when the first run ended
        pass
    assert oct(lock_path(state).stat().st_mode & 0o777) == oct(0o600)


def test_wait_queues_behind_the_holder(tmp_path: Path) -> None:
    state = tmp_path / "state.sqlite"
    told: list[str] = []
    order: list[str] = []
    holding = threading.Event()

    def first() -> None:
        with state_lock(state):
            holding.set()
            time.sleep(0.3)
            order.append("first done")

    thread = threading.Thread(target=first)
    thread.start()
    holding.wait(5)
    with state_lock(state, wait=True, on_wait=told.append, poll=0.02):
        order.append("second in")
    thread.join()
    assert order == ["first done", "second in"]
    assert len(told) == 1 and "waiting for it to finish" in told[0]


def test_run_a_job_then_read_its_history(tmp_path: Path) -> None:
    job = _job(
        tmp_path,
        f'name = "weekly-registry"\ninputs = ["{SAMPLE / "registry.csv"}"]\nstate = "state.sqlite"\n'
        'reports = "reports"\n',
    )
    runner = CliRunner()
    first = runner.invoke(main, ["run", str(job), "--json"])
    assert first.exit_code == 1, first.output  # the sample's planted rows are rejected
    summary = json.loads(first.stdout)
    assert summary["states"]["created"] == 534
    folder = tmp_path / "reports" / summary["run_id"]
    assert summary["report_dir"] == str(folder) and (folder / "report.html").is_file()
    second = runner.invoke(main, ["run", str(job), "-q"])
    assert second.exit_code == 1 and second.output == ""
    # The same state store by hand: a load, a reconcile, and a dry run (which records nothing).
    state = str(tmp_path / "state.sqlite")
    by_hand = runner.invoke(
        main, ["load", str(SAMPLE / "registry.csv"), "--state", state, "-q", "--report-dir", str(tmp_path / "by-hand")]
    )
    assert by_hand.exit_code == 1, by_hand.output
    settled = runner.invoke(main, ["reconcile", "--state", state, "--report-dir", str(tmp_path / "settled")])
    assert settled.exit_code == 0, settled.output
    assert runner.invoke(main, ["run", str(job), "--dry-run", "-q"]).exit_code == 1

    listed = runner.invoke(main, ["history", "--state", state])
    assert listed.exit_code == 0, listed.output
    assert summary["run_id"] in listed.output and "534" in listed.output
    lines = [line.split() for line in listed.output.splitlines() if line.lstrip().startswith("20")]
    assert [words[1:3] if words[1] == "run" else words[1:2] for words in lines] == [
        ["run", "weekly-registry"],
        ["run", "weekly-registry"],
        ["load"],
        ["reconcile"],
    ]
    data = json.loads(runner.invoke(main, ["history", "--state", state, "--json"]).stdout)
    assert [(r["command"], r["job"]) for r in data["runs"]] == [
        ("run", "weekly-registry"),
        ("run", "weekly-registry"),
        ("load", None),
        ("reconcile", None),
    ]
    assert [r["summary"]["states"]["created"] for r in data["runs"][:3]] == [534, 0, 0]
    assert [r["summary"]["states"]["skipped"] for r in data["runs"][:3]] == [0, 534, 534]
    assert data["target"].startswith("embedded-sandbox:")

    missing = runner.invoke(main, ["history", "--state", str(tmp_path / "nope.sqlite")])
    assert missing.exit_code == 2 and "no state store here" in missing.output
    assert not (tmp_path / "nope.sqlite").exists()


def test_history_reads_a_state_store_written_before_runs_named_their_job(tmp_path: Path) -> None:
    state = tmp_path / "old.sqlite"
    with contextlib.closing(sqlite3.connect(state)) as db, db:
        db.executescript(
            "CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);"
            "INSERT INTO meta VALUES ('target', 'https://api.example.test'), ('version', '1');"
            "CREATE TABLE runs (run_id TEXT PRIMARY KEY, started_at REAL NOT NULL, finished_at REAL,"
            " command TEXT NOT NULL, summary TEXT);"
            "INSERT INTO runs VALUES ('20250101T000000-aaaa', 1735689600, 1735689660, 'load', '{\"states\": {}}');"
            "INSERT INTO runs VALUES ('20250102T000000-bbbb', 1735776000, NULL, 'reconcile', NULL);"
        )
    runner = CliRunner()
    listed = runner.invoke(main, ["history", "--state", str(state)])
    assert listed.exit_code == 0, listed.output
    assert "load" in listed.output and "reconcile" in listed.output and "unfinished" in listed.output
    data = json.loads(runner.invoke(main, ["history", "--state", str(state), "--json"]).stdout)
    assert [(r["command"], r["job"]) for r in data["runs"]] == [("load", None), ("reconcile", None)]
    with contextlib.closing(sqlite3.connect(state)) as db:
        assert "job" in {row[1] for row in db.execute("PRAGMA table_info(runs)")}


def test_a_held_state_store_stops_a_load_with_exit_2(tmp_path: Path) -> None:
    state = tmp_path / "state.sqlite"
    with state_lock(state):
        result = CliRunner().invoke(
            main,
            ["load", str(SAMPLE / "registry.csv"), "--state", str(state), "--report-dir", str(tmp_path / "r")],
        )
    assert result.exit_code == 2
    assert "another clinik-etl run" in result.output and "--wait" in result.output
    assert not (tmp_path / "r").exists()


def _spawn(job: Path, *args: str, key: str) -> subprocess.Popen[str]:
    env = {**os.environ, "CLINIKAPI_SECRET_KEY": key}
    return subprocess.Popen(
        [sys.executable, "-m", "etl.cli", "run", str(job), *args],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


@pytest.mark.slow
def test_overlapping_runs_load_each_row_once(tmp_path: Path, registry_head: Path) -> None:
    # The sample registry's first 280 rows (conftest's registry_head): the overlap is the point, not the size.
    key = "clk_test_overlap1"
    with SandboxServer(SandboxConfig(api_keys={key: "*"})) as server:
        job = _job(
            tmp_path,
            f'inputs = ["{registry_head}"]\nbase_url = "{server.base_url}"\n'
            'state = "state.sqlite"\nreports = "reports"\nconsistency_window = 0\n',
        )
        lock = tmp_path / "state.sqlite.lock"
        first = _spawn(job, "-q", key=key)
        try:
            deadline = time.monotonic() + 60
            while f"pid {first.pid}," not in (lock.read_text(encoding="utf-8") if lock.exists() else ""):
                assert first.poll() is None and time.monotonic() < deadline, "the first run never took the lock"
                time.sleep(0.02)
            # Freeze the first run while it holds the lock, so that the overlap is certain, not a race.
            os.kill(first.pid, signal.SIGSTOP)
            second = _spawn(job, key=key)
            out, err = second.communicate(timeout=120)
            assert second.returncode == 2, (out, err)
            assert f"another clinik-etl run (pid {first.pid}" in err and "is using the state store" in err
            third = _spawn(job, "--wait", "--json", key=key)
            assert third.stderr is not None
            assert "waiting for it to finish" in third.stderr.readline()
        finally:
            os.kill(first.pid, signal.SIGCONT)
        first.communicate(timeout=120)
        out, _ = third.communicate(timeout=120)
        assert first.returncode == 1 and third.returncode == 1
        summary = json.loads(out)
        assert summary["states"]["skipped"] == REGISTRY_HEAD_VALID and summary["states"]["created"] == 0
        assert count(server, "/v1/immunizations") == REGISTRY_HEAD_VALID
        assert count(server, "/v1/patients") == REGISTRY_HEAD_PATIENTS


def test_a_job_run_is_recorded_as_the_jobs_run_from_its_start(tmp_path: Path) -> None:
    """So that `history` names the job even for a run killed before it could finish."""
    from etl.jobs import run_job
    from etl.load.state import StateStore

    job = load_job(
        _job(
            tmp_path,
            f'name = "nightly"\ninputs = ["{SAMPLE / "registry.csv"}"]\nstate = "state.sqlite"\nreports = "r"\n',
        )
    )
    seen: list[tuple[object, object, object]] = []

    def progress(stage: str, n: int) -> None:  # called while rows are being sent
        if not seen and (tmp_path / "state.sqlite").is_file():
            with StateStore.existing(tmp_path / "state.sqlite") as store:
                runs = store.runs()  # none while the rows are planned: the run starts once they are
            if runs and (latest := runs[-1])["finished_at"] is None:
                seen.append((latest["command"], latest["job"], latest["finished_at"]))

    report = run_job(job, progress=progress)
    assert report.states["created"] == 534
    assert seen == [("run", "nightly", None)]


def test_an_old_job_with_the_stream_key_still_runs_with_a_warning(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from etl.jobs import run_job
    from etl.pipeline import STREAM_DEPRECATED

    few = tmp_path / "few.csv"
    few.write_text("Record ID,Patient ID,First Name,Last Name,CVX,Admin Date\nR1,P1,Ann,Lee,08,2021-03-04\n",
                   encoding="utf-8")
    job = load_job(_job(tmp_path, 'inputs = ["few.csv"]\nstream = false\nbatch_rows = 7\n'))
    report = run_job(job)
    assert report.states["created"] == 1 and report.summary["batch_rows"] == 7  # in batches all the same
    assert STREAM_DEPRECATED in capsys.readouterr().err
