"""The demo product catalogue: each product's kind, defect types and normal renderer."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import numpy as np

from defectsynth.storage.demo.objects import render_pill, render_washer
from defectsynth.storage.demo.scene import Scene
from defectsynth.storage.demo.textures import render_fabric, render_wood

Renderer = Callable[[np.random.Generator, int], Scene]


@dataclass(frozen=True)
class DemoProduct:
    """A procedural demo product: a texture (defects anywhere) or an object (defects on its foreground)."""

    name: str
    kind: Literal["texture", "object"]
    defect_types: tuple[str, ...]


DEMO_PRODUCTS: dict[str, DemoProduct] = {
    "fabric": DemoProduct("fabric", "texture", ("hole", "contamination", "discoloration", "scratch")),
    "wood": DemoProduct("wood", "texture", ("scratch", "crack", "hole", "contamination", "discoloration")),
    "washer": DemoProduct("washer", "object", ("scratch", "crack", "contamination", "discoloration", "missing_piece")),
    "pill": DemoProduct("pill", "object", ("crack", "contamination", "discoloration", "missing_piece", "scratch")),
}

RENDERERS: dict[str, Renderer] = {
    "fabric": render_fabric,
    "wood": render_wood,
    "washer": render_washer,
    "pill": render_pill,
}
