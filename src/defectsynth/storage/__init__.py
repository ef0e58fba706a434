"""Datasets in, datasets out: layout readers, the few-shot split, demo products, shards and streaming.

``defectsynth.storage.stream`` (the streaming reader, in ``storage.streaming``) is imported on first
use, so reading a layout or writing a shard never imports torch.
"""

from __future__ import annotations

from typing import Any

__all__ = ["stream"]


def __getattr__(name: str) -> Any:
    if name == "stream":
        from defectsynth.storage.streaming import stream

        return stream
    msg = f"module 'defectsynth.storage' has no attribute {name!r}"
    raise AttributeError(msg)
