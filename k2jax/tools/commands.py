"""What k2jax's commands (k2jax-train / train.py, k2jax-convert / convert_checkpoint.py, k2jax-demo) share: exit
codes, one-line errors, quiet library logs.

    run(main, errors={CheckpointError: FAILED, OutputError: IO_ERROR})   # errors print as "PROG: error: ..."

Exit codes (the README's "Exit codes and failure behaviour" table):

    0   OK          the requested work is complete
    1   FAILED      it could not be done: one line on stderr says why (bad or damaged input, a training step
                    that was not finite); an unexpected error (a bug) prints its traceback
    2   USAGE       a bad flag or config value: one line names it and what to change; nothing was done
    74  IO_ERROR    the converter could not write its output (disk full, read-only): OUT_DIR.partial is kept and
                    `--resume` continues once that is fixed
    75  PREEMPTED   training got SIGTERM (a preemption notice): the state was saved; run the same command again
                    to resume (sysexits' EX_TEMPFAIL: "temporary failure, try again")

Library INFO logs (Orbax, absl) are shown only when --verbosity is given (--verbosity=0: INFO); with
--verbosity=1 or more an error also prints its traceback.
"""

from __future__ import annotations

import os
import sys
from typing import Callable, Mapping

from absl import app, flags, logging

OK, FAILED, USAGE, IO_ERROR, PREEMPTED = 0, 1, 2, 74, 75


class UsageError(ValueError):
    """A flag or config value that cannot work; the message names it and what to change (exit 2)."""


def one_line(error: BaseException) -> str:
    """The error's message on one line (tracebacks and multi-line messages folded)."""
    text = " ".join(str(error).split())
    return text or type(error).__name__


def fail(name: str, message: str, code: int) -> None:
    """Prints "NAME: error: MESSAGE" and exits with `code` at once (os._exit): the error's own cleanup (finally
    blocks, closing the checkpoint manager) has run, and background threads of a failed read (tensorstore under
    Orbax) would otherwise print "Event loop is closed" tracebacks while the interpreter shuts down."""
    sys.stdout.flush()
    sys.stderr.write(f"{name}: error: {message}\n")
    sys.stderr.flush()
    os._exit(code)


def debugging() -> bool:
    """--verbosity=1 (or more): errors print their traceback."""
    return flags.FLAGS.is_parsed() and bool(flags.FLAGS["verbosity"].present) and flags.FLAGS.verbosity >= 1


def _verbosity_in(argv: list[str]) -> int | None:
    """--verbosity / -v as given in argv (for errors while the flags themselves do not parse)."""
    for i, arg in enumerate(argv):
        for name in ("--verbosity", "-v", "--v"):
            value = arg[len(name) + 1:] if arg.startswith(name + "=") else (
                argv[i + 1] if arg == name and i + 1 < len(argv) else None)
            if value is not None and value.lstrip("-").isdigit():
                return int(value)
    return None


def parse_flags(name: str, describe: Callable[[BaseException, list[str]], str] | None = None):
    """An absl flags_parser: a flag that does not parse is one line and exit 2 (absl's own parser exits 1 after a
    multi-line message, and lets some errors, e.g. ml_collections' unknown --config.FIELD, escape as tracebacks).
    `describe(error, argv)` may word an error better."""

    def parse(argv: list[str]) -> list[str]:
        try:
            return flags.FLAGS(argv)
        except Exception as e:  # every parse error is a usage error
            if (_verbosity_in(argv) or 0) >= 1:
                raise
            message = describe(e, argv) if describe is not None else None
            fail(name, message or one_line(e), USAGE)

    return parse


def command_name() -> str:
    """The command's name as it was run (train.py, k2jax-train, convert_checkpoint.py, k2jax-convert, ...)."""
    return os.path.basename(sys.argv[0]) or "k2jax"


def run(main: Callable[[list[str]], None], *, errors: Mapping[type, int],
        describe_flag_error: Callable[[BaseException, list[str]], str] | None = None, prog: str | None = None) -> None:
    """absl's app.run(main) with k2jax's exit codes: flag errors and UsageError are one line and exit 2, each
    exception of a type in `errors` (checked in order) one line and its exit code, library logs at WARNING
    unless --verbosity is given. Errors read "PROG: error: ..." (default PROG: the command as it was run)."""
    name = prog or command_name()

    def wrapped(argv):
        if not flags.FLAGS["verbosity"].present:
            logging.set_verbosity(logging.WARNING)  # absl turns INFO on by default; Orbax logs a lot at INFO
        try:
            main(argv)
        except (UsageError, app.UsageError) as e:
            if debugging():
                raise
            fail(name, one_line(e), USAGE)
        except tuple(errors) as e:
            if debugging():
                raise
            code = next(c for t, c in errors.items() if isinstance(e, t))
            fail(name, one_line(e), code)

    app.run(wrapped, flags_parser=parse_flags(name, describe_flag_error))
