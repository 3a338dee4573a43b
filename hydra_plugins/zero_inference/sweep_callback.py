"""The sweep's bookkeeping as a Hydra callback, so that it works under any launcher (process_per_job,
basic, submitit, joblib, ...): a parent run per multirun, failed jobs recorded as FAILED runs, no run
left RUNNING after its process died, and at the end the sweep's table, plot, best run and summary.

Declared in conf/config.yaml under ``hydra.callbacks``; what the end of a sweep records is
:mod:`zi_app.record.sweep_end`'s. Hydra skips ``on_multirun_end`` when a job
failed or the sweep was stopped by a signal, so the end of the sweep is also handled by an ``atexit`` hook
registered at its start. Hydra turns a callback's exception into a warning: these hooks stop the sweep
instead (exit 2 for a store that cannot be used, else 1).
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import json
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable, List, Optional

from hydra.core.utils import JobReturn, JobStatus
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from zi_app.config.checks import EXIT_INVALID_CONFIG, ConfigError, check_tracking
from zi_app.config.spec import check_task
from zi_app.record import results, runs, store, sweep_end
from zi_app.record.redaction import SecretError, redact_overrides, redact_text, refuse_secrets
from zi_app.record.settle import note_unrecorded, settle_job
from zi_app.record.sweep_end import SWEEP_DIR_TAG, Sweep, close_sweep, record_refused
from zi_app.run import interrupt


def planned_jobs(config: DictConfig) -> Optional[List[str]]:
    """The overrides of every job the sweep will launch, spelled (and redacted) as each job's ``zi.overrides``
    tag; None under a sweeper other than Hydra's basic one (an optimizer decides its jobs as it goes)."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    sweeper = config.hydra.sweeper
    if sweeper.get("_target_") != f"{BasicSweeper.__module__}.{BasicSweeper.__name__}":
        return None
    params = [f"{key}={value}" for key, value in (sweeper.get("params") or {}).items()]
    try:
        overrides = OverridesParser.create().parse_overrides(params + _task_overrides(config))
        return [redact_overrides(job) for batch in BasicSweeper.split_arguments(overrides, None)
                for job in batch]
    except Exception:  # noqa: BLE001 - Hydra reports a bad override itself; we only lose the count
        return None


def _stops_the_sweep(hook: Callable) -> Callable:
    """A hook whose failure stops the sweep with one line (a store problem: exit 2) or a traceback (exit 1),
    where Hydra would print a warning and go on."""
    @functools.wraps(hook)
    def run(*args: Any, **kwargs: Any) -> Any:
        try:
            return hook(*args, **kwargs)
        except (store.StoreError, SecretError) as error:
            print(f"error: {error}", file=sys.stderr, flush=True)
            raise SystemExit(store.EXIT_STORE_ERROR) from None
        except ConfigError as error:
            print(redact_text(f"error: invalid config: {error}"), file=sys.stderr, flush=True)
            raise SystemExit(EXIT_INVALID_CONFIG) from None
        except Exception as error:  # noqa: BLE001 - any failure of the sweep's bookkeeping
            refused = store.access_refused(error)  # the server refused this user: one line, as a bad store
            if refused is not None:
                print(f"error: {refused}", file=sys.stderr, flush=True)
                raise SystemExit(store.EXIT_STORE_ERROR) from None
            traceback.print_exc()
            print(f"error: the sweep's {hook.__name__} hook failed (above); the sweep stops", file=sys.stderr,
                  flush=True)
            raise SystemExit(1) from None
    return run


def _task_overrides(config: DictConfig) -> List[str]:
    """The overrides as the user wrote them: an override's own text may look like an interpolation
    (``batch=${batch}``), which reading the list through OmegaConf would try to resolve."""
    return OmegaConf.to_container(config.hydra.overrides.task, resolve=False)


def _task_config(config: DictConfig, resolve: bool = True) -> dict:
    """The job's own keys (Hydra's node left out), resolved unless ``resolve`` is false: what Hydra writes in
    its files is the config as written, and an interpolation that does not resolve is the job's to refuse."""
    return OmegaConf.to_container(OmegaConf.masked_copy(config, [k for k in config if k != "hydra"]),
                                  resolve=resolve)


