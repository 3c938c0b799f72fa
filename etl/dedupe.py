"""Identity of a row without a record id, and doses given twice.

**Natural keys.** A file whose profile maps no record-id column keys each row by what the row is
about, not by all of its content, so a later copy of the file that corrects a detail (a lot number)
keys the row the same way: the state store then finds it created, and the load reports it
``changed`` (``updated`` with ``--update``) instead of creating it again. :data:`NATURAL_KEYS`
lists each kind's fields; the key is ``natural:`` and the SHA-256 of their normalised values (a
hash, so no name or birth date reaches the report or the state store):

- immunization: patient + vaccine (CVX) + day given;
- encounter: patient + class + start;
- task: patient + code + authored on;
- document: patient + type + date;
- patient: first name + last name + birth date (case, accents and punctuation ignored);
- practitioner: NPI (as before: ``npi:<NPI>``), else first name + last name.

**Doses given twice.** Immunization registries de-duplicate doses (AIRA's *Vaccination Level
Deduplication in Immunization Information Systems* best practices, and CDC's IIS functional
standards that require IIS to de-duplicate vaccination records): two records of the same patient,
the same vaccine (the same CVX code, or the same vaccine group) on the same day are one dose.
:func:`dose_identities` gives a valid immunization row one identity per vaccine group of its CVX
code (:data:`VACCINE_GROUPS`, after CDC's CVX-to-vaccine-group table; a code not listed is its own
group); two rows sharing an identity are the same dose. Within a run the later row is ``exists``
and its message names the first row (:class:`DoseCheck`); against the chart, see
:mod:`etl.matching`.
"""

from __future__ import annotations

from collections.abc import Mapping

import polars as pl
import polars_hash  # noqa: F401 - registers the `chash` expression namespace

from etl.keyindex import SEED, KeyIndex, first_of_hashes
from etl.readers import ROW
from etl.rules import format_text

__all__ = [
    "NATURAL_KEYS",
    "VACCINE_GROUPS",
    "DoseCheck",
    "dose_identities",
    "dose_identity_of",
    "natural_key",
    "normalised_name",
    "vaccine_groups_frame",
]

#: Kind -> the canonical fields (their checked companions) whose values identify a row without a record id.
NATURAL_KEYS: Mapping[str, tuple[str, ...]] = {
    "immunization": ("patient_id", "vaccine_code", "occurrence__date"),
    "encounter": ("patient_id", "encounter_class", "period_start__date"),
    "task": ("patient_id", "task_code", "authored_on__date"),
    "document": ("patient_id", "document_type", "date__date"),
    "patient": ("patient_first_name", "patient_last_name", "patient_birth_date__date"),
    "practitioner": ("practitioner_first_name", "practitioner_last_name"),
}

#: CVX code -> its CDC vaccine groups (a combination vaccine belongs to each of its components' groups).
#: The codes the registries this tool meets use; any other code is a group of its own.
VACCINE_GROUPS: Mapping[str, tuple[str, ...]] = {
    # Hepatitis B
    **dict.fromkeys(("08", "42", "43", "44", "45", "189", "220"), ("HepB",)),
    "51": ("HepB", "Hib"),
    "102": ("DTaP", "HepB", "Hib"),
    "104": ("HepA", "HepB"),
    "110": ("DTaP", "HepB", "Polio"),
    "146": ("DTaP", "HepB", "Hib", "Polio"),
    # Diphtheria, tetanus, pertussis (DTaP; Td and Tdap are their own group)
    **dict.fromkeys(("20", "106", "107", "01", "22", "50"), ("DTaP",)),
    "120": ("DTaP", "Hib", "Polio"),
    "130": ("DTaP", "Polio"),
    **dict.fromkeys(("09", "113", "115", "138", "139"), ("Td/Tdap",)),
    # Polio, Hib
    **dict.fromkeys(("10", "89"), ("Polio",)),
    **dict.fromkeys(("17", "46", "47", "48", "49"), ("Hib",)),
    "148": ("Hib", "Mening"),
    # MMR, varicella
    "03": ("MMR",),
    "94": ("MMR", "Varicella"),
    "21": ("Varicella",),
    # Hepatitis A
    **dict.fromkeys(("31", "52", "83", "84", "85"), ("HepA",)),
    # Pneumococcal (conjugate and polysaccharide are one group)
    **dict.fromkeys(("33", "100", "109", "133", "152", "215", "216", "327"), ("Pneumococcal",)),
    # Rotavirus, HPV, meningococcal, zoster
    **dict.fromkeys(("116", "119", "122"), ("Rotavirus",)),
    **dict.fromkeys(("62", "118", "137", "165"), ("HPV",)),
    **dict.fromkeys(("32", "103", "108", "114", "136", "147", "167", "203", "316"), ("Mening",)),
    **dict.fromkeys(("121", "187", "188"), ("Zoster",)),
    # Influenza
    **dict.fromkeys(
        ("88", "111", "135", "140", "141", "144", "149", "150", "153", "155", "158", "161", "166", "168", "171",
         "185", "186", "197", "200", "201", "202", "205", "320"),
        ("Influenza",),
    ),
    # COVID-19
    **dict.fromkeys(
        ("207", "208", "210", "211", "212", "213", "217", "218", "219", "221", "225", "226", "227", "228", "229",
         "230", "300", "301", "302", "308", "309", "310", "311", "312", "313"),
        ("COVID-19",),
    ),
}


