"""Child script of tests/test_preemption.py: one SLURM task of a tiny fit (the test sets the SLURM variables as srun
would), which sends itself the requeue signal (SIGUSR1) on one rank at one step.

    python preemption_run.py DATA_ROOT OUT_DIR WORLD SIGNAL_RANK deferred|lightning
"""

import os
import signal
import sys

import lightning as L
import torch

from mardini.data.datamodule import VideoDataModule
from mardini.lit import GenerationModule
from mardini.lit.preemption import PreemptionSave

SIGNAL_AT = 2  # the training step whose start the signal arrives at


class SignalOneRank(L.Callback):
    def __init__(self, rank: int) -> None:
        self.rank = rank

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_rank == self.rank and trainer.global_step == SIGNAL_AT:
            os.kill(os.getpid(), signal.SIGUSR1)


def main(root: str, out: str, world: str, signal_rank: str, mode: str) -> None:
    torch.set_num_threads(1)
    world = int(world)
    dm = VideoDataModule(train_shards=f"{root}/train", val_shards=None, frames=4, fps=8, resolution=16, batch_size=4,
                         num_workers=0, shuffle_buffer=4, epoch_size=8)
    model = GenerationModule(size="tiny", generator={"depth": 1}, planner_resolution=8, lr=1e-3)
    callbacks = [SignalOneRank(int(signal_rank))] + ([PreemptionSave()] if mode == "deferred" else [])
    trainer = L.Trainer(accelerator="cpu", devices=world, strategy="ddp" if world > 1 else "auto", max_steps=5,
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=callbacks, default_root_dir=out)
    trainer.fit(model, datamodule=dm)
    print(f"FINISHED rank={trainer.global_rank} global_step={trainer.global_step}")


if __name__ == "__main__":
    main(*sys.argv[1:])
