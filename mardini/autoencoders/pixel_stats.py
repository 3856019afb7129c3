"""Pixel statistics of a shard set: the space-to-depth ``shift`` and ``scale`` for zero-mean, unit-variance latents.

    python -m mardini.autoencoders.pixel_stats --shards data/shards/synthetic/train --clips 512

The cosine schedule assumes unit-variance data. Pixels in [-1, 1] of the synthetic set have mean -0.40 and standard
deviation 0.39 (the command above, 512 training clips), so without normalisation the content is buried in noise far
earlier than the schedule intends (signal-to-noise ratio 0.15 of the nominal at every t) and the generator gets little
training at the low-noise levels that make objects crisp. ``SpaceToDepthAutoencoder(shift=mean, scale=1/std)`` fixes that; the tiny configs use it.
"""

from __future__ import annotations

import argparse
import json


def pixel_stats(shards: str, clips: int = 512, frames: int = 9, fps: float | None = 8.0,
                resolution: int = 32) -> dict[str, float]:
    """Mean and standard deviation of the pixels (in [-1, 1]) of the first ``clips`` clips of ``shards``.

    Clips are read as training sees them (``frames`` frames at ``fps``, resized to ``resolution``), in the
    deterministic order of the validation loader. Returns ``clips, mean, std, shift (= mean), scale (= 1 / std)``.
    """
    from mardini.data.datamodule import first_clips

    video = first_clips(shards, clips, frames, resolution, fps).double()  # (N, T, 3, H, W) in [-1, 1]
    mean, std = float(video.mean()), float(video.std(unbiased=False))
    if std == 0:
        raise ValueError(f"the pixels of {shards!r} are constant ({mean:.4f}): no scale normalises them")
    return {"clips": video.shape[0], "mean": mean, "std": std, "shift": mean, "scale": 1.0 / std}


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shards", required=True, help="shard pattern, e.g. data/shards/synthetic/train")
    parser.add_argument("--clips", type=int, default=512)
    parser.add_argument("--frames", type=int, default=9)
    parser.add_argument("--fps", type=float, default=8.0)
    parser.add_argument("--resolution", type=int, default=32)
    args = parser.parse_args(argv)
    stats = pixel_stats(args.shards, args.clips, args.frames, args.fps, args.resolution)
    print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in stats.items()}))
    print("model.init_args.autoencoder: {class_path: mardini.autoencoders.pixel.SpaceToDepthAutoencoder, "
          f"init_args: {{shift: {stats['shift']:.2f}, scale: {stats['scale']:.2f}}}}}")
    return stats


if __name__ == "__main__":
    main()
