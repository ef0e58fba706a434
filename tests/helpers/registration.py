"""Registering a test generator in this process's generator registry, for one block."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from defectsynth.generators.registry import REGISTRY


@contextmanager
def registered_as(name: str, target: str) -> Iterator[None]:
    """``name`` -> ``target`` ("module:Class") in the registry for the duration of the block."""
    REGISTRY[name] = target
    try:
        yield
    finally:
        REGISTRY.pop(name, None)
