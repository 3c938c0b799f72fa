"""KeyIndex: a growing set of keys with values, looked up by binary search over sorted runs behind a Bloom filter."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from etl.keyindex import SEED, KeyIndex, first_distinct, first_of_hashes

_KEYS = st.one_of(st.none(), st.sampled_from([f"K{i}" for i in range(40)]), st.text(max_size=4))


@settings(max_examples=80, deadline=None)
@given(batches=st.lists(st.lists(_KEYS, max_size=30), max_size=12), checked=st.booleans())
def test_lookups_match_a_dict_where_the_first_value_of_a_key_wins(
    batches: list[list[str | None]], checked: bool
) -> None:
    index = KeyIndex({"first": pl.Int64()})
    reference: dict[str, int] = {}
    serial = 0
    for keys in batches:
        values = list(range(serial, serial + len(keys)))
        serial += len(keys)
        got = index.lookup(pl.Series(keys, dtype=pl.String))
        assert got.get_column("found").to_list() == [k in reference for k in keys]
        assert got.get_column("first").to_list() == [reference.get(k) if k is not None else None for k in keys]
        rows = pl.DataFrame({"key": keys, "first": values}, schema={"key": pl.String, "first": pl.Int64})
        if checked:  # the caller's own lookup: only absent, distinct keys
            rows = rows.filter(~got.get_column("found")).unique("key", keep="first", maintain_order=True)
        index.add(rows, new=checked)
        for k, v in zip(keys, values, strict=True):
            if k is not None:
                reference.setdefault(k, v)
        assert len(index) == len(reference)
        assert all(run.get_column("__hash").is_sorted() for run in index.runs)


def test_runs_merge_so_there_are_few_of_them() -> None:
    index = KeyIndex()
    for b in range(64):
        index.add_keys(pl.Series([f"{b:03d}-{i}" for i in range(100)]))
        assert len(index) == 100 * (b + 1)  # a read: the batch becomes a run
    assert len(index.runs) <= 7  # about log2 of the number of batches
    index.remove(pl.Series(["000-1", "063-99"]))
    assert index.contains(pl.Series(["000-1", "000-2", "063-99"])).to_list() == [False, True, False]
    assert len(index) == 100 * 64 - 2


@settings(max_examples=40, deadline=None)
@given(news=st.lists(st.integers(1, 400), min_size=1, max_size=60))
def test_runs_stay_few_however_many_keys_each_batch_brings(news: list[int]) -> None:
    """Each run holds more keys than all the newer ones together, so there are at most log2(n) + 1 of them:
    also when every batch brings fewer new keys than the last (returning patients), where merging a run
    only into a run no larger than itself left a run per batch."""
    index = KeyIndex()
    held = 0
    for b, n in enumerate(news):
        index.insert(pl.DataFrame({"key": [f"{b}-{i}" for i in range(n)]}))
        held += n
        runs = [run.height for run in index.runs]
        assert sum(runs) == held
        assert all(runs[i] > sum(runs[i + 1:]) for i in range(len(runs) - 1))
        assert len(runs) <= held.bit_length()


def test_runs_stay_few_when_each_batch_brings_fewer_new_keys() -> None:
    index = KeyIndex()
    for b in range(60):
        index.insert(pl.DataFrame({"key": [f"{b}-{i}" for i in range(1000 - 15 * b)]}))
    assert len(index.runs) <= 6  # a run per batch (60) before

def test_adds_wait_until_a_read_and_the_first_value_still_wins() -> None:
    index = KeyIndex({"first": pl.Int64()})
    index.add(pl.DataFrame({"key": ["a", "b"], "first": [1, 2]}))
    index.add(pl.DataFrame({"key": ["b", "c"], "first": [3, 4]}))
    assert index.runs == []  # nothing asked yet: no run built
    got = index.lookup(pl.Series(["c", "b", "a", "z"]))
    assert got.get_column("first").to_list() == [4, 2, 1, None]
    index.add(pl.DataFrame({"key": ["a", "d"], "first": [9, 5]}))
    assert index.lookup(pl.Series(["a", "d"])).get_column("first").to_list() == [1, 5]
    assert index.contains(pl.Series(["a", "b", "c", "d", "e", None])).to_list() == [True] * 4 + [False] * 2
    assert len(index) == 4


@settings(max_examples=60, deadline=None)
@given(batches=st.lists(st.lists(_KEYS, max_size=30), max_size=12))
def test_insert_is_a_lookup_then_an_add_of_the_absent_keys(batches: list[list[str | None]]) -> None:
    index = KeyIndex({"first": pl.Int64()})
    reference: dict[str, int] = {}
    serial = 0
    for keys in batches:
        rows = pl.DataFrame(
            {"key": keys, "first": range(serial, serial + len(keys))}, schema={"key": pl.String, "first": pl.Int64}
        )
        got = index.insert(rows)
        assert got.get_column("found").to_list() == [k in reference for k in keys]
        assert got.get_column("first").to_list() == [reference.get(k) if k is not None else None for k in keys]
        for k, v in zip(keys, range(serial, serial + len(keys)), strict=True):
            if k is not None:
                reference.setdefault(k, v)
        serial += len(keys)
        assert len(index) == len(reference)
        assert all(run.get_column("__hash").is_sorted() for run in index.runs)
    if reference:
        everything = index.lookup(pl.Series(list(reference)))
        assert everything.get_column("first").to_list() == list(reference.values())


_PARTS = st.tuples(st.sampled_from(["p1", "p2", "p3"]), st.integers(0, 3), st.one_of(st.none(), st.sampled_from("ab")))


@settings(max_examples=60, deadline=None)
@given(batches=st.lists(st.lists(_PARTS, max_size=30), max_size=10))
def test_keys_given_as_their_hashes_are_found_as_a_dict_finds_them(
    batches: list[list[tuple[str, int, str | None]]],
) -> None:
    """insert_hashes (a struct's two hashes, no text made of it) answers as a dict of the tuples does, the first
    row of a key winning, in a batch and across batches; its first rows are the struct's first rows."""
    index = KeyIndex({"first": pl.Int64()})
    reference: dict[tuple[str, int, str | None], int] = {}
    serial = 0
    for parts in batches:
        frame = pl.DataFrame(parts, schema={"p": pl.String, "d": pl.Int64, "g": pl.String}, orient="row")
        key = pl.struct("p", "d", "g")
        hashes = frame.select(key.hash()).to_series()
        checks = frame.select(key.hash(seed=SEED)).to_series()
        assert first_of_hashes(hashes, checks).to_list() == frame.select(key.is_first_distinct()).to_series().to_list()
        values = pl.DataFrame({"first": range(serial, serial + len(parts))}, schema={"first": pl.Int64})
        got = index.insert_hashes(hashes, checks, values)
        assert got.get_column("found").to_list() == [p in reference for p in parts]
        assert got.get_column("first").to_list() == [reference.get(p) for p in parts]
        for p, v in zip(parts, range(serial, serial + len(parts)), strict=True):
            reference.setdefault(p, v)
        serial += len(parts)
        assert len(index) == len(reference)


def test_first_of_hashes_compares_the_second_hash_where_the_first_collides() -> None:
    """Keys that share a first hash are told apart by the second, as the index tells them apart."""
    hashes = pl.Series([7, 7, 7, 9, 7], dtype=pl.UInt64)
    checks = pl.Series([1, 2, 1, 1, 2], dtype=pl.UInt64)
    assert first_of_hashes(hashes, checks).to_list() == [True, True, False, True, False]
    index = KeyIndex()
    kept = pl.Series([7, 9], dtype=pl.UInt64), pl.Series([1, 1], dtype=pl.UInt64)
    assert index.insert_hashes(*kept, pl.DataFrame()).get_column("found").to_list() == [False, False]
    again = index.insert_hashes(pl.Series([7, 7, 9], dtype=pl.UInt64), pl.Series([2, 1, 1], dtype=pl.UInt64),
                                pl.DataFrame())
    assert again.get_column("found").to_list() == [False, True, True]


def test_the_filter_grows_with_the_keys_and_never_hides_one() -> None:
    """The Bloom filter in front of the runs rules absent keys out; a key held is always found, also
    after the filter has been rebuilt larger several times, and an absent key is never found."""
    index = KeyIndex({"n": pl.Int64()})
    sizes = []
    for b in range(8):
        keys = [f"id-{b}-{i}" for i in range(25_000)]
        index.insert(pl.DataFrame({"key": keys, "n": range(b * 25_000, (b + 1) * 25_000)}))
        sizes.append(len(index._filter.words))
    assert sizes[-1] > sizes[0]  # grown as keys came
    held = pl.Series([f"id-{b}-{i}" for b in range(8) for i in range(0, 25_000, 97)])
    absent = pl.Series([f"id-{b}-{i}" for b in range(8, 16) for i in range(0, 25_000, 97)])
    got = index.lookup(pl.concat([held, absent]))
    assert got.get_column("found").to_list() == [True] * len(held) + [False] * len(absent)
    expected = [int(k.split("-")[1]) * 25_000 + int(k.split("-")[2]) for k in held]
    assert got.get_column("n").head(len(held)).to_list() == expected
    assert got.get_column("n").tail(len(absent)).null_count() == len(absent)


def test_a_filter_that_lets_every_key_through_changes_no_answer() -> None:
    """Every key sought in the runs (as if each were a false positive): the same answers."""
    index = KeyIndex({"n": pl.Int64()})
    index.insert(pl.DataFrame({"key": ["a", "b", "c"], "n": [1, 2, 3]}))
    index.insert(pl.DataFrame({"key": ["d", "a"], "n": [4, 5]}))
    index._filter.words[:] = ~np.uint64(0)
    got = index.insert(pl.DataFrame({"key": ["x", "a", None, "d", "x"], "n": [9, 9, 9, 9, 10]}))
    assert got.get_column("found").to_list() == [False, True, False, True, False]
    assert got.get_column("n").to_list() == [None, 1, None, 4, None]
    assert index.lookup(pl.Series(["x", "y"])).get_column("n").to_list() == [9, None]  # the first "x" won


@settings(max_examples=40, deadline=None)
@given(hashes=st.lists(st.integers(0, 2**64 - 1), max_size=200))
def test_the_filter_sets_the_bits_one_key_at_a_time_would(hashes: list[int]) -> None:
    """Keys' bits are or-ed together per word and set in one step: the same words as setting each key's
    bits in turn, whether the keys come sorted by hash (a run) or not."""
    from etl.keyindex import _Filter

    rng = np.random.default_rng(len(hashes))
    h = np.array(hashes, dtype=np.uint64)
    c = rng.integers(0, 2**63, len(h), dtype=np.uint64)
    for order in (np.arange(len(h)), np.argsort(h, kind="stable")):
        grouped = _Filter()
        grouped.words = np.zeros(1 << 10, dtype=np.uint64)
        grouped.add(h[order], c[order], [])
        expected = np.zeros(1 << 10, dtype=np.uint64)
        word, bits = grouped._at(h, c)
        for w, b in zip(word.tolist(), bits.tolist(), strict=True):
            expected[w] |= np.uint64(b)
        assert np.array_equal(grouped.words, expected)
        assert grouped.may_hold(h, c).all()


@given(st.lists(st.one_of(st.none(), st.sampled_from(["a", "b", "é", "a\x00", ""]), st.text(max_size=40)), max_size=60))
@settings(max_examples=150, deadline=None)
def test_first_distinct_is_is_first_distinct(keys: list[str | None]) -> None:
    series = pl.Series("key", keys, dtype=pl.String)
    assert first_distinct(series).to_list() == series.is_first_distinct().to_list()


def test_first_distinct_compares_the_keys_whose_hashes_collide(monkeypatch: pytest.MonkeyPatch) -> None:
    """Two keys with one hash are told apart by their text (every hash made equal here)."""
    series = pl.Series("key", ["a", "b", "a", None, "c", "b", None])
    expected = series.is_first_distinct().to_list()
    monkeypatch.setattr(pl.Series, "hash", lambda self, *a, **k: pl.repeat(7, len(self), dtype=pl.UInt64, eager=True))
    assert first_distinct(series).to_list() == expected == [True, True, False, True, True, False, False]


def test_an_inserts_new_keys_become_a_run_on_a_thread_and_the_next_use_waits_for_them(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """insert answers first and adds the absent keys on the key-index thread; every later use of the index
    (an insert, a lookup, its length, its runs) sees them; a failure there is raised at the next use."""
    import threading

    from etl import keyindex as module

    monkeypatch.setattr(module, "ADD_ON_THREAD_FROM", 2)  # a few keys are added at once, on the caller's thread
    index = KeyIndex({"n": pl.Int64()})
    index.insert(pl.DataFrame({"key": ["z"], "n": [0]}))
    assert index._adding is None
    release, names = threading.Event(), []
    real_push = KeyIndex._push

    def slow_push(self: KeyIndex, rows: pl.DataFrame, *, hashed: bool = False) -> None:
        names.append(threading.current_thread().name)
        release.wait(10)
        real_push(self, rows, hashed=hashed)

    monkeypatch.setattr(KeyIndex, "_push", slow_push)
    got = index.insert(pl.DataFrame({"key": ["a", "b", "a"], "n": [1, 2, 3]}))
    assert got.get_column("found").to_list() == [False, False, False]  # answered while the add waits
    assert index._adding is not None and not index._adding.done()
    release.set()
    assert index.lookup(pl.Series(["b", "a", "y"])).get_column("n").to_list() == [2, 1, None]
    assert len(index) == 3 and names and all(n.startswith("key-index") for n in names)

    def broken(self: KeyIndex, *args: object, **kwargs: object) -> None:
        raise OSError("no room")

    monkeypatch.setattr(KeyIndex, "_push", broken)
    index.insert(pl.DataFrame({"key": ["c", "d"], "n": [4, 5]}))
    with pytest.raises(OSError, match="no room"):
        index.lookup(pl.Series(["c"]))
    assert module._adder() is module._adder()  # one thread for every index
