"""AnomalyDiffusion (paper 000) as a platform generator: fit the embeddings, then paint defects on normals.

What is trained (the diffusion base stays frozen throughout, as in the paper):

1. per (product, defect type), an anomaly embedding e_a of ``anomaly_tokens`` (k = 8) placeholder tokens, and one
   spatial encoder E shared by every type fitted (mask → ``spatial.tokens`` (n = 4) token embeddings e_s), jointly,
   with the masked diffusion loss ``||m ⊙ (ε − ε_θ(z_t, t, {e_a, e_s}))||²`` (Eq. 5-6) on the training
   defects, images and masks augmented together (crop, flips, quarter turns, translation) with the defect
   kept in the frame;
2. per (product, defect type), a mask embedding e_m by textual inversion on the real masks (``mask_generator``).

Generation (Eq. 1, 7-8): the normal image's latent is noised to the first step; inside the conditioning
mask the U-Net denoises under concat(e_a, E(mask)), outside the latent is the normal's forward-noised latent
(blended latent diffusion); adaptive attention re-weighting (``aar``) re-weights the cross-attention by a map
that favours in-mask pixels that still look normal. The decoded image keeps the source's pixels outside the
conditioning mask (``paste_background``, a choice of ours; the paper blends latents only, and decoding them
alters pixels around the mask too, which the refined mask would then label normal). The refined mask is where
the image changed inside the conditioning mask. Learned masks keep their part on the product's foreground
(``learned_on_foreground``, ours too: the paper's MVTec objects are aligned, so its masks land on them).

Ablations (paper Table 6): ``aar``, ``spatial_embedding`` and ``masked_loss`` switch the three components off.
By default the platform fits one generator per product, so E is shared by one product's defect types;
``joint_products`` fits one over every product of the run (the paper's setting, ``FitContext.companions``):
one E for all, e_a and e_m per (product, defect type), the prompt naming each sample's product.
"""

from __future__ import annotations

import json
import logging
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import ClassVar, Literal

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812
from pydantic import Field

