"""A version with ``"backend": "onnx"`` over a real gunicorn: described as such, and answering
the estimator's classes with its probabilities within 1e-6."""

from __future__ import annotations

import json
from collections.abc import Callable
from importlib.util import find_spec
from pathlib import Path
from typing import Any

import joblib
import numpy as np
import pytest
from sklearn.datasets import load_iris
from sklearn.ensemble import RandomForestClassifier
from sklearn.linear_model import LogisticRegression

from server.model.onnx import TOLERANCE
from tests.answers import assert_classes_agree
from tests.conftest import LiveServer

pytestmark = [pytest.mark.slow, pytest.mark.skipif(
    find_spec("onnxruntime") is None or find_spec("skl2onnx") is None,
    reason="requirements-onnx.txt is not installed")]

IRIS = load_iris()
CLASSES = ["setosa", "versicolor", "virginica"]


def write_repo(root: Path) -> dict[str, Any]:
    """iris v1 a 30-tree forest, v2 a logistic regression, both asking for ONNX."""
    estimators = {"1": RandomForestClassifier(n_estimators=30, random_state=0),
                  "2": LogisticRegression(max_iter=1000)}
    for version, est in estimators.items():
        est.fit(IRIS.data, IRIS.target)
        folder = root / "iris" / version
        folder.mkdir(parents=True)
        joblib.dump(est, folder / "model.joblib")
        (folder / "metadata.json").write_text(json.dumps(
            {"class_names": CLASSES, "task": "classification", "backend": "onnx"}))
    return estimators


def test_onnx_versions_are_described_and_answer_like_the_estimator(
        tmp_path: Path, server_factory: Callable[..., LiveServer]) -> None:
    estimators = write_repo(tmp_path / "models")
    server = server_factory(tmp_path / "models", CACHE="off", WORKERS="1")
    versions = server.get("/models/iris").json()["versions"]
    assert [v["backend"] for v in versions] == ["onnx", "onnx"], versions
    assert all("max |difference|" in v["backend_note"] for v in versions)

    rows = np.random.default_rng(5).uniform(IRIS.data.min(0) - 1, IRIS.data.max(0) + 1,
                                            (200, 4))
    X = np.vstack([IRIS.data, rows])
    for version, est in estimators.items():
        resp = server.post("/predict/batch",
                           json={"model": "iris", "version": version, "instances": X.tolist()})
        assert resp.status_code == 200, resp.text
        got = resp.json()
        # The forest's classes are exact; the logistic regression's session multiplies with
        # ONNX Runtime's kernels for this CPU: its class is compared except near a tie.
        tie = 2 * TOLERANCE
        if version == "1":
            assert got["predictions"] == est.predict(X).tolist()
        else:
            assert_classes_agree(got["predictions"], est.predict(X).tolist(),
                                 est.predict_proba(X), tie)
        proba = np.array([[p[c] for c in CLASSES] for p in got["probabilities"]])
        assert np.abs(proba - est.predict_proba(X)).max() <= TOLERANCE

        single = server.post("/predict", json={"model": "iris", "version": version,
                                               "features": X[7].tolist()}).json()
        if version == "1":
            assert single["prediction"] == est.predict(X[7:8])[0]
        else:
            assert_classes_agree([single["prediction"]], est.predict(X[7:8]).tolist(),
                                 est.predict_proba(X[7:8]), tie)
        want = est.predict_proba(X[7:8])[0]
        assert max(abs(single["probabilities"][c] - p) for c, p in zip(CLASSES, want)) \
            <= TOLERANCE
