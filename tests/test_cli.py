"""The raftcoord command line, through click's CliRunner."""

from __future__ import annotations

from click.testing import CliRunner

from raftcoord import __version__
from raftcoord.cli import main


def test_help_lists_commands() -> None:
    """--help prints the group's help with its commands."""
    result = CliRunner().invoke(main, ["--help"])
    assert result.exit_code == 0
    assert "demo" in result.output and "version" in result.output


def test_version() -> None:
    """version prints raftcoord's and pysyncobj's versions."""
    result = CliRunner().invoke(main, ["version"])
    assert result.exit_code == 0
    assert result.output.startswith(f"raftcoord {__version__} (pysyncobj 0.3.17)")


def test_demo_exchanges_messages() -> None:
    """demo shows both nodes up and each observing the other's messages."""
    result = CliRunner().invoke(main, ["demo", "--messages", "4"])
    assert result.exit_code == 0, result.output
    assert "n1   up" in result.output and "n2   up" in result.output
    lines = {line.split(" observed")[0]: line for line in result.output.splitlines() if " observed " in line}
    assert lines["n1"].count(":n2:") == 2 and lines["n2"].count(":n1:") == 2


def test_unknown_command_is_a_usage_error() -> None:
    """An unknown command exits 2 with one line, not a traceback."""
    result = CliRunner().invoke(main, ["nope"])
    assert result.exit_code == 2
    assert "Traceback" not in result.output
