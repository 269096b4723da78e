"""``python -m server.export MODEL``: the documented command; the code is ``server.jobs.export``.

Parquet output needs pyarrow (requirements-score.txt); without it the command says how to
install it, in one line."""

from server.jobs import run_command


def run() -> int:
    return run_command("export", {"pandas", "pyarrow"}, " for Parquet")


if __name__ == "__main__":
    raise SystemExit(run())
