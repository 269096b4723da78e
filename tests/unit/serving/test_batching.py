"""Micro-batching below the HTTP layer: which versions may be batched, that batched answers are
the estimator's one-row answers bit for bit, and that a failing row fails only itself (the
data plane's use of it: test_dataplane.py)."""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path
from typing import Any
from unittest.mock import patch

import gevent
import numpy as np
import pytest
from sklearn.datasets import load_iris
from sklearn.ensemble import ExtraTreesClassifier, RandomForestClassifier
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from server.model.loaded import LoadedVersion, build_version
from server.model.predict import predict_matrix
from server.model.registry import ModelRegistry
from server.model.repository import VersionOnDisk
from server.serving import batching
from server.serving.batching import MicroBatcher, batch_mode
from tests.answers import assert_close


def loaded(estimator: Any, min_gain_us: float | None = None) -> LoadedVersion:
    found = VersionOnDisk("m", "1", Path("m/1/model.joblib"), 0, 0, 0)
    lv = build_version(found, estimator, "0" * 64)
    gain = batching.MIN_GAIN_US if min_gain_us is None else min_gain_us
    with patch.object(batching, "MIN_GAIN_US", gain):
        return batch_mode(lv, predict_matrix)


def rows(n: int, seed: int = 3) -> np.ndarray:
    return np.random.default_rng(seed).normal(4.0, 2.5, (n, 4))


def test_modes_chosen_at_load(registry: ModelRegistry) -> None:
    forest = registry.resolve("iris", "2")
    assert forest.microbatch == "stack" and "saves" in (forest.microbatch_note or "")
    assert registry.resolve("iris", "1").microbatch == "off"  # LogisticRegression: see below
    assert {lv.microbatch for e in registry.models.values() for lv in e.versions.values()} <= \
        {"stack", "off"}


def test_a_stacked_call_would_change_logistic_bits_so_logistic_goes_alone() -> None:
    X, y = load_iris(return_X_y=True)
    lr = LogisticRegression(max_iter=1000).fit(X, y)
    P = rows(500)
    alone = np.vstack([lr.predict_proba(P[i:i + 1]) for i in range(len(P))])
    # gemm vs gemv: the last bits move with most BLAS kernels, but which bits (if any)
    # depends on the kernel the CPU gets: only the numbers are asserted.
    assert_close(lr.predict_proba(P), alone)
    lv = loaded(lr)
    assert lv.microbatch == "off" and lv.microbatch_note
    # Off either way: for bits that moved on the probes, or for too small a saving.
    assert "differ" in lv.microbatch_note or "gathering costs" in lv.microbatch_note


def test_batching_that_saves_less_than_gathering_costs_is_off(
        monkeypatch: pytest.MonkeyPatch) -> None:
    X, y = load_iris(return_X_y=True)
    forest = RandomForestClassifier(n_estimators=20, random_state=0).fit(X, y)
    monkeypatch.setattr("server.serving.batching.MIN_GAIN_US", 1e9)
    lv = loaded(forest)
    assert lv.microbatch == "off" and "gathering costs" in (lv.microbatch_note or "")


def test_a_costly_call_per_row_is_batched() -> None:
    X, y = load_iris(return_X_y=True)
    lv = build_version(VersionOnDisk("m", "1", Path("m/1/model.joblib"), 0, 0, 0),
                       RandomForestClassifier(n_estimators=3, random_state=0).fit(X, y),
                       "0" * 64)

    def slow(lv: LoadedVersion, X: np.ndarray) -> list[dict[str, Any]]:
        time.sleep(0.001)  # a fixed cost per call, as joblib's dispatch is for sklearn
        return predict_matrix(lv, X)

    assert batch_mode(lv, slow).microbatch == "stack"


def gather(batcher: MicroBatcher, lv: LoadedVersion, X: np.ndarray) -> list[Any]:
    """Submit every row from its own greenlet at once; each gets its answer or its error."""
    def one(i: int) -> Any:
        try:
            return batcher.submit(lv, X[i:i + 1])[0]
        except Exception as exc:  # noqa: BLE001 - the test looks at each row's own error
            return exc

    jobs = [gevent.spawn(one, i) for i in range(len(X))]
    gevent.joinall(jobs, raise_error=True)
    return [job.value for job in jobs]


@pytest.mark.parametrize("model", ["forest", "scaled_forest", "extra_trees"])
def test_batched_answers_are_the_estimators_one_row_answers(model: str) -> None:
    X, y = load_iris(return_X_y=True)
    est: Any = {
        "forest": RandomForestClassifier(n_estimators=30, random_state=0),
        "scaled_forest": make_pipeline(StandardScaler(),
                                       RandomForestClassifier(n_estimators=30, random_state=0)),
        "extra_trees": ExtraTreesClassifier(n_estimators=30, random_state=0),
    }[model].fit(X, y)
    # Batched whatever the timing says here (a busy machine), once the bits were checked:
    lv = loaded(est, min_gain_us=0.0)
    assert lv.microbatch == "stack"
    batcher = MicroBatcher(predict_matrix, max_size=16, max_delay_ms=1000)
    P = rows(100)
    answers = gather(batcher, lv, P)
    assert batcher.batches < len(P)  # rows really were gathered...
    assert batcher.rows == len(P)
    for i, got in enumerate(answers):  # ...and each answer is its one-row answer, bit for bit
        proba = est.predict_proba(P[i:i + 1])[0]
        assert got["prediction"] == est.predict(P[i:i + 1])[0]
        assert list(got["probabilities"].values()) == proba.tolist()
        assert got == predict_matrix(lv, P[i:i + 1])[0]


def test_batches_never_exceed_max_size() -> None:
    X, y = load_iris(return_X_y=True)
    lv = loaded(RandomForestClassifier(n_estimators=5, random_state=0).fit(X, y), 0.0)
    seen: list[int] = []

    def predict(lv: LoadedVersion, X: np.ndarray) -> list[dict[str, Any]]:
        seen.append(len(X))
        return predict_matrix(lv, X)

    batcher = MicroBatcher(predict, max_size=4, max_delay_ms=1000)
    gather(batcher, lv, rows(10))
    assert sum(seen) == 10 and max(seen) == 4


def test_a_failing_row_fails_only_itself() -> None:
    X, y = load_iris(return_X_y=True)
    lv = loaded(RandomForestClassifier(n_estimators=5, random_state=0).fit(X, y), 0.0)
    P = rows(12)
    P[5] = 1e308

    def refuses_huge(lv: LoadedVersion, X: np.ndarray) -> list[dict[str, Any]]:
        if (X > 1e300).any():  # as a model that validates its input range would
            raise ValueError("value out of range")
        return predict_matrix(lv, X)

    batcher = MicroBatcher(refuses_huge, max_size=32, max_delay_ms=1000)
    answers = gather(batcher, lv, P)
    assert isinstance(answers[5], ValueError)
    for i, got in enumerate(answers):
        if i != 5:
            assert got == predict_matrix(lv, P[i:i + 1])[0]
    assert batcher.batches == 1  # they were in one batch, whose call failed, then went alone


def test_unbatchable_versions_go_alone(registry: ModelRegistry) -> None:
    off = replace(registry.resolve("iris", "2"), microbatch="off")
    calls: list[int] = []

    def predict(lv: LoadedVersion, X: np.ndarray) -> list[dict[str, Any]]:
        calls.append(len(X))
        return predict_matrix(lv, X)

    gather(MicroBatcher(predict, max_size=8, max_delay_ms=1000), off, rows(6))
    assert calls == [1] * 6
