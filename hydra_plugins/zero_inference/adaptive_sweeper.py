"""``hydra/sweeper=adaptive``: the grid of a basic sweep (``batch=1,8,32,64 pin=true,false``), measured
adaptively: every point is planned first (no model loaded), the points predicted fastest run first, then
the measured best's neighbours in the grid, until no neighbour of the measured best is faster (and, with
``measure_predicted_faster``, no point is left that the planner predicts faster than it).

Hydra imports this module at every start of every app: it stays cheap, the work lives in ``_adaptive``.
"""

from dataclasses import dataclass
from typing import Any, Dict, List, Optional

from hydra.core.config_store import ConfigStore
from hydra.plugins.launcher import Launcher
from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig


@dataclass
class AdaptiveSweeperConf:
    """Settings of the adaptive sweeper (``hydra.sweeper.*``)."""

    _target_: str = "hydra_plugins.zero_inference.adaptive_sweeper.AdaptiveSweeper"
    # Most jobs to launch in all; null = as many as confirming the best takes (never more than the grid).
    max_jobs: Optional[int] = None
    # Jobs handed to the launcher at once: the first round takes the points predicted fastest, each later
    # round the measured best's unmeasured neighbours (the launcher runs one per GPU at a time).
    jobs_per_round: int = 2
    # true: once no neighbour of the measured best is left, also measure any point the planner predicts faster
    # than that best (then its neighbours): for grids where the planner may misplace the peak (a KV cache
    # offloaded beside resident weights), at the cost of more jobs when it over-predicts; false: stop there.
    measure_predicted_faster: bool = False
    # Sweep overrides kept in the config, as the basic sweeper's: {key: "v1,v2,..."}, before the command line's.
    params: Optional[Dict[str, str]] = None


ConfigStore.instance().store(group="hydra/sweeper", name="adaptive", node=AdaptiveSweeperConf,
                             provider="hydra-zero-inference")


class AdaptiveSweeper(Sweeper):
    """Plans a grid with the zero-inference planner and measures only what may be the best."""

    def __init__(self, max_jobs: Optional[int] = None, jobs_per_round: int = 2,
                 measure_predicted_faster: bool = False, params: Optional[Dict[str, str]] = None) -> None:
        self.max_jobs = max_jobs
        self.jobs_per_round = jobs_per_round
        self.measure_predicted_faster = measure_predicted_faster
        self.params = dict(params or {})
        self.config: Optional[DictConfig] = None
        self.hydra_context: Optional[HydraContext] = None
        self.launcher: Optional[Launcher] = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        from hydra.core.plugins import Plugins

        self.config = config
        self.hydra_context = hydra_context
        self.launcher = Plugins.instance().instantiate_launcher(hydra_context=hydra_context,
                                                                task_function=task_function, config=config)

    def sweep(self, arguments: List[str]) -> Any:
        from hydra_plugins.zero_inference import _adaptive

        return _adaptive.sweep(self, arguments)
