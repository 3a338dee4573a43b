"""Stopping on a signal: SIGINT (Ctrl-C), SIGTERM (kill, SLURM, systemd) and SIGHUP (a closed terminal) all
raise :class:`Interrupted` in the main thread, so that whoever holds an MLflow run closes it FAILED, kind
``killed``, with the signal named, before the process exits with 128 + the signal's number (what a shell
reports for a process that a signal ended). SIGKILL cannot be caught: a later command closes those runs.

Python runs a handler between bytecodes, wherever the main thread is, and an exception raised inside a
``__del__`` or a weakref callback (SQLAlchemy's garbage-collection hooks run there) is printed as "Exception
ignored" and lost. So the signal is also recorded, and the job calls :func:`check` at its safe points (each
decode step, before recording success): a lost raise still stops it there. A later signal raises again.
"""

from __future__ import annotations

import signal
import threading
import time
from typing import Optional

SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
# A repeat of the first signal this soon after it is the same stop delivered twice (Ctrl-C reaches a sweep's
# job through the terminal's process group and again from the sweep's driver): raising again would cut the
# closing of the job's run short. Any other signal, or the same one later, raises.
DUPLICATE_S = 1.0
_received: Optional[int] = None
_received_at = 0.0


class Interrupted(SystemExit):
    """A stop requested by a signal. A SystemExit (exit status 128 + signum, no traceback), so that no
    ``except Exception`` on the way out (Hydra's, a callback's) mistakes it for a job's failure."""

    failure_kind = "killed"

    def __init__(self, signum: int):
        self.signum = signum
        super().__init__(128 + signum)

    @property
    def signal_name(self) -> str:
        return signal_name(self.signum)

    def __str__(self) -> str:
        return f"stopped by {self.signal_name}"

    def __reduce__(self):
        return type(self), (self.signum,)


def signal_name(signum: int) -> str:
    """``SIGTERM`` for 15."""
    return signal.Signals(signum).name


def _stop(signum: int, frame) -> None:
    global _received, _received_at
    now = time.monotonic()
    if _received is None:
        _received, _received_at = signum, now
    elif signum == _received and now - _received_at < DUPLICATE_S:
        return
    raise Interrupted(signum)


def check() -> None:
    """Raise :class:`Interrupted` if a signal came: a safe point of the job, where a stop whose raise was
    swallowed (it landed in a ``__del__`` or weakref callback) takes effect."""
    if _received is not None:
        raise Interrupted(_received)


def install() -> None:
    """Route SIGINT, SIGTERM and SIGHUP to :class:`Interrupted`; a signal ignored by whoever started this
    process (``nohup`` ignores SIGHUP) stays ignored. Only the main thread can install handlers."""
    if threading.current_thread() is not threading.main_thread():
        return
    for signum in SIGNALS:
        if signal.getsignal(signum) is not signal.SIG_IGN:
            signal.signal(signum, _stop)


def caught(signum: int) -> Interrupted:
    """The :class:`Interrupted` of a signal that another handler caught for this process (torch elastic's, while
    it runs a job's ranks), recorded as received like one of ours."""
    global _received
    if _received is None:
        _received = signum
    return Interrupted(signum)


def received() -> Optional[int]:
    """The signal that stopped this process, if one did."""
    return _received
