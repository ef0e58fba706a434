"""The old module path of :class:`BaseDiffusionModel`, kept so base models registered before the move still load.

MLflow pickles a pyfunc model's class by its module path: every ``defectsynth-base-tiny`` version logged before
the diffusion core moved to :mod:`defectsynth.diffusion` names this module, and ``jobs.pretrain`` reuses such a
version when its digest matches. New versions name :mod:`defectsynth.diffusion.tracking`.
"""

from defectsynth.diffusion.tracking import BaseDiffusionModel

__all__ = ["BaseDiffusionModel"]
