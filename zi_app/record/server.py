"""A tracking server, probed before anything loads: one that does not answer is waited for (it may be
restarting), one that answers ``/health`` but fails or hangs on its API is refused within
:data:`HALF_WORKING_WAIT_S` (it is up and broken, not restarting), and MLflow's own requests afterwards are
bounded (:func:`mlflow_client_defaults`). Cheap to import: no MLflow.
"""

from __future__ import annotations

import http.client
import os
import sys
import time
import urllib.error
import urllib.request
from typing import Optional, Tuple

from zi_app.record.redaction import public_url, redact_text

STORE_TIMEOUT_S = 5  # how long a tracking server may take to answer one probe
RETRY_EVERY_S = 2  # between two probes of a tracking server that did not answer
PROGRESS_EVERY_S = 15  # between two lines saying that a job still waits for its tracking server
# A server whose /health answers while its API fails (503 from a broken backend store, or no answer at all) is
# running and broken: it is retried this long at most, whatever tracking.connect_timeout_s allows.
HALF_WORKING_WAIT_S = 30
# A read-only API call every MLflow server answers, with 404 for the missing experiment, or 401 behind auth.
API_PROBE = "/api/2.0/mlflow/experiments/get-by-name?experiment_name=Default"
# MLflow's defaults are 7 retries with a doubling backoff (about 4 minutes for a server answering 503) and
# 120 s per request (a hanging server: 8 x 120 s): a job then seems to hang. Ours, unless the user set them:
# at most 3 retries (2 + 4 + 8 s of backoff) and 30 s without an answer per request.
# And no "View run ... at: <url>" lines on stdout each time a run ends on a server: stdout is our commands'
# answer (zi-best --json) and a sweep's one line per job.
MLFLOW_CLIENT_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "3", "MLFLOW_HTTP_REQUEST_TIMEOUT": "30",
                          "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true"}


def mlflow_client_defaults() -> None:
    """Bound MLflow's HTTP retries and timeout, and keep its run links off stdout, for this process and the
    jobs it starts (environment variables MLflow reads as it goes), unless they are set already."""
    for name, value in MLFLOW_CLIENT_DEFAULTS.items():
        os.environ.setdefault(name, value)


def probe(uri: str, timeout: float) -> Tuple[Optional[str], bool]:
    """Why the tracking server at ``uri`` does not work (None when it does), and whether it answers
    ``/health`` (then its API is what fails)."""
    base = public_url(uri).rstrip("/")  # without the credentials: any HTTP answer, 401 included, will do
    try:
        urllib.request.urlopen(f"{base}/health", timeout=timeout).close()
    except urllib.error.HTTPError:
        pass  # it answered: a server (auth and paths are MLflow's business)
    except (urllib.error.URLError, OSError, http.client.HTTPException) as error:  # InvalidURL: a bad port
        return str(getattr(error, "reason", error)), False
    call = f"GET {API_PROBE.split('?')[0]}"
    try:
        urllib.request.urlopen(f"{base}{API_PROBE}", timeout=timeout).close()
    except urllib.error.HTTPError as error:
        if error.code >= 500:
            return f"it answers /health, but its API answers HTTP {error.code} {error.reason} ({call})", True
    except (urllib.error.URLError, OSError, http.client.HTTPException) as error:  # a timeout is an OSError
        return (f"it answers /health, but its API does not answer within {timeout:g} s ({call}: "
                f"{getattr(error, 'reason', error)})"), True
    return None, False


def wait(uri: str, wait_s: float, timeout: float = STORE_TIMEOUT_S) -> Optional[str]:
    """Wait until the tracking server at ``uri`` works, probing it every few seconds for up to ``wait_s``
    seconds (at most :data:`HALF_WORKING_WAIT_S` while it answers ``/health`` only), with a line on stderr now
    and then; return None once it works, else the one-line reason to refuse it."""
    shown = redact_text(uri)
    start = time.monotonic()
    reason, half = probe(uri, timeout)
    said = None
    while reason is not None:
        limit = min(wait_s, HALF_WORKING_WAIT_S) if half else wait_s
        left = start + limit - time.monotonic()
        if left <= 0:
            if half:
                return f"MLflow tracking server {shown} is not working: {reason}" + (
                    f"; retried for {limit:g} s" if limit else "")
            waited = (f"within {timeout:g} s" if not wait_s else
                      f"for {wait_s:g} s (tracking.connect_timeout_s={wait_s:g}: how long a job waits for it)")
            return f"MLflow tracking server {shown} does not answer {waited} ({reason})"
        if said is None or time.monotonic() - said >= PROGRESS_EVERY_S:
            what = f"is not working: {reason}" if half else f"does not answer ({reason})"
            print(f"MLflow tracking server {shown} {what}; retrying for up to {left:.0f} s more", file=sys.stderr,
                  flush=True)
            said = time.monotonic()
        time.sleep(min(RETRY_EVERY_S, left))
        reason, half = probe(uri, timeout)
    if said is not None:
        print(f"MLflow tracking server {shown} answers again", file=sys.stderr, flush=True)
    return None
