"""Shared fixtures: the app run in its own process, the MLflow store it wrote, Hydra composition of the
packaged config, and tiny checkpoints built and run with plain transformers (no DeepSpeed).

Every ZeRO-3 run happens in a subprocess: DeepSpeed's HfDeepSpeedConfig, its process group and the
peak-memory counters are process-wide, so the pytest process never creates a DeepSpeed engine.
"""

from __future__ import annotations

import contextlib
import functools
import gzip
import json
import os
import re
import shlex
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Sequence
from urllib.parse import unquote, urlparse

import pytest

# Session fixtures that start real servers (PostgreSQL, mlflow server, SLURM) and stop them at the end.
from helpers.services import auth_server, postgres, tracking_server  # noqa: F401
from helpers.slurm_cluster import slurm  # noqa: F401

# A tiny job takes 10-40 s on 2 cores; where install.sh could not prebuild DeepSpeed's async_io op, the first NVMe
# job also JIT-builds it (2-10 min, depending on the load).
SUBPROCESS_TIMEOUT_S = 1200
# Inherited from whoever runs pytest, these would nest the app's runs under, or resume, a foreign run.
_FOREIGN_RUN_ENV = ("ZI_PARENT_RUN_ID", "MLFLOW_RUN_ID")
EXPERIMENT = "zero-inference"


@dataclass
class ProcessResult:
    """A finished subprocess: its command, exit code and output."""

    args: List[str]
    returncode: int
    stdout: str
    stderr: str

    @property
    def output(self) -> str:
        """stdout and stderr together."""
        return self.stdout + self.stderr

    def tail(self, chars: int = 4000) -> str:
        """The end of the output, for assertion messages."""
        return f"$ {' '.join(self.args)}\nexit {self.returncode}\n...{self.output[-chars:]}"

    def expect_success(self) -> "ProcessResult":
        """Assert exit code 0 (showing the output's tail otherwise) and return self."""
        assert self.returncode == 0, self.tail()
        return self


def app_env(cwd: Path) -> Dict[str, str]:
    """The environment an app process started in ``cwd`` runs with: no foreign run, caches under ``cwd``."""
    env = {k: v for k, v in os.environ.items() if k not in _FOREIGN_RUN_ENV}
    # Random-weight checkpoints for init-time quantization land in the test's own directory.
    env["ZI_CACHE_DIR"] = str(cwd / "cache")
    return env


class ForkServer:
    """The client of tests/helpers/forkserver.py, started on first use: ``python -m MODULE`` and ``python
    FILE.py`` as children forked from an interpreter that has the heavy libraries imported (its docstring says
    what differs from a new interpreter, and why tests that measure host memory do not use it)."""

    def __init__(self, folder: Path):
        self.socket = folder / "forkserver.sock"
        self.log = folder / "forkserver.log"
        self.server: "subprocess.Popen | None" = None
        self.starting = threading.Lock()  # a test may start processes from threads: one server per worker

    def start(self) -> None:
        with self.starting:
            if self.server is not None:
                return
            script = Path(__file__).parent / "helpers" / "forkserver.py"
            with open(self.log, "w") as log:
                self.server = subprocess.Popen([sys.executable, str(script), str(self.socket)],
                                               stdout=subprocess.PIPE, stderr=log, text=True)
            ready = self.server.stdout.readline()
            assert ready.strip() == "ready", f"the fork server did not start: {self.log.read_text()[-2000:]}"

    def python_command(self) -> List[str]:
        """The command that runs ``python ARGS`` (``-m MODULE`` or ``FILE.py``) as a child forked from this
        server, with a process of its own standing for it (tests/helpers/fork_python.py)."""
        self.start()
        return [sys.executable, str(Path(__file__).parent / "helpers" / "fork_python.py"), str(self.socket)]

    def job_python(self) -> str:
        """A ``hydra.launcher.python`` value that has the launcher's job processes forked from this server,
        quoted for a Hydra override (the launcher splits it as a shell would)."""
        return '"' + shlex.join(self.python_command()) + '"'

    def stop(self) -> None:
        if self.server is not None:
            self.server.kill()
            self.server.wait()

    def run(self, args: List[str], cwd: Path, env: Dict[str, str], timeout: float) -> ProcessResult:
        """``python <args>`` in ``cwd`` with ``env``, as a forked child; its exit status as subprocess's."""
        import socket
        import tempfile

        self.start()
        cmd = [sys.executable, *args]
        with contextlib.ExitStack() as stack:
            stdin = stack.enter_context(open(os.devnull))
            out, err = (stack.enter_context(tempfile.TemporaryFile()) for _ in range(2))
            client = stack.enter_context(socket.socket(socket.AF_UNIX, socket.SOCK_STREAM))
            client.connect(str(self.socket))
            request = json.dumps({"argv": args, "cwd": str(cwd), "env": env}).encode()
            socket.send_fds(client, [request], [stdin.fileno(), out.fileno(), err.fileno()])
            replies = client.makefile("r")
            pid = int(replies.readline().split()[1])
            client.settimeout(timeout)
            try:
                line = replies.readline()
            except socket.timeout:
                os.kill(pid, signal.SIGKILL)
                raise subprocess.TimeoutExpired(cmd, timeout)
            returncode = int(line.split()[1])
            out.seek(0)
            err.seek(0)
            return ProcessResult(cmd, returncode, out.read().decode(errors="replace"), err.read().decode(errors="replace"))


