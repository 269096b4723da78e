"""Rows -> float64 matrix -> one model call -> answers as columns. No I/O, no cache."""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import sklearn

from server.errors import ApiError, validation_error
from server.model.loaded import LoadedVersion

log = logging.getLogger(__name__)

RowInput = Sequence[float] | dict[str, float]


# Why a row is refused, in the same words at every front door: JSON rows, CSV over HTTP,
# offline scoring and streams.
def width_reason(expected: int, got: int) -> str:
    return f"expected {expected} values, got {got}"


# A number written as text: ASCII digits with an optional sign, point and exponent, or
# nan/inf/infinity, spaces around allowed. Python's float() also takes "1_000" and digits of
# other scripts, which JSON does not: neither does CSV here.
NUMBER_RE = re.compile(r"\s*[+-]?(?:(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?"
                       r"|nan|inf(?:inity)?)\s*", re.IGNORECASE | re.ASCII)


def parse_number(text: str) -> float | None:
    """``text`` as a float when it is written as a number (see NUMBER_RE), else None."""
    return float(text) if NUMBER_RE.fullmatch(text) else None


def value_reason(raw: Any, feature: str) -> str:
    """Why one value is not a usable number (None, or a blank string, is missing)."""
    if raw is None or (isinstance(raw, str) and not raw.strip()):
        return f"missing value for feature '{feature}'"
    value = None
    if isinstance(raw, str):
        value = parse_number(raw)
    elif isinstance(raw, (int, float)) and not isinstance(raw, bool):
        value = float(raw)
    if value is None or math.isfinite(value):  # a finite number here was sent as a string
        return f"not a number for feature '{feature}': {str(raw)[:60]!r}"
    return f"NaN or infinity for feature '{feature}'"


def to_matrix(lv: LoadedVersion, rows: Sequence[RowInput], loc: list[Any]) -> np.ndarray:
    """Rows (lists in feature order or objects by feature name) as a float64 matrix.

    ``loc`` is the field path of the rows in the request, for error details; for a single
    row it is the path of that row and ``rows`` has one element.
    """
    width = lv.n_features
    if width and len(rows) > 1 and set(map(type, rows)) == {list}:
        # Lists only: numpy checks every row's length and type in one C pass; any trouble
        # and the loop below finds the row to name in the error.
        try:
            matrix = np.array(rows, dtype="<f8")
        except (ValueError, TypeError):
            matrix = None
        if matrix is not None and matrix.ndim == 2 and matrix.shape[1] == width:
            return matrix
    single = len(rows) == 1 and loc and loc[-1] == "features"
    ordered: list[Sequence[float]] = []
    for i, row in enumerate(rows):
        where = list(loc) if single else [*loc, i]
        if isinstance(row, dict):
            ordered.append(_order_named(lv, row, where))
            continue
        if width is None:
            width = len(row)
        if len(row) != width:
            reason = width_reason(width, len(row))
            raise validation_error(reason, where, reason)
        ordered.append(row)
    matrix = np.asarray(ordered, dtype="<f8")
    if matrix.ndim != 2 or matrix.shape[1] == 0:
        raise validation_error("rows must hold at least one feature", list(loc))
    return matrix


def _order_named(lv: LoadedVersion, row: dict[str, float], where: list[Any]) -> list[float]:
    index = lv.feature_index
    if index is None:
        raise validation_error(
            f"model '{lv.name}' has no feature names: send features as a list", where
        )
    unknown = [k for k in row if k not in index]
    if unknown:
        raise ApiError(422, "validation_error", f"unknown feature '{unknown[0]}'",
                       [{"loc": [*where, k], "msg": "unknown feature"} for k in unknown])
    missing = [n for n in index if n not in row]
    if missing:
        raise ApiError(422, "validation_error", f"missing feature '{missing[0]}'",
                       [{"loc": [*where, n], "msg": "missing feature"} for n in missing])
    return [row[n] for n in index]


