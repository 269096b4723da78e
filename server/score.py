"""``python -m server.score``: the documented command; the code is ``server.jobs.score``.

Without the scoring extras (pandas, pyarrow) it says how to install them, in one line."""

from server.jobs import run_command


def run() -> int:
    return run_command("score", {"pandas", "pyarrow", "numpy"})


if __name__ == "__main__":
    raise SystemExit(run())
