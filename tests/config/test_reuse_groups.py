"""Another Hydra app reuses our config groups without copying them: the example client app
(examples/client_app) and the README section's snippet, each run from a folder outside the repository.

Fresh environments. A wheel built from the working tree, or an editable install of the checkout, goes into a
new virtual environment with ``pip install --no-deps --no-index`` (nothing is downloaded). The dependencies
(Hydra, OmegaConf, pip, hatchling, ...) come from the project's .venv through a ``.pth`` file naming a
*filtered view* of its site-packages: a folder of symlinks to every entry except our own distribution
(``zi_app/``, ``hydra_plugins/zero_inference``, ``hydra_zero_inference-*.dist-info``) and the ``.pth`` files
(the editable install's ``.pth`` would put the checkout on sys.path). Before installing, each test checks that
the new venv can find neither ``zi_app`` nor our distribution's metadata, so what the app uses afterwards comes
from the wheel alone: a YAML file or plugin module missing from the wheel, or an entry point that does not
load, fails here even though the editable install in .venv would hide it.

The fresh venvs only compose configs and print DeepSpeed configs. Importing DeepSpeed there would JIT-build its
shm op with include paths through the symlinked view, which makes every other process rebuild the shared op
cache (~1 min each); ``zi_app.run_inference`` from a client app is run in .venv, by the README snippet.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import site
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path
from typing import Dict, List, Optional

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

import zi_app

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "examples" / "client_app"
DISTRIBUTION = "hydra_zero_inference"
SECTION = "## Use the groups in your own Hydra app"
SEARCH_PATH_ENTRY_POINT = "hydra_plugins.zero_inference.searchpath:ZeroInferenceSearchPathPlugin"
TIMEOUT_S = 300

# Run inside a fresh venv: where our code comes from, and what Hydra and the entry points see there.
PROBE = """
import json, importlib.metadata as md
from hydra.core.plugins import Plugins
from hydra.plugins.search_path_plugin import SearchPathPlugin
import zi_app
def name(cls):
    return f"{cls.__module__}.{cls.__name__}"
eps = md.distribution("hydra-zero-inference").entry_points.select(group="hydra.plugins")
print(json.dumps({
    "zi_app": zi_app.__file__,
    "conf_dir": str(zi_app.conf_dir()),
    "search_path_plugins": [name(cls) for cls in Plugins.instance().discover(SearchPathPlugin)],
    "entry_points": {ep.value: name(ep.load()) for ep in eps},
}))
"""
ISOLATION_PROBE = """
import importlib.metadata as md, importlib.util as iu, json
try:
    md.distribution("hydra-zero-inference")
    dist = True
except md.PackageNotFoundError:
    dist = False
print(json.dumps({"zi_app": iu.find_spec("zi_app") is not None, "distribution": dist}))
"""


def _run(cmd: List[str], cwd: Path, env: Dict[str, str]) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=TIMEOUT_S)
    assert proc.returncode == 0, f"$ {' '.join(map(str, cmd))}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc


def _env(tmp_path: Path, bin_dir: Optional[Path] = None) -> Dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    env.update(HYDRA_FULL_ERROR="1", ZI_CACHE_DIR=str(tmp_path / "cache"), PIP_DISABLE_PIP_VERSION_CHECK="1",
               PIP_NO_INPUT="1")
    if bin_dir is not None:
        env["PATH"] = f"{bin_dir}{os.pathsep}{env.get('PATH', '')}"
    return env


def _python_only_bin(root: Path) -> Path:
    """A folder whose only command is ``python``, running this interpreter. Prepending it to PATH leaves
    every other tool as the rest of the suite finds it: with .venv/bin first, DeepSpeed's JIT build would
    use the venv's ninja instead of the system's, and the two ninja versions rebuild each other's shared
    op cache (~1 min each time)."""
    bin_dir = root / "bin"
    bin_dir.mkdir()
    (bin_dir / "python").write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
    (bin_dir / "python").chmod(0o755)
    return bin_dir


def _last_json(stdout: str):
    return json.loads(stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """A wheel of the working tree, built offline with the hatchling already in this environment."""
    out = tmp_path_factory.mktemp("dist")
    _run([sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", out, REPO], out, dict(os.environ))
    (built,) = out.glob(f"{DISTRIBUTION}-*.whl")
    return built


@pytest.fixture(scope="module")
def dependency_paths(tmp_path_factory) -> List[str]:
    """sys.path entries giving a fresh venv this environment's packages, minus our own distribution."""
    purelib = Path(sysconfig.get_paths()["purelib"])
    view = tmp_path_factory.mktemp("site-packages-without-ours")
    for entry in purelib.iterdir():
        name = entry.name
        if name == "zi_app" or name.startswith(f"{DISTRIBUTION}-") or name.endswith(".pth"):
            continue
        if name == "hydra_plugins":  # a namespace package shared with other plugins: keep theirs only
            (view / name).mkdir()
            for plugin in entry.iterdir():
                if plugin.name != "zero_inference":
                    (view / name / plugin.name).symlink_to(plugin)
            continue
        (view / name).symlink_to(entry)
    # A venv made with --system-site-packages (install.sh on a machine with a system torch) has more.
    others = [p for p in site.getsitepackages() if Path(p).is_dir() and Path(p).resolve() != purelib.resolve()]
    return [str(view), *others]