class SweepCallback(Callback):
    """Parent run, failure records and the end-of-sweep summary of a multirun of the zero-inference app."""

    def __init__(self) -> None:
        self.sweep: Optional[Sweep] = None

    @_stops_the_sweep
    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        """Refuse a secret in the config or the overrides (exit 2): Hydra calls this before it writes the
        job's ``.hydra/`` files."""
        refuse_secrets(_task_config(config, resolve=False), _task_overrides(config))

    @_stops_the_sweep
    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        """Refuse a secret in the config or the overrides before Hydra writes ``multirun.yaml`` and any
        launcher prints or pickles a job (exit 2), and a key the schema lacks (``+bacth=8``), as ``zi`` does.
        Check the store, create it, the experiment and the parent run before any job starts (parallel jobs
        creating a fresh SQLite store race on its schema), close runs whose process is gone, pass the parent's
        id to the jobs, and let SIGTERM/SIGHUP stop the sweep as Ctrl-C does."""
        refuse_secrets(_task_config(config, resolve=False), _task_overrides(config))
        try:
            check_task(OmegaConf.masked_copy(config, [k for k in config if k != "hydra"]), _task_overrides(config))
        except ConfigError as error:
            record_refused_sweep(config, error)
            raise
        if config.dry_run:
            return
        from mlflow.tracking import MlflowClient  # here, not at import: every run of the app loads this module

        interrupt.install()
        check_tracking(config.tracking)
        uri = store.absolute_uri(config.tracking.uri)
        experiment_id = store.open_experiment(uri, config.tracking.experiment, config.tracking.connect_timeout_s)
        sweep_end.close_dead(MlflowClient(uri), [experiment_id], "when a sweep started")
        overrides = redact_overrides(_task_overrides(config))
        os.environ[runs.SWEPT_KEYS_ENV] = ",".join(swept_keys(_task_overrides(config)))
        sweep_dir = Path(str(config.hydra.sweep.dir)).resolve()
        parent = runs.start_sweep_run(experiment_id, f"sweep {overrides}"[:200],
                                          {runs.OVERRIDES_TAG: overrides, SWEEP_DIR_TAG: str(sweep_dir)})
        os.environ[runs.PARENT_RUN_ENV] = parent  # inherited by job processes; not MLFLOW_RUN_ID (resumes)
        MlflowClient().set_experiment_tag(experiment_id, results.VIEW_STATE_TAG + parent,
                                          json.dumps(results.view_state(parent)))
        self.sweep = Sweep(uri, experiment_id, parent, sweep_dir, config.hydra.output_subdir, time.time(),
                           planned_jobs(config))
        from hydra_plugins.zero_inference import _launcher

        _launcher.LAUNCHED.clear()
        atexit.register(self.finish)
        print(f"MLflow: sweep parent run {parent} in experiment '{config.tracking.experiment}' ({redact_text(uri)})",
              flush=True)

    @_stops_the_sweep
    def on_job_end(self, config: DictConfig, job_return: JobReturn, **kwargs: Any) -> None:
        """A failed job whose run is still open (its process died) or was never opened gets a FAILED run.

        Runs in the job's process, or in the driver when a launcher reports a job whose process died.
        """
        if job_return.status != JobStatus.FAILED or config.dry_run:
            return
        output_dir = Path(config.hydra.runtime.output_dir)
        try:
            settle_job(output_dir, _task_config(config), _task_overrides(config),
                       job_return._return_value,  # the public property raises for a failed job
                       launch_dir=config.hydra.runtime.cwd)
        except Exception as error:  # noqa: BLE001 - one job's record lost (a server still away, a full or
            # read-only disk, a damaged store): said in one line, and the sweep goes on with its other jobs
            with contextlib.suppress(OSError):  # the end of the sweep records it, or lists it as never recorded
                note_unrecorded(output_dir, error)
            print(redact_text(f"warning: job {config.hydra.job.num} failed and could not be recorded now (the "
                              f"sweep's end tries again): "
                              f"{error if isinstance(error, store.StoreError) else store.first_line(error)}"),
                  file=sys.stderr, flush=True)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        if not self.finish():
            raise SystemExit(1)

    def finish(self) -> bool:
        """Close the sweep once: settle dead jobs, write the table, plot and best-run tags on the parent
        run, close it (FAILED, kind ``killed``, when a signal stopped the sweep), and print the summary.

        Returns False when that failed: said in one line, and the parent run closed FAILED if the store
        still takes writes (else the next command on the store closes it, its process being gone).
        """
        sweep, self.sweep = self.sweep, None
        if sweep is None:
            return True
        atexit.unregister(self.finish)
        from hydra_plugins.zero_inference import _launcher

        # The jobs our launcher started (none under another launcher: then unknown), to tell a job that ran
        # and could not be recorded from one that never ran.
        sweep.launched = [redact_overrides(job) for job in _launcher.LAUNCHED] or None
        try:
            close_sweep(sweep, interrupt.received())
            return True
        except Exception as error:  # noqa: BLE001 - a full disk, a store gone away: close what we can
            parent, why = sweep.parent_run_id, f"the end of the sweep failed: {store.first_line(error)}"
            print(redact_text(f"error: {why}"), file=sys.stderr, flush=True)
            try:
                from mlflow.tracking import MlflowClient

                client = MlflowClient(sweep.uri)
                if client.get_run(parent).info.status == "RUNNING":
                    runs.record_failure(parent, "error", why, client=client)
                print(f"Its parent run {parent} is marked FAILED.", file=sys.stderr, flush=True)
            except Exception as second:  # noqa: BLE001
                print(f"Its parent run {parent} could not be closed either ({type(second).__name__}); the next "
                      f"command on this store closes it.", file=sys.stderr, flush=True)
            return False


def record_refused_sweep(config: DictConfig, error: ConfigError) -> None:
    """A FAILED parent run (kind ``invalid-config``, the refusal as its message) for a sweep refused before any
    job, so that the store shows it was tried; nothing when its store cannot be used (the refusal is what to
    say) or for a dry run."""
    if config.get("dry_run") is True:
        return
    with contextlib.suppress(ConfigError):  # a bad tracking key: no store to record in
        check_tracking(config.tracking)
        record_refused(config.tracking.uri, config.tracking.experiment, _task_overrides(config), str(error))


def swept_keys(overrides: List[str]) -> List[str]:
    """The keys a multirun's command-line overrides sweep over (``batch=1,8`` or ``range(...)``)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides(list(overrides))
    return [override.key_or_group for override in parsed if override.is_sweep_override()]
