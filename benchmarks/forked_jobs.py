"""What a test's app job costs when forked from an interpreter that has already imported the heavy libraries,
against a fresh ``python -m zi_app`` (issue 22 item 7: most of the suite's CPU is those imports). Runs the same
tiny job both ways, alternately, and prints a table: CPU seconds of the job's process (its rusage), its exit status,
and the peak host RSS and tokens/s the job itself logged to MLflow. A measurement for deciding on a forking test
launcher, not one (the suite's is tests/helpers/forkserver.py).

    .venv/bin/python benchmarks/forked_jobs.py [--repeat 3] [--dir /tmp/forked_jobs] [override ...]
"""

from __future__ import annotations

import argparse
import atexit
import os
import resource
import runpy
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import List, Tuple

JOB = ["model=tiny-opt", "batch=2", "prompt_len=8", "gen_len=4", "warmup=0", "repeat=1"]
PRELOADED = ("torch", "transformers", "transformers.models.opt.modeling_opt", "mlflow", "deepspeed")


def fresh(folder: Path, overrides: List[str]) -> Tuple[int, float]:
    """(exit status, CPU seconds) of ``python -m zi_app`` started as a new interpreter in ``folder``."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    with open(folder / "out.txt", "w") as out:
        status = subprocess.run([sys.executable, "-m", "zi_app", *overrides], cwd=folder, stdout=out,
                                stderr=subprocess.STDOUT).returncode
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return status, after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime


def forked(folder: Path, overrides: List[str]) -> Tuple[int, float]:
    """(exit status, CPU seconds) of the app run as ``-m zi_app`` in a child forked from this process."""
    pid = os.fork()
    if pid == 0:
        os.chdir(folder)
        out = os.open("out.txt", os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        os.dup2(out, 1)
        os.dup2(out, 2)
        sys.argv, sys.path[0], status = ["zi_app", *overrides], str(folder), 0
        try:
            runpy.run_module("zi_app", run_name="__main__", alter_sys=True)
        except SystemExit as stop:
            status = stop.code if isinstance(stop.code, int) else int(stop.code is not None)
        atexit._run_exitfuncs()  # os._exit skips them; a finished interpreter runs them
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)
    _, wait_status, usage = os.wait4(pid, 0)
    return os.waitstatus_to_exitcode(wait_status), usage.ru_utime + usage.ru_stime


def logged(folder: Path) -> Tuple[float, float]:
    """(peak host RSS MiB, tokens/s) of the one run the job logged in ``folder``'s store."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{folder}/mlruns/mlflow.db")
    [run] = client.search_runs([e.experiment_id for e in client.search_experiments()])
    return run.data.metrics["peak_host_rss_bytes"] / 2**20, run.data.metrics["tokens_per_sec"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=3, help="jobs of each kind, run alternately")
    parser.add_argument("--dir", type=Path, default=Path("/tmp/forked_jobs"), help="the jobs' folders (emptied)")
    parser.add_argument("overrides", nargs="*", help=f"the job's overrides (default: {' '.join(JOB)})")
    args = parser.parse_args()
    overrides = args.overrides or JOB
    shutil.rmtree(args.dir, ignore_errors=True)
    jobs = []
    for i in range(args.repeat):
        for kind, run in (("fresh", fresh), ("preloaded", forked)):
            if run is forked and i == 0:  # after the first fresh job, which thus runs on a cold start too
                start = time.monotonic()
                for module in PRELOADED:
                    __import__(module)
                print(f"preloaded {', '.join(PRELOADED)} in {time.monotonic() - start:.1f} s", flush=True)
            folder = args.dir / f"{kind}{i}"
            folder.mkdir(parents=True)
            jobs.append((kind, folder, *run(folder, overrides)))
    # Read the stores once every job ran: the forks start from an interpreter that has opened none.
    rows = [(kind, status, cpu, *(logged(folder) if status == 0 else (float("nan"),) * 2))
            for kind, folder, status, cpu in jobs]
    print("| job | exit | CPU s | peak host MiB | tokens/s |\n|---|---|---|---|---|")
    for kind, status, cpu, host, speed in rows:
        print(f"| {kind} | {status} | {cpu:.2f} | {host:.0f} | {speed:.1f} |")


if __name__ == "__main__":
    main()