def _fresh_venv(root: Path, dependency_paths: List[str]) -> Path:
    """A new venv seeing only the dependencies; returns its python after checking ours is absent."""
    venv = root / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", venv], root, dict(os.environ))
    python = venv / "bin" / "python"
    env = _env(root, venv / "bin")
    site_packages = _run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], root, env)
    (Path(site_packages.stdout.strip()) / "_dependencies.pth").write_text("\n".join(dependency_paths) + "\n")
    isolation = _last_json(_run([python, "-c", ISOLATION_PROBE], root, env).stdout)
    assert isolation == {"zi_app": False, "distribution": False}, "the fresh venv already sees our package"
    return python


def _install(python: Path, root: Path, *target: str) -> Dict[str, object]:
    """pip-install ``target`` into ``python``'s venv offline and return what :data:`PROBE` reports there."""
    env = _env(root, python.parent)
    _run([python, "-m", "pip", "install", "--quiet", "--no-deps", "--no-index", "--no-build-isolation",
          "--no-cache-dir", *target], root, env)
    return _last_json(_run([python, "-c", PROBE], root, env).stdout)


def _client_app(root: Path) -> Path:
    """A copy of the example client app in ``root``, outside the repository."""
    app = root / "client_app"
    shutil.copytree(EXAMPLE, app, ignore=shutil.ignore_patterns("outputs", "__pycache__"))
    assert not app.resolve().is_relative_to(REPO)
    return app


def _check_client_app(python: Path, app: Path) -> None:
    """Run the example app's two variants and check that our groups and its own option composed."""
    env = _env(app, python.parent)
    top_level = json.loads(_run([python, "my_app.py"], app, env).stdout)
    # model=opt-30b (h=7168), offload=cpu with the schema's pin=true, quant=int4, the app's batch: 24.
    assert top_level["fp16"] == {"enabled": True}
    assert top_level["zero_optimization"]["stage3_param_persistence_threshold"] == 7168
    assert top_level["zero_optimization"]["offload_param"] == {"device": "cpu", "pin_memory": True}
    assert top_level["weight_quantization"]["quantized_initialization"]["num_bits"] == 4
    assert top_level["train_batch_size"] == 24

    job = OmegaConf.create(_run([python, "my_mounted_app.py", "--cfg", "job"], app, env).stdout)
    # The app's own model option extends our tiny-opt: its name and layer count, our architecture.
    assert job.zi.model.name == "my-model" and job.zi.model.arch.num_hidden_layers == 3
    assert job.zi.model.arch.model_type == "opt" and job.zi.model.arch.hidden_size == 128
    assert job.measure is False

    mounted = json.loads(_run([python, "my_mounted_app.py", "quant@zi.quant=int8", "offload@zi.offload=none",
                               "zi.batch=3"], app, env).stdout)
    assert mounted["weight_quantization"]["quantized_initialization"]["num_bits"] == 8
    assert "offload_param" not in mounted["zero_optimization"]
    assert mounted["train_batch_size"] == 3


