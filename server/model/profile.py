"""Reference profiles for drift monitoring: what a version's training data looked like, feature
by feature, and what the model predicted on it. Stored as ``profile.json`` beside the artifact.

Per feature: inner quantile bin edges (``BINS`` bins by default; fewer where values tie, as
in discrete features), the training count and share per bin, the share of missing values
(NaN) and the training minimum and maximum (live values outside them are reported as
``out_of_range``). The end bins are open: a live value below the minimum falls in the first
bin, one above the maximum in the last. Predictions: class shares in class order for a
classifier, quantile bins of the predicted values for a regressor. Pure numpy, no I/O but
``write_profile``.

``Cells`` lays every count a version needs out in one flat int64 vector (each feature's bins,
its missing and out-of-range counters, the prediction bins, rows counted, rows served), so
that counting a matrix of rows is one ``np.bincount`` and summing workers, minutes or Redis
hashes is vector addition.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

FILE = "profile.json"
FORMAT = 1  # profile.json's own version: a server reads this one and refuses newer ones
BINS = 10


class ProfileError(ValueError):
    """profile.json cannot be used for this version: why, in words for a person."""


class _Binned:
    """A reference's training counts per bin, and their shares (even when it has none)."""

    counts: np.ndarray

    @property
    def proportions(self) -> np.ndarray:
        total = self.counts.sum()
        return self.counts / total if total else np.full(len(self.counts), 1 / len(self.counts))


@dataclass(frozen=True, eq=False)
class FeatureReference(_Binned):
    name: str
    edges: np.ndarray  # inner edges, increasing: len(edges) + 1 bins, the end bins open
    counts: np.ndarray  # training values per bin (missing values excluded)
    missing: float  # training share of NaN
    minimum: float | None  # None when every training value was missing
    maximum: float | None


@dataclass(frozen=True, eq=False)
class PredictionReference(_Binned):
    kind: str  # "classes" (a classifier's class shares) or "quantiles" (a regressor's)
    counts: np.ndarray
    classes: list[Any] | None = None  # kind "classes": the classes, in the model's order
    edges: np.ndarray | None = None  # kind "quantiles": inner edges over predicted values


@dataclass(frozen=True, eq=False)
class Profile:
    features: tuple[FeatureReference, ...]
    prediction: PredictionReference | None
    rows: int
    created: str
    source: str | None
    fingerprint: str  # of the file's bytes: counts made against other bins never mix

    @cached_property
    def cells(self) -> Cells:
        return Cells(self)


# --- building a profile ---------------------------------------------------------------------
def bin_edges(values: np.ndarray, bins: int = BINS) -> np.ndarray:
    """Inner edges of up to ``bins`` quantile bins over finite ``values``.

    Edges are values of the data (``inverted_cdf``), deduplicated, and above the minimum, so
    that no bin is empty on the training data: a value equal to an edge belongs to the bin
    above it. A constant feature gets the bins "below", "the value" and "above", so that any
    other live value shows as drift."""
    if values.size == 0:
        return np.empty(0)
    lo, hi = float(values.min()), float(values.max())
    if lo == hi:
        return np.array([lo, np.nextafter(lo, np.inf)])
    # k / bins exactly (linspace's 0.6000000000000001 would skip a value at the 60 % point)
    levels = np.arange(1, bins) / bins
    quantiles = np.quantile(values, levels, method="inverted_cdf")
    edges = np.unique(quantiles)
    return edges[edges > lo]


def _bin_counts(values: np.ndarray, edges: np.ndarray) -> np.ndarray:
    return np.bincount(np.searchsorted(edges, values, side="right"), minlength=len(edges) + 1)


def _floats(a: np.ndarray) -> list[float]:
    return [float(v) for v in a]


def reference(X: np.ndarray, predictions: Sequence[Any] | np.ndarray | None,
              feature_names: Sequence[str], classes: Sequence[Any] | None = None,
              bins: int = BINS, source: str | None = None) -> dict[str, Any]:
    """The profile document of training rows ``X`` and the model's ``predictions`` on them
    (``classes`` for a classifier, in the model's order; None for a regressor)."""
    X = np.asarray(X, dtype=np.float64)
    if X.ndim != 2 or X.shape[0] == 0:
        raise ProfileError("a profile needs at least one training row")
    if len(feature_names) != X.shape[1]:
        raise ProfileError(f"{len(feature_names)} feature names for {X.shape[1]} columns")
    if bins < 2:
        raise ProfileError("bins: at least 2")
    features = []
    for name, column in zip(feature_names, X.T):
        finite = column[~np.isnan(column)]
        edges = bin_edges(finite, bins)
        counts = _bin_counts(finite, edges)
        features.append({
            "name": str(name), "edges": _floats(edges), "counts": [int(c) for c in counts],
            "proportions": _floats(counts / max(1, finite.size)),
            "missing": float(np.isnan(column).mean()),
            "min": float(finite.min()) if finite.size else None,
            "max": float(finite.max()) if finite.size else None,
        })
    doc: dict[str, Any] = {
        "format": FORMAT,
        "created": datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z"),
        "rows": int(X.shape[0]), "bins": bins, "source": source, "features": features,
        "prediction": None,
    }
    if predictions is not None and len(predictions):
        doc["prediction"] = _prediction_reference(predictions, classes, bins)
    return doc


