"""Incremental training for ``POST /train/stream``, run in a child process.

``python -m server.jobs.training --model-dir D --model M --epochs N [--data CSV] [--seed S]`` reads
a CSV (default ``D/M/data/train.csv``), holds out 25% of the rows, fits a StandardScaler and
then one shuffled ``partial_fit`` pass of an SGD model per epoch, printing one JSON line per
epoch; it then writes the pipeline as the model's next version (with ``profile.json``, its
drift reference, from the training rows) and prints
``{"status": "complete", "version": ...}``, or ``{"error", "code"}`` and exits non-zero.

Training runs in a child so that it never holds a gevent worker's GIL or hub: the worker only
reads the child's stdout, which gevent's patched subprocess makes cooperative.
``train_events`` is the worker's side. Nothing here imports Flask.
"""

from __future__ import annotations

import argparse
import csv
import errno
import json
import math
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Generator
from pathlib import Path
from typing import Any

import joblib
import numpy as np
from sklearn.linear_model import SGDClassifier, SGDRegressor
from sklearn.metrics import accuracy_score, log_loss, mean_squared_error, r2_score
from sklearn.model_selection import train_test_split
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler

from server.errors import echo
from server.model.formats import SKOPS, dump_skops
from server.model.profile import reference, write_profile
from server.model.repository import VERSION_RE, is_valid_name

DATA_FILE = Path("data") / "train.csv"
TARGET = "target"
HELD_OUT = 0.25
MAX_CLASSES = 100  # an integer target with more distinct values than this is a regression
# The folder holding the ``server`` package (not ``server/`` itself: on the path, its
# ``http`` package would hide the standard library's, which skops imports).
_PACKAGE_ROOT = Path(__file__).resolve().parents[2]


class TrainingError(Exception):
    def __init__(self, message: str, code: str) -> None:
        super().__init__(message)
        self.message, self.code = message, code


# --- worker side ----------------------------------------------------------------------------


def data_path(model_dir: Path, model: str) -> Path:
    return Path(model_dir) / model / DATA_FILE


def train_events(
    model_dir: Path, model: str, epochs: int, data: Path | None
) -> Generator[dict[str, Any], None, None]:
    """Run the trainer in a child and yield its JSON lines as they come.

    First ``{"status": "started", "pid"}``, then one dict per epoch, then the child's
    ``{"status": "complete", ...}`` or ``{"error", "code"}``. Closing the generator early
    (the client went away) terminates the child and reaps it.
    """
    if not is_valid_name(model):
        raise ValueError(f"invalid model name {echo(repr(model))}")
    argv = [sys.executable, "-m", "server.jobs.training",
            "--model-dir", str(Path(model_dir).resolve()),
            "--model", model, "--epochs", str(int(epochs))]
    if data is not None:
        argv += ["--data", str(Path(data).resolve())]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    # The child must import ``server`` whatever the worker's working directory is.
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(_PACKAGE_ROOT), env.get("PYTHONPATH"))
                                        if p)
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                            stdin=subprocess.DEVNULL, env=env)
    assert proc.stdout is not None
    finished = False
    try:
        yield {"status": "started", "pid": proc.pid}
        for raw in proc.stdout:
            try:
                message = json.loads(raw)
            except ValueError:
                continue  # not ours (a library printing to stdout): skip it
            if not isinstance(message, dict):
                continue
            finished = "error" in message or message.get("status") == "complete"
            yield message
            if finished:
                break
        code = proc.wait()
        if not finished:
            yield {"error": f"training process exited with code {code}", "code": "training_failed"}
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        proc.stdout.close()


# --- child side -----------------------------------------------------------------------------


def _emit(message: dict[str, Any]) -> None:
    print(json.dumps(message), flush=True)


def _finite(value: float) -> float | None:
    return float(value) if math.isfinite(value) else None


def _latest_metadata(folder: Path) -> dict[str, Any]:
    """metadata.json of the highest version that has a readable one ({} when none has)."""
    versions = sorted((int(e.name) for e in os.scandir(folder)
                       if e.is_dir() and VERSION_RE.match(e.name)), reverse=True)
    for version in versions:
        try:
            meta = json.loads((folder / str(version) / "metadata.json").read_text())
        except (OSError, ValueError):
            continue
        if isinstance(meta, dict):
            return meta
    return {}


def read_csv(path: Path, feature_names: list[str] | None) -> tuple[list[str], Any, Any]:
    """Feature names, X and y from a CSV with a header row; extra columns are ignored."""
    try:
        fh = path.open(newline="")
    except OSError as exc:
        raise TrainingError(f"training data unreadable: {exc.strerror}",
                            "no_training_data") from None
    with fh:
        reader = csv.reader(fh)
        header = [h.strip() for h in next(reader, [])]
        names = feature_names or [h for h in header if h != TARGET]
        missing = [n for n in [*names, TARGET] if n not in header]
        if missing:
            raise TrainingError(f"CSV header lacks column(s): {', '.join(missing)}", "bad_csv")
        columns = [header.index(n) for n in [*names, TARGET]]
        rows: list[list[float]] = []
        for line, row in enumerate(reader, start=2):
            if not row or not any(cell.strip() for cell in row):
                continue
            if len(row) != len(header):
                raise TrainingError(f"CSV line {line}: {len(row)} fields, header has "
                                    f"{len(header)}", "bad_csv")
            try:
                values = [float(row[i]) for i in columns]
            except ValueError:
                raise TrainingError(f"CSV line {line}: not a number", "bad_csv") from None
            if not all(math.isfinite(v) for v in values):
                raise TrainingError(f"CSV line {line}: NaN or infinity", "bad_csv")
            rows.append(values)
    if len(rows) < 4:
        raise TrainingError(f"{len(rows)} data rows: at least 4 are needed", "bad_csv")
    table = np.asarray(rows, dtype=np.float64)
    return names, table[:, :-1], table[:, -1]


