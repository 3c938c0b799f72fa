"""A complete Synthea CSV export, loaded with ``--profile synthea`` (issue 14's must-show).

:func:`write_synthea` writes an export of its own, at test time, in Synthea's real column layout
(Synthea 3's CSV exporter: patients, organizations, providers, payers, encounters, immunizations,
and files the toolkit does not import: conditions, payer_transitions). Its data is made up here,
with the hazards a real export carries: DEATHDATE, RACE and ETHNICITY; one-letter MARITAL values
and children with none; every ENCOUNTERCLASS Synthea writes, hospice and SNF included; inpatient
stays of 8 to 15 days and nursing-home and hospice stays of weeks; encounters still open (no STOP);
names with Synthea's digits and apostrophes; organizations.csv beside providers.csv.
"""

from __future__ import annotations

import csv
import datetime as dt
import io
import json
import random
import uuid
from pathlib import Path
from typing import Any

import polars as pl
import pytest
from rich.console import Console

from etl.cli import print_summary
from etl.pipeline import load_files, validate_files
from etl.settings import Settings

from .test_matching import everything
from .test_pipeline import count

PATIENTS = ("Id,BIRTHDATE,DEATHDATE,SSN,DRIVERS,PASSPORT,PREFIX,FIRST,MIDDLE,LAST,SUFFIX,MAIDEN,MARITAL,RACE,"
            "ETHNICITY,GENDER,BIRTHPLACE,ADDRESS,CITY,STATE,COUNTY,FIPS,ZIP,LAT,LON,HEALTHCARE_EXPENSES,"
            "HEALTHCARE_COVERAGE,INCOME")
ORGANIZATIONS = "Id,NAME,ADDRESS,CITY,STATE,ZIP,LAT,LON,PHONE,REVENUE,UTILIZATION"
PROVIDERS = "Id,ORGANIZATION,NAME,GENDER,SPECIALITY,ADDRESS,CITY,STATE,ZIP,LAT,LON,ENCOUNTERS,PROCEDURES"
PAYERS = ("Id,NAME,OWNERSHIP,ADDRESS,CITY,STATE_HEADQUARTERED,ZIP,PHONE,AMOUNT_COVERED,AMOUNT_UNCOVERED,REVENUE,"
          "COVERED_ENCOUNTERS,UNCOVERED_ENCOUNTERS,COVERED_MEDICATIONS,UNCOVERED_MEDICATIONS,COVERED_PROCEDURES,"
          "UNCOVERED_PROCEDURES,COVERED_IMMUNIZATIONS,UNCOVERED_IMMUNIZATIONS,UNIQUE_CUSTOMERS,QOLS_AVG,MEMBER_MONTHS")
ENCOUNTERS = ("Id,START,STOP,PATIENT,ORGANIZATION,PROVIDER,PAYER,ENCOUNTERCLASS,CODE,DESCRIPTION,"
              "BASE_ENCOUNTER_COST,TOTAL_CLAIM_COST,PAYER_COVERAGE,REASONCODE,REASONDESCRIPTION")
IMMUNIZATIONS = "DATE,PATIENT,ENCOUNTER,CODE,DESCRIPTION,BASE_COST"
CONDITIONS = "START,STOP,PATIENT,ENCOUNTER,SYSTEM,CODE,DESCRIPTION"
PAYER_TRANSITIONS = "PATIENT,MEMBERID,START_DATE,END_DATE,PAYER,SECONDARY_PAYER,PLAN_OWNERSHIP,OWNER_NAME"

