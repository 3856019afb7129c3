"""Adapter for any diffusers ``AutoencoderKL`` read from a local directory (real runs; PAPER.md §2.1).

The paper uses a per-frame 16-channel, 8x VAE; any diffusers AutoencoderKL with that shape matches it. The
weights are never fetched from the hub: point ``path`` at a directory written by ``save_pretrained`` (or a
pipeline directory with ``subfolder="vae"``). diffusers is an optional extra: ``pip install .[diffusers]``.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import math
from collections.abc import Mapping
from pathlib import Path

import torch

from mardini.autoencoders.base import FrameAutoencoder


def _import_autoencoder_kl():
    """diffusers' AutoencoderKL, with an install hint when the optional extra is missing."""
    try:
        from diffusers import AutoencoderKL
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError(
            "DiffusersAutoencoder needs the optional 'diffusers' package: pip install .[diffusers] "
            "(or pip install -r requirements-dev.txt)"
        ) from err
    return AutoencoderKL


def config_factors(config: Mapping) -> tuple[float, float]:
    """``(shift, scale)`` of an AutoencoderKL config: ``shift_factor`` (None -> 0) and ``scaling_factor`` (diffusers'
    default where the config has none)."""
    shift = config.get("shift_factor")
    scale = config.get("scaling_factor")
    if scale is None:  # a config.json written before diffusers recorded it: AutoencoderKL's default applies
        scale = inspect.signature(_import_autoencoder_kl()).parameters["scaling_factor"].default
    return (0.0 if shift is None else float(shift)), float(scale)


def read_config_factors(path: str | Path, subfolder: str | None = None) -> tuple[float, float]:
    """``(shift, scale)`` a :class:`DiffusersAutoencoder` without overrides uses for the VAE at ``path``, read from
    its ``config.json`` alone (no weights loaded). Raises ``OSError`` / ``ValueError`` where it cannot be read."""
    root = Path(path).expanduser()
    config = json.loads(((root / subfolder if subfolder else root) / "config.json").read_text(encoding="utf-8"))
    if not isinstance(config, dict):
        raise ValueError(f"{root} config.json holds no AutoencoderKL config (a {type(config).__name__})")
    return config_factors(config)


WEIGHT_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def weight_dtype(dtype: torch.dtype | str) -> torch.dtype:
    """A VAE weight dtype given as a ``torch.dtype`` or its name (:data:`WEIGHT_DTYPES`); a ValueError otherwise
    (diffusers reads a name as float32, silently)."""
    if isinstance(dtype, torch.dtype) and dtype in WEIGHT_DTYPES.values():
        return dtype
    name = str(dtype).removeprefix("torch.")
    if name not in WEIGHT_DTYPES:
        raise ValueError(f"dtype must be one of {sorted(WEIGHT_DTYPES)} (or the torch.dtype), got {dtype!r}")
    return WEIGHT_DTYPES[name]


