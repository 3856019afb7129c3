"""Preemption signals save a resumable checkpoint at a step that every rank agrees on.

Two signals end a fit early. SLURM's requeue signal (``--signal=SIGUSR1@T``, T seconds before the time limit) asks
for a checkpoint and a requeue; SIGTERM (what SLURM sends on preemption, ``scancel`` and at the time limit, and what
Kubernetes, Docker and ``timeout`` send) asks the process to end. Lightning's own handlers fit neither: its SIGUSR1
handler saves ``hpc_ckpt_N.ckpt`` inside the signal handler, so each rank saves wherever the signal found it. The
save is collective (Lightning's barrier; the data module gathers every rank's stream position), so a rank that saves
between two steps while another is inside a step's gradient all-reduce pairs the wrong collectives: a hang, or a
checkpoint of mixed steps. Its SIGTERM handler saves nothing and ends the fit with exit status 0, as if it had
finished. Signals reach the ranks at different moments; one rank can also get one alone (``scancel --signal USR1``
of one task, ``kill`` of one process).

:class:`PreemptionSave` takes both signals over for the training: the signal handlers only record the signal, and at
the end of every optimiser step (the last batch of a gradient-accumulation window) and of every validation the ranks
reduce the records (one small all-reduce per step with more than one process; its host read adds no stall beside
the one Lightning's own per-step SIGTERM broadcast already makes, ``_TrainingEpochLoop._broadcast_sigterm_tensor``).
A validation inside a window (Lightning counts ``val_check_interval`` in batches, not optimiser steps) leaves the
records to the window's end: a checkpoint holds no gradient, so a save there would lose the window's micro-batches.
When any rank got a signal, all of them act there together:

- the requeue signal (only under SLURM with ``auto_requeue``, Lightning's default there): every rank saves Lightning's
  preemption checkpoint ``hpc_ckpt_N.ckpt`` into the stage's checkpoint folder (``dirpath``; Lightning's handler
  saved it into ``default_root_dir``, which a user may point elsewhere) and rank 0 requeues the job
  (``scontrol requeue``, as Lightning's handler does), which resumes from it (``mardini.cli``); training goes on
  until SLURM ends it;
- SIGTERM: every rank saves ``hpc_ckpt_N.ckpt`` the same way and the fit ends with :class:`SIGTERMException` of exit
  status 143 (128 + SIGTERM, what a shell reports for a process SIGTERM ended), so a job chain that judges a stage
  by its exit status does not take a preempted stage for a finished one. Rerunning the command resumes.

SLURM's warning time (``--signal=SIGUSR1@T``) and the time between SIGTERM and SIGKILL (``KillWait``, Kubernetes'
``terminationGracePeriodSeconds``) must cover a training step plus, where the signal can come during one, a
validation. Loader workers that get the SIGTERM too (SLURM, ``timeout`` and a container stop signal the whole process
group) leave the first one to the main process, which shuts them down after the save: VideoDataModule's by
themselves, those of any other datamodule's (or module's) ``train_dataloader`` / ``val_dataloader`` and those passed
to ``Trainer.fit`` directly (``train_dataloaders=``, ``val_dataloaders=``) through :class:`PreemptionSave`
(``mardini.data.worker_signals.protect_loader_workers``).
"""

from __future__ import annotations

import functools
import os
import signal
import subprocess
import threading
from collections.abc import Callable
from typing import Any

import lightning as L
import torch
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.exceptions import SIGTERMException
from lightning.pytorch.utilities.model_helpers import is_overridden
from torch.distributed import ReduceOp

from mardini.data.worker_signals import dataloaders_in, protect_loader_workers

TERMINATED = 128 + signal.SIGTERM  # 143: the exit status of a fit SIGTERM ended (after its checkpoint)


