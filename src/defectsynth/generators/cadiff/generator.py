"""CADiff (paper 004) as a platform generator: context-aware tokens, a ControlNet with SAIM, and IAR.

Fit, one model per product over all its defect types; the U-Net, the VAE and the text encoder stay frozen.
The contextual token, the anomaly tokens, a ControlNet copied from the U-Net (conditioned on the defect mask)
and the SAIMs that fuse its residuals into the U-Net train with L = L_CALDM + γ·L_loc + β·L_con (Eq. 8).
Each step's batch holds augmented views of one defect type, drawn per step, so NT-Xent's positives are the
same concept across views (Eqs. 6-7). Eq. 5's time average A = (1/T) Σ_t A_t is taken over the training
iterations: each sample's maps are those at its own random timestep.

Generation: the paper does not say how CADiff uses a normal image (its Fig. 5 shares AnoDiff's masks); ours
blends as AnomalyDiffusion does: outside the mask the latents are the normal's, forward-noised, and the decoded
image keeps the normal's pixels there. The mask conditions the ControlNet, and IAR (Eq. 11) scales the anomaly
tokens' cross-attention at the 16×16 layers (``focus_resolutions``; the U-Net's, and the ControlNet's with
``focus_controlnet``) by w·||M||₁ inside the mask once the Delayed Focus Scheduler fires. w is the request's
intensity, by default drawn from U[0.5, 1.5], and is every sample's ``intensity``.

Ablations (paper Tables 4, 5): a fixed w (``generate.intensity: [1.0]``), ``masked_focus: false``,
``delayed_focus: false``, ``iar: false``, ``localization_loss: false``, ``contrastive_loss: false`` and
``saim: false`` (a plain ControlNet adding its residuals).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
import torch
from diffusers import ControlNetModel
from pydantic import Field, model_validator
from safetensors.torch import load_file, save_file

from defectsynth.core.devices import compute_device
from defectsynth.core.train_engine import TrainEngine
from defectsynth.diffusion.attention import AttentionControl, DelayedFocusGate, Select, installed
from defectsynth.diffusion.controlnet import PART, ControlNetPredictor, mask_image, new_controlnet
from defectsynth.diffusion.ddim import DDIMSampler
from defectsynth.diffusion.factory import load_base_model
from defectsynth.diffusion.features import FeatureTaps
from defectsynth.diffusion.latent_range import LatentRange
from defectsynth.diffusion.model import DiffusionModel
from defectsynth.diffusion.pretrain import denoising_loss
from defectsynth.diffusion.preview import to_uint8
from defectsynth.diffusion.sampling import BlendTarget, NoisePredictor, denoise, generators_from_seeds
from defectsynth.diffusion.tokens import PlaceholderTokens
from defectsynth.generators.base import (
    FitContext,
    FitUnitKind,
    GeneratorSettings,
    MaskSource,
    Request,
    check_request,
    read_artifact_manifest,
    write_artifact_manifest,
)
from defectsynth.generators.cadiff.context_losses import attention_pooled, localization_loss, nt_xent
from defectsynth.generators.cadiff.prompt import ContextPrompts, PromptLayout
from defectsynth.generators.cadiff.saim import SAIMFusion, SAIMPredictor
from defectsynth.generators.frozen_base import frozen_base
from defectsynth.generators.intensity import DECIMALS, IntensityControl
from defectsynth.generators.latent_clamp import (
    LATENT_RANGE_FIELD,
    read_latent_range,
    training_latent_range,
    x0_clamp_field,
)
from defectsynth.generators.masks import MaskOptions, conditioning_mask, load_source, request_rngs
from defectsynth.generators.refine import refined_sample, settings_digest
from defectsynth.generators.training_pairs import (
    TrainingDefects,
    augmented_batch,
    defect_loss_weights,
    latent_mask,
    load_training_defects,
    rotation_field,
    to_model_range,
)
from defectsynth.storage.records import ProductData
from defectsynth.storage.sample import Sample
from defectsynth.storage.split import ProductSplit

logger = logging.getLogger(__name__)

TOKENS_FILE, SAIM_FILE = "tokens.safetensors", "saim.safetensors"
INTENSITY = IntensityControl(meaning="attention weight w", low=-2.0, high=2.0, default=(0.5, 1.5))


class CADiffSettings(GeneratorSettings):
    """Paper 004's settings; the defaults are the paper's (Stable Diffusion scale), the config sizes them for a CPU."""

    anomaly_tokens: int = Field(1, ge=1, description="anomaly tokens per defect type (paper: unstated)")
    learning_rate: float = Field(1e-5, gt=0, description="AdamW rate of the ControlNet and SAIM (paper: 1e-5)")
    token_learning_rate: float = Field(1e-5, gt=0, description="rate of the new token rows (paper: one rate, 1e-5)")
    weight_decay: float = Field(0.01, ge=0, description="AdamW weight decay of the ControlNet and SAIM")
    batch_size: int = Field(16, ge=2, description="augmented views per step, all of one defect type (paper: 16)")
    steps: int | None = Field(None, ge=1, description="fit steps; None: finetune.max_steps (paper: 1000 epochs)")
    crop_range: tuple[float, float] = Field((0.75, 1.0), description="crop side / image side in augmentation")
    rotation: bool = rotation_field()
    defect_loss_weight: float = Field(
        0.0, ge=0, description="ours, for short fits: L_CALDM's error scaled by 1 + this inside the mask (paper: 0)"
    )
    localization_loss: bool = Field(True, description="ablation: γ·L_loc (Eq. 5)")
    localization_weight: float = Field(1e-3, ge=0, description="γ (paper: 0.001)")
    localization_form: Literal["balanced", "per_token"] = Field(
        "balanced", description="Eq. 5 as printed (mean over tokens inside the norm) or per token (outside)"
    )
    contrastive_loss: bool = Field(True, description="ablation: β·L_con (Eqs. 6-7)")
    contrastive_weight: float = Field(5e-4, ge=0, description="β (paper: 0.0005)")
    temperature: float = Field(0.5, gt=0, description="NT-Xent's τ (paper: unstated; SimCLR's 0.5)")
    attention_resolutions: tuple[int, ...] = Field(
        (16,), min_length=1, description="cross-attention sides L_loc reads (paper: unstated; IAR's 16)"
    )
    saim: bool = Field(True, description="ablation: false adds the ControlNet's residuals as a plain ControlNet")
    saim_heads: int = Field(4, ge=1, description="attention heads of each SAIM (paper: unstated)")
    control_scale: float = Field(
        1.0, ge=0, description="the ControlNet's conditioning scale; saim: false only (SAIM's RMSNorm cancels it)"
    )
    iar: bool = Field(True, description="ablation: intensity-controllable attention re-weighting (Eq. 11)")
    masked_focus: bool = Field(True, description="ablation: re-weight inside the mask only (MFA)")
    delayed_focus: bool = Field(True, description="ablation: re-weight once α_t > focus_threshold (DFS)")
    focus_threshold: float = Field(0.75, gt=0, le=1, description="α_thr (paper: 0.75)")
    focus_resolutions: tuple[int, ...] = Field(
        (16,), min_length=1, description="sides of the cross-attention layers IAR re-weights (paper: 16)"
    )
    focus_controlnet: bool = Field(
        False, description="ours: IAR also re-weights the ControlNet's cross-attention (paper: unstated)"
    )
    sampling_steps: int = Field(50, ge=1, description="DDIM steps of generation (paper: 50)")
    guidance_scale: float = Field(7.5, ge=1.0, description="classifier-free guidance (unstated; diffusers' 7.5)")
    x0_clamp: bool = x0_clamp_field()
    refine_threshold: float = Field(0.08, gt=0, lt=1, description="change (0-1) that marks a pixel as defect")
    generation_batch: int = Field(8, ge=1, description="images denoised together; the samples do not depend on it")

    @model_validator(mode="before")
    @classmethod
    def _one_focus_side(cls, data: Any) -> Any:
        """Settings saved before ``focus_resolutions`` name one side, ``focus_resolution``: a registered model loads."""
        if isinstance(data, dict) and "focus_resolution" in data:
            data = dict(data)
            data["focus_resolutions"] = (data.pop("focus_resolution"),)
        return data


def feature_at(taps: FeatureTaps, side: int) -> torch.Tensor:
    """The first U-Net up-block output of the call at ``side``×``side``: the features L_con's vectors pool."""
    for block in taps.unet_blocks:
        for features in taps.unet_features(block):
            if features.shape[-1] == side:
                return features
    msg = f"cadiff: no U-Net up block outputs {side}x{side} features for the contrastive loss"
    raise ValueError(msg)