# Set by pytest_runtest_setup for the test about to run (module- and session-scoped fixtures included): whether
# its app processes must be new interpreters (pytest.mark.fresh_interpreter).
_FRESH_INTERPRETER = [False]


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    _FRESH_INTERPRETER[0] = item.get_closest_marker("fresh_interpreter") is not None


@pytest.fixture(scope="session")
def fork_server(tmp_path_factory) -> ForkServer:
    """This worker's fork server (started on first use)."""
    server = ForkServer(tmp_path_factory.mktemp("forkserver"))
    yield server
    server.stop()


@pytest.fixture(scope="session")
def forked_jobs(fork_server) -> Callable[[], List[str]]:
    """``forked_jobs()``: the overrides that have a sweep's job processes (the process_per_job launcher's)
    forked from the fork server, or none for a test marked ``fresh_interpreter``. For sweeps whose jobs are
    not what a test measures or signals: the processes stand for their jobs (tests/helpers/fork_python.py),
    but a job's host memory differs and a signal to the sweep's process group reaches the job only through
    the process standing for it."""
    return lambda: [] if _FRESH_INTERPRETER[0] else [f"hydra.launcher.python={fork_server.job_python()}"]


@pytest.fixture(scope="session")
def forked_python(fork_server) -> Callable[[], List[str]]:
    """``forked_python()``: the command to start ``python ARGS`` with (``subprocess.Popen([*forked_python(),
    *args])``) as a child forked from the fork server (:meth:`ForkServer.python_command`), or this interpreter
    for a test marked ``fresh_interpreter``. For apps a test starts and waits for; not where it signals their
    process group, which the forked child is not in."""
    return lambda: [sys.executable] if _FRESH_INTERPRETER[0] else fork_server.python_command()


@pytest.fixture(scope="session")
def run_python(fork_server) -> Callable[..., ProcessResult]:
    """``run_python(args, cwd)``: run ``python <args>`` (this interpreter) in ``cwd`` as a process of its own:
    forked from the fork server where the arguments are ``-m MODULE ...`` or ``FILE.py ...``, else (and for tests
    marked ``fresh_interpreter``) a new interpreter."""
    from helpers.forkserver import entry

    server = fork_server

    def run(args: Sequence[str], cwd: Path, timeout: float = SUBPROCESS_TIMEOUT_S) -> ProcessResult:
        args = list(map(str, args))
        env = app_env(Path(cwd))
        if entry(args) is not None and not _FRESH_INTERPRETER[0]:
            return server.run(args, Path(cwd), env, timeout)
        cmd = [sys.executable, *args]
        proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
        return ProcessResult(cmd, proc.returncode, proc.stdout, proc.stderr)

    return run


