"""The diffusion core shared by the diffusion generators and by DiffusionAD, written once.

``model`` (the VAE + U-Net + text encoder bundle), ``factory`` (tiny from scratch or local Stable
Diffusion weights), ``tokenizer`` (an offline CLIP tokenizer), ``tokens`` (placeholder tokens),
``attention`` (one attention-control processor), ``ddim`` and ``sampling`` (DDIM, guidance, blending,
masked inversion, one-step x0), ``features`` (U-Net and VAE-decoder taps), ``pretrain`` (the tiny
base's training loop), ``tracking`` (base models in the MLflow registry).
"""
