"""The weekly re-import of an unchanged export (etl.send, etl.load.reimport): every row an earlier run created is
skipped before any HTTP client is opened; the target is asked nothing; what is left (a changed row, a bulk import
an earlier run left open) still opens one and is sent or polled."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import polars as pl
import pytest

from etl.load.reimport import created_unchanged, skipped_and_unsent
from etl.load.state import Record, StateStore
from etl.pipeline import load_files
from etl.sandbox import SandboxConfig, SandboxServer
from etl.settings import Settings

from .conftest import SAMPLE
from .test_pipeline import count


@pytest.fixture()
def pools(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """The connection pools (httpx transports, each with its TLS context) opened: one entry each."""
    opened: list[str] = []
    real = httpx.AsyncHTTPTransport.__init__

    def counted(self: httpx.AsyncHTTPTransport, *args: Any, **kwargs: Any) -> None:
        opened.append("pool")
        real(self, *args, **kwargs)

    monkeypatch.setattr(httpx.AsyncHTTPTransport, "__init__", counted)
    yield opened


def _registry(tmp_path: Path) -> tuple[Path, str]:
    registry = tmp_path / "registry.csv"
    text = (SAMPLE / "registry.csv").read_text(encoding="utf-8")
    registry.write_text(text, encoding="utf-8")
    return registry, text


@pytest.mark.parametrize("mode", ["request", "bulk"])
def test_an_unchanged_re_import_opens_no_client_and_a_changed_row_opens_one(
    tmp_path: Path, mode: str, pools: list[str]
) -> None:
    registry, text = _registry(tmp_path)
    with SandboxServer(SandboxConfig(bulk_operations_per_hour=100)) as server:
        base = {"base_url": server.base_url, "api_key": server.api_key, "consistency_window": 0,
                "state": tmp_path / "s.sqlite", "mode": mode}
        first = load_files([registry], Settings(**base, report_dir=tmp_path / "r1"))
        created = first.states["created"]
        assert created > 500 and pools  # the first load sent through a pool
        before = count(server, "/v1/immunizations")
        pools.clear()
        again = load_files([registry], Settings(**base, report_dir=tmp_path / "r2"))
        assert pools == []  # no connection pool, no TLS context: nothing to send, nothing asked
        assert again.states["skipped"] == created and again.states.get("created", 0) == 0
        assert (again.summary["requests"], again.summary["creates_sent"]) == (0, 0)
        assert again.summary["mode"] == first.summary["mode"] == mode  # the summary says what it said
        # One dose's lot corrected since: that row changed; the loader needs its client to tell (and to patch).
        registry.write_text(text.replace(",JS4841AA,", ",JS4841AB,", 1), encoding="utf-8")
        changed = load_files([registry], Settings(**base, report_dir=tmp_path / "r3"))
        assert len(pools) == 1
        assert changed.states["changed"] == 1 and changed.states["skipped"] == created - 1
        updated = load_files([registry], Settings(**base, update=True, report_dir=tmp_path / "r4"))
        assert updated.states["updated"] == 1 and updated.summary["requests"] == 1
        # Its message says what the PATCH did, not "HTTP 200: " (a newcomer's finding).
        from etl.load.loader import UPDATED

        (said,) = updated.rows.filter(pl.col("state") == "updated").get_column("message").to_list()
        assert said == UPDATED
        assert count(server, "/v1/immunizations") == before  # patched in place, never created twice


def test_a_re_import_asks_nothing_of_a_target_that_no_longer_listens(tmp_path: Path) -> None:
    """The state store alone decides: the same address with nothing listening there answers nothing, and the
    re-import needs no answer (a client that tried would find the port closed)."""
    registry, _ = _registry(tmp_path)
    with SandboxServer(SandboxConfig()) as server:
        settings = Settings(base_url=server.base_url, api_key=server.api_key, consistency_window=0,
                            state=tmp_path / "s.sqlite", report_dir=tmp_path / "r1")
        created = load_files([registry], settings).states["created"]
    with pytest.raises(httpx.ConnectError):
        httpx.get(str(settings.base_url) + "/health")  # nothing listens there now
    again = load_files([registry], settings.model_copy(update={"report_dir": tmp_path / "r2"}))
    assert again.states["skipped"] == created and again.states["failed"] == 0
    assert again.summary["requests"] == 0 and again.summary["matching_requests"] == 0


def test_a_bulk_import_an_earlier_run_left_open_is_polled_though_nothing_is_new(
    tmp_path: Path, pools: list[str]
) -> None:
    registry, _ = _registry(tmp_path)
    with SandboxServer(SandboxConfig(bulk_operations_per_hour=100)) as server:
        base = {"base_url": server.base_url, "api_key": server.api_key, "consistency_window": 0,
                "state": tmp_path / "s.sqlite", "mode": "bulk"}
        created = load_files([registry], Settings(**base, report_dir=tmp_path / "r1")).states["created"]
        # A run killed after its import was answered: the batch is open, its job id known (one the API forgot).
        with sqlite3.connect(tmp_path / "s.sqlite") as db:
            db.execute("INSERT INTO bulk_batches (batch_id, kind, run_id, job_id, keys, submitted_at)"
                       " VALUES ('b-killed', 'immunization', 'run-killed', 'job_unknown', '[]', 0)")
        pools.clear()
        again = load_files([registry], Settings(**base, report_dir=tmp_path / "r2"))
    assert len(pools) == 1 and again.summary["requests"] >= 1  # the job was asked about
    assert again.states["skipped"] == created
    with sqlite3.connect(tmp_path / "s.sqlite") as db:
        assert db.execute("SELECT finished_at FROM bulk_batches WHERE batch_id = 'b-killed'").fetchone()[0] is not None


def test_skipped_and_unsent_counts_what_a_load_will_send(tmp_path: Path) -> None:
    with StateStore(tmp_path / "s.sqlite", target="https://api.example.test") as state:
        state.mark_pending("patient", [(k, "h") for k in ("same", "moved", "unknown", "failed")], "run1")
        state.record_outcomes([
            Record("patient", "same", "created", resource_id="pat_1"),
            Record("patient", "moved", "created", resource_id="pat_2"),
            Record("patient", "unknown", "unknown"), Record("patient", "failed", "failed", http_status=422),
        ])
        creates = pl.DataFrame(
            [("patient", "same", "h"), ("patient", "moved", "h2"), ("patient", "unknown", "h"),
             ("patient", "failed", "h"), ("patient", "new", "h"), ("immunization", "new", "h")],
            schema={"kind": pl.String, "source_key": pl.String, "body_hash": pl.String}, orient="row",
        )
        skipped, unsent = skipped_and_unsent(state, creates)
        assert skipped.rows() == [("patient", "same", "pat_1")] == created_unchanged(state, creates).rows()
        # Not held as created: unknown, failed and the two new ones ("moved" is created: patched, not sent).
        assert unsent == 4
        twice = pl.concat([creates, creates.head(1)])  # a key planned twice: one result, as the loader's dict
        assert skipped_and_unsent(state, twice)[0].rows() == [("patient", "same", "pat_1")]


def _indexes(path: Path) -> set[str]:
    with sqlite3.connect(path) as db:
        return {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'index'")}


def test_a_kind_read_whole_gives_every_record_as_stored(tmp_path: Path) -> None:
    """A re-import reads a kind's records whole (from an index of their own, as JSON arrays split by polars):
    each key as it was written, odd characters and missing values included; a kind with none is empty."""
    path = tmp_path / "s.sqlite"
    keys = ["plain", "with\x00nul", 'quote" and \\ backslash', "line\nbreak", "ünï😀", "no-id"]
    with StateStore(path, target="https://api.example.test") as state:
        state.mark_pending("patient", [(k, f"h-{i}") for i, k in enumerate(keys)], "run1", source_file="a.csv")
        state.record_outcomes([Record("patient", k, "created", resource_id=None if k == "no-id" else f"pat_{i}")
                               for i, k in enumerate(keys)])
    with sqlite3.connect(path) as db:  # a store from before the index: it is made on open
        db.execute("DROP INDEX records_kept")
    assert "records_kept" not in _indexes(path)
    with StateStore(path, target="https://api.example.test") as state:
        asked = pl.Series([*keys, "never-stored"])
        got = state.stored("patient", asked, columns=("state", "resource_id", "body_hash", "source_file"))
        records = state.get("patient", keys)
        assert sorted(got.rows()) == sorted(
            (k, r.state, r.resource_id, r.body_hash, "a.csv") for k, r in records.items()
        )
        assert len(records) == len(keys) and got.height == len(keys)
        assert state.stored("immunization", pl.Series(["x"]), columns=("state",)).height == 0
    assert "records_kept" in _indexes(path)


def test_a_dry_run_over_the_state_store_previews_what_the_load_then_does(tmp_path: Path) -> None:
    # A newcomer's dry run after a load planned every row again (19 POSTs) while the load sent none.
    import json

    registry, text = _registry(tmp_path)
    with SandboxServer(SandboxConfig()) as server:
        base = {"base_url": server.base_url, "api_key": server.api_key, "consistency_window": 0,
                "state": tmp_path / "s.sqlite"}
        first = load_files([registry], Settings(**base, report_dir=tmp_path / "r1"))
        # The next week's export: one lot corrected, one new dose of a new patient.
        lines = text.splitlines()
        new = (lines[1].replace("VX-000001,", "VX-900001,", 1).replace("P-10002,", "P-90002,", 1)
               .replace("Dorothy,Mitchell,", "Zelda,Quinn,", 1))  # someone else: matching finds no one
        assert new != lines[1]
        registry.write_text(text.replace(",JS4841AA,", ",JS4841AB,", 1) + new + "\n", encoding="utf-8")
        preview = load_files([registry], Settings(**base, dry_run=True, report_dir=tmp_path / "d"))
        states = preview.rows.get_column("state").value_counts().rows()
        assert dict(states) == {"skipped": first.states["created"] - 1, "changed": 1, "planned": 1,
                                "rejected": first.states["rejected"]}
        sent = [json.loads(line) for line in (tmp_path / "d" / "payloads.ndjson").read_text("utf-8").splitlines()]
        assert sorted((s["kind"], s["source_key"]) for s in sent) == [("immunization", "VX-900001"),
                                                                      ("patient", "P-90002")]
        assert sent[-1]["body"]["patientId"] == "patient:P-90002"  # readable, as a first dry run's
        skipped = preview.rows.filter(pl.col("state") == "skipped")
        assert set(skipped.get_column("message")) == {"created by an earlier run"}
        assert skipped.get_column("resource_id").null_count() == 0
        load = load_files([registry], Settings(**base, report_dir=tmp_path / "r2"))
        by_row = dict(zip(load.rows["source_row"], load.rows["state"], strict=True))
        for row, state in zip(preview.rows["source_row"], preview.rows["state"], strict=True):
            assert by_row[row] == ("created" if state == "planned" else state), row
        assert load.summary["creates_sent"] == len(sent)