#: ENCOUNTERCLASS -> (SNOMED code, description, shortest and longest stay in minutes).
CLASSES = {
    "wellness": ("410620009", "Well child visit (procedure)", 15, 45),
    "ambulatory": ("185345009", "Encounter for symptom (procedure)", 15, 60),
    "outpatient": ("185347001", "Encounter for problem (procedure)", 20, 240),
    "urgentcare": ("702927004", "Urgent care clinic (environment)", 20, 90),
    "emergency": ("50849002", "Emergency room admission (procedure)", 60, 600),
    "inpatient": ("32485007", "Hospital admission (procedure)", 1440, 15 * 1440),  # 1 to 15 days
    "snf": ("449161006", "Admission to skilled nursing facility (procedure)", 10 * 1440, 100 * 1440),
    "hospice": ("385763009", "Hospice care (regime/therapy)", 7 * 1440, 90 * 1440),
    "home": ("183452005", "Encounter for problem home visit (procedure)", 30, 90),
    "virtual": ("185316007", "Indirect encounter (procedure)", 10, 30),
}
WEIGHTS = {"wellness": 30, "ambulatory": 30, "outpatient": 12, "urgentcare": 6, "emergency": 6, "inpatient": 6,
           "snf": 2, "hospice": 2, "home": 3, "virtual": 3}
VACCINES = [("140", "Influenza, seasonal, injectable, preservative free"), ("08", "Hep B, adolescent or pediatric"),
            ("20", "DTaP"), ("10", "IPV"), ("03", "MMR"), ("21", "varicella"), ("133", "Pneumococcal conjugate PCV 13"),
            ("115", "Tdap"), ("62", "HPV, quadrivalent"), ("113", "Td (adult) preservative free"),
            ("208", "SARS-COV-2 (COVID-19) vaccine, mRNA, spike protein, LNP, preservative free, 30 mcg/0.3mL dose"),
            ("121", "zoster")]
FIRST = ["Jose", "Mariana", "Kristopher", "Shirley", "Dewayne", "Hyun", "Tomás", "Yvonne", "Lakisha", "Gerardo",
         "Ana María", "Li", "Chidi", "Siobhán", "Mohammed", "Ellen"]
LAST = ["Gutierrez", "Pfeffer", "Kuhlman", "Bogan", "Runolfsson", "Mraz", "Ortiz", "Schmitt", "Hane", "Gleichner",
        "O'Keefe", "D'Amore", "Nguyen", "Okafor", "Van der Berg", "Smith"]
CITIES = [("Boston", "Suffolk County", "25025", "02134"), ("Springfield", "Hampden County", "25013", "01103"),
          ("Worcester", "Worcester County", "25027", "01608"), ("Quincy", "Norfolk County", "25021", "02169")]
RACES = ["white", "black", "asian", "native", "hawaiian", "other"]
SPECIALITIES = ["GENERAL PRACTICE", "INTERNAL MEDICINE", "PEDIATRICS", "EMERGENCY MEDICINE", "NURSE PRACTITIONER"]
END = dt.datetime(2025, 6, 1, tzinfo=dt.UTC)  # the simulation's end: encounters after it are not written
ISO = "%Y-%m-%dT%H:%M:%SZ"


def _iso(t: dt.datetime) -> str:
    return t.strftime(ISO)


