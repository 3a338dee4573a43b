"""A dry run describes a config meant for another machine instead of refusing it: every preset x quant x
kvcache option prints its DeepSpeed config on this CPU machine, with one ``warning:`` line on stderr per thing
this machine lacks to run it; configuration errors still fail, and a real run still refuses before loading.
"""

from __future__ import annotations

import json

import pytest

import zi_app
from zi_app import app

pytestmark = pytest.mark.quick  # the quick tier (pyproject.toml's markers)

PRESETS = sorted(p.stem for p in (zi_app.conf_dir() / "model").glob("*.yaml"))
QUANTS = sorted(p.stem for p in (zi_app.conf_dir() / "quant").glob("*.yaml"))
KVCACHES = sorted(p.stem for p in (zi_app.conf_dir() / "kvcache").glob("*.yaml"))
# The host-memory check depends on how much memory the test machine has free; test_planner.py tests it with
# fixed figures, so here a host large enough for every preset keeps the expected warnings machine-independent.
BIG_HOST = "hardware.host_memory_gib=4096"
# The CPU-only warnings, by the key each names: (condition on the composed config, key).
CPU_WARNINGS = (
    (lambda cfg: cfg.kvcache.cache_implementation == "offloaded", "kvcache='cpu_transformers'"),
    (lambda cfg: cfg.quant.mode != "none" and cfg.model.dtype == "float16", "model.dtype='float16'"),
)


def test_grid_covers_every_option():
    assert len(PRESETS) >= 11 and {"int4", "int8", "int4-post", "int8-post", "none"} <= set(QUANTS)
    assert set(KVCACHES) == {"gpu", "cpu", "cpu_transformers"}


@pytest.mark.parametrize("preset", PRESETS)
def test_every_preset_quant_kvcache_dry_runs_on_a_cpu_machine(preset, compose, tiny_checkpoint, capsys):
    """The dry run of the app (``zi_app.app.dry_run``, what ``dry_run=true`` calls) for every quant and kvcache
    option of one preset. DeepSpeed's post-init quantizer takes fp16 weights only, so ``*-post`` on a preset
    of another dtype is a configuration error on any machine, refused with its message."""
    path = [f"model.path={tiny_checkpoint('tiny-opt')}"] if preset == "pretrained" else []
    capsys.readouterr()  # what building the checkpoint printed
    for quant in QUANTS:
        for kvcache in KVCACHES:
            cfg = compose(f"model={preset}", f"quant={quant}", f"kvcache={kvcache}", "dry_run=true", BIG_HOST, *path)
            if cfg.quant.mode == "post" and cfg.model.dtype != "float16":
                with pytest.raises(zi_app.ConfigError, match="'post' needs model.dtype=float16"):
                    app.dry_run(cfg)
                continue
            app.dry_run(cfg)
            out, err = capsys.readouterr()
            ds = json.loads(out)
            assert ds["zero_optimization"]["stage"] == 3 and ds["train_batch_size"] == cfg.batch
            assert ("weight_quantization" in ds) == (cfg.quant.mode != "none")
            expected = {key for applies, key in CPU_WARNINGS if applies(cfg)}
            warnings = [line for line in err.splitlines() if line.startswith("warning: cannot run here: ")]
            assert len(warnings) == len(expected) and all(any(k in w for w in warnings) for k in expected), \
                f"{preset} {quant} {kvcache}: {err}"


@pytest.mark.parametrize("overrides,warned", [
    (["model=opt-30b", "quant=int4", "batch=24"], ["model.dtype='float16'"]),
    (["model=llama-2-70b", "quant=int4"], ["model.dtype='float16'"]),
    (["model=opt-13b", "quant=int8", "kvcache=cpu_transformers"], ["kvcache='cpu_transformers'", "model.dtype='float16'"]),
    (["model=opt-66b", "offload=nvme", "offload.nvme_path={tmp}/no-such-dir"], ["offload.nvme_path='{tmp}/no-such-dir'"]),
])
def test_dry_run_command_prints_json_and_warns(overrides, warned, run_app, tmp_path):
    """The command line a user types on a laptop or login node: exit 0, the config alone on stdout, one
    warning line per problem on stderr."""
    run = run_app("dry_run=true", BIG_HOST, *(o.format(tmp=tmp_path) for o in overrides)).expect_success()
    ds = json.loads(run.stdout)
    assert ds["zero_optimization"]["stage"] == 3
    lines = run.stderr.strip().splitlines()
    assert [line for line in lines if line.startswith("warning:")] == lines, run.tail()
    assert len(lines) == len(warned) and all(w.format(tmp=tmp_path) in run.stderr for w in warned), run.tail()
    assert "Traceback" not in run.output


def test_configuration_errors_still_fail_the_dry_run(run_app):
    run = run_app("dry_run=true", "model=opt-30b", "quant=int4", "quant.bits=3")
    assert run.returncode == 2 and "quant.bits=3 is not allowed: 4 or 8" in run.stderr, run.tail()
    assert not run.stdout.strip()


def test_a_real_run_still_refuses_what_this_machine_lacks(run_app, mlflow_store, tmp_path):
    """Without dry_run the first problem stops the job before loading: exit 2, FAILED as an invalid config."""
    run = run_app("offload=nvme", f"offload.nvme_path={tmp_path}/missing", "prompt_len=8", "gen_len=2")
    assert run.returncode == 2, run.tail()
    assert f"offload.nvme_path='{tmp_path}/missing' is not allowed: an existing directory" in run.stderr
    assert "loading" not in run.output and "Traceback" not in run.output
    [job] = mlflow_store.job_runs()
    assert job.info.status == "FAILED" and job.data.tags["zi.failure_kind"] == "invalid-config"
