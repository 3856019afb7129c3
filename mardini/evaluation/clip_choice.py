"""The N clips ``evaluate.py`` scores: read once before any task, the unusable ones left out (``--num-clips``, or by
default every usable clip up to ``DEFAULT_MAX_CLIPS``), and the notice when that cap leaves clips out."""

from __future__ import annotations

import argparse

from mardini.evaluation.data import count_clips, usable_shard_clips, usable_videos


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
        raise ValueError(f"--num-clips {n} but {args.data} gives {usable} usable clips ({describe_unusable(skipped)}); "
                         f"lower --num-clips to {usable}, or leave it out to use every usable clip")
    n = usable
    if n < 2:
        raise ValueError(f"{args.data} gives {n} usable clips of {args.frames} frames, the protocol needs at least 2"
                         + (f" ({describe_unusable(skipped)})" if skipped else "") + "; add videos or lower --frames")
    return n, skipped, available


def capped_note(args: argparse.Namespace, n: int, available: int) -> str | None:
    """A notice when the default cap left clips of the data out (None when every clip was read, or --num-clips
    chose N)."""
    if args.num_clips is not None or n < DEFAULT_MAX_CLIPS or available <= n:
        return None
    return (f"{n} of the {available} clips {args.data} holds were scored: without --num-clips the protocol takes the "
            f"first {DEFAULT_MAX_CLIPS} usable ones; --num-clips N scores more, up to the usable ones of the {available} "
            "(a file that does not decode, or is too short, is skipped)")


def describe_unusable(skipped: dict[str, str]) -> str:
    """The first few unusable videos and why, for an error message (``and N more``)."""
    return f"unusable: {dict(list(skipped.items())[:3])}" + (f" and {len(skipped) - 3} more" if len(skipped) > 3 else "")
