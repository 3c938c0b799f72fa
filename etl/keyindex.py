"""A growing set of keys (with values) that batches look things up in.

Validating a file in batches asks, for every batch, "was this key seen before?"
against everything seen so far. A polars join or ``is_in`` rebuilds a hash
table of all of it for each batch, so a file of n rows in batches of b costs
n²/b. A :class:`KeyIndex` keeps its keys in sorted runs instead, merged as a
log-structured merge tree merges them (a run is merged into the one before it
once that is no more than twice its size), and looks keys up by binary search
(``search_sorted``): each batch costs about b·log(n), and the runs hold each
key once. Runs are sorted by a 64-bit hash of the key (integers search several
times faster than text), and the runs hold no key itself: a key is found when both its hash and a second
64-bit hash (another seed) match, so two keys are confused only if both of
their hashes collide, and a key is missed only if another key of the same run
has the same first hash.

Adding is lazy: rows wait in a buffer and become a run when the index is next
read, so an index that is only written (what a run's references might need but
nothing asked for yet) costs an append per batch.
"""

from __future__ import annotations

import polars as pl

__all__ = ["KeyIndex"]

KEY = "key"
_HASH = "__hash"
_CHECK = "__check"  # a second 64-bit hash of the key, with another seed
_SEED = 0x5EED_C0DE
WAIT_ROWS = 1_000_000  # rows waiting to be added, at most, before they are merged in


class KeyIndex:
    """Keys (strings) and, for each, the values of the row that added it first."""

    def __init__(self, values: dict[str, pl.DataType] | None = None) -> None:
        self.schema: dict[str, pl.DataType] = {KEY: pl.String(), **(values or {})}
        self.runs: list[pl.DataFrame] = []  # each sorted by the key's hash; keys unique across all runs
        self._waiting: list[pl.DataFrame] = []  # added, not yet in a run (see ``_settle``)

    def __len__(self) -> int:
        self._settle()
        return sum(run.height for run in self.runs)

    def lookup(self, keys: pl.Series) -> pl.DataFrame:
        """For each of ``keys``, in order: ``found`` and the stored values (null when not found)."""
        return self.insert(pl.DataFrame({KEY: keys.cast(pl.String)}), add=False)

    def insert(self, rows: pl.DataFrame, *, add: bool = True) -> pl.DataFrame:
        """Look up the keys of ``rows`` (as :meth:`lookup`) and add the rows whose keys were absent.

        Cheaper than a lookup and an add: the keys are hashed and sorted once for both.
        """
        self._settle()
        keys = rows.get_column(KEY).cast(pl.String)
        if not self.runs or keys.is_empty():
            if add:
                self.add(rows)
            return self._in_order(keys, None, None)
        # Sought in hash order: a binary search over sorted keys runs about three times faster
        # (each search starts near the last), and so does reading the runs at the positions found.
        hashes = keys.hash()
        order = hashes.arg_sort()
        hashes, keys = hashes.gather(order), keys.gather(order)
        checks = keys.hash(seed=_SEED)
        present = keys.is_not_null()
        found = pl.repeat(False, len(keys), dtype=pl.Boolean, eager=True).alias("found")
        names = [n for n in self.schema if n != KEY]
        values: pl.DataFrame | None = None
        for run in self.runs:
            if run.is_empty():
                continue
            at = run.get_column(_HASH).search_sorted(hashes, side="left").clip(0, run.height - 1)
            hit = (run.get_column(_HASH).gather(at) == hashes) & (run.get_column(_CHECK).gather(at) == checks)
            hit = hit & present & ~found
            if not hit.any():
                continue
            found = found | hit
            if names:
                stored = run.select(names)[at].select(pl.when(hit).then(pl.col(n)).alias(n) for n in names)
                if values is not None:
                    stored = values.select(pl.coalesce(pl.col(n), stored.get_column(n)) for n in names)
                values = stored
        if add:
            # In hash order already, so the new run needs no sort; the first row of a key wins.
            first = rows.get_column(KEY).is_first_distinct().gather(order)  # first in the rows' own order
            fresh = (
                pl.DataFrame({_HASH: hashes, _CHECK: checks})
                .hstack(rows.drop(KEY).gather(order))
                .filter(first & ~found & present)
            )
            self._push(fresh.select(_HASH, _CHECK, *self._values()).cast(self._cast), hashed=True)  # type: ignore[arg-type]
        # Back to the rows' order: the inverse permutation by a scatter, cheaper than sorting ``order``.
        n = len(order)
        positions = pl.int_range(n, dtype=pl.UInt32, eager=True)
        inverse = pl.repeat(0, n, dtype=pl.UInt32, eager=True).scatter(order, positions)
        return self._in_order(keys, found, values).gather(inverse)

    def _in_order(self, keys: pl.Series, found: pl.Series | None, values: pl.DataFrame | None) -> pl.DataFrame:
        """``found`` and the values as a frame (nothing found where they are None)."""
        if found is None:
            found = pl.repeat(False, len(keys), dtype=pl.Boolean, eager=True).alias("found")
        names = [n for n in self.schema if n != KEY]
        if not names:
            return found.to_frame()
        if values is None:
            values = pl.DataFrame(
                [pl.repeat(None, len(keys), dtype=self.schema[n], eager=True).alias(n) for n in names]
            )
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
            self._push(rows)
        elif not rows.is_empty():
            self._waiting.append(rows)
            if sum(w.height for w in self._waiting) > WAIT_ROWS:  # memory stays bounded
                self._settle()

    def _settle(self) -> None:
        """Turn the rows waiting since the last read into a run (the first row of a key wins)."""
        if not self._waiting:
            return
        rows = pl.concat(self._waiting).filter(pl.col(KEY).is_first_distinct())
        self._waiting = []
        self._push(rows.filter(~self.contains(rows.get_column(KEY))))

    def _push(self, rows: pl.DataFrame, *, hashed: bool = False) -> None:
        """A run of keys absent from the index and distinct (``hashed``: the rows are the keys' two
        hashes and the values, sorted by the first; else a ``key`` column and the values)."""
        if rows.is_empty():
            return
        if hashed:
            self.runs.append(rows.with_columns(pl.col(_HASH).set_sorted()))
        else:
            key = pl.col(KEY)
            run = rows.select(key.hash().alias(_HASH), key.hash(seed=_SEED).alias(_CHECK), *self._values())
            self.runs.append(run.sort(_HASH))
        while len(self.runs) > 1 and self.runs[-2].height <= 2 * self.runs[-1].height:
            newer = self.runs.pop()
            self.runs[-1] = self.runs[-1].merge_sorted(newer, _HASH)  # both sorted: a linear merge

    def add_keys(self, keys: pl.Series, *, new: bool = False) -> None:
        """Add keys that carry no values."""
        self.add(pl.DataFrame({KEY: keys.cast(pl.String)}), new=new)

    def remove(self, keys: pl.Series) -> None:
        """Take keys out (rare: rows rejected after they were planned)."""
        self._settle()
        key = pl.col(KEY)
        gone = (
            keys.cast(pl.String).drop_nulls().to_frame(KEY)
            .select(key.hash().alias(_HASH), key.hash(seed=_SEED).alias(_CHECK))
        )
        self.runs = [
            run.join(gone, on=[_HASH, _CHECK], how="anti", maintain_order="left").with_columns(
                pl.col(_HASH).set_sorted()
            )
            for run in self.runs
        ]
