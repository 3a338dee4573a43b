"""Stage 2, plan: from a job spec, before anything loads: the model's facts, the workload, GPU residency and
host memory (:mod:`.memory`), speed (:mod:`.speed`), the machine (:mod:`.hardware`), the DeepSpeed config
(:mod:`.dsconfig`), what this machine lacks (:mod:`.preflight`), and the :class:`~.job.JobPlan` made once per
job (:mod:`.job`); :mod:`.calibrate` refits the speed model's constants to measured runs. Never creates a CUDA
context.
"""
