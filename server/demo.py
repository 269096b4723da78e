"""``python -m server.demo DIR``, the documented command (API.md): ``server.jobs.demo``."""

from server.jobs.demo import main

if __name__ == "__main__":
    import sys

    raise SystemExit(main(sys.argv[1:]))
