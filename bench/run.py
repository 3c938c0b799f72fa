"""The benchmarks: ``python -m bench [--rows N] [--quick]``; prints a table and writes ``bench/results.json``.

(a) ``clinik-etl validate`` and a dry-run ``load`` on N rows, each in a child process (wall time,
    rows/s, peak RSS from ``os.wait4``), next to polars' plain ``read_csv`` of the same file
    (read_csv, validate and the dry run ``--repeat`` times in turns, the quickest of each; the dry run
    also as a ratio to validate);
(b) the loader against an unlimited sandbox next to a bare ``httpx.AsyncClient`` loop posting the
    same bodies at the same concurrency (requests/s);
(c) the loader against a sandbox that allows 600 requests per 10 s: achieved / allowed, 429s;
(d) bulk mode on ``--bulk-rows`` rows;
(e) a real load of ``--load-rows`` rows (bulk mode), planned and sent in batches: peak RSS;
(g) the realistic file (``bench.generate.generate_realistic``: the sample registry scaled, about 5%
    of its rows bad) beside the clean one: read, validate and dry run, the same as (a);
(h) the re-import of an unchanged ``--reimport-rows`` realistic export: loaded once in bulk mode into a
    sandbox, then loaded again (nothing to send), next to ``validate`` of the same file;
(f) with ``--redox-rows N``: a dry run to Redox of N rows next to the ClinikAPI dry run of the same
    file (time, peak RSS, the ratio of the times); run with ``--quick`` too when asked for.

Benchmarks are not tests: nothing here asserts a time. ``--quick`` runs (a) and a small (b) only.
"""

from __future__ import annotations

import argparse
import asyncio
import compileall
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import polars as pl

from bench.generate import generate, generate_realistic

HERE = Path(__file__).resolve().parent
#: What ``--only`` can name: (a) pipeline, (g) realistic, (h) reimport, the larger file, (b) http,
#: (c) limited, (d) bulk, (e) load, (f) redox.
SECTIONS = frozenset({"pipeline", "realistic", "reimport", "scale", "http", "limited", "bulk", "load", "redox"})
CONCURRENCY = 8


def _child(args: list[str], env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run a child process; its wall time and peak RSS (its own, from wait4)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            env={**os.environ, **env} if env else None)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
    if proc.stderr:
        proc.stderr.close()
    if proc.returncode not in (0, 1):  # 1: rows rejected, still a full run
        raise RuntimeError(f"{args[:4]} exited {proc.returncode}: {err[-2000:]}")
    return {"seconds": round(wall, 3), "peak_rss_mb": round(usage.ru_maxrss / 1024, 1), "exit": proc.returncode,
            "cpu_seconds": round(usage.ru_utime + usage.ru_stime, 3)}  # user + system: less noisy on a shared machine


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-c", "from etl.cli import command_line; command_line()", *args]


