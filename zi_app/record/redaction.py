"""Keeping passwords out of what the app logs, prints and stores.

A tracking URI may carry credentials (``http://user:password@host:5000``, ``postgresql://user:password@db/mlflow``)
and a config may hold a password, token or key under a key that says so. Everything the app writes to MLflow
(params, tags, run names, ``config.yaml``) or prints goes through these functions first; the MLflow client
itself still receives the real values. Cheap to import: no MLflow, no torch.
"""

from __future__ import annotations

import re
import urllib.parse
from typing import Any

MASK = "***"
# The password part of a URL's userinfo, scheme://user:PASSWORD@host, also as Hydra writes it in a job's
# overrides (``http\://user\:PASSWORD@host``).
_URL_PASSWORD = re.compile(r"(?P<head>\b[a-zA-Z][\w+.-]*\\?://[^\s/:@\\]*\\?:)(?P<password>[^\s/@]+)(?=@)")
# Keys whose value is a secret whatever it looks like (matched against the last part of a dotted key).
_SECRET_KEY = re.compile(r"(password|passwd|secret|token|api[_-]?key|credential)", re.IGNORECASE)


def redact_text(text: str) -> str:
    """``text`` with the password of every URL in it replaced by ``***`` (user and host kept)."""
    return _URL_PASSWORD.sub(lambda m: m.group("head") + MASK, text)


def secret_key(key: str) -> bool:
    """Whether a (dotted) config key names a secret: its last part says password, token, secret, key..."""
    return bool(_SECRET_KEY.search(str(key).rsplit(".", 1)[-1]))


def redact(value: Any, key: str = "") -> Any:
    """A copy of a config tree (dicts, lists, scalars) with secrets masked: the value of a key naming a
    secret, and the password of any URL in a string."""
    if isinstance(value, dict):
        return {k: redact(v, str(k)) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [redact(v, key) for v in value]
    if key and secret_key(key) and value not in (None, ""):
        return MASK
    return redact_text(value) if isinstance(value, str) else value


def redact_overrides(overrides: str) -> str:
    """Hydra overrides (``key=value`` separated by spaces) with secret values masked."""
    items = []
    for item in overrides.split():
        key, sep, value = item.partition("=")
        items.append(f"{key}={MASK}" if sep and secret_key(key.lstrip("+~")) else redact_text(item))
    return " ".join(items)


def public_url(uri: str) -> str:
    """A URL without its userinfo, to print as a link (credentials then come from the browser or the env)."""
    parts = urllib.parse.urlsplit(uri)
    if not parts.scheme or "@" not in parts.netloc:
        return uri
    return urllib.parse.urlunsplit(parts._replace(netloc=parts.netloc.rsplit("@", 1)[1]))
