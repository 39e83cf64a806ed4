"""What every command of the suite (bench.py and its compare, report, sweep and abtest) shares:
its exit codes, how a user's mistake ends it (one line on stderr, exit code 2, no traceback),
and how a termination signal ends it (as Ctrl-C does: the current run is stopped, its process
tree killed, finished runs kept)."""
from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
from enum import IntEnum


class ExitCode(IntEnum):
    OK = 0
    FAILED = 1  # a run failed (bench.py, sweep), or a regression (compare, abtest)
    # Bad usage or input, found before anything is measured (nothing written); for compare and
    # report any unreadable or malformed input; for abtest also this checkout's own benchmark
    # failing or a --base that does not exist.
    USAGE = 2
    # The results could not be saved after runs began (a full disk, a folder that vanished):
    # the result file keeps its last complete save.
    OUTPUT = 3
    INTERNAL = 70  # a bug of the suite (EX_SOFTWARE): one line on stderr, never 1
    HANGUP = 129  # SIGHUP: as Ctrl-C
    INTERRUPTED = 130  # Ctrl-C; the result file keeps every run that finished
    TERMINATED = 143  # SIGTERM (what CI systems send on cancel): as Ctrl-C


class UsageError(Exception):
    """A user mistake or unusable input: printed as one line, exit code 2."""


class Terminated(KeyboardInterrupt):
    """SIGTERM or SIGHUP, turned into the same clean-up as Ctrl-C."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def interrupt_exit_code(interrupt: BaseException | None) -> int:
    if isinstance(interrupt, Terminated):
        return 128 + interrupt.signum
    return ExitCode.INTERRUPTED


def describe_interrupt(interrupt: BaseException | None) -> str:
    if isinstance(interrupt, Terminated):
        return f"{signal.Signals(interrupt.signum).name} (terminated)"
    return "the user (Ctrl-C)"


TERMINATION_SIGNALS = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGHUP")
                            if hasattr(signal, name))


def install_termination_handlers() -> None:
    """SIGTERM and SIGHUP raise Terminated in the main thread, so they take the same path as
    Ctrl-C: the supervised process group is killed, finished runs are saved."""
    if threading.current_thread() is not threading.main_thread():
        return

    def handler(signum, frame):
        raise Terminated(signum)

    for signum in TERMINATION_SIGNALS:
        if signal.getsignal(signum) is not signal.SIG_IGN:  # nohup keeps ignoring SIGHUP
            signal.signal(signum, handler)


class ArgumentParser(argparse.ArgumentParser):
    """argparse, with its errors raised as UsageError (printed like every other one)."""

    def error(self, message):
        raise UsageError(message)


def print_error(message: str) -> None:
    """One line on stderr, whatever the terminal's encoding and even with stderr closed."""
    line = f"error: {message}".replace("\n", " ")
    line = line.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    stream = sys.stderr
    if stream is None:
        return
    try:
        stream.write(line.encode(stream.encoding or "utf-8", "backslashreplace").decode(
            stream.encoding or "utf-8") + "\n")
        stream.flush()
    except (OSError, ValueError):
        pass


class SafeStdout:
    """sys.stdout for the tables: a closed or broken stdout (`>&-`, `| head`) loses the text,
    never the exit code (Rich would turn a broken pipe into SystemExit(1), "regression" to
    compare's caller). Results are in the files."""

    def __init__(self):
        self.broken = False

    @property
    def encoding(self):
        return getattr(sys.stdout, "encoding", None) or "utf-8"

    def write(self, text: str) -> int:
        if not self.broken and sys.stdout is not None:
            try:
                sys.stdout.write(text)
            except (OSError, ValueError):
                self.broken = True
            except UnicodeEncodeError:
                sys.stdout.write(text.encode(self.encoding, "backslashreplace").decode(
                    self.encoding))
        return len(text)

    def flush(self) -> None:
        if not self.broken and sys.stdout is not None:
            try:
                sys.stdout.flush()
            except (OSError, ValueError):
                self.broken = True

    def isatty(self) -> bool:
        try:
            return sys.stdout is not None and sys.stdout.isatty()
        except (OSError, ValueError):
            return False

    def fileno(self) -> int:
        if sys.stdout is None:
            raise OSError("stdout is closed")
        return sys.stdout.fileno()


def stdout_console(**options):
    """A Rich console on SafeStdout: as wide as the terminal, or `wide` columns when stdout
    is a file or a CI log."""
    from rich.console import Console
    wide = options.pop("wide", 200)
    stream = SafeStdout()
    return Console(file=stream, width=None if stream.isatty() else wide, **options)


def settle_stdout() -> None:
    """Flush stdout at the end; a closed or broken one is pointed at /dev/null so that the
    interpreter's own final flush cannot fail the exit code."""
    try:
        if sys.stdout is not None:
            sys.stdout.flush()
    except (OSError, ValueError):
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
        except (OSError, ValueError):
            pass


def run_guarded(body) -> int:
    """`body()`, with a user error (ours, an unknown backend, a bad config) printed as one line
    on stderr and turned into ExitCode.USAGE, and a bug printed as one line and turned into
    ExitCode.INTERNAL (MICROGPT_BENCH_DEBUG=1 shows its traceback)."""
    try:
        return _run(body)
    finally:
        settle_stdout()


def _run(body) -> int:
    from backends import UnknownBackend
    from backends.contract import ConfigError
    try:
        return body()
    except (UsageError, UnknownBackend, ConfigError) as error:
        print_error(str(error))
        return ExitCode.USAGE
    except KeyboardInterrupt:
        raise
    except Exception as error:  # a bug: never a traceback, never a misleading exit code
        if os.environ.get("MICROGPT_BENCH_DEBUG"):
            raise
        print_error(f"internal error (a bug of the suite, please report it): "
                    f"{type(error).__name__}: {error}; MICROGPT_BENCH_DEBUG=1 shows the "
                    f"traceback")
        return ExitCode.INTERNAL
