"""Drift monitoring in one process: PSI and the chi-square test by hand, statuses, the
per-second sampling budget, minute buckets leaving the window at its exact edge, workers
summed through RUNTIME_DIR (and forgotten once dead), one leader publishing each change
once, answers computed once a second, memory that a week's window keeps small, and Redis
failing open without counting anything twice."""

from __future__ import annotations

import math
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest
import redis
from scipy.stats import chi2
from sklearn import datasets
from sklearn.model_selection import train_test_split

from server.model.loaded import LoadedVersion
from server.model.registry import ModelRegistry
from server.runtime import prometheus
from server.runtime.events import EventLog
from server.serving.dataplane import DataPlane, Outcome
from server.serving.drift import DriftMonitor
from server.serving.driftscores import EPSILON, chi_square_p, psi, status
from server.serving.driftstore import worker_alive
from server.serving.frontdoor import FrontDoor

T0 = 1_800_000_000.0  # a whole minute: minute buckets start here


# --- scores ---------------------------------------------------------------------------------
@pytest.mark.parametrize(("live", "reference", "expected"), [
    ([50, 50], [0.5, 0.5], 0.0),
    ([80, 20], [0.5, 0.5], 0.3 * math.log(0.8 / 0.5) + (-0.3) * math.log(0.2 / 0.5)),
    # an empty live bin counts as EPSILON, not as ln(0)
    ([100, 0], [0.5, 0.5], 0.5 * math.log(1 / 0.5) + (EPSILON - 0.5) * math.log(EPSILON / 0.5)),
    # an empty training bin too (a constant feature's outer bins)
    ([10, 90, 0], [0.0, 1.0, 0.0],
     (0.1 - EPSILON) * math.log(0.1 / EPSILON) + (0.9 - 1.0) * math.log(0.9 / 1.0)),
])
def test_psi_by_hand(live: list[int], reference: list[float], expected: float) -> None:
    assert psi(np.array(live), np.array(reference)) == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize(("value", "expected"), [
    (None, None), (0.0, "stable"), (0.0999, "stable"), (0.1, "moderate"), (0.25, "moderate"),
    (0.2501, "drifted"), (3.0, "drifted"),
])
def test_the_usual_reading_of_psi(value: float | None, expected: str | None) -> None:
    assert status(value) == expected


def test_chi_square_is_the_two_sample_test_on_the_bins() -> None:
    live, ref = np.array([30, 50, 20]), np.array([40, 40, 20])
    table = np.array([live, ref], dtype=float)
    expected = np.outer(table.sum(1), table.sum(0)) / table.sum()
    statistic = ((table - expected) ** 2 / expected).sum()
    assert chi_square_p(live, ref) == pytest.approx(chi2.sf(statistic, df=2), rel=1e-9)


def test_chi_square_pools_sparse_bins_until_every_expected_count_is_five() -> None:
    live, ref = np.array([2, 2, 40, 40, 16]), np.array([1, 3, 40, 40, 16])
    # 5 rows in the first two bins together: expected 2.5 each side, pooled with the third
    pooled_live, pooled_ref = np.array([44, 40, 16]), np.array([44, 40, 16])
    assert chi_square_p(live, ref) == pytest.approx(chi_square_p(pooled_live, pooled_ref))
    assert chi_square_p(live, ref) == pytest.approx(1.0)


@pytest.mark.parametrize(("live", "ref"), [
    ([0, 0, 0], [10, 10, 10]),  # no live rows
    ([3, 3], [2, 2]),  # every bin pooled into one: nothing to test
])
def test_chi_square_is_null_without_enough_rows(live: list[int], ref: list[int]) -> None:
    assert chi_square_p(np.array(live), np.array(ref)) is None


# --- the monitor ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def training() -> np.ndarray:
    data = datasets.load_iris()
    X_train, *_ = train_test_split(data.data, data.target, test_size=0.25, random_state=42)
    return np.asarray(X_train)


def rows(training: np.ndarray, n: int, shift: float = 0.0, seed: int = 0) -> np.ndarray:
    """``n`` training rows drawn with replacement, sepal width shifted by ``shift`` sd."""
    X = training[np.random.default_rng(seed).integers(0, len(training), n)].copy()
    X[:, 1] += shift * training[:, 1].std()
    return X


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def iris(registry: ModelRegistry) -> LoadedVersion:
    return registry.resolve("iris", "1")


