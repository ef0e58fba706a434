"""Run inside anomalib's own environment: train and test DRAEM on an exported Folder tree, print what it read.

Usage: python anomalib_folder_run.py PRODUCT_DIR TEXTURE_DIR WORK_DIR. It imports only anomalib and its stack
(never defectsynth), so it shows what a user's anomalib does with ``defectsynth shards export``. DRAEM needs no
pretrained weights; its anomaly-source textures come from TEXTURE_DIR instead of the DTD download.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from anomalib.data import Folder
from anomalib.engine import Engine
from anomalib.models import Draem
from anomalib.pre_processing import PreProcessor
from torchvision.transforms.v2 import Resize

SIZE = 64


def read_samples(datamodule: Folder) -> dict[str, list[dict]]:
    """The image and mask paths anomalib paired, per split, as it will feed them to the model."""
    splits = {"train": datamodule.train_data, "val": datamodule.val_data, "test": datamodule.test_data}
    return {
        name: [
            {"image": row.image_path, "mask": row.mask_path, "label": int(row.label_index)}
            for row in data.samples.itertuples()
        ]
        for name, data in splits.items()
    }


def main(product_dir: Path, texture_dir: Path, work_dir: Path) -> None:
    """Fit one epoch, test, and print the samples per split and the test metrics as one JSON line."""
    datamodule = Folder(
        name=product_dir.name,
        root=product_dir,
        normal_dir="normal",
        abnormal_dir="abnormal",
        mask_dir="mask",
        train_batch_size=4,
        eval_batch_size=4,
        num_workers=0,
        seed=0,
    )
    model = Draem(dtd_dir=texture_dir, pre_processor=PreProcessor(transform=Resize((SIZE, SIZE))), visualizer=False)
    engine = Engine(
        max_epochs=1,
        accelerator="cpu",
        devices=1,
        default_root_dir=work_dir,
        logger=False,
        enable_progress_bar=False,
    )
    engine.fit(model=model, datamodule=datamodule)
    (metrics,) = engine.test(model=model, datamodule=datamodule, verbose=False)
    print(json.dumps({"samples": read_samples(datamodule), "metrics": metrics}))


if __name__ == "__main__":
    main(*(Path(arg) for arg in sys.argv[1:4]))
