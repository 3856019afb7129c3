"""``python evaluate.py``: benchmark protocols over a folder of videos, shards, or the embedded synthetic set.

    python evaluate.py --preset vidim --data data/videos/davis --checkpoint runs/joint/last.ckpt
    python evaluate.py --preset synthetic --checkpoint outputs/tiny/05_joint_task/checkpoints/last.ckpt         # + trajectory error
    python evaluate.py --preset synthetic --metrics midf traj --num-clips 16          # baselines only, no weights
    python evaluate.py --preset vidim --data DAVIS --export-inputs inputs/            # given frames for another method
    python evaluate.py --preset vidim --data DAVIS --generated film=film_out/         # ... and score its outputs

Every method (the baselines ``linear_blend`` and ``nearest_frame``, ``mardini`` with ``--checkpoint``, and each
``--generated NAME=DIR``: an external method's windows, see ``external.py``) sees the same clips, masks and seeds;
real statistics are computed once (or read from ``--cache-dir``). The model samples the clips read at its training
resolution (``--sample-resolution``; PAPER.md §5.3 samples MarDini-512 at 512) and its outputs are resized to
``--resolution`` to be scored, like every other method's. Sizes are a square side (``256``) or ``HxW`` (``36x64``,
parsed as ``sample.py --resolution``; RH x RW in the shape comments). Writes
``OUT/report.md`` (a table per task) and ``OUT/report.json`` after each task (``"status": "partial"`` until the end),
with a progress line per batch on stderr. FVD/FID need the metric weights: ``make weights``. A rerun of the same
command with the same ``--out`` resumes a stopped run (``resume.py``: finished tasks kept, the unfinished one goes on
from its last save, every ``--save-every`` clips); ``--fresh`` starts over.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import platform
import re
import sys
import time
from pathlib import Path
from typing import Any

import torch

import mardini
from mardini import run_info
from mardini.autoencoders.base import add_allow_autoencoder_argument
from mardini.data.sharding import write_text_atomic
from mardini.evaluation.data import count_clips, iter_batches, resolve_source, usable_shard_clips, usable_videos
from mardini.evaluation.external import ClipNames, GeneratedVideos, InputExport, shard_of_keys
from mardini.evaluation.protocol import (
    DEFAULT_METRICS, METRICS, TASKS, EvalProtocol, EvalSize, EvalSuite, RealStatsCache, clip_seeds, eval_size, files_id,
    keys_digest, resolve_metric_weights, same_aspect, sides, size_text,
)
from mardini.evaluation.resume import DEFAULT_SAVE_EVERY, RunState, TaskCheckpoint, TaskProgress, run_settings
from mardini.evaluation.samplers import BASELINES, PipelineSampler, Sampler, to_real_size
from mardini.run_info import code_version
from mardini.strict_json import dumps_strict
from mardini.user_errors import run_reporting_user_errors
from mardini.weights import sha256_file

PRESETS: dict[str, dict[str, Any]] = {
    # VIDIM-Bench (PAPER.md App. D): 9 consecutive frames at 256 px, first + last given, FVD/FID/MidF.
    "vidim": {"tasks": ["interpolation"], "frames": 9, "resolution": 256, "fps": None},
    # image-to-video on user videos: first frame given, FVD/FID.
    "i2v": {"tasks": ["image_to_video"], "frames": 9, "resolution": 256, "fps": None},
    # the embedded set at the demo loader's settings (9 frames at 8 fps, 32 px), both tasks, + trajectory error.
    "synthetic": {"tasks": list(TASKS), "frames": 9, "resolution": 32, "fps": 8.0, "data": "synthetic"},
}
ARROWS = {"psnr": "↑", "ssim": "↑", "detected": "↑", "ratio": "(1 = true motion)"}  # everything else: lower is better


def parse_args(argv: list[str] | None = None, prog: str = "evaluate.py") -> argparse.Namespace:
    """The options, checked; ``prog``: the command the usage, errors and notes name (kept as ``args.prog``)."""
    p = argparse.ArgumentParser(prog=prog, description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default=None, help="protocol defaults (flags override)")
    p.add_argument("--data", default=None, help="folder of videos, shard folder/pattern, or 'synthetic'")
    p.add_argument("--tasks", nargs="+", choices=TASKS, default=None)
    p.add_argument("--frames", type=int, default=None, help="window length T (default 9)")
    p.add_argument("--resolution", default=None, metavar="N|HxW",
                   help="size the clips are scored at: a square side N or HxW pixels, e.g. 36x64 (default 256)")
    p.add_argument("--fps", type=float, default=None, help="frame rate of the window (default: native, every frame)")
    p.add_argument("--num-clips", type=int, default=None,
                   help="N clips (default: every usable clip the data has, at most 256)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--metrics", nargs="+", choices=METRICS, default=None, help="default: the task's metrics")
    p.add_argument("--missing-weights", choices=("error", "skip"), default="error",
                   help="FVD/FID without weights files: stop with instructions (default) or leave them out")
    p.add_argument("--i3d-weights", default=None,
                   help="I3D pickle or folder (default: $MARDINI_WEIGHTS, else the checkout's weights/, else "
                        "~/.cache/mardini/weights)")
    p.add_argument("--inception-weights", default=None, help="InceptionV3 TorchScript or folder")
    p.add_argument("--lpips-weights", default=None, help="torchvision alexnet-owt-7be5be79.pth: adds MidF-LPIPS")
    p.add_argument("--fvd-pad-short", action="store_true",
                   help="FVD on windows under 9 frames: repeat the last frame up to I3D's 9 (the metric gets _pad)")
    p.add_argument("--methods", nargs="+", default=None,
                   help=f"of {[*BASELINES, 'mardini']} and the --generated NAMEs (default: the baselines, + mardini "
                        "with --checkpoint; every --generated method is scored)")
    p.add_argument("--checkpoint", default=None, help="a joint checkpoint: adds the 'mardini' method (EMA weights)")
    p.add_argument("--no-ema", action="store_true",
                   help="sample the checkpoint's raw weights instead of its EMA ones (as sample.py --no-ema)")
    p.add_argument("--generated", action="append", default=[], metavar="NAME=DIR",
                   help="score an external method's windows as method NAME: DIR/<task>/<clip name>.mp4 or "
                        "DIR/<task>/<clip name>/ frame images (names: --export-inputs); repeatable")
    p.add_argument("--export-inputs", default=None, metavar="DIR",
                   help="write each task's given frames (DIR/<task>/<clip name>/frame_XX.png) and DIR/<task>/"
                        "clips.json for an external method, and score nothing")
    p.add_argument("--window", type=int, default=None,
                   help="the trained window (frames) of a checkpoint that records none (default: what it records)")
    add_allow_autoencoder_argument(p)
    p.add_argument("--sample-resolution", default=None, metavar="N|HxW|protocol",
                   help="size the model samples at (N or HxW, of --resolution's aspect ratio), its outputs resized "
                        "to --resolution for scoring (default: the checkpoint's training size where it records one "
                        "of --resolution's aspect ratio, else --resolution; 'protocol' = --resolution)")
    p.add_argument("--steps", type=int, default=25, help="DDIM steps of the model")
    p.add_argument("--guidance", type=float, default=None, help="guidance scale (default 1.0 interp., 2.5 I2V)")
    p.add_argument("--eta", type=float, default=0.0,
                   help="DDIM eta of the model, in [0, 1]: 0 deterministic (paper), 1 ancestral")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="fp32", choices=("fp32", "bf16"))
    p.add_argument("--out", default=None, help="report folder (default outputs/eval/<data name>)")
    p.add_argument("--cache-dir", default="outputs/eval/real_stats", help="real-statistics cache ('' = off)")
    p.add_argument("--save-every", type=int, default=DEFAULT_SAVE_EVERY, metavar="N",
                   help=f"save the task's progress to OUT/state/ every N clips: a rerun of the same command resumes "
                        f"there (default {DEFAULT_SAVE_EVERY})")
    p.add_argument("--fresh", action="store_true",
                   help="start over in --out instead of resuming the stopped run there (its report is replaced)")
    args = p.parse_args(argv)
    args.prog = prog
    preset = PRESETS.get(args.preset, {}) if args.preset else {}
    for key, default in (("tasks", list(TASKS)), ("frames", 9), ("resolution", 256), ("data", None)):
        if getattr(args, key) is None:
            setattr(args, key, preset.get(key, default))
    if args.fps is None:
        args.fps = preset.get("fps")
    try:
        args.resolution = eval_size(args.resolution, "--resolution")
    except ValueError as err:
        p.error(str(err))
    if args.data is None:
        p.error("--data is required (a folder of videos, shards, or 'synthetic'; or --preset synthetic)")
    if args.batch_size < 1 or (args.num_clips is not None and args.num_clips < 2):
        p.error("--batch-size must be >= 1 and --num-clips >= 2")
    if args.save_every < 1:
        p.error(f"--save-every {args.save_every} is impossible: it must be >= 1 (clips between two saves)")
    args.generated = parse_generated(p, args.generated)
    if args.export_inputs is not None and (args.generated or args.checkpoint or args.methods):
        p.error("--export-inputs writes the inputs and scores nothing: run it without --generated, --checkpoint "
                "and --methods, then score with --generated NAME=DIR")
    if args.methods is None:
        args.methods = [*BASELINES] + (["mardini"] if args.checkpoint else [])
    unknown = set(args.methods) - {*BASELINES, "mardini", *args.generated}
    if unknown:
        p.error(f"unknown methods {sorted(unknown)}; choose from {[*BASELINES, 'mardini', *args.generated]}")
    if "mardini" in args.methods and not args.checkpoint:
        p.error("method 'mardini' needs --checkpoint PATH (a joint checkpoint written by train.py)")
    args.methods = [m for m in args.methods if m not in args.generated]  # the built-in ones; every --generated runs
    if args.no_ema and "mardini" not in args.methods:
        p.error("--no-ema picks the model's weights: it needs --checkpoint" if not args.checkpoint else
                f"--no-ema picks the model's weights, but the model ('mardini') is not among --methods "
                f"{args.methods}: add it, or leave --no-ema out")
    if args.sample_resolution is not None:
        if "mardini" not in args.methods:
            p.error("--sample-resolution sets the size the model samples at: it needs --checkpoint"
                    if not args.checkpoint else
                    f"--sample-resolution sets the size the model samples at, but the model ('mardini') is not among "
                    f"--methods {args.methods}: add it, or leave --sample-resolution out")
        if args.sample_resolution != "protocol":
            args.sample_resolution = parse_sample_resolution(p, args.sample_resolution, args.resolution)
    return args


def parse_sample_resolution(p: argparse.ArgumentParser, text: str, protocol: EvalSize) -> EvalSize:
    """``--sample-resolution N|HxW`` as a size (``p.error`` on a malformed one, or one of another aspect ratio than
    ``--resolution``: its outputs would be stretched, and its clips would show another region of the frames)."""
    try:
        size = eval_size(text, "--sample-resolution")
    except ValueError as err:
        p.error(f"{err}; or 'protocol' (sample at --resolution)")
    if not same_aspect(size, protocol):
        p.error(f"--sample-resolution {size_text(size)} has another aspect ratio than --resolution "
                f"{size_text(protocol)}: its outputs would be stretched to be scored; give a size of the same aspect "
                f"ratio, or score at it (--resolution {size_text(size)})")
    return size


def sample_resolution(args: argparse.Namespace, pipe: Any) -> EvalSize:
    """The size the model samples at (a side, or ``(H, W)``): ``--sample-resolution``, or by default the
    checkpoint's training size where it records one of ``--resolution``'s aspect ratio (else, and without a model,
    ``--resolution``)."""
    asked = getattr(args, "sample_resolution", None)
    if pipe is None or asked == "protocol":
        return args.resolution
    if asked is not None:
        return asked
    trained = eval_size(tuple(pipe.resolution)) if getattr(pipe, "resolution", None) else None
    return trained if trained is not None and same_aspect(trained, args.resolution) else args.resolution


def parse_generated(p: argparse.ArgumentParser, specs: list[str]) -> dict[str, str]:
    """``{NAME: DIR}`` of the ``--generated NAME=DIR`` flags (``p.error`` on a malformed, taken or missing one)."""
    out: dict[str, str] = {}
    for spec in specs:
        name, sep, folder = spec.partition("=")
        if not sep or not re.fullmatch(r"[A-Za-z0-9_.-]+", name) or not folder:
            p.error(f"--generated {spec!r}: write NAME=DIR, NAME of letters, digits, '_', '.', '-' "
                    "(e.g. film=out/film)")
        if name in (*BASELINES, "mardini") or name in out:
            p.error(f"--generated {spec!r}: the method name {name!r} is taken; pick another NAME")
        if not Path(folder).is_dir():
            p.error(f"--generated {spec!r}: {folder} is not a folder (it holds <task>/<clip name>.mp4 or "
                    "<task>/<clip name>/ frames)")
        out[name] = folder
    return out


# ------------------------------------------------------------------------------------------------
# Running
# ------------------------------------------------------------------------------------------------
def metric_weights(args: argparse.Namespace) -> dict[str, dict[str, str] | None]:
    """The weight files of the metrics the run scores, found and verified before any data is read (a missing one
    stops it at once under ``--missing-weights error``); see :func:`resolve_metric_weights`. Each task's protocol
    settings are checked first, so an impossible one is named before a missing file."""
    for task in args.tasks:
        EvalProtocol(task=task, frames=args.frames, resolution=args.resolution, num_clips=args.num_clips or 2,
                     metrics=None if args.metrics is None else tuple(args.metrics), fvd_pad_short=args.fvd_pad_short,
                     missing_weights=args.missing_weights, steps=args.steps, guidance_scale=args.guidance, eta=args.eta)
    metrics = args.metrics or sorted({m for task in args.tasks for m in DEFAULT_METRICS[task]})
    return resolve_metric_weights(metrics, args.missing_weights, args.i3d_weights, args.inception_weights,
                                  args.lpips_weights, prog=args.prog)


DEFAULT_MAX_CLIPS = 256  # N without --num-clips: every usable clip, at most this many (a notice when it drops some)


def choose_num_clips(
    args: argparse.Namespace, kind: str, files: list[str], keys: list[str] | None = None,
) -> tuple[int, dict[str, str], int]:
    """``(N, {unusable video: reason}, clips available)``: ``--num-clips``, or by default every usable clip (at most
    ``DEFAULT_MAX_CLIPS``); the usable clips' keys, in the order the tasks read them, are appended to ``keys`` (the
    first N are the protocol's). ``available``: the video files, or samples in the shards, that the data holds.

    The clips are read once here (video files, or shard samples), so corrupt or too-short ones lower the default N
    before any task runs (every task and method is then scored on the same N clips); an explicit ``--num-clips``
    they cannot give is an error.
    """
    available = count_clips(kind, files)
    n = args.num_clips if args.num_clips is not None else min(available, DEFAULT_MAX_CLIPS)
    if n > available:
        raise ValueError(f"--num-clips {n} but {args.data} holds {available} clips; lower --num-clips")
    skipped: dict[str, str] = {}
    if kind == "videos":
        found = usable_videos(files, args.frames, args.fps, args.resolution, n, skipped)
        usable = len(found)
        if keys is not None:
            keys += found
    else:
        usable, bad = usable_shard_clips(files, args.frames, args.fps, args.resolution, n, keys)
        if bad:
            skipped[f"{bad} shard samples"] = ("do not decode or are too short for the window (the first few "
                                               "reasons are logged above)")
    if args.num_clips is not None and 2 <= usable < n:
        raise ValueError(f"--num-clips {n} but {args.data} gives {usable} usable clips ({_unusable(skipped)}); "
                         f"lower --num-clips to {usable}, or leave it out to use every usable clip")
    n = usable
    if n < 2:
        raise ValueError(f"{args.data} gives {n} usable clips of {args.frames} frames, the protocol needs at least 2"
                         + (f" ({_unusable(skipped)})" if skipped else "") + "; add videos or lower --frames")
    return n, skipped, available


def capped_note(args: argparse.Namespace, n: int, available: int) -> str | None:
    """A notice when the default cap left clips of the data out (None when every clip was read, or --num-clips
    chose N)."""
    if args.num_clips is not None or n < DEFAULT_MAX_CLIPS or available <= n:
        return None
    return (f"{n} of the {available} clips {args.data} holds were scored: without --num-clips the protocol takes the "
            f"first {DEFAULT_MAX_CLIPS} usable ones; --num-clips N scores more, up to the usable ones of the {available} "
            "(a file that does not decode, or is too short, is skipped)")


def _unusable(skipped: dict[str, str]) -> str:
    return f"unusable: {dict(list(skipped.items())[:3])}" + (f" and {len(skipped) - 3} more" if len(skipped) > 3 else "")


def build_samplers(args: argparse.Namespace) -> dict[str, Sampler]:
    out: dict[str, Sampler] = {m: BASELINES[m]() for m in args.methods if m in BASELINES}
    if "mardini" in args.methods:
        from mardini.pipeline import MarDiniPipeline

        pipe = MarDiniPipeline.from_checkpoint(args.checkpoint, ema=not args.no_ema, device=args.device,
                                               dtype=args.dtype, window=args.window,
                                               allow_autoencoders=args.allow_autoencoder)
        if args.frames > pipe.window:  # the protocol scores one window per clip: no window-by-window sampling here
            raise ValueError(f"--frames {args.frames} is more than the {pipe.window}-frame window of {args.checkpoint} "
                             f"(its trained window; where the checkpoint records none, its size's guess, which "
                             f"--window T replaces); evaluate it with --frames {pipe.window}")
        out["mardini"] = pipe  # wrapped per task (guidance differs)
    for name, folder in args.generated.items():
        out[name] = GeneratedVideos(name, folder, args.frames, args.resolution)
    return out


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
                           + (f" ({_unusable(skipped)})" if skipped else ""))
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


def check_done_clips(batch: dict[str, Any], saved: list[dict[str, Any]], model_batches: Any) -> None:
    """A batch done before a resume: its keys must be the saved run's (the clips go on in the same order); the
    model's read at its own size (``model_batches``) moves on with it."""
    keys = list(batch["key"])
    if keys != [c["key"] for c in saved[:len(keys)]]:
        raise ValueError("the data gives other clips than the stopped run read (it changed since): start over with "
                         "--fresh, or write to another --out")
    if model_batches is not None:
        next(model_batches, None)


