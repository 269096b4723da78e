"""The job store's state changes: each is one Lua script, so a cancel and a worker finishing
never both win, a dead worker's job is found, and limits count only live jobs."""

from __future__ import annotations

import secrets
import time

import pytest
import redis

from server.jobs.store import JobRecord, JobStore, iso, job_key, lease_key


def new_job(store: JobStore, owner: str = "key:a", limit: int = 10, **kw: object) -> str:
    job_id = secrets.token_hex(16)
    record = JobRecord(job_id, owner, "queued", "iris", "1", "csv", 1000, 123, time.time(),
                       **kw)  # type: ignore[arg-type]
    assert store.create(record, limit) is None
    return job_id


def running(store: JobStore, owner: str = "key:a") -> tuple[str, str]:
    job_id = new_job(store, owner)
    token = store.acquire(job_id)
    assert token is not None
    assert store.start(job_id, token, "w1") == "running"
    return job_id, token


def test_a_new_job_is_queued_and_shown_without_its_owner(store: JobStore) -> None:
    job_id = new_job(store, rows_total=500)
    view = store.get(job_id).view()  # type: ignore[union-attr]
    assert view["state"] == "queued" and view["rows_total"] == 500 and view["rows_done"] == 0
    assert view["started"] is None and view["result_url"] == f"/jobs/{job_id}/result"
    assert "owner" not in view and "key:a" not in str(view)
    assert view["created"].endswith("Z")


def test_the_active_limit_counts_only_live_jobs(store: JobStore) -> None:
    first = new_job(store, limit=2)
    new_job(store, limit=2)
    extra = JobRecord(secrets.token_hex(16), "key:a", "queued", "iris", "1", "csv", 1000, 1,
                      time.time())
    assert store.create(extra, 2) == 2
    assert store.get(extra.id) is None
    assert store.active_count("key:a") == 2 and store.active_count("key:b") == 0
    assert store.cancel(first) == "cancelled"  # a finished job frees its place
    assert store.create(extra, 2) is None
    assert store.active_count("key:a") == 2


def test_an_expired_job_frees_its_place(store: JobStore, client: redis.Redis) -> None:
    job_id = new_job(store, limit=1)
    client.delete(job_key(job_id))  # as if its hash had expired
    assert store.active_count("key:a") == 0
    new_job(store, limit=1)


def test_cancel_ends_a_queued_job_at_once_and_flags_a_running_one(store: JobStore,
                                                                  client: redis.Redis) -> None:
    queued = new_job(store)
    assert store.cancel(queued) == "cancelled"
    record = store.get(queued)
    assert record is not None and record.state == "cancelled" and record.finished
    assert 0 < client.ttl(job_key(queued)) <= 120
    job_id, token = running(store)
    assert store.cancel(job_id) == "running"
    assert store.progress(job_id, token, rows_done=10) == 1  # the worker learns it
    assert store.cancel("f" * 32) is None


def test_a_cancel_before_the_worker_starts_wins(store: JobStore) -> None:
    job_id = new_job(store)
    token = store.acquire(job_id)
    assert token is not None
    store.client.hset(job_key(job_id), "cancel", "1")
    assert store.start(job_id, token, "w1") == "cancelled"
    assert store.get(job_id).state == "cancelled"  # type: ignore[union-attr]


def test_only_the_lease_holder_reports_or_finishes(store: JobStore,
                                                   client: redis.Redis) -> None:
    job_id, token = running(store)
    assert store.acquire(job_id) is None  # held
    assert store.progress(job_id, "other", rows_done=5) == -1
    assert not store.finish(job_id, "other", "succeeded")
    assert store.progress(job_id, token, rows_done=5, eta_seconds=None) == 0
    assert store.get(job_id).rows_done == 5  # type: ignore[union-attr]
    assert store.finish(job_id, token, "succeeded", rows_total=5)
    assert not store.finish(job_id, token, "failed")  # ended once only
    record = store.get(job_id)
    assert record is not None and record.state == "succeeded" and record.rows_total == 5
    assert client.exists(lease_key(job_id)) == 0
    assert store.cancel(job_id) == "succeeded"


def test_a_job_whose_lease_lapsed_is_an_orphan_rescued_once(store: JobStore,
                                                            client: redis.Redis) -> None:
    job_id, token = running(store)
    alive, _ = running(store)
    assert store.orphans() == []
    client.delete(lease_key(job_id))  # its worker died: the lease lapses
    assert store.orphans() == [job_id]
    assert store.claim_rescue(job_id) and not store.claim_rescue(job_id)
    new = store.acquire(job_id)
    assert new is not None and store.start(job_id, new, "w2") == "running"
    assert store.get(job_id).attempts == 2  # type: ignore[union-attr]
    assert store.refresh(alive, "not-it") is False


def test_listing_is_newest_first_and_drops_expired_jobs(store: JobStore,
                                                        client: redis.Redis) -> None:
    ids = [new_job(store) for _ in range(3)]
    new_job(store, owner="key:b")
    client.delete(job_key(ids[1]))
    listed = [r.id for r in store.list_for("key:a")]
    assert listed == [ids[2], ids[0]]
    assert client.zcard("jobs:owner:key:a") == 2
    assert store.known(ids) == {ids[0], ids[2]}


def test_fail_ends_any_active_job(store: JobStore) -> None:
    job_id = new_job(store)
    assert store.fail(job_id, "could not be queued")
    record = store.get(job_id)
    assert record is not None and record.state == "failed"
    assert record.error == "could not be queued"


@pytest.mark.parametrize(("ts", "text"), [(0.0, "1970-01-01T00:00:00.000Z"), (None, None)])
def test_times_are_iso_utc(ts: float | None, text: str | None) -> None:
    assert iso(ts) == text
