"""The model repository on disk: ``NAME/<int version>/model.{skops,joblib,pkl}`` plus optional
metadata (the artifact formats are in server.model.formats).

Only this module touches MODEL_DIR. Names coming from outside are checked against a strict
pattern and every resolved path must stay inside the repository (symlinks included).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from server.model.formats import artifact_order, check_pin, deserialize, sha256_of

log = logging.getLogger(__name__)

PROFILE = "profile.json"  # the version's reference profile for drift monitoring (optional)
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
VERSION_RE = re.compile(r"^[1-9][0-9]{0,17}$")

# What a version's files were when it was loaded: artifact size and mtime, metadata.json's
# and profile.json's mtimes (0 when absent), and what model.json sets for every version.
Stamp = tuple[int, int, int, int, str]


def profile_only(old: Stamp, new: Stamp) -> bool:
    """True when ``new`` differs from ``old`` in profile.json's mtime alone: the artifact,
    its metadata and model.json's defaults are as they were."""
    return old != new and old[:3] + old[4:] == new[:3] + new[4:]


class Mirror(Protocol):
    def sync(self) -> None: ...

    def status(self) -> dict[str, Any]: ...


@dataclass(frozen=True)
class VersionOnDisk:
    """One version folder as found by a scan (nothing loaded yet)."""

    name: str
    version: str
    path: Path
    size: int
    mtime_ns: int
    meta_mtime_ns: int  # of metadata.json (0 when absent)
    metadata: dict[str, Any] = field(default_factory=dict)
    metadata_error: str | None = None
    defaults: str = ""  # what model.json sets for every version, as sorted JSON
    profile_mtime_ns: int = 0  # of profile.json (0 when absent)

    @property
    def stamp(self) -> Stamp:
        """Changes when the artifact, its metadata.json or its profile.json changes on disk,
        or when model.json changes what it sets for every version (a label edit alone does
        not count)."""
        return (self.size, self.mtime_ns, self.meta_mtime_ns, self.profile_mtime_ns,
                self.defaults)


@dataclass(frozen=True)
class ModelOnDisk:
    name: str
    labels: dict[str, str]
    versions: dict[str, VersionOnDisk]
    problems: list[str]


def is_valid_name(name: str) -> bool:
    return bool(NAME_RE.match(name)) and ".." not in name


def inside(root: Path, candidate: Path) -> bool:
    """True when candidate, with every symlink resolved, lies inside root."""
    try:
        return candidate.resolve(strict=True).is_relative_to(root.resolve(strict=True))
    except (OSError, RuntimeError):
        return False


def _read_json(path: Path) -> dict[str, Any]:
    with path.open("rb") as fh:
        data = json.load(fh)
    if not isinstance(data, dict):
        raise ValueError(f"{path.name} must hold a JSON object")
    return data


