"""Work outside a request: the demo repository, offline scoring, training."""

import sys
from collections.abc import Collection
from importlib import import_module

EXIT_MISSING_EXTRAS = 2


def missing_extras(name: str, command: str = "score", purpose: str = "") -> str:
    """The one line a command prints when an optional package it needs is not installed."""
    return (f"python -m server.{command} needs the scoring extras{purpose} ({name} is not "
            "installed): pip install -r requirements-score.txt")


def run_command(command: str, extras: Collection[str], purpose: str = "") -> int:
    """``python -m server.<command>``: ``server.jobs.<command>.main()``, or, when one of the
    optional packages ``extras`` is missing (at import or once running), the install line
    on stderr and exit 2."""
    try:
        return int(import_module(f"server.jobs.{command}").main())
    except ModuleNotFoundError as exc:
        if (exc.name or "").split(".")[0] not in extras:
            raise
        print(missing_extras(str(exc.name), command, purpose), file=sys.stderr)
        return EXIT_MISSING_EXTRAS
