"""Cache only where it pays (CACHE=auto): decided per version as it loads.

A cached row costs its key (an MD5 of the row), a lookup and, on a miss, a store of the
answer's JSON; a cheap model's row costs less to compute than that, and over Redis a lookup
is a network round trip that costs many times a LogisticRegression call. So each version's
one-row call is timed at load (by the micro-batching probe, ``LoadedVersion.row_us``) and
set against what the configured cache costs a row, measured on this worker: the version
goes through the cache only when its call costs more (``CACHE=on``, the default).
``CACHE=always`` caches every version, ``CACHE=off`` none. The decision and both figures
are in ``/models`` (``cache``, ``cache_note``). A version that skips the cache never reads
or writes its keys; the key contract (``pred:<model>:<version>:<md5>``) is unchanged for
the versions that use it.
"""

from __future__ import annotations

import statistics
import time
import uuid
from dataclasses import replace

import numpy as np
import orjson
import redis

from server.model.loaded import LoadedVersion
from server.serving.cache import MemoryCache, PredictionCache, RedisCache, record_key, row_keys

# A loopback Redis round trip under a gevent worker, assumed when Redis cannot be reached
# while a version loads (it is measured whenever it can be).
ASSUMED_REDIS_US = 250.0
PROBE_ANSWER = orjson.dumps({"prediction": 0, "label": "setosa", "confidence": 0.97,
                             "probabilities": {"setosa": 0.97, "versicolor": 0.02,
                                               "virginica": 0.01}})


def row_cost_us(cache: PredictionCache, lv: LoadedVersion) -> tuple[float, str]:
    """What caching costs one row of ``lv`` on ``cache`` beyond computing it (a miss: key,
    lookup, store), in microseconds, and how that was found."""
    X = np.random.default_rng(11).normal(0.0, 1.0, (1, lv.n_features or 4))
    if isinstance(cache, RedisCache):
        keys = row_keys(lv.name, lv.version, X)
        probe = [*keys, record_key(lv.name, lv.version)]
        times = []
        try:
            for _ in range(5):
                started = time.perf_counter()
                cache.client.mget(probe)
                times.append(time.perf_counter() - started)
        except (redis.RedisError, OSError):
            return 2 * ASSUMED_REDIS_US, "Redis unreachable at load: round trips assumed"
        # A miss makes two round trips: the lookup, then the store.
        return 2 * statistics.median(times) * 1e6, "measured on Redis"
    if isinstance(cache, MemoryCache):
        scratch = MemoryCache(1 << 20, 60)  # the same code on a cache of its own: the
        artifact = replace(lv, sha256=uuid.uuid4().hex)  # real one's figures stay as they are
        times = []
        for i in range(200):
            started = time.perf_counter()
            keys = row_keys(lv.name, lv.version, X + i)
            scratch.get_many(keys, artifact)
            scratch.set_many({keys[0]: orjson.dumps(orjson.loads(PROBE_ANSWER))}, artifact)
            times.append(time.perf_counter() - started)
        return statistics.median(times) * 1e6, "measured on the memory cache"
    return 0.0, "no cache"


def cache_mode(lv: LoadedVersion, cache: PredictionCache, policy: str) -> LoadedVersion:
    """``lv`` with ``cache`` "on" or "off" and the reason in ``cache_note``."""
    if not cache.enabled:
        return replace(lv, cache="off", cache_note="CACHE=off")
    if policy == "always":
        return replace(lv, cache="on", cache_note="CACHE=always: every version is cached")
    cost, how = row_cost_us(cache, lv)
    if lv.row_us is None:
        return replace(lv, cache="on", cache_note="the model's cost could not be timed")
    figures = (f"a one-row call costs {lv.row_us:.0f} us; caching a row costs "
               f"{cost:.0f} us ({how})")
    if lv.row_us <= cost:
        return replace(lv, cache="off", cache_note=f"{figures}: computing is cheaper")
    return replace(lv, cache="on", cache_note=figures)
