"""Run configuration: pydantic models loaded from YAML, with ``--set key=value`` overrides on top.

Precedence is fixed: model defaults < the YAML file < ``--set`` flags (applied in order, last wins).
Values of ``--set`` are parsed as YAML, so ``--set products=[]`` and ``--set methods=[perlin,seas]``
work. Relative paths are resolved against the current directory when the config is loaded.

Example:
    >>> cfg = load_config(None, ["data.root=/tmp/d", "split.protocol=kshot", "split.k=2"])
    >>> cfg.split.k
    2
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import Field, ValidationError, field_validator, model_validator

from defectsynth.core.config_section import ConfigSection
from defectsynth.core.strategy import StrategyConfig
from defectsynth.diffusion.settings import BaseModelSettings
from defectsynth.evaluation.settings import ClassifierConfig, DiffusionADConfig, QualitySettings
from defectsynth.generators.intensity import IntensityRange
from defectsynth.generators.quality_gates import QualityGates
from defectsynth.generators.registry import REGISTRY
from defectsynth.storage.fs import local_path
from defectsynth.storage.imageio import MAX_PIXELS
from defectsynth.storage.layouts import FolderLayout, LayoutOptions
from defectsynth.storage.layouts.visa import DEFAULT_SPLIT_CSV
from defectsynth.storage.redact import redact_tree
from defectsynth.storage.split import SplitSettings

logger = logging.getLogger(__name__)

RESOLVED_NAME = "config.resolved.yaml"


class ConfigError(ValueError):
    """A config file or override is invalid; the message names the file, key and value."""


def registered(methods: list[str]) -> list[str]:
    """``methods`` unchanged when every one is a registered generator; otherwise an error naming the others."""
    unknown = [m for m in methods if m not in REGISTRY]
    if unknown:
        msg = f"unknown generator(s) {unknown}; registered: {', '.join(sorted(REGISTRY))}"
        raise ValueError(msg)
    return methods


class DemoDataConfig(ConfigSection):
    """How ``data.root`` is filled with procedural demo products when it does not exist yet."""

    size: int = Field(128, ge=32, description="image side in pixels")
    seed: int = 0
    train_good: int = Field(48, ge=1)
    test_good: int = Field(16, ge=1)
    per_defect: int = Field(9, ge=1)


class DataConfig(ConfigSection):
    """Where the product images are and how they are laid out."""

    root: Path = Field(description="dataset root holding one directory per product")
    layout: Literal["mvtec", "visa", "loco", "folder"] = "mvtec"
    resolution: int = Field(128, ge=32, le=4096, description="side images are resized to for every model")
    folder: FolderLayout = Field(default_factory=FolderLayout)
    visa_split_csv: str = Field(DEFAULT_SPLIT_CSV, description="VisA split CSV, relative to the root")
    demo: DemoDataConfig | None = Field(None, description="make demo products at root when it is missing")
    max_pixels: int = Field(
        MAX_PIXELS,
        ge=1,
        le=MAX_PIXELS,
        description="an image with more pixels is refused from its header, before decoding (at most the reader's)",
    )

    @property
    def layout_options(self) -> LayoutOptions:
        """The reader settings of ``storage.layouts``."""
        return LayoutOptions(folder=self.folder, visa_split_csv=self.visa_split_csv)

    @field_validator("visa_split_csv")
    @classmethod
    def _inside_the_root(cls, value: str) -> str:
        if Path(value).is_absolute() or ".." in Path(value).parts:
            msg = f"{value!r} must be a path relative to data.root, without '..'"
            raise ValueError(msg)
        return value

    @field_validator("resolution")
    @classmethod
    def _multiple_of_8(cls, value: int) -> int:
        if value % 8:
            msg = f"must be a multiple of 8 (the VAE downsamples by 8), got {value}"
            raise ValueError(msg)
        return value


class TrainerConfig(ConfigSection):
    """Ray Train resources and fault tolerance of one fit, and how it spreads over workers."""

    workers: int = Field(1, ge=1, description="Ray Train workers per fit")
    cpus_per_worker: int = Field(1, ge=1)
    use_gpu: bool = False
    distributed: StrategyConfig = Field(default_factory=StrategyConfig)
    checkpoint_every: int = Field(50, ge=1, description="steps between Ray Train checkpoints")
    keep_checkpoints: int = Field(
        2, ge=1, description="Ray Train checkpoints kept per fit, the newest; older ones are deleted as new ones come"
    )
    max_failures: int = Field(1, ge=0, description="worker-group restarts from the last checkpoint")
    concurrent_fits: int = Field(2, ge=1, description="fits (products x methods) running at once")


class FinetuneConfig(TrainerConfig):
    """Generator fine-tuning (read by ``jobs.finetune``)."""

    max_steps: int = Field(200, ge=1)


class GenerateConfig(ConfigSection):
    """Synthetic data generation (read by ``jobs.generate``)."""

    per_type: int = Field(16, ge=1, description="samples per product and defect type")
    mask_source: Literal["auto", "real", "learned", "perlin"] = Field(
        "auto", description="where conditioning masks come from; auto: each method's preferred source for the base"
    )
    intensity: IntensityRange | Annotated[list[float], Field(min_length=1)] | None = Field(
        None,
        description="a range {low, high} drawn uniformly, or a list of values taken in turn; None: each method's "
        "default draw. Checked against every method's intensity domain when the job starts",
    )
    normals_per_product: int = Field(
        0, ge=0, description="normal samples (label 0) per product, from methods that declare they make normals"
    )
    max_retries: int = Field(3, ge=0, description="re-tries of a rejected request, each with a derived seed")
    quality: QualityGates = Field(default_factory=QualityGates, description="quality gates, per run")
    model_alias: str = Field("candidate", description="registry alias or version number to generate with")
    output: str | None = Field(None, description="dataset base URI; None: <workdir>/datasets")
    actors: int = Field(1, ge=1, description="generation actors (Ray Data ActorPoolStrategy size)")
    cpus_per_actor: float = Field(1.0, gt=0)
    gpus_per_actor: float = Field(0.0, ge=0)
    batch_size: int = Field(8, ge=1)
    shard_maxcount: int = Field(1000, ge=1)
    shard_maxsize: int = Field(1 << 30, ge=1 << 16)

    def dataset_uri(self, workdir: Path, method: str) -> str:
        """Where ``method``'s dataset is written: ``<output>/<method>``."""
        base = self.output or str(workdir / "datasets")
        return f"{base.rstrip('/')}/{method}"