def _prediction_reference(predictions: Sequence[Any] | np.ndarray, classes: Sequence[Any] | None,
                          bins: int) -> dict[str, Any]:
    if classes is not None:
        known = [_json_value(c) for c in classes]
        index = {c: i for i, c in enumerate(known)}
        counts = np.zeros(len(known), dtype=np.int64)
        for p in predictions:
            i = index.get(_json_value(p))
            if i is not None:
                counts[i] += 1
        total = max(1, int(counts.sum()))
        return {"kind": "classes", "classes": known, "counts": [int(c) for c in counts],
                "proportions": _floats(counts / total)}
    values = np.asarray(predictions, dtype=np.float64)
    values = values[np.isfinite(values)]
    edges = bin_edges(values, bins)
    counts = _bin_counts(values, edges)
    return {"kind": "quantiles", "edges": _floats(edges), "counts": [int(c) for c in counts],
            "proportions": _floats(counts / max(1, values.size))}


def _json_value(value: Any) -> Any:
    """A class or prediction as JSON gives it back (numpy scalars to Python)."""
    return value.item() if isinstance(value, np.generic) else value


def profile_bytes(doc: dict[str, Any]) -> bytes:
    """The document as JSON, a line per feature: readable, and diffable between versions."""
    head = {k: v for k, v in doc.items() if k not in ("features", "prediction")}
    lines = [json.dumps(head)[:-1] + ","]
    features = [json.dumps(f) for f in doc.get("features", [])]
    lines.append(' "features": [')
    lines += [f"  {f}," for f in features[:-1]] + [f"  {f}" for f in features[-1:]]
    lines.append(" ],")
    lines.append(f' "prediction": {json.dumps(doc.get("prediction"))}')
    lines.append("}")
    return ("\n".join(lines) + "\n").encode()


def write_profile(folder: Path, doc: dict[str, Any]) -> Path:
    """Write ``folder/profile.json`` aside and rename it into place: a scan never reads half."""
    target = Path(folder) / FILE
    tmp = target.with_name(f".{FILE}.{os.getpid()}.tmp")
    tmp.write_bytes(profile_bytes(doc))
    tmp.replace(target)
    return target


