"""A small thread-safe LRU cache, shared by the tokenizer, the embedding loader
and the text encoder (each instance owns its caches; nothing is module-global).

>>> cache = LRUCache(2)
>>> cache.put("a", 1); cache.put("b", 2); _ = cache.get("a"); cache.put("c", 3)
>>> sorted(cache.keys())
['a', 'c']
"""

from __future__ import annotations

import collections
import threading
from typing import Any, Callable, Hashable, Iterable, Mapping

__all__ = ["LRUCache"]

_MISSING = object()


class LRUCache:
    """Bounded (``maxsize``) or unbounded (``None``) mapping evicting the least recently used.

    Values are computed outside the lock: two threads missing the same key at
    once may both compute it; the results are equal, and the last one is kept.
    """

    def __init__(self, maxsize: int | None) -> None:
        self.maxsize = maxsize
        self._data: collections.OrderedDict = collections.OrderedDict()
        self._lock = threading.Lock()

    def _get_locked(self, key: Hashable, default: Any) -> Any:
        value = self._data.get(key, _MISSING)
        if value is _MISSING:
            return default
        self._data.move_to_end(key)
        return value

    def _trim_locked(self) -> None:
        while self.maxsize is not None and len(self._data) > self.maxsize:
            self._data.popitem(last=False)

    def get(self, key: Hashable, default: Any = None) -> Any:
        with self._lock:
            return self._get_locked(key, default)

    def get_many(self, keys: Iterable[Hashable]) -> list[Any]:
        """Look several keys up under one lock acquisition (None for a miss)."""
        found: list[Any] = []
        with self._lock:  # _get_locked, inline: the tokenizer looks up every word of a prompt
            get, move_to_end = self._data.get, self._data.move_to_end
            for key in keys:
                value = get(key, _MISSING)
                if value is _MISSING:
                    found.append(None)
                else:
                    move_to_end(key)
                    found.append(value)
        return found

    def put(self, key: Hashable, value: Any) -> None:
        self.put_many({key: value})

    def put_many(self, items: Mapping[Hashable, Any]) -> None:
        with self._lock:
            self._data.update(items)
            for key in items:
                self._data.move_to_end(key)
            self._trim_locked()

    def get_or_compute(self, key: Hashable, compute: Callable[[], Any]) -> Any:
        value = self.get(key, _MISSING)
        if value is _MISSING:
            value = compute()
            self.put(key, value)
        return value

    def keys(self) -> list:
        with self._lock:
            return list(self._data)

    def clear(self) -> None:
        with self._lock:
            self._data.clear()

    def __len__(self) -> int:
        return len(self._data)
