"""The command-line tools (``bus-guard``): the only edge that reads argv, files, the
environment and signals."""

from bus_guard.cli._main import main

__all__ = ("main",)
