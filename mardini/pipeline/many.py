"""``sample.py --list FILE``: many clips in one command, for inference at scale.

Each line of the list is one clip's inputs (``--images``' files, one video file as ``--video``, or one clip of a
local shard as ``SHARD.tar#KEY``, read as ``--shards`` reads it: :mod:`mardini.pipeline.shard_clips` lists a split's
clips so); the item's index is its line's number among the list's clips (blank and ``#`` lines do not count). What
an item gives depends on that index only, never on the batch or the slice it ran in (up to ``--batch``'s float
rounding):

- its seed is ``--seed + index``; its files are ``<out>/<task>_<index:06d>_<sample>.mp4|.gif`` (``--png``: the frames
  in ``frames/<task>_<index:06d>_<sample>/``);
- ``--slice-index I --num-slices N`` takes the items whose index is I modulo N, so N jobs writing into one folder
  share the work without colliding;
- each file is written under a ``.part`` name and renamed when complete, and an item counts as done once its line is
  in ``manifest[_I-of-N].jsonl`` (index, inputs, seed, files): a rerun with the same options skips the done items,
  so a killed job resumes where it stopped; other options are refused, naming them;
- an input that cannot be read (a missing or corrupt file, a video too short, the wrong number of images) is skipped,
  recorded in the manifest with its error, counted and listed at the end; the job goes on, and exits with status 1
  when it skipped more clips than ``--max-skipped`` (default 0) allows (:func:`too_many_skipped`);
- a job holds its slice's lock (``sample[_I-of-N].lock`` in ``--out``, a :class:`~mardini.lit.run_lock.RunLock`:
  heartbeat, a dead job's lock taken over), so a second live job of the slice (a requeue while the first runs) is
  refused, and so is a job while a live job of another slicing (``--num-slices``) holds a lock in ``--out`` (the
  two would share clips); under it, the ``.part`` files a killed job of the slice left are removed
  (:func:`remove_leftovers`).

Clips are read, sampled and written one batch at a time, so memory does not grow with the list.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shlex
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from mardini.lit.run_lock import STALE_AFTER_S, FolderInUseError, RunLock, held, holder_text, read_record
from mardini.pipeline.outputs import remove, replaced_when_done, save_frames
from mardini.pipeline.shard_clips import shard_clip

VIDEO_SUFFIXES = (".mp4", ".mov", ".avi", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg")

# options that decide what an item gives: a resumed run must repeat them (--batch only rounds; device, slices free)
RUN_KEYS = ("task", "ckpt", "list", "window", "no_ema", "seed", "steps", "eta", "guidance", "num_samples",
            "resolution", "resize", "keep", "start", "stride", "frames", "index", "total", "context", "factor",
            "fps", "png", "bf16")


@dataclass
class Item:
    """One line of the list: its index, its files, and once read its given frames ``(1, n, 3, H, W)`` and facts."""

    index: int
    paths: list[str]
    given: torch.Tensor | None = None
    positions: list[int] | None = None
    notes: list[str] = field(default_factory=list)
    fps: float | None = None


def read_list(path: str | Path) -> list[list[str]]:
    """The list file's clips: per non-blank line not starting with ``#``, its paths (shell quoting for spaces)."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"--list {path} does not exist; give a text file of one clip's input files per line")
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    return [shlex.split(line) for line in lines if line.strip() and not line.lstrip().startswith("#")]


def slice_of(n: int, slice_index: int, num_slices: int) -> list[int]:
    """The indices among ``n`` items that slice ``slice_index`` of ``num_slices`` takes (index mod num_slices)."""
    return list(range(slice_index, n, num_slices))


def manifest_path(out: Path, slice_index: int, num_slices: int) -> Path:
    """The slice's manifest: ``manifest.jsonl`` for one slice, ``manifest_I-of-N.jsonl`` for slice I of N."""
    return out / ("manifest.jsonl" if num_slices == 1 else f"manifest_{slice_index}-of-{num_slices}.jsonl")


def lock_path(out: Path, slice_index: int, num_slices: int) -> Path:
    """The slice's lock: ``sample.lock`` for one slice, ``sample_I-of-N.lock`` for slice I of N."""
    return out / ("sample.lock" if num_slices == 1 else f"sample_{slice_index}-of-{num_slices}.lock")


LOCK_NAME = re.compile(r"sample(?:_(\d+)-of-(\d+))?\.lock")  # lock_path's names: (slice index, number of slices)


