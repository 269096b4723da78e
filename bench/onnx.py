"""``python -m bench.onnx``: the model call in-process, with and without the ONNX backend.

Writes the demo repository into a temp dir, copies iris v1 (LogisticRegression) and v2
(RandomForest, 100 trees) to a model ``iris-onnx`` whose metadata.json asks for
``"backend": "onnx"``, loads both through ``ModelRegistry`` and times, on 1,000 distinct
iris-like rows (``bench.core.iris_like_rows``):

- ``estimator``: ``predict`` then ``predict_proba`` of the unpickled estimator, what a plain
  app calls (the baseline);
- ``fast path``: what the data plane calls on the sklearn backend (LR: one
  ``decision_function`` giving both; RF: the joblib-free sum of the trees, then argmax);
- ``onnx``: what it calls on the ONNX backend (one onnxruntime session run);
- ``data plane sklearn`` / ``data plane onnx``: ``predict_matrix``, the model call plus the
  per-row result dicts, on either backend.

Each is timed with 1-row calls (cycling through the rows) and 1,000-row calls: the median
time of a call, and rows/s from it; best of ``--rounds`` rounds of ``--seconds`` each.
Printed: the table with ratios against the estimator and the fast path, and how far the
ONNX answers are from the estimator's on those rows. No HTTP, no pass/fail target.

    python -m bench.onnx [--seconds 1] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import sklearn

from bench.core import iris_like_rows, progress, ratio
from server.jobs.demo import write_demo
from server.model.loaded import LoadedVersion
from server.model.predict import predict_matrix
from server.model.registry import ModelRegistry
from server.model.repository import ModelRepository

ROWS = 1000
MODELS = (("1", "iris v1 LR"), ("2", "iris v2 RF100"))

Call = Callable[[np.ndarray], Any]


def repository(root: Path) -> ModelRegistry:
    """The demo repository plus ``iris-onnx``: iris' versions asking for the ONNX backend."""
    write_demo(root)
    for version, _ in MODELS:
        target = root / "iris-onnx" / version
        shutil.copytree(root / "iris" / version, target)
        meta = json.loads((target / "metadata.json").read_text())
        (target / "metadata.json").write_text(json.dumps({**meta, "backend": "onnx"}))
    registry = ModelRegistry(ModelRepository(root))
    registry.reload()
    return registry


def estimator_call(est: Any) -> Call:
    def call(X: np.ndarray) -> Any:
        return est.predict(X), est.predict_proba(X)
    return call


def data_plane(lv: LoadedVersion) -> Call:
    def call(X: np.ndarray) -> Any:
        return predict_matrix(lv, X)
    return call


def model_call(lv: LoadedVersion) -> Call:
    """The one model call ``server.serving.dataplane`` makes for a classifier with probabilities."""
    if lv.scores is not None:
        return lv.scores
    proba = lv.proba
    assert proba is not None and lv.predict_is_argmax_proba, lv.describe()

    def call(X: np.ndarray) -> Any:
        p = proba(X)
        return np.argmax(p, axis=1), p

    return call


def in_data_plane_config(call: Call) -> Call:
    """As ``predict_matrix`` runs the model: sklearn's finiteness check off (rows are checked
    before), numpy warnings off."""
    def wrapped(X: np.ndarray) -> Any:
        with sklearn.config_context(assume_finite=True), np.errstate(all="ignore"):
            return call(X)
    return wrapped


def measure(call: Call, X: np.ndarray, batch: int, seconds: float,
            rounds: int) -> tuple[float, float]:
    """(rows/s, median µs per call) of the best round; ``batch`` rows per call. Rows/s comes
    from the median call, so a call slowed by another process on the machine does not count."""
    starts = range(0, len(X) - batch + 1, batch)
    slices = [X[i:i + batch] for i in starts]
    for part in slices[:3]:
        call(part)  # lazy imports, first allocations
    best: tuple[float, float] = (0.0, 0.0)
    for _ in range(rounds):
        durations: list[int] = []
        began = time.perf_counter()
        while time.perf_counter() - began < seconds:
            for part in slices:
                t0 = time.perf_counter_ns()
                call(part)
                durations.append(time.perf_counter_ns() - t0)
        median_ns = statistics.median(durations)
        if batch / median_ns * 1e9 > best[0]:
            best = (batch / median_ns * 1e9, median_ns / 1e3)
    return best


def agreement(sk: LoadedVersion, ox: LoadedVersion, X: np.ndarray) -> str:
    est = sk.estimator
    idx, proba = model_call(ox)(X)
    same = bool(np.array_equal(est.classes_[idx], est.predict(X)))
    diff = float(np.abs(proba - est.predict_proba(X)).max())
    bits = float(np.mean(proba == est.predict_proba(X)))
    return (f"classes identical: {same}; max |probability - estimator's| {diff:.2g}; "
            f"{bits:.1%} of probabilities equal to the bit")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.onnx", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=1.0, help="length of one round")
    parser.add_argument("--rounds", type=int, default=3, help="rounds per figure; best kept")
    args = parser.parse_args(argv)

    X = iris_like_rows(ROWS)
    lines: list[str] = []
    notes: list[str] = []
    with tempfile.TemporaryDirectory(prefix="bench-onnx-") as tmp:
        progress("loading the demo models, with and without the ONNX backend")
        registry = repository(Path(tmp) / "models")
        for version, title in MODELS:
            sk, ox = registry.resolve("iris", version), registry.resolve("iris-onnx", version)
            if ox.backend != "onnx":
                raise SystemExit(f"iris-onnx/{version} is not on ONNX: {ox.backend_note}")
            paths: list[tuple[str, Call]] = [
                ("estimator", estimator_call(sk.estimator)),
                ("fast path", in_data_plane_config(model_call(sk))),
                ("onnx", in_data_plane_config(model_call(ox))),
                ("data plane sklearn", data_plane(sk)),
                ("data plane onnx", data_plane(ox)),
            ]
            for batch in (1, ROWS):
                figures: dict[str, tuple[float, float]] = {}
                for name, call in paths:
                    progress(f"{title}: {name}, {batch} row(s) per call")
                    figures[name] = measure(call, X, batch, args.seconds, args.rounds)
                base, fast = figures["estimator"][0], figures["fast path"][0]
                for name, (rows_s, p50) in figures.items():
                    lines.append(f"{title:<14} {name:<19} {batch:>5} {rows_s:>12,.0f} "
                                 f"{p50:>10.1f} {ratio(rows_s, base):>8} "
                                 f"{ratio(rows_s, fast):>8}")
            notes.append(f"{title}: {agreement(sk, ox, X)}\n  backend_note: {ox.backend_note}")

    print(f"ONNX backend, in-process, {ROWS} iris-like rows, {os.cpu_count()} CPUs; "
          f"best of {args.rounds} x {args.seconds:g} s")
    print(f"{'model':<14} {'path':<19} {'rows':>5} {'rows/s':>12} {'p50 µs':>10} "
          f"{'vs est':>8} {'vs fast':>8}")
    print("-" * 82)
    for line in lines:
        print(line)
    for note in notes:
        print(note)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