def clip_ids(batch: dict[str, Any]) -> list[str]:
    """``"key frame_indices"`` of each clip of a batch: the real-statistics cache records their digest, so
    statistics of other source frames of the same files (another frame-selection rule) are not reused."""
    metas = batch.get("meta") or [{}] * len(batch["key"])
    return [f"{k} {json.dumps(m.get('frame_indices'))}" for k, m in zip(batch["key"], metas, strict=True)]


def model_clips(batches: Any, batch: dict[str, Any], device: torch.device) -> torch.Tensor:
    """The next batch of the model's read of the clips, ``(B, T, 3, SH, SW)``, checked to hold ``batch``'s clips."""
    other = next(batches, None)
    if other is None or list(other["key"]) != list(batch["key"]):
        raise ValueError("the data gave other clips at --sample-resolution than at --resolution (it changed during "
                         "the run); run again once it is written")
    return other["video"].to(device)


FPS_TOLERANCE = 0.1  # a clip read at a rate this far (relative) from --fps is reported


def rates_read(rates: list[float], fps: float | None) -> dict[str, Any]:
    """``{min, max}`` of the rates the clips were read at, and ``off``: the count (and range) of those more than
    ``FPS_TOLERANCE`` from ``fps`` (none for the native rate)."""
    off = [r for r in rates if fps is not None and abs(r - fps) > FPS_TOLERANCE * fps]
    out: dict[str, Any] = {"min": round(min(rates), 3), "max": round(max(rates), 3), "off": len(off)}
    if off:
        out.update(off_min=round(min(off), 3), off_max=round(max(off), 3))
    return out


