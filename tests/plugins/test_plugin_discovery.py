"""Hydra finds our plugins: the search-path plugin and the adaptive sweeper are discovered, every app lists our
groups' options and ``hydra/sweeper=adaptive``, the plugin modules Hydra imports at every start stay cheap, and
the ``hydra.plugins`` entry points (Hydra 1.4's discovery) name every plugin class we ship."""

import inspect
import json
import subprocess
import sys
import tomllib
from importlib.metadata import EntryPoint
from pathlib import Path

import pytest
from hydra import initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.plugins import Plugins
from hydra.plugins.plugin import Plugin
from hydra.plugins.search_path_plugin import SearchPathPlugin
from hydra.plugins.sweeper import Sweeper

import zi_app

pytestmark = pytest.mark.quick  # the quick tier (pyproject.toml's markers)

REPO = Path(__file__).resolve().parents[2]
GROUPS = ("model", "offload", "quant", "kvcache", "memory")
PLUGIN_PACKAGE = "hydra_plugins.zero_inference"
SEARCH_PATH_PLUGIN = f"{PLUGIN_PACKAGE}.searchpath.ZeroInferenceSearchPathPlugin"
ADAPTIVE_SWEEPER = f"{PLUGIN_PACKAGE}.adaptive_sweeper.AdaptiveSweeper"
HEAVY_MODULES = ("torch", "deepspeed", "transformers", "accelerate", "mlflow")


def _qualified_name(cls: type) -> str:
    # Hydra re-executes plugin modules while scanning, so class identity is not stable: compare names.
    return f"{cls.__module__}.{cls.__name__}"


def test_search_path_plugin_is_discovered():
    discovered = {_qualified_name(cls) for cls in Plugins.instance().discover(SearchPathPlugin)}
    assert SEARCH_PATH_PLUGIN in discovered


def test_adaptive_sweeper_is_discovered_and_selectable(tmp_path):
    """``hydra/sweeper=adaptive`` in any app: the class is found and its config is in the sweeper group."""
    assert ADAPTIVE_SWEEPER in {_qualified_name(cls) for cls in Plugins.instance().discover(Sweeper)}
    with initialize_config_dir(config_dir=str(tmp_path), version_base="1.3"):
        assert "adaptive" in GlobalHydra.instance().config_loader().get_group_options("hydra/sweeper")


@pytest.mark.parametrize("group", GROUPS)
def test_every_app_lists_our_group_options(group, tmp_path):
    """An app whose own config dir is empty sees each option the package ships, from the package's conf/."""
    shipped = {path.stem for path in (zi_app.conf_dir() / group).glob("*.yaml")}
    with initialize_config_dir(config_dir=str(tmp_path), version_base="1.3"):
        loader = GlobalHydra.instance().config_loader()
        listed = set(loader.get_group_options(group))
        search_path = {(e.provider, e.path) for e in loader.get_search_path().get_path()}
    assert shipped and listed == shipped
    assert ("hydra-zero-inference", f"file://{zi_app.conf_dir()}") in search_path


def test_entry_points_name_every_plugin_class():
    """Hydra 1.4 loads ``hydra.plugins`` entry points of the form ``module:Class``, one per concrete plugin
    class; each of ours must load to one, and every plugin class in our package must have one."""
    declared = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["entry-points"]["hydra.plugins"]
    loaded = set()
    for name, value in declared.items():
        cls = EntryPoint(name=name, value=value, group="hydra.plugins").load()
        assert inspect.isclass(cls) and issubclass(cls, Plugin) and not inspect.isabstract(cls), (name, value)
        loaded.add(_qualified_name(cls))
    ours = {_qualified_name(cls) for cls in Plugins.instance().discover(Plugin)
            if cls.__module__.startswith(f"{PLUGIN_PACKAGE}.")}
    assert {SEARCH_PATH_PLUGIN, ADAPTIVE_SWEEPER} <= loaded
    assert loaded == ours


def test_plugin_scan_and_search_path_import_nothing_heavy(tmp_path):
    """Every Hydra app imports our plugin modules and runs the search-path plugin at start: in a fresh
    process, neither may import torch, DeepSpeed, transformers or MLflow."""
    code = (
        "import json, sys\n"
        "from hydra import initialize_config_dir\n"
        "from hydra.core.global_hydra import GlobalHydra\n"
        f"with initialize_config_dir(config_dir={str(tmp_path)!r}, version_base='1.3'):\n"
        "    options = GlobalHydra.instance().config_loader().get_group_options('offload')\n"
        "    assert 'adaptive' in GlobalHydra.instance().config_loader().get_group_options('hydra/sweeper')\n"
        f"print(json.dumps({{'options': options, 'heavy': [m for m in {HEAVY_MODULES!r} if m in sys.modules]}}))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert "cpu" in report["options"]
    assert report["heavy"] == []