class EvaluateConfig(TrainerConfig):
    """Downstream evaluation (read by ``jobs.evaluate``): detectors on real + synthetic data, dataset checks.

    Every detector of ``detectors`` trains on every method's data, once per entry of ``seeds``; DiffusionAD
    also on normals alone (method ``none``). ``baselines`` are added to the run's ``methods`` so every report
    has their rows.
    """

    detectors: list[Literal["segmenter", "classifier", "diffusionad"]] = Field(
        default_factory=lambda: ["segmenter", "classifier", "diffusionad"], min_length=1
    )
    baselines: list[str] = Field(
        default_factory=lambda: ["perlin", "croppaste"], description="methods always compared; [] for none"
    )
    max_steps: int = Field(300, ge=1, description="training steps of every detector without an entry in steps")
    steps: dict[Literal["segmenter", "classifier", "diffusionad"], int] = Field(
        default_factory=dict, description="training steps per detector, e.g. {diffusionad: 2000}"
    )
    batch_size: int = Field(8, ge=2)
    synthetic_fraction: float = Field(0.5, gt=0, lt=1, description="share of each batch that is synthetic")
    synthetic_normals: bool = Field(
        False,
        description="add a method's generated normals (label 0, e.g. SeaS's) to the real training normals of its runs",
    )
    base_width: int = Field(16, ge=4, description="segmenter U-Net width (DRAEM uses 64)")
    learning_rate: float = Field(
        1e-4, gt=0, description="segmenter learning rate (DRAEM); DiffusionAD's is diffusionad.lr, not this"
    )
    learning_rate_milestones: list[Annotated[float, Field(gt=0, lt=1)]] = Field(
        default_factory=lambda: [0.8, 0.9],
        description="fractions of the segmenter's steps past which its rate falls by learning_rate_decay (DRAEM: "
        "x0.2 past 80% and again past 90% of its epochs); [] keeps it constant",
    )
    learning_rate_decay: float = Field(0.2, gt=0, le=1, description="the segmenter's rate factor at each milestone")
    validate_every: int = Field(50, ge=1)
    batch_norm_batches: int = Field(
        16, ge=0, description="training batches that re-estimate BatchNorm statistics before each validation; 0: off"
    )
    weight_average: float = Field(
        0.0,
        ge=0,
        lt=1,
        description="decay of the moving average of a detector's weights that validation scores and selection "
        "keeps (Polyak averaging); 0: the live weights",
    )
    classifier: ClassifierConfig = Field(default_factory=ClassifierConfig)
    diffusionad: DiffusionADConfig = Field(default_factory=DiffusionADConfig)
    quality: QualitySettings = Field(default_factory=QualitySettings)
    champion_detector: Literal["segmenter", "classifier", "diffusionad"] = Field(
        "segmenter", description="the detector whose score moves the champion alias"
    )
    champion_metric: str = Field("pixel_ap", description="the score that moves the champion alias")
    seeds: list[int] = Field(
        default_factory=lambda: [0],
        min_length=1,
        description="detector seeds: every (detector, method) trains once per seed; reports show mean±std over them",
    )

    detector_seeds: dict[Literal["segmenter", "classifier", "diffusionad"], list[int]] = Field(
        default_factory=dict, description="seeds of one detector instead of seeds, e.g. {diffusionad: [0]}"
    )

    @field_validator("seeds")
    @classmethod
    def _distinct_seeds(cls, seeds: list[int]) -> list[int]:
        if len(set(seeds)) != len(seeds):
            msg = f"seeds must be distinct, got {seeds}"
            raise ValueError(msg)
        return seeds

    @field_validator("detector_seeds")
    @classmethod
    def _distinct_detector_seeds(cls, seeds: dict[str, list[int]]) -> dict[str, list[int]]:
        bad = {name: s for name, s in seeds.items() if not s or len(set(s)) != len(s)}
        if bad:
            msg = f"detector_seeds need at least one seed, all distinct, got {bad}"
            raise ValueError(msg)
        return seeds

    def seeds_of(self, detector: str) -> list[int]:
        """The seeds ``detector`` trains with: its ``detector_seeds`` entry, else ``seeds``."""
        return self.detector_seeds.get(detector, self.seeds)  # type: ignore[call-overload]

    @field_validator("baselines")
    @classmethod
    def _registered_baselines(cls, baselines: list[str]) -> list[str]:
        return registered(baselines)

    @field_validator("steps")
    @classmethod
    def _positive_steps(cls, steps: dict[str, int]) -> dict[str, int]:
        bad = {name: n for name, n in steps.items() if n < 1}
        if bad:
            msg = f"steps must be at least 1, got {bad}"
            raise ValueError(msg)
        return steps


