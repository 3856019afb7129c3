"""Two CPU processes (gloo, ddp_spawn): ranks read disjoint clips and end with identical weights and EMA; a global
batch of 3 on 2 ranks (2 + 1 clips, the loss weighted) trains like one process on the 3 clips, and so does the
``element`` loss reduction (clips of other generated-frame counts on the two ranks), also over a window of 2
accumulated micro-batches; ``nonfinite: skip`` skips a
step whose loss is NaN on one rank on both, changing no weight; a spawned fit leaves no MASTER_PORT to the tests
after it."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader

from mardini.data.batch_split import rank_batch
from mardini.data.datamodule import VideoDataModule
from mardini.data.testing import tiny_synthetic
from mardini.diffusion.loss import masked_mse_per_sample
from mardini.lit import GenerationModule, MarDiniModule, PlanningModule


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


# --------------------------------------------------------------------------------------------------
# A global batch the world size does not divide
# --------------------------------------------------------------------------------------------------
STEPS = 3


class FixedClips(VideoDataModule):
    """The same global batch of clips every step, split over the ranks as VideoDataModule splits it."""

    clips: torch.Tensor  # (B, T, 3, H, W), set after construction

    def setup(self, stage: str | None = None) -> None:
        self.configure_ranks(self.trainer.global_rank, self.trainer.world_size)

    def train_dataloader(self) -> DataLoader:
        start = sum(rank_batch(self.batch_size, r, self.world_size) for r in range(self.rank))
        end = start + self.per_rank_batch_size
        batch = {"video": self.clips[start:end], "key": [f"clip{i}" for i in range(start, end)]}
        return DataLoader([batch] * STEPS, batch_size=None)


class FixedMaskPlanning(PlanningModule):
    """The planner warm-up with one mask for every clip and plain SGD: each clip's loss depends on the clip alone,
    so the final weights show whether the ranks' averaged gradient is the global batch's mean."""

    def compute_loss(self, batch: dict, generator: torch.Generator, train: bool) -> torch.Tensor:
        z_low = self.latents_low(batch)  # (B, T, C, h', w')
        b, t = z_low.shape[:2]
        mask = torch.zeros(b, t, dtype=torch.bool)  # (B, T): the last frames generated
        mask[:, t // 2:] = True
        self._last_template = torch.zeros(b, dtype=torch.long)  # (B,)
        planner = self.networks["planner"]
        recon = planner.project(planner(z_low, mask), size=tuple(z_low.shape[-2:]))  # (B, T, C, h', w')
        return masked_mse_per_sample(recon.float(), z_low, mask)  # (B,)

    def configure_optimizers(self):
        return torch.optim.SGD(self.networks.parameters(), lr=0.5)


def _fit_fixed(devices: int, out) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    model = FixedMaskPlanning(size="tiny", planner_resolution=16, lr=1.0)
    dm = FixedClips(batch_size=3, val_shards=None, num_workers=0)
    dm.clips = torch.rand(3, 5, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1  # (B, T, 3, H, W)
    trainer = L.Trainer(accelerator="cpu", devices=devices, strategy="ddp_spawn" if devices > 1 else "auto",
                        max_steps=STEPS, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, use_distributed_sampler=False, limit_val_batches=0,
                        callbacks=[RecordRank(out)])
    trainer.fit(model, dm)
    return torch.load(out / "weights0.pt", weights_only=True)


def test_a_global_batch_of_3_on_2_ranks_trains_like_one_process_on_3_clips(tmp_path):
    torch.multiprocessing.set_sharing_strategy("file_system")  # fd passing fails on this machine (see above)
    (tmp_path / "one").mkdir(), (tmp_path / "two").mkdir()
    one = _fit_fixed(1, tmp_path / "one")
    two = _fit_fixed(2, tmp_path / "two")
    assert [len(json.loads((tmp_path / "two" / f"keys{r}.json").read_text())) for r in range(2)] == [2 * STEPS, STEPS]
    w1 = torch.load(tmp_path / "two" / "weights1.pt", weights_only=True)
    nets = [k for k in one if k.startswith("networks.")]
    assert all(torch.equal(two[k], w1[k]) for k in nets), "the ranks' weights differ"
    initial = FixedMaskPlanning(size="tiny", planner_resolution=16, lr=1.0).state_dict()
    moved = max(float((one[k] - initial[k]).abs().max()) for k in nets if initial[k].is_floating_point())
    assert moved > 1e-2  # it trained
    for k in nets:
        torch.testing.assert_close(two[k], one[k], rtol=1e-4, atol=1e-5, msg=lambda m, k=k: f"{k}: {m}")


# --------------------------------------------------------------------------------------------------
# loss_reduction: element over 2 ranks
# --------------------------------------------------------------------------------------------------
GENERATED = (1, 4, 2)  # generated frames of clips 0-2 (of 5): rank 0 trains clips 0-1 (5 frames), rank 1 clip 2 (2)
# with 2 accumulated micro-batches of 3 clips, clips 3-5 make the second: 5 + 3 frames on rank 0, 2 + 1 on rank 1
GENERATED_WINDOW = GENERATED + (3, 5, 1)


class GeneratedByClip(FixedMaskPlanning):
    """:class:`FixedMaskPlanning` where clip ``i`` generates its last ``generated[i]`` frames."""

    generated = GENERATED

    def compute_loss(self, batch: dict, generator: torch.Generator, train: bool) -> torch.Tensor:
        z_low = self.latents_low(batch)  # (B, T, C, h', w')
        b, t = z_low.shape[:2]
        clips = torch.tensor([int(key.removeprefix("clip")) for key in batch["key"]])  # (B,)
        mask = torch.arange(t) >= t - torch.tensor(self.generated)[clips][:, None]  # (B, T)
        self._last_template = torch.zeros(b, dtype=torch.long)  # (B,)
        self._last_generated = mask.sum(1)  # (B,)
        planner = self.networks["planner"]
        recon = planner.project(planner(z_low, mask), size=tuple(z_low.shape[-2:]))  # (B, T, C, h', w')
        return masked_mse_per_sample(recon.float(), z_low, mask)  # (B,)


class RecordGradients(L.Callback):
    """Writes each rank's gradients of the last step (after DDP averaged them, and after the module's
    ``on_before_optimizer_step``; plain SGD leaves them as they were) to ``out/grads{rank}.pt``."""

    def __init__(self, out: Path) -> None:
        self.out = str(out)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        grads = {n: p.grad.detach().clone() for n, p in pl_module.networks.named_parameters() if p.grad is not None}
        torch.save(grads, Path(self.out, f"grads{trainer.global_rank}.pt"))


def _one_process_gradients(loss_reduction: str, clips: torch.Tensor,
                           generated: tuple[int, ...] = GENERATED) -> dict[str, torch.Tensor]:
    """The gradients of one training step on the whole global batch, in this process."""
    torch.manual_seed(0)
    model = GeneratedByClip(size="tiny", planner_resolution=16, lr=1.0, loss_reduction=loss_reduction)
    model.generated = generated
    model.log = lambda *args, **kwargs: None  # no trainer to log to
    batch = {"video": clips, "key": [f"clip{i}" for i in range(len(clips))]}
    model.training_step(batch, 0).backward()
    return {n: p.grad for n, p in model.networks.named_parameters() if p.grad is not None}


def _element_gradients_on_2_ranks(tmp_path, model_class, datamodule_class, clips: torch.Tensor,
                                  **trainer_kwargs) -> list[dict[str, torch.Tensor]]:
    """Each rank's gradient of one ``element`` step of ``model_class`` on ``clips`` (global batches of 3) under
    2-process ``ddp_spawn`` (``RecordGradients``)."""
    torch.manual_seed(0)
    model = model_class(size="tiny", planner_resolution=16, lr=1.0, loss_reduction="element")
    dm = datamodule_class(batch_size=3, val_shards=None, num_workers=0)
    dm.clips = clips
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp_spawn", max_steps=1, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        use_distributed_sampler=False, limit_val_batches=0, callbacks=[RecordGradients(tmp_path)],
                        **trainer_kwargs)
    trainer.fit(model, dm)
    return [torch.load(tmp_path / f"grads{r}.pt", weights_only=True) for r in range(2)]


def test_element_reduction_on_2_ranks_gives_the_one_process_gradient_of_the_global_batch(tmp_path):
    """3 clips of 1, 4 and 2 generated frames on 2 ranks (2 + 1 clips): the gradient DDP averages is that of the
    mean over the 7 generated frames' elements of one process, not of the per-clip mean."""
    torch.multiprocessing.set_sharing_strategy("file_system")  # fd passing fails on this machine (see above)
    clips = torch.rand(3, 5, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1  # (B, T, 3, H, W)
    two = _element_gradients_on_2_ranks(tmp_path, GeneratedByClip, FixedClips, clips)
    element, clip = _one_process_gradients("element", clips), _one_process_gradients("clip", clips)
    assert two[0].keys() == element.keys() and len(element) > 0
    for k in element:
        assert torch.equal(two[0][k], two[1][k]), f"{k} differs between the ranks"
        torch.testing.assert_close(two[0][k], element[k], rtol=1e-4, atol=1e-6, msg=lambda m, k=k: f"{k}: {m}")
    differ = max(float((element[k] - clip[k]).abs().max() / clip[k].abs().max().clamp(min=1e-12)) for k in clip)
    assert differ > 1e-2  # the per-clip mean's gradient is another one: the comparison above can tell them apart


class FixedWindow(FixedClips):
    """Micro-batch ``k`` of the fit is clips ``k * batch_size`` on of ``clips``, split over the ranks as
    VideoDataModule splits a global batch."""

    def train_dataloader(self) -> DataLoader:
        offset = sum(rank_batch(self.batch_size, r, self.world_size) for r in range(self.rank))
        starts = range(offset, len(self.clips), self.batch_size)
        return DataLoader([{"video": self.clips[s : s + self.per_rank_batch_size],
                            "key": [f"clip{i}" for i in range(s, s + self.per_rank_batch_size)]} for s in starts],
                          batch_size=None)


class WindowByClip(GeneratedByClip):
    generated = GENERATED_WINDOW


def test_element_reduction_accumulated_on_2_ranks_gives_the_one_process_gradient_of_the_window(tmp_path):
    """2 micro-batches of 3 clips (2 + 1 a rank) accumulated, 16 generated frames (rank 0: 5 then 8, rank 1: 2 then
    1): the stepped gradient is the mean over the 16 frames' elements of one process on the 6 clips."""
    torch.multiprocessing.set_sharing_strategy("file_system")  # fd passing fails on this machine (see above)
    clips = torch.rand(6, 5, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1  # (B, T, 3, H, W)
    two = _element_gradients_on_2_ranks(tmp_path, WindowByClip, FixedWindow, clips, accumulate_grad_batches=2)
    element = _one_process_gradients("element", clips, GENERATED_WINDOW)
    assert two[0].keys() == element.keys() and len(element) > 0
    for k in element:
        assert torch.equal(two[0][k], two[1][k]), f"{k} differs between the ranks"
        torch.testing.assert_close(two[0][k], element[k], rtol=1e-4, atol=1e-6, msg=lambda m, k=k: f"{k}: {m}")


# --------------------------------------------------------------------------------------------------
# nonfinite: skip on 2 ranks
# --------------------------------------------------------------------------------------------------
BAD_STEP = 3  # the EMA lags the raw weights by then (its first two updates copy them)


class NanOnRank1(L.Callback):
    """Fills rank 1's batch of step ``BAD_STEP`` with NaN; writes each rank's weights (raw and EMA) before and after
    that step and its skip count to ``out``."""

    def __init__(self, out: Path) -> None:
        self.out = str(out)

    def _save(self, trainer, pl_module, name: str) -> None:
        state = {k: v.detach().clone() for k, v in pl_module.state_dict().items() if not k.startswith("autoencoder.")}
        torch.save(state, Path(self.out, f"{name}{trainer.global_rank}.pt"))

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == BAD_STEP:
            self._save(trainer, pl_module, "before")
            if trainer.global_rank == 1:
                batch["video"].fill_(float("nan"))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == BAD_STEP + 1:
            self._save(trainer, pl_module, "after")
            Path(self.out, f"skipped{trainer.global_rank}.json").write_text(json.dumps(pl_module.nonfinite_skipped))


def test_nonfinite_skip_on_2_ranks_skips_the_step_on_both_and_changes_no_weight(tmp_path):
    """A NaN loss on rank 1 only: both ranks skip the step (the finiteness check is reduced over the ranks), no
    weight or EMA moves on either (weight decay would show a step on zero gradients), and the fit goes on. Before,
    Lightning refused the None that training_step returned ("Skipping the training_step by returning None in
    distributed training is not supported")."""
    torch.multiprocessing.set_sharing_strategy("file_system")  # fd passing fails on this machine (see above)
    root = tiny_synthetic(tmp_path / "synth", train=24, val=2, frames=12, size=16)  # 4 train shards: 2 per rank
    dm = VideoDataModule(train_shards=str(root / "train"), val_shards=None, frames=4, fps=8, resolution=16,
                         batch_size=4, num_workers=0, epoch_size=100, shuffle_buffer=4)
    model = GenerationModule(size="tiny", planner_resolution=8, generator={"depth": 1}, lr=1e-3, weight_decay=0.1,
                             ema_decay=0.5, ema_warmup=False, nonfinite="skip")
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp_spawn", max_steps=BAD_STEP + 2, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        limit_val_batches=0, callbacks=[NanOnRank1(tmp_path), RecordRank(tmp_path)])
    trainer.fit(model, dm)

    final = [torch.load(tmp_path / f"weights{rank}.pt", weights_only=True) for rank in range(2)]
    assert all(torch.equal(final[0][k], final[1][k]) for k in final[0]), "the ranks' weights differ"
    for rank in range(2):
        before, after = (torch.load(tmp_path / f"{name}{rank}.pt", weights_only=True) for name in ("before", "after"))
        assert json.loads((tmp_path / f"skipped{rank}.json").read_text()) == 1
        nets = [k for k in before if k.startswith("networks.")]
        assert any(not torch.equal(before[k], before[f"ema.module.{k[len('networks.'):]}"]) for k in nets)  # EMA lags
        for k in before:
            assert torch.equal(before[k], after[k]), f"rank {rank}: {k} changed in the skipped step"
        assert any(not torch.equal(final[rank][k], after[k]) for k in nets)  # the next step trained


def _state_worker(rank: int, rendezvous: str, out: str) -> None:
    """Rank ``r`` has read ``10 + r`` samples (it skipped ``r`` bad ones more); the checkpoint Lightning writes holds
    rank 0's datamodule state, which every rank then loads."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=2)
    try:
        dm = VideoDataModule(train_shards="unused", frames=4, batch_size=2)
        dm.state.in_epoch, dm.state.progress = 0, {0: [10 + rank, 4]}
        saved = dm.state_dict()  # every rank saves, as Trainer.save_checkpoint does
        if rank == 0:
            torch.save(saved, f"{out}/rank0_state.pt")
        dist.barrier()
        fresh = VideoDataModule(train_shards="unused", frames=4, batch_size=2)
        fresh.load_state_dict(torch.load(f"{out}/rank0_state.pt", weights_only=True))
        Path(out, f"resume{rank}.json").write_text(json.dumps(fresh.state.resume["progress"]))
    finally:
        dist.destroy_process_group()


def test_each_rank_resumes_from_its_own_stream_position(tmp_path):
    """Before, every rank resumed from rank 0's count of samples read: a rank that had skipped a different number
    of bad samples resumed a few samples off."""
    torch.multiprocessing.spawn(_state_worker, args=(str(tmp_path / "rendezvous"), str(tmp_path)), nprocs=2, join=True)
    resumed = [json.loads((tmp_path / f"resume{r}.json").read_text()) for r in range(2)]
    assert resumed == [{"0": [10, 4]}, {"0": [11, 4]}]


# --------------------------------------------------------------------------------------------------
# data/skipped over 2 ranks
# --------------------------------------------------------------------------------------------------
class SkippingClips(FixedClips):
    """:class:`FixedClips` for 6 steps, whose rank ``r`` reports ``r + 1`` bad samples skipped before each batch."""

    def train_dataloader(self) -> DataLoader:
        batch = dict(super().train_dataloader().dataset[0], skipped=torch.tensor(self.rank + 1))
        return DataLoader([batch] * 6, batch_size=None)


class SaveAtEnd(L.Callback):
    """``trainer.save_checkpoint(path)`` on every rank (a collective) when training ends."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def on_train_end(self, trainer, pl_module) -> None:
        trainer.save_checkpoint(self.path)


def _logged_skipped(tmp: Path, max_steps: int, log_every: int, ckpt_path: Path | None) -> dict[int, float]:
    """A 2-rank fit of :class:`SkippingClips` (from ``ckpt_path``), saving ``tmp/end.ckpt``: its logged
    ``data/skipped`` by step."""
    import csv

    torch.manual_seed(0)
    dm = SkippingClips(batch_size=2, val_shards=None, num_workers=0)
    dm.clips = torch.rand(2, 5, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1  # (B, T, 3, H, W)
    logs = tmp / f"logs{max_steps}"
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp_spawn", max_steps=max_steps,
                        logger=L.pytorch.loggers.CSVLogger(logs, name="", version=""), log_every_n_steps=log_every,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        use_distributed_sampler=False, limit_val_batches=0, callbacks=[SaveAtEnd(tmp / "end.ckpt")])
    trainer.fit(FixedMaskPlanning(size="tiny", planner_resolution=16, lr=1.0), dm,
                ckpt_path=str(ckpt_path) if ckpt_path else None)
    with open(logs / "metrics.csv") as f:
        return {int(r["step"]): float(r["data/skipped"]) for r in csv.DictReader(f) if r.get("data/skipped")}


def test_data_skipped_is_the_sum_over_the_ranks_and_goes_on_after_a_resume(tmp_path):
    """Rank 0 skips 1 sample per batch, rank 1 2: the logged count is the ranks' sum (before: rank 0's, [1, 2]), the
    checkpoint holds it, and a resume on 2 ranks goes on from it, summing where the loggers write (every 2 steps)."""
    torch.multiprocessing.set_sharing_strategy("file_system")  # fd passing fails on this machine (see above)
    assert _logged_skipped(tmp_path, 2, 1, None) == {0: 3.0, 1: 6.0}
    assert torch.load(tmp_path / "end.ckpt", weights_only=True)["mardini"]["data_skipped"] == 6  # before: 2
    (tmp_path / "end.ckpt").rename(tmp_path / "step2.ckpt")
    assert _logged_skipped(tmp_path, 4, 2, tmp_path / "step2.ckpt") == {3: 12.0}  # before: 4 (rank 0's 2, 3, 4)


def test_a_spawned_fit_leaves_no_master_port_to_the_tests_after_it(seed_variables_kept, monkeypatch):
    """Lightning's ddp_spawn launcher writes the port it picked into this process's MASTER_PORT and leaves it there:
    every later spawned fit of the test session, and each train.py subprocess started with this environment, used
    the first fit's port instead of one the OS picks free when it starts (conftest's restore now removes it)."""
    import os

    from lightning.pytorch.demos.boring_classes import BoringModel

    monkeypatch.setattr(torch.multiprocessing, "_sharing_strategy", "file_system")  # fd passing fails here (above)
    before = os.environ.get("MASTER_PORT")
    with seed_variables_kept():  # what conftest wraps every test in
        trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp_spawn", max_steps=1, limit_val_batches=0,
                            logger=False, enable_checkpointing=False, enable_progress_bar=False,
                            enable_model_summary=False)
        trainer.fit(BoringModel())
        assert "MASTER_PORT" in os.environ  # set by the launcher, in this process
    assert os.environ.get("MASTER_PORT") == before
