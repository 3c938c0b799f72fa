"""numpy, imported when first used.

A command that never needs it, and every command's start, does not wait for its import (a tenth of a
second): :func:`etl.validate.warm_up` imports it on a thread while the first batch is read. The key
indexes (:mod:`etl.keyindex`) and the CSV reader's scans of a chunk (:mod:`etl.readers`) use it.
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np
else:

    class _Imported:
        module: ModuleType | None = None

        def __getattr__(self, name: str) -> Any:
            if _Imported.module is None:
                _Imported.module = importlib.import_module("numpy")
            return getattr(_Imported.module, name)

    np = _Imported()

__all__ = ["np"]
