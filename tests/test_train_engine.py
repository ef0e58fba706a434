"""TrainEngine: precise BatchNorm statistics, weight snapshots, and a schedule's rate under DeepSpeed too."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from torch import nn

from defectsynth.core.strategy import StrategyConfig
from defectsynth.core.train_engine import TrainEngine
from helpers.servers import free_port


def _engine(model: nn.Module) -> TrainEngine:
    return TrainEngine(model, torch.optim.SGD(model.parameters(), lr=0.1), StrategyConfig(), micro_batch_size=4)


def test_recompute_batch_norm_sets_the_plain_average_over_the_batches() -> None:
    norm = nn.BatchNorm2d(3, momentum=0.1)
    model = nn.Sequential(nn.Identity(), norm).eval()
    engine = _engine(model)
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randn(4, 3, 5, 5, generator=gen) * (i + 1) + i for i in range(3)]

    assert engine.recompute_batch_norm((b,) for b in batches) == 1

    means = torch.stack([b.mean(dim=(0, 2, 3)) for b in batches]).mean(0)
    variances = torch.stack([b.transpose(0, 1).reshape(3, -1).var(dim=1) for b in batches]).mean(0)
    torch.testing.assert_close(norm.running_mean, means)
    torch.testing.assert_close(norm.running_var, variances)
    assert norm.momentum == 0.1, "the layer's own momentum is restored"
    assert not model.training, "the module's mode is restored"


def test_recompute_batch_norm_leaves_a_model_without_batch_norm_alone() -> None:
    model = nn.Conv2d(3, 2, 3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    batches = iter([(torch.randn(2, 3, 8, 8),)])

    assert _engine(model).recompute_batch_norm(batches) == 0

    assert next(batches, None) is not None, "no batch was drawn for a model without BatchNorm"
    for name, value in model.state_dict().items():
        torch.testing.assert_close(value, before[name])


def test_recompute_batch_norm_without_batches_keeps_the_running_statistics() -> None:
    # evaluate.batch_norm_batches = 0 means "off": the running averages stay, not reset to mean 0, variance 1
    norm = nn.BatchNorm2d(3)
    model = nn.Sequential(nn.Identity(), norm).train()
    model(torch.randn(4, 3, 5, 5) + 2.0)
    before = {k: v.clone() for k, v in norm.state_dict().items()}

    assert _engine(model).recompute_batch_norm(iter([])) == 0

    for name, value in norm.state_dict().items():
        torch.testing.assert_close(value, before[name])


def test_state_dict_is_a_snapshot_that_later_steps_leave_alone() -> None:
    model = nn.Linear(3, 1)
    engine = _engine(model)
    snapshot = engine.state_dict()
    kept = {k: v.clone() for k, v in snapshot.items()}

    engine.step(model(torch.ones(2, 3)).sum())

    assert not torch.equal(model.weight.detach(), kept["weight"]), "the step changed the weights"
    for name, value in snapshot.items():
        torch.testing.assert_close(value, kept[name])


def test_scale_learning_rate_scales_the_step_from_the_rate_the_engine_was_built_with() -> None:
    moves = []
    for factor in (1.0, 0.2, 0.2):  # the same factor twice: scaled from the built rate, not compounded
        model = nn.Linear(3, 1, bias=False)
        torch.nn.init.zeros_(model.weight)
        engine = _engine(model)
        engine.scale_learning_rate(factor)
        engine.step(model(torch.ones(2, 3)).sum())
        moves.append(float(model.weight.detach().abs().mean()))
    assert moves[1] == pytest.approx(0.2 * moves[0]) and moves[2] == moves[1] and moves[0] > 0


DEEPSPEED_STEP = """
import os, sys, torch
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[1], LOCAL_RANK="0", RANK="0", WORLD_SIZE="1")
torch.distributed.init_process_group("gloo", rank=0, world_size=1)
from defectsynth.core.strategy import StrategyConfig
from defectsynth.core.train_engine import TrainEngine
for factor in (1.0, 0.2):
    model = torch.nn.Linear(3, 1, bias=False)
    torch.nn.init.zeros_(model.weight)
    engine = TrainEngine(model, torch.optim.SGD(model.parameters(), lr=0.1),
                         StrategyConfig(strategy="deepspeed", zero_stage=1, gradient_clipping=0), micro_batch_size=2)
    engine.scale_learning_rate(factor)
    engine.step(engine(torch.ones(2, 3)).sum())
    print("moved", float(engine.module.weight.detach().abs().mean()))
"""


@pytest.mark.integration
def test_scale_learning_rate_reaches_the_optimizer_deepspeed_wraps() -> None:
    run = subprocess.run(
        [sys.executable, "-c", DEEPSPEED_STEP, str(free_port())], capture_output=True, text=True, timeout=300
    )
    assert run.returncode == 0, run.stderr[-3000:]
    full, scaled = (float(line.split()[1]) for line in run.stdout.splitlines() if line.startswith("moved"))
    assert scaled == pytest.approx(0.2 * full) and full > 0
