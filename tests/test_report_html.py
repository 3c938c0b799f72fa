"""report.html: one self-contained page, counts that match, hostile text made inert."""

from __future__ import annotations

import os
import shutil
import struct
import subprocess
import sys
import zlib
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest

from etl.pipeline import load_files, validate_files
from etl.report_html import FIRST_REJECTS, bar_chart
from etl.settings import Settings

from .conftest import ROOT, SAMPLE


def _find_chromium() -> str | None:
    """The browser for the rendering test: $CHROMIUM if set, else Chromium or Chrome on the PATH."""
    named = os.environ.get("CHROMIUM")
    if named:
        return shutil.which(named)
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if found := shutil.which(name):
            return found
    return "/usr/bin/chromium" if os.path.exists("/usr/bin/chromium") else None


CHROMIUM = _find_chromium()
#: In CI the browser test must run: a missing browser fails it instead of skipping it.
IN_CI = os.environ.get("CI", "").strip().lower() in {"true", "1", "yes"}


class Page(HTMLParser):
    """Tags, attributes and the text of elements with an id."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.by_id: dict[str, str] = {}
        self.text: list[str] = []
        self.styles: list[str] = []
        self.rows_in: dict[str, int] = {}  # table id -> body rows
        self._open: list[str | None] = []
        self._tables: list[str] = []
        self._in_style = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        attributes = dict(attrs)
        self.tags.append((tag, attributes))
        self._open.append(attributes.get("id"))
        self._in_style = tag == "style"
        if tag == "table":
            self._tables.append(attributes.get("id") or "")
        if tag == "tr" and self._tables:
            self.rows_in[self._tables[-1]] = self.rows_in.get(self._tables[-1], 0) + 1

    def handle_endtag(self, tag: str) -> None:
        if tag == "table" and self._tables:
            self._tables.pop()
        if self._open:
            self._open.pop()
        self._in_style = False

    def handle_data(self, data: str) -> None:
        self.text.append(data)
        if self._in_style:
            self.styles.append(data)
        if self._open and self._open[-1]:
            self.by_id[self._open[-1]] = self.by_id.get(self._open[-1], "") + data


def parse(path: Path) -> tuple[Page, str]:
    source = path.read_text(encoding="utf-8")
    page = Page()
    page.feed(source)
    page.close()
    return page, source


def assert_self_contained(page: Page, source: str, *, raw: bool = True) -> None:
    """No element, attribute or style that loads anything; ``raw``: not even as text in the source."""
    for tag, attrs in page.tags:
        assert tag not in {"script", "link", "iframe", "object", "embed", "img"}, tag
        for name, value in attrs.items():
            assert not name.startswith("on"), (tag, name)  # no inline event handlers
            if name in {"src", "href", "action", "srcset", "data", "xlink:href"}:
                assert not (value or "").lower().startswith(("http:", "https:", "//")), (tag, name, value)
    css = "".join(page.styles).lower()
    assert "@import" not in css and "url(" not in css
    lowered = source.lower()
    assert "<script" not in lowered
    if raw:
        assert "url(http" not in lowered and "@import" not in lowered


def test_report_html_counts_match_the_summary(tmp_path: Path, sandbox: Any) -> None:
    settings = Settings(
        base_url=sandbox.base_url,
        api_key=sandbox.api_key,
        consistency_window=0,
        state=tmp_path / "state.sqlite",
        report_dir=tmp_path / "report",
    )
    report = load_files([SAMPLE / "registry.csv"], settings)
    path = tmp_path / "report" / "report.html"
    assert path.stat().st_mode & 0o777 == 0o600  # it holds PHI, like the rest of the folder
    page, source = parse(path)
    assert_self_contained(page, source)
    assert page.by_id["rows-total"] == str(report.rows_total)
    for state, n in report.states.items():
        if n:
            assert page.by_id[f"count-{state}"] == str(n), state
    text = " ".join(page.text)
    rejected = report.rows.filter(report.rows["state"] == "rejected").sort("source_row")
    first = rejected.row(0, named=True)
    assert first["message"] in text and str(first["source_row"]) in text
    for code in set(rejected["error_code"].to_list()):
        assert f"{code}: " in text  # each bar carries "code: count" as its tooltip
    assert "achieved rate" in text and str(report.summary["achieved_rate"]) in text
    assert page.tags[0][0] == "html" and any(tag == "svg" for tag, _ in page.tags)


def test_hostile_cells_are_inert_text(tmp_path: Path) -> None:
    data = tmp_path / "hostile.csv"
    evil = '<script>alert(1)</script><img src="http://evil.example/x.png" onerror="boom()">'
    data.write_text(
        "Record ID,Patient ID,First Name,Last Name,CVX,Admin Date\n"
        f'R1,P1,Ann,Lee,08,"{evil.replace(chr(34), chr(34) * 2)}"\n'
        'R2,P2,Ann,Lee,08,"</td></table><style>@import url(http://evil.example/a.css)</style>"\n',
        encoding="utf-8",
    )
    validate_files([data], Settings(report_dir=tmp_path / "r"))
    page, source = parse(tmp_path / "r" / "report.html")
    # The hostile cells are in the page, escaped: text that says "url(http...", never markup that loads it.
    assert_self_contained(page, source, raw=False)
    assert "evil.example" in " ".join(page.text)  # shown, as text
    assert "&lt;script&gt;" in source and "onerror=&quot;" in source


def test_only_the_first_rejects_are_listed(tmp_path: Path) -> None:
    rows = ["Record ID,Patient ID,First Name,Last Name,CVX,Admin Date"]
    rows += [f"R{i},P{i},Ann,Lee,08,bad-{i}" for i in range(FIRST_REJECTS + 20)]
    data = tmp_path / "many.csv"
    data.write_text("\n".join(rows) + "\n", encoding="utf-8")
    report = validate_files([data], Settings(report_dir=tmp_path / "r"))
    assert report.states["rejected"] == FIRST_REJECTS + 20
    page, _ = parse(tmp_path / "r" / "report.html")
    assert page.rows_in["rejected-rows"] == 1 + FIRST_REJECTS  # the header, then the first rows
    assert "problem-rows" not in page.rows_in
    assert page.by_id["count-rejected"] == str(FIRST_REJECTS + 20)


def test_a_bar_chart_escapes_its_labels() -> None:
    svg = bar_chart("t<", [("<b>x</b>", 3), ("y", 1)])
    assert "<b>" not in svg and "&lt;b&gt;x&lt;/b&gt;" in svg
    assert svg.count("<rect") == 2
    assert "none" in bar_chart("empty", [])


def _png_pixels(path: Path) -> tuple[int, int, bytes]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat, size = 8, b"", (0, 0)
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind = data[pos + 4 : pos + 8]
        body = data[pos + 8 : pos + 8 + length]
        if kind == b"IHDR":
            size = struct.unpack(">II", body[:8])
        elif kind == b"IDAT":
            idat += body
        pos += 12 + length
    return size[0], size[1], zlib.decompress(idat)


NO_BROWSER = "Chromium is not installed (apt-get install chromium, or set CHROMIUM to a Chromium or Chrome binary)"


@pytest.mark.slow
def test_report_html_renders_offline_in_a_real_browser(tmp_path: Path) -> None:
    if CHROMIUM is None:
        if IN_CI:
            pytest.fail(f"{NO_BROWSER}; CI=true, so this test may not skip (.ci/run installs it)")
        pytest.skip(NO_BROWSER)
    validate_files([SAMPLE / "registry.csv"], Settings(report_dir=tmp_path / "r"))
    shot = tmp_path / "shot.png"
    browser = subprocess.run(
        [
            CHROMIUM,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",  # containers give /dev/shm 64 MB: too little for a renderer
            "--disable-quic",
            "--no-first-run",
            "--no-default-browser-check",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            f"--user-data-dir={tmp_path / 'profile'}",
            f"--screenshot={shot}",
            "--window-size=1280,2000",
            (tmp_path / "r" / "report.html").as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert shot.is_file(), f"{CHROMIUM} wrote no screenshot (exit {browser.returncode}): {browser.stderr[-2000:]}"
    assert shot.stat().st_size > 20_000
    width, height, raw = _png_pixels(shot)
    assert (width, height) == (1280, 2000)
    # A blank page decompresses to a handful of byte values; text, cards and bars to many.
    assert len(set(raw)) > 32


def test_failed_and_unknown_rows_are_listed_with_their_codes() -> None:
    import polars as pl

    from etl.report import ROW_COLUMNS
    from etl.report_html import render_html

    rows = pl.DataFrame(
        [
            ["a.csv", 2, "immunization", "R1", "created", "imm_1", "pat_1", None, None, None],
            ["a.csv", 3, "immunization", "R2", "failed", None, "P2", "VALIDATION_ERROR", "performer", "HTTP 422: x"],
            ["a.csv", 4, "immunization", "R3", "unknown", None, "P3", "unknown-outcome", None, "no answer in time"],
        ],
        schema=dict.fromkeys(ROW_COLUMNS, pl.String),
        orient="row",
    )
    summary = {
        "run_id": "r",
        "command": "load",
        "states": {"created": 1, "skipped": 0, "rejected": 0, "failed": 1, "unknown": 1, "planned": 0},
        "rows_total": 3,
        "timings": {"load": 1.5},
        "requests": 3,
        "achieved_rate": 2.0,
        "aborted": "HTTP 401 INVALID_KEY: no <b>",
    }
    page = Page()
    source = render_html(summary, rows)
    page.feed(source)
    assert page.rows_in["problem-rows"] == 3
    text = " ".join(page.text)
    assert "VALIDATION_ERROR: 1" in text and "unknown-outcome: 1" in text
    assert "no <b>" in text and "<b>" not in source  # the abort reason, escaped
    assert page.by_id["count-failed"] == "1" and page.by_id["count-unknown"] == "1"


@pytest.mark.slow
def test_the_browser_test_fails_rather_than_skips_in_ci(tmp_path: Path) -> None:
    """Without a browser it skips on a laptop, but in CI (CI=true) it fails: it cannot pass unseen there."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST_", "CI"))}
    env["CHROMIUM"] = str(tmp_path / "no-such-browser")
    test = "tests/test_report_html.py::test_report_html_renders_offline_in_a_real_browser"

    def run(**extra: str) -> subprocess.CompletedProcess[str]:
        args = [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", "-n", "0", test]
        args.append(f"--basetemp={tmp_path / ('ci' if extra else 'local')}")
        return subprocess.run(
            args, cwd=ROOT, env={**env, **extra}, capture_output=True, text=True, timeout=120, check=False
        )

    local = run()
    assert local.returncode == 0 and "1 skipped" in local.stdout and "Chromium is not installed" in local.stdout
    ci = run(CI="true")
    assert ci.returncode == 1 and "1 failed" in ci.stdout and "may not skip" in ci.stdout
