"""A signal cannot be swallowed (issue 24, item 2): Python prints an exception raised in a ``__del__`` or a
weakref callback as "Exception ignored" and goes on, and SQLAlchemy's garbage-collection hooks run there, so a
SIGTERM landing in one used to let the job finish FINISHED with exit 0, and made it deaf to later signals.

Each test runs a real process that installs the app's handlers and sends itself the signal from inside a
``weakref.finalize`` callback (where the handler's raise is lost), then does what a job does next.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time

from helpers.signals import terminal_signals

PRELUDE = """
import os, signal, sys, time, weakref
from zi_app.run import interrupt

interrupt.install()

class Session:
    pass

session = Session()
weakref.finalize(session, os.kill, os.getpid(), signal.SIGTERM)
del session  # the finalizer runs here: the handler raises inside it, and Python prints and drops that
print("swallowed", flush=True)
"""


def start(body: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", PRELUDE + body], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, preexec_fn=terminal_signals)


def test_a_swallowed_signal_stops_the_job_at_its_next_safe_point():
    process = start("interrupt.check()\nprint('went on', flush=True)\n")
    out, err = process.communicate(timeout=60)
    assert "Exception ignored" in err and "stopped by SIGTERM" in err, err  # the raise was lost...
    assert "swallowed" in out and "went on" not in out
    assert process.returncode == 128 + signal.SIGTERM, (out, err)  # ...and the safe point stopped the job


def test_a_second_signal_after_a_swallowed_one_is_honoured():
    """No safe point comes (a loop that never checks): the next SIGTERM, or a SIGINT, still ends it."""
    for second, code in ((signal.SIGTERM, 128 + signal.SIGTERM), (signal.SIGINT, 128 + signal.SIGINT)):
        process = start("while True:\n    time.sleep(0.05)\n")
        assert process.stdout.readline().strip() == "swallowed"
        time.sleep(1.5)  # past the window in which a repeat of the same signal counts as one delivered twice
        process.send_signal(second)
        out, err = process.communicate(timeout=60)
        assert process.returncode == code, (second, out, err)
