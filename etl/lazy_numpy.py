"""numpy, imported when first used.

A command that never needs it, and every command's start, does not wait for its import (a tenth of a
second): :func:`etl.validate.warm_up` imports it on a thread while the first batch is read. The key
indexes (:mod:`etl.keyindex`) and the CSV reader's scans of a chunk (:mod:`etl.readers`) use it; the
reader asks :func:`loaded` first, and scans the first chunk without it rather than wait for the import.
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import TYPE_CHECKING, Any

__all__ = ["load", "loaded", "np"]

_module: list[ModuleType] = []  # numpy, once imported


def load() -> ModuleType:
    """numpy, imported now if it was not yet (another thread importing it meanwhile: once it is done)."""
    if not _module:
        _module.append(importlib.import_module("numpy"))
    return _module[0]


def loaded() -> bool:
    """Whether numpy is imported already: using it now waits for nothing."""
    return bool(_module)


if TYPE_CHECKING:
    import numpy as np
else:

    class _Imported:
        def __getattr__(self, name: str) -> Any:
            return getattr(load(), name)

    np = _Imported()
