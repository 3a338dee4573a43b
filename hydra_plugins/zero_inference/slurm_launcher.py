"""``hydra/launcher=zi_slurm``: every job of a sweep as its own SLURM job, through submitit, sized and named
from the job's plan, refused before submission when its plan or every partition refuses it, and cancelled
with its sweep (Ctrl-C, SIGTERM). Settings: conf/hydra/launcher/zi_slurm.yaml; docs/cluster.md.

Hydra imports this module at every start of every app: it stays cheap (submitit is imported by ``_slurm``,
only when a sweep launches).
"""

from typing import Any, Dict, Sequence

from hydra.core.utils import JobReturn
from omegaconf import OmegaConf

from hydra_plugins.zero_inference.process_per_job_launcher import ProcessPerJobLauncher


class ZiSlurmLauncher(ProcessPerJobLauncher):
    """Submits each job with ``sbatch`` (submitit's SLURM executor), waits for all of them, and cancels them
    when the sweep is stopped. Hydra's setup, the result label and the batch name are the process-per-job
    launcher's; the jobs run on SLURM's nodes instead of here."""

    def __init__(self, **params: Any) -> None:
        super().__init__(gpus=[])  # no GPUs handed out here: SLURM gives each job its own
        # Resolved now, as Hydra's submitit launcher does: ${hydra.sweep.dir} in submitit_folder.
        self.params: Dict[str, Any] = {key: OmegaConf.to_container(value, resolve=True)
                                       if OmegaConf.is_config(value) else value for key, value in params.items()}

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        import sys

        try:
            from hydra_plugins.zero_inference import _slurm
        except ModuleNotFoundError as missing:  # submitit is an extra: say how to get it, in one line
            if missing.name != "submitit":
                raise
            print("error: hydra/launcher=zi_slurm needs submitit: pip install 'hydra-zero-inference[slurm]'",
                  file=sys.stderr, flush=True)
            raise SystemExit(2) from None
        return _slurm.launch(self, job_overrides, initial_job_idx)
