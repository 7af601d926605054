"""``python -m raftcoord``: the command line."""

from raftcoord.cli import main

main()
