"""Generate the synthetic vaccine-registry export in ``sample_data/``.

Run from the repository root::

    .venv/bin/python sample_data/make_samples.py

It writes, next to this script:

``registry.csv``
    A UTF-8, comma-delimited registry export with a header row and 560 data
    rows: about 160 patients, each with 1 to 6 vaccinations given between
    2019-01-01 and 2025-06-30 (never before the patient's birth), following a
    realistic childhood, adolescent and adult schedule.
``registry.xlsx``
    The same rows in the sheet ``Vaccinations`` (valid dates as Excel date
    cells, CVX codes, dose amounts, dose numbers and series doses as numbers,
    everything else, ZIP codes included, as text), plus a free-text sheet
    ``Notes``.
``planted.csv``
    The 28 rows planted with exactly one defect each, which the importer must
    reject: ``source_row,code,column,value,description`` where ``source_row``
    is the row a spreadsheet user sees (header = 1) and ``value`` the cell as
    written in the CSV.
``planted_warnings.csv``
    The rows that are valid but must be warned about (unknown CVX codes),
    same columns.
``README.md``
    What the files are, their columns, and tables of the planted rows.

Everything is drawn from one ``random.Random`` with a fixed seed and the
standard library only, so two runs write byte-identical files.
"""

from __future__ import annotations

import csv
import io
import random
import re
import unicodedata
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from pathlib import Path

import xlsxwriter

SEED = 20250630
OUT_DIR = Path(__file__).resolve().parent

N_ROWS = 560
N_PATIENTS = 160
WINDOW_START = date(2019, 1, 1)
WINDOW_END = date(2025, 6, 30)
COVID_START = date(2020, 12, 21)
FIXED_CREATED = datetime(2025, 7, 1, 9, 0, 0)

HEADERS: tuple[str, ...] = (
    "Record ID", "Patient ID", "First Name", "Last Name", "DOB", "Sex", "Phone", "Email", "Street", "City",
    "State", "ZIP", "Admin Date", "CVX", "Vaccine", "Manufacturer", "Lot Number", "Expiration Date", "Route",
    "Site", "Dose Amount", "Dose Unit", "Dose Number", "Series Doses", "Series", "Target Disease", "Status",
    "Notes",
)
PATIENT_COLUMNS: tuple[str, ...] = (
    "Patient ID", "First Name", "Last Name", "DOB", "Sex", "Phone", "Email", "Street", "City", "State", "ZIP",
)
DATE_COLUMNS = ("DOB", "Admin Date", "Expiration Date")
INTEGER_COLUMNS = ("CVX", "Dose Number", "Series Doses")
NUMBER_COLUMNS = ("Dose Amount",)

Row = dict[str, str]


# --------------------------------------------------------------------------- code tables


@dataclass(frozen=True)
class Product:
    """A vaccine as the registry writes it."""

    cvx: str
    display: str
    manufacturers: tuple[str, ...]
    amount: str
    route: str  # "IM", "SQ" or "PO"
    diseases: tuple[str, ...]


PRODUCTS: dict[str, Product] = {
    p.cvx: p
    for p in (
        Product("08", "Hep B, adolescent or pediatric", ("Merck", "GlaxoSmithKline"), "0.5", "IM", ("Hepatitis B",)),
        Product("43", "Hep B, adult", ("Merck", "GlaxoSmithKline"), "1", "IM", ("Hepatitis B",)),
        Product("20", "DTaP", ("Sanofi Pasteur", "GlaxoSmithKline"), "0.5", "IM",
                ("Diphtheria", "Tetanus", "Pertussis")),
        Product("10", "IPV", ("Sanofi Pasteur",), "0.5", "IM", ("Poliomyelitis",)),
        Product("49", "Hib (PRP-OMP)", ("Merck",), "0.5", "IM", ("Haemophilus influenzae type b infection",)),
        Product("116", "rotavirus, pentavalent", ("Merck",), "2", "PO", ("Rotavirus gastroenteritis",)),
        Product("133", "Pneumococcal conjugate PCV 13", ("Pfizer",), "0.5", "IM", ("Pneumococcal disease",)),
        Product("03", "MMR", ("Merck",), "0.5", "SQ", ("Measles", "Mumps", "Rubella")),
        Product("21", "varicella", ("Merck",), "0.5", "SQ", ("Varicella",)),
        Product("83", "Hep A, ped/adol, 2 dose", ("Merck", "GlaxoSmithKline"), "0.5", "IM", ("Hepatitis A",)),
        Product("52", "Hep A, adult", ("GlaxoSmithKline", "Merck"), "1", "IM", ("Hepatitis A",)),
        Product("115", "Tdap", ("Sanofi Pasteur", "GlaxoSmithKline"), "0.5", "IM",
                ("Tetanus", "Diphtheria", "Pertussis")),
        Product("114", "meningococcal MCV4P", ("Sanofi Pasteur",), "0.5", "IM", ("Meningococcal disease",)),
        Product("165", "HPV9", ("Merck",), "0.5", "IM", ("Human papillomavirus infection",)),
        Product("150", "Influenza, injectable, quadrivalent, preservative free",
                ("Sanofi Pasteur", "GlaxoSmithKline", "Seqirus"), "0.5", "IM", ("Influenza",)),
        Product("141", "Influenza, seasonal, injectable", ("Seqirus", "Sanofi Pasteur"), "0.5", "IM", ("Influenza",)),
        Product("88", "influenza, unspecified formulation", ("Seqirus", "Sanofi Pasteur", "GlaxoSmithKline"), "0.5",
                "IM", ("Influenza",)),
        Product("187", "zoster recombinant", ("GlaxoSmithKline",), "0.5", "IM", ("Herpes zoster",)),
        Product("33", "pneumococcal polysaccharide PPV23", ("Merck",), "0.5", "IM", ("Pneumococcal disease",)),
        Product("207", "COVID-19, mRNA, LNP-S, PF, 100 mcg/0.5 mL dose", ("Moderna",), "0.5", "IM", ("COVID-19",)),
        Product("208", "COVID-19, mRNA, LNP-S, PF, 30 mcg/0.3 mL dose", ("Pfizer",), "0.3", "IM", ("COVID-19",)),
        # Real CVX codes that schemas/data/cvx.csv does not list: the planted warnings.
        Product("213", "SARS-COV-2 (COVID-19) vaccine, UNSPECIFIED FORMULATION", ("Pfizer",), "0.3", "IM",
                ("COVID-19",)),
        Product("300", "COVID-19, mRNA, LNP-S, bivalent, PF, 30 mcg/0.3 mL dose", ("Pfizer",), "0.3", "IM",
                ("COVID-19",)),
    )
}
FLU_CODES = ("150", "150", "150", "150", "141", "141", "88")

