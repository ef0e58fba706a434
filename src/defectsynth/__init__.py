"""defectsynth: synthesize industrial anomaly datasets with diffusion models."""

import logging

# transformers tells every process once per image processor that torchvision is missing and it falls back to
# the PIL processor. The CPU install leaves torchvision out on purpose, and nothing here uses those processors.
logging.getLogger("transformers.utils.import_utils").setLevel(logging.ERROR)
