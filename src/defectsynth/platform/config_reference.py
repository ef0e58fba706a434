"""The configuration reference, generated from the pydantic models: every key, its type, default and meaning.

``defectsynth config reference`` prints it; ``docs/configuration.md`` is its output, and a test fails
when the two differ, so the document follows the code. Each generator's ``Settings`` (the keys under
``generators.<method>``) is listed after the run's own sections.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any, get_args

from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from defectsynth.generators.base import generator_class
from defectsynth.generators.registry import REGISTRY
from defectsynth.platform.config import Config

HEADER = ["key", "type", "default", "description"]


def _section_model(annotation: Any) -> type[BaseModel] | None:
    """The model a field holds as a section (``X`` or ``X | None``), or None for a plain value."""
    candidates = [annotation, *get_args(annotation)]
    models = [c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)]
    return models[0] if len(models) == 1 else None


def _type_name(annotation: Any) -> str:
    text = annotation.__name__ if isinstance(annotation, type) else str(annotation)
    text = re.sub(r"\b(?:typing|pathlib|collections\.abc|defectsynth(?:\.\w+)*)\.", "", text)
    return text.replace("NoneType", "None")


def _default(info: FieldInfo) -> str:
    if info.default_factory is not None:
        value = info.default_factory()  # type: ignore[call-arg]
        return "" if isinstance(value, BaseModel) else repr(value)
    if info.default is PydanticUndefined:
        return "required"
    return repr(str(info.default) if isinstance(info.default, Path) else info.default)


def _cell(text: str) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")


def field_rows(model: type[BaseModel], prefix: str = "") -> Iterator[list[str]]:
    """``[key, type, default, description]`` of every field of ``model``, sections expanded under their key."""
    for name, info in model.model_fields.items():
        key, section = f"{prefix}{name}", _section_model(info.annotation)
        if section is not None and section is not model:
            optional = type(None) in get_args(info.annotation)
            summary = (info.description or section.__doc__ or "").strip().splitlines()[0]
            yield [key, "section" + (" or None" if optional else ""), _default(info), summary]
            yield from field_rows(section, f"{key}.")
        else:
            yield [key, _type_name(info.annotation), _default(info), info.description or ""]


def _table(rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    return lines + ["| " + " | ".join(f"`{r[0]}`" if i == 0 else _cell(r[i]) for i in range(4)) + " |" for r in rows]


def config_reference() -> str:
    """The Markdown reference of ``Config`` and of every registered generator's settings."""
    lines = [
        "# Configuration reference",
        "",
        "Generated from the pydantic models by `defectsynth config reference` (a test checks that this file is",
        "current). Keys are dotted paths as `--set` takes them; `required` keys have no default; an empty default",
        "is a section whose keys follow.",
        "",
        "## The run (`Config`)",
        "",
        *_table(list(field_rows(Config))),
    ]
    for method in sorted(m for m, target in REGISTRY.items() if target.startswith("defectsynth.")):  # not tests'
        settings = generator_class(method).Settings
        rows = [[f"generators.{method}.{r[0]}", *r[1:]] for r in field_rows(settings)]
        lines += ["", f"## `generators.{method}`", "", *(_table(rows) if rows else ["No settings."])]
    return "\n".join(lines) + "\n"
