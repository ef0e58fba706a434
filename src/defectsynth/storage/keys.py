"""Sample keys: derived from the generation request, so a re-run of the same request has the same key.

A key is also a tar member prefix (``<key>.png``), so it must be a plain name: webdataset splits a
member name at its first dot, and ``..``, a leading ``/`` or NUL would escape or corrupt the tree.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from typing import Any

KEY_PATTERN = re.compile(r"[A-Za-z0-9_-]+")
DIGEST_CHARS = 20


def check_key(key: str) -> str:
    """Return ``key`` if it is a safe sample key, else raise ValueError naming it and the problem."""
    if not isinstance(key, str) or not key:
        msg = f"sample key {key!r} is empty or not a string"
        raise ValueError(msg)
    problems = [
        ("\x00" in key, "contains NUL"),
        (key.startswith("/"), "starts with '/'"),
        (".." in key, "contains '..'"),
        (KEY_PATTERN.fullmatch(key) is None, "may only hold letters, digits, '_' and '-'"),
    ]
    for failed, problem in problems:
        if failed:
            msg = f"sample key {key!r} refused: {problem}"
            raise ValueError(msg)
    return key


def check_member_name(name: str) -> str:
    """Return a tar member name if it is ``<safe key>.<extension>``, else raise ValueError naming it."""
    if "\x00" in name or name.startswith("/") or ".." in name.split(".", 1)[0] or "/" in name:
        msg = f"tar member name {name!r} refused: NUL, '/', or '..' in the key"
        raise ValueError(msg)
    key, dot, extension = name.partition(".")
    if not dot or not extension:
        msg = f"tar member name {name!r} refused: expected <key>.<extension>"
        raise ValueError(msg)
    check_key(key)
    return name


def slug(text: str) -> str:
    """A key-safe rendering of a name: runs of other characters become one '-'."""
    return re.sub(r"[^A-Za-z0-9_]+", "-", text).strip("-") or "x"


def canonical_json(value: Any) -> str:
    """JSON with sorted keys and no spaces, the form digests are taken over."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)


def short_digest(value: Any, chars: int = 16) -> str:
    """The first ``chars`` hex digits of the sha256 of ``value``'s canonical JSON: a settings or data fingerprint."""
    return hashlib.sha256(canonical_json(value).encode()).hexdigest()[:chars]


def derive_key(product: str, method: str, defect_type: str, request: Mapping[str, Any]) -> str:
    """``<product>_<defect_type>_<digest>``: the digest covers every request field, method included.

    Example:
        >>> derive_key("wood", "perlin", "crack", {"seed": 1, "sample_index": 0})
        'wood_crack_d00475b1bd185bcd3927'
    """
    payload = {"product": product, "method": method, "defect_type": defect_type, **request}
    digest = hashlib.sha256(canonical_json(payload).encode()).hexdigest()[:DIGEST_CHARS]
    return check_key(f"{slug(product)}_{slug(defect_type)}_{digest}")
