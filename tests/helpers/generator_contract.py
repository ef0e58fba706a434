"""The contract every generator meets, as a pytest base class, and the obvious way to build requests.

A generator's test module subclasses ``GeneratorContract`` and supplies only ``method`` and ``settings``
(override the ``settings`` fixture when they need a temporary path), like diffusers'
``SchedulerCommonTest``::

    class TestPerlin(GeneratorContract):
        method = "perlin"
        settings = {"texture_source": "self"}

A diffusion method also overrides the ``base_model`` fixture (a tiny seeded base saved to a temporary
directory), sets ``resolution`` to that base's and ``sampler`` to the name its samples record.

The fixtures write one tiny demo dataset per test session (64 px; a texture and an object product), split
it, fit the generator into a temporary directory, load the artifacts into a fresh instance (as a
generation actor does) and generate a batch of requests from ``make_requests`` at ``resolution``. They fit
and load through ``product_generator``, so a method that fits once per defect type meets the contract as
the one model per product that the registry holds.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pytest
from pydantic import ValidationError

from defectsynth.generators.base import (
    ARTIFACT_FILE,
    FitContext,
    Generator,
    MaskSource,
    Request,
    build_generator,
    generator_class,
)
from defectsynth.generators.fit_units import UnitGenerator, product_generator
from defectsynth.generators.intensity import IntensityControl
from defectsynth.generators.masks import load_source
from defectsynth.storage.demo import write_demo
from defectsynth.storage.layouts import read_dataset
from defectsynth.storage.records import NORMAL, ImageRecord, ProductData
from defectsynth.storage.sample import encode_sample
from defectsynth.storage.split import ProductSplit, SplitSettings, split_product

RESOLUTION = 64
PRODUCTS = ("wood", "washer")  # a texture (no foreground) and an object (with foregrounds)


def demo_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The contract's demo dataset, written once per test session (every contract class shares it)."""
    root = tmp_path_factory.getbasetemp() / "generator-contract-demo"
    if not root.is_dir():
        partial = tmp_path_factory.mktemp("generator-contract-demo-partial")
        write_demo(partial, size=RESOLUTION, train_good=4, test_good=1, per_defect=3, products=PRODUCTS, progress=False)
        partial.rename(root)
    return root


def demo_product(tmp_path_factory: pytest.TempPathFactory, name: str = "wood") -> tuple[ProductData, ProductSplit]:
    """One product of the contract's demo dataset, with its default split."""
    product = read_dataset(demo_dataset(tmp_path_factory), "mvtec", [name])[0]
    return product, split_product(product, SplitSettings())