def rate_note(eff: dict[str, Any], fps: float | None, clips: int) -> str | None:
    """A note when clips were read more than 10 % away from ``--fps`` (None when none were)."""
    if not eff.get("off"):
        return None
    lo, hi = eff["off_min"], eff["off_max"]
    span = f"{lo:g} fps" if lo == hi else f"{lo:g}-{hi:g} fps"
    return (f"{eff['off']} of {clips} clips were read at {span}, more than {FPS_TOLERANCE:.0%} from --fps {fps:g} "
            "(a window takes every k-th source frame, k >= 1 a whole number: a source slower than --fps is read "
            "at its own rate); the metrics are of the rates read (report.json: fps_effective)")


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


def check_finite(fake: torch.Tensor, method: str, keys: list[str]) -> None:
    """Refuse a method's output ``(B, T, 3, RH, RW)`` holding NaN or inf (clamping would hide inf and keep NaN),
    naming the method and the clips."""
    bad = (~torch.isfinite(fake)).flatten(1).sum(1)  # (B,) non-finite values per clip
    if bad.any():
        clips = [f"{keys[i]} ({int(bad[i])})" for i in bad.nonzero().flatten().tolist()]
        shown = ", ".join(clips[:5]) + (f" and {len(clips) - 5} more" if len(clips) > 5 else "")
        hint = " (check the checkpoint; bf16 sampling can overflow: --dtype fp32)" if method == "mardini" else ""
        raise ValueError(f"method {method!r} generated non-finite values (NaN or inf) in {len(clips)} of "
                         f"{len(keys)} clips of a batch: {shown}; they cannot be scored{hint}")