def monitor(registry: ModelRegistry, tmp_path: Path, clock: Clock, **kw: Any) -> DriftMonitor:
    """A monitor of its own ``pid`` (made up: every pid counts as a live worker unless the
    test's ``alive`` says otherwise)."""
    kw.setdefault("min_rows", 100)
    kw.setdefault("alive", lambda pid: True)
    return DriftMonitor(registry, tmp_path, EventLog(str(tmp_path)), clock=clock, seed=1, **kw)


def serve(dm: DriftMonitor, registry: ModelRegistry, lv: LoadedVersion, X: np.ndarray
          ) -> Outcome:
    outcome = DataPlane(registry).predict_resolved(lv, X, ["instances"])
    dm.observe(outcome, X)
    return outcome


def test_training_rows_are_stable_and_a_shifted_feature_alone_drifts(
        registry: ModelRegistry, iris: LoadedVersion, tmp_path: Path, clock: Clock,
        training: np.ndarray) -> None:
    dm = monitor(registry, tmp_path, clock, sample_rows_per_second=10_000)
    serve(dm, registry, iris, rows(training, 2000))
    dm.flush()
    report = dm.report(iris)
    assert report["status"] == "stable" and report["rows"] == 2000
    assert all(f["psi"] < 0.1 for f in report["features"].values())
    clock.now += 3 * 3600  # the window has passed: only the shifted rows count
    serve(dm, registry, iris, rows(training, 2000, shift=1.5))
    dm.flush()
    report = dm.report(iris)
    assert report["rows"] == 2000 and report["status"] == "drifted"
    drifted = {n for n, f in report["features"].items() if f["status"] == "drifted"}
    assert drifted == {"sepal_width"} and report["worst_feature"] == "sepal_width"
    assert report["features"]["sepal_width"]["psi"] > 0.25
    assert report["features"]["sepal_width"]["p_value"] < 1e-6
    assert report["since_start"]["rows"] == 4000


def test_rows_over_the_per_second_budget_are_sampled(
        registry: ModelRegistry, iris: LoadedVersion, tmp_path: Path, clock: Clock,
        training: np.ndarray) -> None:
    dm = monitor(registry, tmp_path, clock, sample_rows_per_second=300)
    serve(dm, registry, iris, rows(training, 250))
    serve(dm, registry, iris, rows(training, 250, seed=1))  # 50 of these rows, at random
    serve(dm, registry, iris, rows(training, 10, seed=2))  # budget spent: served only
    clock.now += 1  # a new second, a new budget
    serve(dm, registry, iris, rows(training, 100, seed=3))
    dm.flush()
    report = dm.report(iris)
    assert (report["rows"], report["rows_served"]) == (400, 610)
    assert dm.sampled_out == 210
    assert report["status"] == "stable"  # the sample is of the same rows


def test_minute_buckets_leave_the_window(registry: ModelRegistry, iris: LoadedVersion,
                                         tmp_path: Path, clock: Clock,
                                         training: np.ndarray) -> None:
    dm = monitor(registry, tmp_path, clock, window_seconds=120)  # this minute and the one before
    serve(dm, registry, iris, rows(training, 150))
    dm.flush()
    clock.now += 60
    serve(dm, registry, iris, rows(training, 50))
    dm.flush()
    assert dm.report(iris)["rows"] == 200
    clock.now += 60  # the first minute is two minutes back now
    dm.flush()
    report = dm.report(iris)
    assert report["rows"] == 50 and report["status"] == "not_enough_rows"
    assert report["reason"].startswith("50 rows counted in the window, fewer than DRIFT_MIN_ROWS")
    assert all(f["psi"] is None and f["status"] is None for f in report["features"].values())
    assert report["since_start"]["rows"] == 200
    clock.now += 60
    dm.flush()
    assert dm.report(iris)["rows"] == 0


@pytest.mark.parametrize("window_seconds", [60, 120, 3600])
@pytest.mark.parametrize("flushed", [True, False], ids=["flushed", "before-the-flush"])
def test_the_window_is_window_seconds_long_to_the_second(
        registry: ModelRegistry, iris: LoadedVersion, tmp_path: Path, clock: Clock,
        training: np.ndarray, window_seconds: int, flushed: bool) -> None:
    """Rows served at the start of a minute count until window_seconds later, not a second
    longer, whether or not the worker has flushed since the window moved."""
    dm = monitor(registry, tmp_path, clock, window_seconds=window_seconds)
    serve(dm, registry, iris, rows(training, 150))
    dm.flush()
    for elapsed, expected in ((window_seconds - 1, 150), (window_seconds, 0)):
        clock.now = T0 + elapsed
        if flushed:
            dm.flush()
        assert dm.report(iris)["rows"] == expected, elapsed


