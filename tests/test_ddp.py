"""Two CPU processes (gloo, ddp_spawn): ranks read disjoint clips and end with identical weights and EMA."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import torch

from mardini.data.datamodule import VideoDataModule
from mardini.data.testing import tiny_synthetic
from mardini.lit import MarDiniModule


class RecordRank(L.Callback):
    """Writes each rank's clip keys and final weights to ``out`` (ddp_spawn workers return nothing else)."""

    def __init__(self, out: Path) -> None:
        self.out = str(out)
        self.keys: list[str] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.keys += list(batch["key"])

    def on_train_end(self, trainer, pl_module) -> None:
        rank = trainer.global_rank
        Path(self.out, f"keys{rank}.json").write_text(json.dumps(self.keys))
        state = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}
        torch.save(state, Path(self.out, f"weights{rank}.pt"))


def test_two_process_ddp_disjoint_data_identical_weights(tmp_path):
    # ddp_spawn pickles the module to the workers; with the default fd sharing this machine fails on the
    # EMA copy ("unable to resize file"), shared files work. Plain `ddp` (the CLI's choice) is not affected.
    torch.multiprocessing.set_sharing_strategy("file_system")
    root = tiny_synthetic(tmp_path / "synth", train=24, val=16, frames=18, size=32)  # 4 train shards: 2 per rank
    dm = VideoDataModule(train_shards=str(root / "train"), val_shards=None, frames=9, fps=8, resolution=32,
                         batch_size=4, num_workers=0, epoch_size=8, shuffle_buffer=4)
    model = MarDiniModule(size="tiny", planner_resolution=16, generator={"patch_size": 2}, lr=1e-3, ema_decay=0.5,
                          keep_ratio=(0.3, 0.8))
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp_spawn", max_steps=3, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[RecordRank(tmp_path)])
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    trainer.fit(model, dm)

    keys = [json.loads((tmp_path / f"keys{r}.json").read_text()) for r in range(2)]
    assert len(keys[0]) == len(keys[1]) == 3 * 2  # 3 steps x per-rank batch 2
    assert not set(keys[0]) & set(keys[1]), "ranks trained on the same clips"
    w0, w1 = (torch.load(tmp_path / f"weights{r}.pt", weights_only=True) for r in range(2))
    assert w0.keys() == w1.keys()
    for k in w0:
        assert torch.equal(w0[k], w1[k]), f"{k} differs between ranks"
    # the ranks really trained
    assert any(not torch.equal(initial[k], w0[k]) for k in w0 if k.startswith("networks."))
