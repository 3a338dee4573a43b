"""``zi`` / ``python -m zi_app``: the Hydra task, thin on purpose. One job goes down the stages once, in order:
configuration (the composed config validated into a job spec), plan (the job's plan, refused here at its
first problem), run (under ZeRO-3), record (its MLflow run, opened first so that a refusal or a failure is
recorded too). docs/architecture.md draws it."""

from __future__ import annotations

import contextlib
import errno
import functools
import json
import logging
import os
import platform
import sys
from importlib import metadata
from pathlib import Path
from typing import List, Optional, Tuple

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.errors import HydraException
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from zi_app.config.checks import EXIT_INVALID_CONFIG, ConfigError, check_tracking
from zi_app.config.paths import conf_dir
from zi_app.config.schema import as_config
from zi_app.config.spec import check_task, composition_error, validate
from zi_app.plan.job import plan_job, ready
from zi_app.record import best, orphans, runs, store, unrecorded
from zi_app.record.redaction import SecretError, find_secrets, redact, redact_overrides, redact_text, refuse_secrets, scrub_files
from zi_app.run import interrupt, progress

log = logging.getLogger("zi_app")


def _versions() -> dict:
    tags = {}
    for package in ("deepspeed", "torch", "transformers", "hydra-core", "mlflow"):
        try:
            tags[f"version.{package}"] = metadata.version(package)
        except metadata.PackageNotFoundError:
            tags[f"version.{package}"] = "missing"
    return tags


def _device_name(cuda: bool) -> str:
    if cuda:
        import torch

        return torch.cuda.get_device_name()
    return f"cpu ({platform.processor() or platform.machine()})"


def _task_overrides() -> list:
    """The job's overrides as given on the command line (or by the sweep)."""
    try:
        # As written: an override's text may look like an interpolation (batch=${batch}).
        return OmegaConf.to_container(HydraConfig.get().overrides.task, resolve=False)
    except ValueError:
        return []


def _overrides() -> str:
    """The job's overrides, secrets masked: they are stored as a tag and name the run."""
    return redact_overrides(_task_overrides())


def _launch_dir() -> Optional[str]:
    """Where the command was run: a relative store path starts there, also under ``hydra.job.chdir=true``."""
    try:
        return HydraConfig.get().runtime.cwd
    except ValueError:
        return None


def _output_dir() -> Optional[Path]:
    try:
        return Path(HydraConfig.get().runtime.output_dir)
    except ValueError:
        return None


def refuse_secrets_in_job(cfg: DictConfig) -> None:
    """Raise :class:`SecretError` for a secret in the job's config or overrides, first masking it in the files
    Hydra already wrote in the job's folder. The sweep callback refuses it before Hydra writes anything; this
    covers an app run without that callback (``hydra.callbacks`` overridden)."""
    overrides = _task_overrides()
    config = OmegaConf.to_container(cfg, resolve=False)  # as Hydra wrote it; check_task refuses what cannot resolve
    out_dir = _output_dir()
    if out_dir is not None:
        scrub_files(out_dir, [secret for _, secret in find_secrets(config, overrides)])
    refuse_secrets(config, overrides)


def run_job(cfg: DictConfig) -> float:
    """Run one job end to end and return its tokens/sec; failures are recorded in MLflow, then raised."""
    # ZeRO-3 gathers and frees parameter buffers of many sizes every step; expandable segments keep the
    # caching allocator from stranding GiBs in fragments under a GPU budget. Must precede CUDA's first use.
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    from mlflow.tracking import MlflowClient  # here, not at import: --help and tab completion load this module

    check_tracking(cfg.tracking)  # the store comes first, so its keys are checked before the rest
    uri = store.absolute_uri(cfg.tracking.uri, _launch_dir())
    # A bad store is refused before loading; a server restarting is waited for.
    experiment_id = store.open_experiment(uri, cfg.tracking.experiment, cfg.tracking.connect_timeout_s)
    orphans.close_dead_runs(MlflowClient(uri), [experiment_id], "when a job started")
    import torch

    cuda = torch.cuda.is_available()
    raw = OmegaConf.to_container(cfg, resolve=True)
    out_dir = _output_dir()
    overrides = _overrides()
    tags = {**_versions(), "device": _device_name(cuda), runs.OVERRIDES_TAG: overrides}
    run_name = runs.run_name(overrides, fallback=cfg.model.name)
    recorder, job_error = unrecorded.Recorder(runs.log_metrics), None
    try:
        with runs.job_run(experiment_id, run_name, runs.job_params(raw), tags,
                          run_id_file=out_dir / runs.RUN_ID_FILE if out_dir else None) as run:
            try:
                spec, plan, result = _measure(cfg, cuda, run.info.run_id, recorder)
            except BaseException as error:
                job_error = error
                raise
    except Exception as error:  # noqa: BLE001 - filtered: the store refusing a write, at any moment
        # The job's own fault (a checkpoint that cannot be read is an OSError too) is reported as it is.
        if (error is job_error and error is not recorder.lost) or not unrecorded.recording_error(error):
            raise
        saved = unrecorded.save_result(out_dir, recorder.measured, {"overrides": overrides, **recorder.outputs})
        raise unrecorded.not_recorded(uri, error, saved, bool(recorder.measured)) from None
    predicted = plan.predicted_metrics() if cuda else {}
    log.info("result: %s", progress.result_line(spec, {**predicted, **result.metrics}, plan.residency.offload_needed))
    if not _multirun():  # a sweep's summary says this once for all its jobs
        for line in best.next_steps(uri, cfg.tracking.experiment, experiment_id, run.info.run_id):
            log.info("%s", line)
    # The sweeper's objective is the value the run records, so that its best trial names the same figure.
    return runs.rounded_rates(result.metrics)["tokens_per_sec"]


