"""The repository on disk: model names, paths inside it, artifact lookup, single-threaded
estimators and model.json."""

from __future__ import annotations

from pathlib import Path

import pytest
from sklearn.ensemble import RandomForestClassifier
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from server.model.repository import ModelRepository, inside, is_valid_name, single_threaded


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