def test_workers_add_up_through_the_runtime_dir(registry: ModelRegistry, iris: LoadedVersion,
                                                tmp_path: Path, clock: Clock,
                                                training: np.ndarray) -> None:
    one = monitor(registry, tmp_path, clock, pid=1001)
    two = monitor(registry, tmp_path, clock, pid=1002)
    serve(one, registry, iris, rows(training, 300))
    serve(two, registry, iris, rows(training, 200, seed=1))
    one.flush()
    two.flush()
    assert one.report(iris)["rows"] == two.report(iris)["rows"] == 500
    assert {p.name for p in tmp_path.glob("drift-*.json")} == {"drift-1001.json",
                                                               "drift-1002.json"}
    # The minute ends: counted once, before and after the worker's next write.
    clock.now += 60
    assert two.report(iris)["rows"] == 500
    one.flush()
    assert two.report(iris)["rows"] == 500


def test_another_workers_minutes_leave_the_window_on_the_readers_clock(
        registry: ModelRegistry, iris: LoadedVersion, tmp_path: Path, clock: Clock,
        training: np.ndarray) -> None:
    """A worker's file is one document, replaced whole: a minute that closes between two
    reads is never missed nor counted twice. A reader whose clock has passed the writer's
    last write still takes the minutes that left the window out of the writer's sum."""
    writer = monitor(registry, tmp_path, clock, pid=1101, window_seconds=180)
    reader = monitor(registry, tmp_path, clock, pid=1102, window_seconds=180)
    for minute, n in enumerate((150, 50, 25)):
        clock.now = T0 + 60 * minute
        serve(writer, registry, iris, rows(training, n, seed=minute))
        writer.flush()
    assert reader.report(iris)["rows"] == 225
    # The writer does not write again: the reader's own clock moves the window.
    for minute, expected in ((3, 75), (4, 25), (5, 0)):
        clock.now = T0 + 60 * minute
        assert reader.report(iris)["rows"] == expected, minute
        assert reader.report(iris)["since_start"]["rows"] == 225


def test_files_of_workers_that_died_are_removed_and_no_longer_counted(
        registry: ModelRegistry, iris: LoadedVersion, tmp_path: Path, clock: Clock,
        training: np.ndarray) -> None:
    live = {4001, 4002}
    one = monitor(registry, tmp_path, clock, pid=4001, alive=live.__contains__)
    two = monitor(registry, tmp_path, clock, pid=4002, alive=live.__contains__)
    serve(one, registry, iris, rows(training, 300))
    one.flush()
    assert two.report(iris)["rows"] == 300
    live.discard(4001)  # e.g. replaced after a SIGHUP: same server, another pid
    clock.now += 1
    assert two.report(iris)["rows"] == 0
    assert not (tmp_path / "drift-4001.json").exists()


def test_a_worker_counts_as_alive_while_its_process_is_a_child_of_our_master() -> None:
    assert worker_alive(os.getpid())
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        assert not worker_alive(child.pid)  # alive, but our child, not our master's
    finally:
        child.kill()
        child.wait()
    assert not worker_alive(child.pid)


def test_files_of_an_earlier_server_run_are_ignored_and_removed(
        registry: ModelRegistry, iris: LoadedVersion, tmp_path: Path, clock: Clock,
        training: np.ndarray) -> None:
    old = monitor(registry, tmp_path, clock, pid=2001)
    serve(old, registry, iris, rows(training, 300))
    old.flush()
    doc = orjson.loads((tmp_path / "drift-2001.json").read_bytes())
    (tmp_path / "drift-2001.json").write_bytes(orjson.dumps({**doc, "server": -1}))
    new = monitor(registry, tmp_path, clock, pid=2002)
    assert new.report(iris)["rows"] == 0
    new.files.remove_stale()
    assert not (tmp_path / "drift-2001.json").exists()


def drift_events(tmp_path: Path) -> list[dict[str, Any]]:
    return [e for e in EventLog(str(tmp_path)).read_from(0)[0] if e["type"] == "drift"]