@pytest.fixture(scope="session")
def new_store(tmp_path_factory) -> Callable[[Path], None]:
    """``new_store(cwd)``: put a new, empty MLflow store where the app run in ``cwd`` keeps its default one
    (``cwd/mlruns/mlflow.db``), as the app would have created it there, unless one is there already.

    Creating a store (MLflow's schema and its migrations) costs an app process a second of CPU; tests that
    only read the runs of their jobs get a copy of one store made once per worker, with its Default
    experiment's artifact location moved to the copy's folder. Tests of the store's creation itself
    (tests/record/test_store_creation.py, the fault tests) run the app on an empty folder instead."""
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    from zi_app.record.store import artifact_root

    template = tmp_path_factory.mktemp("store-template") / "mlruns" / "mlflow.db"
    template.parent.mkdir()
    SqlAlchemyStore(f"sqlite:///{template}", artifact_root(f"sqlite:///{template}")).engine.dispose()
    template_root = artifact_root(f"sqlite:///{template}")

    def seed(cwd: Path) -> None:
        db = Path(cwd) / "mlruns" / "mlflow.db"
        if db.exists():
            return
        db.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(template, db)
        with contextlib.closing(sqlite3.connect(db)) as connection, connection:
            connection.execute("UPDATE experiments SET artifact_location = replace(artifact_location, ?, ?)",
                               (template_root, artifact_root(f"sqlite:///{db}")))

    return seed


@pytest.fixture
def run_app(tmp_path, run_python, new_store, forked_jobs) -> Callable[..., ProcessResult]:
    """``run_app(*overrides, multirun=False)``: ``python -m zi_app [-m] <overrides>`` with cwd=tmp_path.

    The app's MLflow store is then ``tmp_path/mlruns/mlflow.db`` (see :func:`mlflow_store`), made new for the
    test (:func:`new_store`), and its Hydra outputs land under ``tmp_path``. A sweep's jobs are forked
    (:func:`forked_jobs`) unless the overrides pick another launcher.
    """

    def run(*overrides: str, multirun: bool = False) -> ProcessResult:
        new_store(tmp_path)
        forked = forked_jobs() if multirun and not any(o.startswith("hydra/launcher=") for o in overrides) else []
        return run_python(["-m", "zi_app", *(["-m"] if multirun else []), *overrides, *forked], tmp_path)

    return run


class MlflowStore:
    """Read access to the MLflow store (SQLite + artifact folder) the app wrote under ``root/mlruns``."""

    def __init__(self, root: Path, experiment: str = EXPERIMENT):
        self.uri = f"sqlite:///{root}/mlruns/mlflow.db"
        self.experiment = experiment

    def runs(self) -> list:
        """Every run of the experiment (parents included)."""
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri=self.uri)
        experiment = client.get_experiment_by_name(self.experiment)
        assert experiment is not None, f"no experiment {self.experiment!r} in {self.uri}"
        return client.search_runs([experiment.experiment_id], max_results=1000)

    def job_runs(self) -> list:
        """Runs that are no other run's parent: one per job, whether or not a sweep added a parent run."""
        runs = self.runs()
        parents = {run.data.tags.get("mlflow.parentRunId") for run in runs}
        return [run for run in runs if run.info.run_id not in parents]

    @staticmethod
    def artifact_path(run, name: str) -> Path:
        """Local path of the artifact ``name`` of ``run`` (the store keeps artifacts on local disk)."""
        return Path(unquote(urlparse(run.info.artifact_uri).path)) / name

    def artifact_json(self, run, name: str) -> Any:
        """The JSON artifact ``name`` of ``run``, parsed."""
        return json.loads(self.artifact_path(run, name).read_text())


@pytest.fixture
def mlflow_store(tmp_path) -> MlflowStore:
    """The MLflow store of :func:`run_app`'s working directory."""
    return MlflowStore(tmp_path)


