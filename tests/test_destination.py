"""The Destination interface (etl.destination): a new destination is one class, a new ClinikAPI
resource is its limits entry, its canonical fields and its body planner.

Both are proven here, in the test suite alone: a toy destination that sends each create to a
tiny HTTP endpoint on loopback, driven through the shared plan, loader, state store and report;
and a toy resource ("device") planned in a dry run.
"""

from __future__ import annotations

import contextlib
import json
import threading
from collections import Counter
from collections.abc import Iterator, Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import polars as pl
import pytest

from etl.clinikapi import ClinikApi
from etl.destination import Destination, OnResponse, Target
from etl.errors import LookupFailed, UsageError
from etl.load.client import Created, Outcome, Refused
from etl.load.loader import Client
from etl.mapping import Mapped
from etl.pipeline import load_files
from etl.progress import as_progress
from etl.readers import ROW
from etl.redox import RedoxBundles
from etl.report import FINAL_STATES, read_rows
from etl.send import load_in_batches
from etl.settings import Settings
from etl.transform import BODY_PLANNERS, Planned, register_body_planner
from schemas import limits
from schemas.canonical import KIND_SPECS, F, Kind
from schemas.limits import CREATE_SCHEMAS, RESOURCE_TYPES, ROUTES, S

from .conftest import SAMPLE

# --- a toy destination: defined here only ------------------------------------------------


class _Sink:
    """A tiny HTTP endpoint on loopback: keeps every POSTed body, answers 201 with a fresh id."""

    def __init__(self) -> None:
        self.received: list[tuple[str, dict[str, Any]]] = []
        sink = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["content-length"])))
                sink.received.append((self.path, body))
                answer = json.dumps({"id": f"toy-{len(sink.received)}"}).encode()
                self.send_response(201)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def __enter__(self) -> _Sink:
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


class _ToyClient:
    """The loader's client for the toy endpoint: a create is a POST; there is no search."""

    def __init__(self, http: httpx.AsyncClient, on_response: OnResponse | None) -> None:
        self.http, self.on_response = http, on_response
        self.requests = 0
        self.silent = 0

    async def create(self, route: str, body: bytes) -> Outcome:
        self.requests += 1
        response = await self.http.post(route, content=body, headers={"content-type": "application/json"})
        if self.on_response is not None:
            self.on_response(response.headers)
        if response.status_code == 201:
            return Created(str(response.json()["id"]))
        return Refused(response.status_code, "TOY_REFUSED", response.text)

    async def search(self, route: str, params: Mapping[str, str | int]) -> list[dict[str, Any]]:
        raise LookupFailed("the toy endpoint has no search")


class _Toy(Destination):
    """Practitioners, each as a ``{"practitioner": <ClinikAPI body>}`` document to ``/toy/practitioners``."""

    name = "Toy"
    resolves_references = False

    def __init__(self, sink: _Sink) -> None:
        self.sink = sink

    def check(self, mapped: Mapped) -> None:
        if mapped.kind != "practitioner":
            raise UsageError(f"the toy takes practitioners; {mapped.table.path} holds {mapped.kind} rows")

    def plan_batch(
        self, mapped: Mapped, valid: pl.DataFrame, planned: Planned, rows: pl.DataFrame
    ) -> tuple[pl.DataFrame, list[tuple[str, pl.DataFrame]]]:
        live = rows.filter(pl.col("state") == "planned").select("source_key")
        creates = (
            planned.rows.filter(pl.col("body").is_not_null())
            .join(live, on="source_key", how="semi")
            .select("source_key", ROW, ('{"practitioner":' + pl.col("body") + "}").alias("body"), "body_hash",
                    pl.lit(None, dtype=pl.String).alias("source_file"))
        )
        return rows, [("practitioner", creates)]

    def route(self, kind: str) -> str:
        return f"/toy/{kind}s"

    @contextlib.contextmanager
    def _opened(self) -> Iterator[Target]:
        yield Target(self.sink.url, "no-key", f"toy:{self.sink.url}", "toy")

    def open(self, settings: Settings) -> contextlib.AbstractContextManager[Target]:
        return self._opened()

    def client(
        self, http: httpx.AsyncClient, key: str, *, on_response: OnResponse | None = None,
        protocols: Counter[str] | None = None,
    ) -> Client:
        return _ToyClient(http, on_response)


def _load(toy: _Toy, tmp_path: Path, report: str) -> Any:
    settings = Settings(state=tmp_path / "toy.sqlite", report_dir=tmp_path / report, batch_rows=5)
    return load_in_batches([SAMPLE / "providers.csv"], settings, as_progress(None), destination=toy)


def test_a_toy_destination_loads_through_the_shared_loader_state_store_and_report(tmp_path: Path) -> None:
    source = pl.read_csv(SAMPLE / "providers.csv", infer_schema=False)
    with _Sink() as sink:
        toy = _Toy(sink)
        first = _load(toy, tmp_path, "r1")
        rows = read_rows(first.folder / "rows.csv")
        # Every input row has exactly one final state; none is left planned.
        assert rows.height == source.height
        assert rows.get_column("source_row").n_unique() == source.height
        assert set(rows.get_column("state")) <= set(FINAL_STATES) - {"planned"}
        created = rows.filter(pl.col("state") == "created")
        assert created.height > 0
        # One POST per created practitioner, to the toy's route, in the toy's shape; the id it answered is reported.
        assert len(sink.received) == created.get_column("source_key").n_unique()
        assert {path for path, _ in sink.received} == {"/toy/practitioners"}
        assert all(set(body) == {"practitioner"} for _, body in sink.received)
        assert set(created.get_column("resource_id")) <= {f"toy-{i}" for i in range(1, len(sink.received) + 1)}
        assert first.summary["states"]["created"] == created.height
        assert first.summary["target"] == "toy"

        sent = len(sink.received)
        again = _load(toy, tmp_path, "r2")
        # A re-run sends nothing: the shared state store, bound to the toy's identity, knows every create.
        assert len(sink.received) == sent
        rerun = read_rows(again.folder / "rows.csv")
        assert rerun.height == source.height
        assert rerun.filter(pl.col("state") == "created").is_empty()
        assert again.states.get("skipped", 0) == created.height