def maps_by_side(maps: dict[str, torch.Tensor], positions: Sequence[int]) -> dict[int, torch.Tensor]:
    """Each side's layer maps of the tokens at ``positions``, averaged over the layers: (B, tokens, s, s)."""
    by_side: dict[int, list[torch.Tensor]] = {}
    for layer_maps in maps.values():
        by_side.setdefault(layer_maps.shape[-1], []).append(layer_maps[:, list(positions)])
    return {side: torch.stack(layers).mean(dim=0) for side, layers in by_side.items()}


def concept_maps(maps: torch.Tensor, is_context: Sequence[bool]) -> torch.Tensor:
    """(B, 2, s, s): the mean map of the contextual tokens, then of the anomaly tokens."""
    flags = torch.tensor(is_context, device=maps.device)
    return torch.stack([maps[:, flags].mean(dim=1), maps[:, ~flags].mean(dim=1)], dim=1)


def control_predictor(masks: torch.Tensor, fusion: SAIMFusion | None, scale: float) -> NoisePredictor:
    """The U-Net with the ControlNet on ``masks`` (B, 1, H, W): fused by SAIM, or added as a plain ControlNet."""
    if fusion is None:
        return ControlNetPredictor(image=mask_image(masks), scale=scale)
    return SAIMPredictor(image=mask_image(masks), fusion=fusion, scale=scale)


