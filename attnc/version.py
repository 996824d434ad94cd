"""attnc's version: a cache-key part of every kernel and artifact, importable from any layer."""
__version__ = "0.1.0"
