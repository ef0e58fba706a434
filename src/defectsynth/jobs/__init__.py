"""Ray jobs, one module each: ``python -m defectsynth.jobs.<name> --config FILE [--set key=value ...]``."""
