"""Transformers: valid prepared rows into ClinikAPI create bodies, as JSON text.

Bodies are built as polars structs and encoded with ``struct.json_encode``
over the whole frame; absent values are dropped rather than sent as ``null``
(the API types optional fields as non-null). References that only the load
can know (the ClinikAPI id of the row's patient) are left out of the body and
carried beside it as a source key, to be filled in at send time.
"""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import Callable, Collection, Iterator
from contextvars import ContextVar
from dataclasses import dataclass, field

import polars as pl
import polars_hash  # noqa: F401 - registers the `chash` expression namespace

from etl.dedupe import natural_key
from etl.mapping import Mapped, key_field
from etl.readers import ROW
from etl.validate import name_key, split_name
from schemas.canonical import fields_of
from schemas.codes import CVX_SYSTEM, displays

__all__ = [
    "BODY_PLANNERS",
    "COMPANIONS",
    "NOT_SENT",
    "REF_PATTERN",
    "Planned",
    "fill_refs",
    "json_bodies",
    "json_body",
    "not_carried",
    "obj",
    "one_of",
    "plan",
    "plan_immunizations",
    "readable_refs",
    "readable_refs_column",
    "references",
    "register_body_planner",
    "sha256_hex",
]

# `"key":null` pairs after encoding; a quote inside a string value is always
# escaped (`\"`), so these patterns can only match a real key with a null.
_NULL_PAIR_FIRST = r'"[A-Za-z_]\w*":null,'
_NULL_PAIR_LAST = r',?"[A-Za-z_]\w*":null'


@dataclass
class Planned:
    """What a load would send for one mapped table."""

    kind: str
    rows: pl.DataFrame  # __row, source_key, patient_key, body (null: sent with another row), body_hash
    patients: pl.DataFrame  # patient_key, body, body_hash, __row (first row naming the patient)
    practitioners: pl.DataFrame = field(
        default_factory=lambda: pl.DataFrame(
            schema={"practitioner_key": pl.String, "body": pl.String, "body_hash": pl.String, "__row": pl.UInt32}
        )
    )  # practitioners described by the rows' performer columns
    aliases: pl.DataFrame = field(
        default_factory=lambda: pl.DataFrame(schema={"ref": pl.String, "source_key": pl.String})
    )  # other ids rows are referred to by (a practitioner's source id when keyed by NPI)


def obj(**fields: pl.Expr) -> pl.Expr:
    """A JSON object of the given fields; null when every field is null."""
    exprs = [e.alias(k) for k, e in fields.items()]
    return pl.when(pl.any_horizontal(e.is_not_null() for e in exprs)).then(pl.struct(exprs))


def one_of(item: pl.Expr) -> pl.Expr:
    """A one-item JSON array, or null when the item is null."""
    return pl.when(item.is_not_null()).then(pl.concat_list(item))


def json_body(struct: pl.Expr) -> pl.Expr:
    """Encode a struct as compact JSON without its null members."""
    return struct.struct.json_encode().str.replace_all(_NULL_PAIR_FIRST, "").str.replace_all(_NULL_PAIR_LAST, "")


def json_bodies(frame: pl.DataFrame, struct: pl.Expr) -> pl.Series:
    """:func:`json_body` of ``struct`` over ``frame``: the same text, at a third of the cost on real rows.

    :func:`json_body` encodes every member and then cuts the ``"key":null`` pairs with two regex
    passes over all of the text, which is most of its cost. Here the rows are split by which of the
    struct's members are null (an optional column is empty on most rows, filled on some: a note, an
    email): a few groups, each encoded without the members null on all of its rows (nor the fields of
    an object null on all of them), so no null is written to be cut. Nulls the groups cannot leave out
    (inside a list, a member null on some rows of more than :data:`_NULL_GROUPS` patterns, a float JSON
    has no number for) are cut as :func:`json_body` cuts them, on the rows that hold one.
    """
    value = frame.select(struct.alias("body")).to_series()
    if not isinstance(value.dtype, pl.Struct) or value.is_empty():
        return frame.select(json_body(struct).alias("body")).to_series()
    fields = value.struct.unnest()
    partial = sorted(
        (c for c in fields.iter_columns() if 0 < c.null_count() < len(c) and _JSON_KEY.match(c.name)),
        key=lambda c: -c.null_count(),
    )
    groups = _null_groups(partial, len(value))
    if groups is None:
        return _json_cut(_encoded([_pruned(value)])[0]).alias("body")
    n = len(value)
    at = list(groups)
    texts = [_json_cut(text) for text in _encoded([_pruned(value.gather(rows)) for rows in at])]
    del value, fields, partial  # the values are text now: not held while it is put back in order
    # Back to the rows' order: the inverse permutation by a scatter.
    inverse = pl.repeat(0, n, dtype=pl.UInt32, eager=True).scatter(
        pl.concat(at), pl.int_range(n, dtype=pl.UInt32, eager=True)
    )
    # In one chunk first: a text column's chunks join as their views (its bytes stay where they are), and a
    # gather over one chunk is a twentieth of one over several (10 ms of the 110 a 50,000-row batch's took).
    return pl.concat(texts, rechunk=True).gather(inverse).alias("body")


