"""Live models in memory: resolve name + version/label, hot reload by atomic snapshot swap.

A request takes one ``LoadedVersion`` reference and keeps it; a reload builds a whole new
snapshot off to the side and swaps one attribute, so nothing in flight ever sees half a reload.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from server.errors import ApiError, echo, not_found
from server.model.loaded import LoadedVersion, build_version, with_profile
from server.model.repository import VERSION_RE, ModelRepository, Stamp, VersionOnDisk

log = logging.getLogger(__name__)

LoadHook = Callable[[LoadedVersion], LoadedVersion]


@dataclass(frozen=True)
class FailedVersion:
    name: str
    version: str
    error: str
    stamp: Stamp

    def describe(self) -> dict[str, Any]:
        return {"version": self.version, "state": "FAILED", "error": self.error}


@dataclass(frozen=True)
class ModelEntry:
    name: str
    labels: dict[str, str]
    versions: dict[str, LoadedVersion]
    failed: dict[str, FailedVersion]
    problems: list[str] = field(default_factory=list)

    @property
    def latest(self) -> str | None:
        return max(self.versions, key=int) if self.versions else None

    def describe(self) -> dict[str, Any]:
        every = {**{v: f.describe() for v, f in self.failed.items()},
                 **{v: lv.describe() for v, lv in self.versions.items()}}
        return {
            "name": self.name,
            "latest": self.latest,
            "labels": self.labels,
            "versions": [every[v] for v in sorted(every, key=int)],
            "problems": self.problems,
        }


@dataclass(frozen=True)
class ReloadReport:
    added: list[str]
    changed: list[str]
    removed: list[str]
    failed: list[str]

    @property
    def touched(self) -> bool:
        return bool(self.added or self.changed or self.removed or self.failed)

    def as_dict(self) -> dict[str, list[str]]:
        return {"added": self.added, "changed": self.changed,
                "removed": self.removed, "failed": self.failed}



class ModelRegistry:
    """The models one worker serves. Reads are lock-free; reloads are serialised."""

    def __init__(self, repository: ModelRepository,
                 on_load: Sequence[LoadHook] = ()) -> None:
        self.repository = repository
        # Run on each version as it loads, in order; each may return a changed copy (the
        # micro-batching probe, injected by create_app). A hook that raises fails the version.
        self.on_load = list(on_load)
        self._models: dict[str, ModelEntry] = {}
        self._lock = threading.Lock()
        self.loaded_once = False
        self.last_reload: float | None = None

    @property
    def models(self) -> dict[str, ModelEntry]:
        return self._models

    def get(self, name: str) -> ModelEntry:
        entry = self._models.get(name)
        if entry is None:
            raise not_found("model", f"unknown model '{echo(name)}'")
        return entry

    def resolve(self, name: str, version: str | int | None = None) -> LoadedVersion:
        """Find NAME at a version number, a label (stable, canary...) or latest (default)."""
        entry = self.get(name)
        wanted = "latest" if version is None or version == "" else str(version)
        if wanted in entry.labels:
            wanted = entry.labels[wanted]
        if wanted == "latest":
            wanted = entry.latest or ""
        found = entry.versions.get(wanted)
        if found is not None:
            return found
        if wanted in entry.failed:
            raise ApiError(503, "version_unavailable",
                           f"model '{name}' version {wanted} failed to load")
        if not VERSION_RE.match(wanted) and str(version) not in entry.labels:
            raise not_found("version", f"model '{name}' has no version or label '{echo(version)}'")
        raise not_found("version", f"model '{name}' has no version '{echo(wanted)}'")

    def reload(self) -> ReloadReport:
        """Scan the repository and load what is new or changed; keep what is unchanged."""
        with self._lock:
            return self._reload()

    def _reload(self) -> ReloadReport:
        old = self._models
        added: list[str] = []
        changed: list[str] = []
        failed: list[str] = []
        fresh: dict[str, ModelEntry] = {}
        for name, disk in self.repository.scan().items():
            before = old.get(name)
            loaded: dict[str, LoadedVersion] = {}
            broken: dict[str, FailedVersion] = {}
            for version, found in disk.versions.items():
                prior: LoadedVersion | FailedVersion | None = None
                if before is not None:
                    prior = before.versions.get(version) or before.failed.get(version)
                if prior is not None and prior.stamp == found.stamp:
                    target = loaded if isinstance(prior, LoadedVersion) else broken
                    target[version] = prior  # type: ignore[assignment]
                    continue
                key = f"{name}/{version}"
                result = self._load(found)
                if isinstance(result, FailedVersion):
                    broken[version] = result
                    failed.append(key)
                    continue
                loaded[version] = result
                if isinstance(prior, LoadedVersion) and prior.sha256 != result.sha256:
                    changed.append(key)
                elif not isinstance(prior, LoadedVersion):
                    added.append(key)
            fresh[name] = ModelEntry(name, disk.labels, loaded, broken, list(disk.problems))
        removed = [
            f"{name}/{v}"
            for name, entry in old.items()
            for v in entry.versions
            if v not in fresh.get(name, ModelEntry(name, {}, {}, {})).versions
        ]
        self._models = fresh
        self.loaded_once = True
        self.last_reload = time.time()
        report = ReloadReport(added, changed, removed, failed)
        if report.touched:
            log.info("models reloaded", extra=report.as_dict())
        return report

    def _load(self, found: VersionOnDisk) -> LoadedVersion | FailedVersion:
        try:
            if found.metadata_error:
                raise ValueError(found.metadata_error)
            sha = self.repository.sha256(found.path)
            estimator = self.repository.load(found.path)
            lv = build_version(found, estimator, sha)
            try:
                profile: bytes | None | OSError = self.repository.read_profile(found)
            except OSError as exc:
                profile = exc
            lv = with_profile(lv, profile)
            for hook in self.on_load:
                lv = hook(lv)
            return lv
        except Exception as exc:  # noqa: BLE001 - any broken artifact is reported, never fatal
            error = f"{type(exc).__name__}: {exc}"[:500]
            log.error("model version failed to load",
                      extra={"model": found.name, "version": found.version, "err": error})
            return FailedVersion(found.name, found.version, error, found.stamp)