ROUTE_SPELLINGS: dict[str, tuple[str, ...]] = {
    "IM": ("IM", "IM", "IM", "IM", "Intramuscular", "Intramuscular", "Intramuscular", "C28161", "C28161"),
    "SQ": ("SQ", "SQ", "SQ", "subcutaneous", "subcutaneous"),
    "PO": ("Oral",),
}
SITES_INFANT = ("LT", "RT", "RT", "LT", "Left Thigh", "R thigh")
SITES_ARM = ("LD", "LD", "RD", "Left Deltoid", "L deltoid", "Right Deltoid", "RA", "LA", "RA")
SITES_SQ = ("LA", "RA", "RA", "Left Arm", "R arm")  # subcutaneous: the fatty tissue of the upper arm

FEMALE_NAMES = (
    "Emma", "Olivia", "Sophia", "Ava", "Isabella", "Mia", "Chloé", "Amelia", "Harper", "Aaliyah", "Priya",
    "Mei", "Fatima", "Renée", "Hannah", "Grace", "Maria", "Lucía", "Nora", "Aisha", "Leah", "Camila", "Sofía",
    "Ingrid", "Margaret", "Linda", "Patricia", "Barbara", "Dorothy", "Siobhan", "Keisha", "Yuki", "Ngozi",
    "Ana", "Eleanor", "Naomi", "Rosa", "Thuy", "Joan", "Brigitte",
)
MALE_NAMES = (
    "Liam", "Noah", "Mateo", "Ethan", "James", "Lucas", "Benjamin", "Elijah", "Mohammed", "Arjun", "Wei",
    "Hiroshi", "André", "Darnell", "Kwame", "Diego", "Ryan", "Michael", "Robert", "William", "Thomas",
    "Richard", "Joseph", "Seán", "Connor", "Omar", "Samuel", "François", "Björn", "Tuan", "Malik", "Isaac",
    "Henry", "Gabriel", "Raúl", "Dmitri", "Frank", "Harold", "Luis",
)
LAST_NAMES = (
    "Smith", "Johnson", "Williams", "Brown", "Jones", "Garcia", "Miller", "Davis", "Rodriguez", "Martinez",
    "Hernández", "Lopez", "Gonzalez", "Wilson", "Anderson", "Thomas", "Taylor", "Moore", "Jackson", "Martin",
    "Lee", "Pérez", "Thompson", "White", "Harris", "Sanchez", "Clark", "Ramirez", "Lewis", "Robinson",
    "Walker", "Young", "Allen", "King", "Wright", "Scott", "Torres", "Nguyen", "Hill", "Flores", "Green",
    "Adams", "Nelson", "Baker", "Hall", "Rivera", "Campbell", "Mitchell", "Carter", "Roberts", "O'Connor",
    "D'Angelo", "Patel", "Kim", "Chen", "Okafor", "Kowalski", "Müller", "Núñez", "Brennan", "Sullivan",
    "Haddad", "Cohen", "Tanaka", "Mensah", "Novak", "Lindqvist", "Dubois", "Murphy", "Reyes",
)
#: (city, state, area code, ZIP codes); the New England ones start with a zero.
CITIES: tuple[tuple[str, str, str, tuple[str, ...]], ...] = (
    ("Boston", "MA", "617", ("02134", "02118", "02130", "02215")),
    ("Cambridge", "MA", "617", ("02139", "02138")),
    ("Worcester", "MA", "508", ("01608", "01604")),
    ("Springfield", "MA", "413", ("01103", "01109")),
    ("Providence", "RI", "401", ("02903", "02906")),
    ("Hartford", "CT", "860", ("06103", "06106")),
    ("Portland", "ME", "207", ("04101", "04103")),
    ("Burlington", "VT", "802", ("05401",)),
    ("Manchester", "NH", "603", ("03101", "03104")),
    ("Newark", "NJ", "973", ("07102", "07104")),
    ("New York", "NY", "212", ("10027", "10025", "10003")),
    ("Brooklyn", "NY", "718", ("11215", "11221")),
    ("Philadelphia", "PA", "215", ("19104", "19146")),
    ("Baltimore", "MD", "410", ("21201", "21218")),
    ("Chicago", "IL", "312", ("60614", "60622")),
    ("Columbus", "OH", "614", ("43215", "43201")),
    ("Atlanta", "GA", "404", ("30309", "30316")),
    ("Austin", "TX", "512", ("78701", "78745")),
    ("Denver", "CO", "303", ("80203", "80211")),
    ("Seattle", "WA", "206", ("98105", "98118")),
    ("San Diego", "CA", "619", ("92103", "92116")),
    ("Minneapolis", "MN", "612", ("55407", "55408")),
)
STREET_NAMES = (
    "Maple", "Oak", "Elm", "Washington", "Lincoln", "Highland", "Park", "Cedar", "Pleasant", "Chestnut",
    "Harvard", "Commonwealth", "Center", "Prospect", "Summer", "Water", "Union", "Franklin", "Spring", "Walnut",
)
STREET_TYPES = ("St", "Ave", "Rd", "Street", "Avenue", "Blvd", "Ln", "Ct", "Way", "Terrace")
EMAIL_DOMAINS = ("example.com", "example.org", "example.net", "mail.example.com")
NOTE_TEXTS = (
    "VIS given",
    "Tolerated well, no reaction observed",
    "Historical record\nentered from paper card",
    "Catch-up dose",
    "Given at school-located clinic",
    "Mild soreness at injection site",
    "Parent present; consent on file",
    "Observed 15 min post vaccination",
)
NOT_DONE_NOTES = ("Patient declined", "Parent refused", "Vaccine out of stock", "Deferred: febrile illness")


# --------------------------------------------------------------------------- helpers


def ascii_fold(text: str) -> str:
    """``José O'Brien`` -> ``JoseOBrien``: letters only, accents removed."""
    folded = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode("ascii")
    return re.sub(r"[^A-Za-z]", "", folded)


def add_years(day: date, years: int) -> date:
    """``day`` moved by whole years (29 February becomes the 28th)."""
    try:
        return day.replace(year=day.year + years)
    except ValueError:
        return day.replace(year=day.year + years, day=28)


def rand_date(rng: random.Random, start: date, end: date) -> date:
    """A uniformly drawn day in [start, end]."""
    return start + timedelta(days=rng.randint(0, (end - start).days))


def in_window(day: date) -> bool:
    """Whether ``day`` lies in the export's administration window."""
    return WINDOW_START <= day <= WINDOW_END


# --------------------------------------------------------------------------- patients


@dataclass
class Patient:
    """One person of the registry, with the demographics written on each row."""

    pid: str
    group: str
    first: str
    last: str
    dob: date
    sex: str  # as written in the file
    phone: str
    email: str
    street: str
    city: str
    state: str
    zip: str


