"""``MarDiniPipeline``: every MarDini task from one checkpoint through one general call (PAPER.md §4).

``generate(video, mask)`` fills the masked frames of a window; the named tasks (``interpolate``,
``image_to_video``, ``expand``, ``generate_long``, ``long_video``, ``slow_motion``) only build videos and masks
for it.
Per window: the planner runs once on the low-resolution clip; the DDIM loop calls the generator with a
reference-frame cache and with guidance as one batched call; given frames come back bit-identical (their
latents are kept, and their pixels are the inputs).
"""

from __future__ import annotations

import contextlib
import math
import numbers
import os
import sys
import time
import warnings
from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from mardini.autoencoders import FrameAutoencoder
from mardini.data.transforms import planner_copy, unsplit_input
from mardini.devices import resolve_device, synchronize
from mardini.diffusion import CosineSchedule, DDIMSampler
from mardini.diffusion.anchor import FrameAnchor
from mardini.diffusion.checks import check_eta, frame_mask
from mardini.masking import validate_mask
from mardini.pipeline import tasks
from mardini.pipeline.denoise import make_denoise_fn
from mardini.pipeline.loading import Loaded, load_checkpoint
from mardini.pipeline.pretrained import is_pretrained, load_pretrained

CPU_TOKENS_WARN = 16384  # generator tokens per window past which sampling on a CPU warns
DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
          "fp64": torch.float64, "float64": torch.float64}


def _step_noise_seed(seed: int, sample: int) -> int:
    """Seed of the per-step (eta > 0) noise of sample ``sample`` of a clip seeded ``seed``: independent of the
    start noise's stream (which ``seed`` itself draws)."""
    return int(np.random.SeedSequence([int(seed) % 2**63, int(sample), 0xE7A]).generate_state(1, np.uint64)[0] >> 1)


def _caller_stacklevel() -> int:
    """The ``stacklevel`` that points a warning raised by this function's caller at the first frame outside this
    module, :mod:`~mardini.pipeline.tasks` and torch (``no_grad``'s wrappers): the user's call of ``generate`` or of
    a named task (Python 3.12's ``skip_file_prefixes``)."""
    internal, torch_dir = {__file__, tasks.__file__}, os.path.dirname(torch.__file__) + os.sep
    frame, level = sys._getframe(1), 1  # level 1: the frame that warns
    while frame.f_back is not None and (frame.f_code.co_filename in internal
                                        or frame.f_code.co_filename.startswith(torch_dir)):
        frame, level = frame.f_back, level + 1
    return level


@dataclass(frozen=True)
class DenoisingStep:
    """What :meth:`MarDiniPipeline.generate` hands its ``callback`` after each denoising step, for the whole batch.

    Attributes:
        index: the step just taken, 0-based, of ``steps``. t: the noise level it reached (0 after the last).
        latents: the state at ``t``, ``(B * k, T, C, h, w)`` float32, given frames their encoding (after the last
            step: the result). estimate: the step's clean estimate ``x0`` of the same shape, given frames their
            encoding. mask: ``(B * k, T)`` bool, True = generated.
    The tensors are copies: changing them does not change the sampling.
    """

    index: int
    steps: int
    t: float
    latents: torch.Tensor
    estimate: torch.Tensor
    mask: torch.Tensor