def normalised_name(name: pl.Expr) -> pl.Expr:
    """A name as matching compares it: accents, case, spaces and punctuation left out (``"O'Brien-Zoë"`` ->
    ``"obrienzoe"``)."""
    return (
        name.str.normalize("NFKD")
        .str.replace_all(r"\p{M}", "")
        .str.to_lowercase()
        .str.replace_all(r"[^\p{L}\p{N}]", "")
    )


def natural_key(kind: str, columns: set[str] | frozenset[str] | list[str]) -> pl.Expr | None:
    """The natural key of a row of ``kind`` (see the module's notes), or None when the kind has none or
    the frame lacks a field of it."""
    fields = NATURAL_KEYS.get(kind)
    if fields is None or not set(fields) <= set(columns):
        return None
    parts = [
        normalised_name(pl.col(f)) if f.endswith(("first_name", "last_name")) else pl.col(f).cast(pl.String)
        for f in fields
    ]
    joined = pl.concat_str([p.fill_null("") for p in parts], separator="\x1f")
    return pl.lit("natural:") + joined.chash.sha2_256()  # type: ignore[attr-defined, no-any-return]


def vaccine_groups_frame() -> pl.DataFrame:
    """:data:`VACCINE_GROUPS` as a frame: ``cvx, group``, a line per group of a code."""
    pairs = {(code, group) for code, groups in VACCINE_GROUPS.items() for group in groups}
    return pl.DataFrame(sorted(pairs), schema={"cvx": pl.String, "group": pl.String}, orient="row")


def dose_identity_of(patient: pl.Expr, cvx: pl.Expr, day: pl.Expr) -> pl.Expr:
    """The identity column of :func:`dose_identities` (with ``group`` already in the frame)."""
    return pl.concat_str([patient, day, pl.coalesce(pl.col("group"), pl.lit("cvx:") + cvx)], separator="\x1f")


def _dose_lines(frame: pl.DataFrame, patient: str, cvx: str, day: str) -> pl.DataFrame:
    """Each line of ``frame`` once per vaccine group of its CVX code (``group``: null when the code has none);
    lines lacking the patient, the code or the day are left out."""
    need = pl.col(patient).is_not_null() & pl.col(cvx).is_not_null() & pl.col(day).is_not_null()
    return frame.filter(need).join(vaccine_groups_frame(), left_on=cvx, right_on="cvx", how="left")


def dose_identities(frame: pl.DataFrame, patient: str, cvx: str, day: str) -> pl.DataFrame:
    """Each line of ``frame`` once per vaccine group of its CVX code (``group``: null when the code has
    none), with ``identity``: patient, day and group (or the code itself); lines lacking one of
    the three are left out."""
    # A date column's day as its number (days since 1970): a third of what writing it as a date costs. Both
    # sides of a comparison come from one kind of column (DoseCheck's dates, matching's texts).
    on = pl.col(day).cast(pl.Int32) if frame.schema[day] == pl.Date else pl.col(day)
    return _dose_lines(frame, patient, cvx, day).with_columns(
        dose_identity_of(pl.col(patient), pl.col(cvx), on.cast(pl.String)).alias("identity")
    )


_SAME, _SAME_TOO = "__dose", "__dose_too"  # a dose's identity as the two hashes DoseCheck's index holds


def _identity(day: pl.DataType) -> pl.Expr:
    """A dose's identity (:func:`dose_identities`' text, as its parts) over DoseCheck's lines: patient, day, and
    the group, or the code of one with none; a Date column's day as its number, as :func:`dose_identities` has it."""
    on = pl.col("occurrence__date")
    return pl.struct(
        pl.col("patient_id"), on.cast(pl.Int32) if day == pl.Date else on, pl.col("group"),
        pl.when(pl.col("group").is_null()).then(pl.col("vaccine_code")).alias("cvx"),
    )


