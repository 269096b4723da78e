"""The access line written without a LogRecord, as the JSON formatter would write it."""

from __future__ import annotations

import io
import logging
import re
from collections.abc import Iterator

import orjson
import pytest

from server.runtime.logs import AccessLog, JsonFormatter


@pytest.fixture
def json_root() -> Iterator[io.StringIO]:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO)
    yield stream
    root.handlers[:] = handlers
    root.setLevel(level)


def test_access_line_is_what_the_json_formatter_writes(json_root: io.StringIO) -> None:
    fields = {"request_id": "r1", "status": 200, "latency_ms": 1.5, "model": None}
    AccessLog().write(fields)
    logging.getLogger("server.access").info("request", extra=fields)
    fast, slow = (orjson.loads(line) for line in json_root.getvalue().splitlines())
    assert set(fast) == set(slow)
    assert {k: v for k, v in fast.items() if k != "ts"} == {k: v for k, v in slow.items()
                                                          if k != "ts"}
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", fast["ts"])


def test_access_line_follows_the_log_level(json_root: io.StringIO) -> None:
    logging.getLogger().setLevel(logging.WARNING)
    log = AccessLog()
    assert not log.enabled()
    logging.getLogger().setLevel(logging.INFO)
    assert log.enabled()


def test_access_line_takes_loggings_own_path_when_the_logger_is_configured(
        json_root: io.StringIO) -> None:
    seen: list[str] = []

    class Keep(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            seen.append(record.getMessage())
            return False  # routed elsewhere: nothing reaches the root's stream

    access = logging.getLogger("server.access")
    access.addFilter(keep := Keep())
    try:
        AccessLog().write({"request_id": "r2"})
    finally:
        access.removeFilter(keep)
    assert seen == ["request"] and json_root.getvalue() == ""


def test_under_gevent_one_turn_of_the_loop_writes_its_lines_at_once(
        json_root: io.StringIO, monkeypatch: pytest.MonkeyPatch) -> None:
    import gevent

    writes: list[str] = []

    def write(text: str) -> int:
        writes.append(text)
        return len(text)

    monkeypatch.setattr(json_root, "write", write)
    log = AccessLog()
    log._loop = gevent.get_hub().loop  # as in a gevent worker (threading patched)
    # pytest's own capture handler sits on the root logger during a test: route around it.
    [handler] = [h for h in logging.getLogger().handlers
                 if isinstance(h, logging.StreamHandler) and h.stream is json_root]
    monkeypatch.setattr(log, "_plain_route", lambda: handler)
    for n in range(3):
        log.write({"request_id": f"r{n}"})
    assert writes == []  # not yet: at the start of the next turn of the loop
    gevent.sleep(0)
    assert len(writes) == 1
    assert [orjson.loads(line)["request_id"] for line in writes[0].splitlines()] == \
        ["r0", "r1", "r2"]
    log.write({"request_id": "r3"})
    gevent.sleep(0)
    assert len(writes) == 2 and orjson.loads(writes[1])["request_id"] == "r3"
