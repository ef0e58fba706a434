"""Foundations shared by generators and evaluation, one idea per module; nothing here imports above storage.

- ``config_section`` and ``strategy``: the base of every config section; how a model trains across workers.
- ``train_engine``: one training engine over DeepSpeed ZeRO or torch DDP inside a Ray Train worker.
- ``pyfunc_logging``: how every model is logged to MLflow (as code, with the pinned requirements).
- ``figures`` and ``text_table``: image grids and mask overlays; plain-text tables.
- ``resize``, ``perlin_noise`` and ``texture_augment``: image ops (resizing, DRAEM's Perlin masks, its
  texture augmentation).
- ``resnet``: the ResNet backbone (torchvision's parameter names) of the classifier and the spatial encoder.
"""
