"""The code MLflow stores with each registered generator ("models from code"), in place of a pickled object.

MLflow runs this file when it loads the model: it builds a ``GeneratorModel``, whose ``load_context``
reads the method and settings from the model config and the weights (safetensors, or tensors read with
``torch.load(weights_only=True)``) from the artifacts. Nothing in a registered generator is unpickled.
"""

import mlflow

from defectsynth.platform.tracking import GeneratorModel

mlflow.models.set_model(GeneratorModel())
