"""Artifact formats: which file of a version folder is the model, how it is turned back into
an estimator, and what the estimator costs in memory.

``model.skops`` is read with skops.io and trusts only scikit-learn's, numpy's and scipy's
types: anything else (a class of your own, a function from another package) fails the
version by name, before any of it is built. ``model.joblib`` and ``model.pkl`` are pickles:
loading one runs whatever code it names, so ``ALLOW_PICKLE=false`` refuses them.
"""

from __future__ import annotations

import hashlib
import io
import pickle
from pathlib import Path
from typing import Any

import joblib

SKOPS = "model.skops"
PICKLES = ("model.joblib", "model.pkl")


def artifact_order(allow_pickle: bool) -> tuple[str, ...]:
    """The artifact names a version folder is searched for, first found wins (the demo and
    /train/stream write model.joblib and model.skops with the same estimator).

    With pickles allowed, a pickle wins: it is what deployments replace in place, and
    preferring skops would protect nothing (whoever can write a model.skops can delete it).
    With ALLOW_PICKLE=false, skops wins, and a folder with only a pickle is found, so that
    it shows as FAILED with the reason rather than vanishing."""
    return (*PICKLES, SKOPS) if allow_pickle else (SKOPS, *PICKLES)
TRUSTED_PREFIXES = ("sklearn.", "numpy.", "scipy.")


class ArtifactRefused(Exception):
    """The artifact is not loaded: a refused format, an untrusted type, a wrong sha256."""


def sha256_of(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def check_pin(metadata: dict[str, Any], sha256: str) -> None:
    """``metadata.json``'s ``sha256``, when there, must be the artifact's."""
    pinned = metadata.get("sha256")
    if pinned is None:
        return
    if not isinstance(pinned, str) or pinned.strip().lower() != sha256:
        raise ArtifactRefused(f"artifact sha256 {sha256} does not match the sha256 pinned in "
                              f"metadata.json ({str(pinned)[:80]})")


def deserialize(filename: str, data: bytes, allow_pickle: bool) -> Any:
    """The estimator in ``data``, the bytes of the artifact named ``filename``."""
    if filename == SKOPS:
        from skops.io import get_untrusted_types, loads

        unknown = get_untrusted_types(data=data)
        refused = sorted(t for t in unknown if not t.startswith(TRUSTED_PREFIXES))
        if refused:
            raise ArtifactRefused(f"{SKOPS} holds untrusted types: {', '.join(refused)} "
                                  "(only scikit-learn, numpy and scipy types are trusted)")
        return loads(data, trusted=unknown)
    if filename in PICKLES:
        if not allow_pickle:
            raise ArtifactRefused(f"{filename} refused: ALLOW_PICKLE=false loads no pickled "
                                  f"artifact (ship {SKOPS})")
        return joblib.load(io.BytesIO(data))
    raise ArtifactRefused(f"unknown artifact format: {filename}")


class _Counter:
    """A file that only counts what is written to it."""

    def __init__(self) -> None:
        self.size = 0

    def write(self, chunk: bytes | memoryview) -> int:
        n = memoryview(chunk).nbytes
        self.size += n
        return n


def memory_bytes(estimator: Any) -> int:
    """The estimator's size as its pickle (protocol 5): every numpy array's buffer plus the
    objects around them, counted without writing or copying anything (buffers go out of
    band). Close to its in-memory size, and the same whatever format it was loaded from."""
    sink = _Counter()
    out_of_band = 0

    def buffer(buf: pickle.PickleBuffer) -> None:
        nonlocal out_of_band
        out_of_band += memoryview(buf).nbytes

    pickle.Pickler(sink, protocol=5, buffer_callback=buffer).dump(estimator)
    return sink.size + out_of_band


def dump_skops(estimator: Any, path: Path) -> None:
    """Write ``estimator`` as a skops file (the safe format, written beside model.joblib)."""
    from skops.io import dump

    dump(estimator, path)
