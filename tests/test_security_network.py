"""Where requests may go, what a key may look like, how long anything may wait, and a target that never answers.

Every refusal here happens before any connection: the tests hold a listening socket on loopback and check
that nothing connected to it. The silent target is a real socket that accepts and reads requests and never
writes a byte; the sandbox's drop fault is a target that commits every write and then cuts the connection.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import polars as pl
import pytest
from click.testing import CliRunner, Result
from pydantic import ValidationError

from etl.cli import main
from etl.errors import UsageError
from etl.jobs import load_job
from etl.load import client as client_module
from etl.load.client import check_target_url, is_loopback_host, mask, retry_after, server_wait
from etl.load.throttle import Throttle
from etl.pipeline import load_files
from etl.report import read_rows
from etl.sandbox import SandboxConfig, SandboxServer
from etl.sandbox.redox import receipts
from etl.sandbox.store import Store
from etl.settings import MAX_CONSISTENCY_WINDOW, MAX_TIMEOUT, Settings, read_key_file, secret_problem
from schemas.limits import RATE_WINDOW_SECONDS

from .conftest import SAMPLE

KEY = "clk_test_netsecurity0123456789"
TOKEN = "rdx_test_netsecurity0123456789"
REGISTRY = str(SAMPLE / "registry.csv")


class Listener:
    """A socket listening on loopback that never accepts: whether anything tried to connect is told after."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.sock.setblocking(False)
        self.port = self.sock.getsockname()[1]

    def contacted(self) -> bool:
        """Whether a connection is waiting (the kernel completes the handshake before any accept)."""
        try:
            conn, _ = self.sock.accept()
        except BlockingIOError:
            return False
        conn.close()
        return True


