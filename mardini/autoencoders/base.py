"""The per-frame autoencoder interface every other module talks to."""

from __future__ import annotations

import hashlib
from collections.abc import Collection

import torch
from einops import rearrange
from torch import nn

from mardini.class_paths import import_class_path, subclass_at


class FrameAutoencoder(nn.Module):
    """Encodes and decodes video frame by frame (no temporal compression, PAPER.md §2.1).

    Subclasses implement :meth:`encode_frames` / :meth:`decode_frames` on ``(N, 3, H, W)`` images;
    this class handles the time axis, chunking and the latent normalisation
    ``z = (raw - shift) * scale``.

    Attributes:
        latent_channels: channels C of a latent frame.
        downsample: spatial factor f, so a ``(H, W)`` frame gives an ``(H/f, W/f)`` latent.
        scale, shift: latent normalisation factors (1 and 0 when the latents are already unit-scale).
    """

    latent_channels: int
    downsample: int
    scale: float = 1.0
    shift: float = 0.0

    def __init__(self, chunk_size: int = 16) -> None:
        super().__init__()
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        self.chunk_size = chunk_size

    # -- to implement ------------------------------------------------------------------------------
    def encode_frames(self, x: torch.Tensor) -> torch.Tensor:
        """``(N, 3, H, W)`` in [-1, 1] -> raw latents ``(N, C, H/f, W/f)``."""
        raise NotImplementedError

    def decode_frames(self, z: torch.Tensor) -> torch.Tensor:
        """Raw latents ``(N, C, h, w)`` -> ``(N, 3, h*f, w*f)`` in about [-1, 1]."""
        raise NotImplementedError

    def spec(self) -> dict:
        """``{"class_path", "init_args"}`` that rebuilds this autoencoder (stored in checkpoints)."""
        raise NotImplementedError(f"{type(self).__name__} does not say how to rebuild itself; implement spec()")

    def fingerprint(self) -> str:
        """A digest of what makes these latents beyond :meth:`spec`: the class, every weight and buffer (floats
        as float32) and the float dtypes other than float32 they are held in (half-precision weights encode other
        latents, even where they hold the same values), ``"sha256:<16 hex>"``. A latent cache and a
        checkpoint record it, so a stage or a sampler can tell another VAE behind the same path (and the same VAE
        behind another path). Computed once per autoencoder (it reads every weight; the autoencoder is frozen)."""
        if "_fingerprint" not in self.__dict__:
            self.__dict__["_fingerprint"] = self._digest()
        return self.__dict__["_fingerprint"]

    def fingerprint_before_dtypes(self) -> str:
        """:meth:`fingerprint` as caches and checkpoints written before 2026-12-07 recorded it: without the weights'
        dtype (their values only, as float32). The same as :meth:`fingerprint` for float32 weights; for half-precision
        ones, what a record of this VAE held in that precision then holds (its spec records no ``dtype`` either)."""
        return self._digest(dtypes=False)

    def _digest(self, dtypes: bool = True) -> str:
        """:meth:`fingerprint`, computed (``dtypes=False``: :meth:`fingerprint_before_dtypes`)."""
        digest = hashlib.sha256(f"{type(self).__module__}.{type(self).__qualname__}".encode())
        self._digest_extra(digest)
        state = self.state_dict()
        half = sorted({str(t.dtype) for t in state.values() if t.is_floating_point()} - {str(torch.float32)})
        if half and dtypes:  # float32 weights digest as before the dtypes were fed (caches and checkpoints keep theirs)
            digest.update(f"dtypes:{','.join(half)}".encode())
        for name, tensor in sorted(state.items()):
            t = tensor.detach().float() if tensor.is_floating_point() else tensor.detach()
            digest.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
            digest.update(t.cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
        return "sha256:" + digest.hexdigest()[:16]

    def _digest_extra(self, digest) -> None:
        """Feed :meth:`fingerprint`'s ``digest`` settings that change the latents but are no weight (none here)."""

    # -- public API --------------------------------------------------------------------------------
    def latent_size(self, height: int, width: int) -> tuple[int, int]:
        """Latent ``(h, w)`` of a frame; raises if the frame is not divisible by the downsampling factor."""
        f = self.downsample
        if height % f or width % f:
            raise ValueError(
                f"frame size {height}x{width} is not divisible by the autoencoder's downsampling factor {f}; "
                f"resize or crop the video to a multiple of {f}"
            )
        return height // f, width // f

    @torch.no_grad()
    def encode(self, video: torch.Tensor) -> torch.Tensor:
        """``(B, T, 3, H, W)`` in [-1, 1] -> normalised latents ``(B, T, C, H/f, W/f)``."""
        if video.dim() != 5 or video.shape[2] != 3:
            raise ValueError(f"expected video of shape (B, T, 3, H, W), got {tuple(video.shape)}")
        self.latent_size(video.shape[-2], video.shape[-1])
        b = video.shape[0]
        frames = rearrange(video, "b t c h w -> (b t) c h w")  # (B*T, 3, H, W)
        z = torch.cat([self.encode_frames(c) for c in frames.split(self.chunk_size)])  # (B*T, C, h, w)
        z = (z - self.shift) * self.scale
        return rearrange(z, "(b t) c h w -> b t c h w", b=b)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Normalised latents ``(B, T, C, h, w)`` -> video ``(B, T, 3, h*f, w*f)`` clamped to [-1, 1]."""
        if latents.dim() != 5 or latents.shape[2] != self.latent_channels:
            raise ValueError(
                f"expected latents of shape (B, T, {self.latent_channels}, h, w), got {tuple(latents.shape)}"
            )
        b = latents.shape[0]
        z = rearrange(latents, "b t c h w -> (b t) c h w") / self.scale + self.shift  # (B*T, C, h, w)
        x = torch.cat([self.decode_frames(c) for c in z.split(self.chunk_size)])  # (B*T, 3, H, W)
        return rearrange(x.clamp(-1, 1), "(b t) c h w -> b t c h w", b=b)


def add_allow_autoencoder_argument(parser) -> None:
    """``--allow-autoencoder CLASS_PATH`` (repeatable) on a command that loads checkpoints for sampling: the opt-in
    of :func:`autoencoder_class`, read as ``args.allow_autoencoder`` (a list)."""
    parser.add_argument("--allow-autoencoder", action="append", default=[], metavar="CLASS_PATH",
                        help="import this autoencoder class (one's own FrameAutoencoder, e.g. myext.ae.AvgPoolAE) when "
                             "the checkpoint names it; repeatable (default: only classes under mardini.autoencoders)")


def build_autoencoder(spec: dict, allow: Collection[str] = ()) -> FrameAutoencoder:
    """Rebuild an autoencoder from :meth:`FrameAutoencoder.spec` (classes under ``mardini.autoencoders``, and the
    class paths named in ``allow``: see :func:`autoencoder_class`)."""
    return autoencoder_class(spec.get("class_path", ""), allow)(**dict(spec.get("init_args", {})))


def autoencoder_class(path: str, allow: Collection[str] = ()) -> type:
    """The class a checkpoint's or cache's ``class_path`` names. Only modules under ``mardini.autoencoders`` are
    imported (a file must not make us import arbitrary code), and the exact class paths the caller names in
    ``allow`` (an opt-in for one's own :class:`FrameAutoencoder`); anything else is a ValueError naming the opt-in."""
    path = str(path)
    allowed = {allow} if isinstance(allow, str) else set(allow)  # one path given as a string is one path
    if path.rpartition(".")[0].startswith("mardini.autoencoders"):
        return import_class_path(path)
    if path not in allowed:
        raise ValueError(
            f"autoencoder class {path!r} is not one of mardini.autoencoders; refusing to import it. If you trust "
            f"it, allow it: --allow-autoencoder {path} (sample.py, evaluate.py, found_by_gap, plan_usage, "
            f"mardini.reproduce) or "
            f"MarDiniPipeline.from_checkpoint(..., allow_autoencoders=[{path!r}])"
        )
    return subclass_at(path, FrameAutoencoder, f"the allowed autoencoder class {path!r}")
