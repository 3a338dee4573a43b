"""DeepSpeed's JIT-built ops (``shm_comm`` on a CPU, ``async_io`` for NVMe) in a folder of each environment's own:
two environments of one Python (the README's app and a client app's venv) no longer rebuild each other's ops
at every switch, and the build, when it comes, is announced."""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from zi_app.run import engine

REPO = Path(__file__).resolve().parents[2]
SHOW = "from zi_app.run import engine; engine.use_own_extensions_dir(); print(engine.shm_op_dir())"


def op_dir(python: str, **env: str) -> str:
    """The shm_comm op's build folder as a job in the environment of ``python`` would use it."""
    site = sysconfig.get_paths()["purelib"]  # this environment's packages (torch), seen from the other one
    environ = {k: v for k, v in os.environ.items() if k != "TORCH_EXTENSIONS_DIR"}
    environ.update(PYTHONPATH=os.pathsep.join([str(REPO), site]), **env)
    done = subprocess.run([python, "-c", SHOW], env=environ, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout.strip()


def test_two_environments_of_one_python_build_their_ops_apart(tmp_path):
    other = tmp_path / "other-venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(other)], check=True, timeout=120)
    ours, theirs = op_dir(sys.executable), op_dir(str(other / "bin" / "python"))
    assert ours.startswith(os.path.join(sys.prefix, "torch_extensions") + os.sep), ours
    assert theirs.startswith(str(other / "torch_extensions") + os.sep), theirs
    # The user's own TORCH_EXTENSIONS_DIR wins.
    assert op_dir(sys.executable, TORCH_EXTENSIONS_DIR=str(tmp_path / "mine")).startswith(str(tmp_path / "mine"))


@pytest.mark.quick
def test_an_environment_that_cannot_be_written_keys_its_folder_by_its_path(monkeypatch):
    monkeypatch.setattr(os, "access", lambda path, mode: False)
    folder = engine.extensions_dir()
    assert folder.startswith(os.path.expanduser("~/.cache/torch_extensions/"))
    assert os.path.basename(folder).startswith(os.path.basename(sys.prefix) + "-")


def test_build_ops_leaves_every_op_built_in_the_environments_folder(tmp_path):
    """``python -m zi_app.run.build_ops`` (install.sh runs it): shm_comm (on a CPU), pin_memory and, with libaio,
    async_io are built (or, built already, loaded) in this environment's folder, where jobs then find them."""
    from zi_app.plan import preflight

    environ = {k: v for k, v in os.environ.items() if k != "TORCH_EXTENSIONS_DIR"}
    done = subprocess.run([sys.executable, "-m", "zi_app.run.build_ops"], cwd=tmp_path, env=environ,
                          capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stderr[-3000:]
    import torch

    ops = [*([] if torch.cuda.is_available() else ["deepspeed_shm_comm"]), "pin_memory",
           *(["async_io"] if preflight.libaio_available() else [])]
    folder = Path(engine.extensions_dir())
    assert f"DeepSpeed's ops into {folder} " in done.stderr
    for op in ops:
        assert (folder / op / f"{op}.so").is_file(), (op, done.stderr[-3000:])
    assert done.stderr.count(": ready (") == len(ops), done.stderr[-3000:]