class DoseCheck:
    """The doses a run has seen so far, to tell a dose given twice in its files (see the module's notes).

    :meth:`mark` takes a batch's report rows and its valid rows: a planned row whose dose an earlier
    row of the run (this batch's or an earlier one's, this file's or another's) already holds becomes
    ``exists``, its message naming that row, and nothing is created for it.
    """

    def __init__(self) -> None:
        # A file as its number among the run's files (``files``): the index holds a million doses' rows and
        # merges them as it grows, a number cheaper than text to hold and to move.
        self.seen = KeyIndex({"first_file": pl.UInt32(), "first_row": pl.UInt32()})
        self.files: dict[str, int] = {}
        self.found: list[pl.DataFrame] = []  # source_file, source_row, first_file, first_row of each duplicate

    def duplicates(self) -> pl.DataFrame:
        """Each row marked ``exists`` so far, with the row that holds its dose first."""
        schema = {"source_file": pl.String, "source_row": pl.UInt32, "first_file": pl.String, "first_row": pl.UInt32}
        return pl.concat(self.found) if self.found else pl.DataFrame(schema=schema)

    def mark(self, rows: pl.DataFrame, valid: pl.DataFrame, file: str) -> pl.DataFrame:
        """``rows`` (the batch's report rows) with the doses seen before marked ``exists``."""
        needed = {"patient_id", "vaccine_code", "occurrence__date", ROW}
        if not needed <= set(valid.columns) or valid.is_empty():
            return rows
        live = rows.select(pl.col("source_row").filter(pl.col("state") == "planned").alias(ROW))
        # A line per (row, group): distinct already, as a code's groups are. The identity is kept as its hashes
        # (the index holds no more of it): building its text was most of what this step cost.
        mine = valid.select(ROW, "patient_id", "vaccine_code", "occurrence__date").join(live, on=ROW, how="semi")
        identity = _identity(mine.schema["occurrence__date"])
        doses = (
            _dose_lines(mine, "patient_id", "vaccine_code", "occurrence__date")
            .select(ROW, identity.hash().alias(_SAME), identity.hash(seed=SEED).alias(_SAME_TOO))
            .sort(ROW)
        )
        if doses.is_empty():
            return rows
        # Looked up and remembered in one step: a dose the index lacks is added with its first row here
        # (the rows are in order, so a key's first line is its first row); an earlier batch's wins.
        number = self.files.setdefault(file, len(self.files))
        sighted = doses.select(
            pl.lit(number, dtype=pl.UInt32).alias("first_file"),
            pl.col(ROW).cast(pl.UInt32).alias("first_row"),
        )
        names = pl.Series(list(self.files), dtype=pl.String)
        first = first_of_hashes(doses.get_column(_SAME), doses.get_column(_SAME_TOO))
        found = self.seen.insert_hashes(doses.get_column(_SAME), doses.get_column(_SAME_TOO), sighted, first=first)
        found = found.with_columns(names.gather(found.get_column("first_file")).alias("first_file"))
        # The batch's first row with the dose: the row itself, but for a dose the batch holds twice.
        here = pl.col(ROW).min().over(_SAME, _SAME_TOO) if not first.all() else pl.col(ROW)
        earlier = pl.concat([doses, found], how="horizontal").with_columns(here.alias("here_row"))
        earlier = earlier.with_columns(
            pl.when(pl.col("found"))
            .then(pl.col("first_file"))
            .when(pl.col("here_row") < pl.col(ROW))
            .then(pl.lit(file))
            .alias("dup_file"),
            pl.when(pl.col("found"))
            .then(pl.col("first_row"))
            .when(pl.col("here_row") < pl.col(ROW))
            .then(pl.col("here_row"))
            .alias("dup_row"),
        )
        dups = (
            earlier.filter(pl.col("dup_row").is_not_null())
            .sort(ROW, "dup_row")
            .filter(pl.col(ROW).is_first_distinct())  # each row's earliest duplicate
            .select(pl.col(ROW).alias("source_row"), "dup_file", "dup_row")
        )
        if dups.is_empty():
            return rows
        marked = rows.join(dups, on="source_row", how="left", maintain_order="left")
        hit = (pl.col("state") == "planned") & pl.col("dup_row").is_not_null()
        self.found.append(marked.filter(hit).select(
            pl.lit(file).alias("source_file"), pl.col("source_row").cast(pl.UInt32),
            pl.col("dup_file").alias("first_file"), pl.col("dup_row").cast(pl.UInt32).alias("first_row"),
        ))
        message = format_text("the same dose (patient, vaccine group, day) as {} row {}: not created twice",
                            "dup_file", "dup_row")
        return marked.with_columns(
            pl.when(hit).then(pl.lit("exists")).otherwise(pl.col("state")).alias("state"),
            pl.when(hit).then(message).otherwise(pl.col("message")).alias("message"),
        ).drop("dup_file", "dup_row")
