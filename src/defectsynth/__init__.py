"""defectsynth: synthesize industrial anomaly datasets with diffusion models."""
