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

from server.registry import ModelRegistry, ReloadReport

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
        self.on_reload = on_reload
        self._seen = self._signal_stamp()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def reload(self) -> ReloadReport:
        report = self.registry.reload()
        if self.on_reload is not None:
            self.on_reload(report)
        return report

    def reload_everywhere(self) -> ReloadReport:
        """Reload here, then tell the sibling workers to reload too."""
        report = self.reload()
        if self.signal is not None:
            try:
                self.signal.write_text(str(time.time_ns()))
                self._seen = self._signal_stamp()
            except OSError as exc:
                log.warning("reload signal not written", extra={"err": str(exc)})
        return report

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
                    self.reload()
            except Exception:  # noqa: BLE001 - the poller must outlive any one bad scan
                log.exception("model poll failed")
