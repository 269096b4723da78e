"""The registry: versions and labels resolved, failures as 404s, reloads that change nothing."""

from __future__ import annotations

import pytest

from server.errors import ApiError
from server.model.registry import ModelRegistry


@pytest.mark.parametrize(("version", "expected"), [
    (None, "2"), ("", "2"), ("latest", "2"), ("stable", "1"), ("canary", "2"), ("1", "1"),
    (2, "2"),
])
def test_resolve_versions_and_labels(registry: ModelRegistry, version: object,
                                     expected: str) -> None:
    assert registry.resolve("iris", version).version == expected  # type: ignore[arg-type]


@pytest.mark.parametrize(("name", "version", "code"), [
    ("nosuch", None, "model_not_found"), ("iris", "7", "version_not_found"),
    ("iris", "beta", "version_not_found"), ("iris", "../1", "version_not_found"),
])
def test_resolve_failures_are_404(registry: ModelRegistry, name: str, version: str | None,
                                  code: str) -> None:
    with pytest.raises(ApiError) as info:
        registry.resolve(name, version)
    assert info.value.status == 404 and info.value.code == code


def test_reload_without_changes_keeps_the_same_objects(registry: ModelRegistry) -> None:
    before = registry.resolve("iris", "1")
    report = registry.reload()
    assert not report.touched
    assert registry.resolve("iris", "1") is before
