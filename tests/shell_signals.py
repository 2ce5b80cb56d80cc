"""For tests that Ctrl-C a child process: start it with SIGINT as a shell gives it (handled by default, not
blocked), whatever an earlier test in the same pytest worker left in the worker's signal state (in the full suite
these children once ignored the SIGINT that the same tests, run alone, saw; children inherit an ignored or blocked
signal across exec)."""

import signal


def sigint_as_from_a_shell() -> None:
    """A subprocess preexec_fn: SIGINT's default disposition and unblocked."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
