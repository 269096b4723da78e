"""Scoring jobs' state in Redis, shared by every web worker, host and queue worker.

One hash per job (``job:<id>``) holds everything ``GET /jobs/<id>`` shows; nothing about a
job lives in a server process, so restarting the HTTP server loses none. Around it:

- ``jobs:owner:<owner>``: the owner's jobs by creation time (``GET /jobs``), pruned as
  their hashes expire;
- ``jobs:active:<owner>``: the owner's queued and running jobs (``JOB_MAX_ACTIVE_PER_KEY``);
- ``jobs:running``: running jobs, watched for a worker that died (``orphans``);
- ``job:<id>:lease``: the token of the one queue worker scoring the job, refreshed while it
  runs; it lapses ``lease_seconds`` (JOB_LEASE_SECONDS) after that worker dies.

Every change of state is one Lua script, so a cancel and a worker finishing can never both
win. A finished job's hash expires JOB_RESULT_TTL seconds after it finished.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import redis

STATES = ("queued", "running", "succeeded", "failed", "cancelled")
ACTIVE = frozenset({"queued", "running"})
LEASE_SECONDS = 10.0  # JOB_LEASE_SECONDS' default: a dead worker keeps its job this long
LIST_LIMIT = 1000  # most jobs GET /jobs shows, newest first


def job_key(job_id: str) -> str:
    return f"job:{job_id}"


def lease_key(job_id: str) -> str:
    return f"job:{job_id}:lease"


def active_key(owner: str) -> str:
    return f"jobs:active:{owner}"


def owner_key(owner: str) -> str:
    return f"jobs:owner:{owner}"


RUNNING_KEY = "jobs:running"

# Members of the owner's active set that are no longer queued or running (finished, or
# their hash is gone) are dropped first; then the job is created unless the owner is at the
# limit. Returns -1 when created, else how many jobs are active.
_CREATE = """
local n = 0
for _, id in ipairs(redis.call('SMEMBERS', KEYS[2])) do
  local st = redis.call('HGET', 'job:' .. id, 'state')
  if st == 'queued' or st == 'running' then n = n + 1 else redis.call('SREM', KEYS[2], id) end
end
if n >= tonumber(ARGV[1]) then return n end
redis.call('HSET', KEYS[1], unpack(ARGV, 4))
redis.call('SADD', KEYS[2], ARGV[2])
redis.call('ZADD', KEYS[3], ARGV[3], ARGV[2])
return -1
"""

# An active job ends: its state, finish time and fields; out of the active and running sets;
# its lease dropped; its hash expires after the TTL. With a token, only the lease holder may
# end it. Returns 1 when it ended the job, 0 when it was not active (or not the holder's).
_FINISH_BODY = """
local function finish(id, state, now, ttl, extra)
  local key = 'job:' .. id
  local st = redis.call('HGET', key, 'state')
  if st ~= 'queued' and st ~= 'running' then return 0 end
  redis.call('HSET', key, 'state', state, 'finished', now, unpack(extra))
  local owner = redis.call('HGET', key, 'owner')
  redis.call('SREM', 'jobs:active:' .. owner, id)
  redis.call('SREM', 'jobs:running', id)
  redis.call('DEL', key .. ':lease')
  redis.call('EXPIRE', key, ttl)
  return 1
end
"""

_FINISH = _FINISH_BODY + """
if ARGV[5] ~= '' and redis.call('GET', 'job:' .. ARGV[1] .. ':lease') ~= ARGV[5] then
  return 0
end
local extra = {}
for i = 6, #ARGV do extra[#extra + 1] = ARGV[i] end
return finish(ARGV[1], ARGV[2], ARGV[3], ARGV[4], extra)
"""

# DELETE /jobs/<id>: a queued job is cancelled at once; a running one is flagged, and its
# worker stops before its next chunk. Returns the state the job is in afterwards.
_CANCEL = _FINISH_BODY + """
local key = 'job:' .. ARGV[1]
local st = redis.call('HGET', key, 'state')
if not st then return false end
if st == 'queued' then
  finish(ARGV[1], 'cancelled', ARGV[2], ARGV[3], {'cancel', '1', 'eta_seconds', ''})
  return 'cancelled'
