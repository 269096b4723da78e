"""Server-sent events: framing, heartbeats and the end marker. Generators only.

Every event is ``data: <json>\\n\\n`` (``event: <name>`` first for named events), a ``: ping``
comment goes out while the source is idle, an error mid-stream is ``event: error``, and
``data: [DONE]`` is always last. Under gunicorn's gevent worker each yielded string is
written to the socket at once; a client that went away surfaces as GeneratorExit at the
next write, which closes the source generator too.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Iterable, Iterator
from typing import Any

import orjson

DONE = "data: [DONE]\n\n"
PING = ": ping\n\n"
_END = object()


def event(data: Any, name: str | None = None) -> str:
    body = "data: " + orjson.dumps(data).decode() + "\n\n"
    return f"event: {name}\n{body}" if name else body


def error_event(message: str, **extra: Any) -> str:
    return event({"error": message, **extra}, "error")


def finish(source: Iterable[str]) -> Iterator[str]:
    """Yield ``source``, turn an exception into an ``event: error``, and always end in DONE."""
    try:
        yield from source
    except GeneratorExit:
        raise
    except Exception as exc:  # noqa: BLE001 - reported to the client, then the stream ends
        code = getattr(exc, "code", "stream_error")
        message = getattr(exc, "message", None) or f"{type(exc).__name__}: {exc}"
        yield error_event(message, code=code)
    yield DONE


def with_heartbeat(source: Iterable[str], interval: float) -> Iterator[str]:
    """Yield ``source``'s items, and a ``: ping`` whenever it stays silent ``interval`` s.

    The source runs in its own thread (a greenlet under gevent), so a slow producer such as
    a training epoch does not stop the pings. Closing this generator stops the source at its
    next item.
    """
    items: queue.Queue[Any] = queue.Queue(maxsize=64)
    stop = threading.Event()

    def put(item: Any) -> bool:
        while not stop.is_set():
            try:
                items.put(item, timeout=0.5)
                return True
            except queue.Full:
                continue
        return False

    def pump() -> None:
        it = iter(source)
        try:
            for item in it:
                if not put(item):
                    break
        except Exception as exc:  # noqa: BLE001 - handed to the consumer to report
            put(exc)
        finally:
            close = getattr(it, "close", None)
            if close is not None:
                close()
            put(_END)

    worker = threading.Thread(target=pump, daemon=True, name="sse-source")
    worker.start()
    try:
        while True:
            try:
                item = items.get(timeout=interval)
            except queue.Empty:
                yield PING
                continue
            if item is _END:
                return
            if isinstance(item, Exception):
                raise item
            yield item
    finally:
        stop.set()


SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def prediction_events(predict: Any, X: Any, chunk: int, on_rows: Any) -> Iterator[str]:
    """One event per row and a ``progress`` event per chunk of ``chunk`` rows.

    ``predict(X_part)`` returns the per-row results. A chunk's events go out in one write;
    between chunks the worker yields to its other connections (``time.sleep(0)`` is
    gevent's cooperative yield under the gevent worker).
    """
    total = len(X)
    done = 0
    for start in range(0, total, chunk):
        results = predict(X[start : start + chunk])
        parts = [event({"index": start + i, **r}) for i, r in enumerate(results)]
        done += len(results)
        parts.append(event({"done": done, "total": total}, "progress"))
        on_rows(len(results))
        yield "".join(parts)
        time.sleep(0)
