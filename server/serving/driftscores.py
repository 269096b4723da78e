"""Drift scores: live counts (a ``Cells`` vector) against a version's reference profile.

PSI (population stability index) per feature and for the predictions, with the usual
reading: under 0.1 stable, 0.1 to 0.25 moderate, over 0.25 drifted. Beside it a two-sample
chi-square test on the bins (live counts against the training counts, a contingency table),
adjacent bins pooled until every expected count is at least 5; its p-value is null when
that leaves fewer than two bins. Below ``min_rows``
counted rows the scores are null and ``reason`` says why. Pure functions, no I/O.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from scipy.stats import chi2_contingency

from server.model.profile import Profile

EPSILON = 1e-4  # the share an empty bin counts as: ln(0) is not a number
STABLE_BELOW = 0.1
DRIFTED_ABOVE = 0.25
MIN_EXPECTED = 5.0  # the chi-square test's usual condition, per cell
# Worst last: the overall status is the worst of the features' and the prediction's.
ORDER = ("stable", "moderate", "drifted")


def psi(live: np.ndarray, reference: np.ndarray) -> float:
    """Σ (live − ref) · ln(live / ref) over the bins' shares, an empty bin as ``EPSILON``."""
    total = live.sum()
    p = np.maximum(live / total if total else np.zeros(len(live)), EPSILON)
    q = np.maximum(reference, EPSILON)
    return float(np.sum((p - q) * np.log(p / q)))


def status(value: float | None) -> str | None:
    if value is None:
        return None
    if value < STABLE_BELOW:
        return "stable"
    return "moderate" if value <= DRIFTED_ABOVE else "drifted"


def chi_square_p(live: np.ndarray, reference_counts: np.ndarray) -> float | None:
    """The p-value of the two-sample chi-square test that live and training values come from
    one distribution over these bins (a 2 x bins contingency table).

    Adjacent bins are pooled, left to right, until every expected count of a pooled bin is
    at least 5 (the test's usual condition; a small training set or a sparse bin needs it);
    None when fewer than two pooled bins remain, or either side has no rows."""
    table = np.vstack([live, reference_counts]).astype(np.float64)
    sides = table.sum(axis=1)
    if (sides == 0).any():
        return None
    # A bin's expected count on a side is side_total * bin_total / total: the smaller side
    # decides how many rows a pooled bin needs.
    need = MIN_EXPECTED * table.sum() / sides.min()
    pooled: list[np.ndarray] = []
    acc = np.zeros(2)
    for column in table.T:
        acc = acc + column
        if acc.sum() >= need:
            pooled.append(acc)
            acc = np.zeros(2)
    if acc.sum() > 0 and pooled:
        pooled[-1] = pooled[-1] + acc
    if len(pooled) < 2:
        return None
    result = chi2_contingency(np.array(pooled).T, correction=False)
    p = float(result.pvalue)
    return p if math.isfinite(p) else None


def _share(part: float, whole: float) -> float | None:
    return part / whole if whole else None


def _round(value: float | None, digits: int = 6) -> float | None:
    return None if value is None else round(value, digits)


def _significant(value: float | None) -> float | None:
    """A p-value to 4 significant digits: 3e-45 must not read as 0."""
    return None if value is None else float(f"{value:.4g}")


def _shares(counts: np.ndarray) -> list[float]:
    total = counts.sum()
    return [round(float(v), 6) for v in (counts / total if total else counts * 0.0)]


def scores(profile: Profile, counts: np.ndarray, min_rows: int, detail: bool = True,
           span: str = "in the window") -> dict[str, Any]:
    """Rows, overall status and per-feature and prediction scores of ``counts`` (rows counted
    ``span``). With ``detail`` each score also carries the live and reference shares and
    the bins."""
    cells = profile.cells
    rows = int(counts[cells.rows])
    enough = rows >= min_rows and rows > 0
    features: dict[str, dict[str, Any]] = {}
    worst: tuple[float, str] | None = None
    for i, ref in enumerate(profile.features):
        live = counts[cells.feature(i)]
        value = psi(live, ref.proportions) if enough else None
        item: dict[str, Any] = {"psi": _round(value), "status": status(value)}
        if detail:
            item["p_value"] = _significant(chi_square_p(live, ref.counts)) if enough else None
            item["live_proportions"] = _shares(live)
            item["reference_proportions"] = [round(float(v), 6) for v in ref.proportions]
            item["edges"] = [float(e) for e in ref.edges]
            item["out_of_range"] = _round(_share(float(counts[cells.out_of_range(i)]), rows))
            item["missing"] = _round(_share(float(counts[cells.missing(i)]), rows))
            item["reference_missing"] = round(ref.missing, 6)
        features[ref.name] = item
        if value is not None and (worst is None or value > worst[0]):
            worst = (value, ref.name)
    prediction: dict[str, Any] | None = None
    pred = profile.prediction
    if pred is not None:
        live = counts[cells.prediction()]
        value = psi(live, pred.proportions) if enough else None
        prediction = {"psi": _round(value), "status": status(value)}
        if detail:
            prediction["p_value"] = _significant(chi_square_p(live, pred.counts)) \
                if enough else None
            prediction["live_proportions"] = _shares(live)
            prediction["reference_proportions"] = [round(float(v), 6)
                                                   for v in pred.proportions]
            if pred.classes is not None:
                prediction["classes"] = pred.classes
            if pred.edges is not None:
                prediction["edges"] = [float(e) for e in pred.edges]
    out: dict[str, Any] = {"rows": rows, "rows_served": int(counts[cells.served])}
    if enough:
        found = [s["status"] for s in (*features.values(), prediction or {}) if s.get("status")]
        out["status"] = max(found, key=ORDER.index) if found else "stable"
        out["reason"] = None
    else:
        out["status"] = "not_enough_rows"
        out["reason"] = (f"{rows} rows counted {span}, fewer than DRIFT_MIN_ROWS "
                         f"({min_rows}): no scores yet")
    out["worst_feature"] = worst[1] if worst is not None else None
    out["features"] = features
    out["prediction"] = prediction
    return out
