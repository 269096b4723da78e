"""Safe formats on a real server: skops versions serve with ALLOW_PICKLE=false while pickles
are refused, a skops file with a class of its own is FAILED by name, and a wrong pinned
sha256 refuses the artifact."""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import joblib
import numpy as np
import pytest
import skops.io
from sklearn.base import BaseEstimator

from tests.conftest import LiveServer

pytestmark = pytest.mark.slow

ROWS = [[5.1, 3.5, 1.4, 0.2], [6.3, 2.5, 5.0, 1.9], [6.0, 2.9, 4.5, 1.5]]


class Doubler(BaseEstimator):  # type: ignore[misc]
    """A class of our own: the server must refuse it without ever importing this module."""

    n_features_in_ = 4

    def predict(self, X: Any) -> Any:
        return np.asarray(X)[:, 0] * 2


def _add(repo: Path, version: str, files: dict[str, Any],
         metadata: dict[str, Any] | None = None) -> None:
    staging = repo / "iris" / f".staging-{version}"
    staging.mkdir()
    for filename, payload in files.items():
        if isinstance(payload, Path):
            shutil.copy(payload, staging / filename)
        else:
            skops.io.dump(payload, staging / filename)
    if metadata is not None:
        (staging / "metadata.json").write_text(json.dumps(metadata))
    staging.rename(repo / "iris" / version)


@pytest.fixture
def mixed_repo(model_repo: Path) -> Path:
    """The demo (model.joblib and model.skops in every version) plus: 3 a pickle alone, 4 a
    skops file with an untrusted class, 5 and 6 iris v2's skops with a wrong and a right
    pinned sha256."""
    v2 = model_repo / "iris" / "2"
    sha = hashlib.sha256((v2 / "model.skops").read_bytes()).hexdigest()
    meta = json.loads((v2 / "metadata.json").read_text())
    _add(model_repo, "3", {"model.joblib": model_repo / "iris" / "1" / "model.joblib"})
    _add(model_repo, "4", {"model.skops": Doubler()})
    _add(model_repo, "5", {"model.skops": v2 / "model.skops"}, {**meta, "sha256": "ab" * 32})
    _add(model_repo, "6", {"model.skops": v2 / "model.skops"}, {**meta, "sha256": sha})
    return model_repo


def _states(server: LiveServer) -> dict[str, dict[str, Any]]:
    return {v["version"]: v for v in server.get("/models/iris").json()["versions"]}


def test_without_pickles_skops_serves_and_everything_else_is_failed_by_reason(
    server_factory: Callable[..., LiveServer], mixed_repo: Path
) -> None:
    server = server_factory(mixed_repo, ALLOW_PICKLE="false", MODEL_POLL_SECONDS="0")
    states = _states(server)
    assert {v: s["state"] for v, s in states.items()} == {
        "1": "AVAILABLE", "2": "AVAILABLE", "3": "FAILED", "4": "FAILED", "5": "FAILED",
        "6": "AVAILABLE"}
    assert "model.joblib refused: ALLOW_PICKLE=false" in states["3"]["error"]
    assert f"untrusted types: {__name__}.Doubler" in states["4"]["error"]
    assert "does not match the sha256 pinned in metadata.json" in states["5"]["error"]
    assert states["6"]["sha256"] == hashlib.sha256(
        (mixed_repo / "iris" / "2" / "model.skops").read_bytes()).hexdigest()
    ready = server.get("/ready").json()
    assert sorted(ready["failed"]) == ["iris/3", "iris/4", "iris/5"]
    # Every skops version answers as its joblib twin does.
    for version, twin in (("1", "1"), ("2", "2"), ("6", "2")):
        expected = joblib.load(mixed_repo / "iris" / twin / "model.joblib").predict_proba(ROWS)
        answer = server.post("/predict/batch", json={"model": "iris", "version": version,
                                                      "instances": ROWS}).json()
        assert answer["version"] == version
        got = [[row[c] for c in ("setosa", "versicolor", "virginica")]
               for row in answer["probabilities"]]
        np.testing.assert_allclose(got, expected, rtol=0, atol=1e-12)
    for version in ("3", "4", "5"):
        resp = server.post(f"/predict/iris/versions/{version}", json={"features": ROWS[0]})
        assert resp.status_code == 503 and resp.json()["code"] == "version_unavailable"
    assert server.post("/predict/iris", json={"features": ROWS[0]}).json()["version"] == "6"


def test_with_pickles_allowed_a_pickle_serves_and_untrusted_skops_still_fails(
    server_factory: Callable[..., LiveServer], mixed_repo: Path
) -> None:
    server = server_factory(mixed_repo, MODEL_POLL_SECONDS="0")
    states = _states(server)
    assert {v: s["state"] for v, s in states.items()} == {
        "1": "AVAILABLE", "2": "AVAILABLE", "3": "AVAILABLE", "4": "FAILED", "5": "FAILED",
        "6": "AVAILABLE"}
    # Where both are there and pickles are allowed, model.joblib is the one loaded.
    assert states["1"]["sha256"] == hashlib.sha256(
        (mixed_repo / "iris" / "1" / "model.joblib").read_bytes()).hexdigest()
