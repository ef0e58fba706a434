"""Connecting to Ray: a local ``ray.init()`` by default, any cluster by address.

Inside ``ray job submit`` the job's driver connects to its own cluster (``RAY_ADDRESS`` is set).
"""

from __future__ import annotations

import atexit
import logging
import os
import re
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager

import ray

from defectsynth.platform.config import RayConfig
from defectsynth.platform.logs import RAY_LOG_LINE_START, RAYLET_LINE_START, lines_hidden

logger = logging.getLogger(__name__)

# Ray Data's actor pools hand their actors object-store refs under max_restarts=-1, and Ray's core worker says so
# on stderr for every pool (ray-project/ray#57733): nothing the user can act on. It stays in python-core-driver-*.log.
ACTOR_POOL_NOTICE = re.compile(rb"has constructor arguments in the object store and max_restarts > 0")
# The raylet's notice that 4x more workers are starting than there are CPUs, which the fits' Ray Train controllers
# and workers reach on 2 cores; the driver prints it on stdout as "(raylet) WARNING: ...". It stays in raylet.out.
WORKER_POOL_NOTICE = re.compile(rb"\(raylet\).* worker processes have been started on node")

JOINED: list[ExitStack] = []  # the console filters of the session init_ray joined; leave_ray closes them

WORKER_ENV = {
    "HF_HUB_OFFLINE": "1",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "TOKENIZERS_PARALLELISM": "false",
}


def init_ray(cfg: RayConfig) -> None:
    """Start or join a Ray cluster once per process; environment for workers rides in the runtime env.

    Until ``leave_ray`` (called at exit at the latest), the console leaves out Ray's notices that no user can act on,
    unless ``cfg.log_to_driver``. A session started before, by whoever, is left as it is.
    """
    if ray.is_initialized():
        return
    address = cfg.address or os.environ.get("RAY_ADDRESS")
    kwargs: dict = {"runtime_env": {"env_vars": dict(WORKER_ENV)}, "log_to_driver": cfg.log_to_driver}
    quiet_ray(verbose=cfg.log_to_driver)
    if address:
        ray.init(address=address, **kwargs)
    else:
        ray.init(num_cpus=cfg.num_cpus, include_dashboard=False, **kwargs)
    filters = ExitStack()
    filters.enter_context(ray_notices_hidden(verbose=cfg.log_to_driver))
    JOINED.append(filters)
    atexit.register(leave_ray)  # runs before Ray's own exit-time shutdown, which registered at import
    logger.info("ray cluster resources: %s", ray.cluster_resources())


def quiet_ray(*, verbose: bool) -> None:
    """Unless ``verbose``: no Ray Data progress tables, and of Ray's own log lines only the warnings.

    The jobs' progress bars say where a run is instead. Called before ``ray.init``, so its start-up lines
    ("Started a local Ray instance", the notice that token authentication is on) are held back too.
    """
    import ray.data

    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = verbose
    context.enable_operator_progress_bars = verbose
    for name in ("ray.train", "ray.tune", "ray.air", "ray._private.worker"):
        logging.getLogger(name).setLevel(logging.INFO if verbose else logging.WARNING)
    # token authentication is Ray's default for a local cluster: a notice on every start, not a fault (README)
    auth = logging.getLogger("ray._private.authentication.authentication_token_setup")
    auth.setLevel(logging.INFO if verbose else logging.ERROR)
    # Ray Data warns that its progress bars are off, which is what quiet asks for; its other warnings are tuning hints.
    logging.getLogger("ray.data").setLevel(logging.INFO if verbose else logging.ERROR)


@contextmanager
def ray_notices_hidden(*, verbose: bool) -> Iterator[None]:
    """Unless ``verbose``: a block whose console leaves out Ray's lines no user can act on (they stay in its logs)."""
    if verbose:
        yield
        return
    with (
        lines_hidden(2, ACTOR_POOL_NOTICE, RAY_LOG_LINE_START),
        lines_hidden(1, WORKER_POOL_NOTICE, RAYLET_LINE_START),
    ):
        yield


def leave_ray() -> None:
    """Disconnect from the session ``init_ray`` joined, then close its console filters; nothing if it joined none.

    On disconnecting, Ray's driver prints the repeats its log deduplicator held back ("[repeated 2x across
    cluster]"), the raylet's worker-pool notice among them: inside the filters they stay hidden.
    """
    atexit.unregister(leave_ray)
    while JOINED:
        with JOINED.pop():
            ray.shutdown()


def cpus_per_task(requested: float) -> int:
    """Threads a task may use: its CPU share, at least one (oversubscription slows CPUs ~14x here)."""
    return max(1, int(requested))
