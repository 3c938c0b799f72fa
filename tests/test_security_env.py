"""Hardened against the environment: files that hold PHI are never reached through a link nor left
readable by others, and an environment that fails under a run (a read-only report folder, a full
disk, a state store another process holds, a port in use, a file nested too deeply to parse) ends
it with one line naming what failed and exit 2, never a traceback."""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import socket
import sqlite3
import stat
import subprocess
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from etl.cli import main
from etl.errors import ExitCode, OutputError, StateError, UnsafeFileError
from etl.files import check_private_file
from etl.load.lock import lock_path, state_lock
from etl.load.state import StateStore
from etl.report import report_output
from etl.sandbox import SandboxServer
from etl.sandbox.store import Store
from schemas.limits import ROUTES

from .conftest import SAMPLE

FEW_ROWS = "".join((SAMPLE / "registry.csv").read_text(encoding="utf-8").splitlines(keepends=True)[:4])


def _one_line_error(result: Result) -> str:
    """The run ended with exit 2 and one ``error:`` line on stderr (warnings aside), no traceback."""
    assert result.exit_code == ExitCode.USAGE, (result.exit_code, result.output, result.exception)
    assert isinstance(result.exception, SystemExit)
    lines = [line for line in result.stderr.splitlines() if not line.startswith("warning: ")]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.output
    return lines[0]


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.lstat().st_mode)


@pytest.fixture()
def data(tmp_path: Path) -> Path:
    path = tmp_path / "registry.csv"
    path.write_text(FEW_ROWS, encoding="utf-8")
    return path


# --- files that hold PHI ------------------------------------------------------------------------


def test_a_state_store_reached_through_a_symlink_is_refused_and_its_target_untouched(
    tmp_path: Path, data: Path
) -> None:
    real = tmp_path / "elsewhere.sqlite"
    StateStore(real, target="t").close()
    before = real.read_bytes()
    link = tmp_path / "state.sqlite"
    link.symlink_to(real)
    line = _one_line_error(CliRunner().invoke(main, ["load", str(data), "--state", str(link), "--dry-run"]))
    assert line == (
        f"error: {link}: the state store is a symbolic link; files that hold patient data are never opened "
        "through one: give the real path"
    )
    assert real.read_bytes() == before


def test_a_dangling_symlink_is_not_followed_to_create_a_state_store(tmp_path: Path) -> None:
    target = tmp_path / "planted" / "state.sqlite"
    target.parent.mkdir()
    link = tmp_path / "state.sqlite"
    link.symlink_to(target)
    with pytest.raises(UnsafeFileError, match="symbolic link"):
        StateStore(link, target="t")
    assert not target.exists()


@pytest.mark.parametrize("companion", ["-wal", "-shm"])
def test_a_symlinked_wal_file_is_refused(tmp_path: Path, companion: str) -> None:
    state = tmp_path / "state.sqlite"
    StateStore(state, target="t").close()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.write_bytes(b"")
    state.with_name(state.name + companion).symlink_to(elsewhere)
    with pytest.raises(UnsafeFileError, match=f"{companion[1:].upper()}|shared-memory"):
        StateStore(state, target="t")
    assert elsewhere.read_bytes() == b""


def test_a_symlinked_lock_file_is_refused_not_truncated(tmp_path: Path) -> None:
    state = tmp_path / "state.sqlite"
    precious = tmp_path / "precious.txt"
    precious.write_text("keep me\n", encoding="utf-8")
    lock_path(state).symlink_to(precious)
    with pytest.raises(UnsafeFileError, match="lock file is a symbolic link"), state_lock(state):
        pass
    assert precious.read_text(encoding="utf-8") == "keep me\n"


def test_a_state_store_readable_by_others_is_tightened_with_a_warning(tmp_path: Path, data: Path) -> None:
    state = tmp_path / "state.sqlite"
    StateStore(state, target=f"embedded-sandbox:{(tmp_path / 'state.sandbox.sqlite').resolve()}").close()
    files = [p for p in (state, *(state.with_name(state.name + s) for s in ("-wal", "-shm", ".lock"))) if p.exists()]
    for path in files:
        os.chmod(path, 0o644)
    result = CliRunner().invoke(main, ["load", str(data), "--state", str(state), "--report-dir", str(tmp_path / "r")])
    assert result.exit_code == ExitCode.OK, result.output
    assert f"warning: {state}: the state store was readable by others (mode 0644); now owner-only (0600)" in (
        result.stderr.splitlines()
    )
    for path in state.parent.iterdir():
        if path.name.startswith("state."):
            assert _mode(path) == 0o600, path.name


def test_check_private_file_tightens_loose_bits_and_says_so(tmp_path: Path) -> None:
    path = tmp_path / "phi.sqlite"
    path.write_bytes(b"x")
    os.chmod(path, 0o664)
    assert check_private_file(path, "sandbox database") == (
        f"{path}: the sandbox database was readable by others (mode 0664); now owner-only (0600)"
    )
    assert _mode(path) == 0o600
    assert check_private_file(path, "sandbox database") is None  # already fine: nothing to say
    assert check_private_file(tmp_path / "absent", "sandbox database") is None