GROUPS: tuple[tuple[str, int, date, date], ...] = (
    ("infant", 46, date(2018, 9, 1), date(2024, 10, 31)),
    ("child", 22, date(2013, 1, 1), date(2018, 8, 31)),
    ("adolescent", 26, date(2005, 1, 1), date(2012, 12, 31)),
    ("adult", 42, date(1965, 1, 1), date(2004, 12, 31)),
    ("older", 24, date(1938, 1, 1), date(1964, 12, 31)),
)
#: Names the sample must contain (first name, sex) and last names.
FORCED_FIRST = (("José", "M"), ("Zoë", "F"))
FORCED_LAST = ("O'Brien", "García-López", "Smith-Jones")
#: The patient whose DOB is planted as 1985-13-07 (month and day swapped).
SWAPPED_DOB = date(1985, 7, 13)


def make_patients(rng: random.Random) -> list[Patient]:
    """The registry's patients, with stable ids and varied demographics."""
    numbers = sorted(rng.sample(range(10001, 10999), N_PATIENTS))
    rng.shuffle(numbers)
    specs = [(group, lo, hi) for group, count, lo, hi in GROUPS for _ in range(count)]
    assert len(specs) == N_PATIENTS
    patients: list[Patient] = []
    for i, (group, lo, hi) in enumerate(specs):
        dob = rand_date(rng, lo, hi)
        roll = rng.random()
        core = "F" if roll < 0.48 else "M" if roll < 0.95 else "U"
        first = rng.choice(FEMALE_NAMES if core == "F" else MALE_NAMES if core == "M" else FEMALE_NAMES + MALE_NAMES)
        last = rng.choice(LAST_NAMES)
        if rng.random() < 0.04:
            last = f"{last}-{rng.choice(LAST_NAMES)}"
        city, state, area, zips = rng.choice(CITIES)
        street = f"{rng.randint(2, 1999)} {rng.choice(STREET_NAMES)} {rng.choice(STREET_TYPES)}"
        extra = rng.random()
        if extra < 0.12:
            street += f" Apt {rng.randint(1, 12)}{rng.choice('ABCD')}"
        elif extra < 0.17:
            street += f", Unit {rng.randint(1, 40)}"
        phone = f"({area}) 555-01{rng.randint(0, 99):02d}"
        patients.append(
            Patient(
                pid=f"P-{numbers[i]}", group=group, first=first, last=last, dob=dob, sex=core, phone=phone,
                email="", street=street, city=city, state=state, zip=rng.choice(zips),
            )
        )
    # Names and spellings the sample must show at least once.
    males = [p for p in patients if p.sex == "M"]
    females = [p for p in patients if p.sex == "F"]
    for (name, sex), pool in zip(FORCED_FIRST, (males, females), strict=True):
        assert sex == pool[0].sex
        rng.choice(pool).first = name
    for name, patient in zip(FORCED_LAST, rng.sample(patients, len(FORCED_LAST)), strict=True):
        patient.last = name
    for patient in rng.sample(males, 2):
        patient.sex = "male"
    for patient in rng.sample(females, 3):
        patient.sex = "Female"
    adults = [p for p in patients if p.group == "adult"]
    adults[0].dob = SWAPPED_DOB
    for patient in patients:
        if rng.random() < 0.72:
            handle = f"{ascii_fold(patient.first).lower()}.{ascii_fold(patient.last).lower()}"
            if rng.random() < 0.4:
                handle += str(rng.randint(1, 99))
            patient.email = f"{handle}@{rng.choice(EMAIL_DOMAINS)}"
    return patients


# --------------------------------------------------------------------------- schedules


@dataclass
class Event:
    """One vaccination of one patient, before it becomes a row."""

    patient: Patient
    cvx: str
    series: str
    dose: int
    doses: int
    day: date
    season: int | None = None  # influenza season start year


def series_events(
    patient: Patient, cvx: str, series: str, days: Sequence[date], first_dose: int = 1, doses: int | None = None
) -> list[Event]:
    """Events of a series given on ``days`` (dose numbers from ``first_dose``)."""
    total = doses if doses is not None else len(days)
    return [Event(patient, cvx, series, first_dose + i, total, day) for i, day in enumerate(days)]


def childhood(rng: random.Random, p: Patient) -> list[Event]:
    """The routine childhood series, at their usual ages (in days)."""
    schedule: tuple[tuple[str, str, tuple[int, ...]], ...] = (
        ("08", "Hep B 3-dose", (0, 45, 185)),
        ("20", "DTaP 5-dose", (61, 122, 183, 480, 1650)),
        ("133", "PCV13 4-dose", (61, 122, 183, 395)),
        ("116", "Rotavirus 3-dose", (61, 122, 183)),
        ("10", "IPV 4-dose", (61, 122, 270, 1650)),
        ("49", "Hib 3-dose", (61, 122, 395)),
        ("03", "MMR 2-dose", (375, 1650)),
        ("21", "Varicella 2-dose", (375, 1650)),
        ("83", "Hep A 2-dose", (380, 565)),
    )
    events: list[Event] = []
    for cvx, series, ages in schedule:
        if rng.random() < 0.1:
            continue  # not every series is recorded
        days = [p.dob + timedelta(days=age + (rng.randint(0, 25) if age else rng.randint(0, 1))) for age in ages]
        events += series_events(p, cvx, series, days)
    return events


def adolescence(rng: random.Random, p: Patient) -> list[Event]:
    """Tdap, MenACWY and HPV at 11 to 13, MenACWY booster at 16."""
    events: list[Event] = []
    start = p.dob + timedelta(days=11 * 365 + rng.randint(0, 700))
    events.append(Event(p, "115", "Tdap 1-dose", 1, 1, start))
    events.append(Event(p, "114", "MenACWY 2-dose", 1, 2, start))
    events.append(Event(p, "114", "MenACWY 2-dose", 2, 2, add_years(p.dob, 16) + timedelta(days=rng.randint(0, 300))))
    if rng.random() < 0.8:
        hpv_start = start + timedelta(days=rng.choice((0, 0, 30, 200)))
        if hpv_start < add_years(p.dob, 15):
            days = [hpv_start, hpv_start + timedelta(days=rng.randint(180, 330))]
            events += series_events(p, "165", "HPV 2-dose", days)
        else:
            days = [hpv_start, hpv_start + timedelta(days=rng.randint(30, 70)), hpv_start + timedelta(days=185)]
            events += series_events(p, "165", "HPV 3-dose", days)
    return events


def influenza(rng: random.Random, p: Patient, rate: float) -> list[Event]:
    """Seasonal influenza shots from 6 months of age, seasons 2018-19 to 2024-25."""
    events: list[Event] = []
    first_season = True
    for season in range(2018, 2025):
        start = max(date(season, 9, 1), p.dob + timedelta(days=183))
        end = date(season + 1, 3, 31)
        if start > end or rng.random() > rate:
            continue
        # Most shots are given in the autumn.
        autumn_end = min(end, date(season, 11, 30)) if start <= date(season, 11, 30) else end
        day = rand_date(rng, start, autumn_end if rng.random() < 0.8 else end)
        cvx = rng.choice(FLU_CODES)
        label = f"Influenza {season}-{(season + 1) % 100:02d}"
        young = day < add_years(p.dob, 9)
        if young and first_season and day + timedelta(days=28) <= end:
            second = day + timedelta(days=rng.randint(28, 45))
            for dose, when in ((1, day), (2, min(second, end))):
                events.append(Event(p, cvx, f"{label} 2-dose", dose, 2, when, season))
        else:
            events.append(Event(p, cvx, label, 1, 1, day, season))
        first_season = False
    return events


