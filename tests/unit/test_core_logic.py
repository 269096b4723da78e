"""Pure logic below the HTTP layer: names, paths, resolution, validation, matrices, settings."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from pydantic import ValidationError
from sklearn.ensemble import RandomForestClassifier
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from server.config import Settings
from server.errors import ApiError
from server.model.predict import to_matrix
from server.model.registry import ModelRegistry
from server.model.repository import ModelRepository, inside, is_valid_name, single_threaded
from server.schemas import BatchRequest, PredictRequest, error_details
from server.serving.dataplane import DataPlane


@pytest.mark.parametrize(("name", "ok"), [
    ("iris", True), ("breast_cancer", True), ("m-1.2", True), ("..", False), ("a..b", False),
    (".hidden", False), ("a/b", False), ("", False), ("x" * 129, False), ("a b", False),
])
def test_model_names_are_checked(name: str, ok: bool) -> None:
    assert is_valid_name(name) is ok


def test_inside_refuses_escapes_and_symlinks(tmp_path: Path) -> None:
    root = tmp_path / "repo"
    (root / "m").mkdir(parents=True)
    (root / "m" / "f").write_text("x")
    (tmp_path / "secret").write_text("s")
    (root / "m" / "link").symlink_to(tmp_path / "secret")
    assert inside(root, root / "m" / "f")
    assert not inside(root, root / "m" / ".." / ".." / "secret")
    assert not inside(root, root / "m" / "link")
    assert not inside(root, root / "missing")


@pytest.mark.parametrize(("name", "version"), [
    ("iris", "1"), ("../iris", "1"), ("iris", "../1"), ("iris", "0"), ("iris", "-1"),
    ("/etc", "1"), ("iris", "1/../../x"),
])
def test_artifact_path_only_for_well_formed_names(demo_repo: Path, name: str,
                                                  version: str) -> None:
    found = ModelRepository(demo_repo).artifact_path(name, version)
    assert (found is not None) is (name == "iris" and version == "1")


def test_n_jobs_is_forced_to_one_in_nested_estimators() -> None:
    est = make_pipeline(StandardScaler(), RandomForestClassifier(n_jobs=-1))
    single_threaded(est)
    assert est.get_params()["randomforestclassifier__n_jobs"] == 1


@pytest.mark.parametrize(("version", "expected"), [
    (None, "2"), ("", "2"), ("latest", "2"), ("stable", "1"), ("canary", "2"), ("1", "1"),
    (2, "2"),
])
def test_resolve_versions_and_labels(registry: ModelRegistry, version: object,
                                     expected: str) -> None:
    assert registry.resolve("iris", version).version == expected  # type: ignore[arg-type]


@pytest.mark.parametrize(("name", "version", "code"), [
    ("nosuch", None, "model_not_found"), ("iris", "7", "version_not_found"),
    ("iris", "beta", "version_not_found"), ("iris", "../1", "version_not_found"),
])
def test_resolve_failures_are_404(registry: ModelRegistry, name: str, version: str | None,
                                  code: str) -> None:
    with pytest.raises(ApiError) as info:
        registry.resolve(name, version)
    assert info.value.status == 404 and info.value.code == code


def test_reload_without_changes_keeps_the_same_objects(registry: ModelRegistry) -> None:
    before = registry.resolve("iris", "1")
    report = registry.reload()
    assert not report.touched
    assert registry.resolve("iris", "1") is before


@pytest.mark.parametrize(("payload", "loc"), [
    ({"features": [1, "a"]}, ["features", 1]),
    ({"features": {"a": None}}, ["features", "a"]),
    ({"features": [1], "version": 1.5}, ["version"]),
    ({"features": [1], "extra": 1}, ["extra"]),
    ({}, ["features"]),
])
def test_validation_errors_carry_clean_field_paths(payload: dict, loc: list) -> None:  # type: ignore[type-arg]
    with pytest.raises(ValidationError) as info:
        PredictRequest.model_validate(payload)
    assert error_details(info.value.errors())[0]["loc"] == loc


def test_batch_paths_include_row_index() -> None:
    with pytest.raises(ValidationError) as info:
        BatchRequest.model_validate({"instances": [[1, 2], [1, float("nan")]]})
    assert error_details(info.value.errors())[0]["loc"] == ["instances", 1, 1]


def test_to_matrix_orders_named_features(registry: ModelRegistry) -> None:
    lv = registry.resolve("iris", "1")
    X = to_matrix(lv, [{"petal_width": 4, "petal_length": 3, "sepal_width": 2,
                        "sepal_length": 1}], ["features"])
    assert X.dtype == np.dtype("<f8") and X.tolist() == [[1, 2, 3, 4]]


def test_dataplane_counts_rows(registry: ModelRegistry) -> None:
    plane = DataPlane(registry)
    out = plane.predict("iris", "1", [[5.1, 3.5, 1.4, 0.2]] * 3, ["instances"])
    assert len(out.results) == 3 and plane.predictions == 3


def test_settings_read_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in list(os.environ):
        if key in {"MODEL_DIR", "MAX_BATCH", "API_KEYS", "CACHE"}:
            monkeypatch.delenv(key)
    assert Settings().max_batch == 1000 and Settings().cache_enabled
    monkeypatch.setenv("MAX_BATCH", "5")
    monkeypatch.setenv("API_KEYS", " a, b ,,")
    monkeypatch.setenv("CACHE", "off")
    settings = Settings()
    assert settings.max_batch == 5 and settings.api_key_list == ["a", "b"]
    assert not settings.cache_enabled
    monkeypatch.setenv("MAX_BATCH", "zero")
    with pytest.raises(ValidationError):
        Settings()


@pytest.mark.parametrize("forest", ["random", "extra"])
def test_forest_fast_path_gives_the_estimators_bits(forest: str) -> None:
    from sklearn.datasets import load_breast_cancer
    from sklearn.ensemble import ExtraTreesClassifier

    from server.model.loaded import _proba_function

    data = load_breast_cancer()
    cls = RandomForestClassifier if forest == "random" else ExtraTreesClassifier
    est = cls(n_estimators=30, random_state=0).fit(data.data, data.target)
    fast = _proba_function(est)
    rng = np.random.default_rng(0)
    X = data.data[rng.integers(0, len(data.data), 500)] * rng.normal(1, 0.05, (500, 30))
    assert np.array_equal(fast(X), est.predict_proba(X))
    for i in range(20):
        assert np.array_equal(fast(X[i : i + 1]), est.predict_proba(X[i : i + 1]))


@pytest.mark.parametrize("scaled", [False, True])
def test_one_call_logistic_scores_match_predict_and_predict_proba(scaled: bool) -> None:
    from sklearn.datasets import load_wine
    from sklearn.linear_model import LogisticRegression

    from server.model.loaded import _scores_function

    data = load_wine()
    est = LogisticRegression(max_iter=5000)
    if scaled:
        est = make_pipeline(StandardScaler(), est)
    est.fit(data.data, data.target)
    scores = _scores_function(est, 13)
    assert scores is not None
    rng = np.random.default_rng(1)
    X = data.data[rng.integers(0, len(data.data), 300)] * rng.normal(1, 0.1, (300, 13))
    idx, proba = scores(X)
    assert np.array_equal(idx, est.predict(X)) and np.array_equal(proba, est.predict_proba(X))
    alone = np.vstack([est.predict_proba(X[i : i + 1]) for i in range(len(X))])
    for i in range(10):
        idx, proba = scores(X[i : i + 1])
        assert np.array_equal(proba, alone[i : i + 1])


def test_model_json_backend_is_every_versions_default(tmp_path: Path) -> None:
    import json

    import joblib
    from sklearn.datasets import load_iris
    from sklearn.linear_model import LogisticRegression

    X, y = load_iris(return_X_y=True)
    for version in ("1", "2"):
        (tmp_path / "m" / version).mkdir(parents=True)
        joblib.dump(LogisticRegression(max_iter=500).fit(X, y),
                    tmp_path / "m" / version / "model.joblib")
    (tmp_path / "m" / "2" / "metadata.json").write_text(json.dumps({"backend": "sklearn"}))
    spec = tmp_path / "m" / "model.json"
    spec.write_text(json.dumps({"backend": "onnx", "labels": {"stable": "1"}}))
    repo = ModelRepository(tmp_path)
    found = repo.scan()["m"]
    assert found.labels == {"stable": "1"}
    assert found.versions["1"].metadata["backend"] == "onnx"  # from model.json
    assert found.versions["2"].metadata["backend"] == "sklearn"  # metadata.json wins
    before = found.versions["1"].stamp
    spec.write_text(json.dumps({"backend": "onnx", "labels": {"stable": "2"}}))
    assert repo.scan()["m"].versions["1"].stamp == before  # moving a label reloads nothing
    spec.write_text(json.dumps({"labels": {"stable": "2"}}))
    after = repo.scan()["m"].versions["1"]
    assert after.stamp != before and "backend" not in after.metadata
