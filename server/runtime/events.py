"""Server events shared by every worker of one server: an append-only JSON-lines file in
RUNTIME_DIR that each worker appends to and each ``/stream/events`` subscriber tails.

Events (``type``): ``version_added``, ``version_changed``, ``version_removed`` and
``model_failed`` after a reload, ``experiments_reloaded``, ``training_complete``; the
per-second ``metrics`` summary is added by the subscriber from worker snapshots.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson

log = logging.getLogger(__name__)

MAX_LOG_BYTES = 8 << 20  # the file is truncated past this; subscribers start over from 0


class EventLog:
    def __init__(self, runtime_dir: str) -> None:
        base = Path(runtime_dir) if runtime_dir else Path(tempfile.mkdtemp(prefix="model-server-"))
        base.mkdir(parents=True, exist_ok=True)
        self.dir = base
        self.path = base / "events.jsonl"

    def publish(self, kind: str, data: dict[str, Any] | None = None) -> None:
        """Append one event; O_APPEND keeps lines from different workers whole."""
        line = orjson.dumps({"type": kind, "ts": time.time(), "pid": os.getpid(),
                             **(data or {})}, default=str) + b"\n"
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            try:
                if os.fstat(fd).st_size > MAX_LOG_BYTES:
                    os.ftruncate(fd, 0)
                os.write(fd, line)
            finally:
                os.close(fd)
        except OSError as exc:
            log.warning("event not written", extra={"err": str(exc), "type": kind})

    def end(self) -> int:
        try:
            return self.path.stat().st_size
        except OSError:
            return 0

    def read_from(self, offset: int) -> tuple[list[dict[str, Any]], int]:
        """Whole events appended since ``offset`` and the offset after them."""
        size = self.end()
        if size < offset:
            offset = 0  # truncated
        if size == offset:
            return [], offset
        with self.path.open("rb") as fh:
            fh.seek(offset)
            chunk = fh.read(size - offset)
        complete = chunk.rfind(b"\n") + 1
        events = []
        for line in chunk[:complete].splitlines():
            try:
                events.append(orjson.loads(line))
            except orjson.JSONDecodeError:
                continue
        return events, offset + complete

    def follow(self, poll: float = 0.2) -> Iterator[list[dict[str, Any]]]:
        """Yields the new events every ``poll`` seconds (an empty list when none)."""
        offset = self.end()
        while True:
            events, offset = self.read_from(offset)
            yield events
            time.sleep(poll)
