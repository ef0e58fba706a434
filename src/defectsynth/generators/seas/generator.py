"""SeaS (paper 002) as a platform generator: one model per product for its anomalies, its normals and their masks.

Fit, in two phases on the diffusion base (VAE and text encoder frozen):

1. Separation and Sharing fine-tuning: the U-Net and the new prompt tokens (<ob>, N <df> per type) train
   together on batches of equal numbers of abnormal and normal images, with L = L_df + L_ob (Eq. 6):
   L_df is the noise loss plus the DA loss on the abnormal images under their type's UA prompt (Eq. 3-4),
   L_ob the noise loss on normal images under "a <ob>" (Eq. 5). Two learning rates (U-Net, embeddings).
2. Refined Mask Prediction: the RMP branch learns, on the frozen generator's U-Net up-block features and
   the VAE decoder's up-block features, the defect masks of the abnormal images and empty masks of the
   normal ones (focal loss, Eq. 7).

Generation: a real normal (the request's source, drawn across the normal pool by the job) is noised as the
authors do for "t = 1500" and denoised for 25 steps (``sampler``) under the type's UA prompt; the mask is the RMP's
refined prediction averaged over the last 3 steps and thresholded at τ = 0.2 (the sample's own mask). Under
"a <ob>" the same gives a normal image (label 0). SeaS remakes the whole image: its samples carry no
conditioning mask.

Ablations (paper Tables 5, 6, 12): ``prompt: generic``, ``mixed_training: false`` (Table 12's Abnormal-Normal
order instead of mixed batches), ``normal_alignment: false`` (no L_ob), ``da_second_term: false`` and
``mask.refinement: coarse_only``. Table 5's row b (one model per anomaly type) needs a per-type fit, which a
product-level method does not do; the mixed batches are the switch offered for it.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import ClassVar, Literal

import numpy as np
import torch
from pydantic import Field, model_validator
from safetensors.torch import load_file, save_file

from defectsynth.core.devices import compute_device
from defectsynth.core.resize import resize_image
from defectsynth.core.train_engine import TrainEngine
from defectsynth.diffusion.attention import AttentionControl, Select, installed
from defectsynth.diffusion.ddim import DDIMSampler
from defectsynth.diffusion.factory import load_base_model
from defectsynth.diffusion.features import FeatureTaps
from defectsynth.diffusion.latent_range import LatentRange
from defectsynth.diffusion.model import DiffusionModel
from defectsynth.diffusion.pretrain import denoising_loss
from defectsynth.diffusion.preview import to_uint8
from defectsynth.diffusion.sampling import (
    denoise,
    generators_from_seeds,
    initial_noise,
    noised_start,
    sampler_from_model,
)
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
from defectsynth.generators.frozen_base import frozen_base
from defectsynth.generators.intensity import IntensityControl
from defectsynth.generators.latent_clamp import (
    LATENT_RANGE_FIELD,
    read_latent_range,
    training_latent_range,
    x0_clamp_field,
)
from defectsynth.generators.masks import load_source
from defectsynth.generators.refine import measured_sample, normal_sample, settings_digest
from defectsynth.generators.seas.alignment import decoupled_anomaly_alignment, token_mean
from defectsynth.generators.seas.mask_prediction import (
    MaskPredictionSettings,
    RefinedMaskPrediction,
    binary_mask,
    mask_prediction_loss,
)
from defectsynth.generators.seas.prompt import (
    AnomalyInitializer,
    PromptLayout,
    PromptStyle,
    SeaSPrompts,
    add_prompt_tokens,
)
from defectsynth.generators.training_pairs import (
    TrainingDefects,
    augment_pair,
    defect_loss_weights,
    load_training_defects,
    random_orientation,
    to_model_range,
)
from defectsynth.storage.imageio import load_item
from defectsynth.storage.records import ProductData
from defectsynth.storage.sample import Sample
from defectsynth.storage.split import ProductSplit

logger = logging.getLogger(__name__)

TOKENS_FILE, UNET_FILE, RMP_FILE = "tokens.safetensors", "unet.safetensors", "rmp.safetensors"
GENERATOR_PHASE, MASK_PHASE = "generator", "mask"
NegativePrompt = Literal["empty", "normal"]
SamplerName = Literal["ddim", "dpm_solver++"]


class SeaSSettings(GeneratorSettings):
    """Paper 002's settings; the defaults are the paper's (Stable Diffusion scale), the config sizes them for a CPU."""

    normal_tokens: int = Field(1, ge=1, description="N', <ob> tokens (paper: 1)")
    anomaly_tokens: int = Field(4, ge=1, description="N, <df> tokens per defect type (paper: 4)")
    prompt: PromptStyle = Field("unbalanced", description="ablation 'generic': plain words, no learned tokens")
    unet_learning_rate: float = Field(4e-6, gt=0, description="AdamW rate of the U-Net (paper: 4e-6)")
    embedding_learning_rate: float = Field(4e-5, gt=0, description="AdamW rate of the new token rows (paper: 4e-5)")
    weight_decay: float = Field(0.01, ge=0, description="AdamW weight decay (the authors' code: 0.01)")
    batch_size: int = Field(4, ge=2, description="images per step, half abnormal and half normal (paper: 2 + 2)")
    normal_images: int = Field(60, ge=1, description="training normals drawn from the split (paper: 60)")
    mixed_training: bool = Field(True, description="ablation: false trains on abnormal, then on normal images")
    normal_alignment: bool = Field(True, description="ablation: the NA loss L_ob on normal images (Eq. 5)")
    da_second_term: bool = Field(True, description="ablation: the DA loss's second term, <ob> out of the mask")
    defect_loss_weight: float = Field(
        0.0, ge=0, description="ours, for short fits: L_df's noise error scaled by 1 + this inside the mask (paper: 0)"
    )
    anomaly_initializer: AnomalyInitializer = Field(
        "defect", description="the <df> rows' start: the word 'defect' for every type (the authors'), or 'type_name'"
    )
    alignment_blocks: tuple[int, ...] = Field(
        (1, 2), description="U-Net down blocks whose cross-attention the DA loss reads (SD: down-2, down-3)"
    )
    crop_range: tuple[float, float] = Field((1.0, 1.0), description="crop side / image side (1: no crop)")
    rotation: bool = Field(
        True,
        description="the authors' datasets.rotation: training anomalies and normals flipped and turned by quarters "
        "(they turn it off for VisA, whose products have an orientation)",
    )
    mask: MaskPredictionSettings = Field(default_factory=MaskPredictionSettings)
    steps_per_type: int | None = Field(
        800, ge=1, description="fine-tuning steps per defect type (paper: 800 x types); None: finetune.max_steps"
    )
    mask_steps_per_type: int | None = Field(
        800, ge=1, description="RMP steps per defect type (paper: 800 x types); None: as many as the fine-tuning"
    )
    mask_batch_size: int = Field(4, ge=2, description="RMP images per step, half abnormal (paper: 2 + 2)")
    mask_unet_blocks: tuple[int, int] = Field((1, 2), description="U-Net up blocks of the coarse features (up-2, up-3)")
    mask_vae_blocks: tuple[int, ...] = Field((0, 1, 2), description="VAE decoder up blocks the MRMs fuse, in order")
    mask_timesteps: tuple[int, int] = Field(
        (0, 1000), description="[low, high) of the RMP training timesteps (the authors': all; the paper: unstated)"
    )
    sampling_steps: int = Field(25, ge=1, description="denoising steps of generation (paper: 25)")
    sampler: SamplerName = Field(
        "dpm_solver++",
        description="the sampler of generation: 'dpm_solver++' (the authors' DPM-Solver++(2M); the paper names none) "
        "or 'ddim'",
    )
    eta: float = Field(0.0, ge=0, description="DDIM η of generation (ours; 'ddim' only): 0 deterministic, 1 DDPM-like")
    start_noise_step: int = Field(
        1500, ge=1, description="the normal is noised as at this step (paper: 1500); below T, denoising starts there"
    )
    guidance_scale: float = Field(8.0, ge=1.0, description="classifier-free guidance (unstated; authors' MVTec: 8)")
    negative_prompt: NegativePrompt = Field(
        "empty",
        description="guidance's unconditional prompt: 'empty' (the authors'), or 'normal', \"a <ob>\" (ours: "
        "guidance then amplifies only what the <df> tokens add, not the product)",
    )
    x0_clamp: bool = x0_clamp_field()
    mask_average_steps: int = Field(3, ge=1, description="last steps whose RMP masks are averaged (paper: 3)")
    generation_batch: int = Field(8, ge=1, description="images denoised together; the samples do not depend on it")

    @model_validator(mode="after")
    def _eta_needs_ddim(self) -> SeaSSettings:
        if self.eta > 0 and self.sampler != "ddim":
            msg = f"seas: eta {self.eta} needs sampler 'ddim'; {self.sampler!r} is deterministic"
            raise ValueError(msg)
        return self


def extended_alpha_bar(model: DiffusionModel, step: int) -> float:
    """ᾱ at ``step`` of the model's beta schedule stretched to ``step`` steps: the authors' reading of "t = 1500".

    Their ``add_morenoise`` rebuilds the betas from the same start and end over 1500 steps and noises the
    normal with the last ᾱ (≈ 2.4e-4 for Stable Diffusion's schedule, against 4.7e-3 at t = 999), then
    denoises the usual schedule from its first step: the normal keeps a trace of its layout, not more.
    """
    config = model.scheduler.config
    if config.beta_schedule == "scaled_linear":
        betas = torch.linspace(config.beta_start**0.5, config.beta_end**0.5, step, dtype=torch.float64) ** 2
    elif config.beta_schedule == "linear":
        betas = torch.linspace(config.beta_start, config.beta_end, step, dtype=torch.float64)
    else:
        msg = f"seas: cannot stretch the {config.beta_schedule!r} beta schedule to {step} steps"
        raise ValueError(msg)
    return float(torch.prod(1.0 - betas))


def previous_latents(model: DiffusionModel, noisy: torch.Tensor, output: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """One deterministic DDIM step from t to t - 1 per sample (x_0 itself at t = 0), for the RMP's VAE features."""
    alphas = model.scheduler.alphas_cumprod.to(noisy.device, torch.float32)
    t = t.to(noisy.device)
    a_t = alphas[t].view(-1, 1, 1, 1)
    a_prev = torch.where(t > 0, alphas[(t - 1).clamp_min(0)], torch.ones_like(t, dtype=torch.float32)).view(-1, 1, 1, 1)
    if model.scheduler.config.prediction_type == "v_prediction":
        x0 = a_t.sqrt() * noisy - (1 - a_t).sqrt() * output
        eps = a_t.sqrt() * output + (1 - a_t).sqrt() * noisy
    else:
        eps = output
        x0 = (noisy - (1 - a_t).sqrt() * eps) / a_t.sqrt()
    return a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps


def decoder_features(model: DiffusionModel, latents: torch.Tensor, blocks: Sequence[int]) -> list[torch.Tensor]:
    """The VAE decoder's up-block outputs while decoding ``latents``, one per block in order."""
    taps = FeatureTaps(vae_blocks=blocks)
    with taps.attached(model):
        model.decode_latents(latents)
    return [taps.vae_features(block)[-1] for block in blocks]


def new_mask_prediction(model: DiffusionModel, settings: SeaSSettings) -> RefinedMaskPrediction:
    """An RMP branch sized to ``model``'s chosen U-Net and VAE-decoder up blocks, on the model's device."""
    unet_widths = list(reversed(model.unet.config.block_out_channels))  # up block i outputs the i-th of these
    vae_widths = list(reversed(model.vae.config.block_out_channels))
    return RefinedMaskPrediction(
        tuple(unet_widths[b] for b in settings.mask_unet_blocks),
        tuple(vae_widths[b] for b in settings.mask_vae_blocks),
        settings.mask,
    ).to(model.device)


def load_normals(data: ProductData, split: ProductSplit, count: int, resolution: int) -> list[np.ndarray]:
    """The first ``count`` training normals of the split (never a held-out one), resized."""
    ids = list(split.train_normals)[:count]
    if not ids:
        msg = f"{data.name}: no training normals in the split"
        raise ValueError(msg)
    return [resize_image(load_item(data.record(i)).image, resolution) for i in ids]


class SeparationSharingLoss(torch.nn.Module):
    """Eq. 6 over the trained parts (U-Net, token table), so DeepSpeed sees the forward; parts kept for logging."""

    def __init__(self, model: DiffusionModel, prompts: SeaSPrompts, settings: SeaSSettings) -> None:
        super().__init__()
        self.unet = model.unet
        if prompts.tokens is not None:
            self.embedding = prompts.tokens.embedding
        self.model, self.prompts, self.settings = model, prompts, settings
        self.control = AttentionControl()
        paths = [f"down_blocks.{block}.*" for block in settings.alignment_blocks]
        self.recorder = self.control.record(Select(paths=paths, steps={0}), keep_grad=True)
        self.parts: dict[str, float] = {}

    def forward(
        self,
        abnormal: torch.Tensor,
        masks: torch.Tensor,
        types: list[str],
        normal: torch.Tensor,
        generator: torch.Generator,
    ) -> torch.Tensor:
        """L_df on the abnormal images (B, 3, H, W) of ``types`` with masks (B, 1, H, W), plus L_ob on ``normal``."""
        model, self.parts = self.model, {}
        total = torch.zeros((), device=model.device)
        if len(abnormal):
            layouts = [self.prompts.abnormal(t) for t in types]
            self.control.begin_step(0, None)  # recorded: the DA loss reads these maps
            latents = self._latents(abnormal, generator)
            weights = defect_loss_weights(masks, latents.shape[-1], self.settings.defect_loss_weight)
            noise = denoising_loss(model, latents, self._context(layouts), generator, loss_mask=weights)
            alignment = self._alignment(layouts, masks)
            total = total + noise + alignment
            self.parts |= {"noise_df": float(noise.detach()), "da": float(alignment.detach())}
        if len(normal) and self.settings.normal_alignment:
            self.control.begin_step(1, None)  # not recorded
            context = self._context([self.prompts.normal()] * len(normal))
            loss_ob = denoising_loss(model, self._latents(normal, generator), context, generator)
            total = total + loss_ob
            self.parts["na"] = float(loss_ob.detach())
        return total

    def _latents(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        with torch.no_grad():
            return self.model.encode_images(images, generator)

    def _context(self, layouts: Sequence[PromptLayout]) -> torch.Tensor:
        return self.model.encode_prompt([layout.text for layout in layouts])

    def _alignment(self, layouts: Sequence[PromptLayout], masks: torch.Tensor) -> torch.Tensor:
        """Σ over resolutions of Eq. 3, each resolution's layer maps averaged; the recording is then dropped."""
        if 0 not in self.recorder.steps:
            msg = f"seas: no cross-attention in U-Net down blocks {self.settings.alignment_blocks}"
            raise ValueError(msg)
        maps = self.recorder.maps(0)
        self.recorder.reset()
        by_side: dict[int, list[torch.Tensor]] = {}
        for layer_maps in maps.values():
            by_side.setdefault(layer_maps.shape[-1], []).append(layer_maps)
        loss = torch.zeros((), device=masks.device)
        for layers in by_side.values():
            mean = torch.stack(layers).mean(dim=0)
            anomaly = token_mean(mean, [layout.anomaly for layout in layouts])
            normal = token_mean(mean, [layout.normal for layout in layouts])
            loss = loss + decoupled_anomaly_alignment(
                anomaly, normal, masks, second_term=self.settings.da_second_term
            ).to(loss.device)
        return loss


class MaskPredictionLoss(torch.nn.Module):
    """Eq. 7 over the RMP branch: features of the frozen generator at a random timestep, focal losses."""

    def __init__(self, model: DiffusionModel, rmp: RefinedMaskPrediction, settings: SeaSSettings) -> None:
        super().__init__()
        self.rmp = rmp
        self.model, self.settings = model, settings

    def forward(
        self, images: torch.Tensor, masks: torch.Tensor, context: torch.Tensor, normal: torch.Tensor, seed: torch.Tensor
    ) -> torch.Tensor:
        """Images (B, 3, H, W) in [-1, 1], masks (B, 1, H, W) (zeros for normals), prompt context, normal flags.

        ``seed`` (an integer tensor, so batches pass through ``TrainEngine.to_device``) draws the timesteps and noise.
        """
        model, settings = self.model, self.settings
        generator = torch.Generator().manual_seed(int(seed))
        with torch.no_grad():
            latents = model.encode_images(images, generator).float()
            low, high = settings.mask_timesteps
            t = torch.randint(low, high, (len(latents),), generator=generator)
            noise = torch.randn(latents.shape, generator=generator).to(latents)
            noisy = model.scheduler.add_noise(latents, noise, t)
            taps = FeatureTaps(unet_blocks=settings.mask_unet_blocks)
            with taps.attached(model):
                output = model.unet(noisy.to(model.dtype), t.to(model.device), encoder_hidden_states=context).sample
            unet_features = [taps.unet_features(block)[-1].float() for block in settings.mask_unet_blocks]
            vae = decoder_features(model, previous_latents(model, noisy, output.float(), t), settings.mask_vae_blocks)
        prediction = self.rmp(unet_features, [v.float() for v in vae], images.shape[-1], normal=normal)
        return mask_prediction_loss(prediction, masks, normal, settings.mask.focal_gamma)


class SeaSGenerator:
    """Paper 002 on the shared diffusion core; see the module docstring."""

    name: ClassVar[str] = "seas"
    Settings: ClassVar[type[GeneratorSettings]] = SeaSSettings
    mask_sources: ClassVar[tuple[MaskSource, ...]] = ("learned",)  # its masks are the RMP's
    uses_diffusion_base: ClassVar[bool] = True
    makes_normals: ClassVar[bool] = True
    keeps_background: ClassVar[bool] = False
    intensity: ClassVar[IntensityControl | None] = None
    fit_unit: ClassVar[FitUnitKind] = "product"

    def __init__(self, settings: SeaSSettings) -> None:
        self.settings = settings
        self.model: DiffusionModel | None = None
        self.tokens: PlaceholderTokens | None = None
        self.prompts: SeaSPrompts | None = None
        self.rmp: RefinedMaskPrediction | None = None
        self.product: str | None = None
        self.defect_types: list[str] = []
        self.base_model: str | None = None
        self.latent_range: LatentRange | None = None  # of the training images' latents, for x0_clamp

    # -- fit ------------------------------------------------------------------------------------------------------

    def fit(self, data: ProductData, split: ProductSplit, context: FitContext) -> Path:
        """Fine-tune the U-Net and the prompt tokens, then train the RMP branch; write the artifacts."""
        model = frozen_base(self.name, context)  # the U-Net is unfrozen for the generator phase
        defects = load_training_defects([(data, split)], model.resolution)
        normals = load_normals(data, split, self.settings.normal_images, model.resolution)
        self._build(model, data.name, sorted({t for _, t in defects.keys}), context.base_model, seed=context.seed)
        self.latent_range = training_latent_range(model, [*defects.images, *normals])
        phase, first, curves = self._resume(context)
        steps, mask_steps = self._steps(len(self.defect_types), context.max_steps)
        if phase == GENERATOR_PHASE:
            curves = self._fit_generator(defects, normals, context, first, steps, curves)
            first = 0
        self._fit_mask_prediction(defects, normals, context, first, mask_steps, curves)
        return self._save(context.output_dir, curves)

    def _steps(self, types: int, max_steps: int) -> tuple[int, int]:
        """Fine-tuning and RMP steps: per defect type times the product's types, or ``finetune.max_steps``."""
        settings = self.settings
        steps = max_steps if settings.steps_per_type is None else settings.steps_per_type * types
        mask_steps = steps if settings.mask_steps_per_type is None else settings.mask_steps_per_type * types
        return steps, mask_steps

    def _build(self, model: DiffusionModel, product: str, types: list[str], base_model: str, *, seed: int) -> None:
        """The prompt tokens and the RMP branch on ``model`` (initialised from ``seed``)."""
        settings = self.settings
        tokens = None
        if settings.prompt == "unbalanced":
            tokens = PlaceholderTokens(model)
            add_prompt_tokens(
                tokens,
                product,
                types,
                normal=settings.normal_tokens,
                anomaly=settings.anomaly_tokens,
                initializer=settings.anomaly_initializer,
            )
        prompts = SeaSPrompts(model, tokens, product, settings.prompt)
        for defect_type in types:  # refuse a prompt the text encoder would truncate, before any training
            prompts.abnormal(defect_type)
        torch.manual_seed(seed)  # the RMP's initialisation depends on the seed alone
        rmp = new_mask_prediction(model, settings)
        self.model, self.tokens, self.prompts, self.rmp = model, tokens, prompts, rmp
        self.product, self.defect_types, self.base_model = product, types, base_model

    def _fit_generator(
        self,
        defects: TrainingDefects,
        normals: list[np.ndarray],
        context: FitContext,
        first: int,
        steps: int,
        curves: dict[str, list[float]],
    ) -> dict[str, list[float]]:
        """Eq. 6: the U-Net and the new token rows, on mixed batches (or abnormal first, then normal)."""
        settings, model = self.settings, self.model
        assert model is not None and self.prompts is not None
        loss_module = SeparationSharingLoss(model, self.prompts, settings)
        model.unet.requires_grad_(True).train()
        groups = [{"params": list(model.unet.parameters()), "lr": settings.unet_learning_rate}]
        if self.tokens is not None:
            groups.append({"params": [self.tokens.trainable_rows()], "lr": settings.embedding_learning_rate})
        optimizer = torch.optim.AdamW(groups, weight_decay=settings.weight_decay)
        engine = TrainEngine(loss_module, optimizer, context.strategy, micro_batch_size=settings.batch_size)
        curve = curves.setdefault("generator_loss", [])
        with installed(model.unet, loss_module.control):
            for step in range(first, steps):
                rng = np.random.default_rng([context.seed, context.rank, step])  # per step: a resume replays it
                generator = torch.Generator().manual_seed(int(rng.integers(1 << 62)))
                n_abnormal = self._abnormal_share(step, steps)
                images, masks, types, chosen = self._draw(defects, normals, rng, n_abnormal, settings.batch_size)
                loss = engine(
                    engine.to_device(self._batch(images, model)),
                    engine.to_device(self._masks(masks, model)),
                    types,
                    engine.to_device(self._batch(chosen, model)),
                    generator,
                )
                engine.step(loss)
                if self.tokens is not None:
                    self.tokens.restore_frozen_rows()
                curve.append(float(loss.detach()))
                context.report({"loss": curve[-1], **loss_module.parts, "step": float(step + 1)})
                progress = {"phase": GENERATOR_PHASE, "curves": curves}
                context.checkpoint(step + 1, steps, self._write_weights, progress)
        model.unet.requires_grad_(False).eval()
        if self.tokens is not None:
            self.tokens.embedding.weight.requires_grad_(False)
        return curves

    def _abnormal_share(self, step: int, steps: int) -> int:
        """Abnormal images in this step's batch: half when mixed, all or none in the Abnormal-Normal order."""
        size = self.settings.batch_size
        if not self.settings.normal_alignment:
            return size
        if self.settings.mixed_training:
            return size // 2
        return size if step < steps // 2 else 0

    def _draw(
        self, defects: TrainingDefects, normals: list[np.ndarray], rng: np.random.Generator, abnormal: int, size: int
    ) -> tuple[list[np.ndarray], list[np.ndarray], list[str], list[np.ndarray]]:
        """``abnormal`` augmented defects (images, masks, types) and ``size - abnormal`` normals, drawn from ``rng``."""
        settings = self.settings
        picks = rng.integers(len(defects.images), size=abnormal)
        pairs = [
            augment_pair(defects.images[i], defects.masks[i], rng, settings.crop_range, orient=settings.rotation)
            for i in picks
        ]
        chosen = [normals[i] for i in rng.integers(len(normals), size=size - abnormal)]
        if settings.rotation:  # the authors' one transform turns and flips the normals as it does the anomalies
            chosen = [random_orientation([normal], rng)[0] for normal in chosen]
        return [p[0] for p in pairs], [p[1] for p in pairs], [defects.keys[i][1] for i in picks], chosen

    @staticmethod
    def _batch(images: Sequence[np.ndarray], model: DiffusionModel) -> torch.Tensor:
        side = model.resolution
        return to_model_range(images) if len(images) else torch.zeros(0, 3, side, side)

    @staticmethod
    def _masks(masks: Sequence[np.ndarray], model: DiffusionModel) -> torch.Tensor:
        side = model.resolution
        if not len(masks):
            return torch.zeros(0, 1, side, side)
        return torch.from_numpy(np.stack(masks)[:, None].astype(np.float32))

    def _fit_mask_prediction(
        self,
        defects: TrainingDefects,
        normals: list[np.ndarray],
        context: FitContext,
        first: int,
        steps: int,
        curves: dict[str, list[float]],
    ) -> None:
        """Eq. 7 on the frozen generator; BatchNorm statistics re-estimated at the final weights."""
        settings, model, prompts, rmp = self.settings, self.model, self.prompts, self.rmp
        assert model is not None and prompts is not None and rmp is not None
        loss_module = MaskPredictionLoss(model, rmp, settings)
        optimizer = torch.optim.AdamW(
            rmp.parameters(), lr=settings.mask.learning_rate, weight_decay=settings.weight_decay
        )
        engine = TrainEngine(loss_module, optimizer, context.strategy, micro_batch_size=settings.mask_batch_size)
        rmp.train()
        curve = curves.setdefault("mask_loss", [])

        def batch(step: int) -> tuple[torch.Tensor, ...]:
            rng = np.random.default_rng([context.seed, context.rank, 1_000_003, step])
            seed = torch.tensor(int(rng.integers(1 << 62)))
            n_abnormal = settings.mask_batch_size // 2
            abnormal, masks, types, chosen = self._draw(defects, normals, rng, n_abnormal, settings.mask_batch_size)
            images = self._batch(abnormal + chosen, model)
            masks = self._masks(masks + [np.zeros(m.shape[:2], bool) for m in chosen], model)
            layouts = [prompts.abnormal(t) for t in types] + [prompts.normal()] * len(chosen)
            with torch.no_grad():
                context_ = model.encode_prompt([layout.text for layout in layouts])
            normal = torch.tensor([False] * n_abnormal + [True] * len(chosen))
            return images, masks, context_, normal, seed

        for step in range(first, steps):
            loss = engine(*(engine.to_device(t) for t in batch(step)))
            engine.step(loss)
            curve.append(float(loss.detach()))
            context.report({"mask_loss": curve[-1], "mask_step": float(step + 1)})
            context.checkpoint(step + 1, steps, self._write_weights, {"phase": MASK_PHASE, "curves": curves})
        engine.recompute_batch_norm(batch(steps + i) for i in range(8))
        rmp.eval().requires_grad_(False)

    # -- checkpoints and artifacts ----------------------------------------------------------------------------------

    def _resume(self, context: FitContext) -> tuple[str, int, dict[str, list[float]]]:
        """(phase, first step, curves so far) from the context's checkpoint, or the start of the generator phase."""
        progress = context.progress()
        if progress is None:
            return GENERATOR_PHASE, 0, {}
        self._read_weights(context.resume_from)
        logger.info("seas: resuming the %s phase at step %d", progress["phase"], progress["step"])
        return progress["phase"], int(progress["step"]), dict(progress["curves"])

    def _write_weights(self, out: Path) -> None:
        """The fine-tuned U-Net, the learned token rows and the RMP branch."""
        assert self.model is not None and self.rmp is not None
        save_file({k: v.detach().cpu().contiguous() for k, v in self.model.unet.state_dict().items()}, out / UNET_FILE)
        save_file({k: v.detach().cpu().contiguous() for k, v in self.rmp.state_dict().items()}, out / RMP_FILE)
        if self.tokens is not None:
            self.tokens.save(out / TOKENS_FILE)

    def _read_weights(self, directory: Path) -> None:
        assert self.model is not None and self.rmp is not None
        self.model.unet.load_state_dict(load_file(str(directory / UNET_FILE), device=str(self.model.device)))
        self.rmp.load_state_dict(load_file(str(directory / RMP_FILE), device=str(self.model.device)))
        if self.tokens is not None:
            self.tokens.restore(directory / TOKENS_FILE)

    def _save(self, out: Path, curves: dict[str, list[float]]) -> Path:
        assert self.latent_range is not None
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        self._write_weights(out)
        (out / "curves.json").write_text(json.dumps(curves))
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
        """The base model from the registry or its path, then the fine-tuned U-Net, the tokens and the RMP."""
        manifest, fitted = read_artifact_manifest(artifacts, self)
        self.settings = fitted
        model = load_base_model(manifest["base_model"]).to(compute_device()).eval()
        artifacts = Path(artifacts)
        self.tokens = PlaceholderTokens.load(model, artifacts / TOKENS_FILE) if fitted.prompt == "unbalanced" else None
        self.model, self.rmp = model, new_mask_prediction(model, fitted)
        self.product, self.defect_types = manifest["product"], list(manifest["defect_types"])
        self.base_model = manifest["base_model"]
        self.prompts = SeaSPrompts(model, self.tokens, self.product, fitted.prompt)
        self._read_weights(artifacts)
        self.rmp.eval().requires_grad_(False)
        self.latent_range = read_latent_range(manifest, artifacts, required=fitted.x0_clamp)

    # -- generate -------------------------------------------------------------------------------------------------

    def generate(self, batch: list[Request]) -> list[Sample]:
        """One sample per request, in order: an anomaly with the RMP's mask, or a normal for a label-0 request."""
        if self.model is None:
            msg = "seas: call fit() or load() before generate()"
            raise RuntimeError(msg)
        for request in batch:
            self._check(request)
        digest, step = settings_digest(self.settings), self.settings.generation_batch
        sources = [load_source(request) for request in batch]
        images: list[np.ndarray] = []
        masks: list[np.ndarray] = []
        for start in range(0, len(batch), step):
            chunk = slice(start, start + step)
            made, drawn = self.synthesize(sources[chunk], batch[chunk])
            images += made
            masks += drawn
        return [self._sample(r, s, i, m, digest) for r, s, i, m in zip(batch, sources, images, masks, strict=True)]

    def _sample(self, request: Request, source: np.ndarray, image: np.ndarray, mask: np.ndarray, digest: str) -> Sample:
        made = {"sampler": self.settings.sampler, "steps": self.settings.sampling_steps, "base_model": self.base_model}
        if request.label == 0:
            return normal_sample(request, method=self.name, image=image, intensity=None, config_digest=digest, **made)
        return measured_sample(
            request,
            method=self.name,
            source=source,
            image=image,
            mask=mask,
            cond_mask=None,
            intensity=None,
            config_digest=digest,
            **made,
        )

    def _check(self, request: Request) -> None:
        check_request(self, request)
        if request.product != self.product:
            msg = f"seas: a model of {self.product}, asked for {request.product}"
            raise ValueError(msg)
        if request.label == 1 and request.defect_type not in self.defect_types:
            msg = f"seas: no tokens for {request.product}/{request.defect_type}; fitted: {self.defect_types}"
            raise ValueError(msg)
        if request.resolution != self.model.resolution:
            msg = f"seas: request resolution {request.resolution} != model's {self.model.resolution}"
            raise ValueError(msg)

    def synthesize(self, sources: Sequence[np.ndarray], requests: Sequence[Request]) -> tuple[list, list]:
        """Images (uint8 H x W x 3) and RMP masks (bool H x W) for requests on their sources, one seed each."""
        model, settings, prompts = self.model, self.settings, self.prompts
        assert model is not None and prompts is not None
        layouts = [prompts.normal() if r.label == 0 else prompts.abnormal(r.defect_type) for r in requests]
        generators = generators_from_seeds([r.seed for r in requests])
        with torch.no_grad():
            sampler = sampler_from_model(settings.sampler, model, eta=settings.eta)
            sampler.set_timesteps(settings.sampling_steps)
            latents, start = self.noised_normals(model.encode_images(to_model_range(sources)), sampler, generators)
            steps = len(sampler.timesteps)
            kept = list(range(max(start, steps - settings.mask_average_steps), steps))
            taps = FeatureTaps(unet_blocks=settings.mask_unet_blocks, steps=set(kept))
            inputs = {start: latents}  # the latents each step starts from: what the RMP's VAE features decode

            def keep_input(index: int, timestep: int, current: torch.Tensor, pred_x0: torch.Tensor) -> None:
                if index + 1 in kept:
                    inputs[index + 1] = current

            guided = settings.guidance_scale > 1
            with taps.attached(model):
                final = denoise(
                    model,
                    latents,
                    model.encode_prompt([layout.text for layout in layouts]),
                    sampler=sampler,
                    uncond=self._unconditional() if guided else None,
                    guidance_scale=settings.guidance_scale,
                    start_index=start,
                    control=taps,
                    on_step=keep_input,
                    generators=generators,
                    x0_range=self.latent_range if settings.x0_clamp else None,
                )
            images = list(to_uint8(model.decode_latents(final)))
            masks = self._masks_at(taps, inputs, kept, len(requests), guided)
        return images, masks

    def _unconditional(self) -> torch.Tensor:
        """The guidance's unconditional context (1, L, D): the empty prompt, or the normal prompt."""
        assert self.model is not None and self.prompts is not None
        text = self.prompts.normal().text if self.settings.negative_prompt == "normal" else ""
        return self.model.encode_prompt([text])

    def noised_normals(
        self, normal: torch.Tensor, sampler: DDIMSampler, generators: Sequence[torch.Generator]
    ) -> tuple[torch.Tensor, int]:
        """The normals' latents noised as at ``start_noise_step``, and the step index denoising starts from.

        At or beyond the schedule's T the authors' stretched schedule gives the noise and denoising runs every
        step; below T the latents are forward-noised to that timestep and denoising starts there (SDEdit), the
        reading that keeps more of the normal's layout.
        """
        noise = initial_noise(normal.shape[1:], generators, dtype=normal.dtype, device=normal.device)
        step = self.settings.start_noise_step
        if step >= sampler.num_train_timesteps:
            alpha = extended_alpha_bar(self.model, step)
            return alpha**0.5 * normal + (1 - alpha) ** 0.5 * noise, 0
        return noised_start(sampler, normal, timestep=step, noise=noise)

    def _masks_at(
        self, taps: FeatureTaps, inputs: dict[int, torch.Tensor], kept: list[int], count: int, guided: bool
    ) -> list[np.ndarray]:
        """The RMP's refined masks at the kept steps (conditional half of a guided batch), averaged, thresholded."""
        model, settings, rmp = self.model, self.settings, self.rmp
        assert model is not None and rmp is not None
        refined = []
        for j, index in enumerate(kept):
            unet_features = [taps.unet_features(block)[j][-count:].float() for block in settings.mask_unet_blocks]
            vae = [v.float() for v in decoder_features(model, inputs[index], settings.mask_vae_blocks)]
            refined.append(rmp(unet_features, vae, model.resolution).refined)
        mean = torch.stack(refined).mean(dim=0)
        return list(binary_mask(mean, settings.mask.threshold).cpu().numpy())