end
if st == 'running' then redis.call('HSET', key, 'cancel', '1') end
return st
"""

# A worker holding the lease starts (or resumes) the job: 'running', unless it was cancelled
# meanwhile (then it ends as cancelled). Returns the state, or 'lost' without the lease.
_START = _FINISH_BODY + """
local key = 'job:' .. ARGV[1]
if redis.call('GET', key .. ':lease') ~= ARGV[2] then return 'lost' end
local st = redis.call('HGET', key, 'state')
if st ~= 'queued' and st ~= 'running' then return st or 'gone' end
if redis.call('HGET', key, 'cancel') == '1' then
  finish(ARGV[1], 'cancelled', ARGV[3], ARGV[4], {})
  return 'cancelled'
end
redis.call('HSET', key, 'state', 'running', 'worker', ARGV[5])
redis.call('HSETNX', key, 'started', ARGV[3])
redis.call('HINCRBY', key, 'attempts', 1)
redis.call('SADD', 'jobs:running', ARGV[1])
return 'running'
"""

# Progress from the lease holder: the fields, and whether a cancel was asked for (1), or -1
# when the lease is no longer this worker's.
_PROGRESS = """
if redis.call('GET', KEYS[2]) ~= ARGV[1] then return -1 end
redis.call('HSET', KEYS[1], unpack(ARGV, 2))
if redis.call('HGET', KEYS[1], 'cancel') == '1' then return 1 end
return 0
"""

_REFRESH = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""

_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


def iso(ts: float | None) -> str | None:
    return None if ts is None else datetime.fromtimestamp(ts, UTC).isoformat(
        timespec="milliseconds").replace("+00:00", "Z")


def _float(raw: str | None) -> float | None:
    return float(raw) if raw not in (None, "") else None


def _int(raw: str | None) -> int | None:
    return int(raw) if raw not in (None, "") else None


@dataclass(frozen=True)
class JobRecord:
    """One job as its hash holds it."""

    id: str
    owner: str
    state: str
    model: str
    version: str
    format: str
    chunk_rows: int
    bytes: int
    created: float
    started: float | None = None
    finished: float | None = None
    rows_done: int = 0
    rows_total: int | None = None
    rejects: int = 0
    rows_per_second: float | None = None
    eta_seconds: float | None = None
    error: str | None = None
    cancel: bool = False
    attempts: int = 0

    @classmethod
    def from_hash(cls, job_id: str, raw: dict[Any, Any]) -> JobRecord:
        h = {(k.decode() if isinstance(k, bytes) else k):
             (v.decode() if isinstance(v, bytes) else v) for k, v in raw.items()}
        return cls(
            id=job_id, owner=h["owner"], state=h["state"], model=h["model"],
            version=h["version"], format=h["format"], chunk_rows=int(h["chunk_rows"]),
            bytes=int(h.get("bytes") or 0), created=float(h["created"]),
            started=_float(h.get("started")), finished=_float(h.get("finished")),
            rows_done=int(h.get("rows_done") or 0), rows_total=_int(h.get("rows_total")),
            rejects=int(h.get("rejects") or 0), rows_per_second=_float(h.get("rows_per_second")),
            eta_seconds=_float(h.get("eta_seconds")), error=h.get("error") or None,
            cancel=h.get("cancel") == "1", attempts=int(h.get("attempts") or 0),
        )

    @property
    def active(self) -> bool:
        return self.state in ACTIVE

    def view(self) -> dict[str, Any]:
        """What ``GET /jobs/<id>`` answers (the owner is never shown)."""
        base = f"/jobs/{self.id}"
        return {
            "job_id": self.id, "state": self.state, "model": self.model,
            "version": self.version, "format": self.format, "rows_done": self.rows_done,
            "rows_total": self.rows_total, "rows_per_second": self.rows_per_second,
            "eta_seconds": self.eta_seconds, "rejects": self.rejects,
            "created": iso(self.created), "started": iso(self.started),
            "finished": iso(self.finished), "error": self.error,
            "cancel_requested": self.cancel, "bytes": self.bytes,
            "chunk_rows": self.chunk_rows, "status_url": base,
            "events_url": f"{base}/events", "result_url": f"{base}/result",
            "rejects_url": f"{base}/rejects",
        }

    def progress(self) -> dict[str, Any]:
        """The figures an SSE progress event carries."""
        return {k: v for k, v in self.view().items()
                if k in ("job_id", "state", "rows_done", "rows_total", "rows_per_second",
                         "eta_seconds", "rejects")}


class JobStore:
    """The job hashes and their indexes; every method is one or two Redis round trips."""

    def __init__(self, client: redis.Redis, result_ttl: int,
                 lease_seconds: float = LEASE_SECONDS) -> None:
        self.client = client
        self.result_ttl = result_ttl
        self.lease_seconds = lease_seconds
        self._create = client.register_script(_CREATE)
        self._finish = client.register_script(_FINISH)
        self._cancel = client.register_script(_CANCEL)
        self._start = client.register_script(_START)
        self._progress = client.register_script(_PROGRESS)
        self._refresh = client.register_script(_REFRESH)
        self._release = client.register_script(_RELEASE)

    # --- the web side ---------------------------------------------------------------------
    def create(self, record: JobRecord, limit: int) -> int | None:
        """Store a new queued job unless its owner already has ``limit`` active ones: None
        when stored, else how many are active."""
        fields: dict[str, Any] = {
            "owner": record.owner, "state": "queued", "model": record.model,
            "version": record.version, "format": record.format,
            "chunk_rows": record.chunk_rows, "bytes": record.bytes, "created": record.created,
            "rows_done": 0, "rejects": 0,
        }
        if record.rows_total is not None:
            fields["rows_total"] = record.rows_total
        flat = [str(x) for kv in fields.items() for x in kv]
        n = int(self._create(keys=[job_key(record.id), active_key(record.owner),
                                   owner_key(record.owner)],
                             args=[limit, record.id, record.created, *flat]))
        return None if n < 0 else n

    def active_count(self, owner: str) -> int:
        """Queued or running jobs of ``owner`` (an early, approximate check: ``create`` is
        the exact one)."""
        ids = [m.decode() for m in self.client.smembers(active_key(owner))]  # type: ignore[union-attr]
        if not ids:
            return 0
        with self.client.pipeline(transaction=False) as pipe:
            for job_id in ids:
                pipe.hget(job_key(job_id), "state")
            states = pipe.execute()
        return sum(1 for s in states if s in (b"queued", b"running"))

    def get(self, job_id: str) -> JobRecord | None:
        raw = self.client.hgetall(job_key(job_id))
        return JobRecord.from_hash(job_id, raw) if raw else None  # type: ignore[arg-type]

    def list_for(self, owner: str, limit: int = LIST_LIMIT) -> list[JobRecord]:
        """The owner's jobs, newest first; ids whose hash expired are pruned."""
        ids = [m.decode() for m in self.client.zrevrange(owner_key(owner), 0, limit - 1)]  # type: ignore[union-attr]
        if not ids:
            return []
        with self.client.pipeline(transaction=False) as pipe:
            for job_id in ids:
                pipe.hgetall(job_key(job_id))
            found = pipe.execute()
        gone = [job_id for job_id, raw in zip(ids, found) if not raw]
        if gone:
            self.client.zrem(owner_key(owner), *gone)
        return [JobRecord.from_hash(job_id, raw) for job_id, raw in zip(ids, found) if raw]

    def cancel(self, job_id: str, now: float | None = None) -> str | None:
        """Cancel: the state afterwards (``cancelled`` for a queued job, ``running`` with
        the flag set, or the finished state it had), None for an unknown job."""
        out = self._cancel(args=[job_id, now or time.time(), self.result_ttl])
        return out.decode() if isinstance(out, bytes) else out  # type: ignore[no-any-return]

    def fail(self, job_id: str, error: str, now: float | None = None) -> bool:
        """End an active job as failed whoever holds it (the web side, when it cannot be
        queued)."""
        return self.finish(job_id, "", "failed", now, error=error)

    # --- the queue worker's side ----------------------------------------------------------
    def acquire(self, job_id: str) -> str | None:
        """Take the job's lease: a token, or None while another worker holds it."""
        token = secrets.token_hex(8)
        ok = self.client.set(lease_key(job_id), token, nx=True,
                              px=int(self.lease_seconds * 1000))
        return token if ok else None

    def refresh(self, job_id: str, token: str) -> bool:
        return bool(self._refresh(keys=[lease_key(job_id)],
                                  args=[token, int(self.lease_seconds * 1000)]))

    def release(self, job_id: str, token: str) -> None:
        self._release(keys=[lease_key(job_id)], args=[token])

    def start(self, job_id: str, token: str, worker: str, now: float | None = None) -> str:
        """'running' when this worker may score the job now; 'lost' without the lease;
        'cancelled' when a cancel came first; the finished state; 'gone' when expired."""
        out = self._start(args=[job_id, token, now or time.time(), self.result_ttl, worker])
        return out.decode() if isinstance(out, bytes) else str(out)

    def progress(self, job_id: str, token: str, **fields: Any) -> int:
        """Write progress fields; 1 when a cancel was asked for, 0 when not, -1 when the
        lease is no longer ``token``'s."""
        flat = [str("" if v is None else v) for kv in fields.items() for v in kv]
        return int(self._progress(keys=[job_key(job_id), lease_key(job_id)],
                                  args=[token, *flat]))

    def finish(self, job_id: str, token: str, state: str, now: float | None = None,
               **fields: Any) -> bool:
        """End the job in ``state`` with ``fields`` (only the lease holder, unless
        ``token`` is empty); False when it was no longer active or not the holder's."""
        assert state in STATES and state not in ACTIVE
        flat = [str("" if v is None else v) for kv in fields.items() for v in kv]
        return bool(self._finish(args=[job_id, state, now or time.time(), self.result_ttl,
                                       token, *flat]))

    def orphans(self) -> list[str]:
        """Running jobs whose worker's lease lapsed: the worker died (or lost Redis)."""
        ids = [m.decode() for m in self.client.smembers(RUNNING_KEY)]  # type: ignore[union-attr]
        if not ids:
            return []
        with self.client.pipeline(transaction=False) as pipe:
            for job_id in ids:
                pipe.exists(lease_key(job_id))
                pipe.hget(job_key(job_id), "state")
            answers = pipe.execute()
        out = []
        for job_id, held, state in zip(ids, answers[::2], answers[1::2]):
            if state != b"running":
                self.client.srem(RUNNING_KEY, job_id)
            elif not held:
                out.append(job_id)
        return out

    def claim_rescue(self, job_id: str) -> bool:
        """Whether this caller is the one to queue an orphan again (one per lease,
        whichever worker's sweep sees it first)."""
        return bool(self.client.set(f"{job_key(job_id)}:rescue", 1, nx=True,
                                    ex=max(int(self.lease_seconds * 2), 1)))

    def known(self, job_ids: Iterable[str]) -> set[str]:
        """Which of these jobs still have a hash."""
        ids = list(job_ids)
        if not ids:
            return set()
        with self.client.pipeline(transaction=False) as pipe:
            for job_id in ids:
                pipe.exists(job_key(job_id))
            return {job_id for job_id, n in zip(ids, pipe.execute()) if n}
