"""``python -m server.demo DIR``: write the demo model repository (idempotent).

Fitted on scikit-learn's bundled data sets, nothing downloaded: iris v1 LogisticRegression
and v2 RandomForest (labels stable=1, canary=2), breast_cancer, diabetes, and the ``iris-ab``
experiment splitting iris 50/50 between v1 and v2. Each model's whole data set is also written
to ``NAME/data/train.csv`` (feature columns + ``target``) for ``POST /train/stream``; the scan
only reads integer folders, so ``data/`` is never taken for a version. Each version gets a
``profile.json``, the reference for drift monitoring, from the rows it was fitted on (and
one is added to a version written before profiles existed).
"""

from __future__ import annotations

import csv
import json
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import joblib
from sklearn import datasets
from sklearn.ensemble import RandomForestClassifier
from sklearn.linear_model import LogisticRegression, Ridge
from sklearn.model_selection import train_test_split
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from server.config import Settings
from server.model.formats import SKOPS, dump_skops
from server.model.profile import FILE as PROFILE
from server.model.profile import reference, write_profile

SEED = 42


def clean_name(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", re.sub(r"\(.*?\)", "", name.lower())).strip("_")


def _specs() -> list[tuple[str, str, Callable[[], Any], Callable[[], Any], str]]:
    return [
        ("iris", "1", datasets.load_iris,
         lambda: LogisticRegression(max_iter=1000), "Iris species, logistic regression"),
        ("iris", "2", datasets.load_iris,
         lambda: RandomForestClassifier(n_estimators=100, random_state=SEED),
         "Iris species, random forest of 100 trees"),
        ("breast_cancer", "1", datasets.load_breast_cancer,
         lambda: make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000)),
         "Breast cancer diagnosis, scaled logistic regression"),
        ("diabetes", "1", datasets.load_diabetes,
         lambda: make_pipeline(StandardScaler(), Ridge(alpha=1.0)),
         "Diabetes progression after one year, ridge regression"),
    ]


LABELS = {"iris": {"stable": "1", "canary": "2"}}
EXPERIMENTS = {
    "iris-ab": {
        "model": "iris",
        "arms": {"control": {"version": "1", "weight": 50},
                 "treatment": {"version": "2", "weight": 50}},
    }
}


def write_version(root: Path, name: str, version: str, loader: Callable[[], Any],
                  make: Callable[[], Any], description: str) -> bool:
    """Fit and write one version unless its artifact already exists (then only add its
    profile.json if it has none)."""
    folder = root / name / version
    data = loader()
    X_train, X_test, y_train, y_test = train_test_split(
        data.data, data.target, test_size=0.25, random_state=SEED
    )
    if (folder / "model.joblib").exists():
        if not (folder / PROFILE).exists():
            _write_profile(folder, joblib.load(folder / "model.joblib"), X_train, data, name)
        if not (folder / SKOPS).exists():  # a repository written before skops was
            _write_skops(folder, joblib.load(folder / "model.joblib"))
        return False
    estimator = make().fit(X_train, y_train)
    classifier = hasattr(estimator, "classes_")
    meta: dict[str, Any] = {
        "feature_names": [clean_name(n) for n in data.feature_names],
        "task": "classification" if classifier else "regression",
        "description": description,
        "metrics": {("accuracy" if classifier else "r2"): round(
            float(estimator.score(X_test, y_test)), 4)},
    }
    if classifier:
        meta["class_names"] = [str(n) for n in data.target_names]
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / "model.joblib.tmp"
    joblib.dump(estimator, tmp)
    (folder / "metadata.json").write_text(json.dumps(meta, indent=2))
    _write_profile(folder, estimator, X_train, data, name)
    _write_skops(folder, estimator)
    tmp.replace(folder / "model.joblib")  # atomic: a poll never sees half an artifact
    return True


def _write_skops(folder: Path, estimator: Any) -> None:
    """``model.skops`` beside ``model.joblib``, written aside and renamed into place."""
    tmp = folder / f"{SKOPS}.tmp"
    dump_skops(estimator, tmp)
    tmp.replace(folder / SKOPS)


def _write_profile(folder: Path, estimator: Any, X_train: Any, data: Any, name: str) -> None:
    """The drift reference: the training rows and the model's predictions on them."""
    classes = getattr(estimator, "classes_", None)
    doc = reference(X_train, estimator.predict(X_train),
                    [clean_name(n) for n in data.feature_names], classes,
                    source=f"demo: the training split of sklearn's {name} data set")
    write_profile(folder, doc)


def write_training_data(root: Path, name: str, loader: Callable[[], Any]) -> bool:
    """Write every row of the data set as ``NAME/data/train.csv`` unless it already exists."""
    path = root / name / "data" / "train.csv"
    if path.exists():
        return False
    data = loader()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".csv.tmp")
    with tmp.open("w", newline="") as fh:
        out = csv.writer(fh)
        out.writerow([clean_name(n) for n in data.feature_names] + ["target"])
        # tolist() gives Python floats/ints, whose str() is the shortest exact form.
        for features, target in zip(data.data.tolist(), data.target.tolist(), strict=True):
            out.writerow([*features, target])
    tmp.replace(path)  # atomic: a trainer never reads half a file
    return True


def write_demo(root: Path) -> list[str]:
    root.mkdir(parents=True, exist_ok=True)
    written = []
    for name, version, loader, make, description in _specs():
        if write_version(root, name, version, loader, make, description):
            written.append(f"{name}/{version}")
        if write_training_data(root, name, loader):
            written.append(f"{name}/data/train.csv")
    for name, labels in LABELS.items():
        spec = root / name / "model.json"
        if not spec.exists():
            spec.write_text(json.dumps({"labels": labels}, indent=2))
    experiments = root / "experiments.json"
    if not experiments.exists():
        experiments.write_text(json.dumps(EXPERIMENTS, indent=2))
    return written


def main(argv: list[str]) -> int:
    """``python -m server.demo [DIR]``: DIR defaults to MODEL_DIR, as the server reads it."""
    root = Path(argv[0]) if argv else Settings().model_path
    written = write_demo(root)
    print(f"demo repository {root}: wrote {', '.join(written) or 'nothing (already there)'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
