"""Makes the zero-inference config groups (model, offload, quant, kvcache, memory) visible to every Hydra app.

Hydra imports this module at every start of every app: it stays cheap, resolving the directory only
when Hydra asks.
"""

from hydra.core.config_search_path import ConfigSearchPath
from hydra.plugins.search_path_plugin import SearchPathPlugin


class ZeroInferenceSearchPathPlugin(SearchPathPlugin):
    """Appends the installed package's ``conf/`` to the config search path."""

    def manipulate_search_path(self, search_path: ConfigSearchPath) -> None:
        from zi_app.paths import conf_dir

        search_path.append(provider="hydra-zero-inference", path=f"file://{conf_dir()}")
