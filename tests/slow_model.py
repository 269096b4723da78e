"""A deliberately slow classifier for timeout and fairness tests: it spins the CPU (no I/O, so
gevent cannot switch away) for a fixed time per row, then answers like LogisticRegression."""

from __future__ import annotations

import time

import numpy as np
from sklearn.linear_model import LogisticRegression


class SlowLogistic(LogisticRegression):
    seconds_per_row = 0.005

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        end = time.perf_counter() + self.seconds_per_row * len(X)
        while time.perf_counter() < end:
            pass
        return super().predict_proba(X)  # type: ignore[no-any-return]


class HungryLogistic(LogisticRegression):
    """Runs out of memory on any row whose first feature is over 1000 (a stand-in for a
    model call whose arrays do not fit); answers like LogisticRegression otherwise."""

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        if (np.asarray(X)[:, 0] > 1000).any():
            raise MemoryError
        return super().predict_proba(X)  # type: ignore[no-any-return]
