"""One task of ``evaluate.py``: every method scored on the same N clips, masks and seeds (:func:`run_task`), its
progress saved and resumed, and the real statistics cached, checked against the clips read, or recomputed."""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

import torch

from mardini.evaluation.arguments import sample_resolution
from mardini.evaluation.clip_choice import describe_unusable
from mardini.evaluation.data import iter_batches
from mardini.evaluation.external import ClipNames, GeneratedVideos
from mardini.evaluation.notices import rates_read
from mardini.evaluation.protocol import EvalProtocol, EvalSuite, RealStatsCache, clip_seeds, files_id, keys_digest
from mardini.evaluation.resume import TaskCheckpoint, TaskProgress
from mardini.evaluation.run_setup import device_of
from mardini.evaluation.sample_checks import check_done_clips, check_finite, model_clips
from mardini.evaluation.samplers import PipelineSampler, to_real_size


def run_task(
    task: str, args: argparse.Namespace, samplers: dict[str, Any], kind: str, files: list[str], n: int,
    networks: dict | None = None, checkpoint: TaskCheckpoint | None = None,
) -> dict[str, Any]:
    """Score every method on one task; returns ``{protocol, results: {method: {metric: value}}, ...}``.

    The model (``samplers["mardini"]``) samples at :func:`sample_resolution`: where that is not ``--resolution``, it
    is given the same clips read at that size, and its outputs are resized to ``--resolution`` to be scored.
    ``checkpoint``: where the task's progress is saved every ``--save-every`` clips and resumed from (none: not
    saved)."""
    size = sample_resolution(args, samplers.get("mardini"))
    proto = EvalProtocol(
        task=task, frames=args.frames, resolution=args.resolution, num_clips=n, seed=args.seed,
        metrics=None if args.metrics is None else tuple(args.metrics), missing_weights=args.missing_weights,
        i3d_weights=args.i3d_weights, inception_weights=args.inception_weights, lpips_weights=args.lpips_weights,
        fvd_pad_short=args.fvd_pad_short, steps=args.steps, guidance_scale=args.guidance, eta=args.eta,
        extra={"fps": args.fps, "data": args.data, **({"sample_resolution": size} if "mardini" in samplers else {})},
    )
    first = EvalSuite(proto, networks)  # the one real side: computed (or read from the cache) and held once
    shared = {"fvd": getattr(first.metrics.get("fvd"), "network", None),
              "fid": getattr(first.metrics.get("fid"), "inception", None)}
    suites = {m: first if i == 0 else EvalSuite(proto, {k: v for k, v in shared.items() if v is not None},
                                                real_side=False)  # the generated side only; the real one copied below
              for i, m in enumerate(samplers)}
    device = device_of(args)
    for s in suites.values():
        s.to(device)  # metric states (and the FVD/FID networks) where the clips are
    data_id = {"files": files_id(files), "frames": args.frames, "fps": args.fps, "resolution": args.resolution,
               "num_clips": n, "frame_rule": FRAME_RULE}
    cache = RealStatsCache(args.cache_dir) if args.cache_dir else None
    hit = first.load_real_cache(cache, data_id) if cache else None
    run = {m: (PipelineSampler(s, proto.steps, proto.guidance_scale, proto.eta) if m == "mardini" else s)
           for m, s in samplers.items()}
    if "mardini" in run:  # what the model runs with (1.0 where a plan-free checkpoint cannot be guided)
        proto.guidance_scale = run["mardini"].guidance_scale
    skipped: dict[str, str] = {}
    timed = [m for m, s in run.items() if not isinstance(s, GeneratedVideos)]  # an external method ran elsewhere
    done = TaskProgress(seconds={m: 0.0 for m in timed}, real_cached=bool(hit))
    resumed = checkpoint.load(suites) if checkpoint else None  # the suites' states restored
    lost_cache = False  # the resumed part's real statistics came from a cache file that is gone: recomputed
    if resumed:
        done, hit, lost_cache = resumed, *resumed_real_side(first, hit, resumed.real_cached)
    timing, began = done.seconds, time.perf_counter() - done.elapsed
    start = done.resume_at()  # the clips done are not read again (0: progress of an older evaluate.py)
    if start:
        skipped = done.skipped
    todo, first_batch = (n - done.clips, done.batches) if start else (n, 0)
    names = ClipNames(kind, args.data)  # what --export-inputs called the clips (same clips, same order)
    model_batches = (iter_batches(kind, files, args.frames, args.fps, size, todo, args.batch_size, start=start)
                     if "mardini" in run and size != args.resolution else None)  # the same clips at the model's size
    for b, batch in enumerate(iter_batches(kind, files, args.frames, args.fps, args.resolution, todo,
                                           args.batch_size, skipped, start), start=first_batch):
        if b < done.batches:  # done before a resume of older progress: read again (the order checked), not sampled
            check_done_clips(batch, done.clip_list[b * args.batch_size:], model_batches)
            continue
        real = batch["video"].to(device)  # (B, T, 3, RH, RW)
        positions = batch.get("positions")
        positions = None if positions is None else positions.to(device)  # (B, T, K, 2)
        mask = proto.mask(real.shape[0], real.device)  # (B, T)
        seed = clip_seeds(args.seed, done.clips, real.shape[0])  # one per clip, by its index: any --batch-size
        clip_names = [names(k) for k in batch["key"]]
        given = None if model_batches is None else model_clips(model_batches, batch, device)  # (B, T, 3, SH, SW)
        for m, sampler in run.items():
            start = time.perf_counter()
            if isinstance(sampler, GeneratedVideos):
                fake = sampler(task, clip_names, real, mask)  # (B, T, 3, RH, RW): read, real given frames
            elif m == "mardini" and given is not None:
                fake = to_real_size(sampler(given, mask, seed), real, mask)  # (B, T, 3, RH, RW), sampled at S
            else:
                fake = sampler(real, mask, seed)  # (B, T, 3, RH, RW)
            check_finite(fake, m, list(batch["key"]))
            fake = fake.clamp(-1, 1)
            if m in timing:
                timing[m] += time.perf_counter() - start
            suites[m].update(real, fake, mask, positions)
        done.batches, done.clips, done.read = b + 1, done.clips + real.shape[0], batch["read"]
        done.ids += clip_ids(batch)  # each clip's key and source frames: what the cached real statistics must match
        done.rates += [float(r) for r in batch["fps"]]  # the rate each clip was read at
        done.clip_list += [{"key": k, "frame_indices": meta.get("frame_indices"), "fps": round(float(r), 3),
                            **({"timing": "pts"} if meta.get("timing") == "pts" else {})}  # by timestamp (VFR)
                           for k, meta, r in zip(batch["key"], batch.get("meta") or [{}] * len(batch["key"]),
                                                 batch["fps"], strict=True)]
        print(progress_line(args.prog, task, done.clips, n, time.perf_counter() - began), file=sys.stderr, flush=True)
        if checkpoint and checkpoint.due(done):
            done.skipped = dict(skipped)
            checkpoint.save(done, suites, began)
    seen, ids = done.clips, done.ids
    if seen < n:  # the data changed since choose_num_clips read it
        raise ValueError(f"the data gave {seen} usable clips, the protocol needs {n}; lower --num-clips to {seen}"
                           + (f" ({describe_unusable(skipped)})" if skipped else ""))
    cache_state = ("hit" if hit else "computed") if first.frechet else "none (no FVD/FID)"
    if lost_cache and first.frechet:
        recompute_real(first, proto, args, kind, files, n, ids, device)
    if hit and not first.real_cache_matches(keys_digest(ids), seen):
        print(f"{args.prog}: note: the cached real statistics {sorted(hit.values())} were computed on other clips "
              f"than the {seen} this run read; recomputing them and rewriting the cache", file=sys.stderr)
        recompute_real(first, proto, args, kind, files, n, ids, device)
        hit, cache_state = None, "recomputed (the cached file was of other clips)"
    if first.frechet:
        if cache is not None and not hit:
            first.save_real_cache(cache, data_id, keys_digest(ids), seen, write=True)
        stats = first.real_stats()  # with each metric's FrechetReference: the real covariance decomposed once
        for s in suites.values():
            s.use_real_stats(stats)
    results = {m: suites[m].compute() for m in run}
    return {"protocol": proto.as_dict(), "clips": seen, "real_stats_cache": cache_state,
            "skipped_metrics": first.skipped, "skipped_videos": skipped,
            "fps_effective": rates_read(done.rates, args.fps), "clip_list": done.clip_list,
            "seconds_per_clip": {m: t / max(seen, 1) for m, t in timing.items()}, "results": results}


