"""Config: defaults < YAML file < --set flags, and errors that name the file, key and value."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from defectsynth.platform.config import ConfigError, load_config, parse_override, save_resolved

REPO = Path(__file__).resolve().parents[1]


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(text)
    return path


def test_file_overrides_defaults(tmp_path: Path) -> None:
    cfg = load_config(_write(tmp_path, "data: {root: d, resolution: 64}\ngenerate: {per_type: 5}\n"))
    assert cfg.data.resolution == 64 and cfg.generate.per_type == 5
    assert cfg.finetune.max_steps == 200  # untouched default


def test_set_overrides_file_never_the_reverse(tmp_path: Path) -> None:
    path = _write(tmp_path, "data: {root: d, resolution: 64}\nmethods: [perlin]\nproducts: [a]\n")
    cfg = load_config(path, ["data.resolution=96", "methods=[perlin,croppaste]", "products=[]", "ray.address=auto"])
    assert cfg.data.resolution == 96
    assert cfg.methods == ["perlin", "croppaste"]
    assert cfg.products == []
    assert cfg.ray.address == "auto"


def test_later_set_wins(tmp_path: Path) -> None:
    cfg = load_config(None, ["data.root=x", "generate.per_type=3", "generate.per_type=7"])
    assert cfg.generate.per_type == 7


def test_paths_resolve_and_tracking_defaults_to_workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    cfg = load_config(None, ["data.root=data", "workdir=runs/a"])
    assert cfg.data.root == tmp_path / "data"
    assert cfg.tracking_uri == f"sqlite:///{tmp_path / 'runs/a/mlflow.db'}"
    assert load_config(None, ["data.root=d", "tracking.uri=http://mlflow:5000"]).tracking_uri == "http://mlflow:5000"


def test_a_local_dataset_output_resolves_and_a_uri_stays(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # the evaluate job's Ray workers read it from another working directory
    assert load_config(None, ["data.root=d", "generate.output=out/ds"]).generate.output == str(tmp_path / "out/ds")
    uri = "s3://bucket/ds?endpoint_override=http://127.0.0.1:9000"
    assert load_config(None, ["data.root=d", f"generate.output={uri}"]).generate.output == uri


def test_resolved_config_round_trips(tmp_path: Path) -> None:
    cfg = load_config(None, [f"data.root={tmp_path}", f"workdir={tmp_path / 'w'}", "split.protocol=kshot", "split.k=2"])
    saved = save_resolved(cfg)
    assert saved == tmp_path / "w/config.resolved.yaml"
    assert load_config(saved) == cfg


@pytest.mark.parametrize(
    ("overrides", "needle"),
    [
        (["data.rooot=x"], "data.rooot: unknown key"),
        (["data.root=x", "data.resolution=100"], "data.resolution: Value error, must be a multiple of 8"),
        (["data.root=x", "data.resolution=abc"], "data.resolution: Input should be a valid integer"),
        (["data.root=x", "data.layout=coco"], "data.layout: Input should be 'mvtec', 'visa', 'loco' or 'folder'"),
        (["data.root=x", "generate.per_type=0"], "generate.per_type: Input should be greater than or equal to 1"),
        (["data.root=x", "split.protocol=kshot"], "split: Value error, split.k is required"),
        (["data.root=x", "evaluate.detectors=[patchcore]"], "evaluate.detectors.0: Input should be 'segmenter'"),
        (["data.root=x", "evaluate.baselines=[dtd]"], "evaluate.baselines: Value error, unknown generator(s) ['dtd']"),
        (["data.root=x", "evaluate.steps={classifier: 0}"], "evaluate.steps: Value error, steps must be at least 1"),
        ([], "data: required, not given"),
    ],
)
def test_errors_name_the_key_and_value(overrides: list[str], needle: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(None, overrides)
    assert needle in str(info.value)


def test_error_names_the_file(tmp_path: Path) -> None:
    path = _write(tmp_path, "data: {root: d}\nfinetune: {max_steps: -1}\n")
    with pytest.raises(ConfigError, match=rf"{path}: invalid config\n  finetune.max_steps: .*\(got -1\)"):
        load_config(path)
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(_write(tmp_path, "data: [unclosed\n"))
    with pytest.raises(ConfigError, match="a config must be a mapping"):
        load_config(_write(tmp_path, "- a\n- b\n"))
    with pytest.raises(ConfigError, match="cannot read config"):
        load_config(tmp_path / "missing.yaml")


@pytest.mark.parametrize("text", ["noequals", "=3", "a..b=3"])
def test_malformed_override(text: str) -> None:
    with pytest.raises(ConfigError, match="expected key=value"):
        parse_override(text)


def test_override_through_a_value_is_refused() -> None:
    with pytest.raises(ConfigError, match="seed is a value, not a section"):
        load_config(None, ["data.root=x", "seed=3", "seed.inner=1"])


def test_demo_config_is_valid() -> None:
    cfg = load_config(REPO / "configs/demo.yaml")
    assert cfg.data.demo is not None and cfg.data.layout == "mvtec"
    assert yaml.safe_load(cfg.to_yaml())["workdir"] == str(cfg.workdir)


def test_baselines_join_the_methods_so_every_report_has_their_rows() -> None:
    assert load_config(None, ["data.root=x", "methods=[croppaste]"]).methods == ["croppaste", "perlin"]
    assert load_config(None, ["data.root=x", "methods=[croppaste]", "evaluate.baselines=[]"]).methods == ["croppaste"]
    assert load_config(None, ["data.root=x"]).methods == [], "no methods: nothing to compare, nothing added"


def test_demo_config_runs_every_detector() -> None:
    cfg = load_config(REPO / "configs/demo.yaml")
    assert cfg.evaluate.detectors == ["segmenter", "classifier", "diffusionad"]
    assert set(cfg.methods) >= {"perlin", "croppaste"}


def test_benchmark_config_gives_diffusionad_the_tiers_learning_rate() -> None:
    # evaluate.learning_rate reaches the segmenter only; at the paper's 1e-4 DiffusionAD stays at chance in 150 steps
    cfg = load_config(REPO / "configs/benchmark.yaml")
    assert cfg.evaluate.diffusionad.lr == cfg.evaluate.learning_rate == 1e-3
    assert cfg.evaluate.diffusionad.seg_lr is None, "one Adam rate for both sub-networks, as the paper"


def test_a_learning_rate_milestone_outside_the_run_is_refused_by_name() -> None:
    with pytest.raises(ConfigError, match="learning_rate_milestones"):
        load_config(None, ["evaluate.learning_rate_milestones=[0.8,1.5]"])


def test_the_configuration_reference_is_current() -> None:
    from defectsynth.platform.config_reference import config_reference

    committed = Path(__file__).resolve().parents[1] / "docs" / "configuration.md"
    assert config_reference() == committed.read_text(), (
        "docs/configuration.md is stale: run `defectsynth config reference > docs/configuration.md`"
    )
