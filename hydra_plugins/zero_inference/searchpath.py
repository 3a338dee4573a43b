"""Makes the zero-inference config groups (model, offload, quant, kvcache, memory) visible to every Hydra app.

Hydra imports this module at every start of every app (Hydra 1.3 scans the ``hydra_plugins`` namespace
package, Hydra 1.4 loads the class named by the ``hydra.plugins`` entry point): it imports nothing beyond
Hydra, and resolves the directory only when Hydra asks.
"""

from pathlib import Path

from hydra.core.config_search_path import ConfigSearchPath
from hydra.plugins.search_path_plugin import SearchPathPlugin


class ZeroInferenceSearchPathPlugin(SearchPathPlugin):
    """Appends the installed package's ``conf/`` to the config search path, after the app's own config dir
    (unless the app's config dir is that folder: the zero-inference app itself)."""

    def manipulate_search_path(self, search_path: ConfigSearchPath) -> None:
        # zi_app's package import is pure Python (no torch); registering the schema here lets an app that
        # never imports zi_app still put `zi_schema` in its defaults list for typed composition.
        from zi_app.config.paths import conf_dir
        from zi_app.config.schema import register

        register()
        conf = conf_dir()
        # Our own app's primary config dir is this same folder (Hydra stores it without the file:// scheme):
        # listing it twice would only slow every lookup.
        if all(Path(element.path.removeprefix("file://")) != conf for element in search_path.get_path()):
            search_path.append(provider="hydra-zero-inference", path=f"file://{conf}")
