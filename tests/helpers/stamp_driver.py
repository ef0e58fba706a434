"""A generate driver for ``stamp`` in a process of its own, for tests to kill: ``python -m helpers.stamp_driver CFG``.

It registers ``stamp`` (in this process and, by the setup hook, in its Ray workers), fits and registers it
once (a re-run finds the registered version), and runs the generate job on a local Ray cluster of its own.
"""

from __future__ import annotations

import sys

from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from defectsynth.jobs.common import start
from defectsynth.jobs.generate import generate
from defectsynth.platform.config import load_config
from defectsynth.platform.tracking import CANDIDATE, model_name
from helpers.ray_cluster import local_cluster
from helpers.stamp_generator import registered


def main(config: str) -> None:
    """Generate the config's ``stamp`` dataset, fitting and registering stamp first when the registry lacks it."""
    from test_generate_protocol import register_stamp

    with registered(), local_cluster("helpers.stamp_generator.register"):
        cfg = load_config(config)
        prepared = start(cfg)
        try:
            MlflowClient().get_model_version_by_alias(model_name("wood", "stamp"), CANDIDATE)
        except MlflowException:
            register_stamp(cfg, prepared)
        generate(cfg, prepared)


if __name__ == "__main__":
    main(sys.argv[1])
