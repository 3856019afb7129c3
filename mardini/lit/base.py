"""Shared base of the three training stages: optimiser, LR schedule, EMA, RNG, logging, safety checks.

Subclasses build their networks into ``self.networks`` (an ``nn.ModuleDict``) and implement
:meth:`compute_loss`. Everything else -- AdamW with ``blr * global_batch / 256``, warm-up + cosine,
EMA of the networks only (timm ``ModelEmaV3``), per-step RNG derived from (seed, rank, step), the
non-finite policy, the latents of a batch, checkpoint metadata -- lives here once.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Callable
from typing import Any, ClassVar, Literal

import lightning as L
import torch
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import AttributeDict, grad_norm
from timm.utils.model_ema import ModelEmaV3
from torch import nn

from mardini import cpu_kernels
from mardini.autoencoders import FrameAutoencoder, SpaceToDepthAutoencoder
from mardini.devices import check_supported
from mardini.diffusion.anchor import FrameAnchor
from mardini.lit.batch_weight import ElementWindow, element_mean_share, loss_scale, step_batches
from mardini.lit.clip_draws import ClipGenerators, Draws, draw_rows, one_per_clip
from mardini.lit.expected_warnings import ExpectedWarnings
from mardini.lit.fsdp import (
    attached_trainer, fsdp_root, lerp_local_, local_tensors, paired, root_unsharded, unwrapped_name,
)
from mardini.lit.loop_state import end_validation_workers
from mardini.lit.schedules import scaled_lr, warmup_cosine
from mardini.masking import MaskSampler, mask_sampler_class

CHECKPOINT_FORMAT = 1  # bump when the layout of checkpoint["mardini"] or the network keys change
RESUME_FIX = ("resume with the settings the run was trained with (its config.yaml in the log folder; earlier ones are kept "
              "beside it as config.N.yaml), or start a new run: --ckpt_path null starts over in the same log folder "
              "(the earlier run's checkpoints are moved to checkpoints/earlier.N/), another trainer.logger save_dir or "
              "name in a new one")


class MarDiniBase(L.LightningModule):
    """Common machinery; see the subclasses for the losses.

    Args:
        size: model size name from ``mardini.models.registry`` (``tiny``, ``small``, ``mardini-s/st`` ...).
        planner: overrides of the size's planner config fields, e.g. ``{"depth": 2}``.
        generator: overrides of the size's generator config fields, e.g. ``{"abs_pos": true}``.
        autoencoder: a :class:`FrameAutoencoder` (default: exact space-to-depth with factor 2). Frozen; kept
            out of the optimiser, the EMA and the checkpoints, which record its ``spec()`` instead (one it lacks is
            refused here, not at the first checkpoint).
        planner_resolution: short side of the low-resolution copy the planner sees (pixels; aspect ratio kept); a
            stage with a planner refuses one that is no multiple of the autoencoder's factor x the planner's patch.
        frames: frames per training clip; ``None`` takes the data's window. Smaller than the data's window
            takes a random contiguous crop (so a curriculum can change it without rebuilding the loader).
        keep_ratio: ``(min, max)`` fraction of frames kept as references (the paper's "mask ratio").
        templates: task-template probabilities for the mask sampler (names from its class's ``templates``).
        mask_sampler: class path of a :class:`MaskSampler` subclass to draw the training masks (built with
            ``keep_ratio`` and ``templates``), e.g. one that declares a template of one's own; None: ``MaskSampler``.
        blr: base LR, scaled by ``global_batch / 256``.
        lr: an absolute LR that overrides ``blr`` (None: ``blr`` scaled).
        weight_decay: AdamW's decoupled weight decay of the networks' matrices (parameters of 2 or more dimensions;
            biases, norms and learned tokens get none); 0 (the default, every shipped config) is none.
        betas: AdamW's ``(beta1, beta2)``, each in [0, 1).
        warmup_steps: steps of the linear LR warm-up.
        decay_steps: the step at which the cosine after the warm-up reaches ``min_lr_ratio`` (None:
            ``trainer.max_steps``).
        min_lr_ratio: the LR at the end of the cosine, as a fraction of the peak.
        ema_decay: decay of the EMA of the networks (with ``ema_warmup``: its cap).
        ema_warmup: ramp the EMA decay up as timm does, ``1 - (1 + step)^(-2/3)``, capped at ``ema_decay``.
        ema_keep_loaded: a stage started from checkpoints (``init_from``, ``planner_ckpt``, ``generator_ckpt``)
            keeps the EMA they hold and updates it at the full ``ema_decay`` from its first step. False (the
            default, every shipped chain): the first update replaces the loaded EMA by the loaded raw weights, so
            each stage's EMA restarts there (its decay ramping up again with ``ema_warmup``).
        nonfinite: ``stop`` raises naming the step and batch; ``skip`` drops the optimiser step (with gradient
            accumulation its whole window, whichever micro-batch was non-finite) and counts it once.
        seed: base of every random draw (mask, t, noise, dropout) via (seed, rank, step). None: train.py's
            ``seed_everything`` (0 from Python, or where ``seed_everything`` is false).
        init_from: checkpoint of a previous stage of the same kind to start from (weights + EMA only).
        compile: ``torch.compile`` each network's forward in place (state-dict keys unchanged).
            Activation checkpointing is a network setting: ``planner: {checkpointing: true}`` (same for
            ``generator``); bf16 is the trainer's ``precision: bf16-mixed`` (or ``32-true``, or fp16's ``16-mixed``;
            others are refused at setup).
        loss_reduction: how the training loss averages the generated (masked) elements. ``clip`` (the default):
            each clip's mean, then the mean over the clips, so every clip weighs the same. ``element`` (the paper's
            form): the mean over all generated elements of the global batch (every rank's, through an all-reduce of
            the generated-frame counts; :mod:`mardini.lit.batch_weight`), so clips with more generated frames weigh
            more. Applies to every loss of the stage (the planner warm-up's regression, the joint stage's
            ``plan_recon_weight`` term); ``train/loss`` and validation stay per-clip means, ``element`` adds
            ``train/loss_element``. With ``trainer.accumulate_grad_batches`` above 1 the mean is over every
            micro-batch of the window: the accumulated gradients are rescaled once the window's count is known
            (:class:`~mardini.lit.batch_weight.ElementWindow`, when the window's last backward has returned: before
            every ``on_before_optimizer_step`` and the clipping).
    """

    KIND: ClassVar[str] = "base"

    def __init__(
        self,
        size: str = "tiny",
        planner: dict[str, Any] | None = None,
        generator: dict[str, Any] | None = None,
        autoencoder: FrameAutoencoder | None = None,
        planner_resolution: int = 16,
        frames: int | None = None,
        keep_ratio: tuple[float, float] = (0.35, 1.0),
        templates: dict[str, float] | None = None,
        mask_sampler: str | None = None,
        blr: float = 3.5e-5,
        lr: float | None = None,
        weight_decay: float = 0.0,
        betas: tuple[float, float] = (0.9, 0.95),
        warmup_steps: int = 0,
        decay_steps: int | None = None,
        min_lr_ratio: float = 0.1,
        ema_decay: float = 0.9999,
        ema_warmup: bool = True,
        ema_keep_loaded: bool = False,
        nonfinite: Literal["stop", "skip"] = "stop",
        seed: int | None = None,
        init_from: str | None = None,
        compile: bool = False,
        loss_reduction: Literal["clip", "element"] = "clip",
    ) -> None:
        super().__init__()
        seed = 0 if seed is None else seed  # recorded as drawn with (save_hyperparameters reads the arguments now)
        self.save_hyperparameters(ignore=["autoencoder"])
        _check_settings(planner_resolution=planner_resolution, frames=frames, blr=blr, lr=lr,
                        warmup_steps=warmup_steps, min_lr_ratio=min_lr_ratio, ema_decay=ema_decay,
                        nonfinite=nonfinite, weight_decay=weight_decay, betas=betas, decay_steps=decay_steps,
                        loss_reduction=loss_reduction)
        self.autoencoder = autoencoder if autoencoder is not None else SpaceToDepthAutoencoder(2)
        self.autoencoder.requires_grad_(False)
        _check_autoencoder_spec(self.autoencoder)
        sampler_class = mask_sampler_class(mask_sampler)
        try:
            self.mask_sampler: MaskSampler = sampler_class(tuple(keep_ratio), dict(templates or {"random": 1.0}))
        except ValueError as e:
            raise ValueError(f"model.keep_ratio / model.templates: {e}") from None
        # the names of the per-template losses, by template index: fixed for a fit (setup), so every rank logs and
        # reduces the same ones
        self.mask_templates: tuple[str, ...] = sampler_class.templates
        self.frames = frames
        self.networks = nn.ModuleDict(self.build_networks())
        self._check_planner_resolution()
        # weight decay applies to matrices (ndim >= 2), decided by these shapes: under FSDP every parameter the
        # optimiser sees is a 1-D view of its shard
        self._param_ndim = {n: p.ndim for n, p in self.networks.named_parameters()}
        self.ema = ModelEmaV3(self.networks, decay=ema_decay, use_warmup=ema_warmup)
        self.ema.requires_grad_(False)
        self.nonfinite_skipped = 0
        self._skipped_total = 0
        self._ema_step = -1
        self._ema_loaded: set[str] = set()  # networks whose EMA holds a checkpoint's EMA (load_networks_from)
        self._skip_step = False  # set by a non-finite loss or gradient (skip): this optimiser step changes no weight
        self._perf_window: tuple[float, int, int] | None = None  # (start, clips, tokens) since the last logged perf/
        self._train_seconds = 0.0  # training time before this fit's training started (a resumed checkpoint's)
        self._train_clock: float | None = None  # perf_counter at this fit's training start, while it trains
        self._schedule_steps: int | None = None  # the LR schedule's length (configure_optimizers), saved in checkpoints
        self._resumed_schedule: dict[str, Any] | None = None  # what a resumed checkpoint says of its schedule
        self._ema_backup: list[torch.Tensor] | None = None
        self._val_template_sums: torch.Tensor | None = None  # (templates, [loss sum, clips]) of this validation epoch
        # (global step, {name: (rows, [sum, clips])}) of the gradient-accumulation window in progress
        self._train_window: tuple[int, dict[str, torch.Tensor]] | None = None
        self._last_generated: torch.Tensor | None = None  # (B,) generated frames per clip of the last compute_loss
        self._element_window: ElementWindow | None = None  # loss_reduction element's counts under accumulation
        if init_from:
            self.load_networks_from(init_from, kinds=(self.KIND,))
        if compile:
            for net in self.networks.values():
                net.compile()

    # ----------------------------------------------------------------------------------------------
    # To implement
    # ----------------------------------------------------------------------------------------------
    def build_networks(self) -> dict[str, nn.Module]:
        raise NotImplementedError

    def compute_loss(self, batch: dict, generator: Draws, train: bool) -> torch.Tensor:
        """Returns the per-sample loss ``(B,)`` (each clip's mean over its generated elements); also sets
        ``self._last_template (B,)`` and ``self._last_generated (B,)``, each clip's generated frames (the
        ``element`` loss reduction weighs the clips by it). ``generator``: a ``torch.Generator`` in training, one per
        clip (:class:`~mardini.lit.clip_draws.ClipGenerators`) in validation; draw through
        :func:`~mardini.lit.clip_draws.draw_rows`, which takes either."""
        raise NotImplementedError

    # ----------------------------------------------------------------------------------------------
    # Start-up checks against the data: impossible combinations fail before the first step
    # ----------------------------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        self.mask_templates = type(self.mask_sampler).templates  # a sampler set from Python since construction
        trainer = attached_trainer(self)
        if trainer is not None:  # before Lightning converts the networks to it
            _check_precision(getattr(trainer, "precision", "32-true"))
            check_supported(trainer.strategy.root_device, "--trainer.accelerator cpu (as the tiny configs) or a "
                                                          "CUDA GPU")
            _warn_if_bf16_is_emulated(getattr(trainer, "precision", "32-true"), trainer.strategy.root_device)
        if stage == "fit" and trainer is not None:
            self._check_loss_reduction(getattr(trainer, "accumulate_grad_batches", 1))
        dm = trainer.datamodule if trainer is not None else None
        if dm is not None:
            self.check_data_settings(getattr(dm, "resolution", None), getattr(dm, "frames", None),
                                     bool(getattr(dm, "latents", False)))
            if getattr(dm, "latents", False):
                self.check_latent_caches(dm)

    def check_latent_caches(self, dm: Any) -> None:
        """:meth:`check_latent_autoencoder` on the first shard of the training and of the validation cache: a
        validation cache of other latents would score the model on inputs it never trained on."""
        from mardini.data.sharding import list_shards

        for shards in (getattr(dm, "train_shards", None), getattr(dm, "val_shards", None)):
            if shards:
                self.check_latent_autoencoder(list_shards(shards)[0])

    def check_latent_autoencoder(self, shard: str) -> None:
        """Raise if a latent cache was encoded by another autoencoder (class or any argument but ``chunk_size``)
        than this model's: its networks would train on latents of another scale. A cache that recorded only some
        arguments is compared on those. A model with a planner also refuses a cache made for another
        ``planner_resolution`` (its planner would train at another size than it samples at)."""
        from mardini.data.datamodule import first_json
        from mardini.lit.checkpoints import latent_spec_differences

        cache = first_json(shard).get("latent_cache") or {}
        if "planner" in self.networks:
            self._check_cached_planner_copy(shard, cache)
        theirs = cache.get("autoencoder") or {}
        ours = self.autoencoder.spec()
        differ = latent_spec_differences(theirs, ours)
        if differ:
            raise ValueError(
                f"the latent cache {shard} was encoded with {theirs.get('class_path')} {theirs.get('init_args')}, "
                f"this model encodes with {ours['class_path']} {ours.get('init_args')} (differ: {differ}); re-cache "
                "with data/cache_latents.py --autoencoder-kwargs matching model.init_args.autoencoder, or set the "
                "model's autoencoder to the cache's"
            )

    def _check_cached_planner_copy(self, shard: str, cache: dict) -> None:
        """Raise unless the cache's planner copies are the ones this model makes of its frames: their size
        (``planner_copy``) against :func:`~mardini.data.transforms.planner_size` of the cached resolution at
        ``planner_resolution``; a cache written before ``planner_copy`` was recorded compares its
        ``planner_resolution`` as it did."""
        from mardini.data.transforms import as_size, planner_size

        low, copy, ours = cache.get("planner_resolution"), cache.get("planner_copy"), self.hparams.planner_resolution
        if copy is not None and cache.get("resolution"):
            made = list(planner_size(*as_size(cache["resolution"]), ours))
            if list(copy) != made:
                h, w = as_size(cache["resolution"])
                raise ValueError(
                    f"the latent cache {shard} holds planner copies at {list(copy)} of its {h}x{w} frames, "
                    f"model.planner_resolution={ours} makes them at {made}; re-cache with data/cache_latents.py "
                    f"--planner-resolution {ours} into a new folder, or set model.planner_resolution to "
                    f"{min(copy)} (the cache's short side)"
                )
        elif low is not None and list(low) != list(as_size(ours)):
            raise ValueError(
                f"the latent cache {shard} holds planner copies at {list(low)}, model.planner_resolution is "
                f"{ours}; re-cache with data/cache_latents.py --planner-resolution {ours} into a new folder, or set "
                "model.planner_resolution to the cache's"
            )

    def _check_planner_resolution(self) -> None:
        """Raise unless ``planner_resolution`` (the short side of the planner's copy) splits into the planner's
        tokens: a multiple of the autoencoder's factor x the planner's patch size. What the data's resolution adds
        (the long side, the plan grid's aspect ratio) is :meth:`check_data_settings`'s."""
        if "planner" not in self.networks:
            return
        f, patch = self.autoencoder.downsample, self.networks["planner"].cfg.patch_size
        low, step = self.hparams.planner_resolution, f * patch
        if low % step:
            near = " or ".join(str(v) for v in (low // step * step, low // step * step + step) if v >= step)
            raise ValueError(
                f"model.planner_resolution={low} is not divisible by {step} (the autoencoder's factor {f} x the "
                f"planner's patch size {patch}): the planner's copy would not split into its tokens; use a multiple "
                f"of {step}, e.g. {near}"
            )

    def check_data_settings(self, resolution: int | tuple[int, int] | None, frames: int | None,
                            latents: bool = False) -> None:
        """Raise naming the key when the data's resolution/frames cannot feed these networks."""
        f = self.autoencoder.downsample
        if frames is not None and self.frames is not None and self.frames > frames:
            raise ValueError(f"model.frames={self.frames} is more than data.frames={frames}; lower it or raise data.frames")
        if resolution is None or latents:
            return
        h, w = (resolution, resolution) if isinstance(resolution, int) else tuple(resolution)
        low = self.hparams.planner_resolution
        if low > min(h, w):
            raise ValueError(
                f"model.planner_resolution={low} is larger than the training resolution data.resolution={resolution}; "
                "the planner sees a LOW-resolution copy: lower model.planner_resolution or raise data.resolution"
            )
        from mardini.data.transforms import unsplit_input

        patches = {n: self.networks[n].cfg.patch_size for n in ("generator", "planner") if n in self.networks}
        layout = "generator" not in self.networks or self.networks["generator"].cfg.cross_rope
        unsplit = unsplit_input(h, w, f, patches, low, layout)
        if unsplit is not None:
            name, size, step = unsplit
            fixes = _size_fixes(h, w, f, patches, low, layout)
            if name == "plan grid":
                g = f * patches["generator"]
                raise ValueError(
                    f"data.resolution={resolution} gives the generator a {h // g}x{w // g} token grid, but the "
                    f"planner's {size[0]}x{size[1]} copy (short side model.planner_resolution={low}) a "
                    f"{size[0] // step}x{size[1] // step} one, of another aspect ratio; the generator lays the plan "
                    f"out on its grid: {fixes}"
                )
            key = "data.resolution" if name == "generator" else "model.planner_resolution"
            raise ValueError(
                f"{key}={size[0] if size[0] == size[1] else size} is not divisible by {step} (the autoencoder's "
                f"factor {f} x the {name}'s patch size {patches[name]}): {fixes}"
            )

    # ----------------------------------------------------------------------------------------------
    # The run: what the attached trainer says (a module without one runs as one process)
    # ----------------------------------------------------------------------------------------------
    def _world_size(self) -> int:
        """The processes of the fit (``trainer.world_size``); 1 without a trainer."""
        trainer = attached_trainer(self)
        return trainer.world_size if trainer is not None else 1

    def _accumulate_batches(self) -> int:
        """Micro-batches per optimiser step (``trainer.accumulate_grad_batches``); 1 without a trainer."""
        trainer = attached_trainer(self)
        return trainer.accumulate_grad_batches if trainer is not None else 1

    def _reduce_over_ranks(self, value: torch.Tensor, op: str) -> torch.Tensor:
        """``value`` reduced over the ranks by the strategy (``op``: sum, min ...; a collective: every rank calls
        it); ``value`` itself in one process."""
        if self._world_size() == 1:
            return value
        return attached_trainer(self).strategy.reduce(value.clone(), reduce_op=op)

    # ----------------------------------------------------------------------------------------------
    # Latents and randomness
    # ----------------------------------------------------------------------------------------------
    def step_generator(self, step: int, salt: int = 0) -> torch.Generator:
        """A CPU generator seeded from (seed, rank, step, salt): resumable and different on every rank."""
        rank = self.global_rank if attached_trainer(self) is not None else 0
        return torch.Generator().manual_seed(hash((self.hparams.seed, rank, step, salt)) & 0x7FFF_FFFF_FFFF_FFFF)

    def crop_frames(self, batch: dict, generator: Draws) -> dict:
        """Random contiguous crop of every per-frame tensor of the batch to ``self.frames``: one start for the batch
        from a ``torch.Generator`` (training), each clip's own from :class:`ClipGenerators` (validation)."""
        key = "video" if "video" in batch else "z_high"
        total = batch[key].shape[1]
        if self.frames is None or self.frames == total:
            return batch
        if self.frames > total:
            raise ValueError(f"frames={self.frames} is more than the data's window of {total}; raise data.frames")
        rows = len(generator) if one_per_clip(generator) else 1
        starts = draw_rows(lambda n, g: torch.randint(0, total - self.frames + 1, (n,), generator=g), rows,
                           generator).tolist()  # one start, or one per clip
        out = dict(batch)
        for name in ("video", "z_high", "z_low", "positions"):
            if name in batch and torch.is_tensor(batch[name]):
                out[name] = _crop(batch[name], starts, self.frames)  # (B, frames, ...)
        return out

    def latents_high(self, batch: dict) -> torch.Tensor:
        """High-resolution latents ``(B, T, C, h, w)`` of the batch (cached, or encoded from pixels)."""
        if "z_high" in batch:
            return batch["z_high"].float()
        return self.autoencoder.encode(batch["video"])

    def latents_low(self, batch: dict) -> torch.Tensor:
        """Planner latents ``(B, T, C, h', w')``: the clip resized to ``planner_resolution``, then encoded."""
        if "z_low" in batch:
            return batch["z_low"].float()
        from mardini.data.transforms import planner_copy

        video = batch["video"]
        size = self.hparams.planner_resolution
        if min(video.shape[-2:]) < size:  # planner_copy's short side: it would upscale the frames
            raise ValueError(
                f"planner_resolution={size} is larger than the short side of the training frames "
                f"{tuple(video.shape[-2:])}; lower model.planner_resolution or raise data.resolution"
            )
        return self.autoencoder.encode(planner_copy(video, size))

    # ----------------------------------------------------------------------------------------------
    # Steps
    # ----------------------------------------------------------------------------------------------
    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor | None:
        # each micro-batch of a gradient-accumulation window draws its own crops, masks, times and noise (salt 0 for
        # the first: without accumulation, the same draws as always)
        accumulate = self._accumulate_batches()
        self._check_loss_reduction(accumulate)  # also where a callback changed it during the fit
        gen = self.step_generator(self.global_step, salt=batch_idx % accumulate)
        batch = self.crop_frames(batch, gen)
        self._last_generated = None
        per_sample = self.compute_loss(batch, gen, train=True)  # (B,)
        loss = per_sample.mean()
        if not self._all_finite(loss):
            return self._on_nonfinite("loss", batch)
        self._log_train(batch, per_sample, loss)  # the plain per-rank mean
        if self.hparams.loss_reduction == "element":
            return self._element_loss(per_sample, accumulate)  # weighs uneven per-rank batches by itself
        scale = self._loss_scale()  # uneven per-rank batches: the averaged gradient is the global batch's mean
        return loss if scale is None else loss * scale

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        """Each clip's loss with its own draws (crop, mask, t, noise: :class:`ClipGenerators`, by its key), so the
        epoch's ``val/loss``, a mean over its clips, does not depend on how they are batched."""
        rows = _batch_clips(batch)
        gen = ClipGenerators.for_batch(self.hparams.seed, batch, rows, first=batch_idx * rows)
        batch = self.crop_frames(batch, gen)
        per_sample = self.compute_loss(batch, gen, train=False)  # (B,)
        if self._val_template_sums is None:  # summed here, reduced over the ranks at the epoch's end
            self._val_template_sums = per_sample.new_zeros(len(self._loss_templates()), 2, dtype=torch.float32)
        loss_and_count = torch.stack([per_sample.detach().float(), torch.ones_like(per_sample, dtype=torch.float32)], 1)
        self._val_template_sums.index_add_(0, self._last_template, loss_and_count)  # (templates, [loss sum, clips])

    # ----------------------------------------------------------------------------------------------
    # Optimiser and schedule
    # ----------------------------------------------------------------------------------------------
    def global_batch_size(self) -> int:
        """Clips per optimiser step over all ranks (the LR rule's batch; the same on every rank)."""
        return self._step_clips(None) * self.trainer.accumulate_grad_batches

    def _step_clips(self, local: int | None) -> int:
        """Clips per training batch over all ranks: the datamodule's global batch when it splits one (the ranks'
        batches may differ by one clip), else ``local`` (or the datamodule's ``batch_size // world``) x world."""
        trainer = self.trainer
        dm = trainer.datamodule
        split = step_batches(dm)
        if split is not None:
            return split[1]
        if local is None:
            local = getattr(dm, "batch_size", 1) // max(1, trainer.world_size)
        return int(local) * trainer.world_size

    def _loss_scale(self) -> float | None:
        """The factor on this rank's per-clip-mean loss for uneven per-rank batches (:func:`loss_scale`); None
        when the ranks' batches are equal (the loss is left untouched)."""
        trainer = attached_trainer(self)
        if trainer is None:
            return None
        split = step_batches(trainer.datamodule)
        return None if split is None else loss_scale(split[0], trainer.world_size, split[1])

    def _check_loss_reduction(self, accumulate: int) -> None:
        """Refuse ``loss_reduction: element`` with gradient accumulation under a strategy that accumulates by itself
        (DeepSpeed's): the window's rescale (:meth:`_rescale_element_window`) needs one optimiser-step hook a window."""
        trainer = attached_trainer(self)
        if self.hparams.loss_reduction != "element" or accumulate == 1 or trainer is None:
            return
        strategy = getattr(trainer, "strategy", None)
        if getattr(strategy, "handles_gradient_accumulation", False):
            raise ValueError(
                f"model.loss_reduction=element with trainer.accumulate_grad_batches={accumulate} under "
                f"{type(strategy).__name__}, which accumulates the gradients itself: the window's gradients cannot "
                "be rescaled to its count of generated elements; use a ddp or fsdp strategy, "
                "trainer.accumulate_grad_batches: 1, or model.loss_reduction: clip")

    def _generated_frames(self) -> torch.Tensor:
        """``(B,)`` the generated frames of each clip of the last :meth:`compute_loss`, or a ValueError naming a
        ``compute_loss`` that did not set them."""
        if self._last_generated is None:
            raise ValueError(
                "model.loss_reduction=element weighs each clip by its generated frames, but "
                f"{type(self).__name__}.compute_loss did not set self._last_generated; set it to the (B,) count of "
                "the mask's generated frames (mask.sum(1)) as PlanningModule.compute_loss does, or use "
                "model.loss_reduction: clip")
        return self._last_generated

    def _element_loss(self, per_sample: torch.Tensor, accumulate: int = 1) -> torch.Tensor:
        """This rank's share of the mean over the generated elements of the global batch (the ``element``
        reduction, :func:`element_mean_share`): the generated frames are counted over every rank. Under gradient
        accumulation divided by the window's first count instead (:class:`ElementWindow`; rescaled at its end)."""
        generated = self._generated_frames().to(per_sample.device)  # (B,)
        everywhere = generated.sum().float()  # ()
        world = self._world_size()
        # every rank, every step (no rank returns before: the non-finite check agrees on all)
        everywhere = self._reduce_over_ranks(everywhere, "sum")  # ()
        if accumulate > 1:
            everywhere = self._current_element_window().add(everywhere)  # () the window's divisor
        return element_mean_share(per_sample, generated, everywhere, world)  # ()

    def _current_element_window(self) -> ElementWindow:
        """The ``element`` counts of the accumulation window in progress (a new one at each optimiser step)."""
        if self._element_window is None or self._element_window.step != self.global_step:
            self._element_window = ElementWindow(self.global_step)
        return self._element_window

    def _rescales_element_window(self) -> bool:
        """Whether optimiser steps rescale their window's gradients: ``element`` under gradient accumulation."""
        return self.hparams.loss_reduction == "element" and self._accumulate_batches() > 1

    def _then_rescale_element_window(self, closure: Callable[[], Any] | None) -> Callable[[], Any] | None:
        """``closure`` (the window's last ``training_step`` and backward, which ``optimizer.step`` runs) followed by
        :meth:`_rescale_element_window`; ``closure`` itself where no rescale is due."""
        if closure is None or not self._rescales_element_window():
            return closure

        def closure_then_rescale() -> Any:
            result = closure()
            self._rescale_element_window()
            return result

        return closure_then_rescale

    def _rescale_element_window(self) -> None:
        """``element`` under gradient accumulation: the window's accumulated gradients times
        :meth:`ElementWindow.gradient_factor`, the gradient of the mean over all its generated elements. Runs when
        the window's last backward has returned (:meth:`optimizer_step` wraps its closure): after DDP's or FSDP's
        reduction (done inside that backward), before a GradScaler's unscaling (linear: the same gradient), every
        ``on_before_optimizer_step`` (the callbacks' first, then this module's gradient norm), Lightning's clipping
        and the step. A step dropped as non-finite (its window may have counted nothing) is left to
        :meth:`on_before_optimizer_step`."""
        if not self._rescales_element_window() or self._skip_step:
            return
        accumulate = self.trainer.accumulate_grad_batches
        factor = self._current_element_window().gradient_factor(accumulate)  # (), the same on every rank
        grads = [p.grad for p in self.parameters() if p.grad is not None]
        if grads:
            torch._foreach_mul_(grads, factor.to(grads[0].device))

    def weight_decay_groups(self) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
        """The trainable parameters with weight decay (the networks' matrices) and without (biases, norms, tokens),
        by the shapes recorded at construction: FSDP flattens each parameter to a 1-D shard view, so its ``ndim`` no
        longer tells, and wrappers (FSDP units, activation checkpointing, compile) add to the names."""
        decay, no_decay = [], []
        for name, p in self.networks.named_parameters():
            if not p.requires_grad:
                continue
            ndim = self._param_ndim.get(unwrapped_name(name))
            if ndim is None:
                raise RuntimeError(f"parameter {name!r} was not in the networks when the module was built (a wrapper "
                                   "whose name prefix mardini.lit.fsdp.WRAPPED_PREFIXES does not know?), so its weight "
                                   "decay cannot be decided; add the prefix there")
            (decay if ndim >= 2 else no_decay).append(p)
        return decay, no_decay

    def configure_callbacks(self) -> list[L.Callback]:
        """:class:`ExpectedWarnings`: Lightning's warnings that do not apply to this module's runs (the EMA in eval mode;
        with a ``VideoDataModule``, its ``__len__`` and its mid-epoch resume) ignored for those runs only."""
        return [ExpectedWarnings()]

    def configure_optimizers(self):
        hp = self.hparams
        lr = hp.lr if hp.lr is not None else scaled_lr(hp.blr, self.global_batch_size())
        decay, no_decay = self.weight_decay_groups()
        groups = [{"params": decay, "weight_decay": hp.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        optimizer = torch.optim.AdamW(groups, lr=lr, betas=tuple(hp.betas))
        if self.trainer.max_steps == 0:  # below, 0 would read as unset (Lightning's -1)
            raise ValueError("trainer.max_steps=0 trains nothing: give a positive number of steps (-1 = bounded by "
                             "max_epochs)")
        # the schedule's length: decay_steps, else the fit's max_steps, else (a fit bounded by max_epochs) the
        # optimiser steps Lightning estimates for it
        steps = self.trainer.max_steps if self.trainer.max_steps > 0 else self.trainer.estimated_stepping_batches
        if not hp.decay_steps and not (0 < steps < float("inf")):
            raise ValueError("the LR schedule needs a length: set trainer.max_steps, trainer.max_epochs or "
                             "model.init_args.decay_steps")
        total = hp.decay_steps or max(1, int(steps))
        self._schedule_steps = total
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda s: warmup_cosine(s, hp.warmup_steps, total, hp.min_lr_ratio)
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        """Lightning's clipping, except under FSDP, whose precision plugin refuses norm clipping: there the wrapped
        root module clips by the global norm over all shards (``FullyShardedDataParallel.clip_grad_norm_``)."""
        from lightning.pytorch.strategies import FSDPStrategy

        strategy = getattr(attached_trainer(self), "strategy", None)
        if isinstance(strategy, FSDPStrategy) and gradient_clip_val and gradient_clip_algorithm in (None, "norm"):
            strategy.model.clip_grad_norm_(float(gradient_clip_val))
            return
        self.clip_gradients(optimizer, gradient_clip_val=gradient_clip_val,
                            gradient_clip_algorithm=gradient_clip_algorithm)

    def _grad_scaler(self) -> torch.amp.GradScaler | None:
        """The precision plugin's enabled gradient scaler (``16-mixed``), or None."""
        trainer = attached_trainer(self)
        scaler = getattr(trainer.strategy.precision_plugin, "scaler", None) if trainer is not None else None
        return scaler if scaler is not None and scaler.is_enabled() else None

    def on_before_optimizer_step(self, optimizer) -> None:
        """The non-finite policy on the gradient norm, except under a GradScaler: there an inf/NaN gradient is its
        overflow (it skips the step and lowers its scale; :meth:`optimizer_step` then skips the EMA update). A step
        skipped before (a non-finite loss in its accumulation window) applies no gradient of its window."""
        if self._skip_step:
            optimizer.zero_grad(set_to_none=True)  # AdamW skips parameters whose grad is None
            return
        norms = grad_norm(self.networks, norm_type=2)
        total = norms.get("grad_2.0_norm_total")
        if fsdp_root(self) is not None:  # each rank holds a shard's gradients: the global norm, one decision for all
            local = (total if total is not None else torch.zeros(())).to(self.device)
            total = self.trainer.strategy.reduce(local.double() ** 2, reduce_op="sum").sqrt().float()
        if total is None:
            return
        self.log("train/grad_norm", total, on_step=True, on_epoch=False)
        if not torch.isfinite(total):
            if self._grad_scaler() is not None:
                return
            if self.hparams.nonfinite == "stop":
                raise FloatingPointError(
                    f"non-finite gradient norm ({float(total)}) at step {self.global_step}; "
                    "lower the LR, enable gradient clipping, or set model.nonfinite=skip"
                )
            optimizer.zero_grad(set_to_none=True)  # AdamW skips parameters whose grad is None
            self._skip_this_step()

    # ----------------------------------------------------------------------------------------------
    # EMA: updated after each optimiser step, swapped in for validation and sampling
    # ----------------------------------------------------------------------------------------------
    def optimizer_step(self, epoch: int, batch_idx: int, optimizer, optimizer_closure=None) -> None:
        """The optimiser step, then the EMA update -- before any callback can checkpoint this step. A step that
        changed no weight leaves the EMA as it is: one skipped as non-finite, or one a GradScaler skipped (an
        overflow, which lowered its scale). ``element`` under accumulation rescales the window's gradients right
        after the closure's backward (:meth:`_rescale_element_window`)."""
        scaler = self._grad_scaler()
        scale = scaler.get_scale() if scaler is not None else None
        super().optimizer_step(epoch, batch_idx, optimizer, self._then_rescale_element_window(optimizer_closure))
        # an overflow, and only one, multiplies the scale by the backoff factor (< 1); the midpoint tells it from a
        # kept scale also where the first step's init_scale was rounded to float32
        overflow = scaler is not None and scaler.get_scale() < scale * (1 + scaler.get_backoff_factor()) / 2
        if self.global_step != self._ema_step:
            if not (self._skip_step or overflow):
                self.update_ema()
            self._ema_step = self.global_step
        self._skip_step = False

    def update_ema(self) -> None:
        """One EMA update: at the full decay when it continues a loaded EMA (``ema_keep_loaded``), otherwise by
        step (timm: the first update copies the raw weights; with ``ema_warmup`` the decay then ramps up).
        Under FSDP the same update runs on each rank's local shards (:mod:`mardini.lit.fsdp`)."""
        keep_loaded = self.hparams.get("ema_keep_loaded", False) and self._ema_loaded
        root = fsdp_root(self)
        if root is not None:
            with root_unsharded(root, writeback=True):
                for name, net in self.networks.items():
                    step = None if keep_loaded and name in self._ema_loaded else self.global_step
                    lerp_local_(self.ema.module[name], net, 1.0 - self.ema.get_decay(step), name)
            return
        if not keep_loaded:
            self.ema.update(self.networks, step=self.global_step)
            return
        for name, net in self.networks.items():  # loaded EMAs continue at the full decay, the others by step
            decay = self.ema.get_decay(None if name in self._ema_loaded else self.global_step)
            with torch.no_grad():
                for ema_v, v in zip(self.ema.module[name].state_dict().values(), net.state_dict().values()):
                    if ema_v.is_floating_point():
                        ema_v.lerp_(v.to(ema_v.dtype), 1.0 - decay)  # ema = decay * ema + (1 - decay) * v
                    else:
                        ema_v.copy_(v)

    @contextlib.contextmanager
    def ema_weights(self):
        """Context manager: the networks hold the EMA weights inside, their own weights again after."""
        self._swap_in_ema()
        try:
            yield self
        finally:
            self._swap_out_ema()

    def _swap_in_ema(self) -> None:
        if self._ema_backup is not None:
            return
        root = fsdp_root(self)
        if root is not None:  # local views, parameter-wise (a sharded state_dict() gathers copies)
            with root_unsharded(root, writeback=True):
                ema, live = paired(self.ema.module, self.networks, "networks")
                self._ema_backup = [t.clone() for t in live]
                torch._foreach_copy_(live, ema)
            return
        live = list(self.networks.state_dict().values())
        self._ema_backup = [t.detach().clone() for t in live]
        torch._foreach_copy_(live, list(self.ema.module.state_dict().values()))

    def _swap_out_ema(self) -> None:
        if self._ema_backup is None:
            return
        root = fsdp_root(self)
        if root is not None:
            with root_unsharded(root, writeback=True):
                torch._foreach_copy_(local_tensors(self.networks), self._ema_backup)
        else:
            torch._foreach_copy_(list(self.networks.state_dict().values()), self._ema_backup)
        self._ema_backup = None

    def on_fit_start(self) -> None:
        root = fsdp_root(self)
        if root is not None:  # a wrap the EMA cannot pair fails before the first step, naming the fix
            with root_unsharded(root, writeback=False):
                paired(self.ema.module, self.networks, "networks")

    def on_train_start(self) -> None:
        self._train_clock = time.perf_counter()
        self._warn_other_schedule_length()

    def _warn_other_schedule_length(self) -> None:
        """Warn where a resume's LR schedule has another length than its checkpoint's: with ``decay_steps`` unset on
        both sides (else :func:`~mardini.lit.checkpoints.changed_settings` names it) the length is the fit's
        ``trainer.max_steps``, so a rerun with another ``max_steps`` moved the LR of every step to come, silently."""
        from lightning.pytorch.utilities import rank_zero_warn

        resumed, self._resumed_schedule = self._resumed_schedule, None
        if resumed is None or self.trainer.ckpt_path is None:  # no resume (a checkpoint loaded by validate, by hand)
            return
        old, new, step = resumed["steps"], self._schedule_steps, int(resumed["step"])
        unset = resumed["decay_steps"] is None and self.hparams.decay_steps is None
        if not unset or old is None or new is None or old == new:  # old None: a checkpoint from before it was saved
            return
        hp = self.hparams
        was, now = (warmup_cosine(step, hp.warmup_steps, n, hp.min_lr_ratio) for n in (old, new))
        rank_zero_warn(
            f"resuming {resumed['path']} with an LR schedule of {new} steps where it was trained with one of {old}: "
            f"model.decay_steps is unset, so the schedule's length is trainer.max_steps, and the LR at step {step} "
            f"moves from {was:.4g} to {now:.4g} x its peak. To go on with the run's schedule set "
            f"model.init_args.decay_steps: {old}; for the new one set decay_steps: {new} (also on a rerun of this "
            "command, so that its length no longer follows max_steps)")

    def on_train_end(self) -> None:
        self._train_seconds, self._train_clock = self.train_seconds(), None

    def train_seconds(self) -> float:
        """Seconds of training of the run so far: from the training's start (after setup and the sanity check) to now,
        validations and checkpoints included, added to what the checkpoint it resumed from recorded. Saved in every
        checkpoint (``checkpoint["mardini"]["train_seconds"]``) and logged as ``perf/train_hours``."""
        running = 0.0 if self._train_clock is None else time.perf_counter() - self._train_clock
        return self._train_seconds + running

    def on_validation_epoch_start(self) -> None:
        self._val_template_sums = None
        self._swap_in_ema()

    def on_validation_epoch_end(self) -> None:
        self._swap_out_ema()
        self._log_val_template_losses()

    def on_validation_end(self) -> None:
        end_validation_workers(self.trainer)  # not kept alive through the training until the next validation

    def _log_val_template_losses(self) -> None:
        """``val/loss`` and ``val/loss_{template}``: the means over every rank's clips (of that template). The sums
        are reduced first, on every rank: a rank whose validation batches were all skipped (clips too short for the
        stage, undecodable), or a key logged by some ranks only, would otherwise leave the others waiting at a
        sync. No usable validation clip on any rank is an error, not a run without validation; it says whether the
        clips were skipped or the shards hold none (by the validation loaders' ``pass_skipped``)."""
        sums = self._val_template_sums
        if sums is None:  # no validation batch on this rank
            sums = torch.zeros(len(self._loss_templates()), 2, device=self.device)
        sums = self._reduce_over_ranks(sums, "sum")  # (templates, [loss sum, clips])
        total = sums.sum(0)  # ([loss sum, clips])
        if total[1] == 0:  # on every rank (reduced), so the skip counts can be reduced too
            skipped = self._val_skipped()
            counts = torch.tensor([skipped or 0, skipped is None], dtype=torch.float32, device=self.device)
            counts = self._reduce_over_ranks(counts, "sum")  # ([samples skipped, ranks not counting])
            if counts.sum() == 0:
                raise ValueError(
                    "validation found no usable clip on any rank: the validation shards hold no sample (none was "
                    "skipped: empty tar archives, or members not named key.extension); rebuild data.val_shards "
                    "(data/README.md) or point it at shards with clips, or set trainer.limit_val_batches: 0 (or "
                    "data.val_shards: null) to train without validation")
            raise ValueError(
                "validation found no usable clip on any rank: every validation sample was skipped (the skip lines "
                "above say why: clips shorter than data.frames at data.fps, undecodable files); check data.val_shards "
                "against the stage's frames / fps / resolution, or set trainer.limit_val_batches: 0 to train without "
                "validation")
        self.log("val/loss", total[0] / total[1], sync_dist=True, prog_bar=True)  # equal on every rank
        self.log("hp_metric", total[0] / total[1], sync_dist=True)  # TensorBoard's HParams tab: the last val/loss
        for i, name in enumerate(self._loss_templates()):
            if sums[i, 1] > 0:
                self.log(f"val/loss_{name}", sums[i, 0] / sums[i, 1], sync_dist=True)  # equal on every rank
        self._val_template_sums = None

    def _val_skipped(self) -> int | None:
        """Bad samples this rank's validation loaders skipped in their last pass (``StreamLoader.pass_skipped``);
        None when one of them does not count them."""
        trainer = attached_trainer(self)
        loaders = trainer.val_dataloaders if trainer is not None else None
        if isinstance(loaders, dict):
            loaders = list(loaders.values())
        elif not isinstance(loaders, (list, tuple)):
            loaders = [loaders]
        counts = [getattr(loader, "pass_skipped", None) for loader in loaders]
        return None if None in counts else sum(counts)

    @property
    def hparams_initial(self) -> AttributeDict:
        """What Lightning records as the run's hyper-parameters (``logger.log_hyperparams``, once at the start of a
        fit or validate): the module's arguments and, with a trainer attached, the run's data, trainer and curriculum
        settings under ``data``, ``trainer`` and ``curriculum`` (:func:`~mardini.lit.run_settings.run_settings`), so
        runs compare on them too. The checkpoint's ``hyper_parameters`` stay the module's (``hparams``)."""
        from mardini.lit.run_settings import run_settings

        hp = super().hparams_initial
        trainer = attached_trainer(self)
        if trainer is not None:
            hp.update({k: v for k, v in run_settings(trainer).items() if k not in hp})
        return hp

    # ----------------------------------------------------------------------------------------------
    # Checkpoints: metadata, the frozen autoencoder kept out, loading networks of earlier stages
    # ----------------------------------------------------------------------------------------------
    def checkpoint_metadata(self) -> dict[str, Any]:
        return {
            "format": CHECKPOINT_FORMAT,
            "kind": self.KIND,
            "size": self.hparams.size,
            "networks": sorted(self.networks.keys()),
            # each network's resolved config: a later stage that cannot load it names the fields that differ
            "network_configs": {name: dataclasses.asdict(net.cfg) for name, net in self.networks.items()},
            "autoencoder": type(self.autoencoder).__name__,
            "autoencoder_spec": self.autoencoder.spec(),
            "planner_resolution": self.hparams.planner_resolution,
            "latent_channels": self.autoencoder.latent_channels,
            "nonfinite_skipped": self.nonfinite_skipped,
            "data_skipped": self._skipped_over_ranks(),  # every rank's (on_save_checkpoint runs on every rank)
            "ema_loaded": sorted(self._ema_loaded),
            "train_seconds": self.train_seconds(),
            "lr_schedule_steps": self._schedule_steps,  # a resume under another length says so
            **({"cross_rope_grid": self.networks["generator"].cfg.cross_rope_grid} if "generator" in self.networks
               else {}),
        }

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["mardini"] = self.checkpoint_metadata()
        checkpoint["state_dict"] = {
            k: v for k, v in checkpoint["state_dict"].items() if not k.startswith("autoencoder.")
        }
        if self._ema_backup is not None and fsdp_root(self) is not None:  # as below, the raw weights gathered
            self._swap_out_ema()
            raw = self.trainer.strategy.lightning_module_state_dict()  # full on rank 0 (a collective: every rank)
            self._swap_in_ema()
            checkpoint["state_dict"].update({k: v for k, v in raw.items() if k.startswith("networks.")})
        elif self._ema_backup is not None:  # saved while validation holds the EMA in the networks: store the raw
            for k, v in zip(self.networks.state_dict().keys(), self._ema_backup):
                checkpoint["state_dict"][f"networks.{k}"] = v

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        """Check the checkpoint against this model before Lightning loads it (:meth:`check_checkpoint`)."""
        from mardini.lit.checkpoints import warn_changed_settings
        from mardini.lit.loop_state import start_next_epoch

        trainer = attached_trainer(self)
        path = getattr(trainer, "ckpt_path", None)
        self.check_checkpoint(checkpoint, path, fitting=trainer is not None and trainer.state.fn == TrainerFn.FITTING)
        path = path or "<resumed checkpoint>"
        warn_changed_settings(checkpoint.get("hyper_parameters") or {}, dict(self.hparams), path, checkpoint["mardini"])
        start_next_epoch(checkpoint)  # a fit that ended with its epoch resumes at the next epoch's first batch
        self._resumed_schedule = {"path": path, "steps": checkpoint["mardini"].get("lr_schedule_steps"),
                                  "step": checkpoint.get("global_step", 0),
                                  "decay_steps": (checkpoint.get("hyper_parameters") or {}).get("decay_steps")}
        self.nonfinite_skipped = int(checkpoint["mardini"].get("nonfinite_skipped", 0))
        # the logged data/skipped goes on: every rank's count before, held by rank 0 (checkpoints written before
        # 2026-12-07 hold rank 0's alone)
        self._skipped_total = int(checkpoint["mardini"].get("data_skipped", 0)) if self.global_rank == 0 else 0
        self._train_seconds = float(checkpoint["mardini"].get("train_seconds", 0.0))  # a resume adds to it
        if "ema_loaded" in checkpoint["mardini"]:  # a resume need not load init_from again (MarDiniCLI) to know it
            self._ema_loaded = set(checkpoint["mardini"]["ema_loaded"])
        state = checkpoint["state_dict"]
        for k, v in self.autoencoder.state_dict().items():
            state.setdefault(f"autoencoder.{k}", v)

    def _cross_rope_grid(self) -> str | None:
        """The generator's plan-token placement, or None where it cannot matter (no generator, or no cross RoPE)."""
        gen = self.networks["generator"] if "generator" in self.networks else None
        return gen.cfg.cross_rope_grid if gen is not None and gen.cfg.cross_rope else None

    def check_checkpoint(self, checkpoint: dict, path: str | None, fitting: bool) -> None:
        """Refuse a checkpoint at ``path`` (None: unnamed) that this model cannot load: of another kind, size or
        format, of other latents, anchor or network shapes (:meth:`_check_resumable`), or an EMA-only export
        (``mardini.lit.ema_export``) to resume a fit (``fitting``); elsewhere (``validate``, which scores the EMA) the
        export's EMA weights become its raw ones too in ``checkpoint``, as for ``init_from``. ``train.py fit`` runs it
        before the trainer sets anything up (``MarDiniCLI.fit``), so that a refused resume leaves the stage's folder
        as it was."""
        from mardini.lit.checkpoints import EMA_PREFIX, check_metadata

        check_metadata(checkpoint, kinds=(self.KIND,), path=path or "<resumed checkpoint>", size=self.hparams.size)
        if checkpoint["mardini"].get("ema_only"):
            if fitting:
                raise ValueError(
                    "the checkpoint to resume is an EMA-only export (no raw weights, optimizer or loop state): it "
                    "cannot resume a fit. Start a stage from it with model.init_args.init_from=<it> and --ckpt_path "
                    "null (train.py validate --ckpt_path <it> scores it as it is)"
                )
            state = checkpoint["state_dict"]
            for k, v in list(state.items()):  # ema.module.<network>.* -> networks.<network>.*
                if k.startswith(EMA_PREFIX):
                    state.setdefault(f"networks.{k[len(EMA_PREFIX):]}", v)
        self._check_resumable(checkpoint, path)

    def _check_resumable(self, checkpoint: dict, path: str | None = None) -> None:
        """Refuse to continue a checkpoint with other latents, another anchor or other network shapes (a resume
        whose settings differ from the run's) before Lightning loads it. ``path``: the checkpoint's, for the
        messages (default: the trainer's ``ckpt_path``)."""
        from mardini.lit.checkpoints import (
            check_same_anchor, check_same_cross_rope_grid, check_same_latents, state_differences,
        )

        path = path or getattr(attached_trainer(self), "ckpt_path", None) or "the checkpoint to resume"
        check_same_latents(checkpoint["mardini"], self.autoencoder.spec(), path, fix=f"To go on, {RESUME_FIX}")
        if "generator" in self.networks:
            check_same_anchor(checkpoint.get("hyper_parameters") or {}, FrameAnchor.from_hparams(self.hparams), path,
                              fix=RESUME_FIX)
            check_same_cross_rope_grid(checkpoint, self._cross_rope_grid(), path)
        strategy = getattr(attached_trainer(self), "strategy", None)
        if strategy is not None and strategy.restore_checkpoint_after_setup:
            return  # FSDP-like strategies load the weights themselves before this hook, sharded
        ours, theirs = (_networks_only(self.state_dict()), _networks_only(checkpoint["state_dict"]))
        differ = state_differences(ours, theirs, keys=self.strict_loading)
        if differ:
            more = f" and {len(differ) - 3} more" if len(differ) > 3 else ""
            raise ValueError(f"{path} holds networks that do not fit this model ({'; '.join(differ[:3])}{more}); "
                             f"{RESUME_FIX}")

    def load_networks_from(self, path: str, kinds: tuple[str, ...], names: tuple[str, ...] | None = None) -> None:
        """Copy networks (raw and EMA) from a checkpoint of an allowed kind; shapes must match.

        An EMA-only export starts both the raw and the EMA networks from its EMA weights. Nothing is read while
        train.py builds the model of a fit that resumes (``RESUMING``): the resumed checkpoint holds every weight."""
        from mardini.lit.checkpoints import RESUMING, load_network_states, network_differences, read_checkpoint

        if RESUMING.get():
            return

        raw, ema = load_network_states(path, kinds=kinds, names=names or tuple(self.networks.keys()),
                                       size=self.hparams.size, autoencoder_spec=self.autoencoder.spec(),
                                       anchor=FrameAnchor.from_hparams(self.hparams),
                                       cross_rope_grid=self._cross_rope_grid())
        for name, state in raw.items():
            where = f"{path}: network '{name}' (this model: size '{self.hparams.size}', {name} {self.hparams.get(name)})"
            ours = dataclasses.asdict(self.networks[name].cfg)
            _load_into(self.networks[name], _drop_dropped_head(self.networks[name], state), where,
                       explain=lambda name=name, ours=ours: network_differences(read_checkpoint(path), name, ours))
        for name, state in ema.items():
            _load_into(self.ema.module[name], _drop_dropped_head(self.ema.module[name], state), f"{path}: EMA of '{name}'")
            self._ema_loaded.add(name)

    # ----------------------------------------------------------------------------------------------
    # Logging and the non-finite policy
    # ----------------------------------------------------------------------------------------------
    def _all_finite(self, loss: torch.Tensor) -> bool:
        """Whether the loss is finite on every rank (one answer for all: they skip or stop together)."""
        finite = torch.isfinite(loss.detach()).float()
        finite = self._reduce_over_ranks(finite, "min")
        return bool(finite > 0)

    def _on_nonfinite(self, what: str, batch: dict) -> torch.Tensor | None:
        """``stop``: raise naming the step and the batch. ``skip``: drop the step and return what training_step
        returns for it: None in one process; on several (Lightning refuses None there) a zero loss on every trainable
        parameter, whose zero gradients DDP reduces as usual, the step then changing no weight (every rank skips it:
        :meth:`_all_finite` agrees on all)."""
        keys = batch.get("key")
        if self.hparams.nonfinite == "stop":
            raise FloatingPointError(
                f"non-finite {what} at step {self.global_step} (batch keys: {keys}); "
                "set model.nonfinite=skip to skip such steps and count them"
            )
        self._skip_this_step()
        if self._world_size() == 1:
            return None
        return sum(p.sum() for p in self.parameters() if p.requires_grad) * 0.0  # (), connected to every parameter

    def _skip_this_step(self) -> None:
        """Drop this optimiser step, its whole accumulation window (:meth:`on_before_optimizer_step` drops the
        window's gradients, :meth:`optimizer_step` the EMA update), counted once however many micro-batches failed."""
        if not self._skip_step:
            self.nonfinite_skipped += 1
            self._skip_step = True
        self.log("train/nonfinite_skipped", float(self.nonfinite_skipped), on_step=True)

    def _log_train(self, batch: dict, per_sample: torch.Tensor, loss: torch.Tensor) -> None:
        """The step's logs. ``train/loss`` and ``train/loss_<template>``: means over the clips of this batch, or under
        gradient accumulation over those of the window so far (Lightning logs a window's last value, at its end)."""
        bs = per_sample.shape[0]
        names = self._loss_templates()
        window = self._train_window_sums(per_sample, len(names)) if self._accumulating() else None
        if window is None:  # one batch per step: its own means, as always
            self.log("train/loss", loss, on_step=True, prog_bar=True, batch_size=bs)
        else:
            means, clips = window_means(window)  # (1 + templates,), row 0 every clip's
            self.log("train/loss", means[0], on_step=True, prog_bar=True, batch_size=clips[0])
        if self.hparams.loss_reduction == "element":  # this rank's mean over its generated elements (the window's)
            self._log_element(per_sample, bs, window is not None)
        for i, name in enumerate(names):
            if window is None:
                sel = self._last_template == i
                if sel.any():
                    self.log(f"train/loss_{name}", per_sample[sel].mean(), on_step=True, batch_size=int(sel.sum()))
            elif clips[i + 1]:
                self.log(f"train/loss_{name}", means[i + 1], on_step=True, batch_size=clips[i + 1])
        lo, hi = self.mask_sampler.keep_ratio
        self.log("curriculum/keep_ratio_min", lo, on_step=True)
        self.log("curriculum/keep_ratio_max", hi, on_step=True)
        if self.frames is not None:
            self.log("curriculum/frames", float(self.frames), on_step=True)
        self._log_mix_and_ema()
        self._log_skipped(batch)
        self._log_throughput(batch, bs)

    def _log_element(self, per_sample: torch.Tensor, bs: int, accumulating: bool) -> None:
        """``train/loss_element``: this rank's mean over the generated elements of its batch, or under gradient
        accumulation over those of the window so far (:meth:`ElementWindow.rank_mean`)."""
        generated = self._generated_frames().to(per_sample)  # (B,)
        if not accumulating:
            self.log("train/loss_element", element_mean_share(per_sample, generated, generated.sum(), 1),
                     on_step=True, batch_size=bs)
            return
        window = self._current_element_window()
        self.log("train/loss_element", window.rank_mean(per_sample, generated), on_step=True, batch_size=bs)

    def _log_skipped(self, batch: dict) -> None:
        """``data/skipped``: the bad samples every rank's training loader skipped in this stage (resumes included).
        Each batch brings those its loader dropped since its previous one; on several processes the ranks' counts are
        summed where the loggers write (one reduction per written step, none in between)."""
        if "skipped" not in batch:
            return
        self._skipped_total += int(batch["skipped"])
        if self.trainer.world_size == 1 or self._logs_written():
            self.log("data/skipped", float(self._skipped_over_ranks()), on_step=True)

    def _skipped_over_ranks(self) -> int:
        """This rank's count of skipped samples summed over the ranks by the strategy (a collective on several
        processes: every rank calls it; one process: the count itself)."""
        trainer = attached_trainer(self)
        if trainer is None:
            return self._skipped_total
        count = torch.tensor(self._skipped_total, dtype=torch.long, device=self.device)
        return int(trainer.strategy.reduce(count, reduce_op="sum"))

    def _logs_written(self) -> bool:
        """Whether the loggers write this training batch's values at its end (Lightning's rule, which its
        LearningRateMonitor and ThroughputMonitor read: every ``log_every_n_steps``-th step, at the end of an
        accumulation window); the same on every rank."""
        from mardini.lit.preemption import inside_accumulation_window

        return self.trainer._logger_connector.should_update_logs and not inside_accumulation_window(self.trainer)

    def _log_throughput(self, batch: dict, bs: int) -> None:
        """``perf/clips_per_s`` and ``perf/tokens_per_s`` over all ranks: the clips (their tokens) trained since the
        last value the loggers wrote, over the time since then, so every step between two logged points counts, and so
        do the validations and checkpoints between them. The first window starts at the fit's first batch (its
        clips left out: the time before it is start-up). ``perf/train_hours``: :meth:`train_seconds` in hours."""
        self.log("perf/train_hours", self.train_seconds() / 3600, on_step=True)
        now = time.perf_counter()
        if self._perf_window is None:
            self._perf_window = (now, 0, 0)
            return
        start, clips, tokens = self._perf_window
        step_clips = self._step_clips(bs)  # over all ranks
        clips, tokens = clips + step_clips, tokens + self.tokens_per_clip(batch) * step_clips
        elapsed = max(now - start, 1e-9)
        self.log("perf/clips_per_s", clips / elapsed, on_step=True)
        self.log("perf/tokens_per_s", tokens / elapsed, on_step=True)
        self._perf_window = (now, 0, 0) if self._logs_written() else (start, clips, tokens)  # written: a new window

    def _log_mix_and_ema(self) -> None:
        """``curriculum/template_<name>``: each template's share of the training masks (the sampler's weights
        normalised; 0 for a declared template not drawn now); ``ema/decay``: the decay of the EMA update after this
        step (:meth:`ema_decays`; ``ema/decay_<network>`` each where the networks' differ)."""
        weights = self.mask_sampler.template_probs
        total = sum(weights.values())
        for name in self._loss_templates():
            self.log(f"curriculum/template_{name}", weights.get(name, 0.0) / total, on_step=True)
        decays = self.ema_decays()
        if len(set(decays.values())) == 1:
            self.log("ema/decay", next(iter(decays.values())), on_step=True)
        else:
            for name, decay in decays.items():
                self.log(f"ema/decay_{name}", decay, on_step=True)

    def ema_decays(self) -> dict[str, float]:
        """The decay of each network's EMA update after the current optimiser step (:meth:`update_ema`): timm's by
        step (0 at the first update, which copies the weights; with ``ema_warmup`` ramping up to ``ema_decay``), or
        ``ema_decay`` itself for a network whose loaded EMA continues (``ema_keep_loaded``)."""
        keep_loaded = self.hparams.get("ema_keep_loaded", False) and self._ema_loaded
        return {name: float(self.ema.get_decay(None if keep_loaded and name in self._ema_loaded else self.global_step))
                for name in self.networks}

    def _accumulating(self) -> bool:
        """True under gradient accumulation (``trainer.accumulate_grad_batches`` above 1): the step's logged losses
        are then means over its window (:meth:`_add_to_train_window`)."""
        return self._accumulate_batches() > 1

    def _add_to_train_window(self, name: str, rows: torch.Tensor) -> torch.Tensor:
        """This micro-batch's ``rows`` ``(R, [sum, clips])`` added to the sums kept under ``name`` for the optimiser
        step's gradient-accumulation window so far; returns them ``(R, 2)``. A window is the batches of one global
        step (Lightning's, a short last one of an epoch too); every name starts it afresh together."""
        if self._train_window is None or self._train_window[0] != self.global_step:  # a new window
            self._train_window = (self.global_step, {})
        sums = self._train_window[1]
        sums[name] = rows if name not in sums else sums[name] + rows
        return sums[name]

    def _train_window_sums(self, per_sample: torch.Tensor, templates: int) -> torch.Tensor:
        """Under gradient accumulation, the per-clip losses of the optimiser step's window so far, this batch's added:
        ``(1 + templates, [loss sum, clips])``, row 0 every clip's, row ``1 + i`` template ``i``'s."""
        loss_and_count = torch.stack([per_sample.detach().float(), torch.ones_like(per_sample, dtype=torch.float32)],
                                     1)  # (B, 2)
        rows = loss_and_count.new_zeros(1 + templates, 2)  # (1 + templates, [loss sum, clips])
        rows[0] = loss_and_count.sum(0)
        rows.index_add_(0, self._last_template.to(rows.device) + 1, loss_and_count)
        return self._add_to_train_window("loss", rows)

    def _loss_templates(self) -> tuple[str, ...]:
        """:attr:`mask_templates`, or a ValueError where the mask sampler now in place draws other templates: the
        per-template losses and their sums over the ranks keep one layout for the whole fit."""
        now = type(self.mask_sampler).templates
        if now != self.mask_templates:
            raise ValueError(f"the mask sampler's templates changed during the fit ({list(self.mask_templates)} -> "
                             f"{list(now)}, {type(self.mask_sampler).__name__}); the per-template losses need one set "
                             "for the whole fit: set the sampler before the fit (model.init_args.mask_sampler) and "
                             "change only its settings during it (dataclasses.replace, as the Curriculum does)")
        return self.mask_templates

    def tokens_per_clip(self, batch: dict) -> int:
        """Transformer tokens one clip costs (all networks of the stage); for throughput logging."""
        return 0


# --------------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------------


def window_means(sums: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
    """The means ``(R,)`` of window sums ``(R, [sum, clips])`` (0 for a row without clips) and the clips of each row
    (one host read)."""
    return sums[:, 0] / sums[:, 1].clamp(min=1), [int(c) for c in sums[:, 1].tolist()]


def _batch_clips(batch: dict) -> int:
    """The clips of a batch: the first dimension of its first per-clip tensor (``video``, ``z_high``, ...)."""
    return next(int(v.shape[0]) for v in batch.values() if torch.is_tensor(v) and v.dim() > 0)


def _crop(frames: torch.Tensor, starts: list[int], length: int) -> torch.Tensor:
    """``frames (B, T, ...)`` cut to ``(B, length, ...)`` from one start for every clip (a view, as training has
    always cut) or from each clip's own start."""
    if len(starts) == 1:
        return frames[:, starts[0] : starts[0] + length]
    return torch.stack([clip[s : s + length] for clip, s in zip(frames, starts, strict=True)])


def _networks_only(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A state dict without the frozen autoencoder (never saved; the model's own is loaded on resume)."""
    return {k: v for k, v in state.items() if not k.startswith("autoencoder.")}


def _drop_dropped_head(module: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A planner warm-up checkpoint carries the projection head; the joint planner has none (dropped)."""
    if getattr(module, "head", "absent") is None:
        return {k: v for k, v in state.items() if not k.startswith("head.")}
    return state


def _load_into(module: nn.Module, state: dict[str, torch.Tensor], where: str,
               explain: Callable[[], list[str]] | None = None) -> None:
    """Load ``state`` into ``module``, or raise naming what does not fit: the network settings in which the
    checkpoint differs (``explain()``, read only then), and the tensors."""
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    mismatched = [k for k in own if k in state and own[k].shape != state[k].shape]  # in the module's order
    if missing or unexpected or mismatched:
        tensors = (f"missing {missing[:5]}, unexpected {unexpected[:5]}, "
                   f"shape mismatch {[(k, tuple(state[k].shape), tuple(own[k].shape)) for k in mismatched[:5]]}")
        differ = explain() if explain is not None else []
        if not differ:
            raise ValueError(f"{where} does not fit this model: {tensors}. "
                             "Was it trained with another model size or latent channel count?")
        raise ValueError(
            f"{where} does not fit this model: it was built with other network settings: {'; '.join(differ)}. "
            f"Give this stage and the one that wrote the checkpoint the same settings. Tensors: {tensors}"
        )
    module.load_state_dict(state)


def _check_autoencoder_spec(autoencoder: FrameAutoencoder) -> None:
    """An autoencoder must say how to rebuild itself (``spec()``): every checkpoint records it, so without one a run
    would fail at its first checkpoint, not before training."""
    name = type(autoencoder).__name__
    try:
        spec = autoencoder.spec()
    except NotImplementedError:
        raise ValueError(
            f"model.autoencoder: {name} does not implement spec() (the {{'class_path', 'init_args'}} that rebuilds it, "
            "which every checkpoint and latent cache records); implement it, as "
            "mardini.autoencoders.SpaceToDepthAutoencoder does, or use an autoencoder that has it"
        ) from None
    if not isinstance(spec, dict) or not isinstance(spec.get("class_path"), str):
        raise ValueError(
            f"model.autoencoder: {name}.spec() returned {spec!r}, not a dict with a 'class_path' (and its "
            "'init_args'); return what rebuilds it, as mardini.autoencoders.SpaceToDepthAutoencoder.spec() does"
        )


# trainer.precision; every stage config trains in bf16-mixed (16-mixed: a GradScaler, whose overflow steps are its own)
SUPPORTED_PRECISIONS = ("32-true", "bf16-mixed", "16-mixed")
_PRECISION_PROBLEMS = {
    "16-true": "it keeps the weights, the EMA and AdamW's moments in half precision, where small updates round away, "
               "and the planner's low-resolution copy of a clip cannot be resized in it",
    "64-true": "the networks would compute in fp64, but cached latents reach them in fp32",
}
_PRECISION_PROBLEMS["bf16-true"] = _PRECISION_PROBLEMS["16-true"]


def _check_precision(precision: str) -> None:
    """Refuse a ``trainer.precision`` other than :data:`SUPPORTED_PRECISIONS`, naming why and ``bf16-mixed``:
    ``16-true`` / ``bf16-true`` (and Transformer Engine's, bf16 or fp16 weights) would train half-precision master
    weights, ``64-true`` fp64 networks on fp32 latents. Before, ``bf16-true`` trained a generator silently, its
    updates rounding away, and failed in the planner's resize naming neither the setting nor the fix."""
    if precision in SUPPORTED_PRECISIONS:
        return
    if str(precision).startswith("transformer-engine"):
        why = (f"Transformer Engine keeps the weights in {'fp16' if precision.endswith('float16') else 'bf16'} "
               "(and replaces the networks' layers), where AdamW's small updates round away")
    else:
        why = _PRECISION_PROBLEMS.get(precision, "the stages train in 32-true, bf16-mixed or 16-mixed only")
    raise ValueError(f"trainer.precision={precision} is not supported: {why}; use bf16-mixed (bf16 compute with fp32 "
                     "weights, EMA and optimiser state, as the stage configs) or 32-true")


def _warn_if_bf16_is_emulated(precision: str, device: torch.device) -> None:
    """A warning naming ``--trainer.precision 32-true`` for ``bf16-mixed`` on a CPU without native bf16 matrix
    multiplies (:func:`mardini.cpu_kernels.slow_bf16_advice`): the tiny configs' precision, which on such a laptop
    ran silently several times slower than fp32."""
    if precision != "bf16-mixed" or device.type != "cpu":
        return
    advice = cpu_kernels.slow_bf16_advice()
    if advice is not None:
        from lightning.pytorch.utilities import rank_zero_warn

        rank_zero_warn(advice)


def _check_settings(**s: Any) -> None:
    """Impossible settings fail at construction with the key and its allowed range."""
    rules = [
        ("planner_resolution", s["planner_resolution"] >= 1, ">= 1"),
        ("frames", s["frames"] is None or s["frames"] >= 2, ">= 2 (one given and one generated frame)"),
        ("blr", s["blr"] > 0, "> 0"),
        ("lr", s["lr"] is None or s["lr"] > 0, "> 0 or null"),
        ("warmup_steps", s["warmup_steps"] >= 0, ">= 0"),
        ("min_lr_ratio", 0 <= s["min_lr_ratio"] <= 1, "in [0, 1]"),
        ("ema_decay", 0 <= s["ema_decay"] < 1, "in [0, 1)"),
        ("nonfinite", s["nonfinite"] in ("stop", "skip"), "'stop' or 'skip'"),
        ("weight_decay", s["weight_decay"] >= 0, ">= 0"),
        ("betas", len(s["betas"]) == 2 and all(0 <= b < 1 for b in s["betas"]), "two numbers in [0, 1)"),
        ("decay_steps", s["decay_steps"] is None or s["decay_steps"] >= 1, ">= 1 or null (= trainer.max_steps)"),
        ("loss_reduction", s["loss_reduction"] in ("clip", "element"),
         "'clip' (each clip's mean, then the clips' mean) or 'element' (the mean over all generated elements)"),
    ]
    for key, ok, allowed in rules:
        if not ok:
            raise ValueError(f"model.{key}={s[key]!r} is impossible: it must be {allowed}")


__all__ = ["MarDiniBase", "CHECKPOINT_FORMAT"]


def _size_fixes(height: int, width: int, factor: int, patches: dict[str, int], planner_resolution: int,
                layout: bool) -> str:
    """The settings that make ``height x width`` training frames feed the networks: the nearest
    ``data.resolution`` at this ``planner_resolution``, the ``planner_resolution`` values nearest to it that work at
    this resolution, and else the nearest resolution the generator splits with a ``planner_resolution`` for it
    (:func:`~mardini.data.transforms.unsplit_input`)."""
    from mardini.data.transforms import nearest_fitting_size, planner_sides

    def nearest_sides(h: int, w: int) -> list[int]:
        sides = planner_sides(h, w, factor, patches, layout) if "planner" in patches else []
        return [s for s in sides if s < planner_resolution][-1:] + [s for s in sides if s > planner_resolution][:1]

    fixes = []
    size = nearest_fitting_size(height, width, factor, patches, planner_resolution, layout)
    if size:
        fixes.append(f"set data.resolution to [{size[0]}, {size[1]}] (the nearest size that fits "
                     f"model.planner_resolution={planner_resolution})")
    near = nearest_sides(height, width)
    if near:
        fixes.append(f"model.planner_resolution to {' or '.join(map(str, near))} (a short side whose copy of "
                     f"{height}x{width} frames fits)")
    else:
        split = nearest_fitting_size(height, width, factor, {"generator": patches.get("generator", 1)}, 1, layout)
        sides = nearest_sides(*split) if split and split != size else []
        if sides:
            fixes.append(f"data.resolution [{split[0]}, {split[1]}] with model.planner_resolution "
                         f"{' or '.join(map(str, sides))}")
    return ", or ".join(fixes) or "use a data.resolution whose sides are multiples of the generator's token size"
