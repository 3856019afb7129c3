"""``sample.py``: every MarDini task from a checkpoint, on image files, a video file or clips from shards.

    python sample.py interpolate --ckpt last.ckpt --images first.png last.png
    python sample.py image_to_video --ckpt last.ckpt --images start.png --index 0 --guidance 2.5
    python sample.py expand --ckpt last.ckpt --video clip.mp4 --keep 0-3
    python sample.py long_video --ckpt last.ckpt --images start.png --total 32
    python sample.py slow_motion --ckpt last.ckpt --video clip.mp4 --keep 0-2 --factor 4
    python sample.py generate --ckpt last.ckpt --shards data/shards/synthetic/val --clips 4 --keep 0,4,8
    python sample.py generate --ckpt last.ckpt --images f0.png f12.png --keep 0,12    # past the window: by windows
    python sample.py image_to_video --ckpt last.ckpt --list images.txt --slice-index 0 --num-slices 8  # many clips

Writes ``<out>/<task>_NNN.mp4|.gif`` per sample (``--png``: also ``<out>/frames/<task>_NNN/frame_XX.png``,
lossless), ``contact_sheet.png`` (given frames framed in green) and ``settings.json``. Inputs are brought to the
checkpoint's training resolution (centre crop + resize by default, with a message saying so); ``--resolution`` /
``--resize`` change that. ``--list FILE`` samples one clip per line of FILE (image files, a video file, or a shard
clip ``SHARD.tar#KEY``: :mod:`mardini.pipeline.shard_clips`), batch by batch, resumably
(:mod:`mardini.pipeline.many`).
"""

from __future__ import annotations

import argparse
import math
import sys
import time
import warnings
from pathlib import Path

import torch

from mardini import cpu_kernels
from mardini.autoencoders.base import add_allow_autoencoder_argument
from mardini.data.decode import frame_stride
from mardini.devices import gpu_bf16_advice
from mardini.masking import mask_from_given
from mardini.pipeline.inputs import (
    RESIZE_MODES,
    fit_frames,
    parse_indices,
    parse_size,
    read_images,
    read_shard_clip,
    read_shard_clips,
    read_video,
    video_fps,
)
from mardini.pipeline.many import sample_list, slice_lock, too_many_skipped
from mardini.pipeline.outputs import check_out_dir, write_outputs
from mardini.pipeline.pipeline import MarDiniPipeline, resolve_device
from mardini.pipeline.tasks import image_to_video_guidance, window_schedule

TASKS = ("generate", "interpolate", "image_to_video", "expand", "long_video", "slow_motion")


