"""Match what a run would create against what the target already holds, before anything is sent.

A tenant often holds data already: patients entered at the front desk, doses recorded by another
clinic or an earlier import. After the plan (:mod:`etl.plan`) and before the sends, a load (and a
dry run with ``--base-url``, which reads only) asks the target about the creates it planned that
the state store does not know, and decides for each:

**Patients** (``--match off|exact|probable``, default ``probable``). Names are compared normalised
(accents, case, spaces and punctuation left out: :func:`etl.dedupe.normalised_name`), phones by
their last ten digits, e-mail case-folded, ZIP codes by their first five digits, sex by its first
letter and only when both sides have ``male``/``female``:

- *exact*: same first name, last name and birth date (and sex, when both have it), one such
  patient in the tenant -> the row is ``matched`` and linked to it (nothing created; its children
  are created for that patient);
- *probable* (only with ``--match probable``): the same birth date and names at least
  :data:`NAME_SIMILARITY` similar (rapidfuzz's normalised Indel ratio of "first last", 0-100), or
  day and month of the birth date swapped with names as similar *and* the same phone, e-mail or
  ZIP; or several exact matches -> neither linked nor created: the row is ``needs-review`` and
  listed in ``review.csv`` with its candidates and scores (so are the rows that refer to it);
- none -> created.

A person writes a decision in ``review.csv``'s ``decision`` column (``link <id>``, ``create`` or
``skip``) and loads again with ``--accept-review review.csv``: ``link`` makes the row ``matched``
to that patient, ``create`` creates it, ``skip`` leaves it (and the rows that refer to it)
``skipped``; an empty decision keeps it ``needs-review``.

**Practitioners**: one with the same NPI in the tenant -> ``matched`` (an NPI names one clinician).

**Doses** (``--dedupe-doses``, default on): an immunization the chart of its (matched or earlier
created) patient already holds for the same vaccine group on the same day
(:func:`etl.dedupe.dose_identities`) -> ``exists`` with the existing id, nothing created.

**Cost.** Candidates are fetched once per run: patients by ``birthDate`` search (one search per
distinct birth date, and per swapped one), or, when the tenant's patients fit in fewer pages than
that, by listing them all (100 a page); practitioners by ``npi``; doses by ``patientId``, for the
patients that exist already. ClinikAPI's bulk export (``POST /v1/bulk/export``) is not used: 5
operations an hour, asynchronous, and its NDJSON is fetched from a pre-signed storage URL off the
API's host; a listing costs ``total / 100`` requests and is always current. The requests are
counted in the summary (``matching_requests``; ``matching`` holds the counts).
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import polars as pl

from etl.dedupe import dose_identities, normalised_name
from etl.errors import InputError, LookupFailed, QuotaExceededError
from etl.files import unguard_formulas, write_csv
from etl.load.lookup import as_simple
from etl.progress import Progress
from etl.readers import ROW, read_table
from etl.report import RunFacts
from etl.rules import format_text
from etl.settings import Settings
from schemas.limits import ROUTES

if TYPE_CHECKING:
    from etl.load.client import ApiClient
    from etl.load.state import StateStore
    from etl.plan import Run

__all__ = [
    "NAME_SIMILARITY",
    "REVIEW_COLUMNS",
    "Matcher",
    "match_patients",
    "people",
    "read_decisions",
]

#: The least rapidfuzz ratio (0-100) of two normalised "first last" names for a probable match.
NAME_SIMILARITY = 85.0
#: The columns of ``review.csv`` (with ``--redact``: all but the names, birth dates and contact details).
REVIEW_COLUMNS = (
    "kind", "source_key", "source_file", "source_row", "first_name", "last_name", "birth_date",
    "candidate_ids", "scores", "rules", "candidate_names", "candidate_birth_dates", "decision",
)
_PRIVATE = ("first_name", "last_name", "birth_date", "candidate_names", "candidate_birth_dates")

_PATIENT = pl.Struct(
    {
        "id": pl.String, "firstName": pl.String, "lastName": pl.String, "birthDate": pl.String,
        "gender": pl.String, "phone": pl.String, "email": pl.String,
        "address": pl.Struct({"postalCode": pl.String}),
    }
)
_DOSE = pl.Struct(
    {
        "id": pl.String, "patientId": pl.String, "occurrenceDateTime": pl.String,
        "vaccineCode": pl.Struct({"code": pl.String}),
    }
)
_CANDIDATES = {"source_key": pl.String, "id": pl.String, "score": pl.Float64, "rule": pl.String}


def people(frame: pl.DataFrame) -> pl.DataFrame:
    """Patients (``firstName``, ``lastName``, ``birthDate``, ``gender``, ``phone``, ``email``,
    ``address.postalCode`` columns) with the normalised columns matching compares."""
    frame = frame.with_columns(pl.col(c).cast(pl.String) for c in ("firstName", "lastName", "birthDate", "gender",
                                                                    "phone", "email"))
    digits = pl.col("phone").str.replace_all(r"\D", "")
    sex = pl.col("gender").str.to_lowercase().str.slice(0, 1)
    first, last = normalised_name(pl.col("firstName")), normalised_name(pl.col("lastName"))
    return frame.with_columns(
        first.alias("n_first"),
        last.alias("n_last"),
        pl.concat_str([first.fill_null(""), last.fill_null("")], separator=" ").alias("n_name"),
        pl.col("birthDate").str.slice(0, 10).alias("n_birth"),
        pl.when(sex.is_in(["m", "f"])).then(sex).alias("n_sex"),
        pl.when(digits.str.len_chars() >= 7).then(digits.str.slice(-10)).alias("n_phone"),
        pl.col("email").str.strip_chars().str.to_lowercase().alias("n_email"),
        pl.col("address").struct.field("postalCode").str.replace_all(r"\D", "").str.slice(0, 5).alias("n_zip"),
    )


def _swapped(birth: pl.Expr) -> pl.Expr:
    """``YYYY-DD-MM`` of ``YYYY-MM-DD`` when that is another real date (null otherwise)."""
    swapped = pl.concat_str([birth.str.slice(0, 4), birth.str.slice(8, 2), birth.str.slice(5, 2)], separator="-")
    real = swapped.str.to_date("%Y-%m-%d", strict=False).is_not_null()
    return pl.when(real & (swapped != birth)).then(swapped)


def _same(column: str) -> pl.Expr:
    return pl.col(column).is_not_null() & (pl.col(column) == pl.col(f"{column}_c"))


def match_patients(incoming: pl.DataFrame, existing: pl.DataFrame, mode: str) -> pl.DataFrame:
    """Each incoming patient (``source_key`` and the :func:`people` columns) against the ``existing``
    ones (``id`` and the same columns): ``source_key, outcome`` (``matched``, ``review`` or
    ``create``), ``resource_id`` (matched) and the candidates (``candidate_ids``, ``scores``,
    ``rules``, ``candidate_names``, ``candidate_birth_dates``: ``;``-separated, best first)."""
    theirs = existing.select(
        "id", *(pl.col(c).alias(f"{c}_c") for c in ("n_first", "n_last", "n_name", "n_birth", "n_sex", "n_phone",
                                                    "n_email", "n_zip")),
        pl.concat_str([pl.col("firstName").fill_null(""), pl.col("lastName").fill_null("")], separator=" ")
        .alias("name_c"),
    )
    sex_ok = pl.col("n_sex").is_null() | pl.col("n_sex_c").is_null() | (pl.col("n_sex") == pl.col("n_sex_c"))
    mine = incoming.select("source_key", "n_first", "n_last", "n_name", "n_birth", "n_sex", "n_phone", "n_email",
                           "n_zip")
    exact = (
        mine.join(theirs, left_on=["n_first", "n_last", "n_birth"], right_on=["n_first_c", "n_last_c", "n_birth_c"])
        .filter(sex_ok)
        .select("source_key", "id", pl.lit(100.0).alias("score"), pl.lit("exact").alias("rule"))
    )
    candidates = [exact]
    if mode == "probable":
        # Imported when names are compared: a run whose creates are all known to the state store (a weekly
        # re-import) compares none.
        from rapidfuzz import fuzz
        from rapidfuzz.process import cpdist

        same_day = mine.join(theirs, left_on="n_birth", right_on="n_birth_c").with_columns(
            pl.col("n_birth").alias("n_birth_c")
        )
        swapped = mine.with_columns(_swapped(pl.col("n_birth")).alias("__swapped")).join(
            theirs, left_on="__swapped", right_on="n_birth_c"
        ).with_columns(pl.col("__swapped").alias("n_birth_c")).drop("__swapped")
        for pairs, rule, support in (
            (same_day, "similar-name", pl.lit(True)),
            (swapped, "day-month-swapped", _same("n_phone") | _same("n_email") | _same("n_zip")),
        ):
            if pairs.is_empty():
                continue
            scores = cpdist(pairs.get_column("n_name").to_list(), pairs.get_column("n_name_c").to_list(),
                            scorer=fuzz.ratio, workers=1)
            candidates.append(
                pairs.with_columns(pl.Series("score", scores, dtype=pl.Float64).round(1))
                .filter((pl.col("score") >= NAME_SIMILARITY) & support)  # sex differs: a person tells
                .select("source_key", "id", "score", pl.lit(rule).alias("rule"))
            )
    found = (
        pl.concat([c.cast(_CANDIDATES) for c in candidates])  # type: ignore[arg-type]
        .sort("score", descending=True, maintain_order=True)
        .unique(["source_key", "id"], keep="first", maintain_order=True)
        .join(theirs.select("id", "name_c", "n_birth_c"), on="id", how="left")
    )
    per_key = found.group_by("source_key", maintain_order=True).agg(
        (pl.col("rule") == "exact").sum().alias("exact"),
        pl.col("id").first().alias("first_id"),
        pl.col("id").str.join(";").alias("candidate_ids"),
        pl.col("score").cast(pl.String).str.join(";").alias("scores"),
        pl.col("rule").str.join(";").alias("rules"),
        pl.col("name_c").str.join(";").alias("candidate_names"),
        pl.col("n_birth_c").str.join(";").alias("candidate_birth_dates"),
    )
    return (
        mine.select("source_key")
        .join(per_key, on="source_key", how="left", maintain_order="left")
        .with_columns(
            pl.when(pl.col("candidate_ids").is_null())
            .then(pl.lit("create"))
            .when(pl.col("exact") == 1)  # one exact match is linked; several are for a person to tell apart
            .then(pl.lit("matched"))
            .otherwise(pl.lit("review"))
            .alias("outcome")
        )
        .with_columns(pl.when(pl.col("outcome") == "matched").then(pl.col("first_id")).alias("resource_id"))
        .drop("exact", "first_id")
    )


def read_decisions(path: Path) -> pl.DataFrame:
    """A ``review.csv`` a person filled in: ``kind, source_key, action, resource_id`` of each decision
    (``link <id>``, ``create``, ``skip``; an empty one is left out). A bad one stops the run, naming
    its row."""
    table = read_table(path)
    frame = unguard_formulas(table.frame)
    missing = {"kind", "source_key", "decision"} - set(frame.columns)
    if missing:
        raise InputError(str(path), f"a review file needs the columns {', '.join(sorted(missing))}", row=1)
    decided = frame.select(
        ROW, "kind", "source_key", pl.col("decision").str.strip_chars().str.to_lowercase().alias("d"),
        pl.col("decision").str.strip_chars().alias("raw"),
    ).filter(pl.col("d").is_not_null() & (pl.col("d") != ""))
    parts = decided.with_columns(
        pl.col("d").str.extract(r"^(link|create|skip)\b", 1).alias("action"),
        pl.col("raw").str.extract(r"^\S+\s+(\S+)\s*$", 1).alias("resource_id"),
    )
    bad = parts.filter(
        pl.col("action").is_null()
        | ((pl.col("action") == "link") & pl.col("resource_id").is_null())
        | ((pl.col("action") != "link") & (pl.col("d").str.contains(r"\s")))
    )
    if bad.height:
        raise InputError(
            str(path), f"decision {bad['raw'][0]!r}: write 'link <id>', 'create' or 'skip'",
            row=int(bad[ROW][0]), column="decision",
        )
    return parts.select("kind", "source_key", "action", "resource_id")


@dataclass
class _Decisions:
    """What matching decided, by (kind, source_key)."""

    rows: list[pl.DataFrame] = field(default_factory=list)  # kind, source_key, state, resource_id, message

    def add(self, kind: str, frame: pl.DataFrame) -> None:
        if frame.height:
            self.rows.append(frame.select(pl.lit(kind).alias("kind"), "source_key", "state",
                                          pl.col("resource_id").cast(pl.String), "message"))

    def frame(self) -> pl.DataFrame:
        schema = {"kind": pl.String, "source_key": pl.String, "state": pl.String, "resource_id": pl.String,
                  "message": pl.String}
        return pl.concat(self.rows) if self.rows else pl.DataFrame(schema=schema)


class Matcher:
    """Matches a planned run against the target (see the module's notes); called by the plan once every
    file is read (:func:`etl.plan.planned_in_batches`' ``matcher``), before anything is sent.

    ``base_url`` and ``key``: the target it reads (every request it makes is a GET); ``progress``: where
    a note says why matching was skipped.
    """

    def __init__(self, base_url: str, key: str, settings: Settings, progress: Progress | None = None) -> None:
        self.base_url, self.key, self.settings, self.progress = base_url, key, settings, progress
        self.requests = 0
        self.counts = {"matched": 0, "needs-review": 0, "exists": 0}
        self.strategy = "none"

    # --- requests ---------------------------------------------------------------------------

    def _ask(self, work: Callable[[ApiClient], Any]) -> Any:
        from etl.load.client import ApiClient, http_client

        async def run() -> Any:
            async with http_client(self.base_url, self.settings) as http:
                client = ApiClient(http, self.key)
                try:
                    return await work(client)
                finally:
                    self.requests += client.requests

        return asyncio.run(run())

    def _list_or_search(self, route: str, name: str, values: list[str]) -> tuple[str, list[dict[str, Any]]]:
        """What the tenant holds at ``route`` for ``values`` of the filter ``name``, and how it was read: one
        search per value, or the whole list (100 a page) when that takes fewer requests. Reads count against
        the plan's quota: a run that resumes after a quota stop must not spend it re-reading what it made."""

        async def work(client: ApiClient) -> tuple[str, list[dict[str, Any]]]:
            page = await client.get(route, {"count": 1})
            total = int(page.get("total", 0)) if isinstance(page, dict) else 0
            if total == 0:
                return "empty tenant", []
            if math.ceil(total / 100) <= len(values):
                return "list", await client.search(route, {})
            found: list[dict[str, Any]] = []
            for value in values:
                found += await client.search(route, {name: value})
            return f"search by {name}", found

        result: tuple[str, list[dict[str, Any]]] = self._ask(work)
        return result

    def _patients(self, births: list[str]) -> list[dict[str, Any]]:
        self.strategy, found = self._list_or_search(ROUTES["PatientCreate"], "birthDate", births)
        return found

    def _charts(self, patient_ids: list[str]) -> list[dict[str, Any]]:
        """The immunizations the tenant holds for ``patient_ids``, in either answer shape."""
        how, found = self._list_or_search(ROUTES["ImmunizationCreate"], "patientId", patient_ids)
        if how != "list":
            return found
        wanted = set(patient_ids)
        return [r for r in found if as_simple("immunization", r)["patientId"] in wanted]

    def _search_each(self, route: str, name: str, values: list[str]) -> list[dict[str, Any]]:
        async def work(client: ApiClient) -> list[dict[str, Any]]:
            found: list[dict[str, Any]] = []
            for value in values:
                found += await client.search(route, {name: value})
            return found

        result: list[dict[str, Any]] = self._ask(work)
        return result

    # --- the run ----------------------------------------------------------------------------

    def __call__(self, run: Run) -> None:
        """Match the run's creates (see the module's notes). A target that cannot be read (no answer, a
        refusal, an untrusted certificate) leaves every create as planned: the summary's ``matching``
        says why (``error``), and the load meets the same target as before."""
        try:
            self._match(run)
        except QuotaExceededError as exc:
            # Reads count against the quota too: with it used up, nothing may be created unmatched, and
            # nothing could be: the run stops before sending (exit 5) and the same command resumes later.
            run.halt = exc
            run.add_facts(RunFacts(matching_requests=self.requests, matching={
                "mode": self.settings.match, "dedupe_doses": self.settings.dedupe_doses,
                "error": f"{exc.message}; nothing was matched or sent",
            }))
        except LookupFailed as exc:
            if self.progress is not None:
                self.progress.note(f"matching skipped: could not read the target ({exc})")
            run.add_facts(RunFacts(matching_requests=self.requests, matching={
                "mode": self.settings.match, "dedupe_doses": self.settings.dedupe_doses,
                "error": f"could not read the target: {exc}; nothing was matched",
            }))

    def _match(self, run: Run) -> None:
        settings = self.settings
        payloads = run.keys.payloads
        if payloads is None:
            return
        creates = _creates(payloads.stages(), run.keys.state)
        decisions = _Decisions()
        reviews: list[pl.DataFrame] = []
        decided = read_decisions(settings.accept_review) if settings.accept_review else None

        patients = creates.filter(pl.col("kind") == "patient")
        skipped_patients = pl.Series("source_key", [], dtype=pl.String)
        review_patients = pl.Series("source_key", [], dtype=pl.String)
        if settings.match != "off" and patients.height:
            mine = people(patients.select("source_key", ROW, pl.col("person").struct.unnest()))
            births = mine.get_column("birthDate").str.slice(0, 10).drop_nulls().unique()
            if settings.match == "probable":
                births = pl.concat([births, births.to_frame("b").select(_swapped(pl.col("b"))).to_series()])
            theirs = self._patients(births.drop_nulls().unique().sort().to_list())
            theirs = [as_simple("patient", r) for r in theirs]  # either answer shape (etl.load.lookup)
            existing = people(pl.from_dicts(theirs, schema=_PATIENT.to_schema()) if theirs
                              else pl.DataFrame(schema=_PATIENT.to_schema()))
            outcome = match_patients(mine, existing, settings.match).join(
                mine.select("source_key", ROW, pl.col("firstName").alias("first_name"),
                            pl.col("lastName").alias("last_name"), pl.col("birthDate").alias("birth_date")),
                on="source_key", how="left",
            )
            if decided is not None:
                outcome = _apply_decisions(outcome, decided.filter(pl.col("kind") == "patient"))
            matched = outcome.filter(pl.col("outcome") == "matched")
            decisions.add("patient", matched.with_columns(
                pl.lit("matched").alias("state"),
                format_text("matched to the tenant's patient {} ({})", "resource_id",
                          pl.col("rules").fill_null("decision")).alias("message"),
            ))
            review = outcome.filter(pl.col("outcome") == "review")
            decisions.add("patient", review.with_columns(
                pl.lit("needs-review").alias("state"), pl.lit(None, dtype=pl.String).alias("resource_id"),
                format_text("probable match ({}: {}): see review.csv", "rules", "candidate_ids").alias("message"),
            ))
            skip = outcome.filter(pl.col("outcome") == "skip")
            decisions.add("patient", skip.with_columns(
                pl.lit("skipped").alias("state"), pl.lit(None, dtype=pl.String).alias("resource_id"),
                pl.lit("skipped by the review decision").alias("message"),
            ))
            review_patients, skipped_patients = review.get_column("source_key"), skip.get_column("source_key")
            reviews.append(review)
            for key, rid in matched.select("source_key", "resource_id").iter_rows():
                run.keys.known[("patient", key)] = rid
            self.counts["matched"] += matched.height

        practitioners = creates.filter(pl.col("kind") == "practitioner")
        if settings.match != "off" and practitioners.height:
            npis = practitioners.select("source_key", "npi").drop_nulls("npi")
            theirs = self._search_each(ROUTES["PractitionerCreate"], "npi", npis.get_column("npi").unique().to_list())
            if theirs:
                simple = [as_simple("practitioner", r) for r in theirs]
                held = pl.from_dicts(simple, schema={"id": pl.String, "npi": pl.String}).unique("npi", keep="first")
                matched = npis.join(held, on="npi").rename({"id": "resource_id"})
                decisions.add("practitioner", matched.with_columns(
                    pl.lit("matched").alias("state"),
                    format_text("matched to the tenant's practitioner {} (same NPI)", "resource_id").alias("message"),
                ))
                aliases = run.keys.aliases.filter(pl.col("kind") == "practitioner")
                for key, rid in matched.select("source_key", "resource_id").iter_rows():
                    run.keys.known[("practitioner", key)] = rid
                for value, alias in aliases.select("value", "alias").iter_rows():
                    if ("practitioner", alias) in run.keys.known:
                        run.keys.known[("practitioner", value)] = run.keys.known[("practitioner", alias)]
                self.counts["matched"] += matched.height

        # Rows that refer to a patient in review (or skipped by a decision) wait with it.
        for patients_out, state, message in (
            (review_patients, "needs-review", "its patient {} needs review (review.csv): not sent"),
            (skipped_patients, "skipped", "its patient {} was skipped by the review decision"),
        ):
            if patients_out.is_empty():
                continue
            refs = patients_out.to_frame("patient").with_columns(
                (pl.lit("@@patient:") + pl.col("patient").str.encode("hex") + pl.lit("@@")).alias("ref")
            )
            held = creates.filter(pl.col("kind") != "patient").join(refs, on="ref", how="inner")
            for (kind,), mine in held.group_by("kind"):
                decisions.add(str(kind), mine.with_columns(
                    pl.lit(state).alias("state"), pl.lit(None, dtype=pl.String).alias("resource_id"),
                    format_text(message, "patient").alias("message"),
                ))

        if settings.dedupe_doses:
            decisions.add("immunization", self._doses(run, creates, decisions.frame()))

        final = decisions.frame().unique(["kind", "source_key"], keep="first", maintain_order=True)
        for (kind,), mine in final.group_by("kind"):
            payloads.withdraw(str(kind), mine.get_column("source_key"))
        self.counts["needs-review"] = 0
        self.counts["exists"] = 0
        _rewrite_rows(run, final, self.counts)
        review_frame = pl.concat(reviews) if reviews else None
        if review_frame is not None and review_frame.height:
            _write_review(review_frame, run, redacted=settings.redact)
        run.add_facts(RunFacts(matching_requests=self.requests, matching={
            "mode": settings.match, "dedupe_doses": settings.dedupe_doses, "patients_fetched_by": self.strategy,
            **self.counts,
        }))

    def _doses(self, run: Run, creates: pl.DataFrame, decided: pl.DataFrame) -> pl.DataFrame:
        """The planned doses the chart of their (existing) patient already holds: ``source_key, state,
        resource_id, message``."""
        doses = creates.filter(pl.col("kind") == "immunization").join(
            decided.filter(pl.col("kind") == "immunization"), on="source_key", how="anti"
        )
        empty = pl.DataFrame(schema={"source_key": pl.String, "state": pl.String, "resource_id": pl.String,
                                     "message": pl.String})
        if doses.is_empty():
            return empty
        doses = doses.with_columns(
            pl.col("ref").str.extract(r"@@patient:([0-9a-f]*)@@", 1).str.decode("hex").cast(pl.String)
            .alias("patient_key"),
        )
        ids = _patient_ids(run, doses.get_column("patient_key").drop_nulls().unique())
        doses = doses.join(ids, on="patient_key", how="inner")
        if doses.is_empty():
            return empty
        charted = self._charts(doses.get_column("patient_id").unique().sort().to_list())
        if not charted:
            return empty
        charted = [as_simple("immunization", r) for r in charted]
        chart = pl.from_dicts(charted, schema=_DOSE.to_schema()).select(
            pl.col("id").alias("existing_id"), "patientId",
            pl.col("vaccineCode").struct.field("code").alias("cvx"),
            pl.col("occurrenceDateTime").str.slice(0, 10).alias("day"),
        )
        held = dose_identities(chart, "patientId", "cvx", "day").select("identity", "existing_id")
        mine = dose_identities(doses, "patient_id", "cvx", "day").select("source_key", "identity")
        found = (
            mine.join(held, on="identity", how="inner")
            .group_by("source_key", maintain_order=True)
            .agg(pl.col("existing_id").first().alias("resource_id"))
        )
        return found.with_columns(
            pl.lit("exists").alias("state"),
            format_text("the patient's chart holds this dose already (immunization {}: same vaccine group, same day)",
                      "resource_id").alias("message"),
        ).select("source_key", "state", "resource_id", "message")


def _creates(stages: Iterator[tuple[int, Iterator[pl.DataFrame]]], state: StateStore | None) -> pl.DataFrame:
    """The planned creates the state store holds no record of (:func:`_unknown_to_store`), a part at a time,
    as what matching reads of them (their bodies left behind): ``kind, source_key, __row, person`` (a
    patient's fields), ``ref`` (the patient a body names), ``cvx``, ``day``, ``npi``. The store is asked
    first, so the bodies of a re-import's rows (all of them known) are never parsed."""
    body = pl.col("body")
    is_patient = pl.col("kind") == "patient"
    parts = [
        frame.select(
            "kind", "source_key", pl.col(ROW).cast(pl.UInt32),
            pl.when(is_patient).then(body).str.json_decode(_PATIENT).alias("person"),
            pl.when(~is_patient).then(body.str.extract(r"@@patient:[0-9a-f]*@@", 0)).alias("ref"),
            body.str.json_path_match("$.vaccineCode.code").alias("cvx"),
            body.str.json_path_match("$.occurrenceDateTime").str.slice(0, 10).alias("day"),
            body.str.json_path_match("$.npi").alias("npi"),
        )
        for _, frames in stages
        for frame in (_unknown_to_store(state, f) for f in frames)
        if frame.height
    ]
    if parts:
        return pl.concat(parts, how="vertical_relaxed")
    return pl.DataFrame(schema={"kind": pl.String, "source_key": pl.String, ROW: pl.UInt32, "person": _PATIENT,
                                "ref": pl.String, "cvx": pl.String, "day": pl.String, "npi": pl.String})


def _unknown_to_store(state: StateStore | None, creates: pl.DataFrame) -> pl.DataFrame:
    """The creates the state store holds no record of, or one of a failed send (those it holds are skipped,
    resolved or sent again by the loader, as before); one store read per kind (a set operation)."""
    if state is None or creates.is_empty():
        return creates
    held = [
        state.stored(str(kind), mine.get_column("source_key"), states=("pending", "created", "unknown"), columns=())
        .select(pl.lit(str(kind)).alias("kind"), "source_key")
        for (kind,), mine in creates.select("kind", "source_key").group_by("kind")
    ]
    return creates.join(pl.concat(held), on=["kind", "source_key"], how="anti", maintain_order="left")


def _patient_ids(run: Run, keys: pl.Series) -> pl.DataFrame:
    """``patient_key, patient_id``: the ClinikAPI id of each patient key that exists already (matched now,
    created by an earlier run, or in the crosswalk)."""
    schema = {"patient_key": pl.String, "patient_id": pl.String}
    linked = pl.DataFrame([(k, v) for (kind, k), v in run.keys.known.items() if kind == "patient"],
                          schema=schema, orient="row")
    found = keys.to_frame("patient_key").join(linked, on="patient_key", how="inner")
    if run.keys.state is not None:
        rest = keys.to_frame("patient_key").join(found, on="patient_key", how="anti").get_column("patient_key")
        stored = run.keys.state.stored("patient", rest, states=("created",), columns=("resource_id",))
        found = pl.concat([found, stored.filter(pl.col("resource_id").fill_null("") != "").select(
            pl.col("source_key").alias("patient_key"), pl.col("resource_id").alias("patient_id"))])
    return found


def _apply_decisions(outcome: pl.DataFrame, decided: pl.DataFrame) -> pl.DataFrame:
    """The outcomes with a person's decisions (``--accept-review``) put in."""
    joined = outcome.join(decided.select("source_key", "action", pl.col("resource_id").alias("chosen")),
                          on="source_key", how="left", maintain_order="left")
    act = pl.col("action")
    return joined.with_columns(
        pl.when(act == "link").then(pl.lit("matched"))
        .when(act == "create").then(pl.lit("create"))
        .when(act == "skip").then(pl.lit("skip"))
        .otherwise(pl.col("outcome")).alias("outcome"),
        pl.when(act == "link").then(pl.col("chosen")).otherwise(pl.col("resource_id")).alias("resource_id"),
        pl.when(act == "link").then(pl.lit("linked by the review decision")).otherwise(pl.col("rules"))
        .alias("rules"),
    ).drop("action", "chosen")


def _rewrite_rows(run: Run, final: pl.DataFrame, counts: dict[str, int]) -> None:
    """Each report part with the decisions: a planned row decided becomes its state; a row naming a
    matched patient shows that patient's id."""
    linked = pl.DataFrame(
        [(k, v) for (kind, k), v in run.keys.known.items() if kind == "patient"],
        schema={"patient_key": pl.String, "linked_id": pl.String}, orient="row",
    )
    if final.is_empty() and linked.is_empty():  # nothing decided, no patient linked (a re-import): parts unread
        return
    decided = final.rename({"state": "d_state", "resource_id": "d_id", "message": "d_message"})
    for part in list(run.parts):
        rows = pl.read_ipc(part)
        mine = decided.join(rows.select("kind", "source_key"), on=["kind", "source_key"], how="semi")
        if mine.is_empty() and not rows.join(linked, on="patient_key", how="semi").height:
            continue
        hit = (pl.col("state") == "planned") & pl.col("d_state").is_not_null()
        rows = (
            rows.join(mine, on=["kind", "source_key"], how="left", maintain_order="left")
            .join(linked, on="patient_key", how="left", maintain_order="left")
            .with_columns(
                pl.when(hit).then(pl.col("d_state")).otherwise(pl.col("state")).alias("state"),
                pl.when(hit).then(pl.col("d_id")).otherwise(pl.col("resource_id")).alias("resource_id"),
                pl.when(hit).then(pl.col("d_message")).otherwise(pl.col("message")).alias("message"),
                pl.coalesce("linked_id", "patient_key").alias("patient_key"),
            )
            .drop("d_state", "d_id", "d_message", "linked_id")
        )
        for state in ("needs-review", "exists"):
            counts[state] = counts.get(state, 0) + rows.filter(pl.col("state") == state).height
        run.rewrite(part, rows)


def _write_review(review: pl.DataFrame, run: Run, *, redacted: bool) -> None:
    """``review.csv``: a line per patient in review, its candidates best first, ``decision`` empty."""
    rows = pl.concat(
        [pl.read_ipc(p).select("kind", "source_key", "patient_key", "source_file", "source_row") for p in run.parts]
    )
    # Where a person finds the patient: its own row in a patients file, else the first row naming it.
    key = pl.when(pl.col("kind") == "patient").then(pl.col("source_key")).otherwise(pl.col("patient_key"))
    where = (
        rows.with_columns(key.alias("key"), (pl.col("kind") != "patient").alias("__later"))
        .sort("__later", maintain_order=True)
        .unique("key", keep="first", maintain_order=True)
        .select(pl.col("key").alias("source_key"), "source_file", "source_row")
    )
    frame = review.join(where, on="source_key", how="left").select(
        pl.lit("patient").alias("kind"), "source_key", "source_file",
        pl.col("source_row").cast(pl.String).alias("source_row"),
        *(pl.col(c).cast(pl.String) for c in ("first_name", "last_name", "birth_date", "candidate_ids", "scores",
                                              "rules", "candidate_names", "candidate_birth_dates")),
        pl.lit("").alias("decision"),
    )
    if redacted:
        frame = frame.drop(_PRIVATE)
    write_csv(frame, run.folder / "review.csv")
