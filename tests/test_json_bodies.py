"""json_bodies (the planned bodies, rows grouped by their nulls) writes what json_body writes, byte for byte."""

from __future__ import annotations

import json

import polars as pl
from hypothesis import given, settings
from hypothesis import strategies as st

from etl.transform import json_bodies, json_body, obj, one_of

# Text a real export carries: quotes, backslashes, control characters, accents, emoji, JSON-looking notes.
_TEXT = st.one_of(
    st.text(alphabet=st.sampled_from(['a', 'Z', ' ', '"', '\\', '\n', '\x01', '\x7f', 'é', '日', '😀', ':', ',', '@']),
            max_size=8),
    st.sampled_from(['"k":null,', 'say "null"', '@@patient:41@@', "null", "{}"]),
)


def _column(values: st.SearchStrategy[object], n: int) -> st.SearchStrategy[list[object]]:
    return st.lists(st.one_of(st.none(), values), min_size=n, max_size=n)


@st.composite
def _frames(draw: st.DrawFn) -> pl.DataFrame:
    n = draw(st.integers(0, 25))
    return pl.DataFrame(
        {
            "s1": draw(_column(_TEXT, n)),
            "s2": draw(_column(_TEXT, n)),
            "s3": draw(_column(_TEXT, n)),
            "i": draw(_column(st.integers(-(2**40), 2**40), n)),
            "f": draw(_column(st.floats(allow_nan=True, allow_infinity=True), n)),
            "b": draw(_column(st.booleans(), n)),
            "l": draw(_column(st.lists(st.one_of(st.none(), _TEXT), max_size=3), n)),
        },
        schema={"s1": pl.String, "s2": pl.String, "s3": pl.String, "i": pl.Int64, "f": pl.Float64,
                "b": pl.Boolean, "l": pl.List(pl.String)},
    )


c = pl.col
STRUCTS = {
    "flat and nested": obj(a=c("s1"), n=obj(x=c("i"), y=c("s2")), f=c("f"), l=c("l"), b=c("b"), z=c("s3")),
    "list of objects": obj(p=one_of(obj(q=c("s2"), r=c("i"), t=c("s3"))), z=c("s1"), e=one_of(c("s3"))),
    "not an obj": pl.struct(c("s1").alias("w"), c("s2").alias("@odd"), pl.struct(c("i").alias("k")).alias("inner")),
    "always null member": obj(a=c("s1"), gone=pl.lit(None, dtype=pl.String), v=obj(g=pl.lit(None, dtype=pl.Int64))),
}


@settings(max_examples=150, deadline=None)
@given(frame=_frames())
def test_json_bodies_write_what_json_body_writes(frame: pl.DataFrame) -> None:
    for name, struct in STRUCTS.items():
        expected = frame.select(json_body(struct).alias("body")).get_column("body")
        got = json_bodies(frame, struct)
        assert got.to_list() == expected.to_list(), name


def test_json_bodies_with_more_null_patterns_than_groups() -> None:
    # Ten optional members, each empty on its own rows: 2**10 patterns, more than the groups it makes.
    n = 2048
    frame = pl.DataFrame({f"m{k}": [None if (row >> k) & 1 else f"v{k}-{row}" for row in range(n)] for k in range(10)})
    struct = obj(**{f"m{k}": c(f"m{k}") for k in range(10)}, inner=obj(x=c("m1"), y=c("m2")))
    expected = frame.select(json_body(struct).alias("body")).get_column("body")
    got = json_bodies(frame, struct)
    assert got.to_list() == expected.to_list()
    assert json.loads(got[0]) == {**{f"m{k}": f"v{k}-0" for k in range(10)}, "inner": {"x": "v1-0", "y": "v2-0"}}
    assert got[n - 1] == "null"  # every member empty: the row has no body (json_body writes null)
    assert "null" not in got[5]  # members 0 and 2 empty on row 5: left out, not written as null


@settings(max_examples=10, deadline=None)
@given(frame=_frames())
def test_json_bodies_of_many_rows_encoded_in_parts(frame: pl.DataFrame) -> None:
    """A column of 4,096 rows or more is cut in a part per thread of polars' pool and its groups encoded
    together (etl.transform._encoded): the same text as json_body, in the same order."""
    many = pl.concat([frame] * (4_096 // max(frame.height, 1) + 1)).with_row_index("row").with_columns(
        pl.col("s1") + pl.col("row").cast(pl.String)  # each row its own text (so the order is checked)
    ).drop("row")
    assert many.height >= 4_096 or frame.is_empty()
    for name, struct in STRUCTS.items():
        expected = many.select(json_body(struct).alias("body")).get_column("body")
        assert json_bodies(many, struct).to_list() == expected.to_list(), name