def covid(rng: random.Random, p: Patient) -> list[Event]:
    """A two-dose mRNA primary series from December 2020 and sometimes a booster."""
    age_2021 = (date(2021, 1, 1) - p.dob).days / 365.25
    if age_2021 >= 65:
        eligible = COVID_START
    elif age_2021 >= 18:
        eligible = date(2021, 3, 1)
    else:
        eligible = max(date(2021, 5, 13), add_years(p.dob, 12))
    if eligible > date(2022, 10, 1):
        return []
    dose1 = eligible + timedelta(days=rng.randint(0, 120))
    cvx = "207" if age_2021 >= 18 and rng.random() < 0.45 else "208"
    dose2 = dose1 + timedelta(days=(21 if cvx == "208" else 28) + rng.randint(0, 10))
    events = series_events(p, cvx, "COVID-19 2-dose", [dose1, dose2])
    if age_2021 >= 18 and rng.random() < 0.6:
        booster = max(date(2021, 10, 1), dose2 + timedelta(days=160)) + timedelta(days=rng.randint(0, 120))
        events.append(Event(p, "208", "COVID-19 booster", 1, 1, booster))
    return events


def adulthood(rng: random.Random, p: Patient) -> list[Event]:
    """Tdap, hepatitis A and B, HPV catch-up, zoster and pneumococcal vaccines as the age allows."""
    events: list[Event] = []
    age_2022 = (date(2022, 1, 1) - p.dob).days / 365.25
    if rng.random() < 0.3:
        events.append(Event(p, "115", "Tdap 1-dose", 1, 1, rand_date(rng, WINDOW_START, WINDOW_END)))
    if age_2022 < 60 and rng.random() < 0.15:
        start = rand_date(rng, WINDOW_START, WINDOW_END - timedelta(days=200))
        days = [start, start + timedelta(days=rng.randint(28, 40)), start + timedelta(days=rng.randint(170, 200))]
        events += series_events(p, "43", "Hep B adult 3-dose", days)
    if rng.random() < 0.08:
        start = rand_date(rng, WINDOW_START, WINDOW_END - timedelta(days=200))
        events += series_events(p, "52", "Hep A adult 2-dose", [start, start + timedelta(days=rng.randint(180, 200))])
    if age_2022 < 27 and rng.random() < 0.25:
        start = rand_date(rng, max(WINDOW_START, add_years(p.dob, 19)), date(2024, 6, 30))
        days = [start, start + timedelta(days=rng.randint(30, 70)), start + timedelta(days=rng.randint(180, 200))]
        events += series_events(p, "165", "HPV 3-dose", days)
    fifty = max(WINDOW_START, add_years(p.dob, 50))
    if fifty < date(2024, 12, 1) and rng.random() < 0.5:
        start = rand_date(rng, fifty, date(2024, 12, 1))
        events += series_events(p, "187", "Zoster 2-dose", [start, start + timedelta(days=rng.randint(60, 180))])
    sixty_five = max(WINDOW_START, add_years(p.dob, 65))
    if sixty_five < date(2024, 6, 1) and rng.random() < 0.45:
        pcv = rand_date(rng, sixty_five, date(2024, 6, 1))
        events.append(Event(p, "133", "PCV13 1-dose", 1, 1, pcv))
        if rng.random() < 0.7:
            events.append(Event(p, "33", "PPSV23 1-dose", 1, 1, pcv + timedelta(days=rng.randint(365, 400))))
    return events


def candidate_events(rng: random.Random, p: Patient) -> list[Event]:
    """Every vaccination this patient could have in the export window, by date."""
    events: list[Event] = []
    if p.group in ("infant", "child"):
        events += childhood(rng, p)
        events += influenza(rng, p, 0.55)
    if p.group in ("child", "adolescent"):
        events += adolescence(rng, p)
    if p.group == "adolescent":
        events += influenza(rng, p, 0.45)
        if rng.random() < 0.5:
            events += covid(rng, p)
    if p.group in ("adult", "older"):
        events += influenza(rng, p, 0.55 if p.group == "adult" else 0.75)
        if rng.random() < 0.8:
            events += covid(rng, p)
        events += adulthood(rng, p)
    kept = [e for e in events if in_window(e.day) and e.day >= p.dob]
    if len(kept) < 2:  # every patient gets at least a couple of flu shots to choose from
        kept += [e for e in influenza(rng, p, 1.0) if in_window(e.day)]
    return sorted(kept, key=lambda e: (e.day, e.cvx, e.dose))


def choose_events(rng: random.Random, patients: list[Patient]) -> list[Event]:
    """1 to 6 vaccinations a patient, N_ROWS in all."""
    candidates = [candidate_events(rng, p) for p in patients]
    counts = [min(rng.randint(1, 6), len(c)) for c in candidates]
    for i, p in enumerate(patients):
        if p.dob == SWAPPED_DOB:
            counts[i] = max(counts[i], 3)
    while sum(counts) != N_ROWS:
        i = rng.randrange(len(patients))
        if sum(counts) < N_ROWS and counts[i] < min(6, len(candidates[i])):
            counts[i] += 1
        elif sum(counts) > N_ROWS and counts[i] > 1 and patients[i].dob != SWAPPED_DOB:
            counts[i] -= 1
    chosen: list[Event] = []
    for events, count in zip(candidates, counts, strict=True):
        picked = sorted(rng.sample(range(len(events)), count))
        chosen += [events[j] for j in picked]
    return chosen


def plant_unknown_cvx(rng: random.Random, events: list[Event]) -> None:
    """Turn two adult COVID-19 vaccinations into real CVX codes the code table lacks (213, 300)."""
    primaries = [e for e in events if e.cvx in ("207", "208") and e.series == "COVID-19 2-dose" and e.dose == 1]
    boosters = [e for e in events if e.series == "COVID-19 booster"]
    unspecified = rng.choice(primaries)
    unspecified.cvx = "213"
    bivalent = rng.choice(boosters)
    bivalent.cvx = "300"
    bivalent.series = "COVID-19 bivalent booster"
    bivalent.day = max(bivalent.day, date(2022, 9, 1)) + timedelta(days=rng.randint(0, 60))


# --------------------------------------------------------------------------- rows