def progress_line(prog: str, task: str, done: int, total: int, elapsed: float) -> str:
    """``PROG: TASK: done/total clips, s/clip (every method, data and metrics), about T left``."""
    per_clip = elapsed / max(done, 1)
    left = per_clip * max(total - done, 0)
    when = f"{left:.0f} s" if left < 90 else f"{left / 60:.0f} min" if left < 5400 else f"{left / 3600:.1f} h"
    return f"{prog}: {task}: {done}/{total} clips, {per_clip:.2f} s/clip, about {when} left"


SMALL_FRECHET_SAMPLE = 256  # clips below which a Fréchet distance gets a caveat in the report
FRECHET_KEY = re.compile(r"(fvd|fid)\d+_\d+f")  # the Fréchet metrics' result names: fvd{N}_{T}f[_pad], fid{N}_{T}f


def small_sample_note(report: dict[str, Any]) -> str | None:
    """A caveat for FVD/FID computed from few clips (None when there are none, or enough clips)."""
    results = [r for res in report["tasks"].values() for r in res["results"].values()]
    frechet = sorted({match[1] for r in results for k, v in r.items()
                      if v is not None and (match := FRECHET_KEY.match(k))})
    if not frechet or report["clips"] >= SMALL_FRECHET_SAMPLE:
        return None
    return (f"{' and '.join(m.upper() for m in frechet)} from {report['clips']} clips: a Fréchet distance is biased "
            "upward on small samples (the bias shrinks as the clips grow) and varies between draws, so compare methods "
            "only at the same number of clips and seed; --num-clips raises it")