def _encoded(values: list[pl.Series]) -> list[pl.Series]:
    """``value.struct.json_encode()`` of each of ``values``, at once: one query each, run together by polars
    (``collect_all``), a long one in parts (:func:`_in_parts`) that it encodes at once too (the series method
    encodes one value after another, on one thread)."""
    queries = [_in_parts(value).to_frame("value").lazy().select(pl.col("value").struct.json_encode())
               for value in values]
    return [done.to_series() for done in pl.collect_all(queries, engine="in-memory")]


def _in_parts(column: pl.Series) -> pl.Series:
    """A long column cut in a part (chunk) per thread of polars' pool: a query's value-by-value step (JSON, a
    hash) runs on the parts at once, where one part is one thread's work."""
    parts = pl.thread_pool_size()
    if parts < 2 or len(column) < _IN_PARTS_FROM:
        return column
    step = -(-len(column) // parts)
    return pl.concat([column.slice(start, step) for start in range(0, len(column), step)], rechunk=False)


_IN_PARTS_FROM = 4_096  # rows from which _in_parts cuts a column in parts
_JSON_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")  # a key json_body's patterns cut when null
#: At most this many groups of rows (:func:`json_bodies`): 2**5 patterns of the members null most often.
_NULL_GROUPS = 32


def _null_groups(partial: list[pl.Series], n: int) -> list[pl.Series] | None:
    """The row numbers of each pattern of nulls of the ``partial`` members (None: one group, every row)."""
    if not partial:
        return None
    for fields in (partial[:16], partial[:5]):
        mask = pl.select(
            pl.sum_horizontal(pl.lit(c).is_null().cast(pl.UInt64) * (1 << i) for i, c in enumerate(fields))
        ).to_series()
        groups = mask.to_frame("mask").with_row_index("row").group_by("mask").agg("row").get_column("row")
        if len(groups) <= _NULL_GROUPS:
            return list(groups)
    raise AssertionError("five members make at most 32 patterns")  # pragma: no cover


def _pruned(value: pl.Series) -> pl.Series:
    """A struct column without its fields that are null on every row (nor those of its nested objects)."""
    kept = []
    for column in value.struct.unnest().iter_columns():
        if column.null_count() == len(column) and _JSON_KEY.match(column.name):
            continue  # "key":null on every row, which json_body would cut
        kept.append(_pruned(column) if isinstance(column.dtype, pl.Struct) else column)
    if not kept:
        return value  # {"key":null ...} cut to {} by json_body's patterns
    pruned = pl.DataFrame(kept).to_struct(value.name)
    if value.null_count():
        pruned = pl.select(pl.when(pl.lit(value).is_not_null()).then(pl.lit(pruned))).to_series()
    return pruned


def _json_cut(text: pl.Series) -> pl.Series:
    """``json_body``'s cut of ``"key":null`` pairs, on the rows that hold one."""
    nulls = text.str.contains('":null', literal=True)
    if not nulls.any():
        return text
    at = nulls.arg_true()
    cut = text.gather(at).str.replace_all(_NULL_PAIR_FIRST, "").str.replace_all(_NULL_PAIR_LAST, "")
    return text.scatter(at, cut)


def sha256_hex(expr: pl.Expr) -> pl.Expr:
    """Hex SHA-256 of text, stable across polars versions (unlike ``Expr.hash``)."""
    return expr.chash.sha2_256()  # type: ignore[attr-defined, no-any-return]


def patient_struct(columns: Collection[str] | None = None) -> pl.Expr:
    """``PatientCreate`` from the ``patient_*`` canonical columns.

    ``columns``: the columns the frame has, when it may lack some (a registry row describes its
    patient without a marital status); an absent one is left out of the body.
    """

    def c(name: str) -> pl.Expr:
        return pl.col(name) if columns is None or name in columns else pl.lit(None, dtype=pl.String)

    return obj(
        firstName=c("patient_first_name"),
        lastName=c("patient_last_name"),
        gender=c("patient_gender"),
        birthDate=c("patient_birth_date__out"),
        phone=c("patient_phone"),
        email=c("patient_email"),
        address=obj(
            line=one_of(c("patient_address_line")),
            city=c("patient_city"),
            state=c("patient_state"),
            postalCode=c("patient_postal_code"),
            country=c("patient_country"),
        ),
        maritalStatus=c("patient_marital_status"),
    )


def immunization_struct() -> pl.Expr:
    """``ImmunizationCreate`` without ``patientId`` (filled in at send time)."""
    c = pl.col
    system = c("vaccine_system").fill_null(CVX_SYSTEM)
    table_display = c("vaccine_code").replace_strict(displays("cvx"), default=None, return_dtype=pl.String)
    display = c("vaccine_display").fill_null(pl.when(system == CVX_SYSTEM).then(table_display))
    return obj(
        patientId=ref("patient_id", "patient"),
        status=c("status"),
        vaccineCode=obj(system=system, code=c("vaccine_code"), display=display),
        encounterId=ref("encounter_id", "encounter"),
        occurrenceDateTime=c("occurrence__out"),
        recorded=c("recorded__out"),
        primarySource=c("primary_source__bool"),
        manufacturer=c("manufacturer"),
        lotNumber=c("lot_number"),
        expirationDate=c("expiration_date__out"),
        site=c("site"),
        route=c("route"),
        doseQuantity=obj(value=c("dose_value__num"), unit=c("dose_unit")),
        performer=one_of(
            pl.when(c("performer_id").is_not_null()).then(
                obj(function=c("performer_function"), actorId=ref("performer_id", "practitioner"))
            )
        ),
        note=c("note"),
        reasonCode=c("reason_codes__list"),
        statusReason=c("status_reason"),
        isSubpotent=c("is_subpotent__bool"),
        reaction=one_of(obj(date=c("reaction_date__out"), reported=c("reaction_reported__bool"))),
        protocolApplied=one_of(
            obj(
                series=c("protocol_series"),
                doseNumber=c("dose_number__int"),
                seriesDoses=c("series_doses__int"),
                targetDisease=c("target_diseases__list"),
            )
        ),
    )


def source_keys(mapped: Mapped) -> pl.Expr:
    """The row key: the source id when the profile maps one, else the row's natural key
    (:data:`etl.dedupe.NATURAL_KEYS`), else a hash of the row's content.

    A practitioner is keyed by its NPI when it has one, so two files naming the
    same clinician create one Practitioner.
    """
    columns = set(mapped.sources) | _companions(mapped)  # fields the file has, not those left empty
    if mapped.kind == "practitioner":
        by_id = pl.col("practitioner_id") if mapped.keyed_by_record else pl.lit(None, dtype=pl.String)
        return pl.coalesce(pl.lit("npi:") + pl.col("npi"), by_id, _content_key(mapped.kind, columns))
    if mapped.keyed_by_record:
        return pl.col(key_field(mapped.kind))
    return _content_key(mapped.kind, columns)


def _companions(mapped: Mapped) -> set[str]:
    """The checked companions (``occurrence__date`` ...) the prepared frame has for the mapped fields."""
    return {f"{name}__date" for name in mapped.sources}


def _content_key(kind: str, columns: set[str]) -> pl.Expr:
    """A row's key without a record id: its natural key (:data:`etl.dedupe.NATURAL_KEYS`), else a hash of
    its whole content."""
    natural = natural_key(kind, columns)
    if natural is not None:
        return natural
    content = pl.concat_str([pl.col(f.name).fill_null("") for f in fields_of(kind)], separator="\x1f")
    return pl.lit("sha256:") + sha256_hex(content)


#: A reference in a planned body: ``"@@<kind>:<hex of the source id>@@"``, filled in at send time.
REF_PATTERN = re.compile(r'"@@([a-z]+):([0-9a-f]*)@@"')


def ref(column: str, kind: str) -> pl.Expr:
    """A placeholder for the ClinikAPI id of the ``kind`` resource whose source id is in ``column``
    (in bodies planned with ``readable=True``, :func:`plan`: the dry run's text of it)."""
    c = pl.col(column)
    return pl.when(c.is_not_null()).then(_ref_text(c, kind))


def ref_list(column: str, kind: str) -> pl.Expr:
    """Placeholders for a list column of source ids."""
    return pl.col(f"{column}__list").list.eval(_ref_text(pl.element(), kind))


#: Whether the bodies planned now show their references as a dry run does (:func:`plan`'s ``readable``).
_READABLE: ContextVar[bool] = ContextVar("readable_refs", default=False)
#: A character :func:`readable_refs` writes other than as itself: not printable ASCII, or '"', or a backslash.
_NOT_PLAIN = r"[^ !#-\[\]-~]"
_REF_CUT = 128  # the API's length of a reference: readable_refs cuts its text to it


def _ref_text(source_id: pl.Expr, kind: str) -> pl.Expr:
    """The placeholder of a source id (:data:`REF_PATTERN`); in readable bodies, what :func:`readable_refs`
    makes of it, built as it is (``<kind>:<source id>``), for every id JSON writes as itself and that needs no
    cut: the others keep their placeholder, which :func:`readable_refs_column` replaces when the line is
    written (so the text is the same either way)."""
    placeholder = pl.lit(f"@@{kind}:") + source_id.str.encode("hex") + pl.lit("@@")
    if not _READABLE.get():
        return placeholder
    prefix = f"{kind}:"
    plain = ~source_id.str.contains(_NOT_PLAIN) & (source_id.str.len_bytes() <= _REF_CUT - len(prefix))
    return pl.when(plain).then(pl.lit(prefix) + source_id).otherwise(placeholder)


@contextlib.contextmanager
def _readable(on: bool) -> Iterator[None]:
    """Bodies planned in the block show their references as a dry run does (:func:`_ref_text`)."""
    token = _READABLE.set(on)
    try:
        yield
    finally:
        _READABLE.reset(token)


def fill_refs(body: str, lookup: Callable[[str, str], str | None]) -> tuple[str, list[tuple[str, str]]]:
    """Replace placeholders with ids from ``lookup(kind, source_id)``; return the body and what was missing."""
    missing: list[tuple[str, str]] = []

    def swap(m: re.Match[str]) -> str:
        kind, key = m.group(1), bytes.fromhex(m.group(2)).decode("utf-8")
        found = lookup(kind, key)
        if found is None:
            missing.append((kind, key))
            return m.group(0)
        return json.dumps(found)

    return REF_PATTERN.sub(swap, body), missing


def readable_refs(body: str) -> str:
    """Placeholders as ``<kind>:<source id>`` (cut to the API's 128 characters): for dry-run payloads."""
    return REF_PATTERN.sub(
        lambda m: json.dumps(f"{m.group(1)}:{bytes.fromhex(m.group(2)).decode('utf-8')}"[:128]), body
    )


def readable_refs_column(bodies: pl.Series) -> pl.Series:
    """:func:`readable_refs` of every body of a column, as polars expressions: each distinct placeholder
    is decoded once (in polars; ``json.dumps`` only for the rare id that JSON must escape), then all of
    them are replaced in one pass (Aho-Corasick), not a regex callback per body."""
    has = bodies.str.contains('"@@', literal=True)  # a literal search: no regex over bodies with none
    if not has.any():
        return bodies
    if not has.all():  # only the bodies that may hold one are searched and replaced (dry-run bodies: a few)
        at = has.arg_true()
        return bodies.scatter(at, readable_refs_column(bodies.gather(at)))
    found = bodies.str.extract_all(REF_PATTERN.pattern).explode().drop_nulls().unique(maintain_order=True)
    if found.is_empty():
        return bodies
    text = (
        found.to_frame("ref")
        .select(
            pl.col("ref"),
            (
                pl.col("ref").str.extract(REF_PATTERN.pattern, 1)
                + pl.lit(":")
                + pl.col("ref").str.extract(REF_PATTERN.pattern, 2).str.decode("hex").cast(pl.String)
            )
            .str.slice(0, 128)
            .alias("text"),
        )
        # Printable ASCII but for '"' and backslash: its JSON is the text in quotes, as json.dumps writes it.
        .with_columns(pl.col("text").str.contains(r"^[ !#-\[\]-~]*$").alias("plain"))
    )
    plain = text.filter(pl.col("plain"))
    other = text.filter(~pl.col("plain"))
    refs = pl.concat([plain.get_column("ref"), other.get_column("ref")])
    readable = pl.concat([
        plain.select((pl.lit('"') + pl.col("text") + pl.lit('"')).alias("text")).get_column("text"),
        pl.Series("text", [json.dumps(t) for t in other.get_column("text")], dtype=pl.String),
    ])
    return bodies.str.replace_many(refs.to_list(), readable.to_list())


def practitioner_struct() -> pl.Expr:
    """``PractitionerCreate`` from a providers row."""
    c = pl.col
    return obj(
        firstName=c("practitioner_first_name"),
        lastName=c("practitioner_last_name"),
        prefix=c("practitioner_prefix__list"),
        suffix=c("practitioner_suffix__list"),
        gender=c("practitioner_gender"),
        email=c("practitioner_email"),
        phone=c("practitioner_phone"),
        npi=c("npi"),
        specialty=c("specialty"),
        address=obj(
            line=one_of(c("practitioner_address_line")),
            city=c("practitioner_city"),
            state=c("practitioner_state"),
            postalCode=c("practitioner_postal_code"),
        ),
    )


def encounter_struct() -> pl.Expr:
    """``EncounterCreate``."""
    c = pl.col
    return obj(
        status=c("status"),
        **{"class": c("encounter_class")},
        patientId=ref("patient_id", "patient"),
        practitionerId=ref("practitioner_id", "practitioner"),
        participants=pl.when(c("participant_ids__list").is_not_null()).then(
            ref_list("participant_ids", "practitioner").list.eval(pl.struct(pl.element().alias("practitionerId")))
        ),
        type=c("encounter_type"),
        serviceType=c("service_type"),
        priority=c("priority"),
        reasonCode=c("reason"),
        period=obj(start=c("period_start__out"), end=c("period_end__out")),
        lengthMinutes=c("length_minutes__int"),
        location=c("location"),
        serviceProvider=c("service_provider"),
        diagnosis=pl.when(c("diagnoses__list").is_not_null()).then(
            c("diagnoses__list").list.eval(pl.struct(pl.element().alias("condition")))
        ),
    )


def _pairs(column: str) -> pl.Expr:
    """``type=value;type=value`` cells as Task input/output objects."""
    return pl.when(pl.col(f"{column}__list").is_not_null()).then(
        pl.col(f"{column}__list").list.eval(
            pl.struct(
                pl.element().str.split_exact("=", 1).struct.field("field_0").str.strip_chars().alias("type"),
                pl.element().str.split_exact("=", 1).struct.field("field_1").str.strip_chars().alias("valueString"),
            )
        )
    )


def task_struct() -> pl.Expr:
    """``TaskCreate``."""
    c = pl.col
    return obj(
        status=c("status"),
        intent=c("intent"),
        priority=c("priority"),
        statusReason=c("status_reason"),
        businessStatus=c("business_status"),
        code=c("task_code"),
        description=c("description"),
        focusId=ref("focus_id", "immunization"),
        patientId=ref("patient_id", "patient"),
        encounterId=ref("encounter_id", "encounter"),
        executionPeriod=obj(start=c("execution_start__out"), end=c("execution_end__out")),
        authoredOn=c("authored_on__out"),
        requesterId=ref("requester_id", "practitioner"),
        ownerId=ref("owner_id", "practitioner"),
        reasonCode=c("reason"),
        note=c("note"),
        basedOn=c("based_on__list"),
        partOf=c("part_of__list"),
        input=_pairs("inputs"),
        output=_pairs("outputs"),
        restriction=obj(
            repetitions=c("restriction_repetitions__int"),
            period=obj(start=c("restriction_start__out"), end=c("restriction_end__out")),
            recipientIds=c("restriction_recipients__list"),
        ),
    )


def _document_bodies(valid: pl.DataFrame) -> pl.DataFrame:
    """One ``DocumentCreate`` per document id, its sections in row order."""
    c = pl.col
    section = obj(
        title=c("section_title"),
        code=c("section_code"),
        text=c("section_text"),
        authorId=ref("section_author_id", "practitioner"),
        mode=c("section_mode"),
    )
    head = obj(
        status=c("status"),
        type=c("document_type"),
        category=c("category__list"),
        patientId=ref("patient_id", "patient"),
        encounterId=ref("encounter_id", "encounter"),
        practitionerId=ref("practitioner_id", "practitioner"),
        title=c("title"),
        date=c("date__out"),
        confidentiality=c("confidentiality"),
        attester=one_of(
            pl.when(c("attester_mode").is_not_null()).then(
                obj(mode=c("attester_mode"), time=c("attester_time__out"), partyId=ref("attester_id", "practitioner"))
            )
        ),
        relatesTo=one_of(
            pl.when(c("relates_to_code").is_not_null()).then(
                obj(code=c("relates_to_code"), targetId=c("relates_to_target"))
            )
        ),
        event=one_of(
            obj(
                code=one_of(pl.when(c("event_code").is_not_null()).then(obj(code=c("event_code")))),
                period=obj(start=c("event_start__out"), end=c("event_end__out")),
            )
        ),
    )
    grouped = (
        valid.sort(ROW)
        .with_columns(head.alias("__head"), section.alias("__section"))
        .group_by("document_id", maintain_order=True)
        .agg(pl.col(ROW).first(), pl.col("__head").first(), pl.col("__section").alias("__sections"))
    )
    body = (
        json_body(pl.col("__head")).str.strip_suffix("}")
        + pl.lit(',"sections":')
        + pl.col("__sections")
        .list.eval(json_body(pl.element()))
        .list.join(",")
        .map_batches(lambda s: "[" + s + "]", return_dtype=pl.String)
        + pl.lit("}")
    )
    return grouped.select("document_id", pl.col(ROW), body.alias("body"))


#: Kind -> its body planner: the polars struct expression of a valid row's create body (built from the
#: row's canonical columns, vectorised). A new ClinikAPI resource adds its planner here
#: (:func:`register_body_planner`); immunizations and documents are planned by their own functions
#: (:func:`plan_immunizations`: a registry row describes its patient too; a document is many rows).
BODY_PLANNERS: dict[str, Callable[[], pl.Expr]] = {
    "practitioner": practitioner_struct,
    "encounter": encounter_struct,
    "task": task_struct,
    "patient": lambda: patient_struct(),
}


def register_body_planner(kind: str, planner: Callable[[], pl.Expr]) -> None:
    """Plan the create bodies of ``kind`` with ``planner`` (see :data:`BODY_PLANNERS`)."""
    BODY_PLANNERS[kind] = planner


def _hashed(frame: pl.DataFrame, hashes: bool) -> pl.DataFrame:
    """``frame`` with the ``body_hash`` of its ``body`` (:func:`sha256_hex`); nulls when no hash is wanted
    (a dry run: what compares them is a load's state store)."""
    if not hashes:
        return frame.with_columns(pl.lit(None, dtype=pl.String).alias("body_hash"))
    body = _in_parts(frame.get_column("body")).to_frame()  # hashed a part per thread at once
    return frame.with_columns(body.select(sha256_hex(pl.col("body")).alias("body_hash")).to_series().rechunk())


def _encoded_column(frame: pl.DataFrame, body: pl.Expr, bodies: bool) -> pl.Series:
    """The JSON bodies of ``frame`` (:func:`json_bodies`), or nulls when only the keys are wanted
    (validation sends nothing)."""
    if not bodies:
        return pl.repeat(None, frame.height, dtype=pl.String, eager=True).alias("body")
    return json_bodies(frame, body)


def plan(
    mapped: Mapped, valid: pl.DataFrame, *, bodies: bool = True, hashes: bool = True, readable: bool = False
) -> Planned:
    """Create bodies for the valid rows of a table (and, for registry rows, their patients).

    ``bodies=False`` plans the keys only (what a validation reports) and skips the JSON.
    ``hashes=False`` leaves ``body_hash`` null (a dry run: only a load's state store compares them).
    ``readable=True``: the bodies show their references as a dry run's ``payloads.ndjson`` does
    (:func:`readable_refs`; what :func:`readable_refs_column` leaves is the same text), not placeholders:
    bodies for a dry run's lines only, never sent.
    """
    with _readable(readable):
        return _plan(mapped, valid, bodies=bodies, hashes=hashes)


def _plan(mapped: Mapped, valid: pl.DataFrame, *, bodies: bool, hashes: bool) -> Planned:
    kind = mapped.kind
    keys = source_keys(mapped)
    if kind == "immunization":
        return plan_immunizations(mapped, valid, bodies=bodies, hashes=hashes)
    if kind == "document":
        docs = _hashed(_document_bodies(valid), hashes)
        rows = valid.select(pl.col(ROW), pl.col("document_id").alias("source_key")).join(
            docs.select(pl.col("document_id").alias("source_key"), ROW, "body", "body_hash"),
            on=[ROW, "source_key"],
            how="left",
        )
    else:
        body = _encoded_column(valid, BODY_PLANNERS[kind](), bodies)
        rows = _hashed(valid.select(pl.col(ROW), keys.alias("source_key"), pl.lit(body).alias("body")), hashes)
        if kind in ("patient", "practitioner"):
            # The same person on several rows is created once: the first row carries the body.
            first = pl.int_range(pl.len()).over("source_key") == 0
            rows = rows.with_columns(pl.when(first).then(pl.col(c)).alias(c) for c in ("body", "body_hash"))
    patient = valid.select(ROW, pl.col("patient_id").alias("patient_key")) if "patient_id" in valid.columns else None
    rows = (
        rows.join(patient, on=ROW, how="left")
        if patient is not None
        else rows.with_columns(pl.lit(None, dtype=pl.String).alias("patient_key"))
    )
    aliases = pl.DataFrame(schema={"ref": pl.String, "source_key": pl.String})
    if kind == "practitioner":
        # A practitioner is referred to by its source id, and by its full name (a performer named
        # without an NPI: etl.validate.name_key); a name two practitioners share names neither.
        full = pl.concat_str([pl.col("practitioner_first_name"), pl.col("practitioner_last_name")], separator=" ")
        by_name = valid.select(name_key(full).alias("ref"), keys.alias("source_key")).drop_nulls().unique()
        by_name = by_name.filter(pl.len().over("ref") == 1)
        aliases = pl.concat([
            valid.select(pl.col("practitioner_id").alias("ref"), keys.alias("source_key")).drop_nulls().unique(),
            by_name,
        ])
    empty = pl.DataFrame(schema={"patient_key": pl.String, "body": pl.String, "body_hash": pl.String, ROW: pl.UInt32})
    return Planned(kind, rows.select(ROW, "source_key", "patient_key", "body", "body_hash"), empty, aliases=aliases)


def references(mapped: Mapped, valid: pl.DataFrame) -> pl.DataFrame:
    """Every reference a valid row makes: ``__row, field, kind, value``."""
    parts = []
    lazy = valid.lazy()  # one query for every field (each its own collect was most of what this cost)
    for f in fields_of(mapped.kind):
        if f.ref is None:
            continue
        value = pl.col(f"{f.name}__list") if f.value == "list" else pl.col(f.name)
        frame = lazy.select(pl.col(ROW), value.alias("value"))
        if f.value == "list":
            frame = frame.explode("value")
        parts.append(frame.drop_nulls("value").select(ROW, pl.lit(f.name).alias("field"), pl.lit(f.ref).alias("kind"),
                                                      "value"))
    if not parts:
        return pl.DataFrame(schema={ROW: pl.UInt32, "field": pl.String, "kind": pl.String, "value": pl.String})
    return pl.concat(parts).collect(engine="in-memory")


def plan_immunizations(mapped: Mapped, valid: pl.DataFrame, *, bodies: bool = True, hashes: bool = True) -> Planned:
    """Create bodies for the valid rows of an immunization table and their patients (``bodies``, ``hashes``:
    as :func:`plan` takes them)."""
    rows = _hashed(valid.select(
        pl.col(ROW),
        source_keys(mapped).alias("source_key"),
        pl.col("patient_id").alias("patient_key"),
        pl.lit(_encoded_column(valid, immunization_struct(), bodies)).alias("body"),
    ), hashes)
    patients, practitioners = _people(valid, bodies, hashes)
    return Planned(
        "immunization", rows, patients.select("patient_key", "body", "body_hash", ROW), practitioners=practitioners
    )


def _people(valid: pl.DataFrame, bodies: bool, hashes: bool) -> tuple[pl.DataFrame, pl.DataFrame]:
    """The patients and the performers the valid rows of an immunization table describe, with their bodies."""
    person = [patient_struct(valid.columns).alias("person")] if bodies else []  # (keys only: no body is read)
    firsts = (
        # Rows that describe their patient create it (the first one); rows that only name one refer to it.
        # (Lazy, so only the columns a body reads are kept, not the whole prepared frame.)
        valid.lazy()
        .filter(pl.col("patient_first_name").is_not_null())
        .filter(pl.col("patient_id").is_first_distinct())  # each patient's first row (a group_by is 10x dearer)
        .select(pl.col("patient_id").alias("patient_key"), *person, pl.col(ROW))
        .collect(engine="in-memory")
    )
    patients = _hashed(firsts.select(
        "patient_key", pl.lit(_encoded_column(firsts, pl.col("person"), bodies)).alias("body"), ROW
    ), hashes)
    first, last = split_name(pl.col("performer_name"))
    named = pl.col("performer_name").is_not_null()
    # A performer with an NPI is keyed by it; one named only by a full name, by the name (the API
    # takes a practitioner without an NPI). Either is created from the row unless a providers
    # file has it (the plan drops those: etl.plan).
    by_name = pl.col("performer_npi").is_null() & (pl.col("performer_id") == name_key(pl.col("performer_name")))
    key = pl.when(pl.col("performer_npi").is_not_null()).then(pl.lit("npi:") + pl.col("performer_npi"))
    practitioners = (
        valid.lazy()
        .filter(named & (pl.col("performer_npi").is_not_null() | by_name.fill_null(False)))
        .with_columns(key.fill_null(pl.col("performer_id")).alias("practitioner_key"))
        .filter(pl.col("practitioner_key").is_first_distinct())  # a performer's first row describes it
        .select(
            pl.col("practitioner_key"),
            *([obj(firstName=first, lastName=last, npi=pl.col("performer_npi")).alias("person")] if bodies else []),
            pl.col(ROW),
        )
        .collect(engine="in-memory")
    )
    practitioners = _hashed(practitioners.select(
        "practitioner_key", pl.lit(_encoded_column(practitioners, pl.col("person"), bodies)).alias("body"), ROW
    ), hashes).select("practitioner_key", "body", "body_hash", ROW)
    return patients, practitioners


#: Canonical fields a profile can map that no create body carries: kind -> field -> why. Every other
#: field of a kind reaches its body, a body it refers to, or the row's key (tests/test_carry.py checks
#: each one), so a mapped column that lands nowhere is always named (:func:`not_carried`).
NOT_SENT: dict[str, dict[str, str]] = {}

#: Fields a body carries only beside another (the API requires it of the object they share):
#: kind -> field -> the fields any of which it needs. A file that maps the field and none of these
#: is told so (:func:`not_carried`).
COMPANIONS: dict[str, dict[str, tuple[str, ...]]] = {
    "immunization": {"performer_function": ("performer_id", "performer_npi", "performer_name")},
    "document": {
        "attester_id": ("attester_mode",),
        "attester_time": ("attester_mode",),
        "relates_to_target": ("relates_to_code",),
    },
}


def not_carried(mapped: Mapped) -> list[tuple[str, str]]:
    """The source columns of a mapped file that no payload carries, in file order, each with why:
    ``unmapped`` (no field of the profile takes it), ``no API field`` (:data:`NOT_SENT`) or
    ``needs <field>`` (a field of :data:`COMPANIONS` whose companion the file does not give)."""
    why = dict.fromkeys(mapped.unmapped, "unmapped")
    for name in NOT_SENT.get(mapped.kind, {}):
        if name in mapped.sources:
            why.setdefault(mapped.sources[name], "no API field")
    given = set(mapped.sources) | set(mapped.profile.defaults)
    for name, needs in COMPANIONS.get(mapped.kind, {}).items():
        if name in mapped.sources and not given & set(needs):
            why.setdefault(mapped.sources[name], f"needs {' or '.join(needs)}")
    return [(column, why[column]) for column in mapped.table.columns if column in why]
