"""The generate job with ``stamp`` (``helpers.stamp_generator``), slowed so that fault tests can kill it mid-way."""

from __future__ import annotations

from pathlib import Path

from defectsynth.platform.config import Config, load_config

PER_TYPE = 6
TYPES = ("contamination", "crack", "discoloration", "hole", "scratch")
STAMP = "helpers.stamp_generator.register"  # the Ray workers' setup hook


def stamp_config(root: Path, workdir: Path, delay: float = 0.2) -> Config:
    """``stamp`` at ``delay`` seconds a sample, 2 per batch, shards of 4: a job long enough to kill mid-way."""
    return load_config(
        None,
        [
            f"data.root={root}", f"workdir={workdir}", "data.resolution=64", "products=[wood]",
            "methods=[stamp]", "evaluate.baselines=[]", f"generate.per_type={PER_TYPE}",
            "generate.normals_per_product=0", "generate.batch_size=2", "generate.shard_maxcount=4",
            f"generators.stamp={{delay: {delay}}}", "ray.log_to_driver=false",
        ],
    )  # fmt: skip


def dataset_dir(cfg: Config, method: str) -> Path:
    return Path(cfg.generate.dataset_uri(cfg.workdir, method))
