"""How polars' memory allocator is set up: imported first by :mod:`etl`, before polars is.

polars allocates through its own jemalloc, configured by the environment variable
``_RJEM_MALLOC_CONF``, which jemalloc reads once, at its first allocation; polars adds its
own decay times in front of what the variable holds when polars is imported (see
``polars/__init__.py``, pola-rs/polars#18088 and #21829), so the options set here win.

By default jemalloc keeps eight arenas on a two-core machine (four per core) and gives each
thread one. A batch is read, prepared, checked and written by four threads, so memory one
thread frees was seldom reused by the next; and freed pages went back to the system after
half a second, to be faulted in again. About a fifth of validate's CPU went to page faults
and ``madvise`` on a 1,000,000-row file. One arena, with freed pages kept five seconds, reuses
them: less CPU, and no more memory (README, Performance).

A value the user set in the variable is kept, and added after these (so it wins). Nothing
changes when polars was imported before :mod:`etl` (a notebook that did so keeps the default).

numpy's OpenBLAS starts a thread per extra core when numpy is imported (the key indexes use numpy,
never BLAS), and that thread spins waiting for work: about 1% of a validation's CPU on two cores.
``OPENBLAS_NUM_THREADS`` is set to 1 unless the user set it, or numpy was imported first.
"""

from __future__ import annotations

import os
import sys

#: The variable polars' jemalloc reads (``tikv-jemallocator``'s prefix ``_rjem_``).
VARIABLE = "_RJEM_MALLOC_CONF"
#: One arena for every thread; freed pages kept for reuse five seconds, not half a second.
OPTIONS = "narenas:1,dirty_decay_ms:5000,muzzy_decay_ms:5000"

#: OpenBLAS's variable for its thread count (read once, when numpy loads it).
BLAS_THREADS = "OPENBLAS_NUM_THREADS"

if "numpy" not in sys.modules:
    os.environ.setdefault(BLAS_THREADS, "1")
if "polars" not in sys.modules:
    own = os.environ.get(VARIABLE)
    os.environ[VARIABLE] = f"{OPTIONS},{own}" if own else OPTIONS
