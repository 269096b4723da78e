"""``python -m server.score``: the documented command; the code is ``server.jobs.score``.

Without the scoring extras (pandas, pyarrow) it says how to install them, in one line."""

import sys

EXTRAS = {"pandas", "pyarrow", "numpy"}


def run() -> int:
    try:
        from server.jobs.score import main
    except ModuleNotFoundError as exc:
        if (exc.name or "").split(".")[0] not in EXTRAS:
            raise
        from server.jobs import missing_extras

        print(missing_extras(str(exc.name)), file=sys.stderr)
        return 2
    return main()


if __name__ == "__main__":
    raise SystemExit(run())
