"""Keeps a worker's registry in step with the repository: a periodic scan, plus a shared
reload signal (a file in RUNTIME_DIR) so an admin reload in one worker reaches every worker
of the server within a fraction of a second."""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

from server.model.registry import ModelRegistry, ReloadReport

log = logging.getLogger(__name__)

SIGNAL_TICK = 0.2


class Reloader:
    def __init__(
        self,
        registry: ModelRegistry,
        poll_seconds: float,
        runtime_dir: str,
        on_reload: Callable[[ReloadReport], None] | None = None,
    ) -> None:
        self.registry = registry
        self.poll_seconds = poll_seconds
        self.signal = Path(runtime_dir) / "reload-signal" if runtime_dir else None
        self.acks = Path(runtime_dir) if runtime_dir else None
        self.on_reload = on_reload
        # Taken before this worker's first scan: a signal written while it was starting is
        # then newer than what it has seen, and it reloads once more instead of missing it.
        self._seen = self._signal_stamp()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def reload(self, stamp: int | None = None) -> ReloadReport:
        report = self.registry.reload()
        if self.on_reload is not None:
            self.on_reload(report)
        self._acknowledge(stamp if stamp is not None else self._seen)
        return report

    def acknowledge_start(self) -> None:
        self._acknowledge(self._seen)

    def _acknowledge(self, stamp: int | None) -> None:
        """Record which reload signal this worker has acted on (``ack-<pid>``)."""
        if self.acks is None:
            return
        try:
            (self.acks / f"ack-{os.getpid()}").write_text(str(stamp or 0))
        except OSError as exc:
            log.warning("reload ack not written", extra={"err": str(exc)})

    def reload_everywhere(self, wait: float = 0.0) -> ReloadReport:
        """Reload here, tell the sibling workers, and wait up to ``wait`` seconds until every
        live worker has reloaded too (so what this reload found is servable everywhere)."""
        report = self.registry.reload()
        if self.on_reload is not None:
            self.on_reload(report)
        if self.signal is None:
            return report
        try:
            self.signal.write_text(str(time.time_ns()))
            self._seen = self._signal_stamp()
        except OSError as exc:
            log.warning("reload signal not written", extra={"err": str(exc)})
            return report
        self._acknowledge(self._seen)
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline and self._behind():
            time.sleep(SIGNAL_TICK / 2)
        return report

    def _behind(self) -> list[int]:
        """Live workers whose last acknowledged signal is older than the current one."""
        behind = []
        for ack in self.acks.glob("ack-*") if self.acks else []:
            try:
                pid = int(ack.name[4:])
                os.kill(pid, 0)
                if int(ack.read_text() or 0) < (self._seen or 0):
                    behind.append(pid)
            except (ValueError, OSError):
                continue  # a dead worker's file, or one being rewritten
        return behind

    def _signal_stamp(self) -> int | None:
        if self.signal is None:
            return None
        try:
            return os.stat(self.signal).st_mtime_ns
        except OSError:
            return None

    def start(self) -> None:
        if self._thread is None and (self.poll_seconds > 0 or self.signal is not None):
            # Under gunicorn's gevent worker threading is monkey-patched: this is a greenlet.
            self._thread = threading.Thread(target=self._run, name="model-reloader", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        next_poll = time.monotonic() + self.poll_seconds
        while not self._stop.wait(SIGNAL_TICK):
            try:
                stamp = self._signal_stamp()
                due = self.poll_seconds > 0 and time.monotonic() >= next_poll
                if stamp != self._seen or due:
                    self._seen = stamp
                    next_poll = time.monotonic() + self.poll_seconds
                    self.reload(stamp)
            except Exception:  # noqa: BLE001 - the poller must outlive any one bad scan
                log.exception("model poll failed")