def write_synthea(folder: Path, patients: int = 300, seed: int = 14) -> dict[str, int]:
    """Write a Synthea CSV export of ``patients`` people into ``folder``; the row count of each file."""
    rng = random.Random(seed)

    def uid() -> str:
        return str(uuid.UUID(int=rng.getrandbits(128), version=4))

    def name(pool: list[str]) -> str:
        return f"{rng.choice(pool)}{rng.randint(1, 999)}"

    folder.mkdir(parents=True, exist_ok=True)
    rows: dict[str, list[list[Any]]] = {n: [] for n in (
        "patients", "organizations", "providers", "payers", "encounters", "immunizations", "conditions",
        "payer_transitions")}
    orgs = []
    for n, label in enumerate(["Riverside Community Health", "Harbor Pediatrics", "St. Anne's Hospital",
                               "Cedar Skilled Nursing Facility", "Beacon Hospice & Palliative Care",
                               "Quincy Urgent Care LLC"]):
        org = uid()
        city, _, _, zip_code = CITIES[n % len(CITIES)]
        rows["organizations"].append([org, label, f"{rng.randint(1, 999)} Main St", city, "MA", zip_code,
                                      f"{42 + rng.random():.6f}", f"{-71 - rng.random():.6f}",
                                      f"617-555-{rng.randint(0, 9999):04d}", f"{rng.random() * 9e5:.2f}",
                                      rng.randint(10, 5000)])
        orgs.append(org)
    providers = []
    for _ in range(24):
        pro, org = uid(), rng.choice(orgs)
        rows["providers"].append([pro, org, f"{name(FIRST)} {name(LAST)}", rng.choice("MF"),
                                  rng.choice(SPECIALITIES), f"{rng.randint(1, 999)} Main St", "Boston", "MA", "02134",
                                  "42.36", "-71.05", rng.randint(1, 900), rng.randint(0, 300)])
        providers.append((pro, org))
    payers = []
    for label, owner in [("Medicare", "GOVERNMENT"), ("Medicaid", "GOVERNMENT"), ("Blue Cross Blue Shield", "PRIVATE"),
                         ("Aetna", "PRIVATE"), ("NO_INSURANCE", "NO_INSURANCE")]:
        pay = uid()
        rows["payers"].append([pay, label, owner, "", "", "MA" if owner != "NO_INSURANCE" else "", "", "",
                               *[rng.randint(0, 9999) for _ in range(12)], f"{rng.random():.2f}", rng.randint(1, 999)])
        payers.append(pay)
    for _ in range(patients):
        pid = uid()
        born = dt.datetime(1930, 1, 1, tzinfo=dt.UTC) + dt.timedelta(days=rng.randint(0, 34000))
        died = born + (END - born) * rng.uniform(0.3, 0.99) if rng.random() < 0.12 else None
        adult = (END - born).days > 18 * 365
        gender = rng.choice("MF")
        city, county, fips, zip_code = rng.choice(CITIES)
        marital = rng.choice(["M", "S", "D", "W", "M"]) if adult else ""
        rows["patients"].append([
            pid, born.date().isoformat(), died.date().isoformat() if died else "", f"999-{rng.randint(10, 99)}-"
            f"{rng.randint(1000, 9999)}", f"S9999{rng.randint(1000, 9999)}" if adult else "",
            f"X{rng.randint(10**7, 10**8)}X" if adult and rng.random() < 0.7 else "",
            ("Mr." if gender == "M" else "Mrs.") if adult else "", name(FIRST),
            name(FIRST) if rng.random() < 0.6 else "", name(LAST), "PhD" if adult and rng.random() < 0.03 else "",
            name(LAST) if marital == "M" and gender == "F" else "", marital, rng.choice(RACES),
            rng.choice(["hispanic", "nonhispanic", "nonhispanic"]), gender, f"{city}  Massachusetts  US",
            f"{rng.randint(1, 999)} {name(LAST)} Loaf Unit {rng.randint(1, 90)}", city, "Massachusetts", county, fips,
            zip_code, f"{42 + rng.random():.6f}", f"{-71 - rng.random():.6f}", f"{rng.random() * 2e6:.2f}",
            f"{rng.random() * 1e5:.2f}", rng.randint(10000, 200000),
        ])
        rows["payer_transitions"].append([pid, uid(), born.date().isoformat(), END.date().isoformat(),
                                          rng.choice(payers), "", "Self", ""])
        last = died or END
        t = born + dt.timedelta(days=rng.randint(0, 400))
        while True:
            t += dt.timedelta(days=rng.randint(90, 1500), minutes=rng.randint(0, 1440))
            if t >= last:
                break
            klass = rng.choices(list(WEIGHTS), list(WEIGHTS.values()))[0]
            code, description, shortest, longest = CLASSES[klass]
            stop = t + dt.timedelta(minutes=rng.randint(shortest, longest))
            eid = uid()
            pro, org = rng.choice(providers)
            cost = rng.random() * 900
            reason = ("38822007", "Cystitis") if rng.random() < 0.2 else ("", "")
            rows["encounters"].append([
                eid, _iso(t), "" if stop >= END else _iso(stop), pid, org, pro, rng.choice(payers), klass, code,
                description, f"{cost:.2f}", f"{cost:.2f}", f"{cost * rng.random():.2f}", *reason,
            ])
            if klass in ("wellness", "ambulatory"):
                for cvx, vaccine in rng.sample(VACCINES, rng.choice([0, 0, 1, 1, 2, 3])):
                    rows["immunizations"].append([_iso(t), pid, eid, cvx, vaccine, "140.52"])
            if reason[0]:
                rows["conditions"].append([t.date().isoformat(), "", pid, eid, "http://snomed.info/sct", *reason])
    for file, header in (("patients", PATIENTS), ("organizations", ORGANIZATIONS), ("providers", PROVIDERS),
                         ("payers", PAYERS), ("encounters", ENCOUNTERS), ("immunizations", IMMUNIZATIONS),
                         ("conditions", CONDITIONS), ("payer_transitions", PAYER_TRANSITIONS)):
        with (folder / f"{file}.csv").open("w", newline="", encoding="utf-8") as fh:
            out = csv.writer(fh, lineterminator="\n")
            out.writerow(header.split(","))
            out.writerows(rows[file])
    return {file: len(r) for file, r in rows.items()}


