"""One job in its own process: ``python -m hydra_plugins.zero_inference._job PAYLOAD RESULT``.

Reads the job the launcher wrote to PAYLOAD (see ``_launcher.run_in_process``), restores Hydra's state, runs
the job through ``hydra.core.utils.run_job`` exactly as Hydra's own launchers do, and writes the
JobReturn to RESULT.
"""

from __future__ import annotations

import logging
import os
import pickle
import sys
import traceback

import cloudpickle
from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn, JobStatus, run_job, setup_globals

from hydra_plugins.zero_inference._launcher import JOB_DIR_KEY, JOB_SUBDIR_KEY, JobError


def portable(ret: JobReturn) -> bytes:
    """The pickled JobReturn; a value that cannot be unpickled in the driver (for example an exception
    whose constructor takes other arguments than its message) is replaced by a :class:`JobError`
    carrying its type and message."""
    blob = cloudpickle.dumps(ret)
    try:
        pickle.loads(blob)
        return blob
    except Exception as error:  # noqa: BLE001 - any unpickling failure means: send a description instead
        value = ret._return_value
        if ret.status == JobStatus.FAILED:
            ret.return_value = JobError(f"{type(value).__name__}: {value}")
        else:
            ret.status = JobStatus.FAILED
            ret.return_value = JobError(f"the job's return value ({type(value).__name__}) cannot be sent back "
                                        f"to the launcher: {error}")
        return cloudpickle.dumps(ret)


def log_failure(error: BaseException, num: int) -> None:
    """Write the failed job's traceback to its log files (Hydra's job logging, still set up after
    ``run_job``), not to the terminal, where the launcher prints one line per failed job; to stderr only
    when the job logs to no file."""
    record = logging.LogRecord(__name__, logging.ERROR, __file__, 0, "job #%s failed", (num,),
                               (type(error), error, error.__traceback__))
    files = [handler for handler in logging.getLogger().handlers if isinstance(handler, logging.FileHandler)]
    for handler in files:
        handler.handle(record)
    if not files:
        traceback.print_exception(type(error), error, error.__traceback__, file=sys.stderr)


def main(payload_path: str, result_path: str) -> None:
    """Run the job in ``payload_path`` and write its JobReturn to ``result_path``."""
    with open(payload_path, "rb") as f:
        sys.path[:] = pickle.load(f)
        task_function, hydra_context, config, state = pickle.load(f)
    Singleton.set_state(state)
    setup_globals()
    ret = run_job(hydra_context=hydra_context, task_function=task_function, config=config,
                  job_dir_key=JOB_DIR_KEY, job_subdir_key=JOB_SUBDIR_KEY)
    if ret.status == JobStatus.FAILED:
        log_failure(ret._return_value, config.hydra.job.num)  # the public property raises for a failed job
    blob = portable(ret)
    partial = f"{result_path}.partial"
    with open(partial, "wb") as f:
        f.write(blob)
    os.replace(partial, result_path)  # a result file is complete or absent, never half-written


if __name__ == "__main__":
    main(*sys.argv[1:])
