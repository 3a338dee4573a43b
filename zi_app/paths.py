"""Where the packaged config groups live."""

from pathlib import Path


def conf_dir() -> Path:
    """The ``conf/`` directory: inside the installed wheel, or the source checkout's (editable install)."""
    packaged = Path(__file__).resolve().parent / "conf"
    return packaged if packaged.is_dir() else Path(__file__).resolve().parent.parent / "conf"