def test_one_leader_publishes_each_change_once_and_sets_the_gauges(
        registry: ModelRegistry, iris: LoadedVersion, tmp_path: Path, clock: Clock,
        training: np.ndarray) -> None:
    one = monitor(registry, tmp_path, clock, pid=3001)
    two = monitor(registry, tmp_path, clock, pid=3002)
    serve(one, registry, iris, rows(training, 500, shift=1.5))
    one.flush()
    for _ in range(3):
        one.refresh()
        two.refresh()
    assert one.status()["leader"] and not two.status()["leader"]
    events = drift_events(tmp_path)
    assert len(events) == 1
    assert events[0]["model"] == "iris" and events[0]["version"] == "1"
    assert events[0]["status"] == "drifted"
    assert set(events[0]["features"]) == {"sepal_width"}
    assert events[0]["features"]["sepal_width"]["from"] == "stable"
    assert events[0]["features"]["sepal_width"]["to"] == "drifted"
    gauge = prometheus.FEATURE_DRIFT.labels("iris", "1", "sepal_width")._value.get()
    assert gauge > 0.25
    assert prometheus.FEATURE_DRIFT.labels("iris", "1", "petal_width")._value.get() < 0.1
    # The leader's process exits, which lets go of its lock (and a worker starts): the next
    # leader knows what was told already.
    assert one.leader.fd is not None
    os.close(one.leader.fd)
    monitor(registry, tmp_path, clock, pid=3003).files.remove_stale()
    two.refresh()
    assert two.status()["leader"] and len(drift_events(tmp_path)) == 1
    # Back to training-like rows: the change back is told.
    clock.now += 2 * 3600
    serve(two, registry, iris, rows(training, 2000))
    two.flush()
    two.refresh()
    events = drift_events(tmp_path)
    assert len(events) == 2 and events[1]["features"]["sepal_width"]["to"] == "stable"
    # The window empties: no figure rather than an old one.
    clock.now += 2 * 3600
    two.flush()
    two.refresh()
    assert math.isnan(prometheus.FEATURE_DRIFT.labels("iris", "1", "sepal_width")._value.get())
    assert len(drift_events(tmp_path)) == 2


def test_a_version_without_a_profile_is_not_counted(registry: ModelRegistry,
                                                    iris: LoadedVersion, tmp_path: Path,
                                                    clock: Clock) -> None:
    from dataclasses import replace

    dm = monitor(registry, tmp_path, clock)
    bare = replace(iris, profile=None, profile_note="no profile.json beside the artifact")
    X = np.array([[5.1, 3.5, 1.4, 0.2]])
    dm.observe(Outcome(bare, 0, [{"prediction": 0}], 0.0, X), X)
    assert dm.status()["pending"] == 0
    report = dm.report(bare)
    assert report["status"] == "no_reference"
    assert report["reason"] == "no profile.json beside the artifact"
    assert report["features"] == {} and report["prediction"] is None


def test_the_front_door_counts_rows_whether_or_not_the_log_is_on(
        registry: ModelRegistry, iris: LoadedVersion, tmp_path: Path, clock: Clock) -> None:
    dm = monitor(registry, tmp_path, clock)
    front = FrontDoor(registry, DataPlane(registry), drift=dm)
    front.predict(iris, np.array([[5.1, 3.5, 1.4, 0.2]] * 3), ["instances"])  # no origin
    dm.flush()
    assert dm.report(iris)["rows"] == 3


# --- Redis, failing open --------------------------------------------------------------------
class FakeRedis:
    """The few commands the monitor sends, in memory. ``down``: every call fails as redis-py
    fails on a refused connection (nothing sent); ``slow``: the commands are applied, then
    the reply times out."""

    def __init__(self) -> None:
        self.hashes: dict[str, dict[bytes, int]] = {}
        self.down = False
        self.slow = False
        self.calls: list[tuple[str, Any]] = []

    def pipeline(self, transaction: bool = True) -> FakeRedis:
        self.calls = []
        return self

    def hincrby(self, key: str, field: str, amount: int) -> None:
        self.calls.append(("hincrby", (key, field, amount)))

    def expire(self, key: str, seconds: int) -> None:
        self.calls.append(("expire", (key, seconds)))

    def hgetall(self, key: str) -> None:
        self.calls.append(("hgetall", key))

    def execute(self) -> list[Any]:
        if self.down:
            try:
                raise ConnectionRefusedError(111, "Connection refused")
            except OSError:
                raise redis.ConnectionError("Error 111 connecting to redis:6379. "
                                            "Connection refused.") from None
        out: list[Any] = []
        for name, args in self.calls:
            if name == "hincrby":
                key, field, amount = args
                h = self.hashes.setdefault(key, {})
                h[field.encode()] = h.get(field.encode(), 0) + amount
                out.append(h[field.encode()])
            elif name == "hgetall":
                out.append({k: str(v).encode() for k, v in self.hashes.get(args, {}).items()})
            else:
                out.append(True)
        if self.slow:
            raise redis.TimeoutError("Timeout reading from socket")
        return out


