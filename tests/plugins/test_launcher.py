"""The process_per_job launcher: Hydra's launcher test suites, plus what it adds (fresh process per job,
jobs that die, one job per GPU)."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from conftest import MlflowStore
from helpers.signals import terminal_signals
from hydra.core.plugins import Plugins
from hydra.plugins.launcher import Launcher
from hydra.test_utils.launcher_common_tests import IntegrationTestSuite, LauncherTestSuite
from hydra.version import VersionBase
from packaging.version import Version

from hydra_plugins.zero_inference.process_per_job_launcher import ProcessPerJobLauncher
from zi_app.plan import hardware as machine

LAUNCHER = "hydra/launcher=process_per_job"


@pytest.mark.quick
def test_discovered_by_hydra():
    # Hydra re-executes plugin modules while scanning: compare the classes by name.
    names = {f"{cls.__module__}.{cls.__name__}" for cls in Plugins.instance().discover(Launcher)}
    assert f"{ProcessPerJobLauncher.__module__}.{ProcessPerJobLauncher.__name__}" in names


@pytest.mark.quick
def test_discovery_imports_nothing_heavy():
    """Hydra imports the plugin module at every start of every app."""
    code = ("import sys, hydra_plugins.zero_inference.process_per_job_launcher; "
            "print([m for m in ('cloudpickle', 'mlflow', 'torch', 'deepspeed', 'zi_app') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


@pytest.fixture
def hydra_default_version_base(hydra_restore_singletons, monkeypatch):
    """Hydra's suites expect Hydra's default version base (1.1: a job runs in its output dir); importing
    any module with ``@hydra.main(version_base=...)`` (zi_app.app) into this process would change it."""
    monkeypatch.setattr(VersionBase.instance(), "version_base", Version("1.1"))


@pytest.mark.usefixtures("hydra_default_version_base")
@pytest.mark.parametrize("launcher_name, overrides", [("process_per_job", [])])
class TestProcessPerJobLauncher(LauncherTestSuite):
    pass


@pytest.mark.usefixtures("hydra_default_version_base")
@pytest.mark.parametrize("task_launcher_cfg, extra_flags", [({}, ["-m", LAUNCHER])])
class TestProcessPerJobLauncherIntegration(IntegrationTestSuite):
    pass


def test_every_job_gets_a_new_process(hydra_sweep_runner, tmp_path):
    sweep = hydra_sweep_runner(calling_file=None, calling_module="hydra.test_utils.a_module",
                               task_function=lambda cfg: os.getpid(), config_path="configs",
                               config_name="compose.yaml", overrides=[LAUNCHER, "+a=0,1,2"], temp_dir=tmp_path)
    with sweep:
        pids = [ret.return_value for ret in sweep.returns[0]]
    assert len(set(pids)) == 3 and os.getpid() not in pids


def test_a_jobs_python_can_be_a_command_that_wraps_it(hydra_sweep_runner, tmp_path):
    # `env` starts the job's interpreter with a variable set, as numactl or a container would start it.
    wrapper = f"'env ZI_WRAPPED_BY=env {sys.executable}'"
    sweep = hydra_sweep_runner(calling_file=None, calling_module="hydra.test_utils.a_module",
                               task_function=lambda cfg: (os.environ.get("ZI_WRAPPED_BY"), os.getpid()),
                               config_path="configs", config_name="compose.yaml",
                               overrides=[LAUNCHER, "+a=0,1", f"hydra.launcher.python={wrapper}"], temp_dir=tmp_path)
    with sweep:
        seen = [ret.return_value for ret in sweep.returns[0]]
    assert [wrapped for wrapped, _ in seen] == ["env", "env"] and len({pid for _, pid in seen}) == 2


@pytest.mark.quick
@pytest.mark.parametrize("python, why", [("no-such-python -u", "'no-such-python' is not an executable"),
                                         ("'python", "it does not split as a shell would")])
def test_a_jobs_python_that_cannot_run_stops_the_sweep_before_any_job(run_python, new_store, tmp_path, python, why):
    new_store(tmp_path)
    override = "hydra.launcher.python=" + ('"' + python + '"' if "'" in python else f"'{python}'")
    result = run_python(["-m", "zi_app", "-m", "batch=1,2", override], tmp_path)
    assert result.returncode == 2, result.tail()
    line = f"error: invalid config: hydra.launcher.python={python!r} is not allowed: {why}"
    assert line in result.stderr, result.tail()
    [parent] = MlflowStore(tmp_path).runs()  # no job's run: none started
    assert (parent.info.status, parent.data.tags["zi.never_ran"]) == ("FAILED", "2")


# A job app whose jobs record what they saw; x=2 kills its own process with SIGKILL, as the kernel's
# OOM killer would; x=4 raises an exception that cannot be unpickled (its constructor wants two arguments). The callback (imported from the app's folder, so the job's process must see the
# driver's sys.path) records on_job_end calls and the process they ran in.
APP = '''
import json, os, signal, time
import hydra
from hydra.core.hydra_config import HydraConfig

class TwoArgError(Exception):
    def __init__(self, what, why):
        super().__init__(f"{what}: {why}")

@hydra.main(version_base=None, config_path=".", config_name="config")
def main(cfg):
    start = time.time()
    if cfg.x == 2:
        os.kill(os.getpid(), signal.SIGKILL)
    if cfg.x == 4:
        raise TwoArgError("x", "four is right out")
    time.sleep(cfg.sleep)
    record = {"x": cfg.x, "pid": os.getpid(), "gpu": os.environ.get("CUDA_VISIBLE_DEVICES"),
              "start": start, "end": time.time()}
    with open(os.path.join(HydraConfig.get().runtime.output_dir, "job.json"), "w") as f:
        json.dump(record, f)
    return cfg.x * 10.0

if __name__ == "__main__":
    main()
'''
CALLBACK = '''
import json, os
from hydra.experimental.callback import Callback

class Recorder(Callback):
    def on_job_end(self, config, job_return, **kwargs):
        with open(os.path.join(config.hydra.sweep.dir, "job_end.jsonl"), "a") as f:
            f.write(json.dumps({"num": config.hydra.job.num, "status": job_return.status.name,
                                "pid": os.getpid(), "output_dir": config.hydra.runtime.output_dir}) + "\\n")
'''
CONFIG = '''
x: 0
sleep: 0
hydra:
  callbacks:
    recorder:
      _target_: recorder.Recorder
'''


def _run_app(tmp_path: Path, *overrides: str) -> subprocess.CompletedProcess:
    (tmp_path / "app.py").write_text(APP)
    (tmp_path / "recorder.py").write_text(CALLBACK)
    (tmp_path / "config.yaml").write_text(CONFIG)
    return subprocess.run([sys.executable, str(tmp_path / "app.py"), "-m", LAUNCHER, "hydra.sweep.dir=sweep",
                           *overrides], cwd=tmp_path, capture_output=True, text=True, timeout=300)


def _records(sweep: Path) -> dict:
    return {int(p.parent.name): json.loads(p.read_text()) for p in sweep.glob("*/job.json")}


def test_a_killed_job_fails_alone(tmp_path):
    proc = _run_app(tmp_path, "x=1,2,3,4")
    sweep = tmp_path / "sweep"
    assert proc.returncode == 1, proc.stderr
    lines = [line for line in proc.stdout.splitlines() if re.match(r"\[\d+/\d+\] ", line)]
    assert lines[0].startswith("[1/4] #0 x=1: COMPLETED 10.00 tokens/s")
    assert lines[1].startswith("[2/4] #1 x=2: FAILED JobProcessError: the job's process was killed by SIGKILL")
    assert lines[2].startswith("[3/4] #2 x=3: COMPLETED 30.00 tokens/s")
    assert lines[3].startswith("[4/4] #3 x=4: FAILED JobError: TwoArgError: x: four is right out")
    assert "killed by SIGKILL" in proc.stderr  # Hydra reports the first failed job, in one line
    # A failed job's traceback goes to its log file, not to the terminal, where it is one line.
    assert "Traceback" not in proc.stdout + proc.stderr
    assert f"traceback in {sweep / '3' / 'app.log'}" in lines[3]
    log = (sweep / "3" / "app.log").read_text()
    assert "job #3 failed" in log and "Traceback" in log and "TwoArgError: x: four is right out" in log
    assert sorted(_records(sweep)) == [0, 2]
    ends = {e["num"]: e for e in map(json.loads, (sweep / "job_end.jsonl").read_text().splitlines())}
    assert ends[1]["status"] == "FAILED"
    assert ends[1]["output_dir"] == str(sweep / "1")
    driver_pids = {ends[1]["pid"]}
    assert driver_pids.isdisjoint({ends[0]["pid"], ends[2]["pid"]})  # the others ran in their own processes
    assert ends[0]["pid"] == _records(sweep)[0]["pid"]


def test_one_job_per_gpu_at_a_time(tmp_path):
    proc = _run_app(tmp_path, "x=3,5,6,7", "sleep=1.5", "hydra.launcher.gpus=[a,b]")
    assert proc.returncode == 0, proc.stderr
    records = list(_records(tmp_path / "sweep").values())
    assert len(records) == 4 and {r["gpu"] for r in records} == {"a", "b"}
    for r in records:
        running = [o for o in records if o["start"] < r["end"] and r["start"] < o["end"]]
        assert len(running) <= 2  # itself and at most one other
        assert len({o["gpu"] for o in running}) == len(running)  # never two at once on one GPU
    assert any(len([o for o in records if o["start"] < r["end"] and r["start"] < o["end"]]) == 2 for r in records)


@pytest.mark.quick
@pytest.mark.parametrize("env, expected", [("0,1", ["0", "1"]), ("", []), ("2,-1,3", ["2"]),
                                           ("GPU-9f2e, GPU-77aa", ["GPU-9f2e", "GPU-77aa"])])
def test_visible_gpus_follow_cuda_visible_devices(monkeypatch, env, expected):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", env)
    assert machine.visible_gpus() == expected


def test_ctrl_c_stops_the_sweep(tmp_path):
    """SIGINT to the sweep's process group, as Ctrl-C sends it: the running job ends, no other starts."""
    _run_app(tmp_path, "x=1")  # writes the app's files; one quick job
    sweep = tmp_path / "sweep"
    shutil.rmtree(sweep)
    proc = subprocess.Popen([sys.executable, str(tmp_path / "app.py"), "-m", LAUNCHER, "hydra.sweep.dir=sweep",
                             "x=1,3,5", "sleep=30"], cwd=tmp_path, start_new_session=True,
                            preexec_fn=terminal_signals,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 60
    # The job's own process must exist before the signal: on a loaded machine the driver writes the job's
    # folder well before the process it starts has imported anything.
    driver = psutil.Process(proc.pid)
    while not ((sweep / "0" / ".hydra" / "overrides.yaml").exists() and driver.children(recursive=True)) \
            and time.monotonic() < deadline:
        time.sleep(0.1)
    time.sleep(5)  # inside the job's sleep
    os.killpg(proc.pid, signal.SIGINT)
    output, _ = proc.communicate(timeout=30)
    assert proc.returncode != 0
    assert "[1/3] #0 x=1 sleep=30: FAILED JobProcessError: the job's process was killed by SIGINT" in output
    assert not (sweep / "1").exists()
