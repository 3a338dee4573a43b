"""One ``zi_slurm`` job on its node: ``python -m hydra_plugins.zero_inference._slurm_job FOLDER``, the command
each job's sbatch script runs (``_slurm.Executor``).

submitit's own entry runs the job and exits 0 whenever the job's function returns, and Hydra's ``run_job``
returns a failed job as a FAILED JobReturn: ``sacct`` would call every failed job COMPLETED. This runs submitit's
job the same way, then exits 1 when the job failed (a job stopped by a signal already exits 128 + the signal).
"""

import sys

from submitit.core.submission import process_job

from hydra_plugins.zero_inference import _slurm

if __name__ == "__main__":
    process_job(sys.argv[1])
    sys.exit(_slurm.exit_status)
