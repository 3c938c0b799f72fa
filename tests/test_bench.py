"""The benchmark runs end to end on a tiny file (it measures; it asserts no time)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

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
    realistic = results["realistic"]  # the sample scaled: its planted bad rows are rejected
    assert realistic["validate"]["exit"] == 1 and realistic["dry_run_load"]["exit"] == 1
    dry = realistic["dry_run_load"]  # compared with validate, by the quickest runs, their medians and CPU
    assert dry["vs_validate"] == round(dry["seconds"] / realistic["validate"]["seconds"], 2)
    assert dry["median_vs_validate"] > 0 and dry["vs_validate_cpu"] > 0
    assert results["reimport"] is None


def test_the_load_bench_runs_a_real_load_in_batches(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from bench.run import bench_streamed_load

    # A bulk load against a sandbox whose search has no lag: its child waits no consistency window for the
    # lookups that settle the lines (the default 10 s was over a third of this test).
    monkeypatch.setenv("CLINIK_ETL_CONSISTENCY_WINDOW", "0")

    result = bench_streamed_load(tmp_path / "data", 600, tmp_path)
    loaded = result["in_batches"]  # a child process against its own sandbox
    assert loaded["states"] == {"created": 600}
    assert loaded["peak_rss_mb"] > 0 and loaded["exit"] == 0


def test_the_redox_bench_runs_both_dry_runs_of_one_file(tmp_path: Path) -> None:
    from bench.run import bench_redox_dry_run

    result = bench_redox_dry_run(tmp_path / "data", 300, tmp_path)
    for name in ("clinikapi", "redox"):  # each a child process
        assert result[name]["states"] == {"planned": 300} and result[name]["exit"] == 0
        assert result[name]["peak_rss_mb"] > 0
    assert result["redox_vs_clinikapi"] > 0
    assert "fhir" in result["redox"]["stages"]


def test_the_realistic_file_is_the_sample_scaled_with_ids_per_copy(tmp_path: Path) -> None:
    import csv

    from bench.generate import SAMPLE, generate_realistic

    with SAMPLE.open(newline="", encoding="utf-8") as fh:
        sample = list(csv.reader(fh))[1:]
    rows = len(sample) * 2 + 7
    with generate_realistic(tmp_path / "r.csv", rows).open(newline="", encoding="utf-8") as fh:
        _, *body = list(csv.reader(fh))
    assert len(body) == rows
    for copy, start in ((1, 0), (2, len(sample)), (3, 2 * len(sample))):
        for original, row in zip(sample, body[start:], strict=False):
            for column in (0, 1):  # record and patient ids suffixed per copy (empty ones stay empty)
                assert row[column] == (f"{original[column]}-{copy}" if original[column].strip() else original[column])
            assert row[2:] == original[2:]  # everything else, bad cells included, as in the sample
    assert len({row[0] for row in body if row[0].strip()}) > len(sample) * 2  # new record ids in each copy


def test_the_reimport_bench_sends_nothing_the_second_time(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from bench.run import bench_reimport

    # The first load's bulk lines are settled by lookup; the sandbox's search has no lag, so its children wait
    # no consistency window (the default 10 s was a third of this test).
    monkeypatch.setenv("CLINIK_ETL_CONSISTENCY_WINDOW", "0")

    result = bench_reimport(tmp_path / "data", 300, tmp_path, repeat=1)
    first, again = result["first_load"], result["reimport"]
    assert first["requests"] > 0 and first["states"]["created"] > 0
    assert again["requests"] == 0  # every row created earlier and unchanged
    assert "created" not in again["states"] and again["states"]["skipped"] == first["states"]["created"]
    assert again["states"].get("rejected") == first["states"].get("rejected")  # the bad rows, again
    assert result["reimport_vs_validate"] > 0
    assert result["reimport_vs_validate_cpu"] > 0 and result["cpu_seconds"]["reimport"] > 0  # CPU beside the wall
    fresh = result["fresh_target"]  # an empty sandbox at the same address: the state store alone decides
    assert fresh["requests"] == 0 and fresh["states"] == again["states"]


def test_only_runs_the_measurements_named(tmp_path: Path) -> None:
    out = tmp_path / "results.json"
    argv = ["--rows", "1000", "--quick", "--only", "realistic", "--out", str(out), "--data", str(tmp_path / "data")]
    assert main(argv) == 0
    results = json.loads(out.read_text(encoding="utf-8"))
    assert results["realistic"]["validate"]["exit"] == 1  # measured
    assert results["pipeline"] is None and results["http"] is None  # not named: not run