@pytest.fixture(scope="module")
def export(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, int]]:
    folder = tmp_path_factory.mktemp("synthea")
    return folder, write_synthea(folder)


def _files(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.csv"))  # as `--profile synthea *.csv` gives them


def test_the_export_has_the_hazards_it_claims(export: tuple[Path, dict[str, int]]) -> None:
    folder, counts = export
    assert counts["patients"] >= 300 and counts["encounters"] > 1000 and counts["immunizations"] > 500
    encounters = pl.read_csv(folder / "encounters.csv", infer_schema=False)
    assert set(encounters["ENCOUNTERCLASS"].unique()) == set(CLASSES)
    stays = encounters.filter(pl.col("STOP").is_not_null()).select(
        (pl.col("STOP").str.to_datetime(ISO) - pl.col("START").str.to_datetime(ISO)).dt.total_minutes().alias("m")
    )["m"]
    assert (stays > 10080).sum() > 20  # longer than the API's lengthMinutes maximum
    patients = pl.read_csv(folder / "patients.csv", infer_schema=False)
    assert patients["DEATHDATE"].drop_nulls().len() > 10
    assert set(patients["MARITAL"].drop_nulls().unique()) == {"M", "S", "D", "W"}


def test_a_complete_synthea_export_loads_into_the_sandbox(
    export: tuple[Path, dict[str, int]], tmp_path: Path, simple_sandbox: Any
) -> None:
    # The simple shape: this test reads back the bodies sent, and a bulk job's lines are then settled by the
    # ids the job names rather than by a search per line (etl.load.bulk).
    sandbox = simple_sandbox
    folder, counts = export
    settings = Settings(profile="synthea", state=tmp_path / "s.sqlite", report_dir=tmp_path / "r",
                        base_url=sandbox.base_url, api_key=sandbox.api_key, consistency_window=0, mode="bulk")
    # Bulk imports (NDJSON, a job per kind): the same bodies, over the same sockets, in seconds rather
    # than the minutes ten thousand single creates take on a shared machine.
    report = load_files(_files(folder), settings)
    s = report.summary
    kinds = {i["path"].rsplit("/", 1)[-1]: i["kind"] for i in s["inputs"]}
    # organizations.csv is never read as practitioners; payers and the rest are named, not guessed.
    assert kinds == {"patients.csv": "patient", "providers.csv": "practitioner", "encounters.csv": "encounter",
                     "immunizations.csv": "immunization"}
    not_imported = {x["file"].rsplit("/", 1)[-1]: x for x in s["not_imported"]}
    assert set(not_imported) == {"organizations.csv", "payers.csv", "conditions.csv", "payer_transitions.csv"}
    assert {f: x["rows"] for f, x in not_imported.items()} == {f"{f}.csv": counts[f] for f in (
        "organizations", "payers", "conditions", "payer_transitions")}
    # Every row of the imported files is in the report.
    assert s["rows_total"] == sum(counts[f] for f in ("patients", "providers", "encounters", "immunizations"))

    rejected = report.rows.filter(pl.col("state") == "rejected")
    assert rejected.filter(pl.col("field") == "length_minutes").height == 0  # a derived value never rejects
    assert rejected.height <= s["rows_total"] // 1000, rejected.head(5).to_dicts()  # at most 0.1%
    assert s["states"]["failed"] == 0 and s["states"]["unknown"] == 0
    assert count(sandbox, "/v1/patients") == counts["patients"]
    assert count(sandbox, "/v1/practitioners") == counts["providers"]

    # Marital status carried; serviceProvider is the organization's name; hospice and SNF classes taken.
    patients = everything(sandbox, "/v1/patients")
    marital = {p.get("maritalStatus") for p in patients}
    assert {"married", "single", "divorced", "widowed"} <= marital
    encounters = everything(sandbox, "/v1/encounters")
    organizations = (folder / "organizations.csv").read_text(encoding="utf-8").splitlines()
    names = {row[1] for row in csv.reader(organizations)} - {"NAME"}
    assert {e.get("serviceProvider") for e in encounters} <= names
    created_classes = {e["class"] for e in encounters}
    assert created_classes == {"AMB", "IMP", "EMER", "HH", "VR"}

    # DEATHDATE, RACE and ETHNICITY named on the terminal as not carried.
    text = io.StringIO()
    print_summary(report, Console(file=text, width=200, color_system=None))
    line = next(x for x in text.getvalue().splitlines() if "patients.csv (unmapped)" in x)
    for column in ("DEATHDATE", "RACE", "ETHNICITY"):
        assert column in line.split(": ", 1)[1].split(", ")
    assert "not imported:" in text.getvalue() and "payers.csv" in text.getvalue()
    carried = json.loads((tmp_path / "r" / "summary.json").read_text(encoding="utf-8"))["not_carried"]
    patient_columns = next(v for k, v in carried.items() if k.endswith("patients.csv"))
    assert {"DEATHDATE", "RACE", "ETHNICITY"} <= {c["column"] for c in patient_columns}


def test_no_synthea_row_is_rejected_for_a_derived_value(export: tuple[Path, dict[str, int]], tmp_path: Path) -> None:
    folder, _ = export
    report = validate_files(_files(folder), Settings(profile="synthea", report_dir=tmp_path / "v"))
    rejected = report.rows.filter(pl.col("state") == "rejected")
    assert rejected.filter(pl.col("field") == "length_minutes").height == 0


def test_every_synthea_encounter_class_is_one_of_the_api(
    export: tuple[Path, dict[str, int]], tmp_path: Path
) -> None:
    folder, _ = export
    report = validate_files([folder / "encounters.csv"], Settings(profile="synthea", report_dir=tmp_path / "v"))
    assert report.rows.filter(pl.col("field") == "encounter_class").height == 0


# --- side files: told apart by their headers (organizations, payers) or, with the profile, their names -----

ORG_ROWS = ORGANIZATIONS + (
    "\no1,Harbor Pediatrics,804 Rempel Mall,Cambridge,MA,02139,42.37,-71.11,617-555-0135,3443.36,9\n"
)
OLD_PAYERS = ("Id,NAME,ADDRESS,CITY,STATE_HEADQUARTERED,ZIP,PHONE,AMOUNT_COVERED\n"
              "p1,Medicaid,7500 Security Blvd,Baltimore,MD,21244,1-877-267-2323,10.0\n")


def test_organizations_and_payers_are_never_read_as_practitioners(tmp_path: Path) -> None:
    """Any profile (the default too), any file name, and payers of an older Synthea (no OWNERSHIP column)."""
    orgs, payers = tmp_path / "orgs_export.csv", tmp_path / "payers.csv"
    orgs.write_text(ORG_ROWS, encoding="utf-8")
    payers.write_text(OLD_PAYERS, encoding="utf-8")
    for profile in (None, "synthea"):
        report = validate_files([orgs, payers], Settings(profile=profile, report_dir=tmp_path / str(profile)))
        assert report.rows_total == 0 and report.summary["inputs"] == []
        assert [(x["name"], x["rows"]) for x in report.summary["not_imported"]] == [
            ("Synthea organizations", 1), ("Synthea payers", 1)]


def test_a_kind_given_for_every_file_reads_it_as_that_kind(tmp_path: Path) -> None:
    orgs = tmp_path / "organizations.csv"
    orgs.write_text(ORG_ROWS, encoding="utf-8")
    report = validate_files([orgs], Settings(kind="practitioner", report_dir=tmp_path / "r"))
    assert [i["kind"] for i in report.summary["inputs"]] == ["practitioner"]
    assert report.summary["not_imported"] == []


def test_other_synthea_files_are_named_only_with_the_synthea_profile(tmp_path: Path) -> None:
    conditions = tmp_path / "conditions.csv"
    conditions.write_text(CONDITIONS + "\n2020-01-02,,pat1,enc1,http://snomed.info/sct,38822007,Cystitis\n",
                          encoding="utf-8")
    report = validate_files([conditions], Settings(profile="synthea", report_dir=tmp_path / "r"))
    assert [(x["name"], x["rows"]) for x in report.summary["not_imported"]] == [("Synthea conditions", 1)]
    assert [c["reason"] for c in report.summary["not_carried"][str(conditions)]] == ["file not imported"] * 7
    from etl.errors import InputError

    with pytest.raises(InputError, match=r"conditions\.csv"):  # no profile: a clear error, not a silent skip
        validate_files([conditions], Settings(report_dir=tmp_path / "d"))


def test_an_organization_id_becomes_its_name_and_an_unknown_one_stays(tmp_path: Path) -> None:
    orgs, visits, people = tmp_path / "organizations.csv", tmp_path / "encounters.csv", tmp_path / "patients.csv"
    orgs.write_text(ORG_ROWS, encoding="utf-8")
    people.write_text("Id,FIRST,LAST,MARITAL\npat1,Ann,Lee,W\n", encoding="utf-8")
    visits.write_text(ENCOUNTERS + "\n"
                      "e1,2020-01-02T10:00:00Z,2020-01-02T10:30:00Z,pat1,o1,,,hospice,1,Hospice,1,1,1,,\n"
                      "e2,2020-01-03T10:00:00Z,2020-01-03T10:30:00Z,pat1,o9,,,snf,1,SNF,1,1,1,,\n", encoding="utf-8")
    report = load_files([orgs, people, visits], Settings(profile="synthea", dry_run=True, report_dir=tmp_path / "r",
                                                 state=tmp_path / "s.sqlite"))
    lines = [json.loads(x) for x in (tmp_path / "r" / "payloads.ndjson").read_text().splitlines()]
    bodies = {x["source_key"]: x["body"] for x in lines if x["kind"] == "encounter"}
    assert bodies["e1"]["serviceProvider"] == "Harbor Pediatrics" and bodies["e1"]["class"] == "HH"
    assert bodies["e2"]["serviceProvider"] == "o9" and bodies["e2"]["class"] == "IMP"
    assert report.states["rejected"] == 0


@pytest.mark.parametrize(("word", "code"), [("hospice", "HH"), ("SNF", "IMP"), ("Skilled Nursing", "IMP")])
def test_care_settings_map_to_a_class_with_no_profile(tmp_path: Path, word: str, code: str) -> None:
    visits, people = tmp_path / "visits.csv", tmp_path / "patients.csv"
    visits.write_text(f"visit_id,patient_id,class,start\nV1,P1,{word},2020-01-02T10:00:00Z\n", encoding="utf-8")
    people.write_text("patient_id,first_name,last_name\nP1,Ann,Lee\n", encoding="utf-8")
    settings = Settings(dry_run=True, report_dir=tmp_path / "r", state=tmp_path / "s.sqlite")
    report = load_files([people, visits], settings)
    lines = [json.loads(x) for x in (tmp_path / "r" / "payloads.ndjson").read_text().splitlines()]
    assert [x["body"]["class"] for x in lines if x["kind"] == "encounter"] == [code]
    assert report.states["rejected"] == 0
