"""The base of every config section: unknown keys are errors and defaults are validated too."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class ConfigSection(BaseModel):
    """A section of the run config; a misspelt key is an error, not silently ignored."""

    model_config = ConfigDict(extra="forbid", validate_default=True)