class ModelRepository:
    """Reads MODEL_DIR. Stateless apart from the root path and ALLOW_PICKLE."""

    def __init__(self, root: Path, allow_pickle: bool = True, mirror: Mirror | None = None) -> None:
        self.root = Path(root).absolute()
        self.allow_pickle = allow_pickle
        # An s3:// MODEL_DIR: ``root`` is its local mirror, synced before each scan
        # (server.model.storage); None for a local folder.
        self.mirror = mirror

    def scan(self) -> dict[str, ModelOnDisk]:
        models: dict[str, ModelOnDisk] = {}
        if self.mirror is not None:
            self.mirror.sync()  # never raises: an outage leaves the mirror as it was
        try:
            entries = sorted(os.scandir(self.root), key=lambda e: e.name)
        except OSError as exc:
            log.error("model repository unreadable",
                      extra={"path": str(self.root), "err": str(exc)})
            return models
        for entry in entries:
            if entry.is_dir() and is_valid_name(entry.name) and not entry.name.startswith("."):
                models[entry.name] = self._scan_model(Path(entry.path))
        return models

    def _scan_model(self, folder: Path) -> ModelOnDisk:
        problems: list[str] = []
        labels: dict[str, str] = {}
        defaults: dict[str, Any] = {}  # what model.json sets for every version
        spec = folder / "model.json"
        if spec.exists():
            try:
                data = _read_json(spec)
                labels = {str(k): str(v) for k, v in dict(data.get("labels", {})).items()}
                if "backend" in data:
                    defaults["backend"] = data["backend"]
            except (OSError, ValueError, TypeError) as exc:
                problems.append(f"model.json unreadable: {exc}")
        versions: dict[str, VersionOnDisk] = {}
        for entry in os.scandir(folder):
            if not (entry.is_dir() and VERSION_RE.match(entry.name)):
                continue
            found = self._scan_version(folder.name, Path(entry.path), defaults)
            if found is not None:
                versions[found.version] = found
        return ModelOnDisk(folder.name, labels, versions, problems)

    def _scan_version(self, name: str, folder: Path,
                      defaults: dict[str, Any]) -> VersionOnDisk | None:
        """A version folder; its metadata.json over the model's ``defaults`` (model.json).
        A change to either changes the version's stamp, so it is loaded again."""
        artifact = self._artifact(folder)
        if artifact is None:
            return None
        st = artifact.stat()
        metadata: dict[str, Any] = {}
        error = None
        meta_path = folder / "metadata.json"
        meta_mtime = 0
        if meta_path.exists():
            try:
                meta_mtime = meta_path.stat().st_mtime_ns
                metadata = _read_json(meta_path)
            except (OSError, ValueError) as exc:
                error = f"metadata.json unreadable: {exc}"
        try:
            profile_mtime = (folder / PROFILE).stat().st_mtime_ns
        except OSError:
            profile_mtime = 0
        return VersionOnDisk(name, folder.name, artifact, st.st_size, st.st_mtime_ns,
                             meta_mtime, {**defaults, **metadata}, error,
                             json.dumps(defaults, sort_keys=True, default=str),
                             profile_mtime_ns=profile_mtime)

    def experiments_file(self) -> tuple[int, dict[str, Any] | None, str | None]:
        """``experiments.json``: (mtime_ns or 0 when absent, its object, the read error)."""
        path = self.root / "experiments.json"
        try:
            stamp = path.stat().st_mtime_ns
        except OSError:
            return 0, None, None
        try:
            return stamp, _read_json(path), None
        except (OSError, ValueError) as exc:
            return stamp, None, f"experiments.json unreadable: {exc}"

    def artifact_path(self, name: str, version: str) -> Path | None:
        """The artifact of NAME/VERSION when both are well formed and it lies inside the root."""
        if not (is_valid_name(name) and VERSION_RE.match(version)):
            return None
        return self._artifact(self.root / name / version)

    def _artifact(self, folder: Path) -> Path | None:
        """The folder's artifact: the first of ``artifact_order`` there that lies inside the
        root."""
        for filename in artifact_order(self.allow_pickle):
            candidate = folder / filename
            if inside(self.root, candidate):
                return candidate
            if candidate.is_symlink():
                log.warning("artifact outside repository ignored", extra={"path": str(candidate)})
        return None

    def read_profile(self, found: VersionOnDisk) -> bytes | None:
        """The bytes of the version's profile.json, None when it has none; OSError when it
        cannot be read (or lies outside the repository)."""
        path = found.path.parent / PROFILE
        if not (path.exists() or path.is_symlink()):
            return None
        if not inside(self.root, path):
            raise OSError(f"{PROFILE} lies outside the model repository")
        return path.read_bytes()

    @staticmethod
    def sha256(path: Path) -> str:
        digest = hashlib.sha256()
        with path.open("rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
        return digest.hexdigest()

    def read(self, found: VersionOnDisk) -> tuple[Any, str]:
        """The version's estimator and its artifact's sha256. The bytes are read once, hashed,
        checked against a ``sha256`` pinned in metadata.json, and only then deserialized
        (skops with trusted types only; a pickle only under ALLOW_PICKLE)."""
        data = found.path.read_bytes()
        sha = sha256_of(data)
        check_pin(found.metadata, sha)
        return self._ready(deserialize(found.path.name, data, self.allow_pickle)), sha

    @staticmethod
    def _ready(estimator: Any) -> Any:
        if not callable(getattr(estimator, "predict", None)):
            raise TypeError(f"{type(estimator).__name__} has no predict method")
        single_threaded(estimator)
        return estimator


def single_threaded(estimator: Any) -> None:
    """Set every ``n_jobs`` parameter to 1: joblib pools per call only slow a forked worker."""
    get_params = getattr(estimator, "get_params", None)
    if get_params is None:
        return
    try:
        params = get_params(deep=True)
    except Exception:  # noqa: BLE001 - a third-party estimator may not support deep params
        return
    updates = {k: 1 for k, v in params.items() if k.split("__")[-1] == "n_jobs" and v != 1}
    if updates:
        estimator.set_params(**updates)