@contextlib.contextmanager
def slice_lock(out: Path, slice_index: int, num_slices: int) -> Iterator[RunLock]:
    """Hold the slice's lock in ``out`` for the block (:class:`~mardini.lit.run_lock.RunLock`: a heartbeat; the lock
    of a job that is gone is taken over, with a warning); a live job's lock of this slice, or of any slice of another
    slicing (:func:`other_slicings`), is a :class:`SliceInUseError`. The other slicings are looked for once this
    lock is held, so that of two jobs of different slicings starting at once neither misses the other."""
    path = lock_path(out, slice_index, num_slices)
    try:
        lock = RunLock([out], path.name, holder="sample.py job").acquire()
    except FolderInUseError:
        raise SliceInUseError(slice_in_use_message(path, slice_index, num_slices)) from None
    try:
        others = other_slicings(out, num_slices)
        if others:
            raise SliceInUseError(other_slicing_message(others[0], slice_index, num_slices))
        yield lock
    finally:
        lock.release()


def other_slicings(out: Path, num_slices: int) -> list[Path]:
    """The locks in ``out`` that live jobs (:func:`~mardini.lit.run_lock.held`: a dead job's lock is left alone)
    hold for a slice of another number of slices than ``num_slices`` (``sample.lock``: one slice)."""
    return [path for path in sorted(out.glob("sample*.lock"))
            if (m := LOCK_NAME.fullmatch(path.name)) and int(m.group(2) or 1) != num_slices and held(path)]


class SliceInUseError(FolderInUseError):
    """Another live job samples this slice into this ``--out`` (a user error: one line, no traceback)."""


def holder_line(path: Path) -> str:
    """``pid P on host H, SLURM job J, started T`` of the job whose lock is at ``path``."""
    return holder_text(read_record(path), "job")


def other_slicing_message(path: Path, slice_index: int, num_slices: int) -> str:
    """The refusal of a job of ``num_slices`` slices where a live job of another slicing holds the lock at ``path``."""
    m = LOCK_NAME.fullmatch(path.name)
    theirs = int(m.group(2) or 1) if m else "?"
    return (f"--slice-index {slice_index} --num-slices {num_slices} of --out {path.parent}: another sample.py job "
            f"({holder_line(path)}; lock file {path}) samples this folder in {theirs} slice(s): slicings of "
            f"{num_slices} and {theirs} give some clips to both jobs, which write the same files and remove each "
            f"other's half-written ones. Give this job its own --out, or use --num-slices {theirs} as that job does "
            "(another --slice-index), or wait for it to end and rerun (the clips it finished are skipped). A lock "
            f"stops counting once its job is gone (its pid on the same host, its SLURM job requeued, or no heartbeat "
            f"for {STALE_AFTER_S:.0f} s); delete {path} only if you know it is gone")


def slice_in_use_message(path: Path, slice_index: int, num_slices: int) -> str:
    """The refusal: which job holds the slice, why two would break it, and the fixes."""
    holder = holder_line(path)
    return (f"--slice-index {slice_index} --num-slices {num_slices} of --out {path.parent} is being sampled by "
            f"another sample.py job ({holder}; lock file {path}): two jobs of one slice write the same clips' files "
            "and manifest lines. Wait for that job to end (rerun this command then: it samples only the clips not "
            "done), or give this job another --slice-index or --out. The lock is taken over by itself once that job "
            f"is gone (its pid on the same host, its SLURM job requeued, or no heartbeat for {STALE_AFTER_S:.0f} "
            f"s); delete {path} only if you know it is gone")


def remove_leftovers(out: Path, task: str, indices: list[int]) -> list[Path]:
    """Remove the ``.part`` files and folders (``<task>_<index>_<sample>.part.mp4|.gif``, ``frames/..part/``) that a
    killed job left for the clips ``indices`` (this slice's), never another slice's or task's; the paths removed."""
    mine, name = set(indices), re.compile(rf"{re.escape(task)}_(\d{{6,}})_\d+\.part(\.mp4|\.gif)?")
    found = [p for p in (*out.glob(f"{task}_*.part.*"), *(out / "frames").glob(f"{task}_*.part"))
             if (m := name.fullmatch(p.name)) and int(m.group(1)) in mine]
    for path in found:
        remove(path)
    return found


def too_many_skipped(record: dict) -> str | None:
    """The error of a ``--list`` job (its ``record``) that skipped more clips than ``--max-skipped`` allows, or
    None (as for any other run)."""
    skipped, allowed = record.get("skipped", 0), record.get("max_skipped", 0)
    if skipped <= allowed:
        return None
    return (f"{skipped} clip(s) of slice {record['slice_index']} of {record['num_slices']} were skipped, more than "
            f"--max-skipped {allowed} allows (their errors: {record['manifest']} and the settings file beside it); "
            "fix their inputs and rerun the same command to sample them, or pass --max-skipped to accept skips")


def run_settings(a: argparse.Namespace) -> dict:
    """The options that decide an item's files, as a manifest records them."""
    return {k: str(v) if isinstance(v, Path) else v for k, v in sorted(vars(a).items()) if k in RUN_KEYS}


