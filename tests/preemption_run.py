"""Child script of tests/test_preemption.py: one SLURM task of a tiny fit (the test sets the SLURM variables as srun
would), which sends itself the requeue signal (SIGUSR1), or SIGTERM (scenario ``term``), on one rank at one step.

    python preemption_run.py DATA_ROOT OUT_DIR WORLD SIGNAL_RANK deferred|lightning \
        [step|accumulate|validation|term|validation_in_window|term_direct]
"""

import os
import signal
import subprocess
import sys

import lightning as L
import torch

from mardini.data.datamodule import VideoDataModule
from mardini.lit import GenerationModule
from mardini.lit.preemption import PreemptionSave
from user_extensions import RandomClips  # tests/, the script's folder

SIGNAL_AT = 2  # the optimiser step during which the signal arrives


class SignalOneRank(L.Callback):
    """Sends the signal to this process on one rank: at the start of step SIGNAL_AT (``step``; SIGTERM there for
    ``term``), at its first micro-batch of an accumulation window of 2 (``accumulate``), or in the validation after
    step 2 (``validation``); SIGTERM at the first micro-batch of step 0, in windows of 3 micro-batches with a
    validation every 2 batches (``validation_in_window``: the first validation falls inside the window); SIGTERM at
    the start of step SIGNAL_AT to this process's group, its loader workers too, as SLURM and ``timeout`` send it
    (``term_direct``: loaders of 2 workers passed to ``Trainer.fit`` directly)."""

    def __init__(self, rank: int, scenario: str) -> None:
        self.rank, self.scenario, self.sent = rank, scenario, False

    def _send(self, trainer) -> None:
        if trainer.global_rank == self.rank and not self.sent:
            self.sent = True
            if self.scenario == "term_direct":
                # from another process, as SLURM and timeout do (a worker that SIGTERM from its parent reaches
                # exits cleanly: torch's worker handler); main() made this process its group's leader
                subprocess.run(["kill", "-TERM", "--", f"-{os.getpgrp()}"])
            else:
                term = self.scenario in ("term", "validation_in_window")
                os.kill(os.getpid(), signal.SIGTERM if term else signal.SIGUSR1)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self.scenario in ("step", "accumulate", "term", "term_direct") and trainer.global_step == SIGNAL_AT:
            self._send(trainer)
        if self.scenario == "validation_in_window":
            self._send(trainer)

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        if self.scenario == "validation" and not trainer.sanity_checking:
            self._send(trainer)


def main(root: str, out: str, world: str, signal_rank: str, mode: str, scenario: str = "step") -> None:
    torch.set_num_threads(1)
    world = int(world)
    in_window = scenario == "validation_in_window"
    validates = scenario in ("validation", "validation_in_window")
    dm = VideoDataModule(train_shards=f"{root}/train", val_shards=f"{root}/val" if validates else None,
                         frames=4, fps=8, resolution=16, batch_size=4, num_workers=0, shuffle_buffer=4,
                         epoch_size=24 if in_window else 8, val_clips=4)
    model = GenerationModule(size="tiny", generator={"depth": 1}, planner_resolution=8, lr=1e-3)
    callbacks = [SignalOneRank(int(signal_rank), scenario)] + ([PreemptionSave()] if mode == "deferred" else [])
    trainer = L.Trainer(accelerator="cpu", devices=world, strategy="ddp" if world > 1 else "auto", max_steps=5,
                        accumulate_grad_batches={"accumulate": 2, "validation_in_window": 3}.get(scenario, 1),
                        val_check_interval=2 if validates else None, num_sanity_val_steps=0,
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=callbacks, default_root_dir=out)
    if scenario == "term_direct":
        os.setpgrp()  # a group of its own (and of its loader workers) that the signal can go to, not the test's
        trainer.fit(model, train_dataloaders=_plain_loader(8), val_dataloaders=_plain_loader(4))
    else:
        trainer.fit(model, datamodule=dm)
    print(f"FINISHED rank={trainer.global_rank} global_step={trainer.global_step}")


def _plain_loader(clips: int) -> torch.utils.data.DataLoader:
    """A user's loader of 2 workers (no ``worker_init_fn``) over ``clips`` random 4-frame 16-px clips, batches of 4."""
    return torch.utils.data.DataLoader(RandomClips(clips, 4, 16), batch_size=4, num_workers=2)


if __name__ == "__main__":
    main(*sys.argv[1:])