def test_wheel_ships_the_groups_and_plugin_without_a_namespace_init(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    shipped = {f"zi_app/conf/{p.relative_to(REPO / 'conf')}" for p in (REPO / "conf").rglob("*.yaml")}
    assert shipped and shipped <= names, sorted(shipped - names)
    assert {"hydra_plugins/zero_inference/__init__.py", "hydra_plugins/zero_inference/searchpath.py"} <= names
    # hydra_plugins is a namespace package shared by every Hydra plugin: an __init__.py would hide the others.
    assert "hydra_plugins/__init__.py" not in names


def test_wheel_in_fresh_venv_composes_groups_outside_repo(wheel, dependency_paths, tmp_path):
    python = _fresh_venv(tmp_path, dependency_paths)
    probe = _install(python, tmp_path, str(wheel))
    venv = python.parent.parent
    assert Path(probe["zi_app"]).is_relative_to(venv) and Path(probe["conf_dir"]).is_relative_to(venv)
    assert probe["conf_dir"].endswith("zi_app/conf")
    assert "hydra_plugins.zero_inference.searchpath.ZeroInferenceSearchPathPlugin" in probe["search_path_plugins"]
    # Hydra 1.4 discovery: each hydra.plugins entry point of the installed metadata loads the class it names.
    assert SEARCH_PATH_ENTRY_POINT in probe["entry_points"]
    for value, loaded in probe["entry_points"].items():
        assert loaded == value.replace(":", "."), value
    _check_client_app(python, _client_app(tmp_path))


def test_editable_in_fresh_venv_composes_groups_outside_repo(dependency_paths, tmp_path):
    python = _fresh_venv(tmp_path, dependency_paths)
    probe = _install(python, tmp_path, "--editable", str(REPO))
    assert Path(probe["zi_app"]).is_relative_to(REPO) and Path(probe["conf_dir"]) == REPO / "conf"
    assert "hydra_plugins.zero_inference.searchpath.ZeroInferenceSearchPathPlugin" in probe["search_path_plugins"]
    _check_client_app(python, _client_app(tmp_path))
    _check_console_scripts(python.parent, tmp_path)


def _check_console_scripts(bin_dir: Path, root: Path) -> None:
    """``zi`` and ``zi-best`` are installed beside the venv's python, run by absolute path from a shell
    without the venv (as the README writes them), and bash completes ``zi <TAB>`` once its completion is
    installed with the venv's bin on PATH."""
    env = _env(root)
    zi, best = bin_dir / "zi", bin_dir / "zi-best"
    assert "zi: compose, run and measure" in _run([zi, "--help"], root, env).stdout
    assert json.loads(_run([zi, "dry_run=true", "quant=int8"], root, env).stdout)["weight_quantization"]
    assert _run([best, "--help"], root, env).stdout.startswith("usage: zi-best")
    script = ('eval "$(zi --shell-completion install=bash)"\n'
              'COMP_LINE="zi mod"; COMP_POINT=${#COMP_LINE}; COMP_CWORD=1\n'
              'hydra_bash_completion; printf "%s\\n" "${COMPREPLY[@]}"\n')
    completed = _run(["bash", "-c", script], root, _env(root, bin_dir)).stdout.split()
    assert "model=" in completed, completed


def _section() -> str:
    """The README section (docs/reuse.md until it is pasted into README.md)."""
    for doc in (REPO / "README.md", REPO / "docs" / "reuse.md"):
        text = doc.read_text() if doc.is_file() else ""
        if SECTION in text:
            section = text[text.index(SECTION):]
            end = section.find("\n## ", len(SECTION))
            return section if end < 0 else section[:end]
    raise AssertionError(f"no '{SECTION}' section in README.md or docs/reuse.md")


@pytest.mark.quick
def test_readme_snippet_writes_the_example_app():
    written = dict(re.findall(r"cat > (\S+) <<'EOF'\n(.*?\n)EOF\n", _section(), re.S))
    assert set(written) == {str(p.relative_to(EXAMPLE)) for p in EXAMPLE.rglob("*") if p.is_file()
                            and "__pycache__" not in p.parts and "outputs" not in p.parts}
    for path, text in written.items():
        assert text == (EXAMPLE / path).read_text(), path


def test_readme_snippet_runs_when_pasted(tmp_path):
    """Every ```bash block of the section, pasted into one shell outside the repository, with this
    environment's python as ``python``: it prints a DeepSpeed config per command and, with measure=true,
    runs our inference-and-measure step from the client app's task function."""
    blocks = re.findall(r"```bash\n(.*?)```", _section(), re.S)
    script = "set -euo pipefail\n" + "".join(blocks)
    commands = [line for line in script.splitlines() if line.startswith("python ")]
    proc = _run(["bash", "-c", script], tmp_path, _env(tmp_path, _python_only_bin(tmp_path)))
    assert proc.stdout.count('"train_batch_size"') == len(commands) >= 4, proc.stdout[-3000:]
    metrics = _last_json(proc.stdout)
    assert metrics["tokens_per_sec"] > 0 and metrics["load_s"] > 0 and metrics["peak_host_rss_bytes"] > 0


TYPED_APP = """
import hydra
from omegaconf import OmegaConf


@hydra.main(version_base="1.3", config_path="conf", config_name="typed")
def main(cfg):
    print(OmegaConf.to_yaml(cfg))


main()
"""
TYPED_CONFIG = """
defaults:
  - /zi_schema@zi
  - /model@zi.model: opt-30b
  - /quant@zi.quant: int4
  - _self_
mine: 1
zi:
  batch: 2
"""


def test_app_that_never_imports_zi_app_composes_typed_groups(tmp_path):
    """The plugin alone makes our groups and the ``zi_schema`` structured config available: a typed mount
    composes, and a bad value fails composition naming its key."""
    (tmp_path / "conf").mkdir()
    (tmp_path / "conf" / "typed.yaml").write_text(TYPED_CONFIG)
    (tmp_path / "typed_app.py").write_text(TYPED_APP)
    env = _env(tmp_path)
    cfg = OmegaConf.create(_run([sys.executable, "typed_app.py"], tmp_path, env).stdout)
    assert cfg.zi.model.name == "opt-30b" and cfg.zi.quant.bits == 4 and cfg.zi.batch == 2
    assert cfg.zi.prompt_len == 512 and cfg.mine == 1  # a schema default, and the app's own key
    proc = subprocess.run([sys.executable, "typed_app.py", "zi.batch=abc"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=TIMEOUT_S)
    assert proc.returncode != 0 and "zi.batch" in proc.stderr and "abc" in proc.stderr


@pytest.mark.quick
def test_typed_mount_validates_with_cache_dir_default(tmp_path, monkeypatch):
    """A typed node composed by another app lacks ``cache_dir`` (our config.yaml sets it): validation fills
    it from ZI_CACHE_DIR and keeps every composed value."""
    (tmp_path / "typed.yaml").write_text(TYPED_CONFIG)
    monkeypatch.setenv("ZI_CACHE_DIR", str(tmp_path / "cache"))
    with initialize_config_dir(config_dir=str(tmp_path), version_base="1.3"):
        cfg = compose("typed")
    assert OmegaConf.is_missing(cfg.zi, "cache_dir")
    valid = zi_app.validate(cfg.zi)
    assert valid.cache_dir == str(tmp_path / "cache")
    assert valid.batch == 2 and valid.model.name == "opt-30b" and valid.quant.bits == 4


def _compose(config_dir: Path, name: str, overrides: List[str]):
    with initialize_config_dir(config_dir=str(config_dir), version_base="1.3"):
        return compose(name, overrides=overrides)


CHOICES = ["model=opt-30b", "quant=int4", "offload=cpu", "memory=reference", "batch=24", "gen_len=16"]


@pytest.mark.quick
def test_client_keys_at_the_top_level_are_left_alone():
    """A client app composing our groups at the top level beside keys of its own (a note, a ``trainer``
    block, an interpolation into ours) gets the DeepSpeed config our app composes for the same choices."""
    ours = zi_app.build_ds_config(_compose(zi_app.conf_dir(), "config", CHOICES))
    client = _compose(EXAMPLE / "conf", "my_app",
                      ["experiment_note=hello", "+trainer.lr=0.1", "+trainer.batch=24", "batch=${trainer.batch}"])
    assert zi_app.build_ds_config(client) == ours
    assert client.experiment_note == "hello"  # untouched


@pytest.mark.quick
def test_client_keys_beside_a_mount_are_left_alone():
    """The same for our groups mounted under a key of the client's choosing, with its own keys at its root."""
    ours = zi_app.build_ds_config(_compose(zi_app.conf_dir(), "config", [
        "model=tiny-opt", "model.name=my-model", "model.arch.num_hidden_layers=3", "offload=none", "memory=reference",
        "batch=4", "prompt_len=16", "gen_len=4", "warmup=0", "repeat=1"]))
    client = _compose(EXAMPLE / "conf", "my_mounted_app", ["offload@zi.offload=none", "zi.batch=4", "+note=x"])
    assert zi_app.build_ds_config(client.zi) == ours


@pytest.mark.quick
@pytest.mark.parametrize("override,key,message", [
    ("offload.device=dsk", "offload.device", "offload.device='dsk' is not allowed: one of none, cpu, nvme"),
    ("batch=abc", "batch", "batch='abc' is not allowed: Value 'abc' of type 'str' could not be converted to Integer"),
    ("+offload.devise=cpu", "offload.devise", "offload.devise='cpu' is not allowed: a key of offload: device,"),
])
def test_a_bad_value_of_ours_in_a_client_app_is_refused_with_our_message(override, key, message):
    """A typo in one of our keys inside a client app with keys of its own: our ConfigError, never a raw
    OmegaConf traceback."""
    cfg = _compose(EXAMPLE / "conf", "my_app", ["experiment_note=hello", override])
    with pytest.raises(zi_app.ConfigError) as raised:
        zi_app.build_ds_config(cfg)
    assert raised.value.key == key and message in str(raised.value)