# --- reading one --------------------------------------------------------------------------
def load_profile(raw: bytes, n_features: int | None, feature_names: Sequence[str] | None,
                 classes: Sequence[Any] | None) -> Profile:
    """profile.json's bytes as a ``Profile`` checked against the version it sits beside
    (feature count and names, classes); ``ProfileError`` says what does not fit."""
    try:
        doc = json.loads(raw)
    except ValueError as exc:
        raise ProfileError(f"not JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise ProfileError("not a JSON object")
    fmt = doc.get("format")
    if fmt != FORMAT:
        raise ProfileError(f"format {fmt!r}: this server reads format {FORMAT}")
    try:
        features = tuple(_feature(f) for f in doc["features"])
        prediction = _prediction(doc.get("prediction"))
        rows = int(doc["rows"])
    except (KeyError, TypeError, ValueError) as exc:
        raise ProfileError(f"malformed: {type(exc).__name__}: {exc}") from None
    if n_features is not None and len(features) != n_features:
        raise ProfileError(f"{len(features)} features profiled, the model takes {n_features}")
    if feature_names is not None and [f.name for f in features] != list(feature_names):
        raise ProfileError("its feature names differ from the model's: "
                           f"{[f.name for f in features][:5]} vs {list(feature_names)[:5]}")
    if prediction is not None:
        if prediction.kind == "classes":
            if classes is None or prediction.classes != [_json_value(c) for c in classes]:
                raise ProfileError(f"its classes {prediction.classes} are not the model's "
                                   f"{classes}")
        elif classes is not None:
            raise ProfileError("predictions profiled as a regressor's, the model is a classifier")
    return Profile(features, prediction, rows, str(doc.get("created", "")),
                   doc.get("source"), hashlib.sha256(raw).hexdigest()[:16])


def _edges(raw: Any) -> np.ndarray:
    edges = np.asarray(raw, dtype=np.float64).reshape(-1)
    if not np.isfinite(edges).all() or (edges.size > 1 and not (np.diff(edges) > 0).all()):
        raise ValueError("edges must be finite and increasing")
    return edges


def _counts(raw: Any, bins: int) -> np.ndarray:
    counts = np.asarray(raw, dtype=np.float64).reshape(-1)
    if counts.size != bins or not np.isfinite(counts).all() or (counts < 0).any():
        raise ValueError(f"{bins} non-negative counts expected")
    return counts.astype(np.int64)


def _bound(value: Any) -> float | None:
    return None if value is None else float(value)


def _feature(raw: dict[str, Any]) -> FeatureReference:
    edges = _edges(raw["edges"])
    return FeatureReference(str(raw["name"]), edges, _counts(raw["counts"], len(edges) + 1),
                            float(raw.get("missing", 0.0)), _bound(raw.get("min")),
                            _bound(raw.get("max")))


def _prediction(raw: Any) -> PredictionReference | None:
    if raw is None:
        return None
    kind = raw["kind"]
    if kind == "classes":
        classes = list(raw["classes"])
        return PredictionReference(kind, _counts(raw["counts"], len(classes)), classes=classes)
    if kind == "quantiles":
        edges = _edges(raw["edges"])
        return PredictionReference(kind, _counts(raw["counts"], len(edges) + 1), edges=edges)
    raise ValueError(f"prediction kind {kind!r}")


# --- counting live rows into the reference bins ---------------------------------------------
class Cells:
    """Where each count of one profile lives in a flat vector. Per feature: its bins, then
    ``missing``, then ``out_of_range``; then the prediction bins; then ``rows`` (counted) and
    ``served`` (all rows served, counted or sampled out)."""

    def __init__(self, profile: Profile) -> None:
        self.profile = profile
        self.starts: list[int] = []
        self.names: list[str] = []  # a short name per cell (the fields of a Redis hash)
        at = 0
        for i, f in enumerate(profile.features):
            self.starts.append(at)
            bins = len(f.edges) + 1
            self.names += [f"f{i}:{b}" for b in range(bins)] + [f"f{i}:missing", f"f{i}:out"]
            at += bins + 2
        self.prediction_start = at
        pred = profile.prediction
        if pred is not None:
            self.names += [f"p:{b}" for b in range(len(pred.counts))]
            at += len(pred.counts)
        self.rows, self.served, self.size = at, at + 1, at + 2
        self.names += ["rows", "served"]
        self.index = {name: i for i, name in enumerate(self.names)}
        classes = pred.classes if pred is not None and pred.classes is not None else []
        self._class_index = {c: i for i, c in enumerate(classes)}
        self._low = np.array([np.nan if f.minimum is None else f.minimum
                              for f in profile.features])
        self._high = np.array([np.nan if f.maximum is None else f.maximum
                               for f in profile.features])

    def feature(self, i: int) -> slice:
        """Feature ``i``'s bins in the vector."""
        start = self.starts[i]
        return slice(start, start + len(self.profile.features[i].edges) + 1)

    def missing(self, i: int) -> int:
        return self.feature(i).stop

    def out_of_range(self, i: int) -> int:
        return self.feature(i).stop + 1

    def prediction(self) -> slice:
        return slice(self.prediction_start, self.rows)

    def count(self, X: np.ndarray, predictions: Sequence[Any] | None) -> np.ndarray:
        """The cells of rows ``X`` (float64, the model's feature order) and their answers."""
        n = len(X)
        parts = []
        for i, f in enumerate(self.profile.features):
            column = X[:, i]
            where = np.searchsorted(f.edges, column, side="right") + self.starts[i]
            nan = np.isnan(column)
            if nan.any():
                where[nan] = self.missing(i)
            parts.append(where)
        out = np.bincount(np.concatenate(parts), minlength=self.size).astype(np.int64) \
            if parts else np.zeros(self.size, dtype=np.int64)
        with np.errstate(invalid="ignore"):  # NaN bounds and NaN values compare False
            outside = ((X < self._low) | (X > self._high)).sum(axis=0)
        for i, k in enumerate(outside.tolist()):
            out[self.out_of_range(i)] += k
        if predictions is not None and self.profile.prediction is not None:
            self._count_predictions(out, predictions)
        out[self.rows] += n
        out[self.served] += n
        return out

    def _count_predictions(self, out: np.ndarray, predictions: Sequence[Any]) -> None:
        pred = self.profile.prediction
        assert pred is not None
        if pred.classes is not None:
            index = self._class_index
            found = [index.get(p) for p in predictions]
            where = np.fromiter((i for i in found if i is not None), dtype=np.int64)
        else:
            assert pred.edges is not None
            values = np.asarray(predictions, dtype=np.float64)
            where = np.searchsorted(pred.edges, values[np.isfinite(values)], side="right")
        out[self.prediction_start:self.rows] += np.bincount(where, minlength=len(pred.counts))
