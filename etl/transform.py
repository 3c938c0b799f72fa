"""Transformers: valid prepared rows into ClinikAPI create bodies, as JSON text.

Bodies are built as polars structs and encoded with ``struct.json_encode``
over the whole frame; absent values are dropped rather than sent as ``null``
(the API types optional fields as non-null). References that only the load
can know (the ClinikAPI id of the row's patient) are left out of the body and
carried beside it as a source key, to be filled in at send time.
"""

from __future__ import annotations

from dataclasses import dataclass

import polars as pl
import polars_hash  # noqa: F401 - registers the `chash` expression namespace

from etl.mapping import Mapped
from etl.readers import ROW
from schemas.canonical import fields_of
from schemas.codes import CVX_SYSTEM, displays

__all__ = ["Planned", "json_body", "obj", "one_of", "plan_immunizations", "sha256_hex"]

# `"key":null` pairs after encoding; a quote inside a string value is always
# escaped (`\"`), so these patterns can only match a real key with a null.
_NULL_PAIR_FIRST = r'"[A-Za-z_]\w*":null,'
_NULL_PAIR_LAST = r',?"[A-Za-z_]\w*":null'


@dataclass
class Planned:
    """What a load would send for one mapped table."""

    kind: str
    rows: pl.DataFrame  # __row, source_key, patient_key, body, body_hash
    patients: pl.DataFrame  # patient_key, body, body_hash, __row (first row naming the patient)


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


def sha256_hex(expr: pl.Expr) -> pl.Expr:
    """Hex SHA-256 of text, stable across polars versions (unlike ``Expr.hash``)."""
    return expr.chash.sha2_256()  # type: ignore[attr-defined, no-any-return]


def patient_struct() -> pl.Expr:
    """``PatientCreate`` from the ``patient_*`` canonical columns."""
    c = pl.col
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
    )


def immunization_struct() -> pl.Expr:
    """``ImmunizationCreate`` without ``patientId`` (filled in at send time)."""
    c = pl.col
    system = c("vaccine_system").fill_null(CVX_SYSTEM)
    table_display = c("vaccine_code").replace_strict(displays("cvx"), default=None, return_dtype=pl.String)
    display = c("vaccine_display").fill_null(pl.when(system == CVX_SYSTEM).then(table_display))
    return obj(
        status=c("status"),
        vaccineCode=obj(system=system, code=c("vaccine_code"), display=display),
        encounterId=c("encounter_id"),
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
                obj(function=c("performer_function"), actorId=c("performer_id"))
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
    """The row key: the source record id when the profile maps one, else a hash of the row's content."""
    if mapped.keyed_by_record:
        return pl.col("record_id")
    content = pl.concat_str([pl.col(f.name).fill_null("") for f in fields_of(mapped.kind)], separator="\x1f")
    return pl.lit("sha256:") + sha256_hex(content)


def plan_immunizations(mapped: Mapped, valid: pl.DataFrame) -> Planned:
    """Create bodies for the valid rows of an immunization table and their patients."""
    rows = valid.select(
        pl.col(ROW),
        source_keys(mapped).alias("source_key"),
        pl.col("patient_id").alias("patient_key"),
        json_body(immunization_struct()).alias("body"),
    ).with_columns(sha256_hex(pl.col("body")).alias("body_hash"))
    patients = (
        valid.group_by("patient_id", maintain_order=True)
        .first()
        .select(
            pl.col("patient_id").alias("patient_key"),
            json_body(patient_struct()).alias("body"),
            pl.col(ROW),
        )
        .with_columns(sha256_hex(pl.col("body")).alias("body_hash"))
    )
    return Planned("immunization", rows, patients.select("patient_key", "body", "body_hash", ROW))