# The rule that picks a video file's source frames (mardini.evaluation.data.read_video_window), in the real-statistics
# cache key: 2 since a variable-frame-rate file is read by timestamp at a given --fps (1: always by index).
FRAME_RULE = 2


def resumed_real_side(suite: EvalSuite, hit: dict[str, str] | None, cached: bool) -> tuple[Any, bool]:
    """``(hit, lost)`` for a resumed task whose real statistics came from the cache before (``cached``) or were
    accumulated: accumulated ones go on from the restored states (a cache file written since is not used, as one
    run would not); ``lost``: they came from a cache file that is gone, so the real side is recomputed at the end."""
    if hit and not cached:
        suite.drop_real_stats()
        return None, False
    return hit, cached and not hit


def clip_ids(batch: dict[str, Any]) -> list[str]:
    """``"key frame_indices"`` of each clip of a batch: the real-statistics cache records their digest, so
    statistics of other source frames of the same files (another frame-selection rule) are not reused."""
    metas = batch.get("meta") or [{}] * len(batch["key"])
    return [f"{k} {json.dumps(m.get('frame_indices'))}" for k, m in zip(batch["key"], metas, strict=True)]


def recompute_real(suite: EvalSuite, proto: EvalProtocol, args: argparse.Namespace, kind: str, files: list[str],
                   n: int, ids: list[str], device: torch.device) -> None:
    """The real side of ``suite``'s Fréchet metrics from the clips again, in place of stale cached statistics (a
    second read of the data: no sampling)."""
    suite.drop_real_stats()
    again: list[str] = []
    for batch in iter_batches(kind, files, args.frames, args.fps, args.resolution, n, args.batch_size):
        real = batch["video"].to(device)  # (B, T, 3, RH, RW)
        suite.update_real(real, proto.mask(real.shape[0], device))
        again += clip_ids(batch)
    if sorted(again) != sorted(ids):
        raise ValueError(f"{args.data} gave other clips on a second read ({len(again)} clips, {len(ids)} before): "
                         "the data changed during the run; run again once it is written")


def progress_line(prog: str, task: str, done: int, total: int, elapsed: float) -> str:
    """``PROG: TASK: done/total clips, s/clip (every method, data and metrics), about T left``."""
    per_clip = elapsed / max(done, 1)
    left = per_clip * max(total - done, 0)
    when = f"{left:.0f} s" if left < 90 else f"{left / 60:.0f} min" if left < 5400 else f"{left / 3600:.1f} h"
    return f"{prog}: {task}: {done}/{total} clips, {per_clip:.2f} s/clip, about {when} left"
