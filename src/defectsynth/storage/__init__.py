"""Datasets in, datasets out: layout readers, the few-shot split, demo products."""
