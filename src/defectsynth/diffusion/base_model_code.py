"""The code MLflow stores with each registered diffusion base ("models from code"), in place of a pickled object.

MLflow runs this file when it loads the base: ``BaseDiffusionModel.load_context`` reads the diffusers
directory (safetensors) from the artifacts. Nothing in a registered base is unpickled.
"""

import mlflow

from defectsynth.diffusion.tracking import BaseDiffusionModel

mlflow.models.set_model(BaseDiffusionModel())
