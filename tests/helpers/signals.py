"""Signals as a terminal's command gets them, for tests that send Ctrl-C to a real process."""

import signal


def terminal_signals() -> None:
    """``preexec_fn``: SIGINT, SIGQUIT and SIGHUP at their defaults, as in a command a terminal's shell starts. A
    shell started in the background (``cmd &``, a CI runner's) ignores SIGINT and SIGQUIT, ``nohup`` ignores
    SIGHUP, and children inherit that (the app keeps an ignored signal ignored, as ``nohup`` asks), so a test run
    from one would send a Ctrl-C or a hang-up nobody sees."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGQUIT, signal.SIG_DFL)
    signal.signal(signal.SIGHUP, signal.SIG_DFL)
