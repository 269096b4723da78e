"""``python -m server.profile MODEL[:VERSION] DATA``: the documented command; the code is
``server.jobs.profile``.

Parquet input needs pyarrow (requirements-score.txt); without it the command says how to
install it, in one line."""

from server.jobs import run_command


def run() -> int:
    return run_command("profile", {"pandas", "pyarrow"}, " for Parquet")


if __name__ == "__main__":
    raise SystemExit(run())
