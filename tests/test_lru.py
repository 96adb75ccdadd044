"""The one LRU cache behind the tokenizer, embedding loader and encoder caches."""

import doctest
import threading

from textenc import lru
from textenc.lru import LRUCache


def test_evicts_least_recently_used_and_refreshes_on_get():
    cache = LRUCache(2)
    cache.put("a", 1)
    cache.put("b", 2)
    assert cache.get("a") == 1  # "a" is now the most recent
    cache.put("c", 3)
    assert cache.get("b") is None and cache.get("a") == 1 and cache.get("c") == 3
    assert cache.get_many(["a", "x", "c"]) == [1, None, 3]


def test_unbounded_and_falsy_values_are_hits():
    cache = LRUCache(None)
    cache.put_many({i: 0 for i in range(1000)})
    assert len(cache) == 1000 and cache.get(999, "miss") == 0


def test_get_or_compute_computes_once_per_key():
    cache, calls = LRUCache(4), []
    for _ in range(3):
        assert cache.get_or_compute("k", lambda: calls.append(1) or "v") == "v"
    assert calls == [1]


def test_threads_never_exceed_the_bound():
    cache = LRUCache(16)

    def work(offset):
        for i in range(2000):
            cache.put((offset, i % 40), i)
            cache.get((offset, (i * 7) % 40))

    threads = [threading.Thread(target=work, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(cache) == 16


def test_doctests():
    assert doctest.testmod(lru).failed == 0
