"""Generators: the protocol and registry (``base``), shared diffusion parts, one module per method."""
