"""What k2jax's commands (k2jax-train / train.py, k2jax-convert / convert_checkpoint.py, k2jax-aot, k2jax-demo)
share: exit codes, one-line errors, quiet library logs, --help, the job config flag, Ctrl-C during long calls.

    run(main, errors={CheckpointError: FAILED, OutputError: IO_ERROR})   # errors print as "PROG: error: ..."

Exit codes (the README's "Exit codes and failure behaviour" table):

    0   OK          the requested work is complete (also --help)
    1   FAILED      it could not be done: one line on stderr says why (bad or damaged input, a training step
                    that was not finite, a k2jax-aot program that does not fit); an unexpected error (a bug) prints
                    its traceback
    2   USAGE       a bad flag or config value: one line names it and what to change; nothing was done
    74  IO_ERROR    the converter could not write its output (disk full, read-only): OUT_DIR.partial is kept and
                    `--resume` continues once that is fixed
    75  PREEMPTED   training got SIGTERM (a preemption notice): the state was saved; run the same command again
                    to resume (sysexits' EX_TEMPFAIL: "temporary failure, try again")
    130 INTERRUPTED Ctrl-C (SIGINT; 128 + 2, as a shell reports it): one line says what was kept (train.py saves
                    at the next step, k2jax-convert keeps OUT_DIR.partial for --resume)

Library INFO logs (Orbax, absl) are shown only when --verbosity is given (--verbosity=0: INFO); with
--verbosity=1 or more an error also prints its traceback, and exits with the same code.

The job config (`job_config=True`: train.py and k2jax-aot's --config, ml_collections): --config names a file, a
path relative to the installed configs/ (`--config=configs/tiny.py` from any directory) or a shipped config by
name (`--config=tiny`); `--config.model.overrides.FIELD=VALUE` sets one field of the model's overrides (a K2Config
field or a run option, e.g. remat=full) however the config file wrote them; a config that does not load, an unknown
`--config.FIELD` or a value of the wrong type is one line and exit 2.
"""

from __future__ import annotations

import ast
import importlib.util
import os
import re
import sys
import threading
import time
import traceback
from typing import Any, Callable, Mapping

from absl import app, flags, logging

OK, FAILED, USAGE, IO_ERROR, PREEMPTED, INTERRUPTED = 0, 1, 2, 74, 75, 130


class UsageError(ValueError):
    """A flag or config value that cannot work; the message names it and what to change (exit 2)."""


class Interrupted(Exception):
    """Ctrl-C stopped the command; the message says what was kept and how to continue (exit 130)."""


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


_HELP = ("help", "?", "helpshort", "helpfull", "helpxml")


def parse_flags(name: str, *, job_config: bool = False):
    """An absl flags_parser: a flag that does not parse is one line and exit 2 (absl's own parser exits 1 after a
    multi-line message, and lets some errors, e.g. ml_collections' unknown --config.FIELD, escape as tracebacks);
    --help exits 0 (absl: 1). job_config: the --config flag is a job config (module docstring), loaded and checked
    here, an unknown --config.FIELD named as the flag."""

    def parse(argv: list[str]) -> list[str]:
        try:
            rest = flags.FLAGS(argv)
            if job_config:
                _load_job_config(_MODEL_OVERRIDES)
            return rest
        except SystemExit as e:  # a help flag printed the help; absl exits 1 after it
            if e.code == 1 and any(a.lstrip("-").split("=")[0] in _HELP for a in argv[1:]):
                raise SystemExit(OK) from None
            raise
        except Exception as e:  # every parse error is a usage error
            if (_verbosity_in(argv) or 0) >= 1:
                traceback.print_exc()
            message = _describe_config_error(e, argv) if job_config and not isinstance(e, UsageError) else None
            fail(name, message or one_line(e), USAGE)

    return parse


def command_name() -> str:
    """The command's name as it was run (train.py, k2jax-train, convert_checkpoint.py, k2jax-convert, ...)."""
    return os.path.basename(sys.argv[0]) or "k2jax"