def make_requests(
    product: ProductData,
    split: ProductSplit,
    method: str,
    n: int,
    mask_source: MaskSource,
    *,
    resolution: int = RESOLUTION,
    seed: int = 0,
) -> list[Request]:
    """``n`` requests cycling over defect types, training normals and training defects, seeds ``seed + i``.

    Request i draws defect type ``types[i % len(types)]`` (the types with generator-training images), is
    painted on training normal ``i % len(normals)``, and for mask source "real" borrows the mask of that
    type's training defect ``(i // len(types)) % len(defects)``. Held-out images are never touched.
    """
    if mask_source not in generator_class(method).mask_sources:
        msg = f"{method} does not take mask source {mask_source!r}"
        raise ValueError(msg)
    types = sorted(t for t, ids in split.generator_train.items() if ids)
    normals = [product.record(image_id) for image_id in split.train_normals]
    requests = []
    for i in range(n):
        defect_type = types[i % len(types)]
        source = normals[i % len(normals)]
        mask_image, mask_paths = None, ()
        if mask_source == "real":
            defects = split.generator_train[defect_type]
            mask_record = product.record(defects[(i // len(types)) % len(defects)])
            mask_image, mask_paths = mask_record.image_id, tuple(str(p) for p in mask_record.mask_paths)
        requests.append(
            Request(
                product=product.name,
                defect_type=defect_type,
                sample_index=i,
                seed=seed + i,
                resolution=resolution,
                source_image=source.image_id,
                source_path=str(source.path),
                mask_source=mask_source,
                mask_image=mask_image,
                mask_paths=mask_paths,
                foreground_path=None if source.foreground_path is None else str(source.foreground_path),
            )
        )
    return requests


def held_out_poisoned(product: ProductData, split: ProductSplit) -> ProductData:
    """A copy of ``product`` whose held-out images (test defects, test normals) and masks are missing files."""
    held_out = set(split.test)
    missing = Path("/nonexistent/held-out")

    def hide(record: ImageRecord) -> ImageRecord:
        masks = tuple(missing / f"{record.stem}_mask{i}.png" for i in range(len(record.mask_paths)))
        return dataclasses.replace(record, path=missing / f"{record.stem}.png", mask_paths=masks)

    def poison(records: tuple[ImageRecord, ...]) -> tuple[ImageRecord, ...]:
        return tuple(hide(r) if r.image_id in held_out else r for r in records)

    return dataclasses.replace(
        product,
        normals=poison(product.normals),
        test_normals=poison(product.test_normals),
        defects=poison(product.defects),
    )


def digest(path: Path) -> str:
    """The sha256 of a file's bytes."""
    return hashlib.sha256(path.read_bytes()).hexdigest()


def comparable(sample: Any) -> tuple:
    """What must match between two generations of one request: pixels, masks, metadata but the clock."""
    cond = None if sample.cond_mask is None else sample.cond_mask.tobytes()
    meta = sample.metadata.model_dump(exclude={"created_at"})
    return sample.image.tobytes(), sample.mask.tobytes(), cond, meta


def assert_same_up_to_rounding(sample: Any, reference: Any) -> None:
    """The same sample from another batch: pixels within one level, masks and metadata equal but for float noise.

    CPU kernels pick their summation order by batch shape (the tiny U-Net's output moves by about 1e-6 between a
    batch of 1 and of 6), so a pixel on a rounding boundary may land one level off; nothing more may differ.
    """
    assert np.abs(sample.image.astype(int) - reference.image.astype(int)).max() <= 1
    assert sample.mask.tobytes() == reference.mask.tobytes()
    assert (sample.cond_mask is None) == (reference.cond_mask is None)
    if sample.cond_mask is not None:
        assert sample.cond_mask.tobytes() == reference.cond_mask.tobytes()
    meta, expected = (s.metadata.model_dump(exclude={"created_at"}) for s in (sample, reference))
    assert close(meta, expected), (meta, expected)


def close(value: Any, expected: Any) -> bool:
    """Equal, floats within a relative 1e-4, through nested dicts and lists."""
    if isinstance(value, dict) and isinstance(expected, dict):
        return value.keys() == expected.keys() and all(close(value[k], expected[k]) for k in value)
    if isinstance(value, list | tuple) and isinstance(expected, list | tuple):
        return len(value) == len(expected) and all(close(v, e) for v, e in zip(value, expected, strict=True))
    if isinstance(value, float) and isinstance(expected, float):
        return math.isclose(value, expected, rel_tol=1e-4, abs_tol=1e-6)
    return value == expected


class GeneratorContract:
    """Contract tests; subclasses set ``method`` and ``settings`` (or override the ``settings`` fixture)."""

    method: ClassVar[str]
    settings: ClassVar[dict[str, Any]] = {}
    requests_per_source: ClassVar[int] = 6
    resolution: ClassVar[int] = RESOLUTION  # of the requests, hence of the samples
    sampler: ClassVar[str | None] = None  # the ``sampler`` its samples record; None for methods that do not sample

    # -- fixtures ---------------------------------------------------------------------------------------------

    @pytest.fixture(scope="module")
    @classmethod
    def demo_root(cls, tmp_path_factory: pytest.TempPathFactory) -> Path:
        return demo_dataset(tmp_path_factory)

    @pytest.fixture(scope="class", params=PRODUCTS)
    @classmethod
    def product(cls, request: pytest.FixtureRequest, demo_root: Path) -> ProductData:
        return read_dataset(demo_root, "mvtec", [request.param])[0]

    @pytest.fixture(scope="class")
    @classmethod
    def split(cls, product: ProductData) -> ProductSplit:
        return split_product(product, SplitSettings())

    @pytest.fixture(name="settings", scope="class")
    @classmethod
    def settings_fixture(cls) -> dict[str, Any]:
        return dict(cls.settings)

    @pytest.fixture(scope="class")
    @classmethod
    def base_model(cls) -> str | None:
        """The diffusion base handed to ``fit`` (``FitContext.base_model``); None for methods without one."""
        return None

    @pytest.fixture(scope="class")
    @classmethod
    def artifacts(
        cls,
        product: ProductData,
        split: ProductSplit,
        settings: dict[str, Any],
        base_model: str | None,
        tmp_path_factory: pytest.TempPathFactory,
    ) -> Path:
        generator = product_generator(cls.method, settings)
        context = FitContext(output_dir=tmp_path_factory.mktemp("artifacts"), max_steps=1, base_model=base_model)
        return generator.fit(held_out_poisoned(product, split), split, context)

    @pytest.fixture(scope="class")
    @classmethod
    def generator(cls, artifacts: Path, settings: dict[str, Any]) -> Generator:
        generator = product_generator(cls.method, settings)  # a fresh instance, as in a generation actor
        generator.load(artifacts)
        return generator

    @pytest.fixture(scope="class")
    @classmethod
    def requests(cls, product: ProductData, split: ProductSplit) -> list[Request]:
        sources = generator_class(cls.method).mask_sources
        n, side = cls.requests_per_source, cls.resolution
        batches = [make_requests(product, split, cls.method, n, s, resolution=side) for s in sources]
        return [request for batch in batches for request in batch]

    @pytest.fixture(scope="class")
    @classmethod
    def samples(cls, generator: Generator, requests: list[Request]) -> list:
        return generator.generate(requests)

    # -- the contract ---------------------------------------------------------------------------------------

    def test_is_a_generator(self, generator: Generator) -> None:
        assert isinstance(generator, Generator)
        assert generator.name == self.method
        cls = generator_class(self.method)
        assert cls.fit_unit in ("product", "defect_type")
        units = generator.units.values() if isinstance(generator, UnitGenerator) else [generator]
        assert all(type(unit) is cls for unit in units)
        assert isinstance(generator, UnitGenerator) == (cls.fit_unit == "defect_type")

    def test_one_sample_per_request_in_order(self, samples: list, requests: list[Request]) -> None:
        assert [s.key for s in samples] == [r.key(self.method) for r in requests]

    def test_image_and_masks(self, samples: list, generator: Generator) -> None:
        side = self.resolution
        for sample in samples:
            assert sample.image.shape == (side, side, 3) and sample.image.dtype == np.uint8
            assert sample.mask.shape == (side, side) and sample.mask.dtype == bool
            if generator.keeps_background:
                assert sample.cond_mask is not None
                assert sample.cond_mask.shape == (side, side) and sample.cond_mask.dtype == bool
                assert sample.cond_mask.any()
            else:  # a method that remakes the whole image is conditioned on no mask
                assert sample.cond_mask is None
            encode_sample(sample)  # the shard encoder accepts it

    def test_metadata(self, samples: list, requests: list[Request]) -> None:
        for sample, request in zip(samples, requests, strict=True):
            meta = sample.metadata
            assert (meta.product, meta.defect_type, meta.label) == (request.product, request.defect_type, 1)
            assert (meta.seed, meta.source_image) == (request.seed, request.source_image)
            assert meta.generator.method == self.method
            assert meta.strength is not None and 0.0 <= meta.strength <= 1.0
            assert meta.qc.passed == bool(sample.mask.any())
            assert meta.qc.scores["mask_area"] == float(sample.mask.sum())

    def test_sampling_metadata(self, samples: list, generator: Generator, base_model: str | None) -> None:
        for sample in samples:
            meta = sample.metadata
            assert meta.sampler == self.sampler
            assert (meta.steps is None) == (self.sampler is None)
            assert meta.steps is None or meta.steps >= 1
            assert meta.generator.base_model == (base_model if generator.uses_diffusion_base else None)
            written = json.loads(encode_sample(sample).members["json"])
            assert (written["sampler"], written["steps"]) == (meta.sampler, meta.steps)
            assert written["generator"]["base_model"] == meta.generator.base_model

    def test_most_samples_change_the_image(self, samples: list) -> None:
        assert sum(s.metadata.qc.passed for s in samples) >= len(samples) // 2

    def test_refined_mask_within_conditioning_mask(self, samples: list, generator: Generator) -> None:
        if not generator.keeps_background:
            return
        for sample in samples:
            assert not (sample.mask & ~sample.cond_mask).any()

    def test_nothing_changes_outside_the_conditioning_mask(
        self, samples: list, requests: list[Request], generator: Generator
    ) -> None:
        for sample, request in zip(samples, requests, strict=True):
            source = load_source(request)
            if generator.keeps_background:
                np.testing.assert_array_equal(sample.image[~sample.cond_mask], source[~sample.cond_mask])
            else:  # it remakes the image: no pixel is the source's by construction
                assert sample.image.tobytes() != source.tobytes()

    def test_deterministic_per_seed(self, artifacts: Path, settings: dict, requests: list[Request], samples) -> None:
        again = product_generator(self.method, settings)
        again.load(artifacts)
        assert [comparable(s) for s in again.generate(requests)] == [comparable(s) for s in samples]

    def test_batch_invariance(self, generator: Generator, requests: list[Request], samples: list) -> None:
        for index in (0, len(requests) - 1):
            assert_same_up_to_rounding(generator.generate([requests[index]])[0], samples[index])
        reversed_samples = generator.generate(requests[::-1])[::-1]
        for again, sample in zip(reversed_samples, samples, strict=True):
            assert_same_up_to_rounding(again, sample)

    def test_other_seeds_give_other_samples(self, generator: Generator, requests: list[Request]) -> None:
        request = requests[0]
        first, second = generator.generate([request, dataclasses.replace(request, seed=request.seed + 1000)])
        assert first.image.tobytes() != second.image.tobytes()

    def test_fit_reads_only_the_training_side(self, artifacts: Path) -> None:
        # the ``artifacts`` fixture fits on a product whose held-out images are missing files
        assert artifacts.is_dir() and any(artifacts.iterdir())

    def test_settings_reject_unknown_keys(self, settings: dict[str, Any]) -> None:
        cls = generator_class(self.method)
        with pytest.raises(ValidationError):
            cls.Settings.model_validate({**settings, "no_such_setting": 1})
        with pytest.raises(ValidationError):
            build_generator(self.method, {**settings, "no_such_setting": 1})

    def test_unsupported_mask_source_is_an_error(self, generator: Generator, requests: list[Request]) -> None:
        unsupported = [s for s in ("real", "learned", "perlin") if s not in generator.mask_sources]
        for mask_source in unsupported:
            with pytest.raises(ValueError, match="mask source"):
                generator.generate([dataclasses.replace(requests[0], mask_source=mask_source)])

    def test_declares_normals_and_intensity(self, generator: Generator) -> None:
        assert isinstance(generator.makes_normals, bool) and isinstance(generator.keeps_background, bool)
        assert generator.intensity is None or isinstance(generator.intensity, IntensityControl)

    def test_intensity_lies_in_the_declared_domain(self, generator: Generator, samples: list) -> None:
        for sample in samples:
            if generator.intensity is None:
                assert sample.metadata.intensity is None
            else:
                assert generator.intensity.contains(sample.metadata.intensity)

    def test_normal_requests_give_normals_or_an_error(self, generator: Generator, requests: list[Request]) -> None:
        normal = dataclasses.replace(requests[0], label=0, defect_type=NORMAL, mask_image=None, mask_paths=())
        if not generator.makes_normals:
            with pytest.raises(ValueError, match="normal"):
                generator.generate([normal])
            return
        (sample,) = generator.generate([normal])
        assert sample.metadata.label == 0 and sample.metadata.defect_type == NORMAL
        assert not sample.mask.any() and sample.cond_mask is None
        encode_sample(sample)

    def test_generate_before_load_is_an_error(self, settings: dict[str, Any], requests: list[Request]) -> None:
        with pytest.raises(RuntimeError):
            product_generator(self.method, settings).generate(requests[:1])

    def test_artifacts_refer_to_the_base(self, artifacts: Path, base_model: str | None) -> None:
        # every generator.json (a per-type model's and each of its units') names the base the fit was given
        cls = generator_class(self.method)
        manifests = [json.loads(p.read_text()) for p in artifacts.rglob(ARTIFACT_FILE)]
        fitted = [m for m in manifests if "units" not in m]
        assert fitted, "no fitted generator.json under the artifacts"
        for manifest in fitted:
            assert manifest.get("base_model") == (base_model if cls.uses_diffusion_base else None)

    def test_artifacts_hold_no_copy_of_the_base(self, artifacts: Path, base_model: str | None) -> None:
        if base_model is None:
            return
        # weight files, not the few-byte configs two directories may share by chance
        base_files = {digest(p) for p in Path(base_model).rglob("*") if p.is_file() and p.stat().st_size >= 4096}
        copied = [p for p in artifacts.rglob("*") if p.is_file() and digest(p) in base_files]
        assert not copied, f"files of the base copied into the artifacts: {copied}"
