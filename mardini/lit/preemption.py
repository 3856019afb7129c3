"""SLURM's requeue signal saves the preemption checkpoint at a step that every rank agrees on.

Lightning's own SIGUSR1 handler saves ``hpc_ckpt_N.ckpt`` inside the signal handler, so each rank saves wherever
the signal found it. The save is collective (Lightning's barrier; the data module gathers every rank's stream
position), so a rank that saves between two steps while another is inside a step's gradient all-reduce pairs the
wrong collectives: a hang, or a checkpoint of mixed steps. Signals reach the ranks at different moments; one rank
can also get it alone (``scancel --signal USR1`` of one task).

:class:`PreemptionSave` keeps Lightning's handler but defers it: the signal handler only records the signal, and at
the end of every optimiser step (the last batch of a gradient-accumulation window) and of every validation the ranks
reduce the record (one small all-reduce, only under SLURM auto-requeue). When any rank got the signal, all of them
run Lightning's handler there together: it saves the checkpoint into the stage's folder and rank 0 requeues the job
(``scontrol requeue``), which resumes from it (``mardini.cli``). SLURM's warning time (``--signal=SIGUSR1@T``) must
cover a training step plus, where the signal can come during one, a validation.
"""

from __future__ import annotations

import signal
from typing import Any

import lightning as L
from lightning.fabric.plugins.environments import SLURMEnvironment


class PreemptionSave(L.Callback):
    """Run Lightning's SLURM requeue handler at the end of the first optimiser step or validation after any rank got
    the signal.

    A no-op unless the run is under SLURM with ``auto_requeue`` (Lightning's default there); train.py adds it.
    """

    def __init__(self) -> None:
        self._handler: Any = None  # Lightning's save-and-requeue function, while this callback holds the signal
        self._signal: signal.Signals | None = None
        self._received: int | None = None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
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
        self._handler, self._signal, self._received = handler, env.requeue_signal, None
        signal.signal(env.requeue_signal, self._record)  # replaces Lightning's; it restores the original at teardown

    def _record(self, signum: int, frame: Any) -> None:
        self._received = signum  # nothing collective in a signal handler

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if (batch_idx + 1) % trainer.accumulate_grad_batches:
            return  # inside a gradient-accumulation window: a save here would lose its accumulated gradients
        self._act_if_signalled(trainer)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # a validation (evaluation callbacks sampling many clips) can outlast SLURM's warning time: act at its end too
        if not trainer.sanity_checking:
            self._act_if_signalled(trainer)

    def _act_if_signalled(self, trainer: L.Trainer) -> None:
        """Where every rank calls it: when any rank got the signal, every rank saves and rank 0 requeues."""
        if self._handler is None:
            return
        if trainer.strategy.reduce_boolean_decision(self._received is not None, all=False):  # any rank
            self._received = None
            self._handler(self._signal, None)  # every rank: save (collective), then rank 0 requeues

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._handler = None
