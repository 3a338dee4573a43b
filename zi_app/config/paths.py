"""Where the packaged config groups live, which files hold a checkpoint's weights, and how to name this
environment's commands in printed hints."""

import json
import os
import shlex
import sys
from pathlib import Path
from typing import List

# A sharded checkpoint's index (the file each tensor is in), and the files of one that has none; safetensors first.
WEIGHT_FILES = (("model.safetensors.index.json", "*.safetensors"), ("pytorch_model.bin.index.json", "*.bin"))


def conf_dir() -> Path:
    """The ``conf/`` directory: inside the installed wheel, or the source checkout's (editable install)."""
    package = Path(__file__).resolve().parents[1]
    packaged = package / "conf"
    return packaged if packaged.is_dir() else package.parent / "conf"


def command(script: str, module: str) -> str:
    """A shell command that runs ``script`` of the environment running this process, from any shell.

    The console script beside this interpreter (``.venv/bin/<script>``) by absolute path when it is
    installed there, else ``<this interpreter> -m <module>``: both work pasted into a fresh shell, where
    the virtual environment is not activated and a bare ``python`` or ``mlflow`` is another one or none.
    """
    installed = Path(sys.executable).parent / script
    if installed.is_file():
        return shlex.quote(str(installed))
    return f"{shlex.quote(sys.executable)} -m {module}"


def weight_files(directory: str) -> List[Path]:
    """The weight files of a local checkpoint that a load reads: those its index names, else the files there,
    safetensors preferred over ``*.bin``; none for a directory without weights."""
    root = Path(os.path.expanduser(directory))
    for index, pattern in WEIGHT_FILES:
        if (root / index).exists():
            weight_map = json.loads((root / index).read_text())["weight_map"]
            return [root / name for name in sorted(set(weight_map.values()))]
        files = sorted(root.glob(pattern))
        if files:
            return files
    return []
