"""Per-frame autoencoders: the interface, the exact pixel default, and a diffusers AutoencoderKL adapter.

``DiffusersAutoencoder`` is imported lazily, so ``import mardini.autoencoders`` never imports diffusers.
"""

from mardini.autoencoders.base import FrameAutoencoder, build_autoencoder
from mardini.autoencoders.pixel import SpaceToDepthAutoencoder

__all__ = ["DiffusersAutoencoder", "FrameAutoencoder", "SpaceToDepthAutoencoder", "build_autoencoder"]


def __getattr__(name: str):
    if name == "DiffusersAutoencoder":
        from mardini.autoencoders.diffusers_kl import DiffusersAutoencoder

        return DiffusersAutoencoder
    raise AttributeError(f"module 'mardini.autoencoders' has no attribute {name!r}")
