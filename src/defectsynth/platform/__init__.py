"""The composition below the jobs: the full run config, Ray, the data step, MLflow tracking and the registry."""
