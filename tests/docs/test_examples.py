"""Every curl example in README.md and docs/ runs, as pasted, against a real server on the
README's defaults (the demo models, no API keys, no Redis): an example shown with an error
answer (a ``{"error": ..., "code": "..."}`` line right after it) must produce that error;
any other must answer 2xx. The test provides ``$ADMIN_TOKEN`` and ``iris.csv``."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import ADMIN_TOKEN, ROOT, LiveServer

# Starts servers of its own or runs for long: not in the fast subset (-m 'not slow').
pytestmark = pytest.mark.slow

PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.M | re.S)
CODE = re.compile(r'"code"\s*:\s*"([a-z_]+)"')


@dataclass(frozen=True)
class Example:
    page: str
    command: str
    error_code: str | None  # the error the page shows right after it, if any

    def __str__(self) -> str:
        return f"{self.page}: {self.command[:70]}"


def examples() -> list[Example]:
    found: list[Example] = []
    for page in PAGES:
        for lang, block in FENCE.findall(page.read_text()):
            if lang not in ("sh", "bash", "shell", "console", ""):
                continue
            lines = block.splitlines()
            i = 0
            while i < len(lines):
                line = lines[i].removeprefix("$ ").strip()
                if not line.startswith("curl "):
                    i += 1
                    continue
                command = line
                while command.endswith("\\") and i + 1 < len(lines):
                    i += 1
                    command = command[:-1].rstrip() + " " + lines[i].strip()
                i += 1
                shown = []
                while i < len(lines) and not lines[i].removeprefix("$ ").strip().startswith(
                        "curl "):
                    shown.append(lines[i])
                    i += 1
                errors = [CODE.search(s) for s in shown if s.lstrip().startswith('{"error"')]
                code = next((m.group(1) for m in errors if m), None)
                found.append(Example(page.relative_to(ROOT).as_posix(), command, code))
    return found


EXAMPLES = examples()


@pytest.fixture(scope="module")
def docs_server(demo_repo: Path, tmp_path_factory: pytest.TempPathFactory
                ) -> Iterator[LiveServer]:
    repo = Path(shutil.copytree(demo_repo, tmp_path_factory.mktemp("docs") / "models"))
    server = LiveServer(tmp_path_factory.mktemp("docs-logs"), repo).start()
    yield server
    server.stop(quick=True)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    where = tmp_path_factory.mktemp("examples")
    (where / "iris.csv").write_text("sepal_length,sepal_width,petal_length,petal_width\n"
                                    "5.1,3.5,1.4,0.2\n6.2,2.9,4.3,1.3\n7.7,3.0,6.1,2.3\n")
    return where


def test_the_pages_have_examples() -> None:
    assert len(EXAMPLES) >= 15
    readme = [e for e in EXAMPLES if e.page == "README.md"]
    assert len(readme) >= 5


@pytest.mark.parametrize("example", EXAMPLES, ids=str)
def test_every_example_answers_as_shown(docs_server: LiveServer, workdir: Path,
                                        example: Example) -> None:
    command = example.command.replace("localhost:8000", f"127.0.0.1:{docs_server.port}")
    # The answer and its status, whatever the example prints: curl's own flags come last.
    command += " -s -o .answer -w '%{http_code}'"
    # An example's own --max-time (a stream that never ends) stands: curl takes the last one.
    if "--max-time" not in example.command:
        command += " --max-time 20"
    done = subprocess.run(["bash", "-c", command], cwd=workdir, capture_output=True,
                          text=True, timeout=60,
                          env={**os.environ, "ADMIN_TOKEN": ADMIN_TOKEN})
    # curl exits 28 when --max-time ends a stream that never ends by itself
    assert done.returncode in (0, 28), done.stderr
    status = int(done.stdout.strip()[-3:])
    answer = (workdir / ".answer").read_text(errors="replace")
    if example.error_code is None:
        assert 200 <= status < 300, f"{status}: {answer[:300]}"
        return
    assert 400 <= status < 600, f"{status}: {answer[:300]}"
    assert json.loads(answer)["code"] == example.error_code
