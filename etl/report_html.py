"""``report.html``: the run's report as one page a person can open anywhere.

The page is self-contained: inline CSS, charts drawn as inline SVG, no
script, no font, no image and no link to anything outside the file, so it
opens on an air-gapped laptop and shows the same there as anywhere. A
Content-Security-Policy forbids loading anything at all, as a second line of
defence.

Reports hold PHI and cell text is hostile until proven otherwise (a registry
export can hold ``<script>`` in a name): every value goes through
:func:`html.escape` on its way into the page, in text and in attributes.
"""

from __future__ import annotations

import html
from collections.abc import Iterable, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

import polars as pl

from etl.files import private_text
from etl.rules import explain

__all__ = ["FIRST_REJECTS", "bar_chart", "render_html", "write_html"]

FIRST_REJECTS = 50  # rejected rows listed in full; rejects.csv has them all
FIRST_PROBLEMS = 200  # failed and unknown rows listed
_MAX_MESSAGE = 400  # characters of a reason shown; rows.csv and rejects.csv have the whole text
_MAX_BARS = 30

_STATE_COLOURS = {
    "created": "#2e7d32",
    "skipped": "#607d8b",
    "rejected": "#e08600",
    "failed": "#c62828",
    "unknown": "#6a1b9a",
    "planned": "#1565c0",
    "changed": "#ad1457",
    "updated": "#00838f",
    "matched": "#558b2f",  # linked to what the target held (etl.matching)
    "needs-review": "#f9a825",  # a person decides in review.csv
    "exists": "#78909c",  # the chart held the dose already
}

_CSS = """
body{font:15px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,Helvetica,Arial,sans-serif;margin:0;color:#1d2329;
background:#f5f6f8}
main{max-width:1180px;margin:0 auto;padding:24px 32px 48px}
h1{font-size:24px;margin:0 0 4px}h2{font-size:18px;margin:32px 0 10px;border-bottom:1px solid #d5d9de;
padding-bottom:4px}
.meta{color:#56606b;margin:0 0 16px}.meta code{font-size:13px}
.cards{display:flex;flex-wrap:wrap;gap:12px}
.card{background:#fff;border-radius:8px;padding:12px 18px;min-width:110px;border-top:5px solid #9aa5b1;
box-shadow:0 1px 2px rgba(0,0,0,.08)}
.card .n{display:block;font-size:28px;font-weight:650;font-variant-numeric:tabular-nums}
.card .l{color:#56606b}
table{border-collapse:collapse;background:#fff;box-shadow:0 1px 2px rgba(0,0,0,.08);margin:4px 0 8px;
font-size:14px}
th,td{padding:5px 10px;border-bottom:1px solid #e6e9ec;text-align:left;vertical-align:top}
th{background:#eef0f3;font-weight:600}td.num,th.num{text-align:right;font-variant-numeric:tabular-nums}
td.msg{max-width:640px;overflow-wrap:anywhere}
.charts{display:flex;flex-wrap:wrap;gap:24px}.chart{background:#fff;padding:10px 14px;border-radius:8px;
box-shadow:0 1px 2px rgba(0,0,0,.08)}.chart h3{font-size:15px;margin:0 0 6px}
.none{color:#56606b;font-style:italic}.warn{color:#8a5300}.bad{color:#b71c1c;font-weight:600}
footer{margin-top:40px;color:#56606b;font-size:13px}
"""


def _e(value: object) -> str:
    """Text made safe for HTML, in element content and in quoted attributes."""
    return html.escape("" if value is None else str(value), quote=True)