@pytest.fixture
def fake_redis() -> Iterator[FakeRedis]:
    yield FakeRedis()


def test_instances_add_up_in_redis_and_fail_open(registry: ModelRegistry, iris: LoadedVersion,
                                                 tmp_path: Path, clock: Clock,
                                                 training: np.ndarray,
                                                 fake_redis: FakeRedis) -> None:
    # Two instances: each its own RUNTIME_DIR, one Redis.
    a = monitor(registry, tmp_path / "a", clock, client=fake_redis,  # type: ignore[arg-type]
                breaker_seconds=0)
    b = monitor(registry, tmp_path / "b", clock, client=fake_redis,  # type: ignore[arg-type]
                breaker_seconds=0)
    serve(a, registry, iris, rows(training, 300))
    serve(b, registry, iris, rows(training, 200, seed=1))
    a.flush()
    b.flush()
    key = f"drift:iris:1:{iris.profile.fingerprint}:{int(T0) // 60}"  # type: ignore[union-attr]
    assert fake_redis.hashes[key][b"rows"] == 500
    report = a.report(iris)
    assert report["rows"] == 500 and report["counts_scope"] == "all instances (redis)"
    assert report["note"] is None and report["since_start"]["rows"] == 300

    fake_redis.down = True  # the flush is refused: its deltas wait, the answer is this server's
    serve(a, registry, iris, rows(training, 100, seed=2))
    a.flush()
    clock.now += 1  # a second later: a new answer
    report = a.report(iris)
    assert report["rows"] == 400 and report["counts_scope"] == "all workers of this server"
    assert report["note"].startswith("Redis unavailable (ConnectionError: Error 111 connecting")
    fake_redis.down = False  # back: the kept deltas go with the next flush
    a.flush()
    clock.now += 1
    assert a.report(iris)["rows"] == 600 and fake_redis.hashes[key][b"rows"] == 600


def test_a_flush_that_may_have_reached_redis_is_never_sent_twice(
        registry: ModelRegistry, iris: LoadedVersion, tmp_path: Path, clock: Clock,
        training: np.ndarray, fake_redis: FakeRedis) -> None:
    """HINCRBY is not idempotent: a flush whose reply timed out (Redis may have applied it)
    is dropped and counted, never pushed again."""
    dm = monitor(registry, tmp_path, clock, client=fake_redis,  # type: ignore[arg-type]
                 breaker_seconds=0)
    key = f"drift:iris:1:{iris.profile.fingerprint}:{int(T0) // 60}"  # type: ignore[union-attr]
    dropped = prometheus.DRIFT_DROPPED._value.get()
    fake_redis.slow = True
    serve(dm, registry, iris, rows(training, 300))
    dm.flush()
    fake_redis.slow = False
    serve(dm, registry, iris, rows(training, 20, seed=1))
    dm.flush()
    dm.flush()
    assert fake_redis.hashes[key][b"rows"] == 320  # applied once, by the timed-out flush
    assert dm.dropped == 300 and prometheus.DRIFT_DROPPED._value.get() == dropped + 300


# --- answers, statuses and memory -----------------------------------------------------------
def test_an_answer_is_computed_once_a_second_and_shared_by_concurrent_requests(
        registry: ModelRegistry, iris: LoadedVersion, tmp_path: Path, clock: Clock,
        training: np.ndarray, monkeypatch: pytest.MonkeyPatch) -> None:
    from server.serving import drift

    dm = monitor(registry, tmp_path, clock)
    serve(dm, registry, iris, rows(training, 200))
    dm.flush()
    computed: list[int] = []
    release = threading.Event()
    real = drift.scores

    def slow_scores(*args: Any, **kw: Any) -> dict[str, Any]:
        computed.append(1)
        release.wait(5)
        return real(*args, **kw)

    monkeypatch.setattr(drift, "scores", slow_scores)
    answers: list[dict[str, Any]] = []
    asking = [threading.Thread(target=lambda: answers.append(dm.report(iris)))
              for _ in range(4)]
    for thread in asking:
        thread.start()
    time.sleep(0.2)  # every request is in, one of them computing
    release.set()
    for thread in asking:
        thread.join(5)
    assert len(computed) == 2  # one answer: the window's scores and since start's
    assert len(answers) == 4 and all(a is answers[0] for a in answers)
    assert answers[0]["rows"] == 200
    clock.now += 0.9
    assert dm.report(iris) is answers[0] and len(computed) == 2
    clock.now += 0.1
    assert dm.report(iris) is not answers[0] and len(computed) == 4


