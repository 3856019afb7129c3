"""TensorBoard frame grids of interpolation and image-to-video samples during training."""

from __future__ import annotations

import lightning as L
import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_only

from mardini.masking import image_to_video_mask, interpolation_mask


class SampleGrids(L.Callback):
    """Every ``every_n_steps`` steps (rank 0), samples fixed clips with the EMA weights and logs one grid per task.

    Rows of a grid: ground truth, then the sample; given frames have a green border. The clips are the first
    validation batch (or the first training batch when there is no validation split), fixed for the whole run.

    Args:
        every_n_steps: logging period in optimiser steps (>= 1).
        clips: clips per grid.
        steps: DDIM steps per sample (few: this is a progress picture, not an evaluation).
        guidance_scale: classifier-free guidance on the plan for image-to-video.
        seed: sampling seed (fixed, so grids of different steps are comparable).
    """

    def __init__(self, every_n_steps: int = 500, clips: int = 2, steps: int = 10, guidance_scale: float = 1.0,
                 seed: int = 0) -> None:
        for key, value, low in (("every_n_steps", every_n_steps, 1), ("clips", clips, 1), ("steps", steps, 1)):
            if value < low:
                raise ValueError(f"SampleGrids.{key}={value} is impossible: it must be >= {low}")
        self.every_n_steps, self.clips, self.steps = every_n_steps, clips, steps
        self.guidance_scale, self.seed = guidance_scale, seed
        self._video: torch.Tensor | None = None
        self.logged_steps: list[int] = []

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

    @rank_zero_only
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if step == 0 or step % self.every_n_steps or step in self.logged_steps or "generator" not in pl_module.networks:
            return
        video = self._fixed_clips(trainer, batch)
        if video is None or trainer.logger is None or not hasattr(trainer.logger.experiment, "add_image"):
            return
        from mardini.evaluation.samplers import ema_context, pipeline_from_module

        frames = pl_module.frames or video.shape[1]
        video = video[:, :frames].to(pl_module.device)  # (b, T, 3, H, W)
        masks = {"interpolation": interpolation_mask(frames), "image_to_video": image_to_video_mask(frames)}
        was_training = {name: net.training for name, net in pl_module.networks.items()}
        try:
            with ema_context(pl_module):
                pipe = pipeline_from_module(pl_module, window=frames)
                for task, row in masks.items():
                    mask = row[None].expand(video.shape[0], -1).to(video.device)  # (b, T)
                    scale = self.guidance_scale if task == "image_to_video" and pipe.planner is not None else 1.0
                    sample = pipe.generate(video, mask, steps=self.steps, guidance_scale=scale, seed=self.seed,
                                           progress=False)  # (b, T, 3, H, W)
                    grid = _grid(torch.cat([video, sample]), torch.cat([torch.zeros_like(mask), mask]))
                    trainer.logger.experiment.add_image(f"samples/{task}", grid, step, dataformats="HWC")
        finally:
            for name, net in pl_module.networks.items():
                net.train(was_training[name])
        self.logged_steps.append(step)


def _grid(video: torch.Tensor, mask: torch.Tensor) -> np.ndarray:
    """``(B, T, 3, H, W)`` and ``(B, T)`` -> uint8 ``(H_s, W_s, 3)`` contact sheet (rendered by mardini.visualize)."""
    from mardini.visualize import contact_sheet

    return np.asarray(contact_sheet(video.cpu(), None, mask=mask.cpu()).convert("RGB"))  # (H_s, W_s, 3)
