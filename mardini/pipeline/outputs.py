"""What ``sample.py`` writes: one mp4 and one gif per sample (with ``--png`` also its frames as lossless PNGs), a PNG
contact sheet (given frames framed in green) and ``settings.json`` (checkpoint, seed, steps, guidance, task, and the
rest of the run)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import torch

from mardini.visualize import contact_sheet, save_gif, save_mp4


def check_out_dir(out: Path) -> None:
    """Raise a ValueError when ``out`` cannot be the output folder (it, or the nearest existing folder above it,
    is a file): checked before sampling, so that no run ends there."""
    existing = next(p for p in (out, *out.parents) if p.exists())
    if not existing.is_dir():
        raise ValueError(f"--out {out}: {existing} is a file, not a folder; pass a folder (created if missing)")


@contextlib.contextmanager
def replaced_when_done(path: Path) -> Iterator[Path]:
    """A ``.part`` path beside ``path`` to write (``x.part.mp4`` for ``x.mp4``), renamed to ``path`` when the block
    ends and removed when it raises, so that ``path`` is never half-written (a rename within a folder is atomic)."""
    part = path.with_name(f"{path.stem}.part{path.suffix}")  # the suffix kept: writers pick the format by it
    remove(part)
    try:
        yield part
    except BaseException:
        remove(part)
        raise
    if path.is_dir():  # a folder of frames: os.replace moves a folder onto an empty one only
        shutil.rmtree(path)
    os.replace(part, path)


def remove(path: Path) -> None:
    """Remove a file or a folder if it exists."""
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()


def save_frames(video: torch.Tensor, folder: Path) -> Path:
    """``(T, 3, H, W)`` in [-1, 1] -> ``folder/frame_XX.png``, lossless 8-bit RGB, named as ``evaluate.py
    --export-inputs`` names a window's frames (:func:`~mardini.evaluation.external.frame_file`): a folder of frame
    images that ``evaluate.py --generated`` reads, and that ``sample.py --images`` reads back exactly."""
    from mardini.evaluation.external import write_frames

    write_frames(video, folder)
    return folder


def write_outputs(out: Path, task: str, videos: torch.Tensor, given: torch.Tensor, labels: list[str],
                  settings: dict, fps: float, png: bool = False) -> dict:
    """Write every sample of ``videos (N, T, 3, H, W)`` in [-1, 1]; ``given (N, T)`` bool marks the given frames.
    ``png``: also each sample's frames, losslessly, in ``frames/<task>_NNN/`` (:func:`save_frames`; apart from the
    mp4 of the same name, which ``evaluate.py --generated`` would take for a second output of the clip).

    The task's samples of an earlier run in ``out`` are removed first, so the folder holds this run's files only
    (a run with fewer samples left the earlier ones beside them, described by the new ``settings.json``). Each file is
    written under a ``.part`` name and renamed when complete (:func:`replaced_when_done`), so a killed run leaves no
    half-written file under a sample's name."""
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob(f"{task}_*"):
        if old.suffix in (".mp4", ".gif") and old.stem[len(task) + 1:].isdigit():
            old.unlink()
    for old in (out / "frames").glob(f"{task}_*"):  # --png frames: the PNGs go, and a folder left empty
        if old.is_dir() and old.name[len(task) + 1:].isdigit():
            for frame in old.glob("frame_*.png"):
                frame.unlink()
            if not any(old.iterdir()):
                old.rmdir()
    files = []
    for i, video in enumerate(videos):
        stem = out / f"{task}_{i:03d}"
        for path, save in ((stem.with_suffix(".mp4"), save_mp4), (stem.with_suffix(".gif"), save_gif)):
            with replaced_when_done(path) as part:
                save(video, part, fps)
            files.append(str(path))
        if png:
            with replaced_when_done(out / "frames" / stem.name) as part:
                save_frames(video, part)
            files.append(str(out / "frames" / stem.name))
    sheet = out / "contact_sheet.png"
    with replaced_when_done(sheet) as part:
        contact_sheet(videos, part, mask=~given, row_labels=labels)
    record = dict(settings, files=files, contact_sheet=str(sheet))
    with replaced_when_done(out / "settings.json") as part:
        part.write_text(json.dumps(record, indent=2, default=str), encoding="utf-8")
    return record
