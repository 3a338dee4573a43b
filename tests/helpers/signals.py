"""Signals as a terminal's command gets them, for tests that send Ctrl-C to a real process."""

import signal


def terminal_signals() -> None:
    """``preexec_fn``: SIGINT and SIGQUIT at their defaults. A shell started in the background (``cmd &``, a CI
    runner's) ignores both and its children inherit that, so a test run from one would send a Ctrl-C nobody sees."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGQUIT, signal.SIG_DFL)
