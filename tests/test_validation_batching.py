"""val/loss is a per-clip quantity: each validation clip draws its crop, mask, t and noise from its own generator
(seeded by its key), so the same clips batched differently give the same val/loss (mardini.lit.clip_draws)."""

from __future__ import annotations

import warnings

import pytest
import torch

from mardini.lit import MarDiniModule
from mardini.lit.clip_draws import ClipGenerators, draw_rows


def _clips(n: int = 4) -> dict:
    g = torch.Generator().manual_seed(5)
    return {"video": torch.rand(n, 6, 3, 32, 32, generator=g) * 2 - 1,  # (N, T, 3, H, W): 6 frames, cropped to 5
            "key": [f"val-{i:07d}" for i in range(n)]}


def _batches(clips: dict, size: int) -> list[dict]:
    n = clips["video"].shape[0]
    return [{"video": clips["video"][i : i + size], "key": clips["key"][i : i + size]} for i in range(0, n, size)]


def _val_loss(module: MarDiniModule, batches: list[dict], monkeypatch) -> dict[str, float]:
    """What one validation epoch over ``batches`` logs."""
    logged: dict[str, float] = {}
    monkeypatch.setattr(module, "log", lambda name, value, **kw: logged.__setitem__(name, float(value)))
    module.on_validation_epoch_start()
    for i, batch in enumerate(batches):
        module.validation_step(dict(batch), i)
    module.on_validation_epoch_end()
    return logged


def test_val_loss_does_not_depend_on_the_validation_batch_size(monkeypatch):
    """The same 4 clips in batches of 2, of 4 and of 1 + 3 (another worker count's grouping) give the same val/loss
    and per-template losses. Before, each batch drew its clips' crop, mask, t and noise from one generator seeded by
    the batch index, so batches of 2 and 4 gave different values."""
    torch.manual_seed(0)
    module = MarDiniModule(size="tiny", frames=5, planner_resolution=16,
                           templates={"random": 1.0, "interpolation": 1.0})
    clips = _clips()
    by_two = _val_loss(module, _batches(clips, 2), monkeypatch)
    by_four = _val_loss(module, _batches(clips, 4), monkeypatch)
    uneven = _val_loss(module, [_batches(clips, 1)[0], _batches({k: v[1:] for k, v in clips.items()}, 3)[0]],
                       monkeypatch)
    assert {k for k in by_two if k.startswith("val/")} >= {"val/loss", "val/diffusion_loss"}
    assert by_four == pytest.approx(by_two, rel=1e-5) and uneven == pytest.approx(by_two, rel=1e-5)
    renamed = dict(clips, key=[f"other-{i}" for i in range(4)])  # other clips' identities: other draws
    assert _val_loss(module, _batches(renamed, 2), monkeypatch)["val/loss"] != pytest.approx(by_two["val/loss"])


def test_clip_generators_draw_each_clip_alone_and_one_generator_draws_as_before():
    """draw_rows with one generator is the plain draw (training's draws unchanged); with ClipGenerators, row i is
    what clip i's generator draws alone, wherever the clip sits in the batch."""
    shape = (3, 2, 4)
    assert torch.equal(draw_rows(lambda n, g: torch.randn((n, *shape[1:]), generator=g), 3,
                                 torch.Generator().manual_seed(1)),
                       torch.randn(shape, generator=torch.Generator().manual_seed(1)))
    batch = {"key": ["a", "b", "c"]}
    together = draw_rows(lambda n, g: torch.randn((n, 4), generator=g), 3, ClipGenerators.for_batch(0, batch, 3, 0))
    alone = draw_rows(lambda n, g: torch.randn((n, 4), generator=g), 1,
                      ClipGenerators.for_batch(0, {"key": ["c"]}, 1, 7))
    assert torch.equal(together[2:], alone)
    with pytest.raises(ValueError, match="one per clip"):
        draw_rows(lambda n, g: torch.rand(n, generator=g), 2, ClipGenerators.for_batch(0, batch, 3, 0))


class _KeylessClips(torch.utils.data.Dataset):
    """The clips of :func:`_clips` without their keys (a datamodule of one's own)."""

    def __init__(self, n: int = 4) -> None:
        self.video = _clips(n)["video"]

    def __len__(self) -> int:
        return len(self.video)

    def __getitem__(self, i: int) -> dict:
        return {"video": self.video[i]}


def _validate(module: MarDiniModule, loader) -> float:
    import lightning as L

    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    return trainer.validate(module, loader, verbose=False)[0]["val/loss"]


def test_clips_without_keys_draw_by_their_dataset_index_on_any_number_of_ranks():
    """Key-less clips are seeded by their index in the dataset, as the validation loader's sampler reads them: the 4
    clips in batches of 2 or 3, or split over 2 ranks by the DistributedSampler Lightning gives each rank under DDP
    (each rank faked here by its sampler), give one val/loss. Before, each rank numbered its clips from 0 (rank 1
    drew rank 0's crops, masks, t and noise) and a last, smaller batch restarted at batch index x its own size."""
    from torch.utils.data import DataLoader, DistributedSampler

    torch.manual_seed(0)
    module = MarDiniModule(size="tiny", frames=5, planner_resolution=16,
                           templates={"random": 1.0, "interpolation": 1.0})
    clips = _KeylessClips()
    by_two = _validate(module, DataLoader(clips, batch_size=2))
    assert _validate(module, DataLoader(clips, batch_size=3)) == pytest.approx(by_two, rel=1e-5)
    ranks = [_validate(module, DataLoader(clips, batch_size=1, sampler=DistributedSampler(
        clips, num_replicas=2, rank=rank, shuffle=False))) for rank in (0, 1)]
    assert sum(ranks) / 2 == pytest.approx(by_two, rel=1e-5)  # 2 clips each: the mean of the ranks' means


def test_clips_without_keys_from_an_unreadable_order_warn_once_under_ddp(monkeypatch):
    """An iterable dataset's key-less clips are numbered by their position on each rank, which under DDP draws
    alike on every rank: the module says so once, naming the fix; one process does not warn."""
    from torch.utils.data import DataLoader, IterableDataset

    class Stream(IterableDataset):
        def __iter__(self):
            return iter(_KeylessClips())

    module = MarDiniModule(size="tiny", frames=5, planner_resolution=16)
    with warnings.catch_warnings(record=True) as alone:
        warnings.simplefilter("always")
        _validate(module, DataLoader(Stream(), batch_size=2))
    assert not [w for w in alone if "without a 'key'" in str(w.message)]  # one process: no warning
    monkeypatch.setattr(MarDiniModule, "_world_size", lambda self: 2)
    with pytest.warns(UserWarning, match=r"without a 'key' on 2 ranks.*collate a 'key' per clip") as caught:
        _validate(module, DataLoader(Stream(), batch_size=2))
        _validate(module, DataLoader(Stream(), batch_size=2))
    assert len([w for w in caught if "without a 'key'" in str(w.message)]) == 1
