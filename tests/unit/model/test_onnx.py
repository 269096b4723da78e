"""The optional ONNX Runtime backend: conversions that agree with the estimator are served,
anything else falls back to the estimator with the reason in ``describe()``."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from functools import cache
from importlib.util import find_spec
from pathlib import Path
from typing import Any

import joblib
import numpy as np
import pytest
from sklearn.base import BaseEstimator, RegressorMixin
from sklearn.datasets import load_diabetes, load_iris
from sklearn.ensemble import GradientBoostingRegressor, RandomForestClassifier
from sklearn.linear_model import LogisticRegression, Ridge
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from server.model.loaded import LoadedVersion, build_version
from server.model.onnx import TOLERANCE, compile_onnx
from server.model.predict import predict_matrix
from server.model.registry import ModelRegistry
from server.model.repository import ModelRepository, VersionOnDisk
from tests.answers import assert_classes_agree

needs_onnx = pytest.mark.skipif(find_spec("onnxruntime") is None or find_spec("skl2onnx") is None,
                                reason="requirements-onnx.txt is not installed")

IRIS = load_iris()
DIABETES = load_diabetes()


@cache
def fitted(kind: str) -> tuple[Any, np.ndarray]:
    """(a fitted estimator, its training data), fitted once per run."""
    make: dict[str, Callable[[], Any]] = {
        "lr": lambda: LogisticRegression(max_iter=1000),
        "rf50": lambda: RandomForestClassifier(n_estimators=50, random_state=0),
        "scaled-lr": lambda: make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000)),
        "ridge": lambda: Ridge(alpha=1.0),
        "scaled-ridge": lambda: make_pipeline(StandardScaler(), Ridge(alpha=1.0)),
        "gbr": lambda: GradientBoostingRegressor(n_estimators=30, random_state=0),
    }
    data = DIABETES if kind in {"ridge", "scaled-ridge", "gbr"} else IRIS
    return make[kind]().fit(data.data, data.target), data.data


def random_rows(data: np.ndarray, n: int, seed: int = 11) -> np.ndarray:
    """Rows spread over the training range and a fifth beyond it on each side."""
    lo, hi = data.min(axis=0), data.max(axis=0)
    span = hi - lo
    return np.random.default_rng(seed).uniform(lo - span / 5, hi + span / 5, (n, data.shape[1]))


class Halver(RegressorMixin, BaseEstimator):
    """A regressor of our own: skl2onnx has no converter for it."""

    def fit(self, X: np.ndarray, y: np.ndarray) -> Halver:
        self.n_features_in_ = X.shape[1]
        return self

    def predict(self, X: np.ndarray) -> np.ndarray:
        return np.asarray(X)[:, 0] / 2


def same_classes(kind: str, got: np.ndarray, want: np.ndarray, proba: np.ndarray) -> None:
    """A forest's classes are compared exactly (its votes add up, no matrix product). A
    linear model's session multiplies with ONNX Runtime's kernels for this CPU, not with
    sklearn's BLAS: where two probabilities are within the tolerance of each other either
    class is right, so classes are compared on the other rows."""
    if kind.startswith("rf"):
        assert np.array_equal(got, want)
    else:
        assert_classes_agree(np.asarray(got).tolist(), np.asarray(want).tolist(), proba,
                             tie=2 * TOLERANCE)


# --- the converted session against the estimator ------------------------------------------------
@needs_onnx
@pytest.mark.parametrize("kind", ["lr", "rf50", "scaled-lr"])
def test_classifier_sessions_give_the_same_classes_and_probabilities_within_1e6(kind: str) -> None:
    est, data = fitted(kind)
    model, note = compile_onnx(est, data.shape[1], classifier=True)
    assert model is not None, note
    assert "float64 input" in note
    X = np.vstack([random_rows(data, 1000), data])  # the training rows hit thresholds exactly
    idx, proba = model.scores(X)
    same_classes(kind, est.classes_[idx], est.predict(X), est.predict_proba(X))
    same_classes(kind, model.predict(X), est.predict(X), est.predict_proba(X))
    assert np.abs(proba - est.predict_proba(X)).max() <= TOLERANCE
    assert np.abs(model.proba(X) - est.predict_proba(X)).max() <= TOLERANCE
    for i in range(0, 1000, 100):  # one-row calls too
        same_classes(kind, model.predict(X[i : i + 1]), est.predict(X[i : i + 1]),
                     est.predict_proba(X[i : i + 1]))


@needs_onnx
@pytest.mark.parametrize("kind", ["ridge", "scaled-ridge"])
def test_regressor_sessions_agree_within_1e6(kind: str) -> None:
    est, data = fitted(kind)
    model, note = compile_onnx(est, data.shape[1], classifier=False)
    assert model is not None, note
    X = random_rows(data, 1000)
    got = model.predict(X)
    assert got.shape == (1000,) and np.abs(got - est.predict(X)).max() <= TOLERANCE


@needs_onnx
def test_forest_rounds_inputs_to_float32_like_scikit_learn() -> None:
    """Rows set exactly on split thresholds (and their float32 neighbours) take scikit-learn's
    branch; without the float32 Cast, the probes catch the float64 graph disagreeing."""
    import server.model.onnx as backend

    est, data = fitted("rf50")
    thresholds = np.concatenate([t.tree_.threshold[t.tree_.feature >= 0]
                                 for t in est.estimators_])
    features = np.concatenate([t.tree_.feature[t.tree_.feature >= 0] for t in est.estimators_])
    X = np.repeat(data[:1], len(features), axis=0)
    X[np.arange(len(features)), features] = thresholds.astype(np.float32)
    model, _ = compile_onnx(est, 4, classifier=True)
    assert model is not None
    assert np.array_equal(model.predict(X), est.predict(X))
    assert np.abs(model.proba(X) - est.predict_proba(X)).max() <= TOLERANCE

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(backend, "_fit_trees_to_float64", lambda graph, round_inputs: None)
        _, note = compile_onnx(est, 4, classifier=True)
    assert "float64 graph:" in note  # refused (then float32 tried), never served as is


@needs_onnx
def test_forest_vote_fractions_come_back_exact() -> None:
    est, data = fitted("rf50")
    model, _ = compile_onnx(est, 4, classifier=True)
    assert model is not None
    assert np.array_equal(model.proba(data), est.predict_proba(data))


@needs_onnx
@pytest.mark.parametrize(("kind", "reason"), [
    ("halver", "MissingShapeCalculator"),  # no converter for a class of our own
    ("kernel-ridge", "MissingShapeCalculator"),  # a scikit-learn estimator without one
    ("gbr", "answers differ by up to"),  # tree regressors answer float32: 1e-5 on diabetes
])
def test_unconvertible_or_disagreeing_models_are_refused_with_the_reason(kind: str,
                                                                        reason: str) -> None:
    from sklearn.kernel_ridge import KernelRidge

    if kind == "gbr":
        est, data = fitted("gbr")
    else:
        data = DIABETES.data
        est = (Halver() if kind == "halver" else KernelRidge()).fit(data, DIABETES.target)
    model, note = compile_onnx(est, data.shape[1], classifier=False)
    assert model is None
    assert "float64 graph:" in note and "float32 graph:" in note and reason in note


def test_missing_packages_mean_no_session(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # `import onnxruntime` raises
    est, data = fitted("lr")
    model, note = compile_onnx(est, 4, classifier=True)
    assert model is None and "onnx backend unavailable" in note


# --- through the registry and the data plane ---------------------------------------------------
def write_version(root: Path, name: str, estimator: Any, **metadata: Any) -> None:
    folder = root / name / "1"
    folder.mkdir(parents=True)
    joblib.dump(estimator, folder / "model.joblib")
    (folder / "metadata.json").write_text(json.dumps(metadata))


def refuse_calls(lv: LoadedVersion, monkeypatch: pytest.MonkeyPatch) -> None:
    """Make any call to the estimator itself fail: what answers then is the session."""
    def boom(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("the estimator was called")

    for method in ("predict", "predict_proba", "decision_function"):
        monkeypatch.setattr(lv.estimator, method, boom, raising=False)


@pytest.fixture(scope="module")
def onnx_registry(tmp_path_factory: pytest.TempPathFactory) -> ModelRegistry:
    root = tmp_path_factory.mktemp("onnx") / "models"
    write_version(root, "lr", fitted("lr")[0], backend="onnx")
    write_version(root, "rf", fitted("rf50")[0], backend="onnx")
    write_version(root, "ridge", fitted("scaled-ridge")[0], backend="onnx")
    write_version(root, "plain", fitted("lr")[0])
    write_version(root, "typo", fitted("lr")[0], backend="onxx")
    write_version(root, "custom", Halver().fit(DIABETES.data, DIABETES.target), backend="onnx")
    registry = ModelRegistry(ModelRepository(root))
    registry.reload()
    return registry


@needs_onnx
@pytest.mark.parametrize("name", ["lr", "rf"])
def test_registry_serves_classifiers_from_the_session(onnx_registry: ModelRegistry, name: str,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    lv = onnx_registry.resolve(name)
    described = lv.describe()
    assert described["backend"] == "onnx" and "max |difference|" in described["backend_note"]
    est = joblib.load(onnx_registry.repository.root / name / "1" / "model.joblib")
    X = random_rows(IRIS.data, 1000)
    refuse_calls(lv, monkeypatch)
    for rows in (X, X[:1]):
        got = predict_matrix(lv, rows)
        same_classes(name, np.array([r["prediction"] for r in got]), est.predict(rows),
                     est.predict_proba(rows))
        proba = np.array([list(r["probabilities"].values()) for r in got])
        assert np.abs(proba - est.predict_proba(rows)).max() <= TOLERANCE
        assert [r["confidence"] for r in got] == proba.max(axis=1).tolist()


@needs_onnx
def test_registry_regressor_gets_an_onnx_predict(onnx_registry: ModelRegistry) -> None:
    lv = onnx_registry.resolve("ridge")
    assert lv.describe()["backend"] == "onnx" and lv.predict_fn is not None
    X = random_rows(DIABETES.data, 1000)
    want = lv.estimator.predict(X)
    assert np.abs(lv.predict_fn(X) - want).max() <= TOLERANCE
    got = [r["prediction"] for r in predict_matrix(lv, X)]
    assert np.abs(np.array(got) - want).max() <= TOLERANCE


@needs_onnx
def test_data_plane_answers_regressors_from_the_session(onnx_registry: ModelRegistry,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    lv = onnx_registry.resolve("ridge")
    refuse_calls(lv, monkeypatch)
    predict_matrix(lv, random_rows(DIABETES.data, 10))


@pytest.mark.parametrize(("name", "note"), [
    ("plain", None),
    ("typo", "unknown backend 'onxx'"),
    ("custom", "MissingShapeCalculator"),
])
def test_versions_that_do_not_get_onnx_load_on_sklearn_and_say_why(
        onnx_registry: ModelRegistry, name: str, note: str | None) -> None:
    if note == "MissingShapeCalculator" and find_spec("skl2onnx") is None:
        note = "onnx backend unavailable"
    described = onnx_registry.resolve(name).describe()
    assert described["state"] == "AVAILABLE" and described["backend"] == "sklearn"
    assert (note is None) == ("backend_note" not in described)
    assert note is None or note in described["backend_note"]


def test_missing_packages_load_the_version_on_sklearn(monkeypatch: pytest.MonkeyPatch,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setitem(sys.modules, "skl2onnx", None)
    est, _ = fitted("rf50")
    found = VersionOnDisk("m", "1", Path("m/1/model.joblib"), 0, 0, 0, {"backend": "onnx"})
    lv = build_version(found, est, "0" * 64)
    assert lv.backend == "sklearn" and lv.predict_fn is None
    assert "onnx backend unavailable" in (lv.backend_note or "")
    assert any("onnx backend not used" in r.getMessage() for r in caplog.records)
    X = random_rows(IRIS.data, 50)
    assert [r["prediction"] for r in predict_matrix(lv, X)] == est.predict(X).tolist()
