"""The benchmark runs end to end on a tiny file (it measures; it asserts no time)."""

from __future__ import annotations

import json
from pathlib import Path

from bench.run import main


def test_quick_bench_writes_results(tmp_path: Path) -> None:
    out = tmp_path / "results.json"
    assert main(["--rows", "2000", "--quick", "--out", str(out), "--data", str(tmp_path / "data")]) == 0
    results = json.loads(out.read_text(encoding="utf-8"))
    assert {"machine", "rows", "quick", "pipeline", "http", "rate_limited", "bulk"} <= results.keys()
    assert {"cpus", "python", "polars"} <= results["machine"].keys()
    pipeline = results["pipeline"]
    for name in ("polars_read_csv", "validate", "dry_run_load"):
        assert {"seconds", "peak_rss_mb", "rows_per_s"} <= pipeline[name].keys()
    assert pipeline["validate"]["exit"] == 0  # the generated rows are all valid
    http = results["http"]
    assert http["states"]["created"] == http["rows"]
    assert http["loader_req_per_s"] > 0 and http["bare_httpx_req_per_s"] > 0
    assert results["rate_limited"] is None and results["bulk"] is None  # --quick skips them


def test_the_load_bench_runs_a_real_load_both_ways(tmp_path: Path) -> None:
    from bench.run import bench_streamed_load

    result = bench_streamed_load(tmp_path / "data", 600, tmp_path)
    for how in ("stream", "no_stream"):  # each a child process against its own sandbox
        assert result[how]["states"] == {"created": 600}
        assert result[how]["peak_rss_mb"] > 0 and result[how]["exit"] == 0
