"""The command line a newcomer meets: ``--help`` (the app's own help template), Hydra's tab completion, a
start-up that imports nothing heavy for either, the config search path, and usage errors in one line.

Everything runs ``python -m zi_app`` in a fresh process, as the ``zi`` console script does (same entry
point, ``zi_app.app:cli``); tests/config/test_reuse_groups.py runs the installed console scripts themselves."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Dict, List

import pytest

import zi_app
from zi_app.config.paths import command
from zi_app.config.schema import ZIConfig

pytestmark = pytest.mark.quick  # the quick tier (pyproject.toml's markers)

REPO = Path(__file__).resolve().parents[2]
GROUPS = ("model", "offload", "quant", "kvcache", "memory", "hardware")
HEAVY_MODULES = ("torch", "mlflow", "matplotlib", "deepspeed", "transformers")


def app(tmp_path: Path, *args: str, env: Dict[str, str] = None, importtime: bool = False) -> subprocess.CompletedProcess:
    flags = ["-X", "importtime"] if importtime else []
    return subprocess.run([sys.executable, *flags, "-m", "zi_app", *args], cwd=tmp_path, capture_output=True,
                          text=True, timeout=300, env={**os.environ, **(env or {})})


def imported(stderr: str) -> List[str]:
    """Top-level packages imported by a ``-X importtime`` process."""
    return sorted({line.split("|")[-1].strip().split(".")[0] for line in stderr.splitlines()
                   if line.startswith("import time:") and "|" in line})


@pytest.fixture(scope="module")
def help_text(tmp_path_factory) -> tuple:
    proc = app(tmp_path_factory.mktemp("help"), "--help", importtime=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout, imported(proc.stderr)


def test_help_says_what_the_app_does(help_text):
    text, _ = help_text
    assert text.startswith("zi: compose, run and measure a DeepSpeed ZeRO-Inference job")
    assert "Powered by Hydra" not in text


@pytest.mark.parametrize("group", GROUPS)
def test_help_lists_every_option_of_a_group_with_one_line(help_text, group):
    """Each option shipped in conf/<group>/ has its own described line under its group's heading."""
    text, _ = help_text
    section = text[re.search(rf"^{group}  ", text, re.M).start() - 1:]
    section = section[:re.search(r"\n(\S|\n)", section[1:]).start() + 1]
    listed = {line.split()[0] for line in section.splitlines()[1:] if line.startswith("  ")}
    shipped = {path.stem for path in (zi_app.conf_dir() / group).glob("*.yaml")}
    assert listed == shipped
    for line in section.splitlines()[1:]:
        assert len(line.split()) > 2, line  # the option and a description


def test_help_lists_every_top_level_key_and_three_examples(help_text):
    text, _ = help_text
    keys = text[text.index("== Top-level keys =="):text.index("== Examples ==")]
    documented = {line.split()[0] for line in keys.splitlines()[1:] if line.strip()}
    schema = {f.name for f in dataclasses.fields(ZIConfig) if f.name not in GROUPS and f.name != "tracking"}
    assert schema | {"tracking.uri", "tracking.experiment"} == documented
    examples = text[text.index("== Examples =="):].splitlines()[1:4]
    assert all(line.startswith("zi ") and "# " in line for line in examples), examples


def test_help_imports_nothing_heavy(help_text):
    _, modules = help_text
    assert not set(HEAVY_MODULES) & set(modules), modules


def test_tab_completion_completes_groups_and_options_without_heavy_imports(tmp_path):
    """What bash's completion function runs on each TAB: ``zi -sc query=bash`` with the line typed so far."""
    for line, expected in (("zi mod", "model="), ("zi model=opt-3", "model=opt-30b"), ("zi quant=", "quant=int4-post")):
        proc = app(tmp_path, "-sc", "query=bash", env={"COMP_LINE": line, "COMP_POINT": str(len(line))},
                   importtime=True)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert expected in proc.stdout.split(), (line, proc.stdout)
        assert not set(HEAVY_MODULES) & set(imported(proc.stderr)), line


def test_completion_installs_for_the_command_typed(tmp_path):
    """``--shell-completion install=bash`` registers the completion function for the program's name."""
    proc = app(tmp_path, "--shell-completion", "install=bash")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "hydra_bash_completion()" in proc.stdout and "complete -o nospace -o default -F hydra_bash_completion" \
        in proc.stdout


def test_config_search_path_lists_conf_once(tmp_path):
    proc = app(tmp_path, "--info", "searchpath")
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [line for line in proc.stdout.splitlines() if str(zi_app.conf_dir()) in line]
    assert len(rows) == 1, proc.stdout


def test_a_usage_error_is_one_line(tmp_path):
    proc = app(tmp_path, "-m", "batch=1,2", "--info")
    assert proc.returncode == 2
    assert proc.stderr.strip() == "error: Only one of --run, --multirun, --cfg, --info and --shell_completion " \
                                  "can be specified"


# The user-facing docs (docs/benchmarks.md records the commands of the GPU runs as they were run there).
DOCS = [REPO / "README.md", *(REPO / "docs" / name for name in ("sweeps.md", "metrics.md", "reuse.md"))]


def test_docs_name_commands_that_exist_here():
    """Every ``.venv/bin/<tool>`` the docs name is a console script of ours or a tool of this environment, and
    no command line in the docs starts with a bare ``python`` or ``mlflow`` (another one, or none, in a
    shell without the venv)."""
    scripts = set(tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"])
    bin_dir = Path(sys.executable).parent
    for doc in DOCS:
        text = doc.read_text()
        for tool in set(re.findall(r"\.venv/bin/([\w.-]+)", text)):
            assert tool in scripts or (bin_dir / tool).exists(), (doc.name, tool)
        bare = re.findall(r"^(?:\$ )?(?:python3? -m zi_app|mlflow )[^\n]*", text, re.M)
        assert not bare, (doc.name, bare)


def _as_written(line: str) -> List[str]:
    """A documented ``.venv/bin/zi ...`` command, with this environment's ``zi`` (see zi_app.config.paths.command)."""
    args = shlex.split(line.split("  #")[0])
    assert args[0] == ".venv/bin/zi"
    return [*shlex.split(command("zi", "zi_app")), *args[1:]]


def test_readme_commands_run_as_written(tmp_path):
    """The README's dry run prints a DeepSpeed config, and its bad-input example prints what it says."""
    readme = (REPO / "README.md").read_text()
    dry_run = re.search(r"^\.venv/bin/zi dry_run=true .*$", readme, re.M).group(0)
    proc = subprocess.run(_as_written(dry_run), cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout)["zero_optimization"]["offload_param"] == {"device": "cpu", "pin_memory": False}
    example = re.search(r"^\$ (\.venv/bin/zi batch=0)\n(.*)$", readme, re.M)
    proc = subprocess.run(_as_written(example.group(1)), cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert (proc.returncode, proc.stderr.strip()) == (2, example.group(2))
