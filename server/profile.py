"""``python -m server.profile MODEL[:VERSION] DATA``: the documented command; the code is
``server.jobs.profile``.

Parquet input needs pyarrow (requirements-score.txt); without it the command says how to
install it, in one line."""

import sys

EXTRAS = {"pandas", "pyarrow"}


def run() -> int:
    try:
        from server.jobs.profile import main

        return main()
    except ModuleNotFoundError as exc:
        if (exc.name or "").split(".")[0] not in EXTRAS:
            raise
        print(f"python -m server.profile needs the scoring extras for Parquet ({exc.name} is "
              "not installed): pip install -r requirements-score.txt", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(run())
