"""Frame grids of interpolation and image-to-video samples (and any given-frame pattern) during training, logged to
TensorBoard (or W&B)."""

from __future__ import annotations

from collections.abc import Callable

import lightning as L
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities import rank_zero_warn
import numpy as np
import torch

from mardini.lit.fsdp import fsdp_root, root_unsharded
from mardini.masking import image_to_video_mask, interpolation_mask


class SampleGrids(L.Callback):
    """Every ``every_n_steps`` steps (rank 0), samples fixed clips with the EMA weights and logs one grid per task,
    at the step the scalars of that step are logged at (Lightning's, one below the global step; before, at the global
    step: the grids of step 10 at 10, its loss at 9).

    Under FSDP a forward gathers parameters from every rank, so there every rank samples (rank 0's decision,
    broadcast; the root unit's parameters gathered for the duration) and rank 0 alone writes.

    Rows of a grid: ground truth, then the sample; given frames have a green border. The clips are the first
    validation batch (or the first training batch when there is no validation split), fixed for the whole run. The
    grids go to the first of the fit's loggers that takes images (TensorBoard's, W&B's: :func:`image_writer`); a fit
    whose loggers take none (a CSV logger alone) warns once at its start that they are off.

    Args:
        every_n_steps: logging period in optimiser steps (>= 1).
        clips: clips per grid.
        steps: DDIM steps per sample (few: this is a progress picture, not an evaluation).
        guidance_scale: classifier-free guidance on the plan for image-to-video.
        seed: sampling seed (fixed, so grids of different steps are comparable).
        tasks: extra grids, ``{name: given frame indices}`` (e.g. ``{every_other: [0, 2, 4, 6, 8]}``; negative
            indices count from the end), logged as ``samples/<name>`` after the interpolation and image-to-video ones;
            a task whose indices do not fit the window (a curriculum stage of fewer frames) is skipped with a warning.
    """

    def __init__(self, every_n_steps: int = 500, clips: int = 2, steps: int = 10, guidance_scale: float = 1.0,
                 seed: int = 0, tasks: dict[str, list[int]] | None = None) -> None:
        for key, value, low in (("every_n_steps", every_n_steps, 1), ("clips", clips, 1), ("steps", steps, 1)):
            if value < low:
                raise ValueError(f"SampleGrids.{key}={value} is impossible: it must be >= {low}")
        for name, given in (tasks or {}).items():
            if name in ("interpolation", "image_to_video") or not given:
                raise ValueError(f"SampleGrids.tasks[{name!r}]={given!r}: give a new name and at least one frame index")
        self.tasks = {name: [int(i) for i in given] for name, given in (tasks or {}).items()}
        self._unfit: set[tuple[str, int]] = set()  # (task, frames) warned about: indices outside that window
        self.every_n_steps, self.clips, self.steps = every_n_steps, clips, steps
        self.guidance_scale, self.seed = guidance_scale, seed
        self._video: torch.Tensor | None = None
        self.last_logged_step: int | None = None  # the global step of the last grids (one step logs them once)

    def _fixed_clips(self, trainer: L.Trainer, batch: dict) -> torch.Tensor | None:
        if self._video is None:
            source = batch
            dm = trainer.datamodule
            if dm is not None and getattr(dm, "val_shards", None):
                try:
                    source = next(iter(dm.val_dataloader()))
                except StopIteration:  # an empty split: use the training batch
                    source = batch
            if "video" not in source:
                return None  # cached latents only: nothing to show
            self._video = source["video"][: self.clips].detach().cpu().clone()  # (b, T, 3, H, W)
        return self._video

    def on_fit_start(self, trainer, pl_module) -> None:
        if trainer.is_global_zero and "generator" in pl_module.networks and image_writer(trainer) is None:
            names = ", ".join(type(logger).__name__ for logger in trainer.loggers) or "none"
            rank_zero_warn(f"SampleGrids logs no grid in this fit: none of its loggers ({names}) takes images; add a "
                           "TensorBoardLogger or WandbLogger to trainer.logger (a list of loggers keeps the others)")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        root = fsdp_root(pl_module)
        if root is None:
            if trainer.is_global_zero:
                self._log_grids(trainer, pl_module, batch)
            return
        if not self._step_due(trainer, pl_module):  # the same on every rank: no broadcast between grid steps
            return
        go = trainer.strategy.broadcast(self._due(trainer, pl_module, batch) if trainer.is_global_zero else None)
        if go:  # every rank runs the forwards (FSDP all-gathers in each); rank 0 writes
            with trainer.precision_plugin.forward_context():
                self._log_grids(trainer, pl_module, batch, checked=True, root=root)

    def _step_due(self, trainer, pl_module) -> bool:
        """Whether this step is one to log grids at (from the step alone: the same on every rank)."""
        step = trainer.global_step
        return not (step == 0 or step % self.every_n_steps or step == self.last_logged_step
                    or "generator" not in pl_module.networks)

    def _due(self, trainer, pl_module, batch) -> bool:
        """Whether this step logs grids (rank 0's view: other ranks' loggers are stand-ins)."""
        if not self._step_due(trainer, pl_module):
            return False
        video = self._fixed_clips(trainer, batch)
        return not (video is None or image_writer(trainer) is None)

    def _log_grids(self, trainer, pl_module, batch, checked: bool = False, root=None) -> None:
        if not (checked or self._due(trainer, pl_module, batch)):
            return
        step = trainer.global_step
        logged_at = trainer.fit_loop.epoch_loop._batches_that_stepped  # the scalars' x-axis: step k's at k - 1
        video = self._fixed_clips(trainer, batch)
        if video is None:  # a rank without video clips cannot join rank 0's forwards
            raise RuntimeError(f"SampleGrids: rank {trainer.global_rank} has no video clips to sample while rank 0 has")
        from mardini.evaluation.samplers import ema_context, pipeline_from_module

        frames = pl_module.frames or video.shape[1]
        video = video[:, :frames].to(pl_module.device)  # (b, T, 3, H, W)
        masks = {"interpolation": interpolation_mask(frames), "image_to_video": image_to_video_mask(frames)}
        for name, given in self.tasks.items():
            try:
                masks[name] = given_mask(given, frames, name)
            except ValueError as err:  # e.g. a curriculum stage of fewer frames: skip this grid, do not stop the fit
                if (name, frames) not in self._unfit:
                    self._unfit.add((name, frames))
                    rank_zero_warn(f"{err}; its grid is skipped while the window has {frames} frames")
        was_training = {name: net.training for name, net in pl_module.networks.items()}
        try:
            # under FSDP the root unit's parameters (embeddings, heads) are gathered while sampling outside a forward
            with ema_context(pl_module), root_unsharded(root, writeback=False):
                pipe = pipeline_from_module(pl_module, window=frames)
                for task, row in masks.items():
                    mask = row[None].expand(video.shape[0], -1).to(video.device)  # (b, T)
                    scale = self.guidance_scale if task == "image_to_video" and pipe.planner is not None else 1.0
                    sample = pipe.generate(video, mask, steps=self.steps, guidance_scale=scale, seed=self.seed,
                                           progress=False)  # (b, T, 3, H, W)
                    if trainer.is_global_zero:
                        grid = _grid(torch.cat([video, sample]), torch.cat([torch.zeros_like(mask), mask]))
                        image_writer(trainer)(f"samples/{task}", grid, logged_at)
        finally:
            for name, net in pl_module.networks.items():
                net.train(was_training[name])
        self.last_logged_step = step