def _exit_code(error: BaseException, errors: Mapping[type, int]) -> int | None:
    if isinstance(error, (UsageError, app.UsageError)):
        return USAGE
    if isinstance(error, (Interrupted, KeyboardInterrupt)):
        return INTERRUPTED
    return next((c for t, c in errors.items() if isinstance(error, t)), None)


def run(main: Callable[[list[str]], Any], *, errors: Mapping[type, int], prog: str | None = None,
        job_config: bool = False, doc: str | None = None) -> None:
    """absl's app.run(main) with k2jax's exit codes: flag errors and UsageError are one line and exit 2, each
    exception of a type in `errors` (checked in order) one line and its exit code, Ctrl-C (KeyboardInterrupt, or
    an Interrupted saying what was kept) one line and 130; library logs at WARNING unless --verbosity is given.
    Errors read "PROG: error: ..." (default PROG: the command as it was run). doc: what --help prints above the
    flags when the program that runs has no docstring of its own (a console script)."""
    name = prog or command_name()
    main_module = sys.modules.get("__main__")
    if doc and main_module is not None and not main_module.__doc__:
        main_module.__doc__ = doc

    def wrapped(argv):
        if not flags.FLAGS["verbosity"].present:
            logging.set_verbosity(logging.WARNING)  # absl turns INFO on by default; Orbax logs a lot at INFO
        try:
            return main(argv)  # app.run exits with what main returns (None: 0)
        except BaseException as e:  # noqa: B036 (KeyboardInterrupt is one of the errors it reports)
            code = _exit_code(e, errors)
            if code is None:
                raise
            if debugging():
                traceback.print_exc()
            fail(name, "interrupted (Ctrl-C)" if type(e) is KeyboardInterrupt else one_line(e), code)

    app.run(wrapped, flags_parser=parse_flags(name, job_config=job_config))


# ---- long calls ----------------------------------------------------------------------------------------------

class Heartbeat:
    """Says "WHAT ..." on entering, then "  WHAT: N s" every `every` seconds until the block ends (a compile takes
    minutes on 2 cores); `seconds` is the block's duration afterwards."""

    def __init__(self, what: str, log: Callable[[str], None], every: float = 30.0):
        self.what, self.log, self.every = what, log, every
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.start = time.perf_counter()
        self.seconds = 0.0

    def _run(self):
        while not self._stop.wait(self.every):
            self.log(f"  {self.what}: {time.perf_counter() - self.start:.0f} s")

    def __enter__(self):
        self.log(f"{self.what} ...")
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self.seconds = time.perf_counter() - self.start


def interruptible(fn: Callable[..., Any], *args: Any) -> Any:
    """fn(*args) in a worker thread while this (the main) thread waits, so Ctrl-C raises KeyboardInterrupt here
    within 0.1 s even while fn is inside C++ that does not return to Python for minutes (an XLA compile: the
    interrupt used to wait for it to finish). After a KeyboardInterrupt fn goes on in its daemon thread until the
    command exits."""
    outcome: dict[str, Any] = {}

    def target():
        try:
            outcome["value"] = fn(*args)
        except BaseException as e:  # noqa: B036 (handed to the waiting thread)
            outcome["error"] = e

    thread = threading.Thread(target=target, daemon=True, name=getattr(fn, "__name__", "call"))
    thread.start()
    while thread.is_alive():
        thread.join(0.1)
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


# ---- the job config (--config) --------------------------------------------------------------------------------

_OVERRIDE = re.compile(r"--config\.model\.overrides\.(\w+)=(.*)", re.S)
_MODEL_OVERRIDES: list[tuple[str, str, Any]] = []  # taken out of sys.argv by define_job_config
_CONFIG_ARGS: list[str] = []  # --config.* as given


