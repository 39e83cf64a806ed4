"""What every command of the suite (bench.py and its compare, report, sweep and abtest) shares:
its exit codes and how a user's mistake ends it (one line on stderr, exit code 2, no
traceback)."""
from __future__ import annotations

import argparse
from enum import IntEnum


class ExitCode(IntEnum):
    OK = 0
    FAILED = 1  # a run failed (bench.py, sweep), or a regression (compare, abtest)
    # Bad usage or input, found before anything is measured; for abtest also this checkout's
    # own benchmark failing.
    USAGE = 2
    INTERRUPTED = 130  # Ctrl-C; the result file keeps every run that finished


class UsageError(Exception):
    """A user mistake or unusable input: printed as one line, exit code 2."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse, with its errors raised as UsageError (printed like every other one)."""

    def error(self, message):
        raise UsageError(message)


def run_guarded(body) -> int:
    """`body()`, with a user error (ours, an unknown backend, a bad config) printed as one line
    on stderr and turned into ExitCode.USAGE."""
    from rich.console import Console
    from rich.markup import escape

    from backends import UnknownBackend
    from backends.contract import ConfigError
    try:
        return body()
    except (UsageError, UnknownBackend, ConfigError) as error:
        Console(stderr=True, soft_wrap=True).print(f"[red]error:[/red] {escape(str(error))}",
                                                   highlight=False)
        return ExitCode.USAGE