def read_manifests(out: Path, settings: dict) -> dict[int, dict]:
    """``{index: entry}`` of the done items every manifest in ``out`` records whose files all exist; a manifest of
    other options is a ValueError naming them. A line cut short by a kill is ignored."""
    done: dict[int, dict] = {}
    for path in sorted(out.glob("manifest*.jsonl")):
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:
                continue
            if "settings" in entry:
                check_same_settings(path, entry["settings"], settings)
            elif entry.get("status") == "done" and all(Path(f).exists() for f in entry["files"]):
                done[entry["index"]] = entry
    return done


def check_same_settings(path: Path, theirs: dict, mine: dict) -> None:
    """Raise a ValueError when the run that wrote manifest ``path`` had other options than this one."""
    differ = {k: (theirs.get(k), mine.get(k)) for k in sorted(set(theirs) | set(mine)) if theirs.get(k) != mine.get(k)}
    if differ:
        listing = ", ".join(f"--{k.replace('_', '-')} {t!r} there, {m!r} here" for k, (t, m) in differ.items())
        raise ValueError(f"--out {path.parent} holds the results of a run with other options ({path.name}: "
                         f"{listing}); resume with the same options, or write to another --out")


def check_same_inputs(path: str, items: list[list[str]], done: dict[int, dict]) -> None:
    """Raise a ValueError when a done clip's line of the list now names other files (lines inserted or removed):
    its files would be taken for the new line's."""
    changed = [i for i, entry in sorted(done.items()) if i >= len(items) or entry["input"] != items[i]]
    if changed:
        i = changed[0]
        now = " ".join(items[i]) if i < len(items) else "no line"
        raise ValueError(f"--list {path} changed since clips were sampled from it: clip {i} was "
                         f"{' '.join(done[i]['input'])}, now {now} ({len(changed)} clip(s) differ); add clips at "
                         "the end of the list, or write to another --out")


def append_line(path: Path, entry: dict) -> None:
    """Append one JSON line to ``path`` and flush it to the disk, so that a kill after it keeps it; a line cut short
    by an earlier kill is ended first, so that it does not swallow this one."""
    line = json.dumps(entry, default=str) + "\n"
    with open(path, "a", encoding="utf-8") as f:
        f.write(line if ends_a_line(path) else "\n" + line)
        f.flush()
        os.fsync(f.fileno())


def ends_a_line(path: Path) -> bool:
    """Whether ``path`` is empty or ends with a newline (not with a line a kill cut short)."""
    with open(path, "rb") as f:
        if f.seek(0, os.SEEK_END) == 0:
            return True
        f.seek(-1, os.SEEK_END)
        return f.read(1) == b"\n"


def write_sample(out: Path, stem: str, video: torch.Tensor, fps: float, png: bool) -> list[str]:
    """One sample ``(T, 3, H, W)`` in [-1, 1] as ``stem.mp4``, ``stem.gif`` (and ``frames/stem/``), each written
    whole or not at all; the paths written."""
    from mardini.visualize import save_gif, save_mp4

    files = []
    for suffix, save in ((".mp4", save_mp4), (".gif", save_gif)):
        with replaced_when_done(out / f"{stem}{suffix}") as part:
            save(video, part, fps)
        files.append(str(out / f"{stem}{suffix}"))
    if png:
        with replaced_when_done(out / "frames" / stem) as part:
            save_frames(video, part)
        files.append(str(out / "frames" / stem))
    return files


def one_input(a: argparse.Namespace, paths: list[str]) -> argparse.Namespace:
    """The options of ``sample.py`` run on one line's clip alone: ``--shards`` for a shard clip (``SHARD.tar#KEY``),
    ``--video`` for one file with a video suffix, else ``--images``."""
    clip = shard_clip(paths)
    video = clip is None and len(paths) == 1 and Path(paths[0]).suffix.lower() in VIDEO_SUFFIXES
    if clip is None and len(paths) == 1 and paths[0].lower().endswith(".tar"):
        raise ValueError(f"{paths[0]} is a shard, not a clip: name one of its clips as SHARD.tar#KEY (python -m "
                         "mardini.pipeline.shard_clips SHARDS lists them all)")
    return argparse.Namespace(**{**vars(a), "list": None, "images": None if video or clip else paths,
                                 "video": paths[0] if video else None, "shards": paths[0] if clip else None})


