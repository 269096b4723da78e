"""Settings read from the environment."""

from __future__ import annotations

import os

import pytest
from pydantic import ValidationError

from server.config import Settings


def test_settings_read_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in list(os.environ):
        if key in {"MODEL_DIR", "MAX_BATCH", "API_KEYS", "CACHE"}:
            monkeypatch.delenv(key)
    assert Settings().max_batch == 1000 and Settings().cache_enabled
    monkeypatch.setenv("MAX_BATCH", "5")
    monkeypatch.setenv("API_KEYS", " a, b ,,")
    monkeypatch.setenv("CACHE", "off")
    settings = Settings()
    assert settings.max_batch == 5 and settings.api_key_list == ["a", "b"]
    assert not settings.cache_enabled
    monkeypatch.setenv("MAX_BATCH", "zero")
    with pytest.raises(ValidationError):
        Settings()
