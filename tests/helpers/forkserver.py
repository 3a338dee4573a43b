"""A fork server for the tests' app processes: ``python -m zi_app ...`` started as a child forked from an
interpreter that has already imported the heavy third-party libraries, instead of a new interpreter.

Most of a test job's CPU is those imports (benchmarks/forked_jobs.py: a tiny job takes 9.1 CPU-s as a new
interpreter, 2.6 forked), and the suite starts several hundred app processes. The child is still a process of
its own: its own arguments, working directory, environment, stdin/stdout/stderr, exit status and pid (which a
timeout kills). What is shared is only what the imports left in memory, which is why it is not the default for
everything:

- only third-party libraries are preloaded (never ``zi_app`` nor ``hydra_plugins``), so the app's own modules,
  the patches they apply and the plugins Hydra discovers are imported by each child as by a new interpreter;
- an import's own output (a library's warnings at import time) goes to the server's log, not to the test;
- host memory differs (a forked child's RSS counts the pages it inherited: 99 MiB less than a new interpreter's
  for a tiny job), so tests that measure it (``pytest.mark.fresh_interpreter``) keep new interpreters, as do
  forms other than ``-m MODULE`` and ``SCRIPT.py``, and the processes a sweep's launcher starts.

Protocol, over a Unix socket: the client sends one JSON request (argv after the interpreter, cwd, env, optionally
which signals it ignores) with its
stdin, stdout and stderr as file descriptors; the server answers ``pid N`` once the child runs and ``status S``
(``subprocess``'s returncode: negative for a signal) once it has ended.

    python tests/helpers/forkserver.py SOCKET   # prints "ready" once it listens
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import runpy
import signal
import socket
import sys
import threading
import warnings
from typing import Dict, List, Optional, Sequence, Tuple

# What a test's app job imports that takes its time; OPT's and Llama's modelling code are the tiny models'. The
# last three are the 0.7 s of imports a forked tiny job still made without them (python -X importtime).
PRELOAD = ("torch", "transformers", "transformers.models.opt.modeling_opt",
           "transformers.models.llama.modeling_llama", "mlflow", "mlflow.tracking", "deepspeed", "hydra",
           "omegaconf", "sqlalchemy", "alembic", "matplotlib.pyplot", "mlflow.store.tracking.sqlalchemy_store",
           "git", "torch.utils.cpp_extension")


def entry(argv: Sequence[str]) -> Optional[Tuple[str, str]]:
    """("module", name) for ``-m NAME ...``, ("path", file) for ``FILE.py ...``, or None where the arguments
    start with an interpreter option the server does not reproduce (``-c``, ``-u``, ``-X ...``)."""
    if len(argv) >= 2 and argv[0] == "-m":
        return "module", argv[1]
    if argv and str(argv[0]).endswith(".py") and not str(argv[0]).startswith("-"):
        return "path", str(argv[0])
    return None


def _print_uncaught(error: BaseException) -> None:
    """The traceback an interpreter prints for an uncaught exception, from the program's first frame on."""
    frames = error.__traceback__
    while frames is not None and frames.tb_frame.f_code.co_filename in (__file__, runpy.__file__):
        frames = frames.tb_next
    sys.excepthook(type(error), error, frames)


def _run(argv: List[str], cwd: str, env: dict, ignored: Dict[str, bool]) -> int:
    """Run the request in this (forked) process as ``python <argv>`` would, and return its exit status.
    ``ignored``: {signal number: whether the requester ignores it}, for the signals a new interpreter would take
    from its starter rather than from this server (empty: this server's)."""
    for signum, ignore in ignored.items():
        default = signal.default_int_handler if int(signum) == signal.SIGINT else signal.SIG_DFL
        signal.signal(int(signum), signal.SIG_IGN if ignore else default)
    kind, target = entry(argv)
    os.chdir(cwd)
    os.environ.clear()
    os.environ.update(env)
    # As a new interpreter's: `-m` puts the working directory first on sys.path, a script its own folder.
    sys.path[0] = cwd if kind == "module" else os.path.dirname(os.path.abspath(target))
    sys.argv = [target, *argv[2 if kind == "module" else 1:]]
    status = 0
    try:
        if kind == "module":
            runpy.run_module(target, run_name="__main__", alter_sys=True)
        else:
            runpy.run_path(target, run_name="__main__")
    except SystemExit as stop:
        if stop.code is None or isinstance(stop.code, int):
            status = stop.code or 0
        else:
            print(stop.code, file=sys.stderr)
            status = 1
    except KeyboardInterrupt as interrupt:
        _print_uncaught(interrupt)
        status = -signal.SIGINT  # an interpreter ends by the signal itself (see below)
    except BaseException as uncaught:  # noqa: B036 - an uncaught exception ends an interpreter this way
        _print_uncaught(uncaught)
        status = 1
    # What a finishing interpreter does before it exits: wait for its non-daemon threads, run atexit, flush.
    threading._shutdown()
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    if status == -signal.SIGINT:
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGINT)
    return status


def _serve(connection: socket.socket) -> None:
    """In a process forked for one request: fork the child that runs it, report its pid and exit status."""
    message, fds, _, _ = socket.recv_fds(connection, 1 << 22, 3)
    request = json.loads(message)
    # The server auto-reaps these waiters; this process must reap its child itself.
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    child = os.fork()
    if child == 0:
        connection.close()
        for target, fd in enumerate(fds):
            os.dup2(fd, target)
            os.close(fd)
        os._exit(_run(request["argv"], request["cwd"], request["env"], request.get("ignored", {})) & 0xFF)
    for fd in fds:
        os.close(fd)
    reaped = _Reaped()
    # A client killed (SIGKILL) or gone closes the connection: the child it stood for goes with it, as a job
    # process killed from outside would.
    threading.Thread(target=_kill_when_closed, args=(connection, child, reaped), daemon=True).start()
    with contextlib.suppress(OSError):
        connection.sendall(f"pid {child}\n".encode())
    os.waitid(os.P_PID, child, os.WEXITED | os.WNOWAIT)  # ended, not yet reaped: its pid is not reused
    with reaped.lock:
        _, wait_status = os.waitpid(child, 0)
        reaped.done = True
    with contextlib.suppress(OSError):
        connection.sendall(f"status {os.waitstatus_to_exitcode(wait_status)}\n".encode())


class _Reaped:
    """Whether a request's child has been reaped (its pid free for reuse), under the lock that reaps it."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.done = False


def _kill_when_closed(connection: socket.socket, child: int, reaped: _Reaped) -> None:
    """Kill ``child`` once the client closes ``connection`` (it sends nothing after its request), unless it
    has been reaped by then."""
    with contextlib.suppress(OSError):
        while connection.recv(1024):
            pass
    with reaped.lock:
        if not reaped.done:
            with contextlib.suppress(ProcessLookupError):
                os.kill(child, signal.SIGKILL)


def serve(path: str) -> None:
    """Preload, then answer requests on the Unix socket ``path`` until killed or its parent ends."""
    # As the app does before DeepSpeed is imported on a machine without CUDA (zi_app.plan.preflight).
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name in PRELOAD:
            __import__(name)
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(64)
    print("ready", flush=True)
    parent = os.getppid()
    listener.settimeout(5)
    while True:
        try:
            connection, _ = listener.accept()
        except socket.timeout:
            if os.getppid() != parent:  # the pytest worker that started it is gone (killed): so is its use
                return
            continue
        connection.settimeout(None)
        if os.fork() == 0:
            listener.close()
            try:
                _serve(connection)
            finally:
                os._exit(0)
        connection.close()


if __name__ == "__main__":
    serve(sys.argv[1])