@pytest.fixture
def compose(hydra_restore_singletons) -> Callable[..., Any]:
    """``compose(*overrides)``: the packaged config composed by Hydra's compose API (defaults list,
    config groups, the ``zi_schema`` structured config), exactly what ``python -m zi_app`` would get.

    Hydra's process-wide state (the version base ``initialize_config_dir`` sets) is restored afterwards.
    """
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    import zi_app

    def run(*overrides: str):
        with initialize_config_dir(config_dir=str(zi_app.conf_dir()), version_base="1.3"):
            return hydra_compose("config", overrides=list(overrides))

    return run


@pytest.fixture(scope="session")
def model_arch() -> Callable[[str], Dict[str, Any]]:
    """``model_arch(preset)``: the ``arch`` block (transformers config kwargs) of conf/model/<preset>.yaml."""
    from omegaconf import OmegaConf

    import zi_app

    def read(preset: str) -> Dict[str, Any]:
        return OmegaConf.to_container(OmegaConf.load(zi_app.conf_dir() / "model" / f"{preset}.yaml").arch)

    return read


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory, model_arch) -> Callable[..., Path]:
    """``tiny_checkpoint(preset, **arch_changes)``: directory of a seeded random float32 model of that
    preset's architecture (with ``arch_changes`` applied), built plainly (no DeepSpeed: ZeRO-3's own
    random init differs) and saved with ``save_pretrained``; each one is built once per session."""
    built: Dict[str, Path] = {}

    def build(preset: str, **arch_changes: Any) -> Path:
        key = "-".join([preset, *(f"{k}{v}" for k, v in sorted(arch_changes.items()))])
        if key not in built:
            import torch
            from transformers import AutoConfig, AutoModelForCausalLM

            arch = {**model_arch(preset), **arch_changes}
            config = AutoConfig.for_model(arch.pop("model_type"), **arch)
            torch.manual_seed(0)
            model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
            built[key] = tmp_path_factory.mktemp(key)
            model.save_pretrained(built[key])
        return built[key]

    return build


@pytest.fixture(scope="session")
def plain_greedy() -> Callable[..., List[List[int]]]:
    """``plain_greedy(path, batch, prompt_len, gen_len)``: the new token ids greedy ``generate`` gives with
    plain transformers (float32, no DeepSpeed) for the prompts the app uses with its default seed 0."""

    def generate(path: Path, batch: int, prompt_len: int, gen_len: int) -> List[List[int]]:
        import torch
        from transformers import AutoModelForCausalLM

        from zi_app.run.inference import random_prompts

        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        prompts = random_prompts(batch, prompt_len, model.config.vocab_size, 0, "cpu")
        with torch.no_grad():
            output = model.generate(input_ids=prompts, attention_mask=torch.ones_like(prompts), do_sample=False,
                                    min_new_tokens=gen_len, max_new_tokens=gen_len)
        return output[:, prompt_len:].tolist()

    return generate


# How the suite spreads over pytest-xdist's workers (``--dist loadscope`` in pyproject.toml, scopes redrawn
# here): every test is a unit of work of its own, so a module of many slow tests keeps every core busy, except
# where tests share something expensive, which one worker then builds once:
# - a module with a module-scoped fixture (a whole sweep, a wheel, the quantization probes) is one unit;
# - the modules whose tests use the session's PostgreSQL, mlflow server or SLURM cluster are one unit
#   (SERVER_GROUP), so that one worker starts them once.
# Units run longest first where that is known (FIRST), so that no long one starts last on an idle machine.
# (xdist's own ``--dist loadgroup`` would do the grouping, but its xdist_group marks do not reach pytest 9's
# node ids.)
SERVER_GROUP = "tracking-server"
_SERVER_FIXTURE = re.compile(r"^def \w+\([^)]*\b(postgres|tracking_server|auth_server|slurm)\b", re.M)
_MODULE_FIXTURE = re.compile(r"^@pytest\.fixture\(scope=\"(module|class|package)\"", re.M)
# Work units measured longest on 2 cores, longest first: (module, test name prefix; "" for every test). Where
# install.sh could not prebuild DeepSpeed's async_io op, the first NVMe job builds it (minutes): one NVMe test
# starts early, alone.
FIRST = [
    ("test_cluster.py", ""), ("test_cluster_stop.py", ""), ("test_tracking_server.py", ""),
    ("test_fetch_path.py", "test_greedy_tokens_identical_between_fetch_paths[tiny-opt-offload=nvme-quant=none]"),
    ("test_quantization.py", ""), ("test_ui.py", ""), ("test_sweep.py", ""), ("test_faults.py", "test_two_sweeps"),
    ("test_multirun.py", ""), ("test_adaptive_sweeper.py", ""), ("test_devices.py", "test_two_ranks"),
    ("test_multi_gpu_plan.py", "test_sweep_refuses"), ("test_progress.py", "test_sweep_prints"),
    ("test_fetch_path.py", "test_greedy"), ("test_faults.py", ""), ("test_planner.py", "test_sweep_refuses"),
    ("test_planner.py", "test_calibrate"), ("test_devices.py", ""), ("test_progress.py", ""),
]


