"""One training engine over two strategies: DeepSpeed ZeRO or torch DDP, inside a Ray Train worker.

Both give the same three calls: ``engine(inputs)``, ``engine.step(loss)``, and ``state_dict()`` of
the unwrapped module. DeepSpeed uses the process group Ray Train already set up (gloo on CPU,
where DeepSpeed's CPU accelerator falls back to gloo without oneCCL; NCCL on GPUs), a torch
optimizer (so DeepSpeed never compiles FusedAdam), and bf16 only on GPUs unless told otherwise.
Outside a worker group (no process group) the engine trains the bare module in one process, so a
generator's ``fit`` also runs in a plain test or notebook.
"""

from __future__ import annotations

import itertools
import logging
import os
from collections.abc import Iterable, Sequence
from typing import Any

import torch

from defectsynth.core.devices import compute_device
from defectsynth.core.strategy import StrategyConfig

logger = logging.getLogger(__name__)


def deepspeed_config(cfg: StrategyConfig, micro_batch_size: int, on_gpu: bool) -> dict[str, Any]:
    """The DeepSpeed config dict for a strategy."""
    return {
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": cfg.gradient_clipping,
        "zero_optimization": {"stage": cfg.zero_stage},
        "bf16": {"enabled": on_gpu if cfg.bf16 is None else cfg.bf16},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 1 << 30,
    }


class TrainEngine:
    """A model and its optimizer under DeepSpeed or DDP; see the module docstring."""

    def __init__(
        self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, cfg: StrategyConfig, *, micro_batch_size: int
    ) -> None:
        self.cfg = cfg
        self._rate_groups = optimizer.param_groups  # the dicts DeepSpeed's and DDP's steps read the rate from
        self._base_rates = [group["lr"] for group in optimizer.param_groups]
        device = compute_device()
        self.device = device if device.type == "cuda" else None
        self.distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
        if not self.distributed:
            # Outside a Ray Train worker group (a unit test, a notebook) there is no process group for either
            # strategy to use: train the bare module in this one process, in float32.
            self._engine, self._optimizer, self.module, self.dtype = model, optimizer, model, torch.float32
            if self.device is not None:
                model.to(self.device)
        elif cfg.strategy == "deepspeed":
            os.environ.setdefault("DS_ACCELERATOR", "cuda" if self.device else "cpu")
            import deepspeed  # imported here: DS_ACCELERATOR must be set first

            self._engine, self._optimizer, _, _ = deepspeed.initialize(
                model=model,
                optimizer=optimizer,
                config=deepspeed_config(cfg, micro_batch_size, self.device is not None),
                dist_init_required=False,
            )
            self.module = self._engine.module
            self.dtype = torch.bfloat16 if self._engine.bfloat16_enabled() else torch.float32
        else:
            from ray.train.torch import prepare_model

            self._engine = prepare_model(model)
            self._optimizer = optimizer
            self.module = getattr(self._engine, "module", self._engine)
            self.dtype = torch.float32
        logger.info("training with %s (%s)", cfg.strategy, self.dtype)

    def to_device(self, tensor: torch.Tensor) -> torch.Tensor:
        """Move an input batch tensor to the engine's device and compute dtype."""
        if self.device is not None:
            tensor = tensor.to(self.device, non_blocking=True)
        return tensor.to(self.dtype) if tensor.is_floating_point() else tensor

    def __call__(self, *inputs: torch.Tensor) -> Any:
        """Forward through the wrapped module."""
        return self._engine(*inputs)

    def train(self, mode: bool = True) -> None:
        """Switch the wrapped module between training and evaluation mode."""
        self._engine.train(mode)

    def step(self, loss: torch.Tensor) -> None:
        """Backward pass and optimizer step (with clipping), synchronised across workers."""
        if self.distributed and self.cfg.strategy == "deepspeed":
            self._engine.backward(loss)
            self._engine.step()
            return
        self._optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.cfg.gradient_clipping:
            torch.nn.utils.clip_grad_norm_(self.module.parameters(), self.cfg.gradient_clipping)
        self._optimizer.step()

    def scale_learning_rate(self, factor: float) -> None:
        """Set every parameter group's rate to ``factor`` times the rate it was built with: a schedule's step."""
        for group, rate in zip(self._rate_groups, self._base_rates, strict=True):
            group["lr"] = rate * factor

    @torch.no_grad()
    def recompute_batch_norm(self, batches: Iterable[Sequence[torch.Tensor]]) -> int:
        """Replace every BatchNorm's running statistics by their plain average over ``batches`` ("precise BN").

        Running averages lag weights that move fast (Adam at 1e-3, a few hundred steps), so eval-mode maps of
        a model that trains well can be near chance; re-estimating them at the current weights fixes that.
        Across workers the estimates are averaged, so every rank keeps the same statistics. Returns how many
        BatchNorm layers were re-estimated (0: the model has none, or ``batches`` is empty, and nothing ran;
        resetting with no batch to average would leave the initial mean 0 and variance 1).
        """
        norms = [m for m in self.module.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
        batches = iter(batches)
        first = next(batches, None) if norms else None
        if first is None:
            return 0
        momenta = [m.momentum for m in norms]
        for norm in norms:
            norm.reset_running_stats()
            norm.momentum = None  # None: a cumulative average over the batches that follow
        was_training = self.module.training
        self.module.train()
        for inputs in itertools.chain([first], batches):
            self.module(*(self.to_device(t) for t in inputs))
        self.module.train(was_training)
        for norm, momentum in zip(norms, momenta, strict=True):
            norm.momentum = momentum
            if self.distributed:
                for stat in (norm.running_mean, norm.running_var):
                    torch.distributed.all_reduce(stat)
                    stat /= torch.distributed.get_world_size()
        return len(norms)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """A copy of the unwrapped module's weights, float32 on the CPU (identical on every rank after a step).

        Always a copy: ``.cpu().float()`` of a CPU float32 tensor is the live tensor itself, and a "best"
        snapshot kept that way would follow the training to its last step.
        """
        return {
            name: value.detach().to("cpu", torch.float32 if value.is_floating_point() else value.dtype, copy=True)
            for name, value in self.module.state_dict().items()
        }