def build_parser(prog: str = "sample.py") -> argparse.ArgumentParser:
    """The options; ``prog``: the command its usage and errors name (``sample.py``, or how the module was run)."""
    p = argparse.ArgumentParser(prog=prog, description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("task", choices=TASKS)
    p.add_argument("--ckpt", required=True, help="a joint (or generation) checkpoint written by train.py, or a folder "
                   "written by python -m mardini.export")
    p.add_argument("--window", type=int, help="the trained window (frames) of a checkpoint that records none, e.g. "
                   "one written by trainer.fit(model, dataloader) (default: the window the checkpoint records)")
    add_allow_autoencoder_argument(p)
    src = p.add_argument_group("inputs (one of)")
    src.add_argument("--images", nargs="+", help="image files: the given frames, in order")
    src.add_argument("--video", help="a video file, read from --start every --stride frames up to the last frame "
                     "--keep picks (the default --keep of expand, long_video, slow_motion: up to the window)")
    src.add_argument("--shards", help="a shard split (directory, pattern): its first --clips clips of the window's "
                     "length (longer when --keep reaches further), centred as in validation, held in memory; --keep "
                     "picks the given frames (for many clips, list them: --list)")
    src.add_argument("--list", help="a text file of many clips, one per line: its --images files (in order, shell "
                     "quoting for spaces), one video file (.mp4, .mov, ...) or one shard clip SHARD.tar#KEY (read "
                     "as --shards reads it; python -m mardini.pipeline.shard_clips SHARDS lists a split's clips "
                     "so); clip i (its line's number among the "
                     "clips) is seeded --seed + i and written as <task>_<i:06d>_<sample>.mp4/.gif, listed in "
                     "manifest.jsonl; a rerun skips the clips done, an unreadable clip is skipped and counted (exit "
                     "status 1 unless --max-skipped allows it)")
    src.add_argument("--clips", type=int, default=1, help="clips to read from --shards")
    src.add_argument("--keep", help="indices of the given frames among the frames read, e.g. 0,8 or 0-3 "
                     "(generate: their window positions, each once; expand, long_video: consecutive frames; "
                     "default: generate needs it; interpolate the window's first and last; image_to_video 0; "
                     "expand the first half of the window; long_video 0; slow_motion the window's frames; a video "
                     "shorter than the window gives all its frames to expand, long_video and slow_motion)")
    src.add_argument("--start", type=int, default=0, help="first video frame to read")
    src.add_argument("--stride", type=int, default=None,
                     help="read every stride-th video frame (default: round(video fps / training fps), at least 1, "
                          "as training and evaluate.py read videos)")
    t = p.add_argument_group("task")
    t.add_argument("--frames", type=int, help="frames per window: the length of the output of interpolate, "
                   "image_to_video and expand, the windows of long_video and slow_motion; for generate the output's "
                   "length, sampled by windows of the trained length past it (default: the trained window, the "
                   "checkpoint's, for generate also up to its last --keep position; a shorter window warns). It does "
                   "not set how many frames are read: --keep does")
    t.add_argument("--index", type=int, default=0, help="image_to_video: frame index of the given image")
    t.add_argument("--total", type=int, help="long_video: output frames (default: 2 windows)")
    t.add_argument("--context", type=int, help="long_video, and generate past the window: known frames carried "
                   "into each next window (default: half the window)")
    t.add_argument("--factor", type=int, default=2, help="slow_motion: 2, 4, 8, ...")
    s = p.add_argument_group("sampling")
    s.add_argument("--steps", type=int, default=25)
    s.add_argument("--guidance", type=float, help="guidance scale (default 2.5 for image_to_video with a planner, "
                   "else 1 = none, as in the paper)")
    s.add_argument("--eta", type=float, default=0.0,
                   help="DDIM stochasticity in [0, 1]: 0 deterministic (paper), 1 ancestral")
    s.add_argument("--seed", type=int, default=0, help="clip i uses seed + i")
    s.add_argument("--batch", type=int, default=4, help="clips per generate call (changes the samples only by float "
                   "rounding: a clip matches its --batch 1 sample within 1e-5, so an 8-bit pixel may differ by one "
                   "level)")
    s.add_argument("--num-samples", type=int, default=1, help="samples per clip")
    s.add_argument("--resolution", help="sampling size N or HxW (default: the checkpoint's training resolution)")
    s.add_argument("--resize", choices=RESIZE_MODES, default="crop",
                   help="how inputs of another size get there: centre crop + resize, stretch, or refuse")
    s.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 or auto")
    s.add_argument("--bf16", action="store_true", help="bf16 autocast (as bf16-mixed training)")
    s.add_argument("--no-ema", action="store_true", help="use the raw weights instead of the EMA ones")
    s.add_argument("--no-progress", action="store_true")
    o = p.add_argument_group("outputs")
    o.add_argument("--out", type=Path, help="output folder (default outputs/samples/<task>)")
    o.add_argument("--png", action="store_true", help="also write each sample's frames losslessly, "
                   "<out>/frames/<task>_NNN/frame_XX.png (the mp4 is H.264 yuv420p, crf 18, the GIF 256 colours "
                   "a frame: both lossy): folders of frames as evaluate.py --generated reads them, which "
                   "sample.py --images reads back exactly")
    o.add_argument("--slice-index", type=int, default=0, help="--list: the slice this job samples, the clips "
                   "whose index is --slice-index modulo --num-slices (e.g. $SLURM_ARRAY_TASK_ID)")
    o.add_argument("--num-slices", type=int, default=1, help="--list: how many jobs share the list (one --out)")
    o.add_argument("--max-skipped", type=int, help="--list: how many unreadable clips the job may skip and still "
                   "exit with status 0 (default 0: any skip exits with status 1, after the manifest and settings "
                   "are written)")
    o.add_argument("--fps", type=float, help="fps of the written videos (default: the rate a --video or the --shards "
                   "clips were read at, else the training fps, else 8)")
    return p


# --------------------------------------------------------------------------------------------------
# Inputs -> given frames
# --------------------------------------------------------------------------------------------------


def default_keep(task: str, span: int) -> list[int] | None:
    """Which frames of a video / clip are given when ``--keep`` is not set, among the first ``span`` (the window)."""
    return {"interpolate": [0, span - 1], "image_to_video": [0], "expand": list(range(max(1, span // 2))),
            "long_video": [0], "slow_motion": list(range(span))}.get(task)


# tasks whose default given frames, from a video shorter than the window, are all the frames it has
SHORT_VIDEO_TASKS = ("expand", "long_video", "slow_motion")


# task -> (test of the number of given frames, what it needs)
GIVEN_RULES = {"interpolate": (lambda n: n == 2, "2"), "image_to_video": (lambda n: n == 1, "1"),
               "slow_motion": (lambda n: n >= 2, "at least 2")}


def check_inputs(a: argparse.Namespace) -> None:
    """Input choices that cannot work raise a ValueError naming the fix, before the checkpoint loads. (The task's
    default --keep always gives a number of frames it accepts.)"""
    if len([x for x in (a.images, a.video, a.shards, a.list) if x]) != 1:
        raise ValueError("give exactly one input: --images, --video, --shards or --list")
    keep = parse_indices(a.keep)
    if a.images and keep is not None and a.task != "generate":
        raise ValueError(f"--keep picks given frames among those of --video or --shards; with --images every "
                         f"image is given ({a.task} places them itself): drop --keep, or use the generate task")
    if a.shards and a.resize != "crop":
        raise ValueError(f"--resize {a.resize} does not apply to --shards: shard clips are centre-cropped to the "
                         "sampling size, as in validation; drop --resize")
    if a.task == "generate" and keep is None:
        raise ValueError("generate needs --keep: the window positions of the --images, or the indices of the given "
                         "frames among those read from --video or --shards")
    if a.task in ("expand", "long_video") and keep and keep != list(range(keep[0], keep[0] + len(keep))):
        raise ValueError(f"{a.task} continues a prefix of consecutive frames, but --keep {a.keep} is not a run of "
                         f"consecutive increasing indices (it would be packed into the frames 0..{len(keep) - 1}): "
                         f"give a range like {keep[0]}-{keep[0] + len(keep) - 1}, or use generate --keep {a.keep} "
                         "for a sparse mask")
    repeated = sorted({i for i in keep or [] if keep.count(i) > 1})
    if a.task == "generate" and repeated:
        what = "two images for one frame, the later one silently winning" if a.images else "one frame given twice"
        raise ValueError(f"generate's --keep positions {repeated} are repeated ({what}): list each window position "
                         "once" + (", one per image" if a.images else ""))
    n = len(a.images) if a.images else None if keep is None else len(keep)
    if a.task == "generate" and a.images and len(keep) != n:
        raise ValueError(f"generate needs one --keep index (window position) per image: {len(keep)} for {n} image(s)")
    rule = GIVEN_RULES.get(a.task)
    if rule and n is not None and not rule[0](n):
        raise ValueError(f"{a.task} needs {rule[1]} given frame(s), got {n}; check --images / --keep")


def check_slices(a: argparse.Namespace) -> None:
    """``--slice-index`` / ``--num-slices`` that cannot work raise a ValueError naming the fix."""
    if a.slice_index >= a.num_slices:
        raise ValueError(f"--slice-index {a.slice_index} is not below --num-slices {a.num_slices}: slices are "
                         f"numbered 0..{a.num_slices - 1}")
    if a.num_slices > 1 and not a.list:
        raise ValueError("--num-slices splits the clips of a --list between jobs; give the clips as --list FILE")
    if a.max_skipped is not None and not a.list:
        raise ValueError("--max-skipped bounds the unreadable clips a --list job may skip; other inputs are never "
                         "skipped (an unreadable one stops the command): drop --max-skipped, or give --list FILE")


def video_stride(path: str, model_fps: float | None, stride: int | None) -> tuple[int, str, float | None]:
    """The stride to read ``path`` at (``stride`` if given, else ``round(video fps / model_fps)``, at least 1, as the
    training loader and evaluate.py pick it: :func:`~mardini.data.decode.frame_stride`), a note saying what it
    gives, and the grid period (s) a variable-frame-rate file is read at by timestamp when the stride was chosen by
    that rate (None: read by index)."""
    src = video_fps(path)
    period = None
    if stride is None:
        stride = frame_stride(src, model_fps) if src and model_fps else 1
        why = f"round({src:g} / {model_fps:g}), for the {model_fps:g} fps the model trained at, as training reads " \
            "videos" if src and model_fps else "the model or the video records no frame rate"
        period = 1 / (src / stride) if src and model_fps else None  # the effective rate's period, as evaluate.py
    else:
        why = "--stride"
    rate = f"{src:g} fps, every {stride} frame(s): {src / stride:g} fps" if src else f"every {stride} frame(s)"
    return stride, f"read at {rate} ({why})", period


def load_inputs(a, pipe: MarDiniPipeline, size) -> tuple[torch.Tensor, list[str], list[int] | None, list[str],
                                                          float | None]:
    """``given (B, n, 3, H, W)`` in [-1, 1], clip names, the given frames' indices among those read (for generate:
    their window positions), notes, and the frame rate they were read at (None: images, a video that records none,
    shard clips of several rates). The inputs passed :func:`check_inputs`.

    A video is read up to the last frame ``--keep`` (or the task's default, :func:`default_keep`) picks; without
    ``--keep``, a video shorter than the window gives expand / long_video / slow_motion all its frames. A shard clip
    is one window long (longer when ``--keep`` reaches further), centred as in validation."""
    span = a.frames or pipe.window  # the window: the default given frames lie in it
    keep = parse_indices(a.keep)
    if a.images:
        frames, note = fit_frames(read_images(a.images), size, a.resize, f"{len(a.images)} image(s)")
        return frames[None], ["images"], keep, [note], None
    if a.video:
        stride, rate_note, period = video_stride(a.video, pipe.fps, a.stride)
        src = video_fps(a.video)
        short_ok = keep is None and a.task in SHORT_VIDEO_TASKS  # up to the window; a shorter video gives all
        picks = keep or default_keep(a.task, span)
        read = span if short_ok else max(picks) + 1
        picked = f"--keep {a.keep}" if keep else f"the default --keep {','.join(map(str, picks))} of {a.task}"
        fix = "lower --start: the video ends before it" if short_ok else \
            f"{picked} reaches frame {read - 1}: pick frames it has with --keep, or lower --start or --stride"
        frames, timing = read_video(a.video, read, a.start, stride, period, at_most=short_ok, fix=fix)
        frames, note = fit_frames(frames, size, a.resize, f"video {a.video}")  # (n, 3, H, W)
        clips, names = frames[None], [Path(a.video).stem]  # (1, n, 3, H, W)
        note = f"{note}; {rate_note}" + (f"; {timing}" if timing else "")
        keep = picks if len(frames) == read else list(range(len(frames)))
        if len(frames) < read:
            note += (f"; the video gives {len(frames)} frame(s) from --start {a.start}, fewer than the window of "
                     f"{span}: all are given")
        return clips[:, keep], names, keep, [note], src / stride if src else None
    keep, read = shard_frames(a, pipe, size)
    clips, names, rates = read_shard_clips(a.shards, a.clips, read, pipe.fps, size)  # (B, read, 3, H, W)
    rates = sorted({round(r, 6) for r in rates})
    note = (f"{len(names)} clip(s) of {read} frames from {a.shards} at {size[0]}x{size[1]} (centre crop), read at "
            f"{' / '.join(f'{r:g}' for r in rates)} fps")
    if len(names) < a.clips:
        note += f"; --clips {a.clips} asked for, the split gives {len(names)}"
    return clips[:, keep], names, keep, [note], rates[0] if len(rates) == 1 else None


def shard_frames(a, pipe: MarDiniPipeline, size) -> tuple[list[int], int]:
    """The given frames (``--keep`` or the task's default) and how many frames a shard clip is read with: one
    window, longer when they reach further."""
    if size is None:
        raise ValueError("--shards needs a sampling size: pass --resolution (the checkpoint does not record one)")
    span = a.frames or pipe.window
    keep = parse_indices(a.keep) or default_keep(a.task, span)
    return keep, max(span, max(keep) + 1)


def load_shard_clip(a, pipe: MarDiniPipeline, size, shard: str, key: str):
    """:func:`load_inputs` of one clip of a shard, named by its key (a ``--list`` line ``SHARD.tar#KEY``): the
    frames ``--shards`` reads for it; ``a`` passed :func:`check_inputs` with ``a.shards`` set."""
    keep, read = shard_frames(a, pipe, size)
    clip, fps = read_shard_clip(shard, key, read, pipe.fps, size)  # (read, 3, H, W)
    note = f"clip {key} of {shard}: {read} frames at {size[0]}x{size[1]} (centre crop), read at {fps:g} fps"
    return clip[None, keep], [key], keep, [note], fps


# --------------------------------------------------------------------------------------------------
# Tasks
# --------------------------------------------------------------------------------------------------


def run_task(a, pipe: MarDiniPipeline, given: torch.Tensor, positions, seeds: list[int], kw: dict):
    """Samples ``(b*k, T, 3, H, W)`` and their given-frame mask ``(b*k, T)`` for one batch of clips."""
    n = given.shape[1]
    task, k = a.task, a.num_samples
    kw = dict(kw, seed=seeds, num_samples=k)
    if task == "generate":
        frames = a.frames or max(pipe.window, max(positions) + 1)  # past the window: generate_long
        mask = mask_from_given(frames, positions)  # (T,)
        video = given.new_zeros(given.shape[0], frames, *given.shape[2:])  # (B, T, 3, H, W)
        video[:, positions] = given
        if frames > pipe.window:
            print_windows(mask, pipe.window, a.context)
            out = pipe.generate_long(video, mask, context=a.context, **kw)
        else:
            out = pipe.generate(video, mask[None].expand(given.shape[0], -1).clone(), **kw)
        return out, (~mask)[None].expand(out.shape[0], -1)
    if task == "interpolate":
        out = pipe.interpolate(given[:, 0], given[:, 1], frames=a.frames, **kw)
        idx = [0, out.shape[1] - 1]
    elif task == "image_to_video":
        out = pipe.image_to_video(given[:, 0], frames=a.frames, index=a.index, **kw)
        idx = [a.index % out.shape[1]]
    elif task == "expand":
        out = pipe.expand(given, frames=a.frames, **kw)
        idx = list(range(n))
    elif task == "long_video":
        total = a.total or 2 * pipe.window
        out = pipe.long_video(given, total_frames=total, context=a.context, window=a.frames, **kw)
        idx = list(range(n))
    else:
        out = pipe.slow_motion(given, factor=a.factor, window=a.frames, **kw)
        idx = list(range(0, out.shape[1], a.factor))
    mask = torch.zeros(out.shape[:2], dtype=torch.bool)
    mask[:, idx] = True
    return out, mask


def print_windows(mask: torch.Tensor, window: int, context: int | None) -> None:
    """Say which windows ``generate_long`` runs for ``mask (T,)`` (:func:`~mardini.pipeline.tasks.window_schedule`)."""
    windows = window_schedule(mask, window, context)
    print(f"[sample] {mask.shape[0]} frames, more than the trained window of {window}: generate_long samples "
          f"{len(windows)} windows of {window} (frames outside 0..{mask.shape[0] - 1} are generated and dropped)")
    for i, (s, m) in enumerate(windows):
        given = [s + j for j in range(window) if not m[j]]
        print(f"[sample]   window {i + 1}: frames {s}..{s + window - 1}, given {given}")


# option -> (test, allowed range); checked before anything is loaded
OPTION_RULES = {
    "steps": (lambda v: v >= 1, ">= 1"),
    "guidance": (lambda v: v is None or v >= 0, ">= 0 (1 = no guidance)"),
    "eta": (lambda v: 0 <= v <= 1, "in [0, 1] (DDIM's eta: 0 deterministic, 1 ancestral)"),
    "batch": (lambda v: v >= 1, ">= 1"),
    "num_samples": (lambda v: v >= 1, ">= 1"),
    "clips": (lambda v: v >= 1, ">= 1"),
    "start": (lambda v: v >= 0, ">= 0"),
    "stride": (lambda v: v is None or v >= 1, ">= 1"),
    "frames": (lambda v: v is None or v >= 2, ">= 2 (one given and one generated frame)"),
    "total": (lambda v: v is None or v >= 2, ">= 2"),
    "context": (lambda v: v is None or v >= 1, ">= 1"),
    "factor": (lambda v: v >= 2 and v & (v - 1) == 0, "a power of two >= 2 (2, 4, 8, ...)"),
    "fps": (lambda v: v is None or v > 0, "> 0"),
    "seed": (lambda v: 0 <= v < 2**63, "in [0, 2**63)"),
    "num_slices": (lambda v: v >= 1, ">= 1"),
    "slice_index": (lambda v: v >= 0, ">= 0 (and below --num-slices)"),
    "max_skipped": (lambda v: v is None or v >= 0, ">= 0"),
}


def check_options(a: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """Impossible sampling options stop the command at once, naming the option and its allowed range."""
    for key, (ok, allowed) in OPTION_RULES.items():
        value = getattr(a, key)
        if not ok(value):
            parser.error(f"--{key.replace('_', '-')}={value} is impossible: it must be {allowed}")


def spacing_note(a: argparse.Namespace, positions, window: int) -> str | None:
    """A note when ``interpolate`` puts two frames of a video further apart or closer than they are in it: the
    window places them at its ends, ``window - 1`` frames apart, whatever ``--keep`` picked."""
    if a.task != "interpolate" or not (a.video or a.shards) or len(positions) != 2:
        return None
    first, last = positions
    gap = last - first
    if gap == window - 1:
        return None
    if 3 <= gap + 1 <= window:
        fix = f"; --frames {gap + 1} samples them at their spacing"
    elif gap + 1 > window:
        fix = f"; generate --keep {first},{last} samples them at their spacing, window by window"
    else:
        fix = ""
    return (f"--keep {first},{last} are {gap} frames apart in the video, the {window}-frame window places them "
            f"{window - 1} apart: the motion between them plays {(window - 1) / gap:.3g}x slower than it was read{fix}")


def sampled_window(a: argparse.Namespace, trained: int) -> int:
    """The frames per window the task samples: ``--frames`` up to the trained window (past it ``generate`` goes
    window by window at the trained length), made odd for slow motion, whose windows have given frames at both
    ends (:func:`mardini.pipeline.tasks.slow_motion`)."""
    w = min(a.frames or trained, trained)
    return w - 1 + w % 2 if a.task == "slow_motion" else w


def warn_if_bf16_is_emulated(bf16: bool, device: torch.device) -> None:
    """A warning naming the fix (leave ``--bf16`` out) for ``--bf16`` on a CPU without native bf16 matrix multiplies
    (:func:`mardini.cpu_kernels.slow_bf16_advice`) or an NVIDIA GPU older than Ampere
    (:func:`mardini.devices.gpu_bf16_advice`), as a ``bf16-mixed`` fit on one gets."""
    if not bf16:
        return
    if device.type == "cpu":
        advice = cpu_kernels.slow_bf16_advice(what="--bf16", fix="leave --bf16 out")
    else:
        advice = gpu_bf16_advice(device, "--bf16", "leave --bf16 out")
    if advice is not None:
        warnings.warn(advice, stacklevel=3)


def command(argv: list[str] | None = None, prog: str = "sample.py") -> int:
    """``sample.py``: :func:`main`, and its exit status: 1 where a ``--list`` job skipped more clips than
    ``--max-skipped`` allows (said on stderr; its manifest and settings are written), else 0."""
    error = too_many_skipped(main(argv, prog))
    if error is None:
        return 0
    print(f"{prog}: error: {error}", file=sys.stderr)
    return 1


def main(argv: list[str] | None = None, prog: str = "sample.py") -> dict:
    """Parse ``argv``, sample, write the outputs; returns the settings record (also in settings.json). ``prog``: the
    command the usage and errors name. A ``--list`` job holds its slice's lock (:func:`~mardini.pipeline.many.
    slice_lock`) from before the checkpoint loads: a second live job of the slice is refused at once."""
    parser = build_parser(prog)
    a = parser.parse_args(argv)
    check_options(a, parser)
    check_inputs(a)
    check_slices(a)
    out_dir = a.out or Path("outputs/samples") / a.task
    check_out_dir(out_dir)  # these before the checkpoint loads, so that no mistake waits for it (or for sampling)
    if not a.list:
        return sample(a, out_dir)
    with slice_lock(out_dir, a.slice_index, a.num_slices):
        return sample(a, out_dir)


def sample(a: argparse.Namespace, out_dir: Path) -> dict:
    """Load the checkpoint, sample the inputs of the checked options ``a`` and write them to ``out_dir``; returns
    the settings record."""
    device = resolve_device(a.device)
    warn_if_bf16_is_emulated(a.bf16, device)
    started = time.perf_counter()
    dtype = torch.bfloat16 if a.bf16 else torch.float32
    pipe = MarDiniPipeline.from_checkpoint(a.ckpt, ema=not a.no_ema, device=device, dtype=dtype, window=a.window,
                                           allow_autoencoders=a.allow_autoencoder)
    sampled = sampled_window(a, pipe.window)
    if a.frames is not None and a.frames < pipe.window:  # a longer one is refused by the task
        made_odd = " (slow motion's windows are odd)" if sampled != a.frames else ""
        warnings.warn(f"--frames {a.frames}: sampling windows of {sampled} frames{made_odd}, not the checkpoint's "
                      f"trained window of {pipe.window}; leave --frames out to sample the trained window", stacklevel=2)
    size = parse_size(a.resolution) or pipe.resolution
    guidance = a.guidance if a.guidance is not None else (
        image_to_video_guidance(pipe) if a.task == "image_to_video" else 1.0)
    kw = dict(steps=a.steps, guidance_scale=guidance, progress=not a.no_progress, eta=a.eta)
    if a.list:
        return sample_list(argparse.Namespace(**{**vars(a), "guidance": guidance}), pipe, size, sampled, kw, out_dir)
    given, names, positions, notes, fps_read = load_inputs(a, pipe, size)
    fps = a.fps or fps_read or pipe.fps or 8.0
    if fps_read and pipe.fps and not math.isclose(fps_read, pipe.fps, rel_tol=0.01):
        notes.append(f"the frames were read at {fps_read:g} fps, the checkpoint trained at {pipe.fps:g} fps: each "
                     f"frame step is {pipe.fps / fps_read:.3g}x the motion it learned (--stride changes the rate read)")
    spacing = spacing_note(a, positions, sampled)
    notes += [spacing] if spacing else []
    for note in notes:
        print(f"[sample] {note}")
    print(f"[sample] {a.task} with {pipe.kind} checkpoint {a.ckpt} (size {pipe.info.get('size')}, "
          f"{'EMA' if not a.no_ema else 'raw'} weights, window {pipe.window}) on {pipe.device}: {a.steps} steps, "
          f"eta {a.eta}, guidance {guidance}, seed {a.seed}, {given.shape[0]} clip(s) x {a.num_samples} sample(s)")
    outs, masks, labels = [], [], []
    for lo in range(0, given.shape[0], max(1, a.batch)):
        chunk = given[lo : lo + a.batch]
        seeds = [a.seed + lo + i for i in range(chunk.shape[0])]
        out, mask = run_task(a, pipe, chunk, positions, seeds, kw)
        outs.append(out.cpu())
        masks.append(mask.cpu())
        labels += [f"{names[lo + i]} s{j}" for i in range(chunk.shape[0]) for j in range(a.num_samples)]
    videos = torch.cat(outs)  # (N, T, 3, H, W)
    settings = {
        "task": a.task, "checkpoint": str(a.ckpt), "kind": pipe.kind, "size": pipe.info.get("size"),
        "ema": not a.no_ema, "seed": a.seed, "steps": a.steps, "eta": a.eta, "guidance": guidance,
        "num_samples": a.num_samples, "batch": a.batch, "frames": videos.shape[1],
        "resolution": list(videos.shape[-2:]), "resize": a.resize, "inputs": notes,
        "keep": positions,  # the given frames among those read (--keep or the task's default)
        "given_positions": masks[0][0].nonzero().flatten().tolist(),  # where they are in the written videos
        "device": str(pipe.device), "dtype": str(dtype), "window": pipe.window,  # the trained one
        "window_sampled": sampled,  # past the trained window: generate_long, trained windows
        "task_options": {"index": a.index, "total": a.total, "context": a.context, "factor": a.factor},
        "fps_read": fps_read, "fps_written": fps, "fps_trained": pipe.fps,
        "seconds": round(time.perf_counter() - started, 3),
    }
    record = write_outputs(out_dir, a.task, videos, torch.cat(masks), labels, settings, fps, png=a.png)
    print(f"[sample] wrote {len(videos)} video(s) ({videos.shape[1]} frames, {videos.shape[-2]}x{videos.shape[-1]}, "
          f"{fps:g} fps) to {out_dir}/: mp4, gif, {'png frames, ' if a.png else ''}contact_sheet.png, settings.json")
    return record


if __name__ == "__main__":  # `python -m mardini.pipeline.cli ...` is `python sample.py ...`
    from mardini.pipeline.cli import command as _command
    from mardini.user_errors import run_module as _run_module

    raise SystemExit(_run_module("mardini.pipeline.cli", _command))
