"""Local base models: SD 1.x/2.x in diffusers layout, or one original-layout .safetensors/.ckpt file, all offline."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from defectsynth.diffusion.factory import BaseModelSettings, load_local_base
from defectsynth.diffusion.model import DiffusionModel
from defectsynth.diffusion.single_file import load_single_file, read_checkpoint
from helpers.ldm_checkpoint import configs_only, tiny_sd_model, to_ldm_state_dict, write_single_file
from helpers.tiny_diffusion import tiny_model


@pytest.fixture(autouse=True)
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any socket connection is a hub fetch that slipped in: fail loudly instead of hanging."""

    def refuse(*args: object, **kwargs: object) -> None:
        msg = f"network access attempted: {args}"
        raise AssertionError(msg)

    monkeypatch.setattr(socket.socket, "connect", refuse)


@pytest.fixture(scope="module")
def sd1() -> DiffusionModel:
    return tiny_sd_model(version=1, seed=0)


@pytest.fixture(scope="module")
def sd2() -> DiffusionModel:
    return tiny_sd_model(version=2, seed=1)


@pytest.fixture(scope="module")
def config_dirs(tmp_path_factory: pytest.TempPathFactory, sd1: DiffusionModel, sd2: DiffusionModel) -> dict[int, Path]:
    """Configs-only diffusers directories (no weights): the single files' weights cannot come from there."""
    root = tmp_path_factory.mktemp("configs")
    return {1: configs_only(sd1, root / "sd1"), 2: configs_only(sd2, root / "sd2")}


def outputs(model: DiffusionModel) -> dict[str, torch.Tensor]:
    """U-Net, VAE and text-encoder outputs on fixed inputs."""
    gen = torch.Generator().manual_seed(0)
    channels, side, _ = model.latent_shape
    latents = torch.randn(2, channels, side, side, generator=gen)
    images = torch.rand(2, 3, model.resolution, model.resolution, generator=gen) * 2 - 1
    with torch.no_grad():
        context = model.encode_prompt(["a photo of wood", "a scratch"])
        return {
            "text": context,
            "unet": model.unet(latents, torch.tensor([10, 500]), encoder_hidden_states=context).sample,
            "encode": model.encode_images(images),
            "decode": model.decode_latents(latents),
        }


def assert_same_outputs(expected: DiffusionModel, actual: DiffusionModel, atol: float = 1e-5) -> None:
    assert actual.resolution == expected.resolution
    assert actual.scheduler.config.prediction_type == expected.scheduler.config.prediction_type
    torch.testing.assert_close(actual.alphas_cumprod, expected.alphas_cumprod)
    want, got = outputs(expected), outputs(actual)
    for name in want:
        torch.testing.assert_close(got[name], want[name], atol=atol, rtol=0, msg=lambda m, name=name: f"{name}: {m}")


# --- diffusers layout ------------------------------------------------------------------------------------------------


def test_sd1_diffusers_directory_loads_identically(tmp_path: Path, sd1: DiffusionModel) -> None:
    directory = sd1.save(tmp_path / "sd1")
    loaded = load_local_base(BaseModelSettings(base_model=str(directory)))
    assert loaded.unet.config.layers_per_block == 2 and len(loaded.unet.config.down_block_types) == 4
    assert_same_outputs(sd1, loaded, atol=0)


def test_sd2_diffusers_directory_keeps_v_prediction_and_sd2_structure(tmp_path: Path, sd2: DiffusionModel) -> None:
    directory = sd2.save(tmp_path / "sd2")
    loaded = load_local_base(BaseModelSettings(base_model=str(directory)))
    assert loaded.scheduler.config.prediction_type == "v_prediction"
    assert loaded.unet.config.use_linear_projection is True
    assert list(loaded.unet.config.attention_head_dim) == [2, 4, 4, 4]
    assert loaded.text_encoder.config.hidden_act == "gelu"
    assert loaded.text_encoder.config.projection_dim == 16
    assert_same_outputs(sd2, loaded, atol=0)


