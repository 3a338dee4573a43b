"""Where the packaged config groups live, and how to name this environment's commands in printed hints."""

import shlex
import sys
from pathlib import Path


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