def define_job_config() -> None:
    """Defines --config, the job config (module docstring). ml_collections reads the --config.* overrides from
    sys.argv when the flag is defined: --config is resolved there first, and the model overrides given one field at
    a time are taken out (set once the config loads)."""
    from ml_collections import config_flags
    _CONFIG_ARGS[:] = [a for a in sys.argv[1:] if a.startswith("--config.")]
    sys.argv[:], _MODEL_OVERRIDES[:] = _job_config_args(sys.argv)
    config_flags.DEFINE_config_file(
        "config", None, "A job config: a configs/*.py file (from any directory: the installed configs/), or a "
        "shipped one by name (--config=tiny); override any field with --config.FIELD=VALUE (all fields: "
        "k2jax.job_config.base_config()), a model field with --config.model.overrides.FIELD=VALUE (a K2Config "
        "field or a run option of k2jax.model.config.RunOptions, e.g. remat=full).", lock_config=True)


def config_source() -> str:
    """The job config as given: its file and the --config.* overrides."""
    return " ".join([flags.FLAGS["config"].config_filename] + _CONFIG_ARGS)


def configs_dir() -> str | None:
    """The installed configs/ package's directory (found without importing it), or None."""
    spec = importlib.util.find_spec("configs")
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    return locations[0] if locations else None


def resolve_config(value: str) -> str:
    """--config's file: `value` where it exists; else the shipped config it names (`configs/tiny.py` from any
    directory, `tiny.py` or `tiny`); else `value` (its load error names it)."""
    path, sep, arg = value.partition(":")  # ml_collections: FILE:ARG passes ARG to get_config
    if os.path.exists(path) or not path:
        return value
    shipped = configs_dir()
    if shipped is None:
        return value
    name = os.path.basename(path)
    candidates = [os.path.join(os.path.dirname(shipped), path), os.path.join(shipped, name),
                  os.path.join(shipped, name + ".py")]
    found = next((c for c in candidates if os.path.isfile(c)), None)
    return found + sep + arg if found else value


def _job_config_args(argv: list[str]) -> tuple[list[str], list[tuple[str, str, Any]]]:
    """argv with --config resolved (resolve_config) and the --config.model.overrides.FIELD=VALUE flags taken
    out: [(flag, FIELD, VALUE as a Python literal, else the string)] to set after the config loads."""
    rest, overrides = [], []
    for arg in argv:
        m = _OVERRIDE.fullmatch(arg)
        if m:
            try:
                value = ast.literal_eval(m.group(2))
            except (ValueError, SyntaxError):
                value = m.group(2)
            overrides.append((arg, m.group(1), value))
        elif arg.startswith("--config="):
            rest.append("--config=" + resolve_config(arg[len("--config="):]))
        else:
            rest.append(arg)
    return rest, overrides


def _load_job_config(overrides: list[tuple[str, str, Any]]) -> None:
    """Loads --config (ml_collections defers a config file's load errors to the first use) and sets the model
    overrides given one field at a time."""
    try:
        config = flags.FLAGS.config
        if config is None:  # a command whose --config is optional (k2jax-aot --hlo) and not given
            if overrides:
                raise UsageError(f"{overrides[0][0]}: no --config to override")
            return
        config.keys()
    except UsageError:
        raise
    except Exception as e:
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        raise UsageError(f"--config={flags.FLAGS['config'].config_filename}: cannot load it: "
                         f"{lines[-1] if lines else type(e).__name__}") from None
    for arg, field, value in overrides:
        try:
            with config.unlocked():
                config.model.overrides[field] = value
        except (TypeError, ValueError, AttributeError, KeyError) as e:
            raise UsageError(f"{arg}: {one_line(e)}") from None


def _describe_config_error(error: BaseException, argv: list[str]) -> str | None:
    """ml_collections reports an unknown --config.FIELD as a chained KeyError / AttributeError whose text is a
    quoted key and a suggestion on a second line; name the flag instead."""
    cause = error
    while cause is not None and not isinstance(cause, KeyError):
        cause = cause.__cause__ or cause.__context__
    if cause is None or not cause.args:
        return None
    key, _, hint = str(cause.args[0]).partition("\n")
    key = key.strip("'\"")
    arg = next((a for a in argv if re.match(rf"--config(\.\w+)*\.{re.escape(key)}(=|$)", a)), f"--config...{key}")
    hint = f" ({hint.strip()})" if hint.strip() else ""
    return f"{arg}: the config has no field {key!r}{hint}; every field: k2jax.job_config.base_config()"
