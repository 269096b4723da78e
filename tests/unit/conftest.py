"""Fixtures of the unit tests."""

from __future__ import annotations

from pathlib import Path

import pytest

from server.model.registry import ModelRegistry
from server.model.repository import ModelRepository


@pytest.fixture(scope="module")
def registry(demo_repo: Path) -> ModelRegistry:
    """The demo repository, loaded (once per test module)."""
    reg = ModelRegistry(ModelRepository(demo_repo))
    reg.reload()
    return reg