class ContextAwareLoss(torch.nn.Module):
    """Eq. 8 over the trained parts (token table, ControlNet, SAIM), so DeepSpeed sees the forward."""

    def __init__(
        self, model: DiffusionModel, prompts: ContextPrompts, fusion: SAIMFusion | None, s: CADiffSettings
    ) -> None:
        super().__init__()
        self.embedding = prompts.tokens.embedding
        self.controlnet = model.part(PART)
        self.fusion = fusion
        self.model, self.prompts, self.settings = model, prompts, s
        self.control = AttentionControl()
        self.recorder = self.control.record(Select(resolutions=set(s.attention_resolutions)), keep_grad=True)
        self.parts: dict[str, float] = {}

    def forward(
        self, images: torch.Tensor, masks: torch.Tensor, defect_type: str, generator: torch.Generator
    ) -> torch.Tensor:
        """L of one batch of augmented views (B, 3, H, W) in [-1, 1] of ``defect_type``, masks (B, 1, H, W)."""
        model, settings = self.model, self.settings
        layout = self.prompts.abnormal(defect_type)
        with torch.no_grad():
            latents = model.encode_images(images, generator)
        context = model.encode_prompt([layout.text] * len(images))
        taps = FeatureTaps(unet_blocks=range(len(model.unet.up_blocks)), keep_grad=True)
        self.control.begin_step(0, None)
        with taps.attached(model) if settings.contrastive_loss else nullcontext():
            predictor = control_predictor(masks, self.fusion, settings.control_scale)
            noise = denoising_loss(
                model, latents, context, generator, loss_mask=self._weights(masks, latents), predictor=predictor
            )
        maps = self._maps(layout)
        total = noise
        self.parts = {"noise": float(noise.detach())}
        if settings.localization_loss:
            balanced = settings.localization_form == "balanced"
            loc = localization_loss(maps, masks, layout.is_context, balanced=balanced)
            total = total + settings.localization_weight * loc
            self.parts["loc"] = float(loc.detach())
        if settings.contrastive_loss:
            side = settings.attention_resolutions[0]
            vectors = attention_pooled(feature_at(taps, side), concept_maps(maps[side], layout.is_context))
            con = nt_xent(vectors, settings.temperature)
            total = total + settings.contrastive_weight * con
            self.parts["con"] = float(con.detach())
        return total

    def _weights(self, masks: torch.Tensor, latents: torch.Tensor) -> torch.Tensor | None:
        """L_CALDM's per-cell weights, 1 + ``defect_loss_weight`` on the mask's latent cells (None: unweighted)."""
        return defect_loss_weights(masks, latents.shape[-1], self.settings.defect_loss_weight)

    def _maps(self, layout: PromptLayout) -> dict[int, torch.Tensor]:
        """This call's learnable-token maps by side; the recording is then dropped (no graph kept across steps)."""
        if 0 not in self.recorder.steps:
            sides = sorted(self.settings.attention_resolutions)
            msg = f"cadiff: the U-Net has no cross-attention at sides {sides} (attention_resolutions)"
            raise ValueError(msg)
        maps = maps_by_side(self.recorder.maps(0), layout.learnable)
        self.recorder.reset()
        missing = sorted(set(self.settings.attention_resolutions) - set(maps))
        if missing:
            msg = f"cadiff: the U-Net has no cross-attention at sides {missing} (attention_resolutions)"
            raise ValueError(msg)
        return maps


