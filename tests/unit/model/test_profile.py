"""Reference profiles: quantile bins (ties, constant features, empty data), missing and
out-of-range values, prediction shares, profile.json read back and checked against its
version, and how a version loads with a missing, corrupt or changed profile (a change to the
profile alone keeps the loaded model)."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from server.model.predict import predict_matrix
from server.model.profile import (
    FILE,
    ProfileError,
    bin_edges,
    load_profile,
    profile_bytes,
    reference,
    write_profile,
)
from server.model.registry import ModelRegistry
from server.model.repository import ModelRepository
from server.serving.batching import batch_mode

NAMES = ["a", "b"]


def loaded(doc: dict[str, Any], n_features: int | None = 2, names: Any = NAMES,
           classes: Any = (0, 1)) -> Any:
    return load_profile(profile_bytes(doc), n_features, names, classes)


@pytest.mark.parametrize(("values", "edges"), [
    (np.arange(1.0, 101.0), [10, 20, 30, 40, 50, 60, 70, 80, 90]),  # the deciles
    (np.array([0.0] * 70 + [1.0] * 30), [1.0]),  # binary: ties collapse to one edge
    (np.array([0.0] * 20 + [1.0] * 60 + [2.0] * 20), [1.0, 2.0]),  # a heavy middle value
    (np.array([0.0] * 5 + [1.0] * 90 + [2.0] * 5), [1.0]),  # under a decile: no bin of its own
    (np.array([], dtype=float), []),
])
def test_bin_edges_are_deduplicated_data_values_above_the_minimum(values: np.ndarray,
                                                                  edges: list[float]) -> None:
    found = bin_edges(values)
    assert found.tolist() == edges
    if len(values):
        counts = np.bincount(np.searchsorted(found, values, side="right"))
        assert (counts > 0).all()  # no empty bin on the training data


def test_a_constant_feature_has_a_bin_below_its_value_and_one_above() -> None:
    edges = bin_edges(np.full(50, 3.0))
    assert edges[0] == 3.0 and edges[1] == np.nextafter(3.0, np.inf)
    assert np.searchsorted(edges, [2.9, 3.0, 3.1], side="right").tolist() == [0, 1, 2]


def test_reference_counts_bins_missing_and_range_per_feature() -> None:
    X = np.array([[1.0, 5.0], [2.0, 5.0], [3.0, np.nan], [4.0, 5.0]])
    doc = reference(X, [0, 1, 1, 1], NAMES, [0, 1], bins=2)
    a, b = doc["features"]
    assert a["edges"] == [2.0] and a["counts"] == [1, 3] and a["proportions"] == [0.25, 0.75]
    assert (a["min"], a["max"], a["missing"]) == (1.0, 4.0, 0.0)
    assert b["counts"] == [0, 3, 0] and b["missing"] == 0.25  # constant: below, 5.0, above
    assert doc["rows"] == 4 and doc["format"] == 1 and doc["created"].endswith("Z")
    assert doc["prediction"] == {"kind": "classes", "classes": [0, 1], "counts": [1, 3],
                                 "proportions": [0.25, 0.75]}


def test_prediction_reference_keeps_every_class_in_order_and_bins_a_regressor() -> None:
    X = np.arange(20.0).reshape(10, 2)
    doc = reference(X, ["b"] * 10, NAMES, ["a", "b", "c"])
    assert doc["prediction"]["classes"] == ["a", "b", "c"]
    assert doc["prediction"]["counts"] == [0, 10, 0]
    doc = reference(X, np.arange(10.0), NAMES, None, bins=5)
    pred = doc["prediction"]
    assert pred["kind"] == "quantiles" and pred["edges"] == [1.0, 3.0, 5.0, 7.0]
    assert pred["counts"] == [1, 2, 2, 2, 3]


def test_profile_json_reads_back_with_a_fingerprint_of_its_bytes(tmp_path: Path) -> None:
    X = np.random.default_rng(0).normal(size=(200, 2))
    doc = reference(X, [0, 1] * 100, NAMES, [0, 1])
    path = write_profile(tmp_path, doc)
    assert path == tmp_path / FILE and not list(tmp_path.glob(".*tmp"))
    raw = path.read_bytes()
    assert json.loads(raw) == doc
    profile = load_profile(raw, 2, NAMES, [0, 1])
    assert [f.name for f in profile.features] == NAMES and profile.rows == 200
    assert profile.features[0].counts.sum() == 200
    assert np.isclose(profile.features[0].proportions.sum(), 1.0)
    other = load_profile(profile_bytes({**doc, "rows": 201}), 2, NAMES, [0, 1])
    assert other.fingerprint != profile.fingerprint and len(profile.fingerprint) == 16


def _doc() -> dict[str, Any]:
    return reference(np.arange(40.0).reshape(20, 2), [0, 1] * 10, NAMES, [0, 1])


@pytest.mark.parametrize(("change", "reason"), [
    (lambda d: {**d, "format": 2}, "format 2: this server reads format 1"),
    (lambda d: {**d, "features": d["features"][:1]}, "1 features profiled, the model takes 2"),
    (lambda d: {**d, "features": [{**d["features"][0], "name": "x"}, d["features"][1]]},
     "feature names differ"),
    (lambda d: {**d, "prediction": {**d["prediction"], "classes": [1, 2]}}, "classes [1, 2]"),
    (lambda d: {**d, "features": [{**d["features"][0], "edges": [3.0, 1.0]},
                                  d["features"][1]]}, "increasing"),
    (lambda d: {**d, "features": [{**d["features"][0], "counts": [1]}, d["features"][1]]},
     "non-negative counts expected"),
    (lambda d: {k: v for k, v in d.items() if k != "rows"}, "malformed: KeyError"),
])
def test_a_profile_that_does_not_fit_its_version_says_why(change: Any, reason: str) -> None:
    with pytest.raises(ProfileError, match=reason.replace("[", r"\[").replace("]", r"\]")):
        loaded(change(_doc()))


def test_bytes_that_are_not_a_profile_say_so() -> None:
    with pytest.raises(ProfileError, match="not JSON"):
        load_profile(b"{half", 2, NAMES, None)
    with pytest.raises(ProfileError, match="not a JSON object"):
        load_profile(b"[1, 2]", 2, NAMES, None)


def test_cells_count_bins_edges_out_of_range_missing_and_predictions() -> None:
    doc = reference(np.array([[0.0, 1.0], [10.0, 1.0], [20.0, 1.0], [30.0, 1.0]]),
                    [0, 0, 1, 1], NAMES, [0, 1], bins=2)
    profile = loaded(doc)
    cells = profile.cells
    assert profile.features[0].edges.tolist() == [10.0]
    X = np.array([[10.0, 1.0],   # on the edge: the bin above
                  [-5.0, 1.0],   # below the training minimum: first bin, out of range
                  [35.0, 2.0],   # above both maxima
                  [np.nan, 1.0]])
    vec = cells.count(X, [1, 0, 1, 7])  # 7 is not a class: not counted
    assert vec[cells.feature(0)].tolist() == [1, 2]
    assert vec[cells.missing(0)] == 1 and vec[cells.out_of_range(0)] == 2
    assert vec[cells.feature(1)].tolist() == [0, 3, 1]  # constant 1.0: below, at, above
    assert vec[cells.out_of_range(1)] == 1
    assert vec[cells.prediction()].tolist() == [1, 2]
    assert vec[cells.rows] == vec[cells.served] == 4
    assert cells.names[cells.feature(1).start] == "f1:0" and cells.names[-2:] == ["rows",
                                                                                  "served"]
    assert len(cells.names) == cells.size == len(set(cells.names))


def test_cells_count_a_regressors_predictions_into_quantile_bins() -> None:
    doc = reference(np.arange(20.0).reshape(10, 2), np.arange(10.0), NAMES, None, bins=2)
    profile = loaded(doc, classes=None)
    assert profile.prediction.edges.tolist() == [4.0]  # type: ignore[union-attr]
    vec = profile.cells.count(np.zeros((3, 2)), [-1.0, 4.0, 5.0])
    assert vec[profile.cells.prediction()].tolist() == [1, 2]


# --- a version and its profile.json -------------------------------------------------------
def _registry(root: Path) -> ModelRegistry:
    reg = ModelRegistry(ModelRepository(root), on_load=[lambda lv: batch_mode(lv,
                                                                               predict_matrix)])
    reg.reload()
    return reg


def test_demo_versions_load_with_their_profiles(registry: ModelRegistry) -> None:
    for name, version in (("iris", "1"), ("iris", "2"), ("breast_cancer", "1"),
                          ("diabetes", "1")):
        lv = registry.resolve(name, version)
        assert lv.profile is not None and lv.profile_note is None
        assert [f.name for f in lv.profile.features] == list(lv.feature_names or [])
    assert registry.resolve("diabetes").profile.prediction.kind == "quantiles"  # type: ignore


@pytest.mark.parametrize(("content", "note"), [
    (None, "no profile.json beside the artifact"),
    (b"{not json", "profile.json unusable: not JSON"),
    (b'{"format": 1, "features": [], "rows": 3}', "0 features profiled, the model takes 4"),
])
def test_a_version_without_a_usable_profile_serves_and_says_why(
        demo_repo: Path, tmp_path: Path, content: bytes | None, note: str) -> None:
    root = Path(shutil.copytree(demo_repo, tmp_path / "models"))
    path = root / "iris" / "1" / FILE
    if content is None:
        path.unlink()
    else:
        path.write_bytes(content)
    lv = _registry(root).resolve("iris", "1")
    assert lv.profile is None and lv.profile_note is not None and note in lv.profile_note
    assert predict_matrix(lv, np.array([[5.1, 3.5, 1.4, 0.2]]))[0]["label"] == "setosa"


def test_a_new_profile_json_reloads_the_version(demo_repo: Path, tmp_path: Path) -> None:
    root = Path(shutil.copytree(demo_repo, tmp_path / "models"))
    path = root / "iris" / "1" / FILE
    raw = path.read_bytes()
    path.unlink()
    reg = _registry(root)
    assert reg.resolve("iris", "1").profile is None
    time.sleep(0.01)
    path.write_bytes(raw)
    report = reg.reload()
    assert report.changed == [] and report.added == []  # the same artifact: no event
    profile = reg.resolve("iris", "1").profile
    assert profile is not None and profile.rows == 112


@pytest.mark.parametrize(("change", "rows", "note"), [
    ("edit", 113, None),
    ("remove", None, "no profile.json beside the artifact"),
    ("corrupt", None, "profile.json unusable: not JSON"),
])
def test_a_changed_profile_json_alone_does_not_load_the_model_again(
        demo_repo: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, change: str,
        rows: int | None, note: str | None) -> None:
    root = Path(shutil.copytree(demo_repo, tmp_path / "models"))
    reg = _registry(root)
    before = reg.resolve("iris", "1")
    path = root / "iris" / "1" / FILE
    time.sleep(0.01)
    if change == "edit":
        write_profile(path.parent, {**json.loads(path.read_bytes()), "rows": 113})
    elif change == "remove":
        path.unlink()
    else:
        path.write_bytes(b"{half")

    def no_artifact_read(*args: Any) -> Any:
        raise AssertionError("the artifact was read again")

    monkeypatch.setattr(ModelRepository, "read", no_artifact_read)
    assert not reg.reload().touched
    after = reg.resolve("iris", "1")
    assert after.estimator is before.estimator and after.loaded_at == before.loaded_at
    assert after.stamp != before.stamp
    assert (after.profile.rows if after.profile else None) == rows
    assert after.profile_note is None if note is None else \
        (after.profile_note or "").startswith(note)
    assert reg.reload().touched is False and reg.resolve("iris", "1") is after


def test_training_writes_the_new_versions_profile(demo_repo: Path, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    from server.jobs.training import train

    root = Path(shutil.copytree(demo_repo, tmp_path / "models"))
    version = train(root, "iris", 2, None, 42)
    capsys.readouterr()  # the epochs' JSON lines
    lv = _registry(root).resolve("iris", version)
    assert lv.profile is not None and lv.profile.rows == 112  # the 75 % it was fitted on
    assert lv.profile.prediction is not None and lv.profile.prediction.classes == [0, 1, 2]
    assert lv.profile.source == "POST /train/stream: the training rows"
