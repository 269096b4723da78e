"""The gunicorn worker's logger: access formatting skipped when nothing would write it."""

from __future__ import annotations

from gunicorn.config import Config

from server.runtime.worker import QuietLogger


def test_gunicorn_access_formatting_is_skipped_only_when_its_logger_is_off() -> None:
    cfg = Config()
    cfg.set("logconfig_dict", {"version": 1, "disable_existing_loggers": False, "loggers": {
        "gunicorn.access": {"handlers": [], "level": "CRITICAL", "propagate": False}}})
    assert not QuietLogger(cfg).access_log_enabled
    cfg = Config()
    cfg.set("accesslog", "-")
    assert QuietLogger(cfg).access_log_enabled
