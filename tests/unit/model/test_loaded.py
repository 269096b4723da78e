"""A loaded version's fast paths: the forest's joblib-free sum and the one-call logistic
scores give the estimator's own answers, bit for bit (both sides make the same call)."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.ensemble import RandomForestClassifier
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler


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
    # Exact on any machine: scores() makes sklearn's own product on the same matrix (the
    # server checks this at load and falls back to the estimator where it fails).
    idx, proba = scores(X)
    assert np.array_equal(idx, est.predict(X)) and np.array_equal(proba, est.predict_proba(X))
    alone = np.vstack([est.predict_proba(X[i : i + 1]) for i in range(len(X))])
    for i in range(10):  # one row against one row: the same product again
        idx, proba = scores(X[i : i + 1])
        assert np.array_equal(proba, alone[i : i + 1])
