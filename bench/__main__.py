"""``python -m bench``: the whole performance comparison in one command (bench.peers with its
defaults: every peer, micro-batching on and off, 1,000-row batches against the in-process
model, the 1,000-connection hold, RSS, and the table of issue 8's targets)."""

from bench.peers import main

raise SystemExit(main())