def test_directory_resolution_override(tmp_path: Path, sd1: DiffusionModel) -> None:
    directory = sd1.save(tmp_path / "sd1")
    assert load_local_base(BaseModelSettings(base_model=str(directory)), resolution=32).latent_shape == (4, 4, 4)


# --- single original-layout files ------------------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".safetensors", ".ckpt"])
@pytest.mark.parametrize("version", [1, 2])
def test_single_file_matches_original(
    tmp_path: Path, sd1: DiffusionModel, sd2: DiffusionModel, config_dirs: dict[int, Path], version: int, suffix: str
) -> None:
    model = sd1 if version == 1 else sd2
    path = write_single_file(model, tmp_path / f"sd{version}{suffix}", open_clip=version == 2)
    keys = list(read_checkpoint(path))
    text_prefix = "cond_stage_model.transformer.text_model." if version == 1 else "cond_stage_model.model.transformer."
    for prefix in ("model.diffusion_model.input_blocks.", "first_stage_model.encoder.down.", text_prefix):
        assert any(key.startswith(prefix) for key in keys), prefix
    assert not list(config_dirs[version].rglob("*.safetensors"))

    settings = BaseModelSettings(base_model=str(path), base_config=config_dirs[version])
    loaded = load_local_base(settings)
    assert loaded.scheduler.config.prediction_type == ("epsilon" if version == 1 else "v_prediction")
    assert_same_outputs(model, loaded)


def test_project_tiny_model_as_single_file(tmp_path: Path) -> None:
    """Our own tiny base (3 U-Net blocks, 1 layer each, 2-block VAE) converts as well as SD's structure."""
    model = tiny_model(resolution=32)
    path = write_single_file(model, tmp_path / "tiny.safetensors")
    loaded = load_single_file(path, config_dir=configs_only(model, tmp_path / "cfg"), resolution=32)
    assert_same_outputs(model, loaded)


def test_ckpt_with_nested_state_dict_and_fp16(
    tmp_path: Path, sd1: DiffusionModel, config_dirs: dict[int, Path]
) -> None:
    state = {key: value.half() for key, value in to_ldm_state_dict(sd1).items()}
    path = tmp_path / "half.ckpt"
    torch.save({"state_dict": {"state_dict": state}, "epoch": 3}, path)
    loaded = load_single_file(path, config_dir=config_dirs[1])
    assert loaded.dtype == torch.float32
    assert_same_outputs(sd1, loaded, atol=0.05)


# --- errors ----------------------------------------------------------------------------------------------------------


def test_single_file_without_base_config_names_file_and_setting(tmp_path: Path, sd1: DiffusionModel) -> None:
    path = write_single_file(sd1, tmp_path / "sd1.safetensors")
    with pytest.raises(ValueError, match=r"sd1\.safetensors.*diffusion\.base_config"):
        load_local_base(BaseModelSettings(base_model=str(path)))


def test_non_sd_safetensors_is_refused(tmp_path: Path, config_dirs: dict[int, Path]) -> None:
    path = tmp_path / "random.safetensors"
    save_file({"encoder.weight": torch.randn(4, 4), "head.bias": torch.randn(4)}, str(path))
    with pytest.raises(ValueError, match=r"random\.safetensors: not a Stable Diffusion 1\.x/2\.x checkpoint"):
        load_local_base(BaseModelSettings(base_model=str(path), base_config=config_dirs[1]))


def test_sdxl_layout_is_refused(tmp_path: Path, config_dirs: dict[int, Path]) -> None:
    path = tmp_path / "xl.safetensors"
    save_file({"conditioner.embedders.0.transformer.text_model.x": torch.zeros(1)}, str(path))
    with pytest.raises(ValueError, match=r"xl\.safetensors: a Stable Diffusion XL checkpoint"):
        load_single_file(path, config_dir=config_dirs[1])


@pytest.mark.parametrize("suffix", [".safetensors", ".ckpt"])
def test_corrupt_file_is_refused(tmp_path: Path, config_dirs: dict[int, Path], suffix: str) -> None:
    path = tmp_path / f"broken{suffix}"
    path.write_bytes(b"this is not a checkpoint" * 10)
    with pytest.raises(ValueError, match=rf"broken\{suffix}: not a readable"):
        load_single_file(path, config_dir=config_dirs[1])