class DiffusersAutoencoder(FrameAutoencoder):
    """Per-frame encode/decode through a frozen diffusers ``AutoencoderKL``.

    Latents are normalised as diffusers does, ``z = (raw - shift_factor) * scaling_factor`` (shift None -> 0),
    by :class:`FrameAutoencoder`, unless ``shift`` / ``scale`` override the config's factors (a VAE's own factors
    need not give unit-variance latents on your footage: ``python -m mardini.autoencoders.pixel_stats --diffusers
    PATH`` measures them). ``downsample = 2 ** (len(block_out_channels) - 1)``, ``latent_channels`` from the config.
    Encoding returns the posterior mean unless ``sample_posterior`` is set.

    Args:
        path: local directory holding ``config.json`` and the weights (never a hub id).
        subfolder: e.g. ``"vae"`` inside a full pipeline directory.
        chunk_size: frames per encoder/decoder call (bounds memory; the result does not depend on it).
        sample_posterior: draw ``mean + std * eps`` instead of the mean; eps comes from ``generator``.
        generator: the torch.Generator for posterior samples (required when ``sample_posterior``).
        dtype: weight dtype, a ``torch.dtype`` or its name (``"bfloat16"``: what ``--autoencoder-kwargs`` and a
            YAML config give; default float32). It changes the latents, so another one goes into :meth:`spec` and
            the fingerprint. VAEs whose config sets ``force_upcast`` always run with autocast disabled, so bf16-mixed
            training does not push them to half precision.
        shift: the ``shift`` of the latent normalisation ``z = (raw - shift) * scale``, instead of the config's
            ``shift_factor`` (None: the config's, or 0). The one in use goes into :meth:`spec`, so checkpoints and
            latent caches record it and the latent checks compare it.
        scale: the ``scale`` of that normalisation, instead of the config's ``scaling_factor`` (None: the
            config's); recorded and compared as ``shift``.
    """

    def __init__(
        self,
        path: str | Path,
        subfolder: str | None = None,
        chunk_size: int = 16,
        sample_posterior: bool = False,
        generator: torch.Generator | None = None,
        dtype: torch.dtype | str = torch.float32,
        shift: float | None = None,
        scale: float | None = None,
    ) -> None:
        super().__init__(chunk_size=chunk_size)
        if scale is not None and not (math.isfinite(float(scale)) and float(scale) > 0):
            raise ValueError(f"scale must be a finite number > 0 (latents = (raw - shift) * scale), got {scale!r}")
        if shift is not None and not math.isfinite(float(shift)):
            raise ValueError(f"shift must be a finite number (latents = (raw - shift) * scale), got {shift!r}")
        dtype = weight_dtype(dtype)
        autoencoder_kl = _import_autoencoder_kl()
        root = Path(path).expanduser()
        folder = root / subfolder if subfolder else root
        if not (folder / "config.json").is_file():
            raise FileNotFoundError(
                f"no AutoencoderKL at {folder} (config.json missing). Give a local directory written by "
                "AutoencoderKL.save_pretrained (for a pipeline directory pass subfolder='vae'); hub ids are not used"
            )
        if sample_posterior and generator is None:
            raise ValueError("sample_posterior=True draws noise: pass generator=torch.Generator().manual_seed(...)")
        kwargs = {"subfolder": subfolder} if subfolder else {}
        self.vae = autoencoder_kl.from_pretrained(str(root), local_files_only=True, torch_dtype=dtype, **kwargs)
        self.vae.requires_grad_(False).eval()
        cfg = self.vae.config
        self.latent_channels = int(cfg.latent_channels)
        self.downsample = 2 ** (len(cfg.block_out_channels) - 1)
        config_shift, config_scale = config_factors(cfg)
        self.scale = config_scale if scale is None else float(scale)
        self.shift = config_shift if shift is None else float(shift)
        self.force_upcast = bool(getattr(cfg, "force_upcast", False))
        self.sample_posterior = sample_posterior
        self.generator = generator
        self._spec_args = {"path": str(path), "subfolder": subfolder, "chunk_size": chunk_size,
                           "shift": self.shift, "scale": self.scale}
        if dtype != torch.float32:  # recorded only where not the default, so float32 specs stay as they were
            self._spec_args["dtype"] = str(dtype).removeprefix("torch.")

    def spec(self) -> dict:
        """Rebuilds the frozen VAE from the same local folder with the normalisation in use (posterior sampling is a
        training-time choice)."""
        return {"class_path": "mardini.autoencoders.diffusers_kl.DiffusersAutoencoder", "init_args": self._spec_args}

    def _digest_extra(self, digest) -> None:
        """The VAE's config (its architecture: activation, norm groups, ...), without diffusers' private keys
        (``_name_or_path``, ``_diffusers_version``), which do not change the latents."""
        config = {k: v for k, v in dict(self.vae.config).items() if not k.startswith("_")}
        digest.update(json.dumps(config, sort_keys=True, default=str).encode())

    def train(self, mode: bool = True) -> DiffusersAutoencoder:
        """The VAE is frozen: it stays in eval mode whatever the parent module does."""
        super().train(mode)
        self.vae.eval()
        return self

    def _precision(self, x: torch.Tensor):
        """Autocast off for ``force_upcast`` VAEs, a no-op context otherwise."""
        if self.force_upcast:
            return torch.autocast(device_type=x.device.type, enabled=False)
        return contextlib.nullcontext()

    def encode_frames(self, x: torch.Tensor) -> torch.Tensor:
        """``(N, 3, H, W)`` in [-1, 1] -> raw latents ``(N, C, H/f, W/f)`` in x's dtype."""
        with self._precision(x):
            dist = self.vae.encode(x.to(self.vae.dtype)).latent_dist
            z = dist.sample(generator=self.generator) if self.sample_posterior else dist.mean  # (N, C, h, w)
        return z.to(x.dtype)  # (N, C, h, w)

    def decode_frames(self, z: torch.Tensor) -> torch.Tensor:
        """Raw latents ``(N, C, h, w)`` -> ``(N, 3, h*f, w*f)`` in z's dtype."""
        with self._precision(z):
            x = self.vae.decode(z.to(self.vae.dtype)).sample  # (N, 3, H, W)
        return x.to(z.dtype)  # (N, 3, H, W)
