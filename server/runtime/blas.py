"""BLAS and OpenMP threads per worker (BLAS_THREADS), applied with threadpoolctl.

The workers are the parallelism: one gevent worker per core. A BLAS pool per worker that
uses every core only makes the workers fight over the same cores (and costs a thread
hand-off per matrix product).
"""

from __future__ import annotations

from threadpoolctl import threadpool_info, threadpool_limits


def limit_blas_threads(threads: int) -> int | None:
    """Cap every BLAS and OpenMP pool loaded in this process at ``threads``, for good (not
    as a context), and return the limit now in force."""
    threadpool_limits(limits=threads)
    return blas_threads()


def blas_threads() -> int | None:
    """The most threads any loaded BLAS or OpenMP pool may use; None when none is loaded."""
    counts = [int(pool["num_threads"]) for pool in threadpool_info()]
    return max(counts) if counts else None
