"""A tiny base registered as ``jobs.pretrain`` registers one, for job tests whose subject is a fit, not pretraining.

``finetune`` looks the run's base up by its digest (``ensure_base_model``) and trains one only when none is
registered: a test that registers a seeded base of the config's ``diffusion.tiny`` settings first gets the same
job, the same registry URI and the same architecture, without a pretraining fit in Ray Train (a minute on a
shared 2-core runner). ``test_pretrain`` runs ``ensure_base_model``'s pretraining itself, on real Ray Train.
"""

from __future__ import annotations

import json

import mlflow

from defectsynth.diffusion.factory import build_tiny
from defectsynth.diffusion.settings import TINY_BASE_MARKER
from defectsynth.diffusion.tracking import BASE_TINY, log_base_model
from defectsynth.jobs.pretrain import BASE_EXPERIMENT, MODEL_DIR, base_digest, find_registered
from defectsynth.platform.config import Config
from defectsynth.platform.prepare import PreparedData
from defectsynth.platform.tracking import experiment_id, register


def register_tiny_base(cfg: Config, prepared: PreparedData) -> str:
    """Register a seeded, untrained base of ``cfg.diffusion.tiny`` under this run's digest; returns its URI.

    The tracking store must be set up (``setup_tracking`` or ``start``). The base is saved where the job saves
    its own (``<workdir>/pretrain/<digest>/model``, with the tiny-base marker) and logged in the same experiment.
    """
    digest = base_digest(cfg, prepared)
    products = [p.name for p in prepared.products]
    model = build_tiny(cfg.diffusion.tiny, resolution=cfg.data.resolution, words=products, seed=cfg.seed)
    directory = model.save(cfg.workdir / "pretrain" / digest / MODEL_DIR)
    (directory / TINY_BASE_MARKER).write_text(json.dumps(cfg.diffusion.tiny.model_dump(mode="json")))
    experiment = experiment_id(cfg, BASE_EXPERIMENT)
    with mlflow.start_run(experiment_id=experiment, run_name="pretrain-tiny", tags={"job": "pretrain"}):
        uri = log_base_model(directory, digest=digest)
    register(uri, BASE_TINY, tags={"digest": digest})
    version = find_registered(digest)
    assert version is not None, "the registered base is not found by its digest: finetune would pretrain one"
    return f"models:/{BASE_TINY}/{version}"
