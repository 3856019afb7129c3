"""What a stage logs: the training step's losses, curriculum, EMA, skipped data and throughput, and validation."""

from __future__ import annotations

import time

import torch

from mardini.lit.batch_weight import element_mean_share
from mardini.lit.fsdp import attached_trainer
from mardini.lit.loss_reduction import window_means


class StepLogs:
    """:class:`~mardini.lit.base.MarDiniBase`'s ``train/``, ``curriculum/``, ``ema/``, ``data/``, ``perf/`` and
    ``val/`` values, and the training clock behind ``perf/train_hours``."""

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

    def _start_train_clock(self) -> None:
        """Start :meth:`train_seconds`' clock of this fit (at the training's start)."""
        self._train_clock = time.perf_counter()

    def on_train_end(self) -> None:
        self._train_seconds, self._train_clock = self.train_seconds(), None

    def train_seconds(self) -> float:
        """Seconds of training of the run so far: from the training's start (after setup and the sanity check) to now,
        validations and checkpoints included, added to what the checkpoint it resumed from recorded. Saved in every
        checkpoint (``checkpoint["mardini"]["train_seconds"]``, with ``train_seconds_from_step``: 0, or the step of a
        resumed checkpoint that recorded no time, from which it counts) and logged as ``perf/train_hours``."""
        running = 0.0 if self._train_clock is None else time.perf_counter() - self._train_clock
        return self._train_seconds + running
