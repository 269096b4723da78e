"""Request ids made without a syscall."""

from __future__ import annotations

import re

from server.http.context import new_request_id


def test_request_ids_are_32_hex_and_distinct() -> None:
    ids = [new_request_id() for _ in range(10_000)]
    assert all(re.fullmatch(r"[0-9a-f]{32}", i) for i in ids)
    assert len(set(ids)) == len(ids)