class PretrainConfig(TrainerConfig):
    """Ray Train resources of the tiny diffusion base's pretraining (read by ``jobs.pretrain``)."""

    concurrent_fits: int = Field(1, ge=1, description="unused: one base model is trained at a time")


class TrackingConfig(ConfigSection):
    """MLflow tracking; ``uri`` None means a SQLite store in the workdir."""

    uri: str | None = None


class RayConfig(ConfigSection):
    """Ray cluster; ``address`` None starts a local ``ray.init()`` (or joins ``RAY_ADDRESS`` when set)."""

    address: str | None = None
    num_cpus: int | None = Field(None, ge=1, description="CPUs of a local cluster (None: all)")
    log_to_driver: bool = Field(
        False,
        description="Ray's own output on this terminal: the workers' log lines and Ray Data's progress tables "
        "(--verbose turns it on); they always go to Ray's log files",
    )


class Config(ConfigSection):
    """Everything one run needs; ``workdir`` receives everything it writes."""

    workdir: Path = Path("runs/default")
    data: DataConfig
    split: SplitSettings = Field(default_factory=SplitSettings)
    products: list[str] = Field(default_factory=list, description="empty: every product under data.root")
    methods: list[str] = Field(default_factory=list, description="generator names")
    finetune: FinetuneConfig = Field(default_factory=FinetuneConfig)
    generate: GenerateConfig = Field(default_factory=GenerateConfig)
    evaluate: EvaluateConfig = Field(default_factory=EvaluateConfig)
    generators: dict[str, dict[str, Any]] = Field(
        default_factory=dict, description="per-method settings, validated by each generator's Settings"
    )
    diffusion: BaseModelSettings = Field(
        default_factory=BaseModelSettings, description="base model of every diffusion generator"
    )
    pretrain: PretrainConfig = Field(default_factory=PretrainConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    ray: RayConfig = Field(default_factory=RayConfig)
    seed: int = 0

    @field_validator("methods")
    @classmethod
    def _registered_methods(cls, methods: list[str]) -> list[str]:
        return registered(methods)

    @model_validator(mode="after")
    def _with_baselines(self) -> Config:
        """Add the evaluation baselines to ``methods`` so every comparison has their rows."""
        if self.methods:
            self.methods = self.methods + [m for m in self.evaluate.baselines if m not in self.methods]
        return self

    @field_validator("generators")
    @classmethod
    def _registered_settings(cls, generators: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        unknown = [m for m in generators if m not in REGISTRY]
        if unknown:
            msg = f"settings for unknown generator(s) {unknown}; registered: {', '.join(sorted(REGISTRY))}"
            raise ValueError(msg)
        return generators

    @property
    def tracking_uri(self) -> str:
        """The MLflow tracking URI: the configured one or ``sqlite:///<workdir>/mlflow.db``."""
        return self.tracking.uri or f"sqlite:///{self.workdir / 'mlflow.db'}"

    def public_dump(self) -> dict[str, Any]:
        """The resolved config as JSON-like data, credentials in URIs masked (``storage.redact``): what is written."""
        return redact_tree(self.model_dump(mode="json"))

    def to_yaml(self) -> str:
        """``public_dump`` as YAML, loadable again with ``load_config`` (credentials then come from the environment)."""
        return yaml.safe_dump(self.public_dump(), sort_keys=False)


def parse_override(text: str) -> tuple[list[str], Any]:
    """Split ``a.b=value`` into (["a", "b"], value parsed as YAML)."""
    key, sep, raw = text.partition("=")
    keys = key.strip().split(".")
    if not sep or not all(keys):
        msg = f"--set {text!r}: expected key=value with a dotted key, e.g. data.resolution=64"
        raise ConfigError(msg)
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as err:
        msg = f"--set {text!r}: the value is not valid YAML ({err})"
        raise ConfigError(msg) from err
    return keys, value


def apply_override(tree: dict[str, Any], keys: list[str], value: Any) -> None:
    """Set ``tree[k1][k2]... = value``, creating sections on the way."""
    node = tree
    for depth, key in enumerate(keys[:-1]):
        child = node.setdefault(key, {})
        if not isinstance(child, dict):
            msg = f"--set {'.'.join(keys)}: {'.'.join(keys[: depth + 1])} is a value, not a section"
            raise ConfigError(msg)
        node = child
    node[keys[-1]] = value


def read_yaml(path: Path) -> dict[str, Any]:
    """Read a YAML mapping; unreadable files, bad YAML and non-mappings are errors naming the file."""
    try:
        tree = yaml.safe_load(Path(path).read_text())
    except OSError as err:
        msg = f"{path}: cannot read config ({err.strerror})"
        raise ConfigError(msg) from err
    except yaml.YAMLError as err:
        msg = f"{path}: not valid YAML ({err})"
        raise ConfigError(msg) from err
    if tree is None:
        return {}
    if not isinstance(tree, dict):
        msg = f"{path}: a config must be a mapping of keys, got {type(tree).__name__}"
        raise ConfigError(msg)
    return tree


def _describe(err: ValidationError, source: str) -> str:
    lines = [f"{source}: invalid config"]
    for problem in err.errors():
        key = ".".join(str(part) for part in problem["loc"]) or "(top level)"
        if problem["type"] == "extra_forbidden":
            lines.append(f"  {key}: unknown key")
        elif problem["type"] == "missing":
            lines.append(f"  {key}: required, not given")
        else:
            lines.append(f"  {key}: {problem['msg']} (got {problem.get('input')!r})")
    return "\n".join(lines)


def _resolve_paths(cfg: Config) -> Config:
    cfg.workdir = cfg.workdir.expanduser().resolve()
    cfg.data.root = cfg.data.root.expanduser().resolve()
    if cfg.generate.output is not None:  # the evaluate job's Ray workers read it from another directory
        cfg.generate.output = local_path(cfg.generate.output) or cfg.generate.output
    if not cfg.diffusion.is_tiny:
        cfg.diffusion.base_model = str(Path(cfg.diffusion.base_model).expanduser().resolve())
    if cfg.diffusion.base_config is not None:
        cfg.diffusion.base_config = cfg.diffusion.base_config.expanduser().resolve()
    return cfg


def load_config(path: Path | str | None, overrides: Sequence[str] = ()) -> Config:
    """Load ``path`` (or start from defaults when None), apply ``overrides`` in order, and validate."""
    tree = read_yaml(Path(path)) if path is not None else {}
    for text in overrides:
        apply_override(tree, *parse_override(text))
    source = str(path) if path is not None else "defaults"
    if overrides:
        source += f" with --set {' '.join(overrides)}"
    try:
        return _resolve_paths(Config.model_validate(tree))
    except ValidationError as err:
        raise ConfigError(_describe(err, source)) from err


def verbose_overrides(overrides: Sequence[str], verbose: bool) -> list[str]:
    """The ``--set`` overrides, with Ray's own output on this terminal when ``--verbose`` asks for it."""
    return [*overrides, "ray.log_to_driver=true"] if verbose else list(overrides)


def save_resolved(cfg: Config, directory: Path | None = None) -> Path:
    """Write the resolved config beside a run's outputs (the workdir by default); returns the file."""
    directory = Path(directory or cfg.workdir)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / RESOLVED_NAME
    path.write_text(cfg.to_yaml())
    logger.info("resolved config saved to %s", path)
    return path
