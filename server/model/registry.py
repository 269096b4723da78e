"""Live models in memory: resolve name + version/label, hot reload by atomic snapshot swap.

A request takes one ``LoadedVersion`` reference and keeps it; a reload builds a whole new
snapshot off to the side and swaps one attribute, so nothing in flight ever sees half a reload.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from server.errors import ApiError, echo, not_found
from server.model.budget import Key, MemoryBudget, UnloadedVersion, mb
from server.model.formats import check_pin
from server.model.loaded import LoadedVersion, build_version, with_profile
from server.model.repository import VERSION_RE, ModelRepository, Stamp, VersionOnDisk, profile_only

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
    # Under MODEL_MEMORY_MB: versions found but not in memory (they load on first request)
    unloaded: dict[str, UnloadedVersion] = field(default_factory=dict)

    @property
    def servable(self) -> list[str]:
        """Versions that answer (loaded or loading on their first request), ascending."""
        return sorted({*self.versions, *self.unloaded}, key=int)

    @property
    def latest(self) -> str | None:
        every = self.servable
        return every[-1] if every else None

    def describe(self) -> dict[str, Any]:
        every = {**{v: f.describe() for v, f in self.failed.items()},
                 **{v: u.describe() for v, u in self.unloaded.items()},
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
                 on_load: Sequence[LoadHook] = (), budget: MemoryBudget | None = None) -> None:
        self.repository = repository
        self.budget = budget  # MODEL_MEMORY_MB: lazy loads and LRU unloads (None: load all)
        self._found: dict[Key, VersionOnDisk] = {}  # the last scan's versions
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
        """Find NAME at a version number, a label (stable, canary...) or latest (default),
        loading it first when it is unloaded (MODEL_MEMORY_MB)."""
        entry, wanted = self.locate(name, version)
        found = entry.versions.get(wanted)
        if found is not None:
            if self.budget is not None:
                self.budget.touch((name, wanted))
            return found
        outcome = self._load_now(entry.unloaded[wanted])
        if isinstance(outcome, LoadedVersion):
            return outcome
        if version is None or version in ("", "latest"):
            return self.resolve(name, version)  # latest is now the next version down
        raise ApiError(503, "version_unavailable",
                       f"model '{name}' version {wanted} failed to load")

    def locate(self, name: str, version: str | int | None = None) -> tuple[ModelEntry, str]:
        """NAME's entry and the servable version a number, label or latest names (loaded or
        not); the same 404 and 503 answers as ``resolve``, without loading anything."""
        entry = self.get(name)
        wanted = "latest" if version is None or version == "" else str(version)
        if wanted in entry.labels:
            wanted = entry.labels[wanted]
        if wanted == "latest":
            wanted = entry.latest or ""
        if wanted in entry.versions or wanted in entry.unloaded:
            return entry, wanted
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
        scanned = self.repository.scan()
        self._found = {(n, v): f for n, d in scanned.items() for v, f in d.versions.items()}
        for name, disk in scanned.items():
            before = old.get(name)
            loaded: dict[str, LoadedVersion] = {}
            broken: dict[str, FailedVersion] = {}
            idle: dict[str, UnloadedVersion] = {}
            for version, found in disk.versions.items():
                prior: LoadedVersion | FailedVersion | UnloadedVersion | None = None
                if before is not None:
                    prior = (before.versions.get(version) or before.failed.get(version)
                             or before.unloaded.get(version))
                if prior is not None and prior.stamp == found.stamp:
                    target: dict[str, Any] = (
                        loaded if isinstance(prior, LoadedVersion) else
                        idle if isinstance(prior, UnloadedVersion) else broken)
                    target[version] = prior
                    continue
                if isinstance(prior, LoadedVersion) and profile_only(prior.stamp, found.stamp):
                    loaded[version] = self._reprofile(prior, found)  # the model as it was
                    continue
                key = f"{name}/{version}"
                if self.budget is not None and not isinstance(prior, LoadedVersion):
                    # Under a budget only what was in memory is loaded again now.
                    record = self._unloaded(found, prior)
                    if isinstance(record, FailedVersion):
                        broken[version] = record
                        failed.append(key)
                    else:
                        idle[version] = record
                        if not isinstance(prior, UnloadedVersion):
                            added.append(key)
                        elif prior.sha256 != record.sha256:
                            changed.append(key)
                    continue
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
            fresh[name] = ModelEntry(name, disk.labels, loaded, broken, list(disk.problems),
                                     idle)
        removed = [
            f"{name}/{v}"
            for name, entry in old.items()
            for v in entry.servable
            if v not in fresh.get(name, ModelEntry(name, {}, {}, {})).servable
        ]
        self._models = fresh
        if self.budget is not None:
            self._unload_beyond_budget(set())
        self.loaded_once = True
        self.last_reload = time.time()
        report = ReloadReport(added, changed, removed, failed)
        if report.touched:
            log.info("models reloaded", extra=report.as_dict())
        return report

    def _unloaded(self, found: VersionOnDisk,
                  prior: FailedVersion | UnloadedVersion | None) -> UnloadedVersion | FailedVersion:
        """A version recorded without loading it: its artifact hashed (and checked against a
        pinned sha256), nothing deserialized."""
        assert self.budget is not None
        try:
            if found.metadata_error:
                raise ValueError(found.metadata_error)
            sha = self.repository.sha256(found.path)
            check_pin(found.metadata, sha)
        except Exception as exc:  # noqa: BLE001 - reported like a load failure
            return self._failed(found, exc)
        size = prior.memory_bytes if isinstance(prior, UnloadedVersion) else None
        return UnloadedVersion(found, sha, size, self.budget)

    def _load_now(self, idle: UnloadedVersion) -> LoadedVersion | FailedVersion:
        """Load an unloaded version (one load however many requests ask; each waits at most
        MODEL_LOAD_WAIT_SECONDS), swap it in and unload what no longer fits."""
        budget = self.budget
        assert budget is not None
        key = (idle.name, idle.version)
        task = budget.start(key, idle.stamp, lambda: self._load(idle.found))
        if not task.wait(budget.wait_seconds):
            raise ApiError(503, "version_loading",
                           f"model '{idle.name}' version {idle.version} is loading; retry "
                           "shortly", headers={"Retry-After": "1"})
        outcome: LoadedVersion | FailedVersion = budget.finish(key, task)
        with self._lock:
            entry = self._models.get(idle.name)
            if entry is None or entry.unloaded.get(idle.version) is not idle:
                return outcome  # swapped in by another request, or a reload came between
            rest = {v: u for v, u in entry.unloaded.items() if v != idle.version}
            if isinstance(outcome, LoadedVersion):
                entry = replace(entry, versions={**entry.versions, idle.version: outcome},
                                unloaded=rest)
                log.info("model version loaded", extra={
                    "model": idle.name, "version": idle.version,
                    "memory_mb": mb(outcome.memory_bytes)})
            else:
                entry = replace(entry, failed={**entry.failed, idle.version: outcome},
                                unloaded=rest)
            self._models = {**self._models, idle.name: entry}
            if isinstance(outcome, LoadedVersion):
                budget.touch(key)
                self._unload_beyond_budget({key})
        return outcome

    def _unload_beyond_budget(self, keep: set[Key]) -> None:
        """Unload the least recently used versions until the loaded ones fit, sparing
        ``keep`` and the versions a label or an experiment names (call with the lock held)."""
        budget = self.budget
        assert budget is not None
        models = self._models
        loaded = {(n, v): lv.memory_bytes for n, e in models.items()
                  for v, lv in e.versions.items()}
        victims = budget.victims(loaded, keep | self._pinned(models))
        if not victims:
            return
        fresh = dict(models)
        for name, version in victims:
            found = self._found.get((name, version))
            entry = fresh[name]
            lv = entry.versions[version]
            if found is None or found.stamp != lv.stamp:
                continue  # changed on disk: the next scan loads it again
            idle = UnloadedVersion(found, lv.sha256, lv.memory_bytes, budget)
            fresh[name] = replace(
                entry, versions={v: x for v, x in entry.versions.items() if v != version},
                unloaded={**entry.unloaded, version: idle})
            budget.unloaded((name, version))
            log.info("model version unloaded", extra={
                "model": name, "version": version, "memory_mb": mb(lv.memory_bytes)})
        self._models = fresh

    def _pinned(self, models: dict[str, ModelEntry]) -> set[Key]:
        """Versions named by a label or by an experiment (whose arms may name a label)."""
        assert self.budget is not None
        pins = {(n, v) for n, e in models.items() for v in e.labels.values()}
        for name, version in self.budget.pinned():
            entry = models.get(name)
            if entry is not None:
                version = entry.labels.get(version, version)
                pins.add((name, (entry.latest or "") if version in ("", "latest") else version))
        return pins

    def memory_status(self) -> dict[str, Any] | None:
        """MODEL_MEMORY_MB's figures for /status (None when there is no budget)."""
        if self.budget is None:
            return None
        return self.budget.status({(n, v): lv.memory_bytes for n, e in self._models.items()
                                   for v, lv in e.versions.items()})

    def _failed(self, found: VersionOnDisk, exc: Exception) -> FailedVersion:
        error = f"{type(exc).__name__}: {exc}"[:500]
        log.error("model version failed to load",
                  extra={"model": found.name, "version": found.version, "err": error})
        return FailedVersion(found.name, found.version, error, found.stamp)

    def _profile(self, found: VersionOnDisk) -> bytes | None | OSError:
        try:
            return self.repository.read_profile(found)
        except OSError as exc:
            return exc

    def _reprofile(self, lv: LoadedVersion, found: VersionOnDisk) -> LoadedVersion:
        """``lv`` with the profile.json now on disk: only the profile changed, so the
        artifact is not read or deserialized again."""
        return replace(with_profile(lv, self._profile(found)), stamp=found.stamp)

    def _load(self, found: VersionOnDisk) -> LoadedVersion | FailedVersion:
        try:
            if found.metadata_error:
                raise ValueError(found.metadata_error)
            estimator, sha = self.repository.read(found)
            lv = build_version(found, estimator, sha)
            lv = with_profile(lv, self._profile(found))
            for hook in self.on_load:
                lv = hook(lv)
            return lv
        except Exception as exc:  # noqa: BLE001 - any broken artifact is reported, never fatal
            return self._failed(found, exc)
