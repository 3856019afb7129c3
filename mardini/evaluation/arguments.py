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
# This module: evaluate.py's options, parsed and checked (parse_args and its parse helpers, PRESETS, the model's
# sample size); its docstring above is the command's --help description. The main loop is cli.py.

from __future__ import annotations

import argparse
import re
from pathlib import Path
from typing import Any

from mardini.autoencoders.base import add_allow_autoencoder_argument
from mardini.devices import resolve_device
from mardini.evaluation.protocol import METRICS, TASKS, EvalSize, eval_size, same_aspect, size_text
from mardini.evaluation.resume import DEFAULT_SAVE_EVERY
from mardini.evaluation.samplers import BASELINES


PRESETS: dict[str, dict[str, Any]] = {
    # VIDIM-Bench (PAPER.md App. D): 9 consecutive frames at 256 px, first + last given, FVD/FID/MidF.
    "vidim": {"tasks": ["interpolation"], "frames": 9, "resolution": 256, "fps": None},
    # image-to-video on user videos: first frame given, FVD/FID.
    "i2v": {"tasks": ["image_to_video"], "frames": 9, "resolution": 256, "fps": None},
    # the embedded set at the demo loader's settings (9 frames at 8 fps, 32 px), both tasks, + trajectory error.
    "synthetic": {"tasks": list(TASKS), "frames": 9, "resolution": 32, "fps": 8.0, "data": "synthetic"},
}


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
    try:  # every method's clips and metric states go there: checked before any data is read
        resolve_device(args.device)
    except ValueError as err:
        p.error(f"--device: {err}")
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
