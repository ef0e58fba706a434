"""Credentials kept out of logs and written files: URI passwords and secret query values become ``***``.

A tracking URI such as ``postgresql://mlflow:pa55@db/mlflow`` or a dataset URI such as
``s3://KEY:SECRET@bucket/data?session_token=...`` is redacted wherever the platform logs or writes it
(the resolved config, the dataset card, MLflow params, log lines); the process itself keeps the real one.

Example:
    >>> redact("postgresql://mlflow:pa55@db:5432/mlflow")
    'postgresql://mlflow:***@db:5432/mlflow'
    >>> redact("s3://bucket/data?endpoint_override=http://minio:9000&secret_key=abc")
    's3://bucket/data?endpoint_override=http://minio:9000&secret_key=***'
"""

from __future__ import annotations

import re
from typing import Any

MASK = "***"
# scheme://user:password@ or scheme://token@, anywhere in a text; the user name is kept when there is one.
_USERINFO = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)(?P<user>[^\s/@?#:]*)(?P<password>:[^\s/@?#]*)?@")
# ?name=value or &name=value where the name says it holds a secret.
_SECRET_QUERY = re.compile(
    r"(?P<name>[?&][^=&\s#]*(?:password|passwd|secret|token|key|signature|credential|sig)[^=&\s#]*=)[^&\s#]*",
    re.IGNORECASE,
)


def _userinfo(match: re.Match[str]) -> str:
    if match["password"] is None:  # scheme://token@host: the whole user part may be the secret
        return f"{match['scheme']}{MASK}@" if match["user"] else match[0]
    return f"{match['scheme']}{match['user']}:{MASK}@"


def redact(text: str) -> str:
    """``text`` with every URI's password (or token user part) and secret query values replaced by ``***``."""
    if "://" not in text and "=" not in text:
        return text
    return _SECRET_QUERY.sub(lambda m: f"{m['name']}{MASK}", _USERINFO.sub(_userinfo, text))


def redact_tree(value: Any) -> Any:
    """A copy of a JSON-like tree (dicts, lists, strings) with ``redact`` applied to every string."""
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, dict):
        return {key: redact_tree(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [redact_tree(item) for item in value]
    return value
