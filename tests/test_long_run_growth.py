"""What a fit keeps in memory per step stays bounded however long it runs (a week-long fit takes millions of steps):
one short fit, then the sizes of what its callbacks hold."""

from __future__ import annotations

import json
from pathlib import Path

from lightning.pytorch.callbacks import LearningRateMonitor
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from mardini.cli import main
from mardini.data.testing import tiny_synthetic
from mardini.lit.sample_grids import SampleGrids

REPO = Path(__file__).resolve().parents[1]
STEPS = 6
GRIDS = {"class_path": "mardini.lit.sample_grids.SampleGrids", "init_args": {"every_n_steps": 2, "clips": 1, "steps": 1}}


@pytest.fixture(scope="module")
def fit(tmp_path_factory, seed_variables_kept):
    """``train.py fit --config configs/debug.yaml`` for ``STEPS`` steps, logging every step, sample grids every 2
    steps, on 4-frame 16 px clips (what the callbacks hold does not depend on the clip size; 32 px 9-frame steps took
    three times as long); (its CLI, its folder)."""
    root = tmp_path_factory.mktemp("long_run")
    tiny_synthetic(root / "data" / "shards" / "synthetic", train=8, val=4, frames=18, size=32)
    with seed_variables_kept(), pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        cli = main(["fit", "--config", str(REPO / "configs" / "debug.yaml"), f"--trainer.max_steps={STEPS}",
                    "--trainer.log_every_n_steps=1", "--trainer.enable_progress_bar=false",
                    "--trainer.enable_model_summary=false", "--trainer.num_sanity_val_steps=0",
                    "--trainer.precision=32-true", "--data.init_args.batch_size=2",
                    "--data.init_args.frames=4", "--data.init_args.resolution=16",
                    f"--trainer.callbacks+={json.dumps(GRIDS)}"])
    return cli, root


def _callback(cli, kind: type):
    return next(cb for cb in cli.trainer.callbacks if isinstance(cb, kind))


def _records(obj) -> dict[str, int]:
    """The number of entries of each container attribute of ``obj`` (lists, tuples, dicts, sets)."""
    return {name: len(value) for name, value in vars(obj).items() if isinstance(value, (list, tuple, dict, set))}


def test_the_learning_rate_monitor_keeps_the_latest_rates_not_every_logged_one(fit):
    """Lightning's LearningRateMonitor appended every logged learning rate to ``lrs`` (6 logged steps: 6 values per
    parameter group, one more each step of the run); train.py's keeps the latest, and the logs still get all."""
    cli, root = fit
    monitor = _callback(cli, LearningRateMonitor)
    assert monitor.lrs and all(len(values) == 1 for values in monitor.lrs.values()), monitor.lrs
    events = EventAccumulator(str(root / "outputs" / "debug" / "joint"))
    events.Reload()
    assert [s.step for s in events.Scalars("lr-AdamW/pg1")] == list(range(STEPS))


def test_sample_grids_keep_no_record_per_grid(fit):
    """SampleGrids kept the step of every grid it logged (``logged_steps`` [2, 4, 6] after three grids, one more each
    ``every_n_steps`` for the whole run); it keeps the last one, and still logs every grid once."""
    cli, root = fit
    grids = _callback(cli, SampleGrids)
    logged = STEPS // GRIDS["init_args"]["every_n_steps"]
    assert all(entries < logged for entries in _records(grids).values()), _records(grids)
    events = EventAccumulator(str(root / "outputs" / "debug" / "joint"), size_guidance={"images": 0})
    events.Reload()
    assert [image.step for image in events.Images("samples/interpolation")] == [1, 3, 5]  # steps 2, 4, 6's scalars'
