"""``python``, as far as a sweep's launcher can tell, for the tests' job processes: runs ``python ARGS...`` as a child
forked from the fork server (forkserver.py) and stands for it until it ends.

    python tests/helpers/fork_python.py SOCKET -m MODULE ARGS...   # hydra.launcher.python='... SOCKET'

The launcher sees one process: this one. It passes on its stdin, stdout, stderr, working directory and environment
to the child; every signal a launcher or a terminal sends to a job (SIGTERM, SIGINT, SIGHUP, SIGQUIT, SIGUSR1,
SIGUSR2) to the child; and it ends as the child ended: the same exit status, or killed by the same signal. Killed
itself (SIGKILL), it closes its connection, and the server kills the child. It imports nothing heavy: its own start
is an interpreter's bare start.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sys

FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2)


def main(path: str, argv: list) -> None:
    child: list = []  # its pid, once the server has forked it
    early: list = []  # signals received before that, passed on then

    def forward(signum: int, _frame) -> None:
        if child:
            os.kill(child[0], signum)
        else:
            early.append(signum)

    # A new interpreter keeps the signals its starter ignored ignored (a job started in a shell's background
    # ignores SIGINT): the child is told which, as the server's own dispositions are not this process's.
    ignored = {signum: signal.getsignal(signum) == signal.SIG_IGN for signum in FORWARDED}
    for signum in FORWARDED:  # before anything else: a launcher may signal as soon as this process exists
        signal.signal(signum, forward)
    client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    client.connect(path)
    request = json.dumps({"argv": argv, "cwd": os.getcwd(), "env": dict(os.environ), "ignored": ignored}).encode()
    socket.send_fds(client, [request], [0, 1, 2])
    replies = client.makefile("r")
    child.append(int(replies.readline().split()[1]))
    for signum in early:
        os.kill(child[0], signum)
    line = replies.readline()
    if not line:  # the server went away before the child ended
        sys.exit(f"fork_python: the fork server closed the connection while pid {child[0]} ran")
    status = int(line.split()[1])
    if status >= 0:
        sys.exit(status)
    if -status in FORWARDED:
        signal.signal(-status, signal.SIG_DFL)
    os.kill(os.getpid(), -status)
    sys.exit(128 - status)  # a signal whose default is not to end a process


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
