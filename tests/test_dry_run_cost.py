"""What a dry run adds to validate: only what its payloads.ndjson needs, the same lines as ever.

A dry run's bodies are never sent: it hashes none of them (only a load's state store compares hashes),
and it plans them with their references as its lines show them (``<kind>:<source id>``), rather than
placeholders replaced in a pass over every body when the lines are written.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import polars as pl
import pytest

import etl.transform
from etl.mapping import apply_profile, default_profile
from etl.pipeline import load_files
from etl.plan import Run, planned_in_batches, validate_in_batches
from etl.progress import as_progress
from etl.readers import read_table
from etl.settings import Settings
from etl.transform import REF_PATTERN, plan, readable_refs, readable_refs_column
from etl.validate import validate

from .conftest import SAMPLE, head_records

# Source ids as real exports spell them: plain, accented, a quote, a backslash, a tab, CJK, long.
HAZARD_IDS = ["P-1", "Zoë-7", 'O"Brien', "a\\b", "x\ty", "日本-1", "L" * 95, "", "sp ace/slash:colon"]


def _visits(tmp_path: Path, practitioners: list[str] = HAZARD_IDS) -> Path:
    """An encounters file whose patient ids carry every hazard of :data:`HAZARD_IDS`, and whose provider and
    participant ids are ``practitioners`` (by default, the hazards too)."""
    path = tmp_path / "visits.csv"
    with path.open("w", encoding="utf-8", newline="") as fh:
        out = csv.writer(fh)
        out.writerow(["Visit ID", "Patient ID", "Provider ID", "Participants", "Status", "Visit Type", "Start", "End",
                      "Location"])
        for i, source_id in enumerate(HAZARD_IDS):
            one, other = (practitioners[(i + n) % len(practitioners)] or "PRV-101" for n in (3, 5))
            out.writerow([f"V-{i}", source_id or "P-0", one, f"{one};{other}", "finished", "wellness",
                          "2019-02-12T11:15:00", "2019-02-12T11:45:00", "Room 6"])
    return path


def _registry(tmp_path: Path) -> Path:
    """The sample registry, its patient ids replaced by :data:`HAZARD_IDS` in turn."""
    with (SAMPLE / "registry.csv").open(encoding="utf-8", newline="") as fh:
        rows = list(csv.reader(fh))
    path = tmp_path / "registry.csv"
    with path.open("w", encoding="utf-8", newline="") as fh:
        out = csv.writer(fh)
        out.writerow(rows[0])
        for i, row in enumerate(rows[1:]):
            out.writerow([row[0], HAZARD_IDS[i % len(HAZARD_IDS)] or row[1], *row[2:]])
    return path


def _written_as_itself(source_id: str) -> bool:
    """Whether JSON (as json.dumps writes it) spells the id as it is: printable ASCII, no quote nor backslash."""
    return json.dumps(source_id) == f'"{source_id}"'


def test_readable_bodies_are_the_placeholder_bodies_made_readable(tmp_path: Path) -> None:
    mapped = apply_profile(read_table(_visits(tmp_path)), default_profile())
    validation = validate(mapped)
    assert validation.rejects.is_empty(), validation.rejects.to_dicts()
    sent = plan(mapped, validation.valid).rows.get_column("body")
    shown = plan(mapped, validation.valid, readable=True).rows.get_column("body")
    assert len(sent) == len(HAZARD_IDS)
    # What a dry run writes of either is the same text, a body at a time as readable_refs makes it.
    assert readable_refs_column(shown).to_list() == [readable_refs(b) for b in sent.to_list()]
    # Built as they are: a placeholder is left only for an id that JSON does not write as itself.
    left = {bytes.fromhex(m.group(2)).decode() for b in shown.to_list() for m in REF_PATTERN.finditer(b)}
    assert left == {i for i in HAZARD_IDS if not _written_as_itself(i)}
    assert shown.str.contains('"patientId":"patient:P-1"', literal=True).any()
    assert all(REF_PATTERN.search(b) for b in sent.to_list())  # what a load plans keeps its placeholders


def test_a_dry_run_hashes_no_body_and_a_load_plan_hashes_every_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    hashed: list[list[str]] = []
    real = etl.transform.sha256_hex

    def counted(expr: pl.Expr) -> pl.Expr:
        hashed.append(expr.meta.root_names())
        return real(expr)

    monkeypatch.setattr(etl.transform, "sha256_hex", counted)
    settings = Settings(state=tmp_path / "s.sqlite", report_dir=tmp_path / "r", batch_rows=40)
    progress = as_progress(None)

    def creates(run: Run) -> pl.DataFrame:
        assert run.keys.payloads is not None
        return pl.concat([f for _, frames in run.keys.payloads.stages() for f in frames])

    # (a dry run previewing matching: its creates keep their bodies, for matching to read)
    with planned_in_batches([SAMPLE / "registry.csv"], settings, progress, payloads=True, dry_run=True,
                            matcher=lambda run: None) as run:
        dry = creates(run)
    assert dry.height > 100 and dry.get_column("body").null_count() == 0
    assert dry.get_column("body_hash").null_count() == dry.height  # none computed...
    assert not [names for names in hashed if "body" in names]  # ...not even to be dropped
    load_files([SAMPLE / "registry.csv"], settings.model_copy(update={"dry_run": True}))  # the plain dry run
    assert (tmp_path / "r" / "payloads.ndjson").read_text(encoding="utf-8").count("\n") == dry.height
    assert not [names for names in hashed if "body" in names]

    with planned_in_batches([SAMPLE / "registry.csv"], settings, progress, payloads=True) as run:  # a load's plan
        load = creates(run)
    assert load.height == dry.height
    assert [names for names in hashed if "body" in names]
    assert load.get_column("body_hash").null_count() == 0
    assert load.get_column("body_hash").to_list() == load.select(real(pl.col("body"))).to_series().to_list()


@pytest.mark.parametrize("redact", [False, True], ids=["plain", "redacted"])
def test_a_dry_run_writes_the_lines_that_placeholder_bodies_give(tmp_path: Path, redact: bool) -> None:
    # The same run twice: bodies planned readable (a dry run), and with their placeholders (what a dry run
    # that previews matching plans, matching reading them): byte for byte the same payloads.ndjson.
    inputs = [SAMPLE / "providers.csv", _registry(tmp_path), _visits(tmp_path, ["PRV-101", "PRV-102", "PRV-103"]),
              SAMPLE / "tasks.csv",
              SAMPLE / "documents.csv"]
    written = []
    for matcher in (None, lambda run: None):
        folder = tmp_path / ("placeholders" if matcher else "readable")
        settings = Settings(dry_run=True, state=tmp_path / "s.sqlite", report_dir=folder, redact=redact,
                            batch_rows=25)
        validate_in_batches(inputs, settings, as_progress(None), payloads=True, matcher=matcher)
        written.append((folder / "payloads.ndjson").read_bytes())
    readable, placeholders = written
    assert readable == placeholders
    lines = [json.loads(line) for line in readable.decode("utf-8").splitlines()]
    assert {line["kind"] for line in lines} >= {"patient", "immunization", "encounter", "task", "document"}
    shown = {line["body"].get("patientId") for line in lines}
    assert {"patient:Zoë-7", 'patient:O"Brien', "patient:a\\b", "patient:日本-1", "patient:" + "L" * 95} <= shown
    assert b"@@" not in readable



def test_a_person_is_planned_from_the_first_row_that_describes_it_with_or_without_bodies(tmp_path: Path) -> None:
    # The first row that describes a patient (or names a performer) is its create (a later row's spelling of a
    # performer is not mixed in); validate (keys only) plans the same people from the same rows.
    path = tmp_path / "registry.csv"
    path.write_text(
        "Record ID,Patient ID,First Name,Last Name,DOB,Phone,CVX,Admin Date,Vaccinator NPI,Vaccinator\n"
        "R1,P1,,,,,08,2021-01-02,,\n"
        "R2,P1,Ann,Lee,2015-03-04,,08,2021-02-02,1234567893,Maria de la Cruz\n"
        "R3,P1,Ann,Lee,2015-03-04,,08,2021-03-02,1234567893,M. Cruz\n"
        "R4,P2,Bob,Ray,2014-01-01,(212) 555-0197,08,2021-03-02,,\n",
        encoding="utf-8",
    )
    mapped = apply_profile(read_table(path), default_profile())
    validation = validate(mapped)
    assert validation.rejects.is_empty(), validation.rejects.to_dicts()
    full = plan(mapped, validation.valid, readable=True, hashes=False)
    keys = plan(mapped, validation.valid, bodies=False)
    assert full.patients.select("patient_key", "__row").rows() == [("P1", 3), ("P2", 5)]
    assert full.practitioners.select("practitioner_key", "__row").rows() == [("npi:1234567893", 3)]
    ann = json.loads(full.patients.get_column("body")[0])
    assert ann["firstName"] == "Ann" and "phone" not in ann
    assert json.loads(full.practitioners.get_column("body")[0])["firstName"].startswith("Maria")  # not "M."
    for people in ("patients", "practitioners"):
        with_bodies, keys_only = getattr(full, people), getattr(keys, people)
        assert keys_only.drop("body", "body_hash").equals(with_bodies.drop("body", "body_hash"))
        assert keys_only.get_column("body").null_count() == keys_only.height


def test_lines_of_rows_rejected_at_the_end_of_their_stage_are_left_out_wherever_they_are(tmp_path: Path) -> None:
    # A dry run's lines are written as its batches go; a visit naming a patient that no file of the run has is
    # rejected at the end of its stage, after its batch's lines: left out, whether last, first or alone in its batch.
    path = tmp_path / "visits.csv"
    with path.open("w", encoding="utf-8", newline="") as fh:
        out = csv.writer(fh)
        out.writerow(["Visit ID", "Patient ID", "Provider ID", "Status", "Visit Type", "Start", "End", "Location"])
        for i in range(10):
            patient = f"P-NOWHERE-{i}" if i in (0, 2, 5, 8, 9) else "P-10002"
            out.writerow([f"V-{i}", patient, "PRV-101", "finished", "wellness", "2019-02-12T11:15:00",
                          "2019-02-12T11:45:00", "Room 6"])
    # The registry's first 30 records (patient P-10002's among them) in batches of 3 rows: the whole 560 took a
    # minute, and the visits file is what is at stake.
    inputs = [SAMPLE / "providers.csv", head_records(SAMPLE / "registry.csv", 30, tmp_path / "registry.csv"), path]
    written = []
    for matcher in (None, lambda run: None):  # lines as the batches go; bodies joined at the end (as before)
        folder = tmp_path / ("joined" if matcher else "lines")
        settings = Settings(dry_run=True, state=tmp_path / "s.sqlite", report_dir=folder, batch_rows=3)
        validate_in_batches(inputs, settings, as_progress(None), payloads=True, matcher=matcher)
        written.append((folder / "payloads.ndjson").read_text(encoding="utf-8"))
        rows = pl.read_csv(folder / "rows.csv").filter(pl.col("source_file") == str(path))
        assert rows.filter(pl.col("state") == "rejected").get_column("source_row").to_list() == [2, 4, 7, 10, 11]
    lines, joined = written
    assert lines == joined
    visits = [json.loads(line) for line in lines.splitlines() if '"kind": "encounter"' in line]
    assert [v["source_key"] for v in visits] == ["V-1", "V-3", "V-4", "V-6", "V-7"]
    assert {json.loads(line)["kind"] for line in lines.splitlines()} == {"practitioner", "patient", "immunization",
                                                                        "encounter"}
