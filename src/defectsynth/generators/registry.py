"""Method name -> generator class, as import strings: the one place a new method is added.

Imported lazily (``generators.base.generator_class``) so a baseline run never imports diffusers.
"""

from __future__ import annotations

REGISTRY: dict[str, str] = {
    "perlin": "defectsynth.generators.perlin:PerlinGenerator",
    "croppaste": "defectsynth.generators.croppaste:CropPasteGenerator",
    "anomalydiffusion": "defectsynth.generators.anomalydiffusion.generator:AnomalyDiffusionGenerator",
    "seas": "defectsynth.generators.seas.generator:SeaSGenerator",
    "cadiff": "defectsynth.generators.cadiff.generator:CADiffGenerator",
    "badg": "defectsynth.generators.badg.generator:BADGGenerator",
}
