"""A cached answer always comes from the artifact that serves the request (issue 24, item 4):
a reload during a Redis outage, two hosts on different artifacts of one version, a worker
still on the old artifact, and a Redis that lost its records, on real redis-server (and real
gunicorn where workers are involved)."""

from __future__ import annotations

import hashlib
import shutil
import signal
import struct
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import NamedTuple

import joblib
import pytest
from sklearn.datasets import load_iris
from sklearn.dummy import DummyClassifier

from server.serving.cache import RedisCache, make_redis, record_key
from tests.conftest import LiveServer, RedisServer, wait_until

# Starts servers of its own or runs for long: not in the fast subset (-m 'not slow').
pytestmark = pytest.mark.slow

ROW = [5.1, 3.5, 1.4, 0.2]  # setosa for the demo's iris v1


def contract_key(model: str, version: str, row: list[float]) -> str:
    raw = struct.pack(f"<{len(row)}d", *row)
    return f"pred:{model}:{version}:{hashlib.md5(raw).hexdigest()}"


def replace_with_virginica(version_dir: Path) -> str:
    """Swap the artifact for one that answers virginica to every row (a deploy: written
    aside, then renamed); its sha256."""
    iris = load_iris()
    model = DummyClassifier(strategy="constant", constant=2).fit(iris.data, iris.target)
    tmp = version_dir / "model.joblib.tmp"
    joblib.dump(model, tmp)
    tmp.replace(version_dir / "model.joblib")
    return hashlib.sha256((version_dir / "model.joblib").read_bytes()).hexdigest()


def shas_served(server: LiveServer, n: int = 8) -> set[str]:
    """The sha256 of iris v1 as each answering worker has it (fresh connections)."""
    return {v["sha256"] for _ in range(n)
            for v in server.fresh("GET", "/models/iris").json()["versions"]
            if v["version"] == "1"}


def test_reload_during_a_redis_outage_never_serves_the_old_artifacts_answer(
    server_factory: Callable[..., LiveServer], model_repo: Path, redis_server: RedisServer,
    admin: dict[str, str],
) -> None:
    server = server_factory(model_repo, REDIS_URL=redis_server.url, MODEL_POLL_SECONDS="0",
                            REDIS_BREAKER_SECONDS="0.5")
    url = "/predict/iris/versions/1"
    assert server.post(url, json=ROW).json()["label"] == "setosa"
    warm = server.fresh("POST", url, json=ROW)
    assert warm.headers["X-Cache"] == "HIT" and warm.json()["label"] == "setosa"

    redis_server.signal(signal.SIGSTOP)
    try:
        for _ in range(6):  # each worker meets the dead Redis and opens its breaker
            assert server.fresh("POST", url, json=ROW).status_code == 200
        new_sha = replace_with_virginica(model_repo / "iris" / "1")
        report = server.post("/admin/reload", headers=admin).json()
        assert report["changed"] == ["iris/1"]
        wait_until(lambda: shas_served(server) == {new_sha}, 5)
        during = server.fresh("POST", url, json=ROW)
        assert during.headers["X-Cache"] == "MISS" and during.json()["label"] == "virginica"
    finally:
        redis_server.signal(signal.SIGCONT)

    # Redis is back with v1's old answer still stored under the row's key.
    deadline = time.monotonic() + 3.0
    seen = []
    while time.monotonic() < deadline:
        resp = server.fresh("POST", url, json=ROW)
        assert resp.status_code == 200
        seen.append((resp.headers["X-Cache"], resp.json()["label"]))
        time.sleep(0.05)
    assert {label for _, label in seen} == {"virginica"}, seen
    # ...and the cache works again, with the new artifact's answer.
    wait_until(lambda: all(server.fresh("POST", url, json=ROW).headers["X-Cache"] == "HIT"
                           for _ in range(4)), 5, 0.2)
    with redis_server.client() as c:
        assert c.get(record_key("iris", "1")).decode() == new_sha
        assert b'"virginica"' in c.get(contract_key("iris", "1", ROW))
    statuses = [server.fresh("GET", "/status").json()["cache"] for _ in range(6)]
    assert all(s["state"] == "ok" and s["versions_synced"] for s in statuses), statuses


