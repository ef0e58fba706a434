"""The registry as a person reads it: every version with its aliases and scores, one version in full, an alias moved.

Backs ``defectsynth models list|describe|promote``. Scores are the ``eval.<metric>`` tags the evaluate job
writes on a version (the mean over detector seeds); ``promote`` moves an alias (``champion`` by default)
by hand, where the evaluate job moves it only when a version beats the champion.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from defectsynth.core.text_table import table
from defectsynth.core.tracking_errors import is_not_found
from defectsynth.platform.tracking import CHAMPION, registry_uri, resolve_version

MODEL_PREFIX = "defectsynth-"
SCORE_PREFIX = "eval."


@dataclass(frozen=True)
class VersionSummary:
    """One registered version: what ``models list`` prints."""

    name: str
    version: str
    aliases: list[str]
    product: str
    method: str
    scores: dict[str, float] = field(default_factory=dict)


def _summary(version: Any) -> VersionSummary:
    tags = version.tags or {}
    scores = {k.removeprefix(SCORE_PREFIX): float(v) for k, v in tags.items() if k.startswith(SCORE_PREFIX)}
    return VersionSummary(
        name=version.name,
        version=str(version.version),
        aliases=sorted(getattr(version, "aliases", []) or []),
        product=tags.get("product", "-"),
        method=tags.get("method", "-"),
        scores=scores,
    )


def list_versions(client: MlflowClient, product: str | None = None, method: str | None = None) -> list[VersionSummary]:
    """Every version of every ``defectsynth-*`` model, filtered by product and method, by name then version."""
    rows = []
    for version in client.search_model_versions(f"name LIKE '{MODEL_PREFIX}%'"):
        summary = _summary(client.get_model_version(version.name, version.version))  # search omits aliases
        if (product is None or summary.product == product) and (method is None or summary.method == method):
            rows.append(summary)
    return sorted(rows, key=lambda r: (r.name, int(r.version)))


def versions_table(rows: list[VersionSummary], metric: str) -> str:
    """A text table of the versions: name, version, aliases, product, method, ``metric`` and the other scores."""
    body = [
        [
            r.name,
            r.version,
            ",".join(r.aliases) or "-",
            r.product,
            r.method,
            f"{r.scores[metric]:.4f}" if metric in r.scores else "-",
            " ".join(f"{k}={v:.3f}" for k, v in sorted(r.scores.items()) if k != metric) or "-",
        ]
        for r in rows
    ]
    return table(["name", "version", "aliases", "product", "method", metric, "other scores"], body)


def resolve_reference(client: MlflowClient, reference: str) -> Any:
    """The version ``NAME/VERSION`` or ``NAME@ALIAS`` names (``tracking.resolve_version``); ValueError when none."""
    name, sep, rest = reference.partition("@") if "@" in reference else reference.rpartition("/")
    if not sep or not name or not rest:
        msg = f"{reference!r}: expected NAME/VERSION or NAME@ALIAS, e.g. defectsynth-wood-perlin@champion"
        raise ValueError(msg)
    return resolve_version(name, rest, client)


def describe(client: MlflowClient, reference: str) -> str:
    """One version in full: source, run, description, tags, scores and the parameters of the run that fitted it."""
    version = resolve_reference(client, reference)
    summary = _summary(version)
    lines = [
        f"{registry_uri(version.name, version.version)}  aliases: {', '.join(summary.aliases) or '-'}",
        f"  description: {version.description or '-'}",
        f"  source: {version.source}",
        f"  run: {version.run_id or '-'}",
        "  tags:",
        *(f"    {k}: {v}" for k, v in sorted((version.tags or {}).items()) if not k.startswith(SCORE_PREFIX)),
        "  scores (mean over detector seeds):",
        *(f"    {k}: {v:.4f}" for k, v in sorted(summary.scores.items())),
    ]
    if version.run_id:
        params = client.get_run(version.run_id).data.params
        lines += ["  fit parameters:", *(f"    {k}: {v}" for k, v in sorted(params.items()))]
    return "\n".join(lines)


def promote(client: MlflowClient, reference: str, alias: str = CHAMPION) -> str:
    """Point ``alias`` at the version ``reference`` names; returns a line saying what moved."""
    version = resolve_reference(client, reference)
    try:
        before = client.get_model_version_by_alias(version.name, alias).version
    except MlflowException as err:
        if not is_not_found(err):
            raise
        before = None
    client.set_registered_model_alias(version.name, alias, str(version.version))
    was = f"version {before}" if before is not None else "no version"
    return f"{version.name}@{alias}: {was} -> version {version.version}"