class Callback:
    """Stands in for the pytorch-lightning objects some released .ckpt files pickle next to their weights."""


def test_ckpt_with_python_objects_is_not_unpickled(tmp_path: Path, config_dirs: dict[int, Path]) -> None:
    path = tmp_path / "lightning.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(1)}, "callbacks": Callback()}, path)
    with pytest.raises(ValueError, match=r"lightning\.ckpt: the \.ckpt holds Python objects"):
        load_single_file(path, config_dir=config_dirs[1])


@pytest.mark.parametrize(
    ("key", "part", "diffusers_key"),
    [
        ("model.diffusion_model.out.2.weight", "unet", "conv_out.weight"),
        ("first_stage_model.decoder.mid.attn_1.q.weight", "vae", "decoder.mid_block.attentions.0.to_q.weight"),
        ("cond_stage_model.transformer.text_model.final_layer_norm.bias", "text_encoder", "final_layer_norm.bias"),
    ],
)
def test_missing_weights_are_reported(
    tmp_path: Path, sd1: DiffusionModel, config_dirs: dict[int, Path], key: str, part: str, diffusers_key: str
) -> None:
    state = to_ldm_state_dict(sd1)
    del state[key]
    path = tmp_path / "partial.safetensors"
    save_file(state, str(path))
    with pytest.raises(ValueError, match=rf"partial\.safetensors: no weights for 1 {part} tensors .*{diffusers_key}"):
        load_single_file(path, config_dir=config_dirs[1])


def test_version_mismatch_with_base_config(tmp_path: Path, sd1: DiffusionModel, config_dirs: dict[int, Path]) -> None:
    path = write_single_file(sd1, tmp_path / "sd1.safetensors")
    with pytest.raises(
        ValueError, match=r"sd1\.safetensors: its unet weights do not fit the unet config of base_config .*sd2"
    ):
        load_single_file(path, config_dir=config_dirs[2])


def test_base_config_missing_subfolder(tmp_path: Path, sd1: DiffusionModel, config_dirs: dict[int, Path]) -> None:
    path = write_single_file(sd1, tmp_path / "sd1.safetensors")
    broken = shutil.copytree(config_dirs[1], tmp_path / "cfg")
    shutil.rmtree(broken / "text_encoder")
    with pytest.raises(ValueError, match=r"sd1\.safetensors: base_config .*cfg .*missing text_encoder/"):
        load_single_file(path, config_dir=broken)
    with pytest.raises(ValueError, match=r"sd1\.safetensors: base_config .*nowhere is not a directory"):
        load_single_file(path, config_dir=tmp_path / "nowhere")


def test_nonexistent_path(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"no such file or directory"):
        load_local_base(BaseModelSettings(base_model=str(tmp_path / "missing.safetensors")))
    with pytest.raises(ValueError, match=r"missing\.ckpt: no such checkpoint file"):
        load_single_file(tmp_path / "missing.ckpt", config_dir=tmp_path)


def test_directory_without_unet(tmp_path: Path, sd1: DiffusionModel) -> None:
    directory = sd1.save(tmp_path / "sd1")
    shutil.rmtree(directory / "unet")
    with pytest.raises(ValueError, match=r"sd1: not a diffusers Stable Diffusion directory \(missing unet\)"):
        load_local_base(BaseModelSettings(base_model=str(directory)))


def test_other_file_types_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "model.pt"
    path.write_bytes(b"")
    with pytest.raises(ValueError, match=r"model\.pt: expected a diffusers directory"):
        load_local_base(BaseModelSettings(base_model=str(path)))


def test_loading_a_model_draws_no_weight_loading_bar(tmp_path: Path) -> None:
    tiny_model().save(tmp_path / "model")
    script = f"import defectsynth.diffusion.model as m; m.DiffusionModel.load({str(tmp_path / 'model')!r})"
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_DISABLE_PROGRESS_BARS"}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, check=True)
    assert "Loading weights" not in done.stderr
