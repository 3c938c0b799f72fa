"""Generate the practitioner, visit, document and task samples, a Synthea export and CVRS extracts.

Run from the repository root, after ``make_samples.py`` (this script reads its ``registry.csv`` and
``planted.csv``, and re-appends its own part of ``README.md``, which ``make_samples.py`` rewrites)::

    .venv/bin/python sample_data/make_more_samples.py

It writes, next to this script:

``providers.csv``
    12 practitioners (``Provider ID`` ``PRV-101`` ...), one of them planted with a defect.
``visits.csv``
    160 visits of the registry's patients, 11 of them planted with one defect each.
``documents.csv``
    40 letters and summaries, one row per section, grouped by ``Document ID``; 4 planted bad documents.
``tasks.csv``
    40 follow-up tasks, 5 of them planted with one defect each.
``planted_more.csv``
    Every row of the four files above that an import must reject:
    ``source_file,source_row,code,column,value,description`` (``source_row`` as a spreadsheet user sees it,
    header = 1; ``value`` the cell as written).
``synthea/``
    A tiny Synthea CSV export (patients, organizations, payers, providers, encounters, immunizations), every
    reference valid, no planted defects.
``cvrs/cvrs_extract.tsv``, ``cvrs/cvrs_redacted.tsv``
    CDC COVID-19 Vaccination Reporting Specification extracts (tab-delimited, the 45 fields in order), valid.
``README.md``
    The part between the ``make_more_samples.py`` markers: the files, their columns and the planted rows.

Only valid registry patients are referenced: a patient who appears on any row of ``planted.csv`` is never
used, so a visit, document or task fails only for its own planted defect. Everything is drawn from one
``random.Random`` with a fixed seed and the standard library only, so two runs write byte-identical files.
"""

from __future__ import annotations

import csv
import random
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from pathlib import Path

from make_samples import ascii_fold, md_cell, padded, write_csv

SEED = 20251122
OUT_DIR = Path(__file__).resolve().parent
REGISTRY = OUT_DIR / "registry.csv"
REGISTRY_PLANTED = OUT_DIR / "planted.csv"
README = OUT_DIR / "README.md"
BEGIN_MARK = "<!-- make_more_samples.py: begin (generated; rerun the script after make_samples.py) -->"
END_MARK = "<!-- make_more_samples.py: end -->"

WINDOW_START = date(2019, 1, 1)
WINDOW_END = date(2025, 6, 30)
PLANNED_START = date(2027, 1, 4)  # planned visits lie after every other date of the samples
ISO = "%Y-%m-%dT%H:%M:%S"

Row = dict[str, str]

PROVIDER_HEADERS = ("Provider ID", "NPI", "First Name", "Last Name", "Prefix", "Suffix", "Gender", "Email", "Phone",
                    "Specialty")
VISIT_HEADERS = ("Visit ID", "Patient ID", "Provider ID", "Status", "Visit Type", "Start", "End", "Length", "Reason",
                 "Location", "Organization", "Diagnosis 1", "Diagnosis 2", "Diagnosis 3")
DOCUMENT_HEADERS = ("Document ID", "Patient ID", "Author ID", "Visit ID", "Status", "Type", "Title", "Date",
                    "Confidentiality", "Category", "Section Title", "Section Text", "Section Mode")
TASK_HEADERS = ("Task ID", "Patient ID", "Visit ID", "Status", "Intent", "Priority", "Code", "Description",
                "Requester ID", "Owner ID", "Authored On", "Due", "Note", "Input")


@dataclass(frozen=True)
class Planted:
    """One row an import must reject, as ``planted_more.csv`` lists it."""

    source_file: str
    source_row: int
    code: str
    column: str
    value: str
    description: str


def iso(moment: datetime) -> str:
    """``2023-04-05T09:00:00``: a naive ISO date-time, as the samples write them."""
    return moment.strftime(ISO)


def age_on(dob: date, day: date) -> int:
    """Whole years between ``dob`` and ``day``."""
    return day.year - dob.year - ((day.month, day.day) < (dob.month, dob.day))


def rand_day(rng: random.Random, start: date, end: date) -> date:
    """A uniformly drawn day in [start, end]."""
    return start + timedelta(days=rng.randint(0, (end - start).days))


# --------------------------------------------------------------------------- registry patients


@dataclass(frozen=True)
class RegistryPatient:
    """A registry patient with no planted row, and the vaccines given on each day."""

    pid: str
    first: str
    last: str
    dob: date
    days: dict[date, tuple[str, ...]]  # administration day -> vaccine names given that day


def read_registry() -> list[RegistryPatient]:
    """The patients of ``registry.csv`` none of whose rows is planted, in order of first appearance."""
    with REGISTRY.open(encoding="utf-8", newline="") as fh:
        rows = list(csv.DictReader(fh))
    with REGISTRY_PLANTED.open(encoding="utf-8", newline="") as fh:
        planted_rows = {int(r["source_row"]) for r in csv.DictReader(fh)}
    # A patient with any planted row is left out entirely: their demographics may conflict, or the
    # import may never create them, and the new files must fail only for their own defects.
    excluded = {rows[n - 2]["Patient ID"] for n in planted_rows}
    patients: dict[str, tuple[Row, dict[date, list[str]]]] = {}
    for row in rows:
        pid = row["Patient ID"]
        if not pid or pid in excluded:
            continue
        _, days = patients.setdefault(pid, (row, {}))
        if row["Status"] != "not-done":
            days.setdefault(date.fromisoformat(row["Admin Date"]), []).append(row["Vaccine"])
    return [
        RegistryPatient(pid, row["First Name"], row["Last Name"], date.fromisoformat(row["DOB"]),
                        {day: tuple(names) for day, names in sorted(days.items())})
        for pid, (row, days) in patients.items()
        if days
    ]


# --------------------------------------------------------------------------- providers


@dataclass(frozen=True)
class Provider:
    """A practitioner of ``providers.csv``; ``role`` picks the visits and tasks they take part in."""

    pid: str
    first: str
    last: str
    prefix: str
    suffix: str
    gender: str
    specialty: str
    role: str
    has_npi: bool = True


LONG_SPECIALTY = padded(
    "Hospital Medicine; board certified in Internal Medicine (ABIM 2011, recertified 2021); fellowship in "
    "Hospital Medicine and Perioperative Care; clinical interests: sepsis, care transitions and antimicrobial "
    "stewardship; ",
    210,
)
PROVIDERS: tuple[Provider, ...] = (
    Provider("PRV-101", "Amara", "Okonkwo", "Dr.", "MD", "F", "Pediatrics", "peds"),
    Provider("PRV-102", "Daniel", "Whitfield", "Dr.", "MD", "M", "Family Medicine", "family"),
    Provider("PRV-103", "Lucía", "Ferreira", "Dr.", "DO", "F", "Internal Medicine", "adult"),
    Provider("PRV-104", "Kenji", "Watanabe", "Dr.", "MD;MPH", "M", "Infectious Disease", "adult"),
    Provider("PRV-105", "Priya", "Raman", "", "MSN;CPNP", "F", "Pediatric Nurse Practitioner", "peds"),
    Provider("PRV-106", "Thomas", "Brennan-Hale", "Dr.", "MD", "M", "Emergency Medicine", "emergency"),
    Provider("PRV-107", "Hélène", "Marchand", "Dr.", "MD", "F", "Geriatric Medicine", "elder"),
    Provider("PRV-108", "Marcus", "Johnson", "", "RN", "M", "Nursing", "nurse", has_npi=False),
    Provider("PRV-109", "Sofia", "Lindqvist", "Dr.", "MD", "F", LONG_SPECIALTY, "planted"),
    Provider("PRV-110", "Grace", "O'Neill", "", "PharmD", "F", "Pharmacy", "pharmacy"),
    Provider("PRV-111", "Samuel", "Adeyemi", "Dr.", "MD;FACOG", "M", "Obstetrics and Gynecology", "women"),
    Provider("PRV-112", "Aiyana", "Redcloud", "", "CMA", "F", "Medical Assistant", "assistant", has_npi=False),
)
BAD_PROVIDER = "PRV-109"
MISSING_PROVIDER = "PRV-404"  # named by planted rows, listed nowhere
MISSING_PATIENT = "P-99999"
BY_ID = {p.pid: p for p in PROVIDERS}


def npi(rng: random.Random) -> str:
    """A 10-digit NPI whose last digit is the Luhn check digit over ``80840`` + the first nine."""
    base = f"{rng.choice('12')}{rng.randint(0, 99_999_999):08d}"
    total = 0
    for i, ch in enumerate(reversed("80840" + base)):
        digit = int(ch)
        if i % 2 == 0:  # the check digit will sit to the right, so the payload's last digit is doubled
            digit = digit * 2 - 9 if digit * 2 > 9 else digit * 2
        total += digit
    return base + str((10 - total % 10) % 10)


def provider_rows(rng: random.Random) -> list[Row]:
    """``providers.csv``: every practitioner, with phone numbers in the 555-01xx range."""
    phones = rng.sample(range(100), len(PROVIDERS))
    rows = []
    for p, phone in zip(PROVIDERS, phones, strict=True):
        rows.append({
            "Provider ID": p.pid,
            "NPI": npi(rng) if p.has_npi else "",
            "First Name": p.first,
            "Last Name": p.last,
            "Prefix": p.prefix,
            "Suffix": p.suffix,
            "Gender": p.gender,
            "Email": f"{ascii_fold(p.first).lower()}.{ascii_fold(p.last).lower()}@riverside.example.org",
            "Phone": f"(617) 555-01{phone:02d}",
            "Specialty": p.specialty,
        })
    return rows


