"""A growing set of keys (with values) that batches look things up in.

Validating a file in batches asks, for every batch, "was this key seen before?"
against everything seen so far. A polars join or ``is_in`` rebuilds a hash
table of all of it for each batch, so a file of n rows in batches of b costs
n²/b. A :class:`KeyIndex` keeps its keys in sorted runs instead, merged as a
log-structured merge tree merges them (a run is merged into the one before it
once that is no more than twice its size), and looks keys up by binary search
(``search_sorted``): each batch costs about b·log(n), and the runs hold each
key once. Runs are sorted by a 64-bit hash of the key (integers search several
times faster than text) and the key found is compared with the key sought, so
an answer is exact; a key is only missed if another key of the same run has
the same 64-bit hash.
"""

from __future__ import annotations

import polars as pl

__all__ = ["KeyIndex"]

KEY = "key"
_HASH = "__hash"


class KeyIndex:
    """Keys (strings) and, for each, the values of the row that added it first."""

    def __init__(self, values: dict[str, pl.DataType] | None = None) -> None:
        self.schema: dict[str, pl.DataType] = {KEY: pl.String(), **(values or {})}
        self.runs: list[pl.DataFrame] = []  # each sorted by the key's hash; keys unique across all runs

    def __len__(self) -> int:
        return sum(run.height for run in self.runs)

    def lookup(self, keys: pl.Series) -> pl.DataFrame:
        """For each of ``keys``, in order: ``found`` and the stored values (null when not found)."""
        keys = keys.cast(pl.String)
        found = pl.repeat(False, len(keys), dtype=pl.Boolean, eager=True).alias("found")
        hashes = keys.hash()
        names = [n for n in self.schema if n != KEY]
        values: pl.DataFrame | None = None
        for run in self.runs:
            if run.is_empty():
                continue
            at = run.get_column(_HASH).search_sorted(hashes, side="left").clip(0, run.height - 1)
            hit = (run.get_column(KEY).gather(at) == keys).fill_null(False) & ~found
            if not hit.any():
                continue
            found = found | hit
            if names:
                stored = run.select(names)[at].select(pl.when(hit).then(pl.col(n)).alias(n) for n in names)
                if values is not None:
                    stored = values.select(pl.coalesce(pl.col(n), stored.get_column(n)) for n in names)
                values = stored
        if not names:
            return found.to_frame()
        if values is None:
            values = pl.DataFrame(
                [pl.repeat(None, len(keys), dtype=self.schema[n], eager=True).alias(n) for n in names]
            )
        return values.insert_column(0, found)

    def contains(self, keys: pl.Series) -> pl.Series:
        """Whether each of ``keys`` is in the index."""
        if not self.runs:
            return pl.repeat(False, len(keys), dtype=pl.Boolean, eager=True).alias("found")
        return self.lookup(keys).get_column("found")

    def add(self, rows: pl.DataFrame, *, new: bool = False) -> None:
        """Add the rows (a ``key`` column and the values) whose keys are new; the first row of a key wins.

        ``new``: the caller has just looked the keys up and passes only absent, distinct ones.
        """
        rows = rows.select(self.schema.keys()).cast(self.schema).drop_nulls(KEY)  # type: ignore[arg-type]
        if not new:
            rows = rows.unique(KEY, keep="first", maintain_order=True)
            rows = rows.filter(~self.contains(rows.get_column(KEY)))
        if rows.is_empty():
            return
        self.runs.append(rows.with_columns(pl.col(KEY).hash().alias(_HASH)).sort(_HASH))
        while len(self.runs) > 1 and self.runs[-2].height <= 2 * self.runs[-1].height:
            newer = self.runs.pop()
            self.runs[-1] = self.runs[-1].merge_sorted(newer, _HASH)  # both sorted: a linear merge

    def add_keys(self, keys: pl.Series, *, new: bool = False) -> None:
        """Add keys that carry no values."""
        self.add(pl.DataFrame({KEY: keys.cast(pl.String)}), new=new)

    def remove(self, keys: pl.Series) -> None:
        """Take keys out (rare: rows rejected after they were planned)."""
        gone = keys.cast(pl.String).implode()
        self.runs = [run.filter(~pl.col(KEY).is_in(gone)) for run in self.runs]

    def keys(self) -> pl.Series:
        """Every key, in no particular order."""
        if not self.runs:
            return pl.Series(KEY, [], dtype=pl.String)
        return pl.concat([run.get_column(KEY) for run in self.runs])
