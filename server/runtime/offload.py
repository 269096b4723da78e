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
