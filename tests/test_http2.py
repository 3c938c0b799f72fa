"""HTTP/2: a load uses it when the target's TLS handshake offers it, with the certificate verified.

The sandbox app is served over TLS by hypercorn (which offers ``h2`` by ALPN, as the API's
front end does), with a certificate from a throwaway CA the test trusts via ``SSL_CERT_FILE``.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import polars as pl
import pytest
import trustme
from hypercorn.asyncio import serve
from hypercorn.config import Config

from etl import Settings, load_files
from etl.errors import ExitCode
from etl.sandbox import SandboxConfig, SandboxServer
from etl.sandbox.app import Sandbox, build_app

from .conftest import SAMPLE


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def _tls_sandbox(tmp_path: Path) -> Iterator[tuple[str, str, Sandbox, Path]]:
    """(base URL, API key, sandbox, CA file) of the sandbox app served over TLS with HTTP/2."""
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "localhost")
    certfile, keyfile, cafile = tmp_path / "cert.pem", tmp_path / "key.pem", tmp_path / "ca.pem"
    cert.private_key_pem.write_to_path(str(keyfile))
    for i, pem in enumerate(cert.cert_chain_pems):
        pem.write_to_path(str(certfile), append=i > 0)
    ca.cert_pem.write_to_path(str(cafile))

    config = SandboxConfig()
    sandbox = Sandbox(config)
    port = _free_port()
    hyper = Config()
    hyper.bind = [f"127.0.0.1:{port}"]
    hyper.certfile, hyper.keyfile = str(certfile), str(keyfile)
    hyper.alpn_protocols = ["h2", "http/1.1"]
    loop = asyncio.new_event_loop()
    stop = asyncio.Event()

    def run() -> None:
        asyncio.set_event_loop(loop)
        loop.run_until_complete(serve(build_app(sandbox), hyper, shutdown_trigger=stop.wait))  # type: ignore[arg-type]

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    context = ssl.create_default_context(cafile=str(cafile))
    deadline = time.monotonic() + 10
    while True:  # ready when a TLS handshake succeeds
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as raw:
                context.wrap_socket(raw, server_hostname="127.0.0.1").close()
                break
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)
    try:
        yield f"https://127.0.0.1:{port}", config.api_key, sandbox, cafile
    finally:
        loop.call_soon_threadsafe(stop.set)
        thread.join(10)
        loop.close()
        sandbox.close()


def _few_rows(tmp_path: Path, n: int) -> Path:
    path = tmp_path / "few.csv"
    pl.read_csv(SAMPLE / "registry.csv", infer_schema=False).head(n).write_csv(path)
    return path


def test_a_load_speaks_http2_when_the_tls_handshake_offers_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    few = _few_rows(tmp_path, 4)
    with _tls_sandbox(tmp_path) as (base_url, key, sandbox, cafile):
        monkeypatch.setenv("SSL_CERT_FILE", str(cafile))
        settings = Settings(base_url=base_url, api_key=key, state=tmp_path / "s.sqlite",
                            report_dir=tmp_path / "r", consistency_window=0)
        report = load_files([few], settings)
        assert report.states["created"] == 4
        versions = report.summary["http_versions"]
        assert set(versions) == {"HTTP/2"} and sum(versions.values()) == report.summary["requests"]
        assert sandbox.store.search("/v1/immunizations", {}, limit=1).total == 4


def test_an_untrusted_certificate_stops_the_load_saying_how_to_trust_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    few = _few_rows(tmp_path, 3)
    with _tls_sandbox(tmp_path) as (base_url, key, sandbox, _):
        monkeypatch.delenv("SSL_CERT_FILE", raising=False)  # the throwaway CA is not trusted
        settings = Settings(base_url=base_url, api_key=key, state=tmp_path / "s.sqlite",
                            report_dir=tmp_path / "r", consistency_window=0)
        report = load_files([few], settings)
        assert sandbox.store.search("/v1/patients", {}, limit=1).total == 0
    assert report.exit_code() == ExitCode.API
    assert "SSL_CERT_FILE" in report.summary["aborted"] and "not trusted" in report.summary["aborted"]
    assert report.states["failed"] == 3 and report.summary["requests"] == 0
    rows = pl.read_csv(tmp_path / "r" / "rows.csv", infer_schema=False)
    assert rows["message"].str.contains("not trusted").all()


def test_plain_http_targets_such_as_the_sandbox_stay_on_http1(tmp_path: Path) -> None:
    few = _few_rows(tmp_path, 2)
    with SandboxServer() as server:
        settings = Settings(base_url=server.base_url, api_key=server.api_key, state=tmp_path / "s.sqlite",
                            report_dir=tmp_path / "r", consistency_window=0)
        report = load_files([few], settings)
    assert report.states["created"] == 2
    assert set(report.summary["http_versions"]) == {"HTTP/1.1"}