def test_the_leaders_statuses_are_replaced_whole_and_forget_versions_gone(
        registry: ModelRegistry, iris: LoadedVersion, tmp_path: Path, clock: Clock,
        training: np.ndarray, monkeypatch: pytest.MonkeyPatch) -> None:
    saved = tmp_path / "drift.statuses.json"
    saved.write_bytes(orjson.dumps({"gone/1/0123456789abcdef": {"x": "drifted"}}))
    dm = monitor(registry, tmp_path, clock)
    serve(dm, registry, iris, rows(training, 500, shift=1.5))
    dm.flush()
    dm.refresh()
    statuses = orjson.loads(saved.read_bytes())
    key = f"iris/1/{iris.profile.fingerprint}"  # type: ignore[union-attr]
    assert list(statuses) == [key] and statuses[key]["sepal_width"] == "drifted"

    def half_then_full_disk(path: Path, data: bytes) -> int:
        with open(path, "wb") as fh:
            fh.write(data[:len(data) // 2])
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Path, "write_bytes", half_then_full_disk)
    clock.now += 2 * 3600  # back to training-like rows: the statuses change
    serve(dm, registry, iris, rows(training, 2000))
    dm.flush()
    dm.refresh()
    monkeypatch.undo()
    assert orjson.loads(saved.read_bytes()) == statuses  # the last whole file, not half
    assert [p.name for p in tmp_path.glob(".*.tmp")] == []


def _size(obj: Any, seen: set[int] | None = None) -> int:
    """Bytes held by ``obj`` and what it refers to (numpy counts its own buffers)."""
    seen = set() if seen is None else seen
    if id(obj) in seen:
        return 0
    seen.add(id(obj))
    size = sys.getsizeof(obj)
    if isinstance(obj, dict):
        size += sum(_size(k, seen) + _size(v, seen) for k, v in obj.items())
    elif isinstance(obj, (list, tuple, set)):
        size += sum(_size(v, seen) for v in obj)
    elif hasattr(obj, "__dict__") and not isinstance(obj, (type, np.ndarray)):
        size += _size(vars(obj), seen)
    return size


def test_a_weeks_window_keeps_each_minute_compact_and_other_workers_small(
        registry: ModelRegistry, tmp_path: Path, clock: Clock) -> None:
    """A week of minutes for three versions: the worker that counted them keeps each minute
    as one int32 row per version (about 4 bytes a cell), the other workers a few vectors
    per version whatever the window, and their files stay a few kilobytes."""
    week = 7 * 86400
    one = monitor(registry, tmp_path, clock, window_seconds=week, pid=5001,
                  sample_rows_per_second=10**6)
    two = monitor(registry, tmp_path, clock, window_seconds=week, pid=5002)
    versions = [registry.resolve("iris", "1"), registry.resolve("iris", "2"),
                registry.resolve("breast_cancer", "1")]
    requests = [DataPlane(registry).predict_resolved(lv, np.ones((2, lv.n_features or 0)),
                                                     ["instances"]) for lv in versions]
    minutes = week // 60
    for minute in range(minutes):
        clock.now = T0 + 60 * minute
        for outcome in requests:
            assert outcome.X is not None
            one.observe(outcome, outcome.X)
        if minute % 60 == 59:
            one.flush()
    one.flush()
    cells = sum(lv.profile.cells.size for lv in versions if lv.profile is not None)
    kept = _size(one._counts)
    assert kept < 1.1 * 4 * cells * minutes, kept
    for lv in versions:
        assert two.report(lv)["rows"] == 2 * minutes
    assert _size(two.files._parsed) < 50_000
    assert (tmp_path / "drift-5001.json").stat().st_size < 50_000