def _measure(cfg: DictConfig, cuda: bool, run_id: str, recorder: "unrecorded.Recorder"):
    """The job inside its open run: validated, planned, run; returns (spec, plan, result). Each measurement
    goes to ``recorder`` as it is taken; the first write the store refuses is raised once the job is done."""
    plan = ready(validate(cfg), cuda)
    spec = plan.spec  # as planned: kvcache.gpu_layers=auto and kvcache.dequant=auto resolved (in its config artifact)
    # Predictions mean nothing where DeepSpeed's CPU accelerator keeps everything in host memory.
    recorder(plan.predicted_metrics() if cuda else {})
    if plan.residency.offload_needed is not None:
        recorder.attempt(runs.log_tags, {runs.OFFLOAD_NEEDED_TAG: str(plan.residency.offload_needed).lower()})
    recorder.attempt(runs.log_json, plan.ds_config, "ds_config.json")
    recorder.attempt(runs.log_text, OmegaConf.to_yaml(redact(as_config(spec))), runs.CONFIG_ARTIFACT)

    if spec.devices > 1:
        from zi_app.run import ranks

        # Its ranks' metrics reach the run from a thread of their own: name the run, not the thread's.
        result = ranks.run_ranks(spec, plan.ds_config, plan.facts, on_metrics=functools.partial(recorder, run_id=run_id))
    else:
        from zi_app.run.inference import run_inference

        result = run_inference(spec, plan.ds_config, plan.facts, on_metrics=recorder)
    recorder.outputs = {"repeats": result.repeats, "generated_token_ids": result.output_ids}
    recorder.attempt(runs.log_json, recorder.outputs, "generation.json")
    for name, events in result.step_traces.items():
        recorder.attempt(runs.log_trace, events, name)
    interrupt.check()  # a signal whose raise was swallowed: the run is closed FAILED (killed), not FINISHED
    if recorder.lost is not None:
        raise recorder.lost
    return spec, plan, result


def dry_run(cfg: DictConfig) -> None:
    """Print the DeepSpeed config of ``cfg`` as one JSON document on stdout; load nothing, log nothing.

    A config meant for another machine is still printed: what this machine lacks to run it goes to stderr,
    one ``warning:`` line per problem, naming the key.
    """
    import torch

    # The JSON must stand alone on stdout (`> ds_config.json`), but libraries imported while planning print
    # there (DeepSpeed's accelerator warning, through transformers, for real weights), directly or through
    # Hydra's console log handler.
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.StreamHandler) and handler.stream is sys.stdout:
            handler.setStream(sys.stderr)
    with contextlib.redirect_stdout(sys.stderr):
        plan = plan_job(validate(cfg), torch.cuda.is_available())
    for problem in plan.problems:
        print(f"warning: cannot run here: {problem}", file=sys.stderr)
    print(json.dumps(plan.ds_config, indent=2))


def _multirun() -> bool:
    try:
        return HydraConfig.get().mode == RunMode.MULTIRUN
    except ValueError:
        return False


@hydra.main(version_base="1.3", config_path=str(conf_dir()), config_name="config")
def main(cfg: DictConfig) -> Optional[float]:
    """``python -m zi_app [overrides]``: one ZeRO-Inference job (``-m`` for a sweep).

    SIGINT, SIGTERM and SIGHUP close the job's run FAILED (kind ``killed``) and exit 128 + the signal.
    """
    interrupt.install()
    try:
        refuse_secrets_in_job(cfg)
        check_task(cfg, _task_overrides())
        if cfg.dry_run:
            return dry_run(cfg)
        tokens_per_sec = run_job(cfg)
        interrupt.check()  # a signal that came after the run was recorded, its raise swallowed: not exit 0
        return tokens_per_sec
    except interrupt.Interrupted as stop:
        print(f"zi_app: {stop}; exit status {stop.code}", file=sys.stderr, flush=True)
        raise
    except Exception as error:  # noqa: BLE001 - the ones refused in one line below; any other is raised as is
        refused = store.access_refused(error)  # the tracking server refused this user (401/403)
        if refused is None and not isinstance(error, (ConfigError, store.StoreError, SecretError,
                                                      unrecorded.ResultNotRecorded)):
            raise
        error = refused or error
        if _multirun():  # the launcher reports it, and the sweep records it as a failed run
            raise error from None
        invalid = isinstance(error, ConfigError)
        print(redact_text(f"error: {'invalid config: ' if invalid else ''}{error}"), file=sys.stderr)
        # A job that ran and could not be recorded failed (1); one refused before it ran was bad input (2).
        sys.exit(1 if isinstance(error, unrecorded.ResultNotRecorded) else
                 EXIT_INVALID_CONFIG if invalid else store.EXIT_STORE_ERROR)


