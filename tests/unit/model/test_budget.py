"""MODEL_MEMORY_MB: versions load on first request (one load however many ask, a bounded
wait), least recently used versions are unloaded beyond the budget, labelled and
experiment versions stay, and without a budget everything loads at once."""

from __future__ import annotations

import copy
import json
import threading
import time
from pathlib import Path
from typing import Any

import joblib
import pytest
from sklearn.datasets import load_iris
from sklearn.linear_model import LogisticRegression

from server.errors import ApiError
from server.model.budget import MemoryBudget
from server.model.formats import memory_bytes
from server.model.registry import ModelRegistry
from server.model.repository import ModelRepository, single_threaded

X, Y = load_iris(return_X_y=True)
MODEL = LogisticRegression(max_iter=500).fit(X, Y)


def _size_as_loaded(estimator: Any) -> int:
    twin = copy.deepcopy(estimator)
    single_threaded(twin)  # as a load leaves it
    return memory_bytes(twin)


SIZE = _size_as_loaded(MODEL)


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    """Model ``m`` with versions 1-5, each the same small estimator."""
    for version in range(1, 6):
        folder = tmp_path / "m" / str(version)
        folder.mkdir(parents=True)
        joblib.dump(MODEL, folder / "model.joblib")
    return tmp_path


def _registry(root: Path, fits: float = 2.5, wait: float = 10.0) -> ModelRegistry:
    """A registry whose budget holds ``fits`` versions."""
    registry = ModelRegistry(ModelRepository(root),
                             budget=MemoryBudget(fits * SIZE / 1_000_000, wait))
    registry.reload()
    return registry


def _states(registry: ModelRegistry) -> dict[str, str]:
    return {v["version"]: v["state"] for v in registry.get("m").describe()["versions"]}


def _loaded(registry: ModelRegistry) -> list[str]:
    return sorted(registry.get("m").versions, key=int)


def test_under_a_budget_nothing_loads_until_asked(repo: Path) -> None:
    registry = _registry(repo)
    assert set(_states(registry).values()) == {"UNLOADED"}
    entry = registry.get("m")
    assert entry.servable == ["1", "2", "3", "4", "5"] and entry.latest == "5"
    lv = registry.resolve("m")
    assert lv.version == "5" and lv.memory_bytes == SIZE
    described = registry.get("m").describe()["versions"][-1]
    assert described["state"] == "AVAILABLE" and described["loaded"] is True
    assert described["memory_mb"] == round(SIZE / 1_000_000, 3)
    assert _states(registry)["1"] == "UNLOADED"


def test_least_recently_used_versions_are_unloaded_beyond_the_budget(repo: Path) -> None:
    registry = _registry(repo, fits=2.5)
    for version in ("1", "2", "3"):
        registry.resolve("m", version)
    assert _loaded(registry) == ["2", "3"]  # 1 was the least recently used
    registry.resolve("m", "2")  # 2 is now more recent than 3
    registry.resolve("m", "4")
    assert _loaded(registry) == ["2", "4"]
    assert registry.get("m").describe()["versions"][0]["memory_mb"] is not None  # measured
    status = registry.memory_status()
    assert status is not None and status["loads"] == 4 and status["unloads"] == 2
    assert status["loaded_versions"] == 2
    # An unloaded version loads again on its next request, and answers as before.
    assert registry.resolve("m", "1").estimator.predict(X[:3]).tolist() == \
        MODEL.predict(X[:3]).tolist()


def test_labelled_and_experiment_versions_stay_loaded(repo: Path) -> None:
    (repo / "m" / "model.json").write_text(json.dumps({"labels": {"stable": "1"}}))
    registry = _registry(repo, fits=2.5)
    assert registry.budget is not None
    registry.budget.pinned = lambda: {("m", "2")}
    for version in ("1", "2", "3", "4", "5", "3", "4"):
        registry.resolve("m", version)
    assert {"1", "2"} <= set(_loaded(registry))
    assert registry.get("m").versions.keys() - {"1", "2"} == {"4"}  # one more: the last asked


def test_concurrent_first_requests_share_one_load(repo: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    registry = _registry(repo)
    real = registry.repository.read
    reads: list[str] = []

    def slow_read(found: Any) -> Any:
        reads.append(found.version)
        time.sleep(0.3)
        return real(found)

    monkeypatch.setattr(registry.repository, "read", slow_read)
    got: list[Any] = []
    threads = [threading.Thread(target=lambda: got.append(registry.resolve("m", "3")))
               for _ in range(8)]
    for t in threads:
        t.start()
    time.sleep(0.1)
    assert _states(registry)["3"] == "LOADING"
    for t in threads:
        t.join()
    assert reads == ["3"] and len(got) == 8 and all(lv is got[0] for lv in got)
    assert registry.resolve("m", "3") is got[0]


def test_a_slow_load_answers_503_with_retry_after_and_goes_on(
        repo: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    registry = _registry(repo, wait=0.05)
    real = registry.repository.read

    def slow_read(found: Any) -> Any:
        time.sleep(0.5)
        return real(found)

    monkeypatch.setattr(registry.repository, "read", slow_read)
    with pytest.raises(ApiError) as info:
        registry.resolve("m", "2")
    assert info.value.status == 503 and info.value.code == "version_loading"
    assert info.value.headers == {"Retry-After": "1"}
    time.sleep(0.6)
    assert registry.resolve("m", "2").version == "2"
    status = registry.memory_status()
    assert status is not None and status["loads"] == 1


def test_a_version_that_fails_on_first_request_is_failed_and_latest_moves_down(
        repo: Path) -> None:
    (repo / "m" / "5" / "model.joblib").write_bytes(b"not a pickle")
    registry = _registry(repo)
    assert _states(registry)["5"] == "UNLOADED"  # only hashed so far
    assert registry.resolve("m").version == "4"
    assert _states(registry)["5"] == "FAILED"
    with pytest.raises(ApiError) as info:
        registry.resolve("m", "5")
    assert info.value.status == 503 and info.value.code == "version_unavailable"


def test_a_wrong_pinned_sha256_fails_at_the_scan_under_a_budget(repo: Path) -> None:
    (repo / "m" / "2" / "metadata.json").write_text(json.dumps({"sha256": "0" * 64}))
    registry = _registry(repo)
    assert _states(registry)["2"] == "FAILED"
    assert "does not match the sha256 pinned" in registry.get("m").failed["2"].error


def test_reload_keeps_unloaded_versions_and_reports_a_changed_one(repo: Path) -> None:
    registry = _registry(repo)
    registry.resolve("m", "1")
    assert not registry.reload().touched
    assert _loaded(registry) == ["1"]
    other = LogisticRegression(max_iter=500, C=0.1).fit(X, Y)
    joblib.dump(other, repo / "m" / "3" / "model.joblib")
    report = registry.reload()
    assert report.changed == ["m/3"] and _states(registry)["3"] == "UNLOADED"
    assert registry.resolve("m", "3").estimator.C == 0.1


def test_without_a_budget_every_version_loads_at_once(repo: Path) -> None:
    registry = ModelRegistry(ModelRepository(repo))
    registry.reload()
    assert set(_states(registry).values()) == {"AVAILABLE"}
    assert all(v["memory_mb"] > 0 for v in registry.get("m").describe()["versions"])
    assert registry.memory_status() is None
