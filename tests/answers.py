"""Comparing model answers that need not be the same bits.

A linear model's answer goes through a BLAS matrix product (gemm, or gemv for one row), and
how that product rounds depends on the kernel the CPU gets (Intel and AMD get different
ones), its block sizes and the number of rows in the call: the same row may come back a few
ulps apart from a 40-row call and from the two calls of 15 and 25 rows it was split into.
Exact bits are guaranteed only where the arithmetic is the same: trees and forests (each row
walks its trees and adds their answers in the same order whatever the other rows), and the
same call repeated (one row against one row, the same matrix against itself, a cached copy).
Everywhere else answers are compared with a tight tolerance, and a predicted class only where
the expected probabilities are not near a tie (there two correct roundings may pick either).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

# A few thousand ulps of float64 relative to the largest value compared: far above what a
# different summation order moves (measured: up to ~1e-13 relative on the demo models), far
# below any real disagreement.
RTOL = 1e-12
ATOL = 1e-12
# Top two probabilities nearer than this are a tie: the predicted class may go either way.
TIE = 1e-9


def tree_based(estimator: Any) -> bool:
    """True for a tree or forest, alone or last in a Pipeline (whose other steps are then
    elementwise here): its answers are the same bits in any chunking of the rows."""
    from sklearn.ensemble._forest import BaseForest
    from sklearn.pipeline import Pipeline
    from sklearn.tree import BaseDecisionTree

    final = estimator[-1] if isinstance(estimator, Pipeline) else estimator
    return isinstance(final, (BaseForest, BaseDecisionTree))


def assert_close(got: Any, want: Any, rtol: float = RTOL, atol: float = ATOL) -> None:
    """Floats equal within ``rtol``, and within ``atol`` times the largest expected magnitude
    (at least 1): an absolute rounding error scales with the terms that were summed."""
    expected = np.asarray(want, dtype=np.float64)
    scale = max(1.0, float(np.abs(expected).max(initial=0.0)))
    np.testing.assert_allclose(np.asarray(got, dtype=np.float64), expected, rtol=rtol,
                               atol=atol * scale)


def clear_rows(proba: Any, tie: float = TIE) -> np.ndarray:
    """Mask of the rows whose top two probabilities are more than ``tie`` apart."""
    p = np.sort(np.asarray(proba, dtype=np.float64), axis=1)
    if p.shape[1] < 2:
        return np.ones(len(p), dtype=bool)
    return np.asarray(p[:, -1] - p[:, -2] > tie)


def assert_classes_agree(got: Sequence[Any], want: Sequence[Any], proba: Any,
                         tie: float = TIE) -> None:
    """Predicted classes equal on every row that ``proba`` (the expected probabilities) does
    not put near a tie."""
    assert len(got) == len(want) == len(proba)
    clear = clear_rows(proba, tie)
    assert [g for g, c in zip(got, clear) if c] == [w for w, c in zip(want, clear) if c]


def assert_rows_close(got: Sequence[Mapping[str, Any]], want: Sequence[Mapping[str, Any]],
                      tie: float = TIE, fields: Sequence[str] | None = None) -> None:
    """Per-row answers as the data plane gives them ({"prediction"} for a regressor; with
    "label", "confidence" and "probabilities" for a classifier): the same fields; floats
    within tolerance; prediction and label equal except near a tie, where the confidence
    (the top probability either way) is within ``tie``. With ``fields``, only those are
    compared (answers written without the others, as a CSV without probabilities); a tie is
    still told by ``want``'s probabilities."""
    assert len(got) == len(want)
    if fields is None:
        assert [list(g) for g in got] == [list(w) for w in want]
        fields = list(want[0]) if want else []
    if not want:
        return
    if "label" not in want[0]:  # a regressor
        assert_close([g["prediction"] for g in got], [w["prediction"] for w in want])
        return
    named = [f for f in ("prediction", "label") if f in fields]
    if "probabilities" not in want[0]:  # a classifier without probabilities: no tie to tell
        assert [[g[f] for f in named] for g in got] == [[w[f] for f in named] for w in want]
        return
    proba = np.array([list(w["probabilities"].values()) for w in want], dtype=np.float64)
    if "probabilities" in fields:
        assert [list(g["probabilities"]) for g in got] == \
            [list(w["probabilities"]) for w in want]
        assert_close([list(g["probabilities"].values()) for g in got], proba)
    assert_classes_agree([[g[f] for f in named] for g in got],
                         [[w[f] for f in named] for w in want], proba, tie)
    if "confidence" in fields:
        for g, w, clear in zip(got, want, clear_rows(proba, tie)):
            if clear:
                assert_close(g["confidence"], w["confidence"])
            else:
                assert abs(g["confidence"] - w["confidence"]) <= tie + ATOL
