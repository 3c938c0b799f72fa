"""What a load skips before anything is sent: the creates an earlier run made and that have not changed.

A weekly re-import of an unchanged export plans every row again; each was created by an earlier run
and is the same as then (the same body hash). They are found here in set operations (a state-store
read per kind, :meth:`etl.load.state.StateStore.stored`, and a join), before any HTTP client is
opened, so a load with nothing else to send opens none (:mod:`etl.send`). This module needs neither
httpx nor the loader: a re-import imports neither to decide.

The rule is the loader's own (:meth:`etl.load.loader.Loader.run_part` skips these too, a row at a
time): stored as ``created`` and unchanged since (the same body hash, or none to compare, or no id
to update). A row that changed, or that an earlier run left in doubt, is not skipped here: the
loader decides it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import polars as pl

if TYPE_CHECKING:
    from etl.load.state import StateStore

__all__ = ["CHANGED_SINCE", "CREATED_EARLIER", "created_earlier", "created_unchanged", "skipped_and_unsent"]

#: The message of a row skipped because an earlier run created it (and it has not changed since).
CREATED_EARLIER = "created by an earlier run"
#: The message of a row an earlier run created that differs now (reported ``changed``; ``--update`` patches it).
CHANGED_SINCE = "differs from what was created; --update patches it"

_SKIPPED = {"kind": pl.String, "source_key": pl.String, "resource_id": pl.String}


def skipped_and_unsent(state: StateStore, creates: pl.DataFrame) -> tuple[pl.DataFrame, int]:
    """Of planned ``creates`` (``kind``, ``source_key``, ``body_hash``): those created earlier and unchanged
    (``kind, source_key, resource_id``, a line a key: :func:`created_unchanged`), and how many of
    ``creates`` the state store does not hold as created (what a load will send: the estimate and
    ``--mode auto`` count them). One state-store read per kind answers both."""
    found = [pl.DataFrame(schema=_SKIPPED)]
    unsent = 0
    for (kind,), mine in creates.select("kind", "source_key", "body_hash").group_by("kind", maintain_order=True):
        made = created_earlier(state, str(kind), mine)
        distinct = made.get_column("source_key").n_unique()
        unsent += mine.height - distinct
        unchanged = made.filter(~pl.col("changed")).select("kind", "source_key", "resource_id")
        if distinct < made.height:  # a result a key, as the loader's (a dict) gives
            unchanged = unchanged.unique("source_key", maintain_order=True)
        found.append(unchanged)
    return pl.concat(found), unsent


def created_earlier(state: StateStore, kind: str, creates: pl.DataFrame) -> pl.DataFrame:
    """Those of ``creates`` (of ``kind``: ``source_key``, ``body_hash`` and any other columns, kept) that the
    state store holds as created, with their ``resource_id`` and whether each ``changed`` since, by the loader's
    rule (``etl.load.loader.Loader._run_stage``): a stored hash that differs, and an id to update (no hash or
    no id to compare: unchanged). One state-store read (:meth:`StateStore.stored`) and a join."""
    stored = state.stored(kind, creates.get_column("source_key"), states=("created",),
                          columns=("resource_id", "body_hash"))
    held = pl.col("stored_hash").fill_null("")
    changed = (held != "") & held.ne_missing(pl.col("body_hash")) & (pl.col("resource_id").fill_null("") != "")
    return (
        creates.join(stored.rename({"body_hash": "stored_hash"}), on="source_key", how="inner")
        .with_columns(changed.alias("changed"))
        .drop("stored_hash")
    )


def created_unchanged(state: StateStore, creates: pl.DataFrame) -> pl.DataFrame:
    """Of planned ``creates`` (``kind``, ``source_key``, ``body_hash``), those the loader skips: stored as created,
    and unchanged since (the same body hash, or none to compare): ``kind, source_key, resource_id``.

    The loader's own rule as set operations: one state-store read per kind (:meth:`StateStore.stored`)
    and a join, so a re-import of an unchanged export gives the loader nothing to look at.
    """
    return skipped_and_unsent(state, creates)[0]
