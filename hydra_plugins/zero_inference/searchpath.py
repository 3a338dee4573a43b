"""Makes the zero-inference config groups (model, offload, quant, kvcache, memory) visible to every Hydra app.

Hydra imports this module at every start of every app (Hydra 1.3 scans the ``hydra_plugins`` namespace
package, Hydra 1.4 loads the class named by the ``hydra.plugins`` entry point): it imports nothing beyond
Hydra, and resolves the directory only when Hydra asks.
"""

from hydra.core.config_search_path import ConfigSearchPath
from hydra.plugins.search_path_plugin import SearchPathPlugin


class ZeroInferenceSearchPathPlugin(SearchPathPlugin):
    """Appends the installed package's ``conf/`` to the config search path, after the app's own config dir."""

    def manipulate_search_path(self, search_path: ConfigSearchPath) -> None:
        # zi_app's package import is pure Python (no torch); registering the schema here lets an app that
        # never imports zi_app still put `zi_schema` in its defaults list for typed composition.
        from zi_app.paths import conf_dir
        from zi_app.schema import register

        register()
        search_path.append(provider="hydra-zero-inference", path=f"file://{conf_dir()}")
