"""Keeping passwords out of what the app logs, prints and stores.

A tracking URI may carry credentials (``http://user:password@host:5000``, ``postgresql://user:password@db/mlflow``)
and a config may hold a password, token or key under a key that says so. Everything the app writes to MLflow
(params, tags, run names, ``config.yaml``) or prints goes through these functions first; the MLflow client
itself still receives the real values. Cheap to import: no MLflow, no torch.
"""

from __future__ import annotations

import re
import urllib.parse
from pathlib import Path
from typing import Any, List, Sequence, Tuple

MASK = "***"
# The password part of a URL's userinfo, scheme://user:PASSWORD@host, also as Hydra writes it in a job's
# overrides (``http\://user\:PASSWORD@host``, a space escaped as ``\ ``). Greedy up to the last ``@`` before
# the path: a host never holds one, a password may (``p@ss``, unescaped in Hydra's overrides).
_URL_PASSWORD = re.compile(r"(?P<head>\b[a-zA-Z][\w+.-]*\\?://[^\s/:@\\]*\\?:)(?P<password>(?:\\.|[^\s/\\])+)(?=@)")
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


def redact_override(override: str) -> str:
    """One Hydra override (``key=value``) with its value masked where the key names a secret (all of it,
    spaces included), else with the password of any URL in it masked."""
    key, sep, value = override.partition("=")
    return f"{key}={MASK}" if sep and value and secret_key(key.lstrip("+~")) else redact_text(override)


def redact_overrides(overrides: Sequence[str]) -> str:
    """A job's Hydra overrides, each masked by :func:`redact_override`, joined by spaces as a run's tag
    and its output show them."""
    return " ".join(redact_override(override) for override in overrides)


class SecretError(ValueError):
    """A password or other secret in a config value or an override, refused before Hydra writes it."""


def _secret_values(value: Any, key: str = "") -> List[str]:
    """The secrets a config value holds: all of it under a secret-named key, else any URL's password."""
    if key and secret_key(key) and value not in (None, ""):
        return [str(value)]
    return [m.group("password") for m in _URL_PASSWORD.finditer(value)] if isinstance(value, str) else []


def _leaves(tree: Any, prefix: str = "") -> List[Tuple[str, Any]]:
    """``(dotted key, value)`` for every scalar of a config tree (list items keyed by their index)."""
    if isinstance(tree, dict):
        return [leaf for k, v in tree.items() for leaf in _leaves(v, f"{prefix}{k}.")]
    if isinstance(tree, (list, tuple)):
        return [leaf for i, v in enumerate(tree) for leaf in _leaves(v, f"{prefix}{i}.")]
    return [(prefix.rstrip("."), tree)]


def find_secrets(config: Any, overrides: Sequence[str] = ()) -> List[Tuple[str, str]]:
    """Every secret in a job's config tree and its overrides (a sweep's overrides hold values the composed
    config does not): ``(where, secret)``, ``where`` being the ``key=value`` it sits in, masked."""
    found = []
    for override in overrides:
        key, _, value = override.partition("=")
        secrets = [value] if value and secret_key(key.lstrip("+~")) else _secret_values(override)
        found += [(redact_override(override), secret) for secret in secrets]
    for key, value in _leaves(config):
        found += [(f"{key}={redact(value, key)}", secret) for secret in _secret_values(value, key)]
    return found


def refuse_secrets(config: Any, overrides: Sequence[str] = ()) -> None:
    """Raise :class:`SecretError`, naming the first secret's key and what to do instead, when the config or
    the overrides hold a password, token or other secret: Hydra writes every value and override to the job's
    ``.hydra/`` files and ``multirun.yaml``, launchers print them and pickle them, so none may hold one."""
    found = find_secrets(config, overrides)
    if found:
        raise SecretError(
            f"{found[0][0]}: a password or other secret in a config value or an override is not allowed (Hydra "
            f"writes them to the job's files and launchers print them); pass the tracking server's credentials "
            f"in the environment instead, MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD (or "
            f"MLFLOW_TRACKING_TOKEN), which MLflow reads, with a URI without them (http://host:5000)")


def scrub_files(folder: Path, secrets: Sequence[str]) -> None:
    """Replace every occurrence of ``secrets`` in the files under ``folder`` by ``***`` (what Hydra wrote
    before the app could refuse them)."""
    if not secrets:
        return
    for path in (p for p in folder.rglob("*") if p.is_file()):
        text = path.read_text(errors="surrogateescape")
        scrubbed = text
        for secret in secrets:
            scrubbed = scrubbed.replace(secret, MASK)
        if scrubbed != text:
            path.write_text(scrubbed, errors="surrogateescape")


def public_url(uri: str) -> str:
    """A URL without its userinfo, to print as a link (credentials then come from the browser or the env)."""
    parts = urllib.parse.urlsplit(uri)
    if not parts.scheme or "@" not in parts.netloc:
        return uri
    return urllib.parse.urlunsplit(parts._replace(netloc=parts.netloc.rsplit("@", 1)[1]))
