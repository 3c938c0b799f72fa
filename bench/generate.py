"""A deterministic synthetic registry CSV for benchmarks and scale tests.

The headers are those of ``sample_data/registry.csv`` so the default profile
maps the file. The vaccine half of each row is copied from a valid row of the
sample (so every generated row passes validation); the patient half is derived
from a patient number, so the same patient always has the same name and birth
date (no patient-conflict rejects) and about three rows share a patient.
"""

from __future__ import annotations

import csv
import random
from dataclasses import dataclass
from pathlib import Path

__all__ = ["GHOST_ID", "Generated", "generate", "generate_realistic"]

SAMPLE = Path(__file__).resolve().parent.parent / "sample_data" / "registry.csv"
#: The ClinikAPI id the crosswalk gives ghost patients: it does not exist, so the target refuses their rows.
GHOST_ID = "pat_ghostghostghostghost"
_FIRST = ["Ava", "Liam", "Maya", "Noah", "Iris", "Omar", "Zoe", "Eli", "Nina", "Hugo", "Lena", "Ravi", "June", "Theo"]
_LAST = ["Okafor", "Lindqvist", "Moreau", "Tanaka", "Alvarez", "Novak", "Haddad", "Kowalski", "Brennan", "Osei",
         "Nakamura", "Fischer", "Duarte", "Quinn", "Petrov", "Mensah"]
_CITIES = [("Denver", "CO", "80203"), ("Boston", "MA", "02108"), ("Austin", "TX", "73301"), ("Portland", "OR", "97201")]
_PATIENT_COLUMNS = slice(1, 12)  # Patient ID .. ZIP


@dataclass(frozen=True)
class Generated:
    """What :func:`generate` wrote."""

    path: Path
    rows: int
    patients: int
    ghost_rows: tuple[int, ...]  # spreadsheet row numbers (header = 1) whose patient is a ghost
    crosswalk: Path | None  # maps the ghost patients to :data:`GHOST_ID`


def _templates() -> tuple[list[str], list[list[str]]]:
    """The sample's header and the vaccine half of its valid, warning-free rows."""
    from etl.mapping import apply_profile, default_profile
    from etl.readers import ROW, read_table
    from etl.validate import validate

    validation = validate(apply_profile(read_table(SAMPLE), default_profile()))
    good = set(validation.valid[ROW].to_list()) - set(validation.warnings[ROW].to_list())
    with SAMPLE.open(newline="", encoding="utf-8") as fh:
        rows = list(csv.reader(fh))
    # Admin dates after 2015 only, so a generated birth date (<= 2014) is always before them.
    kept = [r for n, r in enumerate(rows[1:], start=2) if n in good and r[12] >= "2016"]
    return rows[0], kept


def _dose_keys(row: list[str]) -> set[tuple[str, str]]:
    """(day, vaccine group) of a row's dose (its CVX code when the code has no group)."""
    from etl.dedupe import VACCINE_GROUPS

    return {(row[12], group) for group in VACCINE_GROUPS.get(row[13], (f"cvx:{row[13]}",))}


def _patient(number: int) -> list[str]:
    rng = random.Random(number)  # per patient: the same patient always looks the same
    city, state, zip_code = rng.choice(_CITIES)
    first, last = rng.choice(_FIRST), rng.choice(_LAST)
    year, month, day = rng.randint(1940, 2014), rng.randint(1, 12), rng.randint(1, 28)
    return [
        f"P-{number:07d}", first, last, f"{year}-{month:02d}-{day:02d}", rng.choice("MF"),
        f"(303) 555-{number % 10000:04d}", f"{first.lower()}.{last.lower()}{number}@example.com",
        f"{100 + number % 9000} Elm St", city, state, zip_code,
    ]


def generate(path: Path, rows: int, *, seed: int = 7, ghosts: int = 0) -> Generated:
    """Write ``rows`` data rows to ``path``; ``ghosts`` rows name a patient known only from a crosswalk.

    A ghost row passes validation, but its patient id maps (through the crosswalk written beside
    the file) to :data:`GHOST_ID`, which the target does not have: the target refuses the row.
    """
    header, templates = _templates()
    rng = random.Random(seed)
    patients = max(1, rows // 3)
    ghost_at = set(rng.sample(range(rows), min(ghosts, rows)))
    path.parent.mkdir(parents=True, exist_ok=True)
    cache: dict[int, list[str]] = {}
    given: dict[int, set[tuple[str, str]]] = {}  # per cached patient: (day, vaccine group) of its doses
    with path.open("w", newline="", encoding="utf-8") as fh:
        out = csv.writer(fh)
        out.writerow(header)
        for i in range(rows):
            row = list(rng.choice(templates))
            row[0] = f"BX-{i + 1:08d}"
            if i in ghost_at:
                row[_PATIENT_COLUMNS] = [f"G-{i + 1:08d}"] + [""] * 10
            else:
                number = rng.randrange(patients)
                if number not in cache:
                    if len(cache) > 100_000:
                        cache.clear()
                        given.clear()
                    cache[number] = _patient(number)
                # A patient is never given the same vaccine group twice on one day: that would be one
                # dose recorded twice, which a load de-duplicates (etl.dedupe), not a row of its own.
                doses = given.setdefault(number, set())
                for _ in range(50):
                    if not doses & _dose_keys(row):
                        break
                    row = list(rng.choice(templates))
                    row[0] = f"BX-{i + 1:08d}"
                doses |= _dose_keys(row)
                row[_PATIENT_COLUMNS] = cache[number]
            out.writerow(row)
    crosswalk = None
    if ghost_at:
        crosswalk = path.with_suffix(".crosswalk.csv")
        with crosswalk.open("w", newline="", encoding="utf-8") as fh:
            out = csv.writer(fh)
            out.writerow(["kind", "source_id", "clinikapi_id"])
            out.writerows(["patient", f"G-{i + 1:08d}", GHOST_ID] for i in sorted(ghost_at))
    return Generated(path, rows, patients, tuple(sorted(i + 2 for i in ghost_at)), crosswalk)


def generate_realistic(path: Path, rows: int) -> Path:
    """Write the sample registry (``sample_data/registry.csv``) scaled to ``rows`` data rows.

    The sample is copied whole as many times as needed (the last copy cut short); in copy ``k``
    every record id and patient id gets the suffix ``-k``, so each copy's patients are new and keep
    their several doses, and the sample's planted bad rows (about 5%) stay bad and keep their share.
    """
    with SAMPLE.open(newline="", encoding="utf-8") as fh:
        header, *body = list(csv.reader(fh))
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as fh:
        out = csv.writer(fh)
        out.writerow(header)
        written, copy = 0, 0
        while written < rows:
            copy += 1
            for row in body[: rows - written]:
                row = list(row)
                for column in (0, 1):  # Record ID, Patient ID; an empty id stays empty
                    if row[column].strip():
                        row[column] = f"{row[column]}-{copy}"
                out.writerow(row)
            written += min(len(body), rows - written)
    return path