def image_writer(trainer: L.Trainer) -> Callable[[str, np.ndarray, int], None] | None:
    """How the fit logs an image ``(tag, uint8 (H, W, 3), step)``: through the first of its loggers that takes
    images (one whose experiment has TensorBoard's ``add_image``, or a ``WandbLogger``); None where none does.
    Before, only ``trainer.logger`` (the first logger) was asked: grids were skipped without a word under a CSV or
    W&B logger, or with TensorBoard second."""
    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger):
            return lambda tag, image, step: logger.log_image(tag, [image], step=step)
        experiment = logger.experiment
        if hasattr(experiment, "add_image"):
            return lambda tag, image, step: experiment.add_image(tag, image, step, dataformats="HWC")
    return None


def given_mask(given: list[int], frames: int, name: str) -> torch.Tensor:
    """``(T,)`` bool, True = generate, with the ``given`` indices (negative from the end) kept."""
    bad = [i for i in given if not -frames <= i < frames]
    if bad or len({i % frames for i in given}) == frames:
        raise ValueError(f"SampleGrids.tasks[{name!r}]={given}: indices must lie in [-{frames}, {frames}) and leave a "
                         f"frame to generate in the {frames}-frame window")
    mask = torch.ones(frames, dtype=torch.bool)  # (T,)
    mask[[i % frames for i in given]] = False
    return mask


def _grid(video: torch.Tensor, mask: torch.Tensor) -> np.ndarray:
    """``(B, T, 3, H, W)`` and ``(B, T)`` -> uint8 ``(H_s, W_s, 3)`` contact sheet (rendered by mardini.visualize)."""
    from mardini.visualize import contact_sheet

    return np.asarray(contact_sheet(video.cpu(), None, mask=mask.cpu()).convert("RGB"))  # (H_s, W_s, 3)