def _table(
    headers: Sequence[str], rows: Iterable[Sequence[object]], numeric: Sequence[int] = (), *, table_id: str = ""
) -> str:
    head = "".join(f'<th{" class=num" if i in numeric else ""}>{_e(h)}</th>' for i, h in enumerate(headers))
    body = []
    for row in rows:
        cells = []
        for i, value in enumerate(row):
            long_text = headers[i] in ("reasons", "message")
            cls = ' class="num"' if i in numeric else (' class="msg"' if long_text else "")
            text = "" if value is None else str(value)
            if long_text and len(text) > _MAX_MESSAGE:
                text = text[: _MAX_MESSAGE - 1] + "…"
            cells.append(f"<td{cls}>{_e(text)}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    ident = f' id="{_e(table_id)}"' if table_id else ""
    return f"<table{ident}><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def bar_chart(title: str, counts: Sequence[tuple[str, int]], colour: str = "#e08600", width: int = 540) -> str:
    """A horizontal bar chart as inline SVG: one labelled bar per (label, count), longest first."""
    bars = sorted(counts, key=lambda kv: (-kv[1], kv[0]))[:_MAX_BARS]
    if not bars:
        return f'<div class="chart"><h3>{_e(title)}</h3><p class="none">none</p></div>'
    label_w, count_w, row_h = 230, 50, 24
    plot_w = width - label_w - count_w
    top = max(n for _, n in bars) or 1
    height = row_h * len(bars) + 6
    parts = [
        f'<svg width="{width}" height="{height}" viewBox="0 0 {width} {height}" role="img" '
        f'aria-label="{_e(title)}"><title>{_e(title)}</title>'
    ]
    for i, (label, n) in enumerate(bars):
        y = i * row_h + 3
        w = max(2, round(plot_w * n / top))
        shown = label if len(label) <= 32 else label[:31] + "…"
        parts.append(
            f'<text x="{label_w - 8}" y="{y + 16}" text-anchor="end" font-size="13" fill="#1d2329">{_e(shown)}</text>'
            f'<rect x="{label_w}" y="{y + 2}" width="{w}" height="{row_h - 6}" rx="3" fill="{_e(colour)}">'
            f"<title>{_e(label)}: {n}</title></rect>"
            f'<text x="{label_w + w + 6}" y="{y + 16}" font-size="13" fill="#1d2329">{n}</text>'
        )
    parts.append("</svg>")
    return f'<div class="chart"><h3>{_e(title)}</h3>{"".join(parts)}</div>'


def _counts(tally: pl.DataFrame, column: str) -> list[tuple[str, int]]:
    """Rows per value of ``column``, from a tally (``rows`` per file, state, code and column)."""
    if not tally.height:
        return []
    grouped = tally.group_by(pl.col(column).fill_null("(none)")).agg(pl.col("rows").sum())
    return [(str(k), int(n)) for k, n in grouped.iter_rows()]


TALLY_KEYS = ("source_file", "state", "error_code", "field")


def tally_of(problems: pl.DataFrame) -> pl.DataFrame:
    """Problem rows counted per ``TALLY_KEYS`` (column ``rows``)."""
    return problems.group_by(TALLY_KEYS, maintain_order=True).agg(pl.len().cast(pl.Int64).alias("rows"))


def _version() -> str:
    try:
        return metadata.version("clinik-etl")
    except metadata.PackageNotFoundError:  # pragma: no cover - running from a bare checkout
        return "unknown"


def _state_cards(summary: dict[str, Any]) -> str:
    cards = [
        f'<div class="card" style="border-top-color:{_STATE_COLOURS.get(state, "#9aa5b1")}">'
        f'<span class="n" id="count-{_e(state)}">{int(n)}</span><span class="l">{_e(state)}</span></div>'
        for state, n in summary.get("states", {}).items()
        if n or state in ("created", "rejected")
    ]
    cards.append(
        f'<div class="card"><span class="n" id="rows-total">{int(summary.get("rows_total", 0))}</span>'
        '<span class="l">rows in total</span></div>'
    )
    return '<div class="cards">' + "".join(cards) + "</div>"


def _kinds(summary: dict[str, Any]) -> str:
    kinds: dict[str, dict[str, int]] = summary.get("kinds") or {}
    if not kinds:
        return ""
    states = [s for s in summary.get("states", {}) if any(per.get(s) for per in kinds.values())]
    rows = [[kind, *(per.get(s, 0) for s in states), sum(per.values())] for kind, per in kinds.items()]
    table = _table(["kind", *states, "total"], rows, numeric=range(1, len(states) + 2))
    patients = summary.get("patients")
    extra = ""
    if isinstance(patients, dict) and patients:
        extra = "<p>patients: " + _e(", ".join(f"{k} {v}" for k, v in patients.items())) + "</p>"
    return "<h2>Per kind</h2>" + table + extra


def _inputs(summary: dict[str, Any]) -> str:
    rows = [
        [
            i.get("path"),
            i.get("kind"),
            i.get("rows"),
            i.get("format"),
            i.get("encoding") or "",
            i.get("sheet") or "",
            i.get("profile"),
            str(i.get("sha256", ""))[:16],
        ]
        for i in summary.get("inputs", [])
    ]
    return _table(["file", "kind", "rows", "format", "encoding", "sheet", "profile", "sha256 (start)"], rows, [2])


def _rejects(rows: pl.DataFrame, tally: pl.DataFrame) -> str:
    rejected = rows.filter(pl.col("state") == "rejected")
    counted = tally.filter(pl.col("state") == "rejected")
    total = int(counted.get_column("rows").sum() or 0)
    out = ["<h2>Rejected rows</h2>"]
    if not total:
        out.append('<p class="none">No row was rejected.</p>')
        return "".join(out)
    out.append(
        '<div class="charts">'
        + bar_chart("Rejected rows by rule (code)", _counts(counted, "error_code"))
        + bar_chart("Rejected rows by column", _counts(counted, "field"), colour="#8d6e63")
        + "</div>"
    )
    first = rejected.sort("source_file", "source_row").head(FIRST_REJECTS)
    out.append(
        f"<p>The first {first.height} of {total} rejected rows, in file order "
        "(<code>rejects.csv</code> holds every one, with its original cells, ready to fix and import again; "
        "<code>clinik-etl explain CODE</code> says what a code means and how to fix it).</p>"
    )
    out.append(
        _table(
            ["file", "row", "code", "column", "reasons"],
            first.select("source_file", "source_row", "error_code", "field", "message").iter_rows(),
            numeric=[1],
            table_id="rejected-rows",
        )
    )
    return "".join(out)


def _problems(rows: pl.DataFrame, tally: pl.DataFrame) -> str:
    bad = rows.filter(pl.col("state").is_in(["failed", "unknown"]))
    counted = tally.filter(pl.col("state").is_in(["failed", "unknown"]))
    total = int(counted.get_column("rows").sum() or 0)
    out = ["<h2>Failed and unknown rows</h2>"]
    if not total:
        out.append('<p class="none">No row failed at the API or has an unknown outcome.</p>')
        return "".join(out)
    out.append(
        '<div class="charts">' + bar_chart("Failed and unknown rows by code", _counts(counted, "error_code"), "#c62828")
    )
    out.append("</div>")
    first = bad.sort("source_file", "source_row").head(FIRST_PROBLEMS)
    out.append(
        f'<p class="bad">{total} rows were not created. Failed rows are safe to send again after a fix; '
        "unknown ones are looked up before anything is re-sent. "
        f"The first {first.height}:</p>"
    )
    out.append(
        _table(
            ["file", "row", "kind", "state", "code", "field", "message"],
            first.select("source_file", "source_row", "kind", "state", "error_code", "field", "message").iter_rows(),
            numeric=[1],
            table_id="problem-rows",
        )
    )
    return "".join(out)


def _warnings(summary: dict[str, Any]) -> str:
    warnings = summary.get("warnings") or []
    if not warnings:
        return ""
    rows = []
    for w in warnings:
        where = w.get("message") or ("rows " + ", ".join(str(r) for r in w.get("rows", [])))
        rows.append([w.get("file"), w.get("code"), w.get("count", ""), where])
    return "<h2>Warnings</h2><p>These rows were kept; check them.</p>" + _table(
        ["file", "code", "rows", "where / what"], rows, numeric=[2]
    )


def _not_carried(summary: dict[str, Any]) -> str:
    """Every source column no payload carries, in full, and the files read but not imported."""
    carried: dict[str, list[dict[str, str]]] = summary.get("not_carried") or {}
    skipped: list[dict[str, Any]] = summary.get("not_imported") or []
    if not carried and not skipped:
        return ""
    out = ['<h2 id="not-carried">Not carried</h2>',
           "<p>No payload holds these source columns: map them in a profile if they matter "
           "(<code>unmapped</code>), or keep them elsewhere (the API has no field for them).</p>"]
    if skipped:
        out.append(_table(["file", "what", "rows", "why"],
                          ([x.get("file"), x.get("name"), x.get("rows"), x.get("reason")] for x in skipped),
                          numeric=[2], table_id="not-imported"))
    rows = []
    for file, columns in carried.items():
        by_reason: dict[str, list[str]] = {}
        for c in columns:
            by_reason.setdefault(str(c.get("reason")), []).append(str(c.get("column")))
        rows += [[file, reason, len(names), ", ".join(names)] for reason, names in by_reason.items()]
    if rows:
        out.append(_table(["file", "reason", "count", "columns"], rows, numeric=[2], table_id="not-carried-columns"))
    return "".join(out)


def _explanations(tally: pl.DataFrame, summary: dict[str, Any]) -> str:
    """What each code on the page means and how to fix it: the catalogue's entries (``etl.rules``), as
    ``clinik-etl explain`` says them. A code the catalogue does not hold (an API's new one) is left out."""
    shown = tally.get_column("error_code").drop_nulls().to_list() if tally.height else []
    shown += [w.get("code") for w in summary.get("warnings") or []]
    rules = [rule for c in sorted({str(c) for c in shown if c is not None}) if (rule := explain(c)) is not None]
    if not rules:
        return ""
    return '<h2 id="codes">What the codes mean</h2>' + _table(
        ["code", "kind", "meaning", "fix"], ([r.code, r.shown_kind, r.title, r.fix] for r in rules),
        table_id="code-meanings",
    )


def _timings(summary: dict[str, Any]) -> str:
    timings: dict[str, float] = summary.get("timings") or {}
    rows = [[stage, f"{seconds:.3f}"] for stage, seconds in timings.items()]
    out = ["<h2>Timings and rate</h2>", _table(["stage", "seconds"], rows, numeric=[1])]
    facts = []
    if summary.get("requests") is not None:
        facts.append(f"requests sent: {summary['requests']}")
    if summary.get("achieved_rate"):
        facts.append(f"achieved rate: {summary['achieved_rate']} requests/s")
    if summary.get("responses_429") is not None:
        facts.append(f"429 responses: {summary['responses_429']}")
    if facts:
        out.append("<p>" + _e("; ".join(facts)) + "</p>")
    for why in (summary.get("aborted"), summary.get("unresponsive")):
        if why:
            out.append(f'<p class="bad">The run stopped early: {_e(why)}</p>')
    return "".join(out)


def render_html(summary: dict[str, Any], rows: pl.DataFrame, tally: pl.DataFrame | None = None) -> str:
    """The whole page, from a run's summary and its per-row frame (``ROW_COLUMNS``).

    ``tally``: the problem rows' counts (:func:`tally_of`) when ``rows`` holds only the first
    rows of each group; counted from ``rows`` otherwise.
    """
    counted = tally_of(rows) if tally is None else tally
    command = str(summary.get("command", "run"))
    dry = " (dry run)" if summary.get("dry_run") else ""
    title = f"clinik-etl {command}{dry}: run {summary.get('run_id', '')}"
    return "".join(
        [
            "<!DOCTYPE html>\n<html lang=en><head><meta charset=utf-8>",
            # Nothing may load from anywhere: the page is complete as it is.
            "<meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; style-src 'unsafe-inline'\">",
            '<meta name="viewport" content="width=device-width, initial-scale=1">',
            '<meta name="robots" content="noindex">',
            f"<title>{_e(title)}</title><style>{_CSS}</style></head><body><main>",
            f"<h1>{_e(title)}</h1>",
            f'<p class="meta">target: <code>{_e(summary.get("target", ""))}</code></p>',
            "<h2>Rows by final state</h2>",
            _state_cards(summary),
            _kinds(summary),
            "<h2>Inputs</h2>",
            _inputs(summary),
            _rejects(rows, counted),
            _problems(rows, counted),
            _warnings(summary),
            _not_carried(summary),
            _explanations(counted, summary),
            _timings(summary),
            f"<footer>Written by clinik-etl {_e(_version())}. This page holds patient data: keep it private, "
            "as the rest of the report folder.</footer>",
            "</main></body></html>\n",
        ]
    )


def write_html(summary: dict[str, Any], rows: pl.DataFrame, path: Path, tally: pl.DataFrame | None = None) -> Path:
    """Write the page to ``path``, owner-only and never through a link (:func:`etl.files.private_text`)."""
    with private_text(path) as fh:
        fh.write(render_html(summary, rows, tally))
    return path
