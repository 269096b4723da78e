"""Hot reload: new versions appear by poll or admin reload in every worker, broken artifacts
are reported and skipped, and no request fails while models swap."""

from __future__ import annotations

import shutil
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import joblib
import pytest
from sklearn.datasets import load_iris
from sklearn.tree import DecisionTreeClassifier

from tests.conftest import LiveServer, wait_until

# Starts servers of its own or runs for long: not in the fast subset (-m 'not slow').
pytestmark = pytest.mark.slow

ROW = {"features": [6.3, 2.5, 5.0, 1.9]}


def add_version(repo: Path, version: str, source: str = "1") -> None:
    """Copy a version folder in whole, the way a deploy would (build aside, then rename)."""
    staging = repo / "iris" / f".staging-{version}"
    shutil.copytree(repo / "iris" / source, staging)
    staging.rename(repo / "iris" / version)


def versions_seen(server: LiveServer, n: int = 12) -> Counter[str]:
    """Versions answered over fresh connections, so both workers are asked."""
    return Counter(server.fresh("POST", "/predict/iris", json=ROW).json()["version"]
                   for _ in range(n))


def test_poll_serves_a_new_version_within_seconds(
    server_factory: Callable[..., LiveServer], model_repo: Path
) -> None:
    server = server_factory(model_repo, MODEL_POLL_SECONDS="0.5")
    assert versions_seen(server) == Counter({"2": 12})
    add_version(model_repo, "3")
    wait_until(lambda: versions_seen(server) == Counter({"3": 12}), 10)


def test_admin_reload_reaches_every_worker_at_once(
    server_factory: Callable[..., LiveServer], model_repo: Path, admin: dict[str, str]
) -> None:
    server = server_factory(model_repo, MODEL_POLL_SECONDS="0")
    add_version(model_repo, "3")
    assert versions_seen(server, 4) == Counter({"2": 4})  # no poll: nothing changes by itself
    resp = server.post("/admin/reload", headers=admin)
    assert resp.status_code == 200 and resp.json()["added"] == ["iris/3"]
    wait_until(lambda: versions_seen(server) == Counter({"3": 12}), 2)
    shutil.rmtree(model_repo / "iris" / "3")
    resp = server.post("/model/reload", headers={"X-Admin-Token": admin["Authorization"][7:]})
    assert resp.json()["removed"] == ["iris/3"]
    wait_until(lambda: versions_seen(server) == Counter({"2": 12}), 2)


def test_broken_artifact_is_reported_and_skipped(
    server_factory: Callable[..., LiveServer], model_repo: Path, admin: dict[str, str]
) -> None:
    server = server_factory(model_repo, MODEL_POLL_SECONDS="0")
    (model_repo / "iris" / "3").mkdir()
    (model_repo / "iris" / "3" / "model.joblib").write_bytes(b"not a pickle at all")
    report = server.post("/admin/reload", headers=admin).json()
    assert report["failed"] == ["iris/3"], report
    info = server.get("/models/iris").json()
    broken = [v for v in info["versions"] if v["version"] == "3"][0]
    assert broken["state"] == "FAILED" and broken["error"]
    assert info["latest"] == "2"
    assert server.get("/ready").status_code == 200
    assert server.post("/predict/iris", json=ROW).json()["version"] == "2"
    resp = server.post("/predict/iris/versions/3", json=ROW)
    assert resp.status_code == 503 and resp.json()["code"] == "version_unavailable"


def test_server_starts_ready_despite_broken_files(
    server_factory: Callable[..., LiveServer], model_repo: Path, tmp_path: Path
) -> None:
    (model_repo / "iris" / "3").mkdir()
    joblib.dump({"not": "an estimator"}, model_repo / "iris" / "3" / "model.joblib")
    (model_repo / "iris" / "4").mkdir()
    (model_repo / "iris" / "4" / "model.joblib").write_bytes(b"\x80\x04truncated")
    (model_repo / "diabetes" / "model.json").write_text("{broken json")
    shutil.copytree(model_repo / "iris" / "1", model_repo / "iris" / "5")
    (model_repo / "iris" / "5" / "metadata.json").write_text('{"feature_names": ["only-one"]}')
    outside = tmp_path / "outside.joblib"
    shutil.copy(model_repo / "iris" / "1" / "model.joblib", outside)
    (model_repo / "iris" / "6").mkdir()
    (model_repo / "iris" / "6" / "model.joblib").symlink_to(outside)
    (model_repo / "..hidden").mkdir()
    server = server_factory(model_repo)
    assert server.get("/ready").status_code == 200
    iris = server.get("/models/iris").json()
    states = {v["version"]: v["state"] for v in iris["versions"]}
    assert states == {"1": "AVAILABLE", "2": "AVAILABLE", "3": "FAILED", "4": "FAILED",
                      "5": "FAILED"}  # 6 points outside the repository: never loaded
    assert "has no predict method" in iris["versions"][2]["error"]
    assert server.get("/models/diabetes").json()["problems"]
    assert server.post("/predict/diabetes", json={"features": [0.0] * 10}).status_code == 200


def test_no_request_fails_while_versions_swap(
    server_factory: Callable[..., LiveServer], model_repo: Path, admin: dict[str, str]
) -> None:
    server = server_factory(model_repo, MODEL_POLL_SECONDS="0.2")
    iris = load_iris()
    statuses: Counter[int] = Counter()
    stop = threading.Event()

    def hammer() -> None:
        while not stop.is_set():
            statuses[server.fresh("POST", "/predict/iris", json=ROW).status_code] += 1

    threads = [threading.Thread(target=hammer) for _ in range(4)]
    for t in threads:
        t.start()
    try:
        for i in range(6):
            tree = DecisionTreeClassifier(max_depth=i + 1, random_state=0).fit(iris.data,
                                                                             iris.target)
            tmp = model_repo / "iris" / "2" / "model.joblib.tmp"
            joblib.dump(tree, tmp)
            tmp.replace(model_repo / "iris" / "2" / "model.joblib")
            server.post("/admin/reload", headers=admin)
            add_version(model_repo, str(10 + i))
            time.sleep(0.3)  # let the poll and the hammering threads meet the new files
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert statuses[200] > 50 and set(statuses) == {200}, statuses


def test_admin_endpoints_are_off_without_a_token(
    server_factory: Callable[..., LiveServer], model_repo: Path
) -> None:
    server = server_factory(model_repo, ADMIN_TOKEN="")
    resp = server.post("/admin/reload", headers={"Authorization": "Bearer anything"})
    assert resp.status_code == 403 and resp.json()["code"] == "admin_disabled"


def test_api_keys_guard_model_endpoints_but_not_health(
    server_factory: Callable[..., LiveServer], model_repo: Path
) -> None:
    server = server_factory(model_repo, API_KEYS="k1,k2")
    assert server.post("/predict/iris", json=ROW).status_code == 401
    assert server.post("/predict/iris", json=ROW, headers={"X-API-Key": "nope"}).status_code == 401
    assert server.post("/predict/iris", json=ROW, headers={"X-API-Key": "k2"}).status_code == 200
    ok = server.post("/predict/iris", json=ROW, headers={"Authorization": "Bearer k1"})
    assert ok.status_code == 200
    assert server.get("/models").status_code == 401
    assert server.get("/health").status_code == 200 and server.get("/ready").status_code == 200