@functools.lru_cache(maxsize=None)
def _module_unit(path: Path) -> str:
    """SERVER_GROUP, the module's path (one unit), or '' (a unit per test), read from the module's source."""
    source = path.read_text() if path.is_file() else ""
    if _SERVER_FIXTURE.search(source):
        return SERVER_GROUP
    return str(path) if _MODULE_FIXTURE.search(source) else ""


def pytest_xdist_auto_num_workers(config) -> int:
    """``-n auto``: one worker more than the cores. A worker spends a tenth of the suite waiting, not computing
    (servers starting, a refused server's timeout, signals' grace periods, SLURM's scheduling): on 2 cores, 3
    workers kept the cores 93% busy against 86% for 2, and took the suite from 16:28 to 15:04."""
    return (os.cpu_count() or 1) + 1


def pytest_xdist_make_scheduler(config, log):
    """loadscope with this suite's units (see above); other ``--dist`` modes are left to xdist."""
    if config.getvalue("dist") != "loadscope":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class SharedFixtureScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return _module_unit(config.rootpath / nodeid.split("::")[0]) or nodeid

    return SharedFixtureScheduling(config, log)


def _rank(item: pytest.Item) -> int:
    for rank, (module, prefix) in enumerate(FIRST):
        if item.path.name == module and item.name.startswith(prefix):
            return rank
    return len(FIRST)


def pytest_collection_modifyitems(config, items):
    """The longest units first (a stable sort: the order within a module stays); xdist keeps this order
    (``--no-loadscope-reorder``)."""
    items.sort(key=_rank)


def profiled_step_events(artifacts: Path) -> List[dict]:
    """The Python-traced decode step a ``profile_step=true`` run keeps, from its artifact folder ``artifacts``."""
    with gzip.open(artifacts / "profile" / "decode_step_python.json.gz", "rt") as handle:
        return json.load(handle)["traceEvents"]


@dataclass
class Job:
    """A finished job's metrics, tags, generated token ids, output and artifact folder."""

    metrics: Dict[str, float]
    tags: Dict[str, str]
    tokens: List[List[int]]
    output: str
    artifacts: Path


@pytest.fixture
def job(tmp_path_factory, run_python, new_store):
    """``job(*overrides)``: run ``python -m zi_app <overrides>`` once per test in a fresh directory (no two
    tests run the same job, so the tests spread over the workers: see the scheduling below); the job must
    finish."""
    done: Dict[tuple, Job] = {}

    def run(*overrides: str) -> Job:
        if overrides not in done:
            cwd = tmp_path_factory.mktemp("job")
            new_store(cwd)
            proc = run_python(["-m", "zi_app", *overrides], cwd).expect_success()
            store = MlflowStore(cwd)
            [record] = store.job_runs()
            assert record.info.status == "FINISHED"
            tokens = store.artifact_json(record, "generation.json")["generated_token_ids"]
            done[overrides] = Job(record.data.metrics, record.data.tags, tokens, proc.output,
                                  store.artifact_path(record, ""))
        return done[overrides]

    return run
