"""Child script of tests/test_reliability_ddp.py: 2 CPU processes (gloo, ddp_spawn) on tiny data.

    python reliability_ddp_run.py DATA_ROOT OUT_DIR uneven|raise|templates|rank0_skips_val
"""

import sys

import lightning as L
import torch

from mardini.data.datamodule import VideoDataModule
from mardini.lit import GenerationModule


class RaiseOnRank1(L.Callback):
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_rank == 1 and trainer.global_step == 2:
            raise RuntimeError("rank 1 failed on purpose at step 2")


class RankTemplates(GenerationModule):
    """Validation clips whose templates depend on the rank: rank 0 draws 'random' and 'interpolation', rank 1
    'random' only, so rank 0 has a template rank 1 never has (as small validation batches can happen to draw)."""

    def compute_loss(self, batch, generator, train):
        loss = super().compute_loss(batch, generator, train)  # (B,)
        if not train:
            template = torch.zeros_like(self._last_template)
            if self.trainer.global_rank == 0:
                template[1::2] = 1
            self._last_template = template
        return loss


class NothingUsable(torch.utils.data.IterableDataset):
    """A validation stream whose every sample was skipped (as clips too short for the stage are)."""

    def __iter__(self):
        return iter(())


class Rank0SkipsValidation(VideoDataModule):
    def val_dataloader(self):
        if self.trainer.global_rank == 0:
            return torch.utils.data.DataLoader(NothingUsable(), batch_size=None)
        return super().val_dataloader()


def main(root: str, out: str, mode: str) -> None:
    torch.set_num_threads(1)
    torch.multiprocessing.set_sharing_strategy("file_system")  # fd passing fails where /dev/shm is small
    data = Rank0SkipsValidation if mode == "rank0_skips_val" else VideoDataModule
    dm = data(train_shards=f"{root}/train", val_shards=f"{root}/val", frames=4, fps=8, resolution=16,
                         batch_size=4, num_workers=0, shuffle_buffer=4, epoch_size=6, val_clips=None)
    module = RankTemplates if mode == "templates" else GenerationModule
    model = module(size="tiny", generator={"depth": 1}, planner_resolution=8, lr=1e-3)
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp_spawn", max_steps=6, val_check_interval=3,
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[RaiseOnRank1()] if mode == "raise" else [],
                        default_root_dir=out)
    trainer.fit(model, datamodule=dm)
    print(f"FINISHED global_step={trainer.global_step}")
    print("LOGGED", sorted(k for k in trainer.callback_metrics if k.startswith("val/loss_")))
    print("VAL_LOSS", "val/loss" in trainer.callback_metrics)


if __name__ == "__main__":
    main(*sys.argv[1:])
