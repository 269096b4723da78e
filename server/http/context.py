"""Per-worker state reached from a view (``state()``), JSON and SSE responses, request ids."""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import orjson
from flask import Flask, Response, current_app, g

from server.config import Settings
from server.errors import ApiError
from server.model.registry import ModelRegistry
from server.protocols import sse
from server.runtime.events import EventLog
from server.runtime.figures import WorkerFigures
from server.serving.dataplane import DataPlane
from server.serving.frontdoor import FrontDoor
from server.serving.reloader import Reloader


class ServerApp(Flask):
    """Flask, asking once per function (not on every request) whether it is a coroutine."""

    _sync_cache: dict[Any, Any]

    def ensure_sync(self, func: Any) -> Any:
        cache = self.__dict__.setdefault("_sync_cache", {})
        found = cache.get(func)
        if found is None:
            found = cache[func] = super().ensure_sync(func)
        return found


@dataclass
class ServerState:
    """Everything one worker serves with; lives in ``app.extensions``."""

    settings: Settings
    registry: ModelRegistry
    dataplane: DataPlane
    reloader: Reloader
    events: EventLog
    figures: WorkerFigures
    front: FrontDoor
    started: float

    def stream_slot(self) -> None:
        """Refuse a new stream while draining, or when this worker already holds MAX_STREAMS
        of them."""
        self.front.refuse_when_draining()
        s = self.figures.streams
        active = s["started"] - s["completed"] - s["cancelled"]
        if active >= self.settings.max_streams:
            raise ApiError(503, "too_many_streams",
                           f"this worker holds {active} streams (MAX_STREAMS); retry shortly",
                           headers={"Retry-After": "1"})


def state() -> ServerState:
    return current_app.extensions["model_server"]  # type: ignore[no-any-return]


def json_response(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(orjson.dumps(body), status=status, headers=headers,
                    content_type="application/json")


def adopt_request_id(sent: str | None) -> None:
    """A body's own ``request_id`` (validated) becomes the request's id: in the answer, the
    X-Request-ID header and the access line."""
    if sent:
        g.request_id = sent


def request_id() -> str:
    return g.get("request_id", "")


_ids: list[Any] = []


def _new_id_source() -> None:
    _ids[:] = [os.urandom(8).hex(), itertools.count()]


_new_id_source()
os.register_at_fork(after_in_child=_new_id_source)  # each worker draws its own prefix


def new_request_id() -> str:
    """32 hex characters, unique without a syscall per request: 16 random ones drawn once
    per process and a 64-bit counter."""
    prefix, counter = _ids
    return f"{prefix}{next(counter) & 0xFFFFFFFFFFFFFFFF:016x}"


def counted(source: Iterator[str]) -> Iterator[str]:
    """Count a stream in this worker's figures once its body starts, then completed or
    cancelled (a client that went away closes the generator at its next write). A body that
    never starts (HEAD, or a client gone before the first write) never holds a slot."""
    figures = state().figures

    def run() -> Iterator[str]:
        figures.stream("started")
        completed = False
        try:
            yield from source
            completed = True
        finally:
            figures.stream("completed" if completed else "cancelled")

    return run()


def sse_response(source: Iterator[str]) -> Response:
    return Response(counted(sse.finish(source)), mimetype="text/event-stream",
                    headers=sse.SSE_HEADERS)


