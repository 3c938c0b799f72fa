"""A growing set of keys (with values) that batches look things up in.

Validating a file in batches asks, for every batch, "was this key seen before?"
against everything seen so far. A polars join or ``is_in`` rebuilds a hash
table of all of it for each batch, so a file of n rows in batches of b costs
n²/b. A :class:`KeyIndex` keeps its keys in sorted runs instead, merged as a
log-structured merge tree merges them (each run holds more keys than all the newer
ones together, so there are at most log2(n) of them: :func:`_merge_from`), and looks keys up by
binary search (``search_sorted``): each batch costs about b·log(n), and the runs hold each
key once. Runs are sorted by a 64-bit hash of the key (integers search several
times faster than text), and the runs hold no key itself: a key is found when both its hash and a second
64-bit hash (another seed) match, so two keys are confused only if both of
their hashes collide, and a key is missed only if another key of the same run
has the same first hash.

A Bloom filter (:class:`_Filter`) sits in front of the runs: most keys never added (a new record
id, a new patient: what a migration mostly asks about) are answered "absent" by one read of a
small array, and only the rest are sought in the runs.

Adding is lazy: rows wait in a buffer and become a run when the index is next
read, so an index that is only written (what a run's references might need but
nothing asked for yet) costs an append per batch.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

import polars as pl

from etl.lazy_numpy import np

__all__ = ["SEED", "KeyIndex", "first_distinct", "first_of_hashes"]

KEY = "key"
_HASH = "__hash"
_CHECK = "__check"  # a second 64-bit hash of the key, with another seed
_AT = "__at"  # a row's position, while values are put in their rows
SEED = 0x5EED_C0DE  # the second hash's seed (the first is polars' default)
WAIT_ROWS = 1_000_000  # rows waiting to be added, at most, before they are merged in
ADD_ON_THREAD_FROM = 20_000  # keys an insert adds on the key-index thread, from this many (see insert)


_ADDER: list[ThreadPoolExecutor] = []


def _adder() -> ThreadPoolExecutor:
    """The thread that makes inserted keys into runs (one for every index: each waits for its own)."""
    if not _ADDER:
        _ADDER.append(ThreadPoolExecutor(1, thread_name_prefix="key-index"))
    return _ADDER[0]


def first_distinct(keys: pl.Series) -> pl.Series:
    """``keys.is_first_distinct()``, from a 64-bit hash of each key: the text itself is compared only among keys
    whose hash is not alone in ``keys`` (a key repeated, or, rarely, two keys with one hash), so the answer is
    exact. A batch's keys repeat seldom: hashing them and finding the first of each hash costs a fifth of
    finding the first of each text (31-byte dose identities)."""
    hashes = keys.hash()
    first = hashes.is_first_distinct()
    if first.all():
        return first
    shared = hashes.is_duplicated().arg_true()
    return first.scatter(shared, keys.gather(shared).is_first_distinct())


def _merge_from(runs: list[pl.DataFrame]) -> int | None:
    """Where the runs must be merged from (all of them from there on into one), or None: the first run
    that holds no more keys than all the newer runs together.

    Comparing a run with the next one alone (a binary counter's carry) keeps the runs few only when
    every batch adds about as many keys. When fewer and fewer are new (a registry's patients, who
    come back batch after batch), each new run is smaller than the one before, nothing was ever
    merged, and every lookup searched a run per batch so far: 30 s of a 5,000,000-row validate.
    """
    newer = 0
    at = None
    for i in range(len(runs) - 1, 0, -1):
        newer += runs[i].height
        if runs[i - 1].height <= newer:
            at = i - 1
    return at


def first_of_hashes(hashes: pl.Series, checks: pl.Series) -> pl.Series:
    """``is_first_distinct()`` of keys given as two hashes (:meth:`KeyIndex.insert_hashes`): from the first alone,
    the pair compared only where the first is not alone (a struct's first-distinct costs several times more)."""
    first = hashes.is_first_distinct()
    if first.all():
        return first
    shared = hashes.is_duplicated().arg_true()
    pairs = pl.DataFrame([hashes.gather(shared).alias(_HASH), checks.gather(shared).alias(_CHECK)])
    return first.scatter(shared, pairs.select(pl.struct(_HASH, _CHECK).is_first_distinct()).to_series())


class _Filter:
    """A blocked Bloom filter over the keys' two hashes: "certainly absent" for most keys never added.

    A key sets three bits of one 64-bit word (the word chosen by its first hash, the bits by its
    second), so a lookup reads one word, and the words (at most four keys each on average: about
    1% of absent keys are sought in vain) fit in a processor's cache for a million keys. It grows
    (rebuilt from the runs' hashes) as keys are added, and a key taken out stays in it (it is
    then sought, and not found).
    """

    def __init__(self) -> None:
        self._words: np.ndarray | None = None  # made at the first add (numpy is imported when first used)
        self.held = 0

    @property
    def words(self) -> np.ndarray:
        if self._words is None:
            self._words = np.zeros(1 << 10, dtype=np.uint64)
        return self._words

    @words.setter
    def words(self, words: np.ndarray) -> None:
        self._words = words

    def _at(self, hashes: np.ndarray, checks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        # The word from the hash's top bits: keys sorted by hash (a run) fall in their words in order.
        word = hashes >> np.uint64(65 - len(self.words).bit_length())
        one, six = np.uint64(1), np.uint64(63)
        bits = (
            (one << (checks & six))
            | (one << ((checks >> np.uint64(6)) & six))
            | (one << ((checks >> np.uint64(12)) & six))
        )
        return word, bits

    def may_hold(self, hashes: np.ndarray, checks: np.ndarray) -> np.ndarray:
        word, bits = self._at(hashes, checks)
        held: np.ndarray = (self.words[word] & bits) == bits
        return held

    def add(self, hashes: np.ndarray, checks: np.ndarray, runs: list[pl.DataFrame]) -> None:
        """Hold these keys (``runs``: every key held, the new ones among them, for a rebuild)."""
        self.held += len(hashes)
        if self.held > 4 * len(self.words):
            self.words, self.held = np.zeros(1 << max(10, int(self.held // 2).bit_length()), dtype=np.uint64), 0
            for run in runs:
                self.add(run.get_column(_HASH).to_numpy(), run.get_column(_CHECK).to_numpy(), [])
            return
        word, bits = self._at(hashes, checks)
        if not len(word):
            return
        if not bool(np.all(word[1:] >= word[:-1])):  # not a run's keys (sorted by hash): sort them
            order = np.argsort(word, kind="stable")
            word, bits = word[order], bits[order]
        # The bits of each word's keys or-ed together, then set in one step (ufunc.at, a step per key,
        # is ten times slower).
        starts = np.flatnonzero(np.concatenate(([True], word[1:] != word[:-1])))
        self.words[word[starts]] |= np.bitwise_or.reduceat(bits, starts)


class KeyIndex:
    """Keys (strings) and, for each, the values of the row that added it first."""

    def __init__(self, values: dict[str, pl.DataType] | None = None) -> None:
        self.schema: dict[str, pl.DataType] = {KEY: pl.String(), **(values or {})}
        self._runs: list[pl.DataFrame] = []  # each sorted by the key's hash; keys unique across all runs
        self._waiting: list[pl.DataFrame] = []  # added, not yet in a run (see ``_settle``)
        self._filter = _Filter()
        self._adding: Future[None] | None = None  # an insert's new keys, made a run on a thread (see insert)

    @property
    def runs(self) -> list[pl.DataFrame]:
        """The sorted runs, once the keys an insert added are in them."""
        self._added()
        return self._runs

    @runs.setter
    def runs(self, runs: list[pl.DataFrame]) -> None:
        self._added()
        self._runs = runs

    def _added(self) -> None:
        """Wait for the last insert's keys to be in the runs (its failure is raised here)."""
        if self._adding is not None:
            adding, self._adding = self._adding, None
            adding.result()

    def __len__(self) -> int:
        self._settle()
        return sum(run.height for run in self.runs)

    def lookup(self, keys: pl.Series) -> pl.DataFrame:
        """For each of ``keys``, in order: ``found`` and the stored values (null when not found)."""
        return self.insert(pl.DataFrame({KEY: keys.cast(pl.String)}), add=False)

    def insert(self, rows: pl.DataFrame, *, add: bool = True, first: pl.Series | None = None) -> pl.DataFrame:
        """Look up the keys of ``rows`` (as :meth:`lookup`) and add the rows whose keys were absent.

        Cheaper than a lookup and an add: the keys are hashed once for both. The filter
        (:class:`_Filter`) rules most absent keys out; only the rest are sought in the runs.
        ``first``: ``rows``' keys' ``is_first_distinct()``, when the caller has it already (a tenth of
        what an insert costs, for text keys).
        """
        keys = rows.get_column(KEY).cast(pl.String)
        if not len(keys):
            self._settle()
            return self._in_order(len(keys), None, None)
        return self._insert(keys.hash(), keys.hash(seed=SEED), keys.is_not_null(), rows, add=add,
                            first=first if first is not None else (lambda: first_distinct(keys)))

    def insert_hashes(
        self, hashes: pl.Series, checks: pl.Series, rows: pl.DataFrame, *, first: pl.Series | None = None
    ) -> pl.DataFrame:
        """:meth:`insert` of keys given as two 64-bit hashes each, of two seeds (:data:`SEED` and another, as
        ``key.hash()`` and ``key.hash(seed=SEED)`` give them), for a key that is not text: a struct of several
        columns is hashed as it is, with no text made of it. ``rows``: the values (no ``key``). An index is
        given its keys one way only: a text key and the hashes of something else are not comparable."""
        if not len(hashes):
            self._settle()
            return self._in_order(0, None, None)

        present = pl.repeat(True, len(hashes), dtype=pl.Boolean, eager=True)
        return self._insert(hashes, checks, present, rows,
                            first=first if first is not None else (lambda: first_of_hashes(hashes, checks)))

    def _insert(
        self, hash_series: pl.Series, check_series: pl.Series, not_null: pl.Series, rows: pl.DataFrame, *,
        first: pl.Series | Callable[[], pl.Series], add: bool = True,
    ) -> pl.DataFrame:
        """:meth:`insert` of keys given as their two hashes (``first``: their first rows, or what finds them)."""
        self._settle()
        n = len(hash_series)
        hashes, checks = hash_series.to_numpy(), check_series.to_numpy()
        present = not_null.to_numpy()
        found = np.zeros(n, dtype=np.bool_)
        values: pl.DataFrame | None = None
        if self.runs and len(sought := np.flatnonzero(self._filter.may_hold(hashes, checks) & present)):
            hit, stored = self._sought(hashes[sought], checks[sought])
            found[sought] = hit
            if stored is not None and not stored.is_empty():
                # Each hit's values set at its row: one join for every column (not a scatter each).
                values = (  # eager: polars' default (streaming) engine is slower over this join
                    pl.int_range(n, dtype=pl.UInt32, eager=True).to_frame(_AT)
                    .join(stored.with_columns(pl.Series(_AT, sought[hit], dtype=pl.UInt32)), on=_AT,
                          how="left", maintain_order="left")
                    .drop(_AT)
                )
        if add:
            # The absent keys become a run on a thread of their own while the caller goes on with the answer
            # (sorting and merging runs was a fifth of what the batches' checks waited for); the next use of
            # the index waits for them.
            if n >= ADD_ON_THREAD_FROM:
                self._adding = _adder().submit(self._add, first, ~found & present, hashes, checks, rows)
            else:  # a few keys: added at once (the thread's hand-over can take longer than adding them)
                self._add(first, ~found & present, hashes, checks, rows)
        return self._in_order(n, pl.Series("found", found), values)

    def _add(
        self, first: pl.Series | Callable[[], pl.Series], absent: np.ndarray, hashes: np.ndarray, checks: np.ndarray,
        rows: pl.DataFrame,
    ) -> None:
        """Add the rows whose keys are ``absent`` (not null, not held); the first row of a key wins."""
        fresh = (first if isinstance(first, pl.Series) else first()).to_numpy() & absent
        if fresh.any():  # the new run, sorted by hash (polars' sort: faster than numpy's argsort and a gather)
            run = (
                pl.DataFrame({_HASH: hashes, _CHECK: checks})
                .hstack(rows.select(self._values()))
                .filter(pl.Series(fresh))
                .sort(_HASH)
            )
            self._push(run.cast(self._cast), hashed=True)  # type: ignore[arg-type]

    def _sought(self, hashes: np.ndarray, checks: np.ndarray) -> tuple[np.ndarray, pl.DataFrame | None]:
        """Which of these keys (their two hashes) the runs hold, and their values (as many rows as hits)."""
        # Sought in the order of their hashes: each run's binary searches and the reads of its hits then go
        # through it in order, not at random (a 5,000,000-row registry's patients: 7 s of lookups, not 11).
        order = np.argsort(hashes)
        hashes, checks = hashes[order], checks[order]
        found = np.zeros(len(hashes), dtype=np.bool_)
        names = self._values()
        parts: list[tuple[np.ndarray, pl.DataFrame]] = []
        for run in self.runs:
            if run.is_empty():
                continue
            stored, second = run.get_column(_HASH).to_numpy(), run.get_column(_CHECK).to_numpy()
            at = np.minimum(np.searchsorted(stored, hashes, side="left"), len(stored) - 1)
            mine = (stored[at] == hashes) & (second[at] == checks) & ~found
            if not mine.any():
                continue
            found |= mine
            if names:
                parts.append((order[mine], run.select(names)[pl.Series(at[mine], dtype=pl.UInt32)]))
        hit = np.zeros(len(hashes), dtype=np.bool_)
        hit[order] = found
        if not names:
            return hit, None
        if not parts:
            return hit, pl.DataFrame(schema=self._cast)
        # In the order of the hits among the sought keys.
        where = np.concatenate([w for w, _ in parts])
        return hit, pl.concat([v for _, v in parts])[pl.Series(np.argsort(where, kind="stable"), dtype=pl.UInt32)]

    def _in_order(self, n: int, found: pl.Series | None, values: pl.DataFrame | None) -> pl.DataFrame:
        """``found`` and the values of ``n`` keys as a frame (nothing found where they are None)."""
        if found is None:
            found = pl.repeat(False, n, dtype=pl.Boolean, eager=True).alias("found")
        names = [name for name in self.schema if name != KEY]
        if not names:
            return found.to_frame()
        if values is None:  # one query for every column
            values = pl.select(pl.repeat(None, n, dtype=self.schema[name]).alias(name) for name in names)
        return values.insert_column(0, found)

    def contains(self, keys: pl.Series) -> pl.Series:
        """Whether each of ``keys`` is in the index."""
        return self.lookup(keys).get_column("found")

    def _values(self) -> list[str]:
        return [n for n in self.schema if n != KEY]

    @property
    def _cast(self) -> dict[str, pl.DataType]:
        return {n: t for n, t in self.schema.items() if n != KEY}

    def add(self, rows: pl.DataFrame, *, new: bool = False) -> None:
        """Add the rows (a ``key`` column and the values) whose keys are new; the first row of a key wins.

        ``new``: the caller has just looked the keys up and passes only absent, distinct ones.
        """
        rows = rows.select(self.schema.keys()).cast(self.schema).drop_nulls(KEY)  # type: ignore[arg-type]
        if new and not self._waiting:
            self._added()
            self._push(rows)
        elif not rows.is_empty():
            self._waiting.append(rows)
            if sum(w.height for w in self._waiting) > WAIT_ROWS:  # memory stays bounded
                self._settle()

    def _settle(self) -> None:
        """Turn the rows waiting since the last read into a run (the first row of a key wins)."""
        self._added()
        if not self._waiting:
            return
        rows = pl.concat(self._waiting)
        rows = rows.filter(first_distinct(rows.get_column(KEY)))
        self._waiting = []
        self._push(rows.filter(~self.contains(rows.get_column(KEY))))

    def _push(self, rows: pl.DataFrame, *, hashed: bool = False) -> None:
        """A run of keys absent from the index and distinct (``hashed``: the rows are the keys' two
        hashes and the values, sorted by the first; else a ``key`` column and the values)."""
        if rows.is_empty():
            return
        if hashed:
            self._runs.append(rows.with_columns(pl.col(_HASH).set_sorted()))
        else:
            key = pl.col(KEY)
            run = rows.select(key.hash().alias(_HASH), key.hash(seed=SEED).alias(_CHECK), *self._values())
            self._runs.append(run.sort(_HASH))
        added = self._runs[-1]
        while (at := _merge_from(self._runs)) is not None:
            # The runs from ``at`` on joined and sorted again: polars' sort takes half the CPU its merge_sorted
            # of two sorted runs does. One chunk, so its columns read as arrays without a copy.
            self._runs[at:] = [pl.concat(self._runs[at:]).sort(_HASH).rechunk()]
        self._filter.add(added.get_column(_HASH).to_numpy(), added.get_column(_CHECK).to_numpy(), self._runs)

    def add_keys(self, keys: pl.Series, *, new: bool = False) -> None:
        """Add keys that carry no values."""
        self.add(pl.DataFrame({KEY: keys.cast(pl.String)}), new=new)

    def remove(self, keys: pl.Series) -> None:
        """Take keys out (rare: rows rejected after they were planned)."""
        self._settle()
        key = pl.col(KEY)
        gone = (
            keys.cast(pl.String).drop_nulls().to_frame(KEY)
            .select(key.hash().alias(_HASH), key.hash(seed=SEED).alias(_CHECK))
        )
        self.runs = [
            run.join(gone, on=[_HASH, _CHECK], how="anti", maintain_order="left").with_columns(
                pl.col(_HASH).set_sorted()
            )
            for run in self.runs
        ]