class PreemptionSave(L.Callback):
    """Save a resumable checkpoint at the end of the first optimiser step or validation after any rank got SLURM's
    requeue signal (then requeue the job, under SLURM with ``auto_requeue``) or SIGTERM (then end the fit with exit
    status 143). train.py adds it.

    ``dirpath``: the folder of the preemption checkpoints; None: the Trainer's ``default_root_dir`` (Lightning's
    choice). train.py gives the stage's checkpoint folder, where ``--ckpt_path last`` looks.
    """

    def __init__(self, dirpath: str | None = None) -> None:
        self.dirpath = dirpath
        self._holds_requeue = False  # while this callback holds SLURM's requeue signal
        self._received: int | None = None
        self._holds_sigterm = False
        self._terminate = False  # SIGTERM received
        self._wrapped: list[tuple[Any, str, Any]] = []  # (owner, hook, its instance attribute before or _NONE)
        self._protected: list[tuple[Any, Any]] = []  # (a loader passed to fit, its worker_init_fn before)

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        """Make the workers of every loader of the fit leave the first SIGTERM to the main process
        (:func:`~mardini.data.worker_signals.protect_loader_workers`), before Lightning asks for any: those the
        ``train_dataloader`` / ``val_dataloader`` hooks of the datamodule and the module return (the hooks wrapped
        for the fit: a datamodule of one's own gets what VideoDataModule does itself) and those passed to
        ``Trainer.fit`` directly (their ``worker_init_fn`` given back at the fit's end)."""
        if stage != "fit":
            return
        for owner in (trainer.datamodule, pl_module):
            for name in LOADER_HOOKS:
                if owner is None or not is_overridden(name, owner) or getattr(getattr(owner, name), "_protects", False):
                    continue
                self._wrapped.append((owner, name, vars(owner).get(name, _NONE)))
                setattr(owner, name, _protected_hook(getattr(owner, name), trainer))
        for loaders in passed_loaders(trainer):
            self._protected += [(loader, loader.worker_init_fn) for loader in dataloaders_in(loaders)]
            protect_loader_workers(loaders, trainer.global_rank)

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._unwrap()

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self._unwrap()  # Lightning calls no teardown then

    def _unwrap(self) -> None:
        """The hooks :meth:`setup` wrapped and the loaders passed to the fit, back as they were."""
        for owner, name, before in reversed(self._wrapped):
            if before is _NONE:
                delattr(owner, name)
            else:
                setattr(owner, name, before)
        for loader, before in reversed(self._protected):  # a loader passed twice: its own last
            loader.worker_init_fn = before
        self._wrapped, self._protected = [], []

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # only the main thread sets signal handlers (Lightning sets none either)
        self._terminate = trainer.received_sigterm  # Lightning's handler got it before the training started
        signal.signal(signal.SIGTERM, self._record_sigterm)  # Lightning restores the original at teardown
        self._holds_sigterm = True
        env = trainer._accelerator_connector.cluster_environment  # the one Lightning registered its handler for
        if not (isinstance(env, SLURMEnvironment) and env.auto_requeue and env.requeue_signal is not None):
            return
        handler = getattr(trainer._signal_connector, "_slurm_sigusr_handler_fn", None)
        if handler is None:
            raise RuntimeError("PreemptionSave: this Lightning version has no _SignalConnector._slurm_sigusr_handler_fn; "
                               "install requirements.txt's lightning, or remove the callback (mardini/cli.py)")
        registered = getattr(signal.getsignal(env.requeue_signal), "signal_handlers", ())
        if handler not in registered:
            return  # Lightning left the signal to a handler installed before the fit: leave it too
        self._holds_requeue, self._received = True, None
        signal.signal(env.requeue_signal, self._record)  # replaces Lightning's; it restores the original at teardown

    def _record(self, signum: int, frame: Any) -> None:
        self._received = signum  # nothing collective in a signal handler

    def _record_sigterm(self, signum: int, frame: Any) -> None:
        self._terminate = True

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if inside_accumulation_window(trainer):
            return  # a save here would lose the window's accumulated gradients: act at the window's end
        self._act_if_signalled(trainer)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # a validation (evaluation callbacks sampling many clips) can outlast SLURM's warning time: act at its end too,
        # unless it ran inside a gradient-accumulation window (Lightning counts val_check_interval in batches): then
        # at the window's end, as above
        if not trainer.sanity_checking and not inside_accumulation_window(trainer):
            self._act_if_signalled(trainer)

    def _act_if_signalled(self, trainer: L.Trainer) -> None:
        """Where every rank calls it: when any rank got a signal, every rank saves, then rank 0 requeues (the
        requeue signal) or every rank ends the fit (SIGTERM)."""
        if not (self._holds_requeue or self._holds_sigterm):
            return
        flags = [self._received is not None, self._terminate]  # [requeue, terminate]
        if trainer.world_size > 1:  # any rank's (a single process skips the device sync)
            local = torch.tensor(flags, dtype=torch.int32, device=trainer.strategy.root_device)  # (2,)
            summed = trainer.strategy.reduce(local, reduce_op=ReduceOp.SUM)  # (2,)
            flags = [bool(n) for n in summed.tolist()]
        requeue, terminate = flags
        if not (requeue or terminate):
            return
        self._received, self._terminate = None, False
        if requeue:
            for logger in trainer.loggers:  # as Lightning's handler: the metrics on disk before SLURM ends the job
                logger.finalize("finished")
        path = self._save_path(trainer)
        trainer.save_checkpoint(path, weights_only=False)  # every rank (collective)
        if requeue and trainer.is_global_zero:
            requeue_slurm_job()
        if terminate:
            rank_zero_info(f"SIGTERM: saved {path} at step {trainer.global_step}; ending the fit with exit status "
                           f"{TERMINATED} (the same command resumes it)")
            raise SIGTERMException(TERMINATED)

    def _save_path(self, trainer: L.Trainer) -> str:
        """Lightning's next ``hpc_ckpt_N.ckpt`` in ``dirpath`` (or ``default_root_dir``), rank 0's on every rank."""
        folder = self.dirpath if self.dirpath is not None else trainer.default_root_dir
        return trainer.strategy.broadcast(trainer._checkpoint_connector.hpc_save_path(folder))

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._holds_requeue = self._holds_sigterm = False