from defectsynth.core.devices import compute_device
from defectsynth.core.train_engine import TrainEngine
from defectsynth.diffusion.attention import AttentionControl, installed
from defectsynth.diffusion.ddim import DDIMSampler
from defectsynth.diffusion.factory import load_base_model
from defectsynth.diffusion.latent_range import LatentRange
from defectsynth.diffusion.model import DiffusionModel
from defectsynth.diffusion.pretrain import denoising_loss, generic_prompt
from defectsynth.diffusion.preview import to_uint8
from defectsynth.diffusion.sampling import BlendTarget, denoise, generators_from_seeds
from defectsynth.diffusion.tokens import PlaceholderTokens, encode_prompt_with_embeddings
from defectsynth.generators.anomalydiffusion.aar import install_aar
from defectsynth.generators.anomalydiffusion.mask_generator import (
    MaskGeneratorSettings,
    sample_masks,
    train_mask_embedding,
)
from defectsynth.generators.anomalydiffusion.spatial_encoder import SpatialEncoderSettings, build_spatial_encoder
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
from defectsynth.generators.intensity import IntensityControl
from defectsynth.generators.latent_clamp import (
    LATENT_RANGE_FIELD,
    read_latent_range,
    training_latent_range,
    x0_clamp_field,
)
from defectsynth.generators.masks import MaskOptions, conditioning_mask, load_foreground, load_source, request_rngs
from defectsynth.generators.refine import refined_sample, settings_digest
from defectsynth.generators.training_pairs import (
    DefectKey,
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

TOKENS_FILE, ENCODER_FILE, PROGRESS_FILE = "tokens.safetensors", "spatial_encoder.pt", "progress.json"
SPATIAL_GROUP = "spatial"  # placeholder tokens whose input embeddings E(mask) replaces
MASK_RETRIES = 4  # learned masks redrawn with derived seeds while they come out empty
ARTIFACT_LAYOUT = 2  # 2: e_a / e_m groups and defect types keyed by (product, type); paste_background a choice


class AnomalyDiffusionSettings(GeneratorSettings):
    """Paper 000's settings; paper values noted per field, CPU-sized defaults where the paper's are days."""

    anomaly_tokens: int = Field(8, ge=1, description="k, tokens of e_a per defect type (paper: 8)")
    spatial: SpatialEncoderSettings = Field(default_factory=SpatialEncoderSettings)
    learning_rate: float = Field(5e-3, gt=0, description="e_a rows (paper: 0.005)")
    encoder_learning_rate: float = Field(
        1e-4, gt=0, description="spatial encoder; the paper gives one rate (0.005), too high for a ResNet from scratch"
    )
    batch_size: int = Field(4, ge=1, description="pairs per step, drawn from all defect types (paper: 4)")
    crop_range: tuple[float, float] = Field((0.75, 1.0), description="crop side / image side in augmentation")
    rotation: bool = rotation_field()
    masked_loss: bool = Field(True, description="ablation: the loss inside the mask only (Eq. 5)")
    spatial_embedding: bool = Field(True, description="ablation: condition on E(mask) besides e_a")
    aar: bool = Field(True, description="ablation: adaptive attention re-weighting (Eq. 7-8)")
    # The printed Eq. 7 (softmax of 1/distance on decoded images) is nearly winner-take-all: distances of 0.01
    # and 0.02 differ by e^50, so a few pixels take the whole mask's weight and cross-attention is switched
    # off elsewhere. The authors' code replaced it with the latent form and clamps its weights to [1, 1.5]
    # ("code", our default). Unclamped ("latent"), a sample's largest weight averaged about 5 and the tiny base
    # painted white on some draws and black on others (bench/aar.py; README, "AAR's clamp").
    aar_form: Literal["paper", "latent", "code"] = Field(
        "code",
        description="code: the authors' latent form, weights clamped to [1, 1.5] and 1 outside the mask; latent: "
        "the same distance, weights averaging 1 over the mask and 0 outside; paper: decoded x0, softmax of 1/distance",
    )
    mask_generator: MaskGeneratorSettings = Field(default_factory=MaskGeneratorSettings)
    sampling_steps: int = Field(50, ge=1, description="DDIM steps of generation (paper: unstated; code: DDIM)")
    guidance_scale: float = Field(1.0, ge=1.0, description="classifier-free guidance of generation (unstated: off)")
    guidance_rescale: float = Field(
        0.0, ge=0.0, le=1.0, description="φ of guidance rescale (Lin et al. 2024), against over-saturation; 0: off"
    )
    x0_clamp: bool = x0_clamp_field()
    paste_background: Literal["mask", "cells", "off"] = Field(
        "mask",
        description="source pixels kept outside the conditioning mask, outside the painted latent cells, or none",
    )
    learned_on_foreground: bool = Field(
        True, description="learned masks cut to the source's foreground (objects); redrawn when nothing is left"
    )
    refine_threshold: float = Field(0.08, gt=0, lt=1, description="change (0-1) that marks a pixel as defect")
    generation_batch: int = Field(8, ge=1, description="images denoised together; the samples do not depend on it")
    joint_products: bool = Field(
        False, description="one fit over every product of the run, E shared by all (the paper's setting)"
    )


def request_key(request: Request) -> DefectKey:
    """The (product, defect type) whose embeddings a request uses."""
    return request.product, request.defect_type


class Conditioner:
    """Builds the cross-attention context concat(e_a, e_s) of AnomalyDiffusion for a batch of (key, mask)."""

    def __init__(self, model: DiffusionModel, tokens: PlaceholderTokens, encoder: torch.nn.Module | None) -> None:
        self.model, self.tokens, self.encoder = model, tokens, encoder

    def prompt(self, key: DefectKey) -> str:
        """``a photo of <product> with <e_a tokens> [<e_s tokens>]``."""
        spatial = f" {self.tokens.prompt(SPATIAL_GROUP)}" if self.encoder is not None else ""
        return f"{generic_prompt(key[0])} with {self.tokens.prompt(anomaly_group(key))}{spatial}"

    def check_fits(self, keys: Sequence[DefectKey]) -> None:
        """Refuse a prompt longer than the text encoder's positions: truncating it would drop e_a or e_s tokens."""
        limit = self.model.tokenizer.model_max_length
        for key in keys:
            length = len(self.model.tokenizer(self.prompt(key)).input_ids)
            if length > limit:
                msg = (
                    f"anomalydiffusion: the prompt of {key[0]}/{key[1]} takes {length} tokens, the text encoder holds"
                    f" {limit}; use fewer anomaly_tokens or spatial.tokens, or a base with more positions"
                )
                raise ValueError(msg)

    def __call__(self, keys: Sequence[DefectKey], masks: torch.Tensor) -> torch.Tensor:
        """The context (B, L, D) for image-resolution masks (B, 1, H, W)."""
        prompts = [self.prompt(key) for key in keys]
        if self.encoder is None:
            return self.model.encode_prompt(prompts)
        spatial = self.encoder(masks.to(self.model.device))  # (B, n, D): one vector per spatial token
        ids = self.tokens.ids(SPATIAL_GROUP)
        return encode_prompt_with_embeddings(self.model, prompts, {i: spatial[:, j] for j, i in enumerate(ids)})


def anomaly_group(key: DefectKey) -> str:
    """The placeholder group name of a (product, defect type)'s e_a."""
    return f"anomaly_{key[0]}_{key[1]}"


def mask_group(key: DefectKey) -> str:
    """The placeholder group name of a (product, defect type)'s e_m."""
    return f"mask_{key[0]}_{key[1]}"


class EmbeddingLoss(torch.nn.Module):
    """Eq. 5-6 as a module over the trained parts (token table, spatial encoder), so DeepSpeed sees the forward."""

    def __init__(self, conditioner: Conditioner, masked: bool) -> None:
        super().__init__()
        self.embedding = conditioner.tokens.embedding
        self.encoder = conditioner.encoder
        self.conditioner, self.masked = conditioner, masked

    def forward(
        self, images: torch.Tensor, masks: torch.Tensor, keys: list[DefectKey], generator: torch.Generator
    ) -> torch.Tensor:
        """The (masked) denoising loss of one augmented batch; images in [-1, 1], masks (B, 1, H, W)."""
        model = self.conditioner.model
        with torch.no_grad():
            latents = model.encode_images(images, generator)
        context = self.conditioner(keys, masks)
        weight = latent_mask(masks, latents.shape[-1]) if self.masked else None
        return denoising_loss(model, latents, context, generator, loss_mask=weight)


class AnomalyDiffusionGenerator:
    """Paper 000 on the shared diffusion core; see the module docstring."""

    name: ClassVar[str] = "anomalydiffusion"
    Settings: ClassVar[type[GeneratorSettings]] = AnomalyDiffusionSettings
    mask_sources: ClassVar[tuple[MaskSource, ...]] = ("learned", "real", "perlin")
    # On the tiny base, e_m's masks stay far from the real shapes (README, "Quality tier"): augmented real masks.
    tiny_base_mask_source: ClassVar[MaskSource] = "real"
    uses_diffusion_base: ClassVar[bool] = True
    makes_normals: ClassVar[bool] = False
    keeps_background: ClassVar[bool] = True
    intensity: ClassVar[IntensityControl | None] = None  # no control value
    fit_unit: ClassVar[FitUnitKind] = "product"

    def __init__(self, settings: AnomalyDiffusionSettings) -> None:
        self.settings = settings
        self.model: DiffusionModel | None = None
        self.tokens: PlaceholderTokens | None = None
        self.conditioner: Conditioner | None = None
        self.defect_types: dict[str, list[str]] = {}  # product -> its fitted defect types
        self.base_model: str | None = None  # the base's registry URI or path, as fitted and recorded
        self.latent_range: LatentRange | None = None  # of the training images' latents, for x0_clamp

    # -- fit ------------------------------------------------------------------------------------------------------

    def fit(self, data: ProductData, split: ProductSplit, context: FitContext) -> Path:
        """Train e_a and E jointly, then e_m per (product, type); write the artifacts.

        With ``joint_products`` the context's companions train alongside ``data``; without, they are an error.
        """
        if context.base_model is None:
            msg = "anomalydiffusion needs a diffusion base model (FitContext.base_model)"
            raise ValueError(msg)
        if context.companions and not self.settings.joint_products:
            names = [companion.name for companion, _ in context.companions]
            msg = f"anomalydiffusion: companion products {names} given but joint_products is off"
            raise ValueError(msg)
        settings = self.settings
        model = load_base_model(context.base_model).to(compute_device())
        self.base_model = context.base_model
        model.eval()
        for part in (model.vae, model.unet, model.text_encoder):
            part.requires_grad_(False)
        defects = load_training_defects([(data, split), *context.companions], model.resolution)
        keys = sorted(set(defects.keys))
        self.latent_range = training_latent_range(model, defects.images)
        self.defect_types = {product: [t for p, t in keys if p == product] for product, _ in keys}
        tokens = PlaceholderTokens(model)
        for key in keys:
            tokens.add(anomaly_group(key), count=settings.anomaly_tokens, initializer=key[0])
            tokens.add(
                mask_group(key), count=settings.mask_generator.tokens, initializer=settings.mask_generator.initializer
            )
        encoder = None
        if settings.spatial_embedding:
            tokens.add(SPATIAL_GROUP, count=settings.spatial.tokens, initializer=data.name)
            torch.manual_seed(context.seed)  # E's initialisation depends on the seed alone
            encoder = build_spatial_encoder(settings.spatial, model.text_encoder.config.hidden_size)
        self.model, self.tokens = model, tokens
        self.conditioner = Conditioner(model, tokens, encoder)
        self.conditioner.check_fits(keys)
        curve = self._fit_embeddings(defects, context)
        mask_curves = {
            "/".join(key): train_mask_embedding(
                model,
                tokens,
                mask_group(key),
                [m for m, k in zip(defects.masks, defects.keys, strict=True) if k == key],
                settings.mask_generator,
                seed=context.seed,
            )
            for key in keys
        }
        return self._save(context.output_dir, data.name, context.base_model, curve, mask_curves)

    def _fit_embeddings(self, defects: TrainingDefects, context: FitContext) -> list[float]:
        """Eq. 6: e_a of every type and E, only their parameters changing."""
        settings, conditioner = self.settings, self.conditioner
        assert conditioner is not None and self.tokens is not None
        first, curve = self._resume(context.resume_from)  # before the engine: DeepSpeed copies the weights
        table = self.tokens.trainable_rows()
        groups = [{"params": [table], "lr": settings.learning_rate}]
        if conditioner.encoder is not None:
            conditioner.encoder.train()
            groups.append({"params": list(conditioner.encoder.parameters()), "lr": settings.encoder_learning_rate})
        engine = TrainEngine(
            EmbeddingLoss(conditioner, settings.masked_loss),
            torch.optim.Adam(groups, weight_decay=0.0),
            context.strategy,
            micro_batch_size=settings.batch_size,
        )
        for step in range(first, context.max_steps):
            rng = np.random.default_rng([context.seed, context.rank, step])  # per step: a resume replays it
            generator = torch.Generator().manual_seed(int(rng.integers(1 << 62)))
            picks = rng.integers(len(defects.images), size=settings.batch_size)
            images, masks = augmented_batch(defects, picks, rng, settings.crop_range, settings.rotation)
            loss = engine(
                engine.to_device(images), engine.to_device(masks), [defects.keys[i] for i in picks], generator
            )
            engine.step(loss)
            self.tokens.restore_frozen_rows()
            curve.append(float(loss.detach()))
            context.report({"loss": curve[-1], "step": float(step + 1)})
            if (step + 1) % context.checkpoint_every == 0 and step + 1 < context.max_steps:
                with tempfile.TemporaryDirectory() as tmp:
                    self._save_progress(Path(tmp), step + 1, curve)
                    context.save_checkpoint(Path(tmp), {"loss": curve[-1], "step": float(step + 1)})
        table.requires_grad_(False)
        if conditioner.encoder is not None:
            conditioner.encoder.eval().requires_grad_(False)
        return curve

    def _save_progress(self, directory: Path, step: int, curve: list[float]) -> None:
        """The trained parts so far (tokens, E) and the step, for a restarted worker to resume from."""
        assert self.tokens is not None and self.conditioner is not None
        self.tokens.save(directory / TOKENS_FILE)
        if self.conditioner.encoder is not None:
            torch.save(self.conditioner.encoder.state_dict(), directory / ENCODER_FILE)
        (directory / PROGRESS_FILE).write_text(json.dumps({"step": step, "curve": curve}))

    def _resume(self, directory: Path | None) -> tuple[int, list[float]]:
        """(first step, loss curve so far): from a checkpoint of this fit, or (0, []) without one."""
        if directory is None or not (directory / PROGRESS_FILE).is_file():
            return 0, []
        assert self.tokens is not None and self.conditioner is not None
        self.tokens.restore(directory / TOKENS_FILE)
        if self.conditioner.encoder is not None:
            state = torch.load(directory / ENCODER_FILE, map_location="cpu", weights_only=True)
            self.conditioner.encoder.load_state_dict(state)
        progress = json.loads((directory / PROGRESS_FILE).read_text())
        logger.info("anomalydiffusion: resuming the embeddings at step %d", progress["step"])
        return int(progress["step"]), list(progress["curve"])

    def _save(
        self, out: Path, product: str, base_model: str, curve: list[float], mask_curves: dict[str, list[float]]
    ) -> Path:
        assert self.tokens is not None and self.conditioner is not None and self.latent_range is not None
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        self.tokens.save(out / TOKENS_FILE)
        if self.conditioner.encoder is not None:
            torch.save(self.conditioner.encoder.state_dict(), out / ENCODER_FILE)
        (out / "curves.json").write_text(json.dumps({"embedding_loss": curve, "mask_loss": mask_curves}))
        write_artifact_manifest(
            out,
            self.name,
            product,
            self.settings,
            base_model=base_model,
            defect_types=self.defect_types,
            products=sorted(self.defect_types),
            layout=ARTIFACT_LAYOUT,
            **{LATENT_RANGE_FIELD: self.latent_range.to_json()},
        )
        return out

    # -- load -----------------------------------------------------------------------------------------------------

    def load(self, artifacts: Path) -> None:
        """The base model from the registry or its path, then the learned tokens and the spatial encoder."""
        manifest, fitted = read_artifact_manifest(artifacts, self)
        if manifest.get("layout") != ARTIFACT_LAYOUT:
            found = manifest.get("layout")
            msg = f"{artifacts}: anomalydiffusion artifacts of layout {found}, code reads {ARTIFACT_LAYOUT}; re-fit"
            raise ValueError(msg)
        self.settings = fitted
        model = load_base_model(manifest["base_model"]).to(compute_device()).eval()
        tokens = PlaceholderTokens.load(model, Path(artifacts) / TOKENS_FILE)
        encoder = None
        if self.settings.spatial_embedding:
            encoder = build_spatial_encoder(self.settings.spatial, model.text_encoder.config.hidden_size)
            encoder.load_state_dict(torch.load(Path(artifacts) / ENCODER_FILE, map_location="cpu", weights_only=True))
            encoder.to(model.device).eval().requires_grad_(False)
        self.model, self.tokens, self.defect_types = model, tokens, dict(manifest["defect_types"])
        self.base_model = manifest["base_model"]
        self.conditioner = Conditioner(model, tokens, encoder)
        self.latent_range = read_latent_range(manifest, artifacts, required=self.settings.x0_clamp)

    # -- generate -------------------------------------------------------------------------------------------------

    def generate(self, batch: list[Request]) -> list[Sample]:
        """One sample per request, in order; each depends only on its own request and seed, whatever the batch.

        Images are denoised ``generation_batch`` at a time, learned masks per (product, type) in chunks of
        ``mask_generator.sampling_batch``; every random draw comes from the request's own seed, so batching
        changes the speed, not the samples.
        """
        if self.model is None:
            msg = "anomalydiffusion: call fit() or load() before generate()"
            raise RuntimeError(msg)
        for request in batch:
            self._check(request)
        digest = settings_digest(self.settings)
        sources = [load_source(request) for request in batch]
        conds = self.conditioning_masks(batch)
        images = [source.copy() for source in sources]  # a mask left empty paints nothing (logged)
        painted = [i for i, cond in enumerate(conds) if cond.any()]
        if len(painted) < len(batch):
            logger.warning("anomalydiffusion: %d of %d conditioning masks empty", len(batch) - len(painted), len(batch))
        outputs = self.inpaint_in_batches(
            [sources[i] for i in painted],
            [conds[i] for i in painted],
            [request_key(batch[i]) for i in painted],
            [batch[i].seed for i in painted],
        )
        for i, image in zip(painted, outputs, strict=True):
            images[i] = image
        return [
            refined_sample(
                request,
                method=self.name,
                source=source,
                image=image,
                cond_mask=cond,
                threshold=self.settings.refine_threshold,
                intensity=None,
                config_digest=digest,
                sampler=DDIMSampler.name,
                steps=self.settings.sampling_steps,
                base_model=self.base_model,
            )
            for request, source, image, cond in zip(batch, sources, images, conds, strict=True)
        ]

    def _check(self, request: Request) -> None:
        check_request(self, request)
        if request.defect_type not in self.defect_types.get(request.product, []):
            known = self.defect_types
            msg = f"anomalydiffusion: no embedding for {request.product}/{request.defect_type}; fitted: {known}"
            raise ValueError(msg)
        if request.resolution != self.model.resolution:
            msg = f"anomalydiffusion: request resolution {request.resolution} != model's {self.model.resolution}"
            raise ValueError(msg)

    def conditioning_masks(self, batch: Sequence[Request]) -> list[np.ndarray]:
        """Each request's conditioning mask: learned ones drawn per (product, type) in batches, the others as usual."""
        masks: dict[int, np.ndarray] = {}
        learned = [i for i, r in enumerate(batch) if r.mask_source == "learned"]
        for key in sorted({request_key(batch[i]) for i in learned}):
            chosen = [i for i in learned if request_key(batch[i]) == key]
            regions = [load_foreground(batch[i]) if self.settings.learned_on_foreground else None for i in chosen]
            drawn = self.learned_masks(key, [batch[i].seed for i in chosen], regions)
            masks.update(zip(chosen, drawn, strict=True))
        for i, request in enumerate(batch):
            if i not in masks:
                mask_rng, _ = request_rngs(request)
                masks[i] = conditioning_mask(request, mask_rng, MaskOptions())
        return [masks[i] for i in range(len(batch))]

    def learned_masks(
        self, key: DefectKey, seeds: Sequence[int], regions: Sequence[np.ndarray | None] | None = None
    ) -> list[np.ndarray]:
        """Masks from the (product, type)'s e_m (CFG 5, binarised at 0.5), one per seed, each cut to its region.

        A mask left empty is redrawn with a derived seed, up to ``MASK_RETRIES`` draws in all; one still empty
        after that is kept (its sample is then an unchanged normal with an empty mask).
        """
        assert self.model is not None and self.tokens is not None
        settings, group = self.settings.mask_generator, mask_group(key)
        regions = list(regions) if regions is not None else [None] * len(seeds)

        def draw(indices: list[int], attempt: int) -> list[np.ndarray]:
            drawn = sample_masks(
                self.model, self.tokens, group, settings, seeds=[seeds[i] + attempt * 1_000_003 for i in indices]
            )
            return [m if regions[i] is None else m & regions[i] for i, m in zip(indices, drawn, strict=True)]

        masks = draw(list(range(len(seeds))), 0)
        for attempt in range(1, MASK_RETRIES):
            empty = [i for i, mask in enumerate(masks) if not mask.any()]
            if not empty:
                break
            for i, mask in zip(empty, draw(empty, attempt), strict=True):
                masks[i] = mask
        return masks

    def inpaint_in_batches(
        self,
        sources: Sequence[np.ndarray],
        masks: Sequence[np.ndarray],
        keys: Sequence[DefectKey],
        seeds: Sequence[int],
    ) -> list[np.ndarray]:
        """``inpaint`` over all inputs, ``generation_batch`` at a time (the results do not depend on it)."""
        step, images = self.settings.generation_batch, []
        for start in range(0, len(seeds), step):
            chunk = slice(start, start + step)
            images += self.inpaint(sources[chunk], masks[chunk], keys[chunk], seeds=seeds[chunk])
        return images

    def inpaint(
        self,
        sources: Sequence[np.ndarray],
        masks: Sequence[np.ndarray],
        keys: Sequence[DefectKey],
        *,
        seeds: Sequence[int],
    ) -> list[np.ndarray]:
        """Paint a defect of each (product, type) inside each mask on each source (uint8 H x W x 3), one seed each."""
        model, settings, conditioner = self.model, self.settings, self.conditioner
        assert model is not None and conditioner is not None
        generators = generators_from_seeds(seeds)
        image_masks = torch.from_numpy(np.stack(masks)[:, None].astype(np.float32))
        with torch.no_grad():
            normal = model.encode_images(to_model_range(sources))
            cond = conditioner(keys, image_masks)
            uncond = model.encode_prompt([""]) if settings.guidance_scale > 1 else None
            # One mask at latent resolution (a cell with any mask pixel) for both Eq. 1 (what is generated) and
            # Eq. 7 (where AAR weighs): attention acts per latent cell anyway, and the blend paints whole cells.
            lat_mask = latent_mask(image_masks, normal.shape[-1]).to(model.device)
            sampler = DDIMSampler.from_model(model)
            sampler.set_timesteps(settings.sampling_steps)
            blend = BlendTarget.draw(normal, lat_mask, generators)
            latents = blend.background(sampler, int(sampler.timesteps[0]))  # x_T: the normal noised to T
            control = AttentionControl()
            on_step = None
            if settings.aar:
                on_step = install_aar(control, model=model, form=settings.aar_form, normal=normal, mask=lat_mask)
            with installed(model.unet, control):
                final = denoise(
                    model,
                    latents,
                    cond,
                    sampler=sampler,
                    uncond=uncond,
                    guidance_scale=settings.guidance_scale,
                    guidance_rescale=settings.guidance_rescale,
                    control=control,
                    blend=blend,
                    on_step=on_step,
                    generators=generators,
                    x0_range=self.latent_range if settings.x0_clamp else None,
                )
            painted = to_uint8(model.decode_latents(final))
        if settings.paste_background == "off":
            return list(painted)
        # Eq. 1 keeps the background's latents exactly, but decoding them is not lossless and alters pixels
        # around the mask too: outside the kept region the source's own pixels are kept.
        if settings.paste_background == "cells":
            kept = F.interpolate(lat_mask, size=sources[0].shape[:2], mode="nearest")[:, 0].cpu().numpy() > 0
        else:
            kept = np.stack(masks).astype(bool)
        return [np.where(k[..., None], p, s) for k, p, s in zip(kept, painted, sources, strict=True)]
