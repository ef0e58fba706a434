"""Procedural demo products (fabric, wood, washer, pill) with exact defect masks, written in MVTec AD layout.

Each image is rendered from its own RNG seeded by (seed, product, split, defect type, index), so trees are
reproducible byte for byte; every defect mask covers its changed pixels and nothing else.
"""

from defectsynth.storage.demo.products import DEMO_PRODUCTS, DemoProduct
from defectsynth.storage.demo.sample import DemoSample, render_sample
from defectsynth.storage.demo.sheet import contact_sheet
from defectsynth.storage.demo.writer import write_demo

__all__ = ["DEMO_PRODUCTS", "DemoProduct", "DemoSample", "contact_sheet", "render_sample", "write_demo"]