@dataclass
class Columns:
    """One model call's answers, column by column: ``predictions``, and for a classifier
    ``labels``, ``confidences`` and ``probabilities`` (one list of floats per row, in
    ``class_names`` order). A batch answer is built from the columns; ``rows()`` gives the
    per-row answers that single predictions, the cache and the other protocols use. Building
    a dict per row was most of a 1000-row batch's time."""

    predictions: list[Any]
    labels: list[str] | None = None
    confidences: list[float] | None = None
    probabilities: list[list[float]] | None = None
    class_names: list[str] | None = None

    def __len__(self) -> int:
        return len(self.predictions)

    def rows(self) -> list[dict[str, Any]]:
        if self.labels is None:
            return [{"prediction": p} for p in self.predictions]
        if self.probabilities is None or self.confidences is None:
            return [{"prediction": p, "label": n} for p, n in zip(self.predictions, self.labels)]
        names = self.class_names or []
        return [
            {"prediction": p, "label": n, "confidence": c, "probabilities": dict(zip(names, r))}
            for p, n, c, r in zip(self.predictions, self.labels, self.confidences,
                                  self.probabilities)
        ]

    def probability_maps(self) -> list[dict[str, float]] | None:
        """``probabilities`` as one {class name: probability} object per row."""
        if self.probabilities is None:
            return None
        names = self.class_names or []
        return [dict(zip(names, r)) for r in self.probabilities]

    @classmethod
    def from_rows(cls, rows: Sequence[dict[str, Any]]) -> Columns:
        first = rows[0] if rows else {}
        probabilities = None
        names = None
        if "probabilities" in first:
            names = list(first["probabilities"])
            probabilities = [list(r["probabilities"].values()) for r in rows]
        return cls(
            predictions=[r["prediction"] for r in rows],
            labels=[r["label"] for r in rows] if "label" in first else None,
            confidences=[r["confidence"] for r in rows] if "confidence" in first else None,
            probabilities=probabilities, class_names=names,
        )

    @classmethod
    def concat(cls, parts: Sequence[Columns]) -> Columns:
        def joined(column: str) -> list[Any] | None:
            if getattr(parts[0], column) is None:
                return None
            return [v for part in parts for v in getattr(part, column)]

        return cls(predictions=joined("predictions") or [], labels=joined("labels"),
                   confidences=joined("confidences"), probabilities=joined("probabilities"),
                   class_names=parts[0].class_names)


def predict_matrix(lv: LoadedVersion, X: np.ndarray) -> list[dict[str, Any]]:
    """One answer dict per row of ``X`` (see ``predict_columns``)."""
    return predict_columns(lv, X).rows()


def predict_columns(lv: LoadedVersion, X: np.ndarray) -> Columns:
    # Overflow inside the model is caught by _finite below, so numpy need not warn about it.
    if lv.scores is not None:  # our own arithmetic or an ONNX session: sklearn is not called
        with np.errstate(all="ignore"):
            return _predict_columns(lv, X)
    # Our own validation already refused NaN and infinity: skip sklearn's second check.
    with sklearn.config_context(assume_finite=True), np.errstate(all="ignore"):
        return _predict_columns(lv, X)


def _predict_columns(lv: LoadedVersion, X: np.ndarray) -> Columns:
    """Call the model once for all rows.

    ``prediction`` is the estimator's own ``predict``; ``probabilities`` its ``predict_proba``;
    ``confidence`` the probability of the predicted class. Same numbers as in-process
    (within 1e-6 on an ONNX backend, which is checked at load).
    """
    predict = lv.predict_fn or lv.estimator.predict
    if lv.task != "classification" or lv.classes is None:
        values = np.asarray(predict(X), dtype="<f8")
        _finite(values)
        return Columns(predictions=values.tolist())
    classes = lv.classes
    names = lv.class_names or [str(c) for c in classes]
    proba: np.ndarray | None
    if lv.scores is not None:
        indices, proba = lv.scores(X)
    else:
        proba = lv.proba(X) if lv.proba is not None else None
    if proba is not None:
        _finite(proba)
    if lv.scores is not None:
        idx = indices.tolist()
        predicted = [classes[i] for i in idx]
    elif proba is not None and lv.predict_is_argmax_proba:
        idx = np.argmax(proba, axis=1).tolist()
        predicted = [classes[i] for i in idx]
    else:
        position = {c: i for i, c in enumerate(classes)}
        predicted = np.asarray(predict(X)).tolist()
        idx = [position[p] for p in predicted]
    labels = [names[i] for i in idx]
    if proba is None:
        return Columns(predictions=predicted, labels=labels)
    return Columns(predictions=predicted, labels=labels,
                   confidences=proba[np.arange(len(idx)), idx].tolist(),
                   probabilities=proba.tolist(), class_names=names)


def _finite(values: np.ndarray) -> None:
    """Finite inputs can still overflow inside a model (1e308 * weight): never answer null."""
    if not np.isfinite(values).all():
        raise ValueError("the model's output is NaN or infinite for these inputs "
                         "(values out of the range it was trained on?)")
