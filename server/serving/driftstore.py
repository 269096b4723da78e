"""Where drift counts are kept and shared: each worker's minutes in memory, and files in
RUNTIME_DIR between the workers of one server (Redis, between instances, is
``server.serving.driftredis``).

Counts are ``Cells`` vectors (``server.model.profile``) per version, profile and minute (the
Unix minute, ``int(time) // 60``, the same on every host). A window of W minutes is the
current minute and the W - 1 before it.

- ``MinuteCounts``: one version's minutes in one worker, with the sum of its closed minutes
  kept as they come and go, so a window's sum is that sum, less the minutes that have just
  left it, plus the open minute: a few vector additions whatever the window.
- ``WorkerFiles``: each worker writes ``drift-<pid>.json`` at most once a second, replaced
  whole: per version the closed minutes' sum, the oldest few of them one by one
  (``EDGE_MINUTES``, for a reader whose clock has already passed the next minute), the open
  minute and the totals since the worker started. A few vectors per version, whatever the
  window. A reader adds up the files of this server's other workers (the gunicorn master's
  id is in each: those of an earlier run are ignored and removed, as are those of workers
  no longer alive, whose counts leave with them).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import orjson

from server.model.profile import Profile

# A worker's file holds its oldest closed minutes one by one, so that a reader this many
# minutes ahead of the file's last write can still take them out of the window's sum.
EDGE_MINUTES = 2
BLOCK = 60  # minutes per block of a version's per-minute counts in its worker
INT32_MAX = np.iinfo(np.int32).max


def version_key(model: str, version: str) -> str:
    return f"{model}/{version}"


def server_id() -> str:
    """The gunicorn master (this worker's parent) and when it started: one id per server
    run, also where every run's master has the same pid (PID 1 in a container)."""
    ppid = os.getppid()
    try:
        with open(f"/proc/{ppid}/stat") as fh:
            started = fh.read().rsplit(")", 1)[1].split()[19]  # field 22, starttime
    except (OSError, IndexError):
        started = ""
    return f"{ppid}:{started}"


def worker_alive(pid: int) -> bool:
    """True while ``pid`` is a live process; under /proc, also a child of this worker's
    master (a pid reused by another process is not a worker of ours)."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            state, ppid = fh.read().rsplit(")", 1)[1].split()[:2]
        return state != "Z" and int(ppid) == os.getppid()
    except FileNotFoundError:
        if os.path.isdir("/proc/self"):
            return False
    except (OSError, ValueError):
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def write_atomically(path: Path, data: bytes) -> None:
    """``data`` into ``path`` through a temporary file and a rename: a reader sees the old
    file or the new one, never half of one."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    except OSError:
        tmp.unlink(missing_ok=True)
        raise


class Rows(Protocol):
    """One worker's counts of one version: the sum of its closed minutes (those before
    ``upto``) and, through ``rows``, single minutes."""

    @property
    def closed(self) -> np.ndarray: ...

    @property
    def upto(self) -> int: ...

    def rows(self, start: int | None, stop: int) -> np.ndarray | None:
        """The sum of the minutes from ``start`` (the oldest kept when None) to ``stop``
        (excluded); None when some of them are not at hand."""


def window_sum(counts: Rows, lo: int, hi: int) -> np.ndarray | None:
    """The counts of the minutes ``lo`` to ``hi``: the closed minutes' sum, less those that
    have left the window, plus the open ones in it. None when the minutes to take out are
    not all at hand (a file whose writer is well behind the reader's clock)."""
    gone = counts.rows(None, min(lo, counts.upto))
    recent = counts.rows(max(lo, counts.upto), hi + 1)
    if gone is None or recent is None:
        return None
    return counts.closed - gone + recent


class MinuteCounts:
    """One version's counts in this worker, against one profile: each minute of the window
    (a row of an hour's block: int32, or int64 should a count not fit), the sum of the closed
    minutes (those before ``upto``, the minute of the last flush) and the total since the
    worker started. ``closed`` and ``total`` are replaced, never changed in place; rows
    change in a flush only."""

    def __init__(self, profile: Profile, minute: int, window_minutes: int) -> None:
        self.profile = profile
        self.window_minutes = window_minutes
        self.blocks: dict[int, np.ndarray] = {}  # minute // BLOCK -> (BLOCK, cells) counts
        self.upto = minute
        self.oldest = minute - window_minutes + 1  # the minutes before it have left
        self.closed = np.zeros(profile.cells.size, dtype=np.int64)
        self.total = self.closed

    def add(self, minute: int, vec: np.ndarray) -> None:
        self.total = self.total + vec
        if minute < self.oldest:
            return
        index, row = divmod(minute, BLOCK)
        block = self.blocks.get(index)
        if block is None:
            block = self.blocks[index] = np.zeros((BLOCK, len(vec)), dtype=np.int32)
        found = block[row] + vec  # int64
        if block.dtype != np.int64 and found.max() > INT32_MAX:
            block = self.blocks[index] = block.astype(np.int64)
        block[row] = found
        if minute < self.upto:
            self.closed = self.closed + vec

    def rows(self, start: int | None, stop: int) -> np.ndarray:
        start = self.oldest if start is None else max(start, self.oldest)
        out = np.zeros(len(self.closed), dtype=np.int64)
        if start >= stop:
            return out
        first, last = start // BLOCK, (stop - 1) // BLOCK
        for index, block in self.blocks.items():
            if first <= index <= last:
                base = index * BLOCK
                out += block[max(start - base, 0):min(stop - base, BLOCK)].sum(axis=0,
                                                                             dtype=np.int64)
        return out

    def close(self, minute_now: int) -> None:
        """The minutes before ``minute_now`` are closed; those out of the window leave."""
        if minute_now > self.upto:
            self.closed = self.closed + self.rows(self.upto, minute_now)
        elif minute_now < self.upto:  # the clock stepped back
            self.closed = self.closed - self.rows(minute_now, self.upto)
        self.upto = minute_now
        oldest = minute_now - self.window_minutes + 1
        if oldest > self.oldest:
            self.closed = self.closed - self.rows(self.oldest, oldest)
            self.oldest = oldest
            for index in [i for i in self.blocks if (i + 1) * BLOCK <= oldest]:
                del self.blocks[index]

    def window(self, lo: int, hi: int) -> np.ndarray:
        found = window_sum(self, lo, hi)
        assert found is not None  # every minute is at hand
        return found

    def _minutes(self, start: int, stop: int) -> dict[str, np.ndarray]:
        out = {}
        for minute in range(max(start, self.oldest), stop):
            block = self.blocks.get(minute // BLOCK)
            if block is not None and block[minute % BLOCK].any():
                out[str(minute)] = block[minute % BLOCK].astype(np.int64)
        return out

    def shared(self) -> dict[str, Any]:
        """What the worker's file says of this version (see ``WorkerFiles``)."""
        edge_until = self.oldest + EDGE_MINUTES
        return {"fp": self.profile.fingerprint, "upto": self.upto, "closed": self.closed,
                "edge": self._minutes(self.oldest, min(edge_until, self.upto)),
                "edge_until": edge_until, "open": self._minutes(self.upto, self.upto + 1),
                "total": self.total}


@dataclass(frozen=True)
class _Shared:
    """One version in another worker's file, as numpy (``Rows``)."""

    fp: str
    upto: int
    closed: np.ndarray
    edge: dict[int, np.ndarray]  # the oldest closed minutes, before edge_until
    edge_until: int
    recent: dict[int, np.ndarray]  # the open minute
    total: np.ndarray

    def rows(self, start: int | None, stop: int) -> np.ndarray | None:
        start = self.edge_until - EDGE_MINUTES if start is None else start
        if start < stop and max(start, self.edge_until) < min(stop, self.upto):
            return None  # closed minutes the file holds in its sum only
        out = np.zeros(len(self.closed), dtype=np.int64)
        for minutes in (self.edge, self.recent):
            for minute, vec in minutes.items():
                if start <= minute < stop:
                    out += vec
        return out


def _vector(raw: Any) -> np.ndarray:
    vec = np.asarray(raw, dtype=np.int64)
    if vec.ndim != 1:
        raise ValueError("a vector expected")
    return vec


def _minutes(raw: Any) -> dict[int, np.ndarray]:
    return {int(m): _vector(v) for m, v in (raw or {}).items()}


def _parse_versions(doc: dict[str, Any]) -> dict[str, _Shared]:
    """A worker file's versions, those that read as counts (a damaged entry is skipped)."""
    out = {}
    for key, entry in (doc.get("versions") or {}).items():
        try:
            found = _Shared(str(entry["fp"]), int(entry["upto"]), _vector(entry["closed"]),
                            _minutes(entry.get("edge")), int(entry["edge_until"]),
                            _minutes(entry.get("open")), _vector(entry["total"]))
        except (KeyError, TypeError, ValueError, AttributeError):
            continue
        vectors = [found.closed, found.total, *found.edge.values(), *found.recent.values()]
        if len({v.shape for v in vectors}) == 1:
            out[key] = found
    return out


# --- between the workers of one server ----------------------------------------------------
class WorkerFiles:
    def __init__(self, runtime_dir: Path, pid: int | None = None,
                 alive: Callable[[int], bool] = worker_alive) -> None:
        self.dir = Path(runtime_dir)
        self.pid = pid or os.getpid()  # tests give two monitors of one process their own
        self.alive = alive
        self.server = server_id()
        self.path = self.dir / f"drift-{self.pid}.json"
        # Other workers' files as read: path -> (mtime and size, server id, versions)
        self._parsed: dict[Path, tuple[tuple[int, int], Any, dict[str, _Shared]]] = {}

    @staticmethod
    def _pid_of(path: Path) -> int | None:
        """The worker of a ``drift-<pid>.json`` file (None for any other name)."""
        middle = path.name[len("drift-"):-len(".json")]
        return int(middle) if middle.isdigit() else None

    def remove_stale(self) -> None:
        """Delete the files an earlier run of the server left in a reused RUNTIME_DIR, those
        of this run's workers that are gone, and those of the earlier layout
        (``drift-<pid>.closed.json``)."""
        for path in self.dir.glob("drift-*.json"):
            if not path.name[len("drift-"):].split(".")[0].isdigit():
                continue  # not a worker's
            try:
                doc = orjson.loads(path.read_bytes())
            except (OSError, orjson.JSONDecodeError):
                continue
            pid = self._pid_of(path)
            if pid is None or not isinstance(doc, dict) or doc.get("server") != self.server \
                    or (pid != self.pid and not self.alive(pid)):
                path.unlink(missing_ok=True)

    def write(self, versions: dict[str, dict[str, Any]]) -> None:
        """This worker's file (``MinuteCounts.shared`` per version), replaced whole."""
        write_atomically(self.path, orjson.dumps(
            {"pid": self.pid, "server": self.server, "ts": time.time(), "versions": versions},
            option=orjson.OPT_SERIALIZE_NUMPY))

    def _read(self, path: Path) -> tuple[Any, dict[str, _Shared]] | None:
        """A file's server id and versions, parsed again only when it changed."""
        try:
            st = path.stat()
            stamp = (st.st_mtime_ns, st.st_size)
            known = self._parsed.get(path)
            if known is not None and known[0] == stamp:
                return known[1], known[2]
            doc = orjson.loads(path.read_bytes())
        except (OSError, orjson.JSONDecodeError):
            return None
        if not isinstance(doc, dict):
            return None
        versions = _parse_versions(doc)
        self._parsed[path] = (stamp, doc.get("server"), versions)
        return doc.get("server"), versions

    def others(self, key: str, fp: str, size: int, minutes: range
               ) -> tuple[np.ndarray, np.ndarray]:
        """The window (``minutes``) and since-start totals of one version in the files of
        this server's other live workers; the files of dead ones are removed."""
        window = np.zeros(size, dtype=np.int64)
        total = np.zeros(size, dtype=np.int64)
        present = set()
        for path in self.dir.glob("drift-*.json"):
            pid = self._pid_of(path)
            if pid is None or pid == self.pid:
                continue
            if not self.alive(pid):
                path.unlink(missing_ok=True)
                continue
            present.add(path)
            found = self._read(path)
            if found is None or found[0] != self.server:
                continue
            entry = found[1].get(key)
            if entry is None or entry.fp != fp or entry.total.shape != (size,):
                continue
            total += entry.total
            part = window_sum(entry, minutes.start, minutes.stop - 1)
            if part is not None:
                window += part
        self._parsed = {p: v for p, v in self._parsed.items() if p in present}
        return window, total
