"""``python -m server.score``: the documented command; the code is ``server.jobs.score``."""

from server.jobs.score import main

if __name__ == "__main__":
    raise SystemExit(main())
