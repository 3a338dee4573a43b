"""What a job keeps when its store stops taking writes while it runs (a full disk, a store folder removed or
made read-only, a server gone): its measurements go on being taken, and what it measured is written to its
output folder as ``result.json``, which its one-line error names. Knows nothing of torch or DeepSpeed.
"""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from typing import Any, Callable, Dict, Optional

from zi_app.record.redaction import redact_text

RESULT_FILE = "result.json"  # in a job's output folder: what it measured, when its run could not be recorded


class ResultNotRecorded(Exception):
    """A job whose MLflow run could not be written; the message says why and where its result went."""


def recording_error(error: BaseException) -> bool:
    """Whether ``error`` is the store refusing a write (MLflow's, SQLAlchemy's or SQLite's error, or the
    operating system's: a full or read-only disk), not a fault of the job."""
    from mlflow.exceptions import MlflowException
    from sqlalchemy.exc import SQLAlchemyError

    return isinstance(error, (MlflowException, SQLAlchemyError, sqlite3.Error, OSError))


class Recorder:
    """``on_metrics`` for a job: each measurement is kept here and logged with ``log``; the first write the
    store refuses is kept in ``lost`` and later ones are not tried, so that the job goes on measuring."""

    def __init__(self, log: Callable[..., None]) -> None:
        self.log = log
        self.measured: Dict[str, float] = {}
        self.outputs: Dict[str, Any] = {}  # the job's generated tokens, once it has them
        self.lost: Optional[BaseException] = None

    def __call__(self, metrics: Dict[str, float], **kwargs: Any) -> None:
        self.measured.update(metrics)
        self.attempt(self.log, metrics, **kwargs)

    def attempt(self, write: Callable[..., None], *args: Any, **kwargs: Any) -> None:
        """Call ``write`` unless a write was lost already; keep a refused write's error in ``lost``."""
        if self.lost is not None:
            return
        try:
            write(*args, **kwargs)
        except Exception as error:  # noqa: BLE001 - filtered: only the store's refusals are kept
            if not recording_error(error):
                raise
            self.lost = error


def save_result(folder: Optional[Path], measured: Dict[str, float], extra: Dict[str, Any]) -> Optional[Path]:
    """Write what a job measured (``measured`` and ``extra``) to ``folder/result.json``; the file, or None
    where it cannot be written either (no folder, or the same full disk)."""
    if folder is None or not measured:
        return None
    path = folder / RESULT_FILE
    try:
        path.write_text(json.dumps({"metrics": measured, **extra}, indent=2))
    except OSError:
        return None
    return path


def not_recorded(uri: str, error: BaseException, saved: Optional[Path], measured: bool) -> ResultNotRecorded:
    """The one-line error of a job whose run could not be written to the store at ``uri``: why, and where
    what it measured went (``saved``), if it measured anything."""
    from zi_app.record.store import first_line

    if saved is not None:
        where = f"what it measured is in {saved}"
    elif measured:
        where = "what it measured could not be saved in its output folder either"
    else:
        where = "it had measured nothing yet"
    return ResultNotRecorded(redact_text(f"the job's MLflow run could not be recorded in {uri} ({first_line(error)}); "
                                   f"{where}"))
