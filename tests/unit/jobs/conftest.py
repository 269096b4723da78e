"""A real redis-server for the job store's scripts, started once per module, emptied for each
test (the scripts are the store's logic: a fake Redis would test the fake)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from server.jobs.store import JobStore
from tests.conftest import RedisServer


@pytest.fixture(scope="module")
def module_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("redis")).start()
    yield server
    server.stop()


@pytest.fixture
def client(module_redis: RedisServer) -> Iterator[redis.Redis]:
    with module_redis.client() as c:
        c.flushdb()
        yield c


@pytest.fixture
def store(client: redis.Redis) -> JobStore:
    return JobStore(client, result_ttl=120)


@pytest.fixture
def jobs_root(tmp_path: Path) -> Path:
    root = tmp_path / "jobs"
    root.mkdir()
    return root
