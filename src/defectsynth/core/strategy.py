"""How a model trains across workers (config section ``<job>.distributed``): light, no torch import."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from defectsynth.core.config_section import ConfigSection


class StrategyConfig(ConfigSection):
    """How a model trains across workers."""

    strategy: Literal["deepspeed", "ddp"] = "deepspeed"
    zero_stage: Literal[0, 1, 2] = Field(1, description="DeepSpeed ZeRO stage")
    bf16: bool | None = Field(None, description="None: bf16 exactly when training on a GPU")
    gradient_clipping: float = Field(1.0, ge=0.0)
