"""The tests' fork server (tests/helpers/forkserver.py) against a new interpreter: a forked child must give a
program what ``python FILE.py`` and ``python -m MODULE`` give it (arguments, working directory, environment,
sys.path, output streams, threads and atexit at the end, exit status, signals), or the tests that use it would
test something else; and tests/helpers/fork_python.py, which stands for a forked job where a sweep's launcher
expects a ``python`` process of its own."""

from __future__ import annotations

import contextlib
import signal
import subprocess
import sys
import time

import psutil
import pytest

from conftest import app_env

PROGRAM = '''
import atexit, os, sys, threading, time
print("preloaded", "deepspeed" in sys.modules)
print("argv", sys.argv[1:], "cwd", os.getcwd(), "path0", sys.path[0], "env", os.environ.get("ZI_CACHE_DIR"))
print("to stderr", file=sys.stderr)
atexit.register(lambda: print("atexit ran", flush=True))
threading.Thread(target=lambda: (time.sleep(0.5), print("thread finished", flush=True))).start()
how = sys.argv[1]
if how == "raise":
    raise ValueError("uncaught")
if how == "interrupt":
    raise KeyboardInterrupt
sys.exit(int(how))
'''


@pytest.fixture
def program(tmp_path):
    (tmp_path / "prog.py").write_text(PROGRAM)
    (tmp_path / "progmod.py").write_text(PROGRAM)
    return tmp_path


def fresh(args, cwd):
    return subprocess.run([sys.executable, *args], cwd=cwd, env=app_env(cwd), capture_output=True, text=True,
                          timeout=120)


@pytest.mark.quick
@pytest.mark.parametrize("how,returncode", [("0", 0), ("3", 3), ("raise", 1), ("interrupt", -2)])
@pytest.mark.parametrize("form", ["script", "module"])
def test_a_forked_child_runs_a_program_as_a_new_interpreter_does(program, run_python, form, how, returncode):
    args = ["prog.py", how] if form == "script" else ["-m", "progmod", how]
    forked, new = run_python(args, program), fresh(args, program)
    assert forked.args == [sys.executable, *args]
    # Only the imports differ: the child was forked from the server, which had DeepSpeed imported.
    assert (forked.stdout.splitlines()[0], new.stdout.splitlines()[0]) == ("preloaded True", "preloaded False")
    assert (forked.returncode, forked.stdout.splitlines()[1:]) == (new.returncode, new.stdout.splitlines()[1:])
    assert forked.returncode == returncode and "thread finished" in forked.stdout and "atexit ran" in forked.stdout
    assert forked.stdout.splitlines()[1] == f"argv ['{how}'] cwd {program} path0 {program} env {program / 'cache'}"
    last = new.stderr.strip().splitlines()[-1]
    assert forked.stderr.startswith("to stderr") and forked.stderr.strip().splitlines()[-1] == last


SLEEPER = '''
import os, signal, sys, time
if sys.argv[1] == "handles-term":
    signal.signal(signal.SIGTERM, lambda *_: (print("got SIGTERM", flush=True), sys.exit(7)))
print("pid", os.getpid(), flush=True)
time.sleep(120)
'''


@pytest.mark.quick
@pytest.mark.parametrize("how", ["0", "3", "raise", "interrupt"])
def test_the_process_standing_for_a_forked_job_ends_as_a_new_interpreter_would(program, fork_server, how):
    args = ["-m", "progmod", how]
    stood = subprocess.run([*fork_server.python_command(), *args], cwd=program, env=app_env(program),
                           capture_output=True, text=True, timeout=120)
    new = fresh(args, program)
    assert (stood.returncode, stood.stdout.splitlines()[1:]) == (new.returncode, new.stdout.splitlines()[1:])
    assert stood.stdout.splitlines()[0] == "preloaded True"


def sleeper(program, python, handler, sigint):
    """SLEEPER started with ``python`` (a command), SIGINT as its starter leaves it (``sigint``: a shell's background
    job starts with it ignored, whatever the shell running pytest had)."""
    return subprocess.Popen([*python, "sleeper.py", handler], cwd=program, env=app_env(program),
                            stdout=subprocess.PIPE, text=True, preexec_fn=lambda: signal.signal(signal.SIGINT, sigint))


@pytest.mark.quick
@pytest.mark.parametrize("handler,signum,returncode", [("handles-term", signal.SIGTERM, 7),
                                                       ("default", signal.SIGTERM, -signal.SIGTERM),
                                                       ("default", signal.SIGINT, -signal.SIGINT),
                                                       ("default", signal.SIGKILL, -signal.SIGKILL)])
def test_a_signal_to_the_standing_process_reaches_the_forked_job(program, fork_server, handler, signum, returncode):
    (program / "sleeper.py").write_text(SLEEPER)
    process = sleeper(program, fork_server.python_command(), handler, signal.SIG_DFL)
    child = int(process.stdout.readline().split()[1])
    assert child != process.pid and psutil.pid_exists(child)
    process.send_signal(signum)
    assert process.wait(timeout=60) == returncode
    # SIGKILL cannot be passed on: the server kills the job once the process standing for it is gone.
    with contextlib.suppress(psutil.NoSuchProcess):
        psutil.Process(child).wait(timeout=30)
    assert not psutil.pid_exists(child)
    if handler == "handles-term":
        assert process.stdout.read() == "got SIGTERM\n"


@pytest.mark.quick
def test_a_signal_its_starter_ignores_is_ignored_by_the_forked_job_as_by_a_new_interpreter(program, fork_server):
    (program / "sleeper.py").write_text(SLEEPER)
    stood, new = (sleeper(program, python, "default", signal.SIG_IGN)
                  for python in (fork_server.python_command(), [sys.executable]))
    for process in (stood, new):
        process.stdout.readline()
        process.send_signal(signal.SIGINT)
    time.sleep(1)
    assert (stood.poll(), new.poll()) == (None, None)
    for process in (stood, new):
        process.terminate()
    assert (stood.wait(timeout=60), new.wait(timeout=60)) == (-signal.SIGTERM, -signal.SIGTERM)
