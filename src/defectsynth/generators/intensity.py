"""Intensity: the control value a method turns (CADiff's attention weight w, Perlin's opacity).

A method declares an ``IntensityControl`` as its ``intensity`` class attribute: what the value means, the
domain it lies in, and its default draw (used when a run sets no ``generate.intensity``). A method without
a control value declares None. ``generate.intensity`` is a range (``{low: 0.5, high: 1.5}``, drawn
uniformly per request) or a list of values (``[0.5, 1.0, 1.5]``, request ``i`` takes value ``i mod n``,
so each level gets an equal share); ``IntensityControl.check`` validates it against the method's domain.

Example:
    >>> w = IntensityControl(meaning="attention weight w", low=-2.0, high=2.0, default=(0.5, 1.5))
    >>> w.describe()
    '[-2.0, 2.0]'
    >>> w.check(IntensityRange(low=0.5, high=3.0), method="cadiff")
    Traceback (most recent call last):
    ...
    ValueError: generate.intensity: 3.0 is outside cadiff's attention weight w domain [-2.0, 2.0]
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from pydantic import BaseModel, ConfigDict, model_validator

DECIMALS = 4  # drawn intensities are rounded, so they read well in metadata and keys


class IntensityRange(BaseModel):
    """``generate.intensity`` as a range: each request draws its value uniformly from [low, high]."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    low: float
    high: float

    @model_validator(mode="after")
    def _ordered(self) -> IntensityRange:
        if self.low > self.high:
            msg = f"intensity range needs low <= high, got low={self.low}, high={self.high}"
            raise ValueError(msg)
        return self


IntensitySetting = IntensityRange | list[float]  # the type of ``generate.intensity`` (None: the method's default)


def setting_values(setting: IntensitySetting) -> list[float]:
    """The values a setting can produce that bound it: a range's ends, or every listed value."""
    return [setting.low, setting.high] if isinstance(setting, IntensityRange) else list(setting)


def draw_from_setting(setting: IntensitySetting, index: int, rng: np.random.Generator) -> float:
    """Request ``index``'s intensity: uniform in a range (from ``rng``), or the list's value ``index mod n``."""
    if isinstance(setting, IntensityRange):
        return round(float(rng.uniform(setting.low, setting.high)), DECIMALS)
    if not setting:
        msg = "generate.intensity: an empty list gives no value to draw"
        raise ValueError(msg)
    return float(setting[index % len(setting)])


@dataclass(frozen=True)
class IntensityControl:
    """A method's intensity: what it means, its domain [low, high] (``low_open``: (low, high]), its default draw.

    ``default`` is the range the method draws from, uniformly, when a request carries no intensity.
    """

    meaning: str
    low: float
    high: float
    default: tuple[float, float]
    low_open: bool = False

    def __post_init__(self) -> None:
        low, high = self.default
        if not (self.contains(low) and self.contains(high) and low <= high):
            msg = f"{self.meaning}: default draw {self.default} must be an ordered range inside {self.describe()}"
            raise ValueError(msg)

    def contains(self, value: float) -> bool:
        """Whether ``value`` lies in the domain."""
        above = value > self.low if self.low_open else value >= self.low
        return bool(np.isfinite(value)) and above and value <= self.high

    def describe(self) -> str:
        """The domain in interval notation, e.g. ``(0.0, 1.0]``."""
        return f"{'(' if self.low_open else '['}{self.low}, {self.high}]"

    def check(self, setting: IntensitySetting, *, method: str) -> None:
        """Raise ValueError naming the first value of ``setting`` outside the domain, and the domain."""
        for value in setting_values(setting):
            if not self.contains(value):
                msg = f"generate.intensity: {value} is outside {method}'s {self.meaning} domain {self.describe()}"
                raise ValueError(msg)

    def check_value(self, value: float, *, method: str) -> float:
        """``value`` when it lies in the domain; else ValueError naming it, the method and the domain."""
        if not self.contains(value):
            msg = f"{method}: intensity ({self.meaning}) {value} is outside its domain {self.describe()}"
            raise ValueError(msg)
        return value

    def draw_default(self, rng: np.random.Generator) -> float:
        """A value from the default draw, uniform over ``default``."""
        return float(rng.uniform(*self.default))
