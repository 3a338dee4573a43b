"""The package's shape (docs/architecture.md): stages a job goes through in order, each importing only the
stages before it, read from every ``import`` statement of the source (lazy ones inside functions included)."""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Dict, List, Set

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "zi_app"
STAGES = ("config", "plan", "run", "record")  # the order a job goes through them
ENTRY_POINTS = ("__init__", "__main__", "app", "zi_plan", "zi_best")
HEAVY = ("torch", "deepspeed", "transformers")


def imports(path: Path) -> Set[str]:
    """Every module ``path`` imports, at module level or inside a function."""
    found: Set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


def stage_modules() -> Dict[str, List[Path]]:
    return {stage: sorted((PACKAGE / stage).glob("*.py")) for stage in STAGES}


def stage_of(module: str) -> str:
    """The stage a ``zi_app.<stage>...`` module name belongs to ('' for anything else)."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[0] == "zi_app" and parts[1] in STAGES else ""


def test_every_module_is_in_a_stage_or_an_entry_point():
    top = {path.stem for path in PACKAGE.glob("*.py")}
    assert top == set(ENTRY_POINTS), f"modules outside the stage packages: {sorted(top - set(ENTRY_POINTS))}"
    assert {path.name for path in PACKAGE.iterdir() if path.is_dir() and (path / "__init__.py").exists()} \
        == set(STAGES)


@pytest.mark.parametrize("stage", STAGES)
def test_a_stage_imports_only_the_stages_before_it(stage):
    allowed = set(STAGES[:STAGES.index(stage) + 1])
    for path in stage_modules()[stage]:
        for module in imports(path):
            assert not module.startswith("hydra_plugins"), f"{path.relative_to(ROOT)} imports {module}"
            if module.startswith("zi_app"):
                assert stage_of(module) in allowed, (
                    f"{path.relative_to(ROOT)} (stage {stage}) imports {module}: a later stage, or an entry point")


def test_configuration_stays_cheap_and_recording_knows_nothing_of_torch():
    """The config stage is imported by every Hydra start (the search-path plugin registers its schema);
    the record stage receives plain dicts and files."""
    for path in stage_modules()["config"] + stage_modules()["record"]:
        heavy = {module for module in imports(path) if module.split(".")[0] in HEAVY}
        # lazily: real weights' config, random weights' model type
        allowed = ({"transformers", "transformers.AutoConfig", "transformers.models.auto.configuration_auto",
                    "transformers.models.auto.configuration_auto.CONFIG_MAPPING_NAMES"} if path.name == "spec.py"
                   else set())
        assert heavy <= allowed, f"{path.relative_to(ROOT)} imports {sorted(heavy - allowed)}"
    for path in stage_modules()["run"]:
        assert not {module for module in imports(path) if module.split(".")[0] == "mlflow"}, \
            f"{path.relative_to(ROOT)} logs to MLflow itself: measurements go up to the entry point"


def test_the_stage_checker_sees_a_violation(tmp_path):
    """The checker above is not vacuous: a planning module importing the run stage is caught."""
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from zi_app.run.engine import accelerator\n")
    assert stage_of(next(m for m in imports(bad) if m.startswith("zi_app.run."))) == "run"
