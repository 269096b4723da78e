"""Work outside a request: the demo repository, offline scoring, training."""


def missing_extras(name: str) -> str:
    """The one line a command prints when an optional package it needs is not installed."""
    return (f"python -m server.score needs the scoring extras ({name} is not installed): "
            "pip install -r requirements-score.txt")