def training_mismatch(pipe: Any, args: argparse.Namespace) -> list[str]:
    """Notes where the protocol samples the checkpoint at another resolution or frame rate than it trained at."""
    if pipe is None:
        return []
    notes = []
    trained = tuple(pipe.resolution) if pipe.resolution else None
    h, w = sides(sample_resolution(args, pipe))
    if trained and trained != (h, w):
        fix = "" if same_aspect(trained, (h, w)) else \
            f"; score at its aspect ratio to sample it at its own size (--resolution {size_text(eval_size(trained))})"
        notes.append(f"the checkpoint trained at {trained[0]}x{trained[1]} px, the protocol samples it at "
                     f"{h}x{w} (--sample-resolution){fix}")
    if pipe.fps and args.fps != pipe.fps:
        notes.append(f"the checkpoint trained on clips at {pipe.fps:g} fps, the protocol reads "
                     f"{'every frame (native rate)' if args.fps is None else f'{args.fps:g} fps'} (--fps)")
    return notes


def data_path(data: str) -> str:
    """What ``--data`` names, as an absolute path ('synthetic' stays itself)."""
    return data if data == "synthetic" else str(Path(data).resolve())


def default_out(data: str, path: str, prog: str = "evaluate.py") -> Path:
    """``outputs/eval/<data name>``; when that folder holds the report of other data of the same name (two splits
    called ``val``), ``outputs/eval/<data name>-<hash of the path>`` instead of overwriting it."""
    name = Path(data.rstrip("/")).name
    out = Path("outputs/eval") / name
    try:
        earlier = json.loads((out / "report.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return out
    theirs = earlier.get("data_path") or data_path(str(earlier.get("data", "")))
    if theirs == path:
        return out
    other = out.with_name(f"{name}-{hashlib.sha1(path.encode()).hexdigest()[:8]}")
    print(f"{prog}: note: {out} holds the report of {theirs}; writing this one to {other} (--out picks a folder)",
          file=sys.stderr)
    return other


def device_of(args: argparse.Namespace) -> torch.device:
    if args.device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(args.device)


def device_name(device: torch.device) -> str:
    """The GPU's name for a CUDA device, else the machine line (architecture, threads, CPU kernels)."""
    return torch.cuda.get_device_name(device) if device.type == "cuda" else run_info.machine_line()


def checkpoint_file(path: str | None, pipe: Any) -> dict[str, Any] | None:
    """``{path, sha256, global_step}`` of the checkpoint the model was loaded from (None without the model): a
    path alone does not say which weights scored (``last.ckpt`` is overwritten as training goes on). The sha256 is
    read right after loading, in one streaming pass; the step is what the loader read (no second load)."""
    if not path or pipe is None:
        return None
    step = getattr(pipe, "info", {}).get("global_step")
    return {"path": str(Path(path).resolve()), "sha256": sha256_file(path),
            "global_step": None if step is None else int(step)}


# ------------------------------------------------------------------------------------------------
# Report
# ------------------------------------------------------------------------------------------------
def _fmt(value: float | None) -> str:
    """A result for the table: ``–`` = not computed, ``NaN`` = computed and undefined (e.g. no object detected)."""
    if value is None:
        return "–"
    if math.isnan(value):
        return "NaN"
    return f"{value:.4f}" if abs(value) < 100 else f"{value:.2f}"


def _read_at(report: dict[str, Any]) -> str:
    """``; read at LO-HI`` where the clips were read at other rates than the asked --fps ('' otherwise)."""
    eff = report.get("fps_effective")
    if not eff or report.get("fps") is None or eff["min"] == eff["max"] == report["fps"]:
        return ""
    return f"; read at {eff['min']:g}" + ("" if eff["min"] == eff["max"] else f"-{eff['max']:g}")


def _timestamped(report: dict[str, Any]) -> str:
    """``; N read by timestamp`` where clips came from variable-frame-rate files ('' otherwise)."""
    n = report.get("timestamped")
    return f"; {n} variable-rate read by timestamp" if n else ""


def _sampled_at(report: dict[str, Any]) -> str:
    """``; the model sampled at S px, downscaled`` (or upscaled) where it sampled at another size than the
    protocol's ('' otherwise)."""
    size = report.get("sample_resolution")
    if size is None or sides(size) == sides(report["resolution"]):
        return ""
    (sh, sw), (rh, rw) = sides(size), sides(report["resolution"])
    return f"; the model sampled at {size_text(size)} px, {'down' if sh * sw > rh * rw else 'up'}scaled"


def markdown(report: dict[str, Any]) -> str:
    lines = [f"# Evaluation on `{report['data']}`", "",
             f"{report['clips']} clips, {report['frames']} frames at {size_text(report['resolution'])} px"
             f"{_sampled_at(report)} "
             f"(fps: {report['fps'] or 'native'}{_read_at(report)}{_timestamped(report)}), seed {report['seed']}. "
             f"Command: `{report['command']}`", ""]
    if report.get("status") == "partial":
        asked = report.get("tasks_asked") or list(report["tasks"])
        lines += [f"**Partial report**: {len(report['tasks'])} of {len(asked)} tasks finished "
                  f"({', '.join(asked)}); the run is still going, or stopped before the rest.", ""]
    for notice in report.get("notices") or []:
        lines += [f"Note: {notice}.", ""]
    skipped = report.get("skipped_videos") or {}
    if skipped:  # the files left out of the N clips, and why (all of them in report.json)
        lines += [f"{len(skipped)} videos skipped (unusable):" if report.get("source") == "videos"
                  else "Skipped while reading the shards:", ""]
        lines += [f"- `{path}`: {why.splitlines()[0]}" for path, why in list(skipped.items())[:10]]
        lines += [f"- ... and {len(skipped) - 10} more (report.json)"] if len(skipped) > 10 else []
        lines.append("")
    for task, res in report["tasks"].items():
        names = sorted({k for r in res["results"].values() for k in r})
        head = [f"{n} {ARROWS.get(n.split('_')[-1], '↓')}" for n in names]
        lines += [f"## {task}", "", "| method | " + " | ".join(head) + " | s/clip |",
                  "|---" * (len(names) + 2) + "|"]
        for method, r in res["results"].items():
            per_clip = res["seconds_per_clip"].get(method)  # none for an external method (--generated)
            row = [_fmt(r.get(n)) for n in names] + ["–" if per_clip is None else f"{per_clip:.3f}"]
            lines.append(f"| {method} | " + " | ".join(row) + " |")
        for metric, why in res["skipped_metrics"].items():
            lines.append(f"\n- `{metric}` left out: {why.splitlines()[0]}")
        lines.append(f"\nReal statistics: {res['real_stats_cache']}. Guidance {res['protocol']['guidance_scale']}, "
                     f"{res['protocol']['steps']} DDIM steps, eta {res['protocol'].get('eta', 0.0)}"
                     f"{', raw weights (--no-ema)' if report.get('weights_sampled') == 'raw' else ''} (model only).\n")
    lines.append("Metrics: FVD/FID lower is better; MidF = frame T//2; traj = colour-centroid position error of "
                 "the synthetic objects in generated frames (pixels, fraction of the frame; detected = share found).")
    if report.get("generated"):
        lines.append("External methods (" + ", ".join(f"{m}: `{d}`" for m, d in report["generated"].items())
                     + ") are scored on their frames read from those folders, the given frames being the real ones; "
                     "their s/clip is not measured here.")
    return "\n".join(lines) + "\n"


def write_report(out: Path, report: dict[str, Any]) -> None:
    """``out/report.json`` and ``out/report.md``, each replaced atomically (a crash leaves the last whole one).

    The JSON is strict (no ``NaN``/``Infinity``, which many parsers refuse): a non-finite result is written as null,
    and a notice in report.json names each one (report.md shows them as they are)."""
    write_text_atomic(out / "report.json", dumps_strict(report))
    write_text_atomic(out / "report.md", markdown(report))


def main(argv: list[str] | None = None, prog: str = "evaluate.py") -> int:
    """Exit code: 0, or 2 on missing data or weights and impossible settings (the message says what to do).
    ``prog``: the command the usage, errors and notes name (``evaluate.py``, or how the module was run)."""
    return run_reporting_user_errors(prog, lambda: _main(argv, prog))


def command_words(prog: str) -> list[str]:
    """The words that ran ``prog``, for the recorded command: ``evaluate.py`` -> ``python evaluate.py``."""
    return prog.split() if prog.startswith("python ") else ["python", prog]


def export_inputs(args: argparse.Namespace, kind: str, files: list[str], n: int, skipped: dict[str, str],
                  argv: list[str] | None) -> list[Path]:
    """``--export-inputs DIR``: each task's given frames of the N clips and its ``clips.json`` (one read of the
    clips for every task); returns the clips.json paths."""
    settings = {"resolution": args.resolution, "fps_asked": args.fps, "num_clips": n, "data": args.data,
                "data_path": data_path(args.data), "source_kind": kind, "skipped_videos": skipped,
                "command": run_info.command_line(command_words(args.prog), argv)}
    names = ClipNames(kind, args.data)
    sources = None if kind == "videos" else shard_of_keys(files)
    masks = {task: EvalProtocol(task=task, frames=args.frames, resolution=args.resolution, num_clips=n,
                                metrics=("midf",)).mask(1)[0] for task in args.tasks}  # (T,) each: the scored masks
    exports = [InputExport(args.export_inputs, task, masks[task], settings, sources) for task in args.tasks]
    seen, began = 0, time.perf_counter()
    for batch in iter_batches(kind, files, args.frames, args.fps, args.resolution, n, args.batch_size):
        clip_names = [names(k) for k in batch["key"]]  # (once per clip: shared by the tasks)
        for export in exports:
            export.add(batch, clip_names)
        seen += len(batch["key"])
        print(progress_line(args.prog, "export", seen, n, time.perf_counter() - began), file=sys.stderr, flush=True)
    if seen < n:  # the data changed since choose_num_clips read it
        raise ValueError(f"the data gave {seen} usable clips, {n} before; run again once it is written")
    return [export.finish() for export in exports]


RESUMED_KEYS = ("tasks", "clip_list", "timestamped", "fps_effective", "notices")  # a stopped run's, kept


def _main(argv: list[str] | None, prog: str = "evaluate.py") -> int:
    args = parse_args(argv, prog)
    weights = {} if args.export_inputs is not None else metric_weights(args)  # before the data and the model
    for name, option in (("i3d", "i3d_weights"), ("inception", "inception_weights")):
        if weights.get(name):
            setattr(args, option, weights[name]["path"])  # the file found: the protocol records it
    kind, files = resolve_source(args.data)
    keys: list[str] = []
    n, skipped, available = choose_num_clips(args, kind, files, keys)
    capped = capped_note(args, n, available)
    if capped:
        print(f"{args.prog}: note: {capped}", file=sys.stderr)
    if args.export_inputs is not None:
        written = export_inputs(args, kind, files, n, skipped, argv)
        print(f"wrote the given frames of {n} clips and {', '.join(str(p) for p in written)}; run the method on "
              f"them, writing each window of {args.frames} frames to OUT/<task>/<name>.mp4 (or OUT/<task>/<name>/ "
              "frame images), then score it with the same flags and --generated NAME=OUT")
        return 0
    samplers = build_samplers(args)
    namer = ClipNames(kind, args.data)
    clip_names = [namer(k) for k in keys[:n]]  # the N clips, named as --export-inputs names them
    for method in args.generated:  # every output there before any sampling
        for task in args.tasks:
            samplers[method].check_present(task, clip_names)
    report: dict[str, Any] = {
        "data": args.data, "data_path": data_path(args.data), "source": kind, "clips": n, "clips_available": available,
        "skipped_videos": skipped, "frames": args.frames,
        "resolution": args.resolution, "fps": args.fps, "seed": args.seed, "methods": list(samplers),
        "sample_resolution": sample_resolution(args, samplers["mardini"]) if "mardini" in samplers else None,
        "checkpoint": args.checkpoint, "checkpoint_file": checkpoint_file(args.checkpoint, samplers.get("mardini")),
        "weights_sampled": None if "mardini" not in samplers else ("raw" if args.no_ema else "ema"),
        "generated": {m: str(Path(d).resolve()) for m, d in args.generated.items()}, "weights": weights,
        "command": run_info.command_line(command_words(args.prog), argv), "code": code_version(),
        "device": str(device_of(args)), "device_name": device_name(device_of(args)), "dtype": args.dtype,
        "torch": torch.__version__, "python": platform.python_version(), "status": "partial",
        "tasks_asked": list(args.tasks), "tasks": {},
    }
    notices = training_mismatch(samplers.get("mardini"), args)
    for notice in notices:
        print(f"{args.prog}: note: {notice}", file=sys.stderr)
    report["notices"] = notices = ([capped] if capped else []) + notices
    out = Path(args.out) if args.out else default_out(args.data, report["data_path"], args.prog)
    state = RunState(out, run_settings(args, report, files), args.save_every, args.prog)
    earlier = state.begin(args.fresh)  # a stopped run of these settings: its finished tasks and notices go on
    if earlier:
        report.update({k: earlier[k] for k in RESUMED_KEYS if k in earlier})
        notices = report["notices"]
    out.mkdir(parents=True, exist_ok=True)
    state.save(report)
    write_report(out, report)  # partial until the end: a run that stops keeps every task it finished
    for task in args.tasks:
        if task in report["tasks"]:  # finished before a resume
            continue
        report["tasks"][task] = res = run_task(task, args, samplers, kind, files, n,
                                               checkpoint=state.task(task, n))
        clip_list = res.pop("clip_list")
        if "fps_effective" not in report:  # every task reads the same clips: once per run
            report["clip_list"] = clip_list  # to give another method the same inputs
            report["timestamped"] = sum(c.get("timing") == "pts" for c in clip_list)  # variable-rate, by timestamp
            eff = res["fps_effective"]
            report["fps_effective"] = {"min": eff["min"], "max": eff["max"]}
            note = rate_note(eff, args.fps, res["clips"])
            if note:
                print(f"{args.prog}: warning: {note}", file=sys.stderr)
                notices.append(note)
        state.save(report)
        write_report(out, report)
    small = small_sample_note(report)
    if small:
        print(f"{args.prog}: note: {small}", file=sys.stderr)
        notices.append(small)
    report["status"] = "complete"
    write_report(out, report)
    state.finish()
    print(markdown(report))
    print(f"wrote {out / 'report.md'} and {out / 'report.json'}")
    return 0


if __name__ == "__main__":  # `python -m mardini.evaluation.cli ...` is `python evaluate.py ...`
    from mardini.evaluation.cli import main as _main
    from mardini.user_errors import run_module as _run_module

    raise SystemExit(_run_module("mardini.evaluation.cli", _main))
