"""EMA-only exports: they keep exactly the EMA weights, sample like the original, start a stage from the EMA
(raw and EMA alike), and refuse to resume a fit or to be read as raw weights, with messages that say why."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from mardini.lit import MarDiniModule
from mardini.lit.checkpoints import read_checkpoint
from mardini.lit.ema_export import export_ema_only, main
from mardini.pipeline.loading import load_checkpoint
from mardini.testing import make_checkpoint


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """A joint training checkpoint (raw and EMA weights differ) and its EMA-only export."""
    tmp = tmp_path_factory.mktemp("ema")
    full = make_checkpoint(tmp / "joint.ckpt", "joint", frames=5, size=16)
    return full, tmp / "joint_ema.ckpt", main([str(full), str(tmp / "joint_ema.ckpt")])


def _sub(state: dict, prefix: str) -> dict:
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def _equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_export_keeps_the_ema_weights_and_metadata_only(pair):
    full, ema, summary = pair
    src, out = read_checkpoint(full), read_checkpoint(ema)
    assert _equal(out["state_dict"], {k: v for k, v in src["state_dict"].items() if k.startswith("ema.module.")})
    assert not any(k.startswith("networks.") for k in out["state_dict"])
    assert "optimizer_states" in src and not {"optimizer_states", "lr_schedulers", "loops"} & out.keys()
    assert out["mardini"] == {**src["mardini"], "ema_only": True}
    assert out["hyper_parameters"] == src["hyper_parameters"] and out["callbacks"].keys() == src["callbacks"].keys()
    assert summary["bytes_out"] < summary["bytes_in"] / 2 and summary["step"] == src["global_step"]


def test_export_samples_with_the_same_networks(pair):
    full, ema, _ = pair
    a, b = load_checkpoint(full), load_checkpoint(ema)
    assert _equal(a.generator.state_dict(), b.generator.state_dict())
    assert _equal(a.planner.state_dict(), b.planner.state_dict())
    assert not _equal(load_checkpoint(full, ema=False).generator.state_dict(), b.generator.state_dict())
    with pytest.raises(ValueError,
                       match=r"no 'networks.generator.\*' weights \(an EMA-only export: load it with ema=True"):
        load_checkpoint(ema, ema=False)


def test_a_stage_started_from_an_export_starts_raw_and_ema_from_the_ema(pair):
    full, ema, _ = pair
    src_ema = _sub(read_checkpoint(full)["state_dict"], "ema.module.")
    from_full = MarDiniModule(size="tiny", frames=5, planner_resolution=16, init_from=str(full))
    from_export = MarDiniModule(size="tiny", frames=5, planner_resolution=16, init_from=str(ema))
    assert not _equal(from_full.networks.state_dict(), from_full.ema.module.state_dict())
    assert _equal(from_export.networks.state_dict(), src_ema)
    assert _equal(from_export.ema.module.state_dict(), src_ema)


def test_an_export_cannot_resume_a_fit(pair, tmp_path):
    _, ema, _ = pair
    clips = [{"video": torch.rand(5, 3, 16, 16) * 2 - 1} for _ in range(2)]  # (T, 3, S, S)
    trainer = L.Trainer(max_steps=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                        default_root_dir=tmp_path)
    module = MarDiniModule(size="tiny", frames=5, planner_resolution=16)
    with pytest.raises(ValueError, match=r"EMA-only export.*cannot resume a fit.*init_from"):
        trainer.fit(module, DataLoader(clips, batch_size=2), ckpt_path=str(ema))


def test_export_refuses_its_own_source_and_a_checkpoint_without_ema(pair, tmp_path):
    full, ema, _ = pair
    with pytest.raises(ValueError, match="overwrite its source"):
        export_ema_only(full, full)
    ckpt = read_checkpoint(full)
    ckpt["state_dict"] = {k: v for k, v in ckpt["state_dict"].items() if k.startswith("networks.")}
    torch.save(ckpt, tmp_path / "raw_only.ckpt")
    with pytest.raises(ValueError, match="holds no EMA weights"):
        export_ema_only(tmp_path / "raw_only.ckpt", tmp_path / "out.ckpt")
    with pytest.raises(ValueError, match="not a MarDini checkpoint"):
        torch.save({"state_dict": {}}, tmp_path / "foreign.ckpt")
        export_ema_only(tmp_path / "foreign.ckpt", tmp_path / "out.ckpt")


def test_a_checkpoint_missing_raw_weights_without_the_export_mark_is_refused(pair, tmp_path):
    _, ema, _ = pair
    ckpt = read_checkpoint(ema)
    del ckpt["mardini"]["ema_only"]  # EMA weights only, but not written by the export: damaged, not shared
    torch.save(ckpt, tmp_path / "edited.ckpt")
    with pytest.raises(ValueError, match=r"network '(planner|generator)' but holds no raw weights.*damaged"):
        MarDiniModule(size="tiny", frames=5, planner_resolution=16, init_from=str(tmp_path / "edited.ckpt"))