def test_a_pipe_in_place_of_a_state_store_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "state.sqlite"
    os.mkfifo(path, 0o600)
    with pytest.raises(UnsafeFileError, match="not a regular file"):
        StateStore(path, target="t")


@pytest.mark.skipif(os.geteuid() != 0, reason="only root can give a file to another user")
def test_another_users_state_store_is_refused_not_chmodded(tmp_path: Path) -> None:
    state = tmp_path / "state.sqlite"
    StateStore(state, target="t").close()
    os.chmod(state, 0o644)
    os.chown(state, 65534, 65534)
    with pytest.raises(UnsafeFileError, match=r"belongs to another user \(uid 65534\)"):
        StateStore(state, target="t")
    assert _mode(state) == 0o644 and state.stat().st_uid == 65534


def test_a_sandbox_database_through_a_symlink_is_refused(tmp_path: Path) -> None:
    real = tmp_path / "real.sqlite"
    real.write_bytes(b"")
    link = tmp_path / "sandbox.sqlite"
    link.symlink_to(real)
    with pytest.raises(UnsafeFileError, match="sandbox database is a symbolic link"):
        Store(str(link))


# --- the environment failing under a run ----------------------------------------------------------


@contextlib.contextmanager
def _tmpfs(where: Path, options: str) -> Iterator[Path]:
    """A tmpfs mounted at ``where`` for the block; a skip where mounting is not permitted."""
    where.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs root and mount(8)")
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(where)], capture_output=True, text=True, check=False
    )
    if done.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], capture_output=True, check=False)


@contextlib.contextmanager
def _read_only_folder(where: Path) -> Iterator[Path]:
    """A folder nothing can be written into: mode 0500, or for root (whom modes do not stop) a read-only mount."""
    if os.geteuid() != 0:
        where.mkdir(mode=0o500)
        try:
            yield where
        finally:
            os.chmod(where, 0o700)
        return
    with _tmpfs(where, "ro,size=64k") as mounted:
        yield mounted


@contextlib.contextmanager
def _full_disk(where: Path, keep: Sequence[str] = ()) -> Iterator[Path]:
    """A small tmpfs filled up to the last byte, but for files named in ``keep`` (owner-only, some bytes each)."""
    with _tmpfs(where, "size=64k") as mounted:
        for name in keep:
            (mounted / name).write_bytes(b"\n" * 64)
            os.chmod(mounted / name, 0o600)
        with _full_disk_now(mounted):
            yield mounted


@contextlib.contextmanager
def _full_disk_now(mounted: Path) -> Iterator[None]:
    """Fill the file system under ``mounted`` up to the last byte for the block."""
    filler = mounted / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        while True:
            os.write(fd, b"\0" * 4096)
    except OSError as exc:
        assert exc.errno == errno.ENOSPC
    finally:
        os.close(fd)
    try:
        yield
    finally:
        filler.unlink()


@pytest.mark.parametrize("command", ["load", "validate"])
def test_a_read_only_report_folder_is_one_line_and_exit_2_before_anything_is_sent(
    tmp_path: Path, data: Path, command: str
) -> None:
    state = tmp_path / "state.sqlite"
    with _read_only_folder(tmp_path / "ro") as ro:
        report = ro / "report"
        args = [command, str(data), "--report-dir", str(report)]
        args += ["--state", str(state)] if command == "load" else []
        line = _one_line_error(CliRunner().invoke(main, args))
    assert line.startswith(f"error: {report}: cannot ")  # names the folder
    assert "Read-only file system" in line or "Permission denied" in line
    assert not state.exists()  # the load stopped before the state store (and the sandbox) were opened


def test_a_full_disk_under_the_report_is_one_line_and_exit_2(tmp_path: Path, data: Path) -> None:
    with _full_disk(tmp_path / "full") as full:
        report = full / "report"
        line = _one_line_error(CliRunner().invoke(main, ["validate", str(data), "--report-dir", str(report)]))
    assert line.startswith(f"error: {report}: cannot write the report: ")
    assert "No space left on device" in line


@pytest.mark.parametrize("lock_file", [False, True])
def test_a_full_disk_under_the_state_store_is_one_line_and_exit_2(
    tmp_path: Path, data: Path, sandbox: SandboxServer, lock_file: bool
) -> None:
    with _full_disk(tmp_path / "full", keep=["state.sqlite.lock"] if lock_file else []) as full:
        state = full / "state.sqlite"
        result = CliRunner(env={"CLINIKAPI_SECRET_KEY": sandbox.api_key}).invoke(
            main,
            ["load", str(data), "--state", str(state), "--base-url", sandbox.base_url,
             "--report-dir", str(tmp_path / "r")],
        )
        line = _one_line_error(result)
    if lock_file:  # the lock file has its block already: the store is the first to need one
        assert line.startswith(f"error: {state}: the disk is full; free some space and run again")
    else:
        assert line == f"error: {state}.lock: cannot use the state store's lock file: No space left on device"
    assert sandbox.sandbox.store.search(ROUTES["PatientCreate"], {}).total == 0  # nothing was sent


