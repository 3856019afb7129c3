"""External methods (FILM, LDMVFI, VIDIM, other I2V models) on the protocol's clips: their inputs out, their
outputs in.

``evaluate.py --export-inputs DIR`` writes, per task, the given frames of each clip's window at the protocol
resolution, ``DIR/<task>/<name>/frame_XX.png`` (XX: the frame's index in the window), and ``DIR/<task>/clips.json``
(the window, which frames are given and which to generate, and per clip its key, name, source and source frames).
A method writes its window of T frames per clip to ``OUT/<task>/<name>.mp4`` (any video PyAV reads, under any
extension of :data:`VIDEO_EXTENSIONS`) or ``OUT/<task>/<name>/`` (frame images, in name order), and
``evaluate.py --generated METHOD=OUT`` scores it next to the baselines: :class:`GeneratedVideos` reads each window,
brings it to the protocol resolution with the real clips' centre crop and resize (``crop_and_resize``) and puts the
real given frames back, as the built-in samplers return them.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mardini.data.decode import BadSample, ClipTooShort, decode_mp4
from mardini.data.sharding import write_text_atomic
from mardini.data.transforms import crop_and_resize
from mardini.data.video_shards import VIDEO_EXTENSIONS
from mardini.pipeline.inputs import read_images
from mardini.visualize import to_uint8

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")
SHOWN = 3  # paths named in an error about missing outputs


class ClipNames:
    """Unique, file-safe names of clip keys, given in the protocol's clip order (the same names on every run over
    the same clips): a shard key as it is (characters other than letters, digits, ``._-`` as ``_``), a video file's
    path under ``--data`` without its extension (``sub/a.mp4`` -> ``sub_a``); a name taken before gets ``-2``,
    ``-3`` ..."""

    def __init__(self, kind: str, data: str) -> None:
        self.kind, self.data = kind, data
        self.taken: set[str] = set()

    def __call__(self, key: str) -> str:
        text = os.path.splitext(os.path.relpath(key, self.data))[0] if self.kind == "videos" else key
        base = re.sub(r"[^A-Za-z0-9._-]+", "_", text.replace(os.sep, "/")).lstrip(".") or "clip"
        name, k = base, 1
        while name in self.taken:
            k += 1
            name = f"{base}-{k}"
        self.taken.add(name)
        return name


def frame_file(index: int, frames: int) -> str:
    """``frame_XX.png`` of window frame ``index`` (zero-padded to the window's digits, at least 2: name order)."""
    return f"frame_{index:0{max(2, len(str(frames - 1)))}d}.png"


def write_frames(video: torch.Tensor, folder: Path, indices: list[int] | None = None) -> list[str]:
    """Frames ``indices`` (default all) of ``video (T, 3, H, W)`` in [-1, 1] as lossless 8-bit PNGs
    ``folder/frame_XX.png`` (:func:`frame_file`, the window's frame numbers); the file names written."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    pixels = to_uint8(video)  # (T, H, W, 3)
    names = []
    for i in range(len(pixels)) if indices is None else indices:
        names.append(frame_file(i, len(pixels)))
        Image.fromarray(pixels[i]).save(folder / names[-1])
    return names


def shard_of_keys(files: list[str]) -> dict[str, str]:
    """``{sample key: shard}`` from the shards' tar headers (no data read); keys split as WebDataset does (up to the
    first dot of the member's file name)."""
    import tarfile

    out: dict[str, str] = {}
    for shard in files:
        try:
            with tarfile.open(shard) as tar:
                for member in tar:
                    match = re.match(r"^((?:.*/|)[^./]+)\.json$", member.name)
                    if match:
                        out.setdefault(match[1], shard)
        except (OSError, tarfile.TarError):
            continue  # read as far as it goes; the clips of it that decoded are listed with the shard unknown
    return out


# ------------------------------------------------------------------------------------------------
# --export-inputs
# ------------------------------------------------------------------------------------------------
class InputExport:
    """Writes one task's inputs under ``root/<task>/``: :meth:`add` per batch, :meth:`finish` writes clips.json.

    ``mask (T,)`` bool, True = generate; ``settings`` go into clips.json; ``sources``: ``{shard key: shard}``, or
    None for a folder of videos (the key is the file)."""

    def __init__(self, root: str | os.PathLike, task: str, mask: torch.Tensor, settings: dict[str, Any],
                 sources: dict[str, str] | None = None) -> None:
        self.dir = Path(root) / task
        self.dir.mkdir(parents=True, exist_ok=True)
        self.task, self.sources = task, sources
        self.frames = int(mask.shape[0])
        self.given = [i for i in range(self.frames) if not mask[i]]  # window indices of the given frames
        self.info = {"task": task, "frames": self.frames, "given": self.given,
                     "generate": [i for i in range(self.frames) if mask[i]], **settings, "clips": []}

    def add(self, batch: dict[str, Any], names: list[str]) -> None:
        """Write the given frames of a batch's clips (``video (B, T, 3, R, R)``, named ``names``) and list them."""
        metas = batch.get("meta") or [{}] * len(batch["key"])
        for video, key, name, meta, rate in zip(batch["video"], batch["key"], names, metas, batch["fps"], strict=True):
            inputs = [f"{name}/{f}" for f in write_frames(video, self.dir / name, self.given)]  # video (T, 3, R, R)
            clip = {"key": key, "name": name, "inputs": inputs, "output": f"{name}.mp4 or {name}/",
                    "frame_indices": meta.get("frame_indices"), "fps": round(float(rate), 3)}
            if self.sources is None:
                clip["source"] = key  # the video file
            else:
                clip["shard"] = self.sources.get(key)
                if "source" in meta:
                    clip["source"] = meta["source"]  # the video the shard sample was cut from
                if meta.get("crop"):
                    clip["crop"] = meta["crop"]  # [top, left, height, width] of the centre crop
            self.info["clips"].append(clip)

    def finish(self) -> Path:
        """Write ``clips.json`` (atomically) and return its path."""
        path = self.dir / "clips.json"
        write_text_atomic(path, json.dumps(self.info, indent=2) + "\n")
        return path


# ------------------------------------------------------------------------------------------------
# --generated
# ------------------------------------------------------------------------------------------------
class GeneratedVideos:
    """An external method's windows under ``root/<task>/`` as a method of the protocol.

    Args:
        method: its name in the report.
        root: the folder it wrote (``root/<task>/<name>.mp4`` or ``root/<task>/<name>/`` frame images).
        frames: the protocol's window T.
        resolution: the protocol's size: a side R, or ``(H, W)`` (R x R is then H x W).
    Calling it with the task, the batch's clip names, the real clips ``(B, T, 3, R, R)`` and ``mask (B, T)``
    returns ``(B, T, 3, R, R)`` in [-1, 1]: its frames where the mask generates, the real ones where it gives.
    """

    def __init__(self, method: str, root: str | os.PathLike, frames: int, resolution: int | tuple[int, int]) -> None:
        self.method, self.root, self.frames, self.resolution = method, Path(root), frames, resolution

    def find(self, task: str, name: str) -> Path | None:
        """The clip's video file or frame folder; None when there is neither. Two of them is an error."""
        folder = self.root / task
        found = [folder / f"{name}{ext}" for ext in VIDEO_EXTENSIONS if (folder / f"{name}{ext}").is_file()]
        found += [folder / name] if (folder / name).is_dir() else []
        if len(found) > 1:
            raise ValueError(f"--generated {self.method}: {len(found)} outputs of clip {name!r} "
                             f"({', '.join(str(p) for p in found)}); keep one")
        return found[0] if found else None

    def check_present(self, task: str, names: list[str]) -> None:
        """Refuse, before any scoring, a task whose outputs are not all there, naming how many and the first few."""
        if not (self.root / task).is_dir():
            raise FileNotFoundError(f"--generated {self.method}: {self.root / task} does not exist: write the "
                                    f"{task} windows there (<clip name>.mp4 or <clip name>/ frames), or leave the "
                                    f"task out (--tasks)")
        missing = [n for n in names if self.find(task, n) is None]
        if missing:
            shown = ", ".join(str(self.root / task / f"{n}.mp4") for n in missing[:SHOWN])
            more = f" and {len(missing) - SHOWN} more" if len(missing) > SHOWN else ""
            raise FileNotFoundError(
                f"--generated {self.method}: {len(missing)} of {len(names)} {task} clips have no output: expected "
                f"{shown}{more} (or a folder of frame images without .mp4); the names are those of "
                f"--export-inputs (its {task}/clips.json)")

    def read(self, task: str, name: str) -> torch.Tensor:
        """One clip's window ``(T, 3, R, R)`` in [-1, 1], centre-cropped and resized as the real clips are."""
        path = self.find(task, name)
        if path is None:
            raise FileNotFoundError(f"--generated {self.method}: {self.root / task / name}.mp4 does not exist "
                                    "(nor a folder of frame images of that name)")
        count, arr = self._frames(path) if path.is_dir() else self._decode(path)  # arr: (T, H, W, 3) uint8
        if arr is None:
            raise ValueError(f"--generated {self.method}: {path} has {count} frames, the window is {self.frames} "
                             f"(--frames): write every frame of the window, the given ones included")
        video, _ = crop_and_resize(arr, self.resolution, "center")  # (T, 3, R, R), as the real clips
        return video

    def _decode(self, path: Path) -> tuple[int, np.ndarray | None]:
        """``(frames in the file, its frames uint8 (T, H, W, 3) or None when they are not T)``."""
        try:
            arr = decode_mp4(str(path))  # (T', H, W, 3): the shards' decoder, with its size checks
        except ClipTooShort:
            return 0, None  # no frame at all
        except BadSample as err:  # no video stream, does not decode, frames too large or changing size
            raise ValueError(f"--generated {self.method}: {path} does not read as a video ({err}); write it with "
                             "ffmpeg/PyAV, or as a folder of frame images") from None
        return len(arr), (arr if len(arr) == self.frames else None)

    def _frames(self, folder: Path) -> tuple[int, np.ndarray | None]:
        """``(images in the folder, them in name order uint8 (T, H, W, 3) or None when they are not T)``; files of
        other extensions are ignored."""
        from PIL import Image

        files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
        if len(files) != self.frames:
            return len(files), None
        try:
            return len(files), read_images(files)  # (T, H, W, 3), sample.py's reader: one size, 16-bit scaled
        except (ValueError, Image.DecompressionBombError) as err:
            raise ValueError(f"--generated {self.method}: {err}") from None

    def __call__(self, task: str, names: list[str], real: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        fake = torch.stack([self.read(task, n) for n in names]).to(real.device, real.dtype)  # (B, T, 3, R, R)
        return torch.where(mask[..., None, None, None], fake, real)  # the given frames are the real ones
