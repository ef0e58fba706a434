"""AnomalyDiffusion (paper 000): anomaly and spatial embeddings, learned masks, blended sampling with AAR.

- ``generator``: the platform generator (fit, load, generate) and its settings, incl. the ablation switches.
- ``spatial_encoder``: E, mask -> n token embeddings (ResNet + FPN + one head per token).
- ``aar``: adaptive attention re-weighting, the paper's decoded-image form and the authors' latent form.
- ``mask_generator``: e_m by textual inversion on real masks, sampled with guidance 5 and binarised at 0.5.
"""
