"""The state store (etl.load.state): intents, outcomes, the crosswalk, runs, and resuming."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from etl.errors import StateError
from etl.load.state import Record, StateStore

TARGET = "https://api.example.test"


@pytest.fixture()
def store(tmp_path: Path) -> Iterator[StateStore]:
    with StateStore(tmp_path / "state" / "s.sqlite", target=TARGET) as opened:
        yield opened


def test_an_intent_is_pending_with_its_hash_and_body(store: StateStore) -> None:
    assert store.get("patient", ["P1"]) == {}
    store.mark_pending("patient", [("P1", "h1", '{"a":1}'), ("P2", "h2")], "run1", source_file="registry.csv")
    got = store.get("patient", ["P1", "P2", "P3"])
    assert set(got) == {"P1", "P2"}
    one = got["P1"]
    assert (one.kind, one.source_key, one.state, one.body_hash, one.attempts) == ("patient", "P1", "pending", "h1", 1)
    assert one.resource_id is None and one.sent_at is not None and one.updated_at is not None
    assert store.bodies("patient", ["P1", "P2"]) == {"P1": '{"a":1}'}  # P2 was marked without its body
    assert store.get("immunization", ["P1"]) == {}  # records are per kind


def test_outcomes_are_stored_and_a_settled_row_drops_its_body(store: StateStore) -> None:
    store.mark_pending("patient", [("P1", "h1", "b1"), ("P2", "h2", "b2"), ("P3", "h3", "b3")], "run1")
    store.record_outcomes(
        [
            Record("patient", "P1", "created", resource_id="pat_1", http_status=201),
            Record("patient", "P2", "failed", http_status=422, error_code="VALIDATION_ERROR", message="gender: bad"),
            Record("patient", "P3", "unknown", message="no answer in time"),
        ]
    )
    got = store.get("patient", ["P1", "P2", "P3"])
    assert (got["P1"].state, got["P1"].resource_id, got["P1"].http_status) == ("created", "pat_1", 201)
    assert (got["P2"].state, got["P2"].error_code, got["P2"].message) == ("failed", "VALIDATION_ERROR", "gender: bad")
    assert got["P3"].state == "unknown"
    assert got["P1"].body_hash == "h1"  # the hash of what was sent stays, to tell a changed row later
    # Only a row in doubt keeps its body, for reconcile to look it up or send it again.
    assert store.bodies("patient", ["P1", "P2", "P3"]) == {"P3": "b3"}


def test_sending_again_counts_the_attempt_and_clears_the_old_outcome(store: StateStore) -> None:
    store.mark_pending("patient", [("P1", "h1")], "run1", source_file="a.csv")
    store.record_outcomes([Record("patient", "P1", "failed", http_status=422, error_code="E", message="m")])
    store.mark_pending("patient", [("P1", "h1b")], "run2")
    again = store.get("patient", ["P1"])["P1"]
    assert (again.state, again.attempts, again.body_hash) == ("pending", 2, "h1b")
    assert (again.http_status, again.error_code, again.message, again.resource_id) == (None, None, None, None)
    store.record_outcomes([Record("patient", "P1", "created", resource_id="pat_9", http_status=201)])
    # The file it came from is kept when the second intent did not name one.
    assert list(store.created_from("patient", "a.csv")) == [[("P1", "pat_9")]]


def test_in_state_and_counts(store: StateStore) -> None:
    store.mark_pending("patient", [("P3", "h"), ("P1", "h"), ("P2", "h")], "run1")
    store.mark_pending("immunization", [("R1", "h")], "run1")
    store.record_outcomes([Record("patient", "P1", "created", resource_id="pat_1")])
    assert [r.source_key for r in store.in_state("patient", "pending")] == ["P3", "P2"]  # in the order recorded
    assert [r.source_key for r in store.in_state("patient", "pending", "created")] == ["P3", "P1", "P2"]
    assert store.in_state("patient", "failed") == []
    assert store.counts() == {"patient": {"pending": 2, "created": 1}, "immunization": {"pending": 1}}
    assert store.kinds() == ["immunization", "patient"]


def test_claimed_ids_names_the_ids_a_record_owns(store: StateStore) -> None:
    store.mark_pending("patient", [("P1", "h"), ("P2", "h")], "run1")
    store.record_outcomes([Record("patient", "P1", "created", resource_id="pat_1")])
    assert store.claimed_ids(["pat_1", "pat_2"]) == {"pat_1"}
    assert store.claimed_ids([]) == set()


def test_created_from_reads_what_a_file_created_in_parts(store: StateStore) -> None:
    store.mark_pending("immunization", [(f"R{i}", "h") for i in range(7)], "run1", source_file="a.csv")
    store.mark_pending("immunization", [("S1", "h")], "run1", source_file="b.csv")
    store.mark_pending("patient", [("P1", "h")], "run1", source_file="a.csv")
    created = [Record("immunization", f"R{i}", "created", resource_id=f"imm_{i}") for i in range(6)]
    store.record_outcomes(
        [
            *created,
            Record("immunization", "R6", "failed", error_code="E"),  # not created: not listed
            Record("immunization", "S1", "created", resource_id="imm_s"),
            Record("patient", "P1", "created", resource_id="pat_1"),
        ]
    )
    parts = list(store.created_from("immunization", "a.csv", size=4))
    assert [len(p) for p in parts] == [4, 2]
    assert sorted(pair for part in parts for pair in part) == sorted((f"R{i}", f"imm_{i}") for i in range(6))
    assert list(store.created_from("immunization", "c.csv")) == []
    # Less what the file still has: only the rest comes back (a key with a NUL is never left out: see its doc).
    store.mark_pending("immunization", [("R\x00", "h"), ("R", "h")], "run1", source_file="a.csv")
    store.record_outcomes([Record("immunization", k, "created", resource_id=f"imm_{k}") for k in ("R\x00", "R")])
    import polars as pl

    still = pl.Series(["R0", "R2", "R3", "R4", "R5", "R\x00", None, "S1"])
    rest = [pair for part in store.created_from("immunization", "a.csv", besides=still) for pair in part]
    assert set(rest) == {("R", "imm_R"), ("R1", "imm_1"), ("R\x00", "imm_R\x00")}
    # The same once the kind was read whole (kept until the next write), in parts as asked.
    assert store.stored("immunization", still).height == 7  # the whole kind read: 10 records, 7 keys asked
    kept = list(store.created_from("immunization", "a.csv", size=1, besides=still))
    assert sorted(kept) == [[("R", "imm_R")], [("R1", "imm_1")]]  # here the NUL key is compared exactly


def test_reads_and_writes_past_the_parameter_chunk(store: StateStore) -> None:
    keys = [f"P{i:05d}" for i in range(1234)]
    store.mark_pending("patient", [(k, f"h{k}", f"b{k}") for k in keys], "run1")
    got = store.get("patient", keys)
    assert len(got) == len(keys) and got["P01233"].body_hash == "hP01233"
    assert len(store.bodies("patient", keys)) == len(keys)
    store.record_outcomes(Record("patient", k, "created", resource_id=f"pat_{k}") for k in keys)
    assert store.claimed_ids(f"pat_{k}" for k in keys) == {f"pat_{k}" for k in keys}


def test_set_hash_records_an_update_in_place(store: StateStore) -> None:
    store.mark_pending("patient", [("P1", "old")], "run1")
    store.record_outcomes([Record("patient", "P1", "created", resource_id="pat_1")])
    store.set_hash("patient", [("P1", "new")])
    after = store.get("patient", ["P1"])["P1"]
    assert (after.state, after.resource_id, after.body_hash) == ("created", "pat_1", "new")


def test_runs_are_listed_oldest_first_with_their_summaries(store: StateStore) -> None:
    store.start_run("r1", "load")
    store.start_run("r2", "run", job="nightly")
    store.finish_run("r1", {"states": {"created": 3}})
    runs = store.runs()
    assert [(r["run_id"], r["command"], r["job"]) for r in runs] == [("r1", "load", None), ("r2", "run", "nightly")]
    assert runs[0]["summary"] == {"states": {"created": 3}} and runs[0]["finished_at"] is not None
    assert runs[1]["summary"] is None and runs[1]["finished_at"] is None  # still running, or killed


def test_a_reopened_store_resumes_where_a_killed_run_left_off(tmp_path: Path) -> None:
    path = tmp_path / "s.sqlite"
    first = StateStore(path, target=TARGET)
    first.mark_pending("patient", [("P1", "h1", "b1"), ("P2", "h2", "b2")], "run1")
    first.record_outcomes([Record("patient", "P1", "created", resource_id="pat_1")])
    first.close()  # the run stops here: P2 was maybe sent, its answer never recorded
    with StateStore(path, target=TARGET) as again:
        got = again.get("patient", ["P1", "P2"])
        assert (got["P1"].state, got["P1"].resource_id) == ("created", "pat_1")
        assert got["P2"].state == "pending"
        assert again.bodies("patient", ["P2"]) == {"P2": "b2"}  # enough to look it up before sending again
        assert [r.source_key for r in again.in_state("patient", "pending", "unknown")] == ["P2"]


def test_a_store_belongs_to_one_target(tmp_path: Path) -> None:
    path = tmp_path / "s.sqlite"
    StateStore(path, target=TARGET).close()
    with pytest.raises(StateError) as caught:
        StateStore(path, target="http://127.0.0.1:8000")
    message = str(caught.value)
    assert TARGET in message and "127.0.0.1:8000" in message and "--state" in message
    with StateStore.existing(path) as opened:
        assert opened.target == TARGET


def test_existing_refuses_what_is_not_a_store(tmp_path: Path) -> None:
    with pytest.raises(StateError, match="no state store here"):
        StateStore.existing(tmp_path / "absent.sqlite")
    junk = tmp_path / "junk.sqlite"
    junk.write_bytes(b"this is not a database, just some text" * 100)
    with pytest.raises(StateError, match="not a usable state store"):
        StateStore.existing(junk)
    with pytest.raises(StateError, match="not a usable state store"):
        StateStore(junk, target=TARGET)



def test_created_keys_are_those_stored_as_created_of_that_kind(store: StateStore) -> None:
    from etl.send import unsent_count

    keys = [f"P{i}" for i in range(1, 1203)]  # more than one chunk of bound parameters
    store.mark_pending("patient", [(k, "h") for k in keys], "run1")
    store.mark_pending("immunization", [("P7", "h")], "run1")
    store.record_outcomes(
        [Record("patient", k, "created", resource_id=f"pat_{k}", http_status=201) for k in keys[::2]]
        + [Record("patient", "P2", "failed", http_status=422, error_code="E", message="m"),
           Record("patient", "P4", "unknown", message="no answer in time"),
           Record("immunization", "P7", "created", resource_id="imm_1", http_status=201)]
    )
    created = store.created_keys("patient", [*keys, "P9999"])
    assert created == set(keys[::2])  # not the failed, unknown or pending ones, nor an unknown key
    assert store.created_keys("immunization", keys) == {"P7"}  # per kind
    assert unsent_count(store, "patient", [*keys, "P9999"]) == len(keys) - len(keys[::2]) + 1


def test_stored_reads_many_keys_as_one_frame(store: StateStore) -> None:
    import polars as pl

    # Keys a JSON array must carry as they are: quotes, backslashes, non-ASCII, a line separator, and a
    # NUL (SQLite's JSON stops at one: such a key is bound as a parameter instead, and still found).
    odd = ['P"1', "P\\2", "Pé3", "P\u20284", "P\x005", "P\x00"]
    keys = [f"P{i}" for i in range(1, 1203)] + odd
    store.mark_pending("patient", [(k, f"h{k}") for k in keys], "run1")
    store.mark_pending("immunization", [("P7", "h")], "run1")
    store.record_outcomes(
        [Record("patient", k, "created", resource_id=f"pat_{k}", http_status=201) for k in keys[::2]]
        + [Record("patient", "P2", "failed", http_status=422, error_code="E", message="m"),
           Record("patient", "P4", "unknown", message="no answer in time")]
    )
    asked = pl.Series([*keys, "P9999", "P\x00", None], dtype=pl.String)  # an unknown key, a repeat, a null
    every = store.stored("patient", asked).sort("source_key")
    assert every.columns == ["source_key", "state", "resource_id", "body_hash"]
    assert every.get_column("source_key").to_list() == sorted(keys)  # each stored key once, nothing else
    records = store.get("patient", keys)
    assert {k: (s, r, h) for k, s, r, h in every.iter_rows()} == {
        k: (rec.state, rec.resource_id, rec.body_hash) for k, rec in records.items()
    }
    created = store.stored("patient", asked, states=("created",), columns=("resource_id",))
    assert dict(created.iter_rows()) == {k: f"pat_{k}" for k in keys[::2]}
    assert set(store.stored("patient", asked, states=("failed", "unknown"), columns=()).get_column(
        "source_key")) == {"P2", "P4"}
    assert store.stored("immunization", asked, columns=("state",)).rows() == [("P7", "pending")]  # per kind
    assert store.stored("patient", pl.Series([], dtype=pl.String)).height == 0
    # A few keys of many stored (looked up one by one, not read all): the same answers.
    few = pl.Series(["P\x005", 'P"1', "P2", "P9999", "Pé3", "P\x00"])
    assert sorted(store.stored("patient", few, columns=("state",)).rows()) == sorted(
        (k, rec.state) for k, rec in store.get("patient", few.to_list()).items()
    )
    assert store.stored("patient", few, states=("created",), columns=()).height == 3  # P\x005, P"1 and Pé3
    with pytest.raises(ValueError, match="not a column"):
        store.stored("patient", asked, columns=("state; DROP TABLE records",))


def test_a_kind_read_whole_is_read_again_once_written_to(store: StateStore, tmp_path: Path) -> None:
    import polars as pl

    keys = pl.Series([f"P{i}" for i in range(10)])
    store.mark_pending("patient", [(k, "h") for k in keys], "run1")
    store.record_outcomes([Record("patient", k, "created", resource_id=f"pat_{k}") for k in keys])
    created = lambda: store.stored("patient", keys, states=("created",), columns=()).height  # noqa: E731
    assert created() == 10  # the whole kind read (every key asked), and kept
    store.record_outcomes([Record("patient", "P0", "failed", http_status=422)])  # written here
    assert created() == 9
    with StateStore(store.path, target=TARGET) as other:  # written by another connection
        other.record_outcomes([Record("patient", "P1", "unknown")])
    assert created() == 8
    assert dict(store.stored("patient", keys, columns=("state",)).rows())["P1"] == "unknown"


def test_a_kind_read_ahead_answers_as_a_read_when_asked_and_is_dropped_once_written_to(
    store: StateStore, tmp_path: Path
) -> None:
    """read_ahead reads whole kinds on a thread, with a connection of its own; the store's own connection then
    reads none of them (its statements are traced), unless something was written after the read began."""
    import polars as pl

    keys = pl.Series([f"P{i}" for i in range(10)])
    store.mark_pending("patient", [(k, f"h{k}") for k in keys], "run1")
    store.record_outcomes([Record("patient", k, "created", resource_id=f"pat_{k}") for k in keys[:7]])
    store.mark_pending("immunization", [("I1", "h")], "run1")
    expected = {name: store.stored(name, keys).sort("source_key") for name in ("patient", "practitioner")}
    statements: list[str] = []

    def fresh() -> StateStore:
        opened = StateStore(store.path, target=TARGET)
        opened._db.set_trace_callback(statements.append)  # what its own connection asks SQLite
        return opened

    with fresh() as ahead:
        ahead.read_ahead(["patient", "practitioner", "patient"], asked=keys.len())
        for name, frame in expected.items():
            assert ahead.stored(name, keys).sort("source_key").equals(frame)
        assert ahead.stored("patient", keys, states=("created",), columns=()).height == 7
    assert statements and not [s for s in statements if "json_group_array" in s]  # read on the thread only

    statements.clear()
    with fresh() as ahead:  # written here after the read began: read again, and the write seen
        ahead.read_ahead(["patient"], asked=keys.len())
        ahead.record_outcomes([Record("patient", "P0", "failed", http_status=422)])
        assert ahead.stored("patient", keys, states=("created",), columns=()).height == 6
    assert [s for s in statements if "json_group_array" in s]

    with fresh() as ahead:  # written by another connection after the read began
        ahead.read_ahead(["patient"], asked=keys.len())
        ahead._ahead.result()  # type: ignore[union-attr]  # the read is done before the other write
        with StateStore(store.path, target=TARGET) as other:
            other.record_outcomes([Record("patient", "P1", "unknown")])
        assert ahead.stored("patient", keys, states=("created",), columns=()).height == 5

    with fresh() as ahead:  # a kind held more than twice per key asked is not read ahead, but looked up
        statements.clear()
        ahead.read_ahead(["patient"], asked=2)
        assert ahead.stored("patient", keys[:2], columns=("state",)).sort("source_key").rows() == [
            ("P0", "failed"), ("P1", "unknown")]
        assert not [s for s in statements if "json_group_array" in s]


def test_a_read_ahead_that_fails_leaves_the_store_to_read(store: StateStore, tmp_path: Path) -> None:
    import polars as pl

    store.mark_pending("patient", [("P1", "h")], "run1")
    gone = tmp_path / "gone.sqlite"
    with StateStore(gone, target=TARGET) as ahead:
        ahead.mark_pending("patient", [("P2", "h")], "run1")
        ahead.path = tmp_path / "nowhere" / "x.sqlite"  # the thread's connection cannot open it
        ahead.read_ahead(["patient"], asked=10)
        assert ahead.stored("patient", pl.Series(["P2"])).get_column("source_key").to_list() == ["P2"]
