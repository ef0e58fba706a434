"""Diffusion base models in the MLflow registry: logged as pyfunc models wrapping a diffusers directory.

The tiny base trained by ``jobs.pretrain`` is registered as ``defectsynth-base-tiny``; generators
load it with ``factory.load_base_model(uri)``, which accepts a ``models:/`` URI or a local path (a
Stable Diffusion directory or single file, given as ``diffusion.base_model``). As a pyfunc model it also
serves prompts: ``predict`` on a DataFrame with a ``prompt`` column (and optional ``seed``) returns
one RGB uint8 image per row.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
from mlflow.models import ModelSignature
from mlflow.types import ColSpec, DataType, Schema, TensorSpec

from defectsynth.diffusion.model import DiffusionModel

logger = logging.getLogger(__name__)

BASE_TINY = "defectsynth-base-tiny"
MODEL_ARTIFACT = "diffusion_model"
PREVIEW_STEPS = 25
MODEL_CODE = Path(__file__).with_name("base_model_code.py")


class BaseDiffusionModel(mlflow.pyfunc.PythonModel):
    """A diffusion base model as an MLflow pyfunc: the diffusers directory is its artifact."""

    model: DiffusionModel

    def load_context(self, context: mlflow.pyfunc.PythonModelContext) -> None:
        """Load the diffusers directory."""
        self.model = DiffusionModel.load(Path(context.artifacts[MODEL_ARTIFACT]))

    def predict(self, context: Any, model_input: pd.DataFrame, params: dict | None = None) -> list[np.ndarray]:
        """Prompts in, images out: ``PREVIEW_STEPS`` DDIM steps with guidance 3 from each row's seed."""
        from defectsynth.diffusion.preview import sample_prompts

        seeds = model_input["seed"].tolist() if "seed" in model_input else list(range(len(model_input)))
        return sample_prompts(self.model, model_input["prompt"].tolist(), seeds, steps=PREVIEW_STEPS)


def log_base_model(directory: Path, **tags: str) -> str:
    """Log a diffusers directory as a pyfunc model in the active run; returns its model URI."""
    from defectsynth.core.pyfunc_logging import log_pyfunc_model

    return log_pyfunc_model("base_model", MODEL_CODE, {MODEL_ARTIFACT: str(directory)}, dict(tags), prompt_signature())


def prompt_signature() -> ModelSignature:
    """The pyfunc's signature: ``prompt`` (and an optional ``seed``) rows in, one H x W x 3 uint8 image per row out."""
    inputs = Schema([ColSpec(DataType.string, "prompt"), ColSpec(DataType.long, "seed", required=False)])
    return ModelSignature(inputs=inputs, outputs=Schema([TensorSpec(np.dtype(np.uint8), (-1, -1, 3))]))