def providers_for(*roles: str) -> list[str]:
    """Provider IDs of these roles (never the planted one)."""
    return [p.pid for p in PROVIDERS if p.role in roles]


# --------------------------------------------------------------------------- visits


@dataclass
class Visit:
    """A visit before it becomes a row; ``row`` holds the cells once written."""

    patient: RegistryPatient
    provider: str
    status: str
    vtype: str
    start: datetime
    end: datetime
    reason: str
    location: str
    org: str
    dx: list[str]
    length: str = ""
    vid: str = ""
    planted: bool = False
    row: Row = field(default_factory=dict)

    def to_row(self) -> Row:
        """The cells of ``visits.csv``."""
        dx = [*self.dx, "", "", ""]
        return {
            "Visit ID": self.vid, "Patient ID": self.patient.pid, "Provider ID": self.provider,
            "Status": self.status, "Visit Type": self.vtype, "Start": iso(self.start), "End": iso(self.end),
            "Length": self.length, "Reason": self.reason, "Location": self.location, "Organization": self.org,
            "Diagnosis 1": dx[0], "Diagnosis 2": dx[1], "Diagnosis 3": dx[2],
        }


CLINIC = "Riverside Community Health"
PEDIATRICS = "Harbor Pediatrics"
HOSPITAL = "St. Brendan's Hospital"
COVID_NAMES = ("COVID-19", "SARS-COV-2")
FLU_NAMES = ("Influenza", "influenza")


@dataclass(frozen=True)
class Complaint:
    """A reason for a visit that is not a vaccination, and what it looks like."""

    vtype: str
    reason: str
    dx: tuple[str, ...]
    adult_only: bool = False


COMPLAINTS: tuple[Complaint, ...] = (
    Complaint("urgent care", "Fever and sore throat", ("J02.9",)),
    Complaint("Urgent Care", "Ankle sprain after a fall", ("S93.401A",)),
    Complaint("urgent care", "Ear pain", ("65363002",)),
    Complaint("emergency", "Shortness of breath", ("J18.9", "R06.02")),
    Complaint("emergency", "Laceration of the left hand", ("S61.412A",)),
    Complaint("inpatient", "Community-acquired pneumonia", ("J18.9", "I10"), adult_only=True),
    Complaint("inpatient", "Dehydration from acute gastroenteritis", ("E86.0", "A08.4")),
    Complaint("home health", "Post-discharge nursing visit", ("Z09",), adult_only=True),
    Complaint("virtual", "Medication review", ("I10", "E11.9"), adult_only=True),
    Complaint("telehealth", "Follow-up of asthma", ("J45.909",)),
    Complaint("outpatient", "Follow-up of hypertension", ("38341003",), adult_only=True),
    Complaint("ambulatory", "Cough for two weeks", ("10509002",)),
    Complaint("ambulatory", "Facial pain and congestion", ("444814009", "R51.9")),
)
#: Minutes a visit of each class lasts: (shortest, longest), in steps of 5 (inpatient: of 15).
DURATIONS: dict[str, tuple[int, int]] = {
    "wellness": (20, 45), "ambulatory": (15, 40), "outpatient": (15, 60), "urgent care": (30, 180),
    "emergency": (60, 480), "inpatient": (1440, 7200), "home health": (30, 90), "virtual": (10, 30),
    "telehealth": (10, 30),
}