# A folder Hydra (or the job) cannot write: a read-only or immutable working directory, a full disk.
_WRITE_ERRNOS = (errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT)


def _one_line(error: Exception, overrides: List[str]) -> Optional[Tuple[str, int]]:
    """Our one line and exit status for what Hydra would report with its own message, traceback or "Set
    HYDRA_FULL_ERROR=1" hint, or None to leave it to Hydra: an override it cannot compose (2), a folder it
    cannot write its run's files in (2), a sweep's failed job whose line the launcher already printed (its
    ``exit_status``)."""
    if isinstance(error, OSError) and error.errno in _WRITE_ERRNOS:
        where = os.path.abspath(error.filename) if error.filename else "the run's output folder"
        return (f"cannot write {where} ({error.strerror}): Hydra keeps each run's config and log in its output "
                f"folder; run where you can write, or set hydra.run.dir (hydra.sweep.dir with -m) to a writable "
                f"folder", EXIT_INVALID_CONFIG)
    if not isinstance(error, HydraException):
        return None
    if isinstance(getattr(error, "exit_status", None), int):
        return str(error), error.exit_status
    refused = composition_error(error, overrides)
    return None if refused is None else (f"invalid config: {refused}", EXIT_INVALID_CONFIG)


def _record_refused_sweep(overrides: List[str], refusal: str) -> None:
    """A sweep that Hydra could not compose (``zi -m batch=abc``), refused before the sweep callback opened its
    parent run, still leaves a FAILED parent run in its store: the one its tracking overrides name, else the
    default. Nothing for a single job, a dry run, or where the callback already opened the parent."""
    if not {"-m", "--multirun"} & set(sys.argv[1:]) or os.environ.get(runs.PARENT_RUN_ENV):
        return
    values = dict(arg.lstrip("+~").split("=", 1) for arg in overrides)
    if values.get("dry_run", "").lower() == "true":
        return
    from zi_app.config.schema import TrackingSpec
    from zi_app.record import sweep_end

    sweep_end.record_refused(values.get("tracking.uri", TrackingSpec.uri),
                             values.get("tracking.experiment", TrackingSpec.experiment), overrides, refusal)


@contextlib.contextmanager
def _hydra_errors_in_one_line():
    """While Hydra runs the app, what it would report with a traceback or its "Set HYDRA_FULL_ERROR=1" hint
    and exit status 1 is our one line (:func:`_one_line`): ``batch=abc`` and ``model=nope`` with exit status 2,
    like a bad value. Hydra offers no hook for this: its ``run_and_report``, which prints what composing or
    the run raised and exits, is wrapped while ``main`` runs. ``HYDRA_FULL_ERROR=1`` shows Hydra's report."""
    import hydra._internal.utils as hydra_utils

    original = hydra_utils.run_and_report
    overrides = [arg for arg in sys.argv[1:] if "=" in arg and not arg.startswith("-")]

    def run_and_report(func):
        def ours():
            try:
                return func()
            except Exception as error:  # noqa: BLE001 - filtered by _one_line; the rest is Hydra's to report
                said = None if os.environ.get("HYDRA_FULL_ERROR") == "1" else _one_line(error, overrides)
                if said is None:
                    raise
                print(redact_text(f"error: {said[0]}"), file=sys.stderr, flush=True)
                if said[0].startswith("invalid config: "):
                    _record_refused_sweep(overrides, said[0])
                sys.exit(said[1])

        return original(ours)

    hydra_utils.run_and_report = run_and_report
    try:
        yield
    finally:
        hydra_utils.run_and_report = original


def cli() -> None:
    """``zi`` and ``python -m zi_app``: the Hydra app, with a usage error of Hydra's command line (``-m``
    with ``--info``, say) or an override it cannot compose reported in one line and exit status 2 instead
    of a traceback."""
    try:
        with _hydra_errors_in_one_line():
            main()
    except ValueError as error:  # a job's errors never get here: Hydra reports them and exits
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        print(f"error: {error}", file=sys.stderr)
        sys.exit(EXIT_INVALID_CONFIG)