def _best(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Several runs of one measurement: the quickest (as timeit takes it), with every time and the median."""
    times = sorted(r["seconds"] for r in runs)
    return {**min(runs, key=lambda r: r["seconds"]), "runs_seconds": [r["seconds"] for r in runs],
            "median_seconds": times[len(times) // 2], "peak_rss_mb": max(r["peak_rss_mb"] for r in runs)}


def bench_pipeline(csv: Path, rows: int, work: Path, repeat: int = 3) -> dict[str, Any]:
    """(a): validate and a dry-run load end to end, and polars' read_csv, each in its own process.

    read_csv, validate and the dry run run ``repeat`` times, in turns (the VM's speed drifts from minute to
    minute); each figure is the quickest of its runs, the ratio the quotient of those. The dry run's
    ``vs_validate`` (and its median, and ``vs_validate_cpu``: the least CPU of each) compares it with validate.
    """
    reads, validates, drys = [], [], []
    read_args = [sys.executable, "-c", "import sys, polars as pl; pl.read_csv(sys.argv[1], infer_schema=False)",
                 str(csv)]
    for _ in range(max(repeat, 1)):
        reads.append(_child(read_args))
        validates.append(_child(_cli("validate", str(csv), "-q", "--report-dir", str(work / "validate"))))
        drys.append(_child(_cli("load", str(csv), "--dry-run", "-q", "--report-dir", str(work / "dry"),
                                "--state", str(work / "dry.sqlite"))))
    read = _best(reads)
    out: dict[str, Any] = {"polars_read_csv": read}
    validate, dry = _best(validates), _best(drys)
    dry["vs_validate"] = round(dry["seconds"] / validate["seconds"], 2)
    dry["median_vs_validate"] = round(dry["median_seconds"] / validate["median_seconds"], 2)
    least = {name: min(r["cpu_seconds"] for r in runs) for name, runs in (("validate", validates), ("dry", drys))}
    dry["vs_validate_cpu"] = round(least["dry"] / least["validate"], 2)
    for name, result, folder in (("validate", validate, "validate"), ("dry_run_load", dry, "dry")):
        summary = json.loads((work / folder / "summary.json").read_text())
        result["rows_per_s"] = round(rows / result["seconds"])
        result["stages"] = summary.get("timings", {})
        result["vs_read_csv"] = round(result["seconds"] / read["seconds"], 1)
        if "median_seconds" in result:
            result["median_vs_read_csv"] = round(result["median_seconds"] / read["median_seconds"], 1)
        out[name] = result
    read["rows_per_s"] = round(rows / read["seconds"])
    return out


def bench_reimport(data: Path, rows: int, work: Path, repeat: int = 3) -> dict[str, Any]:
    """(h): the weekly re-import of an unchanged export: a load (bulk mode) of a realistic file into a
    sandbox, then the same file loaded again, each in a child process, next to ``validate`` of it.

    The second load finds every row created earlier and unchanged: it sends nothing (``requests`` 0).
    ``fresh_target``: the same re-import once more into a new, empty sandbox at the same address: the
    state store alone decides, so it sends nothing either (and asks the target nothing). ``cpu_seconds`` and
    ``reimport_vs_validate_cpu``: the same comparison in CPU time (user + system), steadier on a shared machine."""
    from etl.sandbox import SandboxConfig, SandboxServer

    csv = data / f"realistic-{rows}.csv"
    if not csv.is_file():
        generate_realistic(csv, rows)
    state = work / "reimport.sqlite"
    env = {"CLINIK_ETL_BULK_PER_HOUR": "10000"}

    def load(server: SandboxServer, folder: str) -> dict[str, Any]:
        result = _child(_cli("load", str(csv), "--mode", "bulk", "-q", "--base-url", server.base_url,
                             "--state", str(state), "--report-dir", str(work / folder)), env=env)
        summary = json.loads((work / folder / "summary.json").read_text())
        result["requests"] = summary.get("requests")
        result["states"] = {k: v for k, v in summary["states"].items() if v}
        return result

    # The sandbox's own answer shape (``simple``): a bulk job's record names the ids it created, so the first
    # load records them without looking each line up by search (the documented shape names none: 50,000 rows
    # took 20 minutes of lookups, 10,000 rows 97 s against 17 s). What is measured, the re-import, asks nothing.
    with SandboxServer(SandboxConfig(bulk_operations_per_hour=10_000, responses="simple")) as server:
        env["CLINIKAPI_SECRET_KEY"] = server.api_key
        first = load(server, "reimport-first")
        validates, again = [], []
        for _ in range(max(repeat, 1)):  # in turns, the quickest of each (see bench_pipeline)
            validates.append(_child(_cli("validate", str(csv), "-q", "--report-dir", str(work / "reimport-v"))))
            again.append(load(server, "reimport-again"))
        port = int(server.base_url.rsplit(":", 1)[1])
    fresh_config = SandboxConfig(bulk_operations_per_hour=10_000, api_keys={env["CLINIKAPI_SECRET_KEY"]: "*"},
                                 responses="simple")
    with SandboxServer(fresh_config, port=port) as fresh:  # the state store is bound to the address
        fresh_target = load(fresh, "reimport-fresh")
    validate, reimport = _best(validates), _best(again)
    # CPU (user + system, every thread) as well as wall: on a shared machine the wall time of a run also
    # counts the other processes'; the least CPU of each measurement, and their quotient.
    cpu = {name: min(r["cpu_seconds"] for r in runs) for name, runs in (("validate", validates), ("reimport", again))}
    return {"rows": rows, "first_load": first, "validate": validate, "reimport": reimport,
            "reimport_vs_validate": round(reimport["seconds"] / validate["seconds"], 2),
            "cpu_seconds": cpu, "reimport_vs_validate_cpu": round(cpu["reimport"] / cpu["validate"], 2),
            "fresh_target": fresh_target}


def bench_scale(data: Path, rows: int, work: Path) -> dict[str, Any]:
    """(a, scale): validate alone on a larger file, where the batches keep memory bounded."""
    csv = data / f"registry-{rows}.csv"
    if not csv.is_file():
        generate(csv, rows)
    read = _child([sys.executable, "-c", "import sys, polars as pl; pl.read_csv(sys.argv[1], infer_schema=False)",
                   str(csv)])
    result = _child(_cli("validate", str(csv), "-q", "--report-dir", str(work / "validate-scale")))
    result["rows"] = rows
    result["rows_per_s"] = round(rows / result["seconds"])
    result["polars_read_csv"] = read
    result["vs_read_csv"] = round(result["seconds"] / read["seconds"], 1)
    return result


def _load(csv: Path, work: Path, server: Any, name: str, **settings: Any) -> dict[str, Any]:
    from etl.pipeline import load_files
    from etl.settings import Settings

    t0 = time.perf_counter()
    report = load_files([csv], Settings(base_url=server.base_url, api_key=server.api_key, state=work / f"{name}.sqlite",
                                        report_dir=work / name, concurrency=CONCURRENCY, **settings))
    summary = dict(report.summary)
    summary["wall_seconds"] = time.perf_counter() - t0
    return summary


async def _bare_loop(base_url: str, key: str, lines: list[dict[str, Any]]) -> float:
    """POST the dry run's bodies with nothing but httpx; requests/s."""
    headers = {"x-api-key": key, "content-type": "application/json"}
    limits = httpx.Limits(max_connections=CONCURRENCY, max_keepalive_connections=CONCURRENCY)
    async with httpx.AsyncClient(base_url=base_url, limits=limits, timeout=30) as http:
        first = next(ln for ln in lines if ln["kind"] == "patient")
        created = await http.post(first["path"], json=first["body"], headers=headers)
        patient_id = created.json()["data"]["id"]
        bodies = []
        for ln in lines:
            body = ln["body"]
            if "patientId" in body:
                body["patientId"] = patient_id
            bodies.append((ln["path"], json.dumps(body).encode()))
        it = iter(bodies)

        async def work() -> None:
            for path, body in it:
                response = await http.post(path, content=body, headers=headers)
                if response.status_code != 201:
                    raise RuntimeError(f"bare loop: HTTP {response.status_code} {response.text[:200]}")

        t0 = time.perf_counter()
        await asyncio.gather(*(work() for _ in range(CONCURRENCY)))
        return len(bodies) / (time.perf_counter() - t0)


def bench_http(data: Path, rows: int, work: Path) -> dict[str, Any]:
    """(b): the loader and a bare httpx loop against an unlimited sandbox."""
    from etl.pipeline import load_files
    from etl.sandbox import SandboxConfig, SandboxServer
    from etl.settings import Settings

    csv = generate(data / f"http-{rows}.csv", rows, seed=11).path
    load_files([csv], Settings(dry_run=True, report_dir=work / "http-dry", state=work / "http-dry.sqlite"))
    with (work / "http-dry" / "payloads.ndjson").open(encoding="utf-8") as fh:
        lines = [json.loads(line) for line in fh]
    with SandboxServer(SandboxConfig()) as server:
        summary = _load(csv, work, server, "http")
    with SandboxServer(SandboxConfig()) as server:
        bare = asyncio.run(_bare_loop(server.base_url, server.api_key, lines))
    loader = summary["achieved_rate"]
    return {"rows": rows, "requests": summary["requests"], "loader_req_per_s": loader,
            "bare_httpx_req_per_s": round(bare, 1), "loader_vs_bare": round(loader / bare, 2),
            "concurrency": CONCURRENCY, "states": summary["states"]}


def bench_limited(data: Path, seconds: float, work: Path) -> dict[str, Any]:
    """(c): the loader against 600 requests per 10 s (60/s allowed) for about ``seconds``."""
    from etl.sandbox import SandboxConfig, SandboxServer

    allowed = 60.0
    rows = int(allowed * seconds * 0.75)  # ~4 requests per 3 rows (a patient per 3 rows)
    csv = generate(data / f"limited-{rows}.csv", rows, seed=13).path
    with SandboxServer(SandboxConfig(rate_limit=600, window=10.0)) as server:
        summary = _load(csv, work, server, "limited")
    return {"rows": rows, "requests": summary["requests"], "allowed_req_per_s": allowed,
            "achieved_req_per_s": summary["achieved_rate"],
            "achieved_vs_allowed": round(summary["achieved_rate"] / allowed, 3),
            "responses_429": summary["responses_429"], "load_seconds": summary["timings"].get("load")}


def bench_bulk(data: Path, rows: int, work: Path) -> dict[str, Any]:
    """(d): bulk mode (the sandbox's hourly limit raised so one run can start every job it needs)."""
    from etl.sandbox import SandboxConfig, SandboxServer

    csv = generate(data / f"bulk-{rows}.csv", rows, seed=17).path
    # The sandbox's own answer shape (``simple``), as in bench_reimport: a job's record names the ids it created.
    # The documented shape names none, so each line is looked up by search: 10,000 rows took 97 s against 17 s,
    # and the default 100,000 rows a quarter of an hour.
    with SandboxServer(SandboxConfig(bulk_operations_per_hour=1000, responses="simple")) as server:
        summary = _load(csv, work, server, "bulk", mode="bulk", bulk_per_hour=1000)
    load = summary["timings"]["load"]
    return {"rows": rows, "jobs": len(summary["bulk_jobs"]), "load_seconds": load,
            "rows_per_s": round(rows / load), "wall_seconds": round(summary["wall_seconds"], 2),
            "states": summary["states"]}


def bench_streamed_load(data: Path, rows: int, work: Path) -> dict[str, Any]:
    """(e): a real load (bulk mode, to be quick) of ``rows`` rows in a child process, planned and sent
    in batches as every load is: its peak RSS, the sandbox outside it."""
    from etl.sandbox import SandboxConfig, SandboxServer

    csv = data / f"registry-{rows}.csv"
    if not csv.is_file():
        generate(csv, rows)
    # The simple answer shape (see bench_bulk): what is measured is the peak RSS of planning and sending in
    # batches, not a search per line (which took 300,000 rows past 20 minutes).
    with SandboxServer(SandboxConfig(bulk_operations_per_hour=10_000, responses="simple")) as server:
        folder = work / "load"
        result = _child(
            _cli("load", str(csv), "--mode", "bulk", "-q", "--base-url", server.base_url,
                 "--state", str(work / "load.sqlite"), "--report-dir", str(folder)),
            env={"CLINIKAPI_SECRET_KEY": server.api_key, "CLINIK_ETL_BULK_PER_HOUR": "10000"},
        )
    summary = json.loads((folder / "summary.json").read_text())
    result["rows_per_s"] = round(rows / result["seconds"])
    result["states"] = {k: v for k, v in summary["states"].items() if v}
    return {"rows": rows, "in_batches": result}


def bench_redox_dry_run(data: Path, rows: int, work: Path) -> dict[str, Any]:
    """(f): ``load --target redox --dry-run`` of ``rows`` rows next to the ClinikAPI dry run of the
    same file, each in a child process: wall time, peak RSS, and the ratio of the times."""
    csv = data / f"registry-{rows}.csv"
    if not csv.is_file():
        generate(csv, rows)
    out: dict[str, Any] = {"rows": rows}
    for name, extra in (("clinikapi", []), ("redox", ["--target", "redox"])):
        folder = work / f"dry-{name}"
        result = _child(_cli("load", str(csv), "--dry-run", *extra, "-q", "--report-dir", str(folder),
                             "--state", str(work / f"dry-{name}.sqlite")))
        summary = json.loads((folder / "summary.json").read_text())
        result["rows_per_s"] = round(rows / result["seconds"])
        result["stages"] = summary.get("timings", {})
        result["states"] = {k: v for k, v in summary["states"].items() if v}
        out[name] = result
    out["redox_vs_clinikapi"] = round(out["redox"]["seconds"] / out["clinikapi"]["seconds"], 2)
    return out


def machine() -> dict[str, Any]:
    """What the figures were measured on."""
    return {"cpus": os.cpu_count(), "python": platform.python_version(), "polars": pl.__version__,
            "httpx": httpx.__version__, "platform": platform.platform()}


def run(rows: int, *, quick: bool, http_rows: int, limited_seconds: float, bulk_rows: int,
        out: Path, data: Path, scale_rows: int = 0, load_rows: int = 0, repeat: int = 3,
        redox_rows: int = 0, reimport_rows: int = 0, only: frozenset[str] = SECTIONS) -> dict[str, Any]:
    """Run the benchmarks (``only``: those of :data:`SECTIONS` named) and write ``out``."""
    # The children run the project as installed: its bytecode compiled once (an editable install under
    # PYTHONDONTWRITEBYTECODE would compile every changed module again in every child, as no user's does).
    for package in ("etl", "schemas"):
        compileall.compile_dir(HERE.parent / package, quiet=1)
    csv = data / f"registry-{rows}.csv"
    if not csv.is_file():
        generate(csv, rows)
    realistic = data / f"realistic-{rows}.csv"
    if not realistic.is_file():
        generate_realistic(realistic, rows)
    results: dict[str, Any] = {"machine": machine(), "rows": rows, "quick": quick}
    with tempfile.TemporaryDirectory(prefix="clinik-bench-") as tmp:
        work = Path(tmp)
        results["pipeline"] = bench_pipeline(csv, rows, work, repeat=1 if quick else repeat) \
            if "pipeline" in only else None
        (work / "realistic").mkdir()
        results["realistic"] = bench_pipeline(realistic, rows, work / "realistic", repeat=1 if quick else repeat) \
            if "realistic" in only else None
        results["reimport"] = bench_reimport(data, reimport_rows, work, repeat=repeat) \
            if reimport_rows and not quick and "reimport" in only else None
        results["scale"] = bench_scale(data, scale_rows, work) if scale_rows and not quick and "scale" in only else None
        results["http"] = bench_http(data, min(http_rows, rows, 300) if quick else http_rows, work) \
            if "http" in only else None
        results["rate_limited"] = None if quick or "limited" not in only else bench_limited(data, limited_seconds, work)
        results["bulk"] = None if quick or "bulk" not in only else bench_bulk(data, bulk_rows, work)
        results["streamed_load"] = bench_streamed_load(data, load_rows, work) \
            if load_rows and not quick and "load" in only else None
        results["redox_dry_run"] = bench_redox_dry_run(data, redox_rows, work) \
            if redox_rows and "redox" in only else None
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    return results


def show(results: dict[str, Any]) -> None:
    """The results as a rich table."""
    from rich.console import Console
    from rich.table import Table

    m = results["machine"]
    table = Table(title=f"clinik-etl bench: {m['cpus']} CPUs, Python {m['python']}, polars {m['polars']}")
    for column in ("measurement", "time s", "rate", "peak RSS MB", "ratio / note"):
        table.add_column(column)
    p, n = results.get("pipeline"), results["rows"]
    if p is not None:
        read = p["polars_read_csv"]
        table.add_row(f"polars read_csv ({n:,} rows, all text)", f"{read['seconds']:.2f}",
                      f"{read['rows_per_s']:,} rows/s", f"{read['peak_rss_mb']:,.0f}", "baseline")
        for name in ("validate", "dry_run_load"):
            r = p[name]
            median = f" (median of runs {r['median_vs_read_csv']}x)" if "median_vs_read_csv" in r else ""
            table.add_row(f"clinik-etl {name.replace('_', ' ')}", f"{r['seconds']:.2f}",
                          f"{r['rows_per_s']:,} rows/s", f"{r['peak_rss_mb']:,.0f}",
                          f"{r['vs_read_csv']}x read_csv{median}")
    if (rp := results.get("realistic")) is not None:
        read = rp["polars_read_csv"]
        table.add_row(f"realistic: polars read_csv ({n:,} rows, ~5% bad)", f"{read['seconds']:.2f}",
                      f"{read['rows_per_s']:,} rows/s", f"{read['peak_rss_mb']:,.0f}", "baseline")
        for name in ("validate", "dry_run_load"):
            r = rp[name]
            note = f"{r['vs_read_csv']}x read_csv"
            if name == "dry_run_load":
                note += (f", {r['vs_validate']}x validate (median {r['median_vs_validate']}x, "
                         f"CPU {r['vs_validate_cpu']}x)")
            table.add_row(f"realistic: clinik-etl {name.replace('_', ' ')}", f"{r['seconds']:.2f}",
                          f"{r['rows_per_s']:,} rows/s", f"{r['peak_rss_mb']:,.0f}", note)
    if (ri := results.get("reimport")) is not None:
        r = ri["reimport"]
        table.add_row(f"re-import, unchanged ({ri['rows']:,} rows)", f"{r['seconds']:.2f}",
                      f"{r['requests']} requests", f"{r['peak_rss_mb']:,.0f}",
                      f"{ri['reimport_vs_validate']}x validate ({ri['validate']['seconds']:.2f} s); CPU "
                      f"{ri['reimport_vs_validate_cpu']}x ({ri['cpu_seconds']['reimport']:.2f} / "
                      f"{ri['cpu_seconds']['validate']:.2f} s)")
    if (sc := results.get("scale")) is not None:
        table.add_row(f"clinik-etl validate ({sc['rows']:,} rows)", f"{sc['seconds']:.2f}",
                      f"{sc['rows_per_s']:,} rows/s", f"{sc['peak_rss_mb']:,.0f}",
                      f"{sc['vs_read_csv']}x read_csv (read: {sc['polars_read_csv']['peak_rss_mb']:,.0f} MB)")
    if (h := results.get("http")) is not None:
        table.add_row(f"loader, unlimited sandbox ({h['rows']:,} rows)", "", f"{h['loader_req_per_s']:,} req/s", "",
                      f"{h['loader_vs_bare']}x bare httpx ({h['bare_httpx_req_per_s']:,} req/s)")
    if (c := results.get("rate_limited")) is not None:
        table.add_row("loader, 600 req / 10 s", f"{c['load_seconds']:.1f}", f"{c['achieved_req_per_s']} req/s", "",
                      f"{c['achieved_vs_allowed']:.1%} of allowed, {c['responses_429']} x 429")
    if (b := results.get("bulk")) is not None:
        states = ", ".join(f"{v:,} {k}" for k, v in b["states"].items() if v)
        table.add_row(f"bulk mode ({b['rows']:,} rows, {b['jobs']} jobs)", f"{b['load_seconds']:.1f}",
                      f"{b['rows_per_s']:,} rows/s", "", states)
    if (sl := results.get("streamed_load")) is not None:
        r = sl["in_batches"]
        table.add_row(f"load --mode bulk, {sl['rows']:,} rows, in batches", f"{r['seconds']:.1f}",
                      f"{r['rows_per_s']:,} rows/s", f"{r['peak_rss_mb']:,.0f}",
                      ", ".join(f"{v:,} {k}" for k, v in r["states"].items()))
    if (rd := results.get("redox_dry_run")) is not None:
        for name, label in (("clinikapi", "ClinikAPI"), ("redox", "Redox (--target redox)")):
            r = rd[name]
            note = f"{rd['redox_vs_clinikapi']}x ClinikAPI" if name == "redox" else "baseline"
            table.add_row(f"dry run to {label}, {rd['rows']:,} rows", f"{r['seconds']:.1f}",
                          f"{r['rows_per_s']:,} rows/s", f"{r['peak_rss_mb']:,.0f}", note)
    Console().print(table)


def main(argv: list[str] | None = None) -> int:
    """``python -m bench``."""
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000, help="rows of the generated registry CSV for (a)")
    parser.add_argument("--scale-rows", type=int, default=5_000_000,
                        help="rows of a second, larger file validated alone (0: skip; skipped with --quick)")
    parser.add_argument("--http-rows", type=int, default=5_000, help="rows loaded for (b)")
    parser.add_argument("--limited-seconds", type=float, default=15.0, help="about how long (c) runs")
    parser.add_argument("--bulk-rows", type=int, default=100_000, help="rows loaded in bulk mode for (d)")
    parser.add_argument("--load-rows", type=int, default=300_000,
                        help="rows of a real load (bulk mode) run in batches, for peak RSS (0: skip)")
    parser.add_argument("--redox-rows", type=int, default=0,
                        help="rows of a dry run to Redox and to ClinikAPI, side by side (0: skip; runs with --quick)")
    parser.add_argument("--reimport-rows", type=int, default=50_000,
                        help="rows of a realistic export loaded twice, unchanged (0: skip; not with --quick)")
    parser.add_argument("--repeat", type=int, default=3,
                        help="runs of read_csv and validate in (a), in turns; the quickest of each counts")
    parser.add_argument("--quick", action="store_true", help="(a) and a small (b) only")
    parser.add_argument("--only", type=lambda v: frozenset(v.split(",")), default=SECTIONS,
                        help=f"comma-separated measurements to run, of: {', '.join(sorted(SECTIONS))} (default: all)")
    parser.add_argument("--out", type=Path, default=HERE / "results.json")
    parser.add_argument("--data", type=Path, default=HERE / "data", help="where generated files are kept")
    args = parser.parse_args(argv)
    results = run(args.rows, quick=args.quick, http_rows=args.http_rows, limited_seconds=args.limited_seconds,
                  bulk_rows=args.bulk_rows, out=args.out, data=args.data, scale_rows=args.scale_rows,
                  load_rows=args.load_rows, repeat=args.repeat, redox_rows=args.redox_rows,
                  reimport_rows=args.reimport_rows, only=args.only)
    show(results)
    print(f"results: {args.out}")
    return 0