class Lots:
    """Lot numbers and their expiration dates, a few lots per product and year."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.pool: dict[tuple[str, str, int], list[tuple[str, date]]] = {}

    def lot_text(self, manufacturer: str) -> str:
        """A lot number in the style of ``manufacturer``."""
        r = self.rng
        upper = "ABCDEFGHJKLMNPRSTUVWXYZ"
        digits = "0123456789"

        def pick(chars: str, n: int) -> str:
            return "".join(r.choice(chars) for _ in range(n))

        if manufacturer == "Pfizer":
            return pick(upper, 2) + pick(digits, 4)
        if manufacturer == "Moderna":
            return pick(digits, 3) + pick(upper, 1) + pick(digits, 2) + "A"
        if manufacturer == "Merck":
            return pick("RSTUVWXY", 1) + pick(digits, 6)
        if manufacturer == "GlaxoSmithKline":
            return "A" + pick(upper, 3) + pick(digits, 3) + "AA"
        if manufacturer == "Sanofi Pasteur":
            return pick("CUJT", 1) + pick(upper, 1) + pick(digits, 4) + "AA"
        return "P" + pick(digits, 9)  # Seqirus

    def draw(self, cvx: str, manufacturer: str, event: Event) -> tuple[str, date]:
        """A lot (and its expiration date) that was in use on the event's day."""
        year = event.season if event.season is not None else event.day.year
        key = (cvx, manufacturer, year)
        if key not in self.pool:
            lots = []
            for _ in range(self.rng.randint(1, 3)):
                if event.season is not None:
                    expiry = date(year + 1, 6, 30)
                else:
                    expiry = rand_date(self.rng, date(year + 1, 1, 15), date(year + 1, 10, 31))
                lots.append((self.lot_text(manufacturer), expiry))
            self.pool[key] = lots
        return self.rng.choice(self.pool[key])


def make_rows(rng: random.Random, events: list[Event]) -> list[Row]:
    """The export's rows in file order (by administration date), with record ids."""
    lots = Lots(rng)
    manufacturer_of: dict[tuple[str, str, str], str] = {}  # a patient keeps one brand per series
    rows: list[tuple[tuple[date, str, str, int], Row]] = []
    for e in events:
        p = e.patient
        product = PRODUCTS[e.cvx]
        brand_key = (p.pid, e.series, e.cvx)
        if brand_key not in manufacturer_of:
            manufacturer_of[brand_key] = rng.choice(product.manufacturers)
        manufacturer = manufacturer_of[brand_key]
        lot, expiry = lots.draw(e.cvx, manufacturer, e)
        # Infants get intramuscular shots in the thigh until 3, subcutaneous ones until 1.
        thigh_until = add_years(p.dob, 3 if product.route == "IM" else 1)
        if product.route == "PO":
            site = ""
        elif e.day < thigh_until:
            site = rng.choice(SITES_INFANT)
        else:
            site = rng.choice(SITES_ARM if product.route == "IM" else SITES_SQ)
        row: Row = {
            "Record ID": "",
            "Patient ID": p.pid,
            "First Name": p.first,
            "Last Name": p.last,
            "DOB": p.dob.isoformat(),
            "Sex": p.sex,
            "Phone": p.phone,
            "Email": p.email,
            "Street": p.street,
            "City": p.city,
            "State": p.state,
            "ZIP": p.zip,
            "Admin Date": e.day.isoformat(),
            "CVX": e.cvx,
            "Vaccine": product.display,
            "Manufacturer": manufacturer,
            "Lot Number": lot,
            "Expiration Date": expiry.isoformat(),
            "Route": rng.choice(ROUTE_SPELLINGS[product.route]),
            "Site": site,
            "Dose Amount": product.amount,
            "Dose Unit": "mL",
            "Dose Number": str(e.dose),
            "Series Doses": str(e.doses),
            "Series": e.series,
            "Target Disease": ";".join(product.diseases),
            "Status": "completed",
            "Notes": "",
        }
        rows.append(((e.day, p.pid, e.cvx, e.dose), row))
    rows.sort(key=lambda item: item[0])
    ordered = [row for _, row in rows]
    for i, row in enumerate(ordered):
        row["Record ID"] = f"VX-{i + 1:06d}"
    return ordered


# --------------------------------------------------------------------------- planted defects


@dataclass(frozen=True)
class Planted:
    """One planted row: where it is and what is wrong with it."""

    index: int  # 0-based data row
    code: str
    column: str
    value: str
    description: str

    @property
    def source_row(self) -> int:
        """The row number a spreadsheet user sees (header = 1)."""
        return self.index + 2


@dataclass(frozen=True)
class Defect:
    """A kind of planted defect: which rows may carry it and how to apply it."""

    code: str
    column: str
    eligible: Callable[[int, Row], bool]
    apply: Callable[[int, Row], str]  # edits the row, returns the description
    patient_column: bool = False