def test_a_destination_without_bulk_refuses_mode_bulk_by_its_flag(tmp_path: Path) -> None:
    with _Sink() as sink:
        toy = _Toy(sink)
        settings = Settings(state=tmp_path / "toy.sqlite", report_dir=tmp_path / "r", mode="bulk")
        with pytest.raises(UsageError, match="Toy has no bulk endpoint"):
            load_in_batches([SAMPLE / "providers.csv"], settings, as_progress(None), destination=toy)
        assert sink.received == []
    ClinikApi().check_mode(settings)  # ClinikAPI has bulk: no refusal


def test_the_capability_flags_of_the_two_destinations() -> None:
    clinik, redox = ClinikApi(), RedoxBundles(Settings(), "/fhir/R4/s/dev/Immunization/$write")
    assert (clinik.can_search, clinik.has_bulk, clinik.resolves_references) == (True, True, True)
    assert (redox.can_search, redox.has_bulk, redox.resolves_references) == (False, False, False)
    # No search, so no consistency window to wait before looking up an unknown outcome.
    settings = Settings(base_url="https://api.example.org", redox_base_url="https://redox.example.org",
                        consistency_window=7)
    assert clinik.load_options(settings).consistency_window == 7
    assert redox.load_options(settings).consistency_window == 0


def test_every_create_schema_has_one_route_and_one_resource_type() -> None:
    assert set(ROUTES) == set(CREATE_SCHEMAS) == set(RESOURCE_TYPES)
    assert {k.schema for k in KIND_SPECS.values()} == set(CREATE_SCHEMAS)


# --- a toy resource: its limits entry, its canonical fields, its body planner -------------


@pytest.fixture()
def device(monkeypatch: pytest.MonkeyPatch) -> str:
    """A "device" resource, registered for the test's length only."""
    schema = "DeviceCreate"
    monkeypatch.setitem(CREATE_SCHEMAS, schema, limits.O(serialNumber=S(max_length=20, required=True),
                                                         deviceName=S(max_length=50)))
    monkeypatch.setitem(ROUTES, schema, "/v1/devices")
    monkeypatch.setitem(RESOURCE_TYPES, schema, "Device")
    fields = (
        F("record_id", "text", None, "device id", required=True),
        F("serial_number", "text", schema + ":serialNumber", "serial", required=True),
        F("device_name", "text", schema + ":deviceName", "name"),
    )
    monkeypatch.setitem(KIND_SPECS, "device", Kind("device", schema, fields, 1, ("serial_number", "device_name")))
    monkeypatch.setitem(BODY_PLANNERS, "device", lambda: pl.lit(None))  # replaced below, removed after the test
    register_body_planner(
        "device", lambda: pl.struct(serialNumber=pl.col("serial_number"), deviceName=pl.col("device_name"))
    )
    return "device"


def test_a_toy_resource_is_planned_in_a_dry_run(tmp_path: Path, device: str) -> None:
    csv = tmp_path / "devices.csv"
    csv.write_text("Device ID,Serial,Name\nD-1,SN-001,Pump\nD-2,,Monitor\nD-3,SN-003,\n", encoding="utf-8")
    report = load_files([csv], Settings(dry_run=True, kind=device, state=tmp_path / "s.sqlite",
                                        report_dir=tmp_path / "r"))
    assert report.folder is not None
    rows = read_rows(report.folder / "rows.csv")
    assert rows.get_column("kind").to_list() == ["device"] * 3
    assert rows.get_column("state").to_list() == ["planned", "rejected", "planned"]
    assert rows.get_column("source_key").to_list()[0::2] == ["D-1", "D-3"]
    lines = [json.loads(line) for line in (report.folder / "payloads.ndjson").read_text().splitlines()]
    assert [(x["path"], x["source_key"], x["body"]) for x in lines] == [
        ("/v1/devices", "D-1", {"serialNumber": "SN-001", "deviceName": "Pump"}),
        ("/v1/devices", "D-3", {"serialNumber": "SN-003"}),
    ]
    assert report.summary["requests_planned"] == {"device": 2}


def test_a_destination_without_search_waits_no_search_lag_before_leaving_an_outcome_unknown() -> None:
    """A send whose answer never came stays unknown; without search there is nothing to wait for (the run
    used to wait the whole ``lag_limit``, a minute, before saying so). With search, the limit holds."""
    from etl.settings import MAX_SEARCH_LAG

    settings = Settings(base_url="https://api.example.test", consistency_window=7.0)
    redox = RedoxBundles(settings, "/fhir/R4/s/dev/Immunization/$write").load_options(settings)
    clinik = ClinikApi().load_options(settings)
    assert (redox.lag_limit, redox.consistency_window) == (0.0, 0.0)
    assert (clinik.lag_limit, clinik.consistency_window) == (MAX_SEARCH_LAG, 7.0)
    assert MAX_SEARCH_LAG > 0
