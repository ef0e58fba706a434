"""defectsynth: synthesize industrial anomaly datasets with diffusion models."""

import logging
import os

# transformers tells every process once per image processor that torchvision is missing and it falls back to
# the PIL processor. The CPU install leaves torchvision out on purpose, and nothing here uses those processors.
logging.getLogger("transformers.utils.import_utils").setLevel(logging.ERROR)

# transformers draws a "Loading weights" bar for every text encoder it loads (each generation actor, each fit):
# instant on these models, and one per process. HF_HUB_DISABLE_PROGRESS_BARS=0 brings the bars back.
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
