"""MarDini-Lightning: masked autoregressive planning + lightweight diffusion for video."""

__version__ = "0.1.0"
