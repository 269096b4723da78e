"""Artifact formats: skops with trusted types only, ALLOW_PICKLE, a pinned sha256, which
artifact of a folder is loaded, and an estimator's measured size."""

from __future__ import annotations

import hashlib
import json
import sys
import types
from pathlib import Path
from typing import Any

import joblib
import numpy as np
import pytest
import skops.io
from sklearn.base import BaseEstimator
from sklearn.datasets import load_iris
from sklearn.ensemble import RandomForestClassifier
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import FunctionTransformer

from server.model import repository as repository_module
from server.model.formats import SKOPS, artifact_order, memory_bytes
from server.model.registry import FailedVersion, ModelRegistry
from server.model.repository import ModelRepository

X, Y = load_iris(return_X_y=True)


class Doubler(BaseEstimator):  # type: ignore[misc]
    """An estimator of our own: a type skops does not know."""

    def fit(self, X: Any, y: Any) -> Doubler:
        self.n_features_in_ = X.shape[1]
        return self

    def predict(self, X: Any) -> Any:
        return np.asarray(X)[:, 0] * 2


def _version(root: Path, name: str, version: str, files: dict[str, Any],
             metadata: dict[str, Any] | None = None) -> Path:
    folder = root / name / version
    folder.mkdir(parents=True)
    for filename, estimator in files.items():
        if filename == SKOPS:
            skops.io.dump(estimator, folder / filename)
        else:
            joblib.dump(estimator, folder / filename)
    if metadata is not None:
        (folder / "metadata.json").write_text(json.dumps(metadata))
    return folder


def _load(root: Path, allow_pickle: bool = True) -> ModelRegistry:
    registry = ModelRegistry(ModelRepository(root, allow_pickle))
    registry.reload()
    return registry


def _state(registry: ModelRegistry, name: str, version: str) -> tuple[str, str]:
    """("AVAILABLE", file it came from) or ("FAILED", the error)."""
    entry = registry.get(name)
    if version in entry.failed:
        failed: FailedVersion = entry.failed[version]
        return "FAILED", failed.error
    assert version in entry.versions
    path = registry.repository.artifact_path(name, version)
    assert path is not None
    return "AVAILABLE", path.name


@pytest.mark.parametrize("estimator", [
    LogisticRegression(max_iter=500),
    RandomForestClassifier(n_estimators=5, random_state=0),  # sklearn.tree._tree.Tree
    make_pipeline(FunctionTransformer(np.log1p), LogisticRegression(max_iter=500)),  # numpy.log1p
])
def test_skops_of_sklearn_numpy_and_scipy_types_serves_like_joblib(tmp_path: Path,
                                                                   estimator: Any) -> None:
    fitted = estimator.fit(X, Y)
    _version(tmp_path, "m", "1", {SKOPS: fitted})
    lv = _load(tmp_path, allow_pickle=False).resolve("m", "1")
    np.testing.assert_array_equal(lv.estimator.predict_proba(X), fitted.predict_proba(X))


def test_skops_with_a_type_of_its_own_is_failed_with_the_type_named(tmp_path: Path) -> None:
    _version(tmp_path, "m", "1", {SKOPS: Doubler().fit(X, Y)})
    state, error = _state(_load(tmp_path), "m", "1")
    assert state == "FAILED"
    assert "untrusted types" in error and f"{__name__}.Doubler" in error


def test_a_module_that_only_starts_like_sklearn_is_not_trusted(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake = types.ModuleType("sklearn_extra_evil")
    monkeypatch.setitem(sys.modules, "sklearn_extra_evil", fake)
    cls = type("Model", (Doubler,), {"__module__": "sklearn_extra_evil"})
    fake.Model = cls  # type: ignore[attr-defined]
    _version(tmp_path, "m", "1", {SKOPS: cls().fit(X, Y)})
    state, error = _state(_load(tmp_path), "m", "1")
    assert state == "FAILED" and "sklearn_extra_evil.Model" in error


@pytest.mark.parametrize(("files", "allow_pickle", "state", "detail"), [
    (("model.joblib",), True, "AVAILABLE", "model.joblib"),
    (("model.pkl",), True, "AVAILABLE", "model.pkl"),
    ((SKOPS,), True, "AVAILABLE", SKOPS),
    ((SKOPS, "model.joblib"), True, "AVAILABLE", "model.joblib"),
    ((SKOPS, "model.joblib"), False, "AVAILABLE", SKOPS),
    ((SKOPS,), False, "AVAILABLE", SKOPS),
    (("model.joblib",), False, "FAILED", "model.joblib refused: ALLOW_PICKLE=false"),
    (("model.pkl",), False, "FAILED", "model.pkl refused: ALLOW_PICKLE=false"),
])
def test_which_artifact_loads_and_allow_pickle(tmp_path: Path, files: tuple[str, ...],
                                               allow_pickle: bool, state: str,
                                               detail: str) -> None:
    fitted = LogisticRegression(max_iter=500).fit(X, Y)
    _version(tmp_path, "m", "1", dict.fromkeys(files, fitted))
    found_state, found = _state(_load(tmp_path, allow_pickle), "m", "1")
    assert found_state == state and detail in found


def test_skops_is_searched_first_only_without_pickles() -> None:
    assert artifact_order(True)[-1] == SKOPS and artifact_order(False)[0] == SKOPS


@pytest.mark.parametrize("case", ["match", "upper", "mismatch", "not a string"])
def test_a_pinned_sha256_must_match_and_a_mismatch_is_never_deserialized(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, case: str) -> None:
    fitted = LogisticRegression(max_iter=500).fit(X, Y)
    folder = _version(tmp_path, "m", "1", {"model.joblib": fitted})
    sha = hashlib.sha256((folder / "model.joblib").read_bytes()).hexdigest()
    pin: Any = {"match": sha, "upper": sha.upper(), "mismatch": "0" * 64,
                "not a string": 12}[case]
    (folder / "metadata.json").write_text(json.dumps({"sha256": pin}))
    real = repository_module.deserialize
    calls: list[str] = []

    def spy(filename: str, data: bytes, allow_pickle: bool) -> Any:
        calls.append(filename)
        return real(filename, data, allow_pickle)

    monkeypatch.setattr(repository_module, "deserialize", spy)
    registry = _load(tmp_path)
    state, detail = _state(registry, "m", "1")
    if case in ("match", "upper"):
        assert state == "AVAILABLE" and calls == ["model.joblib"]
        assert registry.resolve("m", "1").sha256 == sha
    else:
        assert state == "FAILED" and "does not match the sha256 pinned" in detail
        assert sha in detail and calls == []


def test_memory_bytes_counts_the_arrays_without_copying_them() -> None:
    small = LogisticRegression(max_iter=500).fit(X, Y)
    big = RandomForestClassifier(n_estimators=50, random_state=0).fit(X, Y)
    assert 0 < memory_bytes(small) < memory_bytes(big)
    array = np.zeros(1_000_000)  # 8 MB, out of band
    assert 8_000_000 <= memory_bytes(array) < 8_001_000
