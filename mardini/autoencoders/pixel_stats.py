"""Pixel statistics of a shard set: the space-to-depth ``shift`` and ``scale`` for zero-mean, unit-variance latents.

    python -m mardini.autoencoders.pixel_stats --shards data/shards/synthetic/train --clips 512
    python -m mardini.autoencoders.pixel_stats --shards data/shards/synthetic/train --anchor-keep-ratio 0.15 1.0

The cosine schedule assumes unit-variance data. Pixels in [-1, 1] of the synthetic set have mean -0.40 and standard
deviation 0.39 (the command above, 512 training clips), so without normalisation the content is buried in noise far
earlier than the schedule intends (signal-to-noise ratio 0.15 of the nominal at every t) and the generator gets little
training at the low-noise levels that make objects crisp. ``SpaceToDepthAutoencoder(shift=mean, scale=1/std)`` fixes that; the tiny configs use it.

``--anchor-keep-ratio LO HI`` also prints ``anchor_scale`` for ``model.anchor: nearest`` (``mardini.diffusion.anchor``):
the standard deviation of the normalised latents' change from the nearest given frame, over the generated frames of
random masks that keep a fraction in [LO, HI] of the frames.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch


def pixel_stats(shards: str, clips: int = 512, frames: int = 9, fps: float | None = 8.0,
                resolution: int = 32, anchor_keep_ratio: tuple[float, float] | None = None) -> dict[str, float]:
    """Mean and standard deviation of the pixels (in [-1, 1]) of the first ``clips`` clips of ``shards``.

    Clips are read as training sees them (``frames`` frames at ``fps``, resized to ``resolution``), in the
    deterministic order of the validation loader. Returns ``clips, mean, std, shift (= mean), scale (= 1 / std)``,
    and with ``anchor_keep_ratio`` also ``anchor_scale`` (:func:`anchor_residual_std` of the same clips).
    """
    from mardini.data.datamodule import first_clips

    video = first_clips(shards, clips, frames, resolution, fps).double()  # (N, T, 3, H, W) in [-1, 1]
    mean, std = float(video.mean()), float(video.std(unbiased=False))
    if std == 0:
        raise ValueError(f"the pixels of {shards!r} are constant ({mean:.4f}): no scale normalises them")
    stats = {"clips": video.shape[0], "mean": mean, "std": std, "shift": mean, "scale": 1.0 / std}
    if anchor_keep_ratio is not None:
        stats["anchor_scale"] = anchor_residual_std(video, anchor_keep_ratio)
    return stats


def anchor_residual_std(video: torch.Tensor, keep_ratio: tuple[float, float], seed: int = 0) -> float:
    """``anchor_scale``: the standard deviation of the normalised pixels' change from the nearest given frame.

    ``video (N, T, 3, H, W)``; over the generated frames of random masks (the ``random`` template, kept fraction
    uniform in ``keep_ratio``); normalised = divided by the pixels' standard deviation, as the space-to-depth latents
    are (their shift cancels).
    """
    from mardini.diffusion.anchor import anchor_frames
    from mardini.masking import MaskSampler

    mask, _ = MaskSampler(keep_ratio).sample(video.shape[0], video.shape[1], torch.Generator().manual_seed(seed))
    change = (video - anchor_frames(video, mask)) / video.std(unbiased=False)  # (N, T, 3, H, W)
    return float(change[mask].std(unbiased=False))


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shards", required=True, help="shard pattern, e.g. data/shards/synthetic/train")
    parser.add_argument("--clips", type=int, default=512)
    parser.add_argument("--frames", type=int, default=9)
    parser.add_argument("--fps", type=float, default=8.0)
    parser.add_argument("--resolution", type=int, default=32)
    parser.add_argument("--anchor-keep-ratio", type=float, nargs=2, metavar=("LO", "HI"), default=None,
                        help="also measure anchor_scale (model.anchor: nearest) under masks keeping LO-HI of the frames")
    args = parser.parse_args(argv)
    keep = tuple(args.anchor_keep_ratio) if args.anchor_keep_ratio else None
    stats = pixel_stats(args.shards, args.clips, args.frames, args.fps, args.resolution, keep)
    print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in stats.items()}))
    print("model.init_args.autoencoder: {class_path: mardini.autoencoders.pixel.SpaceToDepthAutoencoder, "
          f"init_args: {{shift: {stats['shift']:.2f}, scale: {stats['scale']:.2f}}}}}")
    if "anchor_scale" in stats:
        print(f"model.init_args.anchor: nearest\nmodel.init_args.anchor_scale: {stats['anchor_scale']:.2f}")
    return stats


def cli(argv: list[str] | None = None) -> int:
    """The exit code of ``python -m mardini.autoencoders.pixel_stats``: 0, or 2 on a user error (missing shards, a
    folder of videos instead of shards, constant pixels), printed without a traceback."""
    from mardini.user_errors import run_reporting_user_errors

    return run_reporting_user_errors("pixel_stats", lambda: main(argv))


if __name__ == "__main__":
    sys.exit(cli())
