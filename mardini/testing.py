"""Stand-ins for a quick look without trained outputs: a tiny checkpoint in seconds and a small synthetic set.

The notebooks (``notebooks/``) and the sampling tests use these when the demo's checkpoint or shards are absent,
or when ``$MARDINI_NOTEBOOK_QUICK=1`` asks for tiny settings (what ``tests/test_notebooks.py`` sets). A tiny
checkpoint is fitted for ONE step: it loads and runs every task, but it samples noise, not videos.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
import warnings
from pathlib import Path

import torch

QUICK_ENV = "MARDINI_NOTEBOOK_QUICK"
DEMO_CHECKPOINT = "outputs/tiny/05_joint_task/checkpoints/last.ckpt"  # what `make demo` / `make train-tiny` end with
DEMO_SHARDS = "data/shards/synthetic"  # what `make demo` / `python data/make_synthetic.py` write


def quick() -> bool:
    """True when ``$MARDINI_NOTEBOOK_QUICK`` is set to a true value (1, true, yes): force temp files, tiny sizes."""
    return os.environ.get(QUICK_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def make_checkpoint(path: str | Path, kind: str = "joint", frames: int = 5, size: int | tuple[int, int] = 16,
                    perturb: bool = True, generator: dict | None = None, model_args: dict | None = None) -> Path:
    """Fit ``kind`` (size ``tiny``) for one step on random clips and save a Lightning checkpoint at ``path``, which
    records its clips' ``frames`` and ``resolution`` (``size``) as a run of train.py records its data.

    Args:
        kind: ``joint`` (every task), ``generation`` (plan-free) or ``planning`` (no generator).
        frames: the window T; size: the pixel side of the square training clips, or their ``(H, W)`` (each >= 16,
            the planner's side).
        perturb: add small noise to the raw and EMA weights (differently), so the zero-initialised adaLN layers
            matter and a broken cache, guidance or weight choice changes the samples (the tests rely on it).
        generator: overrides of the generator's config (e.g. ``{"self_cond": True}``).
        model_args: further arguments of the stage's module (e.g. ``{"anchor": "nearest"}``).
    Takes a few seconds on one CPU core.
    """
    import lightning as L
    from torch.utils.data import StackDataset

    from mardini.lit import GenerationModule, MarDiniModule, PlanningModule

    modules = {"joint": MarDiniModule, "generation": GenerationModule, "planning": PlanningModule}
    if kind not in modules:
        raise ValueError(f"kind must be one of {sorted(modules)}, got {kind!r}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    module = modules[kind](size="tiny", frames=frames, planner_resolution=16, lr=1e-3, generator=generator,
                           **(model_args or {}))
    g = torch.Generator().manual_seed(0)
    h, w = (size, size) if isinstance(size, int) else size
    clips = StackDataset(video=torch.stack([torch.rand(frames, 3, h, w, generator=g) * 2 - 1 for _ in range(2)]))
    data = L.LightningDataModule.from_datasets(clips, batch_size=2)  # batches {"video": (2, T, 3, H, W)}
    # recorded as train.py's VideoDataModule records its clips (the checkpoint's datamodule_hyper_parameters)
    data.save_hyperparameters({"frames": frames, "resolution": size if isinstance(size, int) else [h, w]})
    with _quiet():
        trainer = L.Trainer(max_steps=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                            enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                            default_root_dir=str(path.parent))
        trainer.fit(module, datamodule=data)
        if perturb:
            g = torch.Generator().manual_seed(1)
            with torch.no_grad():
                for net, amp in ((module.networks, 0.05), (module.ema.module, 0.06)):
                    for p in net.parameters():
                        p.add_(amp * torch.randn(p.shape, generator=g))
        trainer.save_checkpoint(path)
    return path


@contextlib.contextmanager
def _quiet():
    """Silence Lightning's start-up lines and warnings for a one-step fit (they say nothing about the checkpoint)."""
    loggers = [logging.getLogger(n) for n in ("lightning.pytorch", "lightning.fabric", "lightning")]
    levels = [lg.level for lg in loggers]
    try:
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def checkpoint_or_tiny(path: str | Path = DEMO_CHECKPOINT, frames: int = 9, size: int = 32,
                       force_tiny: bool | None = None) -> tuple[Path, bool]:
    """``(checkpoint, trained)``: ``path`` when it exists, else a 1-step tiny joint checkpoint in a temp folder.

    ``force_tiny`` (default: :func:`quick`) skips ``path`` even when it exists. ``trained`` is False for the
    tiny stand-in, whose samples are noise.
    """
    force_tiny = quick() if force_tiny is None else force_tiny
    if not force_tiny and Path(path).is_file():
        return Path(path), True
    folder = Path(tempfile.mkdtemp(prefix="mardini_tiny_ckpt_"))
    return make_checkpoint(folder / "tiny.ckpt", "joint", frames=frames, size=size), False


def synthetic_shards(root: str | Path = DEMO_SHARDS, clips: int = 8, frames: int = 32, size: int = 32,
                     force_small: bool | None = None) -> Path:
    """A folder with ``train/`` and ``val/`` synthetic shards: ``root`` when its ``val`` split exists, else a
    small set (``clips`` per split, 2 per shard, ``frames`` at 16 fps, ``size`` px) written to a temp folder.

    ``force_small`` (default: :func:`quick`) skips ``root`` even when it exists.
    """
    from mardini.data.synthetic_shards import write_synthetic_split

    force_small = quick() if force_small is None else force_small
    if not force_small and (Path(root) / "val" / "manifest.json").is_file():
        return Path(root)
    out = Path(tempfile.mkdtemp(prefix="mardini_synthetic_"))
    for split in ("train", "val"):
        write_synthetic_split(out, split, clips, 2, frames=frames, height=size, width=size, fps=16.0, progress=False)
    return out