def _is_classification(meta: dict[str, Any], y: Any) -> bool:
    if meta.get("task") in ("classification", "regression"):
        return bool(meta["task"] == "classification")
    # No metadata to go by: a few integer values look like class labels.
    return bool(np.all(y == np.round(y)) and len(np.unique(y)) <= MAX_CLASSES)


def _publish(folder: Path, estimator: Any, meta: dict[str, Any],
             profile: dict[str, Any] | None = None) -> str:
    """Write estimator, metadata and drift profile aside, then rename into the next free
    version number."""
    staging = folder / f".staging-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        joblib.dump(estimator, staging / "model.joblib")
        dump_skops(estimator, staging / SKOPS)  # the safe format, loaded when present
        (staging / "metadata.json").write_text(json.dumps(meta, indent=2))
        if profile is not None:
            write_profile(staging, profile)
        taken = [int(e.name) for e in os.scandir(folder) if VERSION_RE.match(e.name)]
        version = max(taken, default=0) + 1
        while True:
            target = folder / str(version)
            # rename() would replace an *empty* directory: never reuse an existing number.
            if not os.path.lexists(target):
                try:
                    os.rename(staging, target)
                    return str(version)
                except OSError as exc:
                    if exc.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                        raise
            version += 1  # another trainer took this number first
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def train(model_dir: Path, model: str, epochs: int, data: Path | None, seed: int) -> str:
    folder = Path(model_dir) / model
    if not is_valid_name(model) or not folder.is_dir():
        raise TrainingError(f"unknown model '{echo(model)}'", "model_not_found")
    meta = _latest_metadata(folder)
    known = meta.get("feature_names")
    names, X, y = read_csv(data or data_path(model_dir, model),
                           [str(n) for n in known] if isinstance(known, list) else None)
    classify = _is_classification(meta, y)
    if classify:
        if not np.all(y == np.round(y)):
            raise TrainingError("classification needs integer class labels in 'target'", "bad_csv")
        y = y.astype(np.int64)
        if len(np.unique(y)) < 2:
            raise TrainingError("the 'target' column holds a single class", "bad_csv")
    X_train, X_test, y_train, y_test = train_test_split(X, y, test_size=HELD_OUT,
                                                        random_state=seed)
    scaler = StandardScaler().fit(X_train)
    X_train_s, X_test_s = scaler.transform(X_train), scaler.transform(X_test)
    # "adaptive" keeps the step until the loss stalls: with the default "optimal" rate the
    # held-out loss of a few hundred rows jumps up and down from one epoch to the next.
    sgd: Any = (SGDClassifier(loss="log_loss", learning_rate="adaptive", eta0=0.05,
                              random_state=seed) if classify
                else SGDRegressor(random_state=seed))
    classes = np.unique(y)
    rng = np.random.default_rng(seed)
    loss = score = float("nan")
    for epoch in range(1, epochs + 1):
        order = rng.permutation(len(X_train_s))
        if classify:
            sgd.partial_fit(X_train_s[order], y_train[order], classes=classes)
            loss = log_loss(y_test, sgd.predict_proba(X_test_s), labels=classes)
            score = accuracy_score(y_test, sgd.predict(X_test_s))
        else:
            sgd.partial_fit(X_train_s[order], y_train[order])
            predicted = sgd.predict(X_test_s)
            loss = mean_squared_error(y_test, predicted)
            score = r2_score(y_test, predicted)
        _emit({"epoch": epoch, "total_epochs": epochs, "loss": _finite(loss),
               "accuracy": _finite(score)})
    out: dict[str, Any] = {
        "feature_names": names,
        "task": "classification" if classify else "regression",
        "description": "SGD trained by /train/stream",
        "metrics": {("accuracy" if classify else "r2"): _finite(round(score, 4)),
                    ("log_loss" if classify else "mse"): _finite(round(loss, 4)),
                    "epochs": epochs},
    }
    given = meta.get("class_names")
    # Names are by class index; keep them only when every trained class has one.
    if classify and isinstance(given, list) and classes.min() >= 0 and classes.max() < len(given):
        out["class_names"] = [str(given[c]) for c in classes.tolist()]
    pipeline = Pipeline([("scaler", scaler), ("sgd", sgd)])
    # The drift reference: the rows the version was fitted on and its answers on them.
    profile = reference(X_train, pipeline.predict(X_train), names,
                        sgd.classes_ if classify else None,
                        source="POST /train/stream: the training rows")
    return _publish(folder, pipeline, out, profile)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m server.jobs.training")
    parser.add_argument("--model-dir", type=Path, required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--epochs", type=int, required=True)
    parser.add_argument("--data", type=Path, default=None)
    parser.add_argument("--seed", type=int, default=42)
    args = parser.parse_args(argv)
    # SIGTERM (the client went away) becomes SystemExit so the staging folder is removed.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    try:
        if not 1 <= args.epochs <= 1000:
            raise TrainingError("epochs must be between 1 and 1000", "validation_error")
        version = train(args.model_dir, args.model, args.epochs, args.data, args.seed)
    except TrainingError as exc:
        _emit({"error": exc.message, "code": exc.code})
        return 1
    except Exception as exc:  # noqa: BLE001 - the parent only sees stdout: report everything
        _emit({"error": f"training failed: {type(exc).__name__}: {exc}", "code": "training_failed"})
        return 1
    _emit({"status": "complete", "version": version})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
