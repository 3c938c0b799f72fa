"""The dry run's payloads.ndjson lines built over a whole part (polars) are those built one by one."""

from __future__ import annotations

import errno
import io
import json
from pathlib import Path

import polars as pl
import pytest

from etl.clinikapi import ClinikApi
from etl.destination import Destination
from etl.errors import OutputError
from etl.pipeline import load_files
from etl.readers import ROW
from etl.redox import RedoxBundles
from etl.settings import Settings
from etl.transform import readable_refs, readable_refs_column
from schemas.canonical import KIND_SPECS

from .conftest import SAMPLE

# Ids a real export carries: accents, quotes, backslashes, a newline, an empty one, one over 128 characters.
IDS = ["P-10002", "Zoë-7", 'O"Brien', "a\\b", "x\ny", "", "t" * 200, "日本-1"]


def _ref(kind: str, source_id: str) -> str:
    return f'"@@{kind}:{source_id.encode().hex()}@@"'


def _bodies() -> list[str]:
    return [
        f'{{"patientId": {_ref("patient", i)}, "performer": [{_ref("practitioner", i)}, {_ref("practitioner", "N1")}]}}'
        for i in IDS
    ] + ['{"note": "no reference"}']


def test_readable_refs_column_equals_readable_refs() -> None:
    bodies = _bodies()
    assert readable_refs_column(pl.Series(bodies)).to_list() == [readable_refs(b) for b in bodies]


def test_readable_refs_column_without_references_is_unchanged() -> None:
    bodies = pl.Series(['{"a": 1}', '{"b": "@@not a ref"}'])
    assert readable_refs_column(bodies).to_list() == bodies.to_list()


@pytest.mark.parametrize("kind", ["immunization", "patient", "practitioner"])
def test_payload_lines_equal_payload_line(kind: str) -> None:
    bodies = _bodies()
    keys = [*IDS, "tab\there"]
    lines = pl.DataFrame(
        {"kind": [kind] * len(bodies), "source_key": keys[: len(bodies)], ROW: list(range(2, len(bodies) + 2)),
         "body": bodies},
        schema_overrides={ROW: pl.UInt32},
    )
    destination = ClinikApi()
    got = destination.payload_lines(lines).to_list()
    assert got == [destination.payload_line(*row) for row in lines.iter_rows()]
    for line in got:  # each one JSON object on one line
        assert line.endswith("\n") and "\n" not in line[:-1]
        assert json.loads(line)["kind"] == kind


@pytest.mark.parametrize(
    "destination", [ClinikApi(), RedoxBundles(Settings(), "/fhir/Immunization/$write")], ids=["clinikapi", "redox"]
)
def test_written_payload_lines_are_the_payload_lines(destination: Destination) -> None:
    # payloads.ndjson is written by polars from columns (no line built): byte for byte the lines themselves.
    bodies = _bodies()
    keys = [*IDS, "tab\there"]
    lines = pl.DataFrame(
        {"kind": (["patient", "immunization"] * len(bodies))[: len(bodies)], "source_key": keys[: len(bodies)],
         ROW: list(range(2, len(bodies) + 2)), "body": bodies},
        schema_overrides={ROW: pl.UInt32},
    )
    out = io.BytesIO()
    destination.write_payload_lines(lines, out)
    expected = "".join(destination.payload_line(*row) for row in lines.iter_rows())
    assert out.getvalue().decode("utf-8") == expected
    assert out.getvalue().decode("utf-8") == "".join(destination.payload_lines(lines))
    assert out.getvalue().count(b"\n") == len(bodies)