def inside_accumulation_window(trainer: L.Trainer) -> bool:
    """Whether the training batch last run leaves its gradient-accumulation window open (no optimiser step after it):
    Lightning steps after every ``accumulate_grad_batches``-th batch of an epoch and after its last. The same on every
    rank (they run the same batches)."""
    progress = trainer.fit_loop.epoch_loop.batch_progress
    ran = progress.current.ready  # batches of this epoch run so far
    last = progress.is_last_batch or ran == trainer.num_training_batches
    return bool(ran % trainer.accumulate_grad_batches) and not last


LOADER_HOOKS = ("train_dataloader", "val_dataloader")  # the loaders of a fit
_NONE = object()  # no instance attribute


def passed_loaders(trainer: L.Trainer) -> list[Any]:
    """The training and validation loaders (or collections of them) passed to ``Trainer.fit`` directly, where
    Lightning keeps them until it asks for them (its loops' ``_data_source``; a datamodule or the module there is
    asked through the hooks :meth:`PreemptionSave.setup` wraps). A Lightning without that place gets a warning
    naming what to do instead, and an empty list."""
    fit_loop = trainer.fit_loop
    sources = [getattr(fit_loop, "_data_source", None), getattr(fit_loop.epoch_loop.val_loop, "_data_source", None)]
    if any(source is None or not hasattr(source, "is_module") for source in sources):
        rank_zero_warn("PreemptionSave: this Lightning version keeps no _data_source in its fit loops, so the workers "
                       "of loaders passed to Trainer.fit directly die at the first SIGTERM; give them "
                       "worker_init_fn=mardini.data.worker_signals.leave_first_sigterm_to_main, or pass a datamodule")
        return []
    return [source.instance for source in sources if source.instance is not None and not source.is_module()]


def _protected_hook(hook: Callable[[], Any], trainer: L.Trainer) -> Callable[[], Any]:
    """``hook`` returning its loaders through :func:`~mardini.data.worker_signals.protect_loader_workers`; Lightning
    still sees the hook as defined or not by the original (``functools.wraps``: ``is_overridden`` unwraps it)."""

    @functools.wraps(hook)
    def protected(*args: Any, **kwargs: Any) -> Any:
        return protect_loader_workers(hook(*args, **kwargs), trainer.global_rank)

    protected._protects = True  # another PreemptionSave of the fit leaves it as it is
    return protected


def requeue_slurm_job() -> None:
    """``scontrol requeue`` of this SLURM job (an array job's task as ``JOBID_TASKID``), as Lightning's handler does."""
    array = os.environ.get("SLURM_ARRAY_JOB_ID")
    job = f"{array}_{os.environ['SLURM_ARRAY_TASK_ID']}" if array else os.environ["SLURM_JOB_ID"]
    try:
        result = subprocess.call(["scontrol", "requeue", job])
    except FileNotFoundError:
        result = None
    if result == 0:
        rank_zero_info(f"Requeued SLURM job {job}")
    else:
        why = "scontrol is not on the PATH" if result is None else f"scontrol exited with status {result}"
        rank_zero_warn(f"Requeueing SLURM job {job} failed ({why}); submit it again: it resumes from the checkpoint")
