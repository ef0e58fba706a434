"""Generators: the protocol and registry (``base``), conditioning masks, one module per method."""