def padded(text: str, length: int) -> str:
    """``text`` repeated and cut to exactly ``length`` characters, ending on a non-space."""
    out = (text * (length // len(text) + 1))[:length]
    return out if not out.endswith(" ") else out[:-1] + "."


LONG_DISEASE = padded(
    "Invasive pneumococcal disease including bacteremic pneumonia, meningitis and sepsis caused by "
    "Streptococcus pneumoniae serotypes 1, 3, 4, 5, 6A, 6B, 7F, 9V, 14, 18C, 19A, 19F and 23F as listed in "
    "the package insert of the product ",
    210,
)
ELEVEN_DISEASES = ";".join(
    (
        "Diphtheria", "Tetanus", "Pertussis", "Poliomyelitis", "Haemophilus influenzae type b infection",
        "Hepatitis B", "Measles", "Mumps", "Rubella", "Varicella", "Pneumococcal disease",
    )
)
LONG_NOTE = padded(
    "Clinical note pasted from the EHR visit summary: patient seen for routine immunization visit, history "
    "reviewed, no contraindications or precautions identified, vaccine information statement provided and "
    "discussed, questions answered, consent obtained, vaccine administered without incident, patient observed "
    "for fifteen minutes afterwards with no adverse event, next dose due per schedule. ",
    5100,
)


def plant_defects(rng: random.Random, rows: list[Row]) -> list[Planted]:
    """Plant 28 single-defect rows, spread over the file, and return them."""
    first_of_patient: dict[str, int] = {}
    for i, row in enumerate(rows):
        first_of_patient.setdefault(row["Patient ID"], i)
    original = [dict(row) for row in rows]
    dob_of = {row["Patient ID"]: date.fromisoformat(row["DOB"]) for row in original}
    reserved: set[int] = set()  # rows that must stay untouched (the original of the duplicated key)
    taken: set[int] = set()  # rows already planted
    planted_patients: set[str] = set()  # at most one planted row a patient

    def admin(row: Row) -> date:
        return date.fromisoformat(row["Admin Date"])

    def any_row(_i: int, _row: Row) -> bool:
        return True

    def setter(column: str, value: str, description: str) -> Callable[[int, Row], str]:
        def apply(_i: int, row: Row) -> str:
            row[column] = value
            return description

        return apply

    def long_lot(_i: int, row: Row) -> str:
        tail = "".join(rng.choice("0123456789") for _ in range(140))
        row["Lot Number"] = (f"{row['Lot Number']} (01)00{tail}")[:120]
        return "Lot Number of 120 characters (a scanned 2D barcode pasted into the field); limit 100"

    def long_phone(_i: int, row: Row) -> str:
        row["Phone"] = f"{row['Phone']} ext. {rng.randint(10000, 99999)}"
        return "Phone with an extension, 25 characters; limit 20"

    def future(_i: int, row: Row) -> str:
        day = admin(row)
        row["Admin Date"] = date(2031, day.month, min(day.day, 28)).isoformat()
        row["Expiration Date"] = ""  # so that the row has no second defect
        return "Admin Date in 2031 (typo for the decade); Expiration Date left empty so nothing else is wrong"

    def expired(_i: int, row: Row) -> str:
        row["Expiration Date"] = (admin(row) - timedelta(days=rng.randint(5, 90))).isoformat()
        return "Expiration Date before Admin Date: an expired lot was recorded"

    def before_birth(_i: int, row: Row) -> str:
        row["Admin Date"] = add_years(admin(row), -1).isoformat()
        return "Admin Date a year early (year typo), before the patient's DOB"

    def conflict(_i: int, row: Row) -> str:
        dob = dob_of[row["Patient ID"]]
        row["DOB"] = (dob - timedelta(days=rng.choice((1, 10, 31, 365)))).isoformat()
        return f"Patient ID of an earlier patient whose DOB is {dob.isoformat()}: same id, different DOB"

    def duplicate(i: int, row: Row) -> str:
        earlier = next(j for j in range(i - 3, 0, -1) if j not in taken and j not in reserved)
        reserved.add(earlier)
        row["Record ID"] = rows[earlier]["Record ID"]
        return f"Record ID repeats the one on row {earlier + 2} (a re-exported record)"

    def not_first(i: int, row: Row) -> bool:
        return first_of_patient[row["Patient ID"]] != i

    defects: list[Defect] = [
        Defect("max-length", "Lot Number", any_row, long_lot),
        Defect("max-length", "Lot Number", any_row, long_lot),
        Defect("max-length", "Phone", any_row, long_phone, patient_column=True),
        Defect("max-length", "Target Disease", lambda _i, r: r["CVX"] == "133",
               setter("Target Disease", LONG_DISEASE, "Target Disease item of 210 characters; limit 200 an item")),
        Defect("max-length", "Notes", any_row,
               setter("Notes", LONG_NOTE, "Notes of 5,100 characters (a pasted visit summary); limit 5,000")),
        Defect("enum", "Status", any_row, setter("Status", "pending", "Status 'pending': not completed|not-done")),
        Defect("enum", "Status", any_row, setter("Status", "pending", "Status 'pending': not completed|not-done")),
        Defect("enum", "Sex", any_row, setter("Sex", "X", "Sex 'X': not M/F/U/O or male/female/other/unknown"),
               patient_column=True),
        Defect("required", "Patient ID", any_row,
               setter("Patient ID", "", "Patient ID missing (names and DOB present)"), patient_column=True),
        Defect("required", "Patient ID", any_row,
               setter("Patient ID", "", "Patient ID missing (names and DOB present)"), patient_column=True),
        Defect("required", "First Name", any_row, setter("First Name", "", "First Name missing"),
               patient_column=True),
        Defect("required", "CVX", any_row, setter("CVX", "", "CVX code missing (the Vaccine name is present)")),
        Defect("required", "Admin Date", any_row, setter("Admin Date", "", "Admin Date missing")),
        Defect("date-format", "Admin Date", lambda _i, r: r["Admin Date"].startswith("2021-"),
               setter("Admin Date", "2021-02-30", "Admin Date 2021-02-30 does not exist")),
        Defect("date-format", "DOB", lambda _i, r: r["DOB"] == SWAPPED_DOB.isoformat(),
               setter("DOB", "1985-13-07", "DOB with month and day swapped (1985-07-13 on the patient's other rows)"),
               patient_column=True),
        Defect("date-format", "Expiration Date", lambda _i, r: r["Expiration Date"].startswith("2022-"),
               setter("Expiration Date", "31/31/2022", "Expiration Date 31/31/2022 is not a date")),
        Defect("future-date", "Admin Date", lambda _i, r: r["Admin Date"] >= "2021-", future),
        Defect("expiration-before-occurrence", "Expiration Date", any_row, expired),
        Defect("expiration-before-occurrence", "Expiration Date", any_row, expired),
        Defect("dose-number-above-series", "Dose Number", lambda _i, r: r["Series Doses"] == "3",
               setter("Dose Number", "4", "Dose Number 4 of a 3-dose series")),
        Defect("dose-number-above-series", "Dose Number", lambda _i, r: r["Series Doses"] == "3",
               setter("Dose Number", "4", "Dose Number 4 of a 3-dose series")),
        Defect("number-format", "Dose Amount", lambda _i, r: r["Dose Amount"] == "0.5",
               setter("Dose Amount", "half", "Dose Amount 'half' is not a number")),
        Defect("integer-format", "Dose Number", lambda _i, r: r["Dose Number"] == "2",
               setter("Dose Number", "two", "Dose Number 'two' is not an integer")),
        Defect("max-items", "Target Disease", any_row,
               setter("Target Disease", ELEVEN_DISEASES, "Target Disease with 11 items; limit 10")),
        Defect("email-format", "Email", any_row, setter("Email", "not-an-email", "Email 'not-an-email'"),
               patient_column=True),
        Defect("duplicate-key", "Record ID", lambda i, _r: i > 10, duplicate),
        Defect("patient-conflict", "DOB", lambda _i, r: date.fromisoformat(r["DOB"]) < date(2005, 1, 1), conflict,
               patient_column=True),
        Defect("occurrence-before-birth", "Admin Date",
               lambda _i, r: add_years(admin(r), -1) < dob_of[r["Patient ID"]], before_birth),
    ]

    def eligible(defect: Defect, i: int) -> bool:
        row = rows[i]
        return (
            i not in taken
            and i not in reserved
            and not_first(i, row)  # every planted row follows a valid row of its patient
            and row["Patient ID"] not in planted_patients
            and row["CVX"] in PRODUCTS
            and row["CVX"] not in ("213", "300")
            and defect.eligible(i, row)
        )

    n_bins = len(defects)
    bin_size = len(rows) // n_bins
    bins = [range(b * bin_size, (b + 1) * bin_size) for b in range(n_bins)]
    free_bins = list(range(n_bins))
    result: list[Planted] = []
    order = sorted(range(len(defects)), key=lambda k: (sum(eligible(defects[k], i) for i in range(len(rows))), k))
    for k in order:
        defect = defects[k]
        options = [b for b in free_bins if any(eligible(defect, i) for i in bins[b])]
        if not options:
            raise RuntimeError(f"no room left for {defect.code} on {defect.column}")
        b = rng.choice(options)
        free_bins.remove(b)
        i = rng.choice([i for i in bins[b] if eligible(defect, i)])
        planted_patients.add(rows[i]["Patient ID"])
        description = defect.apply(i, rows[i])
        taken.add(i)
        result.append(Planted(i, defect.code, defect.column, rows[i][defect.column], description))
    return sorted(result, key=lambda p: p.index)


def vary_status_and_notes(rng: random.Random, rows: list[Row], untouchable: set[int]) -> None:
    """A few not-done vaccinations, empty statuses and short notes on valid rows."""
    free = [i for i in range(len(rows)) if i not in untouchable]
    picked = rng.sample(free, 8 + 10 + len(NOTE_TEXTS))
    for i in picked[:8]:
        row = rows[i]
        row["Status"] = "not-done"
        for column in ("Lot Number", "Expiration Date", "Route", "Site", "Dose Amount", "Dose Unit"):
            row[column] = ""
        row["Notes"] = rng.choice(NOT_DONE_NOTES)
    for i in picked[8:18]:
        rows[i]["Status"] = ""
    for i, text in zip(picked[18:], NOTE_TEXTS, strict=True):
        rows[i]["Notes"] = text


# --------------------------------------------------------------------------- writers


def write_csv(path: Path, header: Sequence[str], records: Sequence[Sequence[str]]) -> None:
    """A UTF-8 CSV with ``\\n`` line ends, quoting only where needed."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(records)
    path.write_text(buffer.getvalue(), encoding="utf-8", newline="")


ISO_DATE = re.compile(r"\d{4}-\d{2}-\d{2}")
INTEGER = re.compile(r"\d+")
NUMBER = re.compile(r"\d+(\.\d+)?")


def as_date(text: str) -> date | None:
    """The date ``text`` names, if it is a valid YYYY-MM-DD."""
    if not ISO_DATE.fullmatch(text):
        return None
    try:
        return date.fromisoformat(text)
    except ValueError:
        return None


def write_xlsx(path: Path, rows: list[Row]) -> None:
    """The rows as typed cells in sheet ``Vaccinations``, and a ``Notes`` sheet."""
    workbook = xlsxwriter.Workbook(str(path))
    workbook.set_properties(
        {
            "title": "Vaccination registry export (synthetic)",
            "author": "clinik-etl sample generator",
            "created": FIXED_CREATED,
        }
    )
    bold = workbook.add_format({"bold": True})
    date_format = workbook.add_format({"num_format": "yyyy-mm-dd"})
    text_format = workbook.add_format({"num_format": "@"})
    sheet = workbook.add_worksheet("Vaccinations")
    sheet.write_row(0, 0, HEADERS, bold)
    sheet.freeze_panes(1, 0)
    for r, row in enumerate(rows, start=1):
        for c, column in enumerate(HEADERS):
            value = row[column]
            if value == "":
                continue
            day = as_date(value) if column in DATE_COLUMNS else None
            if day is not None:
                sheet.write_datetime(r, c, datetime(day.year, day.month, day.day), date_format)
            elif (column in INTEGER_COLUMNS and INTEGER.fullmatch(value)) or (
                column in NUMBER_COLUMNS and NUMBER.fullmatch(value)
            ):
                sheet.write_number(r, c, float(value) if "." in value else int(value))
            elif column == "ZIP":
                sheet.write_string(r, c, value, text_format)
            else:
                sheet.write_string(r, c, value)
    widths = {"Vaccine": 40, "Target Disease": 30, "Notes": 30, "Street": 24, "Email": 28, "Series": 22}
    for c, column in enumerate(HEADERS):
        sheet.set_column(c, c, widths.get(column, max(10, len(column) + 2)))
    notes = workbook.add_worksheet("Notes")
    lines = (
        "Vaccination registry export - synthetic sample for clinik-etl",
        "Extract window: administrations from 2019-01-01 to 2025-06-30.",
        "One row per vaccination event; Patient ID is stable across rows.",
        "CVX codes are stored as numbers here (08 appears as 8); ZIP codes are text.",
        "All people, addresses, phone numbers and lot numbers are fictitious.",
        "Generated by sample_data/make_samples.py; do not edit by hand.",
    )
    notes.set_column(0, 0, 90)
    for r, line in enumerate(lines):
        notes.write_string(r, 0, line)
    workbook.close()


def md_cell(value: str, limit: int = 40) -> str:
    """A value shown in a Markdown table: escaped, long ones summarised."""
    if value == "":
        return "(empty)"
    if len(value) > limit:
        return f"`{value[:24]}…` ({len(value):,} characters)"
    return "`" + value.replace("|", "\\|").replace("\n", "\\n") + "`"


def write_readme(path: Path, rows: list[Row], planted: list[Planted], warnings: list[Planted]) -> None:
    """The README of ``sample_data/``."""
    patients = {row["Patient ID"] for row in rows if row["Patient ID"]}
    # Domain rules that only warn by default (etl.rules): their planted rows are accepted and flagged.
    warned = [p for p in planted if p.code in WARNING_CODES]
    rejected = len(planted) - len(warned)
    lines = [
        "# Sample data",
        "",
        "A synthetic vaccine-registry export for trying and testing clinik-etl. Every person, address,",
        "phone number and lot number is fictitious (phone numbers are in the 555-01xx range, e-mail",
        "addresses under `example.*`).",
        "",
        "| file | what |",
        "| --- | --- |",
        f"| `registry.csv` | UTF-8, comma-delimited, header row, {len(rows)} data rows, {len(patients)} patients |",
        "| `registry.xlsx` | the same rows in sheet `Vaccinations`, plus a free-text sheet `Notes` |",
        f"| `planted.csv` | the rows planted with one defect each: {rejected} an import must reject, "
        f"{len(warned)} (expired lots) it must accept and warn about |",
        "| `planted_warnings.csv` | rows with real CVX codes an early, short CVX table lacked: "
        "an import must accept them, with no flag |",
        "| `make_samples.py` | the generator |",
        "",
        "`clinik-etl validate sample_data/registry.csv` (or `registry.xlsx`, which also notes the sheet it did",
        f"not read) reports {len(rows)} rows: {rejected} rejected (exit 1) and {len(rows) - rejected} valid, "
        f"{len(warned)} of them",
        "with an `expiration-before-occurrence` warning.",
        "",
        "Regenerate (deterministic: a fixed seed, the standard library's `random`, no network):",
        "",
        "```sh",
        ".venv/bin/python sample_data/make_samples.py",
        "```",
        "",
        "## Contents",
        "",
        "One row per vaccination event, sorted by administration date. Patients have 1 to 6",
        "vaccinations given between 2019-01-01 and 2025-06-30, never before their birth: infants and",
        "children on the routine schedule (Hep B, DTaP, PCV13, rotavirus, IPV, Hib, MMR, varicella,",
        "Hep A), adolescents (Tdap, MenACWY, HPV), adults and older adults (influenza, COVID-19 mRNA,",
        "Tdap, hepatitis A and B, HPV catch-up, recombinant zoster, PCV13, PPSV23). A patient's",
        "demographics are the same on all of their rows, except on the planted rows below.",
        "",
        "| column | content |",
        "| --- | --- |",
        "| Record ID | `VX-000123`, unique except on the planted `duplicate-key` row |",
        "| Patient ID | `P-10045`, stable per patient |",
        "| First Name, Last Name | varied, with accents (`José`, `Zoë`), apostrophes (`O'Brien`) and hyphens |",
        "| DOB | `YYYY-MM-DD` |",
        "| Sex | `M`, `F`, `U`, and a few spelled out (`Female`, `male`) |",
        "| Phone | `(617) 555-0143` |",
        "| Email | some empty |",
        "| Street, City, State, ZIP | US-like; New England ZIP codes keep their leading zero (`02134`) |",
        "| Admin Date | `YYYY-MM-DD` |",
        "| CVX | CVX code as text (`08`, `03`, `20`, `150`, `208` ...) |",
        "| Vaccine | the CVX short description |",
        "| Manufacturer | an MVX name from `schemas/data/mvx.csv` (`Merck`, `Pfizer`, `Sanofi Pasteur` ...) |",
        "| Lot Number | `EK5730`, in the style of each manufacturer; a lot is shared by many rows |",
        "| Expiration Date | `YYYY-MM-DD`, after the Admin Date (influenza lots expire on 30 June) |",
        "| Route | `IM`, `Intramuscular`, `C28161`, `SQ`, `subcutaneous`, `Oral` |",
        "| Site | `LD`, `Left Deltoid`, `L deltoid`, `RD`, `Right Deltoid`, `RA`, `R arm`, `LA`, `Left Arm`, "
        "`LT`, `RT`, `Left Thigh`, `R thigh`; empty for oral vaccines |",
        "| Dose Amount, Dose Unit | `0.5`, `0.3`, `1`, `2` and `mL` |",
        "| Dose Number, Series Doses | integers, the dose number at most the series' doses |",
        "| Series | `Hep B 3-dose`, `Influenza 2021-22`, `COVID-19 booster` ... |",
        "| Target Disease | one to three diseases separated by `;` |",
        "| Status | mostly `completed`; a few `not-done` (lot, expiration, route, site and dose empty) "
        "and a few empty (an import defaults them to `completed`) |",
        "| Notes | mostly empty; one note holds a comma, one an embedded newline (quoted in the CSV) |",
        "",
        "In `registry.xlsx` valid dates are Excel date cells (format `yyyy-mm-dd`); CVX codes, dose",
        "amounts, dose numbers and series doses are numeric cells (so CVX `08` is stored as the number",
        "8 and an import must zero-pad it); ZIP codes and everything else are text cells. A date that",
        "is not a valid date in the CSV (a planted defect) is a text cell holding the same string.",
        "",
        f"## Planted defects ({len(planted)} rows, listed in `planted.csv`: {rejected} rejected, "
        f"{len(warned)} warned)",
        "",
        "Each row has exactly one defect; every other cell of the row is valid, and each follows an",
        "earlier valid row of the same patient, so the patient's demographics come from a valid row.",
        "`row` is the row number a spreadsheet user sees (the header is row 1); `column` is the",
        "source header; `value` is the cell as written in the CSV.",
        "",
        "| row | column | value | code | why |",
        "| --- | --- | --- | --- | --- |",
    ]
    for p in planted:
        lines.append(f"| {p.source_row} | {p.column} | {md_cell(p.value)} | `{p.code}` | {p.description} |")
    lines += [
        "",
        f"An expired lot (rows {', '.join(str(p.source_row) for p in warned)}, `expiration-before-occurrence`) "
        "is a warning by",
        "default, not a reject: the dose was given and must be on record. A profile can make it an error",
        "again (`expired-lot = \"error\"` under `[rules]`); then all "
        f"{len(planted)} rows are rejected.",
        "",
        f"## Real codes an old table lacked ({len(warnings)} rows, listed in `planted_warnings.csv`)",
        "",
        "Valid rows with CVX codes the toolkit's first, short `cvx.csv` lacked (so the file still names",
        "them `unknown-cvx`). The full CDC CVX table shipped now has them: an import accepts these rows",
        "with no warning and no reject.",
        "",
        "| row | column | value | code | why |",
        "| --- | --- | --- | --- | --- |",
    ]
    for w in warnings:
        lines.append(f"| {w.source_row} | {w.column} | {md_cell(w.value)} | `{w.code}` | {w.description} |")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


# --------------------------------------------------------------------------- main

#: Codes of the domain rules planted here that warn by default (etl.rules): their rows are accepted.
WARNING_CODES = ("expiration-before-occurrence",)


def main() -> None:
    """Generate every file of ``sample_data/``."""
    rng = random.Random(SEED)
    patients = make_patients(rng)
    events = choose_events(rng, patients)
    plant_unknown_cvx(rng, events)
    rows = make_rows(rng, events)
    assert len(rows) == N_ROWS
    planted = plant_defects(rng, rows)
    warnings = [
        Planted(i, "unknown-cvx", "CVX", row["CVX"], f"CVX {row['CVX']} is a real code missing from cvx.csv")
        for i, row in enumerate(rows)
        if row["CVX"] in ("213", "300")
    ]
    untouchable = {p.index for p in planted} | {w.index for w in warnings}
    # Keep the original of the duplicated Record ID untouched too (it is a plain completed row).
    untouchable |= {i for i, row in enumerate(rows) for p in planted if p.code == "duplicate-key"
                    and row["Record ID"] == p.value}
    vary_status_and_notes(rng, rows, untouchable)

    write_csv(OUT_DIR / "registry.csv", HEADERS, [[row[h] for h in HEADERS] for row in rows])
    write_xlsx(OUT_DIR / "registry.xlsx", rows)
    columns = ("source_row", "code", "column", "value", "description")
    write_csv(OUT_DIR / "planted.csv", columns,
              [[str(p.source_row), p.code, p.column, p.value, p.description] for p in planted])
    write_csv(OUT_DIR / "planted_warnings.csv", columns,
              [[str(w.source_row), w.code, w.column, w.value, w.description] for w in warnings])
    write_readme(OUT_DIR / "README.md", rows, planted, warnings)
    print(f"wrote {len(rows)} rows, {len(planted)} planted rejects, {len(warnings)} warnings to {OUT_DIR}")


if __name__ == "__main__":
    main()
