"""The diffusion core's old home; it lives in :mod:`defectsynth.diffusion`. Only ``tracking`` stays, for pickles."""
