"""Checkpoint I/O that never leaves a half-written file where a checkpoint is expected.

Lightning's default local save goes through a temp file in the system temp dir and a ``shutil.move``,
which is a copy (not a rename) when that dir is on another file system. Here the bytes go to a temp file
beside the target, are flushed to disk, and replace the target with one ``os.replace`` (atomic on POSIX).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from fsspec.core import split_protocol, url_to_fs
from fsspec.implementations.local import LocalFileSystem
from lightning.pytorch.plugins.io import TorchCheckpointIO


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` to ``path`` atomically: temp file in the same directory, fsync, ``os.replace``; the file gets
    the mode of any file the process writes (0o666 less the umask). ``path`` may be a ``file://`` URL."""
    local = local_path(path)
    if local is None:
        raise ValueError(f"atomic_torch_save writes local files only, got {path}; save it locally and copy it there")
    path = Path(local)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~current_umask())  # mkstemp makes 0600: the mode any file written here gets
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    for stale in path.parent.glob(f".{path.name}.*.tmp"):  # left by a process killed mid-save; never loaded
        stale.unlink(missing_ok=True)


def current_umask() -> int:
    """The process's umask (read by setting it, so set back at once)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning ``CheckpointIO`` plugin: atomic local saves, local loads through
    :func:`mardini.lit.checkpoints.read_checkpoint` (an unreadable checkpoint to resume names the way on; tensors on
    the CPU, as the Trainer's resume asks); remote paths, a ``map_location`` or ``weights_only=False`` go to
    Lightning's own. A checkpoint read already and :meth:`pin`-ned is what the next load of its path returns."""

    _pinned: tuple[str, dict[str, Any], tuple | None] | None = None

    def pin(self, path, checkpoint: dict[str, Any], identity: tuple | None = None) -> None:
        """Have the next :meth:`load_checkpoint` of ``path`` return ``checkpoint`` (read from it already), whatever
        became of the file since: ``train.py validate`` reads the checkpoint it scores as it starts, and a fit of the
        same folder may delete the file before Lightning's restore reads it (``MarDiniCLI.validate``). ``identity``:
        which file was read (``mardini.lit.scored_checkpoint.read_identity``), compared over the ranks."""
        self._pinned = (str(path), checkpoint, identity)

    def pinned_read(self) -> tuple[str | None, tuple | None]:
        """The path and identity of the pinned checkpoint; ``(None, None)`` where none is pinned."""
        return (self._pinned[0], self._pinned[2]) if self._pinned is not None else (None, None)

    def pinned_checkpoint(self) -> dict[str, Any] | None:
        """The pinned checkpoint, left pinned; None where none is."""
        return self._pinned[1] if self._pinned is not None else None

    def load_checkpoint(self, path, map_location=None, weights_only: bool | None = None) -> dict[str, Any]:
        from mardini.lit.checkpoints import read_checkpoint

        pinned, self._pinned = self._pinned, None  # handed out once: its memory goes with the restore's
        if pinned is not None and pinned[0] == str(path):
            if pinned[1] is None:  # a rank that found none, not given rank 0's (mardini.lit.scored_checkpoint)
                raise FileNotFoundError(f"{path}: {pinned[2][1]}")
            return pinned[1]
        local = local_path(path)
        if weights_only is False or map_location is not None or local is None:
            kwargs = {} if map_location is None else {"map_location": map_location}
            return super().load_checkpoint(path, weights_only=weights_only, **kwargs)
        try:
            return read_checkpoint(local)
        except ValueError as e:
            if not Path(local).is_file():  # a directory: read_checkpoint's message names the files inside
                raise
            raise ValueError(f"{e} {other_checkpoints_message(Path(local))}") from e

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options=None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options, got {storage_options}")
        if local_path(path) is None:
            return super().save_checkpoint(checkpoint, path, storage_options)
        atomic_torch_save(checkpoint, path)


def local_path(path: str | os.PathLike) -> str | os.PathLike | None:
    """``path`` as a local file path: a plain path as given, a ``file://`` (or ``local://``) URL without its
    protocol; None where fsspec reaches it through another file system (``s3://``, a chained URL ...)."""
    if split_protocol(str(path))[0] is None:
        return path
    fs, stripped = url_to_fs(str(path))
    return stripped if isinstance(fs, LocalFileSystem) else None


def other_checkpoints_message(path: Path) -> str:
    """How to go on from a checkpoint that cannot be resumed: the other ``*.ckpt`` files beside it (newest first)
    for ``--ckpt_path FILE``, and ``--ckpt_path null``."""
    others = sorted((p for p in path.parent.glob("*.ckpt") if p.name != path.name and p.is_file()),
                    key=lambda p: p.stat().st_mtime, reverse=True)
    if others:
        held = ", ".join(p.name for p in others[:5]) + (" ..." if len(others) > 5 else "")
        way = f"resume from another checkpoint with --ckpt_path FILE ({path.parent} also holds {held}: e.g. " \
              f"--ckpt_path {others[0]})"
    else:
        way = f"{path.parent} holds no other checkpoint to resume from (--ckpt_path FILE)"
    return f"To go on, {way}, or start over with --ckpt_path null."
