"""The gunicorn worker's pieces that need no process: its logger (access formatting skipped
when nothing would write it), its settled settings and remembered peer checks."""

from __future__ import annotations

import pytest
from gunicorn.config import Config

from server.runtime.worker import QuietLogger, SettledConfig, remembered_allow_list_check


def test_gunicorn_access_formatting_is_skipped_only_when_its_logger_is_off() -> None:
    cfg = Config()
    cfg.set("logconfig_dict", {"version": 1, "disable_existing_loggers": False, "loggers": {
        "gunicorn.access": {"handlers": [], "level": "CRITICAL", "propagate": False}}})
    assert not QuietLogger(cfg).access_log_enabled
    cfg = Config()
    cfg.set("accesslog", "-")
    assert QuietLogger(cfg).access_log_enabled


def test_settled_config_reads_each_setting_once_and_is_read_only() -> None:
    cfg = Config()
    cfg.set("keepalive", 7)
    settled = SettledConfig(cfg)
    assert settled.keepalive == 7 and "keepalive" in settled.__dict__
    cfg.set("keepalive", 9)  # a worker's settings never change after the fork: not re-read
    assert settled.keepalive == 7
    assert settled.forwarded_allow_networks() is cfg.forwarded_allow_networks()
    with pytest.raises(AttributeError):
        settled.keepalive = 1
    with pytest.raises(AttributeError):
        _ = settled.no_such_setting


def test_allow_list_checks_are_remembered_per_peer_and_list() -> None:
    calls: list[str] = []

    def check(ip: str, allow_list: list[str], networks: list[object]) -> bool:
        calls.append(ip)
        return ip in allow_list

    allowed = remembered_allow_list_check(check)
    trusted: list[str] = ["10.0.0.1"]
    nets: list[object] = []
    assert [allowed("10.0.0.1", trusted, nets) for _ in range(3)] == [True] * 3
    assert [allowed("10.0.0.2", trusted, nets) for _ in range(3)] == [False] * 3
    assert calls == ["10.0.0.1", "10.0.0.2"]
    assert allowed("10.0.0.2", ["10.0.0.2"], nets)  # another list object is decided anew