def test_hosts_on_different_artifacts_of_one_version_never_share_answers(
    server_factory: Callable[..., LiveServer], model_repo: Path, redis_server: RedisServer,
    tmp_path: Path,
) -> None:
    """A rolling deploy: host A still has the old iris v1, host B the new one, one Redis."""
    repo_b = Path(shutil.copytree(model_repo, tmp_path / "models-b"))
    replace_with_virginica(repo_b / "iris" / "1")
    url = "/predict/iris/versions/1"
    host_a = server_factory(model_repo, REDIS_URL=redis_server.url, WORKERS="1")
    assert host_a.post(url, json=ROW).json()["label"] == "setosa"
    assert host_a.post(url, json=ROW).headers["X-Cache"] == "HIT"
    host_b = server_factory(repo_b, REDIS_URL=redis_server.url, WORKERS="1")
    for _ in range(3):
        answer_b = host_b.post(url, json=ROW)
        assert answer_b.json()["label"] == "virginica"
    assert answer_b.headers["X-Cache"] == "HIT"
    for _ in range(3):
        answer_a = host_a.post(url, json=ROW)
        assert answer_a.json()["label"] == "setosa" and answer_a.headers["X-Cache"] == "MISS"
    assert host_b.post(url, json=ROW).json()["label"] == "virginica"
    assert host_a.get("/status").json()["cache"]["artifact_mismatches"] >= 3


class Artifact(NamedTuple):
    name: str
    version: str
    sha256: str


OLD = Artifact("m", "1", "a" * 64)
NEW = OLD._replace(sha256="b" * 64)
KEY = "pred:m:1:" + "0" * 32


@pytest.fixture
def worker_cache(redis_server: RedisServer) -> Iterator[Callable[[], RedisCache]]:
    """Makes one worker's (or host's) cache, as create_app does; its sockets closed after."""
    made: list[RedisCache] = []

    def make() -> RedisCache:
        url = redis_server.url
        made.append(RedisCache(make_redis(url, 0.25, 4), url, ttl=60, breaker_seconds=0.5))
        return made[-1]

    yield make
    for cache in made:
        cache.client.connection_pool.disconnect()


def test_a_worker_still_on_the_old_artifact_cannot_store_after_the_drop(
    redis_server: RedisServer, worker_cache: Callable[[], RedisCache],
) -> None:
    behind, ahead = worker_cache(), worker_cache()
    assert behind.sync_versions({("m", "1"): OLD.sha256}) == [("m", "1")]  # no record yet
    behind.set_many({KEY: b'{"prediction": 0}'}, OLD)
    assert behind.get_many([KEY], OLD) == [b'{"prediction": 0}']
    assert ahead.sync_versions({("m", "1"): NEW.sha256}) == [("m", "1")]  # ahead reloaded
    with redis_server.client() as c:
        assert c.exists(KEY) == 0
    behind.set_many({KEY: b'{"prediction": 0}'}, OLD)  # its request in flight finishes
    with redis_server.client() as c:
        assert c.exists(KEY) == 0
    assert ahead.get_many([KEY], NEW) == [None] and behind.get_many([KEY], OLD) == [None]
    ahead.set_many({KEY: b'{"prediction": 2}'}, NEW)
    assert ahead.get_many([KEY], NEW) == [b'{"prediction": 2}']
    assert behind.get_many([KEY], OLD) == [None]


def test_records_lost_by_redis_are_claimed_again_and_unknown_answers_dropped(
    redis_server: RedisServer, worker_cache: Callable[[], RedisCache],
) -> None:
    cache = worker_cache()
    cache.sync_versions({("m", "1"): OLD.sha256})
    with redis_server.client() as c:
        c.flushall()  # as a restart without persistence would
        c.set(KEY, b'{"prediction": 9}')  # whose answer? nothing records it
    assert cache.get_many([KEY], OLD) == [None]
    with redis_server.client() as c:
        wait_until(lambda: c.get(record_key("m", "1")) == OLD.sha256.encode(), 5)
        assert c.exists(KEY) == 0
    cache.set_many({KEY: b'{"prediction": 0}'}, OLD)
    assert cache.get_many([KEY], OLD) == [b'{"prediction": 0}']


def test_a_sync_overtaken_by_another_never_records_its_artifact(
    redis_server: RedisServer, worker_cache: Callable[[], RedisCache],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Two hosts on different artifacts sync at once: the one that started dropping last
    owns the keys, and the other's answers are never served to it, nor its to the other."""
    first, second = worker_cache(), worker_cache()
    unlink = first._unlink_version

    def overtaken(model: str, version: str) -> int:
        dropped = unlink(model, version)
        second.sync_versions({("m", "1"): NEW.sha256})  # starts and ends meanwhile
        second.set_many({KEY: b'{"prediction": 2}'}, NEW)
        return dropped

    monkeypatch.setattr(first, "_unlink_version", overtaken)
    first.sync_versions({("m", "1"): OLD.sha256})
    with redis_server.client() as c:
        assert c.get(record_key("m", "1")) == NEW.sha256.encode()
    assert first.get_many([KEY], OLD) == [None]
    first.set_many({KEY: b'{"prediction": 0}'}, OLD)
    assert second.get_many([KEY], NEW) == [b'{"prediction": 2}']