def test_payloads_are_written_in_stage_and_row_order_whatever_part_is_built_first(tmp_path: Path) -> None:
    # The registry in batches of 37 rows: ~15 parts per stage, built two at a time, written in order.
    settings = Settings(dry_run=True, state=tmp_path / "s.sqlite", report_dir=tmp_path / "r", batch_rows=37)
    load_files([SAMPLE / "registry.csv"], settings)
    lines = [json.loads(line) for line in (tmp_path / "r" / "payloads.ndjson").read_text(encoding="utf-8").splitlines()]
    stages = [KIND_SPECS[line["kind"]].stage for line in lines]
    assert stages == sorted(stages) and len(set(stages)) > 1
    for kind in {line["kind"] for line in lines}:
        rows = [line["source_row"] for line in lines if line["kind"] == kind]
        assert rows == sorted(rows) and len(rows) == len(set(rows))
    assert sum(1 for line in lines if line["kind"] == "immunization") > 37 * 4  # many parts, more than the workers


@pytest.mark.parametrize("dry_run", [True, False], ids=["dry-run", "load"])
@pytest.mark.parametrize("batch_rows", [37, 100_000])
def test_a_full_disk_keeping_the_planned_creates_names_the_report_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, batch_rows: int, dry_run: bool
) -> None:
    # A batch's creates are written on a worker thread: its error still ends the run as the report's, one line.
    write_ipc = pl.DataFrame.write_ipc

    def full(frame: pl.DataFrame, file: Path, **kwargs: object) -> None:
        if Path(file).name.startswith("payloads-"):
            raise OSError(errno.ENOSPC, "No space left on device", str(file))
        write_ipc(frame, file, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(pl.DataFrame, "write_ipc", full)
    monkeypatch.setattr("etl.plan._HELD_BYTES", 0)  # every part written (a large run's)
    settings = Settings(dry_run=dry_run, state=tmp_path / "s.sqlite", report_dir=tmp_path / "r", batch_rows=batch_rows)
    with pytest.raises(OutputError, match="No space left on device") as raised:
        load_files([SAMPLE / "registry.csv"], settings)
    assert raised.value.path.startswith(str(tmp_path / "r"))
    assert not list((tmp_path / "r").rglob("payloads.ndjson"))


@pytest.mark.parametrize("dry_run", [True, False], ids=["dry-run", "load"])
def test_creates_held_in_memory_or_written_make_the_same_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, dry_run: bool, registry_head: Path
) -> None:
    """A run's planned creates are kept in memory up to a budget (_HELD_BYTES), the rest written to disk: the
    report and payloads.ndjson are the same whichever way each part went (the registry's first records in
    batches of 37 rows: many parts)."""
    import etl.plan

    written: list[int] = []  # the size of each part written
    write_ipc = pl.DataFrame.write_ipc

    def counted(frame: pl.DataFrame, file: Path, **kwargs: object) -> None:
        if Path(file).name.startswith("payloads-"):
            written.append(int(frame.estimated_size()))
        write_ipc(frame, file, **kwargs)  # type: ignore[arg-type]

    def run(budget: int, name: str) -> tuple[str, str, dict[str, int]]:
        monkeypatch.setattr("etl.plan._HELD_BYTES", budget)
        written.clear()
        settings = Settings(dry_run=dry_run, state=tmp_path / f"{name}.sqlite", report_dir=tmp_path / name,
                            batch_rows=37)
        report = load_files([registry_head], settings)
        rows = pl.read_csv(report.folder / "rows.csv", infer_schema=False)
        if not dry_run:  # a load's ids differ between sandboxes: its states and keys are compared
            rows = rows.select("source_row", "kind", "source_key", "state", "error_code")
        payloads = (report.folder / "payloads.ndjson").read_text(encoding="utf-8") if dry_run else ""
        return rows.write_csv(), payloads, report.summary["states"]

    default = etl.plan._HELD_BYTES
    monkeypatch.setattr(pl.DataFrame, "write_ipc", counted)
    on_disk = run(0, "disk")
    sizes = list(written)
    assert len(sizes) > 4  # many parts, each written
    in_memory = run(default, "memory")
    assert written == []  # none written
    both = run(sum(sizes) // 2, "both")
    assert 0 < len(written) < len(sizes)  # the first parts held, the later ones written
    assert on_disk == in_memory == both
