"""docs/configuration.md names every setting there is and no other: the Settings table is
generated from ``server.config`` (``python -m server.config`` refreshes it), and every
variable gunicorn.conf.py reads is listed in the second table."""

from __future__ import annotations

import re

from server.config import BEGIN, END, Settings, settings_table
from tests.conftest import ROOT

PAGE = ROOT / "docs" / "configuration.md"
VARIABLE = re.compile(r"^\| `([A-Z][A-Z0-9_]*)` \|", re.M)


def section(text: str, begin: str, end: str) -> str:
    assert begin in text and end in text, f"{PAGE.name} lacks the markers {begin} / {end}"
    return text.split(begin, 1)[1].split(end, 1)[0]


def test_the_settings_table_is_the_generated_one() -> None:
    got = section(PAGE.read_text(), BEGIN, END).strip()
    assert got == settings_table(), "run `python -m server.config` to refresh the page"


def test_every_gunicorn_variable_is_listed_and_no_other() -> None:
    read = set(re.findall(r"os\.environ(?:\.get\(|\[)\"([A-Z_]+)\"",
                          (ROOT / "gunicorn.conf.py").read_text()))
    settings = {name.upper() for name in Settings.model_fields}
    listed = set(VARIABLE.findall(section(PAGE.read_text(), "<!-- gunicorn:begin -->",
                                          "<!-- gunicorn:end -->")))
    assert listed == read - settings


def test_the_page_names_no_variable_that_does_not_exist() -> None:
    text = PAGE.read_text()
    read = set(re.findall(r"os\.environ(?:\.get\(|\[)\"([A-Z_]+)\"",
                          (ROOT / "gunicorn.conf.py").read_text()))
    known = {name.upper() for name in Settings.model_fields} | read
    assert set(VARIABLE.findall(text)) <= known
