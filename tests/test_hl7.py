"""HL7 v2.5.1 VXU messages as an input: read by content, one row per RXA, mapped, checked and loaded.

The files under tests/fixtures/hl7/ are written by ``make_fixtures.py`` beside them (made-up people,
shaped like the CDC / NIST immunization test messages).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import httpx
import polars as pl
import pytest

from etl.errors import InputError
from etl.hl7 import COLUMNS
from etl.mapping import apply_profile, default_profile, load_profile, starter_profile
from etl.pipeline import load_files, validate_files
from etl.readers import ROW, read_batches, read_table
from etl.sandbox import SandboxConfig, SandboxServer
from etl.sandbox.redox import receipts
from etl.settings import Settings
from etl.validate import validate

from .conftest import ROOT

HL7 = ROOT / "tests" / "fixtures" / "hl7"
REDOX_TOKEN = "rdx_test_hl7fixture0123456789"


def _rxa_lines(path: Path) -> list[int]:
    """The line number of each RXA segment, read independently of the reader."""
    text = path.read_bytes().decode("utf-8")
    lines = re.split(r"\r\n|\r|\n", text)
    return [n for n, line in enumerate(lines, start=1) if line.startswith("RXA|")]


def _by_row(rows: pl.DataFrame) -> dict[int, dict[str, Any]]:
    return {int(r["source_row"]): r for r in rows.iter_rows(named=True)}


def _get(server: SandboxServer, route: str) -> list[dict[str, Any]]:
    response = httpx.get(f"{server.base_url}{route}", params={"count": 100}, headers={"x-api-key": server.api_key})
    response.raise_for_status()
    page = response.json()["data"]
    return list(page["data"])


# -- reading ---------------------------------------------------------------------------


def test_a_file_is_read_as_hl7_by_its_content_whatever_its_name(tmp_path: Path) -> None:
    for name in ("export.txt", "export.csv", "export"):
        copy = tmp_path / name
        copy.write_bytes((HL7 / "nist_style.hl7").read_bytes())
        table = read_table(copy)
        assert table.format == "hl7" and table.frame.height == 1
    # A pipe-delimited CSV is still a CSV.
    csv = tmp_path / "pipes.csv"
    csv.write_text("MRN|CVX|Date\nM1|08|2024-01-02\n", encoding="utf-8")
    assert read_table(csv).format == "csv"


def test_segments_may_end_in_cr_lf_or_crlf_and_rows_are_the_lines_of_their_rxa(tmp_path: Path) -> None:
    text = (HL7 / "actions.hl7").read_text(encoding="utf-8")
    frames = []
    for name, ending in (("cr", "\r"), ("lf", "\n"), ("crlf", "\r\n")):
        path = tmp_path / f"{name}.hl7"
        path.write_bytes(text.replace("\n", ending).encode("utf-8"))
        table = read_table(path)
        assert table.frame.get_column(ROW).to_list() == _rxa_lines(path)
        frames.append(table.frame)
    assert frames[0].equals(frames[1]) and frames[1].equals(frames[2])


def test_escape_sequences_are_decoded() -> None:
    row = read_table(HL7 / "actions.hl7").frame.row(0, named=True)
    assert row["PID-5.2"] == "Siobhán"  # \XE1\
    assert row["PID-11.1"] == "2 Mill Rd | Unit 4 & Annex"  # \F\ and \T\
    assert row["PID-11.3"] == "Ennis^Clare~Co\\"  # \S\, \R\ and \E\


def test_one_row_per_rxa_across_messages_and_batch_wrappers() -> None:
    table = read_table(HL7 / "redacted_33.hl7")  # FHS/BHS ... BTS/FTS around 33 messages
    assert table.frame.height == 33 and table.frame["MSH-10"].n_unique() == 33
    actions = read_table(HL7 / "actions.hl7").frame
    # The first message holds two doses, each with its own ORC; the patient is the message's.
    assert actions["ORC-3"].to_list() == ["AC-1", "AC-2", "AC-3", "AC-1", "AC-2"]
    assert actions["MSH-10"][0] == actions["MSH-10"][1] and actions["PID-3"][0] == actions["PID-3"][1]


def test_the_fields_of_a_dose_are_read_from_their_positions() -> None:
    row = read_table(HL7 / "nist_style.hl7").frame.row(0, named=True)
    assert row["PID-3"] == "NT48210"  # the MR identifier, not the SSN repetition beside it
    assert (row["PID-5.1"], row["PID-5.2"], row["PID-7"], row["PID-8"]) == ("Vasquez-Holm", "Tobias", "2018-04-17", "M")
    assert (row["PID-11.3"], row["PID-11.5"], row["PID-13"]) == ("Lansing", "48933", "5175550142")
    assert (row["PID-10"], row["PID-22"]) == ("2106-3", "2186-5")
    assert row["ORC-3"] == "ORD-90003" and row["ORC-12"] == "1215947536"
    assert (row["RXA-3"], row["RXA-5"], row["RXA-6"], row["RXA-7"]) == ("2024-02-12", "133", "0.5", "mL")
    assert (row["RXA-9"], row["RXA-10"], row["RXA-10 name"]) == ("00", "1972553015", "Maren Lindqvist")
    assert (row["RXA-15"], row["RXA-16"], row["RXA-17"]) == ("Y83KX9", "2025-06-30", "PFR")
    assert (row["RXA-20"], row["RXA-21"], row["RXR-1"], row["RXR-2"]) == ("CP", "A", "C28161", "RT")
    assert (row["OBX-5 30973-2"], row["OBX-5 64994-7"], row["OBX-5 29768-9"]) == ("2", "V02", "2021-08-06")


def test_hl7_date_times_become_iso_and_a_bad_one_stays_as_written(tmp_path: Path) -> None:
    text = (HL7 / "nist_style.hl7").read_text(encoding="utf-8")
    for written, read in (
        ("202402121530", "2024-02-12T15:30:00"),
        ("20240212153045-0500", "2024-02-12T15:30:45-05:00"),
        ("20240212", "2024-02-12"),
        ("202402", "202402"),
        ("2024-02-12", "2024-02-12"),
    ):
        path = tmp_path / "one.hl7"
        path.write_text(text.replace("|20240212||133", f"|{written}||133"), encoding="utf-8")
        assert read_table(path).frame["RXA-3"][0] == read, written
    for written, read in (("20180417", "2018-04-17"), ("201804171230-0500", "2018-04-17"), ("2018", "2018")):
        path.write_text(text.replace("|20180417|M|", f"|{written}|M|"), encoding="utf-8")
        assert read_table(path).frame["PID-7"][0] == read, written


def test_an_acknowledgement_gives_no_row_and_a_notice_names_its_line() -> None:
    table = read_table(HL7 / "actions.hl7")
    notice = next(n for n in table.notices if n.code == "message-without-dose")
    assert notice.row == 36 and "line(s) 36" in notice.message


def test_a_segment_before_any_msh_is_an_input_error_naming_its_line(tmp_path: Path) -> None:
    path = tmp_path / "broken.hl7"
    path.write_text("MSH|^~\\&|A|B\nPID|1||X^^^^MR\n", encoding="utf-8")
    assert read_table(path).frame.height == 0
    path.write_text("FHS|^~\\&|A\nPID|1||X^^^^MR\nMSH|^~\\&|A|B\n", encoding="utf-8")
    with pytest.raises(InputError) as caught:
        read_table(path)
    assert caught.value.row == 2 and "before any MSH" in str(caught.value)
    path.write_text("MSH|^~\\&|A|B\nRXA|0|1|20240101\nMSH|^^^^|A\n", encoding="utf-8")
    with pytest.raises(InputError) as caught:
        read_table(path)
    assert caught.value.row == 3 and "not five distinct" in str(caught.value)


def test_read_in_batches_keeps_the_line_numbers() -> None:
    batches = read_batches(HL7 / "redacted_33.hl7", rows=10, stream_from=1)
    assert batches.table.format == "hl7"
    rows = [r for b in batches.batches for r in b.get_column(ROW).to_list()]
    assert rows == _rxa_lines(HL7 / "redacted_33.hl7")


def test_a_second_rxa_without_its_own_orc_has_no_record_id_and_an_ssn_is_never_the_patient_id(
    tmp_path: Path,
) -> None:
    lines = (HL7 / "nist_style.hl7").read_bytes().decode("utf-8").split("\r\n")
    rxa = next(line for line in lines if line.startswith("RXA|"))
    pid = next(line for line in lines if line.startswith("PID|"))
    ssn_only = pid.replace("NT48210^^^CLINIC-7^MR~", "")
    path = tmp_path / "two.hl7"
    path.write_text("\n".join(ssn_only if line == pid else line for line in lines) + f"{rxa}\n", encoding="utf-8")
    frame = read_table(path).frame
    assert frame["ORC-3"].to_list() == ["ORD-90003", None]
    assert frame["PID-3"].to_list() == [None, None]


def test_docs_list_every_column_the_reader_gives() -> None:
    docs = (ROOT / "docs" / "hl7.md").read_text(encoding="utf-8")
    profile = load_profile("hl7")
    for column in COLUMNS:
        line = next((x for x in docs.splitlines() if x.startswith(f"| `{column}` |")), None)
        assert line is not None, column
        if column in profile.columns:
            assert f"`{profile.columns[column]}`" in line, line


# -- mapping and validation ------------------------------------------------------------


def test_the_mapping_needs_no_profile_and_names_what_it_does_not_carry() -> None:
    table = read_table(HL7 / "nist_style.hl7")
    mapped = apply_profile(table, default_profile())
    assert mapped.kind == "immunization" and mapped.profile.name == "hl7"
    assert mapped.sources["vaccine_code"] == "RXA-5" and mapped.sources["patient_id"] == "PID-3"
    assert mapped.sources["route"] == "RXR-1" and mapped.sources["dose_number"] == "OBX-5 30973-2"
    unmapped = next(n for n in table.notices if n.code == "unmapped-columns").message
    for column in ("PID-10", "PID-22", "ORC-12", "RXA-11", "OBX-5 64994-7", "OBX-5 30963-3", "OBX-5 69764-9"):
        assert column in unmapped
    assert "RXA-21" not in unmapped  # it decides the row's state


def test_a_starter_profile_for_an_hl7_file_starts_from_the_built_in_mapping() -> None:
    text = starter_profile(read_table(HL7 / "nist_style.hl7"))
    assert '"RXA-5" = "vaccine_code"' in text and '"ORC-3" = "record_id"' in text
    assert '# "PID-10" = ?  # not mapped' in text


def test_33_redacted_messages_validate_with_no_profile_flagged_only_for_redaction(tmp_path: Path) -> None:
    report = validate_files([HL7 / "redacted_33.hl7"], Settings(report_dir=tmp_path / "r"))
    rows = report.rows
    assert rows.height == 33 and set(rows["kind"]) == {"immunization"}
    assert rows["source_row"].cast(pl.Int64).to_list() == _rxa_lines(HL7 / "redacted_33.hl7")
    assert set(rows["error_code"]) == {"redacted"}
    # Every reason names a redacted name or street, and redaction is all it says (a placeholder draws no
    # length, format or conflict flag).
    for message in rows["message"]:
        for reason in message.split("; "):
            column, code = reason.split(" (")[0].rsplit(" ", 1)
            assert column in {"PID-5.1", "PID-5.2", "PID-11.1"} and code == "redacted", reason
    assert [w["code"] for w in report.summary["warnings"]] == ["unmapped-columns"]  # no flag but redaction


def test_planted_defects_are_flagged_on_the_line_of_their_rxa(tmp_path: Path) -> None:
    path = HL7 / "planted.hl7"
    report = validate_files([path], Settings(report_dir=tmp_path / "r"))
    lines = _rxa_lines(path)
    rows = _by_row(report.rows)
    assert sorted(rows) == lines
    expected = {
        1: ("RXA-3", "date-format"),  # 20231345
        2: ("RXA-3", "date-format"),  # 202306: a partial date
        3: ("RXA-5", "required"),  # no CVX
        5: ("RXA-3", "occurrence-before-birth"),
        6: ("RXA-3", "future-date"),
        7: ("RXA-16", "date-format"),  # 2026: a partial expiration date
    }
    for index, line in enumerate(lines):
        row = rows[line]
        if index in expected:
            column, code = expected[index]
            assert row["state"] == "rejected" and f"{column} {code}" in row["message"], (line, row["message"])
        else:
            assert row["state"] == "planned" and row["message"] is None, (line, row["message"])
    assert "PID-7 future-date" in rows[lines[6]]["message"]
    assert report.exit_code() == 1


def test_a_refusal_is_not_done_with_its_reason_and_updates_and_deletes_follow_rxa_21(tmp_path: Path) -> None:
    path = HL7 / "actions.hl7"
    mapped = apply_profile(read_table(path), default_profile())
    valid = validate(mapped).valid
    refused = valid.filter(pl.col("record_id") == "AC-3").row(0, named=True)
    assert (refused["status"], refused["status_reason"], refused["dose_value"]) == (
        "not-done", "Parental decision", None
    )
    report = validate_files([path], Settings(report_dir=tmp_path / "r"))
    rows = _by_row(report.rows)
    first, second, refusal, update, delete = _rxa_lines(path)
    # The update of AC-1 is the version sent; the dose it replaces is skipped, naming the update's line.
    assert rows[first]["state"] == "skipped" and rows[first]["error_code"] == "superseded-in-source"
    assert f"line {update}" in rows[first]["message"] and rows[first]["field"] == "RXA-21"
    assert rows[update]["state"] == "planned" and rows[update]["source_key"] == "AC-1"
    # A delete is skipped by default, and so is the dose it deletes.
    assert rows[second]["state"] == "skipped" and f"line {delete}" in rows[second]["message"]
    assert rows[delete]["state"] == "skipped" and rows[delete]["error_code"] == "deleted-in-source"
    assert rows[refusal]["state"] == "planned"
    assert report.exit_code() == 0


def test_a_dose_without_an_orc_3_is_rejected_naming_it_rather_than_sent_unkeyed(tmp_path: Path) -> None:
    lines = (HL7 / "nist_style.hl7").read_bytes().decode("utf-8").split("\r\n")
    path = tmp_path / "no-orc.hl7"
    path.write_text("\r".join(line for line in lines if not line.startswith("ORC|")), encoding="utf-8")
    row = validate_files([path], Settings(report_dir=tmp_path / "r")).rows.row(0, named=True)
    assert (row["state"], row["error_code"], row["field"]) == ("rejected", "required", "ORC-3")


def test_a_profile_can_reject_deletes(tmp_path: Path) -> None:
    profile = tmp_path / "strict.toml"
    profile.write_text('name = "strict"\nhl7_deletes = "reject"\n', encoding="utf-8")
    report = validate_files([HL7 / "actions.hl7"], Settings(report_dir=tmp_path / "r", profile=str(profile)))
    delete = _by_row(report.rows)[_rxa_lines(HL7 / "actions.hl7")[-1]]
    assert (delete["state"], delete["error_code"]) == ("rejected", "deleted-in-source")
    assert report.exit_code() == 1
    profile.write_text('name = "bad"\nhl7_deletes = "ignore"\n', encoding="utf-8")
    with pytest.raises(Exception, match="hl7_deletes"):
        load_profile(profile)


def test_a_profile_overrides_the_mapping_of_a_field_by_its_position(tmp_path: Path) -> None:
    profile = tmp_path / "mine.toml"
    profile.write_text(
        'name = "mine"\n[columns]\n"MSH-10" = "record_id"\n"RXA-5 NDC" = "vaccine_display"\n', encoding="utf-8"
    )
    mapped = apply_profile(read_table(HL7 / "nist_style.hl7"), load_profile(profile))
    assert mapped.sources["record_id"] == "MSH-10" and mapped.sources["vaccine_display"] == "RXA-5 NDC"
    assert mapped.sources["vaccine_code"] == "RXA-5"  # the rest of the built-in mapping stays
    assert mapped.frame["record_id"].to_list() == ["CLK-00003"]


# -- both destinations -------------------------------------------------------------------


def test_a_nist_style_message_loads_one_patient_and_one_dose_with_lot_route_and_site(tmp_path: Path) -> None:
    # responses="simple": the sandbox answers with the create bodies it got, which is what this test reads.
    with SandboxServer(SandboxConfig(responses="simple")) as server:
        settings = Settings(
            base_url=server.base_url, api_key=server.api_key, consistency_window=0,
            state=tmp_path / "s.sqlite", report_dir=tmp_path / "r",
        )
        report = load_files([HL7 / "nist_style.hl7"], settings)
        assert report.states.get("created") == 1 and report.exit_code() == 0
        patients = _get(server, "/v1/patients")
        doses = _get(server, "/v1/immunizations")
    assert len(patients) == 1 and len(doses) == 1
    assert (patients[0]["firstName"], patients[0]["lastName"]) == ("Tobias", "Vasquez-Holm")
    dose = doses[0]
    assert dose["lotNumber"] == "Y83KX9" and dose["vaccineCode"]["code"] == "133"
    assert (dose["route"], dose["site"], dose["occurrenceDateTime"]) == ("IM", "RT", "2024-02-12")
    assert dose["protocolApplied"] == [{"doseNumber": 2}] and dose["primarySource"] is True
    assert dose["patientId"] == patients[0]["id"]


def test_clinikapi_and_redox_receive_the_same_doses(tmp_path: Path) -> None:
    files = [HL7 / "actions.hl7", HL7 / "nist_style.hl7"]
    # responses="simple": ClinikAPI's answers are the create bodies it got, compared with Redox's bundles.
    with SandboxServer(SandboxConfig(redox_tokens=(REDOX_TOKEN,), responses="simple")) as server:
        clinik = load_files(files, Settings(
            base_url=server.base_url, api_key=server.api_key, consistency_window=0,
            state=tmp_path / "c.sqlite", report_dir=tmp_path / "c",
        ))
        redox = load_files(files, Settings(
            target="redox", redox_base_url=server.base_url, redox_token=REDOX_TOKEN,
            redox_destination_slug="clinic-dest", state=tmp_path / "r.sqlite", report_dir=tmp_path / "r",
        ))
        doses = _get(server, "/v1/immunizations")
        bundles = server.sandbox.store.search("redox:Immunization/$write", {}, limit=100).items
        assert receipts(server.sandbox.store) == len(bundles)
    sent = clinik.rows.filter(pl.col("state") == "created").filter(pl.col("kind") == "immunization")
    assert sorted(sent["source_key"]) == ["AC-1", "AC-3", "ORD-90003"]
    assert clinik.rows.select("source_row", "state").equals(redox.rows.select("source_row", "state"))
    immunizations = [
        e["resource"] for b in bundles for e in b["bundle"]["entry"] if e["resource"]["resourceType"] == "Immunization"
    ]
    def coded(value: Any) -> str | None:
        return None if value is None else str(value["coding"][0]["code"])

    via_redox = sorted(
        (i["identifier"][0]["value"], coded(i["vaccineCode"]), i.get("lotNumber"), i["status"], coded(i.get("site")))
        for i in immunizations
    )
    assert [key for key, *_ in via_redox] == ["AC-1", "AC-3", "ORD-90003"]
    via_clinik = sorted(
        (d["vaccineCode"]["code"], d.get("lotNumber"), d["status"], d.get("site")) for d in doses
    )
    assert sorted(tuple(dose[1:]) for dose in via_redox) == via_clinik
    assert ("08", "LT9", "completed", "LD") in via_clinik  # the update's lot, not the superseded dose's
    assert any(status == "not-done" for _, _, status, _ in via_clinik)
