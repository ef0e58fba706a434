"""BADG (paper 001): disentanglement loss, masked cross-attention, masked DDIM inversion, attention-refined masks."""
