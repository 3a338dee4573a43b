"""Fuzzing the command line (issue 24, item 6 and 8): invented overrides, each run as the user would run it
(``python -m zi_app``, ``-m``, ``zi-plan``) against a new store in the test's folder (seeded: conftest's
``new_store``; creating one is tests/record/test_store_creation.py's matter). Every one is refused
before anything loads, with exit status 2 and our one ``error:`` line naming the key: no traceback, no
Hydra "Set HYDRA_FULL_ERROR=1", no wrong key blamed.
"""

from __future__ import annotations

import pytest

# (command: zi, zi -m or zi-plan; the overrides; the key the one line must name).
FUZZ = [
    ("zi", ["memory.gpu_budget_gib=nan"], "memory.gpu_budget_gib"),
    ("zi", ["memory.gpu_budget_gib=inf"], "memory.gpu_budget_gib"),
    ("zi", ["memory.prefetch_bucket_hh=nan"], "memory.prefetch_bucket_hh"),
    ("zi", ["memory.max_live_hh=inf"], "memory.max_live_hh"),
    ("zi", ["hardware.host_memory_gib=nan"], "hardware.host_memory_gib"),
    ("zi", ["hardware.host_memory_gib=inf"], "hardware.host_memory_gib"),
    ("zi", ["hardware.step_overhead_s=nan"], "hardware.step_overhead_s"),
    ("zi", ["seed=99999999999999999999999"], "seed"),
    ("zi", ["seed=-1"], "seed"),
    ("zi", ["batch=100000000"], "batch"),
    ("zi", ["model.arch.model_type=nonsense"], "model.arch.model_type"),
    ("zi", ["model.arch.vocab_size=1"], "model.arch.vocab_size"),
    ("zi", ["model.arch.num_hidden_layers=100000"], "model.arch.num_hidden_layers"),  # was 162 s to a refusal
    # tiny-opt's preset sets model.max_positions=2048: now beyond the architecture's positions.
    ("zi", ["model.arch.max_position_embeddings=16"], "model.max_positions"),
    ("zi", ["model.max_positions=-5"], "model.max_positions"),
    ("zi", ["model.max_positions=100000", "prompt_len=3000"], "model.max_positions"),
    ("zi", ["profile_step=2"], "profile_step"),
    ("zi", ["tracking.experiment=''"], "tracking.experiment"),
    ("zi", ["tracking.uri=postgresql://u:p@127.0.0.1:1/db"], "tracking.uri"),
    ("zi", ["tracking.uri=mysql://u:p@127.0.0.1:1/db"], "tracking.uri"),
    ("zi", ["tracking.uri=sqlite:///"], "tracking.uri"),  # no file named: was the working folder, as a database
    ("zi", ["batch=${batch}"], "batch"),
    ("zi", ["batch=${oc.env:NOPE_NOT_SET}"], "batch"),
    ("zi", ["model=pretrained", "model.path=nonexistent-org/nonexistent-model"], "model.path"),
    ("zi", ["devices=1000"], "devices"),
    ("zi", ["+foo=1"], "foo"),
    ("zi", ["+bacth=8"], "bacth"),
    ("zi", ["batch=abc"], "batch"),
    ("zi", ["model=nope"], "model"),
    ("zi -m", ["batch=abc"], "batch"),
    ("zi -m", ["+bacth=8", "batch=1,2"], "bacth"),
    ("zi-plan", ["batch=abc"], "batch"),
    ("zi-plan", ["model=nope"], "model"),
    ("zi-plan", ["foo=1"], "foo"),
    ("zi-plan", ["profile_step=2"], "profile_step"),
]
MODULES = {"zi": ["-m", "zi_app"], "zi -m": ["-m", "zi_app", "-m"], "zi-plan": ["-m", "zi_app.zi_plan"]}


@pytest.mark.parametrize("command,overrides,key", FUZZ, ids=[f"{c} {' '.join(o)}" for c, o, _ in FUZZ])
def test_an_invented_override_is_refused_in_one_line_with_exit_2(command, overrides, key, run_python, new_store,
                                                                  tmp_path):
    new_store(tmp_path)
    result = run_python([*MODULES[command], *overrides], tmp_path, timeout=300)
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.returncode == 2, result.tail()
    assert len(errors) == 1, result.tail()
    assert f" {key}=" in errors[0] or f": {key}=" in errors[0], errors[0]
    assert "Traceback" not in result.output and "HYDRA_FULL_ERROR" not in result.output, result.tail()
    assert "loading" not in result.output, result.tail()
