"""Prometheus on the hot path: remembered metric children, increments written at flush."""

from __future__ import annotations

from server.runtime import prometheus as metrics


def test_metric_children_are_remembered_and_count_as_labels_do() -> None:
    first = metrics.child(metrics.REQUESTS, "/x", "GET", "200")
    assert metrics.child(metrics.REQUESTS, "/x", "GET", "200") is first
    before = first._value.get()
    metrics.child(metrics.REQUESTS, "/x", "GET", "200").inc()
    assert metrics.REQUESTS.labels("/x", "GET", "200")._value.get() == before + 1


def test_metric_increments_are_written_at_flush_and_read_with_what_is_pending() -> None:
    class Written:  # stands in for prometheus-client's mmap-backed value
        def __init__(self) -> None:
            self.value = 0.0
            self.writes = 0

        def inc(self, amount: float) -> None:
            self.value += amount
            self.writes += 1

        def set(self, value: float, timestamp: float | None = None) -> None:
            self.value = value

        def get(self) -> float:
            return self.value

    deferred = metrics._deferred_value_class(Written)()
    for _ in range(5):
        deferred.inc(1.0)
    deferred.inc(-1.0)
    assert deferred.writes == 0 and deferred.get() == 4.0
    metrics.flush()
    assert deferred.writes == 1 and deferred.value == 4.0 and deferred.get() == 4.0
    metrics.flush()
    assert deferred.writes == 1  # nothing pending, nothing written