class MarDiniPipeline:
    """Sampling from trained networks; build it with :meth:`from_checkpoint`.

    Args:
        generator: the generation network.
        autoencoder: the frame autoencoder the networks were trained on.
        planner: the planning network (None: plan-free sampling with the null plan, guidance scale 1 only).
        schedule: the training noise schedule (None: the default cosine schedule).
        planner_resolution: side of the planner's low-res copy (pixels).
        anchor: the diffused target (:class:`~mardini.diffusion.anchor.FrameAnchor`; default: the latents, the paper).
        window: frames of the trained window; longer videos need :meth:`generate_long` (any mask),
            :meth:`long_video` or :meth:`slow_motion`.
        resolution: the training clips' pixel size ``(H, W)`` (informational; used by ``sample.py``).
        fps: the training clips' frame rate (informational; used by ``sample.py``).
        kind: the checkpoint's stage, ``joint`` or ``generation`` (named in messages).
        device: ``"cpu"``, ``"cuda"``, ``"auto"``.
        dtype: float32; bfloat16 runs under autocast (as bf16-mixed training does); float64 is for exactness tests.
        info: what the checkpoint records (path, kind, size, EMA, ...), kept as ``info``.
    Attributes:
        use_cache, batched_guidance: the two speed-ups (exact); False gives the naive loop (tests, benchmarks).
        last_timings: seconds spent in ``encode``, ``planner``, ``generator`` (all steps) and ``decode`` by the
            last :meth:`generate`.
    """

    def __init__(
        self,
        generator: torch.nn.Module,
        autoencoder: FrameAutoencoder,
        planner: torch.nn.Module | None = None,
        schedule: CosineSchedule | None = None,
        planner_resolution: int = 16,
        window: int = 9,
        resolution: tuple[int, int] | None = None,
        fps: float | None = None,
        kind: str = "joint",
        device: str | torch.device | None = "cpu",
        dtype: torch.dtype | str = torch.float32,
        info: dict | None = None,
        anchor: FrameAnchor | None = None,
    ) -> None:
        self.device = resolve_device(device)
        if isinstance(dtype, str) and dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)} (or a torch dtype), got {dtype!r}")
        self.dtype = DTYPES[dtype] if isinstance(dtype, str) else dtype
        if self.dtype not in (torch.float32, torch.bfloat16, torch.float64):
            raise ValueError(f"dtype must be float32, bfloat16 or float64, got {dtype}")
        self.param_dtype = torch.float64 if self.dtype == torch.float64 else torch.float32
        self.generator = generator.to(self.device, self.param_dtype).eval()
        self.planner = None if planner is None else planner.to(self.device, self.param_dtype).eval()
        self.autoencoder = autoencoder.to(self.device, self.param_dtype).eval()
        self.schedule = schedule or CosineSchedule()
        self.anchor = anchor or FrameAnchor()
        self.planner_resolution, self.window = int(planner_resolution), int(window)
        self.resolution, self.fps, self.kind = resolution, fps, kind
        self.info = dict(info or {})
        self.use_cache = True
        self.batched_guidance = True
        self.last_timings: dict[str, float] = {}
        self._slow_sizes: set[tuple[int, int, int]] = set()  # (T, H, W) already warned as slow on the CPU

    @classmethod
    def from_checkpoint(
        cls, path: str | Path, ema: bool = True, device: str | torch.device | None = "cpu",
        dtype: torch.dtype | str = torch.float32, window: int | None = None,
        allow_autoencoders: Collection[str] = (),
    ) -> MarDiniPipeline:
        """A pipeline from a ``joint`` (or ``generation``) checkpoint written by ``train.py``; EMA weights by default.
        ``window``: the trained window of a checkpoint that records none; ``allow_autoencoders``: class paths of
        one's own autoencoders (outside ``mardini.autoencoders``) the checkpoint may name (see
        :func:`load_checkpoint`). A folder written by ``python -m mardini.export`` is read by
        :meth:`from_pretrained`; ``ema`` must then name the weights it holds, and it records its window."""
        if is_pretrained(path):
            if window is not None:
                raise ValueError(f"{path} is a released model, which records its window: leave window out")
            return cls.from_pretrained(path, device=device, dtype=dtype, allow_autoencoders=allow_autoencoders,
                                       ema=ema)
        ld = load_checkpoint(path, ema=ema, window=window, allow_autoencoders=allow_autoencoders)
        return cls._from_loaded(ld, device, dtype)

    @classmethod
    def from_pretrained(
        cls, folder: str | Path, device: str | torch.device | None = "cpu", dtype: torch.dtype | str = torch.float32,
        vae_path: str | Path | None = None, allow_autoencoders: Collection[str] = (), ema: bool | None = None,
    ) -> MarDiniPipeline:
        """A pipeline from a released folder (``model.safetensors`` and ``config.json``, ``python -m
        mardini.export``); ``vae_path``: where the diffusers VAE it names is, when not inside the folder; ``ema``:
        None takes the weights it holds, True or False refuses a folder of the other ones."""
        return cls._from_loaded(load_pretrained(folder, vae_path, allow_autoencoders, ema), device, dtype)

    @classmethod
    def _from_loaded(cls, ld: Loaded, device, dtype) -> MarDiniPipeline:
        """A pipeline from what a loader rebuilt."""
        return cls(ld.generator, ld.autoencoder, ld.planner, ld.schedule, ld.planner_resolution, ld.window,
                   ld.resolution, ld.fps, ld.kind, device, dtype, ld.info, ld.anchor)

    # ----------------------------------------------------------------------------------------------
    # The general call
    # ----------------------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(
        self,
        video: torch.Tensor,
        mask: torch.Tensor,
        steps: int = 25,
        guidance_scale: float = 1.0,
        seed: int | Sequence[int] = 0,
        num_samples: int = 1,
        progress: bool = True,
        eta: float = 0.0,
        callback: Callable[[DenoisingStep], None] | None = None,
    ) -> torch.Tensor:
        """Fill the masked frames of one window per clip.

        Args:
            video: ``(B, T, 3, H, W)`` float in [-1, 1]; the content of masked frames is ignored.
            mask: ``(B, T)`` bool, True = generate; every row needs a given and a generated frame.
            steps: DDIM steps. guidance_scale: classifier-free guidance on the plan (2.5 for I2V in the paper,
                1 = none). seed: one int (clip b uses ``seed + b``) or one seed per clip; a clip's video depends
                on the batch it is in only by float rounding (its noise is its own, but batched kernels round
                differently; tests/test_pipeline.py holds it to 1e-5). num_samples: samples per clip (sample 0
                equals a single-sample call, up to the same rounding).
            progress: a tqdm bar over the denoising steps.
            eta: DDIM stochasticity in [0, 1], 0 = deterministic DDIM (the paper's sampler), 1 = ancestral (fresh
                noise each step, drawn per clip and sample so that results still depend on the batch only by
                rounding).
            callback: ``callback(step)`` after each denoising step with a :class:`DenoisingStep` of the whole
                batch (the state and the step's clean estimate, as latents: show them with :meth:`decode`); the
                multi-window tasks call it for each window.
        Returns:
            ``(B * num_samples, T, 3, H, W)`` float32 in [-1, 1] on video's device, the samples of a clip adjacent;
            given frames are the input pixels.
        """
        z, x, m = self.generate_latents(video, mask, steps, guidance_scale, seed, num_samples, progress, eta,
                                        callback)
        start = self._now()
        decoded = self.decode(z)  # (B*k, T, 3, H, W)
        self.last_timings["decode"] = self._now() - start
        return torch.where(frame_mask(m), decoded, x).to(video.device)  # (B*k, T, 3, H, W)

    def generate_many(self, clips: Iterable[tuple[torch.Tensor, torch.Tensor]], seed: int = 0, batch: int = 4,
                      **kw) -> Iterator[torch.Tensor]:
        """:meth:`generate` for many clips, a batch at a time: ``clips`` yields ``(video (T, 3, H, W), mask (T,))``
        (any iterable, read as the batches need it); clip i (its place in ``clips``) is seeded ``seed + i``, so its
        samples depend on ``batch`` only by float rounding. Up to ``batch`` consecutive clips of one shape share a
        call (another shape starts a new one); ``kw`` as :meth:`generate`'s. Yields each clip's samples
        ``(num_samples, T, 3, H, W)`` in order, one batch's as that batch is done, so memory holds one batch."""
        if not (isinstance(batch, int) and batch >= 1):
            raise ValueError(f"batch must be an int >= 1 (clips per generate call), got {batch!r}")
        pending: list[tuple[int, torch.Tensor, torch.Tensor]] = []
        for i, (video, mask) in enumerate(clips):
            if pending and (pending[0][1].shape != video.shape or pending[0][2].shape != mask.shape):
                yield from self._generate_batch(pending, seed, kw)
                pending = []
            pending.append((i, video, mask))
            if len(pending) == batch:
                yield from self._generate_batch(pending, seed, kw)
                pending = []
        if pending:
            yield from self._generate_batch(pending, seed, kw)

    def _generate_batch(self, pending: list[tuple[int, torch.Tensor, torch.Tensor]], seed: int,
                        kw: dict) -> Iterator[torch.Tensor]:
        """One :meth:`generate` call for the ``(index, video, mask)`` clips ``pending``, of one shape; each clip's
        samples."""
        video = torch.stack([v for _, v, _ in pending])  # (B, T, 3, H, W)
        mask = torch.stack([m for _, _, m in pending])  # (B, T)
        out = self.generate(video, mask, seed=[seed + i for i, _, _ in pending], **kw)  # (B*k, T, 3, H, W)
        yield from out.split(kw.get("num_samples", 1))  # (k, T, 3, H, W) per clip

    @torch.no_grad()
    def generate_latents(
        self, video: torch.Tensor, mask: torch.Tensor, steps: int = 25, guidance_scale: float = 1.0,
        seed: int | Sequence[int] = 0, num_samples: int = 1, progress: bool = True, eta: float = 0.0,
        callback: Callable[[DenoisingStep], None] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """:meth:`generate` before decoding: latents ``(B*k, T, C, h, w)`` float32 (given frames bit-identical to
        their encoding), and the repeated pixels ``(B*k, T, 3, H, W)`` (masked frames zeroed) and mask ``(B*k, T)``."""
        self._check(video, mask, guidance_scale, num_samples)
        check_eta(eta)
        if callback is not None and not callable(callback):
            raise ValueError(f"callback must be a function of one DenoisingStep, got {type(callback).__name__}")
        b, t, _, h, w = video.shape
        slow = self._warn_if_slow(t, h, w, steps)
        seeds = tasks.per_clip_seeds(seed, b)
        m = mask.to(self.device).repeat_interleave(num_samples, 0)  # (B*k, T)
        x = self._given_pixels(video.repeat_interleave(num_samples, 0), m)  # (B*k, T, 3, H, W)
        lh, lw = self.autoencoder.latent_size(h, w)
        noise = torch.cat([  # one CPU generator per clip: its samples do not depend on the batch
            torch.randn((num_samples, t, self.autoencoder.latent_channels, lh, lw), generator=torch.Generator().manual_seed(s))
            for s in seeds
        ]).to(self.device)  # (B*k, T, C, h, w)
        # eta > 0: one generator per (clip, sample) for the per-step noise, so sample j never depends on k or B
        step_gens = [torch.Generator().manual_seed(_step_noise_seed(s, j)) for s in seeds for j in range(num_samples)]
        self.last_timings = {"encode": 0.0, "planner": 0.0, "generator": 0.0, "decode": 0.0}
        sampler = DDIMSampler(self.schedule, steps, eta)
        grid = sampler.timesteps().tolist()  # steps + 1 floats, 1 -> 0
        counts = m.sum(dim=1)  # (B*k,) rows with equal counts share one cache
        windows = []
        for c in counts.unique().tolist():
            rows = (counts == c).nonzero().squeeze(1)  # (G,)
            gens = [step_gens[r] for r in rows.tolist()]
            windows.append(_Window(self, rows, x[rows], m[rows], noise[rows], sampler, guidance_scale, gens,
                                   keep_estimate=callback is not None))
        start = self._now()
        for i in tqdm(range(sampler.steps), desc="denoising", disable=not progress, leave=False):
            for window in windows:  # the groups step together, so that a callback sees the whole batch
                window.step(i, grid)
            if slow and i == 0:
                self._warn_first_step(self._now() - start, sampler.steps)
            if callback is not None:
                callback(DenoisingStep(i, sampler.steps, grid[i + 1], self._gather(windows, noise, "latents"),
                                       self._gather(windows, noise, "estimate"), m.clone()))
        self.last_timings["generator"] += self._now() - start  # callbacks included
        return self._gather(windows, noise, "latents"), x, m

    def generator_tokens(self, frames: int, height: int, width: int) -> int:
        """Tokens the generator attends over in one window of ``frames`` frames of ``height`` x ``width`` px."""
        lh, lw = self.autoencoder.latent_size(height, width)
        p = self.generator.cfg.patch_size
        return frames * (lh // p) * (lw // p)

    def _warn_if_slow(self, frames: int, height: int, width: int, steps: int) -> bool:
        """Warn once per size when a CPU samples windows of more than ``CPU_TOKENS_WARN`` generator tokens (no
        sign of life for minutes otherwise); True when it warned, so that the first step's time follows."""
        tokens = self.generator_tokens(frames, height, width)
        if self.device.type != "cpu" or tokens <= CPU_TOKENS_WARN or (frames, height, width) in self._slow_sizes:
            return False
        self._slow_sizes.add((frames, height, width))
        warnings.warn(
            f"sampling {frames} frames of {height}x{width} px on the CPU: {tokens} generator tokens per window, over "
            f"{CPU_TOKENS_WARN}, so each of the {steps} steps may take minutes: sample on a GPU (sample.py / "
            "evaluate.py --device cuda) or at a smaller size (--resolution)",
            stacklevel=_caller_stacklevel())
        return True

    @staticmethod
    def _warn_first_step(seconds: float, steps: int) -> None:
        """The estimate after a slow size's first denoising step: its time and the steps' total."""
        warnings.warn(f"the first of {steps} denoising steps took {seconds:.1f} s: about "
                      f"{seconds * steps / 60:.1f} min for the steps of this call", stacklevel=_caller_stacklevel())

    @staticmethod
    def _gather(windows: list[_Window], like: torch.Tensor, what: str) -> torch.Tensor:
        """The windows' ``latents()`` or ``estimate()``, back in batch order: ``(B*k, T, C, h, w)`` float32."""
        z = torch.empty_like(like)  # (B*k, T, C, h, w)
        for window in windows:
            z[window.rows] = getattr(window, what)()
        return z

    @torch.no_grad()
    def plan(self, video: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The planning signal that :meth:`generate` feeds the generator, one window per clip.

        Args:
            video, mask: as in :meth:`generate` (the content of masked frames is ignored).
        Returns:
            ``(B, T, N_low, D)`` float32 on the pipeline's device: per frame, one ``D``-dim token per planner
            patch of the ``planner_resolution`` copy (the planner runs once, with masked frames as its [MASK]).
        """
        if self.planner is None:
            raise ValueError(f"this '{self.kind}' checkpoint has no planner, so there is no plan (it samples with "
                             "the learned null plan); load a joint checkpoint")
        self._check(video, mask, 1.0, 1)
        m = mask.to(self.device)  # (B, T)
        with self._autocast():
            return self._plan(self._given_pixels(video, m), m).float()  # (B, T, N_low, D)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Pixels of latents ``(B, T, C, h, w)`` (:meth:`generate_latents`, a callback's state):
        ``(B, T, 3, H, W)`` float32, in [-1, 1] up to the decoder's overshoot."""
        with self._autocast():
            return self.autoencoder.decode(latents.to(self.device, self.param_dtype)).float()  # (B, T, 3, H, W)

    def _given_pixels(self, video: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        """``video (B, T, 3, H, W)`` as float32 on the device with the masked frames ``m (B, T)`` zeroed."""
        x = video.to(self.device, torch.float32)  # (B, T, 3, H, W)
        return torch.where(frame_mask(m), torch.zeros((), device=self.device), x)  # masked content never enters

    def _plan(self, x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        """The planner on the low-resolution copy of ``x (B, T, 3, H, W)``: ``(B, T, N_low, D)`` (under autocast)."""
        z_low = self.autoencoder.encode(planner_copy(x, self.planner_resolution).to(self.param_dtype))
        return self.planner(z_low, m)  # (B, T, N_low, D): once per window

    # ----------------------------------------------------------------------------------------------
    # Named tasks (see mardini.pipeline.tasks)
    # ----------------------------------------------------------------------------------------------
    def interpolate(self, first, last, frames=None, **kw) -> torch.Tensor:
        """Frames between ``first`` and ``last`` ``(B, 3, H, W)``: a ``(B, frames, 3, H, W)`` video."""
        return tasks.interpolate(self, first, last, frames, **kw)

    def image_to_video(self, image, frames=None, index=0, **kw) -> torch.Tensor:
        """A video around one image ``(B, 3, H, W)`` placed at frame ``index``; ``guidance_scale`` defaults to the
        paper's 2.5 (1 without a planner)."""
        return tasks.image_to_video(self, image, frames, index, **kw)

    def expand(self, prefix, frames=None, **kw) -> torch.Tensor:
        """Continue a prefix ``(B, n, 3, H, W)`` (or ``(n, 3, H, W)``, ``(3, H, W)``: one clip) to ``frames`` frames
        (one window)."""
        return tasks.expand(self, prefix, frames, **kw)

    def generate_long(self, video, mask, context=None, **kw) -> torch.Tensor:
        """Any mask ``(T,)`` (or ``(B, T)``, equal rows) over ``video (B, T, 3, H, W)`` of more frames than a window,
        window by window (:func:`~mardini.pipeline.tasks.generate_long`; ``T <= window``: :meth:`generate`)."""
        return tasks.generate_long(self, video, mask, context, **kw)

    def long_video(self, prefix, total_frames, context=None, **kw) -> torch.Tensor:
        """Continue a prefix to ``total_frames`` by windows that reuse the last ``context`` frames. ``prefix``:
        ``(B, n, 3, H, W)``, ``(n, 3, H, W)`` (n frames of ONE clip, not B images) or one image ``(3, H, W)``."""
        return tasks.long_video(self, prefix, total_frames, context, **kw)

    def slow_motion(self, video, factor=2, **kw) -> torch.Tensor:
        """``factor - 1`` frames between consecutive frames (factor a power of 2), by repeated interpolation."""
        return tasks.slow_motion(self, video, factor, **kw)

    # ----------------------------------------------------------------------------------------------
    # Checks and helpers
    # ----------------------------------------------------------------------------------------------
    def _check(self, video: torch.Tensor, mask: torch.Tensor, scale: float, num_samples: int) -> None:
        if not torch.is_tensor(video) or video.dim() != 5 or video.shape[2] != 3 or not video.is_floating_point():
            tensor = torch.is_tensor(video)
            got = f"{video.dtype} {tuple(video.shape)}" if tensor else type(video).__name__
            fix = "one window: T frames of B clips"
            if tensor and video.dim() == 5 and video.shape[-1] == 3:
                fix = "channels last (B, T, H, W, 3): convert with x.permute(0, 1, 4, 2, 3)"
            elif tensor and not video.is_floating_point():
                fix = "uint8 frames: convert with x / 127.5 - 1"
            raise ValueError(f"video must be a float (B, T, 3, H, W) tensor in [-1, 1], got {got} ({fix})")
        if video.shape[0] == 0:
            raise ValueError(f"video holds no clips: got {tuple(video.shape)}; give at least one clip (B >= 1)")
        if not torch.is_tensor(mask) or mask.dtype != torch.bool or tuple(mask.shape) != tuple(video.shape[:2]):
            raise ValueError(f"mask must be a (B, T) = {tuple(video.shape[:2])} bool tensor (True = generate), got "
                             f"{getattr(mask, 'dtype', type(mask).__name__)} {tuple(getattr(mask, 'shape', ()))}")
        validate_mask(mask)
        t = video.shape[1]
        if t > self.window:
            raise ValueError(f"{t} frames is more than the checkpoint's trained window of {self.window} frames; "
                             f"sample at most {self.window} frames per window, or use generate_long(video, mask) "
                             "for any mask over more frames (sample.py generate does so when --keep or --frames go "
                             "past the window), long_video or slow_motion, which go window by window")
        if not (isinstance(scale, numbers.Real) and math.isfinite(scale) and scale >= 0):
            raise ValueError(f"guidance_scale must be a finite number >= 0 (1 = no guidance, 2.5 for image_to_video "
                             f"in the paper), got {scale!r}")
        if self.planner is None and scale != 1.0:
            raise ValueError(f"this '{self.kind}' checkpoint has no planner: it samples plan-free (the learned "
                             f"null plan), so guidance_scale must be 1 (got {scale}); use a joint checkpoint "
                             "for guidance")
        tasks.check_count(num_samples, "num_samples", 1)
        given = video[~mask.to(video.device)]  # (n_given, 3, H, W)
        if not bool(torch.isfinite(given).all()) or given.abs().max() > 1.0 + 1e-3:
            raise ValueError(f"given frames must be finite pixels in [-1, 1], got [{given.min():.3g}, "
                             f"{given.max():.3g}]; scale [0, 1] images with 2 x - 1, uint8 with x / 127.5 - 1")
        if given.numel() and given.min() >= 0:
            warnings.warn(f"every given pixel is >= 0 ([{given.min():.3g}, {given.max():.3g}]): frames in [0, 1] "
                          "(e.g. torchvision's ToTensor) give a washed-out video; the pipeline reads [-1, 1], so pass "
                          "x * 2 - 1", stacklevel=_caller_stacklevel())
        if self.planner is not None and min(video.shape[-2:]) < self.planner_resolution:  # the copy's short side
            raise ValueError(f"frames of {tuple(video.shape[-2:])} have a short side smaller than the planner's "
                             f"resolution {self.planner_resolution} (its low-resolution copy would be upscaled); "
                             f"sample at the training resolution {self.resolution}")
        self.check_size(*video.shape[-2:])

    def size_problem(self, height: int, width: int) -> str | None:
        """Why frames of ``height x width`` cannot be sampled (sides that do not split into the generator's
        tokens, a planner copy that does not split into the planner's, or a plan token grid of another aspect
        ratio than the generator's: :func:`~mardini.data.transforms.unsplit_input`), or None when they can."""
        f = self.autoencoder.downsample
        patches = {"generator": self.generator.cfg.patch_size}
        if self.planner is not None:
            patches["planner"] = self.planner.cfg.patch_size
        unsplit = unsplit_input(height, width, f, patches, self.planner_resolution, self.generator.cfg.cross_rope)
        if unsplit is None:
            return None
        name, (h, w), step = unsplit
        copy = f"the planner's copy of {height}x{width} frames is {h}x{w} (short side {self.planner_resolution})"
        if name == "plan grid":
            g = f * patches["generator"]
            return (f"{copy}, a {h // step}x{w // step} plan token grid, not of the aspect ratio of the generator's "
                    f"{height // g}x{width // g} token grid, on which the generator lays the plan out")
        why = f"both sides must be multiples of {step} (the autoencoder's factor {f} x the {name}'s patch {patches[name]})"
        if name == "generator":
            return f"{height}x{width} frames do not split into the generator's tokens: {why}"
        return f"{copy}, which does not split into the planner's tokens: {why}"

    def nearest_size(self, height: int, width: int, reach: int = 8) -> tuple[int, int] | None:
        """The size nearest to ``height x width`` (fewest pixels of change) that :meth:`size_problem` accepts,
        among multiples of the generator's token size within ``reach`` tokens of each side."""
        step = self.autoencoder.downsample * self.generator.cfg.patch_size
        around = lambda n: [m for m in range(max(step, (n // step - reach) * step), (n // step + reach + 1) * step + 1, step)]  # noqa: E731
        fits = [(h, w) for h in around(height) for w in around(width) if self.size_problem(h, w) is None]
        return min(fits, key=lambda s: (abs(s[0] - height) + abs(s[1] - width), -s[0] * s[1]), default=None)

    def check_size(self, height: int, width: int) -> None:
        """Raise a ValueError naming the problem and the nearest size that works (:meth:`size_problem`)."""
        problem = self.size_problem(height, width)
        if problem:
            near = self.nearest_size(height, width)
            fix = f"sample at {near[0]}x{near[1]} (sample.py --resolution {near[0]}x{near[1]})" if near else \
                f"sample at the training resolution {self.resolution}"
            raise ValueError(f"{problem}; {fix}")

    def _autocast(self):
        if self.dtype == torch.bfloat16:
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _now(self) -> float:
        """The host clock once the device's queued work is done (``last_timings``)."""
        synchronize(self.device)
        return time.perf_counter()


class _Window:
    """One group of rows with the same number of generated frames, sampled with one reference cache: encoded and
    planned once, then stepped by :meth:`step` (every group of a batch steps together)."""

    def __init__(self, pipe: MarDiniPipeline, rows: torch.Tensor, x: torch.Tensor, m: torch.Tensor,
                 noise: torch.Tensor, sampler: DDIMSampler, scale: float, step_gens: list[torch.Generator],
                 keep_estimate: bool = False) -> None:
        """``x (G, T, 3, H, W)`` given pixels, ``m (G, T)``, ``noise (G, T, C, h, w)``; ``step_gens``: one CPU
        generator per row for the fresh noise of each step when ``eta > 0``; ``keep_estimate``: remember each
        step's velocity for :meth:`estimate` (a callback reads it)."""
        self.pipe, self.rows, self.m, self.sampler, self.step_gens = pipe, rows, m, sampler, step_gens
        with pipe._autocast():
            start = pipe._now()
            self.z_ref = pipe.autoencoder.encode(x.to(pipe.param_dtype)).float()  # (G, T, C, h, w)
            pipe.last_timings["encode"] += pipe._now() - start
            plan = None
            if pipe.planner is not None:
                start = pipe._now()
                plan = pipe._plan(x, m)  # (G, T, N_low, D)
                pipe.last_timings["planner"] += pipe._now() - start
        self.fn = make_denoise_fn(pipe.generator, plan, m, scale, pipe.use_cache, pipe.batched_guidance,
                                  pipe.param_dtype, pipe.schedule)
        self.z = torch.where(frame_mask(m), noise, self.z_ref)  # (G, T, C, h, w)
        self.denoise = self._velocity if keep_estimate else self.fn
        self.last: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None  # the last step's (z_t, v, t)

    def _velocity(self, z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The denoising function, remembering its last call for :meth:`estimate`."""
        v = self.fn(z, t)  # (G, T, C, h, w)
        self.last = (z, v, t)
        return v

    def step(self, i: int, grid: list[float]) -> None:
        """Denoising step ``i``, from ``grid[i]`` to ``grid[i + 1]``."""
        with self.pipe._autocast():
            fresh = None
            if self.sampler.eta > 0 and grid[i + 1] > 0:
                fresh = torch.stack([torch.randn(self.z.shape[1:], generator=g) for g in self.step_gens])
                fresh = fresh.to(self.z)  # (G, T, C, h, w)
            self.z = self.sampler.step(self.denoise, self.z, grid[i], grid[i + 1], self.m, self.z_ref, noise=fresh)

    def latents(self) -> torch.Tensor:
        """The state in latent space: ``(G, T, C, h, w)`` float32, reference frames bit-identical."""
        return self.pipe.anchor.from_target(self.z, self.z_ref, self.m)

    def estimate(self) -> torch.Tensor:
        """The last step's clean estimate ``x0 = alpha z_t - sigma v`` in latent space: ``(G, T, C, h, w)``."""
        z, v, t = self.last
        x0, _ = self.pipe.schedule.predict_x0_eps(z.float(), v.float(), t)  # (G, T, C, h, w)
        return self.pipe.anchor.from_target(x0, self.z_ref, self.m)
