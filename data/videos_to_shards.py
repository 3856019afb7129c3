r"""Turn a folder of videos (mp4, mov, mkv, avi, webm, mts/m2ts/ts, 3gp, flv, wmv, mxf, mpg, ... and any extension
given with --ext; any codec PyAV decodes) into WebDataset shards of fixed-length H.264 clips (``video.mp4`` +
``json``), with several worker processes, resumable.

    python data/videos_to_shards.py data/videos/mecavideo data/shards/mecavideo --clip-frames 32 --max-fps 25 \
        --short-side 128
    python data/videos_to_shards.py IN OUT --clip-frames 33 --max-fps 12 --shard-max-count 500 \
        --shard-max-bytes 2e9 --workers 8

A clip must span the frames a stage reads at its fps: (frames - 1) * round(stored fps / data.fps) + 1 stored
frames, e.g. 33 for 9 or 17 frames at 8 fps from 30 or 12 fps (data/README.md). The defaults, --clip-frames 65
--max-fps 30, cut clips every shipped config (configs/) reads from any source: stored at 30 fps at most, the
17-frame stages at 8 fps take every round(30 / 8) = 4th frame, a span of (17 - 1) * 4 + 1 = 65 (4 frames at 4 fps:
25; 9 at 8 fps: 33), and a slower stored rate needs fewer. Shards for the 9-frame stages alone may pass
--clip-frames 33. --max-fps 0 keeps each source's rate, which no clip length fits for every source (a 187 fps file
would need 185 frames for 9 frames at 8 fps).

Re-running the same command finishes an interrupted run (finished files and shards are not redone); on a finished
folder it writes nothing and says ``already complete``.
Files that cannot be decoded are reported and skipped; the summary at the end counts clips and skipped files, and
the files not read (not of a video extension).
"""

from __future__ import annotations

import argparse
import sys

from mardini.data.video_shards import VIDEO_EXTENSIONS, ShardSettings, video_extensions, videos_to_shards
from mardini.user_errors import run_reporting_user_errors

# The defaults are the library's (ShardSettings): clips every shipped stage config reads (its frames at its fps;
# checked against configs/ by tests/test_data_videos.py): 17 frames at 8 fps from at most 30 stored fps span
# (17 - 1) * round(30 / 8) + 1 = 65.
DEFAULTS = ShardSettings()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    d = DEFAULTS
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("src", help="folder of videos (searched recursively)")
    p.add_argument("out", help="output folder for the shards")
    p.add_argument("--clip-frames", type=int, default=d.clip_frames,
                   help=f"frames per stored clip (default {d.clip_frames}: with the default --max-fps, what "
                        "every shipped stage config reads)")
    p.add_argument("--clip-hop", type=int, default=d.clip_hop,
                   help="stored frames between clip starts (default: no overlap)")
    p.add_argument("--max-fps", type=float, default=d.max_fps or 0,
                   help=f"drop frames (integer stride) to at most this fps (default {d.max_fps or 0:g}; 0: keep each "
                        "source's rate)")
    p.add_argument("--short-side", type=int, default=d.short_side, help="resize so the short side is this (default: "
                   "source)")
    p.add_argument("--max-clips-per-video", type=int, default=d.max_clips_per_video)
    p.add_argument("--crf", type=int, default=d.crf, help=f"H.264 quality (lower = better, bigger; default {d.crf})")
    p.add_argument("--shard-max-count", type=int, default=d.shard_max_count,
                   help=f"clips per shard at most (default {d.shard_max_count})")
    p.add_argument("--shard-max-bytes", type=float, default=d.shard_max_bytes,
                   help=f"bytes per shard, about (default {d.shard_max_bytes})")
    p.add_argument("--prefix", default=d.prefix, help=f"shard file name prefix (default {d.prefix})")
    p.add_argument("--workers", type=int, default=2, help="worker processes")
    p.add_argument("--keep-staging", action="store_true", help="keep the per-file staging tars")
    p.add_argument("--ext", action="append", default=[], metavar="EXT",
                   help=f"also read files of this extension as videos (repeatable); read by default: "
                        f"{' '.join(VIDEO_EXTENSIONS)}")
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """The exit code: 0 with clips, 1 when no file gave a clip, 2 on a user error (missing or empty input folder,
    impossible settings, an output folder of other inputs or settings), printed without a traceback."""
    a = parse_args(argv)
    return run_reporting_user_errors("videos_to_shards.py", lambda: _run(a))


def settings_from(a: argparse.Namespace) -> ShardSettings:
    """The :class:`ShardSettings` of the parsed options (``--max-fps 0``: each source's rate)."""
    return ShardSettings(
        clip_frames=a.clip_frames, clip_hop=a.clip_hop, max_fps=a.max_fps or None, short_side=a.short_side,
        max_clips_per_video=a.max_clips_per_video, crf=a.crf, shard_max_count=a.shard_max_count,
        shard_max_bytes=int(a.shard_max_bytes), prefix=a.prefix,
    )


def _run(a: argparse.Namespace) -> int:
    settings = settings_from(a)
    summary = videos_to_shards(a.src, a.out, settings, workers=a.workers, progress=not a.no_progress,
                               keep_staging=a.keep_staging, extensions=video_extensions(a.ext))
    print(summary.text())
    return 0 if summary.clips > 0 else 1


if __name__ == "__main__":
    sys.exit(main())