class CADiffGenerator:
    """Paper 004 on the shared diffusion core; see the module docstring."""

    name: ClassVar[str] = "cadiff"
    Settings: ClassVar[type[GeneratorSettings]] = CADiffSettings
    mask_sources: ClassVar[tuple[MaskSource, ...]] = ("real", "perlin")  # it has no mask model of its own
    uses_diffusion_base: ClassVar[bool] = True
    makes_normals: ClassVar[bool] = False
    keeps_background: ClassVar[bool] = True
    intensity: ClassVar[IntensityControl | None] = INTENSITY
    fit_unit: ClassVar[FitUnitKind] = "product"

    def __init__(self, settings: CADiffSettings) -> None:
        self.settings = settings
        self.model: DiffusionModel | None = None
        self.prompts: ContextPrompts | None = None
        self.fusion: SAIMFusion | None = None
        self.product: str | None = None
        self.defect_types: list[str] = []
        self.base_model: str | None = None
        self.latent_range: LatentRange | None = None  # of the training images' latents, for x0_clamp

    # -- fit ------------------------------------------------------------------------------------------------------

    def fit(self, data: ProductData, split: ProductSplit, context: FitContext) -> Path:
        """Train the tokens, the ControlNet and SAIM on the product's training defects; write the artifacts."""
        model = frozen_base(self.name, context)
        defects = load_training_defects([(data, split)], model.resolution)
        self._build(model, data.name, sorted({t for _, t in defects.keys}), context.base_model, seed=context.seed)
        self.latent_range = training_latent_range(model, defects.images)
        first, curve = self._resume(context)  # before the engine: DeepSpeed copies the weights
        steps = self.settings.steps or context.max_steps
        curve = self._train(defects, context, first, steps, curve)
        return self._save(context.output_dir, curve)

    def _build(self, model: DiffusionModel, product: str, types: list[str], base_model: str, *, seed: int) -> None:
        """The tokens, a ControlNet copied from the U-Net and the SAIMs (initialised from ``seed``) on ``model``."""
        prompts = ContextPrompts.add_tokens(model, product, types, anomaly_tokens=self.settings.anomaly_tokens)
        model.parts[PART] = new_controlnet(model)
        torch.manual_seed(seed)  # SAIM's initialisation depends on the seed alone
        self.fusion = SAIMFusion.for_model(model, heads=self.settings.saim_heads) if self.settings.saim else None
        self.model, self.prompts = model, prompts
        self.product, self.defect_types, self.base_model = product, types, base_model

    def _train(
        self, defects: TrainingDefects, context: FitContext, first: int, steps: int, curve: list[float]
    ) -> list[float]:
        """Eq. 8: the token rows, the ControlNet and SAIM, on batches of one defect type's augmented views."""
        settings, model, prompts = self.settings, self.model, self.prompts
        assert model is not None and prompts is not None
        controls = [model.part(PART), *([self.fusion] if self.fusion is not None else [])]
        for module in controls:
            module.requires_grad_(True).train()
        loss_module = ContextAwareLoss(model, prompts, self.fusion, settings)
        groups = [
            {"params": [prompts.tokens.trainable_rows()], "lr": settings.token_learning_rate, "weight_decay": 0.0},
            {"params": [p for module in controls for p in module.parameters()], "lr": settings.learning_rate},
        ]
        optimizer = torch.optim.AdamW(groups, weight_decay=settings.weight_decay)
        engine = TrainEngine(loss_module, optimizer, context.strategy, micro_batch_size=settings.batch_size)
        by_type = {t: [i for i, key in enumerate(defects.keys) if key[1] == t] for t in self.defect_types}
        with installed(model.unet, loss_module.control):
            for step in range(first, steps):
                rng = np.random.default_rng([context.seed, context.rank, step])  # per step: a resume replays it
                generator = torch.Generator().manual_seed(int(rng.integers(1 << 62)))
                defect_type = self.defect_types[int(rng.integers(len(self.defect_types)))]
                picks = rng.choice(by_type[defect_type], size=settings.batch_size)
                images, masks = augmented_batch(defects, picks, rng, settings.crop_range, settings.rotation)
                loss = engine(engine.to_device(images), engine.to_device(masks), defect_type, generator)
                engine.step(loss)
                prompts.tokens.restore_frozen_rows()
                curve.append(float(loss.detach()))
                context.report({"loss": curve[-1], **loss_module.parts, "step": float(step + 1)})
                context.checkpoint(step + 1, steps, self._write_weights, {"curve": curve})
        for module in controls:
            module.requires_grad_(False).eval()
        prompts.tokens.embedding.weight.requires_grad_(False)
        return curve

    # -- checkpoints and artifacts ----------------------------------------------------------------------------------

    def _resume(self, context: FitContext) -> tuple[int, list[float]]:
        """(first step, loss curve so far) from the checkpoint the context resumes from, or (0, [])."""
        progress = context.progress()
        if progress is None:
            return 0, []
        self._read_weights(context.resume_from)
        self.prompts.tokens.restore(context.resume_from / TOKENS_FILE)
        logger.info("cadiff: resuming at step %d", progress["step"])
        return int(progress["step"]), list(progress["curve"])

    def _write_weights(self, out: Path) -> None:
        """The learned token rows, the ControlNet (diffusers' layout, in ``controlnet/``) and the SAIMs."""
        assert self.model is not None and self.prompts is not None
        self.prompts.tokens.save(out / TOKENS_FILE)
        self.model.part(PART).save_pretrained(out / PART)
        if self.fusion is not None:
            save_file({k: v.detach().cpu().contiguous() for k, v in self.fusion.state_dict().items()}, out / SAIM_FILE)

    def _read_weights(self, directory: Path) -> None:
        """The ControlNet and SAIMs from ``directory`` onto the current model (the tokens: ``_resume`` or ``load``)."""
        model = self.model
        assert model is not None
        controlnet = ControlNetModel.from_pretrained(directory / PART)
        model.parts[PART] = controlnet.to(device=model.device, dtype=model.dtype)
        if self.fusion is not None:
            self.fusion.load_state_dict(load_file(str(directory / SAIM_FILE), device=str(model.device)))

    def _save(self, out: Path, curve: list[float]) -> Path:
        assert self.latent_range is not None
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        self._write_weights(out)
        (out / "curves.json").write_text(json.dumps({"loss": curve}))
        write_artifact_manifest(
            out,
            self.name,
            self.product,
            self.settings,
            base_model=self.base_model,
            defect_types=self.defect_types,
            **{LATENT_RANGE_FIELD: self.latent_range.to_json()},
        )
        return out

    # -- load -----------------------------------------------------------------------------------------------------

    def load(self, artifacts: Path) -> None:
        """The base model from the registry or its path, then the tokens, the ControlNet and the SAIMs."""
        manifest, fitted = read_artifact_manifest(artifacts, self)
        self.settings = fitted
        artifacts = Path(artifacts)
        model = load_base_model(manifest["base_model"]).to(compute_device()).eval()
        tokens = PlaceholderTokens.load(model, artifacts / TOKENS_FILE)
        self.model, self.product = model, manifest["product"]
        self.prompts = ContextPrompts(model, tokens, self.product)
        self.defect_types, self.base_model = list(manifest["defect_types"]), manifest["base_model"]
        self.fusion = SAIMFusion.for_model(model, heads=fitted.saim_heads) if fitted.saim else None
        self._read_weights(artifacts)
        self.latent_range = read_latent_range(manifest, artifacts, required=fitted.x0_clamp)
        for module in [model.part(PART), *([self.fusion] if self.fusion is not None else [])]:
            module.requires_grad_(False).eval()

    # -- generate -------------------------------------------------------------------------------------------------

    def generate(self, batch: list[Request]) -> list[Sample]:
        """One sample per request, in order; each depends only on its own request and seed, whatever the batch."""
        if self.model is None:
            msg = "cadiff: call fit() or load() before generate()"
            raise RuntimeError(msg)
        for request in batch:
            self._check(request)
        digest, step = settings_digest(self.settings), self.settings.generation_batch
        sources = [load_source(request) for request in batch]
        conds = [conditioning_mask(request, request_rngs(request)[0], MaskOptions()) for request in batch]
        weights = [self.weight(request) for request in batch]
        images = [source.copy() for source in sources]  # a mask left empty paints nothing (logged)
        painted = [i for i, cond in enumerate(conds) if cond.any()]
        if len(painted) < len(batch):
            logger.warning("cadiff: %d of %d conditioning masks empty", len(batch) - len(painted), len(batch))
        for start in range(0, len(painted), step):
            chunk = painted[start : start + step]
            made = self.paint(
                [sources[i] for i in chunk],
                [conds[i] for i in chunk],
                [batch[i].defect_type for i in chunk],
                [weights[i] for i in chunk],
                seeds=[batch[i].seed for i in chunk],
            )
            for i, image in zip(chunk, made, strict=True):
                images[i] = image
        return [
            refined_sample(
                request,
                method=self.name,
                source=source,
                image=image,
                cond_mask=cond,
                threshold=self.settings.refine_threshold,
                intensity=w,
                config_digest=digest,
                sampler=DDIMSampler.name,
                steps=self.settings.sampling_steps,
                base_model=self.base_model,
            )
            for request, source, image, cond, w in zip(batch, sources, images, conds, weights, strict=True)
        ]

    @staticmethod
    def weight(request: Request) -> float:
        """The request's w: its intensity, or a draw from U[0.5, 1.5] on its own sample stream."""
        if request.intensity is not None:
            return request.intensity
        return round(INTENSITY.draw_default(request_rngs(request)[1]), DECIMALS)

    def _check(self, request: Request) -> None:
        check_request(self, request)
        if request.product != self.product or request.defect_type not in self.defect_types:
            fitted = f"{self.product}/{self.defect_types}"
            msg = f"cadiff: no tokens for {request.product}/{request.defect_type}; fitted: {fitted}"
            raise ValueError(msg)
        if request.resolution != self.model.resolution:
            msg = f"cadiff: request resolution {request.resolution} != model's {self.model.resolution}"
            raise ValueError(msg)

    def paint(
        self,
        sources: Sequence[np.ndarray],
        masks: Sequence[np.ndarray],
        defect_types: Sequence[str],
        weights: Sequence[float],
        *,
        seeds: Sequence[int],
    ) -> list[np.ndarray]:
        """A defect of each type inside each mask on each source (uint8 H x W x 3), at intensity w, one seed each."""
        model, settings, prompts = self.model, self.settings, self.prompts
        assert model is not None and prompts is not None
        generators = generators_from_seeds(seeds)
        image_masks = torch.from_numpy(np.stack(masks)[:, None].astype(np.float32))
        layouts = [prompts.abnormal(t) for t in defect_types]
        guided = settings.guidance_scale > 1
        with torch.no_grad():
            normal = model.encode_images(to_model_range(sources))
            sampler = DDIMSampler.from_model(model)
            sampler.set_timesteps(settings.sampling_steps)
            blend = BlendTarget.draw(normal, latent_mask(image_masks, normal.shape[-1]).to(model.device), generators)
            control = AttentionControl()
            if settings.iar:
                control.focus(
                    image_masks.to(model.device),
                    tokens=layouts[0].anomaly,  # every type's prompt has the same layout
                    weight=torch.tensor(weights),
                    gate=DelayedFocusGate(settings.focus_threshold) if settings.delayed_focus else None,
                    where=Select(resolutions=set(settings.focus_resolutions), batch="cond" if guided else "all"),
                    inside_only=settings.masked_focus,
                )
            controlnet = model.part(PART) if settings.focus_controlnet else None
            focused_controlnet = installed(controlnet, control) if controlnet is not None else nullcontext()
            with installed(model.unet, control), focused_controlnet:
                final = denoise(
                    model,
                    blend.background(sampler, int(sampler.timesteps[0])),
                    model.encode_prompt([layout.text for layout in layouts]),
                    sampler=sampler,
                    uncond=model.encode_prompt([""]) if guided else None,
                    guidance_scale=settings.guidance_scale,
                    control=control,
                    blend=blend,
                    generators=generators,
                    predictor=control_predictor(image_masks, self.fusion, settings.control_scale),
                    x0_range=self.latent_range if settings.x0_clamp else None,
                )
            painted = to_uint8(model.decode_latents(final))
        # the decoded background differs from the source around the mask: its pixels are the source's
        return [np.where(m[..., None], p, s) for m, p, s in zip(masks, painted, sources, strict=True)]
