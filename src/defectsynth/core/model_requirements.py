"""What every model logged to MLflow records as its requirements: this package's pinned dependencies."""

from __future__ import annotations

import importlib.metadata


def package_requirements() -> list[str]:
    """The package's pinned runtime requirements, recorded with every logged model."""
    requires = importlib.metadata.requires("defectsynth") or []
    return [r for r in requires if "extra ==" not in r]
