"""Per-frame autoencoders: the interface, the exact pixel default, and a diffusers AutoencoderKL adapter."""

from mardini.autoencoders.base import FrameAutoencoder
from mardini.autoencoders.pixel import SpaceToDepthAutoencoder

__all__ = ["FrameAutoencoder", "SpaceToDepthAutoencoder"]