class SilentServer:
    """Accepts connections and reads requests, and never answers; counts the request lines it received."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(256)
        self.port = self.sock.getsockname()[1]
        self.base_url = f"http://127.0.0.1:{self.port}"
        self._lock = threading.Lock()
        self._seen = 0
        self._conns: list[socket.socket] = []
        self._closed = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self._conns.append(conn)
            threading.Thread(target=self._read, args=(conn,), daemon=True).start()

    def _read(self, conn: socket.socket) -> None:
        tail = b""
        while True:
            try:
                data = conn.recv(65536)
            except OSError:
                return
            if not data:
                return
            text = tail + data
            with self._lock:
                self._seen += text.count(b" HTTP/1.1\r\n")
            tail = text[-16:]

    def requests_seen(self, at_least: int) -> int:
        """The request lines received, once there are ``at_least`` (a request is read as it arrives)."""
        for _ in range(200):
            with self._lock:
                if self._seen >= at_least:
                    return self._seen
            self._closed.wait(0.02)
        with self._lock:
            return self._seen

    def close(self) -> None:
        self._closed.set()
        self.sock.close()
        for conn in self._conns:
            conn.close()


@pytest.fixture()
def listener() -> Iterator[Listener]:
    lst = Listener()
    yield lst
    lst.sock.close()


@pytest.fixture()
def silent() -> Iterator[SilentServer]:
    server = SilentServer()
    yield server
    server.close()


def _load(tmp_path: Path, *args: str, env: dict[str, str] | None = None) -> Result:
    """``clinik-etl load`` in this process; the key from the environment, as a user would set it."""
    return CliRunner().invoke(
        main,
        ["load", *args, "--state", str(tmp_path / "s.sqlite"), "--report-dir", str(tmp_path / "report")],
        env={"CLINIKAPI_SECRET_KEY": KEY, **(env or {})},
    )


def _one_line_exit_2(result: Result, *secrets: str) -> str:
    assert result.exit_code == 2, result.output
    assert isinstance(result.exception, SystemExit) and "Traceback" not in result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1, result.output
    for secret in secrets:
        assert secret not in result.output
    return lines[0]


# -- the target URL rule -------------------------------------------------------------


REFUSED = [
    "http://127.0.0.1.nip.io:8080",  # a DNS name that merely starts like a loopback address
    "http://127.attacker.example",
    "http://localhost.attacker.example",
    "http://127.0.0.1.",  # a trailing dot makes it a name for DNS, not an address
    "http://127.1",  # inet_aton's shorthand: not an address literal to ipaddress, nor to us
    "http://2130706433",
    "http://0.0.0.0:8080",
    "http://10.0.0.5",
    "http://[::ffff:10.0.0.1]",
    "http://api.example.com",
    "ftp://127.0.0.1",
    "file:///etc/passwd",
    "https://",
    "not a url",
    "https://api example.com",
    "http://127.0.0.1:99999",
    "https://api.example.com/?key=1",
    "https://api.example.com/#fragment",
]
ACCEPTED = [
    "https://api.clinikapi.com",
    "https://api.example.com:8443/base",
    "http://127.0.0.1:8080",
    "http://127.255.0.9",
    "http://[::1]:8080",
    "http://[::ffff:127.0.0.1]:8080",
]


@pytest.mark.parametrize("url", REFUSED)
def test_a_url_off_the_rule_is_refused_without_a_lookup(url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    looked_up: list[Any] = []
    monkeypatch.setattr(socket, "getaddrinfo", lambda *a, **k: looked_up.append(a) or [])
    with pytest.raises(UsageError, match="--redox-base-url"):
        check_target_url(url, "--redox-base-url")
    assert looked_up == []  # decided from the URL alone: no DNS, let alone a connection


@pytest.mark.parametrize("url", ACCEPTED)
def test_https_anywhere_and_http_to_a_loopback_address_are_accepted(url: str) -> None:
    check_target_url(url)


@pytest.mark.parametrize("url", ["https://user:clk_test_INFOMARK9@api.example.com", "https://clk_test_INFOMARK9@x.org",
                                 "http://clk_test_INFOMARK9@127.0.0.1:9"])
def test_a_url_with_user_info_is_refused_without_repeating_it(url: str) -> None:
    with pytest.raises(UsageError) as refused:
        check_target_url(url)
    assert "user" in str(refused.value) and "INFOMARK9" not in str(refused.value)


def test_localhost_is_resolved_by_the_tool_and_taken_only_when_every_address_is_loopback(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    answers: dict[str, list[str]] = {}

    def fake(host: str, *args: Any, **kwargs: Any) -> list[tuple[Any, ...]]:
        if not answers[host]:
            raise socket.gaierror("no such name")
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (ip, 0)) for ip in answers[host]]

    monkeypatch.setattr(client_module.socket, "getaddrinfo", fake)
    answers["localhost"] = ["127.0.0.1", "::1"]
    assert is_loopback_host("localhost")
    check_target_url("http://LOCALHOST:8080")
    answers["localhost."] = ["127.0.0.1"]
    check_target_url("http://localhost.:8080")
    answers["localhost"] = ["127.0.0.1", "203.0.113.7"]  # a hosts file, or a resolver, pointing it away
    with pytest.raises(UsageError, match="loopback"):
        check_target_url("http://localhost:8080")
    answers["localhost"] = []
    assert not is_loopback_host("localhost")
    # https needs no lookup at all: it is accepted wherever it points.
    answers.clear()
    check_target_url("https://localhost:8443")


@pytest.mark.parametrize("url", ["http://127.0.0.1.nip.io:{port}", "http://127.attacker.example:{port}",
                                 "http://localhost.attacker.example:{port}"])
def test_load_refuses_a_look_alike_loopback_url_before_any_connection(
    tmp_path: Path, listener: Listener, url: str
) -> None:
    # If a look-alike were taken for loopback, DNS (nip.io answers 127.0.0.1) would bring the load here.
    line = _one_line_exit_2(_load(tmp_path, REGISTRY, "--base-url", url.format(port=listener.port)), KEY)
    assert "loopback" in line
    assert not listener.contacted()
    assert not (tmp_path / "report").exists()


@pytest.mark.parametrize("url", ["http://127.0.0.1.nip.io:{port}", "http://127.attacker.example:{port}",
                                 "http://localhost.attacker.example:{port}"])
def test_a_redox_load_refuses_a_look_alike_loopback_url_before_any_connection(
    tmp_path: Path, listener: Listener, url: str
) -> None:
    env = {"REDOX_API_TOKEN": TOKEN, "CLINIK_ETL_REDOX_DESTINATION_SLUG": "clinic-dest"}
    args = ["--target", "redox", "--redox-base-url", url.format(port=listener.port)]
    line = _one_line_exit_2(_load(tmp_path, REGISTRY, *args, env=env), TOKEN)
    assert "--redox-base-url" in line and "loopback" in line
    assert not listener.contacted()


@pytest.mark.parametrize("extra", [[], ["--dry-run"]])
def test_a_key_in_the_url_is_refused_and_written_nowhere(tmp_path: Path, extra: list[str]) -> None:
    marker = "clk_test_URLMARK0042"
    result = _load(tmp_path, REGISTRY, "--base-url", f"https://clinic:{marker}@api.example.com", *extra)
    _one_line_exit_2(result, marker, "URLMARK0042")
    # Refused before anything was planned: no summary.json or report.html to carry it.
    assert not (tmp_path / "report").exists()
    for path in tmp_path.rglob("*"):
        assert not path.is_file() or b"URLMARK0042" not in path.read_bytes(), path


# -- the shape of a key --------------------------------------------------------------

BAD_KEYS = {
    "non-ASCII": "clk_test_MARKé123",
    "line break": "clk_test_MARK123\n",
    "inner space": "clk_test_MARK 123",
    "tab": "clk_test_MARK\t123",
    "control": "clk_test_MARK\x07123",
    "zero-width": "\u200bclk_test_MARK123",
    "no prefix": "sk_live_MARK123",
    "other characters": "clk_test_MARK!123",  # printable, but not a header token (RFC 7235 token68)
}


@pytest.mark.parametrize("name", sorted(BAD_KEYS))
def test_a_key_of_the_wrong_shape_from_the_environment_is_one_line_exit_2_and_nothing_is_sent(
    tmp_path: Path, listener: Listener, name: str
) -> None:
    result = _load(
        tmp_path, REGISTRY, "--base-url", f"http://127.0.0.1:{listener.port}",
        env={"CLINIKAPI_SECRET_KEY": BAD_KEYS[name]},
    )
    line = _one_line_exit_2(result, "MARK")
    assert "CLINIKAPI_SECRET_KEY" in line and "API key" in line
    assert not listener.contacted()


def test_a_key_file_of_the_wrong_shape_is_named_and_its_key_is_not(tmp_path: Path, listener: Listener) -> None:
    url = f"http://127.0.0.1:{listener.port}"
    contents = [b"clk_test_MARK\xc3\xa9\n", b"clk_test_MARK x\n", b"clk_test_MARK\x00x\n", b"\xff\xfeMARK", b"\n"]
    for i, content in enumerate(contents):
        path = tmp_path / f"key{i}.txt"
        path.write_bytes(content)
        line = _one_line_exit_2(_load(tmp_path, REGISTRY, "--base-url", url, "--api-key-file", str(path)), "MARK")
        assert str(path) in line
    assert not listener.contacted()
    # A key file's own line break and a BOM are not part of the key.
    good = tmp_path / "good.txt"
    good.write_bytes(b"\xef\xbb\xbf" + KEY.encode() + b"\r\n")
    assert read_key_file(good).get_secret_value() == KEY


def test_a_redox_token_with_a_control_character_is_refused_before_use(tmp_path: Path) -> None:
    result = _load(tmp_path, REGISTRY, "--target", "redox", env={"REDOX_API_TOKEN": "rdx_MARK\r\n"})
    line = _one_line_exit_2(result, "MARK")
    assert "REDOX_API_TOKEN" in line
    token_file = tmp_path / "token"
    token_file.write_text("rdx_MARK é\n", encoding="utf-8")
    result = _load(tmp_path, REGISTRY, "--target", "redox", "--redox-token-file", str(token_file))
    assert str(token_file) in _one_line_exit_2(result, "MARK")


def test_key_shape_rule() -> None:
    for good in ("clk_test_a", "clk_live_ABC123xyz", KEY):
        assert secret_problem(good) is None
    for bad in [*BAD_KEYS.values(), "", "clk_test_", "CLK_TEST_abc"]:
        assert secret_problem(bad) is not None, bad
    # A bearer token is any printable ASCII without spaces; no ClinikAPI prefix.
    assert secret_problem("eyJhbGciOi.J9-_~+/=", token=True) is None
    for bad in ("", "tok en", "tok\nen", "tokén", "tok\x00"):
        assert secret_problem(bad, token=True) is not None
    # Settings refuse it too, and never echo it, not even in the exception's text (a --debug traceback).
    with pytest.raises(ValidationError) as refused:
        Settings(api_key="clk_test_MARK\n")
    assert "MARK" not in str(refused.value)


# -- every duration bounded ----------------------------------------------------------


@pytest.mark.parametrize(
    "args",
    [
        ["--consistency-window", "1e308"],
        ["--consistency-window", "inf"],
        ["--consistency-window", "nan"],
        ["--consistency-window", str(MAX_CONSISTENCY_WINDOW + 1)],
        ["--timeout", "inf"],
        ["--timeout", "nan"],
        ["--timeout", "0"],
        ["--timeout", str(MAX_TIMEOUT + 1)],
        ["--no-answer-limit", "0"],
    ],
)
def test_a_duration_out_of_bounds_is_a_usage_error(tmp_path: Path, listener: Listener, args: list[str]) -> None:
    result = _load(tmp_path, REGISTRY, "--base-url", f"http://127.0.0.1:{listener.port}", *args)
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert args[0] in result.output
    assert not listener.contacted()


@pytest.mark.parametrize(
    "env",
    [{"CLINIK_ETL_TIMEOUT": "inf"}, {"CLINIK_ETL_CONSISTENCY_WINDOW": "1e308"}, {"CLINIK_ETL_NO_ANSWER_LIMIT": "0"}],
)
def test_a_duration_from_the_environment_is_bounded_too(
    tmp_path: Path, listener: Listener, env: dict[str, str]
) -> None:
    # A flag not given leaves the setting to its environment variable: the same bounds apply there.
    result = _load(tmp_path, REGISTRY, "--base-url", f"http://127.0.0.1:{listener.port}", env=env)
    [name] = env
    line = _one_line_exit_2(result)
    assert name.removeprefix("CLINIK_ETL_").lower() in line
    assert not listener.contacted()


@pytest.mark.parametrize("args", [["--window", "inf"], ["--slow-seconds", "nan"], ["--search-lag", "1e308"]])
def test_the_sandbox_durations_are_bounded_too(args: list[str]) -> None:
    result = CliRunner().invoke(main, ["sandbox", "--port", "0", *args])
    assert result.exit_code == 2 and args[0] in result.output


@pytest.mark.parametrize("value", ["inf", "nan", "1e308"])
@pytest.mark.parametrize("name", ["timeout", "consistency_window"])
def test_settings_refuse_unbounded_durations_from_any_source(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str, value: str
) -> None:
    with pytest.raises(ValidationError):
        Settings(**{name: float(value)})
    monkeypatch.setenv(f"CLINIK_ETL_{name.upper()}", value)
    with pytest.raises(ValidationError):
        Settings()
    monkeypatch.delenv(f"CLINIK_ETL_{name.upper()}")
    # TOML has inf and nan too.
    (tmp_path / "in.csv").write_text("x\n", encoding="utf-8")
    job = tmp_path / "job.toml"
    job.write_text(f'inputs = ["in.csv"]\n{name} = {value}\n', encoding="utf-8")
    with pytest.raises(UsageError, match=name):
        load_job(job)


def test_a_server_announced_wait_is_finite_and_at_most_one_rate_window() -> None:
    assert server_wait("2.5") == 2.5
    assert server_wait("1e308") == server_wait("99999") == RATE_WINDOW_SECONDS
    assert server_wait("inf") == server_wait("nan") == server_wait("soon") == server_wait(None) == 1.0
    assert server_wait("-3") == 0.05
    assert retry_after({"retry-after": "inf", "x-ratelimit-reset": "7"}) == 1.0
    assert retry_after({"x-ratelimit-reset": "7"}) == 7.0


@pytest.mark.parametrize("reset", ["1e308", "inf", "nan"])
def test_the_throttle_never_pauses_longer_than_a_rate_window(reset: str) -> None:
    now = [0.0]
    slept: list[float] = []

    async def sleep(seconds: float) -> None:
        slept.append(seconds)
        now[0] += seconds

    throttle = Throttle(None, clock=lambda: now[0], sleep=sleep)
    throttle.observe({"x-ratelimit-remaining": "0", "x-ratelimit-reset": reset})
    asyncio.run(throttle.acquire())  # returns: the pause ended
    assert sum(slept) <= RATE_WINDOW_SECONDS


# -- a target that never answers ------------------------------------------------------


def test_a_silent_target_stops_the_load_early_counts_what_was_sent_and_keeps_it_unknown(
    tmp_path: Path, silent: SilentServer
) -> None:
    limit, concurrency = 4, 2
    result = _load(
        tmp_path, REGISTRY, "--base-url", silent.base_url, "--timeout", "0.2", "--no-answer-limit", str(limit),
        "--concurrency", str(concurrency), "--consistency-window", "0", "--json",
    )
    assert result.exit_code == 3, result.output  # rows with an unknown outcome: the usual exit code
    summary = json.loads(result.stdout)
    assert "no answer to" in summary["unresponsive"] and summary["aborted"] is None
    assert "no answer to" in result.stderr and "Traceback" not in result.output
    # Every request that left is counted, though none was answered; the run stopped after about the limit.
    sent = summary["requests"]
    assert limit <= sent <= limit + concurrency
    # Matching's reads came first (unanswered too: nothing was matched), counted apart.
    reads = summary["matching_requests"]
    assert reads > 0 and "nothing was matched" in summary["matching"]["error"]
    assert silent.requests_seen(sent + reads) == sent + reads
    # The patients sent are unknown (never re-sent blindly); everything else was not sent; no row is lost.
    assert summary["patients"] == {"unknown": sent, "failed": 160 - sent}
    rows = read_rows(tmp_path / "report" / "rows.csv")
    assert rows.height == summary["rows_total"] == sum(summary["states"].values()) == 560
    loaded = rows.filter(pl.col("state") != "rejected")
    assert set(loaded["state"]) == {"failed"}
    assert set(loaded["error_code"]) == {"parent-unknown", "not-sent"}
    assert "no answer to" in (tmp_path / "report" / "report.html").read_text(encoding="utf-8")


def test_a_target_that_drops_every_answer_stops_and_the_requests_match_its_writes(tmp_path: Path) -> None:
    # The sandbox commits each write and then cuts the connection: every request left and was written.
    with SandboxServer(SandboxConfig(api_keys={KEY: "*"}, drop_rate=1.0, seed=1)) as server:
        settings = Settings(base_url=server.base_url, api_key=KEY, concurrency=1, no_answer_limit=3,
                            consistency_window=0, timeout=5, state=tmp_path / "s.sqlite", report_dir=tmp_path / "r")
        report = load_files([REGISTRY], settings)
        written = Store.search(server.sandbox.store, "/v1/patients", {}, limit=1).total  # past any search lag
    assert report.summary["requests"] == written == 3
    assert report.summary["patients"]["unknown"] == 3
    assert report.summary["unresponsive"] and report.exit_code() == 3


def test_a_redox_target_that_drops_every_answer_stops_and_counts_its_sends(tmp_path: Path) -> None:
    with SandboxServer(SandboxConfig(redox_tokens=(TOKEN,), drop_rate=1.0, seed=2)) as server:
        settings = Settings(target="redox", redox_base_url=server.base_url, redox_token=TOKEN,
                            redox_destination_slug="clinic-dest", concurrency=1, no_answer_limit=2, timeout=5,
                            state=tmp_path / "s.sqlite", report_dir=tmp_path / "r")
        report = load_files([REGISTRY], settings)
        accepted = receipts(server.sandbox.store)
    assert report.summary["requests"] == accepted == 2
    assert report.states["unknown"] == 2
    assert report.summary["unresponsive"]
    not_sent = report.rows.filter(pl.col("error_code") == "not-sent").height
    assert not_sent == report.rows.filter(pl.col("state") != "rejected").height - 2


@pytest.mark.parametrize("host", ["127.0.0.1.nip.io", "localhost.attacker.example", "0.0.0.0"])
def test_the_sandbox_binds_by_the_same_loopback_rule(host: str) -> None:
    with pytest.raises(UsageError, match="not a loopback address"):
        SandboxServer(host=host)


def test_a_silent_target_met_while_looking_up_references_ends_the_run_before_any_send(
    tmp_path: Path, silent: SilentServer
) -> None:
    # Visits name patients and practitioners that no input holds: the load asks the target about each first.
    result = _load(tmp_path, str(SAMPLE / "visits.csv"), "--base-url", silent.base_url, "--timeout", "0.1",
                   "--no-answer-limit", "1", "--consistency-window", "0")
    line = _one_line_exit_2(result, KEY)
    assert "did not answer" in line and "nothing was sent" in line
    assert line.endswith("(transient: the same command may succeed later)")  # NoAnswerError.retryable
    # One lookup (a read, tried four times), not one per reference; no create.
    assert silent.requests_seen(4) == 4


def test_a_target_that_refuses_connections_stops_the_load_with_nothing_sent_or_counted(tmp_path: Path) -> None:
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    closed.close()  # nothing listens there: every connection is refused
    result = _load(tmp_path, REGISTRY, "--base-url", f"http://127.0.0.1:{port}", "--no-answer-limit", "4",
                   "--concurrency", "2", "--consistency-window", "0", "--json")
    assert result.exit_code == 3, result.output
    summary = json.loads(result.stdout)
    assert summary["unresponsive"] and summary["requests"] == 0  # no request ever left
    assert summary["patients"] == {"failed": 160}
    rows = read_rows(tmp_path / "report" / "rows.csv")
    assert set(rows.filter(pl.col("state") != "rejected")["error_code"]) == {"not-sent"}


@pytest.mark.parametrize("key", ["clk_test_MARK123", "clk_live_ab-cd_ef.gh", "clk_test_YWJj+ZGVm/Z2g=="])
def test_a_key_shaped_as_a_header_token_is_accepted(key: str) -> None:
    # The docs show clk_live_<...> and the SDK checks nothing: what follows the prefix may be any token68.
    assert secret_problem(key) is None
    assert mask(f"refused {key}, try again") == "refused [key], try again"  # and masks still find all of it