def test_a_disk_that_fills_up_under_an_open_state_store_is_a_state_error_naming_it(tmp_path: Path) -> None:
    with _tmpfs(tmp_path / "small", "size=128k") as small:
        path = small / "state.sqlite"
        with StateStore(path, target="t") as store:
            with _full_disk_now(small), pytest.raises(StateError) as caught:
                store.mark_pending("immunization", [("VX-1", "h", "x" * 200_000)], "r1")
            assert str(caught.value) == (
                f"{path}: the disk is full; free some space and run again (each request was recorded before it "
                "was sent: a re-run looks up those in doubt)"
            )
            assert store.get("immunization", ["VX-1"]) == {}  # the intent was not half-written


def test_report_output_names_the_folder_and_the_file_the_system_named(tmp_path: Path) -> None:
    # The translation itself, for systems where the tests above cannot mount a full disk.
    with pytest.raises(OutputError) as caught, report_output(tmp_path):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp_path / "rows.csv"))
    assert str(caught.value) == (
        f"{tmp_path}: cannot write the report: {tmp_path / 'rows.csv'}: No space left on device"
        " (give --report-dir a writable folder with room)"
    )
    full = r"cannot write the report: No space left on device \(os error 28\) \("
    with pytest.raises(OutputError, match=full), report_output(tmp_path):
        raise OSError("No space left on device (os error 28)")  # as polars words it: no errno, no file


@pytest.mark.slow
def test_a_state_store_locked_by_another_process_is_one_line_and_exit_2(tmp_path: Path, data: Path) -> None:
    state = tmp_path / "state.sqlite"
    StateStore(state, target=f"embedded-sandbox:{(tmp_path / 'state.sandbox.sqlite').resolve()}").close()
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLD, str(state)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "holding\n"
        args = ["load", str(data), "--state", str(state), "--report-dir", str(tmp_path / "r")]
        result = CliRunner().invoke(main, args)
    finally:
        assert holder.stdin is not None and holder.stdout is not None
        holder.stdin.close()
        holder.wait(timeout=30)
        holder.stdout.close()
    line = _one_line_error(result)
    assert line.startswith(f"error: {state}: it is locked by another process")
    assert not (tmp_path / "r").exists()  # the report folder made for the run is gone again: it stayed empty
    with contextlib.closing(sqlite3.connect(state)) as db:
        assert db.execute("SELECT count(*) FROM records").fetchone()[0] == 0


_HOLD = """
import sqlite3, sys
db = sqlite3.connect(sys.argv[1], isolation_level=None)
db.execute("BEGIN EXCLUSIVE")
print("holding", flush=True)
sys.stdin.read()
"""


def test_a_sandbox_port_in_use_is_one_line_and_exit_2() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        line = _one_line_error(CliRunner().invoke(main, ["sandbox", "--port", str(port)]))
    assert line.startswith(f"error: cannot serve the sandbox on 127.0.0.1:{port}: Address already in use; ")
    assert "another process is listening there" in line


def test_a_job_file_nested_50000_levels_deep_is_one_line_and_exit_2(tmp_path: Path) -> None:
    job = tmp_path / "deep.toml"
    job.write_text("inputs = " + "[" * 50_000 + "]" * 50_000 + "\n", encoding="utf-8")
    line = _one_line_error(CliRunner().invoke(main, ["run", str(job)]))
    assert line == f"error: {job}: not a usable job file: its values are nested too deeply to read"


@pytest.mark.parametrize("suffix", [".toml", ".yaml"])
def test_a_profile_nested_50000_levels_deep_is_one_line_and_exit_2(tmp_path: Path, data: Path, suffix: str) -> None:
    profile = tmp_path / f"deep{suffix}"
    opening = "columns = " if suffix == ".toml" else "columns: "
    profile.write_text(opening + "[" * 50_000 + "]" * 50_000 + "\n", encoding="utf-8")
    line = _one_line_error(CliRunner().invoke(main, ["validate", str(data), "--profile", str(profile)]))
    assert line == f"error: {profile}: not a usable profile: its values are nested too deeply to read"


def test_an_os_error_no_layer_explained_is_one_line_and_exit_2_and_debug_shows_it(tmp_path: Path, data: Path) -> None:
    output = tmp_path / "no-such-folder" / "profile.toml"
    line = _one_line_error(CliRunner().invoke(main, ["profile", "init", str(data), "--output", str(output)]))
    assert line == f"error: {output}: No such file or directory (FileNotFoundError; --debug shows where)"
    debug = CliRunner().invoke(main, ["--debug", "profile", "init", str(data), "--output", str(output)])
    assert isinstance(debug.exception, FileNotFoundError)  # the traceback is there for whoever asks
