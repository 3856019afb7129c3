"""What a stage's checkpoints hold and which checkpoints a resume or a later stage accepts."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_info
from torch import nn

from mardini.diffusion.anchor import FrameAnchor
from mardini.lit.code_record import earlier_history, extended, other_code_line
from mardini.lit.fsdp import attached_trainer, fsdp_root
from mardini.lit.run_settings import code_settings
from mardini.lit.schedules import warmup_cosine

CHECKPOINT_FORMAT = 1  # bump when the layout of checkpoint["mardini"] or the network keys change
RESUME_FIX = ("resume with the settings the run was trained with (its config.yaml in the log folder; earlier ones are kept "
              "beside it as config.N.yaml), or start a new run: --ckpt_path null starts over in the same log folder "
              "(the earlier run's checkpoints are moved to checkpoints/earlier.N/), another trainer.logger save_dir or "
              "name in a new one")


class StageCheckpoints:
    """:class:`~mardini.lit.base.MarDiniBase`'s checkpoint metadata, its save and load hooks, the checks of a
    checkpoint to resume, and the loading of an earlier stage's networks."""

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
            "autoencoder_fingerprint": self.autoencoder.fingerprint(),  # computed once per process (memoised)
            "planner_resolution": self.hparams.planner_resolution,
            "latent_channels": self.autoencoder.latent_channels,
            "nonfinite_skipped": self.nonfinite_skipped,
            "data_skipped": self._skipped_over_ranks(),  # every rank's (on_save_checkpoint runs on every rank)
            "ema_loaded": sorted(self._ema_loaded),
            "train_seconds": self.train_seconds(),
            "train_seconds_from_step": self._train_seconds_from_step,  # > 0: the time before it is not recorded
            "lr_schedule_steps": self._schedule_steps,  # a resume under another length says so
            "lr_schedule_history": [list(entry) for entry in self._schedule_history],  # _record_schedule_length
            "code": dict(code_settings()),  # the code of the process saving it (git commit, changes, libraries)
            "code_history": self.code_history(),  # every commit the run trained with, from which step
            **({"cross_rope_grid": self.networks["generator"].cfg.cross_rope_grid} if "generator" in self.networks
               else {}),
        }

    def code_history(self) -> list[dict[str, Any]]:
        """The code this run was trained with (``mardini.lit.code_record``): the resumed checkpoint's history, then
        this process's code from the step it resumed at (0 for a new run)."""
        return extended(self._code_history, code_settings(), self._code_from_step)

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
        from mardini.lit.checkpoints import warn_changed_settings, warn_other_start
        from mardini.lit.loop_state import start_next_epoch

        trainer = attached_trainer(self)
        path = getattr(trainer, "ckpt_path", None)
        fitting = trainer is not None and trainer.state.fn == TrainerFn.FITTING
        self.check_checkpoint(checkpoint, path, fitting=fitting)
        path = path or "<resumed checkpoint>"
        warn_changed_settings(checkpoint.get("hyper_parameters") or {}, dict(self.hparams), path, checkpoint["mardini"],
                              folder=_folder_outside(trainer) if fitting else None)
        if fitting:
            warn_other_start(checkpoint.get("hyper_parameters") or {}, dict(self.hparams), path)
        start_next_epoch(checkpoint)  # a fit that ended with its epoch resumes at the next epoch's first batch
        self._resumed_schedule = {"path": path, "steps": checkpoint["mardini"].get("lr_schedule_steps"),
                                  "step": checkpoint.get("global_step", 0),
                                  "decay_steps": (checkpoint.get("hyper_parameters") or {}).get("decay_steps")}
        # a checkpoint written before the history (2026-12-07) starts it at this resume's step: unknown before
        self._schedule_history = [list(e) for e in checkpoint["mardini"].get("lr_schedule_history") or []]
        self.nonfinite_skipped = int(checkpoint["mardini"].get("nonfinite_skipped", 0))
        # the logged data/skipped goes on: every rank's count before, held by rank 0 (checkpoints written before
        # 2026-12-07 hold rank 0's alone)
        self._skipped_total = int(checkpoint["mardini"].get("data_skipped", 0)) if self.global_rank == 0 else 0
        self._load_train_seconds(checkpoint)
        self._note_code(checkpoint, path, fitting=fitting)
        if "ema_loaded" in checkpoint["mardini"]:  # a resume need not load init_from again (MarDiniCLI) to know it
            self._ema_loaded = set(checkpoint["mardini"]["ema_loaded"])
        state = checkpoint["state_dict"]
        for k, v in self.autoencoder.state_dict().items():
            state.setdefault(f"autoencoder.{k}", v)

    def _load_train_seconds(self, checkpoint: dict) -> None:
        """The training time a resume adds to, and the step it counts from: a checkpoint written before the time was
        recorded (2026-12-07) holds none, so the count starts at its step instead of passing the time since the
        resume off as the whole run's (``train_seconds_from_step`` says so)."""
        meta = checkpoint["mardini"]
        self._train_seconds = float(meta.get("train_seconds", 0.0))
        unrecorded = int(checkpoint.get("global_step", 0)) if "train_seconds" not in meta else 0
        self._train_seconds_from_step = int(meta.get("train_seconds_from_step", unrecorded))

    def _note_code(self, checkpoint: dict, path: str, fitting: bool) -> None:
        """Carry the checkpoint's code history forward; a fit resuming a checkpoint another code wrote says so."""
        step = int(checkpoint.get("global_step", 0))
        self._code_history, self._code_from_step = earlier_history(checkpoint["mardini"]), step
        line = other_code_line(path, checkpoint["mardini"].get("code"), code_settings()) if fitting else None
        if line is not None:
            rank_zero_info(line)

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

        check_metadata(checkpoint, kinds=(self.KIND,), path=path or "<resumed checkpoint>", size=self.hparams.size,
                       starts=(self.KIND, "--ckpt_path") if fitting else None)
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
        check_same_latents(checkpoint["mardini"], self.autoencoder.spec(), path, fix=f"To go on, {RESUME_FIX}",
                           fingerprint=self.autoencoder.fingerprint,
                           fingerprint_before_dtypes=self.autoencoder.fingerprint_before_dtypes)
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

    def load_networks_from(self, path: str, kinds: tuple[str, ...], names: tuple[str, ...] | None = None,
                           setting: str = "init_from") -> None:
        """Copy networks (raw and EMA) from a checkpoint of an allowed kind; shapes must match. ``setting``: the
        model argument that named ``path`` (``init_from``, ``planner_ckpt``, ``generator_ckpt``), for the messages.

        An EMA-only export starts both the raw and the EMA networks from its EMA weights. Nothing is read while
        train.py builds the model of a fit that resumes (``RESUMING``): the resumed checkpoint holds every weight."""
        from mardini.lit.checkpoints import RESUMING, load_network_states, network_differences, read_checkpoint

        if RESUMING.get():
            return

        raw, ema = load_network_states(path, kinds=kinds, names=names or tuple(self.networks.keys()),
                                       size=self.hparams.size, autoencoder_spec=self.autoencoder.spec(),
                                       anchor=FrameAnchor.from_hparams(self.hparams),
                                       cross_rope_grid=self._cross_rope_grid(),
                                       autoencoder_fingerprint=self.autoencoder.fingerprint,
                                       autoencoder_fingerprint_before_dtypes=self.autoencoder.fingerprint_before_dtypes,
                                       starts=(self.KIND, setting))
        for name, state in raw.items():
            where = f"{path}: network '{name}' (this model: size '{self.hparams.size}', {name} {self.hparams.get(name)})"
            ours = dataclasses.asdict(self.networks[name].cfg)
            _load_into(self.networks[name], _drop_dropped_head(self.networks[name], state), where,
                       explain=lambda name=name, ours=ours: network_differences(read_checkpoint(path), name, ours))
        for name, state in ema.items():
            _load_into(self.ema.module[name], _drop_dropped_head(self.ema.module[name], state), f"{path}: EMA of '{name}'")
            self._ema_loaded.add(name)
        rank_zero_info(self._start_report(path, setting, sorted(raw)))

    def _start_report(self, path: str, setting: str, names: list[str]) -> str:
        """One line saying what a start from ``path`` (given as ``setting``) loaded: the networks, of which checkpoint,
        what becomes of their EMA, the network settings this model changes (:func:`network_setting_changes`), and
        that nothing else of the run is carried over."""
        from mardini.lit.checkpoints import network_setting_changes, read_checkpoint

        ckpt = read_checkpoint(path)
        meta = ckpt["mardini"]
        changes = [c for name in names
                   for c in network_setting_changes(ckpt, name, dataclasses.asdict(self.networks[name].cfg))]
        weights = ("raw and EMA weights" if not meta.get("ema_only")
                   else "both from the EMA weights of an EMA-only export")
        ema = ("the loaded EMA goes on at ema_decay (ema_keep_loaded)" if self.hparams.get("ema_keep_loaded")
               else "the EMA restarts from these weights at the first step (ema_keep_loaded: true keeps it)")
        return (f"{setting}: {' and '.join(names)} ({weights}) from {path}, a '{meta['kind']}' checkpoint of size "
                f"{meta.get('size')!r} at step {ckpt.get('global_step')}; {ema}; "
                + (f"network settings changed: {'; '.join(changes)}; " if changes else "")
                + "optimiser, LR schedule, step and curriculum start anew (--ckpt_path resumes a run instead)")

    def _record_schedule_length(self) -> None:
        """Add ``[global_step, length]`` to the checkpoints' ``lr_schedule_history`` where this fit's LR schedule
        length is not the last one recorded: a fresh fit records ``[[0, length]]``, a resume at the same length (a
        preemption, a requeue) nothing, one under another ``max_steps`` the step from which the new length holds.
        A history that does not start at step 0 was resumed from a checkpoint written before it was kept."""
        if not self._schedule_history or self._schedule_history[-1][1] != self._schedule_steps:
            self._schedule_history.append([int(self.trainer.global_step), self._schedule_steps])

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


def _folder_outside(trainer: Any) -> str | None:
    """The fit's checkpoint folder (its checkpoint callback's) where the checkpoint it resumes (``ckpt_path``) is not
    in it: another run's file; None where it is, or where either is unknown (no trainer, no checkpoint callback, a
    remote file)."""
    from mardini.lit.checkpoint_io import local_path

    path = getattr(trainer, "ckpt_path", None)
    folder = getattr(getattr(trainer, "checkpoint_callback", None), "dirpath", None)
    file, folder = (local_path(str(path)) if path else None), (local_path(str(folder)) if folder else None)
    if file is None or folder is None or Path(file).resolve().parent == Path(folder).resolve():
        return None
    return str(folder)


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
