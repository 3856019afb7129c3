"""Shared base of the three training stages: construction, the RNG of a step, the latents of a batch, the steps.

Subclasses build their networks into ``self.networks`` (an ``nn.ModuleDict``) and implement
:meth:`compute_loss`. Everything else lives here once, each job in its own module, mixed into
:class:`MarDiniBase`: the start-up checks (:mod:`~mardini.lit.startup_checks`), the loss reduction and
accumulation arithmetic (:mod:`~mardini.lit.loss_reduction`), AdamW with ``blr * global_batch / 256``, warm-up +
cosine and the non-finite policy (:mod:`~mardini.lit.optimisation`), the EMA of the networks only (timm
``ModelEmaV3``, :mod:`~mardini.lit.ema_weights`), the logs (:mod:`~mardini.lit.step_logs`), checkpoint metadata and
the resume checks (:mod:`~mardini.lit.checkpoint_hooks`).
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

import lightning as L
import torch
from lightning.pytorch.utilities import AttributeDict, rank_zero_warn
from timm.utils.model_ema import ModelEmaV3
from torch import nn

from mardini.autoencoders import FrameAutoencoder, SpaceToDepthAutoencoder
from mardini.data.batching import is_padding
from mardini.lit.batch_weight import ElementWindow
from mardini.lit.checkpoint_hooks import CHECKPOINT_FORMAT, RESUME_FIX, StageCheckpoints
from mardini.lit.clip_draws import (ClipGenerators, Draws, ValidationOrder, clip_weights, draw_rows, keyless_warning,
                                    one_per_clip, padding_warning, validation_order)
from mardini.lit.ema_weights import EmaWeights
from mardini.lit.expected_warnings import ExpectedWarnings
from mardini.lit.fsdp import attached_trainer
from mardini.lit.loop_state import end_validation_workers
from mardini.lit.loss_reduction import LossReduction, window_means
from mardini.lit.optimisation import Optimisation
from mardini.lit.startup_checks import SUPPORTED_PRECISIONS, StartupChecks, _check_precision
from mardini.lit.step_logs import StepLogs
from mardini.masking import MaskSampler, mask_sampler_class


class MarDiniBase(StartupChecks, LossReduction, Optimisation, EmaWeights, StepLogs, StageCheckpoints,
                  L.LightningModule):
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
            each stage's EMA restarts there (its decay ramping up again with ``ema_warmup``). Either way a parameter
            the joint stage's ``train_only`` freezes keeps its loaded EMA weight, as raw and EMA weight.
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
        self._train_seconds_from_step = 0  # the step _train_seconds counts from (0 but after an unrecorded time)
        self._train_clock: float | None = None  # perf_counter at this fit's training start, while it trains
        self._code_history: list[dict[str, Any]] = []  # the code a resumed checkpoint was trained with (code_record)
        self._code_from_step = 0  # the global step this process's code trains from (a resumed checkpoint's)
        self._schedule_steps: int | None = None  # the LR schedule's length (configure_optimizers), saved in checkpoints
        self._resumed_schedule: dict[str, Any] | None = None  # what a resumed checkpoint says of its schedule
        # [[global step, LR schedule length], ...]: each length the run trained with, from the step it took over
        self._schedule_history: list[list[int]] = []
        self._ema_backup: list[torch.Tensor] | None = None
        self._val_template_sums: torch.Tensor | None = None  # (templates, [loss sum, clips]) of this validation epoch
        self._val_order: tuple[ValidationOrder | None] | None = None  # this validation's loader order, once read
        self._val_weights: torch.Tensor | None = None  # (B,) the last validation batch's clip weights (1, or 0: padding)
        self._warned_keyless = False
        self._warned_padding = False
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
        """Each clip's loss with its own draws (crop, mask, t, noise: :class:`ClipGenerators`, by its key, else by its
        index in the dataset: :meth:`_validation_order`), so the epoch's ``val/loss``, a mean over its clips, does not
        depend on how they are batched, nor, under DDP, on the world size: the clips a ``DistributedSampler`` repeats
        to pad the ranks' shares weigh 0 (:attr:`_val_weights`, :func:`~mardini.lit.clip_draws.clip_weights`), as do
        the clips of a padding batch (a rank's stream short of the steps every rank runs under FSDP:
        :func:`~mardini.data.batching.padding_of`)."""
        rows = _batch_clips(batch)
        order = self._validation_order(keyless=batch.get("key") is None)
        first = batch_idx * (order.batch_size if order is not None else rows)  # the batches before it full
        gen = ClipGenerators.for_batch(self.hparams.seed, batch, rows, first=first,
                                       order=order.indices if order is not None else None)
        batch = self.crop_frames(batch, gen)
        per_sample = self.compute_loss(batch, gen, train=False)  # (B,)
        weights = clip_weights(order, first, rows) * (not is_padding(batch))  # (B,) 1, or 0 for a padded repeat
        self._val_weights = weights.to(per_sample.device)  # (B,)
        if self._val_template_sums is None:  # summed here, reduced over the ranks at the epoch's end
            self._val_template_sums = per_sample.new_zeros(len(self._loss_templates()), 2, dtype=torch.float32)
        loss_and_count = torch.stack([per_sample.detach().float() * self._val_weights, self._val_weights], 1)  # (B, 2)
        self._val_template_sums.index_add_(0, self._last_template, loss_and_count)  # (templates, [loss sum, clips])

    def _validation_order(self, keyless: bool) -> ValidationOrder | None:
        """This rank's validation loader order (:func:`~mardini.lit.clip_draws.validation_order`, read once per
        validation): key-less clips are seeded by its dataset indices, and its padded repeats weigh 0. None where it
        cannot be read: key-less clips are then numbered by their position on this rank, which under DDP warns once."""
        if self._val_order is None:
            loader = getattr(attached_trainer(self), "val_dataloaders", None)
            self._val_order = (validation_order(loader),)
            self._warn_padding(loader, self._val_order[0])
        order = self._val_order[0]
        if keyless and (order is None or order.indices is None) and self._world_size() > 1 and not self._warned_keyless:
            self._warned_keyless = True
            rank_zero_warn(keyless_warning(self._world_size()))
        return order

    def _warn_padding(self, loader, order: ValidationOrder | None) -> None:
        """Once under DDP: a validation loader whose order cannot be read and whose ranks' shares repeat clips
        (:func:`~mardini.lit.clip_draws.padding_warning`), each of which then counts once more."""
        if order is not None or self._world_size() < 2 or self._warned_padding:
            return
        message = padding_warning(loader, self._world_size())
        if message is not None:
            self._warned_padding = True
            rank_zero_warn(message)

    # ----------------------------------------------------------------------------------------------
    # Hooks that join the jobs of the mixins
    # ----------------------------------------------------------------------------------------------
    def configure_callbacks(self) -> list[L.Callback]:
        """:class:`ExpectedWarnings`: Lightning's warnings that do not apply to this module's runs (the EMA in eval mode;
        with a ``VideoDataModule``, its ``__len__`` and its mid-epoch resume) ignored for those runs only."""
        return [ExpectedWarnings()]

    def on_train_start(self) -> None:
        self._start_train_clock()
        self.apply_peak_lr_on_resume()
        self._warn_other_schedule_length()
        self._record_schedule_length()

    def on_validation_epoch_start(self) -> None:
        self._val_template_sums = None
        self._val_order = None  # read again by the first batch (_validation_order)
        self._swap_in_ema()

    def on_validation_epoch_end(self) -> None:
        self._swap_out_ema()
        self._log_val_template_losses()

    def on_validation_end(self) -> None:
        end_validation_workers(self.trainer)  # not kept alive through the training until the next validation

    @property
    def hparams_initial(self) -> AttributeDict:
        """What Lightning records as the run's hyper-parameters (``logger.log_hyperparams``, once at the start of a
        fit or validate): the module's arguments and, with a trainer attached, the run's data, trainer and curriculum
        settings under ``data``, ``trainer`` and ``curriculum`` and its code under ``code`` (with ``history``, the
        commits it was trained with across resumes) (:func:`~mardini.lit.run_settings.run_settings`), so runs
        compare on them too. The checkpoint's ``hyper_parameters`` stay the module's (``hparams``)."""
        from mardini.lit.run_settings import run_settings

        hp = super().hparams_initial
        trainer = attached_trainer(self)
        if trainer is not None:
            hp.update({k: v for k, v in run_settings(trainer, self.code_history()).items() if k not in hp})
        return hp

    def tokens_per_clip(self, batch: dict) -> int:
        """Transformer tokens one clip costs (all networks of the stage); for throughput logging."""
        return 0


# --------------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------------


def _batch_clips(batch: dict) -> int:
    """The clips of a batch: the first dimension of its first per-clip tensor (``video``, ``z_high``, ...)."""
    return next(int(v.shape[0]) for v in batch.values() if torch.is_tensor(v) and v.dim() > 0)


def _crop(frames: torch.Tensor, starts: list[int], length: int) -> torch.Tensor:
    """``frames (B, T, ...)`` cut to ``(B, length, ...)`` from one start for every clip (a view, as training has
    always cut) or from each clip's own start."""
    if len(starts) == 1:
        return frames[:, starts[0] : starts[0] + length]
    return torch.stack([clip[s : s + length] for clip, s in zip(frames, starts, strict=True)])


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


__all__ = ["MarDiniBase", "CHECKPOINT_FORMAT", "RESUME_FIX", "SUPPORTED_PRECISIONS", "window_means",
           "_check_precision"]