def visit_time(rng: random.Random, day: date, vtype: str) -> tuple[datetime, datetime]:
    """A start in opening hours (any hour for emergencies) and an end after it, in the class's range."""
    key = vtype.lower()
    if key in ("emergency", "urgent care", "inpatient"):
        start = datetime(day.year, day.month, day.day, rng.randint(0, 23), rng.choice((0, 10, 20, 30, 40, 50)))
    else:
        quarter = rng.randint(8 * 4, 16 * 4 + 3)
        start = datetime(day.year, day.month, day.day, quarter // 4, quarter % 4 * 15)
    lo, hi = DURATIONS[key]
    step = 15 if key == "inpatient" else 5
    return start, start + timedelta(minutes=rng.randrange(lo, hi + 1, step))


def vaccination_visit(rng: random.Random, patient: RegistryPatient, day: date) -> Visit:
    """The visit at which the registry's vaccinations of ``day`` were given."""
    age = age_on(patient.dob, day)
    names = patient.days[day]
    if age < 18:
        vtype = rng.choice(("wellness", "wellness", "wellness", "ambulatory", "ambulatory", "outpatient",
                            "Wellness"))
        provider = rng.choice([*providers_for("peds"), "PRV-108", "PRV-102"])
    else:
        vtype = rng.choice(("ambulatory", "ambulatory", "ambulatory", "outpatient", "outpatient", "wellness",
                            "Outpatient"))
        pool = providers_for("family", "adult", "nurse", "pharmacy") + (providers_for("elder") * 2 if age >= 65
                                                                          else [])
        provider = rng.choice(pool)
    if any(n.startswith(COVID_NAMES) for n in names):
        reason = "COVID-19 vaccination"
    elif any(n.startswith(FLU_NAMES) for n in names):
        reason = "Seasonal influenza vaccination"
    elif vtype.lower() == "wellness":
        reason = "Well child visit" if age < 18 else "Annual wellness visit"
    else:
        reason = "Routine immunization"
    dx = ["Z23"]
    if vtype.lower() == "wellness":
        dx.insert(0, "Z00.129" if age < 18 else "Z00.00")
    start, end = visit_time(rng, day, vtype)
    org = PEDIATRICS if BY_ID[provider].role == "peds" else CLINIC
    location = rng.choice(("Exam Room {n}", "Immunization Clinic, Room {n}", "Exam Room {n}")).format(
        n=rng.randint(1, 14))
    return Visit(patient, provider, "finished", vtype, start, end, reason, location, org, dx)


def other_visit(rng: random.Random, patient: RegistryPatient, complaint: Complaint | None = None) -> Visit:
    """A visit for an illness or a follow-up, on a day in the export's window after the patient's birth.

    ``complaint`` defaults to one drawn at random among those that suit the patient's age that day; an
    adult-only one needs an adult patient.
    """
    lo = max(WINDOW_START, patient.dob + timedelta(days=30))
    if complaint is not None and complaint.adult_only:
        lo = max(lo, patient.dob.replace(year=patient.dob.year + 18, day=min(patient.dob.day, 28)))
    day = rand_day(rng, lo, WINDOW_END)
    adult = age_on(patient.dob, day) >= 18
    if complaint is None:
        complaint = rng.choice([c for c in COMPLAINTS if adult or not c.adult_only])
    key = complaint.vtype.lower()
    start, end = visit_time(rng, day, key)
    if key in ("urgent care", "emergency"):
        provider, org = "PRV-106", HOSPITAL
        location = f"{'Urgent Care' if key == 'urgent care' else 'Emergency Department'}, Bay {rng.randint(1, 12)}"
    elif key == "inpatient":
        provider, org = "PRV-103", HOSPITAL
        location = f"Ward {rng.randint(2, 7)}{rng.choice('AB')}, Bed {rng.randint(1, 24)}"
    elif key == "home health":
        provider, org, location = "PRV-108", CLINIC, "Patient home"
    elif key in ("virtual", "telehealth"):
        provider = rng.choice(providers_for("family", "adult") if adult else providers_for("peds"))
        org, location = CLINIC, "Video visit"
    else:
        provider = rng.choice(providers_for("family", "adult") if adult else providers_for("peds"))
        org = CLINIC if adult else PEDIATRICS
        location = f"Exam Room {rng.randint(1, 14)}"
    return Visit(patient, provider, "finished", complaint.vtype, start, end, complaint.reason, location, org,
                 list(complaint.dx))


def make_visits(rng: random.Random, patients: list[RegistryPatient]) -> list[Visit]:
    """160 visits sorted by start, with ids: 128 vaccination visits and 32 others (4 planned, 4 cancelled)."""
    days = [(p, day) for p in patients for day in p.days]
    visits = [vaccination_visit(rng, p, day) for p, day in rng.sample(days, 128)]
    adults = [p for p in patients if p.dob < WINDOW_END.replace(year=WINDOW_END.year - 20)]
    for complaint in COMPLAINTS:  # each class word at least once
        visits.append(other_visit(rng, rng.choice(adults if complaint.adult_only else patients), complaint))
    visits += [other_visit(rng, rng.choice(patients)) for _ in range(24 - len(COMPLAINTS))]
    for _ in range(4):
        visit = other_visit(rng, rng.choice(patients))
        visit.status, visit.dx = "cancelled", []
        visits.append(visit)
    for _ in range(4):
        patient = rng.choice(patients)
        day = rand_day(rng, PLANNED_START, PLANNED_START + timedelta(days=80))
        start, end = visit_time(rng, day, "ambulatory")
        adult = age_on(patient.dob, day) >= 18
        provider = rng.choice(providers_for("family", "adult") if adult else providers_for("peds"))
        visits.append(Visit(patient, provider, "planned", "ambulatory", start, end,
                            "Annual wellness visit" if adult else "Well child visit", f"Exam Room {rng.randint(1, 14)}",
                            CLINIC if adult else PEDIATRICS, []))
    visits.sort(key=lambda v: (v.start, v.patient.pid))
    finished = [v for v in visits if v.status == "finished"]
    for visit in rng.sample(finished, 10):
        # A few sources fill the length; it must agree with the period.
        visit.length = str(int((visit.end - visit.start).total_seconds()) // 60)
    for visit in rng.sample([v for v in finished if not v.length], 4):
        visit.provider = ""  # the provider is optional
    for n, visit in enumerate(visits, start=1):
        visit.vid = f"V-{n:05d}"
        visit.row = visit.to_row()
    return visits


LONG_LOCATION = padded(
    "Riverside Community Health, Main Campus, Building C (Pediatric and Adolescent Medicine), Third Floor, "
    "Suite 310, Examination Room 12, entrance from the Elm Street parking garage via the east elevators ",
    210,
)
LONG_REASON = padded(
    "Patient presents for scheduled immunization visit; parent reports mild cough for three days without fever, "
    "good oral intake, normal activity, no known sick contacts, no previous reactions to vaccines, no allergies "
    "to latex, eggs, gelatin or neomycin, no immunosuppressive treatment, no blood products in the last eleven "
    "months; ",
    510,
)
TWENTY_ONE_DIAGNOSES = ";".join((
    "Z23", "Z00.00", "I10", "E11.9", "E78.5", "J45.909", "K21.9", "M54.5", "F41.1", "G47.33", "N18.3",
    "E66.9", "I25.10", "J44.9", "M17.11", "H52.4", "L40.0", "E03.9", "D64.9", "R73.03", "Z79.4",
))


@dataclass(frozen=True)
class VisitDefect:
    """A defect planted on one visit row."""

    code: str
    column: str
    value: str
    description: str
    needs_provider: bool = False


VISIT_DEFECTS: tuple[VisitDefect, ...] = (
    VisitDefect("enum", "Status", "done", "Status 'done': not an encounter status (planned, arrived, ... finished)"),
    VisitDefect("enum", "Visit Type", "spaceship", "Visit Type 'spaceship' is no known class word; it stays as "
                "written and is not AMB, IMP, EMER, HH or VR"),
    VisitDefect("maximum", "Length", "20000", "Length 20000 minutes; limit 10080 (a week)"),
    VisitDefect("max-length", "Location", LONG_LOCATION, "Location of 210 characters; limit 200"),
    VisitDefect("max-length", "Reason", LONG_REASON, "Reason of 510 characters (a pasted note); limit 500"),
    VisitDefect("max-items", "Diagnosis 1", TWENTY_ONE_DIAGNOSES,
                "Diagnosis 1 holds 21 codes separated by ';' (Diagnosis 2 and 3 empty); limit 20 diagnoses"),
    VisitDefect("date-format", "Start", "2023-02-30T09:00:00", "Start 2023-02-30 does not exist"),
    VisitDefect("unresolved-reference", "Patient ID", MISSING_PATIENT,
                f"Patient ID {MISSING_PATIENT} is in no file of the import"),
    VisitDefect("unresolved-reference", "Provider ID", MISSING_PROVIDER,
                f"Provider ID {MISSING_PROVIDER} is not in providers.csv", needs_provider=True),
    VisitDefect("parent-rejected", "Provider ID", BAD_PROVIDER,
                f"Provider {BAD_PROVIDER} is itself rejected (providers.csv: Specialty too long)",
                needs_provider=True),
    VisitDefect("required", "Patient ID", "", "Patient ID missing"),
)


def plant_visits(rng: random.Random, visits: list[Visit]) -> list[tuple[Visit, VisitDefect]]:
    """Plant one defect on each of 11 finished visits spread over the file, and return them."""
    eligible = [i for i, v in enumerate(visits) if v.status == "finished" and v.provider and not v.length]
    # The invalid Start goes on the visit nearest the date it names, so the file stays in date order.
    target = datetime(2023, 3, 1)
    dated = min(eligible, key=lambda i: abs(visits[i].start - target))
    others = [d for d in VISIT_DEFECTS if d.code != "date-format"]
    rng.shuffle(others)
    bins = [eligible[k * len(eligible) // len(others):(k + 1) * len(eligible) // len(others)]
            for k in range(len(others))]
    planted: list[tuple[Visit, VisitDefect]] = []
    for defect, candidates in zip(others, bins, strict=True):
        visit = visits[rng.choice([i for i in candidates if i != dated])]
        visit.row[defect.column] = defect.value
        if defect.code == "max-items":
            visit.row["Diagnosis 2"] = visit.row["Diagnosis 3"] = ""
        planted.append((visit, defect))
    visit = visits[dated]
    defect = next(d for d in VISIT_DEFECTS if d.code == "date-format")
    visit.row["Start"] = defect.value
    visit.row["End"] = "2023-03-02T09:20:00"
    planted.append((visit, defect))
    for visit, _ in planted:
        visit.planted = True
    return sorted(planted, key=lambda pair: pair[0].vid)


# --------------------------------------------------------------------------- documents


@dataclass
class Document:
    """A letter or summary: document-level cells repeated on each of its section rows."""

    patient: str
    author: str
    visit: str
    status: str
    dtype: str
    title: str
    when: datetime
    confidentiality: str
    category: str
    sections: list[tuple[str, str, str]]  # title, text, mode
    did: str = ""

    def rows(self) -> list[Row]:
        """One row per section."""
        head = {
            "Document ID": self.did, "Patient ID": self.patient, "Author ID": self.author, "Visit ID": self.visit,
            "Status": self.status, "Type": self.dtype, "Title": self.title, "Date": iso(self.when),
            "Confidentiality": self.confidentiality, "Category": self.category,
        }
        return [{**head, "Section Title": t, "Section Text": x, "Section Mode": m} for t, x, m in self.sections]


SPECIALISTS = ("allergy and immunology", "cardiology", "pulmonology", "endocrinology", "travel medicine")


def document_for_visit(rng: random.Random, visit: Visit) -> Document:
    """A document written after ``visit``, of a type that fits it."""
    p = visit.patient
    name = f"{p.first} {p.last}"
    key = visit.vtype.lower()
    author = visit.provider or rng.choice(providers_for("family", "adult"))
    if BY_ID[author].role in ("nurse", "pharmacy", "assistant"):
        author = rng.choice(providers_for("family", "adult"))
    when = visit.end + timedelta(minutes=rng.randint(30, 72 * 60))
    given = p.days.get(visit.start.date(), ())
    if key == "inpatient":
        dtype, title, category = "discharge-summary", "Discharge summary", "summary;hospital"
        sections = [
            ("Admission diagnosis", f"{visit.reason}; admitted on {visit.start:%Y-%m-%d}.", "snapshot"),
            ("Hospital course", f"{name} was treated with intravenous fluids and oral antibiotics, improved steadily "
             "and was mobile and eating normally at discharge.", "snapshot"),
            ("Discharge medications", "Amoxicillin 500 mg three times daily for five more days.", "snapshot"),
            ("Follow-up", "Review by the primary care provider within seven days; return if fever recurs.",
             "snapshot"),
        ]
    elif given and rng.random() < 0.5:
        dtype, title, category = "immunization-summary", "Immunization visit summary", "summary;immunization"
        sections = [
            ("Vaccines given", "; ".join(given) + ".", "snapshot"),
            ("Advice", "Mild soreness, redness or a low fever for a day or two are common.\n"
             "Call the clinic if symptoms last more than 48 hours.", "snapshot"),
        ]
        if rng.random() < 0.4:
            sections.append(("Next doses", "Next doses per the recommended schedule; a reminder will be sent.",
                             "snapshot"))
    elif rng.random() < 0.5:
        specialty = rng.choice(SPECIALISTS)
        dtype, title, category = "referral-letter", f"Referral to {specialty}", "correspondence;referral"
        sections = [
            ("Reason for referral", f"Dear colleague, I would be grateful if you could see {name} (born "
             f"{p.dob:%Y-%m-%d}) regarding {visit.reason.lower()}.", "snapshot"),
            ("History", f"Seen on {visit.start:%Y-%m-%d} for {visit.reason.lower()}. No known drug allergies.",
             "snapshot"),
            ("Immunizations", f"Registry records {sum(len(v) for v in p.days.values())} vaccinations, the last on "
             f"{max(p.days):%Y-%m-%d}.", "snapshot"),
        ][: rng.randint(1, 3)]
    else:
        dtype, title, category = "visit-summary", f"Visit summary: {visit.reason}", "clinical-note"
        sections = [
            ("Assessment", f"{visit.reason}. Examination otherwise unremarkable.", "snapshot"),
            ("Plan", "Symptomatic treatment, fluids and rest; follow up if not improving within a week.", "snapshot"),
        ]
    return Document(p.pid, author, visit.vid, "final", dtype, title, when, "N", category, sections)


def letter_without_visit(rng: random.Random, patient: RegistryPatient) -> Document:
    """A reminder letter to a patient, tied to no visit."""
    when_day = rand_day(rng, max(WINDOW_START, patient.dob + timedelta(days=60)), WINDOW_END)
    when = datetime(when_day.year, when_day.month, when_day.day, rng.randint(9, 16), rng.choice((0, 15, 30, 45)))
    text = (f"Dear {patient.first} {patient.last}, our records show that a vaccination is due. "
            "Please call (617) 555-0100 to book an appointment, or reply to this letter if it was given elsewhere.")
    author = rng.choice(providers_for("family", "peds", "adult"))
    return Document(patient.pid, author, "", "final", "patient-letter", "Vaccination reminder", when, "N",
                    "correspondence", [("Reminder", text, "")])


LONG_SECTION_TEXT = padded(
    "Nursing flowsheet pasted into the summary: 08:00 temperature 37.9 C, pulse 96, blood pressure 128/76, "
    "respiratory rate 20, oxygen saturation 94 percent on room air, patient comfortable, tolerating fluids; ",
    50_001,
)


def make_documents(rng: random.Random, visits: list[Visit], patients: list[RegistryPatient],
                   planted_visits: list[tuple[Visit, VisitDefect]]) -> tuple[list[Document], dict[str, str]]:
    """40 documents: 36 valid and 4 planted; returns them and the defect of each planted Document ID."""
    usable = [v for v in visits if v.status == "finished" and not v.planted]
    inpatient = next((v for v in usable if v.vtype == "inpatient"), None)
    assert inpatient is not None, "the visits need an inpatient stay for the planted discharge summary"
    docs = [document_for_visit(rng, v) for v in rng.sample([v for v in usable if v is not inpatient], 26)]
    docs += [letter_without_visit(rng, rng.choice(patients)) for _ in range(10)]
    docs.sort(key=lambda d: (d.when, d.patient))
    for doc, confidentiality in zip(rng.sample(docs, 8), ("R", "R", "R", "V", "V", "", "", ""), strict=True):
        doc.confidentiality = confidentiality  # N otherwise; empty is allowed
    for doc in rng.sample([d for d in docs if len(d.sections) > 1], 3):
        doc.status, doc.sections = "preliminary", [(t, x, "working") for t, x, _ in doc.sections]
    for doc in rng.sample([d for d in docs if d.status == "final" and len(d.sections) > 1], 2):
        t, x, _ = doc.sections[-1]
        doc.status = "amended"
        doc.sections[-1] = (t, x + " Amended: dosage corrected after pharmacy review.", "changes")
    for doc in rng.sample(docs, 6):
        doc.sections = [(t, x, "") for t, x, _ in doc.sections]  # the mode is optional

    bad: dict[int, tuple[Document, str]] = {}
    long_doc = document_for_visit(rng, inpatient)
    long_doc.sections = long_doc.sections[:3]
    title, _, mode = long_doc.sections[1]
    long_doc.sections[1] = (title, LONG_SECTION_TEXT, mode)
    bad[16] = (long_doc, "max-length")

    elder = max((p for p in patients if p.dob.year < 1960), key=lambda p: (len(p.days), p.pid))
    first_day = max(date(1985, 1, 1), elder.dob + timedelta(days=18 * 365))
    step = (WINDOW_START - first_day).days // 52
    history = Document(elder.pid, "PRV-102", "", "final", "immunization-history",
                       "Immunization history transcribed from paper records", datetime(2024, 11, 4, 10, 30), "N",
                       "summary;immunization", [])
    vaccines = ("Tdap", "Influenza, seasonal", "Hep B, adult", "Pneumococcal PPSV23", "MMR", "Hep A, adult")
    for n in range(1, 52):
        day = first_day + timedelta(days=n * step)
        history.sections.append((f"Entry {n}", f"{vaccines[n % len(vaccines)]} given {day:%Y-%m-%d} "
                                 "(from the paper immunization card).", "snapshot"))
    bad[33] = (history, "max-items")

    letter = letter_without_visit(rng, rng.choice(patients))
    letter.confidentiality = "X"
    bad[8] = (letter, "enum")

    done_visit = next(v for v, d in planted_visits if d.code == "enum" and d.column == "Status")
    orphan = document_for_visit(rng, done_visit)
    orphan.dtype, orphan.category = "visit-summary", "clinical-note"
    orphan.title = f"Visit summary: {done_visit.reason}"
    orphan.sections = [("Summary", f"{done_visit.reason}. No concerns raised.", "snapshot")]
    bad[25] = (orphan, "parent-rejected")

    for index in sorted(bad):
        docs.insert(index, bad[index][0])
    for n, doc in enumerate(docs, start=1):
        doc.did = f"DOC-{n:04d}"
    return docs, {doc.did: code for doc, code in bad.values()}


def plant_documents(docs: list[Document], defects: dict[str, str]) -> tuple[list[Row], list[Planted]]:
    """All document rows, and a planted line for every row a bad document makes the import reject."""
    rows: list[Row] = []
    planted: list[Planted] = []
    for doc in docs:
        doc_rows = doc.rows()
        first = len(rows) + 2  # spreadsheet row of the document's first section
        rows += doc_rows
        code = defects.get(doc.did)
        if code is None:
            continue
        if code == "max-items":
            culprit, column = len(doc_rows) - 1, "Section Title"
            why = f"Document {doc.did} has 51 sections (one row each); limit 50"
        elif code == "max-length":
            culprit = next(i for i, r in enumerate(doc_rows) if len(r["Section Text"]) > 50_000)
            column, why = "Section Text", "Section Text of 50,001 characters (a pasted flowsheet); limit 50,000"
        elif code == "enum":
            culprit, column, why = 0, "Confidentiality", "Confidentiality 'X': not N, R or V"
        else:
            culprit, column = 0, "Visit ID"
            why = f"Visit {doc.visit} is itself rejected (visits.csv: Status 'done')"
        for i, row in enumerate(doc_rows):
            # Too many sections is a fault of every section row alike; any other limit, of one row.
            if i == culprit or code == "max-items":
                planted.append(Planted("documents.csv", first + i, code, column, row[column], why))
            else:
                planted.append(Planted("documents.csv", first + i, "document-rejected", "Document ID", doc.did,
                                       f"Another row of {doc.did} (row {first + culprit}) breaks a limit: "
                                       "the whole document is rejected"))
    return rows, planted


# --------------------------------------------------------------------------- tasks


@dataclass(frozen=True)
class TaskKind:
    """A kind of follow-up task and how it is written."""

    code: str
    description: str
    inputs: tuple[str, ...]
    owners: tuple[str, ...]


TASK_KINDS: tuple[TaskKind, ...] = (
    TaskKind("immunization-reminder", "Remind {name} that the next dose is due",
             ("reminder-type=sms;dose=2", "reminder-type=email;dose=3", "reminder-type=sms;dose=2"),
             ("PRV-108", "PRV-112")),
    TaskKind("recall-overdue", "Recall {name}: overdue vaccination per registry", ("reminder-type=letter",),
             ("PRV-112",)),
    TaskKind("follow-up-call", "Call {name} 48 hours after the visit to ask about reactions",
             ("reminder-type=phone",), ("PRV-108", "PRV-105")),
    TaskKind("lab-review", "Review hepatitis B surface antibody result for {name}", ("",),
             ("PRV-103", "PRV-104")),
    TaskKind("referral-follow-up", "Confirm that {name} booked the referral appointment", ("",), ("PRV-112",)),
    TaskKind("consent-scan", "Scan the signed consent form of {name} into the chart", ("",), ("PRV-112", "")),
)
TASK_STATUSES = ("requested", "requested", "requested", "requested", "accepted", "accepted", "in-progress",
                 "completed", "completed", "completed", "completed", "cancelled", "on-hold", "draft")
TASK_NOTES = ("", "", "", "Parent prefers text messages", "Interpreter needed: Spanish",
              "Left voicemail on first attempt")


def make_tasks(rng: random.Random, visits: list[Visit], patients: list[RegistryPatient]) -> list[Row]:
    """35 valid task rows, sorted by Authored On, without ids yet."""
    usable = [v for v in visits if v.status == "finished" and not v.planted]
    tasks: list[tuple[datetime, Row]] = []
    for visit in rng.sample(usable, 24):
        tasks.append(task_row(rng, visit.patient, visit, visit.end + timedelta(minutes=rng.randint(5, 240))))
    for patient in rng.sample(patients, 11):
        day = rand_day(rng, max(WINDOW_START, patient.dob + timedelta(days=60)), WINDOW_END)
        tasks.append(task_row(rng, patient, None, datetime(day.year, day.month, day.day, rng.randint(8, 17),
                                                            rng.choice((0, 15, 30, 45)))))
    tasks.sort(key=lambda t: (t[0], t[1]["Patient ID"]))
    return [row for _, row in tasks]


def task_row(rng: random.Random, patient: RegistryPatient, visit: Visit | None,
             authored: datetime) -> tuple[datetime, Row]:
    """One valid task about ``patient``, authored at ``authored``."""
    kind = rng.choice(TASK_KINDS)
    clinicians = ("peds", "family", "adult", "elder", "emergency")
    if visit is not None and visit.provider and BY_ID[visit.provider].role in clinicians:
        requester = visit.provider
    else:
        requester = rng.choice(providers_for("family", "adult", "peds"))
    due = authored + timedelta(days=rng.randint(2, 60))
    return authored, {
        "Task ID": "", "Patient ID": patient.pid, "Visit ID": visit.vid if visit else "",
        "Status": rng.choice(TASK_STATUSES), "Intent": rng.choice(("order", "order", "order", "plan", "proposal")),
        "Priority": rng.choice(("routine", "routine", "routine", "urgent", "asap", "")),
        "Code": kind.code, "Description": kind.description.format(name=f"{patient.first} {patient.last}"),
        "Requester ID": requester, "Owner ID": rng.choice(kind.owners), "Authored On": iso(authored),
        "Due": iso(due.replace(hour=17, minute=0)), "Note": rng.choice(TASK_NOTES), "Input": rng.choice(kind.inputs),
    }


LONG_DESCRIPTION = padded(
    "Outreach script pasted into the task: introduce yourself, confirm the patient's identity with name and date "
    "of birth, explain that the registry shows a vaccination due, offer the next three appointment slots, record "
    "the preferred contact channel and any language needs, and close the task when an appointment is booked. ",
    2010,
)
TASK_DEFECTS: tuple[tuple[str, str, str, str], ...] = (
    ("enum", "Status", "waiting", "Status 'waiting': not a task status (requested, accepted, on-hold ...)"),
    ("enum", "Intent", "maybe", "Intent 'maybe': not unknown, proposal, plan, order ..."),
    ("enum", "Priority", "high", "Priority 'high': not routine, urgent, asap or stat"),
    ("max-length", "Description", LONG_DESCRIPTION, "Description of 2,010 characters; limit 2,000"),
    ("unresolved-reference", "Owner ID", MISSING_PROVIDER, f"Owner ID {MISSING_PROVIDER} is not in providers.csv"),
)


def plant_tasks(rows: list[Row]) -> list[Planted]:
    """Insert 5 planted tasks (each a copy of a valid one with one defect), number all, return the planted."""
    positions = (5, 13, 21, 29, 36)
    for (code, column, value, _), pos in zip(TASK_DEFECTS, positions, strict=True):
        template = dict(rows[pos - 1])
        template["Task ID"] = f"planted:{code}:{column}"
        template[column] = value
        rows.insert(pos, template)
    planted = []
    for n, row in enumerate(rows, start=1):
        marker = row["Task ID"]
        row["Task ID"] = f"TSK-{n:04d}"
        if marker:
            _, code, column = marker.split(":")
            why = next(d[3] for d in TASK_DEFECTS if d[0] == code and d[1] == column)
            planted.append(Planted("tasks.csv", n + 1, code, column, row[column], why))
    return planted


# --------------------------------------------------------------------------- Synthea


def uid(rng: random.Random) -> str:
    """A version-4 UUID drawn from ``rng`` (so it is reproducible)."""
    return str(uuid.UUID(int=rng.getrandbits(128), version=4))


def synthea_name(rng: random.Random, name: str) -> str:
    """Synthea appends digits to generated names: ``Jose871``."""
    return f"{ascii_fold(name) if rng.random() < 0.5 else name}{rng.randint(100, 999)}"


SYN_PEOPLE: tuple[tuple[str, str, str, str, str, str], ...] = (
    # first, last, gender, race, ethnicity, birth year range "lo-hi"
    ("José", "Gutiérrez", "M", "white", "hispanic", "2017-2020"),
    ("Mariana", "Pfeffer", "F", "white", "nonhispanic", "2018-2021"),
    ("Kristopher", "Kuhlman", "M", "black", "nonhispanic", "2015-2018"),
    ("Shirley", "Bogan", "F", "white", "nonhispanic", "1958-1968"),
    ("Dewayne", "Runolfsson", "M", "black", "nonhispanic", "1975-1990"),
    ("Hyun", "Mraz", "F", "asian", "nonhispanic", "1980-1995"),
    ("Tomás", "Ortiz", "M", "white", "hispanic", "1970-1985"),
    ("Yvonne", "Schmitt", "F", "white", "nonhispanic", "1940-1950"),
    ("Lakisha", "Hane", "F", "black", "nonhispanic", "1985-1999"),
    ("Gerardo", "Gleichner", "M", "native", "hispanic", "1945-1954"),
)
SYN_PLACES: tuple[tuple[str, str, str, str, float, float], ...] = (
    # city, county, FIPS, ZIP, latitude, longitude (Massachusetts)
    ("Boston", "Suffolk County", "25025", "02134", 42.3554, -71.1316),
    ("Cambridge", "Middlesex County", "25017", "02139", 42.3646, -71.1028),
    ("Worcester", "Worcester County", "25027", "01608", 42.2626, -71.8023),
    ("Springfield", "Hampden County", "25013", "01103", 42.1015, -72.5898),
    ("Quincy", "Norfolk County", "25021", "02169", 42.2529, -71.0023),
)
SYN_STREETS = ("Hickle Ferry", "Kuhn Way", "Gleason Gateway", "Schowalter Loaf", "Rempel Mall", "Bartell Knoll",
               "Pouros Rapid", "Lesch Green")
#: CVX code -> Synthea's description.
SYN_VACCINES: dict[str, str] = {
    "08": "Hep B, adolescent or pediatric", "20": "DTaP", "10": "IPV", "49": "Hib (PRP-OMP)",
    "133": "Pneumococcal conjugate PCV 13", "116": "rotavirus, pentavalent", "03": "MMR", "21": "varicella",
    "83": "Hep A, ped/adol, 2 dose", "115": "Tdap", "114": "meningococcal MCV4P", "62": "HPV, quadrivalent",
    "140": "Influenza, seasonal, injectable, preservative free", "187": "zoster recombinant",
    "33": "pneumococcal polysaccharide vaccine, 23 valent", "43": "Hep B, adult",
    "208": "SARS-COV-2 (COVID-19) vaccine, mRNA, spike protein, LNP, preservative free, 30 mcg/0.3mL dose",
}
#: Encounter class -> (SNOMED code, description, reason code, reason description, base cost).
SYN_ENCOUNTERS: dict[str, tuple[str, str, str, str, str]] = {
    "wellness": ("410620009", "Well child visit (procedure)", "", "", "136.80"),
    "ambulatory": ("185345009", "Encounter for symptom (procedure)", "444814009", "Viral sinusitis (disorder)",
                   "85.55"),
    "outpatient": ("185349003", "Encounter for check up (procedure)", "", "", "85.55"),
    "urgentcare": ("702927004", "Urgent care clinic (environment)", "65363002", "Otitis media (disorder)", "142.58"),
    "emergency": ("50849002", "Emergency room admission (procedure)", "44465007", "Sprain of ankle (disorder)",
                  "146.18"),
    "inpatient": ("32485007", "Hospital admission (procedure)", "233604007", "Pneumonia (disorder)", "106.34"),
}


def synthea_vaccines(rng: random.Random, age: int, visit_no: int) -> list[str]:
    """CVX codes given at a wellness visit at ``age`` (a rough schedule)."""
    if age < 1:
        return [("08", "20", "10", "49", "133", "116")[i] for i in sorted(rng.sample(range(6), 3))]
    if age < 2:
        return ["03", "21", "83"][: rng.randint(2, 3)]
    if age < 7:
        return ["140", "20"] if visit_no % 2 == 0 else ["140"]
    if age < 19:
        return ["140", "115", "114", "62"][: rng.randint(1, 3)]
    if age < 50:
        return ["140"] + (["115"] if visit_no == 0 else ["208"] if rng.random() < 0.5 else [])
    return ["140", rng.choice(("187", "33", "208", "43"))]


def write_synthea(rng: random.Random, out: Path) -> dict[str, int]:
    """A tiny Synthea CSV export in ``out``; returns the row count of each file."""
    out.mkdir(exist_ok=True)
    orgs = []
    for name, (city, _, _, zip_code, lat, lon) in zip(("Riverside Community Health", "Harbor Pediatrics"),
                                                      SYN_PLACES[:2], strict=True):
        orgs.append({"Id": uid(rng), "NAME": name, "ADDRESS": f"{rng.randint(10, 999)} {rng.choice(SYN_STREETS)}",
                     "CITY": city, "STATE": "MA", "ZIP": zip_code, "LAT": f"{lat + 0.01:.6f}",
                     "LON": f"{lon - 0.01:.6f}", "PHONE": f"617-555-01{rng.randint(0, 99):02d}",
                     "REVENUE": "0.0", "UTILIZATION": "0"})
    payers = [{"Id": uid(rng), "NAME": name, "OWNERSHIP": owner, "ADDRESS": address, "CITY": city,
               "STATE_HEADQUARTERED": state, "ZIP": zip_code, "PHONE": phone}
              for name, owner, address, city, state, zip_code, phone in (
                  ("Medicaid", "GOVERNMENT", "7500 Security Blvd", "Baltimore", "MD", "21244", "1-877-267-2323"),
                  ("Blue Cross Blue Shield", "PRIVATE", "101 Huntington Ave", "Boston", "MA", "02199",
                   "1-800-262-2583"),
                  ("NO_INSURANCE", "NO_INSURANCE", "", "", "", "", ""))]
    providers = []
    for first, last, gender, speciality, org in (("Ted", "Reilly", "M", "GENERAL PRACTICE", 0),
                                                 ("Mirella", "Quitzon", "F", "GENERAL PRACTICE", 0),
                                                 ("Alvaro", "Ibáñez", "M", "PEDIATRICS", 1),
                                                 ("Nakia", "Wolff", "F", "INTERNAL MEDICINE", 0)):
        o = orgs[org]
        providers.append({"Id": uid(rng), "ORGANIZATION": o["Id"], "NAME": f"{synthea_name(rng, first)} "
                          f"{synthea_name(rng, last)}", "GENDER": gender, "SPECIALITY": speciality,
                          "ADDRESS": o["ADDRESS"], "CITY": o["CITY"], "STATE": "MA", "ZIP": o["ZIP"],
                          "LAT": o["LAT"], "LON": o["LON"], "UTILIZATION": "0"})

    patients, encounters, immunizations = [], [], []
    for first, last, gender, race, ethnicity, years in SYN_PEOPLE:
        lo, hi = (int(y) for y in years.split("-"))
        dob = rand_day(rng, date(lo, 1, 1), date(hi, 12, 31))
        city, county, fips, zip_code, lat, lon = rng.choice(SYN_PLACES)
        adult = age_on(dob, date(2025, 6, 30)) >= 18
        married = adult and rng.random() < 0.6
        pid = uid(rng)
        patients.append({
            "Id": pid, "BIRTHDATE": dob.isoformat(), "DEATHDATE": "",
            "SSN": f"999-{rng.randint(10, 99)}-{rng.randint(1000, 9999)}",
            "DRIVERS": f"S999{rng.randint(10000, 99999)}" if adult else "",
            "PASSPORT": f"X{rng.randint(10000000, 99999999)}X" if adult and rng.random() < 0.6 else "",
            "PREFIX": ("Mr." if gender == "M" else "Mrs." if married else "Ms.") if adult else "",
            "FIRST": synthea_name(rng, first), "MIDDLE": "", "LAST": synthea_name(rng, last), "SUFFIX": "",
            "MAIDEN": synthea_name(rng, rng.choice(("Hegmann", "Lowe", "Dach"))) if married and gender == "F" else "",
            "MARITAL": ("M" if married else "S") if adult else "", "RACE": race, "ETHNICITY": ethnicity,
            "GENDER": gender, "BIRTHPLACE": f"{rng.choice(SYN_PLACES)[0]}  Massachusetts  US",
            "ADDRESS": f"{rng.randint(10, 999)} {rng.choice(SYN_STREETS)}"
                       + (f" Unit {rng.randint(1, 90)}" if rng.random() < 0.3 else ""),
            "CITY": city, "STATE": "Massachusetts", "COUNTY": county, "FIPS": fips, "ZIP": zip_code,
            "LAT": f"{lat + rng.uniform(-0.02, 0.02):.6f}", "LON": f"{lon + rng.uniform(-0.02, 0.02):.6f}",
            "HEALTHCARE_EXPENSES": f"{rng.uniform(2000, 900000):.2f}",
            "HEALTHCARE_COVERAGE": f"{rng.uniform(0, 50000):.2f}", "INCOME": str(rng.randint(18, 160) * 1000),
        })
        payer = payers[0] if not adult or rng.random() < 0.3 else rng.choice(payers[1:])
        classes = ["wellness"] * (3 if not adult else 2) + [rng.choice(("ambulatory", "urgentcare", "emergency",
                                                                         "outpatient", "inpatient"))]
        days = sorted(rand_day(rng, max(WINDOW_START, dob + timedelta(days=30)), WINDOW_END) for _ in classes)
        rng.shuffle(classes)
        wellness_no = 0
        for cls, day in zip(classes, days, strict=True):
            provider = providers[2] if not adult and cls == "wellness" else rng.choice(
                [providers[0], providers[1], providers[3]])
            start = datetime(day.year, day.month, day.day, rng.randint(0, 23), rng.randint(0, 59), rng.randint(0, 59))
            minutes = rng.randint(2 * 1440, 5 * 1440) if cls == "inpatient" else rng.randint(15, 60)
            code, description, reason, reason_text, base = SYN_ENCOUNTERS[cls]
            if cls == "wellness" and adult:
                code, description = "162673000", "General examination of patient (procedure)"
            eid = uid(rng)
            vaccines = synthea_vaccines(rng, age_on(dob, day), wellness_no) if cls == "wellness" else []
            wellness_no += cls == "wellness"
            costs = [rng.choice(("140.52", "136.00")) for _ in vaccines]
            total = float(base) + sum(float(c) for c in costs)
            covered = 0.0 if payer["NAME"] == "NO_INSURANCE" else round(total * rng.uniform(0.6, 0.95), 2)
            encounters.append({
                "Id": eid, "START": start.strftime("%Y-%m-%dT%H:%M:%SZ"),
                "STOP": (start + timedelta(minutes=minutes)).strftime("%Y-%m-%dT%H:%M:%SZ"), "PATIENT": pid,
                "ORGANIZATION": provider["ORGANIZATION"], "PROVIDER": provider["Id"], "PAYER": payer["Id"],
                "ENCOUNTERCLASS": cls, "CODE": code, "DESCRIPTION": description, "BASE_ENCOUNTER_COST": base,
                "TOTAL_CLAIM_COST": f"{total:.2f}", "PAYER_COVERAGE": f"{covered:.2f}", "REASONCODE": reason,
                "REASONDESCRIPTION": reason_text,
            })
            for cvx, cost in zip(vaccines, costs, strict=True):
                immunizations.append({"DATE": start.strftime("%Y-%m-%dT%H:%M:%SZ"), "PATIENT": pid, "ENCOUNTER": eid,
                                      "CODE": cvx, "DESCRIPTION": SYN_VACCINES[cvx], "BASE_COST": cost})
    encounters.sort(key=lambda e: (e["START"], e["Id"]))
    immunizations.sort(key=lambda i: (i["DATE"], i["ENCOUNTER"], i["CODE"]))
    for p in providers:
        p["UTILIZATION"] = str(sum(e["PROVIDER"] == p["Id"] for e in encounters))
    for o in orgs:
        o["UTILIZATION"] = str(sum(e["ORGANIZATION"] == o["Id"] for e in encounters))
        o["REVENUE"] = f"{sum(float(e['TOTAL_CLAIM_COST']) for e in encounters if e['ORGANIZATION'] == o['Id']):.2f}"
    files = {"patients.csv": patients, "organizations.csv": orgs, "payers.csv": payers, "providers.csv": providers,
             "encounters.csv": encounters, "immunizations.csv": immunizations}
    for name, rows in files.items():
        write_csv(out / name, list(rows[0]), [list(r.values()) for r in rows])
    return {name: len(rows) for name, rows in files.items()}


# --------------------------------------------------------------------------- CVRS

CVRS_FIELDS: tuple[str, ...] = (
    "vax_event_id", "ext_type", "pprl_id", "recip_id", "recip_first_name", "recip_middle_name", "recip_last_name",
    "recip_dob", "recip_sex", "recip_address_street", "recip_address_street_2", "recip_address_city",
    "recip_address_county", "recip_address_state", "recip_address_zip", "recip_race_1", "recip_race_2",
    "recip_race_3", "recip_race_4", "recip_race_5", "recip_race_6", "recip_ethnicity", "admin_date", "cvx", "ndc",
    "mvx", "lot_number", "vax_expiration", "vax_admin_site", "vax_route", "dose_num", "vax_series_complete",
    "responsible_org", "admin_name", "vtrcks_prov_pin", "admin_type", "admin_address_street",
    "admin_address_street_2", "admin_address_city", "admin_address_county", "admin_address_state",
    "admin_address_zip", "vax_refusal", "cmorbid_status", "serology",
)
assert len(CVRS_FIELDS) == 45
#: CVX -> (MVX, NDC, lots, days to the second dose).
CVRS_PRODUCTS: dict[str, tuple[str, str, tuple[str, ...], int]] = {
    "208": ("PFR", "59267-1000-01", ("EK5730", "EL9261", "EN6201", "FA7484"), 21),
    "207": ("MOD", "80777-0273-10", ("011J20A", "025J20-2A", "039K20A", "030M20A"), 28),
}
CVRS_PEOPLE: tuple[tuple[str, str, str, str], ...] = (
    # first, middle, last, sex
    ("Rosa", "María", "Delgado", "F"), ("Kwame", "", "Asante", "M"), ("Eleanor", "J", "Whitaker", "F"),
    ("Björn", "", "Halvorsen", "M"), ("Thi", "Thu", "Nguyen", "F"), ("Patrick", "", "O'Sullivan", "M"),
    ("Amina", "", "Yusuf", "F"), ("Robin", "", "Castellano", "U"), ("Harold", "E", "Pruitt", "M"),
    ("Ines", "", "Carvalho-Lima", "F"), ("Dmitri", "", "Volkov", "M"), ("Chloé", "", "Lefèvre", "F"),
    ("Marcus", "A", "Bell", "M"), ("Ayesha", "", "Siddiqui", "F"),
)
CVRS_SITES = (("Boston", "25025", "MA", "02118"), ("Quincy", "25021", "MA", "02169"),
              ("Providence", "44007", "RI", "02903"), ("Hartford", "09003", "CT", "06106"))
RACES = ("2106-3", "2106-3", "2054-5", "2028-9", "2131-1", "UNK")
ETHNICITIES = ("2186-5", "2186-5", "2135-2", "UNK")
ADMIN = {"responsible_org": "Riverside Community Health", "admin_name": "Riverside Community Health Main Clinic",
         "vtrcks_prov_pin": "MA1234", "admin_type": "1", "admin_address_street": "200 Riverside Ave",
         "admin_address_street_2": "", "admin_address_city": "Boston", "admin_address_county": "25025",
         "admin_address_state": "MA", "admin_address_zip": "02118"}


def cvrs_recipient(rng: random.Random, first: str, middle: str, last: str, sex: str) -> Row:
    """The recipient fields of one person."""
    city, county, state, zip_code = rng.choice(CVRS_SITES)
    race = rng.choice(RACES)
    return {
        "ext_type": "I", "pprl_id": "", "recip_id": f"IIS-{rng.randint(1_000_000, 9_999_999)}",
        "recip_first_name": first, "recip_middle_name": middle, "recip_last_name": last,
        "recip_dob": rand_day(rng, date(1935, 1, 1), date(2005, 12, 31)).isoformat(), "recip_sex": sex,
        "recip_address_street": f"{rng.randint(2, 999)} {rng.choice(('Maple', 'Oak', 'Harbor', 'Union'))} St",
        "recip_address_street_2": f"Apt {rng.randint(1, 30)}" if rng.random() < 0.3 else "",
        "recip_address_city": city, "recip_address_county": county, "recip_address_state": state,
        "recip_address_zip": zip_code, "recip_race_1": race,
        "recip_race_2": "2054-5" if race == "2106-3" and rng.random() < 0.15 else "",
        "recip_race_3": "", "recip_race_4": "", "recip_race_5": "", "recip_race_6": "",
        "recip_ethnicity": rng.choice(ETHNICITIES),
    }


def cvrs_doses(rng: random.Random, person: Row, count: int) -> list[Row]:
    """``count`` doses of one product for ``person``: a primary series and perhaps a booster."""
    cvx = rng.choice(tuple(CVRS_PRODUCTS))
    mvx, ndc, lots, gap = CVRS_PRODUCTS[cvx]
    day = rand_day(rng, date(2021, 1, 4), date(2021, 9, 30))
    rows = []
    for n in range(1, count + 1):
        rows.append({
            **person, "admin_date": day.isoformat(), "cvx": cvx, "ndc": ndc, "mvx": mvx, "lot_number": rng.choice(lots),
            "vax_expiration": (day + timedelta(days=rng.randint(30, 150))).isoformat(),
            "vax_admin_site": rng.choice(("LD", "RD", "LA", "RA")), "vax_route": "C28161", "dose_num": str(n),
            "vax_series_complete": "YES" if n >= 2 else "NO", **ADMIN, "vax_refusal": "NO",
            "cmorbid_status": rng.choice(("NO", "NO", "YES", "UNK")), "serology": "UNK",
        })
        day += timedelta(days=gap if n == 1 else rng.randint(160, 240))
    return rows


def write_cvrs(rng: random.Random, out: Path) -> dict[str, int]:
    """The identified and the redacted CVRS extract in ``out``; returns their row counts."""
    out.mkdir(exist_ok=True)
    counts = (3, 2, 2, 3, 1, 2, 3, 2, 2, 3, 1, 2, 3)
    rows: list[Row] = []
    for (first, middle, last, sex), count in zip(CVRS_PEOPLE[:-1], counts, strict=True):
        person = cvrs_recipient(rng, first, middle, last, sex)
        if count == 1:
            person["recip_dob"] = person["recip_dob"][:7]  # CVRS allows a year and month alone
        rows += cvrs_doses(rng, person, count)
    refuser = cvrs_recipient(rng, *CVRS_PEOPLE[-1])
    refusal = cvrs_doses(rng, refuser, 1)[0]
    refusal.update({"ndc": "", "mvx": "", "lot_number": "", "vax_expiration": "", "vax_admin_site": "",
                    "vax_route": "", "dose_num": "", "vax_series_complete": "NO", "vax_refusal": "YES"})
    rows.append(refusal)
    rows.sort(key=lambda r: (r["admin_date"], r["recip_id"]))
    for n, row in enumerate(rows, start=1):
        row["vax_event_id"] = f"EVT-{n:06d}"

    redacted: list[Row] = []
    for n in range(1, 6):
        person = cvrs_recipient(rng, "", "", "", rng.choice("MFU"))
        person.update({"ext_type": "D", "recip_id": f"{rng.getrandbits(64):016x}",
                       "recip_dob": person["recip_dob"][:7]})
        for name in ("recip_first_name", "recip_middle_name", "recip_last_name", "recip_address_street",
                     "recip_address_street_2", "recip_address_city"):
            person[name] = "Redacted"
        dose = cvrs_doses(rng, person, 1)[0]
        dose["vax_event_id"] = f"RED-{n:06d}"
        redacted.append(dose)
    for name, records in (("cvrs_extract.tsv", rows), ("cvrs_redacted.tsv", redacted)):
        lines = ["\t".join(CVRS_FIELDS)] + ["\t".join(r[f] for f in CVRS_FIELDS) for r in records]
        (out / name).write_text("\n".join(lines) + "\n", encoding="utf-8", newline="")
    return {"cvrs_extract.tsv": len(rows), "cvrs_redacted.tsv": len(redacted)}


# --------------------------------------------------------------------------- README


def readme_part(counts: dict[str, int], planted: list[Planted]) -> list[str]:
    """This script's part of ``README.md``, between its markers."""
    syn = {name.removeprefix("synthea/"): n for name, n in counts.items() if name.startswith("synthea/")}
    lines = [
        BEGIN_MARK,
        "",
        "## Practitioners, visits, documents and tasks",
        "",
        "Files that go with `registry.csv`: practitioners, the visits of the registry's patients, letters",
        "and summaries about them, and follow-up tasks. They name the registry's patients by `Patient ID`",
        "(only patients none of whose registry rows is planted), the practitioners by `Provider ID`, the",
        "visits by `Visit ID`. All five load together:",
        "",
        "```sh",
        ".venv/bin/clinik-etl load sample_data/registry.csv sample_data/providers.csv sample_data/visits.csv \\",
        "    sample_data/documents.csv sample_data/tasks.csv",
        "```",
        "",
        "Given together, their references resolve; given alone, a visit, document or task names a patient",
        "in no file of the run and is rejected as `unresolved-reference` (unless `validate --state` names the",
        "state store of the load that created them). Together, `clinik-etl validate` rejects the",
        f"registry's planted rejects and the {len(planted)} rows of `planted_more.csv`, and finds every other "
        "row valid.",
        "",
        "| file | what |",
        "| --- | --- |",
        f"| `providers.csv` | {counts['providers.csv']} practitioners |",
        f"| `visits.csv` | {counts['visits.csv']} visits |",
        f"| `documents.csv` | {counts['documents']} documents in {counts['documents.csv']} rows, one row per section |",
        f"| `tasks.csv` | {counts['tasks.csv']} follow-up tasks |",
        "| `planted_more.csv` | every row of these four files that an import must reject |",
        "| `synthea/` | a tiny Synthea CSV export, valid, no planted rows |",
        "| `cvrs/` | two CDC CVRS extracts (identified and redacted), no planted rows; with `--profile cvrs` the "
        "identified one is valid and every redacted row is rejected as `redacted` |",
        "| `make_more_samples.py` | their generator |",
        "",
        "Regenerate after `make_samples.py` (which rewrites this README; this script appends its part",
        "again, between HTML comment markers). Deterministic: a fixed seed, the standard library only:",
        "",
        "```sh",
        ".venv/bin/python sample_data/make_more_samples.py",
        "```",
        "",
        "### `providers.csv`",
        "",
        "| column | content |",
        "| --- | --- |",
        "| Provider ID | `PRV-101` to `PRV-112` |",
        "| NPI | 10 digits with a valid check digit; empty for the nurse and the medical assistant |",
        "| First Name, Last Name | with accents and an apostrophe (`Lucía`, `O'Neill`) |",
        "| Prefix | `Dr.` or empty |",
        "| Suffix | `MD`, `DO`, `RN`, `PharmD` ...; two as a `;`-list (`MD;MPH`) |",
        "| Gender | `M` or `F` |",
        "| Email | under `riverside.example.org` |",
        "| Phone | `(617) 555-01xx` |",
        "| Specialty | `Pediatrics`, `Family Medicine`, `Nursing` ... |",
        "",
        "### `visits.csv`",
        "",
        "One row per visit, sorted by Start. Most visits are the days the registry records vaccinations",
        "for the patient; the others are illnesses and follow-ups between 2019 and mid-2025, and four",
        "planned visits in 2027.",
        "",
        "| column | content |",
        "| --- | --- |",
        "| Visit ID | `V-00001` ... |",
        "| Patient ID | a registry patient |",
        "| Provider ID | a practitioner; empty on a few rows |",
        "| Status | mostly `finished`; 4 `planned`, 4 `cancelled` |",
        "| Visit Type | registry words: `ambulatory`, `outpatient`, `wellness`, `inpatient`, `emergency`, "
        "`urgent care`, `home health`, `virtual`, `telehealth`; a few capitalised (`Wellness`, `Urgent Care`) |",
        "| Start, End | `2023-04-05T09:00:00`, End after Start; an inpatient stay lasts at most 5 days |",
        "| Length | minutes; empty (an import computes it) except on 10 valid rows, where it equals End minus Start, "
        "and on the planted `20000` |",
        "| Reason | `Routine immunization`, `Fever and sore throat` ... |",
        "| Location, Organization | `Exam Room 4`, `Ward 5B, Bed 12` ...; three fictitious organizations |",
        "| Diagnosis 1 to 3 | ICD-10 (`Z23`, `J18.9`) or SNOMED CT (`444814009`) codes; an import joins them "
        "into one list |",
        "",
        "### `documents.csv`",
        "",
        "One row per section; the rows of a document are contiguous and repeat its document-level cells.",
        "",
        "| column | content |",
        "| --- | --- |",
        "| Document ID | `DOC-0001` ...: groups the section rows |",
        "| Patient ID, Author ID | a registry patient; a practitioner |",
        "| Visit ID | a visit of the same patient, or empty (reminder letters) |",
        "| Status | `final`, a few `preliminary` and `amended` |",
        "| Type | `referral-letter`, `discharge-summary`, `immunization-summary`, `visit-summary`, "
        "`patient-letter` |",
        "| Title | `Referral to cardiology`, `Discharge summary` ... |",
        "| Date | `2023-04-05T14:30:00`, after the visit |",
        "| Confidentiality | `N`, some `R`, `V` or empty |",
        "| Category | a `;`-list: `correspondence;referral` |",
        "| Section Title, Section Text | one to four sections a document; the `Advice` texts hold an embedded "
        "newline (quoted in the CSV) |",
        "| Section Mode | `snapshot`, `working` (preliminary), `changes` (amended) or empty |",
        "",
        "### `tasks.csv`",
        "",
        "| column | content |",
        "| --- | --- |",
        "| Task ID | `TSK-0001` ... |",
        "| Patient ID, Visit ID | a registry patient; one of their visits or empty |",
        "| Status, Intent, Priority | `requested`, `completed` ...; `order`, `plan`, `proposal`; "
        "`routine`, `urgent`, `asap` or empty |",
        "| Code, Description | `immunization-reminder`, `follow-up-call` ...; a sentence |",
        "| Requester ID, Owner ID | practitioners; Owner ID empty on some rows |",
        "| Authored On, Due | ISO date-times, Due after Authored On |",
        "| Note | mostly empty |",
        "| Input | `;`-separated `type=value` pairs: `reminder-type=sms;dose=2` |",
        "",
        "### `synthea/`",
        "",
        "A Synthea-format export (upper-case headers, UUID ids, names with Synthea's trailing digits such",
        "as `Jose871`, timestamps `2019-02-17T05:07:38Z`). Every PATIENT, ENCOUNTER, PROVIDER,",
        "ORGANIZATION and PAYER reference names a row of the export.",
        "",
        "| file | rows | columns |",
        "| --- | --- | --- |",
        f"| `patients.csv` | {syn['patients.csv']} | Id, BIRTHDATE, DEATHDATE, SSN, DRIVERS, PASSPORT, PREFIX, FIRST, "
        "MIDDLE, LAST, SUFFIX, MAIDEN, MARITAL, RACE, ETHNICITY, GENDER (`M`/`F`), BIRTHPLACE, ADDRESS, CITY, STATE, "
        "COUNTY, FIPS, ZIP, LAT, LON, HEALTHCARE_EXPENSES, HEALTHCARE_COVERAGE, INCOME |",
        f"| `organizations.csv` | {syn['organizations.csv']} | Id, NAME, ADDRESS, CITY, STATE, ZIP, LAT, LON, PHONE, "
        "REVENUE, UTILIZATION |",
        f"| `payers.csv` | {syn['payers.csv']} | Id, NAME, OWNERSHIP, ADDRESS, CITY, STATE_HEADQUARTERED, ZIP, "
        "PHONE (a subset of Synthea's columns) |",
        f"| `providers.csv` | {syn['providers.csv']} | Id, ORGANIZATION, NAME, GENDER, SPECIALITY, "
        "ADDRESS, CITY, STATE, ZIP, LAT, LON, UTILIZATION |",
        f"| `encounters.csv` | {syn['encounters.csv']} | Id, START, STOP, PATIENT, ORGANIZATION, PROVIDER, PAYER, "
        "ENCOUNTERCLASS (`wellness`, `ambulatory`, `outpatient`, `urgentcare`, `emergency`, `inpatient`), CODE "
        "(SNOMED CT), DESCRIPTION, BASE_ENCOUNTER_COST, TOTAL_CLAIM_COST, PAYER_COVERAGE, REASONCODE, "
        "REASONDESCRIPTION |",
        f"| `immunizations.csv` | {syn['immunizations.csv']} | DATE, PATIENT, ENCOUNTER, CODE (CVX: `140`, `08`, "
        "`133` ...), DESCRIPTION, BASE_COST; DATE is the encounter's START |",
        "",
        "### `cvrs/`",
        "",
        "CDC COVID-19 Vaccination Reporting Specification extracts: UTF-8, tab-delimited, a header row",
        "with the 45 fields in the specification's order, one row per vaccination event.",
        "",
        f"- `cvrs_extract.tsv`: {counts['cvrs_extract.tsv']} events of {len(CVRS_PEOPLE)} recipients, "
        "`ext_type` `I` (identified: names",
        "  and streets present). `recip_dob` is `YYYY-MM-DD`, except on the rows of two recipients with a",
        "  single dose, written `YYYY-MM`; `recip_sex` `M`, `F` or `U`; `admin_date` `YYYY-MM-DD`; `cvx`",
        "  `207`/`208` with `mvx` `MOD`/`PFR`, their NDC and lots; `vax_route` `C28161`; `vax_refusal` `NO`,",
        "  except one `YES` row (a refusal: lot, NDC, MVX, expiration, site, route and dose number empty).",
        f"- `cvrs_redacted.tsv`: {counts['cvrs_redacted.tsv']} events, `ext_type` `D`; the name, street and "
        "city fields hold",
        "  `Redacted`, `recip_dob` is `YYYY-MM`, `recip_id` a 16-digit hexadecimal key. The built-in `cvrs`",
        "  profile rejects such rows (code `redacted`) rather than create patients named `Redacted`.",
        "",
    ]
    lines += [
        f"## Planted rejects in the new files ({len(planted)} rows, listed in `planted_more.csv`)",
        "",
        "Each planted visit, task and provider row has exactly one defect. A document is rejected as a",
        "whole: the row that breaks a limit carries its code, the document's other rows carry",
        "`document-rejected`. Too many sections is a fault of every row of the document, so all 51 rows",
        "of that one carry `max-items`. The planted documents with a document-level defect",
        "(Confidentiality, Visit ID) have a single section, so the defect sits on exactly one row.",
        "Runs of rows with the same code and value are shown as a range.",
        "`row` is the row a spreadsheet user sees (header = 1).",
        "",
        "| file | row | column | value | code | why |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    i = 0
    while i < len(planted):
        p = planted[i]
        j = i
        if p.source_file == "documents.csv":
            while (j + 1 < len(planted) and planted[j + 1].code == p.code and planted[j + 1].column == p.column
                   and planted[j + 1].source_row == planted[j].source_row + 1):
                j += 1
        rows = str(p.source_row) if i == j else f"{p.source_row}–{planted[j].source_row}"
        value = md_cell(p.value)
        if planted[j].value != p.value:
            value += f" to {md_cell(planted[j].value)}"
        lines.append(f"| `{p.source_file}` | {rows} | {p.column} | {value} | `{p.code}` | "
                     f"{p.description} |")
        i = j + 1
    return [*lines, "", END_MARK]


def update_readme(part: list[str]) -> None:
    """Replace this script's part of ``README.md``, or append it; the rest is left as it is."""
    text = README.read_text(encoding="utf-8")
    if BEGIN_MARK in text and END_MARK in text:
        head, rest = text.split(BEGIN_MARK, 1)
        tail = rest.split(END_MARK, 1)[1]
        text = head.rstrip("\n") + "\n\n" + "\n".join(part) + tail
    else:
        text = text.rstrip("\n") + "\n\n" + "\n".join(part) + "\n"
    README.write_text(text, encoding="utf-8")


# --------------------------------------------------------------------------- main


def write_rows(name: str, headers: Sequence[str], rows: Sequence[Row]) -> None:
    """``rows`` as a CSV next to this script, in ``headers`` order."""
    write_csv(OUT_DIR / name, headers, [[row[h] for h in headers] for row in rows])


def main() -> None:
    """Generate every file this script owns."""
    rng = random.Random(SEED)
    patients = read_registry()

    providers = provider_rows(rng)
    bad_index = next(i for i, p in enumerate(PROVIDERS) if p.pid == BAD_PROVIDER)
    planted = [Planted("providers.csv", bad_index + 2, "max-length", "Specialty", LONG_SPECIALTY,
                       "Specialty of 210 characters (a pasted credentials line); limit 200")]

    visits = make_visits(rng, patients)
    planted_visits = plant_visits(rng, visits)
    row_of = {v.vid: n for n, v in enumerate(visits, start=2)}
    planted += [Planted("visits.csv", row_of[v.vid], d.code, d.column, d.value, d.description)
                for v, d in planted_visits]

    docs, doc_defects = make_documents(rng, visits, patients, planted_visits)
    doc_rows, doc_planted = plant_documents(docs, doc_defects)
    planted += doc_planted

    tasks = make_tasks(rng, visits, patients)
    planted += plant_tasks(tasks)

    write_rows("providers.csv", PROVIDER_HEADERS, providers)
    write_rows("visits.csv", VISIT_HEADERS, [v.row for v in visits])
    write_rows("documents.csv", DOCUMENT_HEADERS, doc_rows)
    write_rows("tasks.csv", TASK_HEADERS, tasks)
    write_csv(OUT_DIR / "planted_more.csv", ("source_file", "source_row", "code", "column", "value", "description"),
              [[p.source_file, str(p.source_row), p.code, p.column, p.value, p.description] for p in planted])
    synthea = write_synthea(rng, OUT_DIR / "synthea")
    cvrs = write_cvrs(rng, OUT_DIR / "cvrs")

    counts = {"providers.csv": len(providers), "visits.csv": len(visits), "documents": len(docs),
              "documents.csv": len(doc_rows), "tasks.csv": len(tasks), **cvrs,
              **{f"synthea/{name}": n for name, n in synthea.items()}}
    update_readme(readme_part(counts, planted))
    print(f"wrote {len(providers)} providers, {len(visits)} visits, {len(docs)} documents ({len(doc_rows)} rows), "
          f"{len(tasks)} tasks, {len(planted)} planted rejects, a Synthea export and two CVRS extracts to {OUT_DIR}")


if __name__ == "__main__":
    main()
