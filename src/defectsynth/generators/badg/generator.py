"""BADG (paper 001) as a platform generator: a defect grown on a target normal image, its background kept.

Fit, once per defect type (``fit_unit = "defect_type"``): the U-Net alone is fine-tuned (VAE and text encoder
frozen) with the disentanglement loss (Eq. 5), ``||m⊙(ε − ε_θ(z_t, t, C1))||² + ||(1−m)⊙(ε − ε_θ(z_t^m, t, C2))||²``
with ``z_t^m = (1−m)⊙z_t``, under inside/outside cross-attention (Eqs. 10-11): inside the mask the pixels attend
to C_def (C_m in the C2 branch), outside to C_bg. The artifacts are the fine-tuned U-Net and the two prompt tokens.

Generation on the request's normal: masked DDIM inversion of ``(1−m)⊙z_0`` with C2 (Eq. 8), then
``z*_T = z̃^m_T + m⊙ε`` and the mask-mixed sampler (Eq. 9), whose C2 branch sees the masked latent as in the
paper's proof (``background_input``), and whose C1 branch may be guided (``guidance_scale``, ours) with its x0
prediction clamped to the latent range of the type's training images (``x0_clamp``, ours). The refined
mask (Eq. 13) thresholds the C1 branch's restricted attention to C_def, bilinearly resized, at 1/2 of its peak
inside the mask (``refine_scale: peak``, ours; ``share`` thresholds the share as printed); our choice of what to
aggregate (the paper leaves it open): every cross-attention layer at ``refine_resolutions``, averaged over the
steps of ``refine_steps``. It is the sample's ``mask.png``, kept inside the conditioning mask. The decoded
image is measured against the normal outside the mask (``background_psnr``, ``background_ssim`` in its QC scores:
how closely the theory's preservation holds after decoding); the output then keeps the normal's own pixels there
(``paste_background``), as the platform's other inpainting methods do.

Ablations (paper Tables 4, 5): ``loss: naive`` (the plain ε-loss under C1), ``masked_attention: false``,
``mask_refinement: false`` (the sample's mask is the conditioning mask).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import ClassVar, Literal

import numpy as np
import torch
from pydantic import Field
from safetensors.torch import load_file, save_file

from defectsynth.core.devices import compute_device
from defectsynth.core.masked_similarity import psnr_in, ssim_in
from defectsynth.core.train_engine import TrainEngine
from defectsynth.diffusion.attention import AttentionControl, AttentionRecorder, Select, installed
from defectsynth.diffusion.ddim import DDIMSampler
from defectsynth.diffusion.factory import load_base_model
from defectsynth.diffusion.inversion import BackgroundInput, masked_ddim_invert, masked_inversion_sample
from defectsynth.diffusion.latent_range import LatentRange
from defectsynth.diffusion.model import DiffusionModel
from defectsynth.diffusion.preview import to_uint8
from defectsynth.diffusion.sampling import StepCallback, generators_from_seeds, unet_output
from defectsynth.diffusion.tokens import PlaceholderTokens
from defectsynth.generators.badg.prompt import BADGPrompts, add_prompt_tokens
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
from defectsynth.generators.masks import MaskOptions, conditioning_mask, load_source, request_rngs
from defectsynth.generators.refine import measured_sample, settings_digest
from defectsynth.generators.training_pairs import (
    TrainingDefects,
    augmented_batch,
    latent_mask,
    load_training_defects,
    rotation_field,
    to_model_range,
)
from defectsynth.storage.records import ProductData
from defectsynth.storage.sample import Sample
from defectsynth.storage.split import ProductSplit

logger = logging.getLogger(__name__)

UNET_FILE, TOKENS_FILE = "unet.safetensors", "tokens.safetensors"


class BADGSettings(GeneratorSettings):
    """Paper 001's settings; the paper's where it states them, the config sizes them for a CPU."""

    learning_rate: float = Field(5e-6, gt=0, description="AdamW rate of the U-Net (paper: unstated; DreamBooth's)")
    batch_size: int = Field(4, ge=1, description="augmented defects per step (paper: unstated)")
    steps: int | None = Field(500, ge=1, description="fine-tuning steps per defect type (paper: 500); None: max_steps")
    crop_range: tuple[float, float] = Field((0.75, 1.0), description="crop side / image side in augmentation")
    rotation: bool = rotation_field()
    loss: Literal["disentangled", "naive"] = Field("disentangled", description="ablation: Eq. 5, or the plain loss")
    masked_attention: bool = Field(True, description="ablation: inside/outside cross-attention (Eqs. 10-11)")
    sampling_steps: int = Field(50, ge=1, description="DDIM steps of the inversion and of the sampling (paper: 50)")
    background_input: BackgroundInput = Field(
        "masked", description="what Eq. 9's C2 branch sees: the masked latent (the proof's) or the full one"
    )
    guidance_scale: float = Field(
        1.0, ge=1.0, description="classifier-free guidance of Eq. 9's C1 branch (unstated: off, Eq. 9 as printed)"
    )
    guidance_rescale: float = Field(
        0.0, ge=0.0, le=1.0, description="φ of guidance rescale (Lin et al. 2024) on the guided C1 branch; 0: off"
    )
    x0_clamp: bool = x0_clamp_field()  # the C1 branch's x0
    mask_refinement: bool = Field(True, description="ablation: the attention-refined mask (Eq. 13)")
    mask_threshold: float = Field(0.5, gt=0, lt=1, description="Eq. 13's threshold on the defect token's share")
    refine_resolutions: tuple[int, ...] | None = Field(
        None, description="cross-attention sides aggregated for Eq. 13 (None: every cross-attention layer)"
    )
    refine_steps: Literal["all", "late"] = Field("all", description="sampling steps aggregated: all, or the 2nd half")
    # The share is C_def's against the start token, which takes most of every pixel's attention: on the tiny base
    # it stayed below 1/2 everywhere (empty masks). "peak" thresholds it against its own largest value in the mask.
    refine_scale: Literal["share", "peak"] = Field("peak", description="Eq. 13 on the share as printed, or to_peak")
    paste_background: bool = Field(True, description="keep the normal's pixels outside the conditioning mask")
    generation_batch: int = Field(8, ge=1, description="images generated together; the samples do not depend on it")


def disentanglement_loss(
    noise: torch.Tensor, eps_defect: torch.Tensor, eps_background: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """Eq. 5: ||m⊙(ε − ε_θ(z_t, t, C1))||² + ||(1−m)⊙(ε − ε_θ(z_t^m, t, C2))||², each a mean over every element."""
    return (mask * (noise - eps_defect)).square().mean() + ((1 - mask) * (noise - eps_background)).square().mean()


def refined_mask(attention: np.ndarray, cond: np.ndarray, threshold: float, *, to_peak: bool = False) -> np.ndarray:
    """Eq. 13: where C_def's restricted attention share reaches ``threshold``, kept inside the conditioning mask.

    ``to_peak`` first divides the map by its largest value inside the mask (ours: see ``refine_scale``).
    """
    cond = cond.astype(bool)
    if to_peak and cond.any():
        attention = attention / max(float(attention[cond].max()), 1e-12)
    return (attention >= threshold) & cond


class DisentanglementLoss(torch.nn.Module):
    """Eq. 5 over the U-Net (the trained part, so DeepSpeed sees it), under the masked attention of Eqs. 10-11."""

    def __init__(self, model: DiffusionModel, prompts: BADGPrompts, settings: BADGSettings) -> None:
        super().__init__()
        if model.scheduler.config.prediction_type != "epsilon":
            msg = f"badg: Eq. 5 is written for ε-prediction; the base predicts {model.scheduler.config.prediction_type}"
            raise ValueError(msg)
        self.unet = model.unet
        self.model, self.settings = model, settings
        with torch.no_grad():
            self.contexts = model.encode_prompt([prompts.defect, prompts.masked])  # C1, C2
        self.control = AttentionControl()
        self.restriction = None
        if settings.masked_attention:
            side = model.resolution
            self.restriction = self.control.restrict(
                torch.zeros(1, 1, side, side), inside=prompts.inside, outside=prompts.outside
            )

    def forward(self, images: torch.Tensor, masks: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """The loss of images (B, 3, H, W) in [-1, 1] with their masks (B, 1, H, W)."""
        model = self.model
        with torch.no_grad():
            latents = model.encode_images(images, generator).float()
        m = latent_mask(masks, latents.shape[-1]).to(latents)
        noise = torch.randn(latents.shape, generator=generator).to(latents)
        t = torch.randint(0, model.scheduler.config.num_train_timesteps, (len(latents),), generator=generator)
        noisy = model.scheduler.add_noise(latents, noise, t)
        if self.restriction is not None:
            self.restriction.mask = masks
        self.control.begin_step(0, None)
        c1, c2 = (context.expand(len(latents), -1, -1) for context in self.contexts)
        t = t.to(latents.device)
        eps_defect = unet_output(model, noisy, t, c1)
        if self.settings.loss == "naive":
            return (noise - eps_defect).square().mean()
        eps_background = unet_output(model, (1 - m) * noisy, t, c2)
        return disentanglement_loss(noise, eps_defect, eps_background, m)


class BADGGenerator:
    """Paper 001 on the shared diffusion core, one fit per defect type; see the module docstring."""

    name: ClassVar[str] = "badg"
    Settings: ClassVar[type[GeneratorSettings]] = BADGSettings
    mask_sources: ClassVar[tuple[MaskSource, ...]] = ("real", "perlin")  # the target masks it is given
    uses_diffusion_base: ClassVar[bool] = True
    makes_normals: ClassVar[bool] = False
    keeps_background: ClassVar[bool] = True
    intensity: ClassVar[IntensityControl | None] = None
    fit_unit: ClassVar[FitUnitKind] = "defect_type"

    def __init__(self, settings: BADGSettings) -> None:
        self.settings = settings
        self.model: DiffusionModel | None = None
        self.prompts: BADGPrompts | None = None
        self.tokens: PlaceholderTokens | None = None
        self.product: str | None = None
        self.defect_type: str | None = None
        self.base_model: str | None = None
        self.latent_range: LatentRange | None = None

    # -- fit ------------------------------------------------------------------------------------------------------

    def fit(self, data: ProductData, split: ProductSplit, context: FitContext) -> Path:
        """Fine-tune the U-Net on the one defect type of ``split`` with Eq. 5; write its weights and tokens."""
        types = sorted(t for t, ids in split.generator_train.items() if ids)
        if len(types) != 1:
            msg = f"badg fits one defect type at a time (fit_unit); got training types {types}"
            raise ValueError(msg)
        model = frozen_base(self.name, context)
        self.tokens = add_prompt_tokens(model, types[0])
        self.model, self.product, self.defect_type, self.base_model = model, data.name, types[0], context.base_model
        self.prompts = BADGPrompts.for_type(model, self.tokens, data.name)
        defects = load_training_defects([(data, split)], model.resolution)
        self.latent_range = training_latent_range(model, defects.images)
        first, curve = self._resume(context)  # before the engine: DeepSpeed copies the weights
        steps = self.settings.steps or context.max_steps
        self._train(defects, context, first, steps, curve)
        return self._save(Path(context.output_dir), curve)

    def _train(self, defects: TrainingDefects, context: FitContext, first: int, steps: int, curve: list[float]) -> None:
        """Eq. 5 on batches of the type's augmented defects; the U-Net alone changes."""
        settings, model, prompts = self.settings, self.model, self.prompts
        assert model is not None and prompts is not None
        loss_module = DisentanglementLoss(model, prompts, settings)
        model.unet.requires_grad_(True).train()
        optimizer = torch.optim.AdamW(model.unet.parameters(), lr=settings.learning_rate)
        engine = TrainEngine(loss_module, optimizer, context.strategy, micro_batch_size=settings.batch_size)
        with installed(model.unet, loss_module.control):
            for step in range(first, steps):
                rng = np.random.default_rng([context.seed, context.rank, step])  # per step: a resume replays it
                generator = torch.Generator().manual_seed(int(rng.integers(1 << 62)))
                picks = rng.integers(len(defects.images), size=settings.batch_size)
                images, masks = augmented_batch(defects, picks, rng, settings.crop_range, settings.rotation)
                loss = engine(engine.to_device(images), engine.to_device(masks), generator)
                engine.step(loss)
                curve.append(float(loss.detach()))
                context.report({"loss": curve[-1], "step": float(step + 1)})
                context.checkpoint(step + 1, steps, self._write_weights, {"curve": curve})
        model.unet.requires_grad_(False).eval()

    # -- checkpoints and artifacts ----------------------------------------------------------------------------------

    def _resume(self, context: FitContext) -> tuple[int, list[float]]:
        """(first step, loss curve so far) from the checkpoint the context resumes from, or (0, [])."""
        progress = context.progress()
        if progress is None:
            return 0, []
        assert self.model is not None and context.resume_from is not None
        state = load_file(str(context.resume_from / UNET_FILE), device=str(self.model.device))
        self.model.unet.load_state_dict(state)
        logger.info("badg: resuming %s at step %d", self.defect_type, progress["step"])
        return int(progress["step"]), list(progress["curve"])

    def _write_weights(self, out: Path) -> None:
        """The fine-tuned U-Net and the two prompt tokens (untrained, kept so ``load`` rebuilds the prompts)."""
        assert self.model is not None and self.tokens is not None
        state = {k: v.detach().cpu().contiguous() for k, v in self.model.unet.state_dict().items()}
        save_file(state, str(out / UNET_FILE))
        self.tokens.save(out / TOKENS_FILE)

    def _save(self, out: Path, curve: list[float]) -> Path:
        out.mkdir(parents=True, exist_ok=True)
        self._write_weights(out)
        (out / "curves.json").write_text(json.dumps({"loss": curve}))
        assert self.latent_range is not None
        write_artifact_manifest(
            out,
            self.name,
            self.product,
            self.settings,
            base_model=self.base_model,
            defect_type=self.defect_type,
            **{LATENT_RANGE_FIELD: self.latent_range.to_json()},
        )
        return out

    # -- load -----------------------------------------------------------------------------------------------------

    def load(self, artifacts: Path) -> None:
        """The base from its reference, then the fine-tuned U-Net's weights and the prompt tokens."""
        artifacts = Path(artifacts)
        manifest, self.settings = read_artifact_manifest(artifacts, self)
        model = load_base_model(manifest["base_model"]).to(compute_device()).eval()
        model.unet.load_state_dict(load_file(str(artifacts / UNET_FILE), device=str(model.device)))
        model.unet.requires_grad_(False)
        self.tokens = PlaceholderTokens.load(model, artifacts / TOKENS_FILE)
        self.model, self.product, self.defect_type = model, manifest["product"], manifest["defect_type"]
        self.base_model = manifest["base_model"]
        self.prompts = BADGPrompts.for_type(model, self.tokens, self.product)
        self.latent_range = read_latent_range(manifest, artifacts, required=self.settings.x0_clamp)

    # -- generate -------------------------------------------------------------------------------------------------

    def generate(self, batch: list[Request]) -> list[Sample]:
        """One sample per request, in order; each depends only on its own request and seed, whatever the batch."""
        if self.model is None:
            msg = "badg: call fit() or load() before generate()"
            raise RuntimeError(msg)
        for request in batch:
            self._check(request)
        sources = [load_source(request) for request in batch]
        conds = [conditioning_mask(request, request_rngs(request)[0], MaskOptions()) for request in batch]
        step, made = self.settings.generation_batch, []
        for start in range(0, len(batch), step):
            chunk = slice(start, start + step)
            made += self.grow(sources[chunk], conds[chunk], seeds=[r.seed for r in batch[chunk]])
        digest = settings_digest(self.settings)
        return [
            self._sample(request, source, cond, decoded, attention, digest)
            for request, source, cond, (decoded, attention) in zip(batch, sources, conds, made, strict=True)
        ]

    def _check(self, request: Request) -> None:
        check_request(self, request)
        if (request.product, request.defect_type) != (self.product, self.defect_type):
            msg = (
                f"badg: fitted on {self.product}/{self.defect_type}, asked for {request.product}/{request.defect_type}"
            )
            raise ValueError(msg)
        if request.resolution != self.model.resolution:
            msg = f"badg: request resolution {request.resolution} != model's {self.model.resolution}"
            raise ValueError(msg)

    def _sample(
        self,
        request: Request,
        source: np.ndarray,
        cond: np.ndarray,
        decoded: np.ndarray,
        attention: np.ndarray,
        digest: str,
    ) -> Sample:
        """The sample: the refined mask (or the conditioning mask), the background measures in its QC scores."""
        settings = self.settings
        background = ~cond
        # rounded: batched U-Net and VAE numerics move one pixel's rounding, hence these, in the fifth digit
        psnr, ssim = psnr_in(decoded, source, background), ssim_in(decoded, source, background)
        scores = {"background_psnr": round(psnr, 1), "background_ssim": round(ssim, 2)}
        image = np.where(cond[..., None], decoded, source) if settings.paste_background else decoded
        to_peak = settings.refine_scale == "peak"
        mask = (
            refined_mask(attention, cond, settings.mask_threshold, to_peak=to_peak)
            if settings.mask_refinement
            else cond
        )
        sample = measured_sample(
            request,
            method=self.name,
            source=source,
            image=image,
            mask=mask,
            cond_mask=cond,
            intensity=None,
            config_digest=digest,
            sampler=DDIMSampler.name,
            steps=settings.sampling_steps,
            base_model=self.base_model,
        )
        sample.metadata.qc.scores.update({k: v for k, v in scores.items() if np.isfinite(v)})
        return sample

    def grow(
        self,
        sources: Sequence[np.ndarray],
        masks: Sequence[np.ndarray],
        *,
        seeds: Sequence[int],
        on_step: StepCallback | None = None,
    ) -> list[tuple[np.ndarray, np.ndarray]]:
        """Per source and mask: the decoded image (uint8) and the defect token's refined attention map (H x W).

        ``on_step`` is the sampler's per-step callback (``bench/badg_trajectory.py`` watches the x0 predictions).
        """
        model, settings, prompts = self.model, self.settings, self.prompts
        assert model is not None and prompts is not None
        count = len(sources)
        image_masks = torch.from_numpy(np.stack(masks)[:, None].astype(np.float32))
        control = AttentionControl()
        guided = settings.guidance_scale > 1
        if settings.masked_attention:  # the [C2; C1] rows; a guided batch's unconditional rows attend freely
            where = Select(batch=slice(0, 2 * count))
            control.restrict(image_masks, inside=prompts.inside, outside=prompts.outside, where=where)
        with torch.no_grad():
            latents = model.encode_images(to_model_range(sources))
            m = latent_mask(image_masks, latents.shape[-1]).to(latents)
            c1, c2 = model.encode_prompt([prompts.defect, prompts.masked]).split(1)
            uncond = model.encode_prompt([""]) if guided else None
            sampler = DDIMSampler.from_model(model)
            sampler.set_timesteps(settings.sampling_steps)
            with installed(model.unet, control):
                inverted = masked_ddim_invert(model, latents, m, c2, sampler=sampler, control=control)
                recorder = self._record(control, count, len(sampler.timesteps))  # the sampling pass only
                final = masked_inversion_sample(
                    model,
                    inverted[-1],
                    m,
                    c1,
                    c2,
                    sampler=sampler,
                    generators=generators_from_seeds(seeds),
                    background_input=settings.background_input,
                    uncond=uncond,
                    guidance_scale=settings.guidance_scale,
                    guidance_rescale=settings.guidance_rescale,
                    x0_range=self.latent_range if settings.x0_clamp else None,
                    control=control,
                    on_step=on_step,
                )
            decoded = to_uint8(model.decode_latents(final))
            attention = recorder.mean(side=model.resolution)[:, 0].clamp(0, 1).cpu().numpy()
        return list(zip(decoded, attention, strict=True))

    def _record(self, control: AttentionControl, count: int, steps: int) -> AttentionRecorder:
        """C_def's maps in the C1 rows (the second half of each [C2; C1] call) at the chosen layers and steps."""
        settings, prompts = self.settings, self.prompts
        assert prompts is not None
        chosen = range(steps // 2 if settings.refine_steps == "late" else 0, steps)
        resolutions = None if settings.refine_resolutions is None else set(settings.refine_resolutions)
        where = Select(resolutions=resolutions, steps=set(chosen), batch=slice(count, 2 * count))
        return control.record(where, tokens=prompts.inside)
