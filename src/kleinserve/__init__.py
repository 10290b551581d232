"""kleinserve: a self-hosted server for Black Forest Labs' FLUX.2 [klein] image models."""

__version__ = "0.1.0"
