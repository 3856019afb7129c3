"""What a resume finds changed in its data since the checkpoint: the training and validation shards (added, removed,
rewritten) and the ``data.*`` settings, each said in one warning naming the change and what the resume does with it.

A checkpoint records, beside the stream position, the shards each split read and the settings that decide what is
read (:func:`data_record`). The shards are a compact record (:func:`shard_record`): their count, a digest of the
sorted (path, bytes) pairs, and the list itself (path -> bytes) only while it is short (at most
:data:`FULL_LIST_MAX` shards), so that a checkpoint of 10k shards does not carry a megabyte of paths; checkpoints
that hold the full list (written before the record was made compact) are read as such. Each rank stats its own slice
of the shards and one all-gather assembles the list (:func:`gathered_shard_sizes`): each shard's metadata is read
once, not once per rank.

A resume compares them with its own (:func:`resume_notes`), naming the shards added, removed or rewritten where the
checkpoint holds the list, and ``N shards -> M shards, contents differ`` where it holds the digest alone:

- other **training shards** (a shard added, removed, or rewritten: a corrupt one re-made, a cache rebuilt with more
  clips): the recorded position (raw samples read per worker in an epoch) counts samples of the old shard list, and
  replayed over the new one it would skip or re-read clips at random; the stream starts its next epoch instead;
- other **training settings** (``frames``, ``resolution``, ``batch_size`` ...): the run goes on under them, said;
  ``seed`` is never taken from the command on a resume (the stream goes on with the checkpoint's), said too;
- another **batch size** in the middle of an epoch (:func:`mixed_epoch`): the stream goes on from the clip after the
  last one trained, but the position and Lightning count the epoch's batches, so its rest is the new epoch's batches
  less those trained, at the new size: the epoch comes out longer or shorter, said with its clip counts; where the
  trained batches already reach the new epoch's, the epoch ends there and the next one starts whole;
- another **validation split** (its shards, ``val_clips``, or what a clip is: ``frames``, ``fps``, ``resolution``,
  ``latents``), or, under a cap (``data.val_clips``, ``trainer.limit_val_batches``), another way of reading it that
  picks other clips (:func:`reading_changes`): ``val/loss`` from the resume on is of other clips or another task than
  the earlier steps' on the same curve, said with the ways to keep one curve comparable.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

from mardini.data.stream import name_shards, worker_quota
from mardini.data.validation_split import all_gather_ranks

# data.* settings that change what the training stream reads or how (num_workers: StreamLoader says so itself)
TRAIN_SETTINGS = ("frames", "fps", "resolution", "latents", "crop", "crop_scale", "batch_size", "epoch_size",
                  "shuffle_buffer")
# data.* settings that change which validation clips are scored or what a clip is
VAL_SETTINGS = ("frames", "fps", "resolution", "latents", "val_clips")
# How the validation split is read (validation_reading): each changes which clips are validated only under a cap.
# limit_val_batches: a cap itself (batches per rank). batch: the clips per validation batch, which limit_val_batches
# counts in (val_clips counts clips). readers: loader workers per rank, over which val_clips is split and whose batches
# limit_val_batches takes in turn. world_size: both caps are per rank. Without a cap every clip of the split is read
# whatever these are, each once (val/loss draws per clip, by its key), so they are not compared then.
VAL_READING = ("limit_val_batches", "batch", "readers", "world_size")
FULL_LIST_MAX = 1000  # a checkpoint keeps a split's path -> bytes up to this many shards, its digest alone above


def shard_sizes(shards: list[str]) -> dict[str, int | None]:
    """``path -> bytes`` of each shard (None: not a local file, a URL or ``pipe:``)."""
    return {shard: os.path.getsize(shard) if os.path.isfile(shard) else None for shard in shards}


def gathered_shard_sizes(shards: list[str], rank: int, world_size: int) -> dict[str, int | None]:
    """:func:`shard_sizes` of ``shards``, in their order. Where a process group of ``world_size`` runs, each rank
    stats only its slice (shards ``rank``, ``rank + world_size``, ...) and one all-gather (a collective: every rank
    calls it) assembles the rest; a shard no rank's slice held (ranks that list other shards) is statted here. A
    process alone stats them all."""
    if world_size < 2:
        return shard_sizes(shards)
    parts = all_gather_ranks(shard_sizes(shards[rank::world_size]), world_size)
    if parts is None:  # ranks configured without a process group
        return shard_sizes(shards)
    known = {shard: size for part in parts for shard, size in part.items()}
    return {shard: known[shard] if shard in known else shard_sizes([shard])[shard] for shard in shards}


def shard_record(sizes: dict[str, int | None], whole: bool = False) -> dict[str, Any]:
    """What a checkpoint keeps of a split's :func:`shard_sizes`: ``count``, ``sha256`` of the sorted (path, bytes)
    pairs, and ``sizes`` (the dict itself) while it holds at most :data:`FULL_LIST_MAX` shards (or ``whole``), else
    None."""
    digest = hashlib.sha256(json.dumps(sorted(sizes.items())).encode()).hexdigest()
    keep = whole or len(sizes) <= FULL_LIST_MAX
    return {"count": len(sizes), "sha256": digest, "sizes": dict(sizes) if keep else None}


def as_shard_record(value: dict | None) -> dict[str, Any] | None:
    """``value`` as a :func:`shard_record`: a record as it is, a full ``path -> bytes`` dict (checkpoints written
    before the record was made compact) made one (its list kept, whatever its length), None as None."""
    if value is None:
        return None
    if isinstance(value.get("sha256"), str) and isinstance(value.get("count"), int):  # no bytes count is a str
        return value
    return shard_record(value, whole=True)


def _plain(value: Any) -> Any:
    """Tuples as lists (a YAML list, a tuple in the checkpoint)."""
    return [_plain(v) for v in value] if isinstance(value, (list, tuple)) else value


def data_record(hparams: dict[str, Any], seed: int, train: dict | None, val: dict | None,
                reading: dict[str, Any] | None = None, whole: bool = False) -> dict[str, Any]:
    """What a checkpoint records of the data read: the training and validation shards (:func:`shard_record` of
    their :func:`shard_sizes`, the lists kept whole where ``whole``; None before ``setup``), the settings of
    :data:`TRAIN_SETTINGS` and :data:`VAL_SETTINGS` (from ``hparams``), the stream's ``seed`` (the one drawn with: a
    resume's is its checkpoint's, whatever ``hparams`` say) and how the validation split is read (``reading``:
    :func:`validation_reading`; older checkpoints lack it)."""
    settings = {k: _plain(hparams.get(k)) for k in sorted({*TRAIN_SETTINGS, *VAL_SETTINGS})}
    train, val = (None if s is None else shard_record(s, whole) for s in (train, val))
    return {"train_shards": train, "val_shards": val, "settings": {**settings, "seed": seed}, "val_reading": reading}


def validation_reading(limit_val_batches: int | float | None, batch: int, num_workers: int,
                       world_size: int) -> dict[str, Any]:
    """The :data:`VAL_READING` record: the trainer's ``limit_val_batches`` (None, or 1.0, the default: every batch,
    recorded as None), the validation batch (clips per rank), the readers per rank (``num_workers``; 0 reads as one
    worker) and the world size."""
    every = limit_val_batches is None or isinstance(limit_val_batches, float) and limit_val_batches == 1.0
    return {"limit_val_batches": None if every else limit_val_batches, "batch": batch,
            "readers": max(1, num_workers), "world_size": world_size}


def shard_changes(old: dict | None, new: dict | None) -> list[str]:
    """What changed between two splits' shards (:func:`shard_record` s, or ``path -> bytes`` dicts of older
    checkpoints): the shards named (:func:`named_changes`) where both lists are known, else ``N shards -> M shards,
    contents differ``; nothing where either is None or the digests agree."""
    old, new = as_shard_record(old), as_shard_record(new)
    if old is None or new is None or old["sha256"] == new["sha256"]:
        return []
    if old["sizes"] is not None and new["sizes"] is not None:
        return named_changes(old["sizes"], new["sizes"])
    return [f"{old['count']} shards -> {new['count']} shards, contents differ (a record of more than "
            f"{FULL_LIST_MAX} shards holds their digest, not their list)"]


def named_changes(old: dict[str, int | None], new: dict[str, int | None]) -> list[str]:
    """``N added (...)``, ``N removed (...)``, ``N rewritten (...: A -> B bytes)`` between two :func:`shard_sizes`."""
    added = [s for s in new if s not in old]
    removed = [s for s in old if s not in new]
    rewritten = [s for s in new if s in old and old[s] != new[s]]
    changes = []
    if added:
        changes.append(f"{len(added)} added ({name_shards(added)})")
    if removed:
        changes.append(f"{len(removed)} removed ({name_shards(removed)})")
    if rewritten:
        first = rewritten[0]
        changes.append(f"{len(rewritten)} rewritten ({name_shards(rewritten)}; {first}: {old[first]} -> "
                       f"{new[first]} bytes)")
    return changes


def setting_changes(old: dict[str, Any], new: dict[str, Any], keys: tuple[str, ...]) -> list[str]:
    """``key old -> new`` for each of ``keys`` both records hold with different values."""
    return [f"{k} {old[k]!r} -> {new[k]!r}" for k in keys if k in old and k in new and old[k] != new[k]]


def resume_notes(old: dict[str, Any], new: dict[str, Any], epoch: int) -> tuple[list[str], bool]:
    """The warnings of a resume whose checkpoint recorded ``old`` (:func:`data_record`) and that reads ``new``, and
    whether the training stream must start epoch ``epoch`` (the checkpoint's next) rather than go on mid-way."""
    notes: list[str] = []
    old_set, new_set = old.get("settings") or {}, new.get("settings") or {}
    shards = shard_changes(old.get("train_shards"), new.get("train_shards"))
    if shards:
        notes.append(
            f"resuming with other training shards than the checkpoint's (data.train_shards: {'; '.join(shards)}): "
            f"its stream position counts samples of the old shards, so the training stream starts epoch {epoch} on "
            "the new ones instead of going on mid-epoch (no clip skipped or read again by a stale position)")
    settings = setting_changes(old_set, new_set, TRAIN_SETTINGS)
    if settings:
        notes.append(f"resuming with other data settings than the checkpoint's ({'; '.join(settings)}): the run "
                     "goes on from its step under the new ones")
    if "seed" in old_set and "seed" in new_set and old_set["seed"] != new_set["seed"]:
        notes.append(f"data.seed {new_set['seed']!r} is not applied on a resume: the training stream goes on with "
                     f"the checkpoint's seed {old_set['seed']!r} (a new seed: a new run, --ckpt_path null)")
    val = val_changes(old, new)
    if val:
        notes.append(
            f"resuming with another validation split than the checkpoint's ({'; '.join(val)}): val/loss and the "
            "evaluation scores from here on are of other clips than the earlier steps' on the same curve, so not "
            "comparable with them; to keep one curve, resume with the earlier split (data.val_shards, val_clips, "
            "frames, fps, resolution as before, and under a cap trainer.limit_val_batches, the validation batch, "
            "data.num_workers and the world size), or log the new split as a new run (--ckpt_path null, or "
            "--model.init_args.init_from the checkpoint with another trainer.logger name)")
    return notes, bool(shards)


def val_changes(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """What differs in the validation split between two :func:`data_record` s: its shards, :data:`VAL_SETTINGS`
    and, under a cap, how it is read (:func:`reading_changes`)."""
    old_val, new_val = old.get("val_shards"), new.get("val_shards")
    if old_val is None or new_val is None:  # no validation before or now: no curve to keep comparable
        return []
    old_set, new_set = old.get("settings") or {}, new.get("settings") or {}
    changes = [f"data.val_shards: {c}" for c in shard_changes(old_val, new_val)]
    changes += setting_changes(old_set, new_set, VAL_SETTINGS)
    capped = old_set.get("val_clips") is not None or new_set.get("val_clips") is not None
    return changes + reading_changes(old.get("val_reading"), new.get("val_reading"), capped)


def reading_changes(old: dict[str, Any] | None, new: dict[str, Any] | None, val_clips: bool) -> list[str]:
    """What differs between two :func:`validation_reading` records that changes the validated clips: another
    ``limit_val_batches``; under it, another validation batch; under either cap (it, or ``val_clips`` where the
    checkpoint or the resume sets one), other readers per rank or another world size. None of them matters without a
    cap (every clip is read, each once), nor where either record is missing (an older checkpoint)."""
    if old is None or new is None:
        return []
    changes, limited = [], old["limit_val_batches"] is not None or new["limit_val_batches"] is not None
    if old["limit_val_batches"] != new["limit_val_batches"]:
        changes.append(f"trainer.limit_val_batches {_every(old['limit_val_batches'])} -> "
                       f"{_every(new['limit_val_batches'])}")
    if limited and old["batch"] != new["batch"]:
        changes.append(f"validation batch {old['batch']} -> {new['batch']} clips per rank (data.val_batch_size, else "
                       "data.batch_size over the ranks), in which trainer.limit_val_batches counts")
    capped = "trainer.limit_val_batches" if limited else "data.val_clips" if val_clips else None
    if capped and old["readers"] != new["readers"]:
        changes.append(f"loader workers {old['readers']} -> {new['readers']} per rank (data.num_workers, 0 reading as "
                       f"1), which split the validation stream under {capped}")
    if capped and old["world_size"] != new["world_size"]:
        changes.append(f"world size {old['world_size']} -> {new['world_size']}, which splits the validation stream "
                       f"under {capped}, a cap per rank")
    return changes


def _every(limit: int | float | None) -> str:
    """A recorded ``limit_val_batches`` as the trainer takes it (None: every batch)."""
    return "1.0 (every batch)" if limit is None else repr(limit)


def mixed_epoch(resume: dict | None, old_batch: int, new_batch: int, batches: int, workers: int) -> str | None:
    """The warning of a resume that goes on with epoch ``resume["epoch"]`` mid-way (``resume``: the stream's
    position, ``StreamState.resume``) under another per-rank batch, ``old_batch`` -> ``new_batch`` clips, in an epoch
    of ``batches`` batches at the new size over ``workers`` loader workers (rank 0's figures, from rank 0). The
    position counts the batches each worker delivered, and so does Lightning, so the stream goes on from the clip
    after the last one trained (none read twice, none left out before it) for the new epoch's batches less those
    trained (each worker its share less its own), at the new size. Where the trained batches reach the new epoch's,
    ``resume["ended"]`` is set: the epoch ends there (:class:`~mardini.data.stream_loader.StreamLoader` gives Lightning
    no batch of it) and the next one starts whole; before, the stream started the next epoch inside it, and Lightning,
    its count past the epoch's end, trained all of it in the interrupted epoch, its epochs one behind the stream's from
    there. Called on every rank where the global batch changed, also where this rank's own is the same (2 -> 2 of
    ``data.batch_size`` 4 -> 5 on 2 ranks): the epoch's batch count changed for all, and the ranks, which step
    together, must all end it. None where the epoch does not go on mid-way (no position; other workers), or goes on
    at this rank's same batch (nothing to say)."""
    if resume is None or resume["workers"] != workers:
        return None
    done = {int(w): int(b) for w, (_, b) in resume["progress"].items()}  # worker -> batches delivered
    trained, full = sum(done.values()), batches * new_batch
    ended = trained >= batches  # the same on every rank: each trained as many batches, the epoch's count is shared
    rest = 0 if ended else sum(max(0, worker_quota(batches, w, workers) - done.get(w, 0)) for w in range(workers))
    clips = trained * old_batch + rest * new_batch
    head = (f"resuming epoch {resume['epoch']} mid-way under another batch size ({old_batch} -> {new_batch} clips per "
            f"batch on rank 0): it trained {_batches(trained)} of {old_batch} ({trained * old_batch} clips), and its "
            "position, as Lightning's count, is in batches")
    if ended:
        resume["ended"] = True
        return (f"{head}, which already reach the {batches} of an epoch at the new size: the epoch ends there, "
                f"{clips} clips instead of the {full} of an uninterrupted epoch (the last {full - clips} clips of its "
                f"stream never read), and epoch {resume['epoch'] + 1} starts whole at the new size")
    if old_batch == new_batch:
        return None
    if clips > full:
        odd = f"{clips - full} clips more: its stream goes on past the end an uninterrupted epoch's would have"
    else:
        odd = f"{full - clips} clips fewer: the last {full - clips} of its stream never read"
    return (f"{head}: it goes on from the clip after the last one trained (none read twice) for the "
            f"{_batches(rest)} of {new_batch} left of the {batches} an epoch has at the new size, so this epoch trains "
            f"{clips} clips per rank instead of the {full} of an uninterrupted epoch ({odd}); the next epochs are of "
            "the new size. To train the epoch exactly, resume at the old batch size and change it at an epoch's end")


def _batches(n: int) -> str:
    """``1 batch``, ``N batches``."""
    return f"{n} batch" if n == 1 else f"{n} batches"