def read_item(a: argparse.Namespace, pipe, size, sampled: int, index: int, paths: list[str]) -> Item:
    """Read one line's clip as ``sample.py`` reads ``--images``, ``--video`` (one file with a video suffix) or a
    ``--shards`` clip (``SHARD.tar#KEY``: :func:`~mardini.pipeline.cli.load_shard_clip`); a ValueError or OSError
    names what is wrong with it."""
    from mardini.pipeline import cli

    one = one_input(a, paths)
    cli.check_inputs(one)
    clip = shard_clip(paths)
    loaded = cli.load_shard_clip(one, pipe, size, *clip) if clip else cli.load_inputs(one, pipe, size)
    given, _, positions, notes, fps = loaded  # (1, n, 3, H, W)
    spacing = cli.spacing_note(one, positions, sampled)
    return Item(index, paths, given, positions, notes + ([spacing] if spacing else []), fps)


def batch_key(item: Item) -> tuple:
    """Items that can share a generate call: the same given positions and frame shapes."""
    return tuple(item.positions or ()), tuple(item.given.shape)


def sample_batch(a: argparse.Namespace, pipe, batch: list[Item], kw: dict, out: Path, manifest: Path) -> None:
    """Sample a batch of items (seed ``--seed + index`` each), write each sample and then its manifest line."""
    from mardini.pipeline import cli

    given = torch.cat([item.given for item in batch])  # (B, n, 3, H, W)
    seeds = [a.seed + item.index for item in batch]
    videos, masks = cli.run_task(a, pipe, given, batch[0].positions, seeds, kw)  # (B*k, T, 3, H, W), (B*k, T)
    videos = videos.cpu()
    for i, item in enumerate(batch):
        fps, rows = a.fps or item.fps or pipe.fps or 8.0, range(i * a.num_samples, (i + 1) * a.num_samples)
        files = [f for j, row in enumerate(rows)
                 for f in write_sample(out, f"{a.task}_{item.index:06d}_{j}", videos[row], fps, a.png)]
        positions = masks[rows[0]].nonzero().flatten().tolist()  # the given frames, in every sample
        append_line(manifest, {"index": item.index, "input": item.paths, "status": "done", "seed": seeds[i],
                               "files": files, "frames": videos.shape[1], "given_positions": positions,
                               "fps_written": fps, "inputs": item.notes})


def sample_list(a: argparse.Namespace, pipe, size, sampled: int, kw: dict, out: Path) -> dict:
    """Sample this slice's items of ``--list`` batch by batch, skipping the done ones and the unreadable ones;
    returns the slice's record (also in ``settings[_I-of-N].json``)."""
    items = read_list(a.list)
    mine = slice_of(len(items), a.slice_index, a.num_slices)
    settings = run_settings(a)
    out.mkdir(parents=True, exist_ok=True)
    done = read_manifests(out, settings)
    manifest = manifest_path(out, a.slice_index, a.num_slices)
    if not manifest.exists():
        append_line(manifest, {"settings": settings})
    check_same_inputs(a.list, items, done)
    todo = [i for i in mine if i not in done]
    for path in remove_leftovers(out, a.task, mine):
        print(f"[sample] removed {path}: a killed job's half-written file")
    print(f"[sample] --list {a.list}: {len(items)} clip(s); slice {a.slice_index} of {a.num_slices} takes "
          f"{len(mine)}, {len(mine) - len(todo)} done already, {len(todo)} to sample")
    skipped, batch, sampled_now = [], [], 0
    for index in todo:
        try:
            item = read_item(a, pipe, size, sampled, index, items[index])
        except (ValueError, OSError) as e:
            skipped.append({"index": index, "input": items[index], "error": str(e)})
            append_line(manifest, dict(skipped[-1], status="skipped"))
            print(f"[sample] skipped clip {index} ({' '.join(items[index])}): {e}")
            continue
        if batch and (len(batch) == a.batch or batch_key(batch[0]) != batch_key(item)):
            sample_batch(a, pipe, batch, kw, out, manifest)
            sampled_now, batch = sampled_now + len(batch), []
        batch.append(item)
    if batch:
        sample_batch(a, pipe, batch, kw, out, manifest)
        sampled_now += len(batch)
    record = dict(settings, slice_index=a.slice_index, num_slices=a.num_slices, clips=len(items),
                  clips_in_slice=len(mine), done_before=len(mine) - len(todo), sampled=sampled_now,
                  skipped=len(skipped), skipped_clips=skipped, max_skipped=a.max_skipped or 0, manifest=str(manifest))
    name = "settings.json" if a.num_slices == 1 else f"settings_{a.slice_index}-of-{a.num_slices}.json"
    with replaced_when_done(out / name) as part:
        part.write_text(json.dumps(record, indent=2, default=str), encoding="utf-8")
    print(f"[sample] slice {a.slice_index} of {a.num_slices}: {sampled_now} clip(s) sampled, "
          f"{len(mine) - len(todo)} done before, {len(skipped)} skipped (unreadable: listed in {out / name} and "
          f"{manifest.name}); files in {out}/")
    return record
