"""Fixtures of the unit tests (visible to every layer's folder below)."""

from __future__ import annotations

from pathlib import Path

import pytest

from server.model.predict import predict_matrix
from server.model.registry import ModelRegistry
from server.model.repository import ModelRepository
from server.serving.batching import batch_mode


@pytest.fixture(scope="module")
def registry(demo_repo: Path) -> ModelRegistry:
    """The demo repository, loaded (once per test module) as create_app loads it: with the
    micro-batching probe as the registry's load hook."""
    reg = ModelRegistry(ModelRepository(demo_repo),
                        on_load=[lambda lv: batch_mode(lv, predict_matrix)])
    reg.reload()
    return reg
