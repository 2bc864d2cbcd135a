"""Integer names for the objects a torch.compile graph calls through custom ops.

A custom op takes tensors and numbers, not Python objects, so the expert loop and the packed int8 linears — which
the compiler must not trace — are passed to their ops as a handle and looked up here when the op runs. Entries
go away with their objects.
"""

from __future__ import annotations

import itertools
import weakref
from typing import Any


class Handles:
    def __init__(self) -> None:
        self._objects: weakref.WeakValueDictionary[int, Any] = weakref.WeakValueDictionary()
        self._next = itertools.count()

    def add(self, obj: Any) -> int:
        handle = next(self._next)
        self._objects[handle] = obj
        return handle

    def __getitem__(self, handle: int) -> Any:
        return self._objects[handle]
