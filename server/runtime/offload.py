"""Blocking calls (database drivers) off the event loop: under gevent they run in the hub's
threadpool, native threads, while the worker's greenlets go on; elsewhere they just run."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")


def patched() -> bool:
    try:
        from gevent import monkey
    except ImportError:  # pragma: no cover - gevent is a dependency
        return False
    return bool(monkey.is_module_patched("socket"))


def offload(fn: Callable[..., T], *args: Any) -> T:
    """``fn(*args)`` in a native thread of gevent's threadpool when the worker runs under
    gevent (the calling greenlet waits, the others run), else in the calling thread."""
    if patched():
        import gevent

        return gevent.get_hub().threadpool.apply(fn, args)  # type: ignore[no-any-return]
    return fn(*args)


class Background:
    """``fn()`` running in a native thread (gevent's threadpool under gevent, so the worker's
    greenlets go on; a plain thread elsewhere). ``wait`` blocks only the calling greenlet
    or thread; ``result`` gives what ``fn`` returned or raises what it raised."""

    def __init__(self, fn: Callable[[], Any]) -> None:
        self._value: Any = None
        self._error: BaseException | None = None
        if patched():
            import gevent

            self._async: Any = gevent.get_hub().threadpool.spawn(fn)
            self._done: Any = None
        else:
            import threading

            self._async = None
            self._done = threading.Event()

            def run() -> None:
                try:
                    self._value = fn()
                except BaseException as exc:  # noqa: BLE001 - handed to whoever waits
                    self._error = exc
                finally:
                    self._done.set()

            threading.Thread(target=run, daemon=True, name="background").start()

    def wait(self, timeout: float) -> bool:
        """True once ``fn`` has finished (within ``timeout`` seconds)."""
        if self._async is not None:
            self._async.wait(timeout)
            return bool(self._async.ready())
        return bool(self._done.wait(timeout))

    def result(self) -> Any:
        if self._async is not None:
            return self._async.get(block=False)
        if self._error is not None:
            raise self._error
        return self._value
