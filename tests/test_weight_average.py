"""WeightAverage: the warmed-up exponential average, swapping it in and out, and resuming it."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from defectsynth.core.weight_average import WeightAverage


def _set(model: nn.Linear, value: float) -> None:
    with torch.no_grad():
        model.weight.fill_(value)
        model.bias.fill_(value)


def test_the_average_follows_the_warmed_up_decay() -> None:
    model = nn.Linear(2, 1)
    _set(model, 0.0)
    average = WeightAverage(model, decay=0.9)
    expected = 0.0
    for step, value in enumerate([1.0, 2.0, 3.0, 4.0]):
        _set(model, value)
        average.update()
        decay = min(0.9, (1 + step) / (10 + step))  # 0.1, 0.18, 0.25, 0.31: early weights do not linger
        expected = decay * expected + (1 - decay) * value

    torch.testing.assert_close(average.average["weight"], torch.full((1, 2), expected))
    assert expected > 2.5, "four updates already lean to the recent weights"


def test_swapped_in_holds_the_average_and_gives_the_live_weights_back() -> None:
    model = nn.Linear(2, 1)
    _set(model, 0.0)
    average = WeightAverage(model, decay=0.5)
    _set(model, 4.0)

    with average.swapped_in():
        assert torch.all(model.weight == 0.0), "the average never updated is the starting weights"
    assert torch.all(model.weight == 4.0)

    failure = "validation failed"
    with pytest.raises(RuntimeError, match=failure), average.swapped_in():
        raise RuntimeError(failure)
    assert torch.all(model.weight == 4.0), "the live weights come back when the block raises"


def test_a_resumed_average_continues_as_the_uninterrupted_one() -> None:
    gen = torch.Generator().manual_seed(0)
    values = torch.randn(6, generator=gen).tolist()
    model = nn.Linear(2, 1)
    _set(model, 0.0)
    whole = WeightAverage(model, decay=0.8)
    for value in values:
        _set(model, value)
        whole.update()

    model = nn.Linear(2, 1)
    _set(model, 0.0)
    first = WeightAverage(model, decay=0.8)
    for value in values[:3]:
        _set(model, value)
        first.update()
    resumed = WeightAverage(model, decay=0.8)
    resumed.load_state_dict(first.state_dict())
    for value in values[3:]:
        _set(model, value)
        resumed.update()

    for name, value in whole.average.items():
        torch.testing.assert_close(resumed.average[name], value)


@pytest.mark.parametrize("decay", [0.0, 1.0, -0.5])
def test_a_decay_outside_the_open_unit_interval_is_refused(decay: float) -> None:
    with pytest.raises(ValueError, match="decay"):
        WeightAverage(nn.Linear(2, 1), decay)
