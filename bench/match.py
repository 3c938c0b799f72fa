"""``python -m bench.match [--rows N] [--existing M]``: patient matching (:mod:`etl.matching`) of N incoming
patients against M a tenant holds, locally (no HTTP: the candidates are already fetched), in seconds.

The incoming patients are half copies of existing ones (exact matches, some with their names in
other case or accents), a few with a typo in the last name or the birth date's day and month
swapped (probable: review), the rest new. Prints the time of normalising both sides and of
matching, and the outcomes; a measurement, not a test (nothing asserts a time).
"""

from __future__ import annotations

import argparse
import json
import random
import time
from typing import Any

import polars as pl

from etl.matching import match_patients, people

FIRST = ["Ann", "Bo", "José", "Zoë", "Dorothy", "William", "Renée", "Amara", "Ingrid", "Raúl", "Nora", "Darnell",
         "Walter", "Mia", "Liam", "Olivia", "Noah", "Emma", "Ava", "Lucas", "Sofia", "Mateo", "Chen", "Aisha"]
LAST = ["Lee", "Ray", "O'Brien", "Mitchell", "Novak", "Campbell", "Okonkwo", "Gonzalez", "Nguyen", "Smith-Jones",
        "García", "Kowalski", "Haddad", "Ivanova", "Schmidt", "Rossi", "Tanaka", "Silva", "Dubois", "Murphy"]


def _person(rng: random.Random, i: int) -> dict[str, Any]:
    year, month, day = rng.randint(1940, 2024), rng.randint(1, 12), rng.randint(1, 28)
    return {
        "firstName": rng.choice(FIRST), "lastName": rng.choice(LAST) + ("" if i % 3 else rng.choice(LAST).lower()),
        "birthDate": f"{year:04d}-{month:02d}-{day:02d}", "gender": rng.choice(["male", "female"]),
        "phone": f"(617) 555-{rng.randint(0, 9999):04d}", "email": None,
        "address": {"postalCode": f"{rng.randint(1000, 99999):05d}"},
    }


def frames(rows: int, existing: int, seed: int = 16) -> tuple[pl.DataFrame, pl.DataFrame]:
    """(incoming, existing) patients as the API's JSON gives them."""
    rng = random.Random(seed)
    held = [{"id": f"pat_{i:08d}", **_person(rng, i)} for i in range(existing)]
    incoming = []
    for i in range(rows):
        roll = rng.random()
        if roll < 0.5 and held:
            p = dict(rng.choice(held))
            p.pop("id")
            if roll < 0.05:
                p["lastName"] = p["lastName"][:-1]  # a typo
            elif roll < 0.07:
                y, m, d = p["birthDate"].split("-")
                p["birthDate"] = f"{y}-{d}-{m}"  # day and month swapped
            elif roll < 0.2:
                p["firstName"] = p["firstName"].upper()
        else:
            p = _person(rng, existing + i)
        incoming.append({"source_key": f"P-{i}", **p})
    return pl.from_dicts(incoming, infer_schema_length=None), pl.from_dicts(held, infer_schema_length=None)


def main(argv: list[str] | None = None) -> int:
    """``python -m bench.match``."""
    parser = argparse.ArgumentParser(prog="python -m bench.match", description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=100_000, help="incoming patients")
    parser.add_argument("--existing", type=int, default=100_000, help="patients the tenant holds")
    args = parser.parse_args(argv)
    incoming, existing = frames(args.rows, args.existing)
    t0 = time.perf_counter()
    mine, theirs = people(incoming), people(existing)
    t1 = time.perf_counter()
    outcome = match_patients(mine, theirs, "probable")
    t2 = time.perf_counter()
    counts = dict(outcome.group_by("outcome").len().sort("outcome").iter_rows())
    print(json.dumps({"rows": args.rows, "existing": args.existing, "normalise_s": round(t1 - t0, 3),
                      "match_s": round(t2 - t1, 3), "outcomes": counts}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
