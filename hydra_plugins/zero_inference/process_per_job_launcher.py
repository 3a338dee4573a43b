"""``hydra/launcher=process_per_job``: every job of a multirun in its own new Python process.

A fresh process per job keeps peak-memory counters, pinned host memory, CUDA contexts and ZeRO-3's
process-wide state from leaking into the next job, and a crash or an out-of-memory kill takes down
that job only. Jobs run one at a time, or, when GPUs are visible, side by side, each on as many GPUs
as its ``devices`` asks (one for other apps' jobs).

Hydra imports this module at every start of every app: it stays cheap, the work lives in ``_launcher``.
"""

from dataclasses import dataclass
from typing import List, Optional, Sequence

from hydra.core.config_store import ConfigStore
from hydra.core.utils import JobReturn
from hydra.plugins.launcher import Launcher
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig


@dataclass
class ProcessPerJobLauncherConf:
    """Settings of the process-per-job launcher (``hydra.launcher.*``)."""

    _target_: str = "hydra_plugins.zero_inference.process_per_job_launcher.ProcessPerJobLauncher"
    # GPU ids to spread jobs over, each GPU one job's at a time (a job sees only its GPUs through
    # CUDA_VISIBLE_DEVICES: `devices` of them, a job asking more than there are is refused);
    # null = every GPU visible to the sweep, [] = ignore GPUs (one job at a time).
    gpus: Optional[List[str]] = None
    # Unit printed after a job's numeric return value in the progress line (the app returns tokens/sec).
    result_label: str = "tokens/s"
    # The command that starts each job's Python, split as a shell would, e.g. 'numactl --cpunodebind=0
    # --membind=0 python' to keep a job's pinned buffers on the GPU's NUMA node; it must run the same
    # environment as the sweep's. null = the sweep's own interpreter (sys.executable).
    python: Optional[str] = None


ConfigStore.instance().store(group="hydra/launcher", name="process_per_job", node=ProcessPerJobLauncherConf,
                             provider="hydra-zero-inference")


class ProcessPerJobLauncher(Launcher):
    """Runs each job through ``hydra.core.utils.run_job`` in a new ``python`` process."""

    def __init__(self, gpus: Optional[List[str]] = None, result_label: str = "tokens/s",
                 python: Optional[str] = None) -> None:
        self.gpus = None if gpus is None else [str(gpu) for gpu in gpus]
        self.result_label = result_label
        self.python = python
        # What one launch() call is, in its start and time-left lines: the sweep, or a round of a sweeper
        # that launches round after round (the adaptive sweeper sets it).
        self.batch_name = "sweep"
        self.config: Optional[DictConfig] = None
        self.task_function: Optional[TaskFunction] = None
        self.hydra_context: Optional[HydraContext] = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.config = config
        self.hydra_context = hydra_context
        self.task_function = task_function

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        from hydra_plugins.zero_inference import _launcher

        return _launcher.launch(self, job_overrides, initial_job_idx)
