"""CADiff (paper 004): context-aware text prompt, self-adaptive spatial control, intensity-controllable re-weighting."""
